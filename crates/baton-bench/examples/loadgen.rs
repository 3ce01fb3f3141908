//! Run the load generator from the command line, for measurements.
//!
//! `cargo run --release -p baton-bench --example loadgen -- URL [CONCURRENCY] [DURATION] [keepalive|close] [THREADS] [RESTARTS RESTART_CMD [REPORT_DIR]]`
//!
//! THREADS = 1 (the default) uses a current-thread runtime, like `wrk -t1`.

use baton_bench::{parse_duration, BenchOptions, Mode};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "http://127.0.0.1:8089/".to_owned());
    let mut options = BenchOptions::new(url);
    options.concurrency = args.get(2).map_or(64, |c| c.parse().unwrap());
    options.duration = parse_duration(args.get(3).map_or("10s", |d| d.as_str())).unwrap();
    options.mode = args.get(4).map_or(Mode::KeepAlive, |m| m.parse().unwrap());
    let threads: usize = args.get(5).map_or(1, |t| t.parse().unwrap());
    if let (Some(k), Some(cmd)) = (args.get(6), args.get(7)) {
        options.restarts = k.parse().unwrap();
        options.restart = Some(baton_bench::RestartAction::command(cmd.clone()));
    }
    let config = options.validate().unwrap();

    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .unwrap()
    };
    let result = rt
        .block_on(baton_bench::run(config, |p| eprintln!("{p}")))
        .unwrap();
    print!("{}", result.summary());
    if let Some(dir) = args.get(8) {
        baton_bench::report::write_report(&result, dir.as_ref()).unwrap();
        result
            .write_json(&std::path::Path::new(dir).join("result.json"))
            .unwrap();
    }
}
