//! WebSocket pass-through: a connection survives a reload and an upgrade,
//! and is closed with a 1001 close frame at the old generation's drain
//! timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use baton_testkit::assert_eventually;

use crate::{upstream_toml, Proxy, Upstream};

/// A minimal WebSocket client (client frames masked, as RFC 6455 requires)
/// over any byte stream (TCP, TLS).
pub struct Ws<S: Read + Write = TcpStream>(pub S);

impl Ws<TcpStream> {
    pub fn connect(addr: SocketAddr) -> Ws {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Ws::handshake(s)
    }
}

impl<S: Read + Write> Ws<S> {
    /// The opening handshake on `s`.
    pub fn handshake(mut s: S) -> Ws<S> {
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut b).unwrap(),
                1,
                "closed during handshake: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        Ws(s)
    }

    pub fn send(&mut self, text: &str) {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut f = vec![0x81, 0x80 | text.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&f).unwrap();
    }

    /// (opcode, payload)
    pub fn recv(&mut self) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
        let len = (h[1] & 0x7f) as usize;
        assert!(len < 126);
        let mut payload = vec![0u8; len];
        self.0.read_exact(&mut payload).unwrap();
        (h[0] & 0x0f, payload)
    }

    pub fn echo(&mut self, text: &str) {
        self.send(text);
        assert_eq!(self.recv(), (0x1, text.as_bytes().to_vec()));
    }
}

#[test]
fn websocket_survives_reload_and_upgrade_then_gets_1001_at_the_drain_timeout() {
    let a = Upstream::http("a");
    let body = |fixed: &str| {
        format!(
            r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

{}
[[routes]]
listener = "web"
path_prefix = "/ws"
upstream = "a"

[[routes]]
listener = "web"
respond = {{ status = 200, body = "{fixed}" }}
"#,
            upstream_toml("a", &[a.addr], "")
        )
    };
    // Drained, not moved (migrate.rs moves them).
    let p = Proxy::start(
        "websocket",
        "drain_timeout = \"3s\"\nmigrate = false",
        &body("one"),
    );
    let web = p.addr("web");
    let mut ws = Ws::connect(web);
    ws.echo("before");
    assert_eq!(p.status()["proxy"]["listeners"][0]["upgraded"], 1);

    p.write_config(&body("two"));
    p.reload_ok();
    ws.echo("after reload");

    let old = p.pid();
    let answer = p.upgrade();
    assert_eq!(answer["ok"], true, "{answer}");
    let upgraded_at = Instant::now();
    // The old generation still carries it.
    ws.echo("after upgrade");
    // New connections go to the new generation.
    let mut fresh = Ws::connect(web);
    fresh.echo("new generation");

    // At the drain timeout: a close frame, 1001 going away, then EOF.
    let (opcode, payload) = ws.recv();
    assert_eq!((opcode, payload), (0x8, vec![0x03, 0xE9]));
    assert!(
        upgraded_at.elapsed() >= Duration::from_secs(2),
        "closed before the drain timeout"
    );
    let mut rest = Vec::new();
    assert_eq!(ws.0.read_to_end(&mut rest).unwrap_or(0), 0);
    let mut p = p;
    assert_eventually!(
        Duration::from_secs(15),
        p.server.is_gone(old),
        "old generation still running"
    );
    fresh.echo("still here");
}
