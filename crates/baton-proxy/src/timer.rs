//! The one timer of a client connection, shared by everything that waits
//! on its behalf (the client's next bytes, the upstream's response).

use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// One timer per client connection, moved lazily: setting a later
/// deadline does not touch the timer wheel (the timer fires early, sees
/// the deadline has moved, and sleeps again), so a request costs no timer
/// operation in the common case.
pub(crate) struct Timer {
    sleep: Pin<Box<Sleep>>,
    want: Instant,
}

impl Timer {
    pub(crate) fn new(deadline: Instant) -> Self {
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            want: deadline,
        }
    }

    /// Fires at `deadline` from now on.
    pub(crate) fn set(&mut self, deadline: Instant) {
        self.want = deadline;
        if deadline < self.sleep.deadline() {
            self.sleep.as_mut().reset(deadline);
        }
    }

    /// Resolves once the deadline has passed.
    pub(crate) async fn fired(&mut self) {
        loop {
            self.sleep.as_mut().await;
            if Instant::now() >= self.want {
                return;
            }
            let want = self.want;
            self.sleep.as_mut().reset(want);
        }
    }
}
