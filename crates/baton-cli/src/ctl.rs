//! `baton ctl`: talk to a control socket.

use std::path::PathBuf;

use anyhow::Context;
use baton::control::{Request, Status, UpgradeAnswer};

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
        Request::Upgrade { .. } => match serde_json::from_value::<UpgradeAnswer>(a.clone()) {
            Ok(up) => println!(
                "upgraded: generation {} pid {} ({:.1} ms)",
                up.generation, up.pid, up.elapsed_ms
            ),
            Err(_) => println!("{a}"),
        },
        Request::Reload {} => println!("reloaded"),
        Request::Stop {} => println!("stopping pid {}", a["pid"]),
        // `baton ctl` has no take-over action (a process takes over itself).
        Request::Takeover {} => println!("{a}"),
        Request::Status {} => match serde_json::from_value::<Status>(a.clone()) {
            Ok(status) => {
                print!("{}", render_status(&status));
                print_proxy(&a["proxy"]);
            }
            // Not the documented shape: show it as it is.
            Err(_) => println!("{a}"),
        },
    }
}

/// `status` for people: the serving process, its listeners as a table,
/// the last upgrade and reload; `baton run`'s supervisor line when present.
pub fn render_status(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let _ = writeln!(
        out,
        "generation {}  pid {}  {}{}  up {}",
        opt(s.generation.map(|g| g.to_string())),
        opt(s.pid.map(|p| p.to_string())),
        s.state,
        if s.upgrade_in_progress {
            " (upgrade in progress)"
        } else {
            ""
        },
        opt(s.uptime_ms.map(duration))
    );
    if let Some(pid) = s.extra.get("supervisor_pid").and_then(|v| v.as_u64()) {
        let _ = writeln!(
            out,
            "supervisor pid {pid}  up {}  {} crash restarts",
            opt(s
                .extra
                .get("supervisor_uptime_ms")
                .and_then(|v| v.as_f64())
                .map(duration)),
            s.extra
                .get("restarts")
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        );
    }
    if let Some(binary) = &s.binary {
        let _ = writeln!(out, "binary {binary}");
    }
    // The connection column only where the server counts connections.
    let counted = s.listeners.iter().any(|l| l.connections.is_some());
    let mut rows = vec![vec![
        "LISTENER".to_owned(),
        "KIND".to_owned(),
        "ADDRESS".to_owned(),
        "FROM".to_owned(),
    ]];
    if counted {
        rows[0].push("CONNECTIONS".to_owned());
    }
    for l in &s.listeners {
        let from = match (&l.port_env, l.inherited) {
            (Some(var), _) => format!("forwarded to ${var}"),
            (None, Some(true)) => "inherited".to_owned(),
            (None, Some(false)) => "bound".to_owned(),
            (None, None) => "held".to_owned(),
        };
        let mut row = vec![l.name.clone(), l.kind.clone(), l.address.clone(), from];
        if counted {
            row.push(opt(l.connections.map(|c| c.to_string())));
        }
        rows.push(row);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for d in &s.draining {
        let _ = writeln!(
            out,
            "draining      generation {} pid {}",
            d.generation, d.pid
        );
    }
    for (what, o) in [
        ("last upgrade", &s.last_upgrade),
        ("last reload ", &s.last_reload),
    ] {
        let Some(o) = o else {
            let _ = writeln!(out, "{what}  none");
            continue;
        };
        let when = o.at_unix_ms.map(|ms| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
            humantime::format_rfc3339_seconds(t).to_string()
        });
        let mut detail = Vec::new();
        if let Some(kind) = &o.kind {
            detail.push(kind.clone());
        }
        if let (Some(g), Some(p)) = (o.generation, o.pid) {
            detail.push(format!("generation {g} pid {p}"));
        }
        if let Some(ms) = o.elapsed_ms {
            detail.push(format!("{ms:.1} ms"));
        }
        if o.taken_back == Some(true) {
            detail.push("taken back".to_owned());
        }
        if let Some(e) = &o.error {
            // The first line: a stderr tail follows in the JSON.
            detail.push(e.lines().next().unwrap_or_default().to_owned());
        }
        let _ = writeln!(
            out,
            "{what}  {:<6}  {}  {}",
            if o.ok { "ok" } else { "failed" },
            opt(when),
            detail.join(", ")
        );
    }
    out
}

/// Milliseconds as "1h 2m 3s" (whole seconds; "0s" under one).
fn duration(ms: f64) -> String {
    humantime::format_duration(std::time::Duration::from_secs((ms / 1000.0) as u64)).to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_as_an_aligned_table() {
        let status: Status = serde_json::from_str(
            r#"{"ok":true,"pid":4242,"generation":3,"state":"active","uptime_ms":81234.5,
                "binary":"/opt/app/bin/server","upgrade_in_progress":false,
                "listeners":[{"name":"http","kind":"tcp","address":"127.0.0.1:8080","inherited":true},
                             {"name":"admin-unix","kind":"unix","address":"/run/app/admin.sock","inherited":false}],
                "last_upgrade":{"ok":false,"kind":"take-over","error":"new generation (pid 77) exited before it was ready\nstderr tail","at_unix_ms":1795255366000.0},
                "last_reload":{"ok":true,"at_unix_ms":1795255367000.0,"elapsed_ms":0.24}}"#,
        )
        .unwrap();
        assert_eq!(
            render_status(&status),
            "generation 3  pid 4242  active  up 1m 21s\n\
             binary /opt/app/bin/server\n\
             LISTENER    KIND  ADDRESS              FROM\n\
             http        tcp   127.0.0.1:8080       inherited\n\
             admin-unix  unix  /run/app/admin.sock  bound\n\
             last upgrade  failed  2026-11-21T10:02:46Z  take-over, new generation (pid 77) exited before it was ready\n\
             last reload   ok      2026-11-21T10:02:47Z  0.2 ms\n"
        );
    }

    #[test]
    fn a_supervisor_status_names_the_supervisor_and_forwarded_listeners() {
        let status: Status = serde_json::from_str(
            r#"{"ok":true,"pid":null,"generation":null,"state":"draining","uptime_ms":null,
                "upgrade_in_progress":true,"supervisor_pid":10,"supervisor_uptime_ms":3000.0,"restarts":2,
                "listeners":[{"name":"web","kind":"tcp","address":"127.0.0.1:8080","port_env":"PORT"}],
                "last_upgrade":null,"last_reload":null}"#,
        )
        .unwrap();
        assert_eq!(
            render_status(&status),
            "generation -  pid -  draining (upgrade in progress)  up -\n\
             supervisor pid 10  up 3s  2 crash restarts\n\
             LISTENER  KIND  ADDRESS         FROM\n\
             web       tcp   127.0.0.1:8080  forwarded to $PORT\n\
             last upgrade  none\n\
             last reload   none\n"
        );
    }

    #[test]
    fn connection_counts_and_draining_generations_are_shown() {
        let status: Status = serde_json::from_str(
            r#"{"ok":true,"pid":51,"generation":5,"state":"active","uptime_ms":2000.0,
                "upgrade_in_progress":false,
                "listeners":[{"name":"web","kind":"tcp","address":"127.0.0.1:8080","inherited":true,"connections":17},
                             {"name":"baton-admin","kind":"tcp","address":"127.0.0.1:9901","inherited":true}],
                "draining":[{"generation":4,"pid":50}],
                "last_upgrade":{"ok":true,"kind":"upgrade","generation":5,"pid":51,"elapsed_ms":41.0,"at_unix_ms":1795255366000.0},
                "last_reload":null}"#,
        )
        .unwrap();
        assert_eq!(
            render_status(&status),
            "generation 5  pid 51  active  up 2s\n\
             LISTENER     KIND  ADDRESS         FROM       CONNECTIONS\n\
             web          tcp   127.0.0.1:8080  inherited  17\n\
             baton-admin  tcp   127.0.0.1:9901  inherited  -\n\
             draining      generation 4 pid 50\n\
             last upgrade  ok      2026-11-21T10:02:46Z  upgrade, generation 5 pid 51, 41.0 ms\n\
             last reload   none\n"
        );
    }
}
