//! Body copying by framing: a request body from the client to the
//! upstream, a response body from the upstream to the client, over any
//! streams (`AsyncRead` / `AsyncWrite`), with a typed error that says which
//! side failed.
//!
//! A body is copied as it comes, never buffered whole: `Content-Length`
//! bytes exactly, a chunked body up to the end of its last chunk and its
//! trailers as the strict [`ChunkedScanner`] reads them (passed on coded,
//! or decoded for an HTTP/1.0 client), or a close-delimited response until
//! the upstream closes. A head and the part of its body already read go out
//! in one write.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::h1::{ChunkedScanner, Framing, Malformed};
use crate::timer::Timer;

/// Size of the buffer bodies are copied through.
pub(crate) const COPY_BUF: usize = 16 * 1024;

/// Why copying a body failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// Writing to the client failed (it went away).
    #[error("client write: {0}")]
    ClientWrite(std::io::Error),
    /// Reading from the client failed.
    #[error("client read: {0}")]
    ClientRead(std::io::Error),
    /// The client closed before the end of its body.
    #[error("the client closed before the end of its body")]
    ClientClosed,
    /// The client stopped sending its body.
    #[error("the client stopped sending its body")]
    ClientTimedOut,
    /// The client's chunked body breaks the coding.
    #[error("request body: {0}")]
    ClientMalformed(Malformed),
    /// Writing to the upstream failed.
    #[error("write: {0}")]
    UpstreamWrite(std::io::Error),
    /// The upstream did not take the request within the client's timeout.
    #[error("the upstream stopped reading the request")]
    UpstreamTimedOut,
    /// Reading from the upstream failed.
    #[error("read: {0}")]
    UpstreamRead(std::io::Error),
    /// The upstream closed before the end of the body.
    #[error("response cut short")]
    UpstreamClosed,
    /// The upstream's chunked body breaks the coding; `sent_any` tells
    /// whether any of the response reached the client already.
    #[error("upstream sent a malformed chunked body")]
    UpstreamMalformed {
        /// Some of the response was written to the client.
        sent_any: bool,
    },
}

/// The client side of a request body: its stream, and what waits on it.
pub(crate) struct ClientBody<'a, C> {
    pub(crate) stream: &'a mut C,
    /// Body bytes are read through this.
    pub(crate) copy: &'a mut Vec<u8>,
    /// Bytes the client sent after a chunked body (the next request).
    pub(crate) spill: &'a mut BytesMut,
    /// Bounds every wait: set to `last_active + timeout` before each read
    /// from the client, and bounding the writes to the upstream too.
    pub(crate) timer: &'a mut Timer,
    /// When the client last sent bytes (moved on by each read).
    pub(crate) last_active: &'a mut Instant,
    pub(crate) timeout: std::time::Duration,
    /// Answer `100 Continue` before reading the body from the client.
    pub(crate) send_continue: bool,
}

impl<C: AsyncRead + AsyncWrite + Unpin> ClientBody<'_, C> {
    /// `100 Continue` to a client that waits for it before its body.
    async fn continue_client(&mut self) -> Result<(), BodyError> {
        self.stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(BodyError::ClientWrite)
    }

    /// Reads up to `max` bytes of body into `copy`, within `timeout` of the
    /// client's last bytes.
    async fn read(&mut self, max: usize) -> Result<usize, BodyError> {
        self.copy.resize(max.max(1), 0);
        self.timer.set(*self.last_active + self.timeout);
        let n = tokio::select! {
            r = self.stream.read(&mut self.copy[..max]) => r.map_err(BodyError::ClientRead)?,
            _ = self.timer.fired() => return Err(BodyError::ClientTimedOut),
        };
        if n == 0 {
            return Err(BodyError::ClientClosed);
        }
        *self.last_active = Instant::now();
        Ok(n)
    }
}

/// Writes `bytes` to the upstream, bounded by `timer`.
async fn write_upstream<U: AsyncWrite + Unpin>(
    upstream: &mut U,
    bytes: &[u8],
    timer: &mut Timer,
) -> Result<(), BodyError> {
    tokio::select! {
        r = upstream.write_all(bytes) => r.map_err(BodyError::UpstreamWrite),
        _ = timer.fired() => Err(BodyError::UpstreamTimedOut),
    }
}

/// Sends `out` (the request head) and the request body framed by
/// `framing` to `upstream`; `rest` holds what the client sent after the
/// head. Returns how much of `rest` the body used (more of a chunked body
/// than `rest` holds goes through `client.copy`, and what follows it to
/// `client.spill`).
pub(crate) async fn send_request<C, U>(
    mut client: ClientBody<'_, C>,
    upstream: &mut U,
    out: &mut Vec<u8>,
    rest: &[u8],
    framing: Framing,
) -> Result<usize, BodyError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncWrite + Unpin,
{
    client.timer.set(*client.last_active + client.timeout);
    match framing {
        Framing::None | Framing::Close => {
            write_upstream(upstream, out, client.timer).await?;
            Ok(0)
        }
        Framing::Length(n) => {
            let have = usize::try_from(n).unwrap_or(usize::MAX).min(rest.len());
            out.extend_from_slice(&rest[..have]);
            let mut left = n - have as u64;
            if left > 0 && client.send_continue {
                client.continue_client().await?;
            }
            write_upstream(upstream, out, client.timer).await?;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(COPY_BUF);
                let got = client.read(want).await?;
                left -= got as u64;
                write_upstream(upstream, &client.copy[..got], client.timer).await?;
            }
            Ok(have)
        }
        Framing::Chunked => {
            let mut scanner = ChunkedScanner::default();
            let have = scanner
                .feed(rest, |_| {})
                .map_err(BodyError::ClientMalformed)?;
            out.extend_from_slice(&rest[..have]);
            if !scanner.is_done() && client.send_continue {
                client.continue_client().await?;
            }
            write_upstream(upstream, out, client.timer).await?;
            while !scanner.is_done() {
                let got = client.read(COPY_BUF).await?;
                let body = scanner
                    .feed(&client.copy[..got], |_| {})
                    .map_err(BodyError::ClientMalformed)?;
                // Bytes after the body start the next request.
                client.spill.extend_from_slice(&client.copy[body..got]);
                write_upstream(upstream, &client.copy[..body], client.timer).await?;
            }
            Ok(have)
        }
    }
}

/// Copies a response body framed by `framing` from `upstream` to `client`:
/// `out` holds the client's response head and goes out with what of the
/// body `buf` already holds; `buf` is `upstream`'s read buffer, left with
/// what followed the body. A chunked body is decoded if `decode` (an
/// HTTP/1.0 client). Returns whether the body ended by its framing (a
/// close-delimited one ends the upstream connection).
pub(crate) async fn copy_response<U, C>(
    upstream: &mut U,
    buf: &mut BytesMut,
    client: &mut C,
    out: &mut Vec<u8>,
    framing: Framing,
    decode: bool,
) -> Result<bool, BodyError>
where
    U: AsyncRead + Unpin,
    C: AsyncWrite + Unpin,
{
    match framing {
        Framing::None => {
            client
                .write_all(out)
                .await
                .map_err(BodyError::ClientWrite)?;
            Ok(true)
        }
        Framing::Length(n) => {
            let have = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
            out.extend_from_slice(&buf[..have]);
            buf.advance(have);
            let mut left = n - have as u64;
            client
                .write_all(out)
                .await
                .map_err(BodyError::ClientWrite)?;
            while left > 0 {
                buf.reserve(COPY_BUF);
                let got = match upstream.read_buf(buf).await {
                    Ok(0) => return Err(BodyError::UpstreamClosed),
                    Err(e) => return Err(BodyError::UpstreamRead(e)),
                    Ok(g) => g,
                };
                let take = usize::try_from(left).unwrap_or(usize::MAX).min(got);
                client
                    .write_all(&buf[..take])
                    .await
                    .map_err(BodyError::ClientWrite)?;
                buf.advance(take);
                left -= take as u64;
            }
            Ok(true)
        }
        Framing::Chunked => {
            let mut scanner = ChunkedScanner::default();
            let mut sent_any = false;
            loop {
                let used = if decode {
                    scanner.feed(&buf[..], |d| out.extend_from_slice(d))
                } else {
                    let used = scanner.feed(&buf[..], |_| {});
                    if let Ok(u) = used {
                        out.extend_from_slice(&buf[..u]);
                    }
                    used
                };
                let Ok(used) = used else {
                    return Err(BodyError::UpstreamMalformed { sent_any });
                };
                buf.advance(used);
                client
                    .write_all(out)
                    .await
                    .map_err(BodyError::ClientWrite)?;
                sent_any = true;
                out.clear();
                if scanner.is_done() {
                    return Ok(true);
                }
                buf.reserve(COPY_BUF);
                match upstream.read_buf(buf).await {
                    Ok(0) => return Err(BodyError::UpstreamClosed),
                    Err(e) => return Err(BodyError::UpstreamRead(e)),
                    Ok(_) => {}
                }
            }
        }
        Framing::Close => {
            out.extend_from_slice(buf);
            buf.clear();
            client
                .write_all(out)
                .await
                .map_err(BodyError::ClientWrite)?;
            loop {
                buf.reserve(COPY_BUF);
                match upstream.read_buf(buf).await {
                    Ok(0) => return Ok(false),
                    Err(e) => return Err(BodyError::UpstreamRead(e)),
                    Ok(_) => {}
                }
                client
                    .write_all(buf)
                    .await
                    .map_err(BodyError::ClientWrite)?;
                buf.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Copies `body` (what came with the head) and `more` (read from the
    /// upstream afterwards) after the head `HEAD`; returns what the client
    /// got, what is left in the buffer, and the result.
    async fn response(
        framing: Framing,
        decode: bool,
        with_head: &[u8],
        more: &[u8],
    ) -> (Vec<u8>, Vec<u8>, Result<bool, BodyError>) {
        let mut upstream = more;
        let mut buf = BytesMut::from(with_head);
        let mut client = Vec::new();
        let mut out = b"HEAD\n".to_vec();
        let r = copy_response(
            &mut upstream,
            &mut buf,
            &mut client,
            &mut out,
            framing,
            decode,
        )
        .await;
        (client, buf.to_vec(), r)
    }

    #[tokio::test]
    async fn content_length_copies_exactly_that_many_bytes() {
        let (got, left, r) = response(Framing::Length(10), false, b"0123", b"456789NEXT").await;
        assert!(r.unwrap());
        assert_eq!(got, b"HEAD\n0123456789");
        // Bytes past the body stay (the connection is out of step).
        assert_eq!(left, b"NEXT");
        let (got, left, r) = response(Framing::Length(2), false, b"abcd", b"").await;
        assert!(r.unwrap());
        assert_eq!(
            (got.as_slice(), left.as_slice()),
            (&b"HEAD\nab"[..], &b"cd"[..])
        );
        let (_, _, r) = response(Framing::Length(10), false, b"0123", b"45").await;
        assert!(matches!(r, Err(BodyError::UpstreamClosed)), "{r:?}");
    }

    #[tokio::test]
    async fn chunked_bodies_pass_with_extensions_and_trailers() {
        let body = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nx-trailer: t\r\n\r\n";
        for split in [0, 3, 12, body.len()] {
            let (got, left, r) =
                response(Framing::Chunked, false, &body[..split], &body[split..]).await;
            assert!(r.unwrap(), "split {split}");
            assert_eq!(&got[5..], body, "split {split}");
            assert!(left.is_empty());
        }
        // Decoded for an HTTP/1.0 client: the data only.
        let (got, _, r) = response(Framing::Chunked, true, &body[..9], &body[9..]).await;
        assert!(r.unwrap());
        assert_eq!(got, b"HEAD\nWikipedia");
    }

    #[tokio::test]
    async fn a_broken_chunked_body_says_whether_anything_was_sent() {
        let (got, _, r) = response(Framing::Chunked, false, b"zz\r\n", b"").await;
        assert!(
            matches!(r, Err(BodyError::UpstreamMalformed { sent_any: false })),
            "{r:?}"
        );
        assert!(got.is_empty());
        let (got, _, r) = response(Framing::Chunked, false, b"4\r\nWiki\r\n", b"\n\n").await;
        assert!(
            matches!(r, Err(BodyError::UpstreamMalformed { sent_any: true })),
            "{r:?}"
        );
        assert_eq!(got, b"HEAD\n4\r\nWiki\r\n");
        let (_, _, r) = response(Framing::Chunked, false, b"4\r\nWi", b"").await;
        assert!(matches!(r, Err(BodyError::UpstreamClosed)), "{r:?}");
    }

    #[tokio::test]
    async fn close_delimited_bodies_run_to_the_close() {
        let (got, left, r) = response(Framing::Close, false, b"abc", b"defg").await;
        assert!(!r.unwrap(), "the connection ends with the body");
        assert_eq!(got, b"HEAD\nabcdefg");
        assert!(left.is_empty());
    }

    #[tokio::test]
    async fn head_204_and_304_have_no_body() {
        let fields = crate::h1::Fields {
            content_length: Some(5),
            ..Default::default()
        };
        for (method, status) in [("HEAD", 200), ("GET", 204), ("GET", 304)] {
            let framing = fields.response_framing(method, status);
            assert_eq!(framing, Framing::None, "{method} {status}");
            let (got, left, r) = response(framing, false, b"hello", b"").await;
            assert!(r.unwrap());
            assert_eq!(got, b"HEAD\n");
            // Whatever follows is not this response's.
            assert_eq!(left, b"hello");
        }
    }

    /// Sends a request body framed by `framing`; `rest` came with the
    /// head, `later` comes from the client afterwards. Returns what the
    /// upstream got, how much of `rest` was used, and the spill.
    async fn request(
        framing: Framing,
        rest: &[u8],
        later: &[u8],
        send_continue: bool,
    ) -> (Vec<u8>, Result<usize, BodyError>, Vec<u8>, Vec<u8>) {
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        theirs.write_all(later).await.unwrap();
        // The client sends nothing more.
        theirs.shutdown().await.unwrap();
        let mut copy = Vec::new();
        let mut spill = BytesMut::new();
        let mut last_active = Instant::now();
        let mut timer = Timer::new(last_active + Duration::from_secs(5));
        let mut upstream = Vec::new();
        let mut out = b"HEAD\n".to_vec();
        let client = ClientBody {
            stream: &mut ours,
            copy: &mut copy,
            spill: &mut spill,
            timer: &mut timer,
            last_active: &mut last_active,
            timeout: Duration::from_secs(5),
            send_continue,
        };
        let r = send_request(client, &mut upstream, &mut out, rest, framing).await;
        drop(ours);
        let mut to_client = Vec::new();
        theirs.read_to_end(&mut to_client).await.unwrap();
        (upstream, r, spill.to_vec(), to_client)
    }

    #[tokio::test]
    async fn request_bodies_by_length_and_chunks() {
        let (up, r, _, said) = request(Framing::Length(6), b"abc", b"defNEXT", true).await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(up, b"HEAD\nabcdef");
        assert_eq!(said, b"HTTP/1.1 100 Continue\r\n\r\n");
        // All of it came with the head: no `100 Continue`.
        let (up, r, _, said) = request(Framing::Length(3), b"abcNEXT", b"", true).await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(up, b"HEAD\nabc");
        assert!(said.is_empty());
        let body = b"3;x=y\r\nabc\r\n0\r\nt: 1\r\n\r\n";
        let (up, r, spill, _) = request(Framing::Chunked, &body[..4], b"", false).await;
        assert!(matches!(r, Err(BodyError::ClientClosed)), "{r:?}");
        assert_eq!(up, b"HEAD\n3;x=");
        assert!(spill.is_empty());
        let mut later = body[4..].to_vec();
        later.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (up, r, spill, _) = request(Framing::Chunked, &body[..4], &later, false).await;
        assert_eq!(r.unwrap(), 4);
        assert_eq!(&up[5..], body);
        assert_eq!(spill, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_broken_chunked_request_is_the_clients_fault() {
        let (up, r, _, _) = request(Framing::Chunked, b"3\r\nabc\r\nx\r\n", b"", false).await;
        assert!(
            matches!(r, Err(BodyError::ClientMalformed(Malformed::Chunk))),
            "{r:?}"
        );
        assert!(up.is_empty());
        let (_, r, _, _) = request(Framing::None, b"ignored", b"", false).await;
        assert_eq!(r.unwrap(), 0);
    }
}
