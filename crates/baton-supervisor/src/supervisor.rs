//! Child generations: start, readiness, reload with rollback, crash
//! restart, stop; connection forwarding for `--port-env`; request
//! forwarding for `--http`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use baton::process::{Child, ExitStatus, Spawn};
use baton::sync::lock;
use baton::{control, env, pidfile, Drain};
use baton_proxy::front::{Backend, Front};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream, UnixDatagram};
use tokio::sync::watch;

use crate::config::{Config, ReadyMode, BACKEND_VAR};
use crate::{holders, probe, Error};

/// Back-off between crash restarts: doubles from `BACKOFF_MIN` up to
/// `BACKOFF_MAX`, and starts over once a child has stayed up for
/// `BACKOFF_RESET`.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const BACKOFF_RESET: Duration = Duration::from_secs(10);

/// One running child.
#[derive(Debug)]
struct Generation {
    number: u64,
    child: Child,
    started: Instant,
    /// `--port-env` variable → the port this child listens on.
    ports: HashMap<String, u16>,
    /// `--http` listener → where this child serves it.
    backends: Vec<(String, std::net::SocketAddr)>,
    /// Connections forwarded to this child and still open.
    conns: AtomicUsize,
    /// What the `--http` fronts forwarded to this child, once they moved
    /// on: its requests in flight.
    released: Mutex<Vec<Backend>>,
    /// Set once it is being replaced or stopped (its exit is not a crash).
    retiring: AtomicBool,
    /// Started by a reload (not the first child, not a crash restart): a
    /// later death is restarted with back-off even without
    /// `--restart-on-crash`.
    from_reload: AtomicBool,
    /// Reads (and discards) the child's later sd_notify messages.
    notify_task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let Some(t) = &self.notify_task {
            t.abort();
        }
    }
}

struct Inner {
    config: Config,
    command: Mutex<Vec<OsString>>,
    /// Sockets handed to each child as fds: (name, socket).
    passed: Vec<(String, OwnedFd)>,
    /// Copies of the `--port-env` and `--http` listeners and of the
    /// control socket's listening socket, for a supervisor that takes over
    /// from this one.
    kept: Vec<(String, OwnedFd)>,
    /// `--http` listeners: name and the front that serves it.
    fronts: Vec<(String, Front)>,
    /// Set once another supervisor took over: the paths are its now.
    handed_over: AtomicBool,
    /// Where `/healthz` and `/readyz` are served.
    admin_addr: Option<std::net::SocketAddr>,
    last_takeover: Mutex<Option<Value>>,
    current: watch::Sender<Option<Arc<Generation>>>,
    generations: AtomicU64,
    crash_restarts: AtomicU64,
    /// Reloads by outcome (for `/metrics`).
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// One reload or crash restart at a time.
    transition: tokio::sync::Mutex<()>,
    backoff: Mutex<Duration>,
    last_reload: Mutex<Option<control::Outcome>>,
    started: Instant,
    stopping: AtomicBool,
    exit: watch::Sender<Option<i32>>,
    drain: Drain,
    notify_dir: PathBuf,
    listeners: Vec<Value>,
    /// Old children retired by a reload and not gone yet (`status`).
    draining: Mutex<Vec<control::DrainingGeneration>>,
    /// Old children being stopped in the background (retired by a reload,
    /// or not ready in time); a stop waits for them.
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// The supervisor. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field(
                "generations",
                &self.inner.generations.load(Ordering::SeqCst),
            )
            .finish()
    }
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Setup { what, source }
}

impl Supervisor {
    /// Binds the sockets, starts the first child and waits until it is
    /// ready, then serves the control socket and writes the pid file.
    ///
    /// With `--takeover`, the sockets come from the supervisor serving the
    /// control socket, if one does (listeners it does not have are bound):
    /// once the first child is ready, that supervisor is told, stops its
    /// own child gracefully and exits; only then does this one serve the
    /// control socket and write the pid file.
    pub async fn start(config: Config) -> Result<Supervisor, Error> {
        let mut offer = match (&config.control_socket, config.takeover) {
            (Some(path), true) => {
                baton::takeover::request(path, config.ready_timeout).map_err(Error::Takeover)?
            }
            _ => None,
        };
        let mut offered = match offer.as_mut() {
            Some(o) => std::mem::take(&mut o.fds),
            // A service manager's sockets (socket activation, or its fd
            // store after a restart) are taken by name the same way.
            None => baton::listen_fds().map_err(Error::Inherited)?,
        };
        let mut passed = Vec::new();
        let mut forwarded = Vec::new();
        let mut served = Vec::new();
        let mut fronts = Vec::new();
        let mut kept = Vec::new();
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let what = format!("--listen {}={}", l.name, l.spec);
            let fd = match take(&mut offered, &l.name) {
                Some(fd) => Ok(fd),
                None => l.spec.bind().and_then(|fd| {
                    if l.spec.kind == baton::ListenerKind::Tcp && !config.no_delay {
                        socket2::SockRef::from(&fd).set_tcp_nodelay(false)?;
                    }
                    Ok(fd)
                }),
            };
            let fd = fd.map_err(|source| {
                if source.kind() == std::io::ErrorKind::AddrInUse {
                    Error::InUse {
                        holders: holders::describe(l.spec.kind, &l.spec.address),
                        what: what.clone(),
                    }
                } else {
                    Error::Setup {
                        what: what.clone(),
                        source,
                    }
                }
            })?;
            let addr = baton::ListenSpec::local_addr(&fd)
                .map_err(setup(format!("--listen {}", l.name)))?;
            tracing::info!(name = %l.name, address = %addr, port_env = ?l.port_env, "listening");
            listeners.push(json!({"name": l.name, "kind": l.spec.kind, "address": addr.to_string(), "port_env": l.port_env}));
            if l.http {
                let copy = fd.try_clone().map_err(setup(what.clone()))?;
                kept.push((l.name.clone(), copy));
                let bound = match &addr {
                    baton::ListenAddr::Inet(a) => *a,
                    baton::ListenAddr::Unix(_) => {
                        return Err(Error::Config(format!("{what}: --http needs TCP")))
                    }
                };
                let front = Front::new(&l.name, bound, config.ready_timeout);
                fronts.push((l.name.clone(), front.clone()));
                served.push((l.name.clone(), front, fd));
                continue;
            }
            match &l.port_env {
                Some(var) => {
                    let copy = fd.try_clone().map_err(setup(what.clone()))?;
                    kept.push((l.name.clone(), copy));
                    forwarded.push((var.clone(), fd));
                }
                None => passed.push((l.name.clone(), fd)),
            }
        }
        let control_fd = match &config.control_socket {
            Some(path) => Some(
                take_or_bind(&mut offered, &mut kept, env::CONTROL_FD_NAME, || {
                    control::bind(path)
                })
                .map_err(setup(format!("control socket {}", path.display())))?,
            ),
            None => None,
        };
        let admin = match &config.admin {
            Some(spec) => {
                let what = format!("--admin {spec}");
                let fd = take_or_bind(&mut offered, &mut kept, ADMIN_LISTENER, || spec.bind())
                    .map_err(setup(what.clone()))?;
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true).map_err(setup(what.clone()))?;
                let addr = std.local_addr().map_err(setup(what.clone()))?;
                tracing::info!(address = %addr, "admin endpoints");
                Some((std, addr))
            }
            None => None,
        };
        for (name, _) in offered {
            tracing::info!(name, "closing a taken-over socket nobody asked for");
        }
        let notify_dir = std::env::temp_dir().join(format!("baton-run-{}", std::process::id()));
        {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::remove_dir_all(&notify_dir);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(&notify_dir)
                .map_err(setup(format!("{}", notify_dir.display())))?;
        }
        let (current, _) = watch::channel(None);
        let (exit, _) = watch::channel(None);
        let sup = Supervisor {
            inner: Arc::new(Inner {
                command: Mutex::new(config.command.clone()),
                passed,
                kept,
                fronts,
                handed_over: AtomicBool::new(false),
                admin_addr: admin.as_ref().map(|(_, a)| *a),
                last_takeover: Mutex::new(None),
                current,
                // A take-over continues the numbering of the children.
                generations: AtomicU64::new(
                    offer.as_ref().map_or(0, |o| o.generation.saturating_sub(1)),
                ),
                config,
                crash_restarts: AtomicU64::new(0),
                reloads_ok: AtomicU64::new(0),
                reloads_failed: AtomicU64::new(0),
                transition: tokio::sync::Mutex::new(()),
                backoff: Mutex::new(Duration::ZERO),
                last_reload: Mutex::new(None),
                started: Instant::now(),
                stopping: AtomicBool::new(false),
                exit,
                drain: Drain::new(Duration::from_secs(1)),
                notify_dir,
                listeners,
                draining: Mutex::new(Vec::new()),
                background: Mutex::new(Vec::new()),
            }),
        };
        let first = match sup.start_generation().await {
            Ok(first) => first,
            Err(reason) => {
                if let Some(offer) = offer {
                    offer.fail(&reason);
                }
                return Err(Error::FirstChild(reason));
            }
        };
        let acked = match offer {
            None => None,
            Some(offer) => match offer.ready().await {
                Ok(acked) => Some(acked),
                Err(e) => {
                    let (signal, drain) =
                        (sup.inner.config.stop_signal, sup.inner.config.drain_timeout);
                    stop_gracefully(&first.child, signal, drain).await;
                    return Err(Error::Takeover(e));
                }
            },
        };
        sup.make_current(first.clone());
        sup.monitor(first.clone());
        for (name, front, fd) in served {
            let std = std::net::TcpListener::from(fd);
            std.set_nonblocking(true)
                .map_err(setup("--http listener"))?;
            let listener = TcpListener::from_std(std).map_err(setup("--http listener"))?;
            let s = sup.clone();
            tokio::spawn(async move { s.serve_http(listener, name, front).await });
        }
        for (var, fd) in forwarded {
            let std = std::net::TcpListener::from(fd);
            let listener = TcpListener::from_std(std).map_err(setup("forwarding listener"))?;
            let s = sup.clone();
            tokio::spawn(async move { s.forward(listener, var).await });
        }
        if let (Some(path), Some(fd)) = (&sup.inner.config.control_socket, control_fd) {
            let std = std::os::unix::net::UnixListener::from(fd);
            let listener = tokio::net::UnixListener::from_std(std)
                .map_err(setup(format!("control socket {}", path.display())))?;
            tokio::spawn(control::serve(
                listener,
                sup.clone(),
                sup.inner.drain.handle(),
            ));
        }
        if let Some((std, _)) = admin {
            let listener = TcpListener::from_std(std).map_err(setup("--admin"))?;
            tokio::spawn(baton::admin::serve_with(
                listener,
                sup.clone(),
                sup.inner.drain.handle(),
            ));
        }
        if let Some(path) = &sup.inner.config.pid_file {
            pidfile::write(path, std::process::id())
                .map_err(setup(format!("pid file {}", path.display())))?;
        }
        sup.keep_in_fd_store();
        let _ = baton::sd_notify(&format!("READY=1\nMAINPID={}", std::process::id()));
        if let Some(acked) = acked {
            // The service's counters go on from the previous supervisor's.
            if let Some(c) = acked.carried() {
                sup.inner
                    .reloads_ok
                    .fetch_add(c.reloads_ok, Ordering::SeqCst);
                sup.inner
                    .reloads_failed
                    .fetch_add(c.reloads_failed, Ordering::SeqCst);
                sup.inner
                    .crash_restarts
                    .fetch_add(c.child_restarts, Ordering::SeqCst);
            }
            acked.confirm(Ok(())).await;
            tracing::info!("took over from the previous supervisor");
        }
        tracing::info!(
            pid = first.child.pid(),
            generation = first.number,
            "child ready"
        );
        Ok(sup)
    }

    /// With a service manager's fd store, every socket goes there (by
    /// name), so that a restart of the service gets them back.
    fn keep_in_fd_store(&self) {
        use std::os::fd::AsFd;
        let fds: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = self
            .inner
            .passed
            .iter()
            .chain(&self.inner.kept)
            .map(|(n, fd)| (n.as_str(), fd.as_fd()))
            .collect();
        match baton::sd_store_fds(&fds) {
            Ok(0) => {}
            Ok(n) => tracing::info!(sockets = n, "kept in the service manager's fd store"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep the sockets in the service manager's fd store")
            }
        }
    }

    /// Starts a child and waits until it is ready; kills it on failure.
    async fn start_generation(&self) -> Result<Arc<Generation>, String> {
        let cfg = &self.inner.config;
        let number = self.inner.generations.fetch_add(1, Ordering::SeqCst) + 1;
        let command = lock(&self.inner.command).clone();
        let Some(program) = command.first().map(|p| resolve(Path::new(p))) else {
            return Err("no command".into());
        };
        let mut spawn = Spawn::new(&program)
            .argv(command.iter().cloned())
            .env(env::BATON_GENERATION, number.to_string())
            .env_remove("NOTIFY_SOCKET")
            .env_remove(env::FDSTORE)
            .capture_stderr(true);
        // The child's sockets, in --listen order: the shared ones, and for
        // --http a private loopback one of its own per listener, which only
        // the child holds (once it is gone, connecting is refused and the
        // front waits for the next child instead of queueing there).
        let mut vars = HashMap::new();
        let mut ports = HashMap::new();
        let mut backends = Vec::new();
        for l in &cfg.listeners {
            if let Some(var) = &l.port_env {
                let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
                vars.insert(var.clone(), port.to_string());
                ports.insert(var.clone(), port);
                spawn = spawn.env(var, port.to_string());
                if l.http {
                    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                    vars.insert(format!("{BACKEND_VAR}{}", l.name), addr.to_string());
                    backends.push((l.name.clone(), addr));
                }
            } else if l.http {
                let (fd, addr) = private_socket(cfg.no_delay)
                    .map_err(|e| format!("binding the child's socket for {}: {e}", l.name))?;
                vars.insert(format!("{BACKEND_VAR}{}", l.name), addr.to_string());
                backends.push((l.name.clone(), addr));
                spawn = spawn.listen_fd(l.name.clone(), fd);
            } else if let Some((name, fd)) = self.inner.passed.iter().find(|(n, _)| *n == l.name) {
                let dup = fd
                    .try_clone()
                    .map_err(|e| format!("duplicating {name}: {e}"))?;
                spawn = spawn.listen_fd(name.clone(), dup);
            }
        }
        let notify = if cfg.ready == ReadyMode::Notify {
            let path = self.inner.notify_dir.join(format!("notify-{number}.sock"));
            let _ = std::fs::remove_file(&path);
            let sock = UnixDatagram::bind(&path).map_err(|e| format!("notify socket: {e}"))?;
            spawn = spawn.env("NOTIFY_SOCKET", &path);
            Some((sock, path))
        } else {
            None
        };
        let child = spawn
            .spawn()
            .await
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.pid();
        tracing::info!(pid, generation = number, "child started");

        let ready = async {
            match &cfg.ready {
                ReadyMode::Notify => match &notify {
                    Some((sock, _)) => probe::notify(sock).await,
                    None => Err("no notify socket".into()),
                },
                ReadyMode::Tcp(t) => {
                    probe::tcp(&probe::substitute(t, &vars)).await;
                    Ok(())
                }
                ReadyMode::Http(u) => probe::http(&probe::substitute(u, &vars)).await,
                ReadyMode::Delay(d) => {
                    tokio::time::sleep(*d).await;
                    Ok(())
                }
            }
        };
        let outcome = tokio::select! {
            r = ready => r,
            // Not reaped yet: what it started is killed with it below.
            _ = child.exited() => Err(match child.kill_tree_and_reap().await {
                Some(s) => format!("{s} before it was ready"),
                None => "exited before it was ready".to_owned(),
            }),
            _ = tokio::time::sleep(cfg.ready_timeout) => Err(format!("not ready within {:?}; killed it", cfg.ready_timeout)),
        };
        if let Err(reason) = outcome {
            let tail = child.stderr_tail().await;
            let tail = tail.trim_end();
            if !child.has_exited() {
                // Still running (not ready in time): it may already have
                // accepted connections on the shared sockets, so it is
                // stopped like an old child (stop signal, then SIGKILL at the
                // drain timeout), in the background.
                let (signal, drain) = (cfg.stop_signal, cfg.drain_timeout);
                self.background(async move { stop_gracefully(&child, signal, drain).await });
            } else {
                child.kill_tree_and_reap().await;
            }
            return Err(if tail.is_empty() {
                format!("child (pid {pid}) {reason}")
            } else {
                format!("child (pid {pid}) {reason}; stderr tail:\n{tail}")
            });
        }
        let notify_task = notify.map(|(sock, path)| {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = sock.recv(&mut buf).await {
                    tracing::debug!(message = %String::from_utf8_lossy(&buf[..n]), "child notification");
                }
                let _ = std::fs::remove_file(path);
            })
        });
        Ok(Arc::new(Generation {
            number,
            child,
            started: Instant::now(),
            ports,
            backends,
            conns: AtomicUsize::new(0),
            released: Mutex::new(Vec::new()),
            retiring: AtomicBool::new(false),
            from_reload: AtomicBool::new(false),
            notify_task,
        }))
    }

    /// Starts a new child on the same sockets and, once it is ready, retires
    /// the old one. Refused while another reload or a crash restart runs.
    pub async fn reload(&self) -> Result<Value, String> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err("the supervisor is stopping".into());
        }
        let Ok(_one) = self.inner.transition.try_lock() else {
            return Err("a reload is already in progress".into());
        };
        let _ = baton::sd_notify("RELOADING=1");
        let started = Instant::now();
        let mut result = self.start_generation().await;
        if let Ok(new) = &result {
            // The old child stays current and untouched until the new one
            // has stayed up for the settle period.
            tracing::info!(
                pid = new.child.pid(),
                generation = new.number,
                settle_ms = self.inner.config.settle.as_millis() as u64,
                "new child ready; settling"
            );
            if let Err(reason) = self.settle(new).await {
                result = Err(reason);
            }
        }
        let _ = baton::sd_notify("READY=1");
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        let answer = match result {
            Ok(new) if self.inner.stopping.load(Ordering::SeqCst) => {
                // A stop arrived while it was starting: the stop wins.
                self.retire(new);
                Err("aborted: stop requested".to_owned())
            }
            Ok(new) => {
                new.from_reload.store(true, Ordering::SeqCst);
                let old = self.make_current(new.clone());
                self.monitor(new.clone());
                if let Some(old) = old {
                    self.retire(old);
                }
                tracing::info!(
                    pid = new.child.pid(),
                    generation = new.number,
                    elapsed_ms,
                    "reloaded"
                );
                Ok(control::answer(&control::UpgradeAnswer {
                    ok: true,
                    pid: new.child.pid(),
                    generation: new.number,
                    elapsed_ms,
                }))
            }
            Err(reason) => {
                tracing::error!(%reason, "reload failed; the running child keeps serving");
                Err(reason)
            }
        };
        if answer.is_ok() {
            self.inner.reloads_ok.fetch_add(1, Ordering::SeqCst);
        } else {
            self.inner.reloads_failed.fetch_add(1, Ordering::SeqCst);
        }
        *lock(&self.inner.last_reload) = Some(control::Outcome {
            ok: answer.is_ok(),
            error: answer.as_ref().err().cloned(),
            kind: None,
            pid: answer
                .as_ref()
                .ok()
                .and_then(|a| a["pid"].as_u64())
                .map(|p| p as u32),
            generation: answer.as_ref().ok().and_then(|a| a["generation"].as_u64()),
            elapsed_ms: Some(elapsed_ms),
            at_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64() * 1000.0)
                .ok(),
            taken_back: None,
        });
        answer
    }

    /// The settle period of a reload: the new child, ready, must stay up
    /// this long. One that dies within it is reaped (with what it started)
    /// and fails the reload; a stop ends the wait early (the reload is then
    /// aborted by the caller).
    async fn settle(&self, new: &Generation) -> Result<(), String> {
        let period = self.inner.config.settle;
        if period.is_zero() {
            return Ok(());
        }
        let stop = self.inner.drain.handle();
        tokio::select! {
            _ = new.child.exited() => {}
            _ = tokio::time::sleep(period) => return Ok(()),
            _ = stop.draining() => return Ok(()),
        }
        let status = new
            .child
            .kill_tree_and_reap()
            .await
            .map_or_else(|| "exited".to_owned(), |s| s.to_string());
        let tail = new.child.stderr_tail().await;
        let tail = tail.trim_end();
        let old = self
            .inner
            .current
            .borrow()
            .as_ref()
            .map(|g| g.child.pid())
            .map_or_else(String::new, |pid| {
                format!("; the old child (pid {pid}) was not touched")
            });
        let reason = format!(
            "child (pid {}) {status} within the settle period ({period:?}) after it was ready{old}",
            new.child.pid()
        );
        Err(if tail.is_empty() {
            reason
        } else {
            format!("{reason}; stderr tail:\n{tail}")
        })
    }

    /// Makes `gen` the current child: `--port-env` connections and `--http`
    /// requests go to it from now on. Returns the child it replaces, whose
    /// `--http` requests still in flight are in its `released`.
    fn make_current(&self, gen: Arc<Generation>) -> Option<Arc<Generation>> {
        let old = self.inner.current.send_replace(Some(gen.clone()));
        for (name, front) in &self.inner.fronts {
            let to = gen
                .backends
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, a)| *a);
            if let (Some(backend), Some(old)) = (front.switch(to), &old) {
                lock(&old.released).push(backend);
            }
        }
        old
    }

    /// Whether anything forwarded to `gen` is still open: `--port-env`
    /// connections, `--http` requests and upgraded connections.
    fn busy(gen: &Generation) -> bool {
        gen.conns.load(Ordering::SeqCst) > 0
            || lock(&gen.released).iter().any(|b| b.in_flight() > 0)
    }

    /// Asks an old child to stop once what was forwarded to it is done,
    /// and kills it at the drain timeout.
    fn retire(&self, old: Arc<Generation>) {
        old.retiring.store(true, Ordering::SeqCst);
        let cfg_signal = self.inner.config.stop_signal;
        let drain = self.inner.config.drain_timeout;
        let (generation, pid) = (old.number, old.child.pid());
        lock(&self.inner.draining).push(control::DrainingGeneration { generation, pid });
        let s = self.clone();
        self.background(async move {
            let deadline = tokio::time::Instant::now() + drain;
            // Forwarded connections and requests finish on the old child
            // first: a child that dies at the stop signal (most do), or
            // closes its idle keep-alive connections then, would cut them
            // off.
            while Self::busy(&old) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            stop_gracefully(&old.child, cfg_signal, left).await;
            lock(&s.inner.draining).retain(|d| d.pid != pid);
        });
    }

    /// Watches a child: if it dies while current, restarts it (with
    /// `--restart-on-crash`) or makes the supervisor exit with its status.
    fn monitor(&self, gen: Arc<Generation>) {
        let s = self.clone();
        tokio::spawn(async move {
            // Whatever it started is an orphan that may hold our sockets:
            // killed with it (before it is reaped, so that its pid and
            // process group still name it), crash or not.
            gen.child.exited().await;
            let status = gen
                .child
                .kill_tree_and_reap()
                .await
                .unwrap_or(ExitStatus::Code(1));
            if gen.retiring.load(Ordering::SeqCst) || s.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            let _one = s.inner.transition.lock().await;
            let still_current =
                matches!(&*s.inner.current.borrow(), Some(c) if Arc::ptr_eq(c, &gen));
            if !still_current || s.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            tracing::error!(pid = gen.child.pid(), generation = gen.number, %status, "child died");
            // A child that came from a reload is restarted even without
            // --restart-on-crash: the operator asked for the service to go
            // on with a new child, not for the supervisor to exit.
            if !s.inner.config.restart_on_crash && !gen.from_reload.load(Ordering::SeqCst) {
                s.inner.exit.send_replace(Some(status.shell_code()));
                return;
            }
            let mut delay = {
                let mut b = lock(&s.inner.backoff);
                if gen.started.elapsed() >= BACKOFF_RESET {
                    *b = Duration::ZERO;
                }
                *b
            };
            loop {
                if !delay.is_zero() {
                    tracing::info!(
                        delay_ms = delay.as_millis() as u64,
                        "restarting after back-off"
                    );
                    tokio::time::sleep(delay).await;
                }
                if s.inner.stopping.load(Ordering::SeqCst) {
                    return;
                }
                delay = (delay * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                *lock(&s.inner.backoff) = delay;
                match s.start_generation().await {
                    Ok(new) => {
                        s.inner.crash_restarts.fetch_add(1, Ordering::SeqCst);
                        let after_reload = gen.from_reload.load(Ordering::SeqCst);
                        new.from_reload.store(after_reload, Ordering::SeqCst);
                        tracing::info!(
                            pid = new.child.pid(),
                            generation = new.number,
                            "replacement ready"
                        );
                        s.make_current(new.clone());
                        s.monitor(new);
                        return;
                    }
                    Err(reason) => tracing::error!(%reason, "replacement failed"),
                }
            }
        });
    }

    /// Accepts on a `--port-env` listener and forwards each connection to
    /// the current child's port.
    async fn forward(self, listener: TcpListener, var: String) {
        let shutdown = self.inner.drain.handle();
        loop {
            let (client, _) = tokio::select! {
                _ = shutdown.draining() => break,
                a = listener.accept() => match baton::accept::accepted(a, &var).await {
                    Some(a) => a,
                    None => continue,
                },
            };
            let s = self.clone();
            let var = var.clone();
            shutdown.spawn(async move { s.forward_one(client, &var).await });
        }
    }

    async fn forward_one(&self, mut client: TcpStream, var: &str) {
        let _ = client.set_nodelay(true);
        let mut current = self.inner.current.subscribe();
        let deadline = tokio::time::Instant::now() + self.inner.config.ready_timeout;
        // Find a child that accepts; while there is none (a crash), wait
        // for the next one instead of refusing the client.
        let (gen, mut upstream) = loop {
            let gen = current.borrow_and_update().clone();
            if let Some(gen) = gen {
                if let Some(port) = gen.ports.get(var) {
                    // Counted before connecting, so a retiring child is not
                    // told to stop while this connection is being set up.
                    gen.conns.fetch_add(1, Ordering::SeqCst);
                    match TcpStream::connect(("127.0.0.1", *port)).await {
                        Ok(up) => break (gen, up),
                        Err(e) => {
                            gen.conns.fetch_sub(1, Ordering::SeqCst);
                            tracing::debug!(error = %e, port, "child port refused; waiting for the next child");
                        }
                    }
                }
            }
            if tokio::time::timeout_at(deadline, current.changed())
                .await
                .is_err()
            {
                tracing::warn!("no child accepted a forwarded connection in time");
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        gen.conns.fetch_sub(1, Ordering::SeqCst);
    }

    /// Accepts on an `--http` listener and serves each client with `front`,
    /// which forwards its requests to the current child.
    async fn serve_http(self, listener: TcpListener, name: String, front: Front) {
        let shutdown = self.inner.drain.handle();
        loop {
            let (io, peer) = tokio::select! {
                _ = shutdown.draining() => break,
                a = listener.accept() => match baton::accept::accepted(a, &name).await {
                    Some(a) => a,
                    None => continue,
                },
            };
            shutdown.spawn(front.serve(io, peer, shutdown.clone()));
        }
    }

    /// Waits until the `--http` clients have gone (once draining, each gets
    /// `Connection: close` on its next response, and an idle one is closed
    /// after the idle grace), or `deadline`.
    async fn fronts_done(&self, deadline: tokio::time::Instant) {
        while self.inner.fronts.iter().any(|(_, f)| f.open() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the current child gracefully (stop signal, drain timeout, then
    /// SIGKILL), stops accepting, and makes [`wait`](Self::wait) return 0.
    /// `--http` clients are wound down before the child is told to stop.
    /// A reload or crash restart in progress finishes first (its new child
    /// is then stopped too), and children still being retired are waited
    /// for: nothing of the service is left behind.
    pub async fn stop(&self) {
        if self.inner.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        if !self.inner.handed_over.load(Ordering::SeqCst) {
            let _ = baton::sd_notify("STOPPING=1");
        }
        self.inner.drain.start();
        // No transition runs past this point (they all check `stopping`).
        let _one = self.inner.transition.lock().await;
        let current = self.inner.current.borrow().clone();
        let deadline = tokio::time::Instant::now() + self.inner.config.drain_timeout;
        self.fronts_done(deadline).await;
        if let Some(gen) = current {
            gen.retiring.store(true, Ordering::SeqCst);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            stop_gracefully(&gen.child, self.inner.config.stop_signal, left).await;
        }
        let background: Vec<_> = std::mem::take(&mut *lock(&self.inner.background));
        for task in background {
            let _ = task.await;
        }
        self.inner.exit.send_replace(Some(0));
    }

    /// Runs a child's stop in the background, where [`stop`](Self::stop)
    /// finds it.
    fn background(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.inner.background);
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(task));
    }

    /// Waits until the supervisor should exit, cleans up, and returns the
    /// exit status: 0 after a stop, the child's status after a crash without
    /// `--restart-on-crash`.
    pub async fn wait(&self) -> i32 {
        let mut rx = self.inner.exit.subscribe();
        let code = loop {
            if let Some(code) = *rx.borrow_and_update() {
                break code;
            }
            if rx.changed().await.is_err() {
                break 1;
            }
        };
        self.inner.drain.start();
        let _ = std::fs::remove_dir_all(&self.inner.notify_dir);
        if self.inner.handed_over.load(Ordering::SeqCst) {
            // The paths belong to the supervisor that took over.
            return code;
        }
        if let Some(p) = &self.inner.config.pid_file {
            let _ = std::fs::remove_file(p);
        }
        if baton::sd_fd_store_enabled() {
            // The sockets live on in the fd store for the next start of
            // the service: their paths must too.
            return code;
        }
        if let Some(p) = &self.inner.config.control_socket {
            let _ = std::fs::remove_file(p);
        }
        for l in &self.inner.config.listeners {
            if l.spec.kind == baton::ListenerKind::Unix {
                let _ = std::fs::remove_file(&l.spec.address);
            }
        }
        code
    }

    /// The control `status` answer: [`control::Status`], the same shape as a
    /// Baton server's, about the current child; the supervisor's own fields
    /// are extra.
    pub fn status(&self) -> Value {
        let current = self.inner.current.borrow().clone();
        let stopping = self.inner.stopping.load(Ordering::SeqCst);
        let listeners = self
            .inner
            .config
            .listeners
            .iter()
            .zip(&self.inner.listeners)
            .map(|(l, info)| control::ListenerStatus {
                name: l.name.clone(),
                kind: l.spec.kind.to_string(),
                address: info["address"].as_str().unwrap_or_default().to_owned(),
                inherited: None,
                port_env: l.port_env.clone(),
                connections: self
                    .inner
                    .fronts
                    .iter()
                    .find(|(n, _)| *n == l.name)
                    .map(|(_, f)| f.open() as u64),
            })
            .collect();
        let mut extra = serde_json::Map::new();
        extra.insert("supervisor_pid".into(), json!(std::process::id()));
        extra.insert(
            "supervisor_uptime_ms".into(),
            json!(self.inner.started.elapsed().as_secs_f64() * 1000.0),
        );
        extra.insert(
            "restarts".into(),
            json!(self.inner.crash_restarts.load(Ordering::SeqCst)),
        );
        extra.insert(
            "command".into(),
            json!(lock(&self.inner.command)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()),
        );
        extra.insert(
            "last_takeover".into(),
            json!(*lock(&self.inner.last_takeover)),
        );
        if let Some(addr) = self.inner.admin_addr {
            extra.insert("admin".into(), json!(addr.to_string()));
        }
        if !self.inner.fronts.is_empty() {
            // Where the current child serves each --http listener.
            let backends: serde_json::Map<String, Value> = current
                .iter()
                .flat_map(|g| &g.backends)
                .map(|(name, addr)| (name.clone(), json!(addr.to_string())))
                .collect();
            extra.insert("backends".into(), Value::Object(backends));
        }
        let status = control::Status {
            ok: true,
            pid: current.as_ref().map(|g| g.child.pid()),
            generation: current.as_ref().map(|g| g.number),
            state: if stopping { "draining" } else { "active" }.to_owned(),
            uptime_ms: current
                .as_ref()
                .map(|g| g.started.elapsed().as_secs_f64() * 1000.0),
            started_at_unix_ms: None,
            binary: None,
            upgrade_in_progress: self.inner.transition.try_lock().is_err(),
            listeners,
            last_upgrade: None,
            last_reload: lock(&self.inner.last_reload).clone(),
            draining: lock(&self.inner.draining).clone(),
            extra,
        };
        serde_json::to_value(&status).unwrap_or_else(|e| control::failure(e.to_string()))
    }

    /// Another supervisor asked for our sockets: hand them over, and once
    /// its child is ready, stop ours gracefully and exit.
    async fn hand_over(&self, conn: tokio::net::UnixStream) {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return control::refuse(conn, "the supervisor is stopping".into()).await;
        }
        // No reload or crash restart while the sockets change hands.
        let Ok(one) = self.inner.transition.try_lock() else {
            return control::refuse(conn, "a reload is already in progress".into()).await;
        };
        let mut fds = Vec::new();
        for (name, fd) in self.inner.passed.iter().chain(&self.inner.kept) {
            match fd.try_clone() {
                Ok(dup) => fds.push((name.clone(), dup)),
                Err(e) => {
                    return control::refuse(conn, format!("cannot duplicate {name}: {e}")).await
                }
            }
        }
        let generation = self.inner.generations.load(Ordering::SeqCst) + 1;
        let started = Instant::now();
        let cfg = &self.inner.config;
        let result = match baton::takeover::offer(conn, generation, fds, cfg.ready_timeout).await {
            Err(e) => Err(e.to_string()),
            Ok(mut successor) => {
                let pid = successor.pid();
                self.inner.handed_over.store(true, Ordering::SeqCst);
                // No more forwarding or control answers here: the new
                // supervisor does both now.
                self.inner.drain.start();
                let carried = baton::takeover::Carried {
                    reloads_ok: self.inner.reloads_ok.load(Ordering::SeqCst),
                    reloads_failed: self.inner.reloads_failed.load(Ordering::SeqCst),
                    child_restarts: self.inner.crash_restarts.load(Ordering::SeqCst),
                };
                if let Err(reason) = successor.confirm_with(CONFIRM_TIMEOUT, carried).await {
                    tracing::warn!(pid, %reason, "the new supervisor did not confirm");
                }
                Ok(pid)
            }
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        *lock(&self.inner.last_takeover) = Some(match &result {
            Ok(pid) => json!({"ok": true, "pid": pid, "elapsed_ms": elapsed_ms}),
            Err(e) => json!({"ok": false, "error": e, "elapsed_ms": elapsed_ms}),
        });
        drop(one);
        match result {
            Err(reason) => {
                tracing::error!(%reason, "take-over failed; this supervisor and its child keep serving");
            }
            Ok(pid) => {
                tracing::info!(
                    pid,
                    elapsed_ms,
                    "a new supervisor took over; stopping our child"
                );
                // Forwarded connections and `--http` clients finish on our
                // child first.
                let current = self.inner.current.borrow().clone();
                let deadline = tokio::time::Instant::now() + cfg.drain_timeout;
                self.fronts_done(deadline).await;
                if let Some(gen) = current {
                    while gen.conns.load(Ordering::SeqCst) > 0
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                self.stop().await;
            }
        }
    }
}

/// The name the `--admin` listener is handed over (and kept in a service
/// manager's fd store) as.
const ADMIN_LISTENER: &str = "baton-admin";

impl baton::admin::Readiness for Supervisor {
    /// Ready while it is not stopping and a child serves.
    fn readiness(&self) -> Result<(), String> {
        if self.inner.stopping.load(Ordering::SeqCst) {
            return Err("draining".to_owned());
        }
        if self.inner.current.borrow().is_none() {
            return Err("no child".to_owned());
        }
        Ok(())
    }

    /// The supervisor's metrics: the current child's generation, reloads by
    /// result and crash restarts, counted since this supervisor started.
    fn metrics(&self) -> Option<String> {
        use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
        #[derive(
            Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet,
        )]
        struct Outcome {
            result: &'static str,
        }
        let mut registry = prometheus_client::registry::Registry::default();
        let generation: Gauge = Gauge::default();
        let current = self.inner.current.borrow().as_ref().map_or(0, |g| g.number);
        generation.set(i64::try_from(current).unwrap_or(i64::MAX));
        registry.register(
            "baton_generation",
            "The generation number of the current child",
            generation,
        );
        let reloads = Family::<Outcome, Counter>::default();
        reloads
            .get_or_create(&Outcome { result: "ok" })
            .inc_by(self.inner.reloads_ok.load(Ordering::SeqCst));
        reloads
            .get_or_create(&Outcome { result: "failed" })
            .inc_by(self.inner.reloads_failed.load(Ordering::SeqCst));
        registry.register(
            "baton_reloads",
            "Reloads (a new child on the same sockets), by result",
            reloads,
        );
        let restarts: Counter = Counter::default();
        restarts.inc_by(self.inner.crash_restarts.load(Ordering::SeqCst));
        registry.register(
            "baton_child_restarts",
            "Children replaced after they died",
            restarts,
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).ok()?;
        Some(out)
    }
}

/// How long a supervisor that handed over waits for the new one to confirm
/// that it is active.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// The socket named `name` from a take-over (or a service manager), else
/// `bind()`; a copy goes to `kept`, to hand on to a later supervisor.
fn take_or_bind(
    offered: &mut Vec<(String, OwnedFd)>,
    kept: &mut Vec<(String, OwnedFd)>,
    name: &str,
    bind: impl FnOnce() -> std::io::Result<OwnedFd>,
) -> std::io::Result<OwnedFd> {
    let fd = match take(offered, name) {
        Some(fd) => fd,
        None => bind()?,
    };
    kept.push((name.to_owned(), fd.try_clone()?));
    Ok(fd)
}

/// Removes and returns the fd named `name` from a take-over's fds.
fn take(fds: &mut Vec<(String, OwnedFd)>, name: &str) -> Option<OwnedFd> {
    let i = fds.iter().position(|(n, _)| n == name)?;
    Some(fds.remove(i).1)
}

impl control::Handler for Supervisor {
    async fn handle(&self, request: control::Request) -> Value {
        match request {
            control::Request::Upgrade { binary } => {
                if let Some(b) = binary {
                    if let Some(first) = lock(&self.inner.command).first_mut() {
                        // From now on this binary is the command: like a
                        // Baton server, later reloads start it again.
                        *first = b.into_os_string();
                    }
                }
                self.reload().await.unwrap_or_else(control::failure)
            }
            control::Request::Reload {} => self.reload().await.unwrap_or_else(control::failure),
            control::Request::Status {} => self.status(),
            control::Request::Stop {} => {
                let s = self.clone();
                tokio::spawn(async move { s.stop().await });
                control::answer(&control::StopAnswer {
                    ok: true,
                    pid: std::process::id(),
                })
            }
            control::Request::Takeover {} => control::failure(control::TAKEOVER_ELSEWHERE),
        }
    }

    async fn takeover(&self, conn: tokio::net::UnixStream) {
        self.hand_over(conn).await;
    }
}

/// Sends the stop signal, waits up to `drain` for the child to exit, then
/// kills it; either way everything it started is killed with it and what
/// is ours is reaped ([`Child::kill_tree_and_reap`]: its process group, its
/// session, its descendants, whatever carries its `LISTEN_PID`).
async fn stop_gracefully(child: &Child, signal: i32, drain: Duration) {
    if let Err(e) = child.signal(signal) {
        tracing::debug!(error = %e, "stop signal");
    }
    let in_time = tokio::time::timeout(drain, child.exited()).await.is_ok();
    if !in_time {
        tracing::warn!(
            pid = child.pid(),
            "child still running at the drain timeout; killing it"
        );
    }
    let status = child.kill_tree_and_reap().await;
    if let (true, Some(status)) = (in_time, status) {
        tracing::info!(pid = child.pid(), %status, "child exited");
    }
}

/// A listening socket on a fresh loopback port, for one child's `--http`
/// listener, and its address.
fn private_socket(no_delay: bool) -> std::io::Result<(OwnedFd, std::net::SocketAddr)> {
    let spec: baton::ListenSpec = "127.0.0.1:0".parse().map_err(std::io::Error::other)?;
    let fd = spec.bind()?;
    if !no_delay {
        socket2::SockRef::from(&fd).set_tcp_nodelay(false)?;
    }
    let addr = socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    Ok((fd, addr))
}

/// A free loopback port for a child to bind (the kernel's pick; released
/// again at once, so the child can take it).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Looks a bare command name up in `PATH`, as a shell would; paths with a
/// `/` are used as they are. Done at every start, so a new binary in `PATH`
/// is what runs.
fn resolve(program: &Path) -> PathBuf {
    if program.as_os_str().as_encoded_bytes().contains(&b'/') {
        return program.to_path_buf();
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(program);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    program.to_path_buf()
}
