//! Routing by host and longest prefix, fixed responses, forwarding headers,
//! 404 and 504.

use crate::{get, get_with, upstream_toml, Proxy, Upstream};

#[test]
fn routes_by_host_then_longest_prefix_with_forwarding_headers() {
    let a = Upstream::http("a");
    let b = Upstream::http("b");
    let body = format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

{}
{}
[[routes]]
listener = "web"
host = "api.example.com"
path_prefix = "/api"
upstream = "a"
strip_prefix = true

[[routes]]
listener = "web"
path_prefix = "/api"
upstream = "b"

[[routes]]
listener = "web"
path_prefix = "/api/v2"
upstream = "a"

[[routes]]
listener = "web"
path_prefix = "/"
respond = {{ status = 200, body = "fixed\n" }}

[[routes]]
listener = "web"
path_prefix = "/teapot"
respond = {{ status = 418, body = "short and stout\n" }}
"#,
        upstream_toml("a", &[a.addr], ""),
        upstream_toml("b", &[b.addr], "")
    );
    let p = Proxy::start("routing", "", &body);
    let web = p.addr("web");

    // Host route, with the prefix stripped.
    assert_eq!(
        get(web, "api.example.com", "/api/users"),
        (200, "upstream a path /users\n".into())
    );
    assert_eq!(
        get(web, "API.example.com:80", "/api"),
        (200, "upstream a\n".into())
    );
    // Another host: the host-less routes, longest prefix first.
    assert_eq!(
        get(web, "other", "/api/users"),
        (200, "upstream b path /api/users\n".into())
    );
    assert_eq!(
        get(web, "other", "/api/v2/x"),
        (200, "upstream a path /api/v2/x\n".into())
    );
    // Prefixes match whole segments.
    assert_eq!(get(web, "other", "/apiary"), (200, "fixed\n".into()));
    assert_eq!(
        get(web, "other", "/teapot"),
        (418, "short and stout\n".into())
    );

    // Forwarding headers: the client is appended, the protocol set.
    let (status, headers) = get_with(
        web,
        "api.example.com",
        "/api/headers",
        "X-Forwarded-For: 10.1.2.3\r\n",
    );
    assert_eq!(status, 200);
    assert!(
        headers.contains("x-forwarded-for: 10.1.2.3, 127.0.0.1\n"),
        "{headers}"
    );
    assert!(headers.contains("x-forwarded-proto: http\n"), "{headers}");
    assert!(
        headers.contains("forwarded: for=127.0.0.1;proto=http;host=\"api.example.com\"\n"),
        "{headers}"
    );
    assert!(headers.contains("host: api.example.com\n"), "{headers}");
    // Hop-by-hop headers are not forwarded.
    assert!(!headers.contains("connection: close"), "{headers}");
}

#[test]
fn no_route_is_404_and_a_slow_upstream_is_504_within_the_route_timeout() {
    let a = Upstream::http("a");
    let body = format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

{}
[[routes]]
listener = "web"
path_prefix = "/sleep"
upstream = "a"
timeout = "300ms"
"#,
        upstream_toml("a", &[a.addr], "")
    );
    let p = Proxy::start("routing-504", "", &body);
    let web = p.addr("web");
    assert_eq!(get(web, "x", "/elsewhere"), (404, "no route\n".into()));
    assert_eq!(
        get(web, "x", "/sleep/10"),
        (200, "upstream a path /sleep/10\n".into())
    );
    assert_eq!(
        get(web, "x", "/sleep/5000"),
        (504, "gateway timeout\n".into())
    );
    // A timeout is the route's problem, not the server's: it stays up.
    assert_eq!(p.upstream_server("a", a.addr)["healthy"], true);
}
