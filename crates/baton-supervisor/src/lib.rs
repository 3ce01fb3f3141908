//! `baton run`: zero-downtime restarts for a program in any language.
//!
//! The supervisor binds the listening sockets once and runs the program as
//! a child that inherits them the systemd way (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID` = the child's own pid), using the same
//! spawning code as a Baton server's upgrade ([`baton::process`]). A reload
//! starts a new child on the same sockets, waits until it is ready, and only
//! then asks the old one to stop; a child that fails to start or to become
//! ready is killed and the old one keeps serving. Because the supervisor
//! never closes the sockets, connections that arrive while no child accepts
//! (a crash, a slow start) wait in the kernel's queue instead of being
//! refused.
//!
//! For programs that can only bind their own port, `--port-env` gives each
//! child a fresh loopback port and the supervisor forwards connections to
//! the current child: new connections go to the new child once it is ready,
//! existing ones finish on the old one, which is asked to stop only when its
//! last forwarded connection has closed (or at the drain timeout).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::exit)
)]

mod config;
mod holders;
mod probe;
mod supervisor;

pub use config::{parse_duration, parse_signal, Config, Listener, Options, ReadyMode};
pub use supervisor::Supervisor;

/// Errors that stop the supervisor from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Invalid options.
    #[error("{0}")]
    Config(String),
    /// A socket, the control socket or the pid file could not be set up.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A `--listen` address is in use: by whom, and what to do.
    #[error("{what}: address already in use; {holders}")]
    InUse {
        /// The `--listen` option.
        what: String,
        /// Who holds it (pids, commands) and, for the orphaned child of an
        /// earlier `baton run`, what to do.
        holders: String,
    },
    /// The first child did not start or did not become ready.
    #[error("the first child failed: {0}")]
    FirstChild(String),
    /// The sockets a service manager passed (`LISTEN_FDS`) cannot be used.
    #[error("inherited sockets: {0}")]
    Inherited(#[source] baton::Error),
    /// `--takeover`: a supervisor answers on the control socket but did not
    /// hand its sockets over, or gave up on this one. Nothing was bound.
    #[error("{0}")]
    Takeover(#[source] baton::Error),
}
