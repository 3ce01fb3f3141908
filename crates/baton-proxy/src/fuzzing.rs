//! Entry points for the fuzz targets in `fuzz/` (run with `cargo fuzz`,
//! see docs/SECURITY.md), and the replay of their corpus as unit tests.
//!
//! Each function takes arbitrary bytes, runs them through the code the
//! proxy runs on untrusted input, and panics if a property that the proxy's
//! safety rests on does not hold. Not crashing is the least of them; the
//! ones that matter for request smuggling are differential: the strict
//! chunked scanner must never find a body end that a lenient peer (one that
//! accepts a bare LF as a line end, as nginx and Node do) would put
//! elsewhere, and it must give the same answer however the bytes are split
//! across reads.
#![allow(clippy::panic)]

use std::mem::MaybeUninit;

use crate::h1::{self, ChunkedScanner, Fields, Framing};

/// A request head as the proxy reads one, then its body framing, then (if
/// chunked) the body that follows the head.
pub fn request_head(data: &[u8]) {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; h1::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(head_len)) =
        req.parse_with_uninit_headers(data, &mut headers)
    else {
        return;
    };
    let Ok(fields) = Fields::of(req.headers) else {
        return;
    };
    if let Ok(Framing::Chunked) = fields.request_framing(req.version == Some(0)) {
        chunked_body(&data[head_len..]);
    }
    if let Some(path) = req.path {
        path_of(path);
    }
}

/// A response head as the proxy reads one from an upstream, and its
/// framing for a `GET` and a `HEAD`.
pub fn response_head(data: &[u8]) {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; h1::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        data,
        &mut headers,
    );
    let Ok(httparse::Status::Complete(head_len)) = parsed else {
        return;
    };
    let Ok(fields) = Fields::of(resp.headers) else {
        return;
    };
    let status = resp.code.unwrap_or(0);
    if fields.response_framing("HEAD", status) != Framing::None {
        panic!("a response to HEAD has a body");
    }
    if fields.response_framing("GET", status) == Framing::Chunked {
        chunked_body(&data[head_len..]);
    }
}

/// A request head rewritten for an upstream as the proxy does (with and
/// without a prefix stripped): the rewritten head parses whole, has exactly
/// one `Host`, none of the fields the client's `Connection` named (other
/// than the protected ones, which a token never removes), and the same
/// body framing as the original.
pub fn rewrite(data: &[u8]) {
    use crate::rewrite::{self, Forwarded, Peer, RequestTarget};
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; h1::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(_)) = req.parse_with_uninit_headers(data, &mut headers)
    else {
        return;
    };
    // What the proxy refuses before rewriting.
    let Ok(fields) = Fields::of(req.headers) else {
        return;
    };
    let Ok(framing) = fields.request_framing(req.version == Some(0)) else {
        return;
    };
    if req.method == Some("CONNECT") {
        return;
    }
    let Ok(target) = RequestTarget::parse(req.path.unwrap_or("/")) else {
        return;
    };
    let Ok(f) = Forwarded::new(&req, &target, &fields, framing) else {
        return;
    };
    let listed = h1::connection_listed(req.headers);
    let upgrade = rewrite::upgrade(req.headers, &fields);
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], 8080));
    let peer = Peer::new(server.ip());
    // The first segment as a prefix to strip.
    let prefix = f.path.get(1..).map(|rest| {
        let end = rest.find('/').map_or(f.path.len(), |i| i + 1);
        &f.path[..end]
    });
    for strip in [None, prefix] {
        let mut out = Vec::new();
        rewrite::request_head(&mut out, req.headers, &f, strip, upgrade, server, &peer);
        let mut headers =
            [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; h1::MAX_HEADERS + 8];
        let mut again = httparse::Request::new(&mut []);
        match again.parse_with_uninit_headers(&out, &mut headers) {
            Ok(httparse::Status::Complete(n)) if n == out.len() => {}
            other => panic!("the rewritten head does not parse whole: {other:?}"),
        }
        let hosts = again
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("host"))
            .count();
        if hosts != 1 {
            panic!("the rewritten head has {hosts} host fields");
        }
        for h in again.headers.iter() {
            if listed
                .iter()
                .any(|l| l.eq_ignore_ascii_case(h.name.as_bytes()))
            {
                panic!("{:?} is listed in Connection yet forwarded", h.name);
            }
        }
        let Ok(refields) = Fields::of(again.headers) else {
            panic!("the rewritten head's fields are refused");
        };
        match refields.request_framing(false) {
            Ok(same) if same == framing => {}
            other => panic!("framing {framing:?} became {other:?}"),
        }
    }
}

/// The chunked scanner on its own: the first byte picks where the input is
/// split in two reads.
pub fn chunked(data: &[u8]) {
    chunked_body(data);
}

fn chunked_body(body: &[u8]) {
    let whole = scan(body, &[body.len()]);
    // However the bytes arrive, the answer is the same.
    let split = body.first().map_or(0, |b| usize::from(*b)).min(body.len());
    let halves = scan(body, &[split, body.len()]);
    let bytes: Vec<usize> = (1..=body.len()).collect();
    let one_by_one = scan(body, &bytes);
    if whole != halves || whole != one_by_one {
        panic!("split-dependent result: whole {whole:?}, halves {halves:?}, byte by byte {one_by_one:?}");
    }
    let Scan::Done { used, data } = whole else {
        return;
    };
    // A body the strict scanner accepts ends where a lenient peer ends it,
    // with the same data: no bytes of it can be read as another request.
    match lenient_chunked(body) {
        Some((end, lenient_data)) if end == used && lenient_data == data => {}
        other => panic!(
            "strict end {used} with {} data bytes, lenient peer {:?}",
            data.len(),
            other.map(|(e, d)| (e, d.len()))
        ),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Scan {
    Done { used: usize, data: Vec<u8> },
    Unfinished { data: Vec<u8> },
    Refused,
}

/// Feeds `body` to a scanner in pieces ending at each of `cuts`.
fn scan(body: &[u8], cuts: &[usize]) -> Scan {
    let mut s = ChunkedScanner::default();
    let mut data = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for &end in cuts {
        let piece = &body[start..end];
        match s.feed(piece, |d| data.extend_from_slice(d)) {
            Ok(n) if n <= piece.len() => used += n,
            Ok(n) => panic!("used {n} of a {}-byte piece", piece.len()),
            Err(_) => return Scan::Refused,
        }
        if s.is_done() {
            return Scan::Done { used, data };
        }
        start = end;
    }
    Scan::Unfinished { data }
}

/// A chunked decoder as lenient as common servers: a line ends at LF with
/// or without CR, anything after the size up to the line end is an
/// extension, trailer lines are skipped up to an empty line. Returns where
/// the body ends and its data, or `None` if it does not end (or is not
/// chunked at all).
fn lenient_chunked(body: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut i = 0;
    let mut data = Vec::new();
    let line = |i: usize| -> Option<(usize, &[u8])> {
        let n = body[i..].iter().position(|b| *b == b'\n')?;
        let mut l = &body[i..i + n];
        if let [rest @ .., b'\r'] = l {
            l = rest;
        }
        Some((i + n + 1, l))
    };
    loop {
        let (next, size_line) = line(i)?;
        let digits = size_line
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        if digits == 0 || digits > 16 {
            return None;
        }
        let size = u64::from_str_radix(std::str::from_utf8(&size_line[..digits]).ok()?, 16).ok()?;
        i = next;
        if size == 0 {
            loop {
                let (next, trailer) = line(i)?;
                i = next;
                if trailer.is_empty() {
                    return Some((i, data));
                }
            }
        }
        let size = usize::try_from(size).ok()?;
        let end = i.checked_add(size)?;
        data.extend_from_slice(body.get(i..end)?);
        i = end;
        // The data is followed by a line end.
        match body.get(i..) {
            Some([b'\r', b'\n', ..]) => i += 2,
            Some([b'\n', ..]) => i += 1,
            _ => return None,
        }
    }
}

/// A request path as routing sees it.
pub fn path(data: &[u8]) {
    if let Ok(p) = std::str::from_utf8(data) {
        path_of(p);
    }
}

/// The normalised path is a fixed point, starts with `/`, and has no empty,
/// `.` or `..` segment and no percent-encoded unreserved character left:
/// nothing a route could be bypassed with.
fn path_of(target: &str) {
    // The proxy splits the query off first.
    let p = target.split_once('?').map_or(target, |(p, _)| p);
    let Ok(n) = crate::router::normalize_path(p) else {
        return;
    };
    if !p.starts_with('/') {
        return;
    }
    match crate::router::normalize_path(&n) {
        Ok(again) if again == n => {}
        other => panic!("{p:?} -> {n:?} -> {other:?}"),
    }
    let path: &str = &n;
    if !path.starts_with('/') {
        panic!("{p:?} -> {n:?} does not start with /");
    }
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        if *seg == "." || *seg == ".." || (seg.is_empty() && i != last) {
            panic!("{p:?} -> {n:?} keeps segment {seg:?}");
        }
    }
    let bytes = path.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(c) = hex {
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    panic!("{p:?} -> {n:?} keeps %{c:02X}");
                }
            }
        }
    }
}

/// A configuration file as bytes: it must load or be refused with
/// positions inside the text.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(crate::ConfigError::Invalid(problems)) = crate::config::parse(text, None) {
        let lines = text.split('\n').count();
        for p in &problems {
            if p.line == 0 || p.line > lines || p.column == 0 {
                panic!("problem outside the text: {p:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_testkit::replay_corpus as replay;

    #[test]
    fn corpus_request_head() {
        replay("request_head", request_head);
    }

    #[test]
    fn corpus_rewrite() {
        replay("rewrite", rewrite);
    }

    #[test]
    fn corpus_response_head() {
        replay("response_head", response_head);
    }

    #[test]
    fn corpus_chunked() {
        replay("chunked", chunked);
    }

    #[test]
    fn corpus_path() {
        replay("path", path);
    }

    #[test]
    fn corpus_config() {
        replay("config", config);
    }

    #[test]
    fn the_lenient_decoder_is_lenient() {
        assert_eq!(
            lenient_chunked(b"3\nabc\n0\n\nX"),
            Some((9, b"abc".to_vec()))
        );
        assert_eq!(
            lenient_chunked(b"3;x\r\nabc\r\n0\r\nT: 1\n\r\nX"),
            Some((20, b"abc".to_vec()))
        );
        assert_eq!(lenient_chunked(b"3\r\nab"), None);
    }
}
