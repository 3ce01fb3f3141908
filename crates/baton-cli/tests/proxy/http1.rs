//! HTTP/1.x message handling: request and response bodies in every
//! framing, `100 Continue`, HTTP/1.0 clients, pipelining, hop-by-hop fields,
//! malformed requests, and an upstream that closes idle connections.
//!
//! The upstream here is a scripted server on a real socket (a thread in the
//! test), so the tests see exactly what the proxy sent it and can answer
//! with exactly the bytes a case needs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::{web_to_a, Proxy};

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A request or response as read off the wire.
#[derive(Debug, Clone)]
pub struct Message {
    /// The request or status line.
    pub line: String,
    pub headers: Vec<(String, String)>,
    /// The body as on the wire (chunked coding kept, trailers included).
    pub body: Vec<u8>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The status of a response.
    pub fn status(&self) -> u16 {
        self.line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// Where a message's body is.
#[derive(Clone, Copy, PartialEq)]
enum Body {
    /// Nowhere (`HEAD`, 204, 304 and interim responses).
    None,
    /// As `Transfer-Encoding: chunked` or `Content-Length` say; without
    /// them, none (requests).
    Framed,
    /// As they say; without them, up to end of file (responses).
    FramedElseEof,
}

/// Reads one message: head, then the body as `body(head)` says. `None` at
/// end of file or on anything that does not parse.
fn read_message(r: &mut BufReader<impl Read>, body: fn(&Message) -> Body) -> Option<Message> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut m = Message {
        line: line.trim_end().to_owned(),
        headers: Vec::new(),
        body: Vec::new(),
    };
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':')?;
        m.headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let body = body(&m);
    if body == Body::None {
        return Some(m);
    }
    if m.header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            m.body.extend_from_slice(size.as_bytes());
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            if n == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t).ok()?;
                    m.body.extend_from_slice(t.as_bytes());
                    if t == "\r\n" {
                        return Some(m);
                    }
                }
            }
            let mut data = vec![0; n + 2];
            r.read_exact(&mut data).ok()?;
            m.body.extend_from_slice(&data);
        }
    } else if let Some(n) = m.header("content-length") {
        let mut data = vec![0; n.parse().ok()?];
        r.read_exact(&mut data).ok()?;
        m.body = data;
    } else if body == Body::FramedElseEof {
        r.read_to_end(&mut m.body).ok()?;
    }
    Some(m)
}

/// What the scripted upstream does with the `n`th request on a connection
/// (from 0): the bytes to answer and whether to close the connection
/// afterwards, or `None` to close it without answering.
pub type Script = fn(&Message, usize) -> Option<(Vec<u8>, bool)>;

/// The bytes one upstream connection received.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub bytes: Vec<u8>,
    /// The proxy closed the connection: nothing more will come.
    pub done: bool,
}

/// A running scripted upstream.
pub struct Scripted {
    pub addr: SocketAddr,
    /// Every request it parsed, in order.
    pub seen: mpsc::Receiver<Message>,
    /// Every connection's bytes, in the order they were accepted.
    pub conns: Arc<Mutex<Vec<Received>>>,
}

impl Scripted {
    /// A copy of what every connection received so far.
    pub fn received(&self) -> Vec<Received> {
        self.conns.lock().unwrap().clone()
    }
}

/// Records what it reads into one connection's [`Received`].
struct Tee {
    inner: TcpStream,
    conns: Arc<Mutex<Vec<Received>>>,
    index: usize,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.conns.lock().unwrap()[self.index]
            .bytes
            .extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Starts the scripted upstream; every request it receives is sent on the
/// returned channel.
pub fn scripted(script: Script) -> (SocketAddr, mpsc::Receiver<Message>) {
    let s = recording(script);
    (s.addr, s.seen)
}

/// The scripted upstream, also recording every byte each connection
/// receives. When the script closes a connection (or a request does not
/// parse), the upstream stops sending and reads on until the proxy closes
/// too, so that nothing the proxy sent goes unrecorded.
pub fn recording(script: Script) -> Scripted {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let conns: Arc<Mutex<Vec<Received>>> = Arc::default();
    let all = conns.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let tx = tx.clone();
            let index = {
                let mut c = all.lock().unwrap();
                c.push(Received::default());
                c.len() - 1
            };
            let conns = all.clone();
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(Tee {
                    inner: s,
                    conns: conns.clone(),
                    index,
                });
                serve_script(script, &mut r, &mut w, &tx);
                let _ = w.shutdown(std::net::Shutdown::Write);
                let _ = std::io::copy(&mut r, &mut std::io::sink());
                conns.lock().unwrap()[index].done = true;
            });
        }
    });
    Scripted {
        addr,
        seen: rx,
        conns,
    }
}

/// Answers requests on one connection as `script` says, until it closes.
fn serve_script(
    script: Script,
    r: &mut BufReader<Tee>,
    w: &mut TcpStream,
    tx: &mpsc::Sender<Message>,
) {
    let mut n = 0;
    while let Some(seen) = read_message(r, |_| Body::Framed) {
        let action = script(&seen, n);
        n += 1;
        let _ = tx.send(seen);
        let Some((answer, close)) = action else {
            return;
        };
        // `PAUSE` in an answer: what comes before it is sent, the rest
        // once the test calls `release` (a slow body).
        let (now, later) = match answer.windows(5).position(|x| x == b"PAUSE") {
            Some(i) => (&answer[..i], &answer[i + 5..]),
            None => (&answer[..], &[][..]),
        };
        if w.write_all(now).is_err() {
            return;
        }
        if !later.is_empty() {
            wait_for_release();
            if w.write_all(later).is_err() {
                return;
            }
        }
        if close {
            return;
        }
    }
}

/// How many requests `bytes` hold for a lenient parser, as nginx's and
/// Node's are: a bare LF ends a line, blank lines between requests are
/// skipped, a `Transfer-Encoding` naming `chunked` anywhere wins over
/// `Content-Length`, the first `Content-Length` counts. A request cut short
/// counts as one (its head has begun); a body that does not parse ends the
/// count (such a parser gives up on the connection).
pub fn lenient_requests(mut b: &[u8]) -> usize {
    fn line(b: &[u8]) -> Option<(&[u8], &[u8])> {
        let i = b.iter().position(|c| *c == b'\n')?;
        let l = &b[..i];
        Some((l.strip_suffix(b"\r").unwrap_or(l), &b[i + 1..]))
    }
    let mut n = 0;
    loop {
        while let Some(rest) = b.strip_prefix(b"\r\n").or_else(|| b.strip_prefix(b"\n")) {
            b = rest;
        }
        if b.is_empty() {
            return n;
        }
        n += 1;
        let Some((_request_line, rest)) = line(b) else {
            return n;
        };
        b = rest;
        let mut length: Option<usize> = None;
        let mut chunked = false;
        loop {
            let Some((l, rest)) = line(b) else { return n };
            b = rest;
            if l.is_empty() {
                break;
            }
            let Some(colon) = l.iter().position(|c| *c == b':') else {
                continue;
            };
            let name = String::from_utf8_lossy(&l[..colon])
                .trim()
                .to_ascii_lowercase();
            let value = String::from_utf8_lossy(&l[colon + 1..])
                .trim()
                .to_ascii_lowercase();
            if name == "transfer-encoding" && value.contains("chunked") {
                chunked = true;
            } else if name == "content-length" && length.is_none() {
                length = value.parse().ok();
            }
        }
        if chunked {
            loop {
                let Some((l, rest)) = line(b) else { return n };
                b = rest;
                let size = String::from_utf8_lossy(l);
                let size = size.split([';', ' ', '\t']).next().unwrap_or("");
                let Ok(size) = usize::from_str_radix(size, 16) else {
                    return n;
                };
                if size == 0 {
                    loop {
                        let Some((l, rest)) = line(b) else { return n };
                        b = rest;
                        if l.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                if b.len() < size {
                    return n;
                }
                let Some((_, rest)) = line(&b[size..]) else {
                    return n;
                };
                b = rest;
            }
        } else if let Some(len) = length {
            if b.len() < len {
                return n;
            }
            b = &b[len..];
        }
    }
}

#[test]
fn the_lenient_parser_counts_as_nginx_would() {
    assert_eq!(lenient_requests(b""), 0);
    assert_eq!(lenient_requests(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), 1);
    assert_eq!(lenient_requests(b"GET / HTTP/1.1\nHost: x\n\nGET /"), 2);
    assert_eq!(
        lenient_requests(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n"),
        2
    );
    assert_eq!(
        lenient_requests(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\n\nGET /admin HTTP/1.1\r\n\r\n"),
        2
    );
    assert_eq!(
        lenient_requests(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        ),
        1
    );
}

/// Set by [`release`]: paused answers go on.
static RELEASED: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

/// Lets every paused answer of the scripted upstream finish.
fn release() {
    *RELEASED.0.lock().unwrap() = true;
    RELEASED.1.notify_all();
}

/// Waits for [`release`] (bounded: a test that never releases fails on its
/// own read timeout instead of hanging here).
fn wait_for_release() {
    let released = RELEASED.0.lock().unwrap();
    let _ = RELEASED
        .1
        .wait_timeout_while(released, TIMEOUT, |r| !*r)
        .unwrap();
}

/// The scripted upstream's answers, by path.
pub fn answers(seen: &Message, _: usize) -> Option<(Vec<u8>, bool)> {
    Some(answer(seen))
}

pub fn answer(seen: &Message) -> (Vec<u8>, bool) {
    let path = seen.line.split(' ').nth(1).unwrap_or("");
    let r: &[u8] = match path {
        "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n",
        "/close" => return (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec(), true),
        "/204" => b"HTTP/1.1 204 No Content\r\n\r\n",
        "/slow-body" => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345PAUSE67890",
        "/hop" => b"HTTP/1.1 200 OK\r\nConnection: x-internal\r\nx-internal: secret\r\nkeep-alive: timeout=5\r\nx-kept: 1\r\ncontent-length: 2\r\n\r\nok",
        "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone",
        // `Connection` naming the framing field: the length still frames it.
        "/conn-cl" => b"HTTP/1.1 200 OK\r\nConnection: content-length\r\ncontent-length: 5\r\n\r\nhello",
        // A chunked body breaking the coding at once (a bare LF).
        "/bad-chunk" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        // The codings go on as they came.
        "/gzip-chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        _ => {
            let body = format!("{} {}", seen.line, seen.body.len());
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            return ([head.as_bytes(), body.as_bytes()].concat(), false);
        }
    };
    (r.to_vec(), false)
}

pub fn proxy_to(addr: SocketAddr, tag: &str) -> Proxy {
    Proxy::start(tag, "", &web_to_a(&[addr]))
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Reads one response; `head`: the answer to `HEAD`.
pub fn read_response(r: &mut BufReader<TcpStream>, head: bool) -> Message {
    let body = if head {
        |_: &Message| Body::None
    } else {
        |m: &Message| match m.status() {
            204 | 304 | 100..=199 => Body::None,
            _ => Body::FramedElseEof,
        }
    };
    read_message(r, body).expect("a response")
}

/// Whether the proxy closed the connection (end of file, nothing more).
pub fn closed(r: &mut BufReader<TcpStream>) -> bool {
    let mut rest = Vec::new();
    matches!(r.read_to_end(&mut rest), Ok(0))
}

#[test]
fn request_bodies_by_length_chunked_and_after_100_continue() {
    let (up, seen) = scripted(answers);
    let p = proxy_to(up, "h1-bodies");
    let s = connect(p.addr("web"));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);

    // A body larger than any buffer, by length.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    write!(
        w,
        "POST /len HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .unwrap();
    w.write_all(&big).unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(got.status(), 200);
    assert_eq!(
        String::from_utf8_lossy(&got.body),
        "POST /len HTTP/1.1 300000"
    );
    assert_eq!(seen.recv_timeout(TIMEOUT).unwrap().body, big);

    // Chunked: passed on as chunked, byte for byte, on the same connection.
    let chunked = b"4\r\nwiki\r\n5;x=y\r\npedia\r\n0\r\n\r\n";
    w.write_all(b"POST /chunked-in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    w.write_all(chunked).unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(got.status(), 200);
    let s = seen.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(s.header("transfer-encoding"), Some("chunked"));
    assert_eq!(s.body, chunked);

    // Expect: 100-continue: the proxy says continue, then the body flows;
    // the upstream does not see `Expect`.
    w.write_all(
        b"PUT /put HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let interim = read_response(&mut r, true);
    assert_eq!(interim.status(), 100);
    w.write_all(b"12345").unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(String::from_utf8_lossy(&got.body), "PUT /put HTTP/1.1 5");
    let s = seen.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(s.header("expect"), None);

    // An upstream's own interim response is not passed on.
    w.write_all(b"POST /continue HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!((got.status(), &got.body[..]), (201, &b"done"[..]));
}

#[test]
fn responses_chunked_close_delimited_bodiless_and_to_http10_clients() {
    let (up, _seen) = scripted(answers);
    let p = proxy_to(up, "h1-responses");
    let web = p.addr("web");
    let s = connect(web);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);

    // Chunked stays chunked for an HTTP/1.1 client (its content-length
    // dropped), trailers included, and the connection stays usable.
    w.write_all(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(got.header("transfer-encoding"), Some("chunked"));
    assert_eq!(got.header("content-length"), None);
    assert_eq!(
        got.body,
        b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n"
    );
    // HEAD: headers only; 204: nothing; both keep the connection.
    w.write_all(b"HEAD /len HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, true);
    assert_eq!(got.status(), 200);
    w.write_all(b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r, false).status(), 204);
    // Hop-by-hop fields, and those `Connection` names, are not passed on.
    w.write_all(b"GET /hop HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(got.header("x-kept"), Some("1"));
    assert_eq!(got.header("x-internal"), None, "{got:?}");
    assert_eq!(got.header("keep-alive"), None);
    assert_eq!(got.body, b"ok");
    // A body delimited by the upstream's close: passed on, then closed.
    w.write_all(b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(got.header("connection"), Some("close"));
    assert_eq!(got.body, b"until the end");

    // HTTP/1.0 client: a chunked response loses its coding (the client
    // cannot read it) and the connection closes after it.
    let s = connect(web);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"GET /chunked HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(got.header("transfer-encoding"), None);
    assert_eq!(got.body, b"hello, world");
    // HTTP/1.0 with keep-alive and a length: kept, and said so.
    let s = connect(web);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"GET /a HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(got.header("connection"), Some("keep-alive"));
    w.write_all(b"GET /b HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(String::from_utf8_lossy(&got.body), "GET /b HTTP/1.1 0");
    assert!(
        closed(&mut r),
        "an HTTP/1.0 request without keep-alive ends the connection"
    );
}

/// A head is parsed into room for a few fields first and again into room
/// for the limit (128) when it has more: each field still reaches the
/// upstream, in order; past the limit the answer is 431.
#[test]
fn a_head_with_many_fields_is_forwarded_whole_up_to_the_limit() {
    let (up, seen) = scripted(answers);
    let p = proxy_to(up, "h1-many-fields");
    let head = |n: usize| {
        let mut h = String::from("GET /many HTTP/1.1\r\nHost: x\r\n");
        for i in 0..n {
            h.push_str(&format!("X-F{i}: v{i}\r\n"));
        }
        h + "Connection: close\r\n\r\n"
    };
    for n in [20, 23, 24, 100, 126] {
        let s = connect(p.addr("web"));
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(head(n).as_bytes()).unwrap();
        assert_eq!(read_response(&mut r, false).status(), 200, "{n} fields");
        let m = seen.recv_timeout(TIMEOUT).unwrap();
        let sent: Vec<String> = m
            .headers
            .iter()
            .filter(|(k, _)| k.starts_with("X-F"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let want: Vec<String> = (0..n).map(|i| format!("X-F{i}=v{i}")).collect();
        assert_eq!(sent, want, "{n} fields");
    }
    let s = connect(p.addr("web"));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(head(127).as_bytes()).unwrap();
    assert_eq!(read_response(&mut r, false).status(), 431);
    assert!(
        seen.try_recv().is_err(),
        "the upstream saw a refused request"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (up, _seen) = scripted(answers);
    let p = proxy_to(up, "h1-pipeline");
    let s = connect(p.addr("web"));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    for want in [
        "GET /1 HTTP/1.1 0",
        "POST /2 HTTP/1.1 3",
        "GET /3 HTTP/1.1 0",
    ] {
        let got = read_response(&mut r, false);
        assert_eq!(String::from_utf8_lossy(&got.body), want);
    }
    assert!(closed(&mut r));
}

#[test]
fn malformed_and_ambiguous_requests_are_refused_before_any_upstream() {
    let (up, seen) = scripted(answers);
    let p = proxy_to(up, "h1-malformed");
    let web = p.addr("web");
    let cases: [(&[u8], u16); 5] = [
        // Both framings (request smuggling): refused.
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabc", 400),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
    ];
    for (raw, want) in cases {
        let s = connect(web);
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(raw).unwrap();
        let got = read_response(&mut r, false);
        assert_eq!(got.status(), want, "{}", String::from_utf8_lossy(raw));
        assert!(closed(&mut r));
    }
    // A head larger than 64 KiB: 431.
    let s = connect(web);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let _ = write!(
        w,
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n",
        "a".repeat(70_000)
    );
    let got = read_response(&mut r, false);
    assert_eq!(got.status(), 431);
    assert!(
        seen.try_recv().is_err(),
        "the upstream saw a refused request"
    );
}

/// An upstream that closes idle keep-alive connections without saying so:
/// right after a response (the proxy notices before reusing it), and just
/// as the next request arrives, unanswered (a keep-alive timeout running
/// out at that moment: the proxy sends a safe request again on a new
/// connection). No request fails.
#[test]
fn an_upstream_closing_idle_connections_loses_no_request() {
    fn close_early(seen: &Message, n: usize) -> Option<(Vec<u8>, bool)> {
        let path = seen.line.split(' ').nth(1).unwrap_or("");
        let i: usize = path.trim_start_matches("/n").parse().unwrap_or(0);
        match n {
            // A connection's first request is answered; every third one
            // closes the connection right after.
            0 => Some((answer(seen).0, i % 3 == 0)),
            // The next one is left unanswered: the connection closes.
            _ => None,
        }
    }
    let (up, _seen) = scripted(close_early);
    let p = proxy_to(up, "h1-idle-close");
    let s = connect(p.addr("web"));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    for i in 0..200 {
        // One write (`write!` would send the pieces one by one).
        w.write_all(format!("GET /n{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let got = read_response(&mut r, false);
        assert_eq!(got.status(), 200, "request {i}: {got:?}");
        assert_eq!(
            String::from_utf8_lossy(&got.body),
            format!("GET /n{i} HTTP/1.1 0")
        );
    }
    // Nothing was counted as an upstream failure.
    assert_eq!(
        p.upstream_server("a", up)["failures"],
        0,
        "{}",
        p.server.stderr()
    );
}

/// A keep-alive client whose response was still streaming when the drain
/// began (so it carries no `Connection: close`) gets the idle grace from
/// the end of that response to send its next request, which is answered,
/// rather than a connection closed under it.
#[test]
fn a_response_streaming_when_the_drain_begins_leaves_the_client_its_grace() {
    let (up, _seen) = scripted(answers);
    let grace = Duration::from_millis(300);
    let p = Proxy::start(
        "h1-drain-stream",
        // The drain's wind-down, not the move to the next generation.
        "idle_grace = \"300ms\"\nmigrate = false",
        &web_to_a(&[up]),
    );
    let s = connect(p.addr("web"));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"GET /slow-body HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let sent = std::time::Instant::now();
    // The head and half the body are here; the rest waits for `release`.
    let mut head = String::new();
    while head.is_empty() || !head.ends_with("\r\n\r\n") {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0);
        head.push_str(&line);
    }
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    // An upgrade: this generation drains while the body is on its way.
    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}");
    // The body takes longer than the idle grace (the case at stake: the
    // grace, counted from the request, would be over when it ends).
    std::thread::sleep((grace * 2).saturating_sub(sent.elapsed()));
    release();
    let mut body = [0u8; 10];
    r.read_exact(&mut body).unwrap();
    assert_eq!(&body, b"1234567890");
    // At once, on the same connection: answered, and told to go.
    w.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(String::from_utf8_lossy(&got.body), "GET /after HTTP/1.1 0");
    assert_eq!(got.header("connection"), Some("close"));
    assert!(closed(&mut r));
}
