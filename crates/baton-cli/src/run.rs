//! `baton run`: flags → supervisor options; signals → intents.

use tokio::signal::unix::{signal, SignalKind};

/// Runs the supervisor until it stops; returns the process exit status.
pub async fn run(options: baton_supervisor::Options) -> anyhow::Result<i32> {
    let config = options.validate()?;
    // Handlers first: before them, SIGHUP and SIGUSR2 would kill us.
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let sup = match baton_supervisor::Supervisor::start(config).await {
        Ok(sup) => sup,
        // The program itself failed: that is the operation failing (1),
        // not bad usage (2).
        Err(
            e @ (baton_supervisor::Error::FirstChild(_) | baton_supervisor::Error::Takeover(_)),
        ) => {
            eprintln!("baton run: {e}");
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    };
    let s = sup.clone();
    tokio::spawn(async move {
        loop {
            let reload = tokio::select! {
                Some(()) = hup.recv() => true,
                Some(()) = usr2.recv() => true,
                Some(()) = term.recv() => false,
                Some(()) = int.recv() => false,
                Some(()) = quit.recv() => false,
                else => break,
            };
            let s = s.clone();
            if reload {
                // The outcome is logged; a signal has no caller to answer.
                tokio::spawn(async move {
                    let _ = s.reload().await;
                });
            } else {
                tokio::spawn(async move { s.stop().await });
            }
        }
    });
    Ok(sup.wait().await)
}
