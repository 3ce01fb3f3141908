//! `baton proxy --takeover`: a proxy started by a deploy script (not by the
//! running proxy) takes its sockets over under keep-alive load.

use std::path::Path;
use std::time::Duration;

use baton_testkit::{assert_eventually, our_zombies, tcp_listen_inodes, Load, Server, Target};

use crate::{baton, get, web_to_a, Proxy, Upstream};

#[test]
fn five_takeovers_under_keepalive_load_lose_no_request() {
    let a = Upstream::http("a");
    let body = web_to_a(&[a.addr]);
    let mut p = Proxy::start("takeover", "settle = \"300ms\"", &body);
    let web = p.addr("web");
    let inode = tcp_listen_inodes(web.port());
    assert_eq!(inode.len(), 1, "{inode:?}");
    let load = Load::start(Target::Tcp(web), 4, 0, Duration::from_secs(120));
    load.wait_for_progress(200, Duration::from_secs(20));

    let binary = baton();
    let mut current: Option<Server> = None;
    for i in 0..5u64 {
        let old = current.as_ref().map_or(p.pid(), Server::first_pid);
        // Through a shell, as a deploy script would start it.
        let args = [
            "-c",
            r#"exec "$0" "$@""#,
            binary.to_str().unwrap(),
            "proxy",
            "--config",
            p.config.to_str().unwrap(),
            "--takeover",
        ];
        let mut next = Server::spawn_logged(
            Path::new("/bin/sh"),
            &args,
            &p.dir,
            &[("RUST_LOG", "info,baton_proxy::access=warn")],
            &format!("takeover-{i}"),
            |_| {},
        );
        let ready = next.next_event(Duration::from_secs(30));
        assert_eq!(ready["event"], "ready", "{ready}\n{}", next.stderr());
        assert_eq!(ready["generation"], i + 2, "{ready}");
        assert_eq!(ready["listeners"]["web"], web.to_string(), "{ready}");
        assert_eq!(
            tcp_listen_inodes(web.port()),
            inode,
            "take-over {i}: the same socket"
        );
        load.wait_for_progress(100, Duration::from_secs(20));
        match current.as_mut() {
            Some(s) => assert_eventually!(
                Duration::from_secs(20),
                s.first_exit().is_some(),
                "take-over {i}: old proxy pid {old} still running"
            ),
            None => assert_eventually!(
                Duration::from_secs(20),
                p.server.is_gone(old),
                "take-over {i}: first proxy still running"
            ),
        }
        current = Some(next);
    }
    let report = load.stop();
    assert_eq!(
        report.failed, 0,
        "failed requests: {:?} (ok: {})",
        report.failures, report.ok
    );
    assert!(report.ok > 500, "load too small: {}", report.ok);
    let status = p.status();
    assert_eq!(status["generation"], 6, "{status}");
    assert_eq!(
        status["pid"],
        current.as_ref().unwrap().first_pid(),
        "{status}"
    );
    assert_eq!(get(web, "x", "/"), (200, "upstream a\n".into()));
    assert_eq!(our_zombies(), Vec::<u32>::new());
}
