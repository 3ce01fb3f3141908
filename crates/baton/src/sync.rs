//! Short locks over plain data.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, carrying on if a panic poisoned it: the locks this is for
/// are held briefly over plain data that stays consistent, so a panic
/// elsewhere should not poison the process. The one home of that rule for
/// every crate of the workspace.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
