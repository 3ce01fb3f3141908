//! Upstream HTTP/1.1 connections, owned by the client connection they serve.
//!
//! A general-purpose pooled client (hyper-util's) runs every upstream
//! connection in a task of its own: each request crosses a channel from the
//! client connection's task to that task and the response crosses back,
//! and each checkout formats a `Uri`, hashes a pool key and takes a lock. A
//! proxy does not need any of that. Here each client connection keeps the
//! upstream connections it used ([`Local`], one per server at most, held by
//! the connection's service) and drives them itself: the hyper `Connection`
//! future of the upstream side is polled inside the client connection's
//! task, while waiting for the response headers and then by the response
//! body ([`UpstreamBody`]) while hyper writes it to the client. Once the
//! body has ended the connection goes back to the client connection for its
//! next request.
//!
//! When a client connection goes away its idle upstream connections move
//! to a shared idle pool ([`IdlePool`], per server), where the next new
//! client connection picks them up: with a new connection per request the
//! upstream connections are still reused. Idle connections closed by the
//! upstream are noticed when they are next polled (on checkout, or by the
//! shared pool's periodic sweep) and discarded; connections idle longer
//! than [`IDLE_TIMEOUT`] are closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::lock;

/// Idle upstream connections are closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per server in the shared pool.
const MAX_SHARED_IDLE: usize = 256;

/// Idle connections a client connection keeps for itself.
const MAX_LOCAL_IDLE: usize = 4;

/// How often, at most, the shared pool looks for closed connections.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The body of a request sent upstream: the client's, or none (a retry
/// never needs one: only body-less requests are retried).
#[derive(Debug)]
pub enum RequestBody {
    /// The client's request body, streamed as it arrives.
    Client(Incoming),
    /// No body.
    Empty,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Client(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(b) => b.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(b) => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

type Driver = http1::Connection<TokioIo<TcpStream>, RequestBody>;

/// Why an attempt on an upstream connection failed.
#[derive(Debug)]
pub enum SendError {
    /// The request never left: it is handed back.
    NotSent(Box<Request<RequestBody>>, hyper::Error),
    /// The request may have reached the upstream.
    Failed(hyper::Error),
}

/// One upstream HTTP/1.1 connection, driven by whoever holds it.
pub struct UpstreamConn {
    addr: SocketAddr,
    sender: http1::SendRequest<RequestBody>,
    driver: Driver,
    /// The driver has finished: the connection is closed.
    done: bool,
    idle_since: Instant,
}

impl std::fmt::Debug for UpstreamConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConn")
            .field("addr", &self.addr)
            .field("done", &self.done)
            .finish()
    }
}

impl UpstreamConn {
    /// Connects to `addr` (`TCP_NODELAY`, bounded by `connect_timeout`).
    pub async fn connect(addr: SocketAddr, connect_timeout: Duration) -> Result<Self, String> {
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) => return Err("connect timed out".to_owned()),
        };
        let _ = stream.set_nodelay(true);
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(UpstreamConn {
            addr,
            sender,
            driver,
            done: false,
            idle_since: Instant::now(),
        })
    }

    /// The server it is connected to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Lets hyper read and write on the connection.
    fn poll_driver(&mut self, cx: &mut Context<'_>) {
        if !self.done {
            if let Poll::Ready(r) = Pin::new(&mut self.driver).poll(cx) {
                self.done = true;
                if let Err(e) = r {
                    tracing::debug!(server = %self.addr, error = %e, "upstream connection error");
                }
            }
        }
    }

    /// Waits until the connection can take a request; false if it has been
    /// closed (by the upstream, or after an error).
    pub async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            self.poll_driver(cx);
            if self.done {
                return Poll::Ready(false);
            }
            match self.sender.poll_ready(cx) {
                Poll::Ready(r) => Poll::Ready(r.is_ok()),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Sends `req` and waits for the response headers, driving the
    /// connection meanwhile.
    pub async fn send(
        &mut self,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let fut = self.sender.try_send_request(req);
        let mut fut = std::pin::pin!(fut);
        let r = std::future::poll_fn(|cx| {
            self.poll_driver(cx);
            fut.as_mut().poll(cx)
        })
        .await;
        r.map_err(|mut e| match e.take_message() {
            Some(req) => SendError::NotSent(Box::new(req), e.into_error()),
            None => SendError::Failed(e.into_error()),
        })
    }

    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.idle_since) >= IDLE_TIMEOUT
    }

    /// Whether the connection has been closed, noticed without waiting.
    fn closed_now(&mut self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        self.poll_driver(&mut cx);
        self.done || self.sender.is_closed()
    }
}

/// Idle upstream connections left by client connections that went away,
/// per server. Shared by every listener of the process.
#[derive(Debug)]
pub struct IdlePool {
    inner: Mutex<Shared>,
}

#[derive(Debug)]
struct Shared {
    idle: HashMap<SocketAddr, Vec<UpstreamConn>>,
    last_sweep: Instant,
}

impl Default for IdlePool {
    fn default() -> Self {
        IdlePool {
            inner: Mutex::new(Shared {
                idle: HashMap::new(),
                last_sweep: Instant::now(),
            }),
        }
    }
}

impl IdlePool {
    /// An idle connection to `addr` that has not expired, if there is one.
    /// (It may still turn out closed: check [`UpstreamConn::ready`].)
    pub fn take(&self, addr: SocketAddr) -> Option<UpstreamConn> {
        let now = Instant::now();
        let mut shared = lock(&self.inner);
        let list = shared.idle.get_mut(&addr)?;
        while let Some(c) = list.pop() {
            if !c.expired(now) {
                return Some(c);
            }
        }
        None
    }

    /// Keeps idle connections for the next client connection.
    pub fn put(&self, conns: impl IntoIterator<Item = UpstreamConn>) {
        let now = Instant::now();
        let mut dropped = Vec::new();
        let mut shared = lock(&self.inner);
        if now.saturating_duration_since(shared.last_sweep) >= SWEEP_EVERY {
            shared.last_sweep = now;
            for list in shared.idle.values_mut() {
                let mut i = 0;
                while i < list.len() {
                    if list[i].expired(now) || list[i].closed_now() {
                        dropped.push(list.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            shared.idle.retain(|_, l| !l.is_empty());
        }
        for c in conns {
            if c.done {
                dropped.push(c);
                continue;
            }
            let list = shared.idle.entry(c.addr).or_default();
            if list.len() < MAX_SHARED_IDLE {
                list.push(c);
            } else {
                dropped.push(c);
            }
        }
        drop(shared);
        // Closing sockets outside the lock.
        drop(dropped);
    }
}

/// The idle upstream connections of one client connection.
#[derive(Debug, Default)]
pub struct Local {
    idle: Mutex<Vec<UpstreamConn>>,
}

impl Local {
    /// Its idle connection to `addr`, if any.
    pub fn take(&self, addr: SocketAddr) -> Option<UpstreamConn> {
        let mut idle = lock(&self.idle);
        let i = idle.iter().position(|c| c.addr == addr)?;
        Some(idle.swap_remove(i))
    }

    /// Keeps `conn` for the next request; returns what does not fit.
    fn put(&self, mut conn: UpstreamConn) -> Option<UpstreamConn> {
        if conn.done {
            return None;
        }
        conn.idle_since = Instant::now();
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_LOCAL_IDLE {
            idle.push(conn);
            None
        } else {
            Some(conn)
        }
    }

    /// Everything it holds (when the client connection goes away).
    pub fn drain(&self) -> Vec<UpstreamConn> {
        std::mem::take(&mut *lock(&self.idle))
    }
}

/// Where a connection goes once its response has been sent.
pub trait Home: Send + Sync + 'static {
    /// Takes back an idle connection.
    fn release(&self, conn: UpstreamConn);
}

/// An upstream response body that drives its connection while hyper writes
/// it to the client, and hands the connection back once it has ended.
pub struct UpstreamBody<H: Home> {
    body: Incoming,
    conn: Option<UpstreamConn>,
    home: std::sync::Arc<H>,
}

impl<H: Home> std::fmt::Debug for UpstreamBody<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("conn", &self.conn)
            .finish()
    }
}

impl<H: Home> UpstreamBody<H> {
    /// `body`, read from `conn`, which goes back to `home` at the end.
    pub fn new(body: Incoming, conn: UpstreamConn, home: std::sync::Arc<H>) -> Self {
        UpstreamBody {
            body,
            conn: Some(conn),
            home,
        }
    }

    fn release(&mut self) {
        if let Some(c) = self.conn.take() {
            self.home.release(c);
        }
    }
}

impl<H: Home> HttpBody for UpstreamBody<H> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(c) = this.conn.as_mut() {
            c.poll_driver(cx);
        }
        let r = Pin::new(&mut this.body).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.release(),
            // The connection is in an unknown state: close it.
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<H: Home> Drop for UpstreamBody<H> {
    fn drop(&mut self) {
        // A body hyper did not need to read (HEAD, 204, 304, or one known to
        // be empty) leaves the connection reusable; one dropped half-read
        // (the client went away) does not, and closing is the way out.
        if self.conn.is_some() && self.body.is_end_stream() {
            self.release();
        }
    }
}

/// Takes back an idle connection for a client connection's [`Local`]; what
/// does not fit goes to the shared [`IdlePool`]. For [`Home`]
/// implementations.
pub fn keep(local: &Local, pool: &IdlePool, conn: UpstreamConn) {
    if let Some(extra) = local.put(conn) {
        pool.put([extra]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers every request on a connection with `body`; counts connections.
    async fn upstream(body: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            s.write_all(resp.as_bytes()).await.unwrap();
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    #[derive(Default)]
    struct Returned(Mutex<Vec<UpstreamConn>>);

    impl Home for Returned {
        fn release(&self, conn: UpstreamConn) {
            lock(&self.0).push(conn);
        }
    }

    fn get() -> Request<RequestBody> {
        let mut r = Request::new(RequestBody::Empty);
        r.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("x"));
        r
    }

    #[tokio::test]
    async fn a_connection_comes_back_once_its_body_has_ended_and_is_reused() {
        let (addr, conns) = upstream("hello").await;
        let home = Arc::new(Returned::default());
        let mut conn = UpstreamConn::connect(addr, Duration::from_secs(5))
            .await
            .unwrap();
        for _ in 0..3 {
            assert!(conn.ready().await);
            let resp = conn.send(get()).await.unwrap();
            let body = UpstreamBody::new(resp.into_body(), conn, home.clone());
            let bytes = body.collect().await.unwrap().to_bytes();
            assert_eq!(&bytes[..], b"hello");
            conn = lock(&home.0).pop().expect("the connection came back");
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);

        // Through the shared pool, as when a client connection goes away.
        let pool = IdlePool::default();
        pool.put([conn]);
        let mut again = pool.take(addr).expect("kept idle");
        assert!(pool.take(addr).is_none());
        assert!(again.ready().await);
        assert_eq!(again.send(get()).await.unwrap().status(), 200);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_closes_its_connection() {
        let (addr, _) = upstream("hello").await;
        let home = Arc::new(Returned::default());
        let mut conn = UpstreamConn::connect(addr, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(conn.ready().await);
        // Unread: the connection may still carry the body.
        let resp = conn.send(get()).await.unwrap();
        drop(UpstreamBody::new(resp.into_body(), conn, home.clone()));
        assert!(lock(&home.0).is_empty());
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_ready() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut conn = UpstreamConn::connect(addr, Duration::from_secs(5))
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        drop(s);
        tokio::time::timeout(Duration::from_secs(5), async {
            // The close is noticed at the latest once the event is in.
            while conn.ready().await {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
    }
}
