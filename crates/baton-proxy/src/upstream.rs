//! Upstream pools: server selection, passive failure marking, active health
//! checks.
//!
//! A server's health lives in a [`ServerState`] keyed by (upstream name,
//! address) in a [`Registry`] that outlives reloads, so a reload that keeps a
//! server keeps what is known about it (down, in flight).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Balance, HealthCheck, UpstreamConfig};
use crate::lock;

/// What is known about one server.
#[derive(Debug)]
pub(crate) struct ServerState {
    /// Its address.
    pub(crate) addr: SocketAddr,
    /// Requests or connections in flight to it.
    active: AtomicUsize,
    /// Result of the last active check (true until a check fails).
    check_ok: AtomicBool,
    /// Left out until this instant after a failed request (passive marking).
    down_until: Mutex<Option<Instant>>,
    /// Failures seen (passive and active).
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Set when a [`crate::front::Front`] moved to another backend: a
    /// request that counted itself in flight here after that goes there.
    retired: AtomicBool,
}

impl ServerState {
    fn new(addr: SocketAddr) -> Self {
        ServerState {
            addr,
            active: AtomicUsize::new(0),
            check_ok: AtomicBool::new(true),
            down_until: Mutex::new(None),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            retired: AtomicBool::new(false),
        }
    }

    /// A state of its own for `addr`, outside any registry (a
    /// [`crate::front::Front`]'s backend).
    pub(crate) fn standalone(addr: SocketAddr) -> Arc<Self> {
        Arc::new(ServerState::new(addr))
    }

    /// No new request goes here from now on (see [`begin`](Self::begin)).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Whether [`retire`](Self::retire) was called. Read after
    /// [`begin`](Self::begin): either the request sees it, or whoever
    /// retired the server sees the request in [`in_flight`](Self::in_flight).
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Requests or connections in flight to it now.
    pub(crate) fn in_flight(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Whether the server is taking requests now.
    pub(crate) fn is_up(&self) -> bool {
        self.check_ok.load(Ordering::Relaxed)
            && !matches!(*lock(&self.down_until), Some(t) if Instant::now() < t)
    }

    /// Marks a failed request: the server is left out for `fail_timeout`.
    pub(crate) fn mark_failed(&self, fail_timeout: Duration, error: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *lock(&self.down_until) = Some(Instant::now() + fail_timeout);
        *lock(&self.last_error) = Some(error.to_owned());
        tracing::warn!(server = %self.addr, error, "upstream server marked down");
    }

    fn set_check(&self, ok: bool, error: Option<String>) {
        let was = self.check_ok.swap(ok, Ordering::Relaxed);
        if ok {
            // A passing check also ends a passive mark: it is back.
            *lock(&self.down_until) = None;
            if !was {
                tracing::info!(server = %self.addr, "upstream server healthy again");
            }
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            if was {
                tracing::warn!(server = %self.addr, error = error.as_deref().unwrap_or(""), "upstream server failed its health check");
            }
            *lock(&self.last_error) = error;
        }
    }

    /// Counts a request or connection in flight until the guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        // SeqCst: pairs with `retire` and `in_flight` (see `is_retired`).
        self.active.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    fn status(&self) -> Value {
        json!({
            "address": self.addr.to_string(),
            "healthy": self.is_up(),
            "active": self.active.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
            "last_error": *lock(&self.last_error),
        })
    }
}

/// A request or connection in flight to a server.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<ServerState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Server states that survive reloads.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    servers: Mutex<HashMap<(String, SocketAddr), Arc<ServerState>>>,
}

impl Registry {
    fn get(&self, upstream: &str, addr: SocketAddr) -> Arc<ServerState> {
        lock(&self.servers)
            .entry((upstream.to_owned(), addr))
            .or_insert_with(|| Arc::new(ServerState::new(addr)))
            .clone()
    }

    /// Forgets servers no longer configured.
    pub(crate) fn retain(&self, keep: &dyn Fn(&str, SocketAddr) -> bool) {
        lock(&self.servers).retain(|(u, a), _| keep(u, *a));
    }
}

/// One upstream pool as configured by one configuration.
#[derive(Debug)]
pub(crate) struct Pool {
    /// The upstream's name.
    pub(crate) name: String,
    /// Its servers.
    pub(crate) servers: Vec<Arc<ServerState>>,
    balance: Balance,
    next: AtomicUsize,
    /// How long a failed server is left out.
    pub(crate) fail_timeout: Duration,
    health: Option<HealthCheck>,
    /// How requests reach the servers over TLS (`tls = true`).
    pub(crate) tls: Option<Arc<crate::tls::UpstreamTls>>,
}

impl Pool {
    /// A pool of one server, `state` (a [`crate::front::Front`]'s backend).
    pub(crate) fn single(name: &str, state: Arc<ServerState>) -> Pool {
        Pool {
            name: name.to_owned(),
            servers: vec![state],
            balance: Balance::RoundRobin,
            next: AtomicUsize::new(0),
            fail_timeout: Duration::ZERO,
            health: None,
            tls: None,
        }
    }

    /// Builds the pool for `cfg`, reusing known server states.
    pub(crate) fn new(cfg: &UpstreamConfig, registry: &Registry) -> Pool {
        Pool {
            name: cfg.name.clone(),
            servers: cfg
                .servers
                .iter()
                .map(|a| registry.get(&cfg.name, *a))
                .collect(),
            balance: cfg.balance,
            next: AtomicUsize::new(0),
            fail_timeout: cfg.fail_timeout,
            health: cfg.health_check.clone(),
            tls: None,
        }
    }

    /// The same pool, speaking TLS to its servers with `tls`.
    pub(crate) fn with_tls(mut self, tls: Option<Arc<crate::tls::UpstreamTls>>) -> Pool {
        self.tls = tls;
        self
    }

    /// Picks a server, skipping `exclude` (already tried) and servers that
    /// are down. If every server is down, picks among all of them rather
    /// than refusing (fail open: a pool marked down by a transient error
    /// recovers on the next success).
    pub(crate) fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<ServerState>> {
        let candidates: Vec<&Arc<ServerState>> = self
            .servers
            .iter()
            .filter(|s| !exclude.contains(&s.addr) && s.is_up())
            .collect();
        let candidates = if candidates.is_empty() {
            self.servers
                .iter()
                .filter(|s| !exclude.contains(&s.addr))
                .collect()
        } else {
            candidates
        };
        if candidates.is_empty() {
            return None;
        }
        let chosen = match self.balance {
            Balance::RoundRobin => {
                candidates[self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()]
            }
            Balance::Random => candidates[fastrand::usize(..candidates.len())],
            Balance::LeastConn => {
                // Ties go round robin, so equal servers share the load.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let n = candidates.len();
                (0..n)
                    .map(|i| candidates[(start + i) % n])
                    .min_by_key(|s| s.active.load(Ordering::Relaxed))
                    .unwrap_or(candidates[0])
            }
        };
        Some(chosen.clone())
    }

    /// The pool in the `status` answer.
    pub(crate) fn status(&self) -> Value {
        json!({
            "balance": self.balance.as_str(),
            "health_check": self.health.is_some(),
            "servers": self.servers.iter().map(|s| s.status()).collect::<Vec<_>>(),
        })
    }

    /// Starts this pool's active health checks (if configured). The task
    /// ends once the pool is dropped (replaced by a reload) or the process
    /// stops for good; while `stop` drains it pauses, and goes on if the
    /// process serves again ([`baton::Shutdown::resumed`]: a take-back).
    pub(crate) fn start_health_checks(self: &Arc<Self>, mut stop: baton::Shutdown) {
        let Some(check) = self.health.clone() else {
            return;
        };
        let weak: Weak<Pool> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(check.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.draining() => match stop.resumed().await {
                        Some(next) => {
                            stop = next;
                            continue;
                        }
                        None => break,
                    },
                    _ = tick.tick() => {}
                }
                let Some(pool) = weak.upgrade() else { break };
                let servers = pool.servers.clone();
                let tls = pool.tls.clone();
                drop(pool);
                let checks = servers.iter().map(|s| {
                    let check = check.clone();
                    let s = s.clone();
                    let tls = tls.clone();
                    async move {
                        let result = tokio::time::timeout(
                            check.timeout,
                            probe(s.addr, tls.as_ref(), check.path.as_deref()),
                        )
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {:?}", check.timeout)));
                        match result {
                            Ok(()) => s.set_check(true, None),
                            Err(e) => s.set_check(false, Some(e)),
                        }
                    }
                });
                futures_util::future::join_all(checks).await;
            }
        });
    }
}

/// One check: connect (and complete the TLS handshake, for an upstream
/// with `tls`), and with a path, `GET` it and expect 2xx or 3xx.
async fn probe(
    addr: SocketAddr,
    tls: Option<&Arc<crate::tls::UpstreamTls>>,
    path: Option<&str>,
) -> Result<(), String> {
    let mut s = crate::conn::UpstreamConn::connect(addr, tls, crate::conn::CONNECT_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?
        .stream;
    let Some(path) = path else { return Ok(()) };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: baton-proxy-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s
            .read(&mut buf[n..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if r == 0 {
            return Err("closed before answering".to_owned());
        }
        n += r;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "not an HTTP answer".to_owned())?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(balance: Balance) -> UpstreamConfig {
        UpstreamConfig {
            name: "app".into(),
            servers: vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            balance,
            health_check: None,
            fail_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    #[test]
    fn round_robin_alternates_and_skips_down_servers() {
        let reg = Registry::default();
        let pool = Pool::new(&cfg(Balance::RoundRobin), &reg);
        let a = pool.pick(&[]).unwrap().addr;
        let b = pool.pick(&[]).unwrap().addr;
        assert_ne!(a, b);
        pool.servers[0].mark_failed(Duration::from_secs(10), "test");
        for _ in 0..4 {
            assert_eq!(pool.pick(&[]).unwrap().addr, pool.servers[1].addr);
        }
        // State survives a rebuild of the pool (a reload).
        let again = Pool::new(&cfg(Balance::RoundRobin), &reg);
        assert!(!again.servers[0].is_up());
        // Every server down: fail open.
        again.servers[1].mark_failed(Duration::from_secs(10), "test");
        assert!(again.pick(&[]).is_some());
        assert!(again
            .pick(&[again.servers[0].addr, again.servers[1].addr])
            .is_none());
    }

    #[test]
    fn least_conn_prefers_the_idle_server() {
        let reg = Registry::default();
        let pool = Pool::new(&cfg(Balance::LeastConn), &reg);
        let _busy = pool.servers[0].begin();
        for _ in 0..4 {
            assert_eq!(pool.pick(&[]).unwrap().addr, pool.servers[1].addr);
        }
    }
}
