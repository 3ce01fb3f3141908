//! Flags and wiring shared by the examples.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Flags every example takes.
#[derive(Debug, Parser)]
#[command(args_override_self = true)]
pub struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Serve /healthz and /readyz here (a listener named "admin").
    #[arg(long)]
    pub admin: Option<String>,
    /// Also serve on this Unix socket path.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Write the active generation's pid here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Serve the control protocol here.
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// How long draining may take.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    /// How long an upgrade waits for the new generation.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub upgrade_timeout: Duration,
    /// How long idle keep-alive connections are kept while draining.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub idle_grace: Duration,
    /// After an upgrade, how long to watch the new generation (and take the
    /// service back if it dies) before letting the sockets go.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub settle: Duration,
    /// Sleep this long before reporting ready.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub startup_delay: Option<Duration>,
    /// Exit with status 1 before reporting ready.
    #[arg(long)]
    pub fail_startup: bool,
    /// Report this startup error to the previous generation, then exit 1.
    #[arg(long)]
    pub report_error: Option<String>,
    /// Take over from the generation serving the control socket, if one
    /// does; else start on our own.
    #[arg(long)]
    pub takeover: bool,
    /// Neither take connections from the previous generation nor hand them
    /// to the next (connection migration; examples that support it).
    #[arg(long)]
    pub no_migrate: bool,
}

impl Args {
    pub fn baton(&self) -> anyhow::Result<baton::Baton> {
        let mut b = baton::Baton::builder()
            .drain_timeout(self.drain_timeout)
            .upgrade_timeout(self.upgrade_timeout)
            .idle_grace(self.idle_grace)
            .settle(self.settle)
            .takeover(self.takeover);
        if let Some(p) = &self.pid_file {
            b = b.pid_file(p);
        }
        if let Some(p) = &self.control_socket {
            b = b.control_socket(p);
        }
        Ok(b.from_env()?)
    }

    /// The startup behaviour the tests drive: delay, or fail.
    pub async fn startup(&self, baton: &baton::Baton) {
        if self.fail_startup {
            eprintln!(
                "hello: --fail-startup given, exiting before ready (generation {})",
                baton.generation()
            );
            std::process::exit(1);
        }
        if let Some(message) = &self.report_error {
            baton.fail(message);
            std::process::exit(1);
        }
        if let Some(d) = self.startup_delay {
            tokio::time::sleep(d).await;
        }
    }
}

pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A line that cannot be written is dropped. Until a new generation
        // is active its stderr is a pipe the previous one reads; if that one
        // dies first, the default (report the failure with `eprintln!`,
        // which panics on a broken pipe) would kill the new generation.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// One JSON line on stdout when this generation becomes active, so scripts
/// and tests can synchronize on it.
pub fn announce(baton: &baton::Baton, extra: serde_json::Value) {
    let mut v = serde_json::json!({
        "event": "ready",
        "pid": std::process::id(),
        "generation": baton.generation(),
    });
    if let (Some(obj), Some(more)) = (v.as_object_mut(), extra.as_object()) {
        obj.extend(more.clone());
    }
    println!("{v}");
}
