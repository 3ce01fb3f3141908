//! A new generation that fails: the old one keeps serving, nothing is lost,
//! and the control answer says why.

use std::time::Duration;

use baton_testkit::{
    assert_eventually, fd_count, our_zombies, proc_state, socket_inodes, tcp_listen_inode, Load,
    Target,
};

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

/// Every process holding the socket with inode `inode` open.
fn holders_of(inode: u64) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
            if socket_inodes(pid).contains(&inode) {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn a_setsid_grandchild_of_a_failed_upgrade_is_killed_and_nothing_leaks() {
    let r = Running::start("hello", &["--upgrade-timeout", "2s"]);
    let pid = r.pid();
    let listening = tcp_listen_inode(r.addr().port()).expect("listening socket inode");
    let control = r.control.clone();
    let control_inode = {
        // The control socket's listening inode: the one of ours that is
        // neither the TCP listener nor a connection (hello has no others).
        let mut s = socket_inodes(pid);
        s.remove(&listening);
        s
    };
    // The new "binary" starts a grandchild in its own session (new session,
    // new process group) that keeps every inherited fd: the listening and
    // control sockets, the handshake, the stderr capture pipe. It waits
    // until the grandchild is running, then exits 1 or hangs.
    let gc = r.dir.join("gc");
    std::fs::create_dir_all(&gc).unwrap();
    let start_gc = format!(
        "setsid sh -c 'echo $$ > {gc}/$$.tmp; mv {gc}/$$.tmp {gc}/$$; exec sleep 1000' &\nwhile [ ! -e {gc}/$! ]; do sleep 0.01; done",
        gc = gc.display()
    );
    let exits = r.dir.script("escape-exit", &format!("{start_gc}\nexit 1"));
    let hangs = r
        .dir
        .script("escape-hang", &format!("{start_gc}\nexec sleep 1000"));
    let fds_before = fd_count(pid);

    for (i, binary) in [&exits, &hangs, &exits, &hangs, &exits].iter().enumerate() {
        let a = r.upgrade(&format!(
            r#"{{"command":"upgrade","binary":"{}"}}"#,
            binary.display()
        ));
        assert_eq!(a["ok"], false, "attempt {i}: {a}");
        let err = a["error"].as_str().unwrap();
        assert!(
            err.contains("exited with status 1") || err.contains("not ready within 2s"),
            "attempt {i}: {err}"
        );
        if let Some(child) = pid_in(err) {
            r.server.track(child);
        }
        // The answer comes after the rollback: the grandchild is gone
        // already (killed and reaped), and only the serving generation
        // holds the listening socket.
        let grandchildren: Vec<u32> = std::fs::read_dir(&gc)
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".tmp"))
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            grandchildren.len(),
            i + 1,
            "attempt {i}: grandchild not started"
        );
        for &g in &grandchildren {
            r.server.track(g);
            assert_eq!(
                proc_state(g),
                None,
                "attempt {i}: grandchild {g} still there"
            );
        }
        assert_eq!(
            holders_of(listening),
            vec![pid],
            "attempt {i}: listening socket holders"
        );
        for &c in &control_inode {
            assert_eq!(
                holders_of(c),
                vec![pid],
                "attempt {i}: control socket holders"
            );
        }
    }
    // Not one fd more than before the five attempts (the control connection
    // of the last answer closes on its own).
    assert_eventually!(
        Duration::from_secs(5),
        fd_count(pid) == fds_before,
        "fd count went from {fds_before} to {}",
        fd_count(pid)
    );
    let status =
        baton_testkit::control(&control, r#"{"command":"status"}"#, Duration::from_secs(10));
    assert_eq!(
        (status["pid"].as_u64(), status["state"].as_str()),
        (Some(pid as u64), Some("active")),
        "{status}"
    );
    assert_eq!(our_zombies(), Vec::<u32>::new());
}
