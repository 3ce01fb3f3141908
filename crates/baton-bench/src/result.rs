//! The outcome of a run: [`BenchResult`], its JSON form and its summary.
//!
//! The JSON schema is documented in `SCHEMA.md` next to this crate's
//! `Cargo.toml`; keep the two in step (and bump [`SCHEMA_VERSION`] on an
//! incompatible change).

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::config::{BenchConfig, Mode, RestartAction};
use crate::error::BenchError;
use crate::outcome::ErrorCounts;
use crate::recorder::{Aggregate, BUCKET};

/// Version of the JSON document's layout.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything a run measured. Serializes to the JSON document described in
/// `SCHEMA.md`. Times are seconds relative to the start of the measured
/// window (the end of the warm-up); latencies are milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    /// [`SCHEMA_VERSION`] of the document.
    pub schema_version: u32,
    /// The configuration the run used.
    pub config: ConfigSummary,
    /// Wall-clock start of the measured window, seconds since the Unix epoch.
    pub started_unix_s: f64,
    /// Length of the measured load window actually run, in seconds: the
    /// configured duration, or less if the run was stopped early.
    pub elapsed_s: f64,
    /// True if the run was cancelled before the end of its duration.
    pub stopped_early: bool,
    /// Requests completed (successfully or not) in the measured window.
    pub requests: u64,
    /// Requests that got a 2xx or 3xx response.
    pub ok: u64,
    /// Requests that failed, any class (`errors.total()`).
    pub failed: u64,
    /// `requests / elapsed_s`.
    pub rate: f64,
    /// Latency of ok requests.
    pub latency: LatencyReport,
    /// Failed requests by class, over the whole measured window.
    pub errors: ErrorCounts,
    /// The part of `errors` that completed inside a restart window.
    pub errors_in_restart_windows: ErrorCounts,
    /// What happened during the warm-up, which is not measured otherwise.
    pub warmup: WarmupSummary,
    /// One entry per restart fired, in order.
    pub restarts: Vec<RestartRecord>,
    /// Request rate, latency and errors in fixed buckets across the run.
    pub timeline: Timeline,
}

/// The configuration echoed in a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigSummary {
    /// The target URL.
    pub url: String,
    /// Connection mode.
    pub mode: Mode,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Fixed total rate in requests per second, if any.
    pub rate: Option<f64>,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Warm-up, seconds.
    pub warmup_s: f64,
    /// Restarts requested.
    pub restarts: usize,
    /// How restarts were triggered.
    pub restart_action: Option<RestartAction>,
    /// Per-request timeout, seconds.
    pub timeout_s: f64,
    /// Margin added after each restart's end to form its window, seconds.
    pub window_margin_s: f64,
}

impl ConfigSummary {
    fn from_config(config: &BenchConfig) -> Self {
        Self {
            url: config.url().to_owned(),
            mode: config.mode(),
            concurrency: config.concurrency(),
            rate: config.rate(),
            duration_s: config.duration().as_secs_f64(),
            warmup_s: config.warmup().as_secs_f64(),
            restarts: config.restarts(),
            restart_action: config.restart().cloned(),
            timeout_s: config.timeout().as_secs_f64(),
            window_margin_s: config.window_margin().as_secs_f64(),
        }
    }
}

/// Latency percentiles of a set of ok requests, in milliseconds.
///
/// All zero when `count` is zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Number of requests measured.
    pub count: u64,
    /// Arithmetic mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Slowest request.
    pub max_ms: f64,
}

impl LatencyStats {
    fn from_histogram<T: hdrhistogram::Counter>(h: &Histogram<T>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Latency overall and split by restart windows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// All ok requests.
    pub all: LatencyStats,
    /// Ok requests that completed inside a restart window.
    pub in_restart_windows: LatencyStats,
    /// Ok requests that completed outside every restart window.
    pub outside_restart_windows: LatencyStats,
}

/// Requests completed during the warm-up (not part of any other figure).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmupSummary {
    /// Requests completed during the warm-up.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
}

/// How one restart action ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RestartOutcome {
    /// The restart command exited.
    Exited {
        /// Exit code, if it exited normally.
        code: Option<i32>,
        /// Signal that killed it, if any.
        signal: Option<i32>,
        /// The start of its standard error (at most 4 KiB, lossy UTF-8).
        stderr: String,
    },
    /// The signal was sent.
    SignalSent {
        /// Pid read from the pid file.
        pid: i32,
        /// Signal number sent.
        signal: i32,
    },
    /// The control socket answered.
    Control {
        /// The answer's `ok` field.
        ok: bool,
        /// The answer's `error` field, if any.
        error: Option<String>,
        /// The whole answer.
        response: serde_json::Value,
    },
    /// The action could not be carried out (command not spawned, pid file
    /// unreadable, socket unreachable, malformed answer, ...).
    Failed {
        /// What went wrong.
        error: String,
    },
    /// The action did not finish within the restart timeout (a command is
    /// killed, with its process group).
    TimedOut,
}

impl RestartOutcome {
    /// True for a command that exited 0, a signal sent, or a control answer
    /// with `"ok": true`.
    pub fn is_success(&self) -> bool {
        match self {
            RestartOutcome::Exited { code, .. } => *code == Some(0),
            RestartOutcome::SignalSent { .. } => true,
            RestartOutcome::Control { ok, .. } => *ok,
            RestartOutcome::Failed { .. } | RestartOutcome::TimedOut => false,
        }
    }

    /// A short human-readable description, e.g. `exited with status 0`.
    pub fn describe(&self) -> String {
        match self {
            RestartOutcome::Exited {
                code: Some(code), ..
            } => format!("exited with status {code}"),
            RestartOutcome::Exited {
                signal: Some(signal),
                ..
            } => format!("killed by signal {signal}"),
            RestartOutcome::Exited { .. } => "exited".to_owned(),
            RestartOutcome::SignalSent { pid, signal } => format!("signal {signal} sent to {pid}"),
            RestartOutcome::Control { ok: true, .. } => "control socket answered ok".to_owned(),
            RestartOutcome::Control { error, .. } => format!(
                "control socket answered not ok: {}",
                error.as_deref().unwrap_or("no error given")
            ),
            RestartOutcome::Failed { error } => format!("failed: {error}"),
            RestartOutcome::TimedOut => "timed out".to_owned(),
        }
    }
}

/// One restart: when, how long, how it ended, and what the clients saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestartRecord {
    /// 1-based number of the restart.
    pub index: usize,
    /// When the action was started, seconds since the measured window began.
    pub start_s: f64,
    /// How long the action took, seconds.
    pub duration_s: f64,
    /// End of this restart's window: `start_s + duration_s + window margin`.
    pub window_end_s: f64,
    /// True if the outcome counts as a success ([`RestartOutcome::is_success`]).
    pub success: bool,
    /// How it ended.
    pub outcome: RestartOutcome,
    /// Requests completed in the timeline buckets overlapping the window.
    pub requests: u64,
    /// Failures in the timeline buckets overlapping the window (so counted
    /// at 100 ms granularity; overlapping windows share buckets).
    pub errors: ErrorCounts,
}

/// Per-bucket figures across the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Width of a bucket in milliseconds (100).
    pub bucket_ms: u64,
    /// Consecutive buckets from 0 s, bucket `i` covering
    /// `[i * bucket_ms, (i + 1) * bucket_ms)`.
    pub buckets: Vec<TimelineBucket>,
}

/// One timeline bucket; requests are placed by completion time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimelineBucket {
    /// Start of the bucket, seconds.
    pub t_s: f64,
    /// Requests completed in the bucket.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Median latency of the bucket's ok requests (2 significant digits),
    /// `null` if there were none.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency of the bucket's ok requests, `null` if none.
    pub p99_ms: Option<f64>,
}

/// A restart as measured by the driver, before the load's numbers are in.
#[derive(Debug, Clone)]
pub(crate) struct RawRestart {
    pub(crate) start_s: f64,
    pub(crate) duration_s: f64,
    pub(crate) outcome: RestartOutcome,
}

/// Inputs to [`BenchResult::build`] that the runner measured.
#[derive(Debug)]
pub(crate) struct RunFacts {
    pub(crate) started_unix_s: f64,
    pub(crate) elapsed_s: f64,
    pub(crate) stopped_early: bool,
    pub(crate) restarts: Vec<RawRestart>,
}

impl BenchResult {
    pub(crate) fn build(config: &BenchConfig, mut agg: Aggregate, facts: RunFacts) -> Self {
        let bucket_s = BUCKET.as_secs_f64();
        let margin_s = config.window_margin().as_secs_f64();

        let mut errors = agg.errors_in_window;
        errors += &agg.errors_out_window;
        let failed = errors.total();
        let in_stats = LatencyStats::from_histogram(&agg.in_window);
        let out_stats = LatencyStats::from_histogram(&agg.out_window);
        // Both histograms share their bounds, so adding cannot fail; if it
        // somehow did, the overall figures would undercount, which we log.
        let mut all = agg.out_window.clone();
        if let Err(e) = all.add(&agg.in_window) {
            tracing::warn!(error = %e, "could not merge latency histograms");
        }
        let all_stats = LatencyStats::from_histogram(&all);
        let ok = all.len();
        let requests = ok + failed;

        let buckets: Vec<TimelineBucket> = agg
            .buckets
            .iter_mut()
            .enumerate()
            .map(|(i, b)| {
                let errs = b.errors.total();
                let (p50_ms, p99_ms) = match b.latency.take() {
                    Some(h) if !h.is_empty() => (
                        Some(h.value_at_quantile(0.50) as f64 / 1000.0),
                        Some(h.value_at_quantile(0.99) as f64 / 1000.0),
                    ),
                    _ => (None, None),
                };
                TimelineBucket {
                    t_s: (i as f64 * BUCKET.as_millis() as f64) / 1000.0,
                    requests: b.ok + errs,
                    errors: errs,
                    p50_ms,
                    p99_ms,
                }
            })
            .collect();

        let restarts = facts
            .restarts
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let window_end_s = r.start_s + r.duration_s + margin_s;
                let first = (r.start_s / bucket_s).floor().max(0.0) as usize;
                let last = (window_end_s / bucket_s).floor().max(0.0) as usize;
                let mut near = ErrorCounts::default();
                let mut reqs = 0;
                for b in agg.buckets.iter().take(last + 1).skip(first) {
                    near += &b.errors;
                    reqs += b.ok + b.errors.total();
                }
                RestartRecord {
                    index: i + 1,
                    start_s: r.start_s,
                    duration_s: r.duration_s,
                    window_end_s,
                    success: r.outcome.is_success(),
                    outcome: r.outcome,
                    requests: reqs,
                    errors: near,
                }
            })
            .collect();

        let rate = if facts.elapsed_s > 0.0 {
            requests as f64 / facts.elapsed_s
        } else {
            0.0
        };
        BenchResult {
            schema_version: SCHEMA_VERSION,
            config: ConfigSummary::from_config(config),
            started_unix_s: facts.started_unix_s,
            elapsed_s: facts.elapsed_s,
            stopped_early: facts.stopped_early,
            requests,
            ok,
            failed,
            rate,
            latency: LatencyReport {
                all: all_stats,
                in_restart_windows: in_stats,
                outside_restart_windows: out_stats,
            },
            errors,
            errors_in_restart_windows: agg.errors_in_window,
            warmup: WarmupSummary {
                requests: agg.warmup_requests,
                errors: agg.warmup_errors,
            },
            restarts,
            timeline: Timeline {
                bucket_ms: BUCKET.as_millis() as u64,
                buckets,
            },
        }
    }

    /// Number of failed requests; a run with `failed() == 0` lost nothing.
    pub fn failed(&self) -> u64 {
        self.failed
    }

    /// Number of restarts whose action did not succeed.
    pub fn failed_restarts(&self) -> usize {
        self.restarts.iter().filter(|r| !r.success).count()
    }

    /// The JSON document (see `SCHEMA.md`), pretty-printed.
    pub fn to_json(&self) -> Result<String, BenchError> {
        serde_json::to_string_pretty(self).map_err(|e| BenchError::output("json", e))
    }

    /// Parse a JSON document written by [`BenchResult::to_json`].
    pub fn from_json(json: &str) -> Result<Self, BenchError> {
        serde_json::from_str(json).map_err(|e| BenchError::config_with("invalid result json", e))
    }

    /// Write the JSON document to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let json = self.to_json()?;
        std::fs::write(path, json + "\n")
            .map_err(|e| BenchError::output(format!("json to {}", path.display()), e))
    }

    /// A human-readable multi-line summary, ending with a newline.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let rate = match c.rate {
            Some(r) => format!("{r} req/s"),
            None => "unlimited".to_owned(),
        };
        let _ = writeln!(
            s,
            "baton bench: {} ({} mode, {} clients, rate {}, {:.1}s{})",
            c.url,
            c.mode,
            c.concurrency,
            rate,
            self.elapsed_s,
            if self.stopped_early {
                ", stopped early"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "requests: {} ({:.0} req/s), ok: {}, failed: {}",
            self.requests, self.rate, self.ok, self.failed
        );
        let _ = writeln!(s, "errors: {}", self.errors);
        let _ = writeln!(
            s,
            "latency (ms)        {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
            "p50", "p90", "p99", "p99.9", "max", "count"
        );
        let row = |s: &mut String, name: &str, l: &LatencyStats| {
            let _ = writeln!(
                s,
                "  {:<18}{:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9}",
                name, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
            );
        };
        row(&mut s, "all", &self.latency.all);
        if !self.restarts.is_empty() {
            row(&mut s, "restart windows", &self.latency.in_restart_windows);
            row(&mut s, "outside", &self.latency.outside_restart_windows);
            let _ = writeln!(
                s,
                "errors in restart windows: {}",
                self.errors_in_restart_windows
            );
            let _ = writeln!(s, "restarts:");
            for r in &self.restarts {
                let _ = writeln!(
                    s,
                    "  #{} at {:.2}s took {:.3}s: {}; {} requests, errors: {}",
                    r.index,
                    r.start_s,
                    r.duration_s,
                    r.outcome.describe(),
                    r.requests,
                    r.errors
                );
            }
        }
        if self.warmup.requests > 0 {
            let _ = writeln!(
                s,
                "warm-up (not counted): {} requests, {} errors",
                self.warmup.requests, self.warmup.errors
            );
        }
        s
    }
}
