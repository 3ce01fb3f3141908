//! End-to-end tests of the load generator against small servers on
//! 127.0.0.1 with ephemeral ports. Each test is bounded by [`LIMIT`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_bench::{
    BenchOptions, BenchResult, ErrorClass, Mode, Phase, Progress, RestartAction, RestartOutcome,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(20);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test exceeded its time limit")
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", l.local_addr().unwrap());
    (l, url)
}

fn options(url: &str, mode: Mode) -> BenchOptions {
    let mut o = BenchOptions::new(url);
    o.mode = mode;
    o.concurrency = 4;
    o.duration = Duration::from_millis(300);
    o.timeout = Duration::from_secs(2);
    o
}

async fn run(options: BenchOptions) -> (BenchResult, Vec<Progress>) {
    let mut seen = Vec::new();
    let result = bounded(baton_bench::run(options.validate().unwrap(), |p| {
        seen.push(*p)
    }))
    .await
    .unwrap();
    (result, seen)
}

/// Read one request head; `false` at EOF.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(buf.drain(..pos + 4).collect());
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A well-behaved HTTP/1.1 server. Every other response is chunked; with
/// `close_every = Some(k)` the k-th response on each connection carries
/// `Connection: close` and the connection is then closed.
fn spawn_ok_server(l: TcpListener, status: u16, close_every: Option<usize>) -> Arc<AtomicUsize> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut n = 0usize;
                while let Some(head) = read_head(&mut s, &mut buf).await {
                    n += 1;
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let client_close = head.contains("connection: close");
                    let server_close = close_every.is_some_and(|k| n % k == 0);
                    let conn = if server_close {
                        "Connection: close\r\n"
                    } else {
                        ""
                    };
                    let response = if n % 2 == 0 {
                        format!(
                            "HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n{conn}\r\n\
                             5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
                        )
                    } else {
                        format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\n{conn}\r\nok")
                    };
                    if s.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                    if client_close || server_close {
                        return;
                    }
                }
            });
        }
    });
    accepted
}

/// A server that reads each request and then does `misbehave` to the
/// connection.
fn spawn_bad_server<F, Fut>(l: TcpListener, misbehave: F)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let misbehave = Arc::new(misbehave);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let misbehave = Arc::clone(&misbehave);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if read_head(&mut s, &mut buf).await.is_some() {
                    misbehave(s).await;
                }
            });
        }
    });
}

/// All failures are of `class`, and there are some.
fn assert_only(result: &BenchResult, class: ErrorClass) {
    assert!(result.errors.get(class) > 0, "{}", result.summary());
    assert_eq!(
        result.errors.get(class),
        result.failed(),
        "{}",
        result.summary()
    );
    assert_eq!(result.ok, 0, "{}", result.summary());
}

mod clean {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_server_gives_zero_errors_in_both_modes() {
        for mode in [Mode::KeepAlive, Mode::Close] {
            let (l, url) = listener().await;
            let accepted = spawn_ok_server(l, 200, None);
            let (result, progress) = run(options(&url, mode)).await;
            assert_eq!(result.failed(), 0, "{}", result.summary());
            assert!(result.requests > 20, "{}", result.summary());
            assert_eq!(result.requests, result.ok);
            assert!(result.latency.all.count == result.ok && result.latency.all.p50_ms > 0.0);
            assert_eq!(progress.last().unwrap().phase, Phase::Done);
            assert_eq!(progress.last().unwrap().requests, result.requests);
            let connections = accepted.load(Ordering::Relaxed) as u64;
            match mode {
                // The probe plus one connection per client.
                Mode::KeepAlive => assert_eq!(connections, 1 + 4),
                Mode::Close => assert!(connections > result.requests),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keepalive_reconnects_after_connection_close_without_errors() {
        let (l, url) = listener().await;
        let accepted = spawn_ok_server(l, 200, Some(3));
        let (result, _) = run(options(&url, Mode::KeepAlive)).await;
        assert_eq!(result.failed(), 0, "{}", result.summary());
        // Every third response ended its connection and the client came back.
        assert!(result.requests >= 30, "{}", result.summary());
        assert!(accepted.load(Ordering::Relaxed) as u64 >= result.requests / 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fixed_rate_is_kept() {
        let (l, url) = listener().await;
        spawn_ok_server(l, 200, None);
        let mut o = options(&url, Mode::KeepAlive);
        o.rate = Some(200.0);
        o.duration = Duration::from_millis(500);
        let (result, _) = run(o).await;
        assert_eq!(result.failed(), 0);
        // 100 requests planned in the window; allow for timer granularity.
        assert!(
            (80..=110).contains(&result.requests),
            "{}",
            result.summary()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn warmup_is_not_counted() {
        let (l, url) = listener().await;
        spawn_ok_server(l, 200, None);
        let mut o = options(&url, Mode::KeepAlive);
        o.warmup = Duration::from_millis(200);
        let (result, _) = run(o).await;
        assert!(result.warmup.requests > 0);
        assert_eq!(result.failed(), 0);
        assert!(
            result.elapsed_s >= 0.29 && result.elapsed_s < 0.5,
            "{}",
            result.elapsed_s
        );
    }
}

mod errors {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reset_connections_are_reset() {
        let (l, url) = listener().await;
        spawn_bad_server(l, |s| async move {
            // Linger 0 turns the close into an RST.
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
        });
        let (result, _) = run(options(&url, Mode::KeepAlive)).await;
        assert_only(&result, ErrorClass::Reset);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_truncated_body_is_closed_early() {
        let (l, url) = listener().await;
        spawn_bad_server(l, |mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await;
            let _ = s.shutdown().await;
            // Wait for the client's close so the close is a FIN, not an RST
            // caused by unread data.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        let (result, _) = run(options(&url, Mode::Close)).await;
        assert_only(&result, ErrorClass::ClosedEarly);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_never_answers_is_a_response_timeout() {
        let (l, url) = listener().await;
        spawn_bad_server(l, |s| async move {
            // Hold the connection open, answer nothing.
            let _s = s;
            std::future::pending::<()>().await;
        });
        let mut o = options(&url, Mode::KeepAlive);
        o.timeout = Duration::from_millis(100);
        let (result, _) = run(o).await;
        assert_only(&result, ErrorClass::ResponseTimeout);
        // One per client and per timeout period, roughly: never retried early.
        assert!(result.failed() <= 4 * 4, "{}", result.summary());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_503_is_a_bad_status() {
        let (l, url) = listener().await;
        spawn_ok_server(l, 503, None);
        let (result, _) = run(options(&url, Mode::KeepAlive)).await;
        assert_only(&result, ErrorClass::BadStatus);
        assert_eq!(result.latency.all.count, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_port_is_unreachable_at_start() {
        let (l, url) = listener().await;
        drop(l);
        let err = bounded(baton_bench::run(
            options(&url, Mode::Close).validate().unwrap(),
            |_| {},
        ))
        .await
        .unwrap_err();
        assert!(err.is_unreachable(), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_port_closed_after_the_probe_is_connect_refused() {
        let (l, url) = listener().await;
        tokio::spawn(async move {
            // Accept the probe, then stop listening.
            let (probe, _) = l.accept().await.unwrap();
            drop(l);
            drop(probe);
        });
        let (result, _) = run(options(&url, Mode::Close)).await;
        // Connections that raced the listener's close may have been reset;
        // everything after it is refused.
        assert!(result.errors.connect_refused > 10, "{}", result.summary());
        assert_eq!(result.ok, 0);
        assert_eq!(
            result.errors.connect_refused + result.errors.reset + result.errors.closed_early,
            result.failed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_backlog_is_a_connect_timeout() {
        // A listener that never accepts: once its backlog is full, SYNs are
        // dropped and connects time out.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = socket.listen(1).unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        let mut o = options(&url, Mode::Close);
        o.concurrency = 8;
        o.timeout = Duration::from_millis(150);
        let (result, _) = run(o).await;
        assert!(result.errors.connect_timeout > 0, "{}", result.summary());
        assert_eq!(result.ok, 0);
        drop(l);
    }
}

mod restarts {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn command_restarts_record_their_exit_status() {
        for (command, code) in [("true", 0), ("echo oops >&2; exit 3", 3)] {
            let (l, url) = listener().await;
            spawn_ok_server(l, 200, None);
            let mut o = options(&url, Mode::KeepAlive);
            o.duration = Duration::from_millis(600);
            o.restarts = 2;
            o.restart = Some(RestartAction::command(command));
            let (result, progress) = run(o).await;
            assert_eq!(result.restarts.len(), 2);
            assert_eq!(progress.last().unwrap().restarts_done, 2);
            for (i, r) in result.restarts.iter().enumerate() {
                assert_eq!(r.index, i + 1);
                let RestartOutcome::Exited {
                    code: got, stderr, ..
                } = &r.outcome
                else {
                    panic!("unexpected outcome {:?}", r.outcome);
                };
                assert_eq!(*got, Some(code));
                assert_eq!(r.success, code == 0);
                if code != 0 {
                    assert_eq!(stderr, "oops\n");
                }
                // Evenly spaced: at 1/3 and 2/3 of the window.
                let planned = 0.6 * (i + 1) as f64 / 3.0;
                assert!(
                    r.start_s >= planned - 0.01 && r.start_s < planned + 0.15,
                    "{r:?}"
                );
                assert!(r.window_end_s > r.start_s + 1.0);
            }
            assert_eq!(result.failed_restarts(), if code == 0 { 0 } else { 2 });
            assert_eq!(result.failed(), 0);
            assert!(result.latency.in_restart_windows.count > 0);
            assert!(result.latency.outside_restart_windows.count > 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_socket_restarts_record_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("control.sock");
        let control = tokio::net::UnixListener::bind(&socket).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        tokio::spawn(async move {
            let mut generation = 1;
            loop {
                let (s, _) = control.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                BufReader::new(r).read_line(&mut line).await.unwrap();
                log.lock().unwrap().push(line);
                generation += 1;
                let answer = format!("{{\"ok\":true,\"generation\":{generation}}}\n");
                w.write_all(answer.as_bytes()).await.unwrap();
            }
        });

        let (l, url) = listener().await;
        spawn_ok_server(l, 200, None);
        let mut o = options(&url, Mode::Close);
        o.duration = Duration::from_millis(500);
        o.restarts = 2;
        o.restart = Some(RestartAction::control(&socket, "upgrade"));
        let (result, _) = run(o).await;

        assert_eq!(
            *received.lock().unwrap(),
            vec!["{\"command\":\"upgrade\"}\n"; 2]
        );
        assert_eq!(result.restarts.len(), 2);
        for (i, r) in result.restarts.iter().enumerate() {
            let RestartOutcome::Control {
                ok,
                error,
                response,
            } = &r.outcome
            else {
                panic!("unexpected outcome {:?}", r.outcome);
            };
            assert!(*ok && error.is_none() && r.success);
            assert_eq!(response["generation"], i as u64 + 2);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_control_socket_that_is_missing_is_a_failed_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (l, url) = listener().await;
        spawn_ok_server(l, 200, None);
        let mut o = options(&url, Mode::KeepAlive);
        o.restarts = 1;
        o.restart = Some(RestartAction::control(
            dir.path().join("nope.sock"),
            "reload",
        ));
        let (result, _) = run(o).await;
        assert!(matches!(
            result.restarts[0].outcome,
            RestartOutcome::Failed { .. }
        ));
        assert_eq!(result.failed_restarts(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signal_restarts_signal_the_pid_in_the_pid_file() {
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let pid_file = dir.path().join("server.pid");
        std::fs::write(&pid_file, format!("{pid}\n")).unwrap();

        let (l, url) = listener().await;
        spawn_ok_server(l, 200, None);
        let mut o = options(&url, Mode::KeepAlive);
        o.restarts = 1;
        let term = baton_bench::parse_signal("TERM").unwrap();
        o.restart = Some(RestartAction::signal(term, &pid_file));
        let (result, _) = run(o).await;

        assert_eq!(
            result.restarts[0].outcome,
            RestartOutcome::SignalSent {
                pid: pid as i32,
                signal: term
            }
        );
        let status = bounded(child.wait()).await.unwrap();
        assert_eq!(status.signal(), Some(term));
    }
}

mod output {
    use super::*;

    async fn result_with_restarts(k: usize) -> BenchResult {
        let (l, url) = listener().await;
        spawn_ok_server(l, 200, None);
        let mut o = options(&url, Mode::KeepAlive);
        o.duration = Duration::from_millis(500);
        o.restarts = k;
        o.restart = Some(RestartAction::command("true"));
        run(o).await.0
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn json_round_trips_with_the_documented_fields() {
        let result = result_with_restarts(2).await;
        let json = result.to_json().unwrap();
        assert_eq!(BenchResult::from_json(&json).unwrap(), result);

        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for key in [
            "schema_version",
            "config",
            "started_unix_s",
            "elapsed_s",
            "stopped_early",
            "requests",
            "ok",
            "failed",
            "rate",
            "latency",
            "errors",
            "errors_in_restart_windows",
            "warmup",
            "restarts",
            "timeline",
        ] {
            assert!(keys.contains(&key), "missing {key}");
        }
        assert_eq!(keys.len(), 15, "undocumented fields: {keys:?}");
        // Every top-level field is documented in SCHEMA.md.
        let schema = include_str!("../SCHEMA.md");
        for key in keys {
            assert!(
                schema.contains(&format!("`{key}`")),
                "{key} not in SCHEMA.md"
            );
        }
        assert_eq!(value["latency"]["all"]["p99_ms"], result.latency.all.p99_ms);
        assert_eq!(value["timeline"]["bucket_ms"], 100);
        assert_eq!(value["restarts"][0]["outcome"]["kind"], "exited");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("result.json");
        result.write_json(&path).unwrap();
        let back = BenchResult::from_json(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, result);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_report_marks_each_restart_once() {
        for k in [0, 3] {
            let result = result_with_restarts(k).await;
            let dir = tempfile::tempdir().unwrap();
            baton_bench::report::write_report(&result, dir.path()).unwrap();

            let svg = std::fs::read_to_string(dir.path().join("timeline.svg")).unwrap();
            let doc = roxmltree::Document::parse(&svg).unwrap();
            let marks = doc
                .descendants()
                .filter(|n| {
                    n.has_tag_name("rect")
                        && n.attribute("fill") == Some(baton_bench::report::RESTART_FILL)
                })
                .count();
            assert_eq!(marks, k);
            let labels: Vec<&str> = doc
                .descendants()
                .filter(|n| n.has_tag_name("text"))
                // plotters ends each text with a newline.
                .filter_map(|n| n.text().map(str::trim))
                .filter(|t| t.starts_with("restart "))
                .collect();
            let expected: Vec<String> = (1..=k).map(|i| format!("restart {i}")).collect();
            assert_eq!(labels, expected);

            // The legend is a strip of its own, above the first panel.
            let legend_y: Vec<f64> = doc
                .descendants()
                .filter(|n| n.has_tag_name("text"))
                .filter(|n| n.text().map(str::trim) == Some("requests/s"))
                .filter_map(|n| n.attribute("y").and_then(|y| y.parse().ok()))
                .collect();
            assert_eq!(legend_y.len(), 1, "one legend entry for the rate");
            let first_panel_top = doc
                .descendants()
                .filter(|n| n.has_tag_name("text"))
                .filter(|n| n.text().map(str::trim) == Some("req/s"))
                .filter_map(|n| n.attribute("y").and_then(|y| y.parse::<f64>().ok()))
                .fold(f64::MAX, f64::min);
            assert!(legend_y[0] < first_panel_top, "legend above the panels");

            let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
            assert!(html.contains("<svg"));
            assert!(
                html.contains("restart window: from the moment"),
                "the restart window is explained"
            );
            assert!(
                html.contains(&format!(
                    "<td class=\"l\">{}</td>",
                    env!("CARGO_PKG_VERSION")
                )),
                "version"
            );
            assert!(html.contains(" cores, linux "), "machine");
            assert!(html.contains("<th class=\"l\">command line</th>"));
            assert!(
                html.contains("<th class=\"l\">date</th><td class=\"l\">20"),
                "date"
            );
            for external in ["src=", "href=", "@import", "url("] {
                assert!(
                    !html.contains(external),
                    "report.html references {external}"
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_summary_reports_errors_and_restarts() {
        let result = result_with_restarts(1).await;
        let summary = result.summary();
        assert!(summary.contains("failed: 0"), "{summary}");
        assert!(summary.contains("#1 at "), "{summary}");
        assert!(summary.contains("exited with status 0"), "{summary}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_run_early() {
    let (l, url) = listener().await;
    spawn_ok_server(l, 200, None);
    let mut o = options(&url, Mode::KeepAlive);
    o.duration = Duration::from_secs(60);
    let shutdown = baton_bench::CancellationToken::new();
    let trigger = shutdown.clone();
    let mut cancelled = false;
    let result = bounded(baton_bench::run_until(
        o.validate().unwrap(),
        move |p| {
            // Cancel at the first progress report.
            if !cancelled {
                cancelled = true;
                trigger.cancel();
            }
            let _ = p;
        },
        shutdown,
    ))
    .await
    .unwrap();
    assert!(result.stopped_early);
    assert!(result.elapsed_s < 5.0);
    assert_eq!(result.failed(), 0);
}
