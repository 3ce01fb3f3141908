//! `baton proxy` and `baton check`: glue between flags and `baton-proxy`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Reads and validates the configuration at `config` (or the built-in
/// one), before the runtime is built: `[server] workers` sizes it.
pub fn load(config: Option<PathBuf>) -> anyhow::Result<baton_proxy::Config> {
    // Absolute, so `status` names the file unambiguously.
    let config = config.map(|p| std::path::absolute(&p).unwrap_or(p));
    match &config {
        Some(path) => baton_proxy::config::load(path),
        None => baton_proxy::config::builtin(),
    }
    .map_err(once)
}

/// Runs the proxy with `cfg` until it is stopped or upgraded away;
/// `takeover`: from the proxy that serves the configured control socket,
/// if one does.
pub async fn run(cfg: baton_proxy::Config, takeover: bool) -> anyhow::Result<()> {
    baton_proxy::prepare_control_dir(&cfg.server.control_socket).map_err(once)?;
    let mut builder = baton::Baton::builder()
        .control_socket(&cfg.server.control_socket)
        .drain_timeout(cfg.server.drain_timeout)
        .upgrade_timeout(cfg.server.upgrade_timeout)
        .idle_grace(cfg.server.idle_grace)
        .settle(cfg.server.settle)
        .takeover(takeover);
    if let Some(pid_file) = &cfg.server.pid_file {
        builder = builder.pid_file(pid_file);
    }
    let control_socket = cfg.server.control_socket.clone();
    let baton = builder.from_env().context("cannot start")?;
    baton::signals::handle(baton.clone()).context("cannot install signal handlers")?;
    let proxy = match baton_proxy::Proxy::bind(baton.clone(), cfg).await {
        Ok(p) => p,
        Err(e) => {
            // After an upgrade, the previous generation rolls back and
            // reports this.
            baton.fail(&e.to_string());
            return Err(once(e));
        }
    };
    baton.ready().await.context("cannot become ready")?;
    proxy.start();
    let listeners: serde_json::Map<String, serde_json::Value> = proxy
        .listeners()
        .into_iter()
        .map(|(name, addr)| (name, addr.to_string().into()))
        .collect();
    // One JSON line on stdout when active, like the examples: scripts and
    // tests learn the bound addresses (port 0) from it.
    let line = serde_json::json!({
        "event": "ready",
        "pid": std::process::id(),
        "generation": baton.generation(),
        "listeners": listeners,
        "admin": proxy.admin_addr().map(|a| a.to_string()),
        "control_socket": control_socket.display().to_string(),
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    drop(out);
    baton.wait().await;
    Ok(())
}

/// The library's errors already say their cause in their message (the
/// `FILE:LINE:COL`, the address, the OS error): print that once, not once
/// more per cause in the chain.
fn once(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::msg(e.to_string())
}

/// Validates the file and reads the certificates it names; prints every
/// problem as `FILE:LINE:COL: message` on stderr, and for a valid file a
/// `FILE:LINE:COL: warning: …` for each listener address that cannot be
/// bound right now and each expired certificate. Returns whether it is
/// valid (warnings do not change that).
pub fn check(config: &Path) -> bool {
    let loaded = baton_proxy::config::load(config)
        .and_then(|c| baton_proxy::tls::load(&c).map(|(_, warnings)| (c, warnings)));
    match loaded {
        Ok((c, tls_warnings)) => {
            for w in baton_proxy::config::bind_warnings(&c)
                .into_iter()
                .chain(tls_warnings)
            {
                eprintln!("{w}");
            }
            println!(
                "{}: ok ({} listeners, {} upstreams, {} routes)",
                config.display(),
                c.listeners.len(),
                c.upstreams.len(),
                c.routes.len()
            );
            true
        }
        Err(e) => {
            eprintln!("{e}");
            false
        }
    }
}
