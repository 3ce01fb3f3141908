//! Supervisor settings, validated.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use baton::ListenSpec;

use crate::Error;

/// How the supervisor knows a child is ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyMode {
    /// The child gets a private `NOTIFY_SOCKET` and sends `READY=1`, as
    /// under systemd.
    Notify,
    /// Connect to this address until it accepts. `{VAR}` is replaced by the
    /// value of a `--port-env` variable given to the child, and with
    /// `--http`, `{listen:NAME}` by the child's own address for listener
    /// NAME.
    Tcp(String),
    /// `GET` this URL until it answers with a status below 500. `{VAR}` as
    /// for `Tcp`.
    Http(String),
    /// Wait this long (and the child must still be running).
    Delay(Duration),
}

impl std::str::FromStr for ReadyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "notify" {
            Ok(ReadyMode::Notify)
        } else if let Some(a) = s.strip_prefix("tcp:") {
            Ok(ReadyMode::Tcp(a.to_owned()))
        } else if let Some(u) = s.strip_prefix("http:") {
            let url = if u.starts_with("//") {
                format!("http:{u}")
            } else {
                u.to_owned()
            };
            if !url.starts_with("http://") {
                return Err(format!("{s:?}: expected http:http://HOST:PORT/PATH"));
            }
            Ok(ReadyMode::Http(url))
        } else if let Some(d) = s.strip_prefix("delay:") {
            parse_duration(d).map(ReadyMode::Delay)
        } else {
            Err(format!(
                "{s:?}: expected notify, tcp:ADDR, http:URL or delay:DURATION"
            ))
        }
    }
}

/// With `--http`, `{listen:NAME}` in a `--ready` address or URL is the
/// child's own address for listener NAME (`127.0.0.1:PORT`).
pub(crate) const BACKEND_VAR: &str = "listen:";

/// A duration like `500ms`, `2s`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))
}

/// One `--listen NAME=ADDR`, possibly with a `--port-env NAME=VAR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The name the child sees in `LISTEN_FDNAMES`.
    pub name: String,
    /// Where the supervisor binds.
    pub spec: ListenSpec,
    /// With `--port-env`: the variable that carries the child's own port;
    /// the supervisor forwards connections to it instead of passing the fd.
    pub port_env: Option<String>,
    /// With `--http` (TCP listeners only): the supervisor serves the
    /// clients itself and forwards their requests to the current child,
    /// which gets a private loopback socket of its own (or its
    /// `--port-env` port) instead of this one.
    pub http: bool,
}

/// Everything `baton run` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Program and arguments.
    pub command: Vec<OsString>,
    /// The sockets to hold.
    pub listeners: Vec<Listener>,
    /// Readiness check.
    pub ready: ReadyMode,
    /// How long a child may take to be ready.
    pub ready_timeout: Duration,
    /// Signal that asks a child to stop gracefully.
    pub stop_signal: i32,
    /// How long a stopping child may take before SIGKILL.
    pub drain_timeout: Duration,
    /// Replace a child that dies (with back-off) instead of exiting.
    pub restart_on_crash: bool,
    /// After a reload, how long the new child must stay up (once ready)
    /// before the old one is stopped and the reload answered.
    pub settle: Duration,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Pid file path (the supervisor's pid).
    pub pid_file: Option<PathBuf>,
    /// Take the sockets over from the supervisor serving the control
    /// socket, if one does.
    pub takeover: bool,
    /// Serve `/healthz` and `/readyz` here.
    pub admin: Option<ListenSpec>,
    /// `TCP_NODELAY` on the TCP listeners it binds (accepted sockets
    /// inherit it).
    pub no_delay: bool,
    /// `--http` was given (see [`Listener::http`]).
    pub http: bool,
}

/// Raw options, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Program and arguments.
    pub command: Vec<OsString>,
    /// `NAME=ADDR` pairs.
    pub listen: Vec<String>,
    /// `NAME=VAR` pairs.
    pub port_env: Vec<String>,
    /// `--ready` (default: a TCP probe of the child's ports with
    /// `--port-env`, else `delay:1s`).
    pub ready: Option<String>,
    /// `--ready-timeout` (default 30 s).
    pub ready_timeout: Option<Duration>,
    /// `--stop-signal` (default TERM).
    pub stop_signal: Option<String>,
    /// `--drain-timeout` (default 30 s).
    pub drain_timeout: Option<Duration>,
    /// `--restart-on-crash`.
    pub restart_on_crash: bool,
    /// `--settle` (default 2 s).
    pub settle: Option<Duration>,
    /// `--control-socket`.
    pub control_socket: Option<PathBuf>,
    /// `--pid-file`.
    pub pid_file: Option<PathBuf>,
    /// `--takeover`.
    pub takeover: bool,
    /// `--admin ADDR`.
    pub admin: Option<String>,
    /// `--no-delay=false` turns `TCP_NODELAY` off (`None`: on).
    pub no_delay: Option<bool>,
    /// `--http`: serve HTTP on the TCP listeners and forward requests to
    /// the current child.
    pub http: bool,
}

/// Parses `HUP`, `SIGHUP`, `sigterm`, `1` ([`baton::signals::parse`]).
pub fn parse_signal(s: &str) -> Result<i32, String> {
    baton::signals::parse(s).ok_or_else(|| format!("{s:?}: unknown signal"))
}

impl Options {
    /// Checks the options and builds a [`Config`].
    pub fn validate(self) -> Result<Config, Error> {
        let bad = |m: String| Error::Config(m);
        if self.command.is_empty() {
            return Err(bad(
                "no command given (baton run [OPTIONS] -- COMMAND [ARGS...])".into(),
            ));
        }
        let mut listeners: Vec<Listener> = Vec::new();
        for l in &self.listen {
            let (name, addr) = l
                .split_once('=')
                .ok_or_else(|| bad(format!("--listen {l:?}: expected NAME=ADDR")))?;
            baton::env::check_listener_name(name)
                .map_err(|e| bad(format!("--listen {l:?}: {}", e.reason())))?;
            if listeners.iter().any(|x| x.name == name) {
                return Err(bad(format!("--listen {l:?}: duplicate name {name:?}")));
            }
            let spec: ListenSpec = addr
                .parse()
                .map_err(|e| bad(format!("--listen {l:?}: {e}")))?;
            listeners.push(Listener {
                name: name.to_owned(),
                http: self.http && spec.kind == baton::ListenerKind::Tcp,
                spec,
                port_env: None,
            });
        }
        for p in &self.port_env {
            let (name, var) = p
                .split_once('=')
                .ok_or_else(|| bad(format!("--port-env {p:?}: expected NAME=VAR")))?;
            let l = listeners
                .iter_mut()
                .find(|l| l.name == name)
                .ok_or_else(|| bad(format!("--port-env {p:?}: no --listen named {name:?}")))?;
            if l.spec.kind != baton::ListenerKind::Tcp {
                return Err(bad(format!(
                    "--port-env {p:?}: only TCP listeners can be forwarded"
                )));
            }
            if var.is_empty() {
                return Err(bad(format!("--port-env {p:?}: empty variable name")));
            }
            l.port_env = Some(var.to_owned());
        }
        if self.http && !listeners.iter().any(|l| l.http) {
            return Err(bad(
                "--http: no TCP --listen to serve HTTP on (the others are passed as fds)".into(),
            ));
        }
        let ready = match self.ready {
            Some(r) => r.parse().map_err(|e| bad(format!("--ready {e}")))?,
            None => match (
                listeners.iter().find(|l| l.http),
                listeners.iter().find_map(|l| l.port_env.clone()),
            ) {
                // The child answers HTTP on its own socket.
                (Some(l), _) => ReadyMode::Http(format!("http://{{{}{}}}/", BACKEND_VAR, l.name)),
                (None, Some(var)) => ReadyMode::Tcp(format!("127.0.0.1:{{{var}}}")),
                (None, None) => ReadyMode::Delay(Duration::from_secs(1)),
            },
        };
        if self.takeover && self.control_socket.is_none() {
            return Err(bad(
                "--takeover needs --control-socket (where the running supervisor is asked)".into(),
            ));
        }
        let admin = match &self.admin {
            None => None,
            Some(a) => {
                let spec: ListenSpec = a.parse().map_err(|e| bad(format!("--admin {a:?}: {e}")))?;
                if spec.kind != baton::ListenerKind::Tcp {
                    return Err(bad(format!("--admin {a:?}: a TCP address (HOST:PORT)")));
                }
                Some(spec)
            }
        };
        let stop_signal = match self.stop_signal {
            Some(s) => parse_signal(&s).map_err(|e| bad(format!("--stop-signal {e}")))?,
            None => libc::SIGTERM,
        };
        Ok(Config {
            command: self.command,
            listeners,
            ready,
            ready_timeout: self.ready_timeout.unwrap_or(Duration::from_secs(30)),
            stop_signal,
            drain_timeout: self.drain_timeout.unwrap_or(Duration::from_secs(30)),
            restart_on_crash: self.restart_on_crash,
            settle: self.settle.unwrap_or(Duration::from_secs(2)),
            control_socket: self.control_socket,
            pid_file: self.pid_file,
            takeover: self.takeover,
            admin,
            no_delay: self.no_delay.unwrap_or(true),
            http: self.http,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(listen: &[&str], port_env: &[&str]) -> Options {
        Options {
            command: vec!["true".into()],
            listen: listen.iter().map(|s| s.to_string()).collect(),
            port_env: port_env.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        }
    }

    #[test]
    fn validates_listeners_and_port_env() {
        let c = opts(&["web=tcp://127.0.0.1:0", "dns=udp://127.0.0.1:0"], &[])
            .validate()
            .unwrap();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.ready, ReadyMode::Delay(Duration::from_secs(1)));
        let c = opts(&["web=127.0.0.1:0"], &["web=PORT"])
            .validate()
            .unwrap();
        assert_eq!(c.ready, ReadyMode::Tcp("127.0.0.1:{PORT}".into()));
        assert!(opts(&["web"], &[]).validate().is_err());
        assert!(opts(&["web=ftp://x"], &[]).validate().is_err());
        assert!(opts(&["a=127.0.0.1:0", "a=127.0.0.1:1"], &[])
            .validate()
            .is_err());
        assert!(opts(&["a=127.0.0.1:0"], &["b=PORT"]).validate().is_err());
        assert!(opts(&["a=udp://127.0.0.1:0"], &["a=PORT"])
            .validate()
            .is_err());
        let mut o = opts(&[], &[]);
        o.command.clear();
        assert!(o.validate().is_err());
    }

    #[test]
    fn http_applies_to_tcp_listeners_and_probes_the_child() {
        let mut o = opts(&["web=127.0.0.1:0", "dns=udp://127.0.0.1:0"], &[]);
        o.http = true;
        let c = o.validate().unwrap();
        assert!(c.listeners[0].http);
        assert!(!c.listeners[1].http, "UDP is passed as an fd");
        assert_eq!(c.ready, ReadyMode::Http("http://{listen:web}/".into()));
        let mut o = opts(&["dns=udp://127.0.0.1:0"], &[]);
        o.http = true;
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("--http: no TCP --listen"), "{e}");
        let mut o = opts(&["web=127.0.0.1:0"], &[]);
        o.http = true;
        o.ready = Some("notify".into());
        assert_eq!(o.validate().unwrap().ready, ReadyMode::Notify);
    }

    #[test]
    fn parses_ready_modes_and_signals() {
        assert_eq!("notify".parse::<ReadyMode>().unwrap(), ReadyMode::Notify);
        assert_eq!(
            "http:http://127.0.0.1:{PORT}/health"
                .parse::<ReadyMode>()
                .unwrap(),
            ReadyMode::Http("http://127.0.0.1:{PORT}/health".into())
        );
        assert_eq!(
            "delay:250ms".parse::<ReadyMode>().unwrap(),
            ReadyMode::Delay(Duration::from_millis(250))
        );
        assert!("sometimes".parse::<ReadyMode>().is_err());
        assert_eq!(parse_signal("SIGQUIT").unwrap(), 3);
        assert_eq!(parse_signal("term").unwrap(), 15);
        assert!(parse_signal("NOPE").is_err());
    }
}
