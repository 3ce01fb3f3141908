//! In-process reload: a route switched under load, rejected configs, added
//! and removed listeners. A reload never starts a process.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use baton_testkit::{assert_eventually, Load, Target};

use crate::{get, text, upstream_toml, web_to, Proxy, Upstream};

fn routed_to(a: &Upstream, b: &Upstream, to: &str) -> String {
    let upstreams = upstream_toml("a", &[a.addr], "") + &upstream_toml("b", &[b.addr], "");
    web_to(to, &upstreams)
}

#[test]
fn twenty_reloads_switching_upstream_under_load_lose_no_request() {
    let a = Upstream::http("a");
    let b = Upstream::http("b");
    let p = Proxy::start(
        "reload-load",
        "drain_timeout = \"10s\"",
        &routed_to(&a, &b, "a"),
    );
    let web = p.addr("web");
    let load = Load::start(Target::Tcp(web), 2, 2, Duration::from_secs(120));
    load.wait_for_progress(200, Duration::from_secs(20));
    for i in 0..20 {
        let to = if i % 2 == 0 { "b" } else { "a" };
        p.write_config(&routed_to(&a, &b, to));
        if i == 0 {
            // Once through the CLI as an operator would.
            let out = p.ctl(&["reload"]);
            assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        } else {
            p.reload_ok();
        }
        // The next request goes to the new upstream.
        assert_eq!(
            get(web, "test", "/"),
            (200, format!("upstream {to}\n")),
            "reload {i}"
        );
        load.wait_for_progress(50, Duration::from_secs(20));
    }
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "failed requests: {:?} (ok: {})",
        report.failures, report.ok
    );
    assert!(
        report.bodies.contains("upstream a\n") && report.bodies.contains("upstream b\n"),
        "{:?}",
        report.bodies
    );
    // Same process throughout: a reload never starts one.
    let status = p.status();
    assert_eq!(status["pid"], p.pid());
    assert_eq!(status["generation"], 1);
    assert_eq!(status["proxy"]["reloads"], 20);
    assert_eq!(status["last_reload"]["ok"], true);
}

#[test]
fn a_bad_config_is_rejected_with_file_and_line_while_traffic_continues() {
    let a = Upstream::http("a");
    let b = Upstream::http("b");
    let p = Proxy::start("reload-bad", "", &routed_to(&a, &b, "a"));
    let web = p.addr("web");
    let load = Load::start(Target::Tcp(web), 2, 2, Duration::from_secs(60));
    load.wait_for_progress(100, Duration::from_secs(20));
    let file = p.config.to_str().unwrap().to_owned();

    // A syntax error.
    let good = std::fs::read_to_string(&p.config).unwrap();
    p.write_raw(&format!("{good}\n[[routes]]\nlistener = \n"));
    let out = p.ctl(&["reload"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let lines = good.lines().count();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{file}:{}:", lines + 3)),
        "{}",
        text(&out)
    );

    // An unknown upstream, named at its line.
    p.write_config(&routed_to(&a, &b, "nowhere"));
    let out = p.ctl(&["reload"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = std::fs::read_to_string(&p.config)
        .unwrap()
        .lines()
        .position(|l| l.contains("\"nowhere\""))
        .unwrap()
        + 1;
    assert!(
        stderr.contains(&format!("{file}:{line}:12: unknown upstream \"nowhere\"")),
        "{}",
        text(&out)
    );
    let status = p.status();
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert_eq!(status["proxy"]["reloads"], 0, "{status}");

    // Nothing changed: traffic still goes to a, and none failed.
    load.wait_for_progress(100, Duration::from_secs(20));
    assert_eq!(get(web, "test", "/"), (200, "upstream a\n".into()));
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    assert_eq!(report.bodies.len(), 1, "{:?}", report.bodies);

    // SIGHUP reloads a fixed file.
    p.write_config(&routed_to(&a, &b, "b"));
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(p.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        get(web, "test", "/").1 == "upstream b\n",
        "SIGHUP did not reload"
    );
}

#[test]
fn reload_adds_and_removes_listeners_and_drains_the_removed_one() {
    let a = Upstream::http("a");
    let b = Upstream::http("b");
    let base = routed_to(&a, &b, "a");
    let extra = r#"
[[listeners]]
name = "extra"
address = "127.0.0.1:0"

[[routes]]
listener = "extra"
upstream = "b"
"#;
    let p = Proxy::start(
        "reload-listeners",
        "drain_timeout = \"10s\"\nidle_grace = \"5s\"",
        &base,
    );
    let web = p.addr("web");

    p.write_config(&format!("{base}{extra}"));
    p.reload_ok();
    let extra_addr = p.listeners()["extra"];
    assert_eq!(get(extra_addr, "x", "/"), (200, "upstream b\n".into()));

    // A keep-alive connection on the listener about to go.
    let mut kept = TcpStream::connect(extra_addr).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    kept.write_all(request).unwrap();
    let first = read_response(&mut kept);
    assert!(first.ends_with("upstream b\n"), "{first}");

    p.write_config(&base);
    p.reload_ok();
    let status = p.status();
    assert!(
        status["proxy"]["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["name"] != "extra"),
        "{status}"
    );
    // No longer handed to the next generation.
    assert!(
        status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["name"] != "extra"),
        "{status}"
    );
    // Stops accepting…
    assert_eventually!(
        Duration::from_secs(5),
        TcpStream::connect(extra_addr).is_err(),
        "removed listener still accepts"
    );
    // …but the open connection is answered, told to close, then closed.
    kept.write_all(request).unwrap();
    let second = read_response(&mut kept);
    assert!(
        second.to_ascii_lowercase().contains("connection: close"),
        "{second}"
    );
    assert!(second.ends_with("upstream b\n"), "{second}");
    let mut rest = Vec::new();
    assert_eq!(kept.read_to_end(&mut rest).unwrap_or(0), 0);
    // The process and its other listener carry on.
    assert_eq!(get(web, "x", "/"), (200, "upstream a\n".into()));
    assert_eq!(p.status()["pid"], p.pid());
}

/// Reads one response with a Content-Length body.
pub fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
}

#[test]
fn changing_a_listeners_address_or_protocol_is_remove_plus_add() {
    let a = Upstream::http("a");
    let e = Upstream::tcp_echo("echo");
    let listener = |address: &str, protocol: &str| {
        let target = if protocol == "tcp" {
            "upstream = \"echo\"".to_owned()
        } else {
            String::new()
        };
        format!(
            r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[listeners]]
name = "side"
address = "{address}"
protocol = "{protocol}"
{target}

{}
{}
[[routes]]
listener = "web"
upstream = "a"
{}
"#,
            upstream_toml("a", &[a.addr], ""),
            upstream_toml("echo", &[e.addr], ""),
            if protocol == "http" {
                "\n[[routes]]\nlistener = \"side\"\nrespond = { status = 200, body = \"side\" }\n"
            } else {
                ""
            }
        )
    };
    let p = Proxy::start(
        "reload-change",
        "drain_timeout = \"5s\"",
        &listener("127.0.0.1:0", "http"),
    );
    let side = p.addr("side");
    assert_eq!(get(side, "x", "/"), (200, "side".into()));

    // Same address, other protocol: the socket is closed and bound again.
    p.write_config(&listener(&side.to_string(), "tcp"));
    p.reload_ok();
    assert_eq!(p.listeners()["side"], side);
    let mut s = TcpStream::connect(side).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // Another address: the old one stops accepting, the new one serves.
    p.write_config(&listener("127.0.0.1:0", "http"));
    p.reload_ok();
    let moved = p.listeners()["side"];
    assert_ne!(moved, side);
    assert_eq!(get(moved, "x", "/"), (200, "side".into()));
    assert_eventually!(
        Duration::from_secs(5),
        TcpStream::connect(side).is_err(),
        "old address still accepts"
    );
    assert_eq!(get(p.addr("web"), "x", "/"), (200, "upstream a\n".into()));
}

#[test]
fn a_request_in_flight_finishes_on_the_config_it_started_with() {
    let a = Upstream::http("a");
    let b = Upstream::http("b");
    let p = Proxy::start("reload-inflight", "", &routed_to(&a, &b, "a"));
    let web = p.addr("web");
    let slow = std::thread::spawn(move || get(web, "test", "/sleep/1500"));
    // Wait until the slow request is at the upstream.
    assert_eventually!(
        Duration::from_secs(10),
        p.upstream_server("a", a.addr)["active"] == 1,
        "slow request never reached upstream a"
    );
    // Switch to b, and drop a from the configuration altogether.
    let only_b = routed_to(&a, &b, "b").replace(&upstream_toml("a", &[a.addr], ""), "");
    p.write_config(&only_b);
    p.reload_ok();
    assert_eq!(get(web, "test", "/"), (200, "upstream b\n".into()));
    assert_eq!(
        slow.join().unwrap(),
        (200, "upstream a path /sleep/1500\n".into())
    );
    assert!(p.status()["proxy"]["upstreams"]["a"].is_null());
}

#[test]
fn a_reload_from_dev_zero_or_a_fifo_fails_fast_and_later_reloads_still_work() {
    let a = Upstream::http("a");
    let b = Upstream::http("b");
    let p = Proxy::start("reload-kinds", "", &routed_to(&a, &b, "a"));
    let web = p.addr("web");
    let load = Load::start(Target::Tcp(web), 2, 2, Duration::from_secs(60));
    load.wait_for_progress(100, Duration::from_secs(20));
    let file = p.config.to_str().unwrap().to_owned();
    // Bounded well below the control helper's minute: a read that hangs
    // (the FIFO before the fix) fails the test here.
    let reload = |what: &str| {
        let started = std::time::Instant::now();
        let a = baton_testkit::control(
            &p.control,
            r#"{"command":"reload"}"#,
            Duration::from_secs(15),
        );
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "{what}: took {:?}",
            started.elapsed()
        );
        a
    };

    // The file replaced by a symlink to /dev/zero.
    std::fs::remove_file(&p.config).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &p.config).unwrap();
    let answer = reload("/dev/zero");
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains(&format!(
            "cannot read {file}: it is a character device, not a regular file"
        )),
        "{answer}"
    );

    // The file replaced by a FIFO nobody writes.
    std::fs::remove_file(&p.config).unwrap();
    rustix::fs::mkfifoat(rustix::fs::CWD, &p.config, rustix::fs::Mode::RWXU).unwrap();
    let answer = reload("FIFO");
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains(&format!(
            "cannot read {file}: it is a FIFO, not a regular file"
        )),
        "{answer}"
    );
    // The same through the CLI: exit 1 and the reason.
    let out = p.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("it is a FIFO, not a regular file"),
        "{}",
        text(&out)
    );

    // Nothing changed, nothing failed.
    load.wait_for_progress(100, Duration::from_secs(20));
    assert_eq!(get(web, "test", "/"), (200, "upstream a\n".into()));

    // A later reload with a good file goes through.
    std::fs::remove_file(&p.config).unwrap();
    p.write_config(&routed_to(&a, &b, "b"));
    let answer = reload("good file");
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(get(web, "test", "/"), (200, "upstream b\n".into()));
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.failures);
    let status = p.status();
    assert_eq!(status["proxy"]["reloads"], 1, "{status}");
    assert_eq!(status["pid"], p.pid());
}

#[test]
fn a_reload_adding_a_listener_it_cannot_bind_is_rejected_at_the_address() {
    let a = Upstream::http("a");
    let b = Upstream::http("b");
    let base = routed_to(&a, &b, "a");
    let p = Proxy::start("reload-bind", "", &base);
    let web = p.addr("web");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap();
    p.write_config(&format!(
        "{base}\n[[listeners]]\nname = \"extra\"\naddress = \"{taken}\"\n\n[[routes]]\nlistener = \"extra\"\nupstream = \"b\"\n"
    ));
    let line = std::fs::read_to_string(&p.config)
        .unwrap()
        .lines()
        .position(|l| l.contains(&taken.to_string()))
        .unwrap()
        + 1;
    let out = p.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:{line}:11: listener \"extra\" at {taken}: Address already in use (os error 98)",
            p.config.display()
        )),
        "{}",
        text(&out)
    );
    // The old configuration keeps serving, unchanged.
    let status = p.status();
    assert_eq!(status["proxy"]["reloads"], 0, "{status}");
    assert!(!p.listeners().contains_key("extra"), "{status}");
    assert_eq!(get(web, "test", "/"), (200, "upstream a\n".into()));
    drop(held);
}
