//! Draining: in-flight requests finish, exit hooks run, stops are bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use baton_testkit::assert_eventually;
use baton_testkit::send_signal as signal;
use rustix::process::Signal;

use crate::Running;

/// Sends a keep-alive GET and returns the raw response (read to the end of
/// its Content-Length body).
fn get(conn: &mut TcpStream, path: &str) -> String {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    read_response(conn)
}

fn read_response(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "closed before a full response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

#[test]
fn in_flight_request_finishes_then_exit_hooks_run() {
    // Drained, not moved to the next generation (see migrate.rs for that).
    let mut r = Running::start("hello", &["--drain-timeout", "10s", "--no-migrate"]);
    let old = r.pid();
    let mut conn = TcpStream::connect(r.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(get(&mut conn, "/").contains("generation 1"));

    // The slow request is sent (on a connection generation 1 has accepted)
    // before the upgrade begins, so it is in flight during the upgrade.
    conn.write_all(b"GET /sleep/1500 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let slow = std::thread::spawn(move || {
        let resp = read_response(&mut conn);
        // After the response hyper closes the connection (Connection: close).
        let mut rest = [0u8; 1];
        let eof = conn.read(&mut rest).map(|n| n == 0).unwrap_or(true);
        (resp, eof)
    });
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let (resp, eof) = slow.join().unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("generation 1"),
        "answered by the old generation: {resp}"
    );
    assert!(
        resp.to_ascii_lowercase().contains("connection: close"),
        "{resp}"
    );
    assert!(eof, "connection closed after the response");

    // Generation 1's exit hook runs after its drain, which waited for the
    // slow response (had it not, the response above would have been cut).
    let hook = r
        .server
        .wait_event(Duration::from_secs(10), |e| e["event"] == "exit_hook");
    assert_eq!(hook["pid"], old, "{hook}");
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(old),
        "old generation did not exit"
    );
    assert_eq!(r.server.first_exit().map(|s| s.code()), Some(Some(0)));
}

#[test]
fn sigquit_drains_in_flight_requests_then_exits() {
    let mut r = Running::start("hello", &["--drain-timeout", "10s"]);
    let pid = r.pid();
    let mut conn = TcpStream::connect(r.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(get(&mut conn, "/").starts_with("HTTP/1.1 200"));
    // Sent before the signal, on an accepted connection: in flight.
    conn.write_all(b"GET /sleep/1000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let slow = std::thread::spawn(move || read_response(&mut conn));
    signal(pid, Signal::QUIT);
    let resp = slow.join().unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let hook = r.server.next_event(Duration::from_secs(10));
    assert_eq!(hook["event"], "exit_hook");
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(pid),
        "did not exit"
    );
    assert_eq!(r.server.first_exit().map(|s| s.code()), Some(Some(0)));
    assert!(!r.pid_file.exists());
}

#[test]
fn sigint_stops_fast_even_with_long_lived_connections() {
    let mut r = Running::start("tcp_echo", &["--drain-timeout", "60s", "--no-migrate"]);
    let pid = r.pid();
    let mut conn = TcpStream::connect(r.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    conn.read_exact(&mut b).unwrap();
    let t0 = Instant::now();
    signal(pid, Signal::INT);
    let n = conn.read(&mut b);
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(pid),
        "did not exit"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "fast stop took {:?}",
        t0.elapsed()
    );
}
