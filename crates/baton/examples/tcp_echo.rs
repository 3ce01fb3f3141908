//! A TCP echo server whose connections live until the client closes them,
//! and survive upgrades: when this generation drains after an upgrade, it
//! hands each open connection to the next one (connection migration), so
//! no client sees its connection close. Against a next generation that does
//! not take connections, they stay here until the drain timeout, then are
//! closed.
mod common;

use baton::migrate::Connection;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = common::Args::parse();
    let baton = args.baton()?;
    baton::signals::handle(baton.clone())?;
    let listener = baton.tcp("echo", &args.listen).await?;
    let local = listener.local_addr()?;
    // Connections the previous generation hands over, if it does.
    let migrated = (!args.no_migrate).then(|| baton.accept_migrated("echo"));
    let migrate = !args.no_migrate;
    args.startup(&baton).await;
    baton.ready().await?;
    common::announce(&baton, serde_json::json!({"listen": local.to_string()}));

    if let Some(mut migrated) = migrated {
        let (b, shutdown) = (baton.clone(), baton.shutdown());
        tokio::spawn(async move {
            while let Some(m) = migrated.recv().await {
                if let Connection::Tcp(stream) = m.connection {
                    // Echo keeps no state between reads: `m.state` is empty.
                    shutdown.spawn(echo(b.clone(), stream, shutdown.clone(), true));
                }
            }
        });
    }
    let mut shutdown = baton.shutdown();
    let b = baton.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                // Keep the listener (not accepting) until it is clear this
                // generation will not serve again (the settle period).
                _ = shutdown.draining() => match shutdown.resumed().await {
                    Some(next) => { shutdown = next; continue }
                    None => break,
                },
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            shutdown.spawn(echo(b.clone(), stream, shutdown.clone(), migrate));
        }
        // the listener is dropped here: no listening fd once draining
    });
    baton.wait().await;
    Ok(())
}

/// Echoes until the client closes. Once draining, the connection moves to
/// the next generation between two reads (everything read so far has been
/// echoed, so there is no state to carry); if it cannot move, it stays
/// here and is closed at the drain timeout.
async fn echo(baton: baton::Baton, mut stream: TcpStream, conn: baton::Shutdown, migrate: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut tried = !migrate;
    loop {
        let n = tokio::select! {
            _ = conn.expired() => break,
            _ = conn.draining(), if !tried => {
                tried = true;
                match baton.migrate("echo", Connection::Tcp(stream), Vec::new()).await {
                    Ok(()) => return,
                    Err(Connection::Tcp(s)) => { stream = s; continue }
                    Err(_) => return,
                }
            }
            r = stream.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}
