//! Upstream connections: TCP streams (or TLS over TCP, for an upstream
//! with `tls = true`) with their read buffers, kept by the client
//! connection that used them, and a shared idle pool.
//!
//! Each client connection keeps the upstream connections it used (one per
//! server, a few at most) in its own task, with no lock and no channel in
//! between: a request is written to the upstream socket and its response
//! read from it by the client connection's task. When a client connection
//! goes away its idle upstream connections move to a shared idle pool
//! ([`IdlePool`], per server), where the next new client connection picks
//! them up, so with a new client connection per request the upstream
//! connections are still reused. A connection the upstream closed while it
//! was idle is noticed at checkout (the socket reads end-of-file without
//! waiting) and discarded; connections idle longer than [`IDLE_TIMEOUT`]
//! are closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::UpstreamTls;

use crate::h1::{self, Fields, Malformed};
use crate::lock;
use crate::timer::Timer;

/// Bound on connecting to an upstream server.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle upstream connections are closed after this long.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per server in the shared pool.
const MAX_SHARED_IDLE: usize = 256;

/// Idle connections a client connection keeps for itself.
pub(crate) const MAX_LOCAL_IDLE: usize = 4;

/// How often, at most, the shared pool looks for closed connections.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Initial size of a connection's read buffer.
pub(crate) const READ_BUF: usize = 8 * 1024;

/// The byte stream of an upstream connection.
#[derive(Debug)]
pub(crate) enum UpStream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpStream::Tcp(s) => s.is_write_vectored(),
            UpStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
impl UpStream {
    /// The TCP socket underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            UpStream::Tcp(s) => s,
            UpStream::Tls(s) => s.get_ref().0,
        }
    }
}

/// One upstream connection.
#[derive(Debug)]
pub(crate) struct UpstreamConn {
    /// The server.
    pub(crate) addr: SocketAddr,
    /// The TLS it speaks (`None`: plain TCP); connections are reused only
    /// for the same server and the same TLS settings.
    pub(crate) tls: Option<Arc<UpstreamTls>>,
    /// The socket.
    pub(crate) stream: UpStream,
    /// Bytes read and not yet used (empty between responses).
    pub(crate) buf: BytesMut,
    /// It has carried a request before.
    pub(crate) reused: bool,
    idle_since: Instant,
}

/// Why connecting to an upstream server failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// This process or host ran out of something (see
    /// [`is_local_error`]): the server is not at fault.
    #[error("connect: {0} (a local resource ran out; the server is not marked down)")]
    Local(std::io::Error),
    /// The connection was refused, reset, unreachable…
    #[error("connect: {0}")]
    Io(std::io::Error),
    /// No answer within the connect timeout.
    #[error("connect timed out")]
    TimedOut,
    /// The TLS handshake failed (the certificate did not verify, say).
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
}

impl ConnectError {
    /// Whether the failure is local (not a sign the server is down).
    pub(crate) fn is_local(&self) -> bool {
        matches!(self, ConnectError::Local(_))
    }
}

/// Whether `e` says a local resource ran out rather than that the peer
/// failed: file descriptors (`EMFILE`, `ENFILE`), buffer or kernel memory
/// (`ENOBUFS`, `ENOMEM`), or ephemeral ports (`EADDRNOTAVAIL`,
/// `EADDRINUSE`). Such an error says nothing about the upstream server.
pub(crate) fn is_local_error(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    Errno::from_io_error(e).is_some_and(|n| {
        [
            Errno::MFILE,
            Errno::NFILE,
            Errno::NOBUFS,
            Errno::NOMEM,
            Errno::ADDRNOTAVAIL,
            Errno::ADDRINUSE,
        ]
        .contains(&n)
    })
}

/// What the proxy keeps of an upstream response head once it is read (the
/// head's bytes are consumed: whatever needs its fields is done while it is
/// parsed, see [`UpstreamConn::read_head`]).
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    pub(crate) http10: bool,
    pub(crate) fields: Fields,
}

/// Why no response head could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadHeadError {
    /// The connection closed (or was reset) before a byte of response.
    #[error("the upstream closed the connection before responding")]
    Closed,
    /// Not within the deadline.
    #[error("no response head in time")]
    TimedOut,
    /// The head does not parse.
    #[error("response: {0}")]
    Parse(httparse::Error),
    /// The head is not acceptable.
    #[error("response: {0}")]
    Malformed(Malformed),
    /// The connection closed in the middle of the head.
    #[error("response cut short")]
    CutShort,
    /// Reading failed.
    #[error("read: {0}")]
    Io(std::io::Error),
}

/// Whether `e` says the peer closed the connection.
pub(crate) fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof
    )
}

impl UpstreamConn {
    /// Reads the next response head, skipping `100 Continue` and the other
    /// interim responses (not `101`), by the time `timer` fires; what
    /// follows the head stays in `buf`. `on_head` sees the parsed head and
    /// its fields (to write the client's head from it) before its bytes are
    /// consumed, so the head is parsed once.
    pub(crate) async fn read_head<T>(
        &mut self,
        timer: &mut Timer,
        mut on_head: impl FnMut(&httparse::Response<'_, '_>, &Fields) -> T,
    ) -> Result<(ResponseHead, T), ReadHeadError> {
        let mut got_any = false;
        loop {
            if !self.buf.is_empty() {
                let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
                    h1::MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut []);
                let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                    &mut resp,
                    &self.buf,
                    &mut headers,
                );
                match parsed {
                    Ok(httparse::Status::Complete(n)) => {
                        let status = resp.code.unwrap_or(0);
                        if (100..200).contains(&status) && status != 101 {
                            self.buf.advance(n);
                            continue;
                        }
                        let fields = Fields::of(resp.headers).map_err(ReadHeadError::Malformed)?;
                        let http10 = resp.version == Some(0);
                        let made = on_head(&resp, &fields);
                        self.buf.advance(n);
                        let head = ResponseHead {
                            status,
                            http10,
                            fields,
                        };
                        return Ok((head, made));
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() <= h1::MAX_HEAD => {}
                    Ok(httparse::Status::Partial) => {
                        return Err(ReadHeadError::Malformed(Malformed::TooLarge))
                    }
                    Err(e) => return Err(ReadHeadError::Parse(e)),
                }
            }
            self.buf.reserve(READ_BUF);
            let r = tokio::select! {
                r = self.stream.read_buf(&mut self.buf) => r,
                _ = timer.fired() => return Err(ReadHeadError::TimedOut),
            };
            match r {
                Ok(0) if !got_any => return Err(ReadHeadError::Closed),
                Ok(0) => return Err(ReadHeadError::CutShort),
                Err(e) if !got_any && is_closed(&e) => return Err(ReadHeadError::Closed),
                Err(e) => return Err(ReadHeadError::Io(e)),
                Ok(_) => got_any = true,
            }
        }
    }

    /// Connects to `addr` (`TCP_NODELAY`), with a TLS handshake if `tls`
    /// says so, both bounded by `connect_timeout`.
    pub(crate) async fn connect(
        addr: SocketAddr,
        tls: Option<&Arc<UpstreamTls>>,
        connect_timeout: Duration,
    ) -> Result<Self, ConnectError> {
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) if is_local_error(&e) => return Err(ConnectError::Local(e)),
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Err(_) => return Err(ConnectError::TimedOut),
        };
        let _ = stream.set_nodelay(true);
        let stream = match tls {
            None => UpStream::Tcp(stream),
            Some(t) => match tokio::time::timeout_at(deadline, t.connect(stream)).await {
                Ok(Ok(s)) => UpStream::Tls(Box::new(s)),
                Ok(Err(e)) => return Err(ConnectError::Tls(e)),
                Err(_) => return Err(ConnectError::TimedOut),
            },
        };
        Ok(UpstreamConn {
            addr,
            tls: tls.cloned(),
            stream,
            buf: BytesMut::with_capacity(READ_BUF),
            reused: false,
            idle_since: Instant::now(),
        })
    }

    /// Marks the connection idle (its response has been read whole).
    pub(crate) fn idle(&mut self) {
        self.reused = true;
        self.idle_since = Instant::now();
    }

    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.idle_since) >= IDLE_TIMEOUT
    }

    /// Whether the idle connection can carry a request: not expired, not
    /// closed by the upstream, and with nothing unexpected to read. Never
    /// waits (the socket is only read if the reactor has seen it
    /// readable).
    pub(crate) fn usable(&mut self, now: Instant) -> bool {
        if self.expired(now) || !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        match &mut self.stream {
            UpStream::Tcp(s) => match s.try_read(&mut probe) {
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                // End of file (closed), or bytes nobody asked for.
                Ok(_) => false,
            },
            // Through TLS, without waiting: a session ticket the server
            // sent is taken in (nothing to read); a close_notify or the
            // socket's end reads as end of file.
            UpStream::Tls(s) => s.read(&mut probe).now_or_never().is_none(),
        }
    }

    /// Whether this connection is to `addr` with the TLS settings `tls`.
    pub(crate) fn is_for(&self, addr: SocketAddr, tls: Option<&Arc<UpstreamTls>>) -> bool {
        self.addr == addr
            && match (&self.tls, tls) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

/// Idle upstream connections left by client connections that went away,
/// per server. Shared by every listener of the process; with
/// `runtime = "per-worker"`, one list per worker (an upstream connection
/// belongs to the reactor of the worker that opened it).
#[derive(Debug)]
pub(crate) struct IdlePool {
    lists: Box<[Mutex<Shared>]>,
}

#[derive(Debug)]
struct Shared {
    idle: HashMap<SocketAddr, Vec<UpstreamConn>>,
    last_sweep: Instant,
}

impl Default for IdlePool {
    fn default() -> Self {
        IdlePool::per_worker(1)
    }
}

impl IdlePool {
    /// A pool with one list for each of `workers` workers (at least one).
    pub(crate) fn per_worker(workers: usize) -> IdlePool {
        IdlePool {
            lists: (0..workers.max(1))
                .map(|_| {
                    Mutex::new(Shared {
                        idle: HashMap::new(),
                        last_sweep: Instant::now(),
                    })
                })
                .collect(),
        }
    }

    /// The list of the worker this thread is.
    fn mine(&self) -> &Mutex<Shared> {
        let i = crate::workers::index() % self.lists.len();
        &self.lists[i]
    }

    /// A usable idle connection to `addr` with the TLS settings `tls`, if
    /// there is one (the most recently used first).
    pub(crate) fn take(
        &self,
        addr: SocketAddr,
        tls: Option<&Arc<UpstreamTls>>,
    ) -> Option<UpstreamConn> {
        let now = Instant::now();
        let mut dropped = Vec::new();
        let mut shared = lock(self.mine());
        let list = shared.idle.get_mut(&addr)?;
        let found = loop {
            let Some(i) = list.iter().rposition(|c| c.is_for(addr, tls)) else {
                break None;
            };
            let mut c = list.remove(i);
            if c.usable(now) {
                break Some(c);
            }
            dropped.push(c);
        };
        drop(shared);
        drop(dropped);
        found
    }

    /// Keeps idle connections for the next client connection.
    pub(crate) fn put(&self, conns: impl IntoIterator<Item = UpstreamConn>) {
        let now = Instant::now();
        let mut dropped = Vec::new();
        let mut shared = lock(self.mine());
        if now.saturating_duration_since(shared.last_sweep) >= SWEEP_EVERY {
            shared.last_sweep = now;
            for list in shared.idle.values_mut() {
                let mut i = 0;
                while i < list.len() {
                    if list[i].usable(now) {
                        i += 1;
                    } else {
                        dropped.push(list.swap_remove(i));
                    }
                }
            }
            shared.idle.retain(|_, l| !l.is_empty());
        }
        for c in conns {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn local_resource_errors_are_told_apart() {
        use rustix::io::Errno;
        for local in [
            Errno::MFILE,
            Errno::NFILE,
            Errno::NOBUFS,
            Errno::NOMEM,
            Errno::ADDRNOTAVAIL,
        ] {
            let e = std::io::Error::from_raw_os_error(local.raw_os_error());
            assert!(is_local_error(&e), "{e}");
        }
        for remote in [
            Errno::CONNREFUSED,
            Errno::CONNRESET,
            Errno::HOSTUNREACH,
            Errno::TIMEDOUT,
        ] {
            let e = std::io::Error::from_raw_os_error(remote.raw_os_error());
            assert!(!is_local_error(&e), "{e}");
        }
        assert!(!is_local_error(&std::io::Error::other("not an errno")));
    }

    #[tokio::test]
    async fn the_pool_hands_out_live_connections_only() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let pool = IdlePool::default();
        let mut a = UpstreamConn::connect(addr, None, Duration::from_secs(5))
            .await
            .unwrap();
        let (_sa, _) = l.accept().await.unwrap();
        let mut b = UpstreamConn::connect(addr, None, Duration::from_secs(5))
            .await
            .unwrap();
        let (sb, _) = l.accept().await.unwrap();
        // The upstream closes b; once the reactor has seen it, b is unusable.
        drop(sb);
        tokio::time::timeout(Duration::from_secs(5), b.stream.tcp().readable())
            .await
            .unwrap()
            .unwrap();
        assert!(!b.usable(Instant::now()));
        assert!(a.usable(Instant::now()));
        let a_local = a.stream.tcp().local_addr().unwrap();
        // b comes out first (last in) and is discarded; then a.
        pool.put([a, b]);
        let taken = pool.take(addr, None).expect("a is usable");
        assert_eq!(taken.stream.tcp().local_addr().unwrap(), a_local);
        assert!(pool.take(addr, None).is_none());
    }

    #[tokio::test]
    async fn unexpected_bytes_make_a_connection_unusable() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = UpstreamConn::connect(addr, None, Duration::from_secs(5))
            .await
            .unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        assert!(c.usable(Instant::now()));
        s.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while c.usable(Instant::now()) {
                c.stream.tcp().readable().await.unwrap();
            }
        })
        .await
        .unwrap();
    }
}
