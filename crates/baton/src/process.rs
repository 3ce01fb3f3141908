//! Starting a child process that inherits listening sockets, the systemd
//! way: the sockets at fd 3, 4, …, `LISTEN_FDS`, `LISTEN_FDNAMES`, and
//! `LISTEN_PID` set to the child's own pid. Used for the next generation of
//! a Baton server and by `baton run` for any program.
//!
//! The child runs in its own process group (so [`Child::kill`] takes
//! everything it started with it, unless it left the group), with every fd
//! but 0, 1, 2 and the ones given here closed at exec, and `LISTEN_PID` set
//! to its own pid (also when no socket is passed), which its descendants
//! inherit. [`Child::kill_tree_and_reap`] uses that, the process group, the
//! session and the parent links in `/proc` to kill everything it started,
//! including processes that called `setsid`. Its stderr can be captured:
//! passed through to ours, with the last 4 KiB kept for error reports.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;

use crate::env;
use crate::sync::lock;
use crate::sys;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this status.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The conventional shell status: the code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match self {
            ExitStatus::Code(c) => *c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with status {c}"),
            ExitStatus::Signal(s) => {
                write!(f, "killed by signal {} ({s})", sys::signal_name(*s))
            }
        }
    }
}

impl From<sys::ExitStatus> for ExitStatus {
    fn from(s: sys::ExitStatus) -> Self {
        match s {
            sys::ExitStatus::Code(c) => ExitStatus::Code(c),
            sys::ExitStatus::Signal(s) => ExitStatus::Signal(s),
        }
    }
}

/// What to start. See the [module docs](self).
#[derive(Debug)]
pub struct Spawn {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    listen: Vec<(String, OwnedFd)>,
    extra: Vec<OwnedFd>,
    capture_stderr: bool,
}

impl Spawn {
    /// Starts `program` with `argv[0]` = `program`. The environment is ours,
    /// minus the variables recomputed for each child (`LISTEN_*`,
    /// `BATON_*`).
    pub fn new(program: impl Into<PathBuf>) -> Spawn {
        let program = program.into();
        let env = std::env::vars_os()
            .filter(|(k, _)| !env::RECOMPUTED.iter().any(|r| k.as_bytes() == r.as_bytes()))
            .collect();
        Spawn {
            args: vec![program.clone().into_os_string()],
            program,
            env,
            listen: Vec::new(),
            extra: Vec::new(),
            capture_stderr: false,
        }
    }

    /// Replaces the whole argv (`argv[0]` included).
    pub fn argv(mut self, argv: impl IntoIterator<Item = impl Into<OsString>>) -> Spawn {
        self.args = argv.into_iter().map(Into::into).collect();
        self
    }

    /// Sets an environment variable (replacing ours).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Spawn {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// Removes an environment variable.
    pub fn env_remove(mut self, key: &str) -> Spawn {
        self.env.retain(|(k, _)| k.as_bytes() != key.as_bytes());
        self
    }

    /// Passes a listening socket under `name` (in `LISTEN_FDNAMES`). The fd
    /// given here is closed in this process once the child has started; pass
    /// a duplicate (`try_clone`) to keep using the socket.
    pub fn listen_fd(mut self, name: impl Into<String>, fd: OwnedFd) -> Spawn {
        self.listen.push((name.into(), fd));
        self
    }

    /// Passes another fd after the listening ones (not counted in
    /// `LISTEN_FDS`); returns the fd number the child will see. Call after
    /// every [`listen_fd`](Self::listen_fd).
    pub fn extra_fd(&mut self, fd: OwnedFd) -> RawFd {
        self.extra.push(fd);
        sys::LISTEN_FDS_START + (self.listen.len() + self.extra.len() - 1) as RawFd
    }

    /// Captures the child's stderr: everything is still written to our
    /// stderr, and the last 4 KiB are kept for [`Child::stderr_tail`].
    pub fn capture_stderr(mut self, yes: bool) -> Spawn {
        self.capture_stderr = yes;
        self
    }

    /// Starts the child. Fails at once if the program cannot be executed
    /// (missing, not executable).
    pub async fn spawn(self) -> io::Result<Child> {
        let n = self.listen.len();
        let mut env = self.env;
        if n > 0 {
            let names: Vec<&str> = self.listen.iter().map(|(n, _)| n.as_str()).collect();
            env.push((env::LISTEN_FDS.into(), n.to_string().into()));
            env.push((env::LISTEN_FDNAMES.into(), names.join(":").into()));
        }
        let pipe = if self.capture_stderr {
            Some(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
        } else {
            None
        };
        let program = self.program;
        let args = self.args;
        let fds: Vec<OwnedFd> = self
            .listen
            .into_iter()
            .map(|(_, fd)| fd)
            .chain(self.extra)
            .collect();
        let (spawned, stderr_r) = tokio::task::spawn_blocking(move || {
            let spec = sys::SpawnSpec {
                program: &program,
                args: &args,
                env,
                fds: fds.iter().map(|fd| fd.as_fd()).collect(),
                stderr: pipe.as_ref().map(|(_, w)| w.as_fd()),
                // Always: descendants inherit it, which is how
                // `kill_tree_and_reap` recognizes them.
                listen_pid: true,
            };
            let result = sys::spawn(spec);
            // Our copies of everything the child inherited close here.
            (result, pipe.map(|(r, _)| r))
        })
        .await
        .map_err(io::Error::other)?;
        let spawned = spawned?;
        let pid = spawned.pid.as_raw_nonzero().get() as u32;
        let waiter = sys::async_pidfd(spawned.pidfd.try_clone()?)?;
        let tail = Tail::default();
        let forwarder = match stderr_r {
            Some(r) => Some(forward_stderr(r, tail.clone())?),
            None => None,
        };
        Ok(Child {
            pid,
            spawned,
            waiter,
            tail,
            forwarder: Mutex::new(forwarder),
            status: Mutex::new(None),
        })
    }
}

/// Sends `signal` to the process behind `pidfd` (a child or not).
pub(crate) fn signal_pidfd(pidfd: std::os::fd::BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    let sig = rustix::process::Signal::from_named_raw(signal)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown signal"))?;
    Ok(rustix::process::pidfd_send_signal(pidfd, sig)?)
}

/// A started child. Dropping it does not kill it.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    spawned: sys::Spawned,
    waiter: AsyncFd<OwnedFd>,
    tail: Tail,
    forwarder: Mutex<Option<tokio::task::JoinHandle<()>>>,
    status: Mutex<Option<ExitStatus>>,
}

impl Child {
    /// Its pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Reaps it if it has exited.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        let mut status = lock(&self.status);
        if status.is_none() {
            *status = sys::try_reap(self.spawned.pidfd.as_fd())?.map(ExitStatus::from);
        }
        Ok(*status)
    }

    /// Waits until it exits, and reaps it.
    pub async fn wait(&self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            let mut guard = self.waiter.readable().await?;
            guard.clear_ready();
        }
    }

    /// Waits until it has exited, without reaping it (its pid stays
    /// reserved until [`wait`](Self::wait) or [`try_wait`](Self::try_wait)).
    pub async fn exited(&self) {
        while !self.has_exited() {
            match self.waiter.readable().await {
                Ok(mut guard) => guard.clear_ready(),
                Err(_) => return,
            }
        }
    }

    /// Whether it has exited (reaped or not).
    pub fn has_exited(&self) -> bool {
        let reaped = lock(&self.status).is_some();
        reaped || sys::has_exited(self.spawned.pidfd.as_fd())
    }

    /// Sends `signal` to the child (not its group).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        signal_pidfd(self.spawned.pidfd.as_fd(), signal)
    }

    /// SIGKILLs its whole process group (and the child itself).
    pub fn kill(&self) {
        sys::kill_group(self.spawned.pid, self.spawned.pidfd.as_fd());
    }

    /// Kills it and waits (bounded by 5 s) for it to be reaped.
    pub async fn kill_and_reap(&self) -> Option<ExitStatus> {
        self.kill();
        tokio::time::timeout(Duration::from_secs(5), self.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Kills everything it started and reaps what is ours to reap: SIGKILL
    /// to its process group and to itself, then to every process found in
    /// `/proc` that is one of its descendants (by parent links), in its
    /// process group or session, or carries its `LISTEN_PID` in its
    /// environment (the mark every process it started inherits, also one
    /// that called `setsid` and was reparented away). Scans again until a
    /// scan finds nothing new alive, then waits until each of them has
    /// exited, reaping those that are our children (a process is reparented
    /// to us when we are a child subreaper, see [`Subreaper`]), and reaps
    /// the child itself. Returns its exit status. Bounded by 5 s in all.
    ///
    /// A descendant that left the session and the process group, removed
    /// `LISTEN_PID` from its environment and lost its parent is not found.
    /// Call it before the child is reaped ([`wait`](Self::wait),
    /// [`try_wait`](Self::try_wait); [`exited`](Self::exited) does not
    /// reap): once it is, its pid may belong to another process, so only its
    /// status is returned and nothing is scanned.
    pub async fn kill_tree_and_reap(&self) -> Option<ExitStatus> {
        let reaped = *lock(&self.status);
        if reaped.is_some() {
            return reaped;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let me = std::process::id();
        let mut killed: BTreeSet<u32> = BTreeSet::new();
        self.kill();
        loop {
            let family = family_of(self.pid, me);
            let mut fresh = false;
            for (&pid, info) in &family {
                if info.state != 'Z' && killed.insert(pid) {
                    fresh = true;
                }
                if info.state != 'Z' {
                    sys::kill_pid(pid);
                }
            }
            // Reap the ones reparented to us; the child itself is reaped
            // through its pidfd below.
            let mut pending = false;
            for &pid in &killed {
                if pid == self.pid {
                    continue;
                }
                match proc_info(pid) {
                    None => {}
                    Some(info) if info.ppid == me && info.state == 'Z' => {
                        sys::reap_pid(pid);
                    }
                    Some(info) if info.state == 'Z' => {} // someone else reaps it
                    Some(_) => pending = true,
                }
            }
            pending |= !self.has_exited();
            if !fresh && !pending {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    pid = self.pid,
                    "processes started by the child still alive after SIGKILL"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if killed.len() > 1 {
            tracing::info!(
                pid = self.pid,
                killed = killed.len() - 1,
                "killed processes the child started"
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left.max(Duration::from_millis(100)), self.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// The last 4 KiB it wrote to stderr (when captured). Once it has
    /// exited, waits briefly for the last bytes to arrive, and then closes
    /// the capture pipe (a process that inherited its write end and
    /// outlived it does not keep our end open).
    pub async fn stderr_tail(&self) -> String {
        let forwarder = lock(&self.forwarder).take();
        if let Some(mut f) = forwarder {
            if matches!(self.try_wait(), Ok(Some(_))) {
                if tokio::time::timeout(Duration::from_millis(500), &mut f)
                    .await
                    .is_err()
                {
                    f.abort();
                }
            } else {
                *lock(&self.forwarder) = Some(f);
            }
        }
        self.tail.text()
    }
}

/// Makes this process a child subreaper while it is held (nested holds
/// count; the setting it had before the first one is restored when the last
/// one drops). Orphaned descendants are then reparented to this process
/// instead of to init, so [`Child::kill_tree_and_reap`] can reap what it
/// kills; whatever is reparented while it is held and not killed stays our
/// child until it exits or we do.
#[derive(Debug)]
pub struct Subreaper(());

/// (holders, whether this process was a subreaper before the first one).
static SUBREAPER: Mutex<(usize, bool)> = Mutex::new((0, false));

impl Subreaper {
    /// Becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`) until dropped.
    pub fn acquire() -> io::Result<Subreaper> {
        let mut held = lock(&SUBREAPER);
        if held.0 == 0 {
            let was = sys::is_child_subreaper()?;
            if !was {
                sys::set_child_subreaper(true)?;
            }
            held.1 = was;
        }
        held.0 += 1;
        Ok(Subreaper(()))
    }
}

impl Drop for Subreaper {
    fn drop(&mut self) {
        let mut held = lock(&SUBREAPER);
        held.0 = held.0.saturating_sub(1);
        if held.0 == 0 && !held.1 {
            if let Err(e) = sys::set_child_subreaper(false) {
                tracing::warn!(error = %e, "could not stop being a child subreaper");
            }
        }
    }
}

/// What `/proc/PID/stat` says about a process.
#[derive(Debug, Clone, Copy)]
struct ProcInfo {
    state: char,
    ppid: u32,
    pgrp: u32,
    session: u32,
}

fn proc_info(pid: u32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain anything; the fields follow its last ')'.
    let mut f = stat.rsplit_once(')')?.1.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    let session = f.next()?.parse().ok()?;
    Some(ProcInfo {
        state,
        ppid,
        pgrp,
        session,
    })
}

/// Whether `/proc/PID/environ` holds exactly `entry` (`NAME=value`).
fn environ_has(pid: u32, entry: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|&b| b == 0).any(|e| e == entry))
        .unwrap_or(false)
}

/// Every process that `root` started, as far as `/proc` tells: `root`
/// itself, members of its process group or session, processes whose
/// environment has `LISTEN_PID=root`, and all their descendants. Never `me`.
fn family_of(root: u32, me: u32) -> std::collections::BTreeMap<u32, ProcInfo> {
    let mut all = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some(info) = proc_info(pid) {
                    all.push((pid, info));
                }
            }
        }
    }
    let mark = format!("{}={root}", env::LISTEN_PID).into_bytes();
    let mut found = std::collections::BTreeMap::new();
    for &(pid, info) in &all {
        if pid == me || pid == 1 {
            continue;
        }
        if pid == root
            || info.pgrp == root
            || info.session == root
            || (info.state != 'Z' && environ_has(pid, &mark))
        {
            found.insert(pid, info);
        }
    }
    // Descendants of what was found, to any depth.
    loop {
        let before = found.len();
        for &(pid, info) in &all {
            if pid != me && pid != 1 && found.contains_key(&info.ppid) {
                found.entry(pid).or_insert(info);
            }
        }
        if found.len() == before {
            break;
        }
    }
    found
}

/// Keeps the last bytes written to a child's stderr.
const TAIL_BYTES: usize = 4096;

#[derive(Debug, Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<u8>>>);

impl Tail {
    fn push(&self, bytes: &[u8]) {
        let mut t = lock(&self.0);
        t.extend(bytes);
        let excess = t.len().saturating_sub(TAIL_BYTES);
        t.drain(..excess);
    }

    fn text(&self) -> String {
        let t = lock(&self.0);
        let (a, b) = t.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

/// Copies the child's stderr to ours, keeping a tail.
fn forward_stderr(r: OwnedFd, tail: Tail) -> io::Result<tokio::task::JoinHandle<()>> {
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(r)?;
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    tail.push(&buf[..n]);
                    let _ = io::stderr().write_all(&buf[..n]);
                }
            }
        }
    }))
}
