//! The two worker models (`[server] runtime`): `per-worker` (the default:
//! worker threads with a current-thread runtime each, every one accepting
//! on every listener) and `multi-thread`; the same guarantees with both.

use std::time::Duration;

use baton_testkit::h2::H2Load;
use baton_testkit::tls::{self, TestCert};
use baton_testkit::{assert_eventually, our_zombies, Load, Target, TempDir};

use crate::{get, upstream_toml, Proxy, Upstream};

/// "web" (HTTP) and "secure" (HTTPS with `site`), both routed to "a";
/// `extra`: more TOML.
fn two_listeners(a: std::net::SocketAddr, site: &TestCert, extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
         [[listeners.certificates]]\ncert = {:?}\nkey = {:?}\n\n{}\n\
         [[routes]]\nlistener = \"web\"\nupstream = \"a\"\n\n\
         [[routes]]\nlistener = \"secure\"\nupstream = \"a\"\n{extra}",
        site.cert.to_str().unwrap(),
        site.key.to_str().unwrap(),
        upstream_toml("a", &[a], "")
    )
}

/// CPU ticks (user + system) of each thread of `pid` named
/// `baton-worker-N`, by name.
fn worker_ticks(pid: u32) -> Vec<(String, u64)> {
    baton_testkit::proc_threads(pid)
        .into_iter()
        .filter(|(name, _)| name.starts_with("baton-worker-"))
        .collect()
}

#[test]
fn per_worker_runtime_serves_through_a_reload_and_upgrades_losing_no_request() {
    through_a_reload_and_upgrades("per-worker");
}

#[test]
fn multi_thread_runtime_serves_through_a_reload_and_upgrades_losing_no_request() {
    through_a_reload_and_upgrades("multi-thread");
}

/// HTTP keep-alive and new-connection clients, the same over TLS, and
/// HTTP/2 clients, with `runtime = model` and two workers, through a
/// reload that adds a listener and four upgrades: not one failed request.
fn through_a_reload_and_upgrades(model: &str) {
    let a = Upstream::http("a");
    let certs = TempDir::new("workers-certs");
    let site = tls::cert(&certs, "site", &["site.test"]);
    let mut p = Proxy::start(
        model,
        &format!("runtime = \"{model}\"\nworkers = 2\ndrain_timeout = \"10s\""),
        &two_listeners(a.addr, &site, ""),
    );
    let status = p.status();
    assert_eq!(status["proxy"]["runtime"], model, "{status}");
    assert_eq!(status["proxy"]["workers"], 2, "{status}");
    let (web, secure) = (p.addr("web"), p.addr("secure"));
    let client = tls::client(&[&site]);
    let plain = Load::start(Target::Tcp(web), 3, 3, Duration::from_secs(180));
    let over_tls = Load::start(
        Target::Tls(secure, "site.test".into(), client.clone()),
        2,
        2,
        Duration::from_secs(180),
    );
    let h2 = H2Load::start(
        secure,
        "site.test",
        client.clone(),
        2,
        4,
        "/",
        Duration::from_secs(180),
    );
    plain.wait_for_progress(200, Duration::from_secs(30));
    over_tls.wait_for_progress(100, Duration::from_secs(30));
    h2.wait_for_progress(100, Duration::from_secs(30));

    // A listener added by a reload is served by the workers too.
    let extra = "\n[[listeners]]\nname = \"extra\"\naddress = \"127.0.0.1:0\"\n\n\
                 [[routes]]\nlistener = \"extra\"\nupstream = \"a\"\n";
    p.write_config(&two_listeners(a.addr, &site, extra));
    p.reload_ok();
    let extra_addr = p.listeners()["extra"];
    for _ in 0..20 {
        assert_eq!(get(extra_addr, "x", "/"), (200, "upstream a\n".into()));
    }

    let mut pids = vec![p.pid()];
    for i in 0..4u64 {
        pids.push(p.upgrade_ok(&format!("upgrade {i}")).0);
        plain.wait_for_progress(100, Duration::from_secs(30));
        over_tls.wait_for_progress(50, Duration::from_secs(30));
        h2.wait_for_progress(50, Duration::from_secs(30));
    }
    let last = *pids.last().unwrap();
    if model == "per-worker" {
        // Both workers of the last generation serve: each accepts on its
        // own.
        assert_eventually!(
            Duration::from_secs(30),
            {
                let t = worker_ticks(last);
                t.len() == 2 && t.iter().all(|(_, ticks)| *ticks > 0)
            },
            "worker threads of {last}: {:?}",
            worker_ticks(last)
        );
    } else {
        assert!(worker_ticks(last).is_empty(), "{:?}", worker_ticks(last));
    }
    assert_eq!(get(extra_addr, "x", "/"), (200, "upstream a\n".into()));
    let plain = plain.stop();
    let over_tls = over_tls.stop();
    let h2 = h2.stop();
    for (what, failed, failures) in [
        ("plain", plain.failed, format!("{:?}", plain.failures)),
        ("TLS", over_tls.failed, format!("{:?}", over_tls.failures)),
        ("HTTP/2", h2.failed, format!("{h2:?}")),
    ] {
        assert_eq!(failed, 0, "{what}: {failures}");
    }
    // The plaintext keep-alive connections moved from generation to
    // generation (the first worker takes them in).
    assert_eq!(plain.keepalive_connects, 3, "{plain:?}");
    let status = p.status();
    assert_eq!(status["generation"], 5);
    assert_eq!(status["proxy"]["runtime"], model, "{status}");
    p.assert_gone(&pids[..pids.len() - 1]);
    assert_eq!(our_zombies(), Vec::<u32>::new());
}
