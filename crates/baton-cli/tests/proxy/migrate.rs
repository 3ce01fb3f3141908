//! Connection migration through the proxy: WebSocket and TCP pass-through
//! connections move to the next generation together with their upstream
//! connections, so neither the client nor the upstream sees an upgrade.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_testkit::{assert_eventually, socket_inodes};

use crate::websocket::Ws;
use crate::{upstream_toml, Proxy, Upstream};

/// Clients that each send numbered messages on one connection and check
/// every echo, until stopped; a failure (a close, a wrong echo) ends one.
struct Senders {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Senders {
    fn new() -> Senders {
        Senders {
            stop: Arc::new(AtomicBool::new(false)),
            echoed: Arc::new(AtomicU64::new(0)),
            failures: Arc::new(Mutex::new(Vec::new())),
            threads: Vec::new(),
        }
    }

    /// A TCP pass-through client.
    fn tcp(&mut self, addr: SocketAddr, id: usize) {
        let (stop, echoed, failures) = (
            self.stop.clone(),
            self.echoed.clone(),
            self.failures.clone(),
        );
        self.threads.push(std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let msg = format!("tcp {id} message {n}\n");
                let mut back = vec![0u8; msg.len()];
                let r = s
                    .write_all(msg.as_bytes())
                    .and_then(|()| s.read_exact(&mut back));
                if r.is_err() || back != msg.as_bytes() {
                    failures.lock().unwrap().push(format!(
                        "tcp {id} at {n}: {r:?} {:?}",
                        String::from_utf8_lossy(&back)
                    ));
                    return;
                }
                n += 1;
                echoed.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }

    /// A WebSocket client.
    fn ws(&mut self, addr: SocketAddr, id: usize) {
        let (stop, echoed, failures) = (
            self.stop.clone(),
            self.echoed.clone(),
            self.failures.clone(),
        );
        self.threads.push(std::thread::spawn(move || {
            let mut ws = Ws::connect(addr);
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let msg = format!("ws {id} message {n}");
                ws.send(&msg);
                let got = ws.recv();
                if got != (0x1, msg.as_bytes().to_vec()) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("ws {id} at {n}: {got:?}"));
                    return;
                }
                n += 1;
                echoed.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }

    fn wait_for_progress(&self, n: u64) {
        let start = self.echoed.load(Ordering::Relaxed);
        assert_eventually!(
            Duration::from_secs(10),
            self.echoed.load(Ordering::Relaxed) >= start + n
                || !self.failures.lock().unwrap().is_empty(),
            "no progress"
        );
        let f = self.failures.lock().unwrap();
        assert!(f.is_empty(), "{f:?}");
    }

    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            if t.join().is_err() {
                self.failures
                    .lock()
                    .unwrap()
                    .push("a client panicked".into());
            }
        }
        let f = self.failures.lock().unwrap().clone();
        f
    }
}

#[test]
fn websocket_and_tcp_connections_move_with_their_upstream_connections() {
    let a = Upstream::http("a");
    let e = Upstream::tcp_echo("echo");
    let body = format!(
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
path_prefix = "/ws"
upstream = "a"
"#,
        upstream_toml("a", &[a.addr], ""),
        upstream_toml("echo", &[e.addr], "")
    );
    let mut p = Proxy::start(
        "migrate-pairs",
        "drain_timeout = \"60s\"\nsettle = \"300ms\"",
        &body,
    );
    let mut senders = Senders::new();
    for i in 0..4 {
        senders.ws(p.addr("web"), i);
        senders.tcp(p.addr("db"), i);
    }
    senders.wait_for_progress(400);
    // The upstreams' sockets: the same connections from start to end means
    // none was closed or opened again.
    let (a_pid, e_pid) = (a.server.first_pid(), e.server.first_pid());
    let (a_socks, e_socks) = (socket_inodes(a_pid), socket_inodes(e_pid));
    let mut old = p.pid();
    for i in 0..5 {
        let answer = p.upgrade();
        assert_eq!(answer["ok"], true, "upgrade {i}: {answer}");
        let answered = Instant::now();
        assert_eventually!(
            Duration::from_secs(5),
            p.server.is_gone(old),
            "upgrade {i}: generation {old} still running (it kept a connection)"
        );
        assert!(
            answered.elapsed() < Duration::from_secs(2),
            "upgrade {i}: the old generation took {:?} to exit",
            answered.elapsed()
        );
        old = answer["pid"].as_u64().unwrap() as u32;
        senders.wait_for_progress(400);
    }
    // Checked while the clients are still connected.
    let (a_after, e_after) = (socket_inodes(a_pid), socket_inodes(e_pid));
    let failures = senders.stop();
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(a_after, a_socks, "the WebSocket upstream's connections");
    assert_eq!(e_after, e_socks, "the TCP upstream's connections");
    assert!(
        a_socks.len() >= 5 && e_socks.len() >= 5,
        "{a_socks:?} {e_socks:?}"
    );
}
