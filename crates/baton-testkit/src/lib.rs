//! Test helpers for process-level tests: spawn-and-kill guards, temp dirs,
//! HTTP load clients that count every failure, `/proc` inspection and
//! `assert_eventually!`.
//!
//! Everything a test spawns is killed when its guard drops, even when the
//! test fails. Tests make themselves a child subreaper so that generations
//! whose parent exited are reparented to the test and can be reaped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, WaitOptions};
use serde_json::Value;

/// Polls `cond` every 10 ms until it holds or `timeout` passes; panics with
/// the message otherwise.
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = ::std::time::Instant::now() + $timeout;
        loop {
            if $cond { break; }
            if ::std::time::Instant::now() >= deadline {
                panic!("not true within {:?}: {}", $timeout, format!($($msg)+));
            }
            ::std::thread::sleep(::std::time::Duration::from_millis(10));
        }
    }};
}

pub mod h2;
pub mod tls;

/// Makes this process a child subreaper (orphaned descendants are reparented
/// to it, so it can reap them) — PID 1 on these machines does not reap.
pub fn become_subreaper() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .expect("prctl(PR_SET_CHILD_SUBREAPER)");
}

/// Path of an example binary of the `baton` crate, built alongside the tests
/// (`target/<profile>/examples/NAME`).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "example {name} not built at {}; run the tests with `cargo nextest run --workspace` or `cargo test --workspace`",
        path.display()
    );
    path
}

/// A unique temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "baton-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// Writes an executable shell script `name` and returns its path.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
    /// Makes a FIFO `name` (mode 0600) and returns its path.
    pub fn fifo(&self, name: &str) -> PathBuf {
        let p = self.join(name);
        rustix::fs::mkfifoat(rustix::fs::CWD, &p, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
        p
    }
}

/// Runs every file in `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`
/// of the repository through `f` (a fuzz target's entry point), naming the
/// file that fails; fails if there is none.
pub fn replay_corpus(target: &str, f: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in rd.flatten() {
            let bytes = std::fs::read(e.path()).unwrap();
            let r = std::panic::catch_unwind(|| f(&bytes));
            assert!(r.is_ok(), "{} fails", e.path().display());
            n += 1;
        }
    }
    assert!(n > 0, "no corpus for {target} under {}", root.display());
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process and every generation it started. On drop, every pid
/// seen is SIGKILLed (with its process group) and reaped.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    lines: mpsc::Receiver<Value>,
    pids: Arc<Mutex<BTreeSet<u32>>>,
    stderr_path: PathBuf,
}

impl Server {
    /// Spawns `program args` (stdout read for JSON event lines, stderr to a
    /// file in `dir`), and waits for its first `ready` line.
    pub fn start(program: &Path, args: &[&str], dir: &TempDir) -> (Server, Value) {
        Self::start_with_env(program, args, dir, &[])
    }

    /// Like [`start`](Self::start) with extra environment variables.
    pub fn start_with_env(
        program: &Path,
        args: &[&str],
        dir: &TempDir,
        envs: &[(&str, &str)],
    ) -> (Server, Value) {
        let mut server = Self::spawn(program, args, dir, envs);
        let ready = server.next_event(Duration::from_secs(20));
        (server, ready)
    }

    /// Spawns without waiting for readiness.
    pub fn spawn(program: &Path, args: &[&str], dir: &TempDir, envs: &[(&str, &str)]) -> Server {
        let name = program.file_name().unwrap().to_string_lossy().into_owned();
        Self::spawn_logged(program, args, dir, envs, &name, |_| {})
    }

    /// Like [`spawn`](Self::spawn), with stderr in `dir/stderr-LOG.log` and
    /// `setup` applied to the command (a uid, say).
    pub fn spawn_logged(
        program: &Path,
        args: &[&str],
        dir: &TempDir,
        envs: &[(&str, &str)],
        log: &str,
        setup: impl FnOnce(&mut Command),
    ) -> Server {
        let stderr_path = dir.join(&format!("stderr-{log}.log"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(program);
        setup(&mut cmd);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("RUST_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let pids = Arc::new(Mutex::new(BTreeSet::from([child.id()])));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let seen = pids.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if let Some(pid) = v["pid"].as_u64() {
                        seen.lock().unwrap().insert(pid as u32);
                    }
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Server {
            child: Some(child),
            lines: rx,
            pids,
            stderr_path,
        }
    }

    /// The next JSON event line any generation printed.
    pub fn next_event(&mut self, timeout: Duration) -> Value {
        match self.lines.recv_timeout(timeout) {
            Ok(v) => v,
            Err(e) => panic!(
                "no event line within {timeout:?} ({e}); stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// The next event line for which `pred` holds, skipping others.
    pub fn wait_event(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.next_event(left);
            if pred(&v) {
                return v;
            }
        }
    }

    /// The first generation's pid.
    pub fn first_pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Remembers a pid to kill at the end (a generation learned of otherwise).
    pub fn track(&self, pid: u32) {
        self.pids.lock().unwrap().insert(pid);
    }

    /// Everything the server processes wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Whether the process `pid` is gone, reaping it if it is our child (or
    /// was reparented to us) and has exited.
    pub fn is_gone(&mut self, pid: u32) -> bool {
        if let Some(child) = self.child.as_mut() {
            if child.id() == pid {
                return matches!(child.try_wait(), Ok(Some(_)));
            }
        }
        reaped_or_gone(pid)
    }

    /// The first generation's exit status, once it has exited.
    pub fn first_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Children of what we track too (a supervisor's children, say): they
        // live in their own process groups.
        let mut pids: Vec<u32> = self.pids.lock().unwrap().iter().copied().collect();
        let mut i = 0;
        while i < pids.len() {
            for c in children_of(pids[i]) {
                if !pids.contains(&c) {
                    pids.push(c);
                }
            }
            i += 1;
        }
        for pid in &pids {
            if let Some(p) = Pid::from_raw(*pid as i32) {
                let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for pid in pids {
            while !reaped_or_gone(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() {
                if proc_ppid(p) == Some(pid) {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Reaps `pid` if it is a zombie child of ours; true if it no longer exists.
pub fn reaped_or_gone(pid: u32) -> bool {
    let Some(p) = Pid::from_raw(pid as i32) else {
        return true;
    };
    match rustix::process::waitpid(Some(p), WaitOptions::NOHANG) {
        Ok(Some(_)) => true,
        Ok(None) => false,
        // ECHILD: not our child (any more): look at /proc.
        Err(_) => match proc_state(pid) {
            None => true,
            Some('Z') => false, // someone else's zombie: not gone yet
            Some(_) => false,
        },
    }
}

/// The fields of a `/proc/.../stat` file after the command name: the
/// state (field 3) first.
fn stat_fields(path: &Path) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// The state letter of `pid` from `/proc/PID/stat` (R, S, Z, ...), or None.
pub fn proc_state(pid: u32) -> Option<char> {
    stat_fields(Path::new(&format!("/proc/{pid}/stat")))?
        .first()?
        .chars()
        .next()
}

/// The parent pid of `pid`.
pub fn proc_ppid(pid: u32) -> Option<u32> {
    stat_fields(Path::new(&format!("/proc/{pid}/stat")))?
        .get(1)?
        .parse()
        .ok()
}

/// The threads of `pid`: each one's name and the CPU it has used (user +
/// system, in clock ticks), sorted by name.
pub fn proc_threads(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        // utime and stime are fields 14 and 15.
        let ticks = stat_fields(&t.path().join("stat")).map_or(0, |f| {
            [11, 12]
                .iter()
                .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
                .sum()
        });
        out.push((name.trim().to_owned(), ticks));
    }
    out.sort();
    out
}

/// Zombie processes whose parent is this process.
pub fn our_zombies() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() {
                if proc_ppid(pid) == Some(me) && proc_state(pid) == Some('Z') {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// Number of open fds of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Each of `pid`'s open fds with what it points at (`socket:[INODE]`,
/// a path, ...), by fd number.
fn fd_targets(pid: u32) -> Vec<(u32, String)> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, String)> = rd
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    out.sort();
    out
}

/// What each of `pid`'s fds points at, as `FD:TARGET`, for failure messages.
pub fn fd_list(pid: u32) -> Vec<String> {
    fd_targets(pid)
        .into_iter()
        .map(|(fd, target)| format!("{fd}:{target}"))
        .collect()
}

/// Socket inodes `pid` holds open.
pub fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    fd_targets(pid)
        .into_iter()
        .filter_map(|(_, t)| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        .collect()
}

/// The inode of the TCP socket listening on 127.0.0.1:`port`, from
/// `/proc/net/tcp`.
pub fn tcp_listen_inode(port: u16) -> Option<u64> {
    tcp_listen_inodes(port).into_iter().next()
}

/// The inodes of every TCP socket listening on `port` (more than one means
/// a second socket was bound beside the first, with `SO_REUSEPORT`).
pub fn tcp_listen_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return out;
    };
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let local_port = f[1]
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        if local_port == Some(port) && f[3] == "0A" {
            if let Ok(inode) = f[9].parse() {
                out.push(inode);
            }
        }
    }
    out
}

/// Bytes waiting to be read on the server's end of the loopback TCP
/// connection from `client` to `server` (`/proc/net/tcp`'s rx_queue), if
/// that socket exists: 0 once the server has read what the client sent.
pub fn tcp_unread(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |a: &str| {
        a.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || port(f[1]) != Some(server.port()) || port(f[2]) != Some(client.port()) {
            return None;
        }
        let rx = f[4].rsplit(':').next()?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// Sends one request to a control socket and returns the answer (bounded).
pub fn control(socket: &Path, request: &str, timeout: Duration) -> Value {
    let mut s = StdUnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("no answer to {request} within {timeout:?}: {e}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}

/// Where load goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
    /// HTTPS: a TCP address, the name sent as SNI, and the client
    /// configuration (whose session store lets new connections resume).
    Tls(SocketAddr, String, Arc<rustls::ClientConfig>),
}

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

impl Target {
    fn connect(&self) -> std::io::Result<Box<dyn Conn>> {
        let t = Duration::from_secs(5);
        Ok(match self {
            Target::Tcp(a) => {
                let s = std::net::TcpStream::connect_timeout(a, t)?;
                s.set_read_timeout(Some(t))?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Target::Unix(p) => {
                let s = StdUnixStream::connect(p)?;
                s.set_read_timeout(Some(t))?;
                Box::new(s)
            }
            Target::Tls(a, name, config) => Box::new(tls::connect(*a, name, config)?),
        })
    }
}

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests answered with 200.
    pub ok: u64,
    /// Requests that failed, with what happened (first 50 kept).
    pub failures: Vec<String>,
    /// Number of failed requests.
    pub failed: u64,
    /// Connections the keep-alive clients opened (more than their number
    /// means the server asked them to reconnect with `Connection: close`).
    pub keepalive_connects: u64,
    /// Distinct response bodies seen (e.g. "hello from generation 3 pid ...").
    pub bodies: BTreeSet<String>,
}

#[derive(Default)]
struct Shared {
    ok: AtomicU64,
    failed: AtomicU64,
    ka_connects: AtomicU64,
    failures: Mutex<Vec<String>>,
    bodies: Mutex<BTreeSet<String>>,
}

/// Concurrent HTTP/1.1 load from two kinds of clients: some open a new
/// connection per request (`Connection: close`), some reuse a keep-alive
/// connection as fast as possible. Every failure is counted; nothing is
/// retried. Bounded by `max_duration`; [`stop`](Self::stop) ends it sooner.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    shared: Arc<SharedHandle>,
}

struct SharedHandle(Shared);
impl std::fmt::Debug for SharedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

impl Load {
    /// Starts `keepalive` keep-alive clients and `close` new-connection
    /// clients against `target`.
    pub fn start(target: Target, keepalive: usize, close: usize, max_duration: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(SharedHandle(Shared::default()));
        let deadline = Instant::now() + max_duration;
        let mut threads = Vec::new();
        for i in 0..(keepalive + close) {
            let keep = i < keepalive;
            let (stop, shared, target) = (stop.clone(), shared.clone(), target.clone());
            threads.push(std::thread::spawn(move || {
                client_loop(&target, keep, &stop, &shared.0, deadline)
            }));
        }
        Load {
            stop,
            threads,
            shared,
        }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.shared.0.ok.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests have succeeded (bounded).
    pub fn wait_for_progress(&self, n: u64, timeout: Duration) {
        let start = self.ok();
        assert_eventually!(timeout, self.ok() >= start + n, "load made no progress");
    }

    /// Stops the clients and returns what they saw.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let s = &self.shared.0;
        LoadReport {
            ok: s.ok.load(Ordering::SeqCst),
            failed: s.failed.load(Ordering::SeqCst),
            failures: s.failures.lock().unwrap().clone(),
            keepalive_connects: s.ka_connects.load(Ordering::SeqCst),
            bodies: s.bodies.lock().unwrap().clone(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn client_loop(target: &Target, keepalive: bool, stop: &AtomicBool, s: &Shared, deadline: Instant) {
    let req: &[u8] = if keepalive {
        b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    };
    let mut conn: Option<Box<dyn Conn>> = None;
    let mut buf = Vec::with_capacity(4096);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let fresh = conn.is_none();
        if fresh {
            match target.connect() {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    fail(s, format!("connect: {e}"));
                    continue;
                }
            }
            if keepalive {
                s.ka_connects.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match exchange(c.as_mut(), req, &mut buf) {
            Ok((status, close, body)) => {
                if status == 200 {
                    s.ok.fetch_add(1, Ordering::Relaxed);
                    let mut bodies = s.bodies.lock().unwrap();
                    if bodies.len() < 1000 {
                        bodies.insert(body);
                    }
                } else {
                    fail(s, format!("status {status}"));
                }
                if close || !keepalive {
                    conn = None;
                }
            }
            Err(e) => {
                fail(
                    s,
                    format!("{} connection: {e}", if fresh { "new" } else { "reused" }),
                );
                conn = None;
            }
        }
    }
}

fn fail(s: &Shared, what: String) {
    s.failed.fetch_add(1, Ordering::Relaxed);
    let mut f = s.failures.lock().unwrap();
    if f.len() < 50 {
        f.push(what);
    }
}

/// Writes a request and reads one response: (status, connection-close, body).
fn exchange(
    c: &mut dyn Conn,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, bool, String)> {
    use std::io::{Error, ErrorKind};
    c.write_all(req)?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = c.read(&mut chunk)?;
        if n == 0 {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                format!("closed after {} bytes of response", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "bad status line"))?;
    let mut len = 0usize;
    // HTTP/1.0 closes after the response unless it says keep-alive.
    let mut close = head.starts_with("http/1.0") && !head.contains("connection: keep-alive");
    for line in head.lines() {
        if let Some(v) = line.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = line.strip_prefix("connection:") {
            close = v.contains("close");
        }
    }
    while buf.len() < head_end + len {
        let n = c.read(&mut chunk)?;
        if n == 0 {
            return Err(Error::new(ErrorKind::UnexpectedEof, "closed mid-body"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
    Ok((status, close, body))
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: u32, signal: rustix::process::Signal) {
    let p = Pid::from_raw(pid as i32).expect("a real pid");
    rustix::process::kill_process(p, signal).expect("kill");
}

/// Stops `load` and `probe` and asserts that no connection was refused
/// (the listening socket was always held): the prober got answers and no
/// refusal, and no load failure is a refused connect. Returns the load's
/// report for the caller's own bound on other failures.
pub fn assert_none_refused(load: Load, probe: Prober) -> LoadReport {
    let report = load.stop();
    let (answered, refused) = probe.stop();
    assert!(answered > 0, "the prober got no answer");
    assert_eq!(refused, 0, "connections refused");
    let refused: Vec<&String> = report
        .failures
        .iter()
        .filter(|f| f.contains("refused"))
        .collect();
    assert!(refused.is_empty(), "{:?}", report.failures);
    report
}

/// New connections, one `GET /` each, counting refused connects apart from
/// every other failure (the [`Load`] clients keep only the first 50
/// failures). Bounded by `max_duration`; [`stop`](Self::stop) ends it sooner.
#[derive(Debug)]
pub struct Prober {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prober {
    /// Starts `threads` probing threads against `addr`.
    pub fn start(addr: SocketAddr, threads: usize, max_duration: Duration) -> Prober {
        use std::io::ErrorKind;
        use std::net::TcpStream;
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + max_duration;
        let threads = (0..threads)
            .map(|_| {
                let (stop, refused, ok) = (stop.clone(), refused.clone(), ok.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {}
                            Ok(mut s) => {
                                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                                let mut resp = Vec::new();
                                if s.write_all(
                                    b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                                )
                                .is_ok()
                                    && s.read_to_end(&mut resp).is_ok()
                                    && resp.starts_with(b"HTTP/1.1 200")
                                {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        Prober {
            stop,
            refused,
            ok,
            threads,
        }
    }

    /// Connections answered with 200 so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops and returns (answered with 200, refused).
    pub fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.refused.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One `GET path` on the keep-alive connection `c` (bounded by its read
/// timeout): (status, body, whether the server said it closes).
pub fn http_get(c: &mut std::net::TcpStream, path: &str) -> (u16, String, bool) {
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes())
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = c.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if raw.len() >= end + 4 + len {
                let status = head[9..12].parse().unwrap();
                let body = text[end + 4..end + 4 + len].to_owned();
                return (status, body, head.contains("connection: close"));
            }
        }
    }
}
