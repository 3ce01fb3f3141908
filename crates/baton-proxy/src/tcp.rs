//! TCP mode: every connection of a `tcp` listener is spliced byte for byte
//! to a server of its pool.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use crate::conn::CONNECT_TIMEOUT;
use crate::upstream::Pool;

/// Connects to a server of `pool` (trying the next one if connecting
/// fails) and splices bytes both ways until both sides are done or the
/// drain expires.
pub(crate) async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    pool: &Pool,
    shutdown: &baton::Shutdown,
    listener: &str,
    moving: Option<crate::websocket::Moving>,
) {
    let mut tried = Vec::new();
    let (server, mut upstream) = loop {
        let Some(server) = pool.pick(&tried) else {
            tracing::warn!(listener, client = %peer, upstream = %pool.name, "no upstream server reachable; closing");
            return;
        };
        tried.push(server.addr);
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server.addr));
        let result = tokio::select! {
            r = connect => r,
            _ = shutdown.expired() => return,
        };
        match result {
            Ok(Ok(s)) => break (server, s),
            Ok(Err(e)) if crate::conn::is_local_error(&e) => {
                // Out of fds or ports here: not the server's fault.
                tracing::warn!(listener, client = %peer, server = %server.addr, error = %e, "connect failed for lack of a local resource; closing");
                return;
            }
            Ok(Err(e)) => server.mark_failed(pool.fail_timeout, &format!("connect: {e}")),
            Err(_) => server.mark_failed(pool.fail_timeout, "connect timed out"),
        }
    };
    let _ = upstream.set_nodelay(true);
    let _in_flight = server.begin();
    tracing::debug!(listener, client = %peer, server = %server.addr, "tcp connection");
    if moving.is_some() {
        // Moves to the next generation at an upgrade, with its upstream
        // connection.
        let state = crate::websocket::PairState::default();
        crate::websocket::splice_pair(client, upstream, state, shutdown, moving).await;
        return;
    }
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Ok((up, down)) = r {
                tracing::info!(target: "baton_proxy::access", listener, client = %peer.ip(), upstream = %server.addr, bytes_up = up, bytes_down = down, "tcp connection closed");
            }
        }
        _ = shutdown.expired() => {
            tracing::debug!(listener, client = %peer, "tcp connection closed at the drain timeout");
        }
    }
}
