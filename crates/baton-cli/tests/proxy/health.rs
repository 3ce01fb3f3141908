//! Passive failure marking and active health checks.

use std::time::Duration;

use baton_testkit::assert_eventually;

use crate::{get, upstream_toml, web_to, web_to_a, Proxy, Upstream};

#[test]
fn an_upstream_that_dies_yields_502_and_is_marked_down() {
    let a = Upstream::http("a");
    let addr = a.addr;
    let body = web_to_a(&[addr]);
    let p = Proxy::start("health-502", "", &body);
    let web = p.addr("web");
    assert_eq!(get(web, "x", "/"), (200, "upstream a\n".into()));
    assert_eq!(p.upstream_server("a", addr)["healthy"], true);

    drop(a); // killed and reaped
    assert_eq!(get(web, "x", "/"), (502, "bad gateway\n".into()));
    let server = p.upstream_server("a", addr);
    assert_eq!(server["healthy"], false, "{server}");
    assert!(server["failures"].as_u64().unwrap() >= 1, "{server}");
}

#[test]
fn a_dead_server_is_skipped_without_failing_requests() {
    let a = Upstream::http("a");
    let b = Upstream::http("b");
    let a_addr = a.addr;
    let body = web_to("pool", &upstream_toml("pool", &[a.addr, b.addr], ""));
    let p = Proxy::start("health-skip", "", &body);
    let web = p.addr("web");
    drop(a);
    // Bodiless requests that fail to connect go to the next server.
    for _ in 0..6 {
        assert_eq!(get(web, "x", "/"), (200, "upstream b\n".into()));
    }
    assert_eq!(p.upstream_server("pool", a_addr)["healthy"], false);
}

#[test]
fn active_health_checks_mark_a_server_down_and_up_again() {
    let a = Upstream::http("a");
    let addr = a.addr;
    let body = web_to(
        "a",
        &upstream_toml(
            "a",
            &[addr],
            r#"health_check = { path = "/healthz", interval = "100ms", timeout = "1s" }"#,
        ),
    );
    let p = Proxy::start("health-active", "", &body);
    assert_eq!(p.upstream_server("a", addr)["healthy"], true);
    drop(a);
    // No request needed: the checks notice.
    assert_eventually!(
        Duration::from_secs(10),
        p.upstream_server("a", addr)["healthy"] == false,
        "server never marked down"
    );
    let _back = Upstream::http_at("a-again", addr);
    assert_eventually!(
        Duration::from_secs(10),
        p.upstream_server("a", addr)["healthy"] == true,
        "server never marked up again"
    );
    assert_eq!(
        get(p.addr("web"), "x", "/"),
        (200, "upstream a-again\n".into())
    );
}
