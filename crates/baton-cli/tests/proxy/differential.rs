//! Differential test: a corpus of request byte strings, each what its
//! client considers ONE request, sent through the proxy on a fresh
//! connection; the recording upstream counts what it received with a
//! lenient parser (as nginx and Node read: bare LF ends a line). The
//! upstream must never see more requests than the client sent, whatever
//! the proxy answered.

use std::time::{Duration, Instant};

use crate::smuggling::{probe, Probe};

const SMUGGLED: &str = "GET /admin HTTP/1.1\r\nHost: x\r\n\r\n";

/// The hand-written probes: the known smuggling vectors and the classic ones.
fn base() -> Vec<String> {
    let s = SMUGGLED;
    let n = s.len();
    let te = |v: &str, body: &str| {
        format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {v}\r\n\r\n{body}")
    };
    let chunk_then = format!("0\r\n\r\n{s}");
    let mut c = vec![
        // Plain ones.
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".to_owned(),
        te("chunked", "5\r\nhello\r\n0\r\n\r\n"),
        // Bodies that carry a request.
        format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n{s}"),
        te("chunked", &format!("{n:x}\r\n{s}\r\n0\r\n\r\n")),
        // Connection naming framing and routing fields.
        format!("POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: {n}\r\n\r\n{s}"),
        format!("POST / HTTP/1.1\r\nHost: x\r\nConnection: Content-Length, close\r\nContent-Length: {n}\r\n\r\n{s}"),
        format!("POST / HTTP/1.1\r\nHost: x\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n{chunk_then}"),
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: host\r\n\r\n".to_owned(),
        // Bare LF in the chunked framing.
        te("chunked", &format!("0\r\nX: y\n\n{s}")),
        te("chunked", &format!("0\r\n\n{s}")),
        te("chunked", &format!("0\n\r\n{s}")),
        te("chunked", &format!("3\nabc\r\n0\r\n\r\n{s}")),
        te("chunked", &format!("3;x\nabc\r\n0\r\n\r\n{s}")),
        te("chunked", &format!("3\r\nabc\n0\r\n\r\n{s}")),
        // CL and TE together, either order.
        format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{chunk_then}"),
        format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{chunk_then}", chunk_then.len()),
        // TE variants.
        te("chunked ", &chunk_then),
        te("Chunked", &chunk_then),
        te("x, chunked", &chunk_then),
        te("chunked, x", &chunk_then),
        te("xchunked", &chunk_then),
        te("chunked\r\nTransfer-Encoding: x", &chunk_then),
        te("identity", &chunk_then),
        te("\"chunked\"", &chunk_then),
        te("gzip, chunked", "3\r\nabc\r\n0\r\n\r\n"),
        // obs-fold.
        format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x\r\n chunked\r\n\r\n{chunk_then}"),
        format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n {n}\r\n\r\n{s}"),
        // NUL and other control bytes.
        format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\0\r\n\r\n{chunk_then}"),
        format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\0\r\n\r\n{s}"),
        te("chunked", &format!("0\r\nX: a\0b\r\n\r\n{s}")),
        // Bad chunk sizes.
        te("chunked", &format!("-1\r\n\r\n{s}")),
        te("chunked", &format!("0x0\r\n\r\n{s}")),
        te("chunked", &format!("ffffffffffffffffff\r\n\r\n{s}")),
        te("chunked", &format!("3 4\r\nabc\r\n0\r\n\r\n{s}")),
        te("chunked", &format!(" 0\r\n\r\n{s}")),
        te("chunked", &format!("0_0\r\n\r\n{s}")),
        // Invalid and duplicate lengths.
        format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\nContent-Length: {n}\r\n\r\n{s}"),
        format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: {n}\r\n\r\n{s}"),
        format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0, {n}\r\n\r\n{s}"),
        format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +{n}\r\n\r\n{s}"),
        // HTTP/1.0 with TE.
        format!("POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunk_then}"),
        // Hosts: two, absolute form.
        "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".to_owned(),
        "GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n".to_owned(),
        "GET http://a.example/admin HTTP/1.1\r\nHost: b.example\r\n\r\n".to_owned(),
        format!("POST http://a.example/ HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n{s}"),
        // Paths around a deny route.
        "GET /x/../admin HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        "GET /%61dmin HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        "GET //admin HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        "GET /../admin HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        // Duplicated fields of other kinds.
        "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n".to_owned(),
        format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n{chunk_then}"),
        // Expect, upgrade.
        format!("POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {n}\r\n\r\n{s}"),
        format!("GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: {n}\r\n\r\n{s}"),
    ];
    // Whole heads with bare LF line ends.
    c.push(format!(
        "POST / HTTP/1.1\nHost: x\nContent-Length: {n}\n\n{s}"
    ));
    c.push(format!(
        "POST / HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n{chunk_then}"
    ));
    c
}

/// Systematic variants of one probe: each CRLF in turn, and all of them,
/// as a bare LF; the head in lower and upper case; extra whitespace around
/// colons and at the ends of values.
fn variants(raw: &str) -> Vec<String> {
    let mut out = vec![raw.to_owned()];
    let crlfs: Vec<usize> = raw.match_indices("\r\n").map(|(i, _)| i).collect();
    for &i in &crlfs {
        out.push(format!("{}\n{}", &raw[..i], &raw[i + 2..]));
    }
    out.push(raw.replace("\r\n", "\n"));
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let with_head = |h: String| format!("{h}\r\n\r\n{body}");
    // Field names only: the request line keeps its case.
    let (line, fields) = head.split_once("\r\n").unwrap_or((head, ""));
    out.push(with_head(format!(
        "{line}\r\n{}",
        fields.to_ascii_lowercase()
    )));
    out.push(with_head(format!(
        "{line}\r\n{}",
        fields.to_ascii_uppercase()
    )));
    out.push(with_head(head.replace(": ", " : ")));
    out.push(with_head(head.replace(": ", ":\t")));
    out.push(with_head(head.replace(": ", ":   ")));
    out.push(with_head(head.replace("\r\n", " \r\n")));
    out.push(with_head(head.replace("\r\n", "\t\r\n")));
    out.push(format!("\r\n{raw}"));
    out
}

#[test]
fn the_upstream_never_sees_more_requests_than_the_client_sent() {
    let (up, p) = crate::smuggling::probe_proxy("differential");
    let web = p.addr("web");
    let mut corpus: Vec<String> = base().iter().flat_map(|b| variants(b)).collect();
    corpus.sort();
    corpus.dedup();
    let started = Instant::now();
    let mut forwarded = 0;
    let mut refused = 0;
    for (i, raw) in corpus.iter().enumerate() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the corpus took too long ({i} of {} done)",
            corpus.len()
        );
        let got: Probe = probe(web, &up, raw.as_bytes());
        let n = got.upstream_requests();
        assert!(
            n <= 1,
            "entry {i}: the upstream saw {n} requests for one\nsent: {raw:?}\nupstream: {:?}\nclient got: {:?}",
            got.upstream_text(),
            String::from_utf8_lossy(&got.response)
        );
        if n == 1 {
            forwarded += 1;
        } else {
            refused += 1;
        }
    }
    println!(
        "differential corpus: {} requests ({forwarded} reached the upstream as one request, {refused} not at all) in {:?}",
        corpus.len(),
        started.elapsed()
    );
}
