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
