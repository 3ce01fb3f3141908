//! Upgrade pass-through (WebSocket and any other `Upgrade` protocol).
//!
//! The handshake is forwarded like any request ([`crate::forward`]); on
//! `101` both sides are spliced byte for byte in the client connection's
//! task, which the listener's drain tracks. It runs until either side
//! closes, or until the drain timeout
//! (`expired`): then a WebSocket client gets a close frame with status 1001
//! (going away) and the upstream a masked one, each only if its stream is at
//! a frame boundary (a frame cut in half would corrupt the stream), and
//! both connections are closed.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Close frame from server to client: FIN + close opcode, 2-byte payload
/// 1001 (going away), unmasked.
const CLOSE_TO_CLIENT: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// Close frame from client (us) to server: masked, as RFC 6455 requires.
fn close_to_server() -> [u8; 8] {
    let m: [u8; 4] = fastrand::u32(..).to_be_bytes();
    [0x88, 0x82, m[0], m[1], m[2], m[3], 0x03 ^ m[0], 0xE9 ^ m[1]]
}

/// Copies both ways until both sides are done, or `expired`. `to_upstream`
/// and `to_client` are bytes already read from the other side (sent after
/// the handshake), written first.
pub(crate) async fn splice<C, U>(
    client: C,
    upstream: U,
    websocket: bool,
    shutdown: &baton::Shutdown,
    first_to_upstream: &[u8],
    first_to_client: &[u8],
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let mut to_upstream = FrameCursor::default();
    let mut to_client = FrameCursor::default();
    let first = async {
        uw.write_all(first_to_upstream).await?;
        to_upstream.feed(first_to_upstream);
        cw.write_all(first_to_client).await?;
        to_client.feed(first_to_client);
        std::io::Result::Ok(())
    };
    let first = tokio::select! {
        r = first => r.is_ok(),
        _ = shutdown.expired() => false,
    };
    if !first {
        return;
    }
    finish(
        &mut cr,
        &mut cw,
        &mut ur,
        &mut uw,
        websocket,
        shutdown,
        &mut to_upstream,
        &mut to_client,
    )
    .await;
}

/// Copies both ways until both sides are done or `expired`; at the drain
/// timeout a WebSocket gets its close frames (where each direction is at a
/// frame boundary).
#[allow(clippy::too_many_arguments)]
async fn finish<CR, CW, UR, UW>(
    cr: &mut CR,
    cw: &mut CW,
    ur: &mut UR,
    uw: &mut UW,
    websocket: bool,
    shutdown: &baton::Shutdown,
    to_upstream: &mut FrameCursor,
    to_client: &mut FrameCursor,
) where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let expired = {
        let a = pump(cr, uw, to_upstream);
        let b = pump(ur, cw, to_client);
        tokio::select! {
            _ = async { tokio::join!(a, b) } => false,
            _ = shutdown.expired() => true,
        }
    };
    if !expired {
        return;
    }
    let polite = async {
        if websocket && to_client.at_boundary() {
            let _ = cw.write_all(&CLOSE_TO_CLIENT).await;
        }
        if websocket && to_upstream.at_boundary() {
            let _ = uw.write_all(&close_to_server()).await;
        }
        let _ = cw.shutdown().await;
        let _ = uw.shutdown().await;
    };
    // A peer that does not read must not hold the drain up.
    let _ = tokio::time::timeout(Duration::from_secs(1), polite).await;
    tracing::debug!(websocket, "upgraded connection closed at the drain timeout");
}

/// How a spliced pair may move to the next generation: the process, and
/// the listener whose connections the next generation takes.
#[derive(Debug, Clone)]
pub(crate) struct Moving {
    pub(crate) baton: baton::Baton,
    pub(crate) listener: String,
}

/// What travels with a moving pair: the protocol and each direction's frame
/// position (so that the next generation can still close politely at a
/// frame boundary).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct PairState {
    pub(crate) websocket: bool,
    pub(crate) to_upstream: FrameCursor,
    pub(crate) to_client: FrameCursor,
}

/// Like [`splice`] for a TCP client and upstream; with `moving`, at an
/// upgrade's drain both directions stop at their next read (nothing read is
/// left unwritten), and the pair moves to the next generation with its
/// frame positions. A pair that cannot move (one direction already ended,
/// or the next generation does not take it) is spliced on here.
pub(crate) async fn splice_pair(
    mut client: tokio::net::TcpStream,
    mut upstream: tokio::net::TcpStream,
    mut state: PairState,
    shutdown: &baton::Shutdown,
    moving: Option<Moving>,
) {
    if let Some(moving) = moving {
        let stop = || async {
            shutdown.draining().await;
            if !moving.baton.moving_on() {
                std::future::pending::<()>().await;
            }
        };
        let ends = {
            let (mut cr, mut cw) = client.split();
            let (mut ur, mut uw) = upstream.split();
            let a = pump_until(&mut cr, &mut uw, &mut state.to_upstream, stop());
            let b = pump_until(&mut ur, &mut cw, &mut state.to_client, stop());
            tokio::select! {
                ends = async { tokio::join!(a, b) } => Some(ends),
                _ = shutdown.expired() => None,
            }
        };
        match ends {
            Some((End::Stopped, End::Stopped)) => {
                let bytes = serde_json::to_vec(&state).unwrap_or_default();
                let pair = baton::migrate::Connection::TcpPair { client, upstream };
                match moving.baton.migrate(&moving.listener, pair, bytes).await {
                    Ok(()) => return,
                    Err(baton::migrate::Connection::TcpPair {
                        client: c,
                        upstream: u,
                    }) => {
                        client = c;
                        upstream = u;
                    }
                    Err(_) => return,
                }
            }
            // Both done, or broken.
            Some((End::Eof | End::Failed, End::Eof | End::Failed)) => return,
            // Half done, or the drain expired: spliced on (and closed at
            // the drain timeout) below.
            Some(_) | None => {}
        }
    }
    splice_from(client, upstream, shutdown, state).await;
}

/// How one direction of a pair ended.
enum End {
    /// The reader reached its end; the writer was shut down.
    Eof,
    /// Stopped between two reads: nothing read is left unwritten.
    Stopped,
    /// An error on either side.
    Failed,
}

/// Copies `r` to `w` like [`pump`] until EOF, an error, or `stop` resolves
/// while it waits for the next read.
async fn pump_until<R, W>(
    r: &mut R,
    w: &mut W,
    cursor: &mut FrameCursor,
    stop: impl std::future::Future<Output = ()>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::pin!(stop);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // A read cancelled here has taken nothing.
        let n = tokio::select! {
            biased;
            _ = &mut stop => return End::Stopped,
            r = r.read(&mut buf) => match r {
                Ok(n) => n,
                Err(_) => return End::Failed,
            },
        };
        if n == 0 {
            let _ = w.shutdown().await;
            return End::Eof;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return End::Failed;
        }
        cursor.feed(&buf[..n]);
    }
}

/// [`splice`] with frame positions given (a pair that came from the
/// previous generation, or one that did not move).
async fn splice_from<C, U>(client: C, upstream: U, shutdown: &baton::Shutdown, state: PairState)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let PairState {
        websocket,
        mut to_upstream,
        mut to_client,
    } = state;
    finish(
        &mut cr,
        &mut cw,
        &mut ur,
        &mut uw,
        websocket,
        shutdown,
        &mut to_upstream,
        &mut to_client,
    )
    .await;
}

/// Copies `r` to `w` until EOF (then shuts `w` down), feeding what was
/// written to `cursor`. Cancel-safe with respect to the cursor: it only
/// counts bytes actually written.
async fn pump<R, W>(r: &mut R, w: &mut W, cursor: &mut FrameCursor) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            let m = w.write(&buf[off..n]).await?;
            if m == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            cursor.feed(&buf[off..off + m]);
            off += m;
        }
    }
}

/// Tracks WebSocket frame boundaries in a byte stream.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct FrameCursor {
    header: Vec<u8>,
    remaining: u64,
}

impl FrameCursor {
    /// Whether the bytes fed so far end exactly at the end of a frame.
    pub(crate) fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.remaining == 0
    }

    /// Accounts for `data`.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let k = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= k as u64;
                data = &data[k..];
                continue;
            }
            self.header.push(data[0]);
            data = &data[1..];
            if let Some(len) = header_len(&self.header) {
                self.remaining = len;
                self.header.clear();
            }
        }
    }
}

/// The payload length once `h` holds a complete frame header.
fn header_len(h: &[u8]) -> Option<u64> {
    if h.len() < 2 {
        return None;
    }
    let masked = h[1] & 0x80 != 0;
    let len7 = h[1] & 0x7f;
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    if h.len() < 2 + ext + if masked { 4 } else { 0 } {
        return None;
    }
    Some(match len7 {
        126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
        127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
        n => u64::from(n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_boundaries() {
        let mut c = FrameCursor::default();
        assert!(c.at_boundary());
        // masked text frame, 5 bytes payload
        let frame = [0x81, 0x85, 1, 2, 3, 4, b'h', b'e', b'l', b'l', b'o'];
        c.feed(&frame[..3]);
        assert!(!c.at_boundary());
        c.feed(&frame[3..8]);
        assert!(!c.at_boundary());
        c.feed(&frame[8..]);
        assert!(c.at_boundary());
        // 16-bit length, unmasked, 300 bytes
        let mut big = vec![0x82, 126, 0x01, 0x2c];
        big.extend([0u8; 300]);
        c.feed(&big[..100]);
        assert!(!c.at_boundary());
        c.feed(&big[100..]);
        assert!(c.at_boundary());
        // empty frame
        c.feed(&[0x89, 0x00]);
        assert!(c.at_boundary());
    }
}
