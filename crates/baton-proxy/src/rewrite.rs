//! Header rewriting: the head the upstream gets for a client's request, and
//! the head the client gets for the upstream's response, as pure functions
//! from a parsed head ([`httparse`]) to bytes.
//!
//! Both leave out the hop-by-hop fields ([`h1::is_hop_by_hop`]) and the
//! fields a `Connection` field names ([`h1::connection_listed`], which never
//! lists the [protected](h1::is_protected) ones). A request gets
//! `X-Forwarded-For` (appended to the client's own), `X-Forwarded-Proto` and
//! `Forwarded` (the client's `X-Forwarded-Proto` is dropped), and the
//! authority of an absolute-form target as its only `Host` (RFC 9112
//! §3.2.2). A response keeps its framing fields for an HTTP/1.1 client and
//! loses the chunked coding for an HTTP/1.0 one.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use crate::h1::{self, Fields, Framing};
use crate::router;

/// A request being forwarded, as read from the client.
#[derive(Debug)]
pub(crate) struct Forwarded<'a> {
    pub(crate) method: &'a str,
    /// The request target as sent.
    pub(crate) target: &'a str,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    /// The target was in absolute form.
    pub(crate) absolute: bool,
    /// `path` is the target's path normalised, not as sent.
    pub(crate) path_changed: bool,
    pub(crate) host: Option<&'a str>,
    /// The client sent a `Host` field.
    pub(crate) host_field: bool,
    pub(crate) http10: bool,
    /// The client wants the connection kept.
    pub(crate) client_keep: bool,
    pub(crate) framing: Framing,
    pub(crate) fields: &'a Fields,
}

impl<'a> Forwarded<'a> {
    /// The request `req` (whose fields are `fields`, body `framing`, and
    /// target `target`) as it is forwarded: the authority of an
    /// absolute-form target replaces `Host` (RFC 9112 §3.2.2); a client
    /// that asked to close, or an HTTP/1.0 one that did not ask to keep the
    /// connection, gets its connection closed. A `Host` that is not text
    /// is refused.
    pub(crate) fn new<'b: 'a>(
        req: &httparse::Request<'_, 'b>,
        target: &'a RequestTarget<'_>,
        fields: &'a Fields,
        framing: Framing,
    ) -> Result<Forwarded<'a>, BadHost> {
        let host_field = host_field(req.headers)?;
        let http10 = req.version == Some(0);
        Ok(Forwarded {
            method: req.method.unwrap_or("GET"),
            target: req.path.unwrap_or("/"),
            path: &target.path,
            query: target.query.as_deref(),
            absolute: target.authority.is_some(),
            path_changed: target.path_changed,
            host: target.authority.as_deref().or(host_field),
            host_field: host_field.is_some(),
            http10,
            client_keep: !fields.close && (!http10 || fields.keep_alive),
            framing,
            fields,
        })
    }
}

/// The client's address and scheme as the forwarding fields write them.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// The address, as an `X-Forwarded-For` element.
    text: String,
    /// An IPv6 address, which a `Forwarded` node quotes in brackets.
    v6: bool,
    /// The client came over TLS (`https`, else `http`).
    https: bool,
}

impl Peer {
    pub(crate) fn new(ip: IpAddr) -> Peer {
        let (text, v6) = match ip {
            IpAddr::V4(ip) => (ipv4_text(ip), false),
            IpAddr::V6(ip) => (ip.to_string(), true),
        };
        Peer {
            text,
            v6,
            https: false,
        }
    }

    /// The same client, over TLS.
    pub(crate) fn over_tls(mut self) -> Peer {
        self.https = true;
        self
    }

    fn proto(&self) -> &'static [u8] {
        if self.https {
            b"https"
        } else {
            b"http"
        }
    }
}

/// `ip` in dotted decimal, as `Display` writes it, without the formatting
/// machinery: this runs for every new connection, and `Display` took more
/// instructions than parsing the request head.
fn ipv4_text(ip: std::net::Ipv4Addr) -> String {
    let mut text = String::with_capacity(15);
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

/// A request target, split and its path normalised
/// ([`router::normalize_path`]): what is routed and forwarded.
#[derive(Debug)]
pub(crate) struct RequestTarget<'a> {
    /// The path, normalised.
    pub(crate) path: Cow<'a, str>,
    /// The normalised path differs from the one sent.
    pub(crate) path_changed: bool,
    pub(crate) query: Option<Cow<'a, str>>,
    /// The authority of an absolute-form target.
    pub(crate) authority: Option<Cow<'a, str>>,
}

/// Why a request target is refused (`400`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BadTarget {
    /// Neither origin form (`/path?query`), `*`, nor absolute form
    /// (`http://` or `https://` and an authority). Authority form
    /// (`host:port`) belongs to `CONNECT`, which is refused anyway.
    #[error("unsupported request target form")]
    Form,
    /// The path does not normalise.
    #[error("{0}")]
    Path(#[from] router::BadPath),
}

impl<'a> RequestTarget<'a> {
    /// Splits `target`: origin form (`/path?query`) or `*` without
    /// allocating, absolute form (`http://host/path`) into owned parts.
    pub(crate) fn parse(target: &'a str) -> Result<RequestTarget<'a>, BadTarget> {
        if target.starts_with('/') || target == "*" {
            let (raw, query) = match target.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (target, None),
            };
            let path = router::normalize_path(raw)?;
            return Ok(RequestTarget {
                path_changed: matches!(path, Cow::Owned(_)),
                path,
                query: query.map(Cow::Borrowed),
                authority: None,
            });
        }
        let uri = match target.parse::<http::Uri>() {
            Ok(u) if u.authority().is_some() && is_http_scheme(u.scheme_str()) => u,
            _ => return Err(BadTarget::Form),
        };
        let path = router::normalize_path(uri.path())?;
        Ok(RequestTarget {
            path_changed: matches!(path, Cow::Owned(_)),
            path: Cow::Owned(path.into_owned()),
            query: uri.query().map(|q| Cow::Owned(q.to_owned())),
            authority: uri.authority().map(|a| Cow::Owned(a.as_str().to_owned())),
        })
    }
}

fn is_http_scheme(scheme: Option<&str>) -> bool {
    scheme.is_some_and(|s| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"))
}

/// A `Host` field whose value is not text (bytes of obs-text that are
/// not UTF-8). It can be neither routed by nor replaced, and forwarding it
/// beside a `Host` of the proxy's own would give the upstream two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the host field is not text")]
pub(crate) struct BadHost;

/// The value of the request's `Host` field, if it has one.
pub(crate) fn host_field<'h>(headers: &[httparse::Header<'h>]) -> Result<Option<&'h str>, BadHost> {
    match headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")) {
        Some(h) => std::str::from_utf8(h.value).map(Some).map_err(|_| BadHost),
        None => Ok(None),
    }
}

/// The `Upgrade` value of a request that asks to switch protocols
/// (`Connection: upgrade` and an `Upgrade` field).
pub(crate) fn upgrade<'h>(headers: &[httparse::Header<'h>], fields: &Fields) -> Option<&'h [u8]> {
    if !fields.upgrade {
        return None;
    }
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("upgrade"))
        .map(|h| h.value)
}

/// Writes into `out` (cleared first) the head of `f` for the upstream
/// `server`: the request line (the path stripped of `strip`, or
/// normalised, or as sent), the client's fields less the hop-by-hop ones,
/// `Host` when the client sent none or an absolute-form target replaces
/// it, the forwarding fields for `peer`, and `upgrade` if the request
/// switches protocols.
pub(crate) fn request_head(
    out: &mut Vec<u8>,
    headers: &[httparse::Header<'_>],
    f: &Forwarded<'_>,
    strip: Option<&str>,
    upgrade: Option<&[u8]>,
    server: SocketAddr,
    peer: &Peer,
) {
    out.clear();
    out.extend_from_slice(f.method.as_bytes());
    out.push(b' ');
    if strip.is_some() || f.absolute || f.path_changed {
        let path = match strip {
            Some(prefix) => Cow::Owned(router::strip(prefix, f.path)),
            None => Cow::Borrowed(f.path),
        };
        out.extend_from_slice(if path.is_empty() {
            b"/"
        } else {
            path.as_bytes()
        });
        if let Some(q) = f.query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
    } else {
        out.extend_from_slice(f.target.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Allocates only when `Connection` names other fields.
    let listed = h1::connection_listed(headers);
    let mut xff: Option<Vec<u8>> = None;
    for h in headers.iter() {
        let name = h.name;
        // A chunked body stays chunked: its codings go on as they came
        // (`gzip, chunked` too).
        if name.eq_ignore_ascii_case("transfer-encoding") && f.framing == Framing::Chunked {
            h1::put_header(out, name.as_bytes(), h.value);
            continue;
        }
        if h1::is_hop_by_hop(name)
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            // An absolute-form target's authority replaces `Host`.
            || (f.absolute && name.eq_ignore_ascii_case("host"))
            || name.eq_ignore_ascii_case("expect")
            || listed
                .iter()
                .any(|l| l.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            let v = xff.get_or_insert_with(Vec::new);
            if !v.is_empty() {
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(h.value);
            continue;
        }
        h1::put_header(out, name.as_bytes(), h.value);
    }
    if f.absolute || !f.host_field {
        match f.host {
            Some(h) => h1::put_header(out, b"host", h.as_bytes()),
            None => {
                out.extend_from_slice(b"host: ");
                out.extend_from_slice(server.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = xff {
        out.extend_from_slice(&prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.text.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(peer.proto());
    out.extend_from_slice(b"\r\nforwarded: for=");
    if peer.v6 {
        out.extend_from_slice(b"\"[");
        out.extend_from_slice(peer.text.as_bytes());
        out.extend_from_slice(b"]\"");
    } else {
        out.extend_from_slice(peer.text.as_bytes());
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(peer.proto());
    if let Some(host) = f.host.filter(|h| !h.contains('"') && !h.contains('\\')) {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(host.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"\r\n");
    if let Some(p) = upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
        h1::put_header(out, b"upgrade", p);
    }
    out.extend_from_slice(b"\r\n");
}

/// What the client asked of the connection, for its response head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientSide {
    /// The client speaks HTTP/1.0 (no chunked coding, `keep-alive` said).
    pub(crate) http10: bool,
    /// The client wants the connection kept.
    pub(crate) keep: bool,
    /// The process or the listener is draining (every response closes).
    pub(crate) draining: bool,
}

/// Writes into `out` (cleared first) the client's head for the response
/// `resp` (whose fields are `fields` and body `framing`); returns whether
/// the client connection persists after the response (`101`: the head
/// keeps `Upgrade` and says `Connection: upgrade`, and the connection is
/// handed over, not persisted).
pub(crate) fn response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    fields: &Fields,
    framing: Framing,
    client: ClientSide,
) -> bool {
    let status = resp.code.unwrap_or(0);
    out.clear();
    h1::put_status_line(out, status, resp.reason.unwrap_or(""));
    let switching = status == 101;
    // Allocates only when `Connection` names other fields.
    let listed = h1::connection_listed(resp.headers);
    for h in resp.headers.iter() {
        let name = h.name;
        if switching && name.eq_ignore_ascii_case("upgrade") {
            h1::put_header(out, name.as_bytes(), h.value);
            continue;
        }
        // Transfer codings go on as they came to an HTTP/1.1 client (an
        // HTTP/1.0 one gets the chunked coding taken off).
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if !client.http10 && !switching {
                h1::put_header(out, name.as_bytes(), h.value);
            }
            continue;
        }
        if h1::is_hop_by_hop(name)
            || (fields.transfer_encoding && name.eq_ignore_ascii_case("content-length"))
            || listed
                .iter()
                .any(|l| l.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        h1::put_header(out, name.as_bytes(), h.value);
    }
    if switching {
        out.extend_from_slice(b"connection: upgrade\r\n\r\n");
        return false;
    }
    let persist = client.keep
        && !client.draining
        && match framing {
            Framing::Close => false,
            Framing::Chunked => !client.http10,
            _ => true,
        };
    h1::put_connection(out, persist, client.http10);
    out.extend_from_slice(b"\r\n");
    persist
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::MaybeUninit;

    const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

    fn peer() -> Peer {
        Peer::new("192.0.2.7".parse().unwrap())
    }

    /// Rewrites the request `head` as the proxy does for a route that
    /// strips `strip` (or not), and returns the upstream's head as text.
    fn rewrite_request(head: &[u8], strip: Option<&str>) -> String {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 64];
        let mut req = httparse::Request::new(&mut []);
        let n = req.parse_with_uninit_headers(head, &mut headers).unwrap();
        assert!(n.is_complete(), "test head incomplete");
        let fields = Fields::of(req.headers).unwrap();
        let http10 = req.version == Some(0);
        let framing = fields.request_framing(http10).unwrap();
        let t = RequestTarget::parse(req.path.unwrap()).unwrap();
        let f = Forwarded::new(&req, &t, &fields, framing).unwrap();
        let mut out = Vec::new();
        let up = upgrade(req.headers, &fields);
        request_head(&mut out, req.headers, &f, strip, up, SERVER, &peer());
        String::from_utf8(out).unwrap()
    }

    fn field_values<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
        head.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(": "))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    }

    #[test]
    fn hop_by_hop_fields_are_dropped_from_requests() {
        let out = rewrite_request(
            b"GET /a HTTP/1.1\r\nhost: example.test\r\nconnection: keep-alive\r\n\
              keep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nte: trailers\r\n\
              trailer: x-t\r\nproxy-authorization: basic eA==\r\nexpect: 100-continue\r\n\
              accept: */*\r\n\r\n",
            None,
        );
        assert!(out.starts_with("GET /a HTTP/1.1\r\n"), "{out}");
        for gone in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "proxy-authorization",
            "expect",
        ] {
            assert!(field_values(&out, gone).is_empty(), "{gone} kept: {out}");
        }
        assert_eq!(field_values(&out, "accept"), ["*/*"]);
        assert_eq!(field_values(&out, "host"), ["example.test"]);
        assert!(out.ends_with("\r\n\r\n"));
    }

    #[test]
    fn connection_named_fields_go_but_protected_ones_stay() {
        let out = rewrite_request(
            b"POST /a HTTP/1.1\r\nhost: h\r\nconnection: x-secret, content-length, host, \
              x-forwarded-for\r\nx-secret: 1\r\nx-forwarded-for: 10.0.0.1\r\n\
              content-length: 0\r\n\r\n",
            None,
        );
        assert!(field_values(&out, "x-secret").is_empty(), "{out}");
        assert_eq!(field_values(&out, "content-length"), ["0"]);
        assert_eq!(field_values(&out, "host"), ["h"]);
        assert_eq!(
            field_values(&out, "x-forwarded-for"),
            ["10.0.0.1, 192.0.2.7"]
        );
    }

    #[test]
    fn forwarding_fields_are_written_once() {
        let out = rewrite_request(
            b"GET / HTTP/1.1\r\nhost: example.test\r\nx-forwarded-for: 198.51.100.1\r\n\
              x-forwarded-for: 198.51.100.2\r\nx-forwarded-proto: https\r\n\r\n",
            None,
        );
        assert_eq!(
            field_values(&out, "x-forwarded-for"),
            ["198.51.100.1, 198.51.100.2, 192.0.2.7"]
        );
        assert_eq!(field_values(&out, "x-forwarded-proto"), ["http"]);
        assert_eq!(
            field_values(&out, "forwarded"),
            ["for=192.0.2.7;proto=http;host=\"example.test\""]
        );
        let v6 = {
            let mut out = Vec::new();
            let fields = Fields::default();
            let f = Forwarded {
                method: "GET",
                target: "/",
                path: "/",
                query: None,
                absolute: false,
                path_changed: false,
                host: Some("a\"b"),
                host_field: true,
                http10: false,
                client_keep: true,
                framing: Framing::None,
                fields: &fields,
            };
            let peer = Peer::new("2001:db8::1".parse().unwrap()).over_tls();
            request_head(&mut out, &[], &f, None, None, SERVER, &peer);
            String::from_utf8(out).unwrap()
        };
        // A host with a quote is left out of `Forwarded` rather than
        // escaped; a client over TLS is `https` in both fields.
        assert_eq!(
            field_values(&v6, "forwarded"),
            ["for=\"[2001:db8::1]\";proto=https"]
        );
        assert_eq!(field_values(&v6, "x-forwarded-proto"), ["https"]);
    }

    #[test]
    fn an_ipv4_address_is_written_as_display_writes_it() {
        for octet in 0..=255u8 {
            for ip in [
                std::net::Ipv4Addr::new(octet, 0, 9, 255),
                std::net::Ipv4Addr::new(10, octet, 100, octet),
            ] {
                assert_eq!(ipv4_text(ip), ip.to_string());
            }
        }
    }

    #[test]
    fn an_absolute_form_target_replaces_host() {
        let out = rewrite_request(
            b"GET http://real.test:81/p/../q?x=1 HTTP/1.1\r\nhost: other.test\r\n\r\n",
            None,
        );
        assert!(out.starts_with("GET /q?x=1 HTTP/1.1\r\n"), "{out}");
        assert_eq!(field_values(&out, "host"), ["real.test:81"]);
        // No `Host` at all: the server's address.
        let out = rewrite_request(b"GET /x HTTP/1.0\r\n\r\n", None);
        assert_eq!(field_values(&out, "host"), ["127.0.0.1:8080"]);
    }

    #[test]
    fn only_http_absolute_forms_are_targets() {
        // Authority form (found by the rewrite fuzz target: it was routed
        // by `+a` and forwarded as `/`), other schemes, no authority.
        for t in [
            "+a",
            "example.test:80",
            "example.test",
            "ftp://a/x",
            "http:/x",
            "mailto:a@b",
        ] {
            assert_eq!(RequestTarget::parse(t).err(), Some(BadTarget::Form), "{t}");
        }
        let t = RequestTarget::parse("HTTPS://a.test").unwrap();
        assert_eq!(t.authority.as_deref(), Some("a.test"));
        assert_eq!(t.path, "/");
    }

    #[test]
    fn a_host_that_is_not_text_is_refused() {
        let head = b"GET / HTTP/1.1\r\nhost: \xff\r\n\r\n";
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 8];
        let mut req = httparse::Request::new(&mut []);
        req.parse_with_uninit_headers(head, &mut headers).unwrap();
        assert_eq!(host_field(req.headers), Err(BadHost));
        let t = RequestTarget::parse("/").unwrap();
        let fields = Fields::of(req.headers).unwrap();
        assert!(Forwarded::new(&req, &t, &fields, Framing::None).is_err());
    }

    #[test]
    fn a_stripped_or_normalised_path_is_forwarded() {
        let out = rewrite_request(b"GET /api/v1?q HTTP/1.1\r\nhost: h\r\n\r\n", Some("/api"));
        assert!(out.starts_with("GET /v1?q HTTP/1.1\r\n"), "{out}");
        let out = rewrite_request(b"GET /api HTTP/1.1\r\nhost: h\r\n\r\n", Some("/api"));
        assert!(out.starts_with("GET / HTTP/1.1\r\n"), "{out}");
        let out = rewrite_request(b"GET /a/./b HTTP/1.1\r\nhost: h\r\n\r\n", None);
        assert!(out.starts_with("GET /a/b HTTP/1.1\r\n"), "{out}");
        let out = rewrite_request(b"GET /a%2fb?x HTTP/1.1\r\nhost: h\r\n\r\n", None);
        assert!(out.starts_with("GET /a%2fb?x HTTP/1.1\r\n"), "{out}");
    }

    #[test]
    fn chunked_codings_go_on_and_upgrades_are_asked_again() {
        let out = rewrite_request(
            b"POST / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            None,
        );
        assert_eq!(field_values(&out, "transfer-encoding"), ["gzip, chunked"]);
        let out = rewrite_request(
            b"GET /ws HTTP/1.1\r\nhost: h\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n",
            None,
        );
        assert_eq!(field_values(&out, "connection"), ["upgrade"]);
        assert_eq!(field_values(&out, "upgrade"), ["websocket"]);
        // `Upgrade` without `Connection: upgrade` is not an upgrade.
        let out = rewrite_request(
            b"GET / HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\n\r\n",
            None,
        );
        assert!(field_values(&out, "upgrade").is_empty(), "{out}");
    }

    fn rewrite_response(head: &[u8], method: &str, client: ClientSide) -> (String, bool) {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 64];
        let mut resp = httparse::Response::new(&mut []);
        httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, head, &mut headers)
            .unwrap();
        let fields = Fields::of(resp.headers).unwrap();
        let framing = fields.response_framing(method, resp.code.unwrap());
        let mut out = Vec::new();
        let persist = response_head(&mut out, &resp, &fields, framing, client);
        (String::from_utf8(out).unwrap(), persist)
    }

    const KEEP11: ClientSide = ClientSide {
        http10: false,
        keep: true,
        draining: false,
    };

    #[test]
    fn response_heads_lose_hop_by_hop_and_listed_fields() {
        let (out, persist) = rewrite_response(
            b"HTTP/1.1 200 OK\r\nconnection: x-a, keep-alive\r\nx-a: 1\r\nkeep-alive: 5\r\n\
              content-length: 2\r\nserver: s\r\n\r\n",
            "GET",
            KEEP11,
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nserver: s\r\n\r\n"
        );
        assert!(persist);
    }

    #[test]
    fn response_framing_follows_the_client() {
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n";
        let (out, persist) = rewrite_response(chunked, "GET", KEEP11);
        assert_eq!(field_values(&out, "transfer-encoding"), ["chunked"]);
        assert!(field_values(&out, "content-length").is_empty(), "{out}");
        assert!(persist);
        // An HTTP/1.0 client gets the coding taken off, and a close.
        let c10 = ClientSide {
            http10: true,
            ..KEEP11
        };
        let (out, persist) = rewrite_response(chunked, "GET", c10);
        assert!(field_values(&out, "transfer-encoding").is_empty(), "{out}");
        assert_eq!(field_values(&out, "connection"), ["close"]);
        assert!(!persist);
        let (out, persist) = rewrite_response(b"HTTP/1.1 204 No Content\r\n\r\n", "GET", c10);
        assert_eq!(field_values(&out, "connection"), ["keep-alive"]);
        assert!(persist);
        // Close-delimited, or draining: the client connection closes.
        let (out, persist) = rewrite_response(b"HTTP/1.1 200 OK\r\n\r\n", "GET", KEEP11);
        assert_eq!(field_values(&out, "connection"), ["close"]);
        assert!(!persist);
        let draining = ClientSide {
            draining: true,
            ..KEEP11
        };
        let (_, persist) = rewrite_response(
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "GET",
            draining,
        );
        assert!(!persist);
    }

    #[test]
    fn switching_protocols_keeps_upgrade() {
        let (out, persist) = rewrite_response(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
              transfer-encoding: chunked\r\nsec-websocket-accept: x\r\n\r\n",
            "GET",
            KEEP11,
        );
        assert_eq!(
            out,
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
             sec-websocket-accept: x\r\nconnection: upgrade\r\n\r\n"
        );
        assert!(!persist);
    }
}
