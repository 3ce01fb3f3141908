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

/// Clients, one thread and one connection each, each repeating `step` on
/// its connection (with its own state `T`) until stopped; an error ends a
/// client and is a failure. Never reconnects.
struct Clients<T> {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<T>>,
}

impl<T: Default + Send + 'static> Clients<T> {
    fn start_with<F>(addr: SocketAddr, n: usize, pause: Duration, step: F) -> Clients<T>
    where
        F: Fn(usize, &mut TcpStream, &mut T) -> Result<(), String> + Clone + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(120);
        let threads = (0..n)
            .map(|c| {
                let (stop, done, failures, step) =
                    (stop.clone(), done.clone(), failures.clone(), step.clone());
                std::thread::spawn(move || {
                    let mut conn = TcpStream::connect(addr).unwrap();
                    conn.set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    conn.set_nodelay(true).unwrap();
                    let mut state = T::default();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        if let Err(e) = step(c, &mut conn, &mut state) {
                            failures.lock().unwrap().push(format!("client {c}: {e}"));
                            break;
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        if !pause.is_zero() {
                            std::thread::sleep(pause);
                        }
                    }
                    state
                })
            })
            .collect();
        Clients {
            stop,
            done,
            failures,
            threads,
        }
    }

    fn wait_for_progress(&self, n: u64) {
        let start = self.done.load(Ordering::Relaxed);
        assert_eventually!(
            Duration::from_secs(10),
            self.done.load(Ordering::Relaxed) >= start + n
                || !self.failures.lock().unwrap().is_empty(),
            "no progress"
        );
        let failures = self.failures.lock().unwrap();
        assert!(failures.is_empty(), "{failures:?}");
    }

    fn stop(self) -> (Vec<T>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let states = self
            .threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let failures = self.failures.lock().unwrap().clone();
        (states, failures)
    }
}

impl Clients<u64> {
    /// Numbered messages echoed back in order (the state: how many).
    fn start(addr: SocketAddr, n: usize) -> Clients<u64> {
        Clients::start_with(
            addr,
            n,
            Duration::from_millis(2),
            |c, conn, sent: &mut u64| {
                let msg = format!("client {c} message {sent}\n");
                let mut back = vec![0u8; msg.len()];
                conn.write_all(msg.as_bytes())
                    .and_then(|()| conn.read_exact(&mut back))
                    .map_err(|e| format!("at {sent}: {e}"))?;
                if back != msg.as_bytes() {
                    return Err(format!(
                        "at {sent}: echoed {:?}",
                        String::from_utf8_lossy(&back)
                    ));
                }
                *sent += 1;
                Ok(())
            },
        )
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
    upgrade_to_bad_migrator_of(r, mode, "echo")
}

/// Upgrades `r` to the misbehaving next generation in `mode`, which says it
/// takes the connections of `listener`.
fn upgrade_to_bad_migrator_of(r: &mut Running, mode: &str, listener: &str) -> u32 {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/process/fixtures/bad_migrator.py");
    let script = r.dir.script(
        &format!("bad-{mode}"),
        &format!(
            "BAD_MIGRATOR={mode} BAD_MIGRATOR_LISTENER={listener} exec python3 {}",
            fixture.display()
        ),
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

/// Keep-alive HTTP clients, each on one connection for the whole test,
/// sending `GET /` as fast as answers come; each records the generation of
/// every answer (the state: the generations in turn). A close, an error or
/// `Connection: close` is a failure.
fn http_clients(addr: SocketAddr, n: usize) -> Clients<Vec<u64>> {
    Clients::start_with(
        addr,
        n,
        Duration::ZERO,
        |_, conn, generations: &mut Vec<u64>| {
            conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let (head, body) = http_response(conn).map_err(|e| e.to_string())?;
            if !head.starts_with("http/1.1 200") || head.contains("connection: close") {
                return Err(format!("{head:?}"));
            }
            // "hello from generation N pid P"
            let g: u64 = body
                .split_whitespace()
                .nth(3)
                .and_then(|g| g.parse().ok())
                .unwrap_or(0);
            if generations.last() != Some(&g) {
                generations.push(g);
            }
            Ok(())
        },
    )
}

/// One response on `c`: (head, body).
fn http_response(c: &mut TcpStream) -> std::io::Result<(String, String)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).into_owned();
                return Ok((head, body));
            }
        }
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes", raw.len()),
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// `baton::http::Server` moves keep-alive connections: 16 clients sending
/// continuously through five upgrades of `hello` with a 60 s drain timeout.
/// No connection closes, no request fails, every client is answered by
/// every generation in turn, and each old generation exits at once.
#[test]
fn http_keepalive_connections_move_through_five_upgrades_and_none_closes() {
    let mut r = Running::start("hello", &["--drain-timeout", "60s", "--settle", "300ms"]);
    let clients = http_clients(r.addr(), 16);
    clients.wait_for_progress(500);
    let mut old = r.pid();
    for i in 0..5 {
        let a = r.upgrade(r#"{"command":"upgrade"}"#);
        assert_eq!(a["ok"], true, "upgrade {i}: {a}");
        let answered = Instant::now();
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
        clients.wait_for_progress(500);
        old = a["pid"].as_u64().unwrap() as u32;
    }
    let (seen, failures) = clients.stop();
    assert!(failures.is_empty(), "{failures:?}");
    for (c, generations) in seen.iter().enumerate() {
        assert_eq!(
            generations,
            &[1, 2, 3, 4, 5, 6],
            "client {c} was answered by each generation in turn, on one connection"
        );
    }
}

/// A request in flight at the upgrade finishes on the old generation,
/// without `Connection: close`, and the connection moves right after: its
/// next request is answered by the new generation.
#[test]
fn an_http_request_in_flight_finishes_on_the_old_generation_then_its_connection_moves() {
    let mut r = Running::start("hello", &["--drain-timeout", "60s", "--settle", "300ms"]);
    let old = r.pid();
    let mut conn = TcpStream::connect(r.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (_, body) = http_response(&mut conn).unwrap();
    assert!(body.starts_with("hello from generation 1 "), "{body}");
    // In flight during the upgrade: sent on an accepted connection before
    // the upgrade begins.
    conn.write_all(b"GET /sleep/1000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let slow = std::thread::spawn(move || {
        let r = http_response(&mut conn);
        (r, conn)
    });
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let (resp, mut conn) = slow.join().unwrap();
    let (head, body) = resp.unwrap();
    assert!(body.starts_with("hello from generation 1 "), "{body}");
    assert!(!head.contains("connection: close"), "{head}");
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (head, body) = http_response(&mut conn).unwrap();
    assert!(
        body.starts_with("hello from generation 2 "),
        "the same connection, answered by the new generation: {head} {body}"
    );
    // Nothing left on the old generation: it exits, drain timeout or not.
    assert_eventually!(
        Duration::from_secs(5),
        r.server.is_gone(old),
        "the old generation is still running"
    );
}

/// Bytes of a next request that the old generation had read already go
/// with the connection: a pipelined request split over the move is
/// answered whole by the new generation.
#[test]
fn a_partly_sent_http_request_moves_with_its_bytes() {
    let mut r = Running::start("hello", &["--drain-timeout", "60s", "--settle", "300ms"]);
    let old = r.pid();
    let mut conn = TcpStream::connect(r.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    http_response(&mut conn).unwrap();
    // Half a head, read by generation 1 before the upgrade: its socket's
    // receive queue is empty once it has.
    conn.write_all(b"GET / HTTP/1.1\r\nHo").unwrap();
    let (server, client) = (conn.peer_addr().unwrap(), conn.local_addr().unwrap());
    assert_eventually!(
        Duration::from_secs(5),
        baton_testkit::tcp_unread(server, client) == Some(0),
        "generation 1 did not read the half head"
    );
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    assert_eventually!(
        Duration::from_secs(5),
        r.server.is_gone(old),
        "the old generation kept the connection"
    );
    conn.write_all(b"st: t\r\n\r\n").unwrap();
    let (head, body) = http_response(&mut conn).unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.starts_with("hello from generation 2 "), "{body}");
}

/// HTTP fault cases: a next generation SIGKILLed in the middle of a
/// transfer, and one that takes no connections (an older binary). The old
/// generation keeps and drains its connections (`Connection: close`, the
/// client reconnects): not one request fails.
#[test]
fn http_connections_that_cannot_move_are_drained_and_lose_nothing() {
    use baton_testkit::{Load, Target};
    let mut r = Running::start("hello", &["--drain-timeout", "60s", "--settle", "5s"]);
    let first = r.pid();
    let load = Load::start(Target::Tcp(r.addr()), 4, 2, Duration::from_secs(120));
    load.wait_for_progress(200, Duration::from_secs(10));
    let bad = upgrade_to_bad_migrator_of(&mut r, "die", "http");
    assert_eventually!(
        Duration::from_secs(5),
        r.server.is_gone(bad),
        "it did not die"
    );
    // It died within the settle period: the old generation took the
    // service back, with every connection.
    assert_eventually!(
        Duration::from_secs(10),
        r.control(r#"{"command":"status"}"#)["state"] == "active",
        "the old generation did not take the service back"
    );
    load.wait_for_progress(200, Duration::from_secs(10));
    assert!(!r.server.is_gone(first));

    // A next generation that does not take connections: they drain.
    let plain = r.dir.script(
        "no-migrate",
        &format!("exec {} \"$@\" --no-migrate", example("hello").display()),
    );
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        plain.display()
    ));
    assert_eq!(a["ok"], true, "{a}");
    load.wait_for_progress(200, Duration::from_secs(10));
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(
        report.keepalive_connects > 4,
        "the connections were drained (Connection: close), not kept: {report:?}"
    );
    let g = a["generation"].as_u64().unwrap();
    assert!(
        report
            .bodies
            .iter()
            .any(|b| b.contains(&format!("generation {g} "))),
        "the plain next generation served: {:?}",
        report.bodies
    );
    assert_eventually!(
        Duration::from_secs(15),
        r.server.is_gone(first),
        "the old generation did not finish draining"
    );
}
