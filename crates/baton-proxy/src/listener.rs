//! One running listener: its accept loop and its own drain (its counters
//! are [`crate::stats`]).
//!
//! Each listener has a drain of its own ([`baton::Drain`]) so that a reload
//! can remove one listener (stop accepting, wind its connections down) while
//! the process keeps serving on the others. The listener's task holds a
//! handle of the process drain ([`baton::Baton::shutdown`]) until its own
//! drain has finished, so the process does not exit under its connections;
//! it starts its own drain when the process drains or when a reload removes
//! it, and closes what is left when either drain expires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::ListenerConfig;
use crate::forward::HttpContext;
use crate::stats::ListenerStats;
use crate::upstream::Pool;

/// Where a listener's connections go; a reload swaps the inside.
#[derive(Debug, Clone)]
pub(crate) enum Dispatch {
    /// HTTP routing.
    Http(Arc<HttpContext>),
    /// Every connection to this pool.
    Tcp(Arc<ArcSwap<Pool>>),
}

/// A listener that is serving.
#[derive(Debug)]
pub(crate) struct Running {
    /// As configured.
    pub(crate) config: ListenerConfig,
    /// Counters.
    pub(crate) stats: Arc<ListenerStats>,
    /// Where connections go.
    pub(crate) dispatch: Dispatch,
    remove: CancellationToken,
    closed: CancellationToken,
}

impl Running {
    /// Stops accepting and drains this listener's connections (for a
    /// listener a reload removed).
    pub(crate) fn remove(&self) {
        self.remove.cancel();
    }

    /// Fires once the listening socket is closed (the accept loop ended).
    pub(crate) fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }
}

/// Drain settings of every listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DrainSettings {
    /// Idle keep-alive connections stay this long once draining.
    pub(crate) idle_grace: Duration,
    /// Then what is left is closed.
    pub(crate) drain_timeout: Duration,
}

/// Starts serving `listener`.
pub(crate) fn spawn(
    process: baton::Shutdown,
    listener: TcpListener,
    config: ListenerConfig,
    stats: Arc<ListenerStats>,
    dispatch: Dispatch,
    settings: DrainSettings,
) -> Running {
    let remove = CancellationToken::new();
    let closed = CancellationToken::new();
    let running = Running {
        config,
        stats: stats.clone(),
        dispatch: dispatch.clone(),
        remove: remove.clone(),
        closed: closed.clone(),
    };
    tokio::spawn(async move {
        let drain = baton::Drain::new(settings.idle_grace);
        let handle = drain.handle();
        let name = stats.name.clone();
        match dispatch {
            Dispatch::Http(ctx) => {
                tokio::spawn(async move {
                    let _closed = closed.drop_guard();
                    accept_http(listener, ctx, handle).await
                });
            }
            Dispatch::Tcp(pool) => {
                let stats = stats.clone();
                tokio::spawn(async move {
                    let _closed = closed.drop_guard();
                    accept_tcp(listener, pool, stats, handle).await
                });
            }
        }
        tokio::select! {
            _ = process.draining() => {}
            _ = remove.cancelled() => {
                tracing::info!(listener = %name, "listener removed by reload; draining it");
            }
        }
        stats.set_draining();
        let outcome = tokio::select! {
            o = drain.drain(settings.drain_timeout) => o,
            _ = process.expired() => {
                drain.expire();
                drain.drain(Duration::ZERO).await
            }
        };
        match outcome {
            baton::DrainOutcome::Complete => tracing::info!(listener = %name, "listener drained"),
            baton::DrainOutcome::TimedOut { remaining } => tracing::warn!(
                listener = %name,
                remaining,
                "listener drain timeout reached; remaining connections closed"
            ),
        }
        // Only now may the process exit (as far as this listener goes).
        drop(process);
    });
    running
}

/// The next connection (its accept errors handled by
/// [`baton::accept::accepted`]), or `None` once `shutdown` drains.
async fn accept(
    listener: &TcpListener,
    name: &str,
    shutdown: &baton::Shutdown,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.draining() => return None,
            a = listener.accept() => a,
        };
        if let Some((s, peer)) = baton::accept::accepted(accepted, name).await {
            let _ = s.set_nodelay(true);
            return Some((s, peer));
        }
    }
}

async fn accept_http(listener: TcpListener, ctx: Arc<HttpContext>, shutdown: baton::Shutdown) {
    while let Some((io, peer)) = accept(&listener, &ctx.listener, &shutdown).await {
        let guard = ctx.stats.connection();
        let ctx = ctx.clone();
        let handle = shutdown.clone();
        shutdown.spawn(crate::forward::serve(io, peer, ctx, handle, guard));
    }
    // The listening socket closes here.
    drop(listener);
    tracing::debug!(listener = %ctx.listener, "stopped accepting");
}

async fn accept_tcp(
    listener: TcpListener,
    pool: Arc<ArcSwap<Pool>>,
    stats: Arc<ListenerStats>,
    shutdown: baton::Shutdown,
) {
    while let Some((client, peer)) = accept(&listener, &stats.name, &shutdown).await {
        let guard = stats.connection();
        let pool = pool.load_full();
        let handle = shutdown.clone();
        let name = stats.name.clone();
        shutdown.spawn(async move {
            let _guard = guard;
            crate::tcp::serve(client, peer, &pool, &handle, &name).await;
        });
    }
    drop(listener);
    tracing::debug!(listener = %stats.name, "stopped accepting");
}
