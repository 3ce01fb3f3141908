//! TCP listeners: bytes spliced both ways; connections on an old generation
//! or a removed listener stay open until they finish or the drain timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use baton_testkit::assert_eventually;

use crate::{upstream_toml, Proxy, Upstream};

fn echo(s: &mut TcpStream, text: &str) {
    s.write_all(text.as_bytes()).unwrap();
    let mut buf = vec![0u8; text.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf), text);
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn config(e: &Upstream, with_db: bool) -> String {
    let db = if with_db {
        r#"
[[listeners]]
name = "db"
address = "127.0.0.1:0"
protocol = "tcp"
upstream = "echo"
"#
    } else {
        ""
    };
    format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"
{db}
{}
[[routes]]
listener = "web"
respond = {{ status = 200, body = "ok" }}
"#,
        upstream_toml("echo", &[e.addr], "")
    )
}

#[test]
fn tcp_listener_forwards_and_drains_across_an_upgrade() {
    let e = Upstream::tcp_echo("echo");
    // Drained, not moved (migrate.rs moves them).
    let mut p = Proxy::start(
        "tcp-upgrade",
        "drain_timeout = \"3s\"\nmigrate = false",
        &config(&e, true),
    );
    let db = p.addr("db");
    let mut conn = connect(db);
    echo(&mut conn, "hello");

    let old = p.pid();
    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}");
    let upgraded_at = Instant::now();
    echo(&mut conn, "still on the old generation");
    let mut fresh = connect(db);
    echo(&mut fresh, "on the new one");

    // Closed at the drain timeout, not before.
    let mut buf = [0u8; 16];
    let n = conn.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(upgraded_at.elapsed() >= Duration::from_secs(2));
    assert_eventually!(
        Duration::from_secs(15),
        p.server.is_gone(old),
        "old generation still running"
    );
    echo(&mut fresh, "new generation unaffected");
}

#[test]
fn a_tcp_listener_removed_by_reload_drains_its_connections() {
    let e = Upstream::tcp_echo("echo");
    let p = Proxy::start("tcp-remove", "drain_timeout = \"3s\"", &config(&e, true));
    let db = p.addr("db");
    let mut conn = connect(db);
    echo(&mut conn, "hello");

    p.write_config(&config(&e, false));
    p.reload_ok();
    let removed_at = Instant::now();
    assert_eventually!(
        Duration::from_secs(5),
        TcpStream::connect(db).is_err(),
        "removed listener still accepts"
    );
    echo(&mut conn, "still open while draining");
    let status = p.status();
    assert_eq!(status["proxy"]["connections"]["draining"], 1, "{status}");
    let mut buf = [0u8; 16];
    assert_eq!(conn.read(&mut buf).unwrap_or(0), 0);
    assert!(removed_at.elapsed() >= Duration::from_secs(2));
    assert_eq!(p.status()["pid"], p.pid());
}
