//! HTTP/2 load over TLS: each client holds one connection with several
//! streams in flight, and after a GOAWAY retries on a new connection only
//! the streams the server says it never processed (RFC 9113 §6.8: those
//! above the last stream id, refused, or never sent), as a browser or a
//! gRPC client does. Every other error is a failed request. Bounded in
//! count of clients and in time.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;

/// What an HTTP/2 load run saw.
#[derive(Debug, Default, Clone)]
pub struct H2Report {
    /// Requests answered with 200.
    pub ok: u64,
    /// Failed requests.
    pub failed: u64,
    /// What failed (first 50).
    pub failures: Vec<String>,
    /// Requests retried on a new connection because the server had not
    /// processed them (GOAWAY above the last stream id, refused, not sent).
    pub retried: u64,
    /// Connections opened.
    pub connects: u64,
}

#[derive(Default)]
struct Shared {
    ok: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    connects: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// HTTP/2 clients running until stopped (or `max_duration`).
pub struct H2Load {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for H2Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("H2Load")
    }
}

impl H2Load {
    /// `clients` connections to `addr` (SNI and `:authority` `name`), each
    /// with `streams` requests for `path` in flight at a time; over TLS
    /// with `config`, else h2c with prior knowledge.
    pub fn start(
        addr: SocketAddr,
        name: &str,
        config: impl Into<Option<Arc<rustls::ClientConfig>>>,
        clients: usize,
        streams: usize,
        path: &str,
        max_duration: Duration,
    ) -> H2Load {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let deadline = Instant::now() + max_duration;
        let config = h2_config(config.into());
        let (name, path) = (name.to_owned(), path.to_owned());
        let thread = {
            let (stop, shared) = (stop.clone(), shared.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    for _ in 0..clients {
                        let c = Client {
                            addr,
                            name: name.clone(),
                            path: path.clone(),
                            config: config.clone(),
                            stop: stop.clone(),
                            shared: shared.clone(),
                            deadline,
                        };
                        tasks.push(tokio::spawn(c.run(streams)));
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            })
        };
        H2Load {
            stop,
            shared,
            thread: Some(thread),
        }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u64 {
        self.shared.connects.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests have succeeded (bounded).
    pub fn wait_for_progress(&self, n: u64, timeout: Duration) {
        let start = self.ok();
        crate::assert_eventually!(
            timeout,
            self.ok() >= start + n,
            "HTTP/2 load made no progress"
        );
    }

    /// Stops the clients and returns what they saw.
    pub fn stop(mut self) -> H2Report {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let s = &self.shared;
        H2Report {
            ok: s.ok.load(Ordering::SeqCst),
            failed: s.failed.load(Ordering::SeqCst),
            failures: s.failures.lock().unwrap().clone(),
            retried: s.retried.load(Ordering::SeqCst),
            connects: s.connects.load(Ordering::SeqCst),
        }
    }
}

impl Drop for H2Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

#[derive(Clone)]
struct Client {
    addr: SocketAddr,
    name: String,
    path: String,
    config: Option<Arc<rustls::ClientConfig>>,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    deadline: Instant,
}

/// How one request ended.
enum Outcome {
    Ok,
    /// Not processed by the server: send it again on a new connection.
    Retry,
    Failed(String),
}

impl Client {
    fn going(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && Instant::now() < self.deadline
    }

    async fn connect(&self) -> Result<Sender, String> {
        let sender = open(self.addr, &self.name, self.config.as_ref()).await?;
        self.shared.connects.fetch_add(1, Ordering::Relaxed);
        Ok(sender)
    }

    /// Keeps `streams` requests in flight on a connection, reconnecting
    /// when the connection goes away.
    async fn run(self, streams: usize) {
        while self.going() {
            let sender = match self.connect().await {
                Ok(s) => s,
                Err(e) => {
                    self.fail(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Until every stream worker of this connection saw it go away.
            let mut workers = Vec::new();
            for _ in 0..streams {
                let (me, mut sender) = (self.clone(), sender.clone());
                workers.push(tokio::spawn(async move {
                    while me.going() {
                        match me.one(&mut sender).await {
                            Outcome::Ok => {
                                me.shared.ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Outcome::Failed(e) => {
                                me.fail(e);
                                return;
                            }
                            Outcome::Retry => {
                                me.shared.retried.fetch_add(1, Ordering::Relaxed);
                                // On a new connection: keep it for the others.
                                return me.retry().await;
                            }
                        }
                    }
                }));
            }
            for w in workers {
                let _ = w.await;
            }
        }
    }

    /// The retried request, on a connection of its own.
    async fn retry(&self) {
        for _ in 0..3 {
            let Ok(mut sender) = self.connect().await else {
                continue;
            };
            match self.one(&mut sender).await {
                Outcome::Ok => {
                    self.shared.ok.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Outcome::Failed(e) => {
                    self.fail(e);
                    return;
                }
                Outcome::Retry => continue,
            }
        }
        self.fail("retried three times, never processed".to_owned());
    }

    async fn one(&self, sender: &mut Sender) -> Outcome {
        if sender.ready().await.is_err() {
            // The connection is closing: this request was not sent.
            return Outcome::Retry;
        }
        let req = http::Request::builder()
            .uri(format!("https://{}{}", self.name, self.path))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response =
            match tokio::time::timeout(Duration::from_secs(20), sender.send_request(req)).await {
                Err(_) => return Outcome::Failed("no response within 20 s".to_owned()),
                Ok(Err(e)) => return classify(&e),
                Ok(Ok(r)) => r,
            };
        let status = response.status();
        match response.into_body().collect().await {
            Ok(_) if status == http::StatusCode::OK => Outcome::Ok,
            Ok(_) => Outcome::Failed(format!("status {status}")),
            Err(e) => Outcome::Failed(format!("body: {e}")),
        }
    }

    fn fail(&self, what: String) {
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.shared.failures.lock().unwrap();
        if f.len() < 50 {
            f.push(what);
        }
    }
}

/// Opens an HTTP/2 connection to `addr`: over TLS (SNI `name`, ALPN `h2`)
/// with `config`, else h2c with prior knowledge.
async fn open(
    addr: SocketAddr,
    name: &str,
    config: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Sender, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let Some(config) = config else {
        return handshake(tcp).await;
    };
    let server = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(server, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err("the server did not agree on h2".to_owned());
    }
    handshake(tls).await
}

async fn handshake<IO>(io: IO) -> Result<Sender, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The client configuration for HTTP/2: ALPN `h2` only.
fn h2_config(config: Option<Arc<rustls::ClientConfig>>) -> Option<Arc<rustls::ClientConfig>> {
    config.map(|c| {
        let mut c = (*c).clone();
        c.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(c)
    })
}

/// Whether a request error means the server never processed it.
fn classify(e: &hyper::Error) -> Outcome {
    if e.is_canceled() {
        return Outcome::Retry;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            let refused = h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            let above_last = h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR);
            if refused || above_last {
                return Outcome::Retry;
            }
            return Outcome::Failed(format!("HTTP/2 error: {h2}"));
        }
        source = s.source();
    }
    Outcome::Failed(format!("request: {e}"))
}

/// One HTTP/2 connection for requests one at a time (over TLS with a
/// client configuration, else h2c), on a runtime of its own.
pub struct H2Conn {
    rt: tokio::runtime::Runtime,
    sender: Sender,
    authority: String,
}

impl std::fmt::Debug for H2Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("H2Conn")
    }
}

impl H2Conn {
    /// Connects to `addr` (SNI and `:authority` `name`).
    pub fn connect(
        addr: SocketAddr,
        name: &str,
        config: impl Into<Option<Arc<rustls::ClientConfig>>>,
    ) -> H2Conn {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = h2_config(config.into());
        let sender = rt.block_on(open(addr, name, config.as_ref())).unwrap();
        H2Conn {
            rt,
            sender,
            authority: name.to_owned(),
        }
    }

    /// `GET path` on this connection: (status, body).
    pub fn get(&mut self, path: &str) -> (u16, String) {
        let req = http::Request::builder()
            .uri(format!("http://{}{}", self.authority, path))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let sender = &mut self.sender;
        self.rt.block_on(async {
            sender.ready().await.unwrap();
            let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
                .await
                .unwrap()
                .unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
    }
}
