//! The accept error policy, the one home of it for every accept loop (the
//! HTTP server's, the control socket's, the proxy's listeners', and `baton
//! run`'s port forwarders).

use std::io;
use std::time::Duration;

/// How long an accept loop waits after a failure that is not the
/// connection's own (out of fds or memory, or worse), rather than spin;
/// new connections wait in the kernel's queue meanwhile.
pub const BACKOFF: Duration = Duration::from_millis(20);

/// Whether the accept failure is the connection's own (it was aborted or
/// refused before it could be accepted): the listener is fine.
fn connection_failed(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::ETIMEDOUT)
    )
}

/// Applies the policy to what `accept` returned: the connection, or `None`
/// after a failure (the caller accepts again). A connection's own failure
/// is logged at debug and retried at once; any other (out of fds or memory,
/// a broken listener) is a warning, and retried after [`BACKOFF`]. `what`
/// names the listener in the log.
pub async fn accepted<T>(result: io::Result<T>, what: &str) -> Option<T> {
    match result {
        Ok(t) => Some(t),
        Err(e) if connection_failed(&e) => {
            tracing::debug!(error = %e, listener = what, "accept error");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, listener = what, "accept failed; retrying");
            tokio::time::sleep(BACKOFF).await;
            None
        }
    }
}
