//! `baton check`: exit 0 for a valid file, 1 with FILE:LINE:COL for every problem.

use std::process::Command;

use baton_testkit::TempDir;

use crate::{baton, text};

const ISSUE_EXAMPLE: &str = include_str!("../../../baton-proxy/proxy.example.toml");

fn check(text_: &str) -> (std::process::Output, String) {
    let dir = TempDir::new("check");
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text_).unwrap();
    let out = Command::new(baton())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (out, path.to_str().unwrap().to_owned())
}

#[test]
fn check_accepts_the_configuration_from_the_issue() {
    let (out, path) = check(ISSUE_EXAMPLE);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&format!("{path}: ok")), "{}", text(&out));
}

#[test]
fn check_reports_every_semantic_problem_at_file_line_col() {
    let bad = r#"[[listeners]]
name = "web"
address = "127.0.0.1:8080"

[[listeners]]
name = "web"
address = "127.0.0.1:8080"

[upstreams.empty]
servers = []

[[routes]]
listener = "web"
upstream = "nope"
"#;
    let (out, path) = check(bad);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (line, col, what) in [
        (6, 8, "duplicate listener name \"web\""),
        (7, 11, "already used by listener \"web\""),
        (10, 11, "has no servers"),
        (14, 12, "unknown upstream \"nope\""),
    ] {
        let prefix = format!("{path}:{line}:{col}: ");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains(what)),
            "expected {prefix}…{what}…\n{}",
            text(&out)
        );
    }
}

#[test]
fn check_reports_syntax_errors_and_unknown_keys_at_their_position() {
    let (out, path) =
        check("[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:1\"\nprotcol = \"http\"\n");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!("{path}:4:1: unknown field `protcol`")),
        "{}",
        text(&out)
    );

    let (out, path) = check("[[listeners]]\nname = \"web\"\naddress = \n");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with(&format!("{path}:3:")), "{}", text(&out));
}

#[test]
fn ctl_status_shows_the_proxy_fields() {
    let a = crate::Upstream::http("a");
    let p = crate::Proxy::start(
        "ctl-status",
        "",
        &format!(
            "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\n{}\n[[routes]]\nlistener = \"web\"\nupstream = \"a\"\n",
            crate::upstream_toml("a", &[a.addr], "")
        ),
    );
    let out = p.ctl(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "config {} (1 routes, 0 reloads)",
            p.config.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("connections: 0 active, 0 draining"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("upstream a {} up", a.addr)),
        "{stdout}"
    );
    let out = p.ctl(&["--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["proxy"]["config_file"], p.config.display().to_string());
}
