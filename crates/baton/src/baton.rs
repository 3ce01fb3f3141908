//! The [`Baton`] handle: listeners, readiness, upgrade, reload, stop.

use std::ffi::OsString;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use socket2::Socket;
use tokio::sync::watch;

use crate::control::{self, Outcome, Request};
use crate::drain::{Drain, DrainOutcome, Shutdown};
use crate::env;
use crate::error::{BoxError, Error, ReloadError, UpgradeError};
use crate::handoff::{
    self, ChildHandshake, Handover, NextGeneration, ParentLink, ReadyChild, Upgraded, Watched,
};
use crate::listeners::{self, Held, Inherited, InheritedFd, ListenerInfo, ListenerKind, Want};
use crate::notify;
use crate::pidfile;
use crate::sync::lock;
use crate::sys;

/// Where a generation is in its life. Watch it with [`Baton::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Binding or inheriting listeners; the previous generation (if any) is
    /// still the active one.
    Starting,
    /// The active generation: accepting, answering the control socket.
    Active,
    /// No longer accepting; finishing what is in flight.
    Draining(StopReason),
    /// Drained and exit hooks run; the process should exit now.
    Stopped(StopReason),
}

impl State {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Active => "active",
            State::Draining(_) => "draining",
            State::Stopped(_) => "stopped",
        }
    }
}

/// Why a generation stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A new generation took over.
    Upgraded {
        /// Its pid.
        pid: u32,
        /// Its generation number.
        generation: u64,
    },
    /// A graceful stop (SIGTERM, SIGQUIT, control `stop`): drain, then exit.
    Graceful,
    /// A fast stop (SIGINT): close everything now.
    Fast,
}

/// An upgrade in flight, as a stop sees it.
#[derive(Debug)]
struct InFlight {
    /// Cancelled by a stop that arrives before the new generation is ready.
    abort: tokio_util::sync::CancellationToken,
    /// Set once the new generation was told to take over.
    handed: bool,
    /// A stop that arrived after the hand-over, to pass on to the new
    /// generation.
    pass_on: Option<StopReason>,
}

/// Where the next generation comes from.
enum How {
    /// Started by this one (fork + exec), from this binary or another.
    Spawn(Option<PathBuf>),
    /// Started by someone else; it asked on this connection.
    TakeOver(tokio::net::UnixStream),
}

impl How {
    fn label(&self) -> &'static str {
        match self {
            How::Spawn(_) => "upgrade",
            How::TakeOver(_) => "take-over",
        }
    }
}

/// How long the old generation waits for the new one to confirm that it is
/// active, after telling it to take over.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

type ExitHook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;
type StatusHook = Arc<dyn Fn() -> Value + Send + Sync>;
/// What a [`Baton::pass_on`] registers: how to export the state, how to
/// take it in.
type PassOn = (
    Arc<dyn Fn() -> Value + Send + Sync>,
    Arc<dyn Fn(Value) + Send + Sync>,
);
type MetricsHook = Arc<dyn Fn(&mut String) + Send + Sync>;
type ReloadHandler =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>> + Send + Sync>;

/// Settings for a [`Baton`]; see [`Baton::builder`].
#[derive(Debug, Clone)]
pub struct Builder {
    drain_timeout: Duration,
    upgrade_timeout: Duration,
    idle_grace: Duration,
    exit_hook_timeout: Duration,
    settle: Duration,
    pid_file: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    takeover: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            drain_timeout: Duration::from_secs(30),
            upgrade_timeout: Duration::from_secs(30),
            idle_grace: Duration::from_secs(1),
            exit_hook_timeout: Duration::from_secs(10),
            settle: Duration::from_secs(2),
            pid_file: None,
            control_socket: None,
            takeover: false,
        }
    }
}

impl Builder {
    /// How long a stopping generation waits for in-flight work before it
    /// closes what remains (default 30 s).
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// How long an upgrade waits for the new generation to be ready before
    /// killing it and rolling back (default 30 s).
    pub fn upgrade_timeout(mut self, d: Duration) -> Self {
        self.upgrade_timeout = d;
        self
    }

    /// How long an idle keep-alive connection stays open once draining
    /// begins (default 1 s). A request that arrives in that time is answered
    /// with `Connection: close`.
    pub fn idle_grace(mut self, d: Duration) -> Self {
        self.idle_grace = d;
        self
    }

    /// How long exit hooks may run, all together (default 10 s).
    pub fn exit_hook_timeout(mut self, d: Duration) -> Self {
        self.exit_hook_timeout = d;
        self
    }

    /// How long, after a new generation became active, this one keeps its
    /// listening sockets (not accepting) and watches the new one (default
    /// 2 s). If the new generation exits within it, this one takes the
    /// service back: it accepts again (accept loops that wait in
    /// [`Shutdown::resumed`]), writes the pid file, serves the control
    /// socket, and records the failed upgrade in `status`. It does not exit
    /// before the settle period has passed, even with nothing to drain.
    /// Zero: close the sockets at the hand-over, as without a settle period.
    pub fn settle(mut self, d: Duration) -> Self {
        self.settle = d;
        self
    }

    /// Write the active generation's pid here (atomically) when it becomes
    /// active.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// Serve the control protocol on a Unix socket at this path (mode 0600).
    /// The socket is handed to each next generation.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control_socket = Some(path.into());
        self
    }

    /// Take over from the generation that serves the control socket, if one
    /// does (default off; needs [`control_socket`](Self::control_socket)).
    /// For a process started by someone else (a deploy script, a service
    /// manager, a new container): [`from_env`](Self::from_env) asks the
    /// running generation for its listeners and control socket, and
    /// [`ready`](Baton::ready) runs the same handshake as after an upgrade.
    /// If nothing listens on the control socket, this process starts on its
    /// own (binds), so one command line serves the first start and every
    /// deploy. If something answers there but does not hand over (refused,
    /// timed out after the upgrade timeout), `from_env` fails with
    /// [`Error::Takeover`] and nothing is bound. Not attempted by a
    /// generation started by an upgrade, or one given sockets by a service
    /// manager (`LISTEN_FDS`).
    pub fn takeover(mut self, yes: bool) -> Self {
        self.takeover = yes;
        self
    }

    /// Reads the environment (inherited fds, handshake, generation) and
    /// builds the handle. Call once per process, inside a tokio runtime.
    pub fn from_env(self) -> Result<Baton, Error> {
        Baton::build(self)
    }
}

pub(crate) struct Inner {
    settings: Builder,
    generation: u64,
    pid: u32,
    started: Instant,
    started_wall: SystemTime,
    exe: PathBuf,
    args: Vec<OsString>,
    first_start: bool,
    /// Started by someone else, it took over over the control socket.
    taken_over: bool,
    inherited: Mutex<Inherited>,
    held: Mutex<Vec<(Held, bool)>>,
    control: Mutex<Option<(PathBuf, OwnedFd, bool)>>,
    handshake: Mutex<Option<ChildHandshake>>,
    state: watch::Sender<State>,
    /// True while an upgrade is in flight, from the request to its answer;
    /// [`Baton::wait`] does not return before it is false again.
    upgrading: watch::Sender<bool>,
    /// The upgrade in flight, where a stop finds it. Every state change
    /// that races an upgrade (a stop, the hand-over) happens under this lock.
    in_flight: Mutex<Option<InFlight>>,
    /// Set once a next generation took the sockets: from then on the pid
    /// file and the control socket path belong to it.
    handed_over: AtomicBool,
    /// Set by the first call of `ready`.
    ready_called: AtomicBool,
    /// True while this generation, having handed over, watches the new one
    /// for the settle period; [`Baton::wait`] waits for the outcome.
    settling: watch::Sender<bool>,
    /// Cancelled by a stop during the settle period: no take-back then.
    settle_cancel: tokio_util::sync::CancellationToken,
    /// When draining began (the drain timeout counts from then).
    draining_since: Mutex<Option<Instant>>,
    /// The handshake to the previous generation, kept open after the
    /// hand-over so that a stop or upgrade can be announced to it.
    parent_link: Mutex<Option<ParentLink>>,
    /// The service's metrics (`/metrics`).
    metrics: crate::metrics::Metrics,
    metrics_hook: Mutex<Option<MetricsHook>>,
    /// The previous generation, until it exits.
    draining: Mutex<Vec<control::DrainingGeneration>>,
    /// Connection migration to the next generation, once it is active and
    /// takes connections.
    outgoing: Mutex<Option<Arc<crate::migrate::Outgoing>>>,
    /// Where migrated connections from the previous generation go, by
    /// listener name.
    incoming: Mutex<crate::migrate::Receivers>,
    drain: Drain,
    hooks: Mutex<Vec<ExitHook>>,
    reload: Mutex<Option<ReloadHandler>>,
    status_hook: Mutex<Option<StatusHook>>,
    /// State passed from generation to generation, by name.
    passed_on: Mutex<std::collections::BTreeMap<String, PassOn>>,
    last_reload: Mutex<Option<Outcome>>,
    last_upgrade: Mutex<Option<Outcome>>,
}

/// The handle a server uses to take part in zero-downtime restarts.
///
/// Cheap to clone. See the [crate documentation](crate) for the lifecycle.
#[derive(Clone)]
pub struct Baton {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Baton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Baton")
            .field("generation", &self.inner.generation)
            .field("pid", &self.inner.pid)
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

impl Baton {
    /// Settings with defaults; finish with [`Builder::from_env`].
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// [`Baton::builder()`]`.from_env()`: default settings, no pid file, no
    /// control socket.
    pub fn from_env() -> Result<Baton, Error> {
        Builder::default().from_env()
    }

    fn build(settings: Builder) -> Result<Baton, Error> {
        let pid = std::process::id();
        let generation = match env::var(env::BATON_GENERATION) {
            Some(g) => g.parse::<u64>().map_err(|_| {
                Error::Environment(format!("{}={g:?} is not a number", env::BATON_GENERATION))
            })?,
            None => 1,
        };
        let (mut inherited, mut handshake) = adopt_inherited(pid)?;
        let mut generation = generation;
        let mut taken_over = false;
        if settings.takeover && handshake.is_none() && inherited.is_empty() {
            if let Some(offered) = take_over_from(&settings)? {
                generation = offered.generation;
                for (name, fd) in offered.fds {
                    let (kind, addr) = listeners::describe(&fd).map_err(|e| Error::Takeover {
                        path: settings.control_socket.clone().unwrap_or_default(),
                        reason: format!("received socket {name:?}: {e}"),
                    })?;
                    inherited.push(InheritedFd {
                        name,
                        fd,
                        kind,
                        addr,
                    });
                }
                offered.handshake.watch_parent();
                handshake = Some(offered.handshake);
                taken_over = true;
            }
        }
        let first_start = handshake.is_none();
        let exe = current_exe();
        let args: Vec<OsString> = std::env::args_os().collect();
        let (state, _) = watch::channel(State::Starting);
        let baton = Baton {
            inner: Arc::new(Inner {
                drain: Drain::new(settings.idle_grace),
                settings,
                generation,
                pid,
                started: Instant::now(),
                started_wall: SystemTime::now(),
                exe,
                args,
                first_start,
                taken_over,
                inherited: Mutex::new(Inherited::new(inherited)),
                held: Mutex::new(Vec::new()),
                control: Mutex::new(None),
                handshake: Mutex::new(handshake),
                state,
                upgrading: watch::channel(false).0,
                in_flight: Mutex::new(None),
                handed_over: AtomicBool::new(false),
                ready_called: AtomicBool::new(false),
                settling: watch::channel(false).0,
                settle_cancel: tokio_util::sync::CancellationToken::new(),
                draining_since: Mutex::new(None),
                parent_link: Mutex::new(None),
                outgoing: Mutex::new(None),
                metrics: crate::metrics::Metrics::new(generation),
                metrics_hook: Mutex::new(None),
                draining: Mutex::new(Vec::new()),
                incoming: Mutex::new(Default::default()),
                hooks: Mutex::new(Vec::new()),
                reload: Mutex::new(None),
                status_hook: Mutex::new(None),
                passed_on: Mutex::new(std::collections::BTreeMap::new()),
                last_reload: Mutex::new(None),
                last_upgrade: Mutex::new(None),
            }),
        };
        if let Some(path) = baton.inner.settings.control_socket.clone() {
            baton.setup_control(&path)?;
        }
        tracing::info!(generation, pid, "baton started");
        Ok(baton)
    }

    fn setup_control(&self, path: &Path) -> Result<(), Error> {
        let want = Want::Unix(path.to_path_buf());
        let adopted =
            lock(&self.inner.inherited).take(env::CONTROL_FD_NAME, ListenerKind::Unix, &want);
        let (fd, inherited) = match adopted {
            Some(f) => (f.fd, true),
            None => (
                control::bind(path).map_err(|source| Error::Control {
                    path: path.to_path_buf(),
                    source,
                })?,
                false,
            ),
        };
        *lock(&self.inner.control) = Some((path.to_path_buf(), fd, inherited));
        Ok(())
    }

    /// This process's generation number (1 at first start).
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Whether this generation was started by an upgrade (rather than by an
    /// operator or a service manager).
    pub fn is_upgrade(&self) -> bool {
        !self.inner.first_start
    }

    /// Whether this generation is draining because a next one took over
    /// (an upgrade or a take-over): only then can its connections move
    /// there ([`migrate`](Self::migrate)). Cheap: one read of the state.
    pub fn moving_on(&self) -> bool {
        matches!(
            *self.inner.state.borrow(),
            State::Draining(StopReason::Upgraded { .. })
        )
    }

    /// Watches the lifecycle.
    pub fn state(&self) -> watch::Receiver<State> {
        self.inner.state.subscribe()
    }

    /// A handle for servers and tasks: see [`Shutdown`].
    pub fn shutdown(&self) -> Shutdown {
        self.inner.drain.handle()
    }

    fn check_name(&self, name: &str) -> Result<(), Error> {
        if let Err(bad) = env::check_listener_name(name) {
            return Err(Error::ListenerName {
                name: name.to_owned(),
                reason: bad.reason(),
            });
        }
        if lock(&self.inner.held).iter().any(|(h, _)| h.name == name) {
            return Err(Error::ListenerName {
                name: name.to_owned(),
                reason: "already in use by this generation",
            });
        }
        Ok(())
    }

    async fn resolve(name: &str, addr: &str) -> Result<Vec<std::net::SocketAddr>, Error> {
        let addrs: Vec<_> = tokio::net::lookup_host(addr)
            .await
            .map_err(|source| Error::Listener {
                name: name.to_owned(),
                address: addr.to_owned(),
                source,
            })?
            .collect();
        Ok(addrs)
    }

    fn claim(
        &self,
        name: &str,
        kind: ListenerKind,
        want: &Want,
        address: &str,
        bind: impl FnOnce() -> std::io::Result<Socket>,
    ) -> Result<OwnedFd, Error> {
        self.check_name(name)?;
        let err = listener_error(name, address);
        let (fd, inherited) = match lock(&self.inner.inherited).take(name, kind, want) {
            Some(InheritedFd { fd, .. }) => (fd, true),
            None => (OwnedFd::from(bind().map_err(err)?), false),
        };
        let (_, actual) = listeners::describe(&fd).map_err(err)?;
        // systemd hands over blocking sockets; tokio needs non-blocking ones.
        socket2::SockRef::from(&fd)
            .set_nonblocking(true)
            .map_err(err)?;
        let app = fd.try_clone().map_err(err)?;
        tracing::info!(name, %actual, inherited, "listener");
        lock(&self.inner.held).push((
            Held {
                name: name.to_owned(),
                kind,
                addr: actual,
                fd,
            },
            inherited,
        ));
        Ok(app)
    }

    /// A TCP listener named `name` at `addr` ("127.0.0.1:8080",
    /// "localhost:0"): the previous generation's very socket if it had one of
    /// that name at that address (port 0 matches any port), else bound now.
    pub async fn tcp(&self, name: &str, addr: &str) -> Result<tokio::net::TcpListener, Error> {
        let addrs = Self::resolve(name, addr).await?;
        let want = Want::Inet(addrs.clone());
        let fd = self.claim(name, ListenerKind::Tcp, &want, addr, || {
            listeners::bind_tcp(&addrs)
        })?;
        tokio::net::TcpListener::from_std(fd.into()).map_err(listener_error(name, addr))
    }

    /// A UDP socket named `name` at `addr`, inherited or bound like
    /// [`tcp`](Self::tcp).
    pub async fn udp(&self, name: &str, addr: &str) -> Result<tokio::net::UdpSocket, Error> {
        let addrs = Self::resolve(name, addr).await?;
        let want = Want::Inet(addrs.clone());
        let fd = self.claim(name, ListenerKind::Udp, &want, addr, || {
            listeners::bind_udp(&addrs)
        })?;
        tokio::net::UdpSocket::from_std(fd.into()).map_err(listener_error(name, addr))
    }

    /// A Unix stream listener named `name` at `path`, inherited or bound like
    /// [`tcp`](Self::tcp). A stale socket file is replaced; one a live
    /// process accepts on is an error.
    pub async fn unix(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixListener, Error> {
        let path = path.as_ref();
        let want = Want::Unix(path.to_path_buf());
        let shown = path.display().to_string();
        let fd = self.claim(name, ListenerKind::Unix, &want, &shown, || {
            listeners::bind_unix(path)
        })?;
        tokio::net::UnixListener::from_std(fd.into()).map_err(listener_error(name, &shown))
    }

    /// Stops handing the listener `name` to later generations (for a
    /// listener removed by a config reload). The application closes its own
    /// socket. Returns whether such a listener was held.
    pub fn release(&self, name: &str) -> bool {
        let mut held = lock(&self.inner.held);
        let before = held.len();
        held.retain(|(h, _)| h.name != name);
        let released = held.len() != before;
        if released {
            notify::remove_stored(name);
        }
        released
    }

    /// The listeners this generation holds.
    pub fn listeners(&self) -> Vec<ListenerInfo> {
        lock(&self.inner.held)
            .iter()
            .map(|(h, inherited)| ListenerInfo {
                name: h.name.clone(),
                kind: h.kind,
                address: h.addr.clone(),
                inherited: *inherited,
            })
            .collect()
    }

    /// Receives the connections of listener `name` that the previous
    /// generation migrates to this one (see [`migrate`](Self::migrate)).
    /// Call before [`ready`](Self::ready), which tells the previous
    /// generation which listeners this one takes connections of. Without a
    /// previous generation that migrates, nothing arrives.
    pub fn accept_migrated(
        &self,
        name: &str,
    ) -> tokio::sync::mpsc::Receiver<crate::migrate::Migrated> {
        let (tx, rx) = crate::migrate::channel();
        lock(&self.inner.incoming).insert(name.to_owned(), tx);
        rx
    }

    /// Hands `conn`, a connection of listener `name`, with the
    /// application's `state` for it, to the next generation once this one
    /// is draining after an upgrade or a take-over. `Ok`: the next
    /// generation adopted it and this process's copy is closed. `Err` gives
    /// the connection back: there is no next generation, it does not take
    /// connections of `name` (an older binary, or one that did not call
    /// [`accept_migrated`](Self::accept_migrated)), or it did not adopt it
    /// in time; serve it and drain it as usual. Call it only at a point
    /// where nothing read from the connection is unaccounted for: what was
    /// read but not consumed goes in `state`.
    pub async fn migrate(
        &self,
        name: &str,
        conn: crate::migrate::Connection,
        state: Vec<u8>,
    ) -> Result<(), crate::migrate::Connection> {
        if !self.moving_on() {
            return Err(conn);
        }
        // The link starts once the new generation confirmed it is active.
        let mut upgrading = self.inner.upgrading.subscribe();
        let _ = tokio::time::timeout(CONFIRM_TIMEOUT, upgrading.wait_for(|u| !*u)).await;
        let Some(link) = lock(&self.inner.outgoing).clone() else {
            return Err(conn);
        };
        match link.send(name, &conn, &state).await {
            Ok(()) => Ok(()),
            Err(reason) => {
                tracing::debug!(name, reason, "connection not migrated; draining it");
                Err(conn)
            }
        }
    }

    /// Runs `hook` after draining, before the process exits (all hooks
    /// together are bounded by the exit hook timeout).
    pub fn on_exit<F, Fut>(&self, hook: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        lock(&self.inner.hooks).push(Box::new(move || Box::pin(hook())));
    }

    /// Sets what a reload (SIGHUP, control `reload`) does. The handler
    /// should load, validate and swap (see [`Reloadable`](crate::Reloadable));
    /// an error leaves the old configuration in place and is reported to the
    /// caller.
    pub fn on_reload<F, Fut>(&self, handler: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        *lock(&self.inner.reload) = Some(Arc::new(move || Box::pin(handler())));
    }

    /// Adds application fields to the `status` answer: `hook` returns a JSON
    /// object whose fields are merged in (Baton's own fields win).
    pub fn on_status<F>(&self, hook: F)
    where
        F: Fn() -> Value + Send + Sync + 'static,
    {
        *lock(&self.inner.status_hook) = Some(Arc::new(hook));
    }

    /// Passes state on from generation to generation (TLS session ticket
    /// keys, say: `baton::tls::Tickets`). When this generation hands its
    /// sockets to the next one (an upgrade or a take-over), `export`'s
    /// value goes with the `ack`, over the private handshake channel; a
    /// generation that receives a value under `name` gives it to its
    /// `import` inside [`ready`](Self::ready), before `ready` returns and
    /// so before it serves. A value under a name this generation did not
    /// register is ignored; registering a name again replaces it. Keep it
    /// small: the `ack` is one line of at most 64 KiB.
    pub fn pass_on<E, I>(&self, name: &str, export: E, import: I)
    where
        E: Fn() -> Value + Send + Sync + 'static,
        I: Fn(Value) + Send + Sync + 'static,
    {
        lock(&self.inner.passed_on).insert(name.to_owned(), (Arc::new(export), Arc::new(import)));
    }

    /// The values every [`pass_on`](Self::pass_on) exports now.
    fn exported(&self) -> std::collections::BTreeMap<String, Value> {
        let hooks: Vec<(String, PassOn)> = lock(&self.inner.passed_on)
            .iter()
            .map(|(n, h)| (n.clone(), h.clone()))
            .collect();
        hooks
            .into_iter()
            .map(|(name, (export, _))| (name, export()))
            .collect()
    }

    /// Gives each value passed on to the import registered for it.
    fn import(&self, state: std::collections::BTreeMap<String, Value>) {
        for (name, value) in state {
            let import = lock(&self.inner.passed_on)
                .get(&name)
                .map(|(_, import)| import.clone());
            match import {
                Some(import) => import(value),
                None => tracing::debug!(%name, "state passed on that nobody takes; ignored"),
            }
        }
    }

    /// Reports that this generation is ready to serve.
    ///
    /// At first start it becomes the active generation at once. After an
    /// upgrade it tells the previous generation, which stops accepting and
    /// answers; only then does this one become active (pid file, control
    /// socket, `READY=1`). Inherited listeners nobody claimed are closed here.
    /// An `Err(Error::RolledBack)` means the previous generation gave up on
    /// this one: exit. If the previous generation died before handing over
    /// (this process was reparented), this one becomes active alone (pid
    /// file, control socket, `READY=1` with `MAINPID=`) and `ready` returns
    /// `Ok`.
    ///
    /// A stop requested before `ready` (a signal during a slow start) wins:
    /// `ready` then tells the previous generation, if any, that this one
    /// stopped (it rolls back and keeps serving), and returns `Ok`; the
    /// state stays Draining and [`wait`](Self::wait) returns at once. A stop
    /// that arrives while the previous generation hands over leaves this
    /// generation draining too: it confirms the hand-over (the pid file
    /// names it), then stops like a last generation.
    pub async fn ready(&self) -> Result<(), Error> {
        if self.inner.ready_called.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyReady);
        }
        if matches!(
            *self.inner.state.borrow(),
            State::Draining(_) | State::Stopped(_)
        ) {
            tracing::info!("stop requested before ready; not taking over");
            if let Some(h) = lock(&self.inner.handshake).take() {
                h.fail("it was asked to stop before it was ready");
            }
            return Ok(());
        }
        let handshake = lock(&self.inner.handshake).take();
        // Taken now: without a previous generation nothing arrives, and the
        // senders go (the application's receivers then end).
        let receivers = std::mem::take(&mut *lock(&self.inner.incoming));
        let takes: Vec<String> = receivers.keys().cloned().collect();
        let previous = handshake.as_ref().and_then(|h| h.previous_pid());
        let handover = match handshake {
            Some(h) => Some(h.ready(takes).await?),
            None => None,
        };
        let orphaned = matches!(handover, Some(Handover::Orphaned));
        let handover = handover.map(|h| match h {
            Handover::Confirm(confirm, totals, state) => {
                // Before anything is served.
                self.import(state);
                Handover::Confirm(confirm, totals, Default::default())
            }
            h => h,
        });
        let result = self.become_active(orphaned);
        if let Some(Handover::Confirm(confirm, totals, _)) = handover {
            // The service's counters go on where the previous generation's
            // stopped, plus the upgrade that made this one.
            if let Some(t) = totals {
                self.inner.metrics.absorb(&t);
            }
            if result.is_ok() {
                self.inner.metrics.upgrade(true, None);
            }
            // Listed before `active` goes out: the upgrade's caller may ask
            // for `status` the moment it has its answer.
            if let (Ok(()), Some(pid)) = (&result, previous) {
                self.watch_draining(pid);
            }
            let link = confirm
                .send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()))
                .await;
            if result.is_ok() {
                let closed = link.as_ref().map(|l| {
                    let stream = l.stream();
                    let closed = l.closed();
                    async move {
                        if receivers.is_empty() {
                            closed.await;
                        } else {
                            // Migrated connections until the previous
                            // generation closes the channel.
                            crate::migrate::receive(stream, receivers).await;
                        }
                    }
                });
                *lock(&self.inner.parent_link) = link;
                if let Some(closed) = closed {
                    // The previous generation let go: drop our end too.
                    let inner = Arc::downgrade(&self.inner);
                    tokio::spawn(async move {
                        closed.await;
                        if let Some(inner) = inner.upgrade() {
                            lock(&inner.parent_link).take();
                        }
                    });
                }
                // A stop that arrived while taking over: announce it now.
                if !matches!(*self.inner.state.borrow(), State::Active) {
                    if let Some(link) = lock(&self.inner.parent_link).take() {
                        link.leaving();
                    }
                }
            }
        }
        result
    }

    /// `orphaned`: the previous generation died before handing over; this
    /// one tells the service manager itself.
    fn become_active(&self, orphaned: bool) -> Result<(), Error> {
        // Unclaimed inherited fds: listeners the new configuration dropped.
        for f in lock(&self.inner.inherited).take_rest() {
            tracing::info!(name = %f.name, address = %f.addr, "closing inherited listener nobody claimed");
            notify::remove_stored(&f.name);
        }
        if let Some(path) = &self.inner.settings.pid_file {
            pidfile::write(path, self.inner.pid).map_err(|source| Error::PidFile {
                path: path.clone(),
                source,
            })?;
        }
        // Only from Starting: a stop that arrived meanwhile is not undone.
        let active = self.inner.state.send_if_modified(|s| {
            if *s == State::Starting {
                *s = State::Active;
                true
            } else {
                false
            }
        });
        if !active {
            tracing::info!(
                generation = self.inner.generation,
                "stop requested while taking over; stopping"
            );
            return Ok(());
        }
        if self.inner.first_start || orphaned || self.inner.taken_over {
            notify::notify_logged(&format!("READY=1\nMAINPID={}", self.inner.pid));
        }
        self.start_control()?;
        self.keep_in_fd_store();
        tracing::info!(
            generation = self.inner.generation,
            pid = self.inner.pid,
            "active"
        );
        Ok(())
    }

    /// With a service manager's fd store: every listener and the control
    /// socket go there, so that a restart of the service (or a crash) gets
    /// the very same sockets back.
    fn keep_in_fd_store(&self) {
        use std::os::fd::AsFd;
        let held = lock(&self.inner.held);
        let control = lock(&self.inner.control);
        let mut fds: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = held
            .iter()
            .map(|(h, _)| (h.name.as_str(), h.fd.as_fd()))
            .collect();
        if let Some((_, fd, _)) = control.as_ref() {
            fds.push((env::CONTROL_FD_NAME, fd.as_fd()));
        }
        match notify::store_fds(&fds) {
            Ok(0) => {}
            Ok(n) => tracing::info!(sockets = n, "kept in the service manager's fd store"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep the sockets in the service manager's fd store")
            }
        }
    }

    /// Reports a startup failure to the previous generation (which then
    /// rolls back and includes `message` in its answer). Without a previous
    /// generation this only logs. The process should exit afterwards.
    pub fn fail(&self, message: &str) {
        tracing::error!(message, "startup failed");
        if let Some(h) = lock(&self.inner.handshake).take() {
            h.fail(message);
        }
    }

    fn start_control(&self) -> Result<(), Error> {
        let guard = lock(&self.inner.control);
        let Some((path, fd, _)) = guard.as_ref() else {
            return Ok(());
        };
        let err = |source| Error::Control {
            path: path.clone(),
            source,
        };
        let std = std::os::unix::net::UnixListener::from(fd.try_clone().map_err(err)?);
        std.set_nonblocking(true).map_err(err)?;
        let listener = tokio::net::UnixListener::from_std(std).map_err(err)?;
        drop(guard);
        tokio::spawn(control::serve(listener, self.clone(), self.shutdown()));
        Ok(())
    }

    /// Starts the next generation from the binary this one was started from
    /// (or `binary`), with the same arguments and our listeners, and waits
    /// until it is ready. Then this generation stops accepting and begins to
    /// drain (watch [`Shutdown::draining`], and call [`wait`](Self::wait)).
    ///
    /// If the new generation exits, reports an error or misses the upgrade
    /// timeout, it is killed with everything it started (its process group,
    /// session and descendants) and reaped, and this generation carries on
    /// as if nothing happened. Only one upgrade may be in flight.
    pub async fn upgrade(&self, binary: Option<PathBuf>) -> Result<Upgraded, UpgradeError> {
        let abort = self.begin_upgrade()?;
        self.hand_over(abort, How::Spawn(binary)).await
    }

    /// Answers a take-over request on the control socket: the process on
    /// `conn` gets our sockets and, once ready, the service, as a new
    /// generation after [`upgrade`](Self::upgrade) would. Refused when an
    /// upgrade is in flight or this generation is not active.
    pub(crate) async fn take_over(&self, conn: tokio::net::UnixStream) {
        match self.begin_upgrade() {
            Ok(abort) => {
                // The outcome is logged and kept for `status`; the process
                // that asked learns it from the handshake.
                let _ = self.hand_over(abort, How::TakeOver(conn)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "take-over refused");
                control::refuse(conn, e.to_string()).await;
            }
        }
    }

    /// Marks an upgrade in flight, if one may start now.
    fn begin_upgrade(&self) -> Result<tokio_util::sync::CancellationToken, UpgradeError> {
        {
            let mut in_flight = lock(&self.inner.in_flight);
            let state = self.inner.state.borrow().label();
            if state != "active" {
                return Err(UpgradeError::NotActive(state));
            }
            if in_flight.is_some() {
                return Err(UpgradeError::InProgress);
            }
            let abort = tokio_util::sync::CancellationToken::new();
            *in_flight = Some(InFlight {
                abort: abort.clone(),
                handed: false,
                pass_on: None,
            });
            self.inner.upgrading.send_replace(true);
            Ok(abort)
        }
    }

    /// Carries out an upgrade marked by [`begin_upgrade`](Self::begin_upgrade).
    async fn hand_over(
        &self,
        abort: tokio_util::sync::CancellationToken,
        how: How,
    ) -> Result<Upgraded, UpgradeError> {
        let what = how.label();
        struct Reset<'a>(&'a Inner);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                lock(&self.0.in_flight).take();
                self.0.upgrading.send_replace(false);
            }
        }
        let _reset = Reset(&self.inner);

        notify::notify_logged(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            sys::monotonic_usec()
        ));
        let mut watch = None;
        let result = self.start_next(how, abort, &mut watch).await;
        match &result {
            Ok(up) => {
                tracing::info!(
                    pid = up.pid,
                    generation = up.generation,
                    elapsed_ms = up.elapsed.as_secs_f64() * 1000.0,
                    "{what} succeeded"
                );
                notify::notify_logged(&format!("MAINPID={}\nREADY=1", up.pid));
            }
            Err(e @ UpgradeError::Aborted { .. }) => {
                tracing::info!(error = %e, "{what} aborted; this generation stops");
            }
            Err(e) => {
                tracing::error!(error = %e, "{what} failed; this generation keeps serving");
                notify::notify_logged("READY=1");
            }
        }
        self.inner.metrics.upgrade(
            result.is_ok(),
            result.as_ref().ok().map(|up| up.elapsed.as_secs_f64()),
        );
        *lock(&self.inner.last_upgrade) = Some(match &result {
            Ok(up) => Outcome {
                kind: Some(what.to_owned()),
                pid: Some(up.pid),
                generation: Some(up.generation),
                elapsed_ms: Some(up.elapsed.as_secs_f64() * 1000.0),
                ..outcome(Ok(()))
            },
            Err(e) => Outcome {
                kind: Some(what.to_owned()),
                ..outcome(Err(e.to_string()))
            },
        });
        if let Some((child, up)) = watch {
            // Before the in-flight flag clears, so that `wait` sees one or
            // the other.
            self.inner.settling.send_replace(true);
            tokio::spawn(self.clone().settle(child, up));
        }
        result
    }

    /// The settle period after a successful upgrade: watches the new
    /// generation; takes the service back if it dies within the period,
    /// else lets the sockets go.
    async fn settle(self, mut child: ReadyChild, up: Upgraded) {
        let period = self.inner.settings.settle;
        let watched = tokio::select! {
            w = child.watch() => Some(w),
            _ = tokio::time::sleep(period) => None,
            _ = self.inner.settle_cancel.cancelled() => None,
        };
        match watched {
            Some(Watched::Died(status)) => {
                let reason = format!(
                    "generation {} (pid {}) {status} within the settle period ({period:?}) after it became active",
                    up.generation, up.pid
                );
                self.take_back(&up, reason);
            }
            Some(Watched::Left) => {
                tracing::info!(
                    pid = up.pid,
                    "the new generation stops or hands over on purpose; settle period over"
                );
                self.end_settle();
            }
            None => {
                tracing::info!(
                    pid = up.pid,
                    "settle period over; closing the listening sockets"
                );
                self.end_settle();
            }
        }
    }

    /// The settle period is over without a take-back: drop our listening
    /// fds, tell accept loops waiting in `resumed` to drop theirs.
    fn end_settle(&self) {
        lock(&self.inner.held).clear();
        self.inner.drain.finish();
        self.inner.settling.send_replace(false);
    }

    /// The new generation died within the settle period: serve again.
    fn take_back(&self, up: &Upgraded, reason: String) {
        let resumable = self.inner.drain.resumable();
        let back = resumable
            && !self.inner.settle_cancel.is_cancelled()
            && self.inner.state.send_if_modified(|s| match s {
                State::Draining(StopReason::Upgraded { pid, .. }) if *pid == up.pid => {
                    *s = State::Active;
                    true
                }
                _ => false,
            });
        if !back {
            if resumable {
                tracing::error!(reason, "the new generation died; this generation is stopping and does not take the service back");
            } else {
                tracing::error!(reason, "the new generation died, but no accept loop of this generation can resume (see Shutdown::resumed); not taking the service back");
            }
            *lock(&self.inner.last_upgrade) = Some(Outcome {
                pid: Some(up.pid),
                generation: Some(up.generation),
                taken_back: Some(false),
                ..outcome(Err(reason))
            });
            self.end_settle();
            return;
        }
        self.inner.drain.resume();
        self.inner.handed_over.store(false, Ordering::SeqCst);
        *lock(&self.inner.draining_since) = None;
        if let Some(path) = &self.inner.settings.pid_file {
            if let Err(e) = pidfile::write(path, self.inner.pid) {
                tracing::error!(path = %path.display(), error = %e, "cannot write the pid file");
            }
        }
        if let Err(e) = self.start_control() {
            tracing::error!(error = %e, "cannot serve the control socket again");
        }
        notify::notify_logged(&format!("MAINPID={}\nREADY=1", self.inner.pid));
        tracing::error!(
            reason,
            generation = self.inner.generation,
            pid = self.inner.pid,
            "the new generation died; this generation took the service back and is active again"
        );
        *lock(&self.inner.last_upgrade) = Some(Outcome {
            pid: Some(up.pid),
            generation: Some(up.generation),
            taken_back: Some(true),
            ..outcome(Err(format!(
                "{reason}; generation {} (pid {}) took the service back",
                self.inner.generation, self.inner.pid
            )))
        });
        self.inner.settling.send_replace(false);
    }

    /// Sets `watch` to the new generation to watch for the settle period,
    /// once it took over (also when it did not confirm: it may have died).
    async fn start_next(
        &self,
        how: How,
        abort: tokio_util::sync::CancellationToken,
        watch: &mut Option<(ReadyChild, Upgraded)>,
    ) -> Result<Upgraded, UpgradeError> {
        let mut fds = Vec::new();
        for (h, _) in lock(&self.inner.held).iter() {
            fds.push((h.name.clone(), h.fd.try_clone().map_err(UpgradeError::Io)?));
        }
        if let Some((_, fd, _)) = lock(&self.inner.control).as_ref() {
            fds.push((
                env::CONTROL_FD_NAME.to_owned(),
                fd.try_clone().map_err(UpgradeError::Io)?,
            ));
        }
        let generation = self.inner.generation + 1;
        let timeout = self.inner.settings.upgrade_timeout;
        let mut child = match how {
            How::Spawn(binary) => {
                handoff::start(NextGeneration {
                    binary: binary.unwrap_or_else(|| self.inner.exe.clone()),
                    args: self.inner.args.clone(),
                    generation,
                    fds,
                    timeout,
                    abort,
                })
                .await?
            }
            How::TakeOver(conn) => {
                handoff::accept_takeover(
                    conn,
                    handoff::TakeoverOffer {
                        generation,
                        fds,
                        timeout,
                        abort,
                    },
                )
                .await?
            }
        };
        let upgraded = child.upgraded.clone();
        // The hand-over, or a stop that got here first: decided under the
        // lock a stop takes, so exactly one of them wins.
        let handed = {
            let mut in_flight = lock(&self.inner.in_flight);
            // Stop accepting before telling the new generation it is in charge.
            let handed = self.begin_stop(StopReason::Upgraded {
                pid: upgraded.pid,
                generation: upgraded.generation,
            });
            if handed {
                self.inner.handed_over.store(true, Ordering::SeqCst);
                if let Some(f) = in_flight.as_mut() {
                    f.handed = true;
                }
            }
            handed
        };
        if !handed {
            // A stop arrived while it was getting ready: it never hears the
            // ack, and this generation stops as asked.
            child.child.abandon().await;
            return Err(UpgradeError::Aborted { pid: upgraded.pid });
        }
        // From here on this generation is draining whatever happens: the
        // new one has the sockets. Wait for it to confirm it is active, so
        // the caller's "ok" is true of the pid file and control socket too.
        // `wait` does not let this generation exit before this is answered,
        // whatever the drain timeout.
        let confirmed = child
            .ack(
                CONFIRM_TIMEOUT,
                Some(self.inner.metrics.totals()),
                self.exported(),
            )
            .await;
        if confirmed.is_ok() {
            if let Some(link) = child.start_link() {
                tracing::info!(
                    pid = upgraded.pid,
                    listeners = ?child.takes,
                    "the new generation takes connections over"
                );
                *lock(&self.inner.outgoing) = Some(link);
            }
        }
        // A stop that arrived after the hand-over is for the service, which
        // the new generation is now: pass it on.
        let pass_on = lock(&self.inner.in_flight)
            .as_mut()
            .and_then(|f| f.pass_on.take());
        let settles = pass_on.is_none() && !self.inner.settings.settle.is_zero();
        if !settles {
            // No settle period: the new generation is being stopped with
            // the service, or there is none to wait.
            self.end_settle();
        }
        if let Some(reason) = pass_on {
            let signal = if reason == StopReason::Fast {
                rustix::process::Signal::INT
            } else {
                rustix::process::Signal::TERM
            };
            tracing::info!(
                pid = upgraded.pid,
                signal = ?signal,
                "passing the stop requested during the upgrade on to the new generation"
            );
            if let Err(e) = child.child.signal(signal.as_raw()) {
                tracing::warn!(pid = upgraded.pid, error = %e, "could not pass the stop on");
            }
        }
        if settles {
            *watch = Some((child, upgraded.clone()));
        }
        confirmed.map_err(|reason| UpgradeError::Unconfirmed {
            pid: upgraded.pid,
            reason,
        })?;
        Ok(upgraded)
    }

    /// Runs the reload handler. Errors leave the previous configuration in
    /// place.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let state = self.inner.state.borrow().label();
        if state != "active" {
            return Err(ReloadError::NotActive(state));
        }
        let handler = lock(&self.inner.reload)
            .clone()
            .ok_or(ReloadError::Unsupported)?;
        notify::notify_logged(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            sys::monotonic_usec()
        ));
        let started = Instant::now();
        let result = handler().await.map_err(ReloadError::Rejected);
        notify::notify_logged("READY=1");
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match &result {
            Ok(()) => tracing::info!(elapsed_ms, "reload succeeded"),
            Err(e) => tracing::error!(error = %e, "reload rejected; previous configuration kept"),
        }
        self.inner.metrics.reload(result.is_ok());
        *lock(&self.inner.last_reload) = Some(Outcome {
            elapsed_ms: Some(elapsed_ms),
            ..outcome(result.as_ref().map(|_| ()).map_err(|e| e.to_string()))
        });
        result
    }

    /// Asks this generation to stop: gracefully (drain, bounded by the drain
    /// timeout) or fast (close everything now). [`wait`](Self::wait) returns
    /// once done.
    ///
    /// A stop wins over an upgrade in flight: before the new generation is
    /// ready, the upgrade is aborted (the new generation is killed and
    /// reaped, the upgrade answered `ok:false`, "aborted: stop requested")
    /// and this generation stops; after it was told to take over, the stop
    /// is passed on to it (SIGTERM, or SIGINT for a fast stop) once it has
    /// answered the hand-over, so the service stops.
    pub fn stop(&self, graceful: bool) {
        let reason = if graceful {
            StopReason::Graceful
        } else {
            StopReason::Fast
        };
        let mut in_flight = lock(&self.inner.in_flight);
        // A stop during the settle period: no take-back afterwards.
        self.inner.settle_cancel.cancel();
        if let Some(f) = in_flight.as_mut() {
            if f.handed {
                tracing::info!(
                    ?reason,
                    "stop requested during the upgrade; passing it on to the new generation once it confirms"
                );
                if f.pass_on != Some(StopReason::Fast) {
                    f.pass_on = Some(reason.clone());
                }
            } else {
                tracing::info!(?reason, "stop requested during the upgrade; aborting it");
                f.abort.cancel();
            }
        }
        self.begin_stop(reason);
        drop(in_flight);
    }

    /// Enters Draining (from Starting or Active); returns whether it did.
    fn begin_stop(&self, reason: StopReason) -> bool {
        let mut changed = false;
        self.inner.state.send_if_modified(|s| match s {
            State::Starting | State::Active => {
                *s = State::Draining(reason.clone());
                changed = true;
                true
            }
            _ => false,
        });
        if reason == StopReason::Fast {
            self.inner.drain.expire();
        }
        if !changed {
            return false;
        }
        if reason == StopReason::Graceful || reason == StopReason::Fast {
            notify::notify_logged("STOPPING=1");
        }
        // The previous generation, if it still watches us, is told this
        // exit is on purpose.
        if let Some(link) = lock(&self.inner.parent_link).take() {
            link.leaving();
        }
        *lock(&self.inner.draining_since) = Some(Instant::now());
        let settles =
            matches!(reason, StopReason::Upgraded { .. }) && !self.inner.settings.settle.is_zero();
        if !settles {
            // Our duplicates of the listening sockets go now, so that this
            // process holds no listening fd once the application's accept
            // loops stop. After an upgrade they go at the end of the settle
            // period.
            lock(&self.inner.held).clear();
            self.inner.drain.finish();
        }
        self.inner.drain.start_resumable();
        tracing::info!(generation = self.inner.generation, reason = ?reason, "draining");
        true
    }

    /// Waits until this generation has stopped (after an upgrade or a stop
    /// request), drains, runs the exit hooks, and returns why. `main` should
    /// return afterwards.
    pub async fn wait(&self) -> StopReason {
        let mut rx = self.inner.state.subscribe();
        let reason = 'serving: loop {
            let reason = loop {
                if let State::Draining(r) = &*rx.borrow_and_update() {
                    break r.clone();
                }
                if rx.changed().await.is_err() {
                    break StopReason::Fast;
                }
            };
            if matches!(reason, StopReason::Upgraded { .. }) {
                // The upgrade's answer, then the settle period: the new
                // generation may die within it, and this one serve again.
                let mut upgrading = self.inner.upgrading.subscribe();
                if *upgrading.borrow_and_update() {
                    tracing::info!(
                        "waiting for the upgrade in flight to be answered before exiting"
                    );
                }
                let _ = upgrading.wait_for(|u| !*u).await;
                let _ = self.inner.settling.subscribe().wait_for(|s| !*s).await;
                if *self.inner.state.borrow() == State::Active {
                    tracing::info!("serving again; not exiting");
                    continue 'serving;
                }
            }
            break reason;
        };
        // The control fd: close ours (the next generation has its own copy).
        let control = lock(&self.inner.control).take();
        // The drain timeout counts from the moment draining began.
        let since = lock(&self.inner.draining_since).map_or(Duration::ZERO, |t| t.elapsed());
        let timeout = match reason {
            StopReason::Fast => Duration::ZERO,
            _ => self.inner.settings.drain_timeout.saturating_sub(since),
        };
        let started = Instant::now();
        let outcome = self.inner.drain.drain(timeout).await;
        match outcome {
            DrainOutcome::Complete => tracing::info!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                "drained"
            ),
            DrainOutcome::TimedOut { remaining } => tracing::warn!(
                remaining,
                "drain timeout reached; remaining connections closed"
            ),
        }
        // An upgrade in flight is answered before this generation exits,
        // whatever the drain timeout: its caller is told the outcome, and
        // the new generation's confirmation is read, not cut off. (It is
        // bounded by the upgrade and confirmation timeouts.)
        let mut upgrading = self.inner.upgrading.subscribe();
        if *upgrading.borrow_and_update() {
            tracing::info!("waiting for the upgrade in flight to be answered before exiting");
            let _ = upgrading.wait_for(|u| !*u).await;
            // The control connection that asked for it writes the answer
            // now; give it the time to.
            self.inner.drain.settle().await;
        }
        let hooks: Vec<ExitHook> = std::mem::take(&mut *lock(&self.inner.hooks));
        if !hooks.is_empty() {
            let run = async {
                for hook in hooks {
                    hook().await;
                }
            };
            if tokio::time::timeout(self.inner.settings.exit_hook_timeout, run)
                .await
                .is_err()
            {
                tracing::warn!("exit hooks timed out");
            }
        }
        if !self.inner.handed_over.load(Ordering::SeqCst) {
            // The last generation cleans up after itself; after an upgrade
            // the paths belong to the next one.
            if let Some(path) = &self.inner.settings.pid_file {
                pidfile::remove_if_ours(path, self.inner.pid);
            }
            // A control socket kept in the fd store lives on for the next
            // start of the service: its path must too.
            if let Some((path, _, _)) = control.as_ref().filter(|_| !notify::fd_store_enabled()) {
                let _ = std::fs::remove_file(path);
            }
        }
        drop(control);
        self.inner
            .state
            .send_replace(State::Stopped(reason.clone()));
        tracing::info!(generation = self.inner.generation, "stopped");
        reason
    }

    /// The service's metrics in the Prometheus text format (what the admin
    /// endpoint serves as `/metrics`).
    pub fn metrics(&self) -> String {
        let mut text = self.inner.metrics.encode();
        let hook = lock(&self.inner.metrics_hook).clone();
        if let Some(hook) = hook {
            // The application's families go before the closing `# EOF`.
            let body_end = text.rfind("# EOF").unwrap_or(text.len());
            text.truncate(body_end);
            hook(&mut text);
            if !text.ends_with('\n') && !text.is_empty() {
                text.push('\n');
            }
            text.push_str("# EOF\n");
        }
        text
    }

    /// Lists the previous generation (`pid`) in `status` as draining until
    /// it exits.
    fn watch_draining(&self, pid: u32) {
        let Ok(exited) = crate::handoff::exit_of(pid) else {
            return; // gone already
        };
        let generation = self.inner.generation.saturating_sub(1);
        lock(&self.inner.draining).push(control::DrainingGeneration { generation, pid });
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            exited.await;
            if let Some(inner) = inner.upgrade() {
                lock(&inner.draining).retain(|d| d.pid != pid);
            }
        });
    }

    /// Where an HTTP server records the requests of `listener` (see
    /// [`RequestMetrics`](crate::RequestMetrics)): counted in `/metrics` as
    /// `baton_requests_total{listener,code_class}` and
    /// `baton_request_duration_seconds{listener}`, and carried on by the
    /// next generation. The same handle for the same name.
    pub fn requests(&self, listener: &str) -> crate::RequestMetrics {
        self.inner.metrics.requests(listener)
    }

    /// Adds application metric families to [`metrics`](Self::metrics):
    /// `hook` appends them in the same text format (without `# EOF`).
    pub fn on_metrics<F>(&self, hook: F)
    where
        F: Fn(&mut String) + Send + Sync + 'static,
    {
        *lock(&self.inner.metrics_hook) = Some(Arc::new(hook));
    }

    /// A JSON description of this generation (the control `status` answer).
    pub fn status(&self) -> Value {
        let state = self.inner.state.borrow().clone();
        let extra = lock(&self.inner.status_hook).clone().map(|hook| hook());
        let typed = control::Status {
            ok: true,
            pid: Some(self.inner.pid),
            generation: Some(self.inner.generation),
            state: state.label().to_owned(),
            uptime_ms: Some(self.inner.started.elapsed().as_secs_f64() * 1000.0),
            started_at_unix_ms: Some(unix_ms(self.inner.started_wall)),
            binary: Some(self.inner.exe.display().to_string()),
            upgrade_in_progress: *self.inner.upgrading.borrow(),
            listeners: self
                .listeners()
                .into_iter()
                .map(|l| control::ListenerStatus {
                    connections: self.inner.metrics.open_connections(&l.name),
                    name: l.name,
                    kind: l.kind.to_string(),
                    address: l.address.to_string(),
                    inherited: Some(l.inherited),
                    port_env: None,
                })
                .collect(),
            last_upgrade: lock(&self.inner.last_upgrade).clone(),
            last_reload: lock(&self.inner.last_reload).clone(),
            draining: lock(&self.inner.draining).clone(),
            extra: serde_json::Map::new(),
        };
        let mut status =
            serde_json::to_value(&typed).unwrap_or_else(|e| control::failure(e.to_string()));
        if let (Some(Value::Object(extra)), Some(fields)) = (extra, status.as_object_mut()) {
            for (k, v) in extra {
                fields.entry(k).or_insert(v);
            }
        }
        status
    }

    /// Carries out one control request and returns the answer line.
    pub async fn handle(&self, req: Request) -> Value {
        match req {
            Request::Upgrade { binary } => match self.upgrade(binary).await {
                Ok(up) => control::answer(&control::UpgradeAnswer {
                    ok: true,
                    pid: up.pid,
                    generation: up.generation,
                    elapsed_ms: up.elapsed.as_secs_f64() * 1000.0,
                }),
                Err(e) => control::failure(e.to_string()),
            },
            Request::Reload {} => match self.reload().await {
                Ok(()) => control::answer(&control::ReloadAnswer { ok: true }),
                Err(e) => control::failure(e.to_string()),
            },
            Request::Status {} => self.status(),
            Request::Stop {} => {
                self.stop(true);
                control::answer(&control::StopAnswer {
                    ok: true,
                    pid: self.inner.pid,
                })
            }
            Request::Takeover {} => control::failure(control::TAKEOVER_ELSEWHERE),
        }
    }
}

fn listener_error<'a>(
    name: &'a str,
    address: &'a str,
) -> impl Fn(std::io::Error) -> Error + Copy + 'a {
    move |source| Error::Listener {
        name: name.to_owned(),
        address: address.to_owned(),
        source,
    }
}

/// An outcome ending now.
fn outcome(result: Result<(), String>) -> Outcome {
    Outcome {
        ok: result.is_ok(),
        error: result.err(),
        kind: None,
        pid: None,
        generation: None,
        elapsed_ms: None,
        at_unix_ms: Some(unix_ms(SystemTime::now())),
        taken_back: None,
    }
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// The binary to start for the next generation: the path this one was
/// started from. If the file was replaced on disk since, the kernel reports
/// it as "PATH (deleted)"; the path is what we want (the new file).
fn current_exe() -> PathBuf {
    match std::env::current_exe() {
        Ok(p) => {
            let s = p.as_os_str().to_string_lossy();
            match s.strip_suffix(" (deleted)") {
                Some(stripped) => PathBuf::from(stripped),
                None => p,
            }
        }
        Err(_) => std::env::args_os()
            .next()
            .map(PathBuf::from)
            .unwrap_or_default(),
    }
}

/// Adopts `n` fds from 3 on, named by `LISTEN_FDNAMES`.
fn adopt_listen_fds(n: i32) -> Result<Vec<InheritedFd>, Error> {
    let names: Vec<String> = env::var(env::LISTEN_FDNAMES)
        .map(|s| s.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = Vec::new();
    for i in 0..n {
        let raw = sys::LISTEN_FDS_START + i;
        let name = names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned());
        let fd = sys::adopt_fd(raw)
            .map_err(|e| Error::Environment(format!("inherited fd {raw} ({name}): {e}")))?;
        match listeners::describe(&fd) {
            Ok((kind, addr)) => fds.push(InheritedFd {
                name,
                fd,
                kind,
                addr,
            }),
            Err(e) => {
                tracing::warn!(fd = raw, name, error = %e, "ignoring inherited fd");
            }
        }
    }
    Ok(fds)
}

/// The sockets a service manager passed this process (`LISTEN_FDS` and
/// `LISTEN_FDNAMES`, when `LISTEN_PID` is our pid: socket activation, or
/// the fd store after a restart), as (name, fd), each checked to be a
/// socket and made close-on-exec. For programs that manage sockets
/// themselves (`baton run`); a [`Baton`] adopts them on its own. Empty
/// without them, and for every call after the first (or after a `Baton`
/// was built): each fd has one owner.
pub fn listen_fds() -> Result<Vec<(String, OwnedFd)>, Error> {
    let pid = std::process::id();
    let ours = env::var(env::LISTEN_PID).and_then(|p| p.parse::<u32>().ok()) == Some(pid);
    let Some(n) = env::var(env::LISTEN_FDS).and_then(|n| n.parse::<i32>().ok()) else {
        return Ok(Vec::new());
    };
    if !ours || !sys::claim_inherited() {
        return Ok(Vec::new());
    }
    Ok(adopt_listen_fds(n)?
        .into_iter()
        .map(|f| (f.name, f.fd))
        .collect())
}

/// Asks the generation serving the control socket to hand over (see
/// [`Builder::takeover`]).
fn take_over_from(settings: &Builder) -> Result<Option<crate::takeover::Offer>, Error> {
    let Some(path) = settings.control_socket.clone() else {
        return Err(Error::Takeover {
            path: PathBuf::new(),
            reason: "a take-over needs a control socket (Builder::control_socket)".to_owned(),
        });
    };
    crate::takeover::request(&path, settings.upgrade_timeout)
}

/// Adopts the fds described by `LISTEN_FDS`/`LISTEN_FDNAMES` when
/// `LISTEN_PID` names us, and the handshake channel when present.
fn adopt_inherited(pid: u32) -> Result<(Vec<InheritedFd>, Option<ChildHandshake>), Error> {
    let listen_pid = env::var(env::LISTEN_PID).and_then(|p| p.parse::<u32>().ok());
    let count = env::var(env::LISTEN_FDS).and_then(|n| n.parse::<i32>().ok());
    let handshake_fd = env::var(env::BATON_HANDSHAKE_FD);
    let ours = listen_pid == Some(pid);
    if (!ours || count.is_none()) && handshake_fd.is_none() {
        return Ok((Vec::new(), None));
    }
    if !sys::claim_inherited() {
        // A second Baton in the same process gets nothing inherited.
        return Ok((Vec::new(), None));
    }
    let fds = if ours {
        adopt_listen_fds(count.unwrap_or(0))?
    } else {
        Vec::new()
    };
    let handshake = match handshake_fd {
        Some(h) => {
            let raw: i32 = h.parse().map_err(|_| {
                Error::Environment(format!(
                    "{}={h:?} is not an fd number",
                    env::BATON_HANDSHAKE_FD
                ))
            })?;
            let fd = sys::adopt_fd(raw)
                .map_err(|e| Error::Environment(format!("handshake fd {raw}: {e}")))?;
            let real_stderr = match env::var(env::BATON_STDERR_FD) {
                Some(s) => {
                    let raw: i32 = s.parse().map_err(|_| {
                        Error::Environment(format!(
                            "{}={s:?} is not an fd number",
                            env::BATON_STDERR_FD
                        ))
                    })?;
                    Some(
                        sys::adopt_fd(raw)
                            .map_err(|e| Error::Environment(format!("stderr fd {raw}: {e}")))?,
                    )
                }
                None => None,
            };
            let h = ChildHandshake {
                stream: std::os::unix::net::UnixStream::from(fd),
                real_stderr: Arc::new(Mutex::new(real_stderr)),
                parent: Arc::new(handoff::Parent::Spawned),
                ready_started: Arc::default(),
            };
            h.watch_parent();
            Some(h)
        }
        None => None,
    };
    Ok((fds, handshake))
}
