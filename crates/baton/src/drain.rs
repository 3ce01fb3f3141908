//! Draining: "tell everyone to stop, then wait until the last worker has
//! dropped its handle", with a hard deadline.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

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
    /// The serving period this handle belongs to (see [`Shutdown::resumed`]).
    epoch: u64,
    periods: Arc<Periods>,
    expired: CancellationToken,
    tracker: TaskTracker,
    _token: TaskTrackerToken,
    idle_grace: Duration,
}

impl Clone for Shutdown {
    fn clone(&self) -> Self {
        Shutdown {
            draining: self.draining.clone(),
            epoch: self.epoch,
            periods: self.periods.clone(),
            expired: self.expired.clone(),
            tracker: self.tracker.clone(),
            _token: self.tracker.token(),
            idle_grace: self.idle_grace,
        }
    }
}

/// The serving periods of one process: a generation that handed over and
/// then took the service back (the new generation died within the settle
/// period) serves again in a new period, with a `draining` signal of its
/// own; connections of the earlier period keep draining.
#[derive(Debug)]
struct Periods {
    current: watch::Sender<Period>,
    /// How many [`Shutdown::resumed`] calls are waiting: accept loops that
    /// can serve again.
    waiting: AtomicUsize,
}

#[derive(Debug, Clone)]
struct Period {
    number: u64,
    draining: CancellationToken,
    /// No later period will start: `resumed` answers `None`.
    done: bool,
}

/// Counts a waiting [`Shutdown::resumed`] for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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

    /// For an accept loop, once [`draining`](Self::draining) has fired:
    /// resolves to a fresh handle (not draining) if this process serves
    /// again, or to `None` once it will not.
    ///
    /// After an upgrade the old generation keeps watching the new one for
    /// the settle period ([`Builder::settle`](crate::Builder::settle)); if
    /// the new one dies within it, the old one takes the service back and
    /// every waiting `resumed` returns `Some`: keep the listener (the same
    /// kernel socket, never closed) and accept again with the new handle.
    /// Connections accepted before keep their old handle and go on
    /// draining. `None` (the settle period passed, a stop, a
    /// [`Drain::drain`]) means drop the listener now. An accept loop that
    /// does not wait here cannot serve again: a generation none of whose
    /// accept loops waits does not take the service back.
    ///
    /// ```no_run
    /// # async fn f(listener: tokio::net::TcpListener, mut shutdown: baton::Shutdown) {
    /// loop {
    ///     tokio::select! {
    ///         _ = shutdown.draining() => match shutdown.resumed().await {
    ///             Some(next) => shutdown = next,
    ///             None => break,
    ///         },
    ///         accepted = listener.accept() => { /* spawn the connection */ }
    ///     }
    /// }
    /// drop(listener); // no listening fd from here on
    /// # }
    /// ```
    pub async fn resumed(&self) -> Option<Shutdown> {
        let _waiting = Waiting::new(&self.periods.waiting);
        let mut rx = self.periods.current.subscribe();
        let period = rx
            .wait_for(|p| p.done || p.number > self.epoch)
            .await
            .ok()?
            .clone();
        if period.number > self.epoch {
            Some(Shutdown {
                draining: period.draining,
                epoch: period.number,
                periods: self.periods.clone(),
                expired: self.expired.clone(),
                tracker: self.tracker.clone(),
                _token: self.tracker.token(),
                idle_grace: self.idle_grace,
            })
        } else {
            None
        }
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
    periods: Arc<Periods>,
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
            periods: Arc::new(Periods {
                current: watch::channel(Period {
                    number: 0,
                    draining: CancellationToken::new(),
                    done: false,
                })
                .0,
                waiting: AtomicUsize::new(0),
            }),
            expired: CancellationToken::new(),
            tracker: TaskTracker::new(),
            idle_grace,
        }
    }

    /// A handle for a server or task to hold.
    pub fn handle(&self) -> Shutdown {
        let period = self.periods.current.borrow().clone();
        Shutdown {
            draining: period.draining,
            epoch: period.number,
            periods: self.periods.clone(),
            expired: self.expired.clone(),
            tracker: self.tracker.clone(),
            _token: self.tracker.token(),
            idle_grace: self.idle_grace,
        }
    }

    /// Whether draining has begun.
    pub fn is_draining(&self) -> bool {
        self.periods.current.borrow().draining.is_cancelled()
    }

    /// Tells every handle to start draining (idempotent), for good: no
    /// [`Shutdown::resumed`] will hand out a new handle.
    pub fn start(&self) {
        self.finish();
        self.start_resumable();
    }

    /// Tells every handle to start draining, leaving open whether a new
    /// serving period follows ([`resume`](Self::resume)) or not
    /// ([`finish`](Self::finish)).
    pub(crate) fn start_resumable(&self) {
        self.periods.current.borrow().draining.cancel();
    }

    /// No later serving period: every [`Shutdown::resumed`] answers `None`
    /// (accept loops drop their listeners).
    pub(crate) fn finish(&self) {
        self.periods.current.send_if_modified(|p| {
            let changed = !p.done;
            p.done = true;
            changed
        });
    }

    /// Starts a new serving period after draining began (a take-back):
    /// handles made from now on are not draining, and every waiting
    /// [`Shutdown::resumed`] gets one. Returns whether it did (not after
    /// [`finish`](Self::finish), nor while not draining).
    pub(crate) fn resume(&self) -> bool {
        self.periods.current.send_if_modified(|p| {
            if p.done || !p.draining.is_cancelled() {
                return false;
            }
            p.number += 1;
            p.draining = CancellationToken::new();
            true
        })
    }

    /// Whether some accept loop waits in [`Shutdown::resumed`], i.e. can
    /// serve again.
    pub(crate) fn resumable(&self) -> bool {
        self.periods.waiting.load(Ordering::SeqCst) > 0
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
        self.start();
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
    async fn resumed_hands_out_a_fresh_handle_or_none() {
        let drain = Drain::new(Duration::from_millis(10));
        let h = drain.handle();
        drain.start_resumable();
        assert!(h.is_draining());
        let waiter = tokio::spawn({
            let h = h.clone();
            async move { h.resumed().await.map(|n| n.is_draining()) }
        });
        baton_wait(|| drain.resumable()).await;
        assert!(drain.resume());
        assert_eq!(waiter.await.unwrap(), Some(false));
        assert!(h.is_draining(), "the old period's handles stay draining");
        assert!(!drain.handle().is_draining());
        drain.start();
        drain.finish();
        assert!(!drain.resume());
        assert!(drain.handle().resumed().await.is_none());
    }

    async fn baton_wait(f: impl Fn() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("condition not reached");
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
