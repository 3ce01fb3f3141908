//! Zero-downtime restarts, binary upgrades and config reloads for tokio
//! network services.
//!
//! # Guarantees
//!
//! - **The listening socket never closes.** Each named listener is bound once;
//!   every later generation inherits the very same kernel socket at `exec`
//!   (systemd's `LISTEN_FDS` convention), so connections that arrive during a
//!   restart wait in the kernel's queue instead of being refused.
//! - **Readiness with rollback.** The old generation keeps accepting until the
//!   new one reports ready. If the new one exits, reports an error or misses
//!   the upgrade timeout, it is killed with everything it started and reaped, and
//!   the old one carries on; the caller is told why (exit status or signal,
//!   the error it sent, the tail of its stderr).
//! - **Drain without a race.** Once the new generation is ready, the old one
//!   stops accepting, lets in-flight requests finish, answers the next
//!   request on each keep-alive connection with `Connection: close`, closes
//!   connections only after they have been silent for the idle grace, and
//!   closes whatever remains at the drain timeout. Then exit hooks run and
//!   the process exits.
//! - **Settle period.** For [`Builder::settle`] (default 2 s) after the new
//!   generation became active, the old one keeps its listening sockets (not
//!   accepting) and watches it; if the new one dies within it, the old one
//!   takes the service back and accepts again (accept loops wait in
//!   [`Shutdown::resumed`]). Afterwards it holds no listening fd. A new
//!   generation whose old one dies before handing over takes over alone.
//!
//! # Lifecycle
//!
//! [`State::Starting`] → [`ready`](Baton::ready) → [`State::Active`] →
//! (upgrade succeeded, or stop requested) → [`State::Draining`] →
//! [`wait`](Baton::wait) drains and runs exit hooks → [`State::Stopped`].
//!
//! # Example
//!
//! ```no_run
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let baton = baton::Baton::builder()
//!         .control_socket("/tmp/app.sock")
//!         .pid_file("/tmp/app.pid")
//!         .from_env()?;                                  // inherited sockets, if any
//!     baton::signals::handle(baton.clone())?;            // USR2 upgrade, HUP reload, TERM stop
//!     let http = baton.tcp("http", "127.0.0.1:8080").await?; // inherited or bound
//!     baton.on_exit(|| async { /* flush metrics */ });
//!     baton.ready().await?;                              // the old generation stops accepting
//!     let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
//!     tokio::spawn(baton::http::serve(http, app, baton.shutdown()));
//!     baton.wait().await;                                // drained, hooks run
//!     Ok(())
//! }
//! ```
//!
//! The hand-off protocol, the environment variables and the control
//! protocol are described in the repository's `docs/`.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::exit)
)]

pub mod accept;
pub mod admin;
mod baton;
pub mod control;
mod drain;
pub mod env;
mod error;
mod fdpass;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod handoff;
pub mod http;
mod line;
mod listeners;
mod metrics;
pub mod migrate;
mod notify;
pub mod pidfile;
pub mod process;
mod reload;
pub mod signals;
pub mod sync;
mod sys;
pub mod takeover;
#[cfg(feature = "tls")]
pub mod tls;

pub use crate::baton::{listen_fds, Baton, Builder, State, StopReason};
pub use crate::drain::{Drain, DrainOutcome, Shutdown};
pub use crate::error::{BoxError, Error, ReloadError, UpgradeError};
pub use crate::handoff::Upgraded;
pub use crate::listeners::{ListenAddr, ListenSpec, ListenerInfo, ListenerKind};
pub use crate::metrics::{ConnectionGuard, RequestMetrics};
pub use crate::notify::{
    fd_store_enabled as sd_fd_store_enabled, notify as sd_notify, store_fds as sd_store_fds,
};
pub use crate::reload::Reloadable;
