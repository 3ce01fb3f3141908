//! A TCP echo server whose connections live until the client closes them,
//! to exercise long-lived connections across an upgrade: they stay on the
//! old generation until the drain timeout, then are closed.
mod common;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = common::Args::parse();
    let baton = args.baton()?;
    baton::signals::handle(baton.clone())?;
    let listener = baton.tcp("echo", &args.listen).await?;
    let local = listener.local_addr()?;
    args.startup(&baton).await;
    baton.ready().await?;
    common::announce(&baton, serde_json::json!({"listen": local.to_string()}));

    let mut shutdown = baton.shutdown();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                // Keep the listener (not accepting) until it is clear this
                // generation will not serve again (the settle period).
                _ = shutdown.draining() => match shutdown.resumed().await {
                    Some(next) => { shutdown = next; continue }
                    None => break,
                },
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let conn = shutdown.clone();
            shutdown.spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    // Echo has no polite way to end a connection, so it
                    // ignores `draining` and closes only at `expired`.
                    let n = tokio::select! {
                        _ = conn.expired() => break,
                        r = stream.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
                    };
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
        // the listener is dropped here: no listening fd once draining
    });
    baton.wait().await;
    Ok(())
}
