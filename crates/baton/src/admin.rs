//! The admin endpoints a load balancer, Kubernetes or an operator probes:
//! `GET /healthz` (200 while the process lives), `GET /readyz` (200 while
//! this generation is active and accepting, 503 while it starts or drains)
//! and `GET /metrics` (the Prometheus text format, see
//! [`Baton::metrics`]).
//!
//! Serve them on a listener of their own, claimed like any other (so the
//! admin socket is inherited across upgrades as well):
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let baton = baton::Baton::from_env()?;
//! let admin = baton.tcp("admin", "127.0.0.1:9901").await?;
//! baton.ready().await?;
//! tokio::spawn(baton::admin::serve(admin, baton.clone()));
//! # Ok(()) }
//! ```
//!
//! Once a generation drains it stops accepting on the admin socket like on
//! any other: new probes reach the next generation, and a probe on a
//! keep-alive connection to the draining one is answered 503 (with
//! `Connection: close`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::{Baton, State};

/// Serves `/healthz` and `/readyz` for `baton` on `listener` until this
/// generation has drained (see [`http::serve`](crate::http::serve)).
pub async fn serve<L: crate::http::Accept>(listener: L, baton: Baton) -> std::io::Result<()> {
    let shutdown = baton.shutdown();
    crate::http::serve(listener, Admin(baton), shutdown).await
}

/// Like [`serve`], for any [`Readiness`] (`baton run` answers for its
/// child), draining with `shutdown`.
pub async fn serve_with<L: crate::http::Accept, R: Readiness>(
    listener: L,
    readiness: R,
    shutdown: crate::Shutdown,
) -> std::io::Result<()> {
    crate::http::serve(listener, Admin(readiness), shutdown).await
}

/// What `/readyz` asks.
pub trait Readiness: Clone + Send + Sync + 'static {
    /// `Ok` while ready to serve; else why not (`"draining"`, say).
    fn readiness(&self) -> Result<(), String>;

    /// The Prometheus text exposition for `/metrics` (none: 404).
    fn metrics(&self) -> Option<String> {
        None
    }
}

impl Readiness for Baton {
    fn readiness(&self) -> Result<(), String> {
        match &*self.state().borrow() {
            State::Active => Ok(()),
            other => Err(other.label().to_owned()),
        }
    }

    fn metrics(&self) -> Option<String> {
        Some(Baton::metrics(self))
    }
}

/// The admin service itself, for a server that mounts it in its own
/// accept loop ([`http::serve_connection`](crate::http::serve_connection)).
#[derive(Debug, Clone)]
pub struct Admin<R>(pub R);

impl<R: Readiness> tower_service::Service<Request<Incoming>> for Admin<R> {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let answer = answer(&self.0, req.method(), req.uri().path());
        Box::pin(std::future::ready(Ok(answer)))
    }
}

fn answer(readiness: &impl Readiness, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match (method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n".to_owned()),
        (&Method::GET | &Method::HEAD, "/readyz") => match readiness.readiness() {
            Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET | &Method::HEAD, "/metrics") => match readiness.metrics() {
            Some(text) => {
                let mut resp = Response::new(Full::new(Bytes::from(text)));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                return resp;
            }
            None => (StatusCode::NOT_FOUND, "no metrics here\n".to_owned()),
        },
        (_, "/healthz" | "/readyz" | "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n".to_owned(),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
