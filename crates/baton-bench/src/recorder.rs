//! Recording request outcomes from many workers.
//!
//! Each worker appends samples to a small local batch and moves the batch
//! into the shared [`Aggregate`] under a mutex when it is full (or at least
//! every [`FLUSH_EVERY`]). That keeps memory independent of the number of
//! workers and the lock off the per-request path, while the aggregate can
//! still place every sample exactly: in the overall histograms (inside or
//! outside a restart window) and in its 100 ms timeline bucket.
//!
//! Whether a sample falls inside a restart window is decided when the
//! request *completes*, from [`WindowClock`], which the restart driver
//! updates as restarts start and end. The clock is causal: a window starts
//! when the restart is fired and lasts until it has ended plus the margin.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton::sync::lock;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::outcome::{ErrorClass, ErrorCounts};

/// Width of a timeline bucket.
pub(crate) const BUCKET: Duration = Duration::from_millis(100);
const BUCKET_US: u64 = 100_000;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Shared "are we inside a restart window" state.
#[derive(Debug, Default)]
pub(crate) struct WindowClock {
    /// First microsecond (since measurement start) after the current or last
    /// window; `u64::MAX` while a restart is in progress.
    until_us: AtomicU64,
}

impl WindowClock {
    pub(crate) fn restart_started(&self) {
        self.until_us.store(u64::MAX, Ordering::Release);
    }

    pub(crate) fn restart_ended(&self, window_end_us: u64) {
        self.until_us.store(window_end_us, Ordering::Release);
    }

    fn contains(&self, t_us: u64) -> bool {
        t_us < self.until_us.load(Ordering::Acquire)
    }
}

/// Live counters of one worker, read by the progress reporter.
#[derive(Debug, Default)]
#[repr(align(128))] // one cache line pair per worker: no false sharing
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    t_us: u64,
    latency_us: u64,
    /// `None` means ok.
    error: Option<ErrorClass>,
    in_window: bool,
}

/// One 100 ms bucket of the timeline.
#[derive(Debug, Default)]
pub(crate) struct BucketAgg {
    pub(crate) ok: u64,
    pub(crate) errors: ErrorCounts,
    /// Latencies of ok requests, in microseconds, 2 significant digits.
    pub(crate) latency: Option<Histogram<u32>>,
}

/// Everything recorded during the measured window.
#[derive(Debug)]
pub(crate) struct Aggregate {
    /// Latencies (µs) of ok requests completed inside restart windows.
    pub(crate) in_window: Histogram<u64>,
    /// Latencies (µs) of ok requests completed outside restart windows.
    pub(crate) out_window: Histogram<u64>,
    pub(crate) errors_in_window: ErrorCounts,
    pub(crate) errors_out_window: ErrorCounts,
    pub(crate) buckets: Vec<BucketAgg>,
    pub(crate) warmup_requests: u64,
    pub(crate) warmup_errors: u64,
    max_latency_us: u64,
}

fn histogram<T: hdrhistogram::Counter>(
    high: u64,
    sigfig: u8,
) -> Result<Histogram<T>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, high.max(2), sigfig)
}

impl Aggregate {
    fn new(max_latency: Duration) -> Result<Self, hdrhistogram::CreationError> {
        let max_latency_us = u64::try_from(max_latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1_000);
        // Checked once here so that creating bucket histograms later, with
        // the same bounds and fewer digits, cannot fail.
        histogram::<u32>(max_latency_us, 2)?;
        Ok(Self {
            in_window: histogram(max_latency_us, 3)?,
            out_window: histogram(max_latency_us, 3)?,
            errors_in_window: ErrorCounts::default(),
            errors_out_window: ErrorCounts::default(),
            buckets: Vec::new(),
            warmup_requests: 0,
            warmup_errors: 0,
            max_latency_us,
        })
    }

    fn add(&mut self, samples: &[Sample]) {
        for s in samples {
            let index = usize::try_from(s.t_us / BUCKET_US).unwrap_or(usize::MAX);
            if index >= self.buckets.len() {
                if index > 10_000_000 {
                    // Over 11 days of run: not a real sample.
                    continue;
                }
                self.buckets.resize_with(index + 1, BucketAgg::default);
            }
            let bucket = &mut self.buckets[index];
            match s.error {
                None => {
                    bucket.ok += 1;
                    if bucket.latency.is_none() {
                        bucket.latency = histogram(self.max_latency_us, 2).ok();
                    }
                    if let Some(h) = bucket.latency.as_mut() {
                        h.saturating_record(s.latency_us.max(1));
                    }
                    let h = if s.in_window {
                        &mut self.in_window
                    } else {
                        &mut self.out_window
                    };
                    h.saturating_record(s.latency_us.max(1));
                }
                Some(class) => {
                    bucket.errors.add(class, 1);
                    if s.in_window {
                        self.errors_in_window.add(class, 1);
                    } else {
                        self.errors_out_window.add(class, 1);
                    }
                }
            }
        }
    }
}

/// State shared by all workers of one run.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) measure_start: Instant,
    pub(crate) window: WindowClock,
    /// `None` once taken at the end of the run.
    aggregate: Mutex<Option<Aggregate>>,
}

impl Shared {
    pub(crate) fn new(
        measure_start: Instant,
        max_latency: Duration,
    ) -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            measure_start,
            window: WindowClock::default(),
            aggregate: Mutex::new(Some(Aggregate::new(max_latency)?)),
        })
    }

    /// Take the aggregate out once every worker is done; later samples are
    /// dropped.
    pub(crate) fn take(&self) -> Option<Aggregate> {
        lock(&self.aggregate).take()
    }
}

/// A worker's handle: batches samples and flushes them into [`Shared`].
#[derive(Debug)]
pub(crate) struct Recorder {
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    batch: Vec<Sample>,
    last_flush: Instant,
    warmup_requests: u64,
    warmup_errors: u64,
}

impl Recorder {
    pub(crate) fn new(shared: Arc<Shared>, counters: Arc<Counters>) -> Self {
        Self {
            shared,
            counters,
            batch: Vec::with_capacity(BATCH),
            last_flush: Instant::now(),
            warmup_requests: 0,
            warmup_errors: 0,
        }
    }

    /// Record a request that started at `start` and ended at `end`.
    pub(crate) fn record(&mut self, start: Instant, end: Instant, error: Option<ErrorClass>) {
        let Some(since) = end.checked_duration_since(self.shared.measure_start) else {
            // Completed during warm-up: counted apart, not measured.
            self.warmup_requests += 1;
            self.warmup_errors += u64::from(error.is_some());
            return;
        };
        let t_us = u64::try_from(since.as_micros()).unwrap_or(u64::MAX);
        let latency_us =
            u64::try_from(end.saturating_duration_since(start).as_micros()).unwrap_or(u64::MAX);
        let in_window = self.shared.window.contains(t_us);
        self.batch.push(Sample {
            t_us,
            latency_us,
            error,
            in_window,
        });
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if error.is_some() {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.batch.len() >= BATCH || end.duration_since(self.last_flush) >= FLUSH_EVERY {
            self.flush_at(end);
        }
    }

    fn flush_at(&mut self, now: Instant) {
        self.last_flush = now;
        let mut guard = lock(&self.shared.aggregate);
        if let Some(agg) = guard.as_mut() {
            agg.add(&self.batch);
            agg.warmup_requests += self.warmup_requests;
            agg.warmup_errors += self.warmup_errors;
        }
        drop(guard);
        self.warmup_requests = 0;
        self.warmup_errors = 0;
        self.batch.clear();
    }

    /// Move everything still batched into the aggregate.
    pub(crate) fn flush(&mut self) {
        self.flush_at(Instant::now());
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // A worker that is cancelled still hands over what it measured.
        if !self.batch.is_empty() || self.warmup_requests > 0 {
            self.flush();
        }
    }
}
