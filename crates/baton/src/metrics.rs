//! Metrics of the service in the Prometheus (OpenMetrics) text format,
//! served as `GET /metrics` by [`admin`](crate::admin).
//!
//! The counters are the service's, not the process's: each generation hands
//! its totals to the next in the handshake (`ack`), so a Prometheus `rate()`
//! sees no reset at an upgrade. Built on `prometheus-client`, the Prometheus
//! project's own Rust client: typed metric families, the text encoder, no
//! global registry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::sync::lock;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

const OK: Outcome = Outcome { result: "ok" };
const FAILED: Outcome = Outcome { result: "failed" };

/// The totals handed from one generation to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Totals {
    pub upgrades_ok: u64,
    pub upgrades_failed: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Requests by listener (absent from an older binary's `ack`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, RequestTotals>,
    /// Children replaced after they died (`baton run`'s, handed to the
    /// supervisor that takes over).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub child_restarts: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Upper bounds of the request duration buckets, in microseconds (0.5 ms
/// to 10 s; a last one, +Inf, follows).
const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Status classes: 1xx to 5xx.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One listener's request counters as carried to the next generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RequestTotals {
    /// By status class, 1xx to 5xx.
    pub classes: [u64; 5],
    /// Per duration bucket (not cumulative), [`BUCKETS_US`] then +Inf.
    pub buckets: Vec<u64>,
    /// Sum of the durations, in microseconds.
    pub sum_us: u64,
}

/// The request counters of one listener: lock-free, so that recording a
/// request costs three relaxed atomic additions.
#[derive(Debug, Default)]
struct Requests {
    classes: [AtomicU64; 5],
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    /// Connections open now (this generation's; not carried).
    open: AtomicU64,
}

impl Requests {
    fn totals(&self) -> RequestTotals {
        RequestTotals {
            classes: std::array::from_fn(|i| self.classes[i].load(Ordering::Relaxed)),
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }

    fn add(&self, t: &RequestTotals) {
        for (c, v) in self.classes.iter().zip(t.classes) {
            c.fetch_add(v, Ordering::Relaxed);
        }
        for (b, v) in self.buckets.iter().zip(&t.buckets) {
            b.fetch_add(*v, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(t.sum_us, Ordering::Relaxed);
    }
}

/// Where an HTTP server records the requests of one listener, for
/// `baton_requests_total{listener,code_class}` and
/// `baton_request_duration_seconds{listener}` on `/metrics` (from
/// [`Baton::requests`](crate::Baton::requests)). Like the upgrade counters,
/// they are the service's: each generation hands its totals to the next.
/// Cheap to clone; recording takes no lock.
///
/// ```
/// # async fn demo(baton: baton::Baton) {
/// let requests = baton.requests("http");
/// let started = std::time::Instant::now();
/// // ... serve a request ...
/// requests.observe(200, started.elapsed());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RequestMetrics(Arc<Requests>);

impl RequestMetrics {
    /// Counters that belong to no [`Baton`](crate::Baton) (nothing exposes
    /// them): for code that records requests whether or not it runs under
    /// one.
    pub fn detached() -> RequestMetrics {
        RequestMetrics(Arc::default())
    }

    /// Records a request answered with `status` after `elapsed`. Statuses
    /// outside 100–599 count as 1xx or 5xx.
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let r = &self.0;
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        r.classes[class].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BUCKETS_US.len());
        r.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        r.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Counts an open connection of this listener until the guard drops:
    /// shown in `status` (and `baton ctl status`).
    pub fn connection(&self) -> ConnectionGuard {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.0.clone())
    }

    /// Connections open now (see [`connection`](Self::connection)).
    pub fn open_connections(&self) -> u64 {
        self.0.open.load(Ordering::Relaxed)
    }

    /// Requests recorded (here and, once carried, by earlier generations).
    pub fn total(&self) -> u64 {
        self.0
            .classes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// An open connection, counted by [`RequestMetrics::connection`] until
/// dropped.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Requests>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every listener's [`Requests`], encoded at each scrape.
#[derive(Debug, Default)]
struct RequestsCollector(Mutex<BTreeMap<String, Arc<Requests>>>);

impl RequestsCollector {
    fn get(&self, listener: &str) -> Arc<Requests> {
        lock(&self.0)
            .entry(listener.to_owned())
            .or_default()
            .clone()
    }
}

impl Collector for RequestsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all: Vec<(String, RequestTotals)> = lock(&self.0)
            .iter()
            .map(|(l, r)| (l.clone(), r.totals()))
            .collect();
        if all.is_empty() {
            return Ok(());
        }
        {
            let mut family = encoder.encode_descriptor(
                "baton_requests",
                "HTTP requests answered, by listener and status class, over all generations",
                None,
                MetricType::Counter,
            )?;
            for (listener, t) in &all {
                for (class, n) in CLASSES.iter().zip(t.classes) {
                    let labels = [("listener", listener.as_str()), ("code_class", *class)];
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "baton_request_duration_seconds",
            "From a request's head to the end of its response, by listener, over all generations",
            None,
            MetricType::Histogram,
        )?;
        for (listener, t) in &all {
            let buckets: Vec<(f64, u64)> = BUCKETS_US
                .iter()
                .map(|us| *us as f64 / 1e6)
                .chain([f64::INFINITY])
                .zip(t.buckets.iter().copied())
                .collect();
            let count = t.buckets.iter().sum();
            let labels = [("listener", listener.as_str())];
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(t.sum_us as f64 / 1e6, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// This generation's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    upgrades: Family<Outcome, Counter>,
    reloads: Family<Outcome, Counter>,
    upgrade_duration: Histogram,
    requests: Arc<RequestsCollector>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("totals", &self.totals())
            .finish()
    }
}

impl Metrics {
    pub(crate) fn new(generation: u64) -> Metrics {
        let mut registry = Registry::default();
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(generation).unwrap_or(i64::MAX));
        registry.register(
            "baton_generation",
            "The generation number of the process answering",
            g.clone(),
        );
        let upgrades = Family::<Outcome, Counter>::default();
        registry.register(
            "baton_upgrades",
            "Upgrades and take-overs of the service, by result, over all generations",
            upgrades.clone(),
        );
        let reloads = Family::<Outcome, Counter>::default();
        registry.register(
            "baton_reloads",
            "In-process configuration reloads of the service, by result, over all generations",
            reloads.clone(),
        );
        // 1 ms to about 65 s.
        let upgrade_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
        );
        registry.register(
            "baton_upgrade_duration_seconds",
            "From an upgrade request to the new generation's readiness, as seen by the generation that upgraded",
            upgrade_duration.clone(),
        );
        // Present from the start, at zero.
        for o in [OK, FAILED] {
            drop(upgrades.get_or_create(&o));
            drop(reloads.get_or_create(&o));
        }
        let requests = Arc::new(RequestsCollector::default());
        registry.register_collector(Box::new(requests.clone()));
        Metrics {
            registry,
            upgrades,
            reloads,
            upgrade_duration,
            requests,
        }
    }

    pub(crate) fn upgrade(&self, ok: bool, seconds: Option<f64>) {
        self.upgrades
            .get_or_create(if ok { &OK } else { &FAILED })
            .inc();
        if let Some(s) = seconds {
            self.upgrade_duration.observe(s);
        }
    }

    pub(crate) fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(if ok { &OK } else { &FAILED })
            .inc();
    }

    pub(crate) fn totals(&self) -> Totals {
        Totals {
            upgrades_ok: self.upgrades.get_or_create(&OK).get(),
            upgrades_failed: self.upgrades.get_or_create(&FAILED).get(),
            reloads_ok: self.reloads.get_or_create(&OK).get(),
            reloads_failed: self.reloads.get_or_create(&FAILED).get(),
            requests: lock(&self.requests.0)
                .iter()
                .map(|(l, r)| (l.clone(), r.totals()))
                .collect(),
            child_restarts: 0,
        }
    }

    /// The request counters of `listener`.
    pub(crate) fn requests(&self, listener: &str) -> RequestMetrics {
        RequestMetrics(self.requests.get(listener))
    }

    /// Open connections of `listener`, if its server counts them.
    pub(crate) fn open_connections(&self, listener: &str) -> Option<u64> {
        lock(&self.requests.0)
            .get(listener)
            .map(|r| r.open.load(Ordering::Relaxed))
    }

    /// Adds the previous generation's totals to ours.
    pub(crate) fn absorb(&self, t: &Totals) {
        self.upgrades.get_or_create(&OK).inc_by(t.upgrades_ok);
        self.upgrades
            .get_or_create(&FAILED)
            .inc_by(t.upgrades_failed);
        self.reloads.get_or_create(&OK).inc_by(t.reloads_ok);
        self.reloads.get_or_create(&FAILED).inc_by(t.reloads_failed);
        for (listener, r) in &t.requests {
            self.requests.get(listener).add(r);
        }
    }

    /// The text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_count_by_class_and_bucket_and_carry_over() {
        let old = Metrics::new(1);
        let r = old.requests("web");
        r.observe(200, Duration::from_micros(100));
        r.observe(204, Duration::from_millis(3));
        r.observe(503, Duration::from_secs(60));
        r.observe(0, Duration::ZERO);
        assert_eq!(r.total(), 4);
        let t = old.totals();
        let web = &t.requests["web"];
        assert_eq!(web.classes, [1, 2, 0, 0, 1]);
        assert_eq!(web.buckets[0], 2, "0 and 100 µs: le 0.0005");
        assert_eq!(web.buckets[3], 1, "3 ms: le 0.005");
        assert_eq!(web.buckets[BUCKETS_US.len()], 1, "60 s: +Inf");
        // Through the handshake's JSON, into the next generation.
        let line = serde_json::to_string(&t).unwrap();
        let new = Metrics::new(2);
        new.requests("web").observe(200, Duration::from_millis(1));
        new.absorb(&serde_json::from_str(&line).unwrap());
        assert_eq!(new.requests("web").total(), 5);
        let text = new.encode();
        assert!(
            text.contains("baton_requests_total{listener=\"web\",code_class=\"2xx\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("baton_request_duration_seconds_count{listener=\"web\"} 5"),
            "{text}"
        );
        // An older binary's totals have no requests.
        let older: Totals = serde_json::from_str(
            r#"{"upgrades_ok":1,"upgrades_failed":0,"reloads_ok":0,"reloads_failed":0}"#,
        )
        .unwrap();
        assert!(older.requests.is_empty());
    }
}
