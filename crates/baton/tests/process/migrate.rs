//! Connection migration: an upgrade closes no connection. The old
//! generation hands each open connection to the new one and exits at once,
//! whatever its drain timeout; a new generation that takes no connections
//! gets none, and they drain on the old one as before.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_testkit::{assert_eventually, example};

use crate::Running;

/// One connection per client, numbered messages echoed back in order; any
/// error (a close, a reset, a wrong echo) is a failure. Never reconnects.
struct Clients {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Clients {
    fn start(addr: SocketAddr, n: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(120);
        let threads = (0..n)
            .map(|c| {
                let (stop, echoed, failures) = (stop.clone(), echoed.clone(), failures.clone());
                std::thread::spawn(move || {
                    let mut conn = TcpStream::connect(addr).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    conn.set_nodelay(true).unwrap();
                    let mut sent = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let msg = format!("client {c} message {sent}\n");
                        let mut back = vec![0u8; msg.len()];
                        let r = conn
                            .write_all(msg.as_bytes())
                            .and_then(|()| conn.read_exact(&mut back));
                        if let Err(e) = r {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("client {c} at {sent}: {e}"));
                            return sent;
                        }
                        if back != msg.as_bytes() {
                            failures.lock().unwrap().push(format!(
                                "client {c} at {sent}: echoed {:?}",
                                String::from_utf8_lossy(&back)
                            ));
                            return sent;
                        }
                        sent += 1;
                        echoed.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    sent
                })
            })
            .collect();
        Clients {
            stop,
            echoed,
            failures,
            threads,
        }
    }

    fn wait_for_progress(&self, n: u64) {
        let start = self.echoed.load(Ordering::Relaxed);
        assert_eventually!(
            Duration::from_secs(10),
            self.echoed.load(Ordering::Relaxed) >= start + n
                || !self.failures.lock().unwrap().is_empty(),
            "no progress"
        );
        let failures = self.failures.lock().unwrap();
        assert!(failures.is_empty(), "{failures:?}");
    }

    fn stop(self) -> (Vec<u64>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self
            .threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let failures = self.failures.lock().unwrap().clone();
        (sent, failures)
    }
}

#[test]
fn echo_connections_move_through_five_upgrades_and_none_closes() {
    let mut r = Running::start("tcp_echo", &["--drain-timeout", "60s", "--settle", "300ms"]);
    let clients = Clients::start(r.addr(), 16);
    clients.wait_for_progress(200);
    let mut old = r.pid();
    for i in 0..5 {
        let a = r.upgrade(r#"{"command":"upgrade"}"#);
        assert_eq!(a["ok"], true, "upgrade {i}: {a}");
        let answered = Instant::now();
        // With a 60 s drain timeout, an old generation that still held a
        // connection would live on: gone means every connection moved.
        assert_eventually!(
            Duration::from_secs(5),
            r.server.is_gone(old),
            "upgrade {i}: old generation {old} still running"
        );
        assert!(
            answered.elapsed() < Duration::from_secs(2),
            "upgrade {i}: the old generation took {:?} to exit",
            answered.elapsed()
        );
        clients.wait_for_progress(200);
        old = a["pid"].as_u64().unwrap() as u32;
    }
    let (sent, failures) = clients.stop();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        sent.iter().all(|&n| n > 50),
        "every client kept sending: {sent:?}"
    );
    assert!(
        r.server
            .stderr()
            .contains("the new generation takes connections over"),
        "{}",
        r.server.stderr()
    );
}

#[test]
fn a_next_generation_that_takes_no_connections_leaves_them_draining_on_the_old_one() {
    let mut r = Running::start("tcp_echo", &["--drain-timeout", "60s", "--settle", "300ms"]);
    let first = r.pid();
    let clients = Clients::start(r.addr(), 4);
    clients.wait_for_progress(50);
    // The same binary, told not to take connections (as an older binary
    // would not): the old generation keeps them and drains.
    let plain = r.dir.script(
        "no-migrate",
        &format!("exec {} \"$@\" --no-migrate", example("tcp_echo").display()),
    );
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        plain.display()
    ));
    assert_eq!(a["ok"], true, "{a}");
    clients.wait_for_progress(200);
    // Past the settle period the old generation lets its listening socket
    // go; with its connections kept, it is still there.
    assert_eventually!(
        Duration::from_secs(10),
        r.server.stderr().contains("settle period over"),
        "the settle period did not end"
    );
    assert!(
        !r.server.is_gone(first),
        "the old generation keeps its connections until they close"
    );
    clients.wait_for_progress(50);
    let (_, failures) = clients.stop();
    assert!(failures.is_empty(), "{failures:?}");
    // Closed by their clients: the old generation has nothing left.
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(first),
        "the old generation did not exit once its connections closed"
    );
}

/// Upgrades `r` to the misbehaving next generation in `mode`.
fn upgrade_to_bad_migrator(r: &mut Running, mode: &str) -> u32 {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/process/fixtures/bad_migrator.py");
    let script = r.dir.script(
        &format!("bad-{mode}"),
        &format!("BAD_MIGRATOR={mode} exec python3 {}", fixture.display()),
    );
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        script.display()
    ));
    assert_eq!(a["ok"], true, "{a}");
    let received = r
        .server
        .wait_event(Duration::from_secs(20), |e| e["event"] == "received");
    assert_eq!(received["fds"], 1, "{received}");
    a["pid"].as_u64().unwrap() as u32
}

#[test]
fn a_next_generation_killed_in_the_middle_of_a_transfer_loses_no_connection() {
    let mut r = Running::start("tcp_echo", &["--drain-timeout", "60s", "--settle", "5s"]);
    let first = r.pid();
    let clients = Clients::start(r.addr(), 4);
    clients.wait_for_progress(50);
    let bad = upgrade_to_bad_migrator(&mut r, "die");
    assert_eventually!(
        Duration::from_secs(5),
        r.server.is_gone(bad),
        "it did not die"
    );
    // The old generation kept every connection (and, the new one having
    // died within the settle period, took the service back).
    clients.wait_for_progress(200);
    assert_eventually!(
        Duration::from_secs(10),
        r.control(r#"{"command":"status"}"#)["state"] == "active",
        "the old generation did not take the service back"
    );
    let (_, failures) = clients.stop();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(!r.server.is_gone(first));
}

#[test]
fn a_next_generation_that_never_adopts_loses_no_connection() {
    let mut r = Running::start("tcp_echo", &["--drain-timeout", "60s", "--settle", "300ms"]);
    let first = r.pid();
    let clients = Clients::start(r.addr(), 4);
    clients.wait_for_progress(50);
    upgrade_to_bad_migrator(&mut r, "silent");
    // Not adopted by the deadline (5 s and a margin): the old generation
    // keeps each connection and serves it on. The clients wait at most that
    // long for an echo.
    clients.wait_for_progress(200);
    let (_, failures) = clients.stop();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(!r.server.is_gone(first), "the old generation drains them");
}
