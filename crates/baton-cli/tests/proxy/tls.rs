//! `https` listeners: certificates chosen by SNI, checked by `baton check`
//! at the entry that names them, rotated by a reload under load, and
//! HTTP/2 by ALPN, and binary upgrades under TLS and HTTP/2 load that lose
//! no request and after which a saved session resumes.

use std::process::Command;
use std::time::Duration;

use baton_testkit::h2::H2Load;
use baton_testkit::tls::{self, rustls, TestCert};
use baton_testkit::{assert_eventually, our_zombies, Load, Target, TempDir};

use crate::check::check_in;
use crate::websocket::Ws;
use crate::{assert_lines, text, upstream_toml, Proxy, Upstream};

/// An `https` listener "secure" with `certs` (cert, key paths as written),
/// every path routed to upstream "a" at `a`.
fn secure(a: std::net::SocketAddr, certs: &[(&str, &str)], extra: &str) -> String {
    let mut out = String::from(
        "[[listeners]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\nprotocol = \"https\"\n",
    );
    out.push_str(extra);
    for (cert, key) in certs {
        out.push_str(&format!(
            "[[listeners.certificates]]\ncert = {cert:?}\nkey = {key:?}\n"
        ));
    }
    out.push_str(&format!(
        "\n{}\n[[routes]]\nlistener = \"secure\"\nupstream = \"a\"\n",
        upstream_toml("a", &[a], "")
    ));
    out
}

fn paths(c: &TestCert) -> (&str, &str) {
    (c.cert.to_str().unwrap(), c.key.to_str().unwrap())
}

#[test]
fn sni_picks_the_certificate_and_the_upstream_is_told_https() {
    let a = Upstream::http("a");
    let certs = TempDir::new("tls-sni-certs");
    let one = tls::cert(&certs, "one", &["one.test"]);
    let two = tls::cert(&certs, "two", &["two.test", "*.two.test"]);
    let p = Proxy::start(
        "tls-sni",
        "",
        &secure(a.addr, &[paths(&one), paths(&two)], ""),
    );
    let addr = p.addr("secure");
    let client = tls::client(&[&one, &two]);
    for (name, want) in [
        ("one.test", &one),
        ("two.test", &two),
        ("www.two.test", &two),
    ] {
        let got = tls::get(addr, name, "/", &client);
        assert_eq!((got.status, got.body.as_str()), (200, "upstream a\n"));
        assert_eq!(got.cert, want.der, "SNI {name}");
    }
    // A name no certificate has gets the first one (which the client then
    // refuses: it is not valid for that name).
    let other = tls::connect(addr, "other.test", &client);
    assert!(other.is_err(), "a certificate for other.test was accepted");
    let got = tls::get(addr, "one.test", "/headers", &client);
    assert!(
        got.body.contains("x-forwarded-proto: https\n"),
        "{}",
        got.body
    );
    assert!(got.body.contains(";proto=https"), "{}", got.body);
    assert_eq!(got.version, "TLSv1_3");
    // The status names the protocol.
    assert_eq!(p.status()["proxy"]["listeners"][0]["protocol"], "https");
}

#[test]
fn tls_min_version_1_3_refuses_a_tls_1_2_client() {
    let a = Upstream::http("a");
    let certs = TempDir::new("tls-ver-certs");
    let one = tls::cert(&certs, "one", &["one.test"]);
    let p = Proxy::start(
        "tls-ver",
        "",
        &secure(a.addr, &[paths(&one)], "tls_min_version = \"1.3\"\n"),
    );
    let addr = p.addr("secure");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(one.der.clone()).unwrap();
    let tls12 = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    assert!(tls::connect(addr, "one.test", &tls12).is_err());
    let got = tls::get(addr, "one.test", "/", &tls::client(&[&one]));
    assert_eq!((got.status, got.version.as_str()), (200, "TLSv1_3"));
}

#[test]
fn check_names_the_entry_and_the_file_that_is_wrong() {
    let upstream: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    // Relative paths are from the configuration file's directory.
    let (out, _) = check_in(|dir| {
        tls::cert(dir, "good", &["good.test"]);
        secure(upstream, &[("good.pem", "good.key")], "")
    });
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let (out, path) = check_in(|dir| {
        tls::cert(dir, "a", &["a.test"]);
        tls::cert(dir, "b", &["b.test", "a.test"]);
        tls::cert(dir, "c", &["c.test"]);
        std::fs::write(
            dir.join("junk.pem"),
            "-----BEGIN CERTIFICATE-----\nnot base64\n",
        )
        .unwrap();
        secure(
            upstream,
            &[
                ("a.pem", "a.key"),
                ("c.pem", "b.key"),
                ("missing.pem", "a.key"),
                ("junk.pem", "a.key"),
            ],
            "",
        )
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let dir = std::path::Path::new(&path)
        .parent()
        .unwrap()
        .display()
        .to_string();
    // Entry k (from 0) starts on line 5 + 3k: the listener takes 4.
    let at = |line: u32, what: String| format!("{path}:{line}:1: listener \"secure\": {what}");
    assert_lines(
        &stderr,
        &[
            at(
                8,
                format!("{dir}/b.key: the key does not match the certificate in {dir}/c.pem"),
            ),
            at(11, format!("{dir}/missing.pem: cannot read")),
            at(14, format!("{dir}/junk.pem: not a PEM certificate chain")),
        ],
    );

    // Two certificates with one name: at the second.
    let (out, path) = check_in(|dir| {
        tls::cert(dir, "a", &["a.test"]);
        tls::cert(dir, "b", &["b.test", "A.test"]);
        secure(upstream, &[("a.pem", "a.key"), ("b.pem", "b.key")], "")
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{path}:8:1: listener \"secure\": "))
            && stderr.contains("DNS name \"a.test\" is also a name of"),
        "{stderr}"
    );

    // An expired certificate is a warning, not an error.
    let (out, path) = check_in(|dir| {
        tls::expired_cert(dir, "old", &["old.test"]);
        secure(upstream, &[("old.pem", "old.key")], "")
    });
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{path}:5:1: warning: listener \"secure\": certificate "
        )) && stderr.contains("has expired"),
        "{stderr}"
    );

    // An https listener needs certificates; others take none.
    let (out, path) = check_in(|_| {
        "[[listeners]]\nname = \"s\"\naddress = \"127.0.0.1:0\"\nprotocol = \"https\"\n\n[[listeners]]\nname = \"p\"\naddress = \"127.0.0.1:0\"\ntls_min_version = \"1.3\"\n[[listeners.certificates]]\ncert = \"a.pem\"\nkey = \"a.key\"\n".to_owned()
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_lines(
        &stderr,
        &[
            format!(
                "{path}:1:1: https listener \"s\" needs at least one [[listeners.certificates]]"
            ),
            format!("{path}:9:19: tls_min_version is for https listeners"),
            format!("{path}:10:1: http listener \"p\" takes no certificates"),
        ],
    );
}

#[test]
fn a_reload_rotates_the_certificate_under_load_and_a_bad_one_is_refused() {
    let a = Upstream::http("a");
    let certs = TempDir::new("tls-rotate-certs");
    let first = tls::cert(&certs, "site", &["site.test"]);
    let p = Proxy::start("tls-rotate", "", &secure(a.addr, &[paths(&first)], ""));
    let addr = p.addr("secure");
    // Trusts the first certificate and the next one (made now, written
    // later).
    let spare = TempDir::new("tls-rotate-next");
    let next = tls::cert(&spare, "site", &["site.test"]);
    let client = tls::client(&[&first, &next]);
    // A session the client resumes names the certificate of its first
    // handshake: certificates are looked at over a client of their own.
    let served = || tls::get(addr, "site.test", "/", &tls::client(&[&first, &next])).cert;
    let load = Load::start(
        Target::Tls(addr, "site.test".into(), client.clone()),
        4,
        4,
        Duration::from_secs(120),
    );
    load.wait_for_progress(200, Duration::from_secs(30));
    assert_eq!(tls::get(addr, "site.test", "/", &client).cert, first.der);

    // A key that is not the certificate's: the reload is refused, naming
    // the file, and the old certificate keeps serving.
    std::fs::copy(&next.cert, &first.cert).unwrap();
    let answer = p.control(r#"{"command":"reload"}"#);
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("the key does not match the certificate in")
            && error.contains(first.key.to_str().unwrap()),
        "{error}"
    );
    assert_eq!(served(), first.der);

    // Both files of the next certificate: new handshakes get it at once.
    std::fs::copy(&next.key, &first.key).unwrap();
    p.reload_ok();
    assert_eq!(served(), next.der);
    load.wait_for_progress(200, Duration::from_secs(30));
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    // The keep-alive connections were not touched by either reload.
    assert_eq!(report.keepalive_connects, 4, "{report:?}");
}

#[test]
fn websocket_over_tls_survives_a_reload_and_drains_at_an_upgrade() {
    let a = Upstream::http("a");
    let certs = TempDir::new("tls-ws-certs");
    let site = tls::cert(&certs, "site", &["site.test"]);
    let body = secure(a.addr, &[paths(&site)], "");
    let mut p = Proxy::start("tls-ws", "drain_timeout = \"3s\"", &body);
    let addr = p.addr("secure");
    let client = tls::client(&[&site]);
    let mut ws = Ws::handshake(tls::connect(addr, "site.test", &client).unwrap());
    ws.echo("over TLS");
    p.reload_ok();
    ws.echo("after a reload");
    let old = p.pid();
    assert_eq!(p.upgrade()["ok"], true);
    let upgraded_at = std::time::Instant::now();
    // TLS connections do not move: the old generation carries it on.
    ws.echo("after an upgrade");
    let mut fresh = Ws::handshake(tls::connect(addr, "site.test", &client).unwrap());
    fresh.echo("new generation");
    // At the drain timeout: 1001 going away.
    assert_eq!(ws.recv(), (0x8, vec![0x03, 0xE9]));
    assert!(upgraded_at.elapsed() >= Duration::from_secs(2));
    assert_eventually!(
        Duration::from_secs(15),
        p.server.is_gone(old),
        "old generation still running"
    );
    fresh.echo("still here");
}

/// Whether curl can be run (said on stderr when it cannot: the test is
/// skipped).
fn curl_installed() -> bool {
    let found = Command::new("curl").arg("--version").output().is_ok();
    if !found {
        eprintln!("skipped: curl is not installed");
    }
    found
}

#[test]
fn curl_gets_http2_and_http1_by_alpn() {
    if !curl_installed() {
        return;
    }
    let a = Upstream::http("a");
    let certs = TempDir::new("tls-curl-certs");
    let site = tls::cert(&certs, "site", &["site.test"]);
    let p = Proxy::start("tls-curl", "", &secure(a.addr, &[paths(&site)], ""));
    let addr = p.addr("secure");
    let curl = |flag: &str| {
        let out = Command::new("curl")
            .args(["-sS", flag, "--cacert", site.cert.to_str().unwrap()])
            .arg("--resolve")
            .arg(format!("site.test:{}:127.0.0.1", addr.port()))
            .args(["-w", "\n%{http_version}"])
            .arg(format!("https://site.test:{}/headers", addr.port()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let h2 = curl("--http2");
    assert!(h2.ends_with("\n2"), "{h2}");
    assert!(h2.contains("x-forwarded-proto: https\n"), "{h2}");
    assert!(h2.contains("host: site.test:"), "{h2}");
    let h1 = curl("--http1.1");
    assert!(h1.ends_with("\n1.1"), "{h1}");
}

#[test]
fn h2c_with_prior_knowledge_on_a_plaintext_listener_is_served_and_drained() {
    if !curl_installed() {
        return;
    }
    let a = Upstream::http("a");
    let p = Proxy::start("h2c", "", &crate::web_to_a(&[a.addr]));
    let web = p.addr("web");
    let curl = |flag: &str| {
        let out = Command::new("curl")
            .args(["-sS", flag, "-w", "\n%{http_version}"])
            .arg(format!("http://{web}/headers"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let h2c = curl("--http2-prior-knowledge");
    assert!(h2c.ends_with("\n2"), "{h2c}");
    assert!(h2c.contains("x-forwarded-proto: http\n"), "{h2c}");
    // A reload applies to the next stream of an open connection.
    let routes = |answer: &str| {
        format!(
            "[[listeners]]\nname = \"web\"\naddress = \"{web}\"\n\n[[routes]]\nlistener = \"web\"\nrespond = {{ status = 200, body = \"{answer}\" }}\n"
        )
    };
    p.write_config(&routes("one"));
    p.reload_ok();
    let mut conn = baton_testkit::h2::H2Conn::connect(web, "x", None);
    assert_eq!(conn.get("/"), (200, "one".into()));
    p.write_config(&routes("two"));
    p.reload_ok();
    assert_eq!(conn.get("/"), (200, "two".into()));
    drop(conn);
    p.write_config(&crate::web_to_a(&[a.addr]).replace("127.0.0.1:0", &web.to_string()));
    p.reload_ok();
    // Streams in flight through upgrades: each connection is sent away
    // with GOAWAY and nothing fails.
    let load = H2Load::start(web, "x", None, 2, 4, "/", Duration::from_secs(60));
    load.wait_for_progress(100, Duration::from_secs(30));
    let mut p = p;
    let mut pids = vec![p.pid()];
    for _ in 0..2 {
        let answer = p.upgrade();
        assert_eq!(answer["ok"], true, "{answer}");
        pids.push(answer["pid"].as_u64().unwrap() as u32);
        load.wait_for_progress(100, Duration::from_secs(30));
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.connects >= 3, "{report:?}");
    p.assert_gone(&pids[..pids.len() - 1]);
    // HTTP/1.1 beside it.
    assert!(curl("--http1.1").ends_with("\n1.1"));
}

#[test]
fn eight_upgrades_and_a_certificate_reload_under_tls_and_http2_load_lose_no_request() {
    let a = Upstream::http("a");
    let certs = TempDir::new("tls-upgrade-certs");
    let site = tls::cert(&certs, "site", &["site.test"]);
    let spare = TempDir::new("tls-upgrade-next");
    let next = tls::cert(&spare, "site", &["site.test"]);
    let mut p = Proxy::start(
        "tls-upgrade",
        "drain_timeout = \"10s\"",
        &secure(a.addr, &[paths(&site)], ""),
    );
    let addr = p.addr("secure");
    let client = tls::client(&[&site, &next]);
    // A session saved before the upgrades.
    let saved = tls::client(&[&site, &next]);
    assert!(!tls::get(addr, "site.test", "/", &saved).resumed);
    let load = Load::start(
        Target::Tls(addr, "site.test".into(), client.clone()),
        3,
        3,
        Duration::from_secs(180),
    );
    // HTTP/2: fast streams, and slow ones that are in flight at every
    // GOAWAY and must finish.
    let h2 = H2Load::start(
        addr,
        "site.test",
        client.clone(),
        2,
        4,
        "/",
        Duration::from_secs(180),
    );
    let h2_slow = H2Load::start(
        addr,
        "site.test",
        client.clone(),
        1,
        4,
        "/sleep/200",
        Duration::from_secs(180),
    );
    load.wait_for_progress(200, Duration::from_secs(30));
    h2.wait_for_progress(200, Duration::from_secs(30));
    h2_slow.wait_for_progress(8, Duration::from_secs(30));

    // A certificate reload does not touch the HTTP/2 connections.
    let connects = (h2.connects(), h2_slow.connects());
    std::fs::copy(&next.cert, &site.cert).unwrap();
    std::fs::copy(&next.key, &site.key).unwrap();
    p.reload_ok();
    h2.wait_for_progress(200, Duration::from_secs(30));
    h2_slow.wait_for_progress(8, Duration::from_secs(30));
    assert_eq!((h2.connects(), h2_slow.connects()), connects);
    let fresh = tls::get(addr, "site.test", "/", &tls::client(&[&site, &next]));
    assert_eq!(fresh.cert, next.der);

    let mut pids = vec![p.pid()];
    for i in 0..8u64 {
        pids.push(p.upgrade_ok(&format!("upgrade {i}")).0);
        load.wait_for_progress(100, Duration::from_secs(30));
        h2.wait_for_progress(100, Duration::from_secs(30));
        h2_slow.wait_for_progress(8, Duration::from_secs(30));
    }
    let report = load.stop();
    let h2 = h2.stop();
    let h2_slow = h2_slow.stop();
    assert_eq!(
        report.failed, 0,
        "failed requests: {:?} (ok: {})",
        report.failures, report.ok
    );
    for (what, r) in [("fast", &h2), ("slow", &h2_slow)] {
        assert_eq!(r.failed, 0, "HTTP/2 {what}: {r:?}");
        // Every upgrade sent each connection away (GOAWAY).
        assert!(r.connects >= 9, "HTTP/2 {what}: {r:?}");
    }
    // Resumed by generation 9: the ticket keys were passed on.
    let resumed = tls::get(addr, "site.test", "/", &saved);
    assert_eq!(resumed.status, 200);
    assert!(resumed.resumed, "a full handshake after the upgrades");
    p.assert_gone(&pids[..pids.len() - 1]);
    assert_eq!(our_zombies(), Vec::<u32>::new());
}

#[test]
fn an_upstream_with_tls_is_verified_reused_and_health_checked() {
    // The TLS upstream: another proxy with an https listener answering
    // itself.
    let certs = TempDir::new("tls-up-certs");
    let site = tls::cert(&certs, "site", &["site.test"]);
    let origin = Proxy::start(
        "tls-up-origin",
        "",
        &format!(
            "[[listeners]]\nname = \"s\"\naddress = \"127.0.0.1:0\"\nprotocol = \"https\"\n[[listeners.certificates]]\ncert = {:?}\nkey = {:?}\n\n[[routes]]\nlistener = \"s\"\nrespond = {{ status = 200, body = \"origin over TLS\\n\" }}\n",
            site.cert.to_str().unwrap(),
            site.key.to_str().unwrap()
        ),
    );
    let origin_addr = origin.addr("s");
    let front = |upstream_lines: &str| {
        format!(
            "[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n\n[upstreams.o]\nservers = [\"{origin_addr}\"]\n{upstream_lines}\n[[routes]]\nlistener = \"web\"\nupstream = \"o\"\n"
        )
    };
    let good = format!(
        "tls = true\nca_file = {:?}\nserver_name = \"site.test\"\nhealth_check = {{ path = \"/\", interval = \"100ms\" }}\n",
        site.cert.to_str().unwrap()
    );
    let p = Proxy::start("tls-up", "", &front(&good));
    let web = p.addr("web");
    assert_eq!(crate::get(web, "x", "/"), (200, "origin over TLS\n".into()));
    assert_eventually!(
        Duration::from_secs(10),
        p.upstream_server("o", origin_addr)["healthy"] == true,
        "the health check over TLS never passed: {}",
        p.upstream_server("o", origin_addr)
    );
    // Under keep-alive and new-connection load, upstream connections are
    // reused: the origin accepts far fewer connections than requests.
    let load = Load::start(Target::Tcp(web), 2, 2, Duration::from_secs(60));
    load.wait_for_progress(500, Duration::from_secs(30));
    let report = load.stop();
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let accepted = origin.status()["proxy"]["listeners"][0]["accepted"]
        .as_u64()
        .unwrap();
    assert!(
        accepted < report.ok / 10,
        "{accepted} connections for {} requests",
        report.ok
    );

    // A name the certificate does not have: refused by verification, 502.
    p.write_config(&front(&good.replace("site.test", "other.test")));
    p.reload_ok();
    let (status, _) = crate::get(web, "x", "/");
    assert_eq!(status, 502);
    // No ca_file: the system's store does not know this certificate.
    p.write_config(&front("tls = true\nserver_name = \"site.test\"\n"));
    let answer = p.control(r#"{"command":"reload"}"#);
    if answer["ok"] == true {
        assert_eq!(crate::get(web, "x", "/").0, 502);
    } else {
        // A machine without any system CA certificates says so.
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains("set ca_file"), "{error}");
    }
    // A ca_file that is not there: the reload is refused at its entry.
    p.write_config(&front("tls = true\nca_file = \"missing.pem\"\n"));
    let answer = p.control(r#"{"command":"reload"}"#);
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("{}:13:11: upstream \"o\": ", p.config.display()))
            && error.contains("missing.pem: cannot read"),
        "{error}"
    );
}

#[test]
fn upstream_tls_settings_are_checked() {
    let (out, path) = check_in(|_| {
        "[[listeners]]\nname = \"t\"\naddress = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nupstream = \"secure\"\n\n[upstreams.plain]\nservers = [\"127.0.0.1:1\"]\nca_file = \"ca.pem\"\nserver_name = \"a.test\"\n\n[upstreams.secure]\nservers = [\"127.0.0.1:2\"]\ntls = true\nserver_name = \"not a name!\"\nca_file = \"ca.pem\"\n".to_owned()
    });
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_lines(
        &stderr,
        &[
        format!("{path}:5:12: tcp listener \"t\" passes bytes through; upstream \"secure\" has tls = true"),
        format!("{path}:9:11: upstream \"plain\": ca_file needs tls = true"),
        format!("{path}:10:15: upstream \"plain\": server_name needs tls = true"),
        format!("{path}:15:15: upstream \"secure\": server_name \"not a name!\" is not a DNS name"),
        ],
    );
}

#[test]
fn a_session_resumes_after_a_take_over() {
    let a = Upstream::http("a");
    let certs = TempDir::new("tls-takeover-certs");
    let site = tls::cert(&certs, "site", &["site.test"]);
    let mut p = Proxy::start(
        "tls-takeover",
        "settle = \"300ms\"",
        &secure(a.addr, &[paths(&site)], ""),
    );
    let addr = p.addr("secure");
    let saved = tls::client(&[&site]);
    assert!(!tls::get(addr, "site.test", "/", &saved).resumed);
    // Started by someone else (a deploy script), not by the running proxy.
    let mut next = baton_testkit::Server::spawn_logged(
        std::path::Path::new(&crate::baton()),
        &[
            "proxy",
            "--config",
            p.config.to_str().unwrap(),
            "--takeover",
        ],
        &p.dir,
        &[("RUST_LOG", "info,baton_proxy::access=warn")],
        "takeover",
        |_| {},
    );
    let ready = next.next_event(Duration::from_secs(30));
    assert_eq!(ready["event"], "ready", "{ready}\n{}", next.stderr());
    assert_eq!(ready["generation"], 2, "{ready}");
    let old = p.pid();
    assert_eventually!(
        Duration::from_secs(20),
        p.server.is_gone(old),
        "the first proxy is still running"
    );
    let got = tls::get(addr, "site.test", "/", &saved);
    assert_eq!(got.status, 200);
    assert!(got.resumed, "a full handshake after the take-over");
}

#[test]
fn an_h2c_preface_whose_first_line_arrives_in_two_reads_is_still_http2() {
    use std::io::{Read, Write};
    let a = Upstream::http("a");
    let p = Proxy::start("h2c-split", "", &crate::web_to_a(&[a.addr]));
    let web = p.addr("web");
    let mut c = std::net::TcpStream::connect(web).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let local = c.local_addr().unwrap();
    c.write_all(b"PRI * HT").unwrap();
    // The proxy has read the half line before the rest comes.
    assert_eventually!(
        Duration::from_secs(10),
        baton_testkit::tcp_unread(web, local) == Some(0),
        "the proxy did not read the first bytes"
    );
    c.write_all(b"TP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    // An empty SETTINGS frame of ours: the server's first frame is its
    // SETTINGS (type 4), where HTTP/1 would answer `HTTP/1.1 400`.
    c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    let mut head = [0u8; 9];
    c.read_exact(&mut head).unwrap();
    assert_eq!(head[3], 4, "not an HTTP/2 SETTINGS frame: {head:?}");
}
