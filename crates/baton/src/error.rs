//! Error types.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// A boxed error from application code (a reload handler, say).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors from setting up or running a [`Baton`](crate::Baton).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener could not be adopted or bound.
    #[error("listener {name:?} at {address}: {source}")]
    Listener {
        /// The listener's name.
        name: String,
        /// The address asked for.
        address: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A listener name was used twice or is reserved.
    #[error("listener name {name:?}: {reason}")]
    ListenerName {
        /// The name.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The environment describes inherited fds that cannot be used.
    #[error("inherited environment: {0}")]
    Environment(String),
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}")]
    Control {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The pid file could not be written.
    #[error("pid file {path}: {source}")]
    PidFile {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Talking to the previous generation failed.
    #[error("handshake with the previous generation: {0}")]
    Handshake(#[source] io::Error),
    /// The previous generation gave up on this one (it timed out or was told
    /// to stop); this process should exit.
    #[error("the previous generation rolled this upgrade back")]
    RolledBack,
    /// The generation this one takes over from gave up on it (it missed the
    /// upgrade timeout, or that generation is stopping); this process
    /// should exit.
    #[error("the running generation gave up on this take-over: {0}")]
    Refused(String),
    /// A take-over ([`Builder::takeover`](crate::Builder::takeover)) could
    /// not be done: something answers on the control socket but did not hand
    /// its sockets over. Nothing was bound; this process should exit.
    #[error("take-over over {path}: {reason}")]
    Takeover {
        /// The control socket.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// `ready` was called twice.
    #[error("already ready")]
    AlreadyReady,
}

/// Why a line from a peer (handshake, control socket) was not read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LineError {
    /// The peer sent more than `limit` bytes without a newline.
    #[error("line longer than {limit} bytes")]
    TooLong {
        /// The limit.
        limit: usize,
    },
    /// No complete line arrived in time.
    #[error("no complete line within {0:?}")]
    Timeout(Duration),
    /// Reading failed.
    #[error("{0}")]
    Io(#[source] io::Error),
}

impl From<LineError> for io::Error {
    fn from(e: LineError) -> io::Error {
        match e {
            LineError::Io(e) => e,
            LineError::TooLong { .. } => io::Error::new(io::ErrorKind::InvalidData, e),
            LineError::Timeout(_) => io::Error::new(io::ErrorKind::TimedOut, e),
        }
    }
}

/// Why an upgrade did not happen. The running generation keeps serving in
/// every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// Another upgrade is in flight.
    #[error("an upgrade is already in progress")]
    InProgress,
    /// This generation is not the active one (starting or draining).
    #[error("this generation is {0}, only the active generation can upgrade")]
    NotActive(&'static str),
    /// The new binary could not be started at all.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why (for example "No such file or directory").
        #[source]
        source: io::Error,
    },
    /// The new generation exited before it was ready.
    #[error("new generation (pid {pid}) {status} before it was ready{}", tail_suffix(.stderr_tail))]
    Exited {
        /// Its pid.
        pid: u32,
        /// How it ended ("exited with status 1", "killed by signal ...").
        status: String,
        /// The last lines it wrote to stderr.
        stderr_tail: String,
    },
    /// The new generation reported an error instead of readiness.
    #[error("new generation (pid {pid}) failed: {message}{}", tail_suffix(.stderr_tail))]
    Reported {
        /// Its pid.
        pid: u32,
        /// The error it sent.
        message: String,
        /// The last lines it wrote to stderr.
        stderr_tail: String,
    },
    /// The new generation was not ready within the upgrade timeout.
    #[error("new generation (pid {pid}) was not ready within {timeout:?}; killed it{}", tail_suffix(.stderr_tail))]
    Timeout {
        /// Its pid.
        pid: u32,
        /// The upgrade timeout.
        timeout: Duration,
        /// The last lines it wrote to stderr.
        stderr_tail: String,
    },
    /// The new generation broke the handshake protocol (a line too long, not
    /// UTF-8, not a handshake message, or one out of turn); it was killed.
    #[error("new generation (pid {pid}) sent a bad handshake message: {reason}{}", tail_suffix(.stderr_tail))]
    Handshake {
        /// Its pid.
        pid: u32,
        /// What was wrong.
        reason: String,
        /// The last lines it wrote to stderr.
        stderr_tail: String,
    },
    /// The new generation took over (the old one is draining) but did not
    /// confirm that it became active: check it.
    #[error("new generation (pid {pid}) took over but did not confirm it is active: {reason}")]
    Unconfirmed {
        /// Its pid.
        pid: u32,
        /// What happened.
        reason: String,
    },
    /// A stop (SIGTERM, SIGQUIT, SIGINT, control `stop`) arrived before the
    /// new generation was ready: it was killed and reaped, and this
    /// generation stops instead.
    #[error("aborted: stop requested; the new generation (pid {pid}) was killed")]
    Aborted {
        /// Its pid.
        pid: u32,
    },
    /// Setting up the hand-off failed (fds, pipes).
    #[error("preparing the hand-off: {0}")]
    Io(#[source] io::Error),
}

fn tail_suffix(tail: &str) -> String {
    let t = tail.trim_end();
    if t.is_empty() {
        String::new()
    } else {
        format!("; stderr tail:\n{t}")
    }
}

impl UpgradeError {
    /// The tail of the new generation's stderr, when there was one.
    pub fn stderr_tail(&self) -> Option<&str> {
        match self {
            UpgradeError::Exited { stderr_tail, .. }
            | UpgradeError::Reported { stderr_tail, .. }
            | UpgradeError::Timeout { stderr_tail, .. }
            | UpgradeError::Handshake { stderr_tail, .. } => Some(stderr_tail),
            _ => None,
        }
    }
}

/// Why a reload failed. The previous configuration stays in place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// No reload handler was registered.
    #[error("reload is not supported by this program")]
    Unsupported,
    /// This generation is draining; reload the active one.
    #[error("this generation is {0}, only the active generation can reload")]
    NotActive(&'static str),
    /// The handler refused the new configuration.
    #[error("{0}")]
    Rejected(#[source] BoxError),
}
