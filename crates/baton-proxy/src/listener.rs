//! One running listener: its accept loop, its own drain, its counters.
//!
//! Each listener has a drain of its own ([`baton::Drain`]) so that a reload
//! can remove one listener (stop accepting, wind its connections down) while
//! the process keeps serving on the others. The listener's task holds a
//! handle of the process drain ([`baton::Baton::shutdown`]) until its own
//! drain has finished, so the process does not exit under its connections;
//! it starts its own drain when the process drains or when a reload removes
//! it, and closes what is left when either drain expires.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{ListenerConfig, Protocol};
use crate::forward::{HttpContext, CONNECT_TIMEOUT};
use crate::upstream::Pool;

/// Counters of one listener, shown in `status`.
#[derive(Debug)]
pub struct ListenerStats {
    /// Its name.
    pub name: String,
    /// What it speaks.
    pub protocol: Protocol,
    /// The address it is bound to.
    pub bound: SocketAddr,
    connections: AtomicUsize,
    upgraded: AtomicUsize,
    accepted: AtomicU64,
    requests: AtomicU64,
    draining: AtomicBool,
}

/// Counts an open connection until dropped.
#[derive(Debug)]
pub struct ConnGuard(Arc<ListenerStats>, bool);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.1 {
            self.0.upgraded.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.0.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl ListenerStats {
    fn new(name: &str, protocol: Protocol, bound: SocketAddr) -> Self {
        ListenerStats {
            name: name.to_owned(),
            protocol,
            bound,
            connections: AtomicUsize::new(0),
            upgraded: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        }
    }

    fn connection(self: &Arc<Self>) -> ConnGuard {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnGuard(self.clone(), false)
    }

    /// Counts an upgraded (WebSocket) connection until the guard drops.
    pub fn upgraded(self: &Arc<Self>) -> ConnGuard {
        self.upgraded.fetch_add(1, Ordering::Relaxed);
        ConnGuard(self.clone(), true)
    }

    /// Counts a request.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Open connections (including upgraded ones).
    pub fn open(&self) -> usize {
        self.connections.load(Ordering::Relaxed) + self.upgraded.load(Ordering::Relaxed)
    }

    /// Whether this listener is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The listener in the `status` answer.
    pub fn status(&self) -> Value {
        json!({
            "name": self.name,
            "protocol": self.protocol.as_str(),
            "address": self.bound.to_string(),
            "draining": self.is_draining(),
            "connections": self.connections.load(Ordering::Relaxed),
            "upgraded": self.upgraded.load(Ordering::Relaxed),
            "accepted": self.accepted.load(Ordering::Relaxed),
            "requests": self.requests.load(Ordering::Relaxed),
        })
    }
}

/// Where a listener's connections go; a reload swaps the inside.
#[derive(Debug, Clone)]
pub enum Dispatch {
    /// HTTP routing.
    Http(Arc<HttpContext>),
    /// Every connection to this pool.
    Tcp(Arc<ArcSwap<Pool>>),
}

/// A listener that is serving.
#[derive(Debug)]
pub struct Running {
    /// As configured.
    pub config: ListenerConfig,
    /// Counters.
    pub stats: Arc<ListenerStats>,
    /// Where connections go.
    pub dispatch: Dispatch,
    remove: CancellationToken,
    closed: CancellationToken,
}

impl Running {
    /// Stops accepting and drains this listener's connections (for a
    /// listener a reload removed).
    pub fn remove(&self) {
        self.remove.cancel();
    }

    /// Fires once the listening socket is closed (the accept loop ended).
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }
}

/// Drain settings of every listener.
#[derive(Debug, Clone, Copy)]
pub struct DrainSettings {
    /// Idle keep-alive connections stay this long once draining.
    pub idle_grace: Duration,
    /// Then what is left is closed.
    pub drain_timeout: Duration,
}

/// Starts serving `listener`.
pub fn spawn(
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
        stats.draining.store(true, Ordering::Relaxed);
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

/// Counters for a listener bound at `bound`.
pub fn stats(config: &ListenerConfig, bound: SocketAddr) -> Arc<ListenerStats> {
    Arc::new(ListenerStats::new(&config.name, config.protocol, bound))
}

async fn accept(
    listener: &TcpListener,
    shutdown: &baton::Shutdown,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.draining() => return None,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((s, peer)) => {
                let _ = s.set_nodelay(true);
                return Some((s, peer));
            }
            Err(e) => {
                // Out of fds or memory: back off rather than spin; new
                // connections wait in the kernel's queue meanwhile.
                tracing::warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn accept_http(listener: TcpListener, ctx: Arc<HttpContext>, shutdown: baton::Shutdown) {
    while let Some((io, peer)) = accept(&listener, &shutdown).await {
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
    while let Some((client, peer)) = accept(&listener, &shutdown).await {
        let guard = stats.connection();
        let pool = pool.load_full();
        let handle = shutdown.clone();
        let name = stats.name.clone();
        shutdown.spawn(async move {
            let _guard = guard;
            tcp_connection(client, peer, &pool, &handle, &name).await;
        });
    }
    drop(listener);
    tracing::debug!(listener = %stats.name, "stopped accepting");
}

/// Connects to a server of `pool` (trying the next one if connecting
/// fails) and splices bytes both ways until both sides are done or the
/// drain expires.
async fn tcp_connection(
    mut client: TcpStream,
    peer: SocketAddr,
    pool: &Pool,
    shutdown: &baton::Shutdown,
    listener: &str,
) {
    let mut tried = Vec::new();
    let (server, mut upstream) = loop {
        let Some(server) = pool.pick(&tried) else {
            tracing::warn!(listener, client = %peer, upstream = %pool.name, "no upstream server reachable; closing");
            return;
        };
        tried.push(server.addr);
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server.addr));
        let result = tokio::select! {
            r = connect => r,
            _ = shutdown.expired() => return,
        };
        match result {
            Ok(Ok(s)) => break (server, s),
            Ok(Err(e)) if crate::conn::is_local_error(&e) => {
                // Out of fds or ports here: not the server's fault.
                tracing::warn!(listener, client = %peer, server = %server.addr, error = %e, "connect failed for lack of a local resource; closing");
                return;
            }
            Ok(Err(e)) => server.mark_failed(pool.fail_timeout, &format!("connect: {e}")),
            Err(_) => server.mark_failed(pool.fail_timeout, "connect timed out"),
        }
    };
    let _ = upstream.set_nodelay(true);
    let _in_flight = server.begin();
    tracing::debug!(listener, client = %peer, server = %server.addr, "tcp connection");
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Ok((up, down)) = r {
                tracing::info!(target: "baton_proxy::access", listener, client = %peer.ip(), upstream = %server.addr, bytes_up = up, bytes_down = down, "tcp connection closed");
            }
        }
        _ = shutdown.expired() => {
            tracing::debug!(listener, client = %peer, "tcp connection closed at the drain timeout");
        }
    }
}
