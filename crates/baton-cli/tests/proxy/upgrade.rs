//! Binary upgrades of the proxy under load: not one failed request.

use std::time::Duration;

use baton_testkit::{assert_eventually, our_zombies, Load, Target};

use crate::{get, upstream_toml, web_to_a, Proxy, Upstream};

#[test]
fn twenty_upgrades_under_load_lose_no_request() {
    let a = Upstream::http("a");
    let body = web_to_a(&[a.addr]);
    let mut p = Proxy::start("upgrade-load", "drain_timeout = \"10s\"", &body);
    let web = p.addr("web");
    let load = Load::start(Target::Tcp(web), 2, 2, Duration::from_secs(180));
    load.wait_for_progress(200, Duration::from_secs(20));
    let mut pids = vec![p.pid()];
    for i in 0..20u64 {
        let (pid, answer) = p.upgrade_ok(&format!("upgrade {i}"));
        assert_eq!(answer["generation"], i + 2);
        pids.push(pid);
        load.wait_for_progress(50, Duration::from_secs(20));
    }
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "failed requests: {:?} (ok: {})",
        report.failures, report.ok
    );
    // The keep-alive connections moved from generation to generation.
    assert_eq!(report.keepalive_connects, 2, "{report:?}");
    let last = *pids.last().unwrap();
    let status = p.status();
    assert_eq!(status["pid"], last);
    assert_eq!(status["generation"], 21);
    // The same listening socket throughout, and the config still applies.
    assert_eq!(status["proxy"]["listeners"][0]["address"], web.to_string());
    assert_eq!(get(web, "x", "/"), (200, "upstream a\n".into()));
    p.assert_gone(&pids[..pids.len() - 1]);
    assert_eq!(our_zombies(), Vec::<u32>::new());
}

#[test]
fn an_upgrade_to_a_bad_config_rolls_back_and_keeps_serving() {
    let a = Upstream::http("a");
    let body = web_to_a(&[a.addr]);
    let p = Proxy::start("upgrade-bad", "", &body);
    let web = p.addr("web");
    p.write_config(&body.replace("upstream = \"a\"\n", "upstream = \"gone\"\n"));
    let answer = p.upgrade();
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("unknown upstream \"gone\""), "{error}");
    assert!(
        error.contains(&format!("{}:", p.config.display())),
        "{error}"
    );
    assert_eq!(p.status()["pid"], p.pid());
    assert_eq!(get(web, "x", "/"), (200, "upstream a\n".into()));
}

#[test]
fn stop_drains_and_exits_zero_removing_the_control_socket() {
    let a = Upstream::http("a");
    let body = format!(
        "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\n{}\n[[routes]]\nlistener = \"web\"\nupstream = \"a\"\n",
        upstream_toml("a", &[a.addr], "")
    );
    let mut p = Proxy::start("stop", "drain_timeout = \"5s\"", &body);
    assert_eq!(get(p.addr("web"), "x", "/"), (200, "upstream a\n".into()));
    let out = p.ctl(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", crate::text(&out));
    assert_eventually!(
        Duration::from_secs(15),
        p.server.first_exit().is_some(),
        "proxy did not exit"
    );
    assert!(p.server.first_exit().unwrap().success());
    assert!(!p.control.exists(), "control socket left behind");
    assert!(!p.pid_file.exists(), "pid file left behind");
}

/// Client keep-alive connections move to the next generation: 16 clients
/// through five upgrades with a 60 s drain timeout, not one reconnects or
/// fails, and each old generation exits at once.
#[test]
fn keepalive_client_connections_move_through_five_upgrades() {
    let a = Upstream::http("a");
    let mut p = Proxy::start(
        "upgrade-migrate",
        "drain_timeout = \"60s\"\nsettle = \"300ms\"",
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\n{}",
            web_to_a(&[a.addr])
        ),
    );
    let admin: std::net::SocketAddr = p.ready["admin"].as_str().unwrap().parse().unwrap();
    let load = Load::start(Target::Tcp(p.addr("web")), 16, 2, Duration::from_secs(120));
    load.wait_for_progress(300, Duration::from_secs(20));
    let mut old = p.pid();
    for i in 0..5 {
        let answer = p.upgrade();
        assert_eq!(answer["ok"], true, "upgrade {i}: {answer}");
        let answered = std::time::Instant::now();
        assert_eventually!(
            Duration::from_secs(5),
            p.server.is_gone(old),
            "upgrade {i}: generation {old} still running"
        );
        assert!(
            answered.elapsed() < Duration::from_secs(2),
            "upgrade {i}: the old generation took {:?} to exit",
            answered.elapsed()
        );
        old = answer["pid"].as_u64().unwrap() as u32;
        load.wait_for_progress(300, Duration::from_secs(20));
    }
    // The last generation serves the 16 connections it was handed.
    let mut c = std::net::TcpStream::connect(admin).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (_, metrics, _) = baton_testkit::http_get(&mut c, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "baton_connections{state=\"migrated\"} 16"),
        "{metrics}"
    );
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert_eq!(report.keepalive_connects, 16, "{report:?}");
}

/// A next generation that takes no connections (here: `migrate = false` in
/// the file it starts with, as an older binary would behave): the old one
/// drains its keep-alive connections, and no request fails.
#[test]
fn an_upgrade_to_a_generation_that_takes_no_connections_drains_them() {
    let a = Upstream::http("a");
    let body = web_to_a(&[a.addr]);
    let mut p = Proxy::start("upgrade-no-migrate", "drain_timeout = \"10s\"", &body);
    let load = Load::start(Target::Tcp(p.addr("web")), 4, 2, Duration::from_secs(60));
    load.wait_for_progress(200, Duration::from_secs(20));
    p.write_raw(&format!(
        "[server]\ncontrol_socket = {:?}\npid_file = {:?}\ndrain_timeout = \"10s\"\nmigrate = false\n\n{body}",
        p.control.to_str().unwrap(),
        p.pid_file.to_str().unwrap()
    ));
    let old = p.pid();
    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}");
    load.wait_for_progress(200, Duration::from_secs(20));
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(
        report.keepalive_connects > 4,
        "drained (Connection: close), not moved: {report:?}"
    );
    assert_eventually!(
        Duration::from_secs(20),
        p.server.is_gone(old),
        "the old generation did not finish draining"
    );
}

#[test]
fn workers_sizes_the_runtime_at_start_and_is_checked() {
    let a = Upstream::http("a");
    let body = web_to_a(&[a.addr]);
    let mut p = Proxy::start("workers", "workers = 3", &body);
    assert_eq!(p.status()["proxy"]["workers"], 3);
    assert_eq!(get(p.addr("web"), "x", "/"), (200, "upstream a\n".into()));
    // Like the rest of [server], a change applies at the next upgrade.
    let text = std::fs::read_to_string(&p.config).unwrap();
    p.write_raw(&text.replace("workers = 3\n", ""));
    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}");
    let status = p.status();
    assert_eq!(status["generation"], 2);
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(status["proxy"]["workers"], cores, "{status}");
    let old = p.pid();
    baton_testkit::assert_eventually!(
        Duration::from_secs(20),
        p.server.is_gone(old),
        "old generation still running"
    );
    // Out of range: refused at its position, and the running proxy stays.
    let (code, stderr) = crate::run_bounded(
        &["check", "--config", p.config.to_str().unwrap()],
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(0), "{stderr}");
    std::fs::write(
        &p.config,
        std::fs::read_to_string(&p.config)
            .unwrap()
            .replace("[server]\n", "[server]\nworkers = 0\n"),
    )
    .unwrap();
    let (code, stderr) = crate::run_bounded(
        &["check", "--config", p.config.to_str().unwrap()],
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(":2:11: workers = 0: must be from 1 to 1024"),
        "{stderr}"
    );
    let answer = p.upgrade();
    assert_eq!(answer["ok"], false, "{answer}");
}
