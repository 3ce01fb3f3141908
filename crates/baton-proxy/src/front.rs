//! The proxy's HTTP engine in front of one backend that changes: what
//! `baton run --http` serves its clients with.
//!
//! A [`Front`] serves client connections with the same HTTP/1.x engine as a
//! `baton proxy` listener (request smuggling checks, keep-alive, pipelining,
//! WebSocket, the race-free wind-down when draining) and forwards every
//! request to its current backend, one `IP:PORT`. [`Front::switch`] moves
//! new requests to another backend at once; requests already forwarded
//! finish on the old one, and [`Backend::in_flight`] tells when it has none
//! left. A switch never closes a client connection, so a client that keeps
//! its connection open across any number of switches never sees one.
//!
//! While there is no backend, or the current one refuses connections (it
//! died and its replacement is starting), or a request counted itself in
//! flight on a backend that was switched away from just then, the request
//! waits for the next backend, up to the wait given to [`Front::new`], and
//! is then answered `503`. Nothing has been sent anywhere at that point, so
//! the wait is safe for any request, a `POST` with a body too.
//!
//! # Example
//!
//! ```no_run
//! # async fn run(listener: tokio::net::TcpListener, child: std::net::SocketAddr,
//! #              next_child: std::net::SocketAddr) {
//! use std::time::Duration;
//! use baton_proxy::front::Front;
//!
//! let front = Front::new("web", listener.local_addr().unwrap(), Duration::from_secs(30));
//! front.switch(Some(child));
//! let drain = baton::Drain::new(Duration::from_secs(1));
//! let serving = front.clone();
//! let handle = drain.handle();
//! tokio::spawn(async move {
//!     while let Ok((io, peer)) = listener.accept().await {
//!         handle.spawn(serving.serve(io, peer, handle.clone()));
//!     }
//! });
//! // Later: a new child is ready. New requests go there; once the old
//! // child has nothing in flight, it can be stopped.
//! if let Some(old) = front.switch(Some(next_child)) {
//!     while old.in_flight() > 0 {
//!         tokio::time::sleep(Duration::from_millis(10)).await;
//!     }
//! }
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::Protocol;
use crate::conn::IdlePool;
use crate::forward::{self, HttpContext};
use crate::router::RouteTable;
use crate::stats::ListenerStats;
use crate::upstream::{Pool, ServerState};

/// Bound on a backend's response head (as a proxy route's default).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a front's route follows: the current backend, as a one-server pool.
#[derive(Debug)]
pub(crate) struct Follow {
    /// The current backend (`None`: none now).
    pub(crate) current: watch::Sender<Option<Arc<Pool>>>,
    /// How long a request waits for a backend.
    pub(crate) wait: Duration,
}

/// HTTP/1.x in front of one backend at a time. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Front {
    ctx: Arc<HttpContext>,
    follow: Arc<Follow>,
    /// The current backend's state (for [`switch`](Self::switch) to hand
    /// back).
    backend: Arc<Mutex<Option<Arc<ServerState>>>>,
}

/// A backend a [`Front`] forwarded to, handed back by
/// [`Front::switch`] when the front moved on.
#[derive(Debug, Clone)]
pub struct Backend(Arc<ServerState>);

impl Backend {
    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// Requests (and upgraded connections, such as WebSockets) still in
    /// flight to it. Once the front has switched away, this only goes down:
    /// at 0, stopping the backend cuts nothing off.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
}

impl Front {
    /// A front for the listener `name` bound at `bound` (both for logs and
    /// counters), with no backend yet. A request waits up to `wait` for a
    /// backend that takes it.
    pub fn new(name: &str, bound: SocketAddr, wait: Duration) -> Front {
        let follow = Arc::new(Follow {
            current: watch::channel(None).0,
            wait,
        });
        let table = RouteTable::follow(follow.clone(), RESPONSE_TIMEOUT);
        let ctx = Arc::new(HttpContext {
            listener: name.to_owned(),
            routes: ArcSwap::from_pointee(table),
            stats: Arc::new(ListenerStats::new(
                name,
                Protocol::Http,
                bound,
                baton::RequestMetrics::detached(),
            )),
            idle: Arc::new(IdlePool::default()),
            baton: None,
            tls: None,
        });
        Front {
            ctx,
            follow,
            backend: Arc::new(Mutex::new(None)),
        }
    }

    /// Sends new requests to `to` from now on (`None`: they wait for the
    /// next backend). Returns the backend it forwarded to before, which no
    /// request goes to any more; its requests in flight finish there.
    pub fn switch(&self, to: Option<SocketAddr>) -> Option<Backend> {
        let mut backend = crate::lock(&self.backend);
        if backend.as_ref().map(|b| b.addr) == to {
            return None;
        }
        let state = to.map(ServerState::standalone);
        let pool = state
            .clone()
            .map(|s| Arc::new(Pool::single(&self.ctx.listener, s)));
        // The new backend first, then the old one retired: a request that
        // still picked the old one sees it retired and comes back here.
        self.follow.current.send_replace(pool);
        let old = std::mem::replace(&mut *backend, state);
        drop(backend);
        old.map(|old| {
            old.retire();
            tracing::debug!(listener = %self.ctx.listener, from = %old.addr, to = ?to, "front switched backend");
            Backend(old)
        })
    }

    /// Serves one client connection until it closes, or the drain `shutdown`
    /// belongs to winds it down or expires (the same wind-down as a proxy
    /// listener's).
    pub fn serve(
        &self,
        io: TcpStream,
        peer: SocketAddr,
        shutdown: baton::Shutdown,
    ) -> impl Future<Output = ()> + Send + 'static {
        let _ = io.set_nodelay(true);
        let guard = self.ctx.stats.connection();
        // Boxed: a task moves its future several times as it is spawned
        // and finished, and this one is kilobytes (its buffers).
        Box::pin(forward::serve(io, peer, self.ctx.clone(), shutdown, guard))
    }

    /// Client connections open now (upgraded ones too).
    pub fn open(&self) -> usize {
        self.ctx.stats.open()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend on 127.0.0.1 answering each request with its `name`, on
    /// keep-alive connections, until the task is aborted.
    async fn backend(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1024];
                    loop {
                        let n = s.read(&mut b).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&b[..n]);
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            head.drain(..end + 4);
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                                name.len()
                            );
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, task)
    }

    /// Sends a GET on `c` and returns the response body.
    async fn get(c: &mut TcpStream) -> String {
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let mut b = [0u8; 1024];
        loop {
            let n = c.read(&mut b).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&b[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if buf.len() >= end + 4 + len {
                    return text[end + 4..end + 4 + len].to_owned();
                }
            }
        }
    }

    async fn serving(wait: Duration) -> (Front, SocketAddr, baton::Drain) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let front = Front::new("web", addr, wait);
        let drain = baton::Drain::new(Duration::from_secs(1));
        let handle = drain.handle();
        let serving = front.clone();
        tokio::spawn(async move {
            while let Ok((io, peer)) = l.accept().await {
                handle.spawn(serving.serve(io, peer, handle.clone()));
            }
        });
        (front, addr, drain)
    }

    /// One client connection across two switches: each request goes to the
    /// backend current when it was sent, and the connection stays open.
    #[tokio::test]
    async fn a_switch_moves_requests_without_closing_the_client() {
        let (a, _ta) = backend("a").await;
        let (b, _tb) = backend("b").await;
        let (front, addr, _drain) = serving(Duration::from_secs(5)).await;
        assert!(front.switch(Some(a)).is_none());
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(get(&mut c).await, "a");
        let old = front.switch(Some(b)).expect("a was the backend");
        assert_eq!(old.addr(), a);
        assert_eq!(old.in_flight(), 0);
        assert_eq!(get(&mut c).await, "b");
        assert!(front.switch(Some(b)).is_none(), "same backend: no switch");
        let old = front.switch(Some(a)).unwrap();
        assert_eq!(old.addr(), b);
        assert_eq!(get(&mut c).await, "a");
        assert_eq!(front.open(), 1);
    }

    /// With no backend, a request waits for one; a backend that refuses
    /// (gone) makes it wait for the next; past the wait it gets 503.
    #[tokio::test]
    async fn requests_wait_for_a_backend_and_get_503_past_the_wait() {
        let (front, addr, _drain) = serving(Duration::from_secs(10)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (a, _ta) = backend("a").await;
        let waiting = tokio::spawn(async move {
            let body = get(&mut c).await;
            (body, c)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "answered without a backend");
        front.switch(Some(a));
        let (body, mut c) = waiting.await.unwrap();
        assert_eq!(body, "a");

        // A backend that refuses connections: a port nobody listens on.
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        front.switch(Some(gone));
        let (b, _tb) = backend("b").await;
        let waiting = tokio::spawn(async move { get(&mut c).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        front.switch(Some(b));
        assert_eq!(waiting.await.unwrap(), "b");

        let (short, addr, _d) = serving(Duration::from_millis(200)).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
        drop(short);
    }
}
