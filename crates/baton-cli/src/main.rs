//! The `baton` command. Glue only: flags are parsed and validated here, the
//! work is done by the libraries.
//!
//! Exit codes: 0 success; 1 the operation failed (requests failed in a
//! bench, a control request answered `ok: false`); 2 usage error, invalid
//! input or an unreachable target.

mod ctl;
mod hello;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "Zero-downtime restarts, upgrades and reloads"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_parser = ["pretty", "json"], default_value = "pretty")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Talk to a running server's control socket.
    Ctl {
        /// The control socket [default: $XDG_RUNTIME_DIR/baton/proxy.sock, else /tmp/baton-UID/proxy.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the server's JSON answer as is.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// A tiny HTTP server that answers "hello from generation G pid P" (what `baton demo` upgrades).
    Hello {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        #[arg(long)]
        control_socket: Option<PathBuf>,
        #[arg(long)]
        pid_file: Option<PathBuf>,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        drain_timeout: Duration,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        upgrade_timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum CtlAction {
    /// Start the next generation; succeeds once it is active.
    Upgrade {
        /// Start this binary instead of the current one.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Reload the configuration in-process.
    Reload,
    /// Show generation, pid, uptime, listeners, last reload and upgrade.
    Status,
    /// Stop gracefully.
    Stop,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(cli.command));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Ctl {
            socket,
            json,
            action,
        } => {
            let request = match action {
                CtlAction::Upgrade { binary } => baton::control::Request::Upgrade { binary },
                CtlAction::Reload => baton::control::Request::Reload {},
                CtlAction::Status => baton::control::Request::Status {},
                CtlAction::Stop => baton::control::Request::Stop {},
            };
            let ok = ctl::run(ctl::CtlOptions {
                socket: socket.unwrap_or_else(ctl::default_socket),
                request,
                json,
            })
            .await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Hello {
            listen,
            control_socket,
            pid_file,
            drain_timeout,
            upgrade_timeout,
        } => {
            hello::run(hello::HelloOptions {
                listen,
                control_socket,
                pid_file,
                drain_timeout,
                upgrade_timeout,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
