//! The hand-off between generations: starting the next one with our sockets,
//! and the private handshake over an inherited socketpair.
//!
//! Handshake messages are JSON lines:
//! - new → old: `{"event":"ready"}` or `{"event":"error","message":"..."}`
//! - old → new: `{"event":"ack"}` once the old generation has stopped
//!   accepting; only then does the new one write the pid file and open the
//!   control socket. If the old generation gives up (timeout), it kills the
//!   new one instead of answering.
//! - new → old: `{"event":"active"}` once the pid file names it and its
//!   control socket answers, so that the upgrade's caller is told "ok" only
//!   when everything it can observe already agrees.
//! - new → old, later: `{"event":"leaving"}` when the new generation stops
//!   or hands over on purpose, so that its exit within the old one's settle
//!   period is not taken for a failure. The channel stays open through the
//!   settle period; the old generation watches the new one's exit (pidfd).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, BufReader};

use crate::env;
use crate::error::{LineError, UpgradeError};
use crate::fdpass;
use crate::line::{self, MAX_LINE};
use crate::process::{Child, Spawn, Subreaper};
use crate::sys;

/// How long a new generation waits for the `ack` after sending `ready`. The
/// old generation answers at once (it is reading the handshake while it
/// waits); past its upgrade timeout it kills the new one instead, so this
/// only bounds the wait on an old generation that is wedged.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest message a new generation sends with [`ChildHandshake::fail`]
/// (longer ones are cut), so that its line, escaped, fits in [`MAX_LINE`].
const MAX_FAIL_MESSAGE: usize = 8 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub(crate) enum Message {
    Ready {
        /// Listeners whose connections this generation takes over
        /// (connection migration); absent: none.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        migrate: Vec<String>,
    },
    Error {
        message: String,
    },
    Ack {
        /// The old generation's metric totals, which the new one carries on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        totals: Option<crate::metrics::Totals>,
        /// State the application hands on, by name
        /// ([`crate::Baton::pass_on`]); absent: none.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        state: BTreeMap<String, serde_json::Value>,
    },
    Active,
    Leaving,
}

impl Message {
    pub(crate) fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        v
    }

    /// Parses one handshake line; the error says what was wrong with it.
    fn parse(line: &[u8]) -> Result<Message, String> {
        let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8: {e}"))?;
        serde_json::from_str(text.trim()).map_err(|_| unexpected(text))
    }
}

/// "unexpected handshake message ..." showing at most the first 200 characters.
fn unexpected(text: &str) -> String {
    let shown: String = text.trim().chars().take(200).collect();
    let cut = if shown.len() < text.trim().len() {
        "…"
    } else {
        ""
    };
    format!("unexpected handshake message {shown:?}{cut}")
}

/// The outcome of a successful upgrade.
#[derive(Debug, Clone, Serialize)]
pub struct Upgraded {
    /// Pid of the new generation.
    pub pid: u32,
    /// Its generation number.
    pub generation: u64,
    /// From the request to the new generation's readiness.
    #[serde(serialize_with = "ser_ms", rename = "elapsed_ms")]
    pub elapsed: Duration,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// Everything needed to start the next generation.
pub(crate) struct NextGeneration {
    pub binary: PathBuf,
    pub args: Vec<OsString>,
    pub generation: u64,
    /// (name, fd) in `LISTEN_FDNAMES` order.
    pub fds: Vec<(String, OwnedFd)>,
    pub timeout: Duration,
    /// Cancelled when a stop wins over this upgrade: the new generation is
    /// killed and reaped, and the upgrade fails with `Aborted`.
    pub abort: tokio_util::sync::CancellationToken,
}

/// A new generation that is ready; the old one must stop accepting, then
/// call [`ReadyChild::ack`].
#[derive(Debug)]
pub(crate) struct ReadyChild {
    pub upgraded: Upgraded,
    /// The new generation itself: killed (or, when it took over, told no)
    /// if a stop wins before the ack, signalled if a stop arrives after it.
    pub child: Peer,
    /// Listeners whose connections it takes over (it said so in `ready`).
    pub takes: Vec<String>,
    /// One reader for the whole channel, so that no line read ahead (a
    /// `leaving` right after `active`) is lost between `ack` and `watch`.
    /// Moved into the migration link once that starts.
    handshake: Option<BufReader<tokio::net::UnixStream>>,
    link: Option<std::sync::Arc<crate::migrate::Outgoing>>,
}

impl ReadyChild {
    fn new(
        upgraded: Upgraded,
        child: Peer,
        takes: Vec<String>,
        handshake: BufReader<tokio::net::UnixStream>,
    ) -> ReadyChild {
        ReadyChild {
            upgraded,
            child,
            takes,
            handshake: Some(handshake),
            link: None,
        }
    }

    /// Tells the new generation it is now the active one, and waits
    /// (bounded) for it to confirm that it is.
    pub(crate) async fn ack(
        &mut self,
        timeout: Duration,
        totals: Option<crate::metrics::Totals>,
        state: BTreeMap<String, serde_json::Value>,
    ) -> Result<(), String> {
        let Some(handshake) = self.handshake.as_mut() else {
            return Err("the handshake was already used".to_owned());
        };
        handshake
            .get_mut()
            .write_all(&Message::Ack { totals, state }.line())
            .await
            .map_err(|e| format!("could not acknowledge: {e}"))?;
        let mut line = Vec::new();
        match line::read_line(handshake, &mut line, MAX_LINE, Some(timeout)).await {
            Err(LineError::Timeout(_)) => Err(format!("no confirmation within {timeout:?}")),
            Err(e) => Err(e.to_string()),
            Ok(false) => Err("it closed the handshake without confirming".to_owned()),
            Ok(true) => match Message::parse(&line)? {
                Message::Active => Ok(()),
                Message::Error { message } => Err(message),
                Message::Ready { .. } | Message::Ack { .. } | Message::Leaving => {
                    Err(unexpected(&String::from_utf8_lossy(&line)))
                }
            },
        }
    }

    /// Watches the active new generation (for the settle period; the
    /// caller bounds it): returns when it exits, with its exit status
    /// (killing and reaping whatever it left), or `Left` when it said it
    /// stops or hands over on purpose. The handshake reaching EOF alone
    /// (a new generation that closed it) is not an exit.
    pub(crate) async fn watch(&mut self) -> Watched {
        if let Some(link) = self.link.clone() {
            tokio::select! {
                _ = link.left() => return Watched::Left,
                _ = self.child.exited() => {}
            }
            let status = self.child.kill_tree_and_reap().await;
            return Watched::Died(status.map_or_else(|| "exited".to_owned(), |s| s.to_string()));
        }
        let mut line = Vec::new();
        let mut open = self.handshake.is_some();
        loop {
            tokio::select! {
                read = read_opt(self.handshake.as_mut(), &mut line), if open => {
                    match read {
                        Ok(true) if matches!(Message::parse(&line), Ok(Message::Leaving)) => {
                            return Watched::Left;
                        }
                        Ok(true) => {
                            tracing::debug!(line = %String::from_utf8_lossy(&line), "ignoring handshake line");
                            line.clear();
                        }
                        Ok(false) | Err(_) => open = false,
                    }
                }
                _ = self.child.exited() => break,
            }
        }
        let status = self.child.kill_tree_and_reap().await;
        Watched::Died(status.map_or_else(|| "exited".to_owned(), |s| s.to_string()))
    }
}

/// The new generation, as the old one watches it: a child it started, or
/// an independently started process that asked to take over.
#[derive(Debug)]
pub(crate) enum Peer {
    Child(Child),
    TakingOver(TakingOver),
}

/// A process that asked to take over over the control socket: not our
/// child, so it is watched through a pidfd and never killed or reaped here.
#[derive(Debug)]
pub(crate) struct TakingOver {
    pidfd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl TakingOver {
    fn open(pid: u32) -> io::Result<TakingOver> {
        let raw = rustix::process::Pid::from_raw(pid as i32)
            .ok_or_else(|| io::Error::other("peer pid 0"))?;
        let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())?;
        Ok(TakingOver {
            pidfd: sys::async_pidfd(fd)?,
        })
    }
}

/// A watch on process `pid` (not ours to reap): resolves when it exits.
/// Fails if it cannot be watched (it is gone already).
pub(crate) fn exit_of(pid: u32) -> io::Result<impl std::future::Future<Output = ()> + Send> {
    let watch = TakingOver::open(pid)?;
    Ok(async move {
        let _ = watch.pidfd.readable().await;
    })
}

impl Peer {
    pub(crate) async fn exited(&self) {
        match self {
            Peer::Child(c) => c.exited().await,
            // A pidfd becomes readable, for good, when the process exits.
            Peer::TakingOver(t) => {
                let _ = t.pidfd.readable().await;
            }
        }
    }

    pub(crate) fn has_exited(&self) -> bool {
        match self {
            Peer::Child(c) => c.has_exited(),
            Peer::TakingOver(t) => sys::pidfd_exited(t.pidfd.get_ref().as_fd()),
        }
    }

    /// A child: kill what it started and reap it. A process that took
    /// over is not ours to kill; it has exited when this is called.
    pub(crate) async fn kill_tree_and_reap(&self) -> Option<crate::process::ExitStatus> {
        match self {
            Peer::Child(c) => c.kill_tree_and_reap().await,
            Peer::TakingOver(_) => None,
        }
    }

    /// A stop won before the ack: a child is killed; a process that asked
    /// to take over is told no when the connection closes (it exits).
    pub(crate) async fn abandon(&self) {
        if let Peer::Child(c) = self {
            c.kill_and_reap().await;
        }
    }

    async fn stderr_tail(&self) -> String {
        match self {
            Peer::Child(c) => c.stderr_tail().await,
            Peer::TakingOver(_) => String::new(),
        }
    }

    pub(crate) fn signal(&self, signal: i32) -> io::Result<()> {
        match self {
            Peer::Child(c) => c.signal(signal),
            Peer::TakingOver(t) => crate::process::signal_pidfd(t.pidfd.get_ref().as_fd(), signal),
        }
    }
}

impl ReadyChild {
    /// Once it is active: if it takes connections, the channel becomes the
    /// migration link (which also carries `leaving` for [`watch`](Self::watch)).
    pub(crate) fn start_link(&mut self) -> Option<std::sync::Arc<crate::migrate::Outgoing>> {
        if self.takes.is_empty() {
            return None;
        }
        let handshake = self.handshake.take()?;
        match crate::migrate::Outgoing::start(handshake, self.takes.clone()) {
            Ok(link) => {
                self.link = Some(link.clone());
                Some(link)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot set up connection migration; draining instead");
                None
            }
        }
    }
}

/// Reads a line from the handshake, if it is still there (else never).
async fn read_opt(
    handshake: Option<&mut BufReader<tokio::net::UnixStream>>,
    line: &mut Vec<u8>,
) -> Result<bool, LineError> {
    match handshake {
        Some(h) => line::read_line(h, line, MAX_LINE, None).await,
        None => std::future::pending().await,
    }
}

/// How the watch on an active new generation ended.
#[derive(Debug)]
pub(crate) enum Watched {
    /// It exited (the exit status or signal).
    Died(String),
    /// It stops or hands over on purpose.
    Left,
}

/// Starts the next generation and waits until it is ready, fails, or times
/// out. On failure everything the attempt started is killed and reaped
/// before this returns (see [`Child::kill_tree_and_reap`]), and every fd of
/// the attempt is closed.
pub(crate) async fn start(next: NextGeneration) -> Result<ReadyChild, UpgradeError> {
    let started = Instant::now();
    // For the attempt, orphans of the new generation's processes (a helper
    // whose parent exited, a daemon that double-forked) are reparented to
    // us rather than to init, so a rollback can kill and reap them.
    let _subreaper = Subreaper::acquire().map_err(UpgradeError::Io)?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(UpgradeError::Io)?;
    let mut spawn = Spawn::new(&next.binary)
        .argv(next.args.iter().cloned())
        .env(env::BATON_GENERATION, next.generation.to_string())
        .env(env::BATON_PARENT_PID, std::process::id().to_string());
    for (name, fd) in next.fds {
        spawn = spawn.listen_fd(name, fd);
    }
    let handshake_fd = spawn.extra_fd(OwnedFd::from(theirs));
    spawn = spawn.env(env::BATON_HANDSHAKE_FD, handshake_fd.to_string());
    // stderr capture: the child's fd 2 is a pipe we read until it is ready;
    // it gets our real stderr as an extra fd to switch to afterwards.
    if let Some(real) = sys::dup_stderr() {
        let stderr_fd = spawn.extra_fd(real);
        spawn = spawn
            .env(env::BATON_STDERR_FD, stderr_fd.to_string())
            .capture_stderr(true);
    }
    let child = spawn.spawn().await.map_err(|source| UpgradeError::Spawn {
        path: next.binary.clone(),
        source,
    })?;
    let pid = child.pid();
    let child = Peer::Child(child);
    tracing::info!(pid, generation = next.generation, binary = %next.binary.display(), "started new generation");

    let mut reader = match tokio_stream(ours) {
        Ok(stream) => BufReader::new(stream),
        Err(e) => {
            child.kill_tree_and_reap().await;
            return Err(UpgradeError::Io(e));
        }
    };
    // The handshake stays open until the attempt is cleaned up: the new
    // generation must not see EOF (and take itself for orphaned) before it
    // is killed.
    match wait_ready(&mut reader, &child, next.timeout, &next.abort).await {
        Ok(takes) => Ok(ReadyChild::new(
            Upgraded {
                pid,
                generation: next.generation,
                elapsed: started.elapsed(),
            },
            child,
            takes,
            reader,
        )),
        Err(failure) => {
            let status = child.kill_tree_and_reap().await;
            drop(reader);
            let stderr_tail = child.stderr_tail().await;
            let status = status.map_or_else(|| "exited".to_owned(), |s| s.to_string());
            Err(failure.into_error(pid, status, next.timeout, stderr_tail))
        }
    }
}

/// What the old generation offers a process that asked to take over.
pub(crate) struct TakeoverOffer {
    pub generation: u64,
    /// (name, fd): every listener, then the control socket.
    pub fds: Vec<(String, OwnedFd)>,
    pub timeout: Duration,
    pub abort: tokio_util::sync::CancellationToken,
}

/// How long the old generation tries to tell a refused take-over why.
const TELL_WHY: Duration = Duration::from_secs(1);

/// The old generation's side of a take-over over the control socket: sends
/// the answer line with every fd attached, then waits, as for a child, until
/// the new process is ready, reports an error, exits or misses the timeout.
/// On failure it is told why (an `error` line) and the connection closes;
/// the process is not ours to kill, it exits on its own.
pub(crate) async fn accept_takeover(
    stream: tokio::net::UnixStream,
    offer: TakeoverOffer,
) -> Result<ReadyChild, UpgradeError> {
    let started = Instant::now();
    let pid = stream
        .peer_cred()
        .map_err(UpgradeError::Io)?
        .pid()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| UpgradeError::Io(io::Error::other("the peer's pid is unknown")))?;
    let peer = Peer::TakingOver(TakingOver::open(pid).map_err(UpgradeError::Io)?);
    let names: Vec<&str> = offer.fds.iter().map(|(n, _)| n.as_str()).collect();
    let mut answer = serde_json::to_vec(&serde_json::json!({
        "ok": true,
        "generation": offer.generation,
        "pid": std::process::id(),
        "fds": names,
    }))
    .map_err(|e| UpgradeError::Io(io::Error::other(e)))?;
    answer.push(b'\n');
    let fds: Vec<_> = offer.fds.iter().map(|(_, fd)| fd.as_fd()).collect();
    fdpass::send_all(&stream, &answer, &fds)
        .await
        .map_err(UpgradeError::Io)?;
    drop(fds);
    // Our copies go now: the new process holds its own.
    drop(offer.fds);
    tracing::info!(
        pid,
        generation = offer.generation,
        "sent the sockets to a process taking over"
    );
    let mut reader = BufReader::new(stream);
    match wait_ready(&mut reader, &peer, offer.timeout, &offer.abort).await {
        Ok(takes) => Ok(ReadyChild::new(
            Upgraded {
                pid,
                generation: offer.generation,
                elapsed: started.elapsed(),
            },
            peer,
            takes,
            reader,
        )),
        Err(failure) => {
            let why = match &failure {
                Failure::Timeout => Some(format!("not ready within {:?}", offer.timeout)),
                Failure::Aborted => Some("the running generation is stopping".to_owned()),
                Failure::Protocol(reason) => Some(reason.clone()),
                Failure::Exited | Failure::Reported(_) | Failure::Io(_) => None,
            };
            if let Some(message) = why {
                let line = Message::Error { message }.line();
                let _ = tokio::time::timeout(TELL_WHY, reader.get_mut().write_all(&line)).await;
            }
            Err(failure.into_error(pid, "exited".to_owned(), offer.timeout, String::new()))
        }
    }
}

impl Failure {
    fn into_error(
        self,
        pid: u32,
        status: String,
        timeout: Duration,
        stderr_tail: String,
    ) -> UpgradeError {
        match self {
            Failure::Exited => UpgradeError::Exited {
                pid,
                status,
                stderr_tail,
            },
            Failure::Reported(message) => UpgradeError::Reported {
                pid,
                message,
                stderr_tail,
            },
            Failure::Timeout => UpgradeError::Timeout {
                pid,
                timeout,
                stderr_tail,
            },
            Failure::Aborted => UpgradeError::Aborted { pid },
            Failure::Protocol(reason) => UpgradeError::Handshake {
                pid,
                reason,
                stderr_tail,
            },
            Failure::Io(e) => UpgradeError::Io(e),
        }
    }
}

enum Failure {
    Exited,
    Reported(String),
    Protocol(String),
    Timeout,
    Aborted,
    Io(io::Error),
}

/// How long the line a child wrote before exiting may take to read: it is
/// in the channel already, unless something the child left holds its end.
const EXIT_LINE_WAIT: Duration = Duration::from_millis(100);

/// The child exited before a handshake line was read: an error it reported
/// just before exiting may still be in the channel (or half read into
/// `line`); it names the failure better than the exit status does.
async fn exit_failure(
    reader: &mut BufReader<tokio::net::UnixStream>,
    line: &mut Vec<u8>,
) -> Failure {
    let read = tokio::time::timeout(
        EXIT_LINE_WAIT,
        line::read_line(reader, line, MAX_LINE, None),
    )
    .await;
    match read {
        Ok(Ok(true)) => match Message::parse(line) {
            Ok(Message::Error { message }) => Failure::Reported(message),
            _ => Failure::Exited,
        },
        _ => Failure::Exited,
    }
}

fn tokio_stream(s: std::os::unix::net::UnixStream) -> io::Result<tokio::net::UnixStream> {
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

async fn wait_ready(
    reader: &mut BufReader<tokio::net::UnixStream>,
    child: &Peer,
    timeout: Duration,
    abort: &tokio_util::sync::CancellationToken,
) -> Result<Vec<String>, Failure> {
    let mut line = Vec::new();
    // The child is not reaped here: a rollback kills what it started first,
    // while its pid (and process group) cannot be reused.
    let outcome = tokio::time::timeout(timeout, async {
        tokio::select! {
            // The handshake line decides; an EOF means the child closed its
            // end (usually because it is exiting), so we wait for its exit.
            read = line::read_line(reader, &mut line, MAX_LINE, None) => match read {
                Ok(false) => { let _ = child.exited().await; Err(Failure::Exited) }
                Ok(true) => match Message::parse(&line) {
                    // Ready, but gone already: nobody would serve.
                    Ok(Message::Ready { .. }) if child.has_exited() => Err(Failure::Exited),
                    Ok(Message::Ready { migrate }) => Ok(migrate),
                    Ok(Message::Error { message }) => Err(Failure::Reported(message)),
                    Ok(Message::Ack { .. } | Message::Active | Message::Leaving) => Err(Failure::Protocol(unexpected(&String::from_utf8_lossy(&line)))),
                    Err(reason) => Err(Failure::Protocol(reason)),
                },
                Err(LineError::Io(e)) => Err(Failure::Io(e)),
                Err(e) => Err(Failure::Protocol(e.to_string())),
            },
            _ = child.exited() => Err(exit_failure(reader, &mut line).await),
            _ = abort.cancelled() => Err(Failure::Aborted),
        }
    })
    .await;
    match outcome {
        Ok(Ok(takes)) => Ok(takes),
        Ok(Err(f)) => Err(f),
        Err(_) => Err(Failure::Timeout),
    }
}

/// Sends the last handshake message: active, or what went wrong.
#[derive(Debug)]
pub(crate) struct Confirm(tokio::net::UnixStream);

impl Confirm {
    /// Sends the confirmation; returns the channel, kept open so that the
    /// previous generation can be told [`ParentLink::leaving`].
    pub(crate) async fn send(mut self, result: Result<(), String>) -> Option<ParentLink> {
        let msg = match result {
            Ok(()) => Message::Active,
            Err(message) => Message::Error { message },
        };
        if let Err(e) = self.0.write_all(&msg.line()).await {
            tracing::warn!(error = %e, "could not confirm to the previous generation");
            return None;
        }
        Some(ParentLink(std::sync::Arc::new(self.0)))
    }
}

/// The new generation's end of the handshake, kept after it became active
/// for as long as the previous generation may be watching it.
#[derive(Debug)]
pub(crate) struct ParentLink(std::sync::Arc<tokio::net::UnixStream>);

impl ParentLink {
    /// Resolves when the previous generation has closed its end (its settle
    /// period is over or it exited): the link is of no more use then, and
    /// dropping it keeps the fd set of every generation the same.
    pub(crate) fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stream = std::sync::Arc::clone(&self.0);
        async move {
            let mut buf = [0u8; 64];
            // Nothing is sent after `ack`: EOF or an error ends it.
            while stream.readable().await.is_ok() {
                match stream.try_read(&mut buf) {
                    Ok(0) => return,
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => return,
                    _ => {}
                }
            }
        }
    }

    /// The channel itself (connection migration reads it).
    pub(crate) fn stream(&self) -> std::sync::Arc<tokio::net::UnixStream> {
        std::sync::Arc::clone(&self.0)
    }

    /// Tells the previous generation that this one stops or hands over on
    /// purpose (best effort, never blocks).
    pub(crate) fn leaving(self) {
        // One short line into an idle socket; no SIGPIPE if the previous
        // generation is gone.
        let _ = rustix::net::send(
            &*self.0,
            &Message::Leaving.line(),
            rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT,
        );
    }
}

/// How a new generation's [`ChildHandshake::ready`] ended well.
#[derive(Debug)]
pub(crate) enum Handover {
    /// The previous generation stopped accepting: confirm with this; it
    /// sent its metric totals (a current binary does) and the state the
    /// application hands on.
    Confirm(
        Confirm,
        Option<crate::metrics::Totals>,
        BTreeMap<String, serde_json::Value>,
    ),
    /// The previous generation is gone (it died before the hand-over): this
    /// one holds every inherited socket and takes over on its own.
    Orphaned,
}

/// How long a new generation whose handshake broke waits to see its
/// parent gone (the kernel closes a dying process's fds before it
/// reparents its children).
const ORPHAN_CHECK: Duration = Duration::from_secs(1);

/// Who the previous generation is to a new one.
#[derive(Debug)]
pub(crate) enum Parent {
    /// It started this one (`BATON_PARENT_PID`).
    Spawned,
    /// This one asked it to take over over its control socket; a pidfd
    /// tells when it exits.
    TakenOver {
        /// Its pid.
        pid: u32,
        /// A pidfd of it.
        pidfd: OwnedFd,
    },
}

/// Whether the previous generation is gone: our parent (we were
/// reparented), or the process we took over from (it exited). Waits up to
/// [`ORPHAN_CHECK`] for it.
async fn orphaned(parent: &Parent) -> bool {
    let gone = || match parent {
        Parent::Spawned => {
            let pid = env::var(env::BATON_PARENT_PID).and_then(|p| p.parse::<i32>().ok())?;
            let ppid = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
            Some(ppid != pid)
        }
        Parent::TakenOver { pidfd, .. } => Some(sys::pidfd_exited(pidfd.as_fd())),
    };
    let deadline = Instant::now() + ORPHAN_CHECK;
    loop {
        match gone() {
            None => return false,
            Some(true) => return true,
            Some(false) if Instant::now() >= deadline => return false,
            Some(false) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// A process taking over was given up on (or its old generation died)
/// before it called `ready`. A child in that case is killed by the old
/// generation; a process that took over is not the old one's to kill, so it
/// ends itself here, after saying why on its stderr, with status 1 (its
/// application may be stuck in its own start-up). If the old generation
/// died instead, this one takes over alone once ready.
async fn gave_up(
    stream: &tokio::net::UnixStream,
    pid: u32,
    parent: &Parent,
    started: &std::sync::atomic::AtomicBool,
) {
    let mut buf = [0u8; 1024];
    let peeked = rustix::net::recv(
        stream,
        &mut buf[..],
        rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
    );
    let reason = match peeked {
        Ok((0, _)) | Err(_) => {
            if orphaned(parent).await {
                tracing::warn!(
                    pid,
                    "the generation this one takes over from exited; this one will take over alone once ready"
                );
                return;
            }
            "it closed the connection".to_owned()
        }
        Ok((n, _)) => match Message::parse(&buf[..n.min(buf.len())]) {
            Ok(Message::Error { message }) => message,
            _ => unexpected(&String::from_utf8_lossy(&buf[..n.min(buf.len())])),
        },
    };
    if started.load(std::sync::atomic::Ordering::SeqCst) {
        // `ready` reads the same answer and returns it as an error.
        return;
    }
    tracing::error!(
        pid,
        reason,
        "the running generation gave up on this take-over before it was ready; exiting"
    );
    eprintln_best_effort(&format!(
        "baton: take-over from pid {pid} failed: {reason}\n"
    ));
    // See the function's comment: the equivalent of the kill a child gets.
    #[allow(clippy::exit)]
    std::process::exit(1);
}

/// Writes to stderr, ignoring a failure (no panic on a closed stderr).
fn eprintln_best_effort(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// The new generation's side of the handshake.
#[derive(Debug)]
pub(crate) struct ChildHandshake {
    pub stream: std::os::unix::net::UnixStream,
    /// Taken by whoever switches stderr first: `ready`, or the watch on a
    /// previous generation that dies while this one starts.
    pub real_stderr: std::sync::Arc<std::sync::Mutex<Option<OwnedFd>>>,
    pub parent: std::sync::Arc<Parent>,
    /// Set when [`ChildHandshake::ready`] begins.
    pub ready_started: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ChildHandshake {
    /// The previous generation's pid: our parent's, or the one we take
    /// over from.
    pub(crate) fn previous_pid(&self) -> Option<u32> {
        match &*self.parent {
            Parent::Spawned => env::var(env::BATON_PARENT_PID).and_then(|p| p.parse().ok()),
            Parent::TakenOver { pid, .. } => Some(*pid),
        }
    }
}

/// Moves the real stderr onto fd 2, once.
fn switch_stderr(real: &std::sync::Mutex<Option<OwnedFd>>) -> io::Result<()> {
    let fd = real.lock().unwrap_or_else(|e| e.into_inner()).take();
    match fd {
        Some(fd) => sys::redirect_stderr(fd),
        None => Ok(()),
    }
}

impl ChildHandshake {
    /// While this generation starts: if the previous one dies (the
    /// handshake is closed and we were reparented), switch stderr to the
    /// real one at once, since nobody reads the capture pipe any more (a
    /// log line written there would fail). Ends at the first sign of life
    /// from the previous generation (the ack is readable). Needs a tokio
    /// runtime; without one it does nothing.
    pub(crate) fn watch_parent(&self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let Ok(dup) = self.stream.try_clone() else {
            return;
        };
        let Ok(stream) = tokio_stream(dup) else {
            return;
        };
        let real = self.real_stderr.clone();
        let parent = self.parent.clone();
        let started = self.ready_started.clone();
        tokio::spawn(async move {
            let Ok(ready) = stream.ready(tokio::io::Interest::READABLE).await else {
                return;
            };
            if let Parent::TakenOver { pid, .. } = &*parent {
                // Before `ready`, the process we take over from sends
                // nothing unless it gives up on us.
                if !started.load(std::sync::atomic::Ordering::SeqCst) {
                    gave_up(&stream, *pid, &parent, &started).await;
                }
                return;
            }
            if ready.is_read_closed() && orphaned(&parent).await {
                if let Err(e) = switch_stderr(&real) {
                    tracing::warn!(error = %e, "cannot switch to the real stderr");
                }
                tracing::warn!(
                    "the previous generation died while this one was starting; this one will take over alone once ready"
                );
            }
        });
    }

    /// Reports readiness and waits for the old generation's go-ahead. On
    /// success, stderr is switched from the capture pipe to the real one;
    /// the returned handle confirms activity (or failure) afterwards.
    ///
    /// If the handshake breaks because the previous generation died (we
    /// were reparented), this one has every socket and takes over alone:
    /// stderr is switched all the same and `Orphaned` returned.
    pub(crate) async fn ready(self, migrate: Vec<String>) -> Result<Handover, crate::Error> {
        self.ready_started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let real_stderr = self.real_stderr;
        let parent = self.parent;
        let mut stream = tokio_stream(self.stream).map_err(crate::Error::Handshake)?;
        let read = match stream.write_all(&Message::Ready { migrate }.line()).await {
            Err(e) => Err(LineError::Io(e)),
            Ok(()) => {
                let mut reader = BufReader::new(&mut stream);
                let mut line = Vec::new();
                line::read_line(&mut reader, &mut line, MAX_LINE, Some(ACK_TIMEOUT))
                    .await
                    .map(|got| got.then_some(line))
            }
        };
        let line = match read {
            Ok(Some(line)) => line,
            Ok(None) | Err(LineError::Io(_)) if orphaned(&parent).await => {
                // Nobody reads the capture pipe any more.
                switch_stderr(&real_stderr).map_err(crate::Error::Handshake)?;
                tracing::warn!(
                    "the previous generation is gone before handing over; taking over alone"
                );
                return Ok(Handover::Orphaned);
            }
            Ok(None) => return Err(crate::Error::RolledBack),
            Err(e) => return Err(crate::Error::Handshake(e.into())),
        };
        let (totals, state) = match Message::parse(&line) {
            Ok(Message::Ack { totals, state }) => (totals, state),
            // The process this one takes over from gave up on it.
            Ok(Message::Error { message }) => return Err(crate::Error::Refused(message)),
            Ok(_) => {
                return Err(crate::Error::Handshake(io::Error::new(
                    io::ErrorKind::InvalidData,
                    unexpected(&String::from_utf8_lossy(&line)),
                )))
            }
            Err(reason) => {
                return Err(crate::Error::Handshake(io::Error::new(
                    io::ErrorKind::InvalidData,
                    reason,
                )))
            }
        };
        switch_stderr(&real_stderr).map_err(crate::Error::Handshake)?;
        Ok(Handover::Confirm(Confirm(stream), totals, state))
    }

    /// Reports a startup error to the old generation (best effort; a
    /// message longer than 8 KiB is cut).
    pub(crate) fn fail(mut self, message: &str) {
        use std::io::Write as _;
        let mut end = message.len().min(MAX_FAIL_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let _ = self.stream.write_all(
            &Message::Error {
                message: message[..end].to_owned(),
            }
            .line(),
        );
    }
}
