//! A lean HTTP/1.1 client for one connection at a time.
//!
//! The load generator must not be the bottleneck, so this is deliberately
//! small: the request is built once and written as one buffer, the response
//! is parsed in place (httparse) in a buffer owned by the client and reused
//! for every request, and bodies are skipped without being copied anywhere.
//!
//! It never retries. Whatever goes wrong with a request, including on a
//! reused keep-alive connection that the server closed while it was idle, is
//! reported as that request's [`ErrorClass`] and the connection is dropped;
//! the next request starts on a fresh connection.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::config::{Mode, Target};
use crate::outcome::ErrorClass;

/// Size of the per-connection read buffer; a response head must fit in it.
const BUF_SIZE: usize = 16 * 1024;
/// Most response headers we parse.
const MAX_HEADERS: usize = 64;

/// A client that sends GET requests to one target, one at a time.
#[derive(Debug)]
pub(crate) struct Client {
    addr: SocketAddr,
    mode: Mode,
    request: Box<[u8]>,
    conn: Option<TcpStream>,
    buf: Box<[u8]>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

/// What a successful exchange produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
}

/// The parts of a response head we act on.
#[derive(Debug, Clone, Copy)]
struct Head {
    status: u16,
    body: BodyKind,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy)]
enum BodyKind {
    None,
    Length(u64),
    Chunked,
    UntilEof,
}

/// Build the request bytes sent for every request.
pub(crate) fn build_request(target: &Target, mode: Mode) -> Vec<u8> {
    let connection = match mode {
        Mode::KeepAlive => "keep-alive",
        Mode::Close => "close",
    };
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: baton-bench\r\nAccept: */*\r\nConnection: {}\r\n\r\n",
        target.path(),
        target.authority(),
        connection
    )
    .into_bytes()
}

impl Client {
    pub(crate) fn new(target: &Target, mode: Mode) -> Self {
        Self {
            addr: target.addr(),
            mode,
            request: build_request(target, mode).into_boxed_slice(),
            conn: None,
            buf: vec![0u8; BUF_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Send one request and read its complete response, all before
    /// `deadline`.
    ///
    /// `Ok` carries any complete response, whatever its status; the caller
    /// classifies the status.
    pub(crate) async fn request(&mut self, deadline: Instant) -> Result<Response, ErrorClass> {
        let result = self.exchange(deadline).await;
        match &result {
            Ok(_) => {}
            Err(_) => self.disconnect(),
        }
        result
    }

    fn disconnect(&mut self) {
        self.conn = None;
        self.start = 0;
        self.end = 0;
    }

    async fn exchange(&mut self, deadline: Instant) -> Result<Response, ErrorClass> {
        if self.conn.is_none() {
            let stream = match timeout_at(deadline, TcpStream::connect(self.addr)).await {
                Err(_elapsed) => return Err(ErrorClass::ConnectTimeout),
                Ok(Err(e)) => return Err(classify_connect(&e)),
                Ok(Ok(s)) => s,
            };
            // Requests are small and latency is what we measure.
            let _ = stream.set_nodelay(true);
            self.conn = Some(stream);
            self.start = 0;
            self.end = 0;
        }
        let head = match timeout_at(deadline, self.send_and_read()).await {
            Err(_elapsed) => return Err(ErrorClass::ResponseTimeout),
            Ok(result) => result?,
        };
        if !head.keep_alive || self.mode == Mode::Close {
            // The server said this connection ends here (or we did): not an
            // error, the next request simply connects again.
            self.disconnect();
        }
        Ok(Response {
            status: head.status,
        })
    }

    async fn send_and_read(&mut self) -> Result<Head, ErrorClass> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(ErrorClass::Other);
        };
        conn.write_all(&self.request)
            .await
            .map_err(|e| classify_io(&e))?;
        let head = loop {
            let head = self.read_head().await?;
            // Interim responses (100 Continue, 103 Early Hints) precede the
            // real one; 101 would switch protocols, which we never ask for.
            if (100..200).contains(&head.status) && head.status != 101 {
                continue;
            }
            break head;
        };
        match head.body {
            BodyKind::None => {}
            BodyKind::Length(n) => self.skip(n).await?,
            BodyKind::Chunked => self.skip_chunked().await?,
            BodyKind::UntilEof => self.skip_to_eof().await?,
        }
        Ok(head)
    }

    /// Read more bytes into the buffer, compacting it first if needed.
    /// EOF is an error: every caller still expects bytes.
    async fn fill(&mut self) -> Result<(), ErrorClass> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start == 0 {
                // A head or chunk line larger than the whole buffer.
                return Err(ErrorClass::Other);
            }
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(ErrorClass::Other);
        };
        match conn.read(&mut self.buf[self.end..]).await {
            Ok(0) => Err(ErrorClass::ClosedEarly),
            Ok(n) => {
                self.end += n;
                Ok(())
            }
            Err(e) => Err(classify_io(&e)),
        }
    }

    async fn read_head(&mut self) -> Result<Head, ErrorClass> {
        loop {
            if self.start < self.end {
                if let Some((consumed, head)) = parse_head(&self.buf[self.start..self.end])? {
                    self.start += consumed;
                    return Ok(head);
                }
            }
            self.fill().await?;
        }
    }

    async fn skip(&mut self, mut n: u64) -> Result<(), ErrorClass> {
        loop {
            let avail = (self.end - self.start) as u64;
            if avail >= n {
                // `n` fits in usize here because it is at most `avail`.
                self.start += n as usize;
                return Ok(());
            }
            n -= avail;
            self.start = self.end;
            self.fill().await?;
        }
    }

    /// Consume one CRLF-terminated line and return it without the line end.
    async fn line(&mut self) -> Result<(usize, usize), ErrorClass> {
        loop {
            let window = &self.buf[self.start..self.end];
            if let Some(pos) = window.iter().position(|b| *b == b'\n') {
                let line_start = self.start;
                let mut line_end = self.start + pos;
                if line_end > line_start && self.buf[line_end - 1] == b'\r' {
                    line_end -= 1;
                }
                self.start += pos + 1;
                return Ok((line_start, line_end));
            }
            self.fill().await?;
        }
    }

    async fn skip_chunked(&mut self) -> Result<(), ErrorClass> {
        loop {
            let (s, e) = self.line().await?;
            let size = parse_chunk_size(&self.buf[s..e]).ok_or(ErrorClass::Other)?;
            if size == 0 {
                // Trailer section, ended by an empty line.
                loop {
                    let (s, e) = self.line().await?;
                    if s == e {
                        return Ok(());
                    }
                }
            }
            // The chunk data and the CRLF after it.
            self.skip(size.saturating_add(2)).await?;
        }
    }

    async fn skip_to_eof(&mut self) -> Result<(), ErrorClass> {
        self.start = 0;
        self.end = 0;
        let Some(conn) = self.conn.as_mut() else {
            return Err(ErrorClass::Other);
        };
        loop {
            match conn.read(&mut self.buf[..]).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(classify_io(&e)),
            }
        }
    }
}

/// Parse a response head; `Ok(None)` if more bytes are needed.
fn parse_head(bytes: &[u8]) -> Result<Option<(usize, Head)>, ErrorClass> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let consumed = match response.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ErrorClass::Other),
    };
    let status = response.code.ok_or(ErrorClass::Other)?;
    let http11 = response.version == Some(1);
    let mut content_length = None;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    for header in response.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(ErrorClass::Other)?;
            if content_length.is_some_and(|m| m != n) {
                return Err(ErrorClass::Other);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked is meaningful only as the last coding.
            chunked = header
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        BodyKind::None
    } else if chunked {
        BodyKind::Chunked
    } else if let Some(n) = content_length {
        BodyKind::Length(n)
    } else {
        BodyKind::UntilEof
    };
    let keep_alive = !close && (http11 || keep_alive_token) && !matches!(body, BodyKind::UntilEof);
    Ok(Some((
        consumed,
        Head {
            status,
            body,
            keep_alive,
        },
    )))
}

/// Hex chunk size, ignoring chunk extensions.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|b| *b == b';').next()?.trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let mut size = 0u64;
    for b in digits {
        let d = (*b as char).to_digit(16)?;
        size = size * 16 + u64::from(d);
    }
    Some(size)
}

fn classify_connect(e: &io::Error) -> ErrorClass {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorClass::ConnectRefused,
        io::ErrorKind::TimedOut => ErrorClass::ConnectTimeout,
        _ => classify_io(e),
    }
}

fn classify_io(e: &io::Error) -> ErrorClass {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => ErrorClass::Reset,
        io::ErrorKind::UnexpectedEof => ErrorClass::ClosedEarly,
        io::ErrorKind::TimedOut => ErrorClass::ResponseTimeout,
        _ => ErrorClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads() {
        let (n, h) = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(n, 38);
        assert_eq!(h.status, 200);
        assert!(h.keep_alive);
        assert!(matches!(h.body, BodyKind::Length(5)));

        let (_, h) = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.body, BodyKind::Chunked));

        let (_, h) =
            parse_head(b"HTTP/1.1 503 x\r\nConnection: Close\r\ncontent-length: 0\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.status, 503);
        assert!(!h.keep_alive);

        let (_, h) = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let (_, h) =
            parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(h.keep_alive);

        let (_, h) = parse_head(b"HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(matches!(h.body, BodyKind::UntilEof));
        assert!(!h.keep_alive);

        let (_, h) = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(h.body, BodyKind::None));
        assert!(h.keep_alive);

        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none());
        assert_eq!(
            parse_head(b"SSH-2.0-x\r\n\r\n").unwrap_err(),
            ErrorClass::Other
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").unwrap_err(),
            ErrorClass::Other
        );
    }

    #[test]
    fn parses_chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a"), Some(26));
        assert_eq!(parse_chunk_size(b"0"), Some(0));
        assert_eq!(parse_chunk_size(b"10;ext=1"), Some(16));
        assert_eq!(parse_chunk_size(b""), None);
        assert_eq!(parse_chunk_size(b"zz"), None);
    }

    #[test]
    fn builds_requests() {
        let t = Target::parse("http://127.0.0.1:8080/x?y").unwrap();
        let r = String::from_utf8(build_request(&t, Mode::Close)).unwrap();
        assert!(r.starts_with("GET /x?y HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(r.contains("\r\nConnection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
    }
}

#[cfg(test)]
mod socket_tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn closed_port_is_connect_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let target = Target::parse(&format!("http://{addr}/")).unwrap();
        let mut client = Client::new(&target, Mode::KeepAlive);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            client.request(deadline).await.unwrap_err(),
            ErrorClass::ConnectRefused
        );
    }
}
