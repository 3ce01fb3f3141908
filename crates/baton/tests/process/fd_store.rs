//! The service manager's file descriptor store: a full stop and start of the
//! service (what `systemctl restart` or a crash does) never closes the
//! listening socket, so no connection is refused, through a stand-in
//! manager that speaks systemd's protocol.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_testkit::{
    assert_none_refused, example, tcp_listen_inodes, Load, Prober, Server, Target, TempDir,
};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/process/fixtures/fd_store_manager.py")
}

fn tell(fifo: &Path, command: &str) {
    let mut f = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
    writeln!(f, "{command}").unwrap();
}

/// Reads events until `hello`'s ready line and the store holding both of
/// its sockets have all been seen; returns the ready line.
fn ready_and_stored(manager: &mut Server) -> Value {
    let (mut ready, mut http, mut control) = (None, false, false);
    while ready.is_none() || !http || !control {
        let e = manager.next_event(Duration::from_secs(30));
        match (e["event"].as_str(), e["what"].as_str()) {
            (Some("ready"), _) => ready = Some(e),
            (Some("manager"), Some("stored")) => match e["name"].as_str() {
                Some("http") => http = true,
                Some("baton-control") => control = true,
                _ => {}
            },
            _ => {}
        }
    }
    ready.unwrap()
}

#[test]
fn stop_and_start_through_the_fd_store_refuse_no_connection() {
    baton_testkit::become_subreaper();
    let dir = TempDir::new("fd-store");
    let notify = dir.join("notify.sock");
    let fifo = dir.fifo("commands");
    let control = dir.join("control.sock");
    let hello = example("hello");
    let args = [
        fixture().to_str().unwrap().to_owned(),
        notify.to_str().unwrap().to_owned(),
        fifo.to_str().unwrap().to_owned(),
        "--".to_owned(),
        hello.to_str().unwrap().to_owned(),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--control-socket".to_owned(),
        control.to_str().unwrap().to_owned(),
        "--drain-timeout".to_owned(),
        "5s".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut manager = Server::spawn(Path::new("python3"), &args, &dir, &[]);
    let ready = ready_and_stored(&mut manager);
    assert_eq!(ready["generation"], 1, "{ready}");
    let addr: std::net::SocketAddr = ready["listen"].as_str().unwrap().parse().unwrap();
    let inode = tcp_listen_inodes(addr.port());
    assert_eq!(inode.len(), 1, "{inode:?}");

    let load = Load::start(Target::Tcp(addr), 0, 4, Duration::from_secs(120));
    let probe = Prober::start(addr, 2, Duration::from_secs(120));
    load.wait_for_progress(100, Duration::from_secs(10));
    let mut pids = vec![ready["pid"].as_u64().unwrap()];
    for round in 0..3 {
        tell(&fifo, "stop");
        let exited = manager.wait_event(Duration::from_secs(30), |e| e["what"] == "exited");
        assert_eq!(exited["status"], 0, "round {round}: {exited}");
        tell(&fifo, "start");
        let started = manager.wait_event(Duration::from_secs(30), |e| e["what"] == "started");
        assert_eq!(
            started["fds"],
            serde_json::json!(["http", "baton-control"]),
            "round {round}: {started}"
        );
        let ready = ready_and_stored(&mut manager);
        let pid = ready["pid"].as_u64().unwrap();
        assert!(!pids.contains(&pid), "round {round}: a new process");
        pids.push(pid);
        assert_eq!(ready["listen"], addr.to_string(), "round {round}: {ready}");
        assert_eq!(
            tcp_listen_inodes(addr.port()),
            inode,
            "round {round}: the very same socket"
        );
        // The control socket came back from the store too, at its path.
        let status =
            baton_testkit::control(&control, r#"{"command":"status"}"#, Duration::from_secs(10));
        assert_eq!(status["pid"], pid, "round {round}: {status}");
        assert!(
            status["listeners"][0]["inherited"] == true,
            "round {round}: {status}"
        );
        load.wait_for_progress(100, Duration::from_secs(10));
    }
    let report = assert_none_refused(load, probe);
    assert_eq!(
        report.failed, 0,
        "failed requests: {:?} (ok {})",
        report.failures, report.ok
    );
    assert!(
        manager
            .stderr()
            .contains("kept in the service manager's fd store"),
        "{}",
        manager.stderr()
    );
    tell(&fifo, "quit");
    manager.wait_event(Duration::from_secs(30), |e| e["what"] == "quit");
}
