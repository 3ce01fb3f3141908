//! HTTP/2 towards clients (ALPN `h2` on `https` listeners), forwarded to
//! HTTP/1.1 upstreams as nginx does.
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

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
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
    let service = {
        let (ctx, shutdown, activity) = (ctx.clone(), shutdown.clone(), activity.clone());
        hyper::service::service_fn(move |req| {
            activity.open.fetch_add(1, Ordering::SeqCst);
            let open = Open(activity.clone());
            let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
            async move {
                let (response, work) = stream(req, peer, ctx, shutdown).await;
                Ok::<_, std::convert::Infallible>(response.map(|body| Counted {
                    body,
                    work,
                    _open: open,
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

/// The engine serving a stream and the pipe's client side, driven
/// together.
type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A response body that drives the stream's [`Work`] while it is read
/// (the engine is still copying the body into the pipe), and keeps its
/// stream counted open until it is done (dropped). Driving it here rather
/// than in tasks of its own keeps each stream on one task: no wake-up
/// crosses to another worker thread. What is left of the work when the
/// body is dropped (the engine's bookkeeping after the last byte, or a
/// stream the client reset) finishes in a task of its own.
struct Counted {
    body: Body,
    work: Option<Work>,
    _open: Open,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(work);
            }
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
        if let Some(work) = self.work.as_mut() {
            if work.as_mut().poll(cx).is_ready() {
                self.work = None;
            }
        }
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves one stream through the HTTP/1.1 engine: the response head, and
/// the work that goes on producing its body.
async fn stream(
    req: Request<Incoming>,
    peer: SocketAddr,
    ctx: Arc<HttpContext>,
    shutdown: baton::Shutdown,
) -> (Response<Body>, Option<Work>) {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let guard = ctx.stats.stream();
    let engine = crate::forward::serve(theirs, peer, ctx.clone(), shutdown.clone(), guard);
    let (mut sender, conn) = match hyper::client::conn::http1::Builder::new()
        .handshake::<_, Incoming>(TokioIo::new(ours))
        .await
    {
        Ok(c) => c,
        Err(e) => return (own(StatusCode::BAD_GATEWAY, &format!("{e}")), None),
    };
    let mut work: Work = Box::pin(async move {
        let conn = async {
            let _ = conn.await;
        };
        tokio::join!(engine, conn);
    });
    let send = sender.send_request(as_http1(req));
    tokio::pin!(send);
    let (answer, work) = tokio::select! {
        r = &mut send => (r, Some(work)),
        // All done before the head was taken (a short response): nothing
        // is left to drive.
        _ = &mut work => (send.await, None),
    };
    match answer {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_connection_fields(&mut parts.headers);
            let response = Response::from_parts(parts, http_body_util::Either::Left(body));
            (response, work)
        }
        Err(e) => {
            tracing::debug!(listener = %ctx.listener, %peer, error = %e, "HTTP/2 stream not answered");
            (own(StatusCode::BAD_GATEWAY, "bad gateway\n"), None)
        }
    }
}

/// The stream's request as an HTTP/1.1 one: origin-form target, `Host`
/// from `:authority`, and `Connection: close` (one request per pipe).
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
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
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
