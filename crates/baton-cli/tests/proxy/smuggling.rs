//! Request smuggling and routing bypasses, each probe as exact bytes from a
//! hostile client: what the client gets back, and what the upstream (a
//! recording scripted one) received, counted as requests by a parser as
//! lenient as nginx's and Node's. Also the route timeout against a slow
//! upload, local fd exhaustion, and responses that break their framing.

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use baton_testkit::assert_eventually;

use crate::http1::{
    answers, closed, connect, lenient_requests, read_response, recording, scripted, Message,
    Scripted, TIMEOUT,
};
use crate::{upstream_toml, web_to, Proxy};

/// The probe upstream's answer: the request line back, and a close (each
/// upstream connection carries one request, so what it received is one
/// probe's).
pub fn close_each(seen: &Message, _: usize) -> Option<(Vec<u8>, bool)> {
    let body = &seen.line;
    let head = format!(
        "HTTP/1.1 200 OK\r\nx-upstream: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    Some(([head.as_bytes(), body.as_bytes()].concat(), true))
}

/// A listener "web" whose `/admin` is denied by a fixed response (a deny
/// route) and whose other paths go to upstream "a" at `up`.
pub fn deny_admin(up: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

{}
[[routes]]
listener = "web"
path_prefix = "/"
upstream = "a"
{extra}

[[routes]]
listener = "web"
path_prefix = "/admin"
respond = {{ status = 403, body = "denied\n" }}
"#,
        upstream_toml("a", &[up], "")
    )
}

/// What one probe did.
#[derive(Debug)]
pub struct Probe {
    /// Everything the client got back until the proxy closed.
    pub response: Vec<u8>,
    /// What each upstream connection the probe caused received.
    pub upstream: Vec<Vec<u8>>,
}

impl Probe {
    /// Requests the upstream saw, by the lenient count.
    pub fn upstream_requests(&self) -> usize {
        self.upstream.iter().map(|b| lenient_requests(b)).sum()
    }

    /// Statuses of the responses the client got (a lenient count too).
    pub fn statuses(&self) -> Vec<u16> {
        let text = String::from_utf8_lossy(&self.response);
        text.match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }

    /// The upstream's bytes as text (one probe's connections).
    pub fn upstream_text(&self) -> String {
        self.upstream
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }
}

/// Sends `raw` on a new connection as one request (then half-closes),
/// reads all the proxy answers, and collects what the upstream received
/// because of it. A fence request on another connection follows; once the
/// upstream has it and every connection since the probe began is closed,
/// the connections before the fence's are the probe's (the upstream
/// accepts in the order the proxy connected).
pub fn probe(web: SocketAddr, up: &Scripted, raw: &[u8]) -> Probe {
    let start = up.conns.lock().unwrap().len();
    let mut s = connect(web);
    let _ = s.write_all(raw);
    let _ = s.shutdown(Shutdown::Write);
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    let mut f = connect(web);
    f.write_all(b"GET /fence HTTP/1.1\r\nHost: fence\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut fenced = Vec::new();
    let _ = f.read_to_end(&mut fenced);
    assert!(
        fenced.starts_with(b"HTTP/1.1 200"),
        "fence: {}",
        String::from_utf8_lossy(&fenced)
    );
    let is_fence = |b: &[u8]| b.starts_with(b"GET /fence HTTP/1.1\r\n");
    assert_eventually!(
        TIMEOUT,
        {
            let c = up.conns.lock().unwrap();
            c[start..].iter().any(|r| is_fence(&r.bytes)) && c[start..].iter().all(|r| r.done)
        },
        "the upstream saw the fence and every connection closed"
    );
    let upstream = up.conns.lock().unwrap()[start..]
        .iter()
        .filter(|r| !is_fence(&r.bytes))
        .map(|r| r.bytes.clone())
        .collect();
    Probe { response, upstream }
}

pub fn probe_proxy(tag: &str) -> (Scripted, Proxy) {
    let up = recording(close_each);
    let p = Proxy::start(tag, "", &deny_admin(up.addr, ""));
    (up, p)
}

/// `Connection: content-length` made the proxy frame the body by its
/// length and then drop the length, so the upstream read the body as a
/// second request that skipped routing, the deny route and the
/// `X-Forwarded-For` rewrite; `Connection: host` dropped `Host`.
#[test]
fn connection_cannot_remove_the_fields_that_frame_or_route_a_request() {
    let (up, p) = probe_proxy("smuggle-connection");
    let web = p.addr("web");
    let smuggled = "GET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    let raw = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{smuggled}",
        smuggled.len()
    );
    let got = probe(web, &up, raw.as_bytes());
    assert_eq!(got.statuses(), [200], "{got:?}");
    assert_eq!(got.upstream_requests(), 1, "{got:?}");
    let text = got.upstream_text();
    assert!(
        text.contains(&format!("\r\nContent-Length: {}\r\n", smuggled.len())),
        "{text}"
    );
    assert!(text.ends_with(smuggled), "{text}");

    // Each field the proxy frames or routes by, or writes itself.
    for listed in [
        "host",
        "Content-Length, Host",
        "x-forwarded-for",
        "forwarded",
    ] {
        let raw = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: {listed}\r\nContent-Length: 2\r\n\r\nhi"
        );
        let got = probe(web, &up, raw.as_bytes());
        assert_eq!(got.statuses(), [200], "{listed}: {got:?}");
        assert_eq!(got.upstream_requests(), 1, "{listed}: {got:?}");
        let text = got.upstream_text();
        assert!(text.contains("\r\nHost: x\r\n"), "{listed}: {text}");
        assert!(
            text.contains("\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n"),
            "{listed}: {text}"
        );
        assert!(text.ends_with("\r\n\r\nhi"), "{listed}: {text}");
    }
}

/// a bare LF in a chunked trailer (`0\r\nX: y\n\n<request>`) was
/// passed on as one body, which nginx ends at `\n\n`, running the rest.
/// A bare LF anywhere in the chunked framing is a 400, nothing forwarded.
#[test]
fn a_bare_lf_in_chunked_framing_is_400_and_nothing_reaches_the_upstream() {
    let (up, p) = probe_proxy("smuggle-bare-lf");
    let web = p.addr("web");
    let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let smuggled = "GET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    for body in [
        format!("0\r\nX: y\n\n{smuggled}"),
        format!("0\r\n\n{smuggled}"),
        format!("3\nabc\r\n0\r\n\r\n{smuggled}"),
        format!("3;e\nabc\r\n0\r\n\r\n{smuggled}"),
        format!("3\r\nabc\n0\r\n\r\n{smuggled}"),
        format!("0\r\nX: y\r\n\n{smuggled}"),
    ] {
        let got = probe(web, &up, format!("{head}{body}").as_bytes());
        assert_eq!(got.statuses(), [400], "{body:?}: {got:?}");
        assert_eq!(got.upstream_requests(), 0, "{body:?}: {got:?}");
    }
    // The same body with CRLF throughout is one request.
    let got = probe(web, &up, format!("{head}0\r\nX: y\r\n\r\n").as_bytes());
    assert_eq!(got.statuses(), [200], "{got:?}");
    assert_eq!(got.upstream_requests(), 1, "{got:?}");
}

/// two `Host` fields, HTTP/1.0 with `Transfer-Encoding`, duplicate
/// `Content-Length` lines are 400; an absolute-form target's authority
/// replaces `Host`; `Transfer-Encoding: gzip, chunked` goes on as it came.
#[test]
fn ambiguous_hosts_and_framings_are_refused_and_the_rest_passed_on_unambiguously() {
    let (up, p) = probe_proxy("smuggle-fields");
    let web = p.addr("web");
    for raw in [
        "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nhost: x\r\n\r\n",
        "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
    ] {
        let got = probe(web, &up, raw.as_bytes());
        assert_eq!(got.statuses(), [400], "{raw:?}: {got:?}");
        assert_eq!(got.upstream_requests(), 0, "{raw:?}: {got:?}");
    }
    // Absolute form: the authority is the host, routed and forwarded.
    let got = probe(
        web,
        &up,
        b"GET http://a.example/admin2 HTTP/1.1\r\nHost: b.example\r\n\r\n",
    );
    assert_eq!(got.statuses(), [200], "{got:?}");
    assert_eq!(got.upstream_requests(), 1, "{got:?}");
    let text = got.upstream_text();
    assert!(text.starts_with("GET /admin2 HTTP/1.1\r\n"), "{text}");
    assert!(text.contains("\r\nhost: a.example\r\n"), "{text}");
    assert!(!text.contains("b.example"), "{text}");
    // The deny route holds for the absolute form too.
    let got = probe(
        web,
        &up,
        b"GET http://a.example/admin HTTP/1.1\r\nHost: b.example\r\n\r\n",
    );
    assert_eq!(got.statuses(), [403], "{got:?}");
    assert_eq!(got.upstream_requests(), 0, "{got:?}");
    // Codings as they came.
    let got = probe(
        web,
        &up,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    );
    assert_eq!(got.statuses(), [200], "{got:?}");
    assert_eq!(got.upstream_requests(), 1, "{got:?}");
    let text = got.upstream_text();
    assert!(
        text.contains("\r\nTransfer-Encoding: gzip, chunked\r\n"),
        "{text}"
    );
    assert_eq!(
        text.to_ascii_lowercase()
            .matches("transfer-encoding")
            .count(),
        1,
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "{text}");
}

/// routes matched the raw path, so `/x/../admin`, `/%61dmin` and
/// `//admin` passed an `/admin` deny route. The path is normalised before
/// routing and forwarded normalised.
#[test]
fn paths_are_normalised_before_routing_and_forwarded_so() {
    let (up, p) = probe_proxy("smuggle-paths");
    let web = p.addr("web");
    for path in [
        "/admin",
        "/x/../admin",
        "/%61dmin",
        "//admin",
        "/x/%2e%2e/admin",
        "/./admin/",
        "/ok/..//%61dmin/x",
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let got = probe(web, &up, raw.as_bytes());
        assert_eq!(got.statuses(), [403], "{path}: {got:?}");
        assert_eq!(got.upstream_requests(), 0, "{path}: {got:?}");
    }
    for (path, forwarded) in [
        ("/x/../ok?a=/../b", "/ok?a=/../b"),
        ("//ok//", "/ok/"),
        ("/%7Euser/%2Fx", "/~user/%2Fx"),
        ("/plain", "/plain"),
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let got = probe(web, &up, raw.as_bytes());
        assert_eq!(got.statuses(), [200], "{path}: {got:?}");
        let text = got.upstream_text();
        assert!(
            text.starts_with(&format!("GET {forwarded} HTTP/1.1\r\n")),
            "{path}: {text}"
        );
    }
    for path in ["/../admin", "/%2e%2e/admin", "/a%zz"] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let got = probe(web, &up, raw.as_bytes());
        assert_eq!(got.statuses(), [400], "{path}: {got:?}");
        assert_eq!(got.upstream_requests(), 0, "{path}: {got:?}");
    }
}

/// a response with `Connection: content-length` kept its length
/// (the client no longer hangs, the connection is reused); a chunked
/// response that breaks the coding before anything was sent is a 502, not
/// an end of file; `gzip, chunked` reaches the client as it came.
#[test]
fn responses_keep_their_framing_and_a_broken_chunked_one_is_502() {
    let (up, _seen) = scripted(answers);
    let p = crate::http1::proxy_to(up, "smuggle-responses");
    let s = connect(p.addr("web"));
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"GET /conn-cl HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(got.status(), 200);
    assert_eq!(got.header("content-length"), Some("5"), "{got:?}");
    assert_eq!(got.body, b"hello");
    w.write_all(b"GET /gzip-chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(
        got.header("transfer-encoding"),
        Some("gzip, chunked"),
        "{got:?}"
    );
    assert_eq!(got.body, b"3\r\nabc\r\n0\r\n\r\n");
    w.write_all(b"GET /bad-chunk HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_response(&mut r, false);
    assert_eq!(got.status(), 502, "{got:?}");
    assert!(closed(&mut r));
}

/// the route timeout ran while the client was still uploading, so
/// a slow body got 504. It counts from the end of the body.
#[test]
fn the_route_timeout_counts_from_the_end_of_the_request_body() {
    let up = recording(close_each);
    let p = Proxy::start(
        "smuggle-slow-body",
        "",
        &deny_admin(up.addr, "timeout = \"300ms\""),
    );
    let mut s = connect(p.addr("web"));
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        .unwrap();
    // The head and half the body reached the upstream...
    assert_eventually!(
        TIMEOUT,
        up.received()
            .iter()
            .any(|r| r.bytes.ends_with(b"\r\n\r\n12345")),
        "the upstream got the head"
    );
    // ...the rest comes after more than the route timeout (the slow
    // upload is the point of the test).
    std::thread::sleep(Duration::from_millis(700));
    s.write_all(b"67890").unwrap();
    let mut r = BufReader::new(s);
    let got = read_response(&mut r, false);
    assert_eq!(got.status(), 200, "{got:?}");
    assert_eq!(got.body, b"POST /upload HTTP/1.1");
}

/// running out of file descriptors locally (`EMFILE` on connect)
/// marked a healthy upstream down. The request gets 503 and the server
/// stays up: with a dead second server in the pool, a wrong mark would
/// send the next requests (with bodies, so never retried) to the dead one.
#[test]
fn running_out_of_local_fds_does_not_mark_the_upstream_down() {
    let up = recording(close_each);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let body = web_to(
        "a",
        &upstream_toml(
            "a",
            &[up.addr, dead],
            "fail_timeout = \"60s\"\nhealth_check = { interval = \"60s\", timeout = \"2s\" }",
        ),
    );
    const LIMIT: usize = 64;
    let p = Proxy::start_limited("smuggle-emfile", "", &body, Some(LIMIT as u32));
    let web = p.addr("web");
    // The first health check has marked the dead server down.
    assert_eventually!(
        TIMEOUT,
        p.upstream_server("a", dead)["healthy"] == false,
        "the dead server is marked down"
    );
    let pid = p.pid();
    // Keep-alive clients, each answered (so surely accepted) and kept
    // open, until one takes the proxy's last fd: its upstream connect
    // fails with EMFILE.
    let mut idle = Vec::new();
    let status = loop {
        assert!(idle.len() < LIMIT, "{LIMIT} clients and no EMFILE");
        let s = connect(web);
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let got = read_response(&mut r, false);
        idle.push((w, r));
        if got.status() != 200 {
            break got.status();
        }
    };
    assert_eq!(
        status,
        503,
        "after {} clients\n{}",
        idle.len(),
        p.server.stderr()
    );
    drop(idle);
    assert_eventually!(
        TIMEOUT,
        baton_testkit::fd_count(pid) < LIMIT / 2,
        "the proxy closed the idle clients"
    );
    // At once, and although fail_timeout is long: every request reaches
    // the healthy server.
    for i in 0..10 {
        let s = connect(web);
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        w.write_all(
            format!("POST /n{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi").as_bytes(),
        )
        .unwrap();
        let got = read_response(&mut r, false);
        assert_eq!(got.status(), 200, "request {i}: {got:?}");
    }
    let server = p.upstream_server("a", up.addr);
    assert_eq!(server["healthy"], true, "{server}");
    assert_eq!(server["failures"], 0, "{server}");
}
