//! `[admin]`: `/readyz` of `baton proxy` follows the generations on its own
//! inherited socket; a bad address is a config error with its position.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use baton_testkit::http_get;

use crate::{web_to_a, Proxy, Upstream};

#[test]
fn readyz_is_503_on_the_draining_proxy_and_200_on_the_new_one() {
    let a = Upstream::http("a");
    let body = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n\n{}",
        web_to_a(&[a.addr])
    );
    let p = Proxy::start("admin", "settle = \"300ms\"\nidle_grace = \"5s\"", &body);
    let admin: SocketAddr = p.ready["admin"].as_str().unwrap().parse().unwrap();
    let connect = || {
        let c = TcpStream::connect(admin).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    };
    let mut old = connect();
    assert_eq!(
        http_get(&mut old, "/readyz"),
        (200, "ready\n".into(), false)
    );
    assert_eq!(http_get(&mut old, "/healthz").0, 200);
    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}");
    let (status, body, close) = http_get(&mut old, "/readyz");
    assert_eq!(
        (status, body.as_str(), close),
        (503, "not ready: draining\n", true)
    );
    let mut new = connect();
    assert_eq!(
        http_get(&mut new, "/readyz"),
        (200, "ready\n".into(), false)
    );
    assert_eq!(
        p.status()["listeners"].as_array().unwrap().len(),
        2,
        "web and baton-admin"
    );
    // The library's metrics and the proxy's, in one exposition.
    let (status, metrics, _) = http_get(&mut new, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    for line in [
        "baton_generation 2".to_owned(),
        "baton_upgrades_total{result=\"ok\"} 1".to_owned(),
        format!(
            "baton_upstream_up{{upstream=\"a\",server=\"{}\"}} 1",
            a.addr
        ),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("baton_connections{state=\"active\"} ")),
        "{metrics}"
    );
    assert_eq!(metrics.matches("# EOF").count(), 1, "{metrics}");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
}

#[test]
fn a_bad_admin_address_is_reported_where_it_is_written() {
    let dir = baton_testkit::TempDir::new("admin-check");
    let file = dir.join("proxy.toml");
    std::fs::write(
        &file,
        "[admin]\naddress = \"localhost\"\n\n[[listeners]]\nname = \"baton-admin\"\naddress = \"127.0.0.1:0\"\n\n[[routes]]\nlistener = \"baton-admin\"\nrespond = { status = 200 }\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::baton())
        .args(["check", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    assert!(
        stderr.contains(&format!(
            "{f}:2:11: admin address \"localhost\" is not an IP:PORT address"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{f}:5:8: listener name \"baton-admin\" is reserved for [admin]"
        )),
        "{stderr}"
    );
}

/// The value of the sample named exactly `sample` (name and labels) in a
/// text exposition.
fn sample(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {sample} in:\n{metrics}"))
        .parse()
        .unwrap()
}

/// `baton_requests_total{listener,code_class}` and
/// `baton_request_duration_seconds{listener}` count every answered request,
/// the proxy's own refusals too, and the next generation carries them on.
#[test]
fn request_counts_and_durations_carry_over_an_upgrade() {
    use std::io::{Read, Write};
    let a = Upstream::http("a");
    let body = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n\n{}",
        web_to_a(&[a.addr])
    );
    let p = Proxy::start("request-metrics", "settle = \"300ms\"", &body);
    let admin: SocketAddr = p.ready["admin"].as_str().unwrap().parse().unwrap();
    let scrape = || {
        let mut c = TcpStream::connect(admin).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (status, text, _) = http_get(&mut c, "/metrics");
        assert_eq!(status, 200, "{text}");
        text
    };
    let web = p.addr("web");
    for _ in 0..5 {
        assert_eq!(crate::get(web, "x", "/").0, 200);
    }
    // Smuggling-shaped framing: refused with 400 by the proxy itself.
    let mut c = TcpStream::connect(web).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");

    let m = scrape();
    let ok = "baton_requests_total{listener=\"web\",code_class=\"2xx\"}";
    let bad = "baton_requests_total{listener=\"web\",code_class=\"4xx\"}";
    let count = "baton_request_duration_seconds_count{listener=\"web\"}";
    assert_eq!(sample(&m, ok), 5.0, "{m}");
    assert_eq!(sample(&m, bad), 1.0, "{m}");
    assert_eq!(sample(&m, count), 6.0, "{m}");
    assert!(
        m.lines()
            .any(|l| l.starts_with("baton_request_duration_seconds_bucket{")
                && l.contains("le=\"+Inf\"")),
        "{m}"
    );

    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}");
    for _ in 0..3 {
        assert_eq!(crate::get(web, "x", "/").0, 200);
    }
    let m = scrape();
    assert_eq!(sample(&m, "baton_generation"), 2.0, "{m}");
    assert_eq!(sample(&m, ok), 8.0, "carried over: {m}");
    assert_eq!(sample(&m, bad), 1.0, "{m}");
    assert_eq!(sample(&m, count), 9.0, "{m}");
}

/// `status` counts each listener's open connections and lists the previous
/// generation as draining until it exits.
#[test]
fn status_shows_connections_and_the_draining_generation() {
    use std::io::{Read, Write};
    let a = Upstream::http("a");
    let p = Proxy::start(
        "status-draining",
        // Drained rather than moved: generation 1 keeps the connection.
        "settle = \"0s\"\nidle_grace = \"30s\"\nmigrate = false",
        &web_to_a(&[a.addr]),
    );
    let web = p.addr("web");
    let old_pid = p.status()["pid"].as_u64().unwrap();
    // One keep-alive connection, answered once: open on generation 1.
    let mut c = TcpStream::connect(web).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let web_row = |s: &serde_json::Value| {
        s["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "web")
            .cloned()
            .unwrap()
    };
    assert_eq!(web_row(&p.status())["connections"], 1, "{}", p.status());

    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}");
    // The idle keep-alive connection holds generation 1 (idle grace 30 s).
    let s = p.status();
    assert_eq!(s["generation"], 2, "{s}");
    assert_eq!(web_row(&s)["connections"], 0, "{s}");
    assert_eq!(
        s["draining"],
        serde_json::json!([{"generation": 1, "pid": old_pid}]),
        "{s}"
    );
    let table = crate::text(&p.ctl(&["status"]));
    assert!(
        table.contains(&format!("draining      generation 1 pid {old_pid}")),
        "{table}"
    );
    // The client leaves; generation 1 exits, and is no longer listed.
    drop(c);
    baton_testkit::assert_eventually!(
        Duration::from_secs(20),
        p.status().get("draining").is_none(),
        "generation 1 still listed as draining"
    );
}
