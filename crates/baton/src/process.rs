//! Starting a child process that inherits listening sockets, the systemd
//! way: the sockets at fd 3, 4, …, `LISTEN_FDS`, `LISTEN_FDNAMES`, and
//! `LISTEN_PID` set to the child's own pid. Used for the next generation of
//! a Baton server and by `baton run` for any program.
//!
//! The child runs in its own process group (so [`Child::kill`] takes
//! everything it started with it), with every fd but 0, 1, 2 and the ones
//! given here closed at exec. Its stderr can be captured: passed through to
//! ours, with the last 4 KiB kept for error reports.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;

use crate::env;
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
                listen_pid: n > 0,
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
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Sends `signal` to the child (not its group).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let sig = rustix::process::Signal::from_named_raw(signal)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown signal"))?;
        Ok(rustix::process::pidfd_send_signal(
            self.spawned.pidfd.as_fd(),
            sig,
        )?)
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

    /// The last 4 KiB it wrote to stderr (when captured). Once it has
    /// exited, waits briefly for the last bytes to arrive.
    pub async fn stderr_tail(&self) -> String {
        let forwarder = self
            .forwarder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(f) = forwarder {
            if matches!(self.try_wait(), Ok(Some(_))) {
                let _ = tokio::time::timeout(Duration::from_millis(500), f).await;
            } else {
                *self.forwarder.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
            }
        }
        self.tail.text()
    }
}

/// Keeps the last bytes written to a child's stderr.
const TAIL_BYTES: usize = 4096;

#[derive(Debug, Clone, Default)]
struct Tail(Arc<Mutex<VecDeque<u8>>>);

impl Tail {
    fn push(&self, bytes: &[u8]) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.extend(bytes);
        let excess = t.len().saturating_sub(TAIL_BYTES);
        t.drain(..excess);
    }

    fn text(&self) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
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
