//! Serving HTTP/1.1 and HTTP/2 with hyper (or axum) and draining without
//! a race.
//!
//! Each connection is HTTP/2 if it opens with HTTP/2's connection preface
//! (a TLS client that chose `h2` by ALPN does; so does a plaintext client
//! with prior knowledge, h2c), else HTTP/1.x. The first bytes are read to
//! tell, then served as the connection's first bytes. hyper-util's `auto`
//! builder tells them apart the same way; it is not used because the two
//! protocols drain differently (below) and because moving a connection to
//! the next generation needs hyper's HTTP/1 connection parts.
//!
//! An HTTP/2 connection drains with GOAWAY in two steps (hyper's graceful
//! shutdown: the highest stream id first, then, after a PING round trip,
//! the last stream it took); streams at or below it finish, the
//! connection closes when they have, or at the drain timeout. A client
//! retries the streams above the last id elsewhere (RFC 9113 §6.8).
//! HTTP/2 connections are not moved to the next generation; they drain.
//!
//! For HTTP/1.x, [`serve`] accepts until draining begins, then:
//! - stops accepting (the next generation accepts from the same socket) and
//!   drops its listener once this generation will not serve again: at once
//!   after a stop, at the end of the settle period after an upgrade; if the
//!   new generation dies within the settle period, it accepts again (see
//!   [`Shutdown::resumed`]);
//! - lets every in-flight request finish;
//! - answers the next request on each keep-alive connection with
//!   `Connection: close`, so the client itself opens its next connection
//!   (to the new generation) instead of racing a closing socket;
//! - closes a connection only once it has been silent (no bytes from the
//!   client) for the idle grace, so a request the client is sending right
//!   now is never cut off;
//! - at the drain timeout ([`Shutdown::expired`]) closes whatever is left.
//!
//! Upgraded connections (WebSocket) leave hyper's hands: spawn their tasks
//! with [`Shutdown::spawn`] and watch [`Shutdown::draining`] /
//! [`Shutdown::expired`].
//!
//! [`Server`] does more at an upgrade: it hands each keep-alive connection
//! to the next generation instead of closing it (connection migration,
//! see [`Baton::migrate`]). A connection with a request in flight finishes
//! that request here first, without `Connection: close`, and moves right
//! after its response; an idle one moves at once, with the bytes of a next
//! request already read. The client sees nothing: the same connection,
//! answered by the next generation. Where a connection cannot move (the
//! next generation is an older binary or refuses it, a stop rather than an
//! upgrade, a request that arrived just as it was moving), it is drained as
//! above.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{HeaderValue, CONNECTION};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use bytes::Bytes;

use crate::baton::Baton;
use crate::drain::Shutdown;
use crate::error::BoxError;
use crate::migrate::{Connection, Migrated};

/// A Baton server's HTTP/1.1 server whose keep-alive connections move to
/// the next generation at an upgrade instead of being closed (see the
/// [module docs](self)); at a stop, or where a connection cannot move, it
/// drains as [`serve`] does.
///
/// Create it before [`Baton::ready`]: that tells the previous generation
/// that this one takes the connections of the listener.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let baton = baton::Baton::from_env()?;
/// let listener = baton.tcp("http", "127.0.0.1:8080").await?;
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi\n" }));
/// let server = baton::http::Server::new(&baton, "http");
/// baton.ready().await?;
/// tokio::spawn(server.serve(listener, app));
/// baton.wait().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Server {
    baton: Baton,
    listener: Arc<str>,
    incoming: tokio::sync::mpsc::Receiver<Migrated>,
}

impl Server {
    /// A server for the listener named `name` (as given to
    /// [`Baton::tcp`] or [`Baton::unix`]), taking the connections the
    /// previous generation moves here.
    pub fn new(baton: &Baton, name: &str) -> Server {
        Server {
            incoming: baton.accept_migrated(name),
            baton: baton.clone(),
            listener: Arc::from(name),
        }
    }

    /// Serves `service` on the connections accepted from `listener` and on
    /// those the previous generation moves here, until draining; then
    /// moves each connection to the next generation, or drains it. Returns
    /// once the accept loop has stopped (the connections go on in tasks of
    /// the drain, which [`Baton::wait`] waits for).
    pub async fn serve<L, S, B>(self, listener: L, service: S) -> io::Result<()>
    where
        L: Accept,
        L::Io: Migratable,
        S: tower_service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let Server {
            baton,
            listener: name,
            mut incoming,
        } = self;
        let shutdown = baton.shutdown();
        {
            // Connections the previous generation moves here (until it
            // closes the channel).
            let (baton, name, service, handle) = (
                baton.clone(),
                name.clone(),
                service.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                while let Some(m) = incoming.recv().await {
                    let io = match L::Io::from_connection(m.connection) {
                        Ok(io) => io,
                        Err(_) => {
                            tracing::warn!(listener = %name, "a moved connection of another kind; closed");
                            continue;
                        }
                    };
                    let svc = WithPeer {
                        inner: service.clone(),
                        peer: io.peer(),
                    };
                    let state = Bytes::from(m.state);
                    let conn =
                        serve_moving(io, state, svc, handle.clone(), baton.clone(), name.clone());
                    handle.spawn(conn);
                }
            });
        }
        accept_loop(listener, service, shutdown, move |mut io, svc, handle| {
            let (baton, name) = (baton.clone(), name.clone());
            async move {
                let Some((h2, first)) = sniff(&mut io, &handle, true).await else {
                    return;
                };
                if h2 {
                    // Drained, not moved.
                    return serve_h2(Tracked::new(first, io), svc, handle).await;
                }
                serve_moving(io, first, svc, handle, baton, name).await;
            }
        })
        .await
    }
}

/// Serves one connection of a [`Server`]: after `prefix` (bytes of a next
/// request read by the previous generation), until it ends; at an
/// upgrade's drain it moves to the next generation once no request is in
/// flight, else it winds down as [`serve_connection`] does.
async fn serve_moving<I, S, B>(
    io: I,
    prefix: Bytes,
    service: S,
    shutdown: Shutdown,
    baton: Baton,
    listener: Arc<str>,
) where
    I: Migratable + AsyncRead + AsyncWrite + Unpin,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let in_flight = Arc::new(InFlight::default());
    let moving = Moving {
        baton: baton.clone(),
        in_flight: in_flight.clone(),
    };
    let io = Tracked::new(prefix, io);
    let (activity, hold) = (io.activity.clone(), io.hold.clone());
    let mut conn = hyper_connection(io, service.clone(), shutdown.clone(), Some(moving.clone()));
    tokio::select! {
        r = &mut conn => { log_conn(r); return; }
        _ = shutdown.draining() => {}
    }
    if !moving.baton.moving_on() {
        return wind_down(conn, activity, shutdown).await;
    }
    // The request in flight finishes here first (its response carries no
    // `Connection: close`).
    loop {
        let changed = in_flight.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if in_flight.now.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::select! {
            r = &mut conn => { log_conn(r); return; }
            _ = changed => {}
            _ = shutdown.expired() => return,
        }
    }
    // Idle: hyper stops reading, flushes, and gives the socket back, with
    // what it read of a next request; no FIN reaches the client. hyper
    // makes progress only when polled here, so no request can have started
    // since the check above.
    let started = in_flight.started.load(Ordering::SeqCst);
    hold.store(true, Ordering::SeqCst);
    std::pin::Pin::new(&mut conn).graceful_shutdown();
    let done = tokio::select! {
        r = &mut conn => r,
        _ = shutdown.expired() => return,
    };
    if done.is_err() || in_flight.started.load(Ordering::SeqCst) != started {
        // Broken, or a request got in after all (it was answered with
        // `Connection: close`): closed here.
        return;
    }
    let Some(parts) = conn.into_parts() else {
        return; // upgraded: the application has it
    };
    let Tracked {
        inner: io,
        prefix: rest,
        ..
    } = parts.io.into_inner();
    let mut state = parts.read_buf.to_vec();
    state.extend_from_slice(&rest);
    let back = match baton
        .migrate(&listener, io.into_connection(), state.clone())
        .await
    {
        Ok(()) => return,
        Err(c) => c,
    };
    // Not moved: served and drained here after all.
    let Ok(io) = I::from_connection(back) else {
        return;
    };
    let io = Tracked::new(Bytes::from(state), io);
    let activity = io.activity.clone();
    let conn = hyper_connection(io, service, shutdown.clone(), None);
    wind_down(conn, activity, shutdown).await;
}

/// A listener [`serve`] can accept from: TCP or Unix.
pub trait Accept: Send + 'static {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Accepts one connection, with the client's address when it has one.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, PeerAddr)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<(Self::Io, PeerAddr)> {
        let (s, peer) = tokio::net::TcpListener::accept(self).await?;
        let _ = s.set_nodelay(true);
        Ok((s, PeerAddr(Some(peer))))
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<(Self::Io, PeerAddr)> {
        let (s, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((s, PeerAddr(None)))
    }
}

/// A connection [`Server`] can hand to the next generation.
pub trait Migratable: Sized + Send + 'static {
    /// As a connection to migrate.
    fn into_connection(self) -> Connection;
    /// Back from a migrated connection (`Err` if it is of another kind).
    fn from_connection(c: Connection) -> Result<Self, Connection>;
    /// The client's address.
    fn peer(&self) -> PeerAddr;
}

impl Migratable for tokio::net::TcpStream {
    fn into_connection(self) -> Connection {
        Connection::Tcp(self)
    }
    fn from_connection(c: Connection) -> Result<Self, Connection> {
        match c {
            Connection::Tcp(s) => Ok(s),
            other => Err(other),
        }
    }
    fn peer(&self) -> PeerAddr {
        PeerAddr(self.peer_addr().ok())
    }
}

impl Migratable for tokio::net::UnixStream {
    fn into_connection(self) -> Connection {
        Connection::Unix(self)
    }
    fn from_connection(c: Connection) -> Result<Self, Connection> {
        match c {
            Connection::Unix(s) => Ok(s),
            other => Err(other),
        }
    }
    fn peer(&self) -> PeerAddr {
        PeerAddr(None)
    }
}

/// The client's address, in the extensions of every request [`serve`]
/// hands to the service (`None` for Unix-socket clients). With axum:
/// `axum::Extension(peer): axum::Extension<baton::http::PeerAddr>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub Option<std::net::SocketAddr>);

/// Inserts the connection's [`PeerAddr`] into each request.
#[derive(Debug, Clone)]
struct WithPeer<S> {
    inner: S,
    peer: PeerAddr,
}

impl<S, B> tower_service::Service<Request<Incoming>> for WithPeer<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        req.extensions_mut().insert(self.peer);
        self.inner.call(req)
    }
}

/// Serves `service` (any tower service, such as an axum `Router`) on
/// `listener` until draining, then drains as described in the
/// [module docs](self). Each request carries the client's [`PeerAddr`] in
/// its extensions. Returns once every connection has finished or was
/// closed at the drain timeout.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let baton = baton::Baton::from_env()?;
/// let listener = baton.tcp("http", "127.0.0.1:8080").await?;
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi\n" }));
/// baton.ready().await?;
/// tokio::spawn(baton::http::serve(listener, app, baton.shutdown()));
/// baton.wait().await;
/// # Ok(()) }
/// ```
pub async fn serve<L, S, B>(listener: L, service: S, shutdown: Shutdown) -> io::Result<()>
where
    L: Accept,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    accept_loop(listener, service, shutdown, |io, svc, handle| {
        serve_connection(io, svc, handle)
    })
    .await
}

/// Accepts until draining (again after a take-back), serving each
/// connection with `conn`.
async fn accept_loop<L, S, F, Fut>(
    listener: L,
    service: S,
    shutdown: Shutdown,
    conn: F,
) -> io::Result<()>
where
    L: Accept,
    S: Clone,
    F: Fn(L::Io, WithPeer<S>, Shutdown) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut shutdown = shutdown;
    loop {
        let (io, peer) = tokio::select! {
            biased;
            // Not accepting from here on; the listener is kept until it is
            // clear that this generation will not serve again (the settle
            // period after an upgrade).
            _ = shutdown.draining() => match shutdown.resumed().await {
                Some(next) => {
                    tracing::info!("accepting again");
                    shutdown = next;
                    continue;
                }
                None => break,
            },
            accepted = listener.accept() => match crate::accept::accepted(accepted, "http").await {
                Some(accepted) => accepted,
                None => continue,
            },
        };
        let svc = WithPeer {
            inner: service.clone(),
            peer,
        };
        let handle = shutdown.clone();
        shutdown.spawn(conn(io, svc, handle));
    }
    // Stop accepting: this generation's listening fd closes here.
    drop(listener);
    tracing::debug!("stopped accepting");
    Ok(())
}

/// Serves one connection, HTTP/1.x or HTTP/2 (see the
/// [module docs](self)), with the drain described there. Exposed for
/// servers with their own accept loop.
pub async fn serve_connection<I, S, B>(mut io: I, service: S, shutdown: Shutdown)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Some((h2, first)) = sniff(&mut io, &shutdown, false).await else {
        return;
    };
    let io = Tracked::new(first, io);
    if h2 {
        return serve_h2(io, service, shutdown).await;
    }
    let activity = io.activity.clone();
    let conn = hyper_connection(io, service, shutdown.clone(), None);
    drain_connection(conn, activity, shutdown).await;
}

/// HTTP/2's connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes until they tell whether it speaks
/// HTTP/2 (they are the preface) or not (one byte differs, which for
/// HTTP/1.x is the first or the second); returns that and the bytes read.
/// `None`: the client closed or went silent through a drain's idle grace,
/// or the drain expired. With `movable`, a connection still silent when
/// the drain begins is taken for HTTP/1.x at once (so that it can move to
/// the next generation as an idle one).
async fn sniff<I: AsyncRead + Unpin>(
    io: &mut I,
    shutdown: &Shutdown,
    movable: bool,
) -> Option<(bool, Bytes)> {
    use tokio::io::AsyncReadExt;
    let mut have = bytes::BytesMut::with_capacity(1024);
    let silent_through_drain = async {
        shutdown.draining().await;
        if !movable {
            tokio::time::sleep(shutdown.idle_grace()).await;
        }
    };
    tokio::pin!(silent_through_drain);
    loop {
        let n = have.len().min(PREFACE.len());
        if have.get(..n) != PREFACE.get(..n) {
            return Some((false, have.freeze()));
        }
        if n == PREFACE.len() {
            return Some((true, have.freeze()));
        }
        let read = tokio::select! {
            r = io.read_buf(&mut have) => r,
            _ = &mut silent_through_drain, if have.is_empty() => {
                return movable.then(|| (false, Bytes::new()));
            }
            _ = shutdown.expired() => return None,
        };
        match read {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Serves an HTTP/2 connection until it ends; once draining, GOAWAY and
/// the streams it took finish (bounded by the drain's expiry).
async fn serve_h2<I, S, B>(io: Tracked<I>, service: S, shutdown: Shutdown)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => { log_conn(r); return; }
        _ = shutdown.draining() => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        r = conn.as_mut() => log_conn(r),
        _ = shutdown.expired() => {}
    }
}

/// [`serve`] over TLS (feature `tls`): each connection's handshake runs in
/// its own task (bounded by 10 s and by the drain's expiry), then the
/// connection is served as [`serve_connection`] does: HTTP/2 when the
/// client chose `h2` (offer it with
/// [`Options::alpn`](crate::tls::Options::alpn)), else HTTP/1.x. TLS
/// connections drain at an upgrade (their session keys are this
/// process's); pass [`crate::tls::Tickets::for_baton`] to the acceptor so
/// that clients resume their sessions with the next generation.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use baton::tls::{Acceptor, Certificate, Certificates, Options, Tickets};
/// let baton = baton::Baton::from_env()?;
/// let listener = baton.tcp("https", "127.0.0.1:8443").await?;
/// let certs = || Certificates::new(vec![Certificate::load("site.pem", "site.key")?]);
/// let mut options = Options::default().alpn(&[b"h2", b"http/1.1"]);
/// if let Some(tickets) = Tickets::for_baton(&baton) {
///     options = options.tickets(tickets);
/// }
/// let acceptor = Acceptor::new(certs()?, options);
/// let reload = acceptor.clone();
/// baton.on_reload(move || {
///     let reload = reload.clone();
///     async move {
///         reload.certificates().reload(|| async { certs() }).await?;
///         Ok(())
///     }
/// });
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi\n" }));
/// baton.ready().await?;
/// tokio::spawn(baton::http::serve_tls(listener, acceptor, app, baton.shutdown()));
/// baton.wait().await;
/// # Ok(()) }
/// ```
#[cfg(feature = "tls")]
pub async fn serve_tls<S, B>(
    listener: tokio::net::TcpListener,
    acceptor: crate::tls::Acceptor,
    service: S,
    shutdown: Shutdown,
) -> io::Result<()>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    accept_loop(listener, service, shutdown, move |io, svc, handle| {
        let acceptor = acceptor.clone();
        async move {
            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(io));
            let tls = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                },
                _ = handle.expired() => return,
            };
            serve_connection(tls, svc, handle).await;
        }
    })
    .await
}

/// Requests in flight on one connection (from the service call to the end
/// of the response body), for [`Server`] to move it between two.
#[derive(Debug, Default)]
struct InFlight {
    now: std::sync::atomic::AtomicUsize,
    started: AtomicU64,
    changed: tokio::sync::Notify,
}

/// Counts a request in flight until dropped (with the response body).
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(f: &Arc<InFlight>) -> Self {
        f.now.fetch_add(1, Ordering::SeqCst);
        f.started.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(f.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

type HyperConn<I, S> = hyper::server::conn::http1::UpgradeableConnection<
    TokioIo<Tracked<I>>,
    CloseWhenDraining<TowerToHyperService<Box<S>>>,
>;

/// hyper's connection over `io`, with `Connection: close` once draining
/// (unless `moving` says the connection is to move instead).
fn hyper_connection<I, S, B>(
    io: Tracked<I>,
    service: S,
    shutdown: Shutdown,
    moving: Option<Moving>,
) -> HyperConn<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let svc = CloseWhenDraining {
        inner: TowerToHyperService::new(Box::new(service)),
        shutdown,
        moving,
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
}

/// What a connection that may move to the next generation needs.
#[derive(Clone)]
struct Moving {
    baton: Baton,
    in_flight: Arc<InFlight>,
}

/// Serves `conn` until it ends, with the keep-alive wind-down once draining.
async fn drain_connection<I, S, B>(
    mut conn: HyperConn<I, S>,
    activity: Arc<Activity>,
    shutdown: Shutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    tokio::select! {
        r = &mut conn => { log_conn(r); return; }
        _ = shutdown.draining() => {}
    }
    wind_down(conn, activity, shutdown).await;
}

/// The keep-alive wind-down of a draining connection.
async fn wind_down<I, S, B>(mut conn: HyperConn<I, S>, activity: Arc<Activity>, shutdown: Shutdown)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Draining: requests now get `Connection: close`. Close only once the
    // client has been silent for the idle grace.
    let grace = shutdown.idle_grace();
    loop {
        let idle = activity.idle_for();
        if idle >= grace {
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            break;
        }
        tokio::select! {
            r = &mut conn => { log_conn(r); return; }
            _ = tokio::time::sleep(grace - idle) => {}
            _ = shutdown.expired() => return,
        }
    }
    tokio::select! {
        r = &mut conn => log_conn(r),
        _ = shutdown.expired() => {}
    }
}

fn log_conn(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection error");
    }
}

/// When the client last sent us bytes.
struct Activity {
    base: Instant,
    last_read_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_read_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        self.last_read_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_for(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_read_ms.load(Ordering::Relaxed)))
    }
}

pin_project_lite::pin_project! {
    /// An IO that first reads out `prefix` (the bytes of a next request
    /// that the previous generation had read already), records when bytes
    /// were last read, and whose shutdown can be held back (the connection
    /// moves to the next generation: no FIN may reach the client).
    struct Tracked<I> {
        #[pin]
        inner: I,
        prefix: Bytes,
        activity: Arc<Activity>,
        hold: Arc<std::sync::atomic::AtomicBool>,
    }
}

impl<I> Tracked<I> {
    fn new(prefix: Bytes, inner: I) -> Self {
        Tracked {
            inner,
            prefix,
            activity: Arc::new(Activity::new()),
            hold: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }
}

impl<I: AsyncRead> AsyncRead for Tracked<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite> AsyncWrite for Tracked<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.hold.load(Ordering::SeqCst) {
            // Flushed already (hyper flushes before it shuts down).
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Adds `Connection: close` to responses once draining has begun; hyper then
/// closes the connection right after that response.
/// With `moving` (a [`Server`] connection), it counts the requests in
/// flight, and an upgrade's drain adds nothing: the connection moves to the
/// next generation after the response instead.
#[derive(Clone)]
struct CloseWhenDraining<S> {
    inner: S,
    shutdown: Shutdown,
    moving: Option<Moving>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for CloseWhenDraining<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<InFlightBody<B>>;
    type Error = S::Error;
    type Future = CloseWhenDrainingFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        CloseWhenDrainingFuture {
            guard: self
                .moving
                .as_ref()
                .map(|m| InFlightGuard::new(&m.in_flight)),
            inner: self.inner.call(req),
            draining: self.shutdown.draining_token().clone(),
            moving: self.moving.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`CloseWhenDraining`] (no allocation per
    /// request).
    struct CloseWhenDrainingFuture<F> {
        #[pin]
        inner: F,
        draining: tokio_util::sync::CancellationToken,
        moving: Option<Moving>,
        guard: Option<InFlightGuard>,
    }
}

impl<F, B, E> Future for CloseWhenDrainingFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<InFlightBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let resp = match this.inner.poll(cx) {
            Poll::Ready(Ok(resp)) => resp,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let (mut parts, body) = resp.into_parts();
        // Checked when the response is ready, not when the request came in:
        // a request that was in flight when draining began also closes its
        // connection, unless the connection moves.
        if this.draining.is_cancelled()
            && parts.status != http::StatusCode::SWITCHING_PROTOCOLS
            && !this.moving.as_ref().is_some_and(|m| m.baton.moving_on())
        {
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let body = InFlightBody {
            inner: body,
            guard: this.guard.take(),
        };
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its request's [`InFlightGuard`] until it
    /// has been sent whole (or dropped).
    pub(crate) struct InFlightBody<B> {
        #[pin]
        inner: B,
        guard: Option<InFlightGuard>,
    }
}

impl<B> std::fmt::Debug for InFlightBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlightBody").finish_non_exhaustive()
    }
}

impl<B: http_body::Body> http_body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn get(c: &mut tokio::net::TcpStream) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn requests_carry_the_peer_address_and_drain_closes_keepalive_politely() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app =
            axum::Router::new().fallback(
                |axum::Extension(peer): axum::Extension<PeerAddr>| async move {
                    format!("{:?}", peer.0)
                },
            );
        let drain = crate::Drain::new(Duration::from_secs(5));
        let server = tokio::spawn(serve(listener, app, drain.handle()));

        use tokio::io::AsyncReadExt;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let me = c.local_addr().unwrap();
        let first = get(&mut c).await;
        assert!(first.contains(&format!("Some({me})")), "{first}");
        assert!(
            !first.to_ascii_lowercase().contains("connection: close"),
            "{first}"
        );

        // Draining: the idle keep-alive connection stays open (idle grace is
        // 5 s), and its next request is answered with `Connection: close`.
        drain.start();
        let second = get(&mut c).await;
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
        assert!(
            second.to_ascii_lowercase().contains("connection: close"),
            "{second}"
        );
        let mut rest = [0u8; 1];
        assert_eq!(
            c.read(&mut rest).await.unwrap(),
            0,
            "closed after the response"
        );
        assert_eq!(
            drain.drain(Duration::from_secs(5)).await,
            crate::DrainOutcome::Complete
        );
        server.await.unwrap().unwrap();
    }
}
