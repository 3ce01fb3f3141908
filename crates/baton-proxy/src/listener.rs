//! One running listener: its accept loop and its own drain (its counters
//! are [`crate::stats`]).
//!
//! Each listener has a drain of its own ([`baton::Drain`]) so that a reload
//! can remove one listener (stop accepting, wind its connections down) while
//! the process keeps serving on the others. A listener serves in periods:
//! each period has a fresh drain of the listener's, started when the
//! process drains or when a reload removes the listener. A task holds a
//! handle of the process drain ([`baton::Baton::shutdown`]) until the
//! period's drain has finished, so the process does not exit under its
//! connections, and closes what is left when either drain expires.
//!
//! When the process drains after an upgrade, the accept loop keeps the
//! listening socket and waits in [`baton::Shutdown::resumed`]: if the new
//! generation dies within the settle period, the process takes the service
//! back and the listener serves a new period (with a new drain; the
//! connections of the old period go on draining); otherwise (`None`, or the
//! listener removed) it drops the socket. A listener removed by a reload
//! never serves again.
//!
//! With `runtime = "per-worker"` this bookkeeping stays on the process's
//! runtime, which keeps the listening socket unregistered, and each period
//! every worker ([`crate::workers`]) accepts on a descriptor of its own
//! until the period ends; the period's drain starts once every worker has
//! stopped accepting, so it counts every connection they took.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ListenerConfig;
use crate::forward::HttpContext;
use crate::stats::ListenerStats;
use crate::upstream::Pool;
use crate::workers::Workers;

/// Where a listener's connections go; a reload swaps the inside.
#[derive(Debug, Clone)]
pub(crate) enum Dispatch {
    /// HTTP routing.
    Http(Arc<HttpContext>),
    /// Every connection to this pool; with the process whose upgrade moves
    /// the connections to the next generation (`None`: they drain).
    Tcp(Arc<ArcSwap<Pool>>, Option<baton::Baton>),
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

/// Connections the previous generation moves to this one (for an HTTP
/// listener of the first configuration).
pub(crate) type Incoming = tokio::sync::mpsc::Receiver<baton::migrate::Migrated>;

/// Starts serving `listener` (and the connections in `incoming`), on
/// `workers` if given.
#[allow(clippy::too_many_arguments)]
pub(crate) fn spawn(
    process: baton::Shutdown,
    listener: TcpListener,
    config: ListenerConfig,
    stats: Arc<ListenerStats>,
    dispatch: Dispatch,
    settings: DrainSettings,
    incoming: Option<Incoming>,
    workers: Option<Arc<Workers>>,
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
    let socket = match workers {
        Some(workers) => on_workers(listener, workers, &stats.name),
        None => Socket::Here(listener),
    };
    tokio::spawn(serve(
        process, socket, dispatch, stats, settings, remove, closed, incoming,
    ));
    running
}

/// A listening socket and who accepts on it.
enum Socket {
    /// The accept loop runs where [`serve`] does.
    Here(TcpListener),
    /// Each worker accepts on a descriptor of its own; this one is not
    /// registered with any reactor (it would wake this runtime at every
    /// connection).
    Workers(std::net::TcpListener, Arc<Workers>),
}

/// The socket of `listener` for `workers`: a descriptor of it that no
/// reactor watches (`listener`'s registration is dropped).
fn on_workers(listener: TcpListener, workers: Arc<Workers>, name: &str) -> Socket {
    use std::os::fd::AsFd;
    match listener.as_fd().try_clone_to_owned() {
        Ok(fd) => Socket::Workers(std::net::TcpListener::from(fd), workers),
        Err(e) => {
            tracing::warn!(listener = %name, error = %e, "cannot share the listening socket with the workers; accepting on the main runtime");
            Socket::Here(listener)
        }
    }
}

/// Serves `listener` period after period (see the module's documentation)
/// until the process stops for good or a reload removes it; then closes the
/// listening socket (`closed` fires).
#[allow(clippy::too_many_arguments)]
async fn serve(
    mut process: baton::Shutdown,
    listener: Socket,
    dispatch: Dispatch,
    stats: Arc<ListenerStats>,
    settings: DrainSettings,
    remove: CancellationToken,
    closed: CancellationToken,
    mut incoming: Option<Incoming>,
) {
    let _closed = closed.drop_guard();
    let name = stats.name.clone();
    loop {
        let drain = baton::Drain::new(settings.idle_grace);
        stats.set_draining(false);
        let stop = async {
            tokio::select! {
                _ = process.draining() => false,
                _ = remove.cancelled() => true,
            }
        };
        let handle = drain.handle();
        let removed = match &listener {
            Socket::Here(l) => {
                accept_until(l, &dispatch, &stats, &handle, stop, &mut incoming).await
            }
            Socket::Workers(l, workers) => {
                accept_on_workers(l, workers, &dispatch, &stats, &handle, stop, &mut incoming).await
            }
        };
        if removed {
            tracing::info!(listener = %name, "listener removed by reload; draining it");
        }
        stats.set_draining(true);
        drain.start();
        tokio::spawn(finish_period(
            drain,
            process.clone(),
            settings.drain_timeout,
            name.clone(),
        ));
        if removed {
            break;
        }
        // The listening socket is kept: the process may take the service
        // back (the new generation died within the settle period).
        let next = tokio::select! {
            next = process.resumed() => next,
            _ = remove.cancelled() => None,
        };
        match next {
            Some(next) => {
                tracing::info!(listener = %name, "the service was taken back; accepting again");
                process = next;
            }
            None => break,
        }
    }
    // The listening socket closes here.
    drop(listener);
    tracing::debug!(listener = %name, "stopped accepting");
}

/// Drains one serving period's connections (bounded by `drain_timeout`, or
/// at once when the process's drain expires), holding `process` until done
/// so that the process does not exit under them.
async fn finish_period(
    drain: baton::Drain,
    process: baton::Shutdown,
    drain_timeout: Duration,
    name: String,
) {
    let outcome = tokio::select! {
        o = drain.drain(drain_timeout) => o,
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
    // Only now may the process exit (as far as this period goes).
    drop(process);
}

/// [`accept_until`] on every worker, each on a descriptor of `socket` of
/// its own, until `stop` resolves; returns what it resolved to once every
/// worker has stopped accepting. The first worker also takes the
/// connections in `incoming` (handed back at the end).
async fn accept_on_workers(
    socket: &std::net::TcpListener,
    workers: &Workers,
    dispatch: &Dispatch,
    stats: &Arc<ListenerStats>,
    shutdown: &baton::Shutdown,
    stop: impl Future<Output = bool>,
    incoming: &mut Option<Incoming>,
) -> bool {
    let cancel = CancellationToken::new();
    let mut loops = Vec::with_capacity(workers.len());
    for handle in workers.handles() {
        let copy = match socket.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(listener = %stats.name, error = %e, "a worker cannot accept on this listener");
                continue;
            }
        };
        let mut mine = if loops.is_empty() {
            incoming.take()
        } else {
            None
        };
        let (dispatch, stats, shutdown) = (dispatch.clone(), stats.clone(), shutdown.clone());
        let cancel = cancel.clone();
        loops.push(handle.spawn(async move {
            // Registered with this worker's reactor.
            match copy.set_nonblocking(true).and_then(|()| TcpListener::from_std(copy)) {
                Ok(l) => {
                    let stop = async move {
                        cancel.cancelled().await;
                        false
                    };
                    accept_until(&l, &dispatch, &stats, &shutdown, stop, &mut mine).await;
                }
                Err(e) => {
                    tracing::warn!(listener = %stats.name, error = %e, "a worker cannot accept on this listener");
                }
            }
            mine
        }));
    }
    let stopped = stop.await;
    cancel.cancel();
    for accepting in loops {
        if let Ok(Some(rx)) = accepting.await {
            *incoming = Some(rx);
        }
    }
    stopped
}

/// Accepts connections (accept errors handled by
/// [`baton::accept::accepted`]), and takes those the previous generation
/// moves here, and serves each with a clone of `shutdown` until `stop`
/// resolves; returns what it resolved to.
async fn accept_until(
    listener: &TcpListener,
    dispatch: &Dispatch,
    stats: &Arc<ListenerStats>,
    shutdown: &baton::Shutdown,
    stop: impl Future<Output = bool>,
    incoming: &mut Option<Incoming>,
) -> bool {
    tokio::pin!(stop);
    // Linux copies TCP_NODELAY from the listening socket to the ones it
    // accepts, and Baton sets it on the sockets it binds: then there is no
    // system call to make per connection (a socket from a service manager
    // may not have it).
    let inherits_nodelay = rustix::net::sockopt::tcp_nodelay(listener).unwrap_or(false);
    loop {
        let moved = async {
            match incoming.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let accepted = tokio::select! {
            biased;
            stopped = &mut stop => return stopped,
            m = moved => {
                match m {
                    // The previous generation is done moving connections.
                    None => *incoming = None,
                    Some(m) => adopt(m, dispatch, stats, shutdown),
                }
                continue;
            }
            a = listener.accept() => a,
        };
        let Some((io, peer)) = baton::accept::accepted(accepted, &stats.name).await else {
            continue;
        };
        if !inherits_nodelay {
            let _ = io.set_nodelay(true);
        }
        let guard = stats.connection();
        let handle = shutdown.clone();
        // Each connection's future is boxed: a task moves its future
        // several times as it is spawned and finished, and these are
        // kilobytes (an HTTP/1 connection's is about 4.8 KiB), so only a
        // pointer moves.
        match dispatch {
            Dispatch::Http(ctx) if ctx.tls.is_some() => {
                shutdown.spawn(Box::pin(serve_tls(io, peer, ctx.clone(), handle, guard)));
                tokio::task::yield_now().await;
            }
            Dispatch::Http(ctx) => {
                shutdown.spawn(Box::pin(crate::forward::serve(
                    io,
                    peer,
                    ctx.clone(),
                    handle,
                    guard,
                )));
            }
            Dispatch::Tcp(pool, baton) => {
                let pool = pool.load_full();
                let name = stats.name.clone();
                let moving = baton.clone().map(|baton| crate::websocket::Moving {
                    baton,
                    listener: name.clone(),
                });
                shutdown.spawn(Box::pin(async move {
                    let _guard = guard;
                    crate::tcp::serve(io, peer, &pool, &handle, &name, moving).await;
                }));
            }
        }
    }
}

/// A TLS handshake must be done within this (nginx bounds it with
/// `client_header_timeout`, 60 s; a handshake takes a round trip or two).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves a connection of an `https` listener: the handshake (bounded by
/// [`HANDSHAKE_TIMEOUT`] and by the drain's expiry), then HTTP/2 if ALPN
/// chose it ([`crate::h2`]), else HTTP/1.1 and a `close_notify`.
async fn serve_tls(
    io: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    ctx: Arc<HttpContext>,
    shutdown: baton::Shutdown,
    guard: crate::stats::ConnGuard,
) {
    let Some(acceptor) = ctx.tls.clone() else {
        return;
    };
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io));
    let mut tls = tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(listener = %ctx.listener, %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(listener = %ctx.listener, %peer, "TLS handshake timed out");
                return;
            }
        },
        _ = shutdown.expired() => return,
    };
    if crate::h2::negotiated(&tls) {
        let _guard = guard;
        crate::h2::serve(tls, peer, ctx, shutdown).await;
        return;
    }
    crate::forward::serve(&mut tls, peer, ctx, shutdown, guard).await;
    // Bounded: a client that does not read cannot hold the task.
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::AsyncWriteExt::shutdown(&mut tls),
    )
    .await;
}

/// Serves a connection the previous generation moved here: an HTTP
/// client connection from the bytes of a next request it had read already,
/// or a spliced pair (WebSocket, TCP pass-through) from its frame
/// positions.
fn adopt(
    m: baton::migrate::Migrated,
    dispatch: &Dispatch,
    stats: &Arc<ListenerStats>,
    shutdown: &baton::Shutdown,
) {
    use baton::migrate::Connection;
    // Registered with this thread's reactor (a worker's, with
    // `runtime = "per-worker"`), not with the one that received it.
    let connection = match rehome(m.connection) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(listener = %stats.name, error = %e, "a moved connection could not be registered; closed");
            return;
        }
    };
    let (ctx, io) = match (dispatch, connection) {
        (Dispatch::Http(ctx), Connection::Tcp(io)) => (ctx, io),
        (dispatch, Connection::TcpPair { client, upstream }) => {
            let Ok(state) = serde_json::from_slice::<crate::websocket::PairState>(&m.state) else {
                tracing::warn!(listener = %stats.name, "a moved connection pair with a state it cannot read; closed");
                return;
            };
            let (guard, baton) = match dispatch {
                Dispatch::Http(ctx) => (stats.upgraded(), ctx.baton.clone()),
                Dispatch::Tcp(_, baton) => (stats.connection(), baton.clone()),
            };
            let moved = stats.moved_in();
            let moving = baton.map(|baton| crate::websocket::Moving {
                baton,
                listener: stats.name.clone(),
            });
            let handle = shutdown.clone();
            shutdown.spawn(async move {
                let (_guard, _moved) = (guard, moved);
                crate::websocket::splice_pair(client, upstream, state, &handle, moving).await;
            });
            return;
        }
        _ => {
            tracing::warn!(listener = %stats.name, "a moved connection this listener cannot serve; closed");
            return;
        }
    };
    let Ok(peer) = io.peer_addr() else {
        return; // the client is gone
    };
    let _ = io.set_nodelay(true);
    let guard = stats.connection();
    let moved = stats.moved_in();
    let prefix = bytes::BytesMut::from(&m.state[..]);
    let serving =
        crate::forward::serve_moved(io, peer, ctx.clone(), shutdown.clone(), guard, prefix);
    shutdown.spawn(async move {
        let _moved = moved;
        serving.await;
    });
}

/// `connection` registered with the reactor of the runtime this runs on.
fn rehome(connection: baton::migrate::Connection) -> std::io::Result<baton::migrate::Connection> {
    use baton::migrate::Connection;
    use tokio::net::{TcpStream, UnixStream};
    Ok(match connection {
        Connection::Tcp(io) => Connection::Tcp(TcpStream::from_std(io.into_std()?)?),
        Connection::Unix(io) => Connection::Unix(UnixStream::from_std(io.into_std()?)?),
        Connection::TcpPair { client, upstream } => Connection::TcpPair {
            client: TcpStream::from_std(client.into_std()?)?,
            upstream: TcpStream::from_std(upstream.into_std()?)?,
        },
        other => other,
    })
}
