//! `baton proxy` end to end: the real binary in front of real upstream
//! processes (`examples/upstream.rs`) on 127.0.0.1 with ephemeral ports,
//! reloaded and upgraded under load. One module per scenario.

mod admin;
mod check;
mod differential;
mod health;
mod http1;
mod migrate;
mod reload;
mod routing;
mod settle;
mod smuggling;
mod takeover;
mod tcp;
mod tls;
mod upgrade;
mod websocket;
mod workers;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use baton_testkit::{example, Server, TempDir};
use serde_json::Value;

pub fn baton() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_baton"))
}

/// Output of a finished command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `baton ARGS` (with `envs`) to its end, killing it if it takes longer
/// than `timeout` (then it panics): (exit code, stderr).
pub fn run_bounded(
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> (Option<i32>, String) {
    baton_testkit::become_subreaper();
    let dir = TempDir::new("bounded");
    let mut server = Server::spawn(&baton(), args, &dir, envs);
    baton_testkit::assert_eventually!(
        timeout,
        server.first_exit().is_some(),
        "baton {args:?} still running; stderr:\n{}",
        server.stderr()
    );
    let status = server.first_exit().unwrap();
    (status.code(), server.stderr())
}

/// An upstream process (`examples/upstream`), killed on drop.
#[derive(Debug)]
pub struct Upstream {
    pub server: Server,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Upstream {
    /// An HTTP upstream answering `upstream NAME`.
    pub fn http(name: &str) -> Upstream {
        Self::start(&["--name", name])
    }

    /// An HTTP upstream on a given address (to bring one back).
    pub fn http_at(name: &str, addr: SocketAddr) -> Upstream {
        Self::start(&["--name", name, "--listen", &addr.to_string()])
    }

    /// A TCP echo upstream.
    pub fn tcp_echo(name: &str) -> Upstream {
        Self::start(&["--name", name, "--tcp-echo"])
    }

    fn start(args: &[&str]) -> Upstream {
        baton_testkit::become_subreaper();
        let dir = TempDir::new("upstream");
        let (server, ready) = Server::start(&example("upstream"), args, &dir);
        Upstream {
            server,
            addr: ready["listen"].as_str().unwrap().parse().unwrap(),
            _dir: dir,
        }
    }
}

/// A running `baton proxy --config FILE`, every generation killed on drop.
#[derive(Debug)]
pub struct Proxy {
    pub server: Server,
    pub dir: TempDir,
    pub config: PathBuf,
    pub control: PathBuf,
    pub pid_file: PathBuf,
    pub ready: Value,
    server_section: String,
}

impl Proxy {
    /// Starts the proxy with `[server]` lines `server` (control socket and
    /// pid file are added) and the rest of the file `body`.
    pub fn start(tag: &str, server: &str, body: &str) -> Proxy {
        Self::start_limited(tag, server, body, None)
    }

    /// Like [`start`](Self::start), with the proxy's open-file limit set to
    /// `nofile` (through `sh -c 'ulimit -n N; exec …'`) if given.
    pub fn start_limited(tag: &str, server: &str, body: &str, nofile: Option<u32>) -> Proxy {
        baton_testkit::become_subreaper();
        let dir = TempDir::new(tag);
        let control = dir.join("control.sock");
        let pid_file = dir.join("proxy.pid");
        let config = dir.join("proxy.toml");
        let server_section = format!(
            "[server]\ncontrol_socket = {:?}\npid_file = {:?}\n{server}\n",
            control.to_str().unwrap(),
            pid_file.to_str().unwrap()
        );
        std::fs::write(&config, format!("{server_section}\n{body}")).unwrap();
        let env = [("RUST_LOG", "info,baton_proxy::access=warn")];
        let baton = baton();
        let args = ["proxy", "--config", config.to_str().unwrap()];
        let (server, ready) = match nofile {
            None => Server::start_with_env(&baton, &args, &dir, &env),
            Some(n) => {
                // `exec` keeps the pid: the guard kills the proxy itself.
                let script = format!("ulimit -n {n} && exec \"$0\" \"$@\"");
                let mut sh_args = vec!["-c", &script, baton.to_str().unwrap()];
                sh_args.extend(args);
                Server::start_with_env(std::path::Path::new("/bin/sh"), &sh_args, &dir, &env)
            }
        };
        assert_eq!(ready["event"], "ready", "{ready}");
        Proxy {
            server,
            dir,
            config,
            control,
            pid_file,
            ready,
            server_section,
        }
    }

    /// Where listener `name` was bound at start.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.ready["listeners"][name]
            .as_str()
            .unwrap_or_else(|| panic!("no listener {name} in {}", self.ready))
            .parse()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.ready["pid"].as_u64().unwrap() as u32
    }

    /// Rewrites the configuration file (same `[server]` section).
    pub fn write_config(&self, body: &str) {
        std::fs::write(&self.config, format!("{}\n{body}", self.server_section)).unwrap();
    }

    /// Rewrites the configuration file verbatim.
    pub fn write_raw(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// One control request.
    pub fn control(&self, request: &str) -> Value {
        let answer = baton_testkit::control(&self.control, request, Duration::from_secs(60));
        if let Some(pid) = answer["pid"].as_u64() {
            self.server.track(pid as u32);
        }
        answer
    }

    /// `baton ctl --socket S ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(baton())
            .arg("ctl")
            .arg("--socket")
            .arg(&self.control)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    /// Waits (bounded) until every pid of `pids` has exited.
    pub fn assert_gone(&mut self, pids: &[u32]) {
        for &pid in pids {
            baton_testkit::assert_eventually!(
                Duration::from_secs(20),
                self.server.is_gone(pid),
                "generation pid {pid} still running"
            );
        }
    }

    pub fn status(&self) -> Value {
        self.control(r#"{"command":"status"}"#)
    }

    /// Reloads through the control socket and asserts it worked.
    pub fn reload_ok(&self) {
        let a = self.control(r#"{"command":"reload"}"#);
        assert_eq!(
            a["ok"],
            true,
            "reload: {a}\nstderr:\n{}",
            self.server.stderr()
        );
    }

    /// Upgrades through the control socket; returns the answer.
    pub fn upgrade(&self) -> Value {
        self.control(r#"{"command":"upgrade"}"#)
    }

    /// [`upgrade`](Self::upgrade), which must succeed (`what` names it in
    /// the failure, with the proxy's stderr); returns the new generation's
    /// pid and the answer.
    pub fn upgrade_ok(&self, what: &str) -> (u32, Value) {
        let answer = self.upgrade();
        assert_eq!(
            answer["ok"],
            true,
            "{what}: {answer}\n{}",
            self.server.stderr()
        );
        (answer["pid"].as_u64().unwrap() as u32, answer)
    }

    /// The upstream server entry `addr` of upstream `name` in `status`.
    pub fn upstream_server(&self, name: &str, addr: SocketAddr) -> Value {
        let s = self.status();
        s["proxy"]["upstreams"][name]["servers"]
            .as_array()
            .unwrap_or_else(|| panic!("no upstream {name}: {s}"))
            .iter()
            .find(|v| v["address"] == addr.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("no server {addr} in {s}"))
    }

    /// Listener addresses from `status` (includes listeners added by reload).
    pub fn listeners(&self) -> HashMap<String, SocketAddr> {
        let s = self.status();
        s["proxy"]["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().unwrap().to_owned(),
                    l["address"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }
}

/// Asserts that some line of `stderr` starts with each of `wants`.
pub fn assert_lines(stderr: &str, wants: &[String]) {
    for want in wants {
        assert!(
            stderr.lines().any(|l| l.starts_with(want.as_str())),
            "no {want:?} in:\n{stderr}"
        );
    }
}

/// One HTTP/1.1 request on a new connection: (status, body).
pub fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    get_with(addr, host, path, "")
}

/// Like [`get`] with extra header lines (each ending in `\r\n`).
pub fn get_with(addr: SocketAddr, host: &str, path: &str, headers: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    parse_response(&out)
}

fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// Upstream config lines for `name` with the given servers.
pub fn upstream_toml(name: &str, servers: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[upstreams.{name}]\nservers = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// One HTTP listener "web" on an ephemeral port with the upstreams
/// `upstreams` (TOML), every path routed to upstream `to`.
pub fn web_to(to: &str, upstreams: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "web"
address = "127.0.0.1:0"

{upstreams}
[[routes]]
listener = "web"
upstream = "{to}"
"#
    )
}

/// [`web_to`] upstream "a" with these servers.
pub fn web_to_a(servers: &[SocketAddr]) -> String {
    web_to("a", &upstream_toml("a", servers, ""))
}
