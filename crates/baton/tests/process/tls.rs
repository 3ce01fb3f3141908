//! The `https` example (`baton::http::serve_tls`, `baton::tls`): HTTP/1.1
//! and HTTP/2 over TLS through upgrades and a certificate reload, with
//! zero failed requests, and a TLS session saved before the upgrades
//! resumed after them.

use std::time::Duration;

use baton_testkit::h2::H2Load;
use baton_testkit::tls;
use baton_testkit::{assert_eventually, our_zombies, Load, Target, TempDir};

use crate::Running;

#[test]
fn https_and_http2_through_upgrades_and_a_certificate_reload_lose_nothing() {
    let certs = TempDir::new("lib-tls-certs");
    let site = tls::cert(&certs, "site", &["site.test"]);
    let spare = TempDir::new("lib-tls-next");
    let next = tls::cert(&spare, "site", &["site.test"]);
    let mut r = Running::start(
        "https",
        &[
            "--cert",
            site.cert.to_str().unwrap(),
            "--key",
            site.key.to_str().unwrap(),
            "--drain-timeout",
            "10s",
        ],
    );
    let addr = r.addr();
    let client = tls::client(&[&site, &next]);
    let saved = tls::client(&[&site, &next]);
    let first = tls::get(addr, "site.test", "/", &saved);
    assert_eq!(first.status, 200);
    assert!(
        first
            .body
            .starts_with("hello over HTTP/1.1 from generation 1"),
        "{}",
        first.body
    );
    assert!(!first.resumed);

    let load = Load::start(
        Target::Tls(addr, "site.test".into(), client.clone()),
        2,
        2,
        Duration::from_secs(120),
    );
    let h2 = H2Load::start(
        addr,
        "site.test",
        client.clone(),
        2,
        4,
        "/",
        Duration::from_secs(120),
    );
    let h2_slow = H2Load::start(
        addr,
        "site.test",
        client.clone(),
        1,
        4,
        "/sleep/200",
        Duration::from_secs(120),
    );
    load.wait_for_progress(100, Duration::from_secs(30));
    h2.wait_for_progress(100, Duration::from_secs(30));
    h2_slow.wait_for_progress(8, Duration::from_secs(30));

    // A certificate reload: new handshakes get the new one, HTTP/2
    // connections are not touched.
    let connects = h2.connects();
    std::fs::copy(&next.cert, &site.cert).unwrap();
    std::fs::copy(&next.key, &site.key).unwrap();
    let answer = r.control(r#"{"command":"reload"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    h2.wait_for_progress(100, Duration::from_secs(30));
    assert_eq!(h2.connects(), connects);
    let fresh = tls::get(addr, "site.test", "/", &tls::client(&[&site, &next]));
    assert_eq!(fresh.cert, next.der);

    let mut pids = vec![r.pid()];
    for i in 0..3u64 {
        let answer = r.upgrade(r#"{"command":"upgrade"}"#);
        assert_eq!(
            answer["ok"],
            true,
            "upgrade {i}: {answer}\n{}",
            r.server.stderr()
        );
        pids.push(answer["pid"].as_u64().unwrap() as u32);
        load.wait_for_progress(50, Duration::from_secs(30));
        h2.wait_for_progress(50, Duration::from_secs(30));
        h2_slow.wait_for_progress(8, Duration::from_secs(30));
    }
    let report = load.stop();
    let (h2, h2_slow) = (h2.stop(), h2_slow.stop());
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    for (what, h) in [("fast", &h2), ("slow", &h2_slow)] {
        assert_eq!(h.failed, 0, "HTTP/2 {what}: {h:?}");
        assert!(h.connects >= 4, "HTTP/2 {what} was never sent away: {h:?}");
    }
    assert!(
        report.bodies.iter().any(|b| b.contains("generation 4")),
        "{:?}",
        report.bodies
    );
    // The session of generation 1, resumed by generation 4.
    let again = tls::get(addr, "site.test", "/", &saved);
    assert_eq!(again.status, 200);
    assert!(again.body.contains("generation 4"), "{}", again.body);
    assert!(again.resumed, "a full handshake after the upgrades");
    for &pid in &pids[..pids.len() - 1] {
        assert_eventually!(
            Duration::from_secs(20),
            r.server.is_gone(pid),
            "generation pid {pid} still running"
        );
    }
    assert_eq!(our_zombies(), Vec::<u32>::new());
}
