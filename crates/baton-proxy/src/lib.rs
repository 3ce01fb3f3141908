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
mod conn;
mod forward;
pub mod front;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod h1;
mod h2;
mod listener;
mod proxy;
mod rewrite;
mod router;
mod stats;
mod tcp;
mod timer;
pub mod tls;
mod upstream;
mod websocket;
mod workers;

/// What a reload builds, for `examples/reload_cost.rs` to time phase by
/// phase; not an interface.
#[doc(hidden)]
pub mod reload_cost {
    use std::collections::HashMap;
    use std::sync::Arc;

    use crate::router::RouteTable;
    use crate::upstream::{Pool, Registry};
    use crate::Config;

    /// The pools of a configuration.
    #[derive(Debug)]
    pub struct Pools(HashMap<String, Arc<Pool>>);

    /// The route tables of a configuration, by listener.
    #[derive(Debug)]
    pub struct Tables(HashMap<String, RouteTable>);

    /// Builds the pools of `config`, as a reload does.
    pub fn pools(config: &Config) -> Pools {
        Pools(crate::proxy::build_pools(
            config,
            &Registry::default(),
            &HashMap::new(),
        ))
    }

    /// Builds the route tables of `config` over `pools`, as a reload does.
    pub fn tables(config: &Config, pools: &Pools) -> Tables {
        Tables(RouteTable::build_all(&config.routes, &pools.0))
    }

    impl Tables {
        /// How many routes `listener` has.
        pub fn routes(&self, listener: &str) -> usize {
            self.0.get(listener).map_or(0, RouteTable::len)
        }
    }
}

pub use crate::config::{Config, ConfigError, Position, Problem};
pub use crate::proxy::{prepare_control_dir, Proxy, ProxyError};

use baton::sync::lock;
