//! `/readyz` and `/healthz`, asserted from a client: ready on the active
//! generation, 503 on one that drains (after an upgrade or a stop), ready
//! again on the next one, on the same inherited admin socket.

use std::io::{Read, Write};

use baton_testkit::http_get as get;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use baton_testkit::assert_eventually;

use crate::Running;

fn connect(addr: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

#[test]
fn readyz_is_503_on_a_draining_generation_and_200_on_the_active_one() {
    let mut r = Running::start(
        "hello",
        &[
            "--admin",
            "127.0.0.1:0",
            "--settle",
            "300ms",
            "--idle-grace",
            "5s",
        ],
    );
    let first = r.pid();
    let admin: SocketAddr = r.ready["admin"].as_str().unwrap().parse().unwrap();
    let mut old = connect(admin);
    assert_eq!(get(&mut old, "/readyz"), (200, "ready\n".into(), false));
    assert_eq!(get(&mut old, "/healthz"), (200, "ok\n".into(), false));
    assert_eq!(get(&mut old, "/other").0, 404);

    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let second = a["pid"].as_u64().unwrap() as u32;
    // The keep-alive connection is still the first generation's: draining.
    let (status, body, close) = get(&mut old, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, "not ready: draining\n");
    assert!(close, "a draining generation closes the probe's connection");
    // A new connection reaches the new generation, on the same socket.
    let mut new = connect(admin);
    assert_eq!(get(&mut new, "/readyz"), (200, "ready\n".into(), false));
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(first),
        "first generation still running"
    );

    // A stop: the probe's open connection sees 503 while it drains (a slow
    // request keeps it draining).
    let mut slow = connect(r.addr());
    // Served once: accepted by the second generation, whatever comes next.
    assert_eq!(get(&mut slow, "/").0, 200);
    slow.write_all(b"GET /sleep/2000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    baton_testkit::send_signal(second, rustix::process::Signal::TERM);
    // The signal is handled at once; until then the probe still sees 200.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body, _) = get(&mut new, "/readyz");
        if status != 200 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!((status, body.as_str()), (503, "not ready: draining\n"));
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"),
        "the slow request finished"
    );
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(second),
        "did not stop"
    );
}

/// Scrapes `/metrics` on a new connection and parses it.
fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let mut c = connect(admin);
    let (status, body, _) = get(&mut c, "/metrics");
    assert_eq!(status, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines)
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{body}"))
}

fn value(s: &prometheus_parse::Scrape, name: &str, result: Option<&str>) -> f64 {
    let sample = s
        .samples
        .iter()
        .find(|x| x.metric == name && result.map_or(true, |r| x.labels.get("result") == Some(r)))
        .unwrap_or_else(|| panic!("no {name} {result:?} in {:?}", s.samples));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn metrics_parse_and_count_upgrades_across_generations_without_a_reset() {
    let r = Running::start(
        "hello",
        &[
            "--admin",
            "127.0.0.1:0",
            "--settle",
            "200ms",
            "--upgrade-timeout",
            "5s",
        ],
    );
    let admin: SocketAddr = r.ready["admin"].as_str().unwrap().parse().unwrap();
    let s = scrape(admin);
    assert_eq!(value(&s, "baton_generation", None), 1.0);
    assert_eq!(value(&s, "baton_upgrades_total", Some("ok")), 0.0);
    for i in 1..=3u32 {
        let a = r.upgrade(r#"{"command":"upgrade"}"#);
        assert_eq!(a["ok"], true, "{a}");
        // A new connection: the new generation answers.
        let s = scrape(admin);
        assert_eq!(value(&s, "baton_generation", None), f64::from(i + 1));
        assert_eq!(
            value(&s, "baton_upgrades_total", Some("ok")),
            f64::from(i),
            "no reset at upgrade {i}"
        );
    }
    // A failed upgrade and a reload count on the active generation, and
    // travel on with the next upgrade.
    let crash = r.dir.script(
        "crash",
        &format!(
            "exec {} \"$@\" --fail-startup",
            baton_testkit::example("hello").display()
        ),
    );
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        crash.display()
    ));
    assert_eq!(a["ok"], false, "{a}");
    assert_eq!(r.control(r#"{"command":"reload"}"#)["ok"], true);
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let s = scrape(admin);
    assert_eq!(value(&s, "baton_generation", None), 5.0);
    assert_eq!(value(&s, "baton_upgrades_total", Some("ok")), 4.0);
    assert_eq!(value(&s, "baton_upgrades_total", Some("failed")), 1.0);
    assert_eq!(value(&s, "baton_reloads_total", Some("ok")), 1.0);
}
