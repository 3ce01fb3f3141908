//! Unix signals turned into intents, nginx-style. This is the binary-facing
//! layer: the rest of the library never looks at signals.
//!
//! | signal | intent |
//! |---|---|
//! | `SIGUSR2` | upgrade: start the next generation from the binary on disk |
//! | `SIGHUP` | reload the configuration in-process |
//! | `SIGTERM`, `SIGQUIT` | graceful stop: drain, then exit |
//! | `SIGINT` | fast stop: close everything now |

use std::io;

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use crate::Baton;

/// Installs the signal handlers now and spawns a task that acts on them for
/// `baton`. Install early: before a handler exists, `SIGUSR2` and `SIGHUP`
/// would kill the process.
pub fn handle(baton: Baton) -> io::Result<JoinHandle<()>> {
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = usr2.recv() => {
                    tracing::info!("SIGUSR2: upgrade");
                    let b = baton.clone();
                    // Logged by `upgrade` itself; the signal has no caller to answer.
                    tokio::spawn(async move { let _ = b.upgrade(None).await; });
                }
                Some(()) = hup.recv() => {
                    tracing::info!("SIGHUP: reload");
                    let b = baton.clone();
                    tokio::spawn(async move { let _ = b.reload().await; });
                }
                Some(()) = term.recv() => { tracing::info!("SIGTERM: graceful stop"); baton.stop(true); }
                Some(()) = quit.recv() => { tracing::info!("SIGQUIT: graceful stop"); baton.stop(true); }
                Some(()) = int.recv() => { tracing::info!("SIGINT: fast stop"); baton.stop(false); }
                else => break,
            }
        }
    }))
}
