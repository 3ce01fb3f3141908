//! The `baton` command. Glue only: flags are parsed and validated here, the
//! work is done by the libraries.
//!
//! Exit codes: 0 success; 1 the operation failed (requests failed in a
//! bench, a control request answered `ok: false`); 2 usage error, invalid
//! input or an unreachable target.

mod bench;
mod ctl;
mod demo;
mod hello;
mod proxy;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: a proxy allocates a task, a
/// reactor registration and its buffers for every connection, and glibc's
/// malloc took a sixth of the proxy's user-space instructions per new
/// connection (most of it in the slow paths for aligned and multi-KiB
/// blocks). See docs/BENCH-PROXY.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Drive HTTP/1.1 load at a URL while restarting the server; report every failed request.
    Bench(BenchArgs),
    /// Upgrade a built-in server under load and show that no request is lost.
    Demo {
        /// Measured load per client mode (keep-alive, then new connection per request).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
        /// Upgrades per client mode.
        #[arg(long, default_value_t = 5)]
        upgrades: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Where to write the reports [default: $TMPDIR/baton-demo].
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Run any program as a child that inherits the listening sockets; restart it without losing a connection.
    Run(RunArgs),
    /// Talk to a running server's control socket.
    Ctl {
        /// The control socket [default: $XDG_RUNTIME_DIR/baton/proxy.sock, else /tmp/baton-UID/proxy.sock].
        /// Accepted before or after the action.
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
        /// Print the server's JSON answer as is (before or after the action).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Run the reverse proxy (config reloads in-process; upgrades lose no request).
    Proxy {
        /// The configuration file [default: a built-in one: 127.0.0.1:8080, a welcome page].
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Only validate the configuration and exit, as `baton check` does (nginx's `-t`).
        #[arg(long, short = 't', requires = "config")]
        test: bool,
        /// Take over the sockets of the proxy serving the configured control socket, if one runs; else start on its own.
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a proxy configuration: exit 0, or 1 with FILE:LINE:COL: message for every problem.
    #[command(group(clap::ArgGroup::new("file").args(["path", "config"]).required(true)))]
    Check {
        /// The configuration file.
        #[arg(value_name = "FILE")]
        path: Option<PathBuf>,
        /// The configuration file (the same as FILE).
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
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
        /// Take over from the process serving --control-socket, if any.
        #[arg(long)]
        takeover: bool,
    },
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("restart").args(["restart_cmd", "restart_signal", "control_socket"])))]
struct BenchArgs {
    /// The URL to load (http://HOST:PORT/PATH).
    #[arg(long)]
    url: String,
    /// keepalive: reuse connections; close: a new connection per request.
    #[arg(long, default_value = "keepalive")]
    mode: baton_bench::Mode,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Fixed total request rate (requests per second); default: as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured load window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Restarts, evenly spaced inside the load window.
    #[arg(long, default_value_t = 0)]
    restarts: usize,
    /// Restart by running this shell command.
    #[arg(long)]
    restart_cmd: Option<String>,
    /// Restart by sending this signal (HUP, USR2, ...) to the pid in --pid-file.
    #[arg(long, requires = "pid_file")]
    restart_signal: Option<String>,
    /// Pid file read at each restart (with --restart-signal).
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Restart through this Baton control socket (with --action).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Control socket action: upgrade or reload.
    #[arg(long, default_value = "upgrade", value_parser = ["upgrade", "reload"])]
    action: String,
    /// Load before the measured window, not counted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write report.html and timeline.svg into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Per-request timeout.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    timeout: Duration,
    /// Bound on one restart (a command still running then is killed).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    restart_timeout: Duration,
}

impl BenchArgs {
    /// Flags → the library's options (validated by the library).
    fn options(self) -> anyhow::Result<(baton_bench::BenchOptions, bench::Outputs)> {
        let mut o = baton_bench::BenchOptions::new(self.url);
        o.mode = self.mode;
        o.concurrency = self.concurrency;
        o.rate = self.rate;
        o.duration = self.duration;
        o.restarts = self.restarts;
        o.warmup = self.warmup;
        o.timeout = self.timeout;
        o.restart_timeout = self.restart_timeout;
        o.restart = if let Some(cmd) = self.restart_cmd {
            Some(baton_bench::RestartAction::command(cmd))
        } else if let Some(sig) = self.restart_signal {
            let pid_file = self.pid_file.unwrap_or_default();
            Some(baton_bench::RestartAction::signal(
                baton_bench::parse_signal(&sig)?,
                pid_file,
            ))
        } else {
            self.control_socket
                .map(|s| baton_bench::RestartAction::control(s, self.action))
        };
        Ok((
            o,
            bench::Outputs {
                json: self.json,
                report: self.report,
            },
        ))
    }
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A socket to hold: NAME=ADDR with ADDR tcp://HOST:PORT, udp://HOST:PORT, unix:PATH or HOST:PORT (repeatable).
    #[arg(long = "listen", value_name = "NAME=ADDR")]
    listen: Vec<String>,
    /// Give the child a fresh loopback port in VAR instead of the socket, and forward NAME's connections to it (repeatable).
    #[arg(long = "port-env", value_name = "NAME=VAR")]
    port_env: Vec<String>,
    /// notify | tcp:ADDR | http:URL | delay:DUR ({VAR} in ADDR or URL is a --port-env value, {listen:NAME} the child's own address for an --http listener) [default: with --http, GET / of the child's address; else a tcp probe of the --port-env port, else delay:1s].
    #[arg(long)]
    ready: Option<String>,
    /// How long a child may take to become ready.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    ready_timeout: Duration,
    /// Signal that asks a child to stop gracefully.
    #[arg(long, default_value = "TERM")]
    stop_signal: String,
    /// How long a stopping child may take before SIGKILL.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    drain_timeout: Duration,
    /// Serve the control protocol here (baton ctl --socket PATH reload|status|stop).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Write the supervisor's pid here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Replace a child that dies, with exponential back-off, instead of exiting with its status.
    #[arg(long)]
    restart_on_crash: bool,
    /// After a reload, how long the new child must stay up once ready before the old one is stopped and the reload reported ok.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    settle: Duration,
    /// Take the sockets over from the `baton run` serving --control-socket, if one runs (its child is stopped once ours is ready); else bind them.
    #[arg(long, requires = "control_socket")]
    takeover: bool,
    /// TCP_NODELAY on the TCP listeners it binds, which accepted sockets inherit (--no-delay=false turns it off).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_value = "true", default_missing_value = "true", action = clap::ArgAction::Set)]
    no_delay: bool,
    /// Serve HTTP on the TCP listeners and forward each request to the current child (which gets a private loopback socket, or its --port-env port): keep-alive clients stay connected to the supervisor, so a reload never closes one.
    #[arg(long)]
    http: bool,
    /// Serve GET /healthz and /readyz (200 while a child serves and the supervisor is not stopping, else 503) at this HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// The program and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<std::ffi::OsString>,
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

/// `baton check`'s exit code: 0 when `file` is valid, 1 otherwise.
fn check_exit(file: &std::path::Path) -> ExitCode {
    if proxy::check(file) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,baton_bench=warn"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log line that cannot be written is dropped: a new generation
        // whose old one died before it started logs into the old one's
        // capture pipe until it switches to the real stderr, and reporting
        // that failure (with `eprintln!`, on the same dead pipe) would panic.
        .log_internal_errors(false)
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
    // `baton proxy`: the configuration is read first, as `[server] runtime`
    // and `workers` decide the runtime.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let mut loaded = None;
    if let Command::Proxy {
        config,
        test: false,
        ..
    } = &cli.command
    {
        match proxy::load(config.clone()) {
            Ok(cfg) => {
                match cfg.server.runtime {
                    // The proxy starts its workers; this runtime runs the
                    // control socket, reloads and health checks.
                    baton_proxy::config::RuntimeModel::PerWorker => {
                        builder = tokio::runtime::Builder::new_current_thread();
                    }
                    baton_proxy::config::RuntimeModel::MultiThread => {
                        if let Some(n) = cfg.server.workers {
                            builder.worker_threads(n);
                        }
                    }
                }
                loaded = Some(cfg);
            }
            Err(e) => {
                eprintln!("baton: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(cli.command, loaded));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs `command`; `loaded`: the proxy's configuration, read before the
/// runtime was built.
async fn run(command: Command, loaded: Option<baton_proxy::Config>) -> anyhow::Result<ExitCode> {
    match command {
        Command::Bench(args) => {
            let (options, outputs) = args.options()?;
            let config = options.validate()?;
            let result = bench::run(config, &outputs).await?;
            print!("{}", result.summary());
            if result.failed_restarts() > 0 {
                eprintln!(
                    "baton bench: {} restart(s) failed; see the summary",
                    result.failed_restarts()
                );
            }
            Ok(if result.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Demo {
            duration,
            upgrades,
            concurrency,
            report,
        } => {
            let ok = demo::run(demo::DemoOptions {
                duration,
                upgrades,
                concurrency,
                report: report.unwrap_or_else(|| std::env::temp_dir().join("baton-demo")),
            })
            .await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Run(a) => {
            let code = run::run(baton_supervisor::Options {
                command: a.command,
                listen: a.listen,
                port_env: a.port_env,
                ready: a.ready,
                ready_timeout: Some(a.ready_timeout),
                stop_signal: Some(a.stop_signal),
                drain_timeout: Some(a.drain_timeout),
                restart_on_crash: a.restart_on_crash,
                settle: Some(a.settle),
                control_socket: a.control_socket,
                pid_file: a.pid_file,
                takeover: a.takeover,
                admin: a.admin,
                no_delay: Some(a.no_delay),
                http: a.http,
            })
            .await?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
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
        Command::Proxy {
            config: Some(config),
            test: true,
            ..
        } => Ok(check_exit(&config)),
        Command::Proxy {
            config, takeover, ..
        } => {
            let cfg = match loaded {
                Some(cfg) => cfg,
                None => proxy::load(config)?,
            };
            proxy::run(cfg, takeover).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { path, config } => {
            // clap's group makes one of them required.
            let file = path
                .or(config)
                .ok_or_else(|| anyhow::anyhow!("baton check needs a configuration FILE"))?;
            Ok(check_exit(&file))
        }
        Command::Hello {
            listen,
            control_socket,
            pid_file,
            drain_timeout,
            upgrade_timeout,
            takeover,
        } => {
            hello::run(hello::HelloOptions {
                listen,
                control_socket,
                pid_file,
                drain_timeout,
                upgrade_timeout,
                takeover,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
