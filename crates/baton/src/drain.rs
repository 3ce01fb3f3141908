//! Draining: "tell everyone to stop, then wait until the last worker has
//! dropped its handle", with a hard deadline.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// A handle that servers and connection tasks hold while they work.
///
/// It carries two signals and one obligation:
/// - [`draining`](Shutdown::draining): stop accepting, finish what is in
///   flight, wind down long-lived connections politely;
/// - [`expired`](Shutdown::expired): the drain timeout has passed, close
///   whatever is left now;
/// - while any `Shutdown` (or clone) is alive, the process does not exit
///   (until the drain timeout, plus a short grace), so drop it when done.
///
/// Obtain one with [`Baton::shutdown`](crate::Baton::shutdown), or build a
/// standalone [`Drain`] in tests.
#[derive(Debug)]
pub struct Shutdown {
    draining: CancellationToken,
    expired: CancellationToken,
    tracker: TaskTracker,
    _token: TaskTrackerToken,
    idle_grace: Duration,
}

impl Clone for Shutdown {
    fn clone(&self) -> Self {
        Shutdown {
            draining: self.draining.clone(),
            expired: self.expired.clone(),
            tracker: self.tracker.clone(),
            _token: self.tracker.token(),
            idle_grace: self.idle_grace,
        }
    }
}

impl Shutdown {
    /// Resolves once draining has begun.
    pub fn draining(&self) -> WaitForCancellationFuture<'_> {
        self.draining.cancelled()
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// The draining signal alone (cheaper to hold per request than a whole
    /// handle, which also counts as a worker).
    pub(crate) fn draining_token(&self) -> &CancellationToken {
        &self.draining
    }

    /// Resolves once the drain timeout has passed: close what remains.
    pub fn expired(&self) -> WaitForCancellationFuture<'_> {
        self.expired.cancelled()
    }

    /// Whether the drain timeout has passed.
    pub fn is_expired(&self) -> bool {
        self.expired.is_cancelled()
    }

    /// How long an idle keep-alive connection is kept open once draining has
    /// begun, so that a client about to send on it is not cut off.
    pub fn idle_grace(&self) -> Duration {
        self.idle_grace
    }

    /// Spawns a task that the drain waits for (a connection, say). The task
    /// should watch [`draining`](Self::draining) and
    /// [`expired`](Self::expired).
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }
}

/// The controlling side of a [`Shutdown`]: starts the drain and waits for it.
#[derive(Debug, Clone)]
pub struct Drain {
    draining: CancellationToken,
    expired: CancellationToken,
    tracker: TaskTracker,
    idle_grace: Duration,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every handle was dropped before the drain timeout.
    Complete,
    /// The drain timeout passed; the `expired` signal was sent and the
    /// remaining tasks were given a short grace to close.
    TimedOut {
        /// Tasks and handles still alive when the grace ended.
        remaining: usize,
    },
}

/// How long tasks get to act on `expired` before the drain gives up on them.
const EXPIRED_GRACE: Duration = Duration::from_secs(2);

impl Drain {
    /// A new drain whose handles keep idle keep-alive connections open for
    /// `idle_grace` once draining begins.
    pub fn new(idle_grace: Duration) -> Drain {
        Drain {
            draining: CancellationToken::new(),
            expired: CancellationToken::new(),
            tracker: TaskTracker::new(),
            idle_grace,
        }
    }

    /// A handle for a server or task to hold.
    pub fn handle(&self) -> Shutdown {
        Shutdown {
            draining: self.draining.clone(),
            expired: self.expired.clone(),
            tracker: self.tracker.clone(),
            _token: self.tracker.token(),
            idle_grace: self.idle_grace,
        }
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Tells every handle to start draining (idempotent).
    pub fn start(&self) {
        self.draining.cancel();
    }

    /// Starts draining (if not already) and waits until every handle is
    /// dropped, or `timeout` passes; then fires `expired` and gives the
    /// remaining tasks a short grace.
    pub async fn drain(&self, timeout: Duration) -> DrainOutcome {
        self.start();
        self.tracker.close();
        if tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
        {
            return DrainOutcome::Complete;
        }
        self.expired.cancel();
        let _ = tokio::time::timeout(EXPIRED_GRACE, self.tracker.wait()).await;
        DrainOutcome::TimedOut {
            remaining: self.tracker.len(),
        }
    }

    /// Waits (up to the short grace given after the drain timeout) for the
    /// tasks still running to finish: used when a task the drain gave up on
    /// is known to be about to end (an upgrade's answer being written).
    pub(crate) async fn settle(&self) {
        let _ = tokio::time::timeout(EXPIRED_GRACE, self.tracker.wait()).await;
    }

    /// Closes everything now: draining and expired at once.
    pub fn expire(&self) {
        self.draining.cancel();
        self.expired.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_handle() {
        let drain = Drain::new(Duration::from_millis(10));
        let h = drain.handle();
        let worker = h.clone();
        drop(h);
        let task = tokio::spawn(async move {
            worker.draining().await;
            // finish some in-flight work after the signal
            tokio::task::yield_now().await;
            drop(worker);
        });
        let outcome = drain.drain(Duration::from_secs(5)).await;
        assert_eq!(outcome, DrainOutcome::Complete);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn drain_expires_stragglers() {
        let drain = Drain::new(Duration::from_millis(10));
        let h = drain.handle();
        let task = h.spawn({
            let h = h.clone();
            async move {
                // ignores `draining`, honours `expired`
                h.expired().await;
            }
        });
        drop(h);
        let outcome = drain.drain(Duration::from_millis(50)).await;
        assert_eq!(outcome, DrainOutcome::TimedOut { remaining: 0 });
        task.await.unwrap();
    }
}
