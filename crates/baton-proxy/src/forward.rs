//! HTTP/1.1 proxying: the per-connection service, header handling, the
//! pooled upstream client, 502/504.

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
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::listener::ListenerStats;
use crate::router::{self, Route, RouteTable, Target};
use crate::upstream::Pool;
use crate::websocket;

/// The body type the proxy sends and answers with.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// The pooled keep-alive upstream client.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Body>;

/// Bound on connecting to an upstream server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A new pooled client (keep-alive, `TCP_NODELAY`, idle connections closed
/// after 60 s).
pub fn client() -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

/// What every connection of one HTTP listener shares.
#[derive(Debug)]
pub struct HttpContext {
    /// The listener's name.
    pub listener: String,
    /// Its routes; a reload swaps them.
    pub routes: ArcSwap<RouteTable>,
    /// Its counters.
    pub stats: Arc<ListenerStats>,
    /// The upstream client.
    pub client: Client,
}

/// The service for one client connection (cheap to clone: one per request).
#[derive(Clone)]
pub struct ProxyService(Arc<Connection>);

struct Connection {
    ctx: Arc<HttpContext>,
    peer: SocketAddr,
    shutdown: baton::Shutdown,
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
        }))
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        self.0.ctx.stats.request();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let host = request_host(&req);
        let table = self.0.ctx.routes.load_full();
        let (resp, upstream) = match table.find(host.as_deref(), &path) {
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
                    self.forward(req, route, pool, *strip_prefix, host.as_deref())
                        .await
                }
            },
        };
        tracing::info!(
            target: "baton_proxy::access",
            listener = %self.0.ctx.listener,
            client = %self.0.peer.ip(),
            method = %method,
            host = host.as_deref().unwrap_or("-"),
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
    ) -> (Response<Body>, Option<SocketAddr>) {
        let path_and_query = {
            let path = req.uri().path();
            let path = if strip_prefix {
                router::strip(&route.prefix, path)
            } else {
                path.to_owned()
            };
            match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            }
        };
        if let Some(upgrade) = websocket::upgrade_protocol(&req) {
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
        add_forwarded(&mut headers, self.0.peer.ip(), host);
        // A request without a body can be sent again to another server if
        // connecting fails (nothing reached the first one).
        let retryable = body.is_end_stream();
        let mut body = Some(body.boxed_unsync());
        let mut tried = Vec::new();
        loop {
            let Some(server) = pool.pick(&tried) else {
                return (simple(StatusCode::BAD_GATEWAY, "bad gateway\n"), None);
            };
            tried.push(server.addr);
            let uri = match format!("http://{}{}", server.addr, path_and_query).parse::<http::Uri>()
            {
                Ok(u) => u,
                Err(_) => return (simple(StatusCode::BAD_REQUEST, "bad request\n"), None),
            };
            let mut up = Request::new(body.take().unwrap_or_else(empty));
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = uri;
            // Keep a copy only while another attempt is possible.
            let may_retry = retryable && tried.len() < pool.servers.len();
            *up.headers_mut() = if may_retry {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            let in_flight = server.begin();
            let result = tokio::time::timeout(route.timeout, self.0.ctx.client.request(up)).await;
            drop(in_flight);
            match result {
                Err(_) => {
                    tracing::warn!(server = %server.addr, timeout = ?route.timeout, "upstream timed out");
                    return (
                        simple(StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n"),
                        Some(server.addr),
                    );
                }
                Ok(Ok(resp)) => {
                    let (mut parts, body) = resp.into_parts();
                    remove_hop_by_hop(&mut parts.headers);
                    return (
                        Response::from_parts(parts, body.boxed_unsync()),
                        Some(server.addr),
                    );
                }
                Ok(Err(e)) => {
                    let error = error_chain(&e);
                    server.mark_failed(pool.fail_timeout, &error);
                    if e.is_connect() && retryable && tried.len() < pool.servers.len() {
                        continue;
                    }
                    tracing::warn!(server = %server.addr, error, "upstream request failed");
                    return (
                        simple(StatusCode::BAD_GATEWAY, "bad gateway\n"),
                        Some(server.addr),
                    );
                }
            }
        }
    }
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
    let node = match client {
        IpAddr::V4(_) => ip,
        IpAddr::V6(_) => format!("\"[{ip}]\""),
    };
    let mut fwd = format!("for={node};proto=http");
    if let Some(host) = host.filter(|h| !h.contains('"') && !h.contains('\\')) {
        fwd.push_str(&format!(";host=\"{host}\""));
    }
    if let Ok(v) = HeaderValue::from_str(&fwd) {
        h.append(header::FORWARDED, v);
    }
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
