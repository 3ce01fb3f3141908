//! The admin endpoints a load balancer, Kubernetes or an operator probes:
//! `GET /healthz` (200 while the process lives) and `GET /readyz` (200 while
//! this generation is active and accepting, 503 while it starts or drains).
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

/// The admin service itself, for a server that mounts it in its own
/// accept loop ([`http::serve_connection`](crate::http::serve_connection)).
#[derive(Debug, Clone)]
pub struct Admin(pub Baton);

impl tower_service::Service<Request<Incoming>> for Admin {
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

fn answer(baton: &Baton, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match (method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, "ok\n".to_owned()),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            let state = baton.state().borrow().clone();
            match state {
                State::Active => (StatusCode::OK, "ready\n".to_owned()),
                other => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", other.label()),
                ),
            }
        }
        (_, "/healthz" | "/readyz") => (
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
