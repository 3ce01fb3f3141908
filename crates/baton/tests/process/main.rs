//! Process-level tests: the real example binaries on 127.0.0.1 with
//! ephemeral ports, under load, upgraded through the control socket and
//! signals. One module per scenario.

mod admin;
mod bounds;
mod drain;
mod fd_store;
mod handoff;
mod lifecycle;
mod migrate;
mod redis_consumer;
mod rollback;
mod settle;
mod sockets;
mod takeover;
mod tls;
mod upgrade_races;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use baton_testkit::{example, Server, TempDir};
use serde_json::Value;

/// A started example with its control socket and pid file.
#[derive(Debug)]
pub struct Running {
    pub server: Server,
    pub dir: TempDir,
    pub control: PathBuf,
    pub pid_file: PathBuf,
    pub ready: Value,
}

impl Running {
    /// Starts example `name` listening on 127.0.0.1:0 with `extra` flags.
    pub fn start(name: &str, extra: &[&str]) -> Running {
        Self::start_program(&example(name), extra, TempDir::new(name))
    }

    /// Starts `program` (an example binary or a copy of one) in `dir`.
    pub fn start_program(program: &std::path::Path, extra: &[&str], dir: TempDir) -> Running {
        baton_testkit::become_subreaper();
        let control = dir.join("control.sock");
        let pid_file = dir.join("server.pid");
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--control-socket",
            control.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (server, ready) = Server::start(program, &args, &dir);
        Running {
            server,
            dir,
            control,
            pid_file,
            ready,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.ready["listen"].as_str().unwrap().parse().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.ready["pid"].as_u64().unwrap() as u32
    }

    /// Sends a control request and returns the answer.
    pub fn control(&self, request: &str) -> Value {
        baton_testkit::control(&self.control, request, Duration::from_secs(60))
    }

    /// Upgrades and returns the answer; tracks the new pid for clean-up.
    pub fn upgrade(&self, request: &str) -> Value {
        let answer = self.control(request);
        if let Some(pid) = answer["pid"].as_u64() {
            self.server.track(pid as u32);
        }
        answer
    }

    pub fn pid_file_pid(&self) -> u32 {
        std::fs::read_to_string(&self.pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}
