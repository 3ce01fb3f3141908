//! HTTP/1.1 proxying: the per-connection service, header handling, 502/504.
//! Upstream connections are in [`crate::conn`].

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use crate::conn::{
    self, Home, IdlePool, Local, RequestBody, SendError, UpstreamBody, UpstreamConn,
};
use crate::listener::ListenerStats;
use crate::router::{self, Route, RouteTable, Target};
use crate::upstream::Pool;
use crate::websocket;

/// The body type the proxy answers with.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Bound on connecting to an upstream server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What every connection of one HTTP listener shares.
#[derive(Debug)]
pub struct HttpContext {
    /// The listener's name.
    pub listener: String,
    /// Its routes; a reload swaps them.
    pub routes: ArcSwap<RouteTable>,
    /// Its counters.
    pub stats: Arc<ListenerStats>,
    /// Idle upstream connections of client connections that went away
    /// (shared by every listener).
    pub idle: Arc<IdlePool>,
}

/// The service for one client connection (cheap to clone: one per request).
#[derive(Clone)]
pub struct ProxyService(Arc<Connection>);

struct Connection {
    ctx: Arc<HttpContext>,
    peer: SocketAddr,
    shutdown: baton::Shutdown,
    /// Upstream connections this client connection used, idle.
    local: Local,
    /// The client's address as `X-Forwarded-For` has it.
    xff: Option<HeaderValue>,
    /// The last `Forwarded` value and the host it was built for (a client
    /// connection usually names one host).
    forwarded: std::sync::Mutex<Option<(HeaderValue, HeaderValue)>>,
}

impl Connection {
    /// [`add_forwarded`] without building the same values on every request.
    fn add_forwarded(&self, h: &mut HeaderMap, host: Option<&HeaderValue>, host_str: Option<&str>) {
        let Some(xff) = self
            .xff
            .as_ref()
            .filter(|_| !h.contains_key("x-forwarded-for"))
        else {
            return add_forwarded(h, self.peer.ip(), host_str);
        };
        h.insert("x-forwarded-for", xff.clone());
        h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        let Some(host) = host else {
            return add_forwarded_only(h, self.peer.ip(), host_str);
        };
        let mut cached = crate::lock(&self.forwarded);
        let value = match &*cached {
            Some((for_host, v)) if for_host == host => v.clone(),
            _ => {
                let Some(v) = forwarded_value(self.peer.ip(), host_str) else {
                    return;
                };
                *cached = Some((host.clone(), v.clone()));
                v
            }
        };
        drop(cached);
        h.append(header::FORWARDED, value);
    }
}

impl Home for Connection {
    fn release(&self, conn: UpstreamConn) {
        conn::keep(&self.local, &self.ctx.idle, conn);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The client went away: its upstream connections serve others.
        self.ctx.idle.put(self.local.drain());
    }
}

impl std::fmt::Debug for ProxyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyService")
            .field("listener", &self.0.ctx.listener)
            .field("peer", &self.0.peer)
            .finish()
    }
}

impl tower_service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

/// A short plain-text response.
pub fn simple(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

impl ProxyService {
    /// The service for a connection from `peer` on the listener of `ctx`.
    pub fn new(ctx: Arc<HttpContext>, peer: SocketAddr, shutdown: baton::Shutdown) -> Self {
        ProxyService(Arc::new(Connection {
            ctx,
            peer,
            shutdown,
            local: Local::default(),
            xff: HeaderValue::from_str(&peer.ip().to_string()).ok(),
            forwarded: std::sync::Mutex::new(None),
        }))
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        // Only what the access log needs is kept for it, and only when it
        // is on.
        let log = tracing::enabled!(target: "baton_proxy::access", tracing::Level::INFO);
        let started = Instant::now();
        self.0.ctx.stats.request();
        let method = req.method().clone();
        let path = if log {
            req.uri().path().to_owned()
        } else {
            String::new()
        };
        // The `Host` header shares the request's buffer; only an
        // absolute-form target without one costs a copy.
        let host_header = req.headers().get(header::HOST).cloned();
        let authority;
        let host = match host_header.as_ref().and_then(|h| h.to_str().ok()) {
            Some(h) => Some(h),
            None => {
                authority = req.uri().authority().map(|a| a.to_string());
                authority.as_deref()
            }
        };
        let table = self.0.ctx.routes.load_full();
        let (resp, upstream) = match table.find(host, req.uri().path()) {
            None => (simple(StatusCode::NOT_FOUND, "no route\n"), None),
            Some(route) => match &route.target {
                Target::Respond {
                    status,
                    body,
                    content_type,
                } => {
                    let mut r = Response::new(full(body.clone()));
                    *r.status_mut() = *status;
                    r.headers_mut()
                        .insert(header::CONTENT_TYPE, content_type.clone());
                    (r, None)
                }
                Target::Upstream { pool, strip_prefix } => {
                    let host_header = host_header.as_ref().filter(|h| h.to_str().is_ok());
                    self.forward(req, route, pool, *strip_prefix, host, host_header)
                        .await
                }
            },
        };
        tracing::info!(
            target: "baton_proxy::access",
            listener = %self.0.ctx.listener,
            client = %self.0.peer.ip(),
            method = %method,
            host = host.unwrap_or("-"),
            path = %path,
            status = resp.status().as_u16(),
            upstream = %upstream.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        route: &Route,
        pool: &Arc<Pool>,
        strip_prefix: bool,
        host: Option<&str>,
        host_header: Option<&HeaderValue>,
    ) -> (Response<Body>, Option<SocketAddr>) {
        let path_and_query = |uri: &http::Uri| {
            let path = uri.path();
            let path = if strip_prefix {
                router::strip(&route.prefix, path)
            } else {
                path.to_owned()
            };
            match uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            }
        };
        if let Some(upgrade) = websocket::upgrade_protocol(&req) {
            let path_and_query = path_and_query(req.uri());
            return websocket::forward(
                req,
                upgrade,
                path_and_query,
                route.timeout,
                pool,
                self.0.peer,
                host,
                &self.0.ctx.stats,
                &self.0.shutdown,
            )
            .await;
        }
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        remove_hop_by_hop(&mut headers);
        self.0.add_forwarded(&mut headers, host_header, host);
        // hyper's client connections need a `Host`; without the client's,
        // the server's address (as the pooled client used to do).
        let needs_host = !headers.contains_key(header::HOST);
        // Origin form: the path (stripped or not) and the query.
        let uri = if !strip_prefix && parts.uri.authority().is_none() {
            parts.uri
        } else {
            match path_and_query(&parts.uri).parse::<http::Uri>() {
                Ok(u) => u,
                Err(_) => return (simple(StatusCode::BAD_REQUEST, "bad request\n"), None),
            }
        };
        // A request without a body can be sent again to another server if
        // connecting fails (nothing reached the first one).
        let retryable = body.is_end_stream();
        let mut up = Request::new(RequestBody::Client(body));
        *up.method_mut() = parts.method;
        *up.uri_mut() = uri;
        *up.headers_mut() = headers;
        let mut tried = Vec::new();
        loop {
            let Some(server) = pool.pick(&tried) else {
                return (simple(StatusCode::BAD_GATEWAY, "bad gateway\n"), None);
            };
            tried.push(server.addr);
            if needs_host {
                if let Ok(v) = HeaderValue::from_str(&server.addr.to_string()) {
                    up.headers_mut().insert(header::HOST, v);
                }
            }
            let in_flight = server.begin();
            let result = tokio::time::timeout(route.timeout, self.attempt(server.addr, up)).await;
            drop(in_flight);
            match result {
                Err(_) => {
                    tracing::warn!(server = %server.addr, timeout = ?route.timeout, "upstream timed out");
                    return (
                        simple(StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n"),
                        Some(server.addr),
                    );
                }
                Ok(Ok((resp, conn))) => {
                    let (mut parts, body) = resp.into_parts();
                    remove_hop_by_hop(&mut parts.headers);
                    let body = UpstreamBody::new(body, conn, self.0.clone());
                    return (
                        Response::from_parts(parts, body.boxed_unsync()),
                        Some(server.addr),
                    );
                }
                Ok(Err(Attempt::Connect(req, error))) => {
                    server.mark_failed(pool.fail_timeout, &error);
                    if retryable && tried.len() < pool.servers.len() {
                        up = *req;
                        continue;
                    }
                    tracing::warn!(server = %server.addr, error, "upstream request failed");
                    return (
                        simple(StatusCode::BAD_GATEWAY, "bad gateway\n"),
                        Some(server.addr),
                    );
                }
                Ok(Err(Attempt::Failed(error))) => {
                    server.mark_failed(pool.fail_timeout, &error);
                    tracing::warn!(server = %server.addr, error, "upstream request failed");
                    return (
                        simple(StatusCode::BAD_GATEWAY, "bad gateway\n"),
                        Some(server.addr),
                    );
                }
            }
        }
    }

    /// One attempt on `addr`: an idle connection of this client connection,
    /// else one from the shared idle pool, else a new one. A reused
    /// connection found closed, or that closed before the request left, is
    /// replaced (nothing reached the upstream).
    async fn attempt(
        &self,
        addr: SocketAddr,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, UpstreamConn), Attempt> {
        loop {
            let reused = self
                .0
                .local
                .take(addr)
                .or_else(|| self.0.ctx.idle.take(addr));
            let (mut conn, reused) = match reused {
                Some(mut c) => {
                    if !c.ready().await {
                        continue;
                    }
                    (c, true)
                }
                None => match UpstreamConn::connect(addr, CONNECT_TIMEOUT).await {
                    Ok(mut c) => {
                        // A new connection is ready at once; this only
                        // notices one the server closed straight away.
                        if !c.ready().await {
                            return Err(Attempt::Failed(
                                "the upstream closed the new connection".to_owned(),
                            ));
                        }
                        (c, false)
                    }
                    Err(e) => return Err(Attempt::Connect(Box::new(req), e)),
                },
            };
            match conn.send(req).await {
                Ok(resp) => return Ok((resp, conn)),
                Err(SendError::NotSent(r, _)) if reused => req = *r,
                Err(SendError::NotSent(_, e)) | Err(SendError::Failed(e)) => {
                    return Err(Attempt::Failed(error_chain(&e)))
                }
            }
        }
    }
}

/// How an attempt failed.
enum Attempt {
    /// Connecting failed: the request (handed back) reached nobody.
    Connect(Box<Request<RequestBody>>, String),
    /// The request failed on the connection (the error chain).
    Failed(String),
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The `Host` header, else the authority of an absolute-form target.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in
/// `Connection`.
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets
/// `X-Forwarded-Proto: http`.
pub fn add_forwarded(h: &mut HeaderMap, client: IpAddr, host: Option<&str>) {
    let ip = client.to_string();
    let previous: Vec<String> = h
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    let xff = if previous.is_empty() {
        ip.clone()
    } else {
        format!("{}, {ip}", previous.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    add_forwarded_only(h, client, host);
}

/// Appends the client to `Forwarded`.
fn add_forwarded_only(h: &mut HeaderMap, client: IpAddr, host: Option<&str>) {
    if let Some(v) = forwarded_value(client, host) {
        h.append(header::FORWARDED, v);
    }
}

/// `for=IP;proto=http;host="HOST"`.
fn forwarded_value(client: IpAddr, host: Option<&str>) -> Option<HeaderValue> {
    let node = match client {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let mut fwd = format!("for={node};proto=http");
    if let Some(host) = host.filter(|h| !h.contains('"') && !h.contains('\\')) {
        fwd.push_str(&format!(";host=\"{host}\""));
    }
    HeaderValue::from_str(&fwd).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(&mut h, "127.0.0.1".parse().unwrap(), Some("a.example"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.1;proto=http;host=\"a.example\""
        );
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "::1".parse().unwrap(), None);
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }
}
