//! Take-over by a process that someone else started (a deploy script, a
//! service manager): it asks the running generation's control socket for
//! its sockets. Nothing is lost, the socket is the very same one, and a
//! take-over that fails leaves the running generation serving.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use baton_testkit::{
    assert_eventually, example, our_zombies, proc_ppid, tcp_listen_inodes, Load, Server, Target,
};
use serde_json::Value;

use crate::Running;

/// Starts `program` the way a deploy script would: through a shell, as a
/// child of the test, not of any generation; same command line as the
/// first, plus `--takeover` and `extra`.
fn deploy(r: &Running, program: &Path, tag: &str, extra: &[&str]) -> Server {
    deploy_as(r, program, tag, extra, |_| {})
}

fn deploy_as(
    r: &Running,
    program: &Path,
    tag: &str,
    extra: &[&str],
    setup: impl FnOnce(&mut std::process::Command),
) -> Server {
    let mut args = vec![
        "-c",
        r#"exec "$0" "$@""#,
        program.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--control-socket",
        r.control.to_str().unwrap(),
        "--pid-file",
        r.pid_file.to_str().unwrap(),
        "--takeover",
    ];
    args.extend_from_slice(extra);
    Server::spawn_logged(Path::new("/bin/sh"), &args, &r.dir, &[], tag, setup)
}

/// Waits (bounded) for a deployed process to exit and returns its status.
fn exit_of(s: &mut Server, within: Duration) -> std::process::ExitStatus {
    assert_eventually!(within, s.first_exit().is_some(), "still running");
    s.first_exit().unwrap()
}

/// The running generation's record of the last take-over attempt, once it
/// has one newer than `seen` (it learns of a failure a moment after the new
/// process exits).
fn last_upgrade(r: &Running, seen: &mut Value) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let up = r.control(r#"{"command":"status"}"#)["last_upgrade"].clone();
        if !up.is_null() && up != *seen {
            *seen = up.clone();
            return up;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new take-over outcome in status: {up}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `count` take-overs in a row under `load`; returns the active server.
fn take_over_n(
    r: &mut Running,
    mut current: Option<Server>,
    first_generation: u64,
    count: u64,
    load: &Load,
    phase: &str,
) -> Server {
    let hello = example("hello");
    let port = r.addr().port();
    let inode = tcp_listen_inodes(port);
    assert_eq!(inode.len(), 1, "one listening socket: {inode:?}");
    for i in 0..count {
        let generation = first_generation + i + 1;
        let old_pid = match &current {
            Some(s) => s.first_pid(),
            None => r.pid(),
        };
        let mut next = deploy(r, &hello, &format!("{phase}-{i}"), &["--settle", "300ms"]);
        let ready = next.next_event(Duration::from_secs(30));
        assert_eq!(ready["event"], "ready", "{phase} {i}: {ready}");
        assert_eq!(ready["generation"], generation, "{phase} {i}: {ready}");
        let pid = ready["pid"].as_u64().unwrap() as u32;
        assert_eq!(pid, next.first_pid());
        assert_eq!(
            proc_ppid(pid),
            Some(std::process::id()),
            "not a child of the running generation"
        );
        assert_eq!(r.pid_file_pid(), pid, "{phase} {i}: pid file");
        assert_eq!(
            tcp_listen_inodes(port),
            inode,
            "{phase} {i}: the very same listening socket, and no other"
        );
        load.wait_for_progress(50, Duration::from_secs(10));
        // The old generation drains and exits on its own, status 0.
        let old_status = match current.as_mut() {
            Some(s) => exit_of(s, Duration::from_secs(15)),
            None => {
                assert_eventually!(
                    Duration::from_secs(15),
                    r.server.is_gone(old_pid),
                    "{phase} {i}: generation 1 still running"
                );
                r.server.first_exit().unwrap()
            }
        };
        assert_eq!(old_status.code(), Some(0), "{phase} {i}: old generation");
        current = Some(next);
    }
    current.unwrap()
}

#[test]
fn sixteen_takeovers_by_deployed_processes_lose_no_request() {
    let mut r = Running::start(
        "hello",
        &["--takeover", "--settle", "300ms", "--drain-timeout", "5s"],
    );
    assert_eq!(
        r.ready["generation"], 1,
        "nothing to take over: first start"
    );

    // Eight under new-connection load.
    let load = Load::start(Target::Tcp(r.addr()), 0, 4, Duration::from_secs(120));
    load.wait_for_progress(100, Duration::from_secs(10));
    let current = take_over_n(&mut r, None, 1, 8, &load, "close");
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "new-connection load: {:?}",
        report.failures
    );
    assert!(report.ok > 400, "load too small: {}", report.ok);

    // Eight more under keep-alive load.
    let load = Load::start(Target::Tcp(r.addr()), 4, 0, Duration::from_secs(120));
    load.wait_for_progress(100, Duration::from_secs(10));
    let current = take_over_n(&mut r, Some(current), 9, 8, &load, "keepalive");
    let report = load.stop();
    assert_eq!(report.failed, 0, "keep-alive load: {:?}", report.failures);
    assert!(report.ok > 400, "load too small: {}", report.ok);
    assert!(
        report
            .bodies
            .iter()
            .any(|b| b.contains(&format!("generation 17 pid {}", current.first_pid()))),
        "the last generation served: {:?}",
        report.bodies.iter().rev().take(3).collect::<Vec<_>>()
    );
    let status = r.control(r#"{"command":"status"}"#);
    assert_eq!(status["generation"], 17, "{status}");
    assert_eq!(our_zombies(), Vec::<u32>::new(), "zombies left");
}

#[test]
fn failed_takeovers_leave_the_running_generation_serving() {
    let mut r = Running::start(
        "hello",
        &["--takeover", "--upgrade-timeout", "2s", "--settle", "300ms"],
    );
    let first = r.pid();
    let hello = example("hello");
    let port = r.addr().port();
    let inode = tcp_listen_inodes(port);
    let load = Load::start(Target::Tcp(r.addr()), 2, 2, Duration::from_secs(90));
    load.wait_for_progress(100, Duration::from_secs(10));
    let mut seen = Value::Null;

    // 1. It exits before ready.
    let mut crash = deploy(&r, &hello, "crash", &["--fail-startup"]);
    let status = exit_of(&mut crash, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", crash.stderr());
    assert!(
        crash.stderr().contains("--fail-startup given"),
        "{}",
        crash.stderr()
    );
    let up = last_upgrade(&r, &mut seen);
    assert_eq!(up["ok"], false, "{up}");
    assert_eq!(up["kind"], "take-over", "{up}");
    assert!(
        up["error"]
            .as_str()
            .unwrap()
            .contains("exited before it was ready"),
        "{up}"
    );
    load.wait_for_progress(100, Duration::from_secs(10));

    // 2. It hangs past the upgrade timeout: the running generation gives
    //    up, and the new process exits non-zero saying why.
    let mut hang = deploy(&r, &hello, "hang", &["--startup-delay", "1h"]);
    let status = exit_of(&mut hang, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", hang.stderr());
    assert!(
        hang.stderr().contains("not ready within 2s"),
        "the reason is on its stderr: {}",
        hang.stderr()
    );
    let up = last_upgrade(&r, &mut seen);
    assert!(
        up["error"]
            .as_str()
            .unwrap()
            .contains("not ready within 2s"),
        "{up}"
    );
    load.wait_for_progress(100, Duration::from_secs(10));

    // 3. It reports an error.
    let mut report = deploy(&r, &hello, "report", &["--report-error", "no database"]);
    let status = exit_of(&mut report, Duration::from_secs(20));
    assert_ne!(status.code(), Some(0));
    let up = last_upgrade(&r, &mut seen);
    assert!(
        up["error"].as_str().unwrap().contains("no database"),
        "{up}"
    );

    // 4. Another uid (when the tests run as root): the socket is opened to
    //    everyone here so that the server's own check (SO_PEERCRED) is what
    //    refuses it.
    if rustix::process::getuid().is_root() {
        let dir_mode = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(r.dir.path(), dir_mode.clone()).unwrap();
        std::fs::set_permissions(&r.control, std::fs::Permissions::from_mode(0o666)).unwrap();
        let copy = r.dir.join("hello-copy");
        std::fs::copy(&hello, &copy).unwrap();
        std::fs::set_permissions(&copy, dir_mode).unwrap();
        let mut other = deploy_as(&r, &copy, "other-uid", &[], |cmd| {
            use std::os::unix::process::CommandExt;
            cmd.uid(65534).gid(65534);
        });
        let status = exit_of(&mut other, Duration::from_secs(20));
        assert_ne!(status.code(), Some(0), "{}", other.stderr());
        assert!(
            other.stderr().contains("permission denied: uid 65534"),
            "{}",
            other.stderr()
        );
        assert!(
            !other.stderr().contains("listener"),
            "it bound nothing: {}",
            other.stderr()
        );
    } else {
        eprintln!("not root: the other-uid take-over is not tried");
    }

    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert_eq!(
        r.pid_file_pid(),
        first,
        "the pid file still names the first"
    );
    assert_eq!(tcp_listen_inodes(port), inode, "the same socket throughout");
    let status = r.control(r#"{"command":"status"}"#);
    assert_eq!(status["state"], "active", "{status}");
    assert_eq!(status["pid"], first, "{status}");
    assert!(!r.server.is_gone(first));

    // And a good one still takes over afterwards.
    let mut good = deploy(&r, &hello, "good", &[]);
    let ready = good.next_event(Duration::from_secs(30));
    assert_eq!(ready["generation"], 2, "{ready}");
    assert_eventually!(
        Duration::from_secs(15),
        r.server.is_gone(first),
        "the old generation exits"
    );
}

#[test]
fn takeover_starts_alone_when_nothing_answers_and_fails_when_something_is_wedged() {
    baton_testkit::become_subreaper();
    let dir = baton_testkit::TempDir::new("takeover-alone");
    let hello = example("hello");
    let control = dir.join("control.sock");

    // A stale socket file: nobody accepts, so it starts on its own.
    drop(std::os::unix::net::UnixListener::bind(&control).unwrap());
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--control-socket",
        control.to_str().unwrap(),
        "--takeover",
        "--upgrade-timeout",
        "1s",
    ];
    let (mut alone, ready) = Server::start(&hello, &args, &dir);
    assert_eq!(ready["generation"], 1, "{ready}");
    let pid = alone.first_pid();
    let status =
        baton_testkit::control(&control, r#"{"command":"status"}"#, Duration::from_secs(10));
    assert_eq!(status["pid"], pid, "{status}");
    baton_testkit::send_signal(pid, rustix::process::Signal::TERM);
    assert_eventually!(Duration::from_secs(10), alone.is_gone(pid), "did not stop");

    // Something listens but never answers: the take-over times out, the
    // process exits non-zero and never binds.
    let wedged = std::os::unix::net::UnixListener::bind(&control).unwrap();
    let mut stuck = Server::spawn_logged(&hello, &args, &dir, &[], "stuck", |_| {});
    assert_eventually!(
        Duration::from_secs(20),
        stuck.first_exit().is_some(),
        "a wedged control socket held it"
    );
    let status = stuck.first_exit().unwrap();
    assert_ne!(status.code(), Some(0));
    let stderr = stuck.stderr();
    assert!(stderr.contains("no answer within 1s"), "{stderr}");
    assert!(!stderr.contains("listener"), "it bound nothing: {stderr}");
    drop(wedged);
}
