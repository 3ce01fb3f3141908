//! `baton run`: real children (a Python socket-activation server, the Rust
//! `baton hello`, `python3 -m http.server` behind --port-env) under load
//! from keep-alive and new-connection clients, reloaded, crashed, rolled back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use baton_testkit::{assert_eventually, Load, LoadReport, Server, Target, TempDir};
use serde_json::Value;

fn baton() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_baton"))
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/activation_server.py")
}

/// A running `baton run` and its control socket.
struct Run {
    server: Server,
    control: PathBuf,
    dir: TempDir,
}

impl Run {
    /// Starts `baton run ARGS -- COMMAND` and waits (on the control
    /// socket) until its first child is ready.
    fn start(args: &[&str], command: &[&str]) -> Run {
        baton_testkit::become_subreaper();
        let dir = TempDir::new("run");
        let control = dir.join("control.sock");
        let mut all = vec!["run", "--control-socket", control.to_str().unwrap()];
        all.extend_from_slice(args);
        all.push("--");
        all.extend_from_slice(command);
        let server = Server::spawn(&baton(), &all, &dir, &[("RUST_LOG", "info")]);
        let mut run = Run {
            server,
            control,
            dir,
        };
        assert_eventually!(
            Duration::from_secs(20),
            // Listening, not just bound: the path exists from bind() on.
            std::os::unix::net::UnixStream::connect(&run.control).is_ok()
                || run.server.first_exit().is_some(),
            "baton run did not come up"
        );
        assert!(
            run.server.first_exit().is_none(),
            "baton run exited: {}",
            run.server.stderr()
        );
        let pid = run.status()["pid"].as_u64().unwrap() as u32;
        run.server.track(pid);
        run
    }

    fn status(&self) -> Value {
        baton_testkit::control(
            &self.control,
            r#"{"command":"status"}"#,
            Duration::from_secs(30),
        )
    }

    fn addr(&self) -> SocketAddr {
        self.status()["listeners"][0]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn reload(&self) -> Value {
        let a = baton_testkit::control(
            &self.control,
            r#"{"command":"reload"}"#,
            Duration::from_secs(60),
        );
        if let Some(pid) = a["pid"].as_u64() {
            self.server.track(pid as u32);
        }
        a
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["ctl", "--socket", self.control.to_str().unwrap()];
        all.extend_from_slice(args);
        Command::new(baton()).args(&all).output().unwrap()
    }
}

fn assert_no_loss(report: &LoadReport) {
    assert_eq!(
        report.failed, 0,
        "failed requests: {:?} (ok {})",
        report.failures, report.ok
    );
    assert!(report.ok > 200, "load too small: {report:?}");
}

/// Twenty reloads under load, each a new pid and generation; old children gone.
fn twenty_reloads(run: &Run, expect_body: &str) {
    let (report, pids) = reloads_under_load(run, 20);
    assert_no_loss(&report);
    assert!(
        report.bodies.iter().any(|b| b.contains(expect_body)),
        "the last child served: {:?}",
        report.bodies.iter().rev().take(3).collect::<Vec<_>>()
    );
    old_children_gone(&pids);
}

/// Every pid but the last (the current child) is gone.
fn old_children_gone(pids: &[u32]) {
    for pid in &pids[..pids.len() - 1] {
        assert_eventually!(
            Duration::from_secs(15),
            baton_testkit::proc_state(*pid).is_none(),
            "old child {pid} still there"
        );
    }
}

#[test]
fn python_socket_activation_server_twenty_reloads_lose_nothing() {
    let fx = fixture();
    let run = Run::start(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "notify",
            "--drain-timeout",
            "10s",
            "--settle",
            "200ms",
        ],
        &["python3", fx.to_str().unwrap()],
    );
    twenty_reloads(&run, "python generation 21");
}

#[test]
fn rust_socket_activation_server_twenty_reloads_lose_nothing() {
    // `baton hello` adopts the socket named "http" from LISTEN_FDS at first
    // start (it asks for 127.0.0.1:0, which matches any port) and sends
    // READY=1 to NOTIFY_SOCKET.
    let b = baton();
    let run = Run::start(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "notify",
            "--drain-timeout",
            "10s",
            "--settle",
            "200ms",
        ],
        &[
            b.to_str().unwrap(),
            "hello",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "5s",
        ],
    );
    twenty_reloads(&run, "hello from generation 21 pid");
    assert!(
        run.server.stderr().contains("inherited=true"),
        "the child adopted the supervisor's socket"
    );
}

#[test]
fn failed_reloads_keep_the_old_child_serving() {
    let fx = fixture();
    let dir = TempDir::new("run-scripts");
    let script = dir.join("child.sh");
    let write = |body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let tmp = dir.join("child.sh.tmp");
        std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &script).unwrap();
    };
    write(&format!("exec python3 {} \"$@\"", fx.display()));
    let run = Run::start(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "notify",
            // Long enough for python to start on a loaded machine; the
            // never-ready case below waits this long.
            "--ready-timeout",
            "5s",
        ],
        &[script.to_str().unwrap()],
    );
    let first = run.status()["pid"].as_u64().unwrap();
    let load = Load::start(Target::Tcp(run.addr()), 3, 3, Duration::from_secs(90));
    load.wait_for_progress(100, Duration::from_secs(10));

    // Fails to start.
    write(&format!("exec python3 {} --fail", fx.display()));
    let out = run.ctl(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("exited with status 3") && err.contains("--fail given"),
        "{err}"
    );
    load.wait_for_progress(50, Duration::from_secs(10));

    // Never becomes ready.
    write(&format!("exec python3 {} --never-ready", fx.display()));
    let out = run.ctl(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not ready within 5s"), "{err}");
    load.wait_for_progress(50, Duration::from_secs(10));

    // Binary missing.
    std::fs::remove_file(&script).unwrap();
    let out = run.ctl(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No such file"), "{err}");
    load.wait_for_progress(50, Duration::from_secs(10));

    let status = run.status();
    assert_eq!(
        status["pid"].as_u64().unwrap(),
        first,
        "the old child is untouched: {status}"
    );
    assert_eq!(status["last_reload"]["ok"], false);

    // And a good reload still works.
    write(&format!("exec python3 {} \"$@\"", fx.display()));
    let a = run.reload();
    assert_eq!(a["ok"], true, "{a}");
    load.wait_for_progress(50, Duration::from_secs(10));
    assert_no_loss(&load.stop());
    drop(run.dir);
}

#[test]
fn a_killed_child_is_replaced_without_refusing_connections() {
    let fx = fixture();
    let run = Run::start(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "notify",
            "--restart-on-crash",
        ],
        &["python3", fx.to_str().unwrap()],
    );
    let victim = run.status()["pid"].as_u64().unwrap() as u32;
    let load = Load::start(Target::Tcp(run.addr()), 4, 4, Duration::from_secs(60));
    load.wait_for_progress(200, Duration::from_secs(10));

    baton_testkit::send_signal(victim, rustix::process::Signal::KILL);
    let killed_at = Instant::now();
    // The replacement answers (its pid in the body). How soon is a measured
    // figure, printed here, not a bound asserted on a shared machine.
    let replacement = std::cell::Cell::new(0u32);
    assert_eventually!(
        Duration::from_secs(5),
        {
            let s = run.status();
            replacement.set(s["pid"].as_u64().unwrap_or(0) as u32);
            replacement.get() != victim && s["restarts"] == 1
        },
        "no replacement"
    );
    let replacement = replacement.get();
    run.server.track(replacement);
    let body = format!("pid {replacement}\n");
    let mut c = std::net::TcpStream::connect(run.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::{Read, Write};
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    let served_after = killed_at.elapsed();
    assert!(resp.ends_with(&body), "{resp}");
    eprintln!("replacement served {served_after:?} after the kill");
    load.wait_for_progress(200, Duration::from_secs(10));

    let report = load.stop();
    // Only requests in flight on the killed child may fail: at most one per
    // client. None is refused: the socket never closed.
    assert!(report.failed <= 8, "{:?}", report.failures);
    assert!(
        !report
            .failures
            .iter()
            .any(|f| f.to_lowercase().contains("refused")),
        "{:?}",
        report.failures
    );
}

#[test]
fn port_env_makes_a_plain_server_zero_downtime() {
    let www = TempDir::new("www");
    std::fs::write(www.join("index.html"), "hello from http.server\n").unwrap();
    let cmd = format!(
        "exec python3 -m http.server \"$PORT\" --bind 127.0.0.1 --directory {}",
        www.path().display()
    );
    let run = Run::start(
        &[
            "--listen",
            "web=127.0.0.1:0",
            "--port-env",
            "web=PORT",
            "--drain-timeout",
            "10s",
            "--settle",
            "200ms",
        ],
        &["sh", "-c", &cmd],
    );
    twenty_reloads(&run, "hello from http.server");
    let status = run.status();
    assert_eq!(status["generation"], 21, "{status}");
}

#[test]
fn without_restart_on_crash_the_supervisor_exits_with_the_child_status() {
    let run = Run::start(
        &["--ready", "delay:100ms"],
        &[
            "sh",
            "-c",
            "trap 'exit 7' TERM; while :; do sleep 0.05; done",
        ],
    );
    let child = run.status()["pid"].as_u64().unwrap() as u32;
    baton_testkit::send_signal(child, rustix::process::Signal::TERM);
    let mut server = run.server;
    assert_eventually!(
        Duration::from_secs(10),
        server.first_exit().is_some(),
        "supervisor did not exit"
    );
    assert_eq!(server.first_exit().unwrap().code(), Some(7));
}

#[test]
fn unix_socket_listener_and_signals() {
    let fx = fixture();
    let dir = TempDir::new("run-unix");
    let sock = dir.join("app.sock");
    let addr = format!("http=unix:{}", sock.display());
    let run = Run::start(
        &[
            "--listen",
            &addr,
            "--ready",
            "notify",
            "--drain-timeout",
            "5s",
        ],
        &["python3", fx.to_str().unwrap()],
    );
    let supervisor = run.server.first_pid();
    let load = Load::start(Target::Unix(sock.clone()), 2, 2, Duration::from_secs(60));
    load.wait_for_progress(100, Duration::from_secs(10));
    // SIGHUP reloads.
    let before = run.status()["pid"].as_u64().unwrap();
    baton_testkit::send_signal(supervisor, rustix::process::Signal::HUP);
    assert_eventually!(
        Duration::from_secs(10),
        run.status()["last_reload"]["ok"] == true,
        "SIGHUP did not reload"
    );
    let after = run.status()["pid"].as_u64().unwrap();
    assert_ne!(before, after);
    run.server.track(after as u32);
    load.wait_for_progress(100, Duration::from_secs(10));
    assert_no_loss(&load.stop());

    // SIGTERM stops the child gracefully and the supervisor exits 0.
    baton_testkit::send_signal(supervisor, rustix::process::Signal::TERM);
    let mut server = run.server;
    assert_eventually!(
        Duration::from_secs(10),
        server.first_exit().is_some(),
        "supervisor did not exit"
    );
    assert_eq!(server.first_exit().unwrap().code(), Some(0));
    assert_eventually!(
        Duration::from_secs(10),
        baton_testkit::proc_state(after as u32).is_none(),
        "child still running"
    );
    assert!(!run.control.exists(), "control socket removed");
    assert!(!sock.exists(), "the unix listener's socket file removed");
}

/// Pids whose open fds include the socket with inode `ino` (scans
/// `/proc/*/fd`).
fn holders(ino: u64) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
            if baton_testkit::socket_inodes(pid).contains(&ino) {
                out.push(pid);
            }
        }
    }
    out
}

/// The process group of `pid`, from `/proc/PID/stat`.
fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// A child that leaves two grandchildren behind, both holding the inherited
/// listening socket (one in its process group, one in a session of its own
/// by `setsid`), reports them on stdout, and exits when the test writes to
/// its FIFO: after each crash, restart, reload and stop, nothing but the
/// supervisor, the current child's group and its grandchildren holds the
/// socket, and every earlier grandchild is gone.
#[test]
fn leftovers_of_a_child_die_with_it_setsid_ones_too() {
    let dir = TempDir::new("run-orphans");
    for g in 1..=6 {
        dir.fifo(&format!("crash-{g}"));
    }
    let script = dir.script(
        "child.sh",
        &format!(
            "sleep 1000 &\n\
             plain=$!\n\
             setsid sleep 1000 &\n\
             echo \"{{\\\"event\\\":\\\"grandchild\\\",\\\"pid\\\":$plain,\\\"setsid\\\":$!,\\\"child\\\":$$,\\\"generation\\\":$BATON_GENERATION}}\"\n\
             read line < {}/crash-$BATON_GENERATION\n\
             exit 3",
            dir.path().display()
        ),
    );
    let mut run = Run::start(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "delay:100ms",
            "--restart-on-crash",
            "--drain-timeout",
            "5s",
        ],
        &[script.to_str().unwrap()],
    );
    let supervisor = run.server.first_pid();
    let port = run.addr().port();
    let ino = baton_testkit::tcp_listen_inode(port).expect("listening inode");
    let mut grandchildren = Vec::new();
    // Each child starts two: one in its process group, one in a session of
    // its own (`setsid`).
    let next_grandchild = |run: &mut Run, generation: u64| -> [u32; 2] {
        let e = run.server.wait_event(Duration::from_secs(20), |v| {
            v["event"] == "grandchild" && v["generation"] == generation
        });
        [
            e["pid"].as_u64().unwrap() as u32,
            e["setsid"].as_u64().unwrap() as u32,
        ]
    };
    let check = |run: &Run, generation: u64, grandchildren: &[[u32; 2]]| {
        let (current, gone) = grandchildren.split_last().unwrap();
        let gone: Vec<u32> = gone.iter().flatten().copied().collect();
        assert_eventually!(
            Duration::from_secs(10),
            run.status()["generation"] == generation,
            "generation {generation} is not current: {}",
            run.status()
        );
        let child = run.status()["pid"].as_u64().unwrap() as u32;
        for g in &gone {
            assert_eventually!(
                Duration::from_secs(10),
                baton_testkit::reaped_or_gone(*g),
                "grandchild {g} of an earlier child is still there"
            );
        }
        assert_eventually!(
            Duration::from_secs(10),
            holders(ino)
                .iter()
                .all(|p| *p == supervisor || pgid(*p) == Some(child) || current.contains(p)),
            "the listening socket is held outside the supervisor and child {child}'s group: {:?}",
            holders(ino)
                .iter()
                .map(|p| (*p, pgid(*p)))
                .collect::<Vec<_>>()
        );
    };
    grandchildren.push(next_grandchild(&mut run, 1));
    check(&run, 1, &grandchildren);
    // Three crashes, each replaced.
    for g in 1..=3u64 {
        std::fs::write(dir.join(&format!("crash-{g}")), "crash\n").unwrap();
        grandchildren.push(next_grandchild(&mut run, g + 1));
        check(&run, g + 1, &grandchildren);
    }
    assert_eq!(run.status()["restarts"], 3);
    // A reload retires the current child (SIGTERM) and its group.
    let a = run.reload();
    assert_eq!(a["ok"], true, "{a}");
    grandchildren.push(next_grandchild(&mut run, 5));
    check(&run, 5, &grandchildren);
    // A stop leaves nothing of the service behind.
    baton_testkit::send_signal(supervisor, rustix::process::Signal::TERM);
    assert_eventually!(
        Duration::from_secs(15),
        run.server.first_exit().is_some(),
        "supervisor did not exit"
    );
    assert_eq!(run.server.first_exit().unwrap().code(), Some(0));
    for g in grandchildren.iter().flatten() {
        assert_eventually!(
            Duration::from_secs(10),
            baton_testkit::reaped_or_gone(*g),
            "grandchild {g} outlived the stop"
        );
    }
    assert!(holders(ino).is_empty(), "{:?}", holders(ino));
    assert!(baton_testkit::our_zombies().is_empty());
}

/// After `kill -9` of a `baton run`, its child lives on holding the port. A
/// new `baton run` on the same address says who holds it, that it looks
/// like an orphaned child of an earlier `baton run`, and what to do.
#[test]
fn address_in_use_names_the_orphaned_child_holding_it() {
    let fx = fixture();
    let mut run = Run::start(
        &["--listen", "http=127.0.0.1:0", "--ready", "notify"],
        &["python3", fx.to_str().unwrap()],
    );
    let addr = run.addr();
    let child = run.status()["pid"].as_u64().unwrap() as u32;
    baton_testkit::send_signal(run.server.first_pid(), rustix::process::Signal::KILL);
    assert_eventually!(
        Duration::from_secs(10),
        run.server.first_exit().is_some(),
        "supervisor did not die"
    );
    assert!(
        baton_testkit::proc_state(child).is_some(),
        "the child lives on"
    );

    let listen = format!("http={addr}");
    let dir = TempDir::new("run-in-use");
    let mut second = Server::spawn(
        &baton(),
        &[
            "run",
            "--listen",
            &listen,
            "--ready",
            "notify",
            "--",
            "python3",
            fx.to_str().unwrap(),
        ],
        &dir,
        &[],
    );
    assert_eventually!(
        Duration::from_secs(20),
        second.first_exit().is_some(),
        "the second baton run did not exit"
    );
    assert_ne!(second.first_exit().unwrap().code(), Some(0));
    let stderr = second.stderr();
    for want in [
        "address already in use".to_owned(),
        format!("held by pid {child}"),
        "orphaned child of an earlier `baton run`".to_owned(),
        format!("kill {child}"),
    ] {
        assert!(stderr.contains(&want), "{want:?} not in:\n{stderr}");
    }
}

/// A new child killed within the settle period fails the reload (`ctl
/// reload` exits 1 with the reason) and the old child, never touched, goes
/// on serving: no connection refused. A child that came from a reload and
/// dies after the settle period is restarted even without
/// `--restart-on-crash`.
#[test]
fn a_new_child_dying_within_the_settle_period_fails_the_reload() {
    let fx = fixture();
    let run = Run::start(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "notify",
            "--settle",
            "3s",
        ],
        &["python3", fx.to_str().unwrap()],
    );
    let supervisor = run.server.first_pid();
    let old = run.status()["pid"].as_u64().unwrap() as u32;
    let load = Load::start(Target::Tcp(run.addr()), 4, 4, Duration::from_secs(90));
    load.wait_for_progress(100, Duration::from_secs(10));

    let ctl = {
        let control = run.control.clone();
        std::thread::spawn(move || {
            Command::new(baton())
                .args(["ctl", "--socket", control.to_str().unwrap(), "reload"])
                .output()
                .unwrap()
        })
    };
    assert_eventually!(
        Duration::from_secs(20),
        run.server.stderr().contains("new child ready; settling"),
        "the new child did not become ready"
    );
    let new = baton_testkit::children_of(supervisor)
        .into_iter()
        .find(|p| *p != old)
        .expect("the new child");
    run.server.track(new);
    baton_testkit::send_signal(new, rustix::process::Signal::KILL);
    let out = ctl.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("within the settle period") && err.contains("SIGKILL"),
        "{err}"
    );
    assert!(
        err.contains(&format!("old child (pid {old}) was not touched")),
        "{err}"
    );
    let status = run.status();
    assert_eq!(status["pid"].as_u64().unwrap() as u32, old, "{status}");
    assert_eq!(status["last_reload"]["ok"], false, "{status}");
    assert_eq!(baton_testkit::proc_state(old).map(|s| s != 'Z'), Some(true));
    load.wait_for_progress(100, Duration::from_secs(10));

    // A good reload, then its child dies after the settle period: replaced
    // with the back-off, although --restart-on-crash was not given.
    let a = run.reload();
    assert_eq!(a["ok"], true, "{a}");
    let reloaded = a["pid"].as_u64().unwrap() as u32;
    load.wait_for_progress(100, Duration::from_secs(10));
    baton_testkit::send_signal(reloaded, rustix::process::Signal::KILL);
    assert_eventually!(
        Duration::from_secs(10),
        {
            let s = run.status();
            s["restarts"] == 1 && s["pid"].as_u64().is_some_and(|p| p as u32 != reloaded)
        },
        "the reloaded child was not replaced"
    );
    let replacement = run.status()["pid"].as_u64().unwrap() as u32;
    run.server.track(replacement);
    load.wait_for_progress(100, Duration::from_secs(10));

    let report = load.stop();
    assert!(
        !report
            .failures
            .iter()
            .any(|f| f.to_lowercase().contains("refused")),
        "{:?}",
        report.failures
    );
    // Only requests in flight on the killed children may fail.
    assert!(report.failed <= 16, "{:?}", report.failures);
    let mut server = run.server;
    assert!(server.first_exit().is_none(), "the supervisor exited");
}

/// `baton run --takeover ARGS -- COMMAND` for the control socket of `run`,
/// started through a shell as a deploy script would.
fn deploy_supervisor(run: &Run, tag: &str, args: &[&str], command: &[&str]) -> Server {
    let b = baton();
    let mut all = vec![
        "-c",
        r#"exec "$0" "$@""#,
        b.to_str().unwrap(),
        "run",
        "--control-socket",
        run.control.to_str().unwrap(),
        "--takeover",
    ];
    all.extend_from_slice(args);
    all.push("--");
    all.extend_from_slice(command);
    Server::spawn_logged(
        Path::new("/bin/sh"),
        &all,
        &run.dir,
        &[("RUST_LOG", "info")],
        tag,
        |_| {},
    )
}

/// Takes over `count` times from the supervisor `run` started; every old
/// supervisor and its child exit; returns the last supervisor.
fn supervisor_takeovers(run: &mut Run, count: usize, args: &[&str], command: &[&str]) -> Server {
    let mut current: Option<Server> = None;
    for i in 0..count {
        let status = run.status();
        let (old_sup, old_child) = (
            status["supervisor_pid"].as_u64().unwrap() as u32,
            status["pid"].as_u64().unwrap() as u32,
        );
        let generation = status["generation"].as_u64().unwrap();
        let mut next = deploy_supervisor(run, &format!("takeover-{i}"), args, command);
        let pid = next.first_pid();
        // The control socket answers from the new supervisor once it took
        // over; the old one stops its child and exits 0.
        assert_eventually!(
            Duration::from_secs(30),
            run.status()["supervisor_pid"] == pid || next.first_exit().is_some(),
            "take-over {i} did not happen"
        );
        assert!(next.first_exit().is_none(), "{}", next.stderr());
        let status = run.status();
        assert_eq!(status["generation"], generation + 1, "{status}");
        next.track(status["pid"].as_u64().unwrap() as u32);
        let old_exit = match current.as_mut() {
            Some(s) => {
                assert_eventually!(
                    Duration::from_secs(20),
                    s.first_exit().is_some(),
                    "old supervisor {old_sup} still running"
                );
                s.first_exit().unwrap()
            }
            None => {
                assert_eventually!(
                    Duration::from_secs(20),
                    run.server.first_exit().is_some(),
                    "first supervisor still running"
                );
                run.server.first_exit().unwrap()
            }
        };
        assert_eq!(old_exit.code(), Some(0), "take-over {i}: old supervisor");
        assert_eventually!(
            Duration::from_secs(20),
            baton_testkit::proc_state(old_child).is_none(),
            "take-over {i}: old child {old_child} still there"
        );
        current = Some(next);
    }
    current.unwrap()
}

#[test]
fn a_new_supervisor_takes_over_under_load_and_a_failing_one_changes_nothing() {
    let fx = fixture();
    let args = [
        "--listen",
        "http=127.0.0.1:0",
        "--ready",
        "notify",
        "--drain-timeout",
        "10s",
        "--settle",
        "200ms",
    ];
    let command = ["python3", fx.to_str().unwrap()];
    let mut all = vec!["--takeover"];
    all.extend_from_slice(&args);
    let mut run = Run::start(&all, &command);
    // The supervisor answers with the library's typed status.
    let typed: baton::control::Status = serde_json::from_value(run.status()).unwrap();
    assert_eq!(typed.state, "active");
    assert_eq!(typed.listeners[0].name, "http");
    assert!(typed.extra.contains_key("supervisor_pid"));
    let addr = run.addr();
    let inode = baton_testkit::tcp_listen_inodes(addr.port());
    let load = Load::start(Target::Tcp(addr), 4, 4, Duration::from_secs(120));
    load.wait_for_progress(100, Duration::from_secs(10));

    let last = supervisor_takeovers(&mut run, 3, &args, &command);
    load.wait_for_progress(100, Duration::from_secs(10));
    assert_eq!(
        baton_testkit::tcp_listen_inodes(addr.port()),
        inode,
        "the same socket throughout"
    );

    // A new supervisor whose child fails: the running one and its child
    // are untouched; the new one exits 1 saying why.
    let status = run.status();
    let mut bad = deploy_supervisor(&run, "bad", &args, &["sh", "-c", "echo broken >&2; exit 3"]);
    assert_eventually!(
        Duration::from_secs(30),
        bad.first_exit().is_some(),
        "the failing supervisor is still running"
    );
    assert_eq!(
        bad.first_exit().unwrap().code(),
        Some(1),
        "{}",
        bad.stderr()
    );
    assert!(
        bad.stderr().contains("exited with status 3"),
        "{}",
        bad.stderr()
    );
    // The running supervisor records the failure a moment after the new
    // one has exited.
    assert_eventually!(
        Duration::from_secs(10),
        run.status()["last_takeover"]["ok"] == false,
        "no failed take-over in status"
    );
    let after = run.status();
    assert_eq!(after["supervisor_pid"], last.first_pid(), "{after}");
    assert_eq!(after["pid"], status["pid"], "{after}");
    load.wait_for_progress(100, Duration::from_secs(10));

    let report = load.stop();
    assert_no_loss(&report);
    assert!(
        report
            .bodies
            .iter()
            .any(|b| b.contains("python generation 4")),
        "the last child served: {:?}",
        report.bodies.iter().rev().take(3).collect::<Vec<_>>()
    );
}

#[test]
fn a_new_supervisor_takes_over_port_env_forwarding() {
    let www = TempDir::new("www-takeover");
    std::fs::write(www.join("index.html"), "hello from http.server\n").unwrap();
    let cmd = format!(
        "exec python3 -m http.server \"$PORT\" --bind 127.0.0.1 --directory {}",
        www.path().display()
    );
    let args = [
        "--listen",
        "web=127.0.0.1:0",
        "--port-env",
        "web=PORT",
        "--drain-timeout",
        "10s",
    ];
    let command = ["sh", "-c", cmd.as_str()];
    let mut all = vec!["--takeover"];
    all.extend_from_slice(&args);
    let mut run = Run::start(&all, &command);
    let load = Load::start(Target::Tcp(run.addr()), 2, 2, Duration::from_secs(120));
    load.wait_for_progress(100, Duration::from_secs(10));
    let _last = supervisor_takeovers(&mut run, 1, &args, &command);
    load.wait_for_progress(100, Duration::from_secs(10));
    let report = load.stop();
    assert_no_loss(&report);
}

#[test]
fn stop_and_start_through_a_service_managers_fd_store_refuse_no_connection() {
    baton_testkit::become_subreaper();
    let dir = TempDir::new("run-fd-store");
    let manager_py = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../baton/tests/process/fixtures/fd_store_manager.py");
    let notify = dir.join("notify.sock");
    let fifo = dir.fifo("commands");
    let control = dir.join("control.sock");
    let fx = fixture();
    let b = baton();
    let args = [
        manager_py.to_str().unwrap(),
        notify.to_str().unwrap(),
        fifo.to_str().unwrap(),
        "--",
        b.to_str().unwrap(),
        "run",
        "--listen",
        "http=127.0.0.1:0",
        "--ready",
        "notify",
        "--control-socket",
        control.to_str().unwrap(),
        "--drain-timeout",
        "5s",
        "--",
        "python3",
        fx.to_str().unwrap(),
    ];
    let mut manager = Server::spawn(Path::new("python3"), &args, &dir, &[("RUST_LOG", "info")]);
    let tell = |command: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        writeln!(f, "{command}").unwrap();
    };
    // READY=1 comes after the supervisor stored its sockets.
    manager.wait_event(Duration::from_secs(30), |e| e["what"] == "ready");
    let status =
        baton_testkit::control(&control, r#"{"command":"status"}"#, Duration::from_secs(10));
    manager.track(status["pid"].as_u64().unwrap() as u32);
    let addr: SocketAddr = status["listeners"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let inode = baton_testkit::tcp_listen_inodes(addr.port());
    let load = Load::start(Target::Tcp(addr), 0, 4, Duration::from_secs(120));
    let probe = baton_testkit::Prober::start(addr, 2, Duration::from_secs(120));
    load.wait_for_progress(100, Duration::from_secs(10));
    for round in 0..2 {
        tell("stop");
        let exited = manager.wait_event(Duration::from_secs(30), |e| e["what"] == "exited");
        assert_eq!(exited["status"], 0, "round {round}: {exited}");
        tell("start");
        let started = manager.wait_event(Duration::from_secs(30), |e| e["what"] == "started");
        assert_eq!(
            started["fds"],
            serde_json::json!(["http", "baton-control"]),
            "round {round}: {started}"
        );
        manager.wait_event(Duration::from_secs(30), |e| e["what"] == "ready");
        let status =
            baton_testkit::control(&control, r#"{"command":"status"}"#, Duration::from_secs(10));
        assert_eq!(status["supervisor_pid"], started["service_pid"], "{status}");
        manager.track(status["pid"].as_u64().unwrap() as u32);
        assert_eq!(
            status["listeners"][0]["address"],
            addr.to_string(),
            "{status}"
        );
        assert_eq!(
            baton_testkit::tcp_listen_inodes(addr.port()),
            inode,
            "round {round}"
        );
        load.wait_for_progress(100, Duration::from_secs(10));
    }
    let report = baton_testkit::assert_none_refused(load, probe);
    assert_no_loss(&report);
    tell("quit");
    manager.wait_event(Duration::from_secs(30), |e| e["what"] == "quit");
}

#[test]
fn admin_readyz_follows_the_supervisor() {
    let fx = fixture();
    let run = Run::start(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "notify",
            "--admin",
            "127.0.0.1:0",
            // Ignored by the child: a stop waits the drain timeout, which
            // leaves time to probe the stopping supervisor.
            "--stop-signal",
            "CONT",
            "--drain-timeout",
            "10s",
            "--settle",
            "200ms",
        ],
        &["python3", fx.to_str().unwrap()],
    );
    let admin: SocketAddr = run.status()["admin"].as_str().unwrap().parse().unwrap();
    let mut probe = std::net::TcpStream::connect(admin).unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let get = baton_testkit::http_get;
    assert_eq!(get(&mut probe, "/readyz"), (200, "ready\n".into(), false));
    assert_eq!(get(&mut probe, "/healthz").0, 200);
    // A reload keeps it ready, and counts.
    let a = run.reload();
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(get(&mut probe, "/readyz").0, 200);
    let (status, metrics, _) = get(&mut probe, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    for line in [
        "baton_generation 2",
        "baton_reloads_total{result=\"ok\"} 1",
        "baton_reloads_total{result=\"failed\"} 0",
        "baton_child_restarts_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    // A stop: 503 from the moment it begins.
    let sup = run.server.first_pid();
    baton_testkit::send_signal(sup, rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let (status, body, _) = get(&mut probe, "/readyz");
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!((status, body.as_str()), (503, "not ready: draining\n"));
}

/// The child's view of `TCP_NODELAY` on a connection it accepted from the
/// supervisor's socket (the fixture reports it in `X-Nodelay`).
fn child_nodelay(run: &Run) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(run.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("X-Nodelay: "))
        .unwrap_or_else(|| panic!("no X-Nodelay in {out}"))
        .trim()
        .to_owned()
}

#[test]
fn tcp_nodelay_is_on_for_the_child_unless_turned_off() {
    let fx = fixture();
    let args = ["--listen", "http=127.0.0.1:0", "--ready", "notify"];
    let on = Run::start(&args, &["python3", fx.to_str().unwrap()]);
    assert_eq!(
        child_nodelay(&on),
        "1",
        "inherited from the listening socket"
    );
    let mut off_args = args.to_vec();
    off_args.push("--no-delay=false");
    let off = Run::start(&off_args, &["python3", fx.to_str().unwrap()]);
    assert_eq!(child_nodelay(&off), "0");
}

/// `reloads` reloads under load from 4 keep-alive and 4 new-connection
/// clients; returns what they saw and the pids of every child.
fn reloads_under_load(run: &Run, reloads: u64) -> (LoadReport, Vec<u32>) {
    let load = Load::start(Target::Tcp(run.addr()), 4, 4, Duration::from_secs(120));
    load.wait_for_progress(100, Duration::from_secs(10));
    let mut pids = vec![run.status()["pid"].as_u64().unwrap() as u32];
    let first = run.status()["generation"].as_u64().unwrap();
    for i in 0..reloads {
        let a = run.reload();
        assert_eq!(a["ok"], true, "reload {i}: {a}");
        assert_eq!(a["generation"], first + i + 1, "{a}");
        let pid = a["pid"].as_u64().unwrap() as u32;
        assert!(!pids.contains(&pid), "reload {i} reused pid {pid}");
        pids.push(pid);
        load.wait_for_progress(50, Duration::from_secs(10));
    }
    (load.stop(), pids)
}

/// The child shuts down as uvicorn does: at SIGTERM it closes every idle
/// keep-alive connection at once, while clients send on them. Behind
/// `--http` the clients' connections are the supervisor's, and a child is
/// stopped only once nothing forwarded to it is in flight: twenty reloads,
/// not one failed request and not one keep-alive connection closed.
#[test]
fn http_mode_loses_nothing_when_the_child_closes_idle_connections_at_shutdown() {
    let fx = fixture();
    let run = Run::start(
        &[
            "--http",
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "notify",
            "--drain-timeout",
            "10s",
            "--settle",
            "100ms",
        ],
        &["python3", fx.to_str().unwrap(), "--close-idle"],
    );
    let (report, pids) = reloads_under_load(&run, 20);
    assert_no_loss(&report);
    assert_eq!(
        report.keepalive_connects, 4,
        "a keep-alive client had to reconnect: {report:?}"
    );
    assert!(
        report
            .bodies
            .iter()
            .any(|b| b.contains("python generation 21")),
        "the last child served: {:?}",
        report.bodies.iter().rev().take(3).collect::<Vec<_>>()
    );
    assert!(
        report
            .bodies
            .iter()
            .any(|b| b.contains("python generation 1 ")),
        "the first child served"
    );
    old_children_gone(&pids);
    // The child served its own socket, not the public one.
    let status = run.status();
    let public: SocketAddr = status["listeners"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let backend: SocketAddr = status["backends"]["http"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(public, backend, "{status}");
    assert!(backend.ip().is_loopback(), "{status}");
}

/// The negative control of the test above: the same child and load without
/// `--http` lose requests (the child's own shutdown cuts its idle
/// keep-alive connections; no fd hand-off can prevent that).
#[test]
fn without_http_mode_that_child_loses_keepalive_requests() {
    let fx = fixture();
    let run = Run::start(
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "notify",
            "--drain-timeout",
            "10s",
            "--settle",
            "100ms",
        ],
        &["python3", fx.to_str().unwrap(), "--close-idle"],
    );
    let (report, _) = reloads_under_load(&run, 20);
    assert!(
        report.failed > 0,
        "the child's shutdown cut no request: is --close-idle still rude? {report:?}"
    );
    eprintln!(
        "without --http: {} of {} requests failed over 20 reloads",
        report.failed,
        report.failed + report.ok
    );
}

/// `--http` with a child that binds its own `--port-env` port.
#[test]
fn http_mode_forwards_to_a_port_env_child() {
    let fx = fixture();
    let run = Run::start(
        &[
            "--http",
            "--listen",
            "web=127.0.0.1:0",
            "--port-env",
            "web=PORT",
            "--ready",
            "notify",
            "--drain-timeout",
            "10s",
            "--settle",
            "100ms",
        ],
        &[
            "python3",
            fx.to_str().unwrap(),
            "--close-idle",
            "--port-env",
            "PORT",
        ],
    );
    let (report, _) = reloads_under_load(&run, 5);
    assert_no_loss(&report);
    assert_eq!(report.keepalive_connects, 4, "{report:?}");
    assert!(
        report
            .bodies
            .iter()
            .any(|b| b.contains("python generation 6")),
        "{:?}",
        report.bodies
    );
}

/// Behind `--http`, a request sent while the child is dead waits for its
/// replacement on the same client connection instead of failing.
#[test]
fn http_mode_requests_wait_for_a_crashed_childs_replacement() {
    let fx = fixture();
    let run = Run::start(
        &[
            "--http",
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "notify",
            "--restart-on-crash",
        ],
        &["python3", fx.to_str().unwrap()],
    );
    let mut c = std::net::TcpStream::connect(run.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (status, body, close) = baton_testkit::http_get(&mut c, "/");
    assert_eq!((status, close), (200, false), "{body}");
    assert!(body.starts_with("python generation 1 "), "{body}");
    let victim = run.status()["pid"].as_u64().unwrap() as u32;
    baton_testkit::send_signal(victim, rustix::process::Signal::KILL);
    assert_eventually!(
        Duration::from_secs(10),
        baton_testkit::proc_state(victim).is_none(),
        "the killed child is still there"
    );
    // Sent while the replacement may still be starting: it waits for it.
    let (status, body, close) = baton_testkit::http_get(&mut c, "/");
    assert_eq!((status, close), (200, false), "{body}");
    assert!(body.starts_with("python generation 2 "), "{body}");
    let s = run.status();
    run.server.track(s["pid"].as_u64().unwrap() as u32);
    assert_eq!(s["restarts"], 1, "{s}");
}

/// A supervisor with `--http` taken over twice under load: the old one
/// winds its clients down (`Connection: close` on their next response)
/// before it stops its child, so nothing fails.
#[test]
fn a_new_supervisor_takes_over_http_mode() {
    let fx = fixture();
    let args = [
        "--http",
        "--listen",
        "http=127.0.0.1:0",
        "--ready",
        "notify",
        "--drain-timeout",
        "10s",
    ];
    let command = ["python3", fx.to_str().unwrap(), "--close-idle"];
    let mut all = vec!["--takeover"];
    all.extend_from_slice(&args);
    let mut run = Run::start(&all, &command);
    let load = Load::start(Target::Tcp(run.addr()), 4, 4, Duration::from_secs(120));
    load.wait_for_progress(100, Duration::from_secs(10));
    let _last = supervisor_takeovers(&mut run, 2, &args, &command);
    load.wait_for_progress(100, Duration::from_secs(10));
    let report = load.stop();
    assert_no_loss(&report);
    assert!(
        report
            .bodies
            .iter()
            .any(|b| b.contains("python generation 3")),
        "{:?}",
        report.bodies
    );
}

/// Whether python3 can import `module` (a pip package `.ci/run` installs).
fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A real third-party server, uvicorn with `--fd 3`, behind `--http`: ten
/// reloads under load, zero failed requests, no keep-alive client
/// reconnected. (uvicorn closes idle keep-alive connections at SIGTERM.)
#[test]
fn uvicorn_behind_http_mode_reloads_without_a_failed_request() {
    if !python_has("uvicorn") {
        eprintln!("SKIPPED: uvicorn is not installed (pip install uvicorn; .ci/run does)");
        return;
    }
    let fixtures = fixture().parent().unwrap().to_path_buf();
    let run = Run::start(
        &[
            "--http",
            "--listen",
            "http=127.0.0.1:0",
            "--drain-timeout",
            "10s",
            "--settle",
            "200ms",
        ],
        &[
            "python3",
            "-m",
            "uvicorn",
            "--fd",
            "3",
            "--app-dir",
            fixtures.to_str().unwrap(),
            "--no-access-log",
            "asgi_app:app",
        ],
    );
    let (report, pids) = reloads_under_load(&run, 10);
    assert_no_loss(&report);
    assert_eq!(report.keepalive_connects, 4, "{report:?}");
    assert!(
        report
            .bodies
            .iter()
            .any(|b| b.contains("uvicorn generation 11")),
        "{:?}",
        report.bodies.iter().rev().take(3).collect::<Vec<_>>()
    );
    old_children_gone(&pids);
}

/// A supervisor that takes over goes on counting where the previous one
/// stopped: `baton_reloads_total` and `baton_child_restarts_total` on the
/// admin socket it took over.
#[test]
fn a_supervisor_taking_over_carries_the_counters_on() {
    let fx = fixture();
    let args = [
        "--listen",
        "http=127.0.0.1:0",
        "--ready",
        "notify",
        "--admin",
        "127.0.0.1:0",
        "--restart-on-crash",
        "--settle",
        "100ms",
    ];
    let command = ["python3", fx.to_str().unwrap()];
    let mut all = vec!["--takeover"];
    all.extend_from_slice(&args);
    let mut run = Run::start(&all, &command);
    assert_eq!(run.reload()["ok"], true);
    // One crash restart.
    let victim = run.status()["pid"].as_u64().unwrap() as u32;
    baton_testkit::send_signal(victim, rustix::process::Signal::KILL);
    assert_eventually!(
        Duration::from_secs(10),
        run.status()["restarts"] == 1,
        "no crash restart"
    );
    let admin: SocketAddr = run.status()["admin"].as_str().unwrap().parse().unwrap();
    let _last = supervisor_takeovers(&mut run, 1, &args, &command);
    let mut c = std::net::TcpStream::connect(admin).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (status, metrics, _) = baton_testkit::http_get(&mut c, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    for line in [
        "baton_reloads_total{result=\"ok\"} 1",
        "baton_child_restarts_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    assert_eq!(run.status()["restarts"], 1, "{}", run.status());
}
