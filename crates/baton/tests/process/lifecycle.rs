//! Control socket hygiene, service-manager notifications and socket
//! activation.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use baton_testkit::{assert_eventually, example, Server, TempDir};

use crate::Running;

#[test]
fn control_socket_rejects_bad_requests_and_other_users() {
    let r = Running::start("hello", &[]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&r.control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let a = r.control(r#"{"command":"explode"}"#);
    assert_eq!(a["ok"], false);
    assert!(a["error"].as_str().unwrap().contains("bad request"), "{a}");
    let a = r.control("not json");
    assert_eq!(a["ok"], false);
    // The server is unharmed, and its status carries the application's fields.
    let status = r.control(r#"{"command":"status"}"#);
    assert_eq!(status["state"], "active");
    assert_eq!(status["app"], "hello", "{status}");
    assert_eq!(status["pid"], r.pid(), "Baton's own fields win");

    if !rustix::process::getuid().is_root() {
        eprintln!("not root: skipping the other-uid part");
        return;
    }
    // Even with the file mode opened up, a peer with another uid is refused
    // (SO_PEERCRED).
    std::fs::set_permissions(&r.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ntry:\n  s.sendall(b'{{\"command\":\"stop\"}}\\n')\nexcept OSError:\n  pass\nsys.stdout.write(s.makefile().readline())",
        r.control.to_str().unwrap()
    );
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains("permission denied"),
        "{answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        r.control(r#"{"command":"status"}"#)["state"],
        "active",
        "stop was not obeyed"
    );
}

fn recv_all(sock: &UnixDatagram, until: &str) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.iter().any(|m: &String| m.contains(until)) {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {until:?} notification (got {got:?}): {e}"));
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

#[test]
fn notifies_the_service_manager() {
    baton_testkit::become_subreaper();
    let dir = TempDir::new("notify");
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let control = dir.join("c.sock");
    let (mut server, ready) = Server::start_with_env(
        &example("hello"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--control-socket",
            control.to_str().unwrap(),
        ],
        &dir,
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    let first = ready["pid"].as_u64().unwrap();
    let got = recv_all(&sock, "READY=1");
    assert!(
        got.last().unwrap().contains(&format!("MAINPID={first}")),
        "{got:?}"
    );

    let a = baton_testkit::control(
        &control,
        r#"{"command":"upgrade"}"#,
        Duration::from_secs(30),
    );
    assert_eq!(a["ok"], true);
    let second = a["pid"].as_u64().unwrap();
    server.track(second as u32);
    let got = recv_all(&sock, "READY=1");
    assert!(
        got[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{got:?}"
    );
    assert!(
        got.last().unwrap().contains(&format!("MAINPID={second}")),
        "{got:?}"
    );

    let a = baton_testkit::control(&control, r#"{"command":"stop"}"#, Duration::from_secs(30));
    assert_eq!(a["ok"], true);
    let got = recv_all(&sock, "STOPPING=1");
    assert!(!got.is_empty());
    assert_eventually!(
        Duration::from_secs(10),
        server.is_gone(second as u32),
        "stop did not stop"
    );
}

#[test]
fn adopts_a_socket_from_systemd_socket_activation() {
    baton_testkit::become_subreaper();
    let dir = TempDir::new("activation");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Python stands in for systemd: put the socket at fd 3, set LISTEN_PID to
    // the pid that will exec, and exec the server.
    let launcher = dir.join("launch.py");
    std::fs::write(
        &launcher,
        "import os,sys\nfd=int(sys.argv[1])\nos.dup2(fd,3)\nos.environ['LISTEN_FDS']='1'\nos.environ['LISTEN_FDNAMES']='http'\nos.environ['LISTEN_PID']=str(os.getpid())\nos.execv(sys.argv[2], sys.argv[2:])\n",
    )
    .unwrap();
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    // Let the listener's fd survive into python (std sets CLOEXEC).
    rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()).unwrap();
    let hello = example("hello");
    let fd_s = fd.to_string();
    let addr_s = addr.to_string();
    let (server, ready) = Server::start(
        std::path::Path::new("python3"),
        &[
            launcher.to_str().unwrap(),
            &fd_s,
            hello.to_str().unwrap(),
            "--listen",
            &addr_s,
        ],
        &dir,
    );
    drop(listener);
    assert_eq!(ready["listen"], addr_s);
    let log = server.stderr();
    assert!(
        log.contains("inherited=true"),
        "the socket was adopted, not re-bound: {log}"
    );
    let r = Running {
        server,
        control: dir.join("none"),
        pid_file: dir.join("none"),
        dir,
        ready,
    };
    let load = baton_testkit::Load::start(
        baton_testkit::Target::Tcp(r.addr()),
        1,
        1,
        Duration::from_secs(10),
    );
    load.wait_for_progress(20, Duration::from_secs(10));
    assert_eq!(load.stop().failed, 0);
}
