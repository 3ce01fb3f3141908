//! A message consumer drains too: the `redis_consumer` example (a Redis
//! Stream consumer group) upgraded ten times while messages flow processes
//! every message exactly once, leaves nothing pending, and every old
//! generation finishes its batch and exits. Also: a new generation killed
//! while it holds messages loses none (the old one takes the service back
//! and claims them), pending entries of a consumer that is gone are taken
//! over, and a generation that cannot reach Redis is never ready (its
//! upgrade is rolled back).
//!
//! Each test starts its own `redis-server` on a free loopback port. Without
//! one installed the tests print `SKIPPED: …` and pass, except under CI
//! (`CI` set), where they fail: `.ci/run` installs it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::TcpListener;
use std::ops::Range;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_testkit::{assert_eventually, Server, TempDir};
use redis::streams::{StreamInfoConsumersReply, StreamPendingReply};
use redis::Commands;
use serde_json::Value;

use crate::Running;

const STREAM: &str = "jobs";
const GROUP: &str = "workers";
const PROCESSED: &str = "jobs:processed";

/// A `redis-server` of our own, killed and reaped on drop (even when the
/// test fails).
struct Redis {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Redis {
    /// Starts one on a free 127.0.0.1 port and waits until it answers
    /// `PING`; `None` (after printing `SKIPPED: …`) if redis-server is not
    /// installed and `CI` is not set.
    fn start(tag: &str) -> Option<Redis> {
        let program = Path::new("/usr/bin/redis-server");
        let program = if program.exists() {
            program.to_path_buf()
        } else if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            "redis-server".into()
        } else if std::env::var_os("CI").is_some() {
            panic!("redis-server is not installed, and CI is set: .ci/run must install it (apt-get install -y redis-server)");
        } else {
            eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server; .ci/run does)");
            return None;
        };
        let dir = TempDir::new(&format!("redis-{tag}"));
        let log = dir.join("redis.log");
        // A port that was free a moment ago may be taken by the time
        // redis-server binds it: then it exits, and we try another.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(&program)
                .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
                .args(["--port", &port.to_string()])
                .args(["--dir", dir.path().to_str().unwrap()])
                .args(["--logfile", log.to_str().unwrap()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                if ping(port) {
                    return Some(Redis {
                        child,
                        port,
                        _dir: dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            eprintln!("redis-server on port {port} did not answer PING:\n{log}");
        }
        panic!("could not start redis-server");
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn connect(&self) -> redis::Connection {
        let client = redis::Client::open(format!("redis://{}/", self.addr())).unwrap();
        let con = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap();
        con.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        con
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a redis-server on 127.0.0.1:`port` answers `PING`.
fn ping(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/")) else {
        return false;
    };
    let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
        return false;
    };
    redis::cmd("PING")
        .query::<String>(&mut con)
        .is_ok_and(|p| p == "PONG")
}

/// `XADD jobs * n N` for each N; returns the ids.
fn produce(con: &mut redis::Connection, numbers: Range<u64>) -> Vec<String> {
    numbers
        .map(|n| con.xadd(STREAM, "*", &[("n", n)]).unwrap())
        .collect()
}

fn processed(con: &mut redis::Connection) -> HashMap<String, i64> {
    con.hgetall(PROCESSED).unwrap()
}

fn processed_count(con: &mut redis::Connection) -> usize {
    con.hlen(PROCESSED).unwrap()
}

fn pending(con: &mut redis::Connection) -> usize {
    let p: StreamPendingReply = con.xpending(STREAM, GROUP).unwrap();
    p.count()
}

/// Consumer name → its pending entries.
fn consumers(con: &mut redis::Connection) -> BTreeMap<String, usize> {
    let c: StreamInfoConsumersReply = con.xinfo_consumers(STREAM, GROUP).unwrap();
    c.consumers
        .into_iter()
        .map(|c| (c.name, c.pending))
        .collect()
}

/// Every message produced was processed once: the `processed` hash has
/// exactly the produced ids as fields, each with value 1.
fn assert_each_processed_once(con: &mut redis::Connection, ids: &[String]) {
    let done = processed(con);
    assert_eq!(done.len(), ids.len(), "fields in {PROCESSED}");
    let produced: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(produced.len(), ids.len(), "XADD returned distinct ids");
    let missing: Vec<&&str> = produced
        .iter()
        .filter(|id| !done.contains_key(**id))
        .take(10)
        .collect();
    assert!(missing.is_empty(), "never processed: {missing:?}");
    let twice: Vec<(&String, &i64)> = done.iter().filter(|(_, v)| **v != 1).take(10).collect();
    assert!(twice.is_empty(), "not processed exactly once: {twice:?}");
}

/// The `drained` line of generation `pid`, collecting every other
/// `drained` line read meanwhile into `seen`.
fn drained(server: &mut Server, pid: u32, seen: &mut BTreeMap<u32, Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = seen.get(&pid) {
            return v.clone();
        }
        let v = server.next_event(deadline.saturating_duration_since(Instant::now()));
        if v["event"] == "drained" {
            seen.insert(v["pid"].as_u64().unwrap() as u32, v);
        }
    }
}

fn assert_drained_cleanly(d: &Value) {
    assert_eq!(d["expired"], false, "drain timed out: {d}");
    assert_eq!(d["abandoned"], 0, "{d}");
    assert_eq!(d["duplicates"], 0, "{d}");
}

/// Writes messages on a thread of its own, one batch at a time, so that
/// messages are written while an upgrade is in flight.
struct Producer {
    batches: Option<mpsc::Sender<Range<u64>>>,
    events: mpsc::Receiver<Produced>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

enum Produced {
    /// `FLOWING_AT` messages of the batch are written; the rest are being
    /// written.
    Flowing,
    Done,
}

/// How much of a batch is written before [`Producer::begin`] returns.
const FLOWING_AT: u64 = 300;

impl Producer {
    fn start(redis: &Redis) -> Producer {
        let (batches, batch_rx) = mpsc::channel::<Range<u64>>();
        let (events_tx, events) = mpsc::channel();
        let mut con = redis.connect();
        let thread = std::thread::spawn(move || {
            let mut ids = Vec::new();
            for batch in batch_rx {
                let flowing = (batch.start + FLOWING_AT).min(batch.end);
                ids.extend(produce(&mut con, batch.start..flowing));
                let _ = events_tx.send(Produced::Flowing);
                ids.extend(produce(&mut con, flowing..batch.end));
                let _ = events_tx.send(Produced::Done);
            }
            ids
        });
        Producer {
            batches: Some(batches),
            events,
            thread: Some(thread),
        }
    }

    /// Starts writing messages numbered `batch`; returns once some are
    /// written and the rest are flowing.
    fn begin(&self, batch: Range<u64>) {
        self.batches.as_ref().unwrap().send(batch).unwrap();
        let e = self.events.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(e, Produced::Flowing));
    }

    /// Waits until the batch is written.
    fn wait_done(&self) {
        let e = self.events.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(e, Produced::Done));
    }

    /// The ids of every message written.
    fn finish(mut self) -> Vec<String> {
        self.batches.take();
        self.thread.take().unwrap().join().unwrap()
    }
}

const FIRST: u64 = 1_000;
const PER_UPGRADE: u64 = 900;
const UPGRADES: u64 = 10;

#[test]
fn ten_upgrades_while_messages_flow_process_each_message_exactly_once() {
    let Some(redis) = Redis::start("upgrades") else {
        return;
    };
    let t0 = Instant::now();
    let mut con = redis.connect();
    // Before any consumer ran and before the group exists: the group must
    // start at the beginning of the stream for these to be delivered.
    let mut ids = produce(&mut con, 0..FIRST);
    let mut r = Running::start(
        "redis_consumer",
        &[
            "--redis",
            &redis.addr(),
            "--stream",
            STREAM,
            "--group",
            GROUP,
            "--drain-timeout",
            "10s",
            "--settle",
            "200ms",
        ],
    );
    let first = r.pid();
    assert_eq!(r.ready["consumer"], format!("gen-1-{first}"), "{}", r.ready);
    assert_eventually!(
        Duration::from_secs(10),
        processed_count(&mut con) == FIRST as usize,
        "the first generation did not process the {FIRST} messages written before it started"
    );

    let producer = Producer::start(&redis);
    let mut seen = BTreeMap::new();
    let mut current = first;
    let mut answers_ms = Vec::new();
    let mut gone_ms = Vec::new();
    let mut produced = FIRST;
    for i in 0..UPGRADES {
        producer.begin(produced..produced + PER_UPGRADE);
        produced += PER_UPGRADE;
        let old = current;
        let asked = Instant::now();
        let a = r.upgrade(r#"{"command":"upgrade"}"#);
        assert_eq!(a["ok"], true, "upgrade {i}: {a}");
        assert_eq!(a["generation"], i + 2, "upgrade {i}: {a}");
        let answered = Instant::now();
        answers_ms.push(answered.duration_since(asked).as_secs_f64() * 1e3);
        current = a["pid"].as_u64().unwrap() as u32;

        // The old generation reads nothing new, finishes and acknowledges
        // the batch it holds, and exits.
        let d = drained(&mut r.server, old, &mut seen);
        assert_drained_cleanly(&d);
        assert_eventually!(
            Duration::from_secs(5),
            r.server.is_gone(old),
            "upgrade {i}: old generation {old} still running"
        );
        gone_ms.push(answered.elapsed().as_secs_f64() * 1e3);
        // The new one goes on from the group: everything written so far
        // gets processed.
        producer.wait_done();
        assert_eventually!(
            Duration::from_secs(10),
            processed_count(&mut con) == produced as usize,
            "upgrade {i}: {} of {produced} messages processed",
            processed_count(&mut con)
        );
    }
    ids.extend(producer.finish());
    assert_eq!(ids.len() as u64, FIRST + UPGRADES * PER_UPGRADE);
    assert_eq!(ids.len(), 10_000);
    let total = t0.elapsed();

    assert_each_processed_once(&mut con, &ids);
    assert_eq!(pending(&mut con), 0, "entries left pending");
    // Every old generation left the group with nothing pending; only the
    // active one is a consumer.
    let live = consumers(&mut con);
    assert_eq!(
        live,
        BTreeMap::from([(format!("gen-{}-{current}", UPGRADES + 1), 0)]),
        "consumers"
    );

    // The last one drains the same way on a stop, and the generations'
    // own counts add up to every message, once.
    let a = r.control(r#"{"command":"stop"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let d = drained(&mut r.server, current, &mut seen);
    assert_drained_cleanly(&d);
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(current),
        "last generation still running after stop"
    );
    assert_eq!(seen.len() as u64, UPGRADES + 1, "{seen:?}");
    let by_generation: Vec<u64> = seen
        .values()
        .map(|d| d["processed"].as_u64().unwrap())
        .collect();
    assert_eq!(by_generation.iter().sum::<u64>(), 10_000, "{seen:?}");
    // Messages that the old generations finished after their drain began
    // (the rest of the batch each held).
    let after_drain: Vec<u64> = seen
        .values()
        .filter(|d| d["pid"] != current)
        .map(|d| d["after_drain"].as_u64().unwrap())
        .collect();
    assert!(
        after_drain.iter().sum::<u64>() > 0,
        "no generation held a batch when its drain began: {seen:?}"
    );
    assert!(consumers(&mut con).is_empty(), "{:?}", consumers(&mut con));
    let stderr = r.server.stderr();
    assert!(!stderr.contains("processed twice"), "{stderr}");
    assert_eq!(r.server.first_exit().map(|s| s.code()), Some(Some(0)));

    answers_ms.sort_by(f64::total_cmp);
    gone_ms.sort_by(f64::total_cmp);
    eprintln!(
        "redis_consumer: {} messages, {UPGRADES} upgrades in {total:.2?}; upgrade answered in \
         {:.0} ms median / {:.0} ms max; old generation gone {:.0} ms median / {:.0} ms max \
         after the answer (settle 200 ms); processed per generation {by_generation:?}; \
         finished after the drain began {after_drain:?}",
        ids.len(),
        answers_ms[answers_ms.len() / 2],
        answers_ms[answers_ms.len() - 1],
        gone_ms[gone_ms.len() / 2],
        gone_ms[gone_ms.len() - 1],
    );
}

#[test]
fn pending_entries_of_a_consumer_that_is_gone_are_taken_over() {
    let Some(redis) = Redis::start("claim") else {
        return;
    };
    let mut con = redis.connect();
    // A generation that was killed with 150 messages delivered to it and
    // not acknowledged.
    let () = con.xgroup_create_mkstream(STREAM, GROUP, "0").unwrap();
    let ids = produce(&mut con, 0..200);
    let dead = "gen-7-999999";
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&["GROUP", GROUP, dead, "COUNT", "150", "STREAMS", STREAM, ">"])
        .query(&mut con)
        .unwrap();
    assert_eq!(consumers(&mut con)[dead], 150);

    let mut r = Running::start(
        "redis_consumer",
        &[
            "--redis",
            &redis.addr(),
            "--stream",
            STREAM,
            "--group",
            GROUP,
            "--drain-timeout",
            "300ms",
            "--claim-min-idle",
            "500ms",
        ],
    );
    assert_eventually!(
        Duration::from_secs(10),
        processed_count(&mut con) == ids.len(),
        "{} of {} processed",
        processed_count(&mut con),
        ids.len()
    );
    assert_each_processed_once(&mut con, &ids);
    assert_eq!(pending(&mut con), 0);
    assert_eq!(consumers(&mut con)[dead], 0, "the dead consumer's entries");

    let a = r.control(r#"{"command":"stop"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let pid = r.pid();
    let d = drained(&mut r.server, pid, &mut BTreeMap::new());
    assert_drained_cleanly(&d);
    assert_eq!(d["claimed"], 150, "{d}");
    assert_eq!(d["processed"], 200, "{d}");
}

/// The worst moment to die: a new generation SIGKILLed while it holds
/// messages it has not acknowledged. The old one takes the service back
/// (it was within its settle period), claims the dead one's pending
/// entries once they are idle for `--claim-min-idle`, and every message is
/// processed once.
#[test]
fn a_new_generation_killed_holding_messages_loses_none() {
    let Some(redis) = Redis::start("killed") else {
        return;
    };
    let mut con = redis.connect();
    let mut r = Running::start(
        "redis_consumer",
        &[
            "--redis",
            &redis.addr(),
            "--stream",
            STREAM,
            "--group",
            GROUP,
            "--settle",
            "10s",
            "--drain-timeout",
            "1s",
            "--claim-min-idle",
            "2s",
        ],
    );
    let old = r.pid();
    let producer = Producer::start(&redis);
    producer.begin(0..5_000);
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let new = a["pid"].as_u64().unwrap() as u32;
    let name = format!("gen-2-{new}");
    // Killed as soon as it is seen holding unacknowledged messages.
    assert_eventually!(
        Duration::from_secs(10),
        consumers(&mut con).get(&name).is_some_and(|p| *p > 0),
        "the new generation never held a message"
    );
    baton_testkit::send_signal(new, rustix::process::Signal::KILL);
    assert_eventually!(
        Duration::from_secs(10),
        r.server.is_gone(new),
        "killed generation not reaped"
    );
    let stranded = consumers(&mut con)[&name];
    assert!(stranded > 0);
    assert_eventually!(
        Duration::from_secs(10),
        r.pid_file_pid() == old,
        "the old generation did not take the service back; stderr:\n{}",
        r.server.stderr()
    );

    producer.wait_done();
    let ids = producer.finish();
    assert_eventually!(
        Duration::from_secs(15),
        processed_count(&mut con) == ids.len(),
        "{} of {} processed",
        processed_count(&mut con),
        ids.len()
    );
    assert_each_processed_once(&mut con, &ids);
    assert_eq!(pending(&mut con), 0);
    assert_eq!(
        consumers(&mut con)[&name],
        0,
        "the killed consumer's entries"
    );

    let a = r.control(r#"{"command":"stop"}"#);
    assert_eq!(a["ok"], true, "{a}");
    let d = drained(&mut r.server, old, &mut BTreeMap::new());
    assert_drained_cleanly(&d);
    assert_eq!(d["claimed"], stranded, "{d}");
    eprintln!(
        "redis_consumer: killed generation held {stranded} messages; the old one claimed them: {d}"
    );
}

#[test]
fn a_generation_that_cannot_reach_redis_is_never_ready() {
    let Some(redis) = Redis::start("unreachable") else {
        return;
    };
    let addr = redis.addr();
    let mut con = redis.connect();
    let mut r = Running::start(
        "redis_consumer",
        &["--redis", &addr, "--stream", STREAM, "--group", GROUP],
    );
    let first = r.pid();
    let ids = produce(&mut con, 0..100);
    assert_eventually!(
        Duration::from_secs(10),
        processed_count(&mut con) == ids.len(),
        "not processed"
    );
    drop(con);
    drop(redis);

    // The new generation cannot connect: it reports the failure instead of
    // ready, and the old one stays the active one.
    let a = r.upgrade(r#"{"command":"upgrade"}"#);
    assert_eq!(a["ok"], false, "{a}");
    let why = a["error"].as_str().unwrap_or_default();
    assert!(why.contains("cannot connect to redis"), "{a}");
    assert_eq!(r.pid_file_pid(), first);
    assert!(!r.server.is_gone(first));
    let status = r.control(r#"{"command":"status"}"#);
    assert_eq!(status["pid"], first, "{status}");
    assert_eq!(status["state"], "active", "{status}");

    // A first start without Redis never prints ready and exits 1.
    let dir = TempDir::new("redis-unreachable-first");
    let mut lone = Server::spawn(
        &baton_testkit::example("redis_consumer"),
        &[
            "--redis",
            &addr,
            "--control-socket",
            dir.join("c.sock").to_str().unwrap(),
        ],
        &dir,
        &[],
    );
    assert_eventually!(
        Duration::from_secs(15),
        lone.first_exit().is_some(),
        "started without redis and did not exit"
    );
    assert_eq!(lone.first_exit().map(|s| s.code()), Some(Some(1)));
    assert!(
        lone.stderr().contains("cannot connect to redis"),
        "{}",
        lone.stderr()
    );
}
