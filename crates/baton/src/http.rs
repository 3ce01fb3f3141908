//! Serving HTTP/1.1 with hyper (or axum) and draining without a race.
//!
//! [`serve`] accepts until draining begins, then:
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

use crate::drain::Shutdown;
use crate::error::BoxError;

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
        shutdown.spawn(serve_connection(io, svc, handle));
    }
    // Stop accepting: this generation's listening fd closes here.
    drop(listener);
    tracing::debug!("stopped accepting");
    Ok(())
}

/// Serves one connection with the keep-alive wind-down. Exposed for servers
/// with their own accept loop.
pub async fn serve_connection<I, S, B>(io: I, service: S, shutdown: Shutdown)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
    };
    let svc = CloseWhenDraining {
        inner: TowerToHyperService::new(service),
        shutdown: shutdown.clone(),
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);

    tokio::select! {
        r = conn.as_mut() => { log_conn(r); return; }
        _ = shutdown.draining() => {}
    }
    // Draining: requests now get `Connection: close`. Close only once the
    // client has been silent for the idle grace.
    let grace = shutdown.idle_grace();
    loop {
        let idle = activity.idle_for();
        if idle >= grace {
            conn.as_mut().graceful_shutdown();
            break;
        }
        tokio::select! {
            r = conn.as_mut() => { log_conn(r); return; }
            _ = tokio::time::sleep(grace - idle) => {}
            _ = shutdown.expired() => return,
        }
    }
    tokio::select! {
        r = conn.as_mut() => log_conn(r),
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
    /// An IO that records when bytes were last read.
    struct Tracked<I> {
        #[pin]
        inner: I,
        activity: Arc<Activity>,
    }
}

impl<I: AsyncRead> AsyncRead for Tracked<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
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
        self.project().inner.poll_shutdown(cx)
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
#[derive(Clone)]
struct CloseWhenDraining<S> {
    inner: S,
    shutdown: Shutdown,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for CloseWhenDraining<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = CloseWhenDrainingFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        CloseWhenDrainingFuture {
            inner: self.inner.call(req),
            draining: self.shutdown.draining_token().clone(),
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
    }
}

impl<F, B, E> Future for CloseWhenDrainingFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = match this.inner.poll(cx) {
            Poll::Ready(Ok(resp)) => resp,
            other => return other,
        };
        // Checked when the response is ready, not when the request came in:
        // a request that was in flight when draining began also closes its
        // connection.
        if this.draining.is_cancelled() && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(resp))
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
