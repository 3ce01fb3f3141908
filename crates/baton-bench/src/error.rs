//! The error type of this crate.
//!
//! Following hyper, [`BenchError`] is opaque: callers ask it what happened
//! with the `is_*` predicates, `Display` says one level, and the underlying
//! cause (an `io::Error`, a parse error) is reachable through
//! [`std::error::Error::source`].

use std::fmt;
use std::io;
use std::net::SocketAddr;

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a benchmark could not be configured, started or reported.
///
/// Failed requests and failed restarts are *not* errors of this type: they
/// are measurements and end up in [`BenchResult`](crate::BenchResult).
pub struct BenchError {
    kind: Box<Kind>,
}

#[derive(Debug, thiserror::Error)]
enum Kind {
    /// The options do not describe a runnable benchmark.
    #[error("invalid benchmark options: {msg}")]
    Config {
        msg: String,
        #[source]
        cause: Option<Cause>,
    },
    /// The probe connection to the target failed before any load was sent.
    #[error("target {addr} is unreachable")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        cause: io::Error,
    },
    /// Writing the JSON document or the report failed.
    #[error("failed to write {what}")]
    Output {
        what: String,
        #[source]
        cause: Cause,
    },
}

impl BenchError {
    fn new(kind: Kind) -> Self {
        Self {
            kind: Box::new(kind),
        }
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Self::new(Kind::Config {
            msg: msg.into(),
            cause: None,
        })
    }

    pub(crate) fn config_with(msg: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::new(Kind::Config {
            msg: msg.into(),
            cause: Some(cause.into()),
        })
    }

    pub(crate) fn unreachable(addr: SocketAddr, cause: io::Error) -> Self {
        Self::new(Kind::Unreachable { addr, cause })
    }

    pub(crate) fn output(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self::new(Kind::Output {
            what: what.into(),
            cause: cause.into(),
        })
    }

    /// True if the options were invalid (bad URL, zero concurrency, ...).
    pub fn is_config(&self) -> bool {
        matches!(*self.kind, Kind::Config { .. })
    }

    /// True if the target could not be reached by the probe connection made
    /// before the load starts.
    pub fn is_unreachable(&self) -> bool {
        matches!(*self.kind, Kind::Unreachable { .. })
    }

    /// True if writing a result file (JSON, SVG, HTML) failed.
    pub fn is_output(&self) -> bool {
        matches!(*self.kind, Kind::Output { .. })
    }
}

impl fmt::Debug for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.kind, f)
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.kind, f)
    }
}

impl std::error::Error for BenchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.kind)
    }
}
