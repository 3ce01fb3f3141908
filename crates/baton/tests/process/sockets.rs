//! UDP, Unix and long-lived TCP connections across upgrades.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use baton_testkit::{assert_eventually, socket_inodes, tcp_listen_inode, Load, Target};

use crate::Running;

#[test]
fn udp_socket_is_handed_over_without_losing_a_datagram() {
    let r = Running::start("udp_echo", &["--drain-timeout", "2s"]);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.connect(r.addr()).unwrap();
    let mut buf = [0u8; 1024];
    let mut ask = |i: u32| -> String {
        let msg = format!("ping {i}");
        client.send(msg.as_bytes()).unwrap();
        let n = client
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} lost: {e}"));
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(reply.ends_with(&msg), "{reply}");
        reply
    };
    let mut i = 0;
    assert!(ask(i).starts_with(&format!("gen 1 pid {}", r.pid())));
    for g in 2..=6 {
        // Ping-pong from another thread while the upgrade runs.
        let control = r.control.clone();
        let up = std::thread::spawn(move || {
            baton_testkit::control(
                &control,
                r#"{"command":"upgrade"}"#,
                Duration::from_secs(30),
            )
        });
        while !up.is_finished() {
            i += 1;
            ask(i);
        }
        let a = up.join().unwrap();
        assert_eq!(a["ok"], true, "{a}");
        r.server.track(a["pid"].as_u64().unwrap() as u32);
        i += 1;
        assert!(
            ask(i).starts_with(&format!("gen {g} ")),
            "new generation answers"
        );
    }
}

#[test]
fn unix_socket_is_handed_over_under_load() {
    let dir = baton_testkit::TempDir::new("unix-path");
    let sock = dir.join("http.sock");
    let r = Running::start(
        "hello",
        &["--unix", sock.to_str().unwrap(), "--drain-timeout", "5s"],
    );
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let load = Load::start(Target::Unix(sock.clone()), 3, 3, Duration::from_secs(60));
    load.wait_for_progress(100, Duration::from_secs(10));
    for g in 2..=6 {
        let a = r.upgrade(r#"{"command":"upgrade"}"#);
        assert_eq!(a["ok"], true, "{a}");
        assert_eq!(a["generation"], g);
        load.wait_for_progress(100, Duration::from_secs(10));
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(report.bodies.iter().any(|b| b.contains("generation 6")));
    assert_eq!(
        std::fs::metadata(&sock).unwrap().ino(),
        ino,
        "the socket file was never re-bound"
    );
}

#[test]
fn long_lived_connection_survives_upgrade_until_drain_timeout() {
    let mut r = Running::start("tcp_echo", &["--drain-timeout", "3s", "--no-migrate"]);
    let old = r.pid();
    let port = r.addr().port();
    let listen_inode = tcp_listen_inode(port).expect("listening socket in /proc/net/tcp");
    assert!(socket_inodes(old).contains(&listen_inode));

    let mut conn = TcpStream::connect(r.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let echo = |c: &mut TcpStream, s: &str| -> std::io::Result<String> {
        c.write_all(s.as_bytes())?;
        let mut buf = vec![0u8; s.len()];
        c.read_exact(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    assert_eq!(echo(&mut conn, "before").unwrap(), "before");

    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let upgraded_at = Instant::now();
    let new = a["pid"].as_u64().unwrap() as u32;

    // The old generation keeps the connection but, once the settle period
    // (2 s by default) is over, holds no listening fd.
    assert_eq!(echo(&mut conn, "during").unwrap(), "during");
    assert_eventually!(
        Duration::from_secs(5),
        !socket_inodes(old).contains(&listen_inode),
        "old generation still holds the listening socket"
    );
    assert!(
        socket_inodes(new).contains(&listen_inode),
        "same socket, inherited"
    );
    assert_eq!(tcp_listen_inode(port), Some(listen_inode), "never re-bound");
    // New connections go to the new generation and work.
    let mut fresh = TcpStream::connect(r.addr()).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(echo(&mut fresh, "fresh").unwrap(), "fresh");

    // The long-lived connection is closed at the drain timeout, not before.
    let mut buf = [0u8; 16];
    let n = conn.read(&mut buf);
    let closed_after = upgraded_at.elapsed();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "expected the connection to close, got {n:?}"
    );
    assert!(
        closed_after >= Duration::from_millis(2800),
        "closed too early, after {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(8),
        "closed too late: {closed_after:?}"
    );
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(old),
        "old generation did not exit"
    );
    assert_eq!(echo(&mut fresh, "still").unwrap(), "still");
}

#[test]
fn listener_with_changed_address_is_bound_anew_and_old_one_closed() {
    let r = Running::start("hello", &[]);
    let old_port = r.addr().port();
    let hello = baton_testkit::example("hello");
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let new_addr = other.local_addr().unwrap();
    drop(other);
    let moved = r.dir.script(
        "moved",
        &format!("exec {} \"$@\" --listen {new_addr}", hello.display()),
    );
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        moved.display()
    ));
    assert_eq!(a["ok"], true, "{a}");
    let status = r.control(r#"{"command":"status"}"#);
    let listeners = status["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1, "{status}");
    assert_eq!(listeners[0]["address"], new_addr.to_string());
    assert_eq!(listeners[0]["inherited"], false);
    // The old port is closed once the old generation has drained.
    assert_eventually!(
        Duration::from_secs(10),
        tcp_listen_inode(old_port).is_none(),
        "old port still listening"
    );
    let mut s = TcpStream::connect(new_addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.contains("generation 2"), "{out}");
}

#[test]
fn upgrade_is_allowed_while_an_older_generation_is_still_draining() {
    let mut r = Running::start("tcp_echo", &["--drain-timeout", "20s", "--no-migrate"]);
    let first = r.pid();
    // A long-lived connection keeps generation 1 draining.
    let mut conn = TcpStream::connect(r.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"hi").unwrap();
    let mut b = [0u8; 2];
    conn.read_exact(&mut b).unwrap();

    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(
        a["ok"], true,
        "second upgrade while generation 1 drains: {a}"
    );
    assert_eq!(a["generation"], 3);
    assert!(!r.server.is_gone(first), "generation 1 is still draining");
    // And its connection still works.
    conn.write_all(b"yo").unwrap();
    conn.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"yo");
}
