//! `baton proxy`: a reverse proxy whose configuration reloads in-process and
//! whose binary upgrades without losing a request, built on [`baton`].
//!
//! # Guarantees
//!
//! - **Reload in-process** ([`Proxy::reload`], wired to SIGHUP and the
//!   control socket's `reload`): read → parse → validate → swap. Routes and
//!   pools are swapped atomically per listener; a request in flight finishes
//!   on the configuration it started with. Added listeners are bound,
//!   removed ones stop accepting and drain their connections while the
//!   process keeps serving. A rejected file changes nothing, and the caller
//!   gets every problem as `FILE:LINE:COL: message`. A reload never starts a
//!   process. The file is read under limits ([`config::load`]: a regular
//!   file, [`config::MAX_CONFIG_BYTES`], [`config::READ_DEADLINE`]), so a
//!   FIFO, a device or a hung file system cannot take the reload down.
//! - **Binary upgrade** is the `baton` library's: the next generation
//!   inherits every listener by name, the old one drains (keep-alive
//!   connections wound down without a race; WebSocket and TCP connections
//!   kept until they finish or the drain timeout, WebSocket ones then closed
//!   with a 1001 close frame).
//!
//! # Lifecycle
//!
//! [`config::load`] → [`Proxy::bind`] (listeners bound or inherited, reload
//! and status handlers registered) → `baton.ready()` → [`Proxy::start`]
//! (accept loops, health checks) → `baton.wait()`.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::exit)
)]

mod body;
pub mod config;
pub mod conn;
pub mod forward;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod h1;
pub mod listener;
mod proxy;
mod rewrite;
pub mod router;
pub mod stats;
mod tcp;
mod timer;
pub mod upstream;
pub mod websocket;

pub use crate::config::{Config, ConfigError, Position, Problem};
pub use crate::proxy::{prepare_control_dir, Proxy, ProxyError};

use std::sync::{Mutex, MutexGuard};

/// Short locks over plain data: a panic elsewhere leaves it consistent, so
/// keep going rather than poison the process.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
