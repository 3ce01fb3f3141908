//! Metrics of the service in the Prometheus (OpenMetrics) text format,
//! served as `GET /metrics` by [`admin`](crate::admin).
//!
//! The counters are the service's, not the process's: each generation hands
//! its totals to the next in the handshake (`ack`), so a Prometheus `rate()`
//! sees no reset at an upgrade. Built on `prometheus-client`, the Prometheus
//! project's own Rust client: typed metric families, the text encoder, no
//! global registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: &'static str,
}

const OK: Outcome = Outcome { result: "ok" };
const FAILED: Outcome = Outcome { result: "failed" };

/// The totals handed from one generation to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Totals {
    pub upgrades_ok: u64,
    pub upgrades_failed: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
}

/// This generation's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    upgrades: Family<Outcome, Counter>,
    reloads: Family<Outcome, Counter>,
    upgrade_duration: Histogram,
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
        Metrics {
            registry,
            upgrades,
            reloads,
            upgrade_duration,
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
        }
    }

    /// Adds the previous generation's totals to ours.
    pub(crate) fn absorb(&self, t: Totals) {
        self.upgrades.get_or_create(&OK).inc_by(t.upgrades_ok);
        self.upgrades
            .get_or_create(&FAILED)
            .inc_by(t.upgrades_failed);
        self.reloads.get_or_create(&OK).inc_by(t.reloads_ok);
        self.reloads.get_or_create(&FAILED).inc_by(t.reloads_failed);
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
