//! The HTTP/1.x pieces a proxy needs, on [`httparse`]: message framing,
//! hop-by-hop header rules, a chunked-coding scanner and head writing.
//!
//! The proxy forwards heads as bytes: a request or response head is parsed
//! in place (no header map is built), checked, and written out again with
//! the hop-by-hop headers left out and the proxy's own added. Bodies are
//! copied as they come; the chunked scanner only finds where a chunked body
//! ends (or, for an HTTP/1.0 client, takes the coding off).

use std::fmt;

/// Longest request or response head accepted (nginx's
/// `large_client_header_buffers` default is 4 × 8 KiB).
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// Most header fields in one head.
pub(crate) const MAX_HEADERS: usize = 128;

/// Why a message cannot be proxied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// The head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`]
    /// fields.
    TooLarge,
    /// `Content-Length` is invalid, or given more than once.
    ContentLength,
    /// A `Transfer-Encoding` other than one ending in `chunked` (requests),
    /// both `Transfer-Encoding` and `Content-Length` in a request, or
    /// `Transfer-Encoding` in an HTTP/1.0 request.
    TransferEncoding,
    /// A request with more than one `Host` field.
    Host,
    /// A chunked body does not follow the coding.
    Chunk,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::TooLarge => "head too large",
            Malformed::ContentLength => "invalid content-length",
            Malformed::TransferEncoding => "unsupported transfer-encoding",
            Malformed::Host => "more than one host field",
            Malformed::Chunk => "malformed chunked body",
        })
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

/// What the proxy needs to know of a head's fields.
#[derive(Debug, Default)]
pub(crate) struct Fields {
    /// `Content-Length`, if given (once).
    pub(crate) content_length: Option<u64>,
    /// How many `Host` fields there are.
    pub(crate) hosts: u8,
    /// `Transfer-Encoding` given.
    pub(crate) transfer_encoding: bool,
    /// The last transfer coding is `chunked`.
    pub(crate) chunked: bool,
    /// `Connection: close`.
    pub(crate) close: bool,
    /// `Connection: keep-alive`.
    pub(crate) keep_alive: bool,
    /// `Connection: upgrade`.
    pub(crate) upgrade: bool,
    /// `Expect: 100-continue`.
    pub(crate) expect_continue: bool,
}

impl Fields {
    /// Reads the fields of `headers` that decide framing and persistence.
    /// `Content-Length` given twice is refused even with the same value
    /// (senders that repeat it are rare; recipients that merge repeated
    /// fields into `5, 5` and then read it differently are not).
    pub(crate) fn of(headers: &[httparse::Header<'_>]) -> Result<Fields, Malformed> {
        let mut f = Fields::default();
        for h in headers {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_length(h.value).ok_or(Malformed::ContentLength)?;
                if f.content_length.is_some() {
                    return Err(Malformed::ContentLength);
                }
                f.content_length = Some(n);
            } else if name.eq_ignore_ascii_case(b"host") {
                f.hosts = f.hosts.saturating_add(1);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                f.transfer_encoding = true;
                // The last coding decides; a later field continues the list.
                if let Some(last) = tokens(h.value).last() {
                    f.chunked = last.eq_ignore_ascii_case(b"chunked");
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        f.close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        f.keep_alive = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        f.upgrade = true;
                    }
                }
            } else if name.eq_ignore_ascii_case(b"expect") {
                f.expect_continue = trim(h.value).eq_ignore_ascii_case(b"100-continue");
            }
        }
        Ok(f)
    }

    /// The framing of a request body (RFC 9112 §6.3): a request with both
    /// `Transfer-Encoding` and `Content-Length`, with a transfer coding
    /// that does not end in `chunked`, with `Transfer-Encoding` from an
    /// HTTP/1.0 client (`http10`), or with two `Host` fields is refused
    /// (the classic request smuggling vectors).
    pub(crate) fn request_framing(&self, http10: bool) -> Result<Framing, Malformed> {
        if self.hosts > 1 {
            return Err(Malformed::Host);
        }
        if self.transfer_encoding {
            if !self.chunked || self.content_length.is_some() || http10 {
                return Err(Malformed::TransferEncoding);
            }
            return Ok(Framing::Chunked);
        }
        Ok(match self.content_length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        })
    }

    /// The framing of a response body to a request with `method`.
    pub(crate) fn response_framing(&self, method: &str, status: u16) -> Framing {
        if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
            return Framing::None;
        }
        if self.transfer_encoding {
            return if self.chunked {
                Framing::Chunked
            } else {
                Framing::Close
            };
        }
        match self.content_length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    }
}

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The comma-separated tokens of a field value, trimmed, empty ones left
/// out.
pub(crate) fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(trim).filter(|t| !t.is_empty())
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &v[start..end]
}

/// Hop-by-hop fields (RFC 9110 §7.6.1) that a proxy never forwards, plus
/// the ones the proxy writes itself (`Transfer-Encoding` is written again
/// when the body stays chunked).
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    const HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Fields a `Connection` token can never remove: the ones that frame or
/// route a message, and the ones the proxy writes itself. Such a token is
/// ignored (the field is handled as if it were not listed), in requests
/// and responses alike: `Connection: content-length` would otherwise make
/// the proxy frame a body by a length the next hop never sees.
pub(crate) fn is_protected(name: &[u8]) -> bool {
    const PROTECTED: [&[u8]; 6] = [
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"forwarded",
    ];
    PROTECTED.iter().any(|p| name.eq_ignore_ascii_case(p))
}

/// The field names listed in the `Connection` fields of `headers` (other
/// than the ones with a meaning of their own and the [protected
/// ones](is_protected)), which are hop-by-hop too.
pub(crate) fn connection_listed<'h>(headers: &[httparse::Header<'h>]) -> Vec<&'h [u8]> {
    let mut listed = Vec::new();
    for h in headers {
        if h.name.eq_ignore_ascii_case("connection") {
            for t in tokens(h.value) {
                if !t.eq_ignore_ascii_case(b"close")
                    && !t.eq_ignore_ascii_case(b"keep-alive")
                    && !t.eq_ignore_ascii_case(b"upgrade")
                    && !is_protected(t)
                {
                    listed.push(t);
                }
            }
        }
    }
    listed
}

/// Writes `name: value\r\n`.
pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes a complete short response: status line, `Content-Type`,
/// `Content-Length`, `Connection` as [`put_connection`] says, and `body`
/// unless `with_body` is false (an answer to `HEAD`).
pub(crate) fn put_response(
    out: &mut Vec<u8>,
    status: http::StatusCode,
    content_type: &[u8],
    body: &[u8],
    keep: bool,
    http10: bool,
    with_body: bool,
) {
    put_status_line(
        out,
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
    );
    put_header(out, b"content-type", content_type);
    put_header(out, b"content-length", itoa(body.len() as u64).as_bytes());
    put_connection(out, keep, http10);
    out.extend_from_slice(b"\r\n");
    if with_body {
        out.extend_from_slice(body);
    }
}

/// `Connection` for a client: `close` if the connection ends after the
/// response, `keep-alive` for an HTTP/1.0 client it persists for, nothing
/// otherwise (HTTP/1.1 persists by default).
pub(crate) fn put_connection(out: &mut Vec<u8>, keep: bool, http10: bool) {
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// Writes `HTTP/1.1 CODE REASON\r\n`.
pub(crate) fn put_status_line(out: &mut Vec<u8>, code: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa(u64::from(code)).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A number as decimal text, without allocating.
pub(crate) fn itoa(mut n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

/// Decimal digits of a `u64`.
#[derive(Debug)]
pub(crate) struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    /// The digits.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Finds the end of a chunked body in a byte stream fed piece by piece,
/// and tells which bytes are chunk data.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChunkedScanner {
    state: ChunkState,
    size: u64,
    /// Digits seen in the current size line.
    digits: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hexadecimal size.
    #[default]
    Size,
    /// After the size: blanks before `;` or the line's end.
    SizeWs,
    /// Extensions, up to the line's end.
    Ext,
    /// Expecting `\n` after the size line's `\r`.
    SizeLf,
    /// Inside chunk data.
    Data,
    /// Expecting `\r` after chunk data.
    DataCr,
    /// Expecting `\n` after chunk data.
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field's name.
    TrailerName,
    /// Inside a trailer field's value.
    TrailerValue,
    /// Expecting `\n` ending a trailer line.
    TrailerLf,
    /// Expecting `\n` ending the body.
    EndLf,
    /// The body has ended.
    Done,
}

/// A `tchar` of RFC 9110 §5.6.2 (a field name's characters).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A control character other than HTAB (never inside a line).
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

impl ChunkedScanner {
    /// Whether the body has ended.
    pub(crate) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Scans `buf`: returns how many bytes belong to the body (all of
    /// `buf` unless the body ends inside it) and calls `data` with each run
    /// of chunk data among them.
    ///
    /// Strict where other parsers are lenient, so that no next hop can end
    /// the body elsewhere: every line ends in CRLF (a bare LF anywhere, in
    /// a size line, an extension, after data or in a trailer, is an
    /// error), a size line is hex digits, optional blanks, then `;`
    /// extensions without control characters, and a trailer line is a
    /// field (`name: value`, no obs-fold, no control characters).
    pub(crate) fn feed(
        &mut self,
        buf: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, Malformed> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                ChunkState::Size => match (b as char).to_digit(16) {
                    Some(d) if self.digits < 16 => {
                        self.size = self.size << 4 | u64::from(d);
                        self.digits += 1;
                    }
                    Some(_) => return Err(Malformed::Chunk),
                    None if self.digits == 0 => return Err(Malformed::Chunk),
                    None if b == b'\r' => self.state = ChunkState::SizeLf,
                    None if b == b';' => self.state = ChunkState::Ext,
                    None if b == b' ' || b == b'\t' => self.state = ChunkState::SizeWs,
                    None => return Err(Malformed::Chunk),
                },
                ChunkState::SizeWs => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = ChunkState::Ext,
                    b'\r' => self.state = ChunkState::SizeLf,
                    _ => return Err(Malformed::Chunk),
                },
                ChunkState::Ext => {
                    if b == b'\r' {
                        self.state = ChunkState::SizeLf;
                    } else if is_ctl(b) {
                        return Err(Malformed::Chunk);
                    }
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(Malformed::Chunk);
                    }
                    self.digits = 0;
                    self.state = if self.size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    let n = (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    data(&buf[i..i + n]);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(Malformed::Chunk);
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(Malformed::Chunk);
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerStart => {
                    self.state = if b == b'\r' {
                        ChunkState::EndLf
                    } else if is_tchar(b) {
                        ChunkState::TrailerName
                    } else {
                        return Err(Malformed::Chunk);
                    };
                }
                ChunkState::TrailerName => {
                    if b == b':' {
                        self.state = ChunkState::TrailerValue;
                    } else if !is_tchar(b) {
                        return Err(Malformed::Chunk);
                    }
                }
                ChunkState::TrailerValue => {
                    if b == b'\r' {
                        self.state = ChunkState::TrailerLf;
                    } else if is_ctl(b) {
                        return Err(Malformed::Chunk);
                    }
                }
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err(Malformed::Chunk);
                    }
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::EndLf => {
                    if b != b'\n' {
                        return Err(Malformed::Chunk);
                    }
                    self.state = ChunkState::Done;
                    return Ok(i + 1);
                }
                ChunkState::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(raw: &[(&'static str, &'static [u8])]) -> Result<Fields, Malformed> {
        let headers: Vec<httparse::Header<'_>> = raw
            .iter()
            .map(|(n, v)| httparse::Header { name: n, value: v })
            .collect();
        Fields::of(&headers)
    }

    #[test]
    fn request_framing_refuses_smuggling_vectors() {
        let f = fields(&[("Content-Length", b"12")]).unwrap();
        assert_eq!(f.request_framing(false), Ok(Framing::Length(12)));
        let f = fields(&[("content-length", b"0")]).unwrap();
        assert_eq!(f.request_framing(false), Ok(Framing::None));
        let f = fields(&[]).unwrap();
        assert_eq!(f.request_framing(false), Ok(Framing::None));
        let f = fields(&[("Transfer-Encoding", b"gzip, chunked")]).unwrap();
        assert_eq!(f.request_framing(false), Ok(Framing::Chunked));
        // Both: refused.
        let f = fields(&[("Transfer-Encoding", b"chunked"), ("Content-Length", b"5")]).unwrap();
        assert_eq!(f.request_framing(false), Err(Malformed::TransferEncoding));
        // Not ending in chunked: refused.
        let f = fields(&[("Transfer-Encoding", b"chunked, gzip")]).unwrap();
        assert_eq!(f.request_framing(false), Err(Malformed::TransferEncoding));
        // Two different lengths, a sign, garbage, overflow: refused.
        assert!(fields(&[("Content-Length", b"5"), ("Content-Length", b"6")]).is_err());
        assert!(fields(&[("Content-Length", b"+5")]).is_err());
        assert!(fields(&[("Content-Length", b"5, 5")]).is_err());
        assert!(fields(&[("Content-Length", b"99999999999999999999")]).is_err());
        // The same length twice: refused too (a duplicate line is a 400).
        assert_eq!(
            fields(&[("Content-Length", b"5"), ("content-length", b" 5 ")]).err(),
            Some(Malformed::ContentLength)
        );
        assert_eq!(
            fields(&[("Content-Length", b"0"), ("Content-Length", b"0")]).err(),
            Some(Malformed::ContentLength)
        );
    }

    #[test]
    fn http10_with_transfer_encoding_and_two_hosts_are_refused() {
        let f = fields(&[("Transfer-Encoding", b"chunked")]).unwrap();
        assert_eq!(f.request_framing(false), Ok(Framing::Chunked));
        assert_eq!(f.request_framing(true), Err(Malformed::TransferEncoding));
        // HTTP/1.0 with a length is fine.
        let f = fields(&[("Content-Length", b"3")]).unwrap();
        assert_eq!(f.request_framing(true), Ok(Framing::Length(3)));
        let f = fields(&[("Host", b"a"), ("host", b"b")]).unwrap();
        assert_eq!(f.request_framing(false), Err(Malformed::Host));
        let f = fields(&[("Host", b"a"), ("host", b"a")]).unwrap();
        assert_eq!(f.request_framing(false), Err(Malformed::Host));
        let f = fields(&[("Host", b"a")]).unwrap();
        assert_eq!(f.request_framing(false), Ok(Framing::None));
    }

    #[test]
    fn connection_cannot_name_framing_routing_or_proxy_fields() {
        let headers = [
            httparse::Header {
                name: "Connection",
                value: b"Content-Length, host, x-secret",
            },
            httparse::Header {
                name: "connection",
                value: b"TRANSFER-ENCODING,X-Forwarded-For, forwarded, x-forwarded-proto",
            },
            httparse::Header {
                name: "Content-Length",
                value: b"5",
            },
        ];
        assert_eq!(connection_listed(&headers), vec![&b"x-secret"[..]]);
        // The framing is read as if `Connection` did not name the field.
        let f = Fields::of(&headers).unwrap();
        assert_eq!(f.request_framing(false), Ok(Framing::Length(5)));
        assert_eq!(f.response_framing("GET", 200), Framing::Length(5));
        for name in [
            "content-length",
            "Transfer-Encoding",
            "HOST",
            "x-forwarded-for",
        ] {
            assert!(is_protected(name.as_bytes()), "{name}");
        }
        assert!(!is_protected(b"x-secret"));
    }

    #[test]
    fn response_framing() {
        let f = fields(&[("Content-Length", b"3")]).unwrap();
        assert_eq!(f.response_framing("GET", 200), Framing::Length(3));
        assert_eq!(f.response_framing("HEAD", 200), Framing::None);
        assert_eq!(f.response_framing("GET", 304), Framing::None);
        assert_eq!(f.response_framing("GET", 204), Framing::None);
        let f = fields(&[("Transfer-Encoding", b"chunked"), ("Content-Length", b"3")]).unwrap();
        assert_eq!(f.response_framing("GET", 200), Framing::Chunked);
        let f = fields(&[]).unwrap();
        assert_eq!(f.response_framing("GET", 200), Framing::Close);
        let f = fields(&[("Transfer-Encoding", b"gzip")]).unwrap();
        assert_eq!(f.response_framing("GET", 200), Framing::Close);
    }

    #[test]
    fn connection_tokens() {
        let f = fields(&[
            ("Connection", b"Keep-Alive, Upgrade"),
            ("Connection", b"close"),
        ])
        .unwrap();
        assert!(f.keep_alive && f.upgrade && f.close);
        let headers = [httparse::Header {
            name: "Connection",
            value: b"keep-alive, x-secret ,, X-Other",
        }];
        assert_eq!(
            connection_listed(&headers),
            vec![&b"x-secret"[..], b"X-Other"]
        );
        assert!(is_hop_by_hop("Transfer-Encoding"));
        assert!(!is_hop_by_hop("x-kept"));
    }

    fn scan_all(pieces: &[&[u8]]) -> Result<(usize, Vec<u8>, bool), Malformed> {
        let mut s = ChunkedScanner::default();
        let mut used = 0;
        let mut data = Vec::new();
        for p in pieces {
            used += s.feed(p, |d| data.extend_from_slice(d))?;
            if s.is_done() {
                break;
            }
        }
        Ok((used, data, s.is_done()))
    }

    #[test]
    fn chunked_scanner_finds_the_end_byte_by_byte_and_at_once() {
        let body = b"5\r\nhello\r\nA;ext=1\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let (used, data, done) = scan_all(&[body]).unwrap();
        assert!(done);
        assert_eq!(&body[used..], b"NEXT");
        assert_eq!(data, b"hello0123456789");
        let pieces: Vec<&[u8]> = body.chunks(1).collect();
        let (used, data, done) = scan_all(&pieces).unwrap();
        assert!(done);
        assert_eq!(used, body.len() - 4);
        assert_eq!(data, b"hello0123456789");
        // Unfinished.
        let (used, _, done) = scan_all(&[b"5\r\nhel"]).unwrap();
        assert!(!done);
        assert_eq!(used, 6);
    }

    #[test]
    fn chunked_scanner_refuses_bad_coding() {
        assert!(scan_all(&[b"x\r\n"]).is_err());
        assert!(scan_all(&[b"\r\n"]).is_err());
        assert!(scan_all(&[b"3\r\nabcX"]).is_err());
        assert!(scan_all(&[b"3\nabc"]).is_err());
        assert!(scan_all(&[b"11111111111111111\r\n"]).is_err());
        // Blanks after the size: only before `;` or the line's end.
        assert!(scan_all(&[b"3 \t;e=1\r\nabc\r\n0\r\n\r\n"]).unwrap().2);
        assert!(scan_all(&[b"3 4\r\nabc\r\n"]).is_err());
        assert!(scan_all(&[b"3;a\0b\r\nabc\r\n"]).is_err());
    }

    /// A bare LF anywhere in the chunked framing is an error, whether the
    /// bytes come at once or one by one (nginx and Node end lines at a bare
    /// LF: a scanner that does not would end the body elsewhere).
    #[test]
    fn chunked_scanner_refuses_a_bare_lf_anywhere() {
        let bad: [&[u8]; 10] = [
            // In the size line.
            b"3\nabc\r\n0\r\n\r\n",
            b"3 \nabc\r\n0\r\n\r\n",
            // In an extension.
            b"3;ext\nabc\r\n0\r\n\r\n",
            b"3;ext\n\r\nabc\r\n0\r\n\r\n",
            // At the end of data.
            b"3\r\nabc\n0\r\n\r\n",
            // In the last chunk's line.
            b"0\n\r\n",
            // In a trailer and at the end.
            b"0\r\nX: y\n\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
            b"0\r\nX: y\r\n\n",
            b"0\r\n\n",
            b"0\r\nX: y\nZ: w\r\n\r\n",
        ];
        for body in bad {
            assert!(
                scan_all(&[body]).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            let pieces: Vec<&[u8]> = body.chunks(1).collect();
            assert!(
                scan_all(&pieces).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn chunked_trailers_must_be_fields() {
        let good = b"0\r\nX-A: 1\r\nx-b:\t2 3\r\n\r\n";
        assert!(scan_all(&[good]).unwrap().2);
        let bad: [&[u8]; 5] = [
            // obs-fold, no name, no colon, a space in the name, a NUL.
            b"0\r\nX-A: 1\r\n  folded\r\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\nGET / HTTP/1.1\r\n\r\n",
            b"0\r\nX A: 1\r\n\r\n",
            b"0\r\nX: a\0b\r\n\r\n",
        ];
        for body in bad {
            assert!(
                scan_all(&[body]).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(itoa(0).as_bytes(), b"0");
        assert_eq!(itoa(1234567890).as_bytes(), b"1234567890");
        assert_eq!(itoa(u64::MAX).as_bytes(), u64::MAX.to_string().as_bytes());
        let mut out = Vec::new();
        put_response(
            &mut out,
            http::StatusCode::NOT_FOUND,
            b"text/plain",
            b"no\n",
            false,
            false,
            true,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 3\r\nconnection: close\r\n\r\nno\n"
        );
    }
}
