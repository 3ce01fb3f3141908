//! Either side of a proxy upgrade killed (SIGKILL) at the worst moment,
//! under load from keep-alive and new-connection clients: the new
//! generation right after the upgrade's `ok` (the old one takes the service
//! back, on HTTP and TCP listeners), the old one before the new one is
//! ready (the new one takes over alone), and the new one after the settle
//! period (nothing holds the port: the documented outcome without a
//! supervisor).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use baton_testkit::{assert_eventually, children_of, send_signal, tcp_listen_inode};
use baton_testkit::{assert_none_refused, Load, Prober, Target};
use rustix::process::Signal;
use serde_json::Value;

use crate::{baton, get, upstream_toml, Proxy, Upstream};

/// Listener "web" (HTTP, every path to upstream "a") and listener "db"
/// (TCP, to the echo upstream).
fn config(a: &Upstream, echo: &Upstream) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[listeners]]
name = "db"
address = "127.0.0.1:0"
protocol = "tcp"
upstream = "echo"

{}
{}
[[routes]]
listener = "web"
upstream = "a"
"#,
        upstream_toml("a", &[a.addr], ""),
        upstream_toml("echo", &[echo.addr], "")
    )
}

fn pid_file_pid(p: &Proxy) -> Option<u32> {
    std::fs::read_to_string(&p.pid_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// `baton ctl --json status`.
fn ctl_status(p: &Proxy) -> Value {
    let out = p.ctl(&["--json", "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", crate::text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", crate::text(&out)))
}

/// One round trip through the TCP listener at `db` on a new connection.
fn tcp_echo(db: SocketAddr, text: &str) {
    let mut s = TcpStream::connect_timeout(&db, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {db}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(text.as_bytes()).unwrap();
    let mut buf = vec![0u8; text.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf), text);
}

#[test]
fn new_generation_killed_right_after_ok_old_one_takes_the_service_back() {
    let a = Upstream::http("a");
    let echo = Upstream::tcp_echo("echo");
    let mut p = Proxy::start(
        "settle-back",
        "settle = \"10s\"\ndrain_timeout = \"10s\"",
        &config(&a, &echo),
    );
    let (web, db) = (p.addr("web"), p.addr("db"));
    let old = p.pid();
    let load = Load::start(Target::Tcp(web), 4, 4, Duration::from_secs(90));
    let probe = Prober::start(web, 2, Duration::from_secs(90));
    let db_probe = Prober::start(db, 1, Duration::from_secs(90));
    load.wait_for_progress(200, Duration::from_secs(20));

    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}\n{}", p.server.stderr());
    let new = answer["pid"].as_u64().unwrap() as u32;
    send_signal(new, Signal::KILL);

    // The old generation is the active one again.
    assert_eventually!(
        Duration::from_secs(10),
        p.server.is_gone(new),
        "killed generation {new} not reaped"
    );
    assert_eventually!(
        Duration::from_secs(10),
        pid_file_pid(&p) == Some(old),
        "pid file does not name the old generation again"
    );
    let status = ctl_status(&p);
    assert_eq!(status["pid"], old, "{status}");
    assert_eq!(status["state"], "active", "{status}");
    let last = &status["last_upgrade"];
    assert_eq!(last["ok"], false, "{status}");
    assert_eq!(last["taken_back"], true, "{status}");
    assert_eq!(last["pid"], new, "{status}");
    let why = last["error"].as_str().unwrap();
    assert!(why.contains("within the settle period"), "{why}");
    for l in status["proxy"]["listeners"].as_array().unwrap() {
        assert_eq!(l["draining"], false, "{status}");
    }
    // Both kinds of listener accept again (the killed generation is gone:
    // whoever answers is the old one).
    assert_eq!(get(web, "x", "/"), (200, "upstream a\n".into()));
    tcp_echo(db, "served by the old generation again");
    load.wait_for_progress(500, Duration::from_secs(20));

    // The next upgrade works, and this time the new generation stays.
    let b = p.upgrade();
    assert_eq!(b["ok"], true, "{b}\n{}", p.server.stderr());
    let newer = b["pid"].as_u64().unwrap() as u32;
    assert_eq!(pid_file_pid(&p), Some(newer));
    load.wait_for_progress(500, Duration::from_secs(20));
    assert_eq!(ctl_status(&p)["pid"], newer);
    tcp_echo(db, "on the newer generation");

    let (_, refused_db) = db_probe.stop();
    assert_eq!(refused_db, 0, "TCP connections refused");
    let report = assert_none_refused(load, probe);
    // Only requests already on the killed generation may have failed.
    assert!(report.failed < 50, "{:?}", report.failures);
}

#[test]
fn old_generation_killed_before_new_one_is_ready_new_one_takes_over() {
    let a = Upstream::http("a");
    let echo = Upstream::tcp_echo("echo");
    let mut p = Proxy::start("settle-orphan", "", &config(&a, &echo));
    let web = p.addr("web");
    let old = p.pid();
    // A new generation slow to get ready: a wrapper that waits, then
    // becomes the real binary (same pid, same inherited fds).
    let slow = p.dir.script(
        "slow-baton",
        &format!("sleep 2\nexec {:?} \"$@\"", baton().to_str().unwrap()),
    );
    let load = Load::start(Target::Tcp(web), 4, 4, Duration::from_secs(90));
    let probe = Prober::start(web, 2, Duration::from_secs(90));
    load.wait_for_progress(200, Duration::from_secs(20));

    // The upgrade's answer never comes: its generation is killed.
    let mut ctl = Command::new(baton())
        .arg("ctl")
        .arg("--socket")
        .arg(&p.control)
        .args(["upgrade", "--binary", slow.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        !children_of(old).is_empty(),
        "no new generation started"
    );
    let new = children_of(old)[0];
    p.server.track(new);
    send_signal(old, Signal::KILL);
    assert_eventually!(
        Duration::from_secs(5),
        p.server.is_gone(old),
        "old generation not gone"
    );
    // The `ctl` caller loses its answer (and says so); it must not hang.
    assert_eventually!(
        Duration::from_secs(10),
        ctl.try_wait().unwrap().is_some(),
        "baton ctl upgrade hangs"
    );

    // The orphan finishes its startup and becomes the active generation.
    let ready = p.server.wait_event(Duration::from_secs(20), |v| {
        v["event"] == "ready" && v["pid"] == new
    });
    assert_eq!(ready["generation"], 2, "{ready}");
    assert_eq!(pid_file_pid(&p), Some(new));
    let status = ctl_status(&p);
    assert_eq!(status["pid"], new, "{status}");
    assert_eq!(status["state"], "active", "{status}");
    load.wait_for_progress(500, Duration::from_secs(20));
    assert_eq!(get(web, "x", "/"), (200, "upstream a\n".into()));

    // And it can be upgraded in turn.
    let b = p.upgrade();
    assert_eq!(b["ok"], true, "{b}\n{}", p.server.stderr());
    load.wait_for_progress(200, Duration::from_secs(20));

    let report = assert_none_refused(load, probe);
    // Only requests in flight on the killed generation may have failed.
    assert!(report.failed < 50, "{:?}", report.failures);
}

#[test]
fn new_generation_killed_after_the_settle_period_leaves_nothing_on_the_port() {
    let a = Upstream::http("a");
    let echo = Upstream::tcp_echo("echo");
    let mut p = Proxy::start("settle-after", "settle = \"1s\"", &config(&a, &echo));
    let (web, db) = (p.addr("web"), p.addr("db"));
    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}");
    let answered = Instant::now();
    let new = answer["pid"].as_u64().unwrap() as u32;
    assert_eventually!(
        Duration::from_secs(15),
        p.server.first_exit().is_some(),
        "old generation did not exit after the settle period"
    );
    assert!(answered.elapsed() >= Duration::from_millis(900));
    assert_eq!(p.server.first_exit().unwrap().code(), Some(0));
    assert_eq!(get(web, "x", "/"), (200, "upstream a\n".into()));

    // Killed now, nobody takes the service back: without a supervisor (or
    // the service manager's fd store) nothing holds the ports.
    send_signal(new, Signal::KILL);
    assert_eventually!(
        Duration::from_secs(5),
        p.server.is_gone(new),
        "new generation not reaped"
    );
    for addr in [web, db] {
        assert_eq!(tcp_listen_inode(addr.port()), None, "{addr} still listens");
        let err = TcpStream::connect(addr).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{addr}: {err}");
    }
}
