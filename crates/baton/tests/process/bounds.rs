//! Every read from a peer is bounded: a new generation that floods the
//! handshake, and control clients that send too much, too little, or bytes
//! that are not UTF-8, cost the serving generation neither memory nor a task,
//! and it keeps serving.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_testkit::{Load, Target};
use serde_json::Value;

use crate::Running;

/// Resident memory of `pid` in KiB (`VmRSS` in /proc/PID/status).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn vm_rss_kib(pid: u32) -> u64 {
    rss_kib(pid).unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// Samples `pid`'s RSS every few milliseconds until dropped; keeps the peak.
struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn watch(pid: u32) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(vm_rss_kib(pid)));
        let (s, p) = (stop.clone(), peak.clone());
        let deadline = Instant::now() + Duration::from_secs(120);
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Some(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        PeakRss {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

const MAX_GROWTH_KIB: u64 = 20 * 1024;

#[test]
fn an_endless_handshake_line_fails_the_upgrade_without_growing_the_server() {
    let r = Running::start("hello", &["--upgrade-timeout", "3s"]);
    let pid = r.pid();
    // A new "binary" that writes on the handshake fd forever, never a newline.
    let py = r.dir.join("flood.py");
    std::fs::write(
        &py,
        "import os\nfd = int(os.environ['BATON_HANDSHAKE_FD'])\nchunk = b'x' * 65536\nwhile True:\n    os.write(fd, chunk)\n",
    )
    .unwrap();
    let flood = r
        .dir
        .script("flood", &format!("exec python3 {}", py.display()));

    let load = Load::start(Target::Tcp(r.addr()), 2, 2, Duration::from_secs(60));
    load.wait_for_progress(100, Duration::from_secs(10));
    let before = vm_rss_kib(pid);
    let peak = PeakRss::watch(pid);
    let started = Instant::now();
    let a = r.upgrade(&format!(
        r#"{{"command":"upgrade","binary":"{}"}}"#,
        flood.display()
    ));
    let took = started.elapsed();
    let peak = peak.peak();
    assert!(
        peak < before + MAX_GROWTH_KIB,
        "the serving generation grew from {before} KiB to {peak} KiB"
    );
    assert_eq!(a["ok"], false, "{a}");
    let err = a["error"].as_str().unwrap();
    assert!(
        err.contains("sent a bad handshake message: line longer than 65536 bytes"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(3),
        "refused at once, not at the timeout: {took:?}"
    );
    load.wait_for_progress(100, Duration::from_secs(10));
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?} (ok {})", report.failures, report.ok);
    let status = r.control(r#"{"command":"status"}"#);
    assert_eq!(
        (status["pid"].as_u64(), status["state"].as_str()),
        (Some(pid as u64), Some("active")),
        "{status}"
    );
}

fn connect(r: &Running) -> UnixStream {
    let s = UnixStream::connect(&r.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn read_answer(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}

#[test]
fn a_control_client_that_sends_part_of_a_line_or_nothing_is_disconnected() {
    let r = Running::start("hello", &[]);
    let mut partial = connect(&r);
    let silent = connect(&r);
    let started = Instant::now();
    partial.write_all(br#"{"command":"sta"#).unwrap();

    let mut reader = BufReader::new(partial);
    let a = read_answer(&mut reader);
    let took = started.elapsed();
    assert_eq!(a["ok"], false, "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("bad request: no complete line within 10s"),
        "{a}"
    );
    assert!(took >= Duration::from_secs(9), "cut off early: {took:?}");
    // Closed after the answer (a reset, since our unread bytes are dropped).
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(n) => assert_eq!(n, 0, "closed after the answer"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    let n = reader.read_to_end(&mut rest).unwrap();
    assert_eq!(n, 0, "closed after the answer: {rest:?}");

    // The silent one is closed without a word.
    let mut silent = silent;
    // Closed after the answer (a reset, since our unread bytes are dropped).
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(n) => assert_eq!(n, 0, "closed after the answer"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(r.control(r#"{"command":"status"}"#)["state"], "active");
}

#[test]
fn a_control_line_of_a_mebibyte_is_refused_and_costs_no_memory() {
    let r = Running::start("hello", &[]);
    let pid = r.pid();
    let before = vm_rss_kib(pid);
    let peak = PeakRss::watch(pid);
    let s = connect(&r);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        // The server stops reading at 64 KiB and closes: the rest fails.
        let _ = w.write_all(&vec![b'x'; 1024 * 1024]);
    });
    let mut reader = BufReader::new(s);
    let a = read_answer(&mut reader);
    assert_eq!(a["ok"], false, "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("bad request: line longer than 65536 bytes"),
        "{a}"
    );
    // Closed after the answer (a reset, since our unread bytes are dropped).
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(n) => assert_eq!(n, 0, "closed after the answer"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    writer.join().unwrap();
    let peak = peak.peak();
    assert!(
        peak < before + MAX_GROWTH_KIB,
        "the server grew from {before} KiB to {peak} KiB"
    );
    assert_eq!(r.control(r#"{"command":"status"}"#)["state"], "active");
}

#[test]
fn a_control_line_that_is_not_utf8_is_answered_and_the_connection_stays_usable() {
    let r = Running::start("hello", &[]);
    let mut s = connect(&r);
    s.write_all(b"{\"command\":\"st\xffatus\"}\n").unwrap();
    s.write_all(b"{\"command\":\"status\"}\n").unwrap();
    let mut reader = BufReader::new(s);
    let a = read_answer(&mut reader);
    assert_eq!(a["ok"], false, "{a}");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .starts_with("bad request: not UTF-8"),
        "{a}"
    );
    let a = read_answer(&mut reader);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["state"], "active", "{a}");
}
