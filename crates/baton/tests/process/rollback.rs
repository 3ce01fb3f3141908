//! A new generation that fails: the old one keeps serving, nothing is lost,
//! and the control answer says why.

use std::time::Duration;

use baton_testkit::{assert_eventually, Load, Target};

use crate::Running;

fn pid_in(error: &str) -> Option<u32> {
    let rest = error.split("(pid ").nth(1)?;
    rest.split(')').next()?.parse().ok()
}

#[test]
fn failed_upgrades_roll_back_and_keep_serving() {
    let mut r = Running::start(
        "hello",
        &["--upgrade-timeout", "2s", "--drain-timeout", "5s"],
    );
    let first = r.pid();
    let hello = baton_testkit::example("hello");
    // Same binary, told to misbehave: the upgrade keeps our arguments and
    // these scripts append one.
    let crash = r.dir.script(
        "crash",
        &format!("exec {} \"$@\" --fail-startup", hello.display()),
    );
    let hang = r.dir.script(
        "hang",
        &format!("exec {} \"$@\" --startup-delay 1h", hello.display()),
    );
    let missing = r.dir.join("no-such-binary");

    let load = Load::start(Target::Tcp(r.addr()), 3, 3, Duration::from_secs(90));
    load.wait_for_progress(100, Duration::from_secs(10));

    // 1. Exits before ready: exit status and stderr tail in the answer.
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        crash.display()
    ));
    assert_eq!(a["ok"], false, "{a}");
    let err = a["error"].as_str().unwrap();
    assert!(err.contains("exited with status 1"), "{err}");
    assert!(
        err.contains("--fail-startup given"),
        "stderr tail missing: {err}"
    );
    let crashed = pid_in(err).unwrap();
    r.server.track(crashed);
    assert_eventually!(
        Duration::from_secs(5),
        r.server.is_gone(crashed),
        "crashed child not reaped"
    );
    load.wait_for_progress(100, Duration::from_secs(10));

    // 2. Hangs past the upgrade timeout: killed, reaped.
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        hang.display()
    ));
    assert_eq!(a["ok"], false, "{a}");
    let err = a["error"].as_str().unwrap();
    assert!(err.contains("not ready within 2s"), "{err}");
    let hung = pid_in(err).unwrap();
    r.server.track(hung);
    assert_eventually!(
        Duration::from_secs(5),
        r.server.is_gone(hung),
        "hung child not killed"
    );
    load.wait_for_progress(100, Duration::from_secs(10));

    // 3. A path that does not exist.
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        missing.display()
    ));
    assert_eq!(a["ok"], false, "{a}");
    assert!(a["error"].as_str().unwrap().contains("No such file"), "{a}");

    // Still the same generation, still active, and able to upgrade for real.
    let status = r.control(r#"{"command":"status"}"#);
    assert_eq!(status["pid"], first, "{status}");
    assert_eq!(status["generation"], 1, "{status}");
    assert_eq!(status["state"], "active", "{status}");
    assert_eq!(r.pid_file_pid(), first);
    load.wait_for_progress(100, Duration::from_secs(10));
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["generation"], 2, "{a}");
    load.wait_for_progress(100, Duration::from_secs(10));

    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?} (ok {})", report.failures, report.ok);
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(first),
        "first generation did not exit"
    );
    assert_eq!(baton_testkit::our_zombies(), Vec::<u32>::new());
}

#[test]
fn a_second_concurrent_upgrade_is_refused() {
    let r = Running::start("hello", &["--upgrade-timeout", "20s"]);
    let hello = baton_testkit::example("hello");
    let slow = r.dir.script(
        "slow",
        &format!("exec {} \"$@\" --startup-delay 1500ms", hello.display()),
    );
    let control = r.control.clone();
    let request = format!(r#"{{"command":"upgrade","binary":"{}"}}"#, slow.display());
    let first = std::thread::spawn(move || {
        baton_testkit::control(&control, &request, Duration::from_secs(30))
    });
    assert_eventually!(
        Duration::from_secs(10),
        r.control(r#"{"command":"status"}"#)["upgrade_in_progress"] == true,
        "first upgrade never started"
    );
    let second = r.control(r#"{"command":"upgrade"}"#);
    assert_eq!(second["ok"], false, "{second}");
    assert!(
        second["error"]
            .as_str()
            .unwrap()
            .contains("already in progress"),
        "{second}"
    );
    let first = first.join().unwrap();
    assert_eq!(first["ok"], true, "{first}");
    r.server.track(first["pid"].as_u64().unwrap() as u32);
    assert_eq!(first["generation"], 2);
}

#[test]
fn an_error_reported_by_the_new_generation_is_in_the_answer() {
    let r = Running::start("hello", &[]);
    let hello = baton_testkit::example("hello");
    let failing = r.dir.script(
        "failing",
        &format!(
            "exec {} \"$@\" --report-error 'database unreachable'",
            hello.display()
        ),
    );
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        failing.display()
    ));
    assert_eq!(a["ok"], false, "{a}");
    let err = a["error"].as_str().unwrap();
    assert!(err.contains("failed: database unreachable"), "{err}");
    assert_eq!(r.control(r#"{"command":"status"}"#)["generation"], 1);
}

#[test]
fn the_binary_replaced_on_disk_is_what_the_upgrade_starts() {
    // Start from a copy, then replace the file (rename over it, as package
    // managers do). The upgrade must run the new file: here a wrapper that
    // refuses to start, which the answer reveals.
    let dir = baton_testkit::TempDir::new("replaced");
    let server = dir.join("server");
    std::fs::copy(baton_testkit::example("hello"), &server).unwrap();
    let mut r = crate::Running::start_program(&server, &[], dir);
    let replacement = r.dir.script(
        "server.new",
        &format!(
            "exec {} \"$@\" --fail-startup",
            baton_testkit::example("hello").display()
        ),
    );
    std::fs::rename(&replacement, &server).unwrap();
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], false, "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("--fail-startup given"),
        "{a}"
    );
    // Put a working binary back: the next upgrade succeeds from the same path.
    std::fs::copy(baton_testkit::example("hello"), r.dir.join("server.tmp")).unwrap();
    std::fs::rename(r.dir.join("server.tmp"), &server).unwrap();
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(r.pid()),
        "old generation did not exit"
    );
}
