//! `baton ctl`: talk to a control socket.

use std::path::PathBuf;

use anyhow::Context;
use baton::control::Request;

/// What `ctl` should do.
#[derive(Debug, Clone)]
pub struct CtlOptions {
    pub socket: PathBuf,
    pub request: Request,
    pub json: bool,
}

/// The default control socket, the proxy's own default (one definition).
pub use baton_proxy::config::default_control_socket as default_socket;

/// Sends the request; returns whether the server answered `ok: true`.
pub async fn run(opts: CtlOptions) -> anyhow::Result<bool> {
    let answer = baton::control::request(&opts.socket, &opts.request)
        .await
        .with_context(|| format!("control socket {}", opts.socket.display()))?;
    let ok = answer["ok"] == true;
    if opts.json {
        println!("{answer}");
    } else if !ok {
        eprintln!(
            "baton ctl: {}",
            answer["error"].as_str().unwrap_or("request failed")
        );
    } else {
        print_human(&opts.request, &answer);
    }
    Ok(ok)
}

fn print_human(req: &Request, a: &serde_json::Value) {
    match req {
        Request::Upgrade { .. } => println!(
            "upgraded: generation {} pid {} ({:.1} ms)",
            a["generation"],
            a["pid"],
            a["elapsed_ms"].as_f64().unwrap_or(0.0)
        ),
        Request::Reload {} => println!("reloaded"),
        Request::Stop {} => println!("stopping pid {}", a["pid"]),
        // `baton ctl` has no take-over action (a process takes over itself).
        Request::Takeover {} => println!("{a}"),
        Request::Status {} => {
            println!(
                "pid {}  generation {}  state {}  uptime {:.1}s",
                a["pid"],
                a["generation"],
                a["state"].as_str().unwrap_or("?"),
                a["uptime_ms"].as_f64().unwrap_or(0.0) / 1000.0
            );
            if let Some(ls) = a["listeners"].as_array() {
                for l in ls {
                    println!(
                        "  listener {} {} {}{}",
                        l["name"].as_str().unwrap_or("?"),
                        l["kind"].as_str().unwrap_or("?"),
                        l["address"].as_str().unwrap_or("?"),
                        if l["inherited"] == true {
                            " (inherited)"
                        } else {
                            ""
                        }
                    );
                }
            }
            for key in ["last_upgrade", "last_reload"] {
                if !a[key].is_null() {
                    println!("  {key}: {}", a[key]);
                }
            }
            print_proxy(&a["proxy"]);
        }
    }
}

/// The `proxy` fields of a `baton proxy` status answer, if present.
fn print_proxy(p: &serde_json::Value) {
    if !p.is_object() {
        return;
    }
    println!(
        "  config {} ({} routes, {} reloads)",
        p["config_file"].as_str().unwrap_or("?"),
        p["routes"],
        p["reloads"]
    );
    println!(
        "  connections: {} active, {} draining",
        p["connections"]["active"], p["connections"]["draining"]
    );
    if let Some(ups) = p["upstreams"].as_object() {
        for (name, up) in ups {
            for s in up["servers"].as_array().into_iter().flatten() {
                println!(
                    "  upstream {name} {} {} (in flight {}, failures {})",
                    s["address"].as_str().unwrap_or("?"),
                    if s["healthy"] == true { "up" } else { "down" },
                    s["active"],
                    s["failures"]
                );
            }
        }
    }
}
