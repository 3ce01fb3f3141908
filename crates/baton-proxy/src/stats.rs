//! Counters of one listener (open, upgraded and accepted connections,
//! requests, draining), shown in `status`. The connection engines count
//! through it; the listener module owns it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::config::{ListenerConfig, Protocol};

/// Counters of one listener, shown in `status`.
#[derive(Debug)]
pub(crate) struct ListenerStats {
    /// Its name.
    pub(crate) name: String,
    /// What it speaks.
    pub(crate) protocol: Protocol,
    /// The address it is bound to.
    pub(crate) bound: SocketAddr,
    connections: AtomicUsize,
    upgraded: AtomicUsize,
    /// HTTP/2 streams in flight.
    streams: AtomicUsize,
    /// Of `connections`: those a previous generation moved here.
    migrated: AtomicUsize,
    accepted: AtomicU64,
    requests: AtomicU64,
    draining: AtomicBool,
    /// Requests by status class and duration, for `/metrics`.
    pub(crate) requests_metrics: baton::RequestMetrics,
}

/// Counts an open connection (or an HTTP/2 stream) until dropped.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    stats: Arc<ListenerStats>,
    kind: Kind,
    /// The same connection in the library's count (`status`); none for a
    /// stream.
    _open: Option<baton::ConnectionGuard>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Connection,
    Upgraded,
    Stream,
    /// Not counted (an HTTP/2 connection's pipe to the engine).
    None,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let counter = match self.kind {
            Kind::Connection => &self.stats.connections,
            Kind::Upgraded => &self.stats.upgraded,
            Kind::Stream => &self.stats.streams,
            Kind::None => return,
        };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ListenerStats {
    pub(crate) fn new(
        name: &str,
        protocol: Protocol,
        bound: SocketAddr,
        requests_metrics: baton::RequestMetrics,
    ) -> Self {
        ListenerStats {
            name: name.to_owned(),
            protocol,
            bound,
            connections: AtomicUsize::new(0),
            upgraded: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            migrated: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            requests_metrics,
        }
    }

    pub(crate) fn connection(self: &Arc<Self>) -> ConnGuard {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnGuard {
            stats: self.clone(),
            kind: Kind::Connection,
            _open: Some(self.requests_metrics.connection()),
        }
    }

    /// A guard that counts nothing (the engine behind an HTTP/2
    /// connection's pipe: the connection and its streams are counted
    /// already).
    pub(crate) fn uncounted(self: &Arc<Self>) -> ConnGuard {
        ConnGuard {
            stats: self.clone(),
            kind: Kind::None,
            _open: None,
        }
    }

    /// Counts an HTTP/2 stream in flight until the guard drops (its
    /// connection is counted by [`connection`](Self::connection)).
    pub(crate) fn stream(self: &Arc<Self>) -> ConnGuard {
        self.streams.fetch_add(1, Ordering::Relaxed);
        ConnGuard {
            stats: self.clone(),
            kind: Kind::Stream,
            _open: None,
        }
    }

    /// Counts an upgraded (WebSocket) connection until the guard drops.
    pub(crate) fn upgraded(self: &Arc<Self>) -> ConnGuard {
        self.upgraded.fetch_add(1, Ordering::Relaxed);
        ConnGuard {
            stats: self.clone(),
            kind: Kind::Upgraded,
            _open: Some(self.requests_metrics.connection()),
        }
    }

    /// Counts, until the guard drops, an open connection that a previous
    /// generation moved here (it is counted by [`connection`](Self::connection)
    /// too).
    pub(crate) fn moved_in(self: &Arc<Self>) -> MovedIn {
        self.migrated.fetch_add(1, Ordering::Relaxed);
        MovedIn(self.clone())
    }

    /// Open connections that a previous generation moved here.
    pub(crate) fn migrated(&self) -> usize {
        self.migrated.load(Ordering::Relaxed)
    }

    /// Counts a request.
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Open connections (including upgraded ones).
    pub(crate) fn open(&self) -> usize {
        self.connections.load(Ordering::Relaxed) + self.upgraded.load(Ordering::Relaxed)
    }

    /// Marks the listener draining, or serving again (a take-back).
    pub(crate) fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// Whether this listener is draining.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The listener in the `status` answer.
    pub(crate) fn status(&self) -> Value {
        json!({
            "name": self.name,
            "protocol": self.protocol.as_str(),
            "address": self.bound.to_string(),
            "draining": self.is_draining(),
            "connections": self.connections.load(Ordering::Relaxed),
            "upgraded": self.upgraded.load(Ordering::Relaxed),
            "streams": self.streams.load(Ordering::Relaxed),
            "migrated": self.migrated(),
            "accepted": self.accepted.load(Ordering::Relaxed),
            "requests": self.requests.load(Ordering::Relaxed),
        })
    }
}

/// A connection moved here from a previous generation, counted until
/// dropped.
#[derive(Debug)]
pub(crate) struct MovedIn(Arc<ListenerStats>);

impl Drop for MovedIn {
    fn drop(&mut self) {
        self.0.migrated.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters for a listener bound at `bound`.
pub(crate) fn for_listener(
    config: &ListenerConfig,
    bound: SocketAddr,
    requests: baton::RequestMetrics,
) -> Arc<ListenerStats> {
    Arc::new(ListenerStats::new(
        &config.name,
        config.protocol,
        bound,
        requests,
    ))
}
