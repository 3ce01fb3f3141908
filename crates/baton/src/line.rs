//! The one bounded line reader: every line Baton reads from a peer (the
//! hand-off between generations, the control socket, a control answer) goes
//! through [`read_line`], which caps its length and the time it may take.

use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::error::LineError;

/// Longest line accepted from a peer on the handshake and the control
/// socket (the newline not counted).
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// Reads one `\n`-terminated line into `buf` (cleared first; the newline is
/// not kept), holding at most `limit` bytes and taking at most `timeout` (`None`:
/// the caller bounds the time some other way).
///
/// Returns `Ok(true)` with a line in `buf` (a last line cut short by EOF
/// counts), `Ok(false)` at EOF before any byte. A longer line is
/// [`LineError::TooLong`] as soon as `limit` is passed, so memory stays
/// bounded by `limit` plus the reader's buffer whatever the peer sends; no
/// complete line in time is [`LineError::Timeout`] (what arrived so far
/// stays in `buf`).
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
    timeout: Option<Duration>,
) -> Result<bool, LineError> {
    buf.clear();
    let read = async {
        loop {
            let chunk = r.fill_buf().await.map_err(LineError::Io)?;
            if chunk.is_empty() {
                return Ok(!buf.is_empty());
            }
            let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            if buf.len() + take > limit {
                return Err(LineError::TooLong { limit });
            }
            buf.extend_from_slice(&chunk[..take]);
            r.consume(if done { take + 1 } else { take });
            if done {
                return Ok(true);
            }
        }
    };
    match timeout {
        None => read.await,
        Some(t) => match tokio::time::timeout(t, read).await {
            Ok(result) => result,
            Err(_) => Err(LineError::Timeout(t)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, BufReader};

    #[tokio::test]
    async fn lines_limits_and_eof() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut r = BufReader::with_capacity(16, r);
        let mut buf = Vec::new();
        let t = Some(Duration::from_secs(5));
        w.write_all(b"one\ntwo-is-longer-than-ten\nlast")
            .await
            .unwrap();
        drop(w);
        assert!(read_line(&mut r, &mut buf, 10, t).await.unwrap());
        assert_eq!(buf, b"one");
        assert!(matches!(
            read_line(&mut r, &mut buf, 10, t).await,
            Err(LineError::TooLong { limit: 10 })
        ));
        assert!(buf.len() <= 10);
    }

    #[tokio::test]
    async fn eof_and_partial_last_line() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        let t = Some(Duration::from_secs(5));
        w.write_all(b"a\nlast").await.unwrap();
        drop(w);
        assert!(read_line(&mut r, &mut buf, 10, t).await.unwrap());
        assert!(read_line(&mut r, &mut buf, 10, t).await.unwrap());
        assert_eq!(buf, b"last");
        assert!(!read_line(&mut r, &mut buf, 10, t).await.unwrap());
    }

    #[tokio::test]
    async fn a_partial_line_times_out() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        w.write_all(b"{\"comm").await.unwrap();
        let got = read_line(&mut r, &mut buf, 10, Some(Duration::from_millis(50))).await;
        assert!(matches!(got, Err(LineError::Timeout(_))), "{got:?}");
        assert_eq!(buf, b"{\"comm");
    }
}
