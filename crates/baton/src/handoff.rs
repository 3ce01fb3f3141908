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

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::env;
use crate::error::UpgradeError;
use crate::process::{Child, Spawn};
use crate::sys;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub(crate) enum Message {
    Ready,
    Error { message: String },
    Ack,
    Active,
}

impl Message {
    pub(crate) fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        v
    }
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
pub(crate) struct ReadyChild {
    pub upgraded: Upgraded,
    /// The new generation itself: killed if a stop wins before the ack,
    /// signalled if a stop arrives after it.
    pub child: Child,
    handshake: tokio::net::UnixStream,
}

impl ReadyChild {
    /// Tells the new generation it is now the active one, and waits
    /// (bounded) for it to confirm that it is.
    pub(crate) async fn ack(&mut self, timeout: Duration) -> Result<(), String> {
        self.handshake
            .write_all(&Message::Ack.line())
            .await
            .map_err(|e| format!("could not acknowledge: {e}"))?;
        let mut reader = BufReader::new(&mut self.handshake);
        let mut line = String::new();
        match tokio::time::timeout(timeout, reader.read_line(&mut line)).await {
            Err(_) => Err(format!("no confirmation within {timeout:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(0)) => Err("it closed the handshake without confirming".to_owned()),
            Ok(Ok(_)) => match serde_json::from_str::<Message>(line.trim()) {
                Ok(Message::Active) => Ok(()),
                Ok(Message::Error { message }) => Err(message),
                _ => Err(format!("unexpected handshake message {:?}", line.trim())),
            },
        }
    }
}

/// Starts the next generation and waits until it is ready, fails, or times
/// out. On failure the child's process group is killed and reaped before this
/// returns.
pub(crate) async fn start(next: NextGeneration) -> Result<ReadyChild, UpgradeError> {
    let started = Instant::now();
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
    tracing::info!(pid, generation = next.generation, binary = %next.binary.display(), "started new generation");

    match wait_ready(ours, &child, next.timeout, &next.abort).await {
        Ok(handshake) => Ok(ReadyChild {
            upgraded: Upgraded {
                pid,
                generation: next.generation,
                elapsed: started.elapsed(),
            },
            child,
            handshake,
        }),
        Err(failure) => {
            let status = child.kill_and_reap().await;
            let stderr_tail = child.stderr_tail().await;
            Err(match failure {
                Failure::Exited => UpgradeError::Exited {
                    pid,
                    status: status.map_or_else(|| "exited".to_owned(), |s| s.to_string()),
                    stderr_tail,
                },
                Failure::Reported(message) => UpgradeError::Reported {
                    pid,
                    message,
                    stderr_tail,
                },
                Failure::Timeout => UpgradeError::Timeout {
                    pid,
                    timeout: next.timeout,
                    stderr_tail,
                },
                Failure::Aborted => UpgradeError::Aborted { pid },
                Failure::Io(e) => UpgradeError::Io(e),
            })
        }
    }
}

enum Failure {
    Exited,
    Reported(String),
    Timeout,
    Aborted,
    Io(io::Error),
}

async fn wait_ready(
    ours: std::os::unix::net::UnixStream,
    child: &Child,
    timeout: Duration,
    abort: &tokio_util::sync::CancellationToken,
) -> Result<tokio::net::UnixStream, Failure> {
    ours.set_nonblocking(true).map_err(Failure::Io)?;
    let stream = tokio::net::UnixStream::from_std(ours).map_err(Failure::Io)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let outcome = tokio::time::timeout(timeout, async {
        tokio::select! {
            // The handshake line decides; an EOF means the child closed its
            // end (usually because it is exiting), so we wait for its exit.
            read = reader.read_line(&mut line) => match read {
                Ok(0) => { let _ = child.wait().await; Err(Failure::Exited) }
                Ok(_) => match serde_json::from_str::<Message>(line.trim()) {
                    Ok(Message::Ready) => Ok(()),
                    Ok(Message::Error { message }) => Err(Failure::Reported(message)),
                    Ok(Message::Ack | Message::Active) | Err(_) => Err(Failure::Reported(format!("unexpected handshake message {:?}", line.trim()))),
                },
                Err(e) => Err(Failure::Io(e)),
            },
            _ = child.wait() => Err(Failure::Exited),
            _ = abort.cancelled() => Err(Failure::Aborted),
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => Ok(reader.into_inner()),
        Ok(Err(f)) => Err(f),
        Err(_) => Err(Failure::Timeout),
    }
}

/// Sends the last handshake message: active, or what went wrong.
#[derive(Debug)]
pub(crate) struct Confirm(tokio::net::UnixStream);

impl Confirm {
    pub(crate) async fn send(mut self, result: Result<(), String>) {
        let msg = match result {
            Ok(()) => Message::Active,
            Err(message) => Message::Error { message },
        };
        if let Err(e) = self.0.write_all(&msg.line()).await {
            tracing::warn!(error = %e, "could not confirm to the previous generation");
        }
    }
}

/// The new generation's side of the handshake.
#[derive(Debug)]
pub(crate) struct ChildHandshake {
    pub stream: std::os::unix::net::UnixStream,
    pub real_stderr: Option<OwnedFd>,
}

impl ChildHandshake {
    /// Reports readiness and waits for the old generation's go-ahead. On
    /// success, stderr is switched from the capture pipe to the real one;
    /// the returned handle confirms activity (or failure) afterwards.
    pub(crate) async fn ready(self) -> Result<Confirm, crate::Error> {
        self.stream
            .set_nonblocking(true)
            .map_err(crate::Error::Handshake)?;
        let mut stream =
            tokio::net::UnixStream::from_std(self.stream).map_err(crate::Error::Handshake)?;
        stream
            .write_all(&Message::Ready.line())
            .await
            .map_err(crate::Error::Handshake)?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .await
            .map_err(crate::Error::Handshake)?;
        if n == 0 {
            return Err(crate::Error::RolledBack);
        }
        match serde_json::from_str::<Message>(line.trim()) {
            Ok(Message::Ack) => {}
            _ => {
                return Err(crate::Error::Handshake(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected handshake message {:?}", line.trim()),
                )))
            }
        }
        if let Some(real) = self.real_stderr {
            sys::redirect_stderr(real).map_err(crate::Error::Handshake)?;
        }
        Ok(Confirm(reader.into_inner()))
    }

    /// Reports a startup error to the old generation (best effort).
    pub(crate) fn fail(mut self, message: &str) {
        use std::io::Write as _;
        let _ = self.stream.write_all(
            &Message::Error {
                message: message.to_owned(),
            }
            .line(),
        );
    }
}
