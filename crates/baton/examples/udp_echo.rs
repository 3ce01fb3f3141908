//! A UDP echo server: answers each datagram with `gen G pid P: <datagram>`.
//! Across an upgrade the socket is the same, so no datagram is dropped for
//! want of a socket.
mod common;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = common::Args::parse();
    let baton = args.baton()?;
    baton::signals::handle(baton.clone())?;
    let socket = baton.udp("udp", &args.listen).await?;
    let local = socket.local_addr()?;
    args.startup(&baton).await;
    baton.ready().await?;
    common::announce(&baton, serde_json::json!({"listen": local.to_string()}));

    let prefix = format!("gen {} pid {}: ", baton.generation(), std::process::id());
    let mut shutdown = baton.shutdown();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(64 * 1024);
        loop {
            let (n, peer) = tokio::select! {
                // Stop reading at once: the new generation reads from the
                // same socket, so nothing queued is lost.
                // If the new generation dies within the settle period,
                // read again.
                _ = shutdown.draining() => match shutdown.resumed().await {
                    Some(next) => { shutdown = next; continue }
                    None => break,
                },
                r = socket.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
            };
            out.clear();
            out.extend_from_slice(prefix.as_bytes());
            out.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&out, peer).await;
        }
    });
    baton.wait().await;
    Ok(())
}
