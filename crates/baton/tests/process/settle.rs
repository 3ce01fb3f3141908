//! Either side of an upgrade killed (SIGKILL) at the worst moment, under
//! load from keep-alive and new-connection clients: the new generation
//! right after the upgrade's `ok` (the old one takes the service back), the
//! old one before the new one is ready (the new one takes over alone), and
//! the new one after the settle period (nothing holds the port: the
//! documented outcome without a supervisor).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use baton_testkit::{assert_eventually, children_of, send_signal, socket_inodes, tcp_listen_inode};
use baton_testkit::{assert_none_refused, Load, Prober, Target};
use rustix::process::Signal;

use crate::Running;

fn get(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

#[test]
fn new_generation_killed_right_after_ok_old_one_takes_the_service_back() {
    let mut r = Running::start("hello", &["--settle", "10s"]);
    let old = r.pid();
    let load = Load::start(Target::Tcp(r.addr()), 4, 4, Duration::from_secs(60));
    let probe = Prober::start(r.addr(), 2, Duration::from_secs(60));
    load.wait_for_progress(200, Duration::from_secs(10));

    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let new = a["pid"].as_u64().unwrap() as u32;
    send_signal(new, Signal::KILL);

    // The old generation is the active one again.
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(new),
        "killed generation {new} not reaped"
    );
    assert_eventually!(
        Duration::from_secs(10),
        r.pid_file_pid() == old,
        "pid file does not name the old generation again"
    );
    let status = r.control(r#"{"command":"status"}"#);
    assert_eq!(status["pid"], old, "{status}");
    assert_eq!(status["state"], "active", "{status}");
    let last = &status["last_upgrade"];
    assert_eq!(last["ok"], false, "{status}");
    assert_eq!(last["taken_back"], true, "{status}");
    assert_eq!(last["pid"], new, "{status}");
    let why = last["error"].as_str().unwrap();
    assert!(why.contains("within the settle period"), "{why}");
    assert!(why.contains("signal"), "{why}");
    assert!(
        get(r.addr()).contains(&format!("pid {old}")),
        "not answered by the old generation"
    );
    load.wait_for_progress(500, Duration::from_secs(10));

    // The next upgrade works, and this time the new generation stays.
    let b = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(b["ok"], true, "{b}");
    let newer = b["pid"].as_u64().unwrap() as u32;
    assert_eq!(r.pid_file_pid(), newer);
    load.wait_for_progress(500, Duration::from_secs(10));
    assert!(get(r.addr()).contains(&format!("pid {newer}")));

    let report = assert_none_refused(load, probe);
    // Only connections already on the killed generation may have failed.
    assert!(report.failed < 50, "{:?}", report.failures);
}

#[test]
fn old_generation_killed_before_new_one_is_ready_new_one_takes_over() {
    let mut r = Running::start("hello", &["--startup-delay", "2s"]);
    let old = r.pid();
    let load = Load::start(Target::Tcp(r.addr()), 4, 4, Duration::from_secs(60));
    let probe = Prober::start(r.addr(), 2, Duration::from_secs(60));
    load.wait_for_progress(200, Duration::from_secs(10));

    // The upgrade's answer never comes: its generation is killed.
    let socket = r.control.clone();
    std::thread::spawn(move || {
        baton_testkit::control(&socket, r#"{"command":"upgrade"}"#, Duration::from_secs(30))
    });
    assert_eventually!(
        Duration::from_secs(10),
        !children_of(old).is_empty(),
        "no new generation started"
    );
    let new = children_of(old)[0];
    r.server.track(new);
    send_signal(old, Signal::KILL);
    assert_eventually!(
        Duration::from_secs(5),
        r.server.is_gone(old),
        "old generation not gone"
    );

    // The orphan finishes its startup and becomes the active generation.
    let ready = r.server.wait_event(Duration::from_secs(20), |v| {
        v["event"] == "ready" && v["pid"] == new
    });
    assert_eq!(ready["generation"], 2);
    assert_eq!(r.pid_file_pid(), new);
    let status = r.control(r#"{"command":"status"}"#);
    assert_eq!(status["pid"], new, "{status}");
    assert_eq!(status["state"], "active", "{status}");
    load.wait_for_progress(500, Duration::from_secs(10));
    assert!(get(r.addr()).contains(&format!("pid {new}")));

    // And it can be upgraded in turn.
    let b = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(b["ok"], true, "{b}");
    load.wait_for_progress(200, Duration::from_secs(10));

    let report = assert_none_refused(load, probe);
    assert!(report.failed < 50, "{:?}", report.failures);
}

#[test]
fn new_generation_killed_after_the_settle_period_leaves_nothing_on_the_port() {
    let mut r = Running::start("hello", &["--settle", "1s"]);
    let old = r.pid();
    let port = r.addr().port();
    let inode = tcp_listen_inode(port).expect("listening inode");
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let answered = Instant::now();
    let new = a["pid"].as_u64().unwrap() as u32;
    // During the settle period the old generation still holds the socket
    // (not accepting); afterwards it holds none and exits.
    let holds = socket_inodes(old).contains(&inode);
    assert!(
        holds || answered.elapsed() >= Duration::from_secs(1),
        "old generation let the socket go before the settle period ended"
    );
    assert_eventually!(
        Duration::from_secs(10),
        r.server.first_exit().is_some(),
        "old generation did not exit after the settle period"
    );
    assert!(answered.elapsed() >= Duration::from_millis(900));
    assert_eq!(r.server.first_exit().unwrap().code(), Some(0));
    assert!(get(r.addr()).contains(&format!("pid {new}")));

    // Killed now, nobody takes the service back: without a supervisor (or
    // the service manager's fd store) nothing holds the port.
    send_signal(new, Signal::KILL);
    assert_eventually!(
        Duration::from_secs(5),
        r.server.is_gone(new),
        "new generation not reaped"
    );
    assert_eq!(tcp_listen_inode(port), None, "something still listens");
    let err = TcpStream::connect(r.addr()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn a_new_generation_stopped_on_purpose_within_the_settle_period_is_not_taken_back() {
    let mut r = Running::start("hello", &["--settle", "20s"]);
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let new = a["pid"].as_u64().unwrap() as u32;
    // The operator stops the service (the pid file names the new one).
    assert_eq!(r.pid_file_pid(), new);
    send_signal(new, Signal::TERM);
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(new),
        "new generation did not stop"
    );
    // The old one ends its settle period there and exits instead of
    // serving again: the service is stopped, well before the 20 s.
    assert_eventually!(
        Duration::from_secs(10),
        r.server.first_exit().is_some(),
        "old generation took the service back or kept waiting"
    );
    assert_eq!(r.server.first_exit().unwrap().code(), Some(0));
    assert!(!r.pid_file.exists(), "pid file left behind");
    assert_eq!(tcp_listen_inode(r.addr().port()), None, "still listening");
    assert!(
        !r.server.stderr().contains("took the service back"),
        "{}",
        r.server.stderr()
    );
}
