//! Benchmark options: the raw [`BenchOptions`] a caller fills in, validated
//! into the [`BenchConfig`] the rest of the crate uses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// How client connections are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each client keeps one HTTP/1.1 connection open and sends its requests
    /// on it one after the other. When the server ends a response with
    /// `Connection: close` (or answers HTTP/1.0 without keep-alive) the client
    /// reads that response to its end and reconnects for the next request;
    /// this is not an error.
    #[serde(rename = "keepalive")]
    KeepAlive,
    /// Every request opens a new TCP connection and carries
    /// `Connection: close`.
    Close,
}

impl Mode {
    /// The name used on the command line and in the JSON document.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keepalive",
            Mode::Close => "close",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "keepalive" | "keep-alive" => Ok(Mode::KeepAlive),
            "close" => Ok(Mode::Close),
            other => Err(BenchError::config(format!(
                "unknown mode {other:?}, expected \"keepalive\" or \"close\""
            ))),
        }
    }
}

/// How a restart of the server under test is triggered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RestartAction {
    /// Run `sh -c <command>`; the restart ends when the command exits and its
    /// exit status is recorded.
    Command {
        /// The shell command line.
        command: String,
    },
    /// Read a pid from `pid_file` at the moment of the restart and send it
    /// `signal`; the restart counts as done when the signal is sent.
    Signal {
        /// The signal number (see [`parse_signal`]).
        signal: i32,
        /// File holding the decimal pid of the process to signal.
        pid_file: PathBuf,
    },
    /// Send `{"command":"<action>"}` to a Baton control socket and wait for
    /// its one-line JSON answer; the restart ends when the answer arrives.
    Control {
        /// Path of the Unix stream socket.
        socket: PathBuf,
        /// `"upgrade"` or `"reload"`.
        action: String,
    },
}

impl RestartAction {
    /// A [`RestartAction::Command`].
    pub fn command(command: impl Into<String>) -> Self {
        RestartAction::Command {
            command: command.into(),
        }
    }

    /// A [`RestartAction::Signal`].
    pub fn signal(signal: i32, pid_file: impl Into<PathBuf>) -> Self {
        RestartAction::Signal {
            signal,
            pid_file: pid_file.into(),
        }
    }

    /// A [`RestartAction::Control`].
    pub fn control(socket: impl Into<PathBuf>, action: impl Into<String>) -> Self {
        RestartAction::Control {
            socket: socket.into(),
            action: action.into(),
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        match self {
            RestartAction::Command { command } if command.trim().is_empty() => {
                Err(BenchError::config("restart command is empty"))
            }
            RestartAction::Signal { signal, .. }
                if rustix::process::Signal::from_named_raw(*signal).is_none() =>
            {
                Err(BenchError::config(format!(
                    "unknown signal number {signal}"
                )))
            }
            RestartAction::Control { action, .. } if action != "upgrade" && action != "reload" => {
                Err(BenchError::config(format!(
                    "unknown control action {action:?}, expected \"upgrade\" or \"reload\""
                )))
            }
            _ => Ok(()),
        }
    }
}

/// Where the load goes: parsed from an `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    addr: SocketAddr,
    authority: String,
    path: String,
}

impl Target {
    /// Parse `http://HOST[:PORT][/PATH]`.
    ///
    /// `HOST` is an IPv4 address, a bracketed IPv6 address or `localhost`
    /// (which means 127.0.0.1); no name resolution is done. The port
    /// defaults to 80 and the path to `/`. `https://`, user info and
    /// fragments are rejected.
    pub fn parse(url: &str) -> Result<Self, BenchError> {
        let rest = match url.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &url[7..],
            _ => {
                return Err(BenchError::config(format!(
                    "url {url:?} must start with http:// (https is not supported)"
                )))
            }
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if path.contains('#') {
            return Err(BenchError::config(format!(
                "url {url:?} has a fragment, which is never sent"
            )));
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(BenchError::config(format!(
                "url {url:?} has whitespace or control characters in its path"
            )));
        }
        if authority.contains('@') {
            return Err(BenchError::config(format!(
                "url {url:?} has user info, which is not supported"
            )));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| {
            BenchError::config(format!("url {url:?} has an invalid host or port"))
        })?;
        let ip = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse::<IpAddr>().map_err(|e| {
                BenchError::config_with(
                    format!("url host {host:?} must be an IP address or localhost"),
                    e,
                )
            })?
        };
        Ok(Target {
            addr: SocketAddr::new(ip, port),
            authority: authority.to_owned(),
            path,
        })
    }

    /// The socket address connections go to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `Host` header value: the URL's authority as written.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The request target (path and query), at least `/`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Split `host[:port]` or `[v6][:port]`; `None` if malformed.
fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6.find(']')?;
        let host = &v6[..end];
        match &v6[end + 1..] {
            "" => (host, None),
            rest => (host, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        None => 80,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0)?,
    };
    Some((host, port))
}

/// What a caller (typically the `baton bench` command line) asks for.
///
/// Fill it in, starting from [`BenchOptions::new`], and call
/// [`BenchOptions::validate`]; [`run`](crate::run) takes the result.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// `http://HOST[:PORT][/PATH]`, see [`Target::parse`].
    pub url: String,
    /// Keep-alive or one connection per request. Default: keep-alive.
    pub mode: Mode,
    /// Number of concurrent clients (connections). Default: 16.
    pub concurrency: usize,
    /// Fixed total request rate across all clients, in requests per second.
    /// `None` (the default) sends as fast as the server answers.
    pub rate: Option<f64>,
    /// Length of the measured load window. Default: 10 s.
    pub duration: Duration,
    /// Load sent before the measured window and not counted. Default: 0.
    pub warmup: Duration,
    /// How many restarts to fire, evenly spaced inside the measured window.
    /// Default: 0.
    pub restarts: usize,
    /// How restarts are triggered; required when `restarts > 0`.
    pub restart: Option<RestartAction>,
    /// Bound on one request, from the start of its connect (or send, on a
    /// reused connection) to the last byte of the response. Default: 5 s.
    pub timeout: Duration,
    /// Bound on one restart action (a command that runs longer is killed,
    /// a control socket that does not answer is abandoned). Default: 120 s.
    pub restart_timeout: Duration,
    /// How long after a restart ends its window still lasts. Default: 1 s.
    pub window_margin: Duration,
}

impl BenchOptions {
    /// Options with the defaults documented on each field.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            mode: Mode::KeepAlive,
            concurrency: 16,
            rate: None,
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            restarts: 0,
            restart: None,
            timeout: Duration::from_secs(5),
            restart_timeout: Duration::from_secs(120),
            window_margin: Duration::from_secs(1),
        }
    }

    /// Check the options and turn them into a [`BenchConfig`].
    pub fn validate(self) -> Result<BenchConfig, BenchError> {
        let target = Target::parse(&self.url)?;
        if self.concurrency == 0 {
            return Err(BenchError::config("concurrency must be at least 1"));
        }
        if self.concurrency > 100_000 {
            return Err(BenchError::config("concurrency must be at most 100000"));
        }
        if let Some(rate) = self.rate {
            if !rate.is_finite() || rate <= 0.0 {
                return Err(BenchError::config(format!(
                    "rate must be a positive number of requests per second, got {rate}"
                )));
            }
        }
        if self.duration.is_zero() {
            return Err(BenchError::config("duration must be positive"));
        }
        if self.timeout.is_zero() {
            return Err(BenchError::config("timeout must be positive"));
        }
        if self.restart_timeout.is_zero() {
            return Err(BenchError::config("restart timeout must be positive"));
        }
        match &self.restart {
            None if self.restarts > 0 => {
                return Err(BenchError::config(
                    "restarts were requested but no restart action was given",
                ))
            }
            Some(action) => action.validate()?,
            None => {}
        }
        Ok(BenchConfig {
            url: self.url,
            target,
            mode: self.mode,
            concurrency: self.concurrency,
            rate: self.rate,
            duration: self.duration,
            warmup: self.warmup,
            restarts: self.restarts,
            restart: self.restart,
            timeout: self.timeout,
            restart_timeout: self.restart_timeout,
            window_margin: self.window_margin,
        })
    }
}

/// Validated benchmark configuration; build one with
/// [`BenchOptions::validate`].
#[derive(Debug, Clone)]
pub struct BenchConfig {
    url: String,
    target: Target,
    mode: Mode,
    concurrency: usize,
    rate: Option<f64>,
    duration: Duration,
    warmup: Duration,
    restarts: usize,
    restart: Option<RestartAction>,
    timeout: Duration,
    restart_timeout: Duration,
    window_margin: Duration,
}

impl BenchConfig {
    /// The URL as given.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// The parsed URL.
    pub fn target(&self) -> &Target {
        &self.target
    }
    /// See [`BenchOptions::mode`].
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// See [`BenchOptions::concurrency`].
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }
    /// See [`BenchOptions::rate`].
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }
    /// See [`BenchOptions::duration`].
    pub fn duration(&self) -> Duration {
        self.duration
    }
    /// See [`BenchOptions::warmup`].
    pub fn warmup(&self) -> Duration {
        self.warmup
    }
    /// See [`BenchOptions::restarts`]. Zero when no action is configured.
    pub fn restarts(&self) -> usize {
        if self.restart.is_some() {
            self.restarts
        } else {
            0
        }
    }
    /// See [`BenchOptions::restart`].
    pub fn restart(&self) -> Option<&RestartAction> {
        self.restart.as_ref()
    }
    /// See [`BenchOptions::timeout`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// See [`BenchOptions::restart_timeout`].
    pub fn restart_timeout(&self) -> Duration {
        self.restart_timeout
    }
    /// See [`BenchOptions::window_margin`].
    pub fn window_margin(&self) -> Duration {
        self.window_margin
    }
}

/// Parse a duration such as `"10s"`, `"500ms"` or `"1m 30s"` (humantime
/// syntax).
pub fn parse_duration(s: &str) -> Result<Duration, BenchError> {
    humantime::parse_duration(s.trim())
        .map_err(|e| BenchError::config_with(format!("invalid duration {s:?}"), e))
}

/// Parse a signal given as a name (`"HUP"`, `"SIGUSR2"`, case-insensitive)
/// or a number (`"1"`) into its number ([`baton::signals::parse`]).
pub fn parse_signal(s: &str) -> Result<i32, BenchError> {
    baton::signals::parse(s)
        .ok_or_else(|| BenchError::config(format!("unknown signal {:?}", s.trim())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("http://127.0.0.1:8080/a/b?c=d").unwrap();
        assert_eq!(t.addr(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.authority(), "127.0.0.1:8080");
        assert_eq!(t.path(), "/a/b?c=d");

        let t = Target::parse("http://localhost").unwrap();
        assert_eq!(t.addr(), "127.0.0.1:80".parse().unwrap());
        assert_eq!(t.path(), "/");

        let t = Target::parse("HTTP://[::1]:9000?x").unwrap();
        assert_eq!(t.addr(), "[::1]:9000".parse().unwrap());
        assert_eq!(t.path(), "/?x");

        for bad in [
            "https://127.0.0.1/",
            "127.0.0.1:80",
            "http://example.com/",
            "http://127.0.0.1:0/",
            "http://127.0.0.1:99999/",
            "http://u@127.0.0.1/",
            "http:///x",
            "http://127.0.0.1/#frag",
            "http://[::1/",
        ] {
            assert!(Target::parse(bad).unwrap_err().is_config(), "{bad}");
        }
    }

    #[test]
    fn validates_options() {
        let ok = BenchOptions::new("http://127.0.0.1:1/");
        assert!(ok.clone().validate().is_ok());

        let mut o = ok.clone();
        o.concurrency = 0;
        assert!(o.validate().unwrap_err().is_config());

        let mut o = ok.clone();
        o.rate = Some(f64::NAN);
        assert!(o.validate().unwrap_err().is_config());

        let mut o = ok.clone();
        o.restarts = 2;
        assert!(o.validate().unwrap_err().is_config());

        let mut o = ok.clone();
        o.restarts = 1;
        o.restart = Some(RestartAction::control("/tmp/x", "explode"));
        assert!(o.validate().unwrap_err().is_config());

        let mut o = ok;
        o.restarts = 1;
        o.restart = Some(RestartAction::signal(parse_signal("hup").unwrap(), "/x"));
        assert_eq!(o.validate().unwrap().restarts(), 1);
    }

    #[test]
    fn parses_durations_signals_modes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("ten").is_err());
        assert_eq!(
            parse_signal("SIGUSR2").unwrap(),
            rustix::process::Signal::USR2.as_raw()
        );
        assert_eq!(parse_signal("1").unwrap(), 1);
        assert!(parse_signal("SIGNOPE").is_err());
        assert_eq!("close".parse::<Mode>().unwrap(), Mode::Close);
        assert!("pipelined".parse::<Mode>().is_err());
    }
}
