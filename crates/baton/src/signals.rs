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

/// A signal given as a name (`HUP`, `SIGUSR2`, `sigterm`: case-insensitive,
/// `SIG` optional) or a number (`1`, checked to name a signal), as its
/// number: the one parser of signal names for every command.
pub fn parse(s: &str) -> Option<i32> {
    use rustix::process::Signal;
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::from_named_raw(n).map(Signal::as_raw);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let signal = match name {
        "HUP" => Signal::HUP,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "TERM" => Signal::TERM,
        "KILL" => Signal::KILL,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "WINCH" => Signal::WINCH,
        "CONT" => Signal::CONT,
        "STOP" => Signal::STOP,
        "ALRM" => Signal::ALARM,
        _ => return None,
    };
    Some(signal.as_raw())
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn signal_names_and_numbers() {
        for (s, n) in [
            ("HUP", libc::SIGHUP),
            ("sigterm", libc::SIGTERM),
            ("SIGUSR2", libc::SIGUSR2),
            (" term ", libc::SIGTERM),
            ("9", libc::SIGKILL),
        ] {
            assert_eq!(super::parse(s), Some(n), "{s:?}");
        }
        for bad in ["", "SIG", "NOPE", "9999", "-1"] {
            assert_eq!(super::parse(bad), None, "{bad:?}");
        }
    }
}
