//! The running proxy: listeners, pools, reload and status.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::config::{self, Config, ConfigError, ListenerConfig, Position, Protocol};
use crate::conn::IdlePool;
use crate::forward::HttpContext;
use crate::listener::{self, Dispatch, DrainSettings, Running};
use crate::lock;
use crate::router::RouteTable;
use crate::stats::{self, ListenerStats};
use crate::upstream::{Pool, Registry};
use crate::workers::Workers;

/// Why the proxy could not start or a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration is invalid (every problem, `FILE:LINE:COL: message`).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound or inherited; `at` is its `address`
    /// in the configuration file.
    #[error("{at}: {source}")]
    Listener {
        /// Where the listener's `address` is written.
        at: Position,
        /// The cause (names the listener, the address and the OS error).
        #[source]
        source: baton::Error,
    },
    /// A listener's new address is not free.
    #[error("{at}: listener {name:?} at {address}: {source}")]
    Bind {
        /// Where the listener's `address` is written.
        at: Position,
        /// Its name.
        name: String,
        /// Its address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The `[admin]` listener could not be bound or inherited.
    #[error("[admin] address {address}: {source}")]
    Admin {
        /// The address.
        address: SocketAddr,
        /// The cause.
        #[source]
        source: baton::Error,
    },
    /// A task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
    /// The control socket's directory is unsafe or cannot be created.
    #[error("control socket directory {path}: {reason}")]
    ControlDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The configuration in force, with what was built from it.
#[derive(Debug)]
struct Loaded {
    config: Config,
    pools: HashMap<String, Arc<Pool>>,
    loaded_at: SystemTime,
    reloads: u64,
}

/// What a reload prepares on a blocking thread before it swaps anything.
struct Built {
    config: Config,
    /// The certificates of the `https` listeners, read and checked.
    material: crate::tls::Material,
    pools: HashMap<String, Arc<Pool>>,
    /// Route tables by listener name.
    tables: HashMap<String, RouteTable>,
}

/// How far a reload's thread lowers its CPU priority (`nice`).
const RELOAD_NICE: i32 = 10;

/// Runs `f` on a thread of its own at a low CPU priority
/// ([`RELOAD_NICE`]): the kernel gives the request-serving threads the CPU
/// first whenever they have work, so a reload's parse uses the CPU they
/// leave idle rather than delaying requests (on a machine with no idle CPU
/// at all, the reload takes longer instead). The result comes back through
/// the returned future; dropping it does not stop `f`.
fn in_background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = Result<T, ProxyError>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("baton-reload".to_owned())
        .spawn(move || {
            // On Linux a thread id names just this thread.
            let me = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(me), RELOAD_NICE) {
                tracing::debug!(error = %e, "cannot lower the reload thread's priority");
            }
            let _ = tx.send(f());
        });
    async move {
        spawned
            .map_err(|e| ProxyError::Internal(format!("cannot start the reload thread: {e}")))?;
        rx.await.map_err(|_| {
            ProxyError::Internal("the reload thread ended without an answer".to_owned())
        })
    }
}

/// Takes out of `v` the `Arc`s nobody else holds any more.
fn take_unique<T>(v: &mut Vec<Arc<T>>) -> Vec<Arc<T>> {
    let (unique, shared) = std::mem::take(v)
        .into_iter()
        .partition(|a| Arc::strong_count(a) == 1 && Arc::weak_count(a) == 0);
    *v = shared;
    unique
}

/// A listener bound before the generation is ready.
type Pending = (
    ListenerConfig,
    TcpListener,
    Arc<ListenerStats>,
    Dispatch,
    Option<listener::Incoming>,
);

struct Inner {
    baton: baton::Baton,
    source: Option<PathBuf>,
    loaded: baton::Reloadable<Loaded>,
    listeners: Mutex<BTreeMap<String, Running>>,
    /// Listeners removed by a reload that are still draining.
    draining: Mutex<Vec<Weak<ListenerStats>>>,
    /// Bound at start, served once the generation is ready.
    pending: Mutex<Vec<Pending>>,
    /// `[admin]`: bound at start, served once ready; its address.
    admin: Mutex<Option<TcpListener>>,
    admin_addr: Option<SocketAddr>,
    registry: Registry,
    idle: Arc<IdlePool>,
    settings: DrainSettings,
    /// `[server] migrate` at start: keep-alive connections move at an
    /// upgrade.
    migrate: bool,
    /// The session ticket keys of every `https` listener, passed on from
    /// generation to generation (`None`: no random source; no tickets).
    tickets: Option<Arc<baton::tls::Tickets>>,
    /// `runtime = "per-worker"`: the workers that accept and serve.
    workers: Option<Arc<Workers>>,
}

/// A running proxy. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("source", &self.inner.source)
            .finish()
    }
}

/// Creates the control socket's directory with mode 0700 if it is missing;
/// refuses an existing one owned by another user, and a symbolic link at
/// its path (the directory is opened with `O_NOFOLLOW | O_DIRECTORY` and
/// checked by `fstat` of what was opened, so a link planted there, such as
/// at `/tmp/baton-UID`, is refused rather than followed).
pub fn prepare_control_dir(socket: &std::path::Path) -> Result<(), ProxyError> {
    use rustix::fs::{Mode, OFlags};
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let err = |reason: String| ProxyError::ControlDir {
        path: dir.to_path_buf(),
        reason,
    };
    let exists = std::fs::symlink_metadata(dir).is_ok();
    if !exists {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(e.to_string()))?;
    }
    // Whether just created or found: what is there now must be a directory
    // of ours, not a link to one.
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
        if is_link {
            err(
                "is a symbolic link; refusing to follow it (remove it, or set control_socket)"
                    .to_owned(),
            )
        } else {
            err(std::io::Error::from(e).to_string())
        }
    })?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| err(std::io::Error::from(e).to_string()))?;
    let me = rustix::process::getuid().as_raw();
    if stat.st_uid != me {
        return Err(err(format!(
            "owned by uid {}, not by us (uid {me})",
            stat.st_uid
        )));
    }
    Ok(())
}

impl Proxy {
    /// Binds (or inherits) every listener of `config` and registers the
    /// reload and status handlers on `baton`. Call [`start`](Self::start)
    /// once the generation is ready.
    pub async fn bind(baton: baton::Baton, config: Config) -> Result<Proxy, ProxyError> {
        let registry = Registry::default();
        let config_migrate = config.server.migrate;
        let workers = match config.server.runtime {
            config::RuntimeModel::MultiThread => None,
            config::RuntimeModel::PerWorker => {
                let n = config.server.workers.unwrap_or_else(default_workers);
                Some(Arc::new(Workers::start(n).map_err(|e| {
                    ProxyError::Internal(format!("cannot start {n} worker threads: {e}"))
                })?))
            }
        };
        let idle = Arc::new(IdlePool::per_worker(
            workers.as_ref().map_or(1, |w| w.len()),
        ));
        let settings = DrainSettings {
            idle_grace: config.server.idle_grace,
            drain_timeout: config.server.drain_timeout,
        };
        let (mut material, warnings) = crate::tls::load(&config)?;
        let pools = build_pools(&config, &registry, &material.upstreams);
        let tickets = baton::tls::Tickets::for_baton(&baton);
        for w in warnings {
            tracing::warn!("{w}");
        }
        let mut pending = Vec::new();
        let mut tables = RouteTable::build_all(&config.routes, &pools);
        for l in &config.listeners {
            let tcp = bind_listener(&baton, l).await?;
            let bound = tcp.local_addr().unwrap_or(l.address);
            let stats = stats::for_listener(l, bound, baton.requests(&l.name));
            let table = tables.remove(&l.name).unwrap_or_default();
            let migrate = config.server.migrate.then_some(&baton);
            let tls = material
                .take(&l.name)
                .and_then(|c| crate::tls::acceptor(l, c, tickets.as_ref()));
            let dispatch = make_dispatch(l, table, &pools, &stats, &idle, migrate, tls);
            // Keep-alive connections of an HTTP listener that the previous
            // generation moves here at its upgrade.
            let incoming = config
                .server
                .migrate
                .then(|| baton.accept_migrated(&l.name));
            pending.push((l.clone(), tcp, stats, dispatch, incoming));
        }
        let admin = match config.admin {
            Some(address) => Some(
                baton
                    .tcp(crate::config::ADMIN_LISTENER, &address.to_string())
                    .await
                    .map_err(|source| ProxyError::Admin { address, source })?,
            ),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|a| a.local_addr().ok());
        let proxy = Proxy {
            inner: Arc::new(Inner {
                admin: Mutex::new(admin),
                admin_addr,
                baton: baton.clone(),
                source: config.source.clone(),
                loaded: baton::Reloadable::new(Loaded {
                    config,
                    pools,
                    loaded_at: SystemTime::now(),
                    reloads: 0,
                }),
                listeners: Mutex::new(BTreeMap::new()),
                draining: Mutex::new(Vec::new()),
                pending: Mutex::new(pending),
                registry,
                idle,
                settings,
                migrate: config_migrate,
                tickets,
                workers,
            }),
        };
        let weak = Arc::downgrade(&proxy.inner);
        baton.on_reload(move || {
            let inner = weak.upgrade();
            async move {
                match inner {
                    Some(inner) => Proxy { inner }
                        .reload()
                        .await
                        .map_err(|e| Box::new(e) as baton::BoxError),
                    None => Err("the proxy has stopped".into()),
                }
            }
        });
        let weak = Arc::downgrade(&proxy.inner);
        baton.on_status(move || match weak.upgrade() {
            Some(inner) => Proxy { inner }.status(),
            None => json!({}),
        });
        let weak = Arc::downgrade(&proxy.inner);
        baton.on_metrics(move |out| {
            if let Some(inner) = weak.upgrade() {
                Proxy { inner }.metrics(out);
            }
        });
        Ok(proxy)
    }

    /// Starts serving the listeners bound by [`bind`](Self::bind) and the
    /// health checks.
    pub fn start(&self) {
        let pending = std::mem::take(&mut *lock(&self.inner.pending));
        let mut listeners = lock(&self.inner.listeners);
        for (config, tcp, stats, dispatch, incoming) in pending {
            let running = listener::spawn(
                self.inner.baton.shutdown(),
                tcp,
                config.clone(),
                stats,
                dispatch,
                self.inner.settings,
                incoming,
                self.inner.workers.clone(),
            );
            listeners.insert(config.name.clone(), running);
        }
        drop(listeners);
        if let Some(admin) = lock(&self.inner.admin).take() {
            tokio::spawn(baton::admin::serve(admin, self.inner.baton.clone()));
        }
        for pool in self.inner.loaded.get().pools.values() {
            pool.start_health_checks(self.inner.baton.shutdown());
        }
    }

    /// Where `/healthz` and `/readyz` are served (`[admin]`), if anywhere.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.inner.admin_addr
    }

    /// The listeners serving now: name and bound address.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        let mut out: Vec<(String, SocketAddr)> = lock(&self.inner.listeners)
            .values()
            .map(|r| (r.config.name.clone(), r.stats.bound))
            .collect();
        out.extend(
            lock(&self.inner.pending)
                .iter()
                .map(|(c, _, s, _, _)| (c.name.clone(), s.bound)),
        );
        out
    }

    /// Re-reads the configuration file, validates it and swaps it in:
    /// routes and pools atomically per listener, new listeners bound,
    /// removed ones drained. A rejected file changes nothing.
    pub async fn reload(&self) -> Result<(), ProxyError> {
        let Some(path) = self.inner.source.clone() else {
            // The built-in configuration cannot change.
            return Ok(());
        };
        let mut replaced: Option<Arc<Loaded>> = None;
        let mut old_tables: Vec<Arc<RouteTable>> = Vec::new();
        let result = self
            .inner
            .loaded
            .reload_from(|old| {
                let inner = self.inner.clone();
                let (replaced, old_tables) = (&mut replaced, &mut old_tables);
                async move {
                    // Reading, parsing and compiling a large file takes
                    // milliseconds of CPU: keep all of it off the runtime's
                    // workers, which are serving requests, and let it
                    // yield the CPU to them.
                    let built = in_background(move || {
                        let config = config::load(&path)?;
                        let (material, warnings) = crate::tls::load(&config)?;
                        for w in warnings {
                            tracing::warn!("{w}");
                        }
                        let pools = build_pools(&config, &inner.registry, &material.upstreams);
                        let tables = RouteTable::build_all(&config.routes, &pools);
                        Ok::<_, ProxyError>(Built {
                            config,
                            material,
                            pools,
                            tables,
                        })
                    })
                    .await??;
                    let loaded = self.apply(&old, built, old_tables).await?;
                    *replaced = Some(old);
                    Ok(loaded)
                }
            })
            .await
            .map(|_| ());
        self.drop_off_runtime(old_tables, replaced);
        result
    }

    /// Frees what a reload replaced on a blocking thread: freeing 10,000
    /// routes takes about a millisecond of CPU that a request on a worker
    /// should not wait behind. A route table still used by requests in
    /// flight is freed once the last of them is done with it (or left to
    /// them after a while).
    fn drop_off_runtime(&self, mut tables: Vec<Arc<RouteTable>>, loaded: Option<Arc<Loaded>>) {
        let mut loaded: Vec<Arc<Loaded>> = loaded.into_iter().collect();
        if tables.is_empty() && loaded.is_empty() {
            return;
        }
        let shutdown = self.inner.baton.shutdown();
        let stop = shutdown.clone();
        // Tracked, and over once draining begins (it holds a `Shutdown`).
        shutdown.spawn(async move {
            let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
            loop {
                let unique_tables = take_unique(&mut tables);
                let unique_loaded = take_unique(&mut loaded);
                if !unique_tables.is_empty() || !unique_loaded.is_empty() {
                    // Detached: it finishes on its own.
                    drop(in_background(move || {
                        drop(unique_tables);
                        drop(unique_loaded);
                    }));
                }
                if tables.is_empty() && loaded.is_empty() {
                    return;
                }
                tokio::select! {
                    _ = stop.draining() => return,
                    _ = tokio::time::sleep_until(give_up) => return,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                }
            }
        });
    }

    async fn apply(
        &self,
        old: &Loaded,
        built: Built,
        old_tables: &mut Vec<Arc<RouteTable>>,
    ) -> Result<Loaded, ProxyError> {
        let Built {
            config: new,
            mut material,
            pools,
            mut tables,
        } = built;
        let baton = &self.inner.baton;
        if new.server != old.config.server {
            tracing::warn!("[server] settings changed; they take effect at the next upgrade");
        }
        let current: BTreeMap<String, ListenerConfig> = lock(&self.inner.listeners)
            .iter()
            .map(|(n, r)| (n.clone(), r.config.clone()))
            .collect();
        let mut added = Vec::new();
        let mut changed = Vec::new();
        for l in &new.listeners {
            match current.get(&l.name) {
                None => added.push(l.clone()),
                Some(c) if c.address != l.address || c.protocol != l.protocol => {
                    changed.push(l.clone())
                }
                Some(_) => {}
            }
        }
        let removed: Vec<String> = current
            .keys()
            .filter(|n| !new.listeners.iter().any(|l| &l.name == *n))
            .cloned()
            .collect();

        // Bind new listeners first: if one fails, nothing has changed yet.
        let mut bound: Vec<(ListenerConfig, TcpListener)> = Vec::new();
        let undo = |bound: &Vec<(ListenerConfig, TcpListener)>| {
            for (l, _) in bound {
                baton.release(&l.name);
            }
        };
        for l in &added {
            match bind_listener(baton, l).await {
                Ok(t) => bound.push((l.clone(), t)),
                Err(e) => {
                    undo(&bound);
                    return Err(e);
                }
            }
        }
        // A listener whose address changes is removed and added under the
        // same name; check the new address is free before touching it.
        for l in &changed {
            let same_address = lock(&self.inner.listeners)
                .get(&l.name)
                .is_some_and(|r| r.stats.bound == l.address);
            if l.address.port() != 0 && !same_address {
                if let Err(e) = std::net::TcpListener::bind(l.address) {
                    undo(&bound);
                    return Err(ProxyError::Bind {
                        at: l.address_at.clone(),
                        name: l.name.clone(),
                        address: l.address,
                        source: e,
                    });
                }
            }
        }
        // From here on the new configuration is applied.
        let mut failures = Vec::new();
        for l in &changed {
            if let Some(closed) = self.retire(&l.name) {
                // Same address, other protocol: the old socket must be closed
                // before the address can be bound again.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), closed.cancelled())
                    .await;
            }
            match bind_listener(baton, l).await {
                Ok(t) => bound.push((l.clone(), t)),
                Err(e) => {
                    tracing::error!(listener = %l.name, address = %l.address, error = %e, "cannot bind the listener's new address");
                    failures.push(e);
                }
            }
        }
        for name in &removed {
            self.retire(name);
        }
        // Swap routes and pools of the listeners that stay, and their
        // certificates (new handshakes use them at once).
        let mut rotate = Vec::new();
        {
            let listeners = lock(&self.inner.listeners);
            for r in listeners.values() {
                match &r.dispatch {
                    Dispatch::Http(ctx) => {
                        let table = tables.remove(&r.config.name).unwrap_or_default();
                        old_tables.push(ctx.routes.swap(Arc::new(table)));
                        let settings = new
                            .listeners
                            .iter()
                            .find(|l| l.name == r.config.name)
                            .and_then(|l| l.tls.as_ref());
                        if let (Some(acceptor), Some(settings), Some(certificates)) =
                            (&ctx.tls, settings, material.take(&r.config.name))
                        {
                            acceptor.set_options(&crate::tls::options(
                                settings,
                                self.inner.tickets.as_ref(),
                            ));
                            rotate.push((acceptor.clone(), certificates));
                        }
                    }
                    Dispatch::Tcp(pool, _) => {
                        let upstream = new
                            .listeners
                            .iter()
                            .find(|l| l.name == r.config.name)
                            .and_then(|l| l.upstream.as_ref())
                            .and_then(|u| pools.get(u));
                        if let Some(p) = upstream {
                            pool.store(p.clone());
                        }
                    }
                }
            }
        }
        for (acceptor, certificates) in rotate {
            let _ = acceptor
                .certificates()
                .reload(|| async { Ok::<_, std::convert::Infallible>(certificates) })
                .await;
        }
        for (l, tcp) in bound {
            let b = tcp.local_addr().unwrap_or(l.address);
            let stats = stats::for_listener(&l, b, baton.requests(&l.name));
            let table = tables.remove(&l.name).unwrap_or_default();
            let migrate = self.inner.migrate.then_some(baton);
            let tls = material
                .take(&l.name)
                .and_then(|c| crate::tls::acceptor(&l, c, self.inner.tickets.as_ref()));
            let dispatch = make_dispatch(&l, table, &pools, &stats, &self.inner.idle, migrate, tls);
            let running = listener::spawn(
                baton.shutdown(),
                tcp,
                l.clone(),
                stats,
                dispatch,
                self.inner.settings,
                None,
                self.inner.workers.clone(),
            );
            tracing::info!(listener = %l.name, address = %b, "listener added by reload");
            lock(&self.inner.listeners).insert(l.name.clone(), running);
        }
        for pool in pools.values() {
            pool.start_health_checks(baton.shutdown());
        }
        self.inner.registry.retain(&|u, a| {
            new.upstreams
                .get(u)
                .is_some_and(|up| up.servers.contains(&a))
        });
        if let Some(e) = failures.into_iter().next() {
            // Applied, except for this listener: say so.
            return Err(e);
        }
        Ok(Loaded {
            config: new,
            pools,
            loaded_at: SystemTime::now(),
            reloads: old.reloads + 1,
        })
    }

    /// Stops a listener: no longer handed to later generations, stops
    /// accepting, drains its connections.
    /// Returns what fires once its socket is closed.
    fn retire(&self, name: &str) -> Option<tokio_util::sync::CancellationToken> {
        let running = lock(&self.inner.listeners).remove(name);
        self.inner.baton.release(name);
        let r = running?;
        r.remove();
        let mut draining = lock(&self.inner.draining);
        draining.retain(|w| w.strong_count() > 0);
        draining.push(Arc::downgrade(&r.stats));
        Some(r.closed())
    }

    /// The proxy's metric families: connections by state and upstream
    /// servers' health, from the same counters as `status`.
    fn metrics(&self, out: &mut String) {
        use prometheus_client::encoding::EncodeLabelSet;
        use prometheus_client::metrics::{family::Family, gauge::Gauge};
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct ConnState {
            state: &'static str,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Server {
            upstream: String,
            server: String,
        }
        let status = self.status();
        let p = &status["proxy"];
        let mut registry = prometheus_client::registry::Registry::default();
        let conns = Family::<ConnState, Gauge>::default();
        for state in ["active", "draining", "migrated"] {
            let n = p["connections"][state].as_i64().unwrap_or(0);
            conns.get_or_create(&ConnState { state }).set(n);
        }
        registry.register(
            "baton_connections",
            "Client connections of this generation, by state: accepted here (active), moved here from the previous generation (migrated), on listeners a reload removed (draining)",
            conns,
        );
        let up = Family::<Server, Gauge>::default();
        for (name, pool) in p["upstreams"].as_object().into_iter().flatten() {
            for s in pool["servers"].as_array().into_iter().flatten() {
                let server = s["address"].as_str().unwrap_or_default().to_owned();
                let healthy = i64::from(s["healthy"] == true);
                up.get_or_create(&Server {
                    upstream: name.clone(),
                    server,
                })
                .set(healthy);
            }
        }
        registry.register(
            "baton_upstream_up",
            "1 while an upstream server is taken as healthy, else 0",
            up,
        );
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_ok() {
            let end = text.rfind("# EOF").unwrap_or(text.len());
            out.push_str(&text[..end]);
        }
    }

    /// The proxy's part of the `status` answer (under `"proxy"`).
    pub fn status(&self) -> Value {
        let loaded = self.inner.loaded.get();
        let listeners: Vec<Arc<ListenerStats>> = lock(&self.inner.listeners)
            .values()
            .map(|r| r.stats.clone())
            .collect();
        let draining: Vec<Arc<ListenerStats>> = lock(&self.inner.draining)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let open: usize = listeners.iter().map(|s| s.open()).sum();
        let migrated: usize = listeners.iter().map(|s| s.migrated()).sum();
        let active = open.saturating_sub(migrated);
        let draining_conns: usize = draining.iter().map(|s| s.open()).sum();
        let upstreams: serde_json::Map<String, Value> = loaded
            .pools
            .iter()
            .map(|(n, p)| (n.clone(), p.status()))
            .collect();
        json!({
            "proxy": {
                "config_file": self.inner.source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| config::BUILTIN_NAME.to_owned()),
                "config_loaded_at_unix_ms": unix_ms(loaded.loaded_at),
                "reloads": loaded.reloads,
                "routes": loaded.config.routes.len(),
                "listeners": listeners.iter().map(|s| s.status()).collect::<Vec<_>>(),
                "draining_listeners": draining.iter().map(|s| s.status()).collect::<Vec<_>>(),
                "connections": {"active": active, "draining": draining_conns, "migrated": migrated},
                "upstreams": upstreams,
                // The threads that serve connections (`[server] workers`)
                // and how (`[server] runtime`).
                "workers": match &self.inner.workers {
                    Some(w) => Some(w.len()),
                    None => tokio::runtime::Handle::try_current().ok().map(|h| h.metrics().num_workers()),
                },
                "runtime": if self.inner.workers.is_some() {
                    config::RuntimeModel::PerWorker
                } else {
                    config::RuntimeModel::MultiThread
                }
                .as_str(),
            }
        })
    }
}

/// Worker threads when `[server] workers` is not set: `TOKIO_WORKER_THREADS`
/// as for the multi-thread runtime, else one per core.
fn default_workers() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| (1..=config::MAX_WORKERS).contains(n))
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// Binds (or inherits) listener `l`; an error names where its address is
/// written.
async fn bind_listener(
    baton: &baton::Baton,
    l: &ListenerConfig,
) -> Result<TcpListener, ProxyError> {
    baton
        .tcp(&l.name, &l.address.to_string())
        .await
        .map_err(|source| ProxyError::Listener {
            at: l.address_at.clone(),
            source,
        })
}

pub(crate) fn build_pools(
    config: &Config,
    registry: &Registry,
    tls: &HashMap<String, Arc<crate::tls::UpstreamTls>>,
) -> HashMap<String, Arc<Pool>> {
    config
        .upstreams
        .values()
        .map(|u| {
            let pool = Pool::new(u, registry).with_tls(tls.get(&u.name).cloned());
            (u.name.clone(), Arc::new(pool))
        })
        .collect()
}

fn make_dispatch(
    l: &ListenerConfig,
    routes: RouteTable,
    pools: &HashMap<String, Arc<Pool>>,
    stats: &Arc<ListenerStats>,
    idle: &Arc<IdlePool>,
    migrate: Option<&baton::Baton>,
    tls: Option<baton::tls::Acceptor>,
) -> Dispatch {
    match l.protocol {
        Protocol::Http | Protocol::Https => Dispatch::Http(Arc::new(HttpContext {
            listener: l.name.clone(),
            routes: ArcSwap::from_pointee(routes),
            stats: stats.clone(),
            idle: idle.clone(),
            baton: migrate.cloned(),
            tls,
        })),
        Protocol::Tcp => {
            let pool = l
                .upstream
                .as_ref()
                .and_then(|u| pools.get(u))
                .cloned()
                .unwrap_or_else(|| {
                    // Validation guarantees the upstream exists; an empty
                    // pool refuses every connection if it somehow does not.
                    Arc::new(Pool::new(
                        &config::UpstreamConfig {
                            name: String::new(),
                            servers: Vec::new(),
                            balance: config::Balance::RoundRobin,
                            health_check: None,
                            fail_timeout: std::time::Duration::from_secs(10),
                            tls: None,
                        },
                        &Registry::default(),
                    ))
                });
            Dispatch::Tcp(Arc::new(ArcSwap::new(pool)), migrate.cloned())
        }
    }
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_directory_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("baton-proxy-dir-{}", std::process::id()));
        let socket = base.join("a").join("proxy.sock");
        prepare_control_dir(&socket).unwrap();
        let mode = std::fs::metadata(base.join("a"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // An existing directory of ours is fine.
        prepare_control_dir(&socket).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_symlink_at_the_control_directory_is_refused_not_followed() {
        let base = std::env::temp_dir().join(format!("baton-proxy-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        // A directory of ours, so only the link itself is wrong.
        let real = base.join("real");
        std::fs::create_dir_all(&real).unwrap();
        let link = base.join("baton-link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = prepare_control_dir(&link.join("proxy.sock")).unwrap_err();
        assert!(
            matches!(&e, ProxyError::ControlDir { path, .. } if path == &link),
            "{e}"
        );
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // The real directory is fine on its own.
        prepare_control_dir(&real.join("proxy.sock")).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}
