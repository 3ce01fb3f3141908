//! The `baton` binary end to end: bench (with a negative control), demo, ctl.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use baton_testkit::{Server, TempDir};
use serde_json::Value;

fn baton() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_baton"))
}

fn run(args: &[&str]) -> Output {
    Command::new(baton())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `baton hello` with a control socket and pid file in `dir`.
fn hello(dir: &TempDir) -> (Server, String, PathBuf) {
    baton_testkit::become_subreaper();
    let control = dir.join("control.sock");
    let pid = dir.join("hello.pid");
    let (server, ready) = Server::start(
        &baton(),
        &[
            "hello",
            "--listen",
            "127.0.0.1:0",
            "--control-socket",
            control.to_str().unwrap(),
            "--pid-file",
            pid.to_str().unwrap(),
            "--drain-timeout",
            "5s",
        ],
        dir,
    );
    (
        server,
        ready["listen"].as_str().unwrap().to_owned(),
        control,
    )
}

#[test]
fn bench_reports_zero_failures_across_baton_upgrades_with_json_and_report() {
    let dir = TempDir::new("cli-bench");
    let (server, listen, control) = hello(&dir);
    let json = dir.join("result.json");
    let report = dir.join("report");
    let url = format!("http://{listen}/");
    let out = run(&[
        "bench",
        "--url",
        &url,
        "--mode",
        "keepalive",
        "--concurrency",
        "4",
        "--duration",
        "3s",
        "--restarts",
        "3",
        "--control-socket",
        control.to_str().unwrap(),
        "--action",
        "upgrade",
        "--json",
        json.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(result["failed"], 0, "{result}");
    assert!(result["requests"].as_u64().unwrap() > 100);
    let restarts = result["restarts"].as_array().unwrap();
    assert_eq!(restarts.len(), 3);
    for (i, r) in restarts.iter().enumerate() {
        assert_eq!(r["outcome"]["ok"], true, "restart {i}: {r}");
        server.track(r["outcome"]["response"]["pid"].as_u64().unwrap_or(0) as u32);
    }
    let svg = std::fs::read_to_string(report.join("timeline.svg")).unwrap();
    for i in 1..=3 {
        assert!(
            svg.contains(&format!("restart {i}")),
            "restart {i} is marked"
        );
    }
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(html.contains("<svg"), "the chart is inlined");
}

#[test]
fn bench_catches_a_naive_restart_and_exits_1() {
    // Negative control: kill -9 and start again on the same port, the way a
    // plain restart does. Keep-alive connections die with the process, so
    // every restart costs at least one request.
    baton_testkit::become_subreaper();
    let dir = TempDir::new("cli-naive");
    let pid_file = dir.join("naive.pid");
    let (server, ready) = Server::start(
        &baton(),
        &[
            "hello",
            "--listen",
            "127.0.0.1:0",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
        &dir,
    );
    let listen = ready["listen"].as_str().unwrap().to_owned();
    let restart = dir.script(
        "naive-restart",
        &format!(
            "old=$(cat {pid}); kill -9 $old\n# wait until it is dead (a zombie counts: its sockets are closed)\nwhile [ -e /proc/$old ] && ! grep -q ') Z' /proc/$old/stat; do sleep 0.01; done\nsetsid {baton} hello --listen {listen} --pid-file {pid} >/dev/null 2>&1 &\necho $! >> {pid}.all\nwhile [ \"$(cat {pid} 2>/dev/null)\" = \"$old\" ]; do sleep 0.01; done",
            pid = pid_file.display(),
            baton = baton().display(),
        ),
    );
    let url = format!("http://{listen}/");
    let out = run(&[
        "bench",
        "--url",
        &url,
        "--mode",
        "keepalive",
        "--concurrency",
        "4",
        "--duration",
        "3s",
        "--restarts",
        "3",
        "--restart-cmd",
        restart.to_str().unwrap(),
        "--restart-timeout",
        "30s",
    ]);
    // Every server the restarts started is killed and reaped with the guard.
    let all = std::fs::read_to_string(dir.join("naive.pid.all")).unwrap_or_default();
    for pid in all.split_whitespace() {
        server.track(pid.parse().unwrap_or(0));
    }
    drop(server);
    // A server is reaped by the guard; anything else that died as our child
    // (a helper of a restart script, reparented to us) is reaped here, so
    // that a leftover is named rather than miscounted.
    let comm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| Some(s[s.find('(')? + 1..s.rfind(')')?].to_owned()))
            .unwrap_or_default()
    };
    let left: Vec<(u32, String)> = baton_testkit::our_zombies()
        .into_iter()
        .map(|pid| (pid, comm(pid)))
        .collect();
    for (pid, _) in &left {
        baton_testkit::reaped_or_gone(*pid);
    }
    assert!(
        left.iter().all(|(_, name)| name != "baton"),
        "servers left unreaped: {left:?}"
    );
    let me = std::process::id();
    let running: Vec<u32> = baton_testkit::children_of(me)
        .into_iter()
        .filter(|&p| comm(p) == "baton" && baton_testkit::proc_state(p) != Some('Z'))
        .collect();
    assert_eq!(running, Vec::<u32>::new(), "servers left running");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("failed: 0\n"), "{stdout}");
}

#[test]
fn bench_usage_errors_and_unreachable_urls_exit_2() {
    let out = run(&["bench"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let out = run(&[
        "bench",
        "--url",
        &format!("http://{addr}/"),
        "--duration",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = run(&["bench", "--url", "ftp://x/", "--duration", "1s"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn demo_passes_and_writes_reports() {
    baton_testkit::become_subreaper();
    let dir = TempDir::new("cli-demo");
    let out = run(&[
        "demo",
        "--duration",
        "2s",
        "--upgrades",
        "2",
        "--concurrency",
        "4",
        "--report",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PASS: not one request lost"), "{stdout}");
    for mode in ["keepalive", "close"] {
        assert!(dir.join(mode).join("report.html").exists(), "{mode} report");
        assert!(dir.join(&format!("{mode}.json")).exists(), "{mode} json");
    }
    assert_eq!(baton_testkit::our_zombies(), Vec::<u32>::new());
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    let mut all = vec!["ctl", "--socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    run(&all)
}

#[test]
fn ctl_speaks_the_control_protocol_with_exit_codes() {
    let dir = TempDir::new("cli-ctl");
    let (server, listen, control) = hello(&dir);
    let out = ctl(&control, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.starts_with("generation 1  pid "), "{table}");
    assert!(table.contains("  active  up "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("http ") && l.contains(&listen) && l.ends_with("bound")),
        "the listener row: {table}"
    );
    assert!(table.contains("last upgrade  none"), "{table}");
    // The answer is the library's typed status.
    let json = ctl(&control, &["--json", "status"]);
    let typed: baton::control::Status = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(typed.generation, Some(1));

    let out = ctl(&control, &["--json", "upgrade"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    server.track(answer["pid"].as_u64().unwrap() as u32);
    assert_eq!(answer["generation"], 2);

    let out = ctl(&control, &["upgrade", "--binary", "/nonexistent/baton"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{}",
        text(&out)
    );

    let out = ctl(&control, &["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let out = ctl(&dir.join("nothing.sock"), &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let out = ctl(&control, &["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let pid = answer["pid"].as_u64().unwrap() as u32;
    let mut server = server;
    baton_testkit::assert_eventually!(
        Duration::from_secs(10),
        server.is_gone(pid),
        "stop did not stop"
    );
}

#[test]
fn ctl_takes_socket_and_json_before_or_after_the_action() {
    let dir = TempDir::new("cli-ctl-args");
    let (_server, _listen, control) = hello(&dir);
    let socket = control.to_str().unwrap();
    for args in [
        vec!["ctl", "--socket", socket, "--json", "status"],
        vec!["ctl", "status", "--socket", socket, "--json"],
        vec!["ctl", "--json", "status", "--socket", socket],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        let answer: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", text(&out)));
        assert_eq!(answer["generation"], 1, "{args:?}: {answer}");
    }
    // Without --json, wherever --socket is: the text form.
    let out = run(&["ctl", "status", "--socket", socket]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("generation 1"), "{}", text(&out));
    assert!(serde_json::from_str::<Value>(&stdout).is_err(), "{stdout}");
}

/// A proxy configuration without `control_socket` (the default is used):
/// one listener on an ephemeral port.
const DEFAULT_SOCKET_CONFIG: &str = "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\n[[routes]]\nlistener = \"web\"\nrespond = { status = 200 }\n";

#[test]
fn ctl_defaults_to_the_control_socket_the_proxy_defaults_to() {
    baton_testkit::become_subreaper();
    let dir = TempDir::new("cli-default-socket");
    let runtime = dir.join("run");
    std::fs::create_dir(&runtime).unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(&config, DEFAULT_SOCKET_CONFIG).unwrap();
    let xdg = runtime.to_str().unwrap();
    let (_server, ready) = Server::start_with_env(
        &baton(),
        &["proxy", "--config", config.to_str().unwrap()],
        &dir,
        &[("XDG_RUNTIME_DIR", xdg)],
    );
    assert_eq!(
        ready["control_socket"],
        runtime.join("baton").join("proxy.sock").to_str().unwrap(),
        "{ready}"
    );
    let out = Command::new(baton())
        .args(["ctl", "status"])
        .env("XDG_RUNTIME_DIR", xdg)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("pid {}", ready["pid"])),
        "{}",
        text(&out)
    );
}

#[test]
fn proxy_refuses_a_symlink_planted_at_its_control_directory() {
    baton_testkit::become_subreaper();
    let dir = TempDir::new("cli-socket-link");
    let runtime = dir.join("run");
    // A directory the test owns: only the link itself is wrong.
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, runtime.join("baton")).unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(&config, DEFAULT_SOCKET_CONFIG).unwrap();
    let mut server = Server::spawn(
        &baton(),
        &["proxy", "--config", config.to_str().unwrap()],
        &dir,
        &[("XDG_RUNTIME_DIR", runtime.to_str().unwrap())],
    );
    baton_testkit::assert_eventually!(
        Duration::from_secs(20),
        server.first_exit().is_some(),
        "the proxy started with a symlinked control directory: {}",
        server.stderr()
    );
    assert_eq!(server.first_exit().unwrap().code(), Some(2));
    let stderr = server.stderr();
    assert!(
        stderr.contains(&format!(
            "control socket directory {}: is a symbolic link; refusing to follow it",
            runtime.join("baton").display()
        )),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}
