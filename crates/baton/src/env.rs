//! Every environment variable Baton reads or sets, in one place.
//!
//! See `docs/HANDOFF.md` for the protocol these take part in.

/// systemd convention: number of inherited listening fds, starting at fd 3.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// systemd convention: the pid the fds are meant for; checked against our own.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// systemd convention: colon-separated names of the inherited fds.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// systemd notification socket (`sd_notify`).
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// systemd (254 and later) sets it to `FileDescriptorStoreMax=` when the
/// service has a file descriptor store; Baton then keeps its listeners
/// there.
pub const FDSTORE: &str = "FDSTORE";

/// Generation number of this process: 1 at first start, +1 per upgrade.
pub const BATON_GENERATION: &str = "BATON_GENERATION";
/// fd number of the private handshake socket shared with the previous
/// generation (present only in a generation started by an upgrade).
pub const BATON_HANDSHAKE_FD: &str = "BATON_HANDSHAKE_FD";
/// fd number of a copy of the previous generation's real stderr. Until it is
/// ready, a new generation's fd 2 is a pipe read by the previous generation
/// (so a failed start can be reported with the tail of its stderr); once
/// ready it moves this fd onto fd 2.
pub const BATON_STDERR_FD: &str = "BATON_STDERR_FD";
/// Pid of the generation that started this one.
pub const BATON_PARENT_PID: &str = "BATON_PARENT_PID";

/// The `LISTEN_FDNAMES` name under which the control socket is handed over.
/// Application listener names may not use it.
pub const CONTROL_FD_NAME: &str = "baton-control";

/// Why a name cannot name a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadListenerName {
    /// Empty, longer than 255 bytes, or containing `:` (the separator of
    /// `LISTEN_FDNAMES`).
    Form,
    /// [`CONTROL_FD_NAME`].
    Reserved,
}

impl BadListenerName {
    /// What is wrong, as a phrase.
    pub fn reason(self) -> &'static str {
        match self {
            BadListenerName::Form => "names must be 1 to 255 characters without ':'",
            BadListenerName::Reserved => "reserved for the control socket",
        }
    }
}

/// The listener-name rule, the one home of it: listener names travel in
/// `LISTEN_FDNAMES`, colon-separated, beside the control socket's.
pub fn check_listener_name(name: &str) -> Result<(), BadListenerName> {
    if name.is_empty() || name.contains(':') || name.len() > 255 {
        return Err(BadListenerName::Form);
    }
    if name == CONTROL_FD_NAME {
        return Err(BadListenerName::Reserved);
    }
    Ok(())
}

/// Names of the variables a generation must not pass on unchanged: they are
/// recomputed for every child.
pub(crate) const RECOMPUTED: &[&str] = &[
    LISTEN_FDS,
    LISTEN_PID,
    LISTEN_FDNAMES,
    BATON_GENERATION,
    BATON_HANDSHAKE_FD,
    BATON_STDERR_FD,
    BATON_PARENT_PID,
];

pub(crate) fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}
