//! HTTP/2 towards clients (ALPN `h2` on `https` listeners, and h2c with
//! prior knowledge on `http` ones), forwarded to HTTP/1.1 upstreams as
//! nginx does.
//!
//! hyper serves the HTTP/2 connection (frames, flow control, HPACK, the
//! limits below). Each stream is then handed, as an HTTP/1.1 request over
//! an in-memory pipe, to the same engine that serves HTTP/1.1 clients
//! ([`crate::forward::serve`]), with hyper's HTTP/1.1 client writing the
//! request into the pipe and reading the engine's response out of it. So a
//! stream is routed, checked, rewritten, retried, timed out and counted by
//! exactly the code an HTTP/1.1 request goes through, against the route
//! table loaded when the stream starts (a reload applies to the next
//! stream; open connections are not touched).
//!
//! The pipes are keep-alive HTTP/1.1 connections, kept per HTTP/2
//! connection ([`Pipes`]): a stream takes an idle one (or opens one) and
//! gives it back once its response body has been read to the end, so the
//! engine behind it keeps its upstream connections between streams, as it
//! does between the requests of an HTTP/1.1 keep-alive client. Once the
//! connection drains, pipes are no longer shared: each stream gets a new
//! one, which its engine closes after the response.
//!
//! **Drain.** When the listener or the process drains, the connection
//! sends GOAWAY in two steps (hyper's graceful shutdown: first with the
//! highest stream id, then, after a PING round trip, with the last stream
//! it took), lets the streams at or below that id finish, and closes once
//! they have, or when the drain expires. A client retries the streams
//! above the last id on a new connection, as RFC 9113 §6.8 allows: they
//! were never processed.
//!
//! **Idle.** A connection with no stream for [`IDLE_TIMEOUT`] is wound
//! down the same way (nginx's `keepalive_timeout` applies to HTTP/2 too).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::forward::HttpContext;

/// Streams one connection may have open at once (nginx's
/// `http2_max_concurrent_streams` default).
const MAX_STREAMS: u32 = 128;

/// Largest request head, as for HTTP/1.1 ([`crate::h1::MAX_HEAD`]).
const MAX_HEADER_LIST: u32 = crate::h1::MAX_HEAD as u32;

/// A connection with no stream open this long is wound down.
pub(crate) const IDLE_TIMEOUT: Duration = crate::forward::KEEPALIVE_TIMEOUT;

/// An idle pipe is reused for this long (its engine closes it after
/// [`crate::forward::KEEPALIVE_TIMEOUT`] of silence; the margin keeps a
/// stream from racing that close).
const PIPE_REUSE: Duration = Duration::from_secs(50);

/// The in-memory pipe of one stream holds this much in each direction.
const PIPE: usize = 64 * 1024;

/// The response body: the engine's, or a short one of the bridge's own.
type Body = http_body_util::Either<Incoming, Full<Bytes>>;

/// What the streams of one connection share for the idle timeout.
#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn touch(&self) {
        *crate::lock(&self.last) = Instant::now();
    }
}

/// Counts an open stream of a connection (for its idle timeout).
struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one HTTP/2 connection until the client closes it, it is idle
/// for [`IDLE_TIMEOUT`], or the drain winds it down (bounded by the
/// drain's expiry).
pub(crate) async fn serve<S>(
    io: S,
    peer: SocketAddr,
    ctx: Arc<HttpContext>,
    shutdown: baton::Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        open: AtomicUsize::new(0),
        last: Mutex::new(Instant::now()),
    });
    let pipes = Arc::new(Pipes {
        idle: Mutex::new(Vec::new()),
        peer,
        ctx: ctx.clone(),
        shutdown: shutdown.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req| {
            activity.open.fetch_add(1, Ordering::SeqCst);
            let open = Open(activity.clone());
            let pipes = pipes.clone();
            async move {
                let stream = pipes.ctx.stats.stream();
                let (response, pipe) = pipes.stream(req).await;
                Ok::<_, std::convert::Infallible>(response.map(|body| Counted {
                    body,
                    pipe,
                    _open: open,
                    _stream: stream,
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(None);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let wind_down = async {
        loop {
            let idle_since = *crate::lock(&activity.last);
            let wake = idle_since + IDLE_TIMEOUT;
            tokio::select! {
                _ = shutdown.draining() => return "draining",
                _ = tokio::time::sleep_until(wake) => {
                    let quiet = activity.open.load(Ordering::SeqCst) == 0;
                    if quiet && *crate::lock(&activity.last) == idle_since {
                        return "idle";
                    }
                }
            }
        }
    };
    let why = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(listener = %ctx.listener, %peer, error = %e, "HTTP/2 connection ended");
            }
            return;
        }
        why = wind_down => why,
    };
    tracing::debug!(listener = %ctx.listener, %peer, why, "HTTP/2 GOAWAY");
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.expired() => {}
    }
}

/// The client side of one pipe: a keep-alive HTTP/1.1 connection over
/// an in-memory stream to an engine task.
type Pipe = hyper::client::conn::http1::SendRequest<Incoming>;

/// The pipes of one HTTP/2 connection; an idle one serves the next
/// stream. Dropped with the connection: the idle pipes close, and the
/// engines behind them end.
struct Pipes {
    /// Idle pipes, with when each became idle.
    idle: Mutex<Vec<(Pipe, Instant)>>,
    peer: SocketAddr,
    ctx: Arc<HttpContext>,
    shutdown: baton::Shutdown,
}

/// The engine behind a pipe, boxed: the engine can hand an h2c
/// connection to [`serve`], which runs engines, and the box is where that
/// cycle of future types is cut.
fn engine(
    io: tokio::io::DuplexStream,
    peer: SocketAddr,
    ctx: Arc<HttpContext>,
    shutdown: baton::Shutdown,
    guard: crate::stats::ConnGuard,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(crate::forward::serve(io, peer, ctx, shutdown, guard))
}

impl Pipes {
    /// An idle pipe, or a new one (with its engine). Once draining, every
    /// stream gets a new pipe: an idle engine closes its pipe after the idle
    /// grace, and a stream must not race that close.
    async fn take(&self) -> Result<Pipe, hyper::Error> {
        if self.shutdown.is_draining() {
            crate::lock(&self.idle).clear();
        }
        let now = Instant::now();
        loop {
            let Some((pipe, since)) = crate::lock(&self.idle).pop() else {
                break;
            };
            // One near its engine's keep-alive timeout is not taken: the
            // engine may be closing it right now.
            if !pipe.is_closed() && now.saturating_duration_since(since) < PIPE_REUSE {
                return Ok(pipe);
            }
        }
        let (ours, theirs) = tokio::io::duplex(PIPE);
        // The stream is counted by its response body; the pipe's engine is
        // not another connection.
        let guard = self.ctx.stats.uncounted();
        self.shutdown.spawn(engine(
            theirs,
            self.peer,
            self.ctx.clone(),
            self.shutdown.clone(),
            guard,
        ));
        let (pipe, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Incoming>(TokioIo::new(ours))
            .await?;
        self.shutdown.spawn(async move {
            let _ = conn.await;
        });
        Ok(pipe)
    }

    /// Keeps `pipe` for the next stream, unless it is closing.
    fn give_back(&self, pipe: Pipe) {
        if !pipe.is_closed() && !self.shutdown.is_draining() {
            let mut idle = crate::lock(&self.idle);
            if idle.len() < MAX_STREAMS as usize {
                idle.push((pipe, Instant::now()));
            }
        }
    }

    /// Serves one stream through the HTTP/1.1 engine: the response, and
    /// the pipe to give back once its body has been read to the end.
    async fn stream(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> (Response<Body>, Option<(Pipe, Arc<Pipes>)>) {
        let mut req = as_http1(req);
        // A pooled pipe that turns out closed before the request went into
        // it: the request comes back and goes into a new pipe.
        let mut tries = 0;
        let (answer, pipe) = loop {
            tries += 1;
            let mut pipe = match self.take().await {
                Ok(p) => p,
                Err(e) => return (own(StatusCode::BAD_GATEWAY, &format!("{e}")), None),
            };
            if pipe.ready().await.is_err() && tries < 3 {
                continue;
            }
            match pipe.try_send_request(req).await {
                Ok(response) => break (Ok(response), pipe),
                Err(mut e) => match e.take_message() {
                    Some(back) if tries < 3 => req = back,
                    _ => break (Err(e.into_error()), pipe),
                },
            }
        };
        match answer {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_connection_fields(&mut parts.headers);
                let response = Response::from_parts(parts, http_body_util::Either::Left(body));
                (response, Some((pipe, self.clone())))
            }
            Err(e) => {
                tracing::debug!(listener = %self.ctx.listener, peer = %self.peer, error = %e, "HTTP/2 stream not answered");
                (own(StatusCode::BAD_GATEWAY, "bad gateway\n"), None)
            }
        }
    }
}

/// A response body that gives its pipe back once it has been read to the
/// end, and keeps its stream counted open until it is done (dropped).
struct Counted {
    body: Body,
    pipe: Option<(Pipe, Arc<Pipes>)>,
    _open: Open,
    _stream: crate::stats::ConnGuard,
}

impl Counted {
    fn done(&mut self) {
        if let Some((pipe, pipes)) = self.pipe.take() {
            pipes.give_back(pipe);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // A body dropped before its end leaves its pipe mid-response: the
        // pipe closes with it.
        if hyper::body::Body::is_end_stream(&self.body) {
            self.done();
        }
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = baton::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(None) = polled {
            self.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The stream's request as an HTTP/1.1 one: origin-form target and
/// `Host` from `:authority`.
fn as_http1(req: Request<Incoming>) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    if let Some(authority) = parts.uri.authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            // RFC 9113 §8.3.1: `:authority` wins over a `Host` field.
            parts.headers.insert(header::HOST, host);
        }
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if let Ok(uri) = target.parse() {
        parts.uri = uri;
    }
    parts.version = http::Version::HTTP_11;
    Request::from_parts(parts, body)
}

/// HTTP/2 has no connection-specific fields (RFC 9113 §8.2.2): the ones
/// the engine's HTTP/1.1 response carries are dropped.
fn strip_connection_fields(h: &mut http::HeaderMap) {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(name);
    }
}

/// A short response of the bridge's own.
fn own(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(http_body_util::Either::Right(Full::new(Bytes::from(
        text.to_owned(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether a TLS connection agreed on HTTP/2.
pub(crate) fn negotiated<IO>(tls: &baton::tls::TlsStream<IO>) -> bool {
    tls.get_ref().1.alpn_protocol() == Some(b"h2")
}

pin_project_lite::pin_project! {
    /// A stream that first reads out `prefix` (bytes read already, such
    /// as an h2c client's preface), then reads and writes `inner`.
    pub(crate) struct Prefixed<S> {
        prefix: Bytes,
        #[pin]
        inner: S,
    }
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
