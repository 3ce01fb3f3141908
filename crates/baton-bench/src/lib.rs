//! The engine of `baton bench`: HTTP/1.1 load against a server while it is
//! restarted, with every request accounted for.
//!
//! # Guarantees
//!
//! - **Every request is counted once and never retried.** A request either
//!   gets a complete response (ok for 2xx/3xx, [`ErrorClass::BadStatus`]
//!   otherwise) or fails with exactly one [`ErrorClass`]. In particular a
//!   keep-alive connection that the server closed while it was idle makes
//!   the next request fail as [`ErrorClass::ClosedEarly`] or
//!   [`ErrorClass::Reset`]; it is not silently replayed on a new connection
//!   the way pooling clients do. A response that *announces* the end of its
//!   connection (`Connection: close`, HTTP/1.0 without keep-alive) is not an
//!   error: the client reads it to the end and reconnects.
//! - **The load generator is not the bottleneck.** The client is a small raw
//!   HTTP/1.1 implementation on tokio's `TcpStream` with a prebuilt request
//!   and a reused parse buffer; see the crate README for a comparison
//!   with `wrk`.
//! - **Everything is bounded in time**: each request by the timeout, each
//!   restart action by the restart timeout, the run by
//!   `warmup + duration` plus those.
//!
//! # Lifecycle
//!
//! 1. [`BenchOptions`] (raw, e.g. from the command line) are validated into
//!    a [`BenchConfig`].
//! 2. [`run`] (or [`run_until`], with a shutdown token) probes the target,
//!    sends load for the warm-up and then the measured duration, fires the
//!    restarts evenly spaced inside the measured window, and reports
//!    [`Progress`] about once a second.
//! 3. The [`BenchResult`] prints a [`summary`](BenchResult::summary), is
//!    serialized to JSON ([`BenchResult::write_json`], schema in
//!    `SCHEMA.md`) and drawn by [`report::write_report`].
//!
//! # Restart windows
//!
//! A restart's window runs from the moment its action is fired until the
//! action has ended plus [`BenchOptions::window_margin`] (1 s by default),
//! to catch the requests that were in flight or queued when the switch
//! happened. Requests are placed by the time they *complete*: latency
//! figures are split into inside and outside all windows, and each
//! [`RestartRecord`] counts the errors in the 100 ms timeline buckets its
//! window overlaps.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use baton_bench::{BenchOptions, Mode, RestartAction};
//!
//! # async fn example() -> Result<(), baton_bench::BenchError> {
//! let mut options = BenchOptions::new("http://127.0.0.1:8080/");
//! options.mode = Mode::Close;
//! options.concurrency = 32;
//! options.duration = Duration::from_secs(20);
//! options.restarts = 3;
//! options.restart = Some(RestartAction::control("/run/app/baton.sock", "upgrade"));
//! let config = options.validate()?;
//!
//! let result = baton_bench::run(config, |p| eprintln!("{p}")).await?;
//! print!("{}", result.summary());
//! baton_bench::report::write_report(&result, "bench-report".as_ref())?;
//! if result.failed() > 0 {
//!     // the binary exits non-zero
//! }
//! # Ok(())
//! # }
//! ```

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::exit)
)]
#![warn(missing_docs)]

mod config;
mod error;
mod http;
mod outcome;
mod recorder;
pub mod report;
mod restart;
mod result;
mod runner;

pub use config::{
    parse_duration, parse_signal, BenchConfig, BenchOptions, Mode, RestartAction, Target,
};
pub use error::BenchError;
pub use outcome::{ErrorClass, ErrorCounts};
pub use result::{
    BenchResult, ConfigSummary, LatencyReport, LatencyStats, RestartOutcome, RestartRecord,
    Timeline, TimelineBucket, WarmupSummary, SCHEMA_VERSION,
};
pub use runner::{run, run_until, Phase, Progress, PROGRESS_INTERVAL};
pub use tokio_util::sync::CancellationToken;
