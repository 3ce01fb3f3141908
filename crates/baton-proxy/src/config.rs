//! The proxy's configuration: a raw TOML model (serde, unknown keys are
//! errors), validated into [`Config`], the type the rest of the crate uses.
//!
//! Every problem is reported as `FILE:LINE:COL: message`: syntax errors with
//! the position `toml` gives, semantic errors (unknown upstream, duplicate
//! listener, empty pool, bad duration…) at the span of the offending value,
//! kept with [`toml::Spanned`]. Validation collects every problem rather
//! than stopping at the first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The built-in configuration `baton proxy` uses without `--config`: listen
/// on 127.0.0.1:8080 and answer every request with a short welcome page.
pub const BUILTIN: &str = r#"
[[listeners]]
name = "web"
address = "127.0.0.1:8080"
protocol = "http"

[[routes]]
listener = "web"
path_prefix = "/"
respond = { status = 200, body = "Welcome to baton proxy.\n\nThis is the built-in configuration; run `baton proxy --config FILE` to proxy to your services.\n" }
"#;

/// The name shown for the built-in configuration in messages.
pub const BUILTIN_NAME: &str = "<built-in>";

// ---------------------------------------------------------------------------
// Raw model: what the file says.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    listeners: Vec<Spanned<RawListener>>,
    #[serde(default)]
    upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    control_socket: Option<Spanned<PathBuf>>,
    pid_file: Option<Spanned<PathBuf>>,
    drain_timeout: Option<Spanned<String>>,
    upgrade_timeout: Option<Spanned<String>>,
    idle_grace: Option<Spanned<String>>,
    settle: Option<Spanned<String>>,
    migrate: Option<bool>,
    workers: Option<Spanned<i64>>,
    runtime: Option<RuntimeModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    address: Spanned<String>,
    #[serde(default)]
    protocol: Protocol,
    upstream: Option<Spanned<String>>,
    #[serde(default)]
    certificates: Vec<Spanned<RawCertificate>>,
    tls_min_version: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    servers: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    balance: Balance,
    health_check: Option<Spanned<RawHealth>>,
    fail_timeout: Option<Spanned<String>>,
    tls: Option<Spanned<bool>>,
    ca_file: Option<Spanned<PathBuf>>,
    server_name: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    listener: Spanned<String>,
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    #[serde(default)]
    strip_prefix: bool,
    respond: Option<Spanned<RawRespond>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRespond {
    status: Spanned<u16>,
    body: Option<Spanned<String>>,
    content_type: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------
// Validated model: what the rest of the crate uses.

/// `[server] runtime`: how the worker threads serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeModel {
    /// One tokio multi-thread runtime with `workers` threads (work
    /// stealing); every listener accepts on it.
    MultiThread,
    /// The default: `workers` current-thread runtimes, one per thread,
    /// each accepting on every listener's socket (as nginx's worker
    /// processes do); the control socket, reloads and health checks run on
    /// a runtime of their own.
    #[default]
    PerWorker,
}

impl RuntimeModel {
    /// `"multi-thread"` or `"per-worker"`.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeModel::MultiThread => "multi-thread",
            RuntimeModel::PerWorker => "per-worker",
        }
    }
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 reverse proxying by route.
    #[default]
    Http,
    /// HTTP/1.1 over TLS, reverse proxying by route (the listener's
    /// `certificates`).
    Https,
    /// Raw TCP: every connection is spliced to one upstream.
    Tcp,
}

impl Protocol {
    /// `"http"`, `"https"` or `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Tcp => "tcp",
        }
    }

    /// Whether it routes HTTP requests (`http` and `https`).
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }
}

/// How a pool picks a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each server in turn.
    #[default]
    RoundRobin,
    /// The server with the fewest requests or connections in flight.
    LeastConn,
    /// A server picked at random.
    Random,
}

impl Balance {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::Random => "random",
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was read from (`None`: the built-in configuration).
    pub source: Option<PathBuf>,
    /// Process-wide settings (applied at start; a reload that changes them
    /// takes effect at the next upgrade).
    pub server: ServerSettings,
    /// `[admin] address`: where `/healthz` and `/readyz` are served (the
    /// listener [`ADMIN_LISTENER`]); like `[server]`, applied at start.
    pub admin: Option<SocketAddr>,
    /// Listeners, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Upstream pools by name.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Routes, in file order.
    pub routes: Vec<RouteConfig>,
}

/// Most worker threads `[server] workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

/// The name the admin listener is handed over as; no `[[listeners]]` may
/// use it.
pub const ADMIN_LISTENER: &str = "baton-admin";

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// The control socket (default: `$XDG_RUNTIME_DIR/baton/proxy.sock`,
    /// else `/tmp/baton-UID/proxy.sock`).
    pub control_socket: PathBuf,
    /// Optional pid file.
    pub pid_file: Option<PathBuf>,
    /// How long draining may take (default 30 s).
    pub drain_timeout: Duration,
    /// How long an upgrade waits for the new generation (default 30 s).
    pub upgrade_timeout: Duration,
    /// How long idle keep-alive connections stay open once draining (default 1 s).
    pub idle_grace: Duration,
    /// After an upgrade, how long the old generation keeps its sockets and
    /// watches the new one (default 2 s; see `baton::Builder::settle`).
    pub settle: Duration,
    /// At an upgrade, hand keep-alive client connections to the next
    /// generation instead of draining them (default true).
    pub migrate: bool,
    /// `workers`: the runtime's worker threads (`None`: one per core, or
    /// `TOKIO_WORKER_THREADS`). Read at start, like the rest of `[server]`.
    pub workers: Option<usize>,
    /// `runtime`: the worker model (default `per-worker`). Read at
    /// start.
    pub runtime: RuntimeModel,
}

/// `[[listeners]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// The name (what the listening socket is handed over as).
    pub name: String,
    /// `IP:PORT` (port 0 picks one, kept across upgrades).
    pub address: SocketAddr,
    /// Where `address` is written in the file (bind errors name it).
    pub address_at: Position,
    /// What it speaks.
    pub protocol: Protocol,
    /// For TCP listeners: the upstream every connection goes to.
    pub upstream: Option<String>,
    /// For HTTPS listeners: the certificates and the TLS policy.
    pub tls: Option<TlsSettings>,
}

/// The TLS side of an `https` listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    /// `[[listeners.certificates]]`, in file order: chosen by SNI from each
    /// certificate's DNS names, the first for any other name.
    pub certificates: Vec<CertificateFiles>,
    /// `tls_min_version`: `"1.2"` (the default) or `"1.3"`.
    pub min_version: TlsVersion,
}

/// The lowest TLS version an `https` listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

/// One `[[listeners.certificates]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateFiles {
    /// The PEM chain (relative paths are from the configuration file's
    /// directory).
    pub cert: PathBuf,
    /// The PEM key: PKCS#8, RSA or SEC1.
    pub key: PathBuf,
    /// Where the entry (its `[[listeners.certificates]]`) is written.
    pub at: Position,
}

/// `[upstreams.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Its name.
    pub name: String,
    /// The servers, `IP:PORT`.
    pub servers: Vec<SocketAddr>,
    /// How a server is picked.
    pub balance: Balance,
    /// Active health checks, if any.
    pub health_check: Option<HealthCheck>,
    /// How long a server that failed a request is left out (default 10 s).
    pub fail_timeout: Duration,
    /// `tls = true`: requests go to the servers over TLS.
    pub tls: Option<UpstreamTlsSettings>,
}

/// How the proxy speaks TLS to an upstream's servers. Their certificates
/// are always verified.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTlsSettings {
    /// `ca_file`: PEM certificates to verify the servers against (relative
    /// to the configuration file's directory); `None`: the system's.
    pub ca_file: Option<PathBuf>,
    /// `server_name`: the name sent as SNI and verified in the servers'
    /// certificates; `None`: each server's IP address.
    pub server_name: Option<String>,
    /// Where `ca_file` is written (or the upstream, without one).
    pub at: Position,
}

/// Active health checks of an upstream's servers.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    /// `GET` this path and expect 2xx or 3xx; `None`: a TCP connect check.
    pub path: Option<String>,
    /// Time between checks (default 2 s).
    pub interval: Duration,
    /// Bound on one check (default 1 s).
    pub timeout: Duration,
}

/// What a route does with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Proxy to an upstream pool.
    Upstream {
        /// The upstream's name.
        name: String,
        /// Remove the route's prefix from the path before forwarding.
        strip_prefix: bool,
    },
    /// Answer with a fixed response.
    Respond {
        /// Status code.
        status: u16,
        /// Body.
        body: String,
        /// Content type (default `text/plain; charset=utf-8`).
        content_type: String,
    },
}

/// `[[routes]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// The HTTP listener it belongs to.
    pub listener: String,
    /// Host to match (lowercase, without port); `None` matches any host.
    pub host: Option<String>,
    /// Path prefix (longest wins).
    pub path_prefix: String,
    /// What to do.
    pub action: Action,
    /// Bound on the upstream's response headers (default 60 s).
    pub timeout: Duration,
}

// ---------------------------------------------------------------------------
// Errors.

/// A place in a configuration file: `FILE:LINE:COL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The file (or `<built-in>`).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

impl Position {
    /// A problem at this position.
    pub fn problem(&self, message: impl Into<String>) -> Problem {
        Problem {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }
}

/// One problem in a configuration file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (or `<built-in>`).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What is wrong (lowercase, no trailing period).
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Why a configuration was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The path names something other than a regular file (a FIFO, a
    /// device such as `/dev/zero`, a directory…), which is refused before
    /// a byte is read.
    #[error("cannot read {path}: it is {kind}, not a regular file")]
    NotAFile {
        /// The file.
        path: PathBuf,
        /// What it is ("a FIFO", "a character device", …).
        kind: &'static str,
    },
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("cannot read {path}: larger than the {} MiB limit on a configuration file", .limit / (1024 * 1024))]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// Reading did not finish within [`READ_DEADLINE`]; the read was
    /// abandoned (its thread is left behind, see [`MAX_STUCK_READS`]).
    #[error("cannot read {path}: no answer within {}; the read was abandoned", humantime::format_duration(*.after))]
    TimedOut {
        /// The file.
        path: PathBuf,
        /// The deadline.
        after: Duration,
    },
    /// [`MAX_STUCK_READS`] earlier reads are still stuck: no new one is started.
    #[error("cannot read {path}: {stuck} earlier reads of a configuration file are still stuck (the limit); not starting another")]
    Stuck {
        /// The file.
        path: PathBuf,
        /// How many reads are stuck.
        stuck: usize,
    },
    /// Syntax or semantic problems, each `FILE:LINE:COL: message`, one per line.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The problems found (empty for an error reading the file).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            _ => &[],
        }
    }
}

fn display_problems(p: &[Problem]) -> String {
    p.iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Maps byte offsets to line and column.
struct Source<'a> {
    name: String,
    text: &'a str,
}

impl Source<'_> {
    fn position(&self, span: Range<usize>) -> Position {
        let at = span.start.min(self.text.len());
        let before = self.text.get(..at).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = before.get(line_start..).unwrap_or("").chars().count() + 1;
        Position {
            file: self.name.clone(),
            line,
            column,
        }
    }

    fn problem(&self, span: Range<usize>, message: impl Into<String>) -> Problem {
        self.position(span).problem(message)
    }
}

// ---------------------------------------------------------------------------
// Loading.

/// The largest configuration file accepted: 64 MiB (10,000 routes take
/// about 1 MiB).
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024 * 1024;

/// How long reading the configuration file may take (open, `fstat`, read)
/// before it is abandoned: 5 s.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);

/// How many reads of a configuration file may be in flight at once, stuck
/// ones included: a read past [`READ_DEADLINE`] is left behind on its
/// thread (nothing can interrupt a blocked `read`), and once this many are
/// left a new read is refused at once rather than adding another thread.
pub const MAX_STUCK_READS: usize = 4;

/// Reads in flight, abandoned ones included (see [`MAX_STUCK_READS`]).
static READS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Reads and validates the file at `path`: only a regular file (a symlink
/// to one is fine), at most [`MAX_CONFIG_BYTES`], read within
/// [`READ_DEADLINE`] on a thread of its own, UTF-8.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let bytes = read(path)?;
    parse(decode(&bytes, path)?, Some(path))
}

/// The bytes of the configuration file at `path`, read under the limits
/// [`load`] describes.
pub fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    let owned = path.to_path_buf();
    let outcome = with_deadline(
        &READS_IN_FLIGHT,
        MAX_STUCK_READS,
        READ_DEADLINE,
        move || read_regular(&owned, MAX_CONFIG_BYTES),
    );
    let path = path.to_path_buf();
    match outcome {
        Ok(read) => read,
        Err(Abandoned::TimedOut) => Err(ConfigError::TimedOut {
            path,
            after: READ_DEADLINE,
        }),
        Err(Abandoned::TooMany(stuck)) => Err(ConfigError::Stuck { path, stuck }),
        Err(Abandoned::Thread(source)) => Err(ConfigError::Read { path, source }),
    }
}

/// Opens `path` without blocking (a FIFO nobody writes opens at once),
/// refuses anything but a regular file by `fstat` of the opened file, and
/// reads at most `max_bytes` (one more byte read means too large, for files
/// whose size `fstat` does not tell).
fn read_regular(path: &Path, max_bytes: u64) -> Result<Vec<u8>, ConfigError> {
    use rustix::fs::OFlags;
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let read_err = |e: std::io::Error| ConfigError::Read {
        path: path.to_path_buf(),
        source: e,
    };
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| read_err(e.into()))?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(read_err)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "something else"
        };
        return Err(ConfigError::NotAFile {
            path: path.to_path_buf(),
            kind,
        });
    }
    let too_large = || ConfigError::TooLarge {
        path: path.to_path_buf(),
        limit: max_bytes,
    };
    if meta.len() > max_bytes {
        return Err(too_large());
    }
    // Back to ordinary blocking reads for the regular file.
    rustix::fs::fcntl_setfl(&file, OFlags::empty()).map_err(|e| read_err(e.into()))?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Why [`with_deadline`] gave no answer.
#[derive(Debug)]
enum Abandoned {
    /// `max` calls are in flight already (stuck ones included).
    TooMany(usize),
    /// The call did not finish in time; it carries on, abandoned.
    TimedOut,
    /// The thread could not be started or ended without an answer.
    Thread(std::io::Error),
}

/// Runs `f` on a thread of its own and waits for it at most `deadline`. A
/// call that misses the deadline is abandoned but keeps its slot in
/// `in_flight` until it does finish, and no more than `max` calls are in
/// flight at once: a stuck call costs one thread and never blocks the
/// calls after it.
fn with_deadline<T: Send + 'static>(
    in_flight: &'static AtomicUsize,
    max: usize,
    deadline: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Abandoned> {
    /// Frees the slot when the call ends (also if it panics).
    struct Slot(&'static AtomicUsize);
    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let before = in_flight.fetch_add(1, Ordering::SeqCst);
    let slot = Slot(in_flight);
    if before >= max {
        return Err(Abandoned::TooMany(before));
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("baton-config-read".to_owned())
        .spawn(move || {
            let out = f();
            drop(slot);
            let _ = tx.send(out);
        })
        .map_err(Abandoned::Thread)?;
    match rx.recv_timeout(deadline) {
        Ok(out) => Ok(out),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Abandoned::TimedOut),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Abandoned::Thread(
            std::io::Error::other("the read ended without an answer"),
        )),
    }
}

/// `bytes` as UTF-8, or an error at the first invalid byte.
fn decode<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str, ConfigError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = e.valid_up_to();
        let prefix = bytes
            .get(..valid)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("");
        let src = Source {
            name: source_name(Some(path)),
            text: prefix,
        };
        let byte = bytes.get(valid).copied().unwrap_or(0);
        ConfigError::Invalid(vec![src.problem(
            valid..valid,
            format!("invalid UTF-8 (byte 0x{byte:02x}): a configuration file must be UTF-8"),
        )])
    })
}

fn source_name(path: Option<&Path>) -> String {
    path.map(|p| p.display().to_string())
        .unwrap_or_else(|| BUILTIN_NAME.to_owned())
}

/// The built-in configuration, validated.
pub fn builtin() -> Result<Config, ConfigError> {
    parse(BUILTIN, None)
}

/// Parses and validates `text`; `path` names it in messages (`None`: the
/// built-in configuration).
pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
    let src = Source {
        name: source_name(path),
        text,
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        // `toml`'s message is multi-line (it quotes the source); the first
        // line is the reason, the position is ours.
        let message = e.message().lines().next().unwrap_or("invalid toml").trim();
        ConfigError::Invalid(vec![src.problem(span, message.to_owned())])
    })?;
    let mut v = Validator {
        src: &src,
        problems: Vec::new(),
    };
    let config = v.config(raw, path);
    if v.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(v.problems))
    }
}

/// What `baton check` warns about without failing: each listener address
/// that cannot be bound right now (tried the way `nginx -t` does, and let
/// go at once), as `FILE:LINE:COL: warning: …` at its `address`. An address
/// in use is expected when the configuration is that of the running proxy;
/// any other failure (not an address of this machine, no permission) would
/// stop the proxy from starting here.
pub fn bind_warnings(config: &Config) -> Vec<Problem> {
    config
        .listeners
        .iter()
        .filter_map(|l| {
            let e = std::net::TcpListener::bind(l.address).err()?;
            let (name, a) = (&l.name, l.address);
            let message = match e.kind() {
                std::io::ErrorKind::AddrInUse => format!(
                    "warning: listener {name:?}: address {a} is in use ({e}); that is expected if this is the configuration of the running proxy, otherwise the proxy cannot start with it"
                ),
                std::io::ErrorKind::AddrNotAvailable => format!(
                    "warning: listener {name:?}: cannot bind {a}: not an address of this machine ({e})"
                ),
                std::io::ErrorKind::PermissionDenied if a.port() < 1024 => format!(
                    "warning: listener {name:?}: cannot bind {a}: permission denied; ports below 1024 need privileges ({e})"
                ),
                _ => format!("warning: listener {name:?}: cannot bind {a} now: {e}"),
            };
            Some(l.address_at.problem(message))
        })
        .collect()
}

/// The default control socket: `$XDG_RUNTIME_DIR/baton/proxy.sock`, else
/// `/tmp/baton-UID/proxy.sock`. The one definition, used by `baton proxy`
/// and `baton ctl`.
pub fn default_control_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => Path::new(&dir).join("baton").join("proxy.sock"),
        None => PathBuf::from(format!("/tmp/baton-{}", rustix::process::getuid().as_raw()))
            .join("proxy.sock"),
    }
}

struct Validator<'a> {
    src: &'a Source<'a>,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.problems.push(self.src.problem(span, message));
    }

    fn duration(&mut self, v: &Option<Spanned<String>>, default: Duration, what: &str) -> Duration {
        match v {
            Some(s) if humantime::parse_duration(s.get_ref()).is_ok_and(|d| d.is_zero()) => {
                self.err(s.span(), format!("{what} must be greater than zero"));
                default
            }
            _ => self.any_duration(v, default, what),
        }
    }

    /// A duration, zero allowed.
    fn any_duration(
        &mut self,
        v: &Option<Spanned<String>>,
        default: Duration,
        what: &str,
    ) -> Duration {
        let Some(s) = v else { return default };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                self.err(
                    s.span(),
                    format!("{what}: invalid duration {:?}: {e}", s.get_ref()),
                );
                default
            }
        }
    }

    fn addr(&mut self, s: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    s.span(),
                    format!(
                        "{what} {:?} is not an IP:PORT address (like \"127.0.0.1:8080\")",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A fixed response: a final status (1xx are interim, `101` needs an
    /// upgrade) that HTTP allows to carry the body, and a content type that
    /// is a valid header value.
    fn respond(&mut self, resp: RawRespond) -> Action {
        let status = *resp.status.get_ref();
        if !(200..=599).contains(&status) {
            self.err(
                resp.status.span(),
                format!("invalid status {status}: a fixed response needs a status from 200 to 599"),
            );
        }
        let body = match resp.body {
            Some(b) => {
                // RFC 9110: 204, 205 and 304 responses have no content.
                if matches!(status, 204 | 205 | 304) && !b.get_ref().is_empty() {
                    self.err(
                        b.span(),
                        format!(
                            "a {status} response has no body; remove `body` or use another status"
                        ),
                    );
                }
                b.into_inner()
            }
            None => String::new(),
        };
        let content_type = match resp.content_type {
            Some(c) => {
                if http::HeaderValue::from_str(c.get_ref()).is_err() {
                    self.err(
                        c.span(),
                        format!(
                            "content_type {:?} is not a valid header value (no control characters)",
                            c.get_ref()
                        ),
                    );
                }
                c.into_inner()
            }
            None => "text/plain; charset=utf-8".to_owned(),
        };
        Action::Respond {
            status,
            body,
            content_type,
        }
    }

    /// The TLS settings of listener `name`: `https` needs certificates,
    /// other protocols take none. The files are read later
    /// ([`crate::tls::load`]).
    fn tls(
        &mut self,
        name: &str,
        protocol: Protocol,
        certificates: &[Spanned<RawCertificate>],
        min_version: &Option<Spanned<String>>,
        span: &Range<usize>,
        path: Option<&Path>,
    ) -> Option<TlsSettings> {
        if protocol != Protocol::Https {
            if let Some(c) = certificates.first() {
                self.err(
                    c.span(),
                    format!(
                        "{} listener {name:?} takes no certificates; use protocol = \"https\"",
                        protocol.as_str()
                    ),
                );
            }
            if let Some(v) = min_version {
                self.err(
                    v.span(),
                    format!(
                        "tls_min_version is for https listeners; {name:?} is {}",
                        protocol.as_str()
                    ),
                );
            }
            return None;
        }
        if certificates.is_empty() {
            self.err(
                span.clone(),
                format!("https listener {name:?} needs at least one [[listeners.certificates]] with cert and key"),
            );
        }
        let dir = path.and_then(Path::parent).unwrap_or(Path::new(""));
        let certificates = certificates
            .iter()
            .map(|entry| {
                let c = entry.get_ref();
                CertificateFiles {
                    cert: dir.join(c.cert.get_ref()),
                    key: dir.join(c.key.get_ref()),
                    at: self.src.position(entry.span()),
                }
            })
            .collect();
        let min_version = match min_version
            .as_ref()
            .map(|v| (v.get_ref().as_str(), v.span()))
        {
            None | Some(("1.2", _)) => TlsVersion::Tls12,
            Some(("1.3", _)) => TlsVersion::Tls13,
            Some((other, at)) => {
                self.err(
                    at,
                    format!("tls_min_version {other:?} must be \"1.2\" or \"1.3\""),
                );
                TlsVersion::Tls12
            }
        };
        Some(TlsSettings {
            certificates,
            min_version,
        })
    }

    /// An upstream's TLS settings: `ca_file` and `server_name` need
    /// `tls = true`, and the name must be a DNS name or an IP address.
    fn upstream_tls(
        &mut self,
        name: &str,
        up: &RawUpstream,
        span: &Range<usize>,
        path: Option<&Path>,
    ) -> Option<UpstreamTlsSettings> {
        let on = up.tls.as_ref().is_some_and(|t| *t.get_ref());
        if !on {
            for (what, at) in [
                ("ca_file", up.ca_file.as_ref().map(Spanned::span)),
                ("server_name", up.server_name.as_ref().map(Spanned::span)),
            ] {
                if let Some(at) = at {
                    self.err(at, format!("upstream {name:?}: {what} needs tls = true"));
                }
            }
            return None;
        }
        if let Some(n) = &up.server_name {
            if baton::tls::rustls::pki_types::ServerName::try_from(n.get_ref().as_str()).is_err() {
                self.err(
                    n.span(),
                    format!(
                        "upstream {name:?}: server_name {:?} is not a DNS name or an IP address",
                        n.get_ref()
                    ),
                );
            }
        }
        let dir = path.and_then(Path::parent).unwrap_or(Path::new(""));
        Some(UpstreamTlsSettings {
            ca_file: up.ca_file.as_ref().map(|c| dir.join(c.get_ref())),
            server_name: up.server_name.as_ref().map(|n| n.get_ref().clone()),
            at: self
                .src
                .position(up.ca_file.as_ref().map_or(span.clone(), Spanned::span)),
        })
    }

    fn config(&mut self, raw: RawConfig, path: Option<&Path>) -> Config {
        let server = ServerSettings {
            control_socket: raw
                .server
                .control_socket
                .map(Spanned::into_inner)
                .unwrap_or_else(default_control_socket),
            pid_file: raw.server.pid_file.map(Spanned::into_inner),
            drain_timeout: self.duration(
                &raw.server.drain_timeout,
                Duration::from_secs(30),
                "drain_timeout",
            ),
            upgrade_timeout: self.duration(
                &raw.server.upgrade_timeout,
                Duration::from_secs(30),
                "upgrade_timeout",
            ),
            // Zero is allowed for these: no idle grace is what the peers do
            // (and loses requests); no settle period is the old behaviour.
            idle_grace: self.any_duration(
                &raw.server.idle_grace,
                Duration::from_secs(1),
                "idle_grace",
            ),
            settle: self.any_duration(&raw.server.settle, Duration::from_secs(2), "settle"),
            migrate: raw.server.migrate.unwrap_or(true),
            workers: raw.server.workers.as_ref().and_then(|w| {
                let n = *w.get_ref();
                match usize::try_from(n) {
                    Ok(n @ 1..=MAX_WORKERS) => Some(n),
                    _ => {
                        self.err(
                            w.span(),
                            format!("workers = {n}: must be from 1 to {MAX_WORKERS}"),
                        );
                        None
                    }
                }
            }),
            runtime: raw.server.runtime.unwrap_or_default(),
        };

        // Upstreams first: listeners and routes refer to them.
        let mut upstreams = BTreeMap::new();
        for (name, up) in raw.upstreams {
            let span = up.span();
            let up = up.into_inner();
            if up.servers.get_ref().is_empty() {
                self.err(
                    up.servers.span(),
                    format!("upstream {name:?} has no servers (an empty pool)"),
                );
            }
            let mut servers = Vec::new();
            let mut seen = HashSet::new();
            for s in up.servers.get_ref() {
                if let Some(a) = self.addr(s, "server") {
                    if !seen.insert(a) {
                        self.err(
                            s.span(),
                            format!("server {a} is listed twice in upstream {name:?}"),
                        );
                    }
                    servers.push(a);
                }
            }
            let tls = self.upstream_tls(&name, &up, &span, path);
            let health_check = up.health_check.map(|h| {
                let h = h.into_inner();
                let path = h.path.map(|p| {
                    if !p.get_ref().starts_with('/') {
                        self.err(p.span(), "health_check path must start with '/'");
                    }
                    p.into_inner()
                });
                HealthCheck {
                    path,
                    interval: self.duration(
                        &h.interval,
                        Duration::from_secs(2),
                        "health_check interval",
                    ),
                    timeout: self.duration(
                        &h.timeout,
                        Duration::from_secs(1),
                        "health_check timeout",
                    ),
                }
            });
            upstreams.insert(
                name.clone(),
                UpstreamConfig {
                    name,
                    servers,
                    balance: up.balance,
                    health_check,
                    fail_timeout: self.duration(
                        &up.fail_timeout,
                        Duration::from_secs(10),
                        "fail_timeout",
                    ),
                    tls,
                },
            );
        }

        let mut listeners = Vec::new();
        let mut names: HashMap<String, ()> = HashMap::new();
        let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
        let admin = raw
            .admin
            .and_then(|a| self.addr(&a.into_inner().address, "admin address"));
        if let Some(a) = admin.filter(|a| a.port() != 0) {
            addrs.insert(a, "[admin]".to_owned());
        }
        if raw.listeners.is_empty() {
            self.err(0..0, "no listeners: add at least one [[listeners]]");
        }
        for l in raw.listeners {
            let span = l.span();
            let l = l.into_inner();
            let name = l.name.get_ref().clone();
            match baton::env::check_listener_name(&name) {
                Ok(()) => {}
                Err(baton::env::BadListenerName::Form) => self.err(
                    l.name.span(),
                    format!("listener name {name:?} must be 1 to 255 characters without ':'"),
                ),
                Err(baton::env::BadListenerName::Reserved) => self.err(
                    l.name.span(),
                    format!("listener name {name:?} is reserved for the control socket"),
                ),
            }
            if names.insert(name.clone(), ()).is_some() {
                self.err(l.name.span(), format!("duplicate listener name {name:?}"));
            }
            if name == ADMIN_LISTENER {
                self.err(
                    l.name.span(),
                    format!("listener name {name:?} is reserved for [admin]"),
                );
            }
            let address = self.addr(&l.address, "listener address");
            if let Some(a) = address {
                // Port 0 asks for a fresh ephemeral port each time: no clash.
                if a.port() != 0 {
                    if let Some(other) = addrs.insert(a, name.clone()) {
                        self.err(
                            l.address.span(),
                            format!("listener {name:?}: address {a} is already used by listener {other:?}"),
                        );
                    }
                }
            }
            let tls = self.tls(
                &name,
                l.protocol,
                &l.certificates,
                &l.tls_min_version,
                &span,
                path,
            );
            let upstream = match (l.protocol, &l.upstream) {
                (Protocol::Tcp, None) => {
                    self.err(
                        span.clone(),
                        format!("tcp listener {name:?} needs an upstream"),
                    );
                    None
                }
                (Protocol::Tcp, Some(u)) => {
                    match upstreams.get(u.get_ref()) {
                        None => self.err(u.span(), format!("unknown upstream {:?}", u.get_ref())),
                        Some(up) if up.tls.is_some() => self.err(
                            u.span(),
                            format!(
                                "tcp listener {name:?} passes bytes through; upstream {:?} has tls = true, which is for http and https listeners",
                                u.get_ref()
                            ),
                        ),
                        Some(_) => {}
                    }
                    Some(u.get_ref().clone())
                }
                (p @ (Protocol::Http | Protocol::Https), Some(u)) => {
                    self.err(
                        u.span(),
                        format!(
                            "{} listener {name:?} takes no upstream; add [[routes]] for it",
                            p.as_str()
                        ),
                    );
                    None
                }
                (Protocol::Http | Protocol::Https, None) => None,
            };
            if let Some(address) = address {
                listeners.push(ListenerConfig {
                    name,
                    address,
                    address_at: self.src.position(l.address.span()),
                    protocol: l.protocol,
                    upstream,
                    tls,
                });
            }
        }

        let mut routes = Vec::new();
        let mut seen_routes = HashSet::new();
        for r in raw.routes {
            let span = r.span();
            let r = r.into_inner();
            let listener = r.listener.get_ref().clone();
            match listeners.iter().find(|l| l.name == listener) {
                None if !names.contains_key(&listener) => {
                    self.err(r.listener.span(), format!("unknown listener {listener:?}"));
                }
                Some(l) if !l.protocol.is_http() => {
                    self.err(
                        r.listener.span(),
                        format!("listener {listener:?} is a tcp listener; routes are for http listeners"),
                    );
                }
                _ => {}
            }
            let host = r.host.map(|h| {
                let host = h.get_ref().trim().to_ascii_lowercase();
                if host.is_empty() || host.contains('/') {
                    self.err(h.span(), format!("invalid host {:?}", h.get_ref()));
                }
                host
            });
            let path_prefix = match r.path_prefix {
                Some(p) => {
                    if !p.get_ref().starts_with('/') {
                        self.err(p.span(), "path_prefix must start with '/'");
                    }
                    p.into_inner()
                }
                None => "/".to_owned(),
            };
            if !seen_routes.insert((listener.clone(), host.clone(), path_prefix.clone())) {
                self.err(
                    span.clone(),
                    format!(
                        "duplicate route: listener {listener:?}, host {}, path_prefix {path_prefix:?} is already routed",
                        host.as_deref().map(|h| format!("{h:?}")).unwrap_or_else(|| "(any)".into())
                    ),
                );
            }
            let action = match (r.upstream, r.respond) {
                (Some(u), None) => {
                    if !upstreams.contains_key(u.get_ref()) {
                        self.err(u.span(), format!("unknown upstream {:?}", u.get_ref()));
                    }
                    Action::Upstream {
                        name: u.into_inner(),
                        strip_prefix: r.strip_prefix,
                    }
                }
                (None, Some(resp)) => self.respond(resp.into_inner()),
                (Some(u), Some(_)) => {
                    self.err(
                        u.span(),
                        "a route has either an upstream or a respond, not both",
                    );
                    continue;
                }
                (None, None) => {
                    self.err(span, "a route needs an upstream or a respond");
                    continue;
                }
            };
            routes.push(RouteConfig {
                listener,
                host,
                path_prefix,
                action,
                timeout: self.duration(&r.timeout, Duration::from_secs(60), "timeout"),
            });
        }

        Config {
            source: path.map(Path::to_path_buf),
            server,
            admin,
            listeners,
            upstreams,
            routes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example configuration shipped with the crate.
    const GOOD: &str = include_str!("../proxy.example.toml");

    #[test]
    fn the_example_config_is_valid() {
        let c = parse(GOOD, Some(Path::new("proxy.toml"))).unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[1].protocol, Protocol::Tcp);
        assert_eq!(c.upstreams["app"].servers.len(), 2);
        assert_eq!(
            c.upstreams["app"].health_check.as_ref().unwrap().interval,
            Duration::from_secs(2)
        );
        assert_eq!(c.routes[0].host.as_deref(), Some("api.example.com"));
        assert_eq!(
            c.server.pid_file.as_deref(),
            Some(Path::new("/run/baton/proxy.pid"))
        );
    }

    #[test]
    fn migrate_defaults_to_true_and_must_be_a_boolean() {
        assert!(builtin().unwrap().server.migrate);
        let c = parse(
            "[server]\nmigrate = false\n\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n",
            None,
        )
        .unwrap();
        assert!(!c.server.migrate);
        let e = parse("[server]\nmigrate = \"no\"\n", Some(Path::new("p.toml"))).unwrap_err();
        assert!(e.to_string().starts_with("p.toml:2:"), "{e}");
    }

    #[test]
    fn runtime_defaults_to_per_worker_and_names_a_bad_model() {
        assert_eq!(builtin().unwrap().server.runtime, RuntimeModel::PerWorker);
        let c = parse(
            "[server]\nruntime = \"multi-thread\"\nworkers = 2\n\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n",
            None,
        )
        .unwrap();
        assert_eq!(c.server.runtime, RuntimeModel::MultiThread);
        assert_eq!(c.server.workers, Some(2));
        let e = parse(
            "[server]\nruntime = \"per-core\"\n",
            Some(Path::new("p.toml")),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("p.toml:2:11:"), "{e}");
        assert!(
            e.contains("multi-thread") && e.contains("per-worker"),
            "{e}"
        );
    }

    #[test]
    fn builtin_is_valid() {
        let c = builtin().unwrap();
        assert_eq!(c.listeners[0].address.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn syntax_error_has_file_line_col() {
        let e = parse("[server]\ndrain_timeout = \n", Some(Path::new("p.toml"))).unwrap_err();
        let p = &e.problems()[0];
        assert_eq!((p.file.as_str(), p.line), ("p.toml", 2), "{e}");
        assert!(e.to_string().starts_with("p.toml:2:"), "{e}");
    }

    #[test]
    fn unknown_key_is_an_error_at_its_line() {
        let text = "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:1\"\nbogus = 1\n";
        let e = parse(text, Some(Path::new("p.toml"))).unwrap_err();
        assert_eq!(e.problems()[0].line, 4, "{e}");
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_position() {
        let text = r#"[[listeners]]
name = "web"
address = "127.0.0.1:8080"

[[listeners]]
name = "web"
address = "127.0.0.1:8080"

[upstreams.empty]
servers = []

[[routes]]
listener = "web"
upstream = "nope"

[[routes]]
listener = "web"
path_prefix = "/x"
upstream = "empty"
timeout = "soon"
"#;
        let e = parse(text, Some(Path::new("bad.toml"))).unwrap_err();
        let lines: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
        let has = |needle: &str, line: usize| {
            lines
                .iter()
                .any(|l| l.contains(needle) && l.starts_with(&format!("bad.toml:{line}:")))
        };
        assert!(has("no servers", 10), "{lines:#?}");
        assert!(has("duplicate listener name", 6), "{lines:#?}");
        assert!(has("already used by listener", 7), "{lines:#?}");
        assert!(has("unknown upstream \"nope\"", 14), "{lines:#?}");
        assert!(has("invalid duration", 20), "{lines:#?}");
        assert_eq!(e.problems()[0].column, 11, "{lines:#?}");
    }

    /// A scratch directory of this test process, removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!("baton-config-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = Scratch::new("kinds");
        let fifo = dir.0.join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RWXU).unwrap();
        let link = dir.0.join("link.toml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        for (path, kind) in [
            (Path::new("/dev/zero"), "a character device"),
            (link.as_path(), "a character device"),
            (fifo.as_path(), "a FIFO"),
            (dir.0.as_path(), "a directory"),
        ] {
            let started = std::time::Instant::now();
            let e = load(path).unwrap_err();
            assert!(
                matches!(&e, ConfigError::NotAFile { kind: k, .. } if *k == kind),
                "{path:?}: {e}"
            );
            assert!(e.to_string().contains("not a regular file"), "{e}");
            assert!(started.elapsed() < Duration::from_secs(2), "{path:?}");
        }
        // A symlink to a regular file is fine.
        let good = dir.0.join("good.toml");
        std::fs::write(&good, GOOD).unwrap();
        let to_good = dir.0.join("to-good.toml");
        std::os::unix::fs::symlink(&good, &to_good).unwrap();
        load(&to_good).unwrap();
    }

    #[test]
    fn files_over_the_cap_are_refused_naming_it() {
        let dir = Scratch::new("cap");
        let big = dir.0.join("big.toml");
        // Sparse: costs no disk.
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_CONFIG_BYTES + 1)
            .unwrap();
        let e = load(&big).unwrap_err();
        assert!(matches!(e, ConfigError::TooLarge { limit, .. } if limit == MAX_CONFIG_BYTES));
        assert!(e.to_string().contains("64 MiB limit"), "{e}");

        let small = dir.0.join("small.toml");
        std::fs::write(&small, [b'#'; 17]).unwrap();
        assert!(matches!(
            read_regular(&small, 16),
            Err(ConfigError::TooLarge { .. })
        ));
        assert_eq!(read_regular(&small, 17).unwrap().len(), 17);
        // A file whose size fstat does not tell (0 for /proc files) is
        // bounded by the bytes read.
        assert!(matches!(
            read_regular(Path::new("/proc/self/status"), 16),
            Err(ConfigError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_stuck_read_times_out_without_blocking_later_ones_and_stuck_reads_are_bounded() {
        static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
        let deadline = Duration::from_millis(200);
        let mut release = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            release.push(tx);
            let started = std::time::Instant::now();
            let r = with_deadline(&IN_FLIGHT, 2, deadline, move || rx.recv().is_ok());
            assert!(matches!(r, Err(Abandoned::TimedOut)), "{r:?}");
            assert!(started.elapsed() < Duration::from_secs(2));
        }
        // Two stuck: the limit. The next is refused at once.
        let r = with_deadline(&IN_FLIGHT, 2, deadline, || true);
        assert!(matches!(r, Err(Abandoned::TooMany(2))), "{r:?}");
        // One of them finishes: its slot is free again, and a read works.
        drop(release.remove(0));
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while IN_FLIGHT.load(Ordering::SeqCst) > 1 {
            assert!(std::time::Instant::now() < until, "the slot was not freed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(with_deadline(&IN_FLIGHT, 2, deadline, || true).unwrap());
        drop(release);
    }

    #[test]
    fn invalid_utf8_is_reported_at_the_first_bad_byte() {
        let bytes = b"[[listeners]]\nname = \"w\xc3\xa9b\xff\"\n";
        let e = decode(bytes, Path::new("p.toml")).unwrap_err();
        // Column in characters: `name = "w` is 9, `é` one more, `b` one more.
        assert_eq!(
            e.to_string(),
            "p.toml:2:12: invalid UTF-8 (byte 0xff): a configuration file must be UTF-8"
        );
    }

    fn respond_problems(respond: &str) -> Vec<String> {
        let text = format!("[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:1\"\n\n[[routes]]\nlistener = \"web\"\nrespond = {respond}\n");
        match parse(&text, Some(Path::new("p.toml"))) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems().iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn respond_needs_a_final_status_and_no_body_where_http_has_none() {
        for status in [0, 100, 101, 199, 600, 999] {
            let p = respond_problems(&format!("{{ status = {status} }}"));
            assert_eq!(
                p,
                [format!("p.toml:7:22: invalid status {status}: a fixed response needs a status from 200 to 599")],
                "{status}"
            );
        }
        for status in [204, 205, 304] {
            let p = respond_problems(&format!("{{ status = {status}, body = \"x\" }}"));
            assert_eq!(
                p,
                [format!("p.toml:7:34: a {status} response has no body; remove `body` or use another status")]
            );
            assert!(respond_problems(&format!("{{ status = {status} }}")).is_empty());
            assert!(respond_problems(&format!("{{ status = {status}, body = \"\" }}")).is_empty());
        }
        for status in [200, 404, 503, 599] {
            assert!(respond_problems(&format!("{{ status = {status}, body = \"x\" }}")).is_empty());
        }
        let p = respond_problems("{ status = 200, content_type = \"text/plain\\r\\nX-Evil: 1\" }");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("p.toml:7:42: content_type"), "{p:?}");
    }

    #[test]
    fn listeners_know_where_their_address_is_written() {
        let c = parse(GOOD, Some(Path::new("proxy.toml"))).unwrap();
        let line = GOOD
            .lines()
            .position(|l| {
                l.starts_with("address") && l.contains(&c.listeners[1].address.to_string())
            })
            .unwrap()
            + 1;
        assert_eq!(
            c.listeners[1].address_at.to_string(),
            format!("proxy.toml:{line}:11")
        );
    }

    #[test]
    fn bind_warnings_name_an_address_in_use_at_its_position() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let text = format!("[[listeners]]\nname = \"free\"\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"taken\"\naddress = \"{addr}\"\n\n[[routes]]\nlistener = \"free\"\nrespond = {{ status = 200 }}\n");
        let c = parse(&text, Some(Path::new("p.toml"))).unwrap();
        let w: Vec<String> = bind_warnings(&c).iter().map(|p| p.to_string()).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(&format!(
                "p.toml:7:11: warning: listener \"taken\": address {addr} is in use"
            )),
            "{w:?}"
        );
        drop(held);
        assert!(bind_warnings(&c).is_empty());
    }

    #[test]
    fn tcp_listener_needs_a_known_upstream() {
        let text = "[[listeners]]\nname = \"db\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\nupstream = \"pg\"\n";
        let e = parse(text, None).unwrap_err();
        assert!(
            e.to_string()
                .contains("<built-in>:5:12: unknown upstream \"pg\""),
            "{e}"
        );
    }
}
