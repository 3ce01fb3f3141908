//! A tiny HTTP server that upgrades without losing a request.
//!
//! ```text
//! cargo run --example hello -- --listen 127.0.0.1:8080 --control-socket /tmp/hello.sock
//! curl http://127.0.0.1:8080/          # hello from generation 1 pid ...
//! kill -USR2 $(cat /tmp/hello.pid)     # or: {"command":"upgrade"} on the control socket
//! ```
//!
//! At an upgrade its keep-alive connections move to the next generation
//! ([`baton::http::Server`]); with `--no-migrate` they are drained.
mod common;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = common::Args::parse();
    let baton = args.baton()?;
    baton::signals::handle(baton.clone())?;

    let http = baton.tcp("http", &args.listen).await?;
    let local = http.local_addr()?;
    let unix = match &args.unix {
        Some(path) => Some(baton.unix("unix", path).await?),
        None => None,
    };
    let admin = match &args.admin {
        Some(addr) => Some(baton.tcp("admin", addr).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|a| a.local_addr()).transpose()?;
    args.startup(&baton).await;

    let body = format!(
        "hello from generation {} pid {}\n",
        baton.generation(),
        std::process::id()
    );
    // `/sleep/MS` answers after MS milliseconds (a slow in-flight request);
    // everything else answers at once.
    let slow_body = body.clone();
    let app = axum::Router::new()
        .route(
            "/sleep/{ms}",
            axum::routing::get(move |axum::extract::Path(ms): axum::extract::Path<u64>| {
                let body = slow_body.clone();
                async move {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    body
                }
            }),
        )
        .fallback(move || {
            let body = body.clone();
            async move { body }
        });
    let generation = baton.generation();
    baton.on_exit(move || async move {
        // Runs after the drain: tests and scripts see it on stdout.
        println!(
            "{}",
            serde_json::json!({"event": "exit_hook", "pid": std::process::id(), "generation": generation})
        );
    });
    // Application fields in the control socket's `status` answer.
    let listen_addr = local.to_string();
    baton.on_status(move || serde_json::json!({"app": "hello", "listen": listen_addr}));
    // A reload has nothing to re-read here; it proves the path works.
    baton.on_reload(|| async { Ok(()) });

    // At an upgrade, keep-alive connections move to the next generation
    // (`--no-migrate`: they are drained with `Connection: close`).
    let servers = (!args.no_migrate).then(|| {
        (
            baton::http::Server::new(&baton, "http"),
            baton::http::Server::new(&baton, "unix"),
        )
    });

    baton.ready().await?;
    common::announce(
        &baton,
        serde_json::json!({"listen": local.to_string(), "admin": admin_addr.map(|a| a.to_string())}),
    );
    if let Some(admin) = admin {
        tokio::spawn(baton::admin::serve(admin, baton.clone()));
    }
    match servers {
        Some((tcp_server, unix_server)) => {
            tokio::spawn(tcp_server.serve(http, app.clone()));
            if let Some(unix) = unix {
                tokio::spawn(unix_server.serve(unix, app));
            }
        }
        None => {
            tokio::spawn(baton::http::serve(http, app.clone(), baton.shutdown()));
            if let Some(unix) = unix {
                tokio::spawn(baton::http::serve(unix, app, baton.shutdown()));
            }
        }
    }
    baton.wait().await;
    Ok(())
}
