//! The run itself: workers, the restart driver and progress reporting.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{BenchConfig, RestartAction};
use crate::error::BenchError;
use crate::http::Client;
use crate::outcome::ErrorClass;
use crate::recorder::{Counters, Recorder, Shared};
use crate::restart;
use crate::result::{BenchResult, RawRestart, RunFacts};

/// How often the progress callback is called.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Load is sent but not measured.
    Warmup,
    /// The measured window.
    Load,
    /// The load is over; waiting for in-flight requests or a restart still
    /// in progress.
    Finishing,
    /// Everything is done; the last call of the callback.
    Done,
}

/// A snapshot of a run in progress, handed to the progress callback about
/// once a second (see [`PROGRESS_INTERVAL`]) and once at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Where the run is.
    pub phase: Phase,
    /// Time since the load started, warm-up included.
    pub elapsed: Duration,
    /// Requests completed in the measured window so far.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Restarts finished so far.
    pub restarts_done: usize,
    /// Restarts planned.
    pub restarts_total: usize,
}

impl fmt::Display for Progress {
    /// One line for a terminal, e.g.
    /// `[  12.0s] load: 123456 requests, 0 errors, restarts 1/3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match self.phase {
            Phase::Warmup => "warm-up",
            Phase::Load => "load",
            Phase::Finishing => "finishing",
            Phase::Done => "done",
        };
        write!(
            f,
            "[{:>7.1}s] {phase}: {} requests, {} errors",
            self.elapsed.as_secs_f64(),
            self.requests,
            self.errors
        )?;
        if self.restarts_total > 0 {
            write!(
                f,
                ", restarts {}/{}",
                self.restarts_done, self.restarts_total
            )?;
        }
        Ok(())
    }
}

/// Run the benchmark described by `config` to its end.
///
/// See [`run_until`].
pub async fn run(
    config: BenchConfig,
    progress: impl FnMut(&Progress),
) -> Result<BenchResult, BenchError> {
    run_until(config, progress, CancellationToken::new()).await
}

/// Run the benchmark described by `config`, stopping early if `shutdown` is
/// cancelled (the result then has `stopped_early` set and covers the time
/// run so far).
///
/// The sequence is:
/// 1. one probe TCP connection to the target; if it fails the run ends with
///    an [`unreachable`](BenchError::is_unreachable) error and no load;
/// 2. `concurrency` clients send requests for `warmup + duration`; requests
///    completing during the warm-up are counted apart;
/// 3. the `restarts` restarts are fired one after the other at
///    `duration * i / (restarts + 1)` into the measured window (later if
///    the previous one is still running);
/// 4. when the duration is over no new request is sent; requests in flight
///    complete (each is bounded by the timeout) and are counted, and a
///    restart still in progress is waited for (bounded by the restart
///    timeout).
///
/// `progress` is called from this task about once a second and once at the
/// end; keep it quick (print a line).
///
/// Must be called within a tokio runtime with the time and I/O drivers
/// enabled; the workers are spawned on it.
pub async fn run_until(
    config: BenchConfig,
    mut progress: impl FnMut(&Progress),
    shutdown: CancellationToken,
) -> Result<BenchResult, BenchError> {
    probe(&config).await?;

    let load_start = Instant::now();
    let measure_start = load_start + config.warmup();
    let load_end = measure_start + config.duration();
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() + config.warmup().as_secs_f64())
        .unwrap_or(0.0);
    // A request never outlives its timeout by much; anything beyond this is
    // clamped (and shows as max).
    let max_latency = config.timeout() + Duration::from_secs(1);
    let shared = Arc::new(
        Shared::new(measure_start, max_latency)
            .map_err(|e| BenchError::config_with("timeout out of range", e))?,
    );
    info!(
        url = config.url(),
        mode = %config.mode(),
        concurrency = config.concurrency(),
        duration = ?config.duration(),
        restarts = config.restarts(),
        "load starting"
    );

    let stop = shutdown.child_token();
    // If this future is dropped half-way, the clients and the restart driver
    // are told to stop instead of running on to the end of the duration.
    let _stop_on_drop = stop.clone().drop_guard();
    let tracker = TaskTracker::new();
    let n = config.concurrency();
    let mut counters = Vec::with_capacity(n);
    for i in 0..n {
        let c = Arc::new(Counters::default());
        counters.push(Arc::clone(&c));
        // Each client gets an equal share of the rate, phase-shifted so the
        // total is evenly spread rather than sent in bursts of `n`.
        let schedule = config.rate().map(|rate| Schedule {
            next: load_start + Duration::from_secs_f64(i as f64 / rate),
            interval: Duration::from_secs_f64(n as f64 / rate),
        });
        let worker = Worker {
            client: Client::new(config.target(), config.mode()),
            recorder: Recorder::new(Arc::clone(&shared), c),
            schedule,
            load_end,
            timeout: config.timeout(),
            // One token per worker keeps waiter registration uncontended.
            stop: stop.child_token(),
        };
        tracker.spawn(worker.run());
    }
    tracker.close();

    let restarts_done = Arc::new(AtomicUsize::new(0));
    let restarts_total = config.restarts();
    let driver = match config.restart() {
        Some(action) if restarts_total > 0 => {
            let plan = RestartPlan {
                action: action.clone(),
                count: restarts_total,
                measure_start,
                duration: config.duration(),
                limit: config.restart_timeout(),
                margin: config.window_margin(),
                shared: Arc::clone(&shared),
                stop: stop.clone(),
                done: Arc::clone(&restarts_done),
            };
            Some(tokio::spawn(plan.run()))
        }
        _ => None,
    };

    let snapshot = |phase: Phase| {
        let (requests, errors) = counters.iter().fold((0, 0), |(r, e), c| {
            (
                r + c.requests.load(Ordering::Relaxed),
                e + c.errors.load(Ordering::Relaxed),
            )
        });
        Progress {
            phase,
            elapsed: load_start.elapsed(),
            requests,
            errors,
            restarts_done: restarts_done.load(Ordering::Relaxed),
            restarts_total,
        }
    };
    let phase_now = |workers_done: bool| {
        let now = Instant::now();
        if workers_done || now >= load_end {
            Phase::Finishing
        } else if now < measure_start {
            Phase::Warmup
        } else {
            Phase::Load
        }
    };

    let mut ticker = tokio::time::interval_at(load_start + PROGRESS_INTERVAL, PROGRESS_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut stopped_at: Option<Instant> = None;
    let mut workers_done = false;
    let mut raw_restarts: Option<Vec<RawRestart>> = if driver.is_none() {
        Some(Vec::new())
    } else {
        None
    };
    let mut driver = driver;
    while !workers_done || raw_restarts.is_none() {
        tokio::select! {
            _ = tracker.wait(), if !workers_done => {
                workers_done = true;
            }
            joined = async {
                match driver.as_mut() {
                    Some(handle) => handle.await,
                    None => std::future::pending().await,
                }
            }, if raw_restarts.is_none() => {
                raw_restarts = Some(joined.unwrap_or_else(|e| {
                    warn!(error = %e, "restart driver failed");
                    Vec::new()
                }));
                driver = None;
            }
            _ = shutdown.cancelled(), if stopped_at.is_none() => {
                info!("benchmark stopped early");
                stopped_at = Some(Instant::now());
            }
            _ = ticker.tick() => {
                progress(&snapshot(phase_now(workers_done)));
            }
        }
    }
    progress(&snapshot(Phase::Done));

    let Some(aggregate) = shared.take() else {
        // Only `run_until` takes it, once.
        return Err(BenchError::config("internal: results already taken"));
    };
    let window_end = match stopped_at {
        Some(at) if at < load_end => at,
        _ => load_end,
    };
    let facts = RunFacts {
        started_unix_s,
        elapsed_s: window_end
            .saturating_duration_since(measure_start)
            .as_secs_f64(),
        stopped_early: stopped_at.is_some_and(|at| at < load_end),
        restarts: raw_restarts.unwrap_or_default(),
    };
    let result = BenchResult::build(&config, aggregate, facts);
    info!(
        requests = result.requests,
        failed = result.failed,
        restarts = result.restarts.len(),
        "load finished"
    );
    Ok(result)
}

/// One connection attempt, so that a wrong URL fails fast and clearly
/// instead of producing a run full of `connect_refused`.
async fn probe(config: &BenchConfig) -> Result<(), BenchError> {
    let addr = config.target().addr();
    match tokio::time::timeout(config.timeout(), TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(BenchError::unreachable(addr, e)),
        Err(_) => Err(BenchError::unreachable(
            addr,
            io::Error::new(io::ErrorKind::TimedOut, "probe connection timed out"),
        )),
    }
}

#[derive(Debug, Clone, Copy)]
struct Schedule {
    next: Instant,
    interval: Duration,
}

#[derive(Debug)]
struct Worker {
    client: Client,
    recorder: Recorder,
    schedule: Option<Schedule>,
    load_end: Instant,
    timeout: Duration,
    stop: CancellationToken,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let now = Instant::now();
            if now >= self.load_end || self.stop.is_cancelled() {
                break;
            }
            if let Some(s) = self.schedule.as_mut() {
                if s.next >= self.load_end {
                    break;
                }
                if s.next > now {
                    tokio::select! {
                        _ = sleep_until(s.next) => {}
                        _ = self.stop.cancelled() => break,
                    }
                }
                // Missed slots are dropped rather than sent in a burst: after
                // a stall the client goes back to its pace.
                s.next = (s.next + s.interval).max(Instant::now());
            }
            let start = Instant::now();
            let result = tokio::select! {
                biased;
                r = self.client.request(start + self.timeout) => r,
                _ = self.stop.cancelled() => break,
            };
            let end = Instant::now();
            let error = match result {
                Ok(r) if (200..400).contains(&r.status) => None,
                Ok(r) => {
                    debug!(status = r.status, "bad status");
                    Some(ErrorClass::BadStatus)
                }
                Err(class) => {
                    debug!(%class, "request failed");
                    Some(class)
                }
            };
            self.recorder.record(start, end, error);
        }
        self.recorder.flush();
    }
}

#[derive(Debug)]
struct RestartPlan {
    action: RestartAction,
    count: usize,
    measure_start: Instant,
    duration: Duration,
    limit: Duration,
    margin: Duration,
    shared: Arc<Shared>,
    stop: CancellationToken,
    done: Arc<AtomicUsize>,
}

impl RestartPlan {
    async fn run(self) -> Vec<RawRestart> {
        let mut records = Vec::with_capacity(self.count);
        for i in 0..self.count {
            let at = self.measure_start
                + self
                    .duration
                    .mul_f64((i + 1) as f64 / (self.count + 1) as f64);
            tokio::select! {
                _ = sleep_until(at) => {}
                _ = self.stop.cancelled() => break,
            }
            let start = Instant::now();
            self.shared.window.restart_started();
            info!(restart = i + 1, "restart fired");
            // Not cancellable: abandoning an upgrade half-way would leave the
            // server in an unknown state; it is bounded by `limit` instead.
            let outcome = restart::execute(&self.action, self.limit).await;
            let end = Instant::now();
            let window_end = end.saturating_duration_since(self.measure_start) + self.margin;
            self.shared
                .window
                .restart_ended(u64::try_from(window_end.as_micros()).unwrap_or(u64::MAX));
            let duration = end.saturating_duration_since(start);
            if outcome.is_success() {
                info!(restart = i + 1, ?duration, "restart finished");
            } else {
                warn!(
                    restart = i + 1,
                    ?duration,
                    ?outcome,
                    "restart did not succeed"
                );
            }
            records.push(RawRestart {
                start_s: start
                    .saturating_duration_since(self.measure_start)
                    .as_secs_f64(),
                duration_s: duration.as_secs_f64(),
                outcome,
            });
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        records
    }
}
