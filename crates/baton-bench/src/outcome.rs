//! How each request ended.

use std::fmt;
use std::ops::AddAssign;

use serde::{Deserialize, Serialize};

/// Why a request failed. A failed request is never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// A complete response with a status outside 2xx and 3xx.
    BadStatus,
    /// The TCP connect was refused (nothing listening).
    ConnectRefused,
    /// The TCP connect did not complete within the request timeout.
    ConnectTimeout,
    /// The connection was reset (`ECONNRESET`, `ECONNABORTED`) or the
    /// request could not be written (`EPIPE`).
    Reset,
    /// The server closed the connection before a complete response: before
    /// any byte, in the middle of the headers or of the body.
    ClosedEarly,
    /// Connected, but the complete response did not arrive within the
    /// request timeout.
    ResponseTimeout,
    /// Anything else: an unparsable response, headers too large, an
    /// unexpected socket error.
    Other,
}

impl ErrorClass {
    /// Every class, in the order used by summaries.
    pub const ALL: [ErrorClass; 7] = [
        ErrorClass::BadStatus,
        ErrorClass::ConnectRefused,
        ErrorClass::ConnectTimeout,
        ErrorClass::Reset,
        ErrorClass::ClosedEarly,
        ErrorClass::ResponseTimeout,
        ErrorClass::Other,
    ];

    /// The snake_case name used in the JSON document.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::BadStatus => "bad_status",
            ErrorClass::ConnectRefused => "connect_refused",
            ErrorClass::ConnectTimeout => "connect_timeout",
            ErrorClass::Reset => "reset",
            ErrorClass::ClosedEarly => "closed_early",
            ErrorClass::ResponseTimeout => "response_timeout",
            ErrorClass::Other => "other",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Number of failed requests per [`ErrorClass`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorCounts {
    /// See [`ErrorClass::BadStatus`].
    pub bad_status: u64,
    /// See [`ErrorClass::ConnectRefused`].
    pub connect_refused: u64,
    /// See [`ErrorClass::ConnectTimeout`].
    pub connect_timeout: u64,
    /// See [`ErrorClass::Reset`].
    pub reset: u64,
    /// See [`ErrorClass::ClosedEarly`].
    pub closed_early: u64,
    /// See [`ErrorClass::ResponseTimeout`].
    pub response_timeout: u64,
    /// See [`ErrorClass::Other`].
    pub other: u64,
}

impl ErrorCounts {
    /// The count for one class.
    pub fn get(&self, class: ErrorClass) -> u64 {
        match class {
            ErrorClass::BadStatus => self.bad_status,
            ErrorClass::ConnectRefused => self.connect_refused,
            ErrorClass::ConnectTimeout => self.connect_timeout,
            ErrorClass::Reset => self.reset,
            ErrorClass::ClosedEarly => self.closed_early,
            ErrorClass::ResponseTimeout => self.response_timeout,
            ErrorClass::Other => self.other,
        }
    }

    fn slot(&mut self, class: ErrorClass) -> &mut u64 {
        match class {
            ErrorClass::BadStatus => &mut self.bad_status,
            ErrorClass::ConnectRefused => &mut self.connect_refused,
            ErrorClass::ConnectTimeout => &mut self.connect_timeout,
            ErrorClass::Reset => &mut self.reset,
            ErrorClass::ClosedEarly => &mut self.closed_early,
            ErrorClass::ResponseTimeout => &mut self.response_timeout,
            ErrorClass::Other => &mut self.other,
        }
    }

    /// Add `n` failures of `class`.
    pub fn add(&mut self, class: ErrorClass, n: u64) {
        *self.slot(class) += n;
    }

    /// All failures together.
    pub fn total(&self) -> u64 {
        ErrorClass::ALL.iter().map(|c| self.get(*c)).sum()
    }

    /// The classes with a non-zero count, in [`ErrorClass::ALL`] order.
    pub fn nonzero(&self) -> impl Iterator<Item = (ErrorClass, u64)> + '_ {
        ErrorClass::ALL
            .iter()
            .map(|c| (*c, self.get(*c)))
            .filter(|(_, n)| *n > 0)
    }
}

impl AddAssign<&ErrorCounts> for ErrorCounts {
    fn add_assign(&mut self, rhs: &ErrorCounts) {
        for class in ErrorClass::ALL {
            self.add(class, rhs.get(class));
        }
    }
}

impl fmt::Display for ErrorCounts {
    /// `none`, or `reset=3 closed_early=1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (class, n) in self.nonzero() {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{class}={n}")?;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}
