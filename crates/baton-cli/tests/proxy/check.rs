//! `baton check`: exit 0 for a valid file, 1 with FILE:LINE:COL for every problem.

use std::process::Command;
use std::time::Duration;

use baton_testkit::TempDir;

use crate::{baton, run_bounded, text};

const EXAMPLE: &str = include_str!("../../../baton-proxy/proxy.example.toml");

fn check(text_: &str) -> (std::process::Output, String) {
    check_in(|_| text_.to_owned())
}

/// Runs `baton check` on the text `make` returns, written as
/// `DIR/proxy.toml` after `make` ran in DIR (so it can put files there
/// that relative paths name): (output, the file's path).
pub fn check_in(make: impl FnOnce(&TempDir) -> String) -> (std::process::Output, String) {
    let dir = TempDir::new("check");
    let toml = make(&dir);
    let path = dir.join("proxy.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(baton())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (out, path.to_str().unwrap().to_owned())
}

#[test]
fn check_accepts_the_example_configuration() {
    let (out, path) = check(EXAMPLE);
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

/// A configuration with one listener "web" at `address` answering 200, its
/// control socket in `dir` (so nothing lands at the default path).
fn one_listener(dir: &TempDir, address: &str) -> String {
    format!(
        "[server]\ncontrol_socket = {:?}\n\n[[listeners]]\nname = \"web\"\naddress = \"{address}\"\n\n[[routes]]\nlistener = \"web\"\nrespond = {{ status = 200 }}\n",
        dir.join("control.sock").to_str().unwrap()
    )
}

#[test]
fn check_and_startup_refuse_what_is_not_a_regular_file_or_is_over_the_cap() {
    let dir = TempDir::new("check-kinds");
    let fifo = dir.join("fifo.toml");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RWXU).unwrap();
    let link = dir.join("link.toml");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let big = dir.join("big.toml");
    // Sparse: 64 MiB and one byte that cost no disk.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 * 1024 * 1024 + 1)
        .unwrap();
    for (path, what) in [
        (
            "/dev/zero".to_owned(),
            "it is a character device, not a regular file",
        ),
        (
            link.to_str().unwrap().to_owned(),
            "it is a character device, not a regular file",
        ),
        (
            fifo.to_str().unwrap().to_owned(),
            "it is a FIFO, not a regular file",
        ),
        (
            big.to_str().unwrap().to_owned(),
            "larger than the 64 MiB limit on a configuration file",
        ),
    ] {
        let expected = format!("cannot read {path}: {what}");
        let (code, stderr) =
            run_bounded(&["check", "--config", &path], &[], Duration::from_secs(10));
        assert_eq!(code, Some(1), "check {path}: {stderr}");
        assert!(stderr.contains(&expected), "check {path}: {stderr}");
        let (code, stderr) =
            run_bounded(&["proxy", "--config", &path], &[], Duration::from_secs(10));
        assert_eq!(code, Some(2), "proxy {path}: {stderr}");
        assert!(stderr.contains(&expected), "proxy {path}: {stderr}");
    }
}

#[test]
fn check_reports_invalid_utf8_at_the_first_bad_byte() {
    let dir = TempDir::new("check-utf8");
    let path = dir.join("proxy.toml");
    let mut bytes = one_listener(&dir, "127.0.0.1:0").into_bytes();
    // In the listener's name, line 5: `name = "w` is 9 characters.
    let at = bytes.windows(4).position(|w| w == b"\"web").unwrap() + 2;
    bytes[at] = 0xff;
    std::fs::write(&path, bytes).unwrap();
    let file = path.to_str().unwrap();
    let (code, stderr) = run_bounded(&["check", "--config", file], &[], Duration::from_secs(10));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{file}:5:10: invalid UTF-8 (byte 0xff): a configuration file must be UTF-8"
        )),
        "{stderr}"
    );
}

#[test]
fn check_rejects_fixed_responses_http_does_not_allow_at_their_value() {
    let bad = r#"[[listeners]]
name = "web"
address = "127.0.0.1:0"

[[routes]]
listener = "web"
path_prefix = "/a"
respond = { status = 999 }

[[routes]]
listener = "web"
path_prefix = "/b"
respond = { status = 101 }

[[routes]]
listener = "web"
path_prefix = "/c"
respond = { status = 204, body = "gone" }

[[routes]]
listener = "web"
path_prefix = "/d"
respond = { status = 304, body = "" }
"#;
    let (out, path) = check(bad);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!(
                "{path}:8:22: invalid status 999: a fixed response needs a status from 200 to 599"
            ),
            format!(
                "{path}:13:22: invalid status 101: a fixed response needs a status from 200 to 599"
            ),
            format!(
                "{path}:18:34: a 204 response has no body; remove `body` or use another status"
            ),
        ],
        "{}",
        text(&out)
    );
}

#[test]
fn check_warns_for_a_listener_address_in_use_and_still_passes() {
    // What a running proxy does to the address of its own configuration.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let dir = TempDir::new("check-in-use");
    let (out, path) = check(&one_listener(&dir, &addr.to_string()));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&format!("{path}: ok")), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "{path}:6:11: warning: listener \"web\": address {addr} is in use (Address already in use (os error 98)); that is expected if this is the configuration of the running proxy"
        )),
        "{}",
        text(&out)
    );
    // Free again: no warning.
    drop(held);
    let (out, _) = check(&one_listener(&dir, &addr.to_string()));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(out.stderr.is_empty(), "{}", text(&out));
}

#[test]
fn startup_bind_failure_names_the_listeners_address_in_the_file() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let dir = TempDir::new("start-in-use");
    let path = dir.join("proxy.toml");
    std::fs::write(&path, one_listener(&dir, &addr.to_string())).unwrap();
    let file = path.to_str().unwrap();
    let (code, stderr) = run_bounded(&["proxy", "--config", file], &[], Duration::from_secs(20));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "baton: {file}:6:11: listener \"web\" at {addr}: Address already in use (os error 98)\n"
        )),
        "{stderr}"
    );
}

#[test]
fn check_takes_the_file_as_an_argument_and_proxy_t_checks_as_nginx_t_does() {
    let dir = TempDir::new("check-args");
    let good = dir.join("good.toml");
    std::fs::write(&good, EXAMPLE).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[listeners]]\nname = \"web\"\naddress = 8080\n").unwrap();
    let (good, bad) = (good.to_str().unwrap(), bad.to_str().unwrap());
    for args in [
        vec!["check", good],
        vec!["check", "-c", good],
        vec!["proxy", "-t", "-c", good],
        vec!["proxy", "--test", "--config", good],
    ] {
        let (code, stderr) = run_bounded(&args, &[], Duration::from_secs(10));
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
    for args in [vec!["check", bad], vec!["proxy", "-t", "-c", bad]] {
        let (code, stderr) = run_bounded(&args, &[], Duration::from_secs(10));
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("{bad}:3:")), "{args:?}: {stderr}");
    }
    // No file at all is a usage error, not a check of nothing.
    let (code, stderr) = run_bounded(&["check"], &[], Duration::from_secs(10));
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stderr) = run_bounded(&["proxy", "-t"], &[], Duration::from_secs(10));
    assert_eq!(code, Some(2), "{stderr}");
}
