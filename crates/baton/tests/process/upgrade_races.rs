//! The upgrade's answer and a stop that races an upgrade: the answer always
//! comes before the old generation exits, whatever the drain timeout; a
//! clean upgrade logs no warning; a stop during an upgrade wins.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use baton_testkit::{assert_eventually, send_signal, Load, Target, TempDir};
use rustix::process::Signal;
use serde_json::Value;

use crate::Running;

/// A wrapper script that runs the slow-confirm fixture as the next
/// generation, and the FIFO that releases its confirmation.
fn slow_confirm(dir: &TempDir) -> (PathBuf, PathBuf) {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/process/fixtures/slow_confirm.py");
    let fifo = dir.fifo("release");
    let script = dir.script(
        "next.sh",
        &format!(
            "SLOW_CONFIRM_FIFO={} exec python3 {} \"$@\"",
            fifo.display(),
            fixture.display()
        ),
    );
    (script, fifo)
}

/// Sends `request` on the control socket from a thread; the answer (or
/// the error: no answer) comes back through the handle.
fn control_in_background(socket: &Path, request: &str) -> JoinHandle<Result<Value, String>> {
    let (socket, request) = (socket.to_path_buf(), request.to_owned());
    std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut line = String::new();
        match BufReader::new(s).read_line(&mut line) {
            Ok(0) => Err("the control socket closed without answering".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("{line:?}: {e}")),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// Warning and error lines in a server's stderr.
fn complaints(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("Broken pipe"))
        .collect()
}

/// A keep-alive connection the server has accepted (one request answered
/// on it), then a slow request sent on it: in flight when this returns.
fn slow_request_in_flight(addr: std::net::SocketAddr, ms: u64) -> JoinHandle<String> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    c.write_all(format!("GET /sleep/{ms} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    std::thread::spawn(move || {
        let mut resp = String::new();
        let _ = c.read_to_string(&mut resp);
        resp
    })
}

/// A clean upgrade (by SIGUSR2 and by the control socket, with a drain
/// timeout shorter than anything else) logs no warning or error on either
/// generation's stderr: no "could not confirm ... Broken pipe".
/// The request that was in flight during the stop got its answer, and no
/// generation is left: the new one (`new`) is gone, the old one exited 0.
fn service_stopped(r: &mut Running, new: u32, slow: JoinHandle<String>) {
    let resp = slow.join().unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "in-flight request: {resp:?}"
    );
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(new),
        "new generation {new} alive"
    );
    assert_eventually!(
        Duration::from_secs(10),
        r.server.first_exit().is_some(),
        "old generation did not exit"
    );
    assert_eq!(
        r.server.first_exit().unwrap().code(),
        Some(0),
        "{}",
        r.server.stderr()
    );
}

#[test]
fn clean_upgrades_log_no_warning() {
    let mut r = Running::start("hello", &["--drain-timeout", "500ms"]);
    let mut pids = vec![r.pid()];
    for generation in 2..=3u64 {
        send_signal(r.pid_file_pid(), Signal::USR2);
        let e = r.server.wait_event(Duration::from_secs(20), |v| {
            v["event"] == "ready" && v["generation"] == generation
        });
        pids.push(e["pid"].as_u64().unwrap() as u32);
        let old = pids[pids.len() - 2];
        assert_eventually!(
            Duration::from_secs(10),
            r.server.is_gone(old),
            "generation {} did not exit",
            generation - 1
        );
    }
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let old = *pids.last().unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(old),
        "old generation did not exit"
    );
    let stderr = r.server.stderr();
    assert!(complaints(&stderr).is_empty(), "{:#?}", complaints(&stderr));
}

/// `ctl upgrade` is answered with drain timeouts of 0.5 s and 2 s, under
/// load, and even when the new generation takes longer to confirm than
/// the old one's drain: the old one waits for the answer before it exits.
#[test]
fn upgrade_is_answered_whatever_the_drain_timeout() {
    for drain in ["500ms", "2s"] {
        let r = Running::start("hello", &["--drain-timeout", drain]);
        let load = Load::start(Target::Tcp(r.addr()), 2, 2, Duration::from_secs(60));
        load.wait_for_progress(50, Duration::from_secs(10));
        for _ in 0..3 {
            let a = r.upgrade(r#"{"command":"upgrade"}"#);
            assert_eq!(a["ok"], true, "drain {drain}: {a}");
            load.wait_for_progress(50, Duration::from_secs(10));
        }
        let report = load.stop();
        assert_eq!(report.failed, 0, "drain {drain}: {:?}", report.failures);

        // A new generation slow to confirm: the old one's drain ends first.
        let dir = TempDir::new("slow-confirm");
        let (next, fifo) = slow_confirm(&dir);
        let old = r.pid_file_pid();
        let request = format!(
            r#"{{"command":"upgrade","binary":{:?}}}"#,
            next.to_str().unwrap()
        );
        let answer = control_in_background(&r.control, &request);
        assert_eventually!(
            Duration::from_secs(20),
            r.server
                .stderr()
                .contains("waiting for the upgrade in flight to be answered")
                || answer.is_finished(),
            "drain {drain}: the old generation neither waited nor answered"
        );
        assert!(
            !answer.is_finished(),
            "drain {drain}: answered early: {:?}",
            answer.join()
        );
        std::fs::write(&fifo, "go\n").unwrap();
        let a = answer
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("drain {drain}: {e}"));
        assert_eq!(a["ok"], true, "drain {drain}: {a}");
        let new = a["pid"].as_u64().unwrap() as u32;
        r.server.track(new);
        assert_ne!(new, old);
        let mut server = r.server;
        assert_eventually!(
            Duration::from_secs(10),
            server.is_gone(old),
            "old generation did not exit"
        );
        send_signal(new, Signal::TERM);
        server.wait_event(Duration::from_secs(10), |v| v["event"] == "stop");
    }
}

/// SIGTERM while the new generation is still starting (before ready): the
/// upgrade is aborted and answered `ok:false`, the new generation killed
/// and reaped, the old one finishes its in-flight requests and exits 0,
/// and the pid file and control socket are removed as after any stop.
#[test]
fn sigterm_before_the_new_generation_is_ready_aborts_the_upgrade() {
    let mut r = Running::start("hello", &["--startup-delay", "3s", "--drain-timeout", "5s"]);
    let old = r.pid();
    let load = Load::start(Target::Tcp(r.addr()), 2, 2, Duration::from_secs(60));
    load.wait_for_progress(100, Duration::from_secs(10));
    let answer = control_in_background(&r.control, r#"{"command":"upgrade"}"#);
    assert_eventually!(
        Duration::from_secs(10),
        r.server.stderr().contains("started new generation"),
        "no new generation started"
    );
    let children = baton_testkit::children_of(old);
    assert_eq!(children.len(), 1, "{children:?}");
    let new = children[0];
    r.server.track(new);
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let slow = slow_request_in_flight(r.addr(), 1000);

    send_signal(old, Signal::TERM);
    let a = answer.join().unwrap().unwrap();
    assert_eq!(a["ok"], false, "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .starts_with("aborted: stop requested"),
        "{a}"
    );
    service_stopped(&mut r, new, slow);
    assert!(!r.pid_file.exists(), "pid file left behind");
    assert!(!r.control.exists(), "control socket left behind");
    assert!(
        baton_testkit::tcp_listen_inode(r.addr().port()).is_none(),
        "the port is still listening"
    );
}

/// SIGTERM after the new generation was told to take over (it has the
/// ack, its confirmation is pending): the upgrade completes and is
/// answered `ok:true`, and the stop is passed on to the new generation, so
/// the service stops; the old one finishes its in-flight request and exits 0.
#[test]
fn sigterm_after_the_hand_over_is_passed_on_to_the_new_generation() {
    let mut r = Running::start("hello", &["--drain-timeout", "5s"]);
    let old = r.pid();
    let dir = TempDir::new("slow-confirm");
    let (next, fifo) = slow_confirm(&dir);
    let slow = slow_request_in_flight(r.addr(), 1000);
    let request = format!(
        r#"{{"command":"upgrade","binary":{:?}}}"#,
        next.to_str().unwrap()
    );
    let answer = control_in_background(&r.control, &request);
    let acked = r
        .server
        .wait_event(Duration::from_secs(20), |v| v["event"] == "acked");
    let new = acked["pid"].as_u64().unwrap() as u32;

    send_signal(old, Signal::TERM);
    assert_eventually!(
        Duration::from_secs(10),
        r.server
            .stderr()
            .contains("passing it on to the new generation"),
        "the old generation did not take note of the stop"
    );
    std::fs::write(&fifo, "go\n").unwrap();
    let a = answer.join().unwrap().unwrap();
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["pid"], new, "{a}");
    let stop = r
        .server
        .wait_event(Duration::from_secs(10), |v| v["event"] == "stop");
    assert_eq!(stop["signal"], Signal::TERM.as_raw(), "{stop}");
    service_stopped(&mut r, new, slow);
}
