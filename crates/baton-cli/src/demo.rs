//! `baton demo`: the whole story on one machine, with no setup. Starts the
//! built-in `hello` server, drives load at it with both client kinds while
//! upgrading it through the control socket, prints the verdict and where the
//! report is.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use baton_bench::{BenchOptions, Mode, RestartAction};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Duration,
    pub upgrades: usize,
    pub concurrency: usize,
    pub report: PathBuf,
}

/// Runs the demo; returns whether no request failed.
pub async fn run(opts: DemoOptions) -> anyhow::Result<bool> {
    // Later generations are reparented to us when their parent exits; being a
    // subreaper lets us reap them (some PID 1s never do).
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    let dir = opts.report.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let control = dir.join("control.sock");
    let pid_file = dir.join("hello.pid");
    let server = Server::start(&control, &pid_file)?;
    let url = format!("http://{}/", server.listen);
    eprintln!(
        "baton demo: hello server pid {} on {url}; {} upgrades under load in each client mode",
        server.child.id(),
        opts.upgrades
    );

    let mut verdicts = Vec::new();
    let mut all_ok = true;
    for (mode, name) in [(Mode::KeepAlive, "keepalive"), (Mode::Close, "close")] {
        let mut o = BenchOptions::new(&url);
        o.mode = mode;
        o.concurrency = opts.concurrency;
        o.duration = opts.duration;
        o.warmup = Duration::from_millis(500);
        o.restarts = opts.upgrades;
        o.restart = Some(RestartAction::control(&control, "upgrade"));
        let config = o.validate()?;
        eprintln!(
            "\n== {name}: {} clients, {:?} ==",
            opts.concurrency, opts.duration
        );
        let outputs = crate::bench::Outputs {
            json: Some(dir.join(format!("{name}.json"))),
            report: Some(dir.join(name)),
        };
        let result = crate::bench::run(config, &outputs).await;
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                server.stop().await;
                return Err(e);
            }
        };
        print!("{}", result.summary());
        let upgrades_ok = result.restarts.len() - result.failed_restarts();
        all_ok &= result.failed() == 0 && result.failed_restarts() == 0;
        verdicts.push(format!(
            "{name:>9}: {} requests, {} failed, {upgrades_ok}/{} upgrades succeeded",
            result.requests,
            result.failed(),
            result.restarts.len()
        ));
    }
    server.stop().await;

    println!("\n== verdict ==");
    for v in &verdicts {
        println!("{v}");
    }
    if all_ok {
        println!("PASS: not one request lost across the upgrades");
    } else {
        println!("FAIL: requests were lost or upgrades failed");
    }
    println!(
        "report: {} and {}",
        dir.join("keepalive").join("report.html").display(),
        dir.join("close").join("report.html").display()
    );
    Ok(all_ok)
}

struct Server {
    child: Child,
    listen: String,
    control: PathBuf,
}

impl Server {
    fn start(control: &Path, pid_file: &Path) -> anyhow::Result<Server> {
        let exe = std::env::current_exe().context("locating the baton binary")?;
        let mut child = Command::new(exe)
            .args(["hello", "--listen", "127.0.0.1:0", "--drain-timeout", "10s"])
            .arg("--control-socket")
            .arg(control)
            .arg("--pid-file")
            .arg(pid_file)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the hello server")?;
        let Some(stdout) = child.stdout.take() else {
            bail!("no stdout from the hello server");
        };
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().transpose()?.unwrap_or_default();
        let ready: serde_json::Value = serde_json::from_str(&first)
            .with_context(|| format!("hello server did not start: {first:?}"))?;
        let Some(listen) = ready["listen"].as_str().map(str::to_owned) else {
            bail!("hello server did not say where it listens: {first}");
        };
        // Keep reading: every generation announces itself on this pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Server {
            child,
            listen,
            control: control.to_path_buf(),
        })
    }

    /// Stops the active generation through the control socket and reaps
    /// every generation (bounded).
    async fn stop(mut self) {
        let stop = baton::control::request(&self.control, &baton::control::Request::Stop {});
        let stopped = matches!(
            tokio::time::timeout(Duration::from_secs(10), stop).await,
            Ok(Ok(_))
        );
        let _ = tokio::task::spawn_blocking(move || {
            if !stopped {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
            // Reap the later generations as they finish draining.
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while std::time::Instant::now() < deadline {
                match rustix::process::wait(rustix::process::WaitOptions::NOHANG) {
                    Ok(Some(_)) => continue,
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => break, // ECHILD: none left
                }
            }
        })
        .await;
    }
}
