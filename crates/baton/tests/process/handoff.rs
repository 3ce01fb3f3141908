//! The main guarantee: twenty upgrades under load from both client kinds,
//! not one failed request, every old generation gone, nothing leaked.

use std::time::Duration;

use baton_testkit::{assert_eventually, fd_count, fd_list, our_zombies, Load, Target};

use crate::Running;

#[test]
fn twenty_upgrades_under_load_lose_no_request() {
    let mut r = Running::start("hello", &["--drain-timeout", "10s"]);
    let first = r.pid();
    let fds_at_start = fd_count(first);
    let fd_list_at_start = fd_list(first);

    let load = Load::start(Target::Tcp(r.addr()), 4, 4, Duration::from_secs(120));
    load.wait_for_progress(200, Duration::from_secs(10));

    let mut pids = vec![first];
    for i in 0..20u64 {
        let generation = i + 1;
        let answer = r.upgrade(r#"{"command":"upgrade"}"#);
        assert_eq!(answer["ok"], true, "upgrade {i}: {answer}");
        let pid = answer["pid"].as_u64().unwrap() as u32;
        assert!(!pids.contains(&pid), "upgrade {i} reused pid {pid}");
        assert_eq!(
            answer["generation"],
            generation + 1,
            "upgrade {i}: {answer}"
        );
        pids.push(pid);
        assert_eq!(r.pid_file_pid(), pid, "pid file names the new generation");
        // Let traffic flow on the new generation before the next upgrade.
        load.wait_for_progress(100, Duration::from_secs(10));
    }
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "failed requests: {:?} (ok: {})",
        report.failures, report.ok
    );
    assert!(
        report.ok > 2000,
        "load too small to mean anything: {}",
        report.ok
    );
    // Keep-alive connections moved from generation to generation: not one
    // keep-alive client had to reconnect.
    assert_eq!(report.keepalive_connects, 4, "{report:?}");
    let last = *pids.last().unwrap();
    assert!(
        report
            .bodies
            .iter()
            .any(|b| b.contains(&format!("generation 21 pid {last}"))),
        "the last generation served requests: {:?}",
        report.bodies.iter().rev().take(3).collect::<Vec<_>>()
    );

    // Every old generation exits (idle grace is 1 s, drain bounded by 10 s).
    for &pid in &pids[..pids.len() - 1] {
        assert_eventually!(
            Duration::from_secs(15),
            r.server.is_gone(pid),
            "generation pid {pid} still running"
        );
    }
    assert!(!r.server.is_gone(last));
    assert_eq!(our_zombies(), Vec::<u32>::new(), "zombies left");
    // The surviving process holds no more fds than the first one did.
    assert_eventually!(
        Duration::from_secs(5),
        fd_count(last) <= fds_at_start,
        "fd count grew: first generation had {fds_at_start} {fd_list_at_start:?}, last has {} {:?}",
        fd_count(last),
        fd_list(last)
    );
}

#[test]
fn sigusr2_upgrades_and_sigterm_stops_cleanly() {
    let mut r = Running::start("hello", &["--drain-timeout", "5s"]);
    let first = r.pid();
    let load = Load::start(Target::Tcp(r.addr()), 2, 2, Duration::from_secs(60));
    load.wait_for_progress(50, Duration::from_secs(10));

    baton_testkit::send_signal(first, rustix::process::Signal::USR2);
    let ready = r
        .server
        .wait_event(Duration::from_secs(30), |e| e["event"] == "ready");
    assert_eq!(ready["generation"], 2, "{ready}");
    let second = ready["pid"].as_u64().unwrap() as u32;
    assert_eventually!(
        Duration::from_secs(10),
        r.pid_file_pid() == second,
        "pid file not updated"
    );
    load.wait_for_progress(50, Duration::from_secs(10));

    // SIGHUP reloads in-process (hello's reload handler accepts).
    baton_testkit::send_signal(second, rustix::process::Signal::HUP);
    assert_eventually!(
        Duration::from_secs(10),
        r.control(r#"{"command":"status"}"#)["last_reload"]["ok"] == true,
        "SIGHUP did not reload"
    );
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.failures);

    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(first),
        "first generation still running"
    );
    assert_eq!(
        r.server.first_exit().map(|s| s.code()),
        Some(Some(0)),
        "old generation exits 0"
    );

    baton_testkit::send_signal(second, rustix::process::Signal::TERM);
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(second),
        "SIGTERM did not stop"
    );
    assert!(
        !r.pid_file.exists(),
        "the last generation removes its pid file"
    );
    assert!(
        !r.control.exists(),
        "the last generation removes its control socket"
    );
}
