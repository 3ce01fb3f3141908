//! `[server] runtime = "per-worker"`: worker threads, each running a
//! current-thread tokio runtime of its own.
//!
//! Each worker accepts on every listener (on its own descriptor of the
//! shared listening socket, registered with its own reactor, as nginx's
//! worker processes share one socket) and serves what it accepted on its
//! own thread to the end: no task moves between threads and no wake-up
//! crosses them. An upstream connection belongs to the reactor of the
//! worker that opened it, so the idle pool keeps one list per worker
//! ([`index`]). The process's own runtime (the one `main` builds) runs the
//! control socket, reloads, health checks and each listener's bookkeeping
//! (its serving periods and drains).

use std::cell::Cell;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker this thread is: 0 on any thread that is not one of them
/// (the threads of a multi-thread runtime share one idle list).
pub(crate) fn index() -> usize {
    INDEX.with(Cell::get)
}

/// The running workers. Dropping this stops them (their runtimes drop
/// what they still run), without waiting for their threads.
#[derive(Debug)]
pub(crate) struct Workers {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` worker threads (`baton-worker-0` …).
    pub(crate) fn start(n: usize) -> std::io::Result<Workers> {
        // Stops the ones started so far if a later one cannot start.
        let mut workers = Workers {
            handles: Vec::with_capacity(n),
            stop: CancellationToken::new(),
        };
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let stop = workers.stop.clone();
            std::thread::Builder::new()
                .name(format!("baton-worker-{i}"))
                .spawn(move || {
                    INDEX.with(|c| c.set(i));
                    // Runs what is spawned on `handle` until stopped.
                    runtime.block_on(stop.cancelled());
                })?;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// Their runtimes, by index.
    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// How many there are.
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_thread() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.len(), 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let seen: Vec<(usize, String)> = rt.block_on(async {
            let mut seen = Vec::new();
            for h in workers.handles() {
                let got = h
                    .spawn(async {
                        let name = std::thread::current().name().unwrap_or("").to_owned();
                        (index(), name)
                    })
                    .await
                    .unwrap();
                seen.push(got);
            }
            seen
        });
        assert_eq!(
            seen,
            vec![
                (0, "baton-worker-0".to_owned()),
                (1, "baton-worker-1".to_owned())
            ]
        );
        assert_eq!(index(), 0);
    }
}
