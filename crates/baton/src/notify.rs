//! `sd_notify`: tell a service manager (systemd) what is going on.
//!
//! A few lines over a datagram socket; only active when `NOTIFY_SOCKET` is set.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};

use crate::env;
use crate::fdpass;

/// Sends `state` (newline-separated `KEY=VALUE` assignments, e.g.
/// `"READY=1"`) to the service manager's socket in `NOTIFY_SOCKET`, if set.
/// Returns `Ok(false)` when there is none. Baton sends its own notifications;
/// this is for programs that manage other processes (`baton run`).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(sock) = socket()? else {
        return Ok(false);
    };
    sock.send(state.as_bytes())?;
    Ok(true)
}

/// A datagram socket connected to `NOTIFY_SOCKET`, if it is set.
fn socket() -> io::Result<Option<UnixDatagram>> {
    let Some(path) = env::var(env::NOTIFY_SOCKET) else {
        return Ok(None);
    };
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else {
        SocketAddr::from_pathname(&path)?
    };
    let sock = UnixDatagram::unbound()?;
    sock.connect_addr(&addr)?;
    Ok(Some(sock))
}

/// Whether the service manager keeps a file descriptor store for us:
/// `NOTIFY_SOCKET` is set and so is `FDSTORE` (systemd sets it to
/// `FileDescriptorStoreMax=` when that is not 0; with an older systemd, set
/// it in the unit's `Environment=`).
pub fn fd_store_enabled() -> bool {
    env::var(env::NOTIFY_SOCKET).is_some()
        && env::var(env::FDSTORE)
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n > 0)
}

/// Pushes each `(name, fd)` into the service manager's fd store, one
/// message per fd (`FDSTORE=1`, `FDNAME=name`), so that a restart of the
/// service gets them back in `LISTEN_FDS`. The manager drops duplicates of
/// a socket it already holds. Returns how many were pushed (0 without a
/// store).
pub fn store_fds(fds: &[(&str, BorrowedFd<'_>)]) -> io::Result<usize> {
    if !fd_store_enabled() {
        return Ok(0);
    }
    let Some(sock) = socket()? else {
        return Ok(0);
    };
    for (name, fd) in fds {
        let state = format!("FDSTORE=1\nFDNAME={name}");
        fdpass::send(sock.as_fd(), state.as_bytes(), &[*fd])?;
    }
    Ok(fds.len())
}

/// Removes the entries named `name` from the fd store (a listener this
/// generation no longer serves).
pub(crate) fn remove_stored(name: &str) {
    if fd_store_enabled() {
        notify_logged(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    }
}

/// Like [`notify`], but logs instead of failing: a service manager that went
/// away must not stop the service.
pub(crate) fn notify_logged(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}
