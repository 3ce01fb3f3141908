//! HTTP/1.x proxying: one task per client connection reads request heads,
//! routes them, forwards them to an upstream connection it owns, and copies
//! the response back.
//!
//! This module is the connection loop, routing and retries; the pieces it
//! drives are functions over explicit inputs elsewhere. Heads are parsed in
//! place with `httparse` and checked ([`crate::h1`]), and written out again
//! by [`crate::rewrite`] (without the hop-by-hop fields, with
//! `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` added); response
//! heads are read by [`UpstreamConn::read_head`]; bodies are copied as they
//! come by [`crate::body`] (`Content-Length`, chunked, or until the
//! upstream closes). A request's head and the part of its body already read
//! go out in one write, and so do a response's head and body when the body
//! has arrived with it.
//!
//! The loop is generic over the client's stream (any `AsyncRead +
//! AsyncWrite`), so another transport plugs in without a second copy.
//!
//! Keep-alive and draining follow `baton::http::serve_connection`: once the
//! process or the listener drains, each response carries
//! `Connection: close`, and a connection waiting for its next request is
//! closed only once the client has been silent for the idle grace, so a
//! client never has a request cut off by a close it could not see coming.

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::body::{self, BodyError, ClientBody};
use crate::conn::{
    is_closed, ConnectError, IdlePool, ReadHeadError, ResponseHead, UpStream, UpstreamConn,
    CONNECT_TIMEOUT, MAX_LOCAL_IDLE, READ_BUF,
};
use crate::h1::{self, Fields, Framing};
use crate::rewrite::{self, ClientSide, Forwarded, Peer, RequestTarget};
use crate::router::{Route, RouteTable, Target};
use crate::stats::{ConnGuard, ListenerStats};
use crate::timer::Timer;
use crate::upstream::{InFlight, Pool};
use crate::websocket;

/// A client connection may stay idle between requests this long, and a
/// request head must arrive within it (nginx's `keepalive_timeout` is 75 s,
/// `client_header_timeout` 60 s).
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The first line of HTTP/2's connection preface (RFC 9113 §3.4), which
/// HTTP/1 parsing refuses (version `HTTP/2.0`).
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Content type of the proxy's own short answers.
const TEXT: &[u8] = b"text/plain; charset=utf-8";

/// What every connection of one HTTP listener shares.
#[derive(Debug)]
pub(crate) struct HttpContext {
    /// The listener's name.
    pub(crate) listener: String,
    /// Its routes; a reload swaps them.
    pub(crate) routes: ArcSwap<RouteTable>,
    /// Its counters.
    pub(crate) stats: Arc<ListenerStats>,
    /// Idle upstream connections of client connections that went away
    /// (shared by every listener).
    pub(crate) idle: Arc<IdlePool>,
    /// The process whose upgrade moves keep-alive connections to the next
    /// generation (`None`: they are drained).
    pub(crate) baton: Option<baton::Baton>,
    /// The TLS acceptor of an `https` listener (its certificates reload in
    /// place).
    pub(crate) tls: Option<baton::tls::Acceptor>,
}

/// A client stream that can move to the next generation.
pub(crate) trait Movable: Sized {
    /// As a connection to migrate, or back if it cannot be.
    fn into_connection(self) -> Result<baton::migrate::Connection, Self>;
    /// Back from a connection that did not move.
    fn from_connection(c: baton::migrate::Connection) -> Option<Self>;
}

impl Movable for tokio::net::TcpStream {
    fn into_connection(self) -> Result<baton::migrate::Connection, Self> {
        Ok(baton::migrate::Connection::Tcp(self))
    }
    fn from_connection(c: baton::migrate::Connection) -> Option<Self> {
        match c {
            baton::migrate::Connection::Tcp(s) => Some(s),
            _ => None,
        }
    }
}

/// A TLS connection is served through a borrow (so that it can be closed
/// with `close_notify` afterwards) and does not move: its session keys are
/// in this process (it drains at an upgrade instead).
impl Movable for &mut baton::tls::TlsStream<tokio::net::TcpStream> {
    fn into_connection(self) -> Result<baton::migrate::Connection, Self> {
        Err(self)
    }
    fn from_connection(_: baton::migrate::Connection) -> Option<Self> {
        None
    }
}

/// The in-memory stream an HTTP/2 stream is served over
/// ([`crate::h2`]): it has no socket to move.
impl Movable for tokio::io::DuplexStream {
    fn into_connection(self) -> Result<baton::migrate::Connection, Self> {
        Err(self)
    }
    fn from_connection(_: baton::migrate::Connection) -> Option<Self> {
        None
    }
}

/// Serves one client connection until it closes, the drain winds it down,
/// or the drain expires. An upgraded connection (WebSocket) is spliced to
/// its upstream here, counted as upgraded rather than as a connection.
pub(crate) async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<HttpContext>,
    shutdown: baton::Shutdown,
    guard: ConnGuard,
) where
    S: AsyncRead + AsyncWrite + Unpin + Movable,
{
    serve_moved(stream, peer, ctx, shutdown, guard, BytesMut::new()).await;
}

/// [`serve`], starting from `prefix`: the bytes of a next request that the
/// previous generation had read when it moved the connection here. At an
/// upgrade's drain, a connection waiting for its next request moves to the
/// next generation (with what it read of that request) instead of winding
/// down; one that cannot move winds down as usual.
pub(crate) async fn serve_moved<S>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<HttpContext>,
    shutdown: baton::Shutdown,
    guard: ConnGuard,
    prefix: BytesMut,
) where
    S: AsyncRead + AsyncWrite + Unpin + Movable,
{
    let mut client = Client::new(stream, peer, ctx, shutdown.clone());
    client.rbuf = prefix;
    let upgraded = loop {
        let upgraded = tokio::select! {
            u = client.run() => u,
            _ = shutdown.expired() => None,
        };
        // The client's upstream connections serve others from now on.
        if !client.local.is_empty() {
            let local = std::mem::take(&mut client.local);
            client.ctx.idle.put(local);
        }
        if !client.move_now {
            break upgraded;
        }
        let Client {
            stream, rbuf, ctx, ..
        } = client;
        let Some(baton) = ctx.baton.clone() else {
            return;
        };
        let back = match stream.into_connection() {
            Ok(conn) => match baton.migrate(&ctx.listener, conn, rbuf.to_vec()).await {
                Ok(()) => return,
                Err(conn) => S::from_connection(conn),
            },
            Err(stream) => Some(stream),
        };
        // It did not move: served and wound down here after all.
        let Some(stream) = back else { return };
        client = Client::new(stream, peer, ctx, shutdown.clone());
        client.rbuf = rbuf;
        client.stay = true;
    };
    if client.h2c {
        // h2c with prior knowledge: the same connection, served as HTTP/2
        // from the preface on.
        let Client {
            stream, rbuf, ctx, ..
        } = client;
        if let Ok(baton::migrate::Connection::Tcp(tcp)) = stream.into_connection() {
            let io = crate::h2::Prefixed::new(rbuf.freeze(), tcp);
            crate::h2::serve(io, peer, ctx, shutdown).await;
        }
        return;
    }
    let Some(up) = upgraded else {
        return;
    };
    drop(guard);
    let _upgraded = client.ctx.stats.upgraded();
    let _in_flight = up.in_flight;
    let Client {
        stream, rbuf, ctx, ..
    } = client;
    let mut conn = up.conn;
    let to_client = conn.buf.split();
    let moving = ctx.baton.clone().map(|baton| websocket::Moving {
        baton,
        listener: ctx.listener.clone(),
    });
    // A pair can move to the next generation when both sides are plain
    // TCP; with TLS to the upstream it stays and drains.
    let (stream, upstream) = match (moving, conn.stream) {
        (Some(moving), UpStream::Tcp(upstream)) => match stream.into_connection() {
            Ok(baton::migrate::Connection::Tcp(client)) => {
                // What was read past the handshake goes first, then the pair
                // can move at an upgrade.
                let mut client = client;
                let mut upstream = upstream;
                let mut state = websocket::PairState {
                    websocket: up.websocket,
                    ..Default::default()
                };
                let first = async {
                    upstream.write_all(&rbuf).await?;
                    state.to_upstream.feed(&rbuf);
                    client.write_all(&to_client).await?;
                    state.to_client.feed(&to_client);
                    std::io::Result::Ok(())
                };
                let ok = tokio::select! {
                    r = first => r.is_ok(),
                    _ = shutdown.expired() => false,
                };
                if ok {
                    websocket::splice_pair(client, upstream, state, &shutdown, Some(moving)).await;
                }
                return;
            }
            Ok(other) => match S::from_connection(other) {
                Some(stream) => (stream, UpStream::Tcp(upstream)),
                None => return,
            },
            Err(stream) => (stream, UpStream::Tcp(upstream)),
        },
        (_, upstream) => (stream, upstream),
    };
    websocket::splice(stream, upstream, up.websocket, &shutdown, &rbuf, &to_client).await;
}

/// A connection switched to another protocol.
struct Upgraded {
    conn: UpstreamConn,
    in_flight: InFlight,
    websocket: bool,
}

/// One client connection.
struct Client<S> {
    ctx: Arc<HttpContext>,
    peer: SocketAddr,
    /// The client's address as the forwarding fields write it.
    forwarded: Peer,
    shutdown: baton::Shutdown,
    stream: S,
    /// Bytes read from the client and not used yet.
    rbuf: BytesMut,
    /// What is written next (a head, and the body bytes that fit).
    wbuf: Vec<u8>,
    /// Bodies are copied through this.
    copy: Vec<u8>,
    /// Idle upstream connections of this client connection.
    local: Vec<UpstreamConn>,
    timer: Timer,
    /// When the client last sent bytes or a response ended: the keep-alive
    /// timeout and the drain's idle grace count from here.
    last_active: Instant,
    /// Set when the connection is to move to the next generation now
    /// (between two requests, at an upgrade's drain).
    move_now: bool,
    /// It tried to move and could not: it winds down here.
    stay: bool,
    /// No request has been read on this connection yet.
    fresh: bool,
    /// The connection opened with HTTP/2's preface (h2c, prior
    /// knowledge): it is served by [`crate::h2`] from here on.
    h2c: bool,
}

/// How a request ended, for the connection.
enum Outcome {
    /// The connection can carry the next request.
    KeepAlive,
    /// Close the connection.
    Close,
    /// The connection now speaks another protocol.
    Upgraded(Upgraded),
    /// The head is not complete yet.
    NeedMore,
    /// Nothing was sent or answered: the backend a [`crate::front::Front`]
    /// follows refused the connection or was just switched away from, so
    /// the request goes to the next one.
    Reroute,
}

/// How many header fields a request head is parsed for at first; most
/// heads have fewer than a dozen.
const FEW_HEADERS: usize = 24;

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(stream: S, peer: SocketAddr, ctx: Arc<HttpContext>, shutdown: baton::Shutdown) -> Self {
        let now = Instant::now();
        let forwarded = match ctx.tls {
            Some(_) => Peer::new(peer.ip()).over_tls(),
            None => Peer::new(peer.ip()),
        };
        Client {
            ctx,
            peer,
            forwarded,
            shutdown,
            stream,
            rbuf: BytesMut::with_capacity(READ_BUF),
            wbuf: Vec::with_capacity(1024),
            copy: Vec::new(),
            local: Vec::new(),
            timer: Timer::new(now + KEEPALIVE_TIMEOUT),
            last_active: now,
            move_now: false,
            stay: false,
            fresh: true,
            h2c: false,
        }
    }

    /// Whether, draining, this connection moves to the next generation
    /// (an upgrade's drain, with a process that migrates) instead of
    /// winding down.
    fn moves(&self) -> bool {
        !self.stay && self.ctx.baton.as_ref().is_some_and(baton::Baton::moving_on)
    }

    /// Whether responses close the connection (draining, and not moving).
    fn closing(&self) -> bool {
        self.shutdown.is_draining() && !self.moves()
    }

    /// Serves requests until the connection is done; returns it if it was
    /// upgraded.
    async fn run(&mut self) -> Option<Upgraded> {
        loop {
            if self.rbuf.is_empty() && !self.read_more().await {
                return None;
            }
            // The head is parsed from a buffer of its own so that `self`
            // stays free to use while the request is forwarded.
            let buf = std::mem::take(&mut self.rbuf);
            // Parsed into room for [`FEW_HEADERS`] fields, which this
            // future holds while the request is forwarded; a head with
            // more is parsed again into room for [`h1::MAX_HEADERS`] on
            // the heap. (A future's whole size is copied when it is
            // spawned: room for the maximum here would be most of it.)
            let mut headers =
                [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; FEW_HEADERS];
            let mut more = Vec::new();
            let mut req = httparse::Request::new(&mut []);
            let mut parsed = req.parse_with_uninit_headers(&buf, &mut headers);
            if matches!(parsed, Err(httparse::Error::TooManyHeaders)) {
                more.resize_with(h1::MAX_HEADERS, MaybeUninit::uninit);
                req = httparse::Request::new(&mut []);
                parsed = req.parse_with_uninit_headers(&buf, &mut more);
            }
            let (outcome, used) = match parsed {
                Ok(httparse::Status::Complete(head_len)) => {
                    self.fresh = false;
                    self.request(&req, &buf, head_len).await
                }
                Ok(httparse::Status::Partial) if buf.len() <= h1::MAX_HEAD => {
                    (Outcome::NeedMore, 0)
                }
                Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => (
                    self.refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
                        .await,
                    0,
                ),
                Err(_) if self.fresh && buf.starts_with(H2_PREFACE_LINE) => {
                    self.h2c = true;
                    (Outcome::Close, 0)
                }
                Err(_) => (self.refuse(StatusCode::BAD_REQUEST).await, 0),
            };
            // What the request did not use starts the next one (pipelining),
            // ahead of anything read while its body was copied.
            let mut buf = buf;
            buf.advance(used.min(buf.len()));
            if !self.rbuf.is_empty() {
                buf.extend_from_slice(&self.rbuf);
            }
            self.rbuf = buf;
            match outcome {
                Outcome::KeepAlive => {
                    // The keep-alive timeout and the drain's idle grace
                    // count from the end of the response (a long one must
                    // not leave the client no time to send its next
                    // request).
                    self.last_active = Instant::now();
                }
                Outcome::NeedMore => {
                    if !self.read_more().await {
                        return None;
                    }
                }
                Outcome::Close | Outcome::Reroute => return None,
                Outcome::Upgraded(u) => return Some(u),
            }
        }
    }

    /// Reads more of the client's next request into `rbuf`; false if the
    /// connection is to close: the client closed, it stayed silent for
    /// [`KEEPALIVE_TIMEOUT`] since its last bytes or the end of the last
    /// response (nginx's `keepalive_timeout` and `client_header_timeout`
    /// count the same way), or, once draining, for the idle grace.
    async fn read_more(&mut self) -> bool {
        loop {
            self.timer.set(self.last_active + KEEPALIVE_TIMEOUT);
            let draining = self.shutdown.is_draining();
            if draining && self.moves() {
                // Between two requests: what was read of the next one goes
                // with the connection.
                self.move_now = true;
                return false;
            }
            if draining && self.rbuf.is_empty() {
                let grace = self.last_active + self.shutdown.idle_grace();
                if Instant::now() >= grace {
                    return false;
                }
                self.timer.set(grace);
            }
            self.rbuf.reserve(READ_BUF);
            tokio::select! {
                biased;
                r = self.stream.read_buf(&mut self.rbuf) => return match r {
                    Ok(0) | Err(_) => false,
                    Ok(_) => {
                        self.last_active = Instant::now();
                        true
                    }
                },
                // Draining began: the idle grace applies from now on.
                _ = self.shutdown.draining(), if !draining => {}
                _ = self.timer.fired() => return false,
            }
        }
    }

    /// Answers a request that could not be read, and closes.
    async fn refuse(&mut self, status: StatusCode) -> Outcome {
        // Counted as answered at once (nothing was waited for).
        self.ctx
            .stats
            .requests_metrics
            .observe(status.as_u16(), Duration::ZERO);
        let reason = status.canonical_reason().unwrap_or("error");
        self.close_with(status, reason.as_bytes()).await;
        Outcome::Close
    }

    /// Sends a short plain-text response that closes the connection.
    async fn close_with(&mut self, status: StatusCode, body: &[u8]) {
        self.wbuf.clear();
        h1::put_response(&mut self.wbuf, status, TEXT, body, false, false, true);
        let _ = self.stream.write_all(&self.wbuf).await;
    }

    /// Handles one request whose head is `buf[..head_len]`; returns what
    /// the connection does next and how much of `buf` the request used.
    async fn request(
        &mut self,
        req: &httparse::Request<'_, '_>,
        buf: &[u8],
        head_len: usize,
    ) -> (Outcome, usize) {
        let log = tracing::enabled!(target: "baton_proxy::access", tracing::Level::INFO);
        let started = std::time::Instant::now();
        self.ctx.stats.request();
        let method = req.method.unwrap_or("GET");
        let target = req.path.unwrap_or("/");
        let http10 = req.version == Some(0);
        let fields = match Fields::of(req.headers) {
            Ok(f) => f,
            Err(_) => return (self.refuse(StatusCode::BAD_REQUEST).await, head_len),
        };
        let framing = match fields.request_framing(http10) {
            Ok(f) => f,
            Err(_) => return (self.refuse(StatusCode::BAD_REQUEST).await, head_len),
        };
        if method == "CONNECT" {
            return (self.refuse(StatusCode::METHOD_NOT_ALLOWED).await, head_len);
        }
        let Ok(parsed) = RequestTarget::parse(target) else {
            return (self.refuse(StatusCode::BAD_REQUEST).await, head_len);
        };
        let Ok(forwarded) = Forwarded::new(req, &parsed, &fields, framing) else {
            return (self.refuse(StatusCode::BAD_REQUEST).await, head_len);
        };
        // Routed as normalised (and forwarded so: what was routed is what
        // the upstream sees), by the `Host` an absolute-form target's
        // authority replaces.
        let (host, path, client_keep) = (forwarded.host, forwarded.path, forwarded.client_keep);

        let table = self.ctx.routes.load_full();
        let action = match table.find(host, path) {
            None => Action::Own(StatusCode::NOT_FOUND, TEXT, b"no route\n"),
            Some(Route {
                target:
                    Target::Respond {
                        status,
                        body,
                        content_type,
                    },
                ..
            }) => Action::Own(*status, content_type.as_bytes(), body),
            Some(
                route @ Route {
                    target: Target::Upstream { pool, strip_prefix },
                    ..
                },
            ) => Action::Forward(route, pool, *strip_prefix),
            Some(
                route @ Route {
                    target: Target::Follow(follow),
                    ..
                },
            ) => Action::Follow(route, follow),
        };
        let (outcome, used, status, upstream) = match action {
            Action::Own(status, content_type, body) => {
                let keep = client_keep && framing == Framing::None;
                let answer = (status, content_type, body);
                let outcome = self.respond(answer, method, keep, http10).await;
                (outcome, head_len, status.as_u16(), None)
            }
            Action::Forward(route, pool, strip_prefix) => {
                let strip = strip_prefix.then_some(route.prefix.as_str());
                let r = self
                    .forward(req, buf, head_len, &forwarded, route, pool, strip, false)
                    .await;
                (r.outcome, r.used, r.status, r.server)
            }
            Action::Follow(route, follow) => {
                let r = self
                    .follow(req, buf, head_len, &forwarded, route, follow)
                    .await;
                (r.outcome, r.used, r.status, r.server)
            }
        };
        let elapsed = started.elapsed();
        self.ctx.stats.requests_metrics.observe(status, elapsed);
        if log {
            tracing::info!(
                target: "baton_proxy::access",
                listener = %self.ctx.listener,
                client = %self.peer.ip(),
                method = %method,
                host = host.unwrap_or("-"),
                path = %path,
                status,
                upstream = %upstream.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                "request"
            );
        }
        (outcome, used)
    }

    /// A response of the proxy's own. A request body is not read: the
    /// connection closes after the response if there is one.
    async fn respond(
        &mut self,
        (status, content_type, body): (StatusCode, &[u8], &[u8]),
        method: &str,
        keep: bool,
        http10: bool,
    ) -> Outcome {
        let keep = keep && !self.closing();
        self.wbuf.clear();
        h1::put_response(
            &mut self.wbuf,
            status,
            content_type,
            body,
            keep,
            http10,
            method != "HEAD",
        );
        if self.stream.write_all(&self.wbuf).await.is_err() || !keep {
            return Outcome::Close;
        }
        Outcome::KeepAlive
    }

    /// Forwards a request to the backend `follow` follows. While there is
    /// none, or it refuses the connection (it died; its replacement is
    /// starting), or it was switched away from before the request counted
    /// itself in flight there, the request waits for the next backend, up
    /// to the front's wait, and is then answered `503`.
    async fn follow(
        &mut self,
        req: &httparse::Request<'_, '_>,
        buf: &[u8],
        head_len: usize,
        f: &Forwarded<'_>,
        route: &Route,
        follow: &crate::front::Follow,
    ) -> Forwarding {
        let deadline = Instant::now() + follow.wait;
        let mut backend = follow.current.subscribe();
        loop {
            let pool = backend.borrow_and_update().clone();
            if let Some(pool) = pool {
                let r = self
                    .forward(req, buf, head_len, f, route, &pool, None, true)
                    .await;
                if !matches!(r.outcome, Outcome::Reroute) {
                    return r;
                }
            }
            let next = tokio::time::timeout_at(deadline, backend.changed()).await;
            if !matches!(next, Ok(Ok(()))) {
                tracing::warn!(listener = %self.ctx.listener, wait = ?follow.wait, "no backend took the request in time");
                let done = Forwarding {
                    outcome: Outcome::Close,
                    used: head_len,
                    status: 503,
                    server: None,
                };
                return self.fail(done, StatusCode::SERVICE_UNAVAILABLE).await;
            }
        }
    }

    /// Forwards a request to a server of `pool` and its response back.
    /// `follow`: `pool` is a front's backend, and a refused connection or a
    /// retired backend gives [`Outcome::Reroute`] (nothing sent or
    /// answered) instead of an error response.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &mut self,
        req: &httparse::Request<'_, '_>,
        buf: &[u8],
        head_len: usize,
        f: &Forwarded<'_>,
        route: &Route,
        pool: &Arc<Pool>,
        strip: Option<&str>,
        follow: bool,
    ) -> Forwarding {
        let upgrade = rewrite::upgrade(req.headers, f.fields);
        let mut done = Forwarding {
            outcome: Outcome::Close,
            used: head_len,
            status: 502,
            server: None,
        };
        // A request whose body has not been read yet cannot be sent twice;
        // one without a body can go to another server if connecting fails,
        // and again on a new connection if a reused one turns out closed
        // before any response (for methods that are safe to repeat).
        let retryable = f.framing == Framing::None;
        let idempotent = matches!(
            f.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        );
        let mut tried: Vec<SocketAddr> = Vec::new();
        let (conn, server, in_flight, (resp_head, persist)) = loop {
            let Some(server) = pool.pick(&tried) else {
                return self.fail(done, StatusCode::BAD_GATEWAY).await;
            };
            tried.push(server.addr);
            done.server = Some(server.addr);
            let in_flight = server.begin();
            if follow && server.is_retired() {
                done.outcome = Outcome::Reroute;
                return done;
            }
            let mut conn = match self.checkout(server.addr, pool.tls.as_ref()).await {
                Ok(c) => c,
                // Nothing was sent: the next backend gets the request.
                Err(ConnectError::Io(_)) if follow => {
                    done.outcome = Outcome::Reroute;
                    return done;
                }
                Err(error) if error.is_local() => {
                    // Out of fds or ports here: the server is not at fault
                    // (and another one would fail the same way).
                    tracing::warn!(server = %server.addr, %error, "upstream request failed");
                    return self.fail(done, StatusCode::SERVICE_UNAVAILABLE).await;
                }
                Err(error) => {
                    let error = error.to_string();
                    server.mark_failed(pool.fail_timeout, &error);
                    if retryable && tried.len() < pool.servers.len() {
                        continue;
                    }
                    tracing::warn!(server = %server.addr, error, "upstream request failed");
                    return self.fail(done, StatusCode::BAD_GATEWAY).await;
                }
            };
            // A reused connection the upstream closed just now fails
            // without a byte of response; repeat once on a new one.
            let mut fresh_retry = retryable && idempotent;
            let result = loop {
                rewrite::request_head(
                    &mut self.wbuf,
                    req.headers,
                    f,
                    strip,
                    upgrade,
                    conn.addr,
                    &self.forwarded,
                );
                let sent = self.send_request(&mut conn, &buf[head_len..], f).await;
                let r = match sent {
                    Ok(used) => {
                        done.used = head_len + used;
                        // The route's timeout counts from the end of the
                        // request body: a slow upload is the client's
                        // timeout's business.
                        self.timer.set(Instant::now() + route.timeout);
                        // The client's head for the response goes into
                        // `wbuf` while the upstream's is parsed.
                        let client = ClientSide {
                            http10: f.http10,
                            keep: f.client_keep,
                            draining: self.closing(),
                        };
                        let wbuf = &mut self.wbuf;
                        conn.read_head(&mut self.timer, |resp, fields| {
                            let framing = fields.response_framing(f.method, resp.code.unwrap_or(0));
                            let persist =
                                rewrite::response_head(wbuf, resp, fields, framing, client);
                            (persist, framing)
                        })
                        .await
                        .map_err(Upstream::from)
                    }
                    Err(e) => Err(e),
                };
                match r {
                    Err(Upstream::Closed) if conn.reused && fresh_retry => {
                        fresh_retry = false;
                        match Box::pin(UpstreamConn::connect(
                            conn.addr,
                            conn.tls.clone().as_ref(),
                            CONNECT_TIMEOUT,
                        ))
                        .await
                        {
                            Ok(c) => conn = c,
                            // The request is safe to repeat (that is why it
                            // is retried): the next backend gets it.
                            Err(ConnectError::Io(_)) if follow => {
                                done.outcome = Outcome::Reroute;
                                return done;
                            }
                            Err(e) if e.is_local() => break Err(Upstream::Local(e.to_string())),
                            Err(e) => break Err(Upstream::Failed(e.to_string())),
                        }
                    }
                    r => break r,
                }
            };
            match result {
                Ok(head) => break (conn, server, in_flight, head),
                Err(Upstream::Client) => return self.fail(done, StatusCode::BAD_REQUEST).await,
                Err(Upstream::ClientTimedOut) => {
                    return self.fail(done, StatusCode::REQUEST_TIMEOUT).await
                }
                Err(Upstream::Local(error)) => {
                    tracing::warn!(server = %server.addr, error, "upstream request failed");
                    return self.fail(done, StatusCode::SERVICE_UNAVAILABLE).await;
                }
                Err(Upstream::TimedOut) => {
                    tracing::warn!(server = %server.addr, timeout = ?route.timeout, "upstream timed out");
                    return self.fail(done, StatusCode::GATEWAY_TIMEOUT).await;
                }
                Err(Upstream::Closed) => {
                    let error = "the upstream closed the connection before responding";
                    server.mark_failed(pool.fail_timeout, error);
                    tracing::warn!(server = %server.addr, error, "upstream request failed");
                    return self.fail(done, StatusCode::BAD_GATEWAY).await;
                }
                Err(Upstream::Failed(error)) => {
                    server.mark_failed(pool.fail_timeout, &error);
                    tracing::warn!(server = %server.addr, error, "upstream request failed");
                    return self.fail(done, StatusCode::BAD_GATEWAY).await;
                }
            }
        };
        drop(server);
        done.status = resp_head.status;
        if resp_head.status == 101 {
            if upgrade.is_none() {
                tracing::warn!(server = %conn.addr, "upstream switched protocols unasked");
                return self.fail(done, StatusCode::BAD_GATEWAY).await;
            }
            if self.stream.write_all(&self.wbuf).await.is_err() {
                done.outcome = Outcome::Close;
                return done;
            }
            let websocket = upgrade.is_some_and(|p| p.eq_ignore_ascii_case(b"websocket"));
            done.outcome = Outcome::Upgraded(Upgraded {
                conn,
                in_flight,
                websocket,
            });
            return done;
        }
        done.outcome = self
            .relay_response(conn, resp_head, persist, f, &mut done.status)
            .await;
        drop(in_flight);
        done
    }

    /// Answers `status` when nothing of a response has been sent, and
    /// closes (the request's body may be half read).
    async fn fail(&mut self, mut done: Forwarding, status: StatusCode) -> Forwarding {
        done.status = status.as_u16();
        let body: &[u8] = match status {
            StatusCode::BAD_GATEWAY => b"bad gateway\n",
            StatusCode::GATEWAY_TIMEOUT => b"gateway timeout\n",
            StatusCode::SERVICE_UNAVAILABLE => b"service unavailable\n",
            StatusCode::REQUEST_TIMEOUT => b"request timeout\n",
            _ => b"bad request\n",
        };
        self.close_with(status, body).await;
        done.outcome = Outcome::Close;
        done
    }

    /// An idle connection of this client connection, else one from the
    /// shared pool, else a new one.
    async fn checkout(
        &mut self,
        addr: SocketAddr,
        tls: Option<&Arc<crate::tls::UpstreamTls>>,
    ) -> Result<UpstreamConn, ConnectError> {
        let now = std::time::Instant::now();
        while let Some(i) = self.local.iter().position(|c| c.is_for(addr, tls)) {
            let mut c = self.local.swap_remove(i);
            if c.usable(now) {
                return Ok(c);
            }
        }
        if let Some(c) = self.ctx.idle.take(addr, tls) {
            return Ok(c);
        }
        Box::pin(UpstreamConn::connect(addr, tls, CONNECT_TIMEOUT)).await
    }

    /// Sends `wbuf` (the head) and the request body (`rest` holds what
    /// the client sent after the head); returns how much of `rest` the body
    /// used. While the body comes, the client's timeout applies
    /// ([`KEEPALIVE_TIMEOUT`] between reads), and bounds the upstream's
    /// reading too.
    async fn send_request(
        &mut self,
        conn: &mut UpstreamConn,
        rest: &[u8],
        f: &Forwarded<'_>,
    ) -> Result<usize, Upstream> {
        let client = ClientBody {
            stream: &mut self.stream,
            copy: &mut self.copy,
            spill: &mut self.rbuf,
            timer: &mut self.timer,
            last_active: &mut self.last_active,
            timeout: KEEPALIVE_TIMEOUT,
            send_continue: f.fields.expect_continue && !f.http10,
        };
        body::send_request(client, &mut conn.stream, &mut self.wbuf, rest, f.framing)
            .await
            .map_err(|e| match e {
                BodyError::ClientTimedOut => Upstream::ClientTimedOut,
                BodyError::UpstreamTimedOut => Upstream::TimedOut,
                BodyError::UpstreamWrite(e) if conn.reused && is_closed(&e) => Upstream::Closed,
                e @ (BodyError::UpstreamWrite(_)
                | BodyError::UpstreamRead(_)
                | BodyError::UpstreamClosed
                | BodyError::UpstreamMalformed { .. }) => Upstream::Failed(e.to_string()),
                BodyError::ClientWrite(_)
                | BodyError::ClientRead(_)
                | BodyError::ClientClosed
                | BodyError::ClientMalformed(_) => Upstream::Client,
            })
    }

    /// Copies the response to the client (its head is in `wbuf`); the
    /// upstream connection goes back to this client connection if it can
    /// carry another request. A chunked body that breaks the coding before
    /// anything was sent to the client becomes a `502` (`status` says so);
    /// once bytes went out, the client connection is closed.
    async fn relay_response(
        &mut self,
        mut conn: UpstreamConn,
        head: ResponseHead,
        (persist, framing): (bool, Framing),
        f: &Forwarded<'_>,
        status: &mut u16,
    ) -> Outcome {
        let upstream_keep = if head.http10 {
            head.fields.keep_alive
        } else {
            !head.fields.close
        };
        let copied = body::copy_response(
            &mut conn.stream,
            &mut conn.buf,
            &mut self.stream,
            &mut self.wbuf,
            framing,
            f.http10,
        )
        .await;
        let complete = match copied {
            Ok(complete) => complete,
            Err(BodyError::UpstreamMalformed { sent_any }) => {
                tracing::warn!(server = %conn.addr, sent_any, "upstream sent a malformed chunked body");
                if !sent_any {
                    *status = 502;
                    self.close_with(StatusCode::BAD_GATEWAY, b"bad gateway\n")
                        .await;
                }
                return Outcome::Close;
            }
            Err(_) => return Outcome::Close,
        };
        // Bytes past the response mean the upstream is out of step.
        if complete && upstream_keep && conn.buf.is_empty() {
            conn.idle();
            if self.local.len() < MAX_LOCAL_IDLE {
                self.local.push(conn);
            } else {
                self.ctx.idle.put([conn]);
            }
        }
        if persist {
            Outcome::KeepAlive
        } else {
            Outcome::Close
        }
    }
}

/// How forwarding went.
struct Forwarding {
    outcome: Outcome,
    /// Bytes of the client's buffer the request used.
    used: usize,
    status: u16,
    server: Option<SocketAddr>,
}

/// What a request gets.
enum Action<'r> {
    /// A response of the proxy's own: status, content type, body.
    Own(StatusCode, &'r [u8], &'r [u8]),
    /// Forwarding along this route to this pool, stripping the prefix or
    /// not.
    Forward(&'r Route, &'r Arc<Pool>, bool),
    /// Forwarding to a front's backend.
    Follow(&'r Route, &'r Arc<crate::front::Follow>),
}

/// Why an exchange with the upstream failed.
enum Upstream {
    /// The client went away or sent a malformed body.
    Client,
    /// The client stopped sending its body.
    ClientTimedOut,
    /// Connecting failed for lack of a local resource (the server is not
    /// at fault).
    Local(String),
    /// No response head within the route's timeout.
    TimedOut,
    /// A reused connection turned out closed before any response.
    Closed,
    /// Anything else (the upstream may have seen the request).
    Failed(String),
}

impl From<ReadHeadError> for Upstream {
    fn from(e: ReadHeadError) -> Self {
        match e {
            ReadHeadError::Closed => Upstream::Closed,
            ReadHeadError::TimedOut => Upstream::TimedOut,
            e => Upstream::Failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The context of listener `web` of a configuration that sends every
    /// path to the upstream at `upstream`.
    fn context(upstream: SocketAddr) -> Arc<HttpContext> {
        let text = format!(
            "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\n\
             [upstreams.app]\nservers = [\"{upstream}\"]\n\n\
             [[routes]]\nlistener = \"web\"\npath_prefix = \"/\"\nupstream = \"app\"\n"
        );
        let config = crate::config::parse(&text, None).unwrap();
        let pools = crate::proxy::build_pools(
            &config,
            &crate::upstream::Registry::default(),
            &std::collections::HashMap::new(),
        );
        let mut tables: HashMap<String, RouteTable> = RouteTable::build_all(&config.routes, &pools);
        let l = &config.listeners[0];
        Arc::new(HttpContext {
            listener: l.name.clone(),
            routes: ArcSwap::from_pointee(tables.remove("web").unwrap()),
            stats: crate::stats::for_listener(l, l.address, baton::RequestMetrics::detached()),
            idle: Arc::new(IdlePool::default()),
            baton: None,
            tls: None,
        })
    }

    /// An upstream on 127.0.0.1 that answers `ok` to each request of one
    /// connection until it closes, and returns the heads it got.
    async fn upstream() -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = up.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            let Ok((mut s, _)) = up.accept().await else {
                return seen;
            };
            loop {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return seen;
                    }
                    head.push(b[0]);
                }
                seen.push(String::from_utf8_lossy(&head).into_owned());
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
        });
        (addr, server)
    }

    /// Serves `requests` on an in-memory client connection to `ctx`, and
    /// returns what the client got once the proxy closed it.
    async fn exchange(ctx: &Arc<HttpContext>, requests: &[u8]) -> Vec<u8> {
        let drain = baton::Drain::new(Duration::from_secs(1));
        let guard = ctx.stats.connection();
        let (mut client, ours) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let serving = tokio::spawn(serve(ours, peer, ctx.clone(), drain.handle(), guard));
        client.write_all(requests).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .unwrap()
            .unwrap();
        got
    }

    /// The engine serves any stream: here an in-memory one, two requests
    /// on one connection to a real upstream on 127.0.0.1.
    #[tokio::test]
    async fn the_loop_serves_an_in_memory_client_stream() {
        let (addr, server) = upstream().await;
        let ctx = context(addr);
        let got = exchange(
            &ctx,
            b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        drop(ctx.idle.take(addr, None));
        let got = String::from_utf8(got).unwrap();
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok\
             HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
        );
        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].starts_with("GET /a HTTP/1.1\r\n"), "{}", seen[0]);
        assert!(
            seen[0].contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[1].starts_with("GET /b HTTP/1.1\r\n"), "{}", seen[1]);
        assert_eq!(ctx.stats.open(), 0);
    }

    /// A `Host` that is not text was forwarded beside the proxy's own
    /// `host` (the upstream saw two); it is refused.
    #[tokio::test]
    async fn a_host_field_that_is_not_text_gets_400() {
        let (addr, server) = upstream().await;
        let ctx = context(addr);
        let got = exchange(
            &ctx,
            b"GET / HTTP/1.1\r\nhost: \xff\r\nconnection: close\r\n\r\n",
        )
        .await;
        drop(ctx.idle.take(addr, None));
        let got = String::from_utf8_lossy(&got).into_owned();
        assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
        // The proxy's own answer: the upstream got nothing.
        server.abort();
    }
}
