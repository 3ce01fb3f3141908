//! `baton hello`: the built-in demo server `baton demo` upgrades. It is the
//! library's `hello` example (crates/baton/examples/hello.rs) in the binary,
//! so the demo needs nothing but `baton` itself.

use std::path::PathBuf;
use std::time::Duration;

/// Options for the built-in server.
#[derive(Debug, Clone)]
pub struct HelloOptions {
    pub listen: String,
    pub control_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub drain_timeout: Duration,
    pub upgrade_timeout: Duration,
    pub takeover: bool,
}

/// Serves `hello from generation G pid P` until stopped or upgraded.
pub async fn run(opts: HelloOptions) -> anyhow::Result<()> {
    let mut b = baton::Baton::builder()
        .drain_timeout(opts.drain_timeout)
        .upgrade_timeout(opts.upgrade_timeout)
        .takeover(opts.takeover);
    if let Some(p) = &opts.control_socket {
        b = b.control_socket(p);
    }
    if let Some(p) = &opts.pid_file {
        b = b.pid_file(p);
    }
    let baton = b.from_env()?;
    baton::signals::handle(baton.clone())?;
    let http = baton.tcp("http", &opts.listen).await?;
    let local = http.local_addr()?;
    let body = format!(
        "hello from generation {} pid {}\n",
        baton.generation(),
        std::process::id()
    );
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        async move { body }
    });
    baton.on_reload(|| async { Ok(()) });
    // At an upgrade its keep-alive connections move to the next generation.
    let server = baton::http::Server::new(&baton, "http");
    baton.ready().await?;
    println!(
        "{}",
        serde_json::json!({"event": "ready", "pid": std::process::id(), "generation": baton.generation(), "listen": local.to_string()})
    );
    tokio::spawn(server.serve(http, app));
    baton.wait().await;
    Ok(())
}
