//! [`Reloadable`]: load → validate → atomic swap.

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;

/// A value (usually a validated configuration) that can be replaced while
/// readers keep using the version they started with.
///
/// Reload is load → validate → swap: the loader returns the new, validated
/// value or an error; only a value that passed is swapped in, atomically.
/// A failed reload leaves the old value in place and hands the error back.
/// Readers call [`get`](Self::get) once per unit of work (a request) and keep
/// that `Arc` for its duration, so in-flight work finishes on the value it
/// started with.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use baton::Reloadable;
///
/// #[derive(Debug)]
/// struct Config { greeting: String }
///
/// let config = Reloadable::new(Config { greeting: "hello".into() });
/// let before = config.get();
///
/// // A loader that fails validation changes nothing.
/// let err = config.reload(|| async { Err::<Config, _>("greeting must not be empty") }).await;
/// assert!(err.is_err());
/// assert_eq!(config.get().greeting, "hello");
///
/// // A good one is swapped in; earlier readers keep their version.
/// config.reload(|| async { Ok::<_, &str>(Config { greeting: "hi".into() }) }).await.unwrap();
/// assert_eq!(config.get().greeting, "hi");
/// assert_eq!(before.greeting, "hello");
/// # }
/// ```
#[derive(Debug)]
pub struct Reloadable<T> {
    current: ArcSwap<T>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl<T> Reloadable<T> {
    /// Starts with `initial`.
    pub fn new(initial: T) -> Self {
        Reloadable {
            current: ArcSwap::from_pointee(initial),
            reload_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Runs `load` (which reads and validates), and swaps its value in on
    /// success. Reloads are serialized: two at once run one after the other.
    pub async fn reload<F, Fut, E>(&self, load: F) -> Result<Arc<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _one_at_a_time = self.reload_lock.lock().await;
        let new = Arc::new(load().await?);
        self.current.store(new.clone());
        Ok(new)
    }

    /// Like [`reload`](Self::reload), but the loader also sees the current
    /// value (to carry state over, or to diff).
    pub async fn reload_from<F, Fut, E>(&self, load: F) -> Result<Arc<T>, E>
    where
        F: FnOnce(Arc<T>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let _one_at_a_time = self.reload_lock.lock().await;
        let new = Arc::new(load(self.current.load_full()).await?);
        self.current.store(new.clone());
        Ok(new)
    }
}
