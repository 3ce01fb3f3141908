//! An HTTPS server (HTTP/1.1 and HTTP/2) whose certificate reloads in place
//! and whose TLS sessions resume across upgrades (feature `tls`).
//!
//! ```text
//! cargo run -p baton --features tls --example https -- --listen 127.0.0.1:8443 \
//!     --cert site.pem --key site.key --control-socket /tmp/https.sock
//! curl --http2 -k https://127.0.0.1:8443/   # hello over HTTP/2.0 from generation 1 pid ...
//! kill -HUP $(cat /tmp/https.pid)           # re-reads the certificate (a bad one: refused, the old one serves)
//! kill -USR2 $(cat /tmp/https.pid)          # upgrade: sessions resume with the next generation
//! ```
mod common;

use std::path::PathBuf;

use baton::tls::{Acceptor, Certificate, Certificates, Options, Tickets};
use clap::Parser;

#[derive(Debug, Parser)]
struct HttpsArgs {
    #[command(flatten)]
    common: common::Args,
    /// The PEM certificate chain.
    #[arg(long)]
    cert: PathBuf,
    /// The PEM private key.
    #[arg(long)]
    key: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = HttpsArgs::parse();
    let baton = args.common.baton()?;
    baton::signals::handle(baton.clone())?;
    let listener = baton.tcp("https", &args.common.listen).await?;
    let local = listener.local_addr()?;

    let (cert, key) = (args.cert.clone(), args.key.clone());
    let load = move || Certificates::new(vec![Certificate::load(&cert, &key)?]);
    let mut options = Options::default().alpn(&[b"h2", b"http/1.1"]);
    // Ticket keys passed on from the previous generation, and on to the next.
    if let Some(tickets) = Tickets::for_baton(&baton) {
        options = options.tickets(tickets);
    }
    let acceptor = Acceptor::new(load()?, options);
    let reload = acceptor.clone();
    baton.on_reload(move || {
        let (reload, load) = (reload.clone(), load.clone());
        async move {
            reload.certificates().reload(|| async { load() }).await?;
            Ok(())
        }
    });
    args.common.startup(&baton).await;

    let who = format!(
        "from generation {} pid {}\n",
        baton.generation(),
        std::process::id()
    );
    let slow = who.clone();
    let app = axum::Router::new()
        .route(
            "/sleep/{ms}",
            axum::routing::get(move |axum::extract::Path(ms): axum::extract::Path<u64>| {
                let who = slow.clone();
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    who
                }
            }),
        )
        .fallback(move |req: axum::extract::Request| {
            let who = who.clone();
            async move { format!("hello over {:?} {who}", req.version()) }
        });

    baton.ready().await?;
    common::announce(&baton, serde_json::json!({"listen": local.to_string()}));
    tokio::spawn(baton::http::serve_tls(
        listener,
        acceptor,
        app,
        baton.shutdown(),
    ));
    baton.wait().await;
    Ok(())
}
