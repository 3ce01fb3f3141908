//! `sd_notify`: tell a service manager (systemd) what is going on.
//!
//! A few lines over a datagram socket; only active when `NOTIFY_SOCKET` is set.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::env;

/// Sends `state` (newline-separated `KEY=VALUE` assignments, e.g.
/// `"READY=1"`) to the service manager's socket in `NOTIFY_SOCKET`, if set.
/// Returns `Ok(false)` when there is none. Baton sends its own notifications;
/// this is for programs that manage other processes (`baton run`).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = env::var(env::NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else {
        SocketAddr::from_pathname(&path)?
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// Like [`notify`], but logs instead of failing: a service manager that went
/// away must not stop the service.
pub(crate) fn notify_logged(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}
