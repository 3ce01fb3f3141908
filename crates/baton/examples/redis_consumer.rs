//! A consumer of a Redis Stream in a consumer group that upgrades without
//! losing a message or processing one twice.
//!
//! ```text
//! redis-server --port 6379 --save '' --appendonly no &
//! cargo run --example redis_consumer -- --redis 127.0.0.1:6379 --stream jobs --group workers \
//!     --control-socket /tmp/consumer.sock --pid-file /tmp/consumer.pid
//! redis-cli XADD jobs '*' n 1
//! redis-cli HGETALL jobs:processed          # the message's id, processed once
//! kill -USR2 $(cat /tmp/consumer.pid)      # or {"command":"upgrade"} on the control socket
//! ```
//!
//! "Processing" a message is `HINCRBY <stream>:processed <id> 1` and
//! `XACK` in one `MULTI`/`EXEC`: either both happen or neither, so a message
//! is pending in the group exactly as long as it is unprocessed, whatever
//! moment a process dies at. Each generation is its own consumer,
//! `gen-<generation>-<pid>`. It:
//!
//! 1. connects to Redis and creates the group if it is missing, from the
//!    start of the stream (`XGROUP CREATE <stream> <group> 0 MKSTREAM`), so
//!    that messages added before the first consumer ever ran are delivered
//!    (`$` would skip them);
//! 2. reports ready only then: a new generation that cannot reach Redis
//!    fails its upgrade, and the old one keeps consuming;
//! 3. finishes its own pending entries, and takes over (`XAUTOCLAIM`) the
//!    pending entries of consumers that are gone: entries idle for at least
//!    `--claim-min-idle` (by default the drain timeout plus 30 s, longer
//!    than any live generation holds a message), at start and then
//!    periodically;
//! 4. reads `XREADGROUP GROUP <group> <consumer> COUNT 100 BLOCK 200
//!    STREAMS <stream> >` and processes each message it gets;
//! 5. when it drains (an upgrade made a new generation active, or a stop):
//!    reads nothing new, finishes and acknowledges the batch it holds, and
//!    exits; the next generation goes on from the group. A read in flight
//!    is not cancelled (Redis has delivered its messages to this consumer
//!    already; cancelled, they would sit pending until a claim): it lasts
//!    at most `BLOCK` 200 ms, which is how late the drain is noticed. All
//!    of it is bounded by the drain timeout; what is left at that point
//!    stays pending and is claimed by a later generation.
//!
//! When this generation stops consuming it prints
//! `{"event":"drained","pid":…,"generation":…,"consumer":…,"processed":…,…}`
//! on stdout. It binds no listener of its own (`--listen` is accepted and
//! ignored); `--admin ADDR` serves `/healthz`, `/readyz` and `/metrics`.
//! More in docs/CONSUMER.md.
mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamPendingCountReply,
    StreamReadOptions, StreamReadReply,
};
use redis::AsyncCommands;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Messages asked for per read (and per claim).
const BATCH: usize = 100;
/// How long one read waits for new messages. A read in flight is never
/// cancelled, so this is also how late a drain is noticed.
const BLOCK: Duration = Duration::from_millis(200);
/// Connecting, and waiting for any one answer (longer than `BLOCK`).
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// Back-off after a failed Redis command.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(args_override_self = true)]
struct Flags {
    #[command(flatten)]
    common: common::Args,
    /// Redis server: HOST:PORT, or a redis:// URL.
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: String,
    /// The stream to consume.
    #[arg(long, default_value = "jobs")]
    stream: String,
    /// The consumer group (created from the start of the stream if missing).
    #[arg(long, default_value = "workers")]
    group: String,
    /// Pending entries idle this long belong to a consumer that is gone and
    /// are taken over. Must be longer than any live generation holds a
    /// message: at most the drain timeout. Default: drain timeout + 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    claim_min_idle: Option<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    let args = Flags::parse();
    let baton = args.common.baton()?;
    baton::signals::handle(baton.clone())?;
    let admin = match &args.common.admin {
        Some(addr) => Some(baton.tcp("admin", addr).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|a| a.local_addr()).transpose()?;
    args.common.startup(&baton).await;

    let name = format!("gen-{}-{}", baton.generation(), std::process::id());
    let claim_min_idle = args
        .claim_min_idle
        .unwrap_or(args.common.drain_timeout + Duration::from_secs(30));
    if claim_min_idle <= args.common.drain_timeout {
        warn!(
            claim_min_idle = ?claim_min_idle,
            drain_timeout = ?args.common.drain_timeout,
            "--claim-min-idle is not longer than the drain timeout: a draining \
             generation's batch may be claimed and processed twice"
        );
    }
    // Ready only once Redis answers and the group exists: a generation that
    // cannot consume must not take over from one that can.
    let con = match connect(&args.redis, &args.stream, &args.group).await {
        Ok(con) => con,
        Err(e) => {
            let message = format!("{e:#}");
            baton.fail(&message);
            return Err(e);
        }
    };
    let consumer = Consumer {
        con,
        processed_key: format!("{}:processed", args.stream),
        stream: args.stream.clone(),
        group: args.group.clone(),
        name: name.clone(),
        claim_min_idle,
        counts: Arc::new(Counts::default()),
    };
    let counts = consumer.counts.clone();
    let (stream, group) = (args.stream.clone(), args.group.clone());
    let status_name = name.clone();
    baton.on_status(move || {
        serde_json::json!({
            "app": "redis_consumer",
            "stream": stream,
            "group": group,
            "consumer": status_name,
            "counts": counts.to_json(),
        })
    });

    baton.ready().await?;
    common::announce(
        &baton,
        serde_json::json!({
            "consumer": name,
            "redis": args.redis,
            "stream": args.stream,
            "group": args.group,
            "admin": admin_addr.map(|a| a.to_string()),
        }),
    );
    if let Some(admin) = admin {
        tokio::spawn(baton::admin::serve(admin, baton.clone()));
    }
    info!(
        consumer = %consumer.name,
        stream = %consumer.stream,
        group = %consumer.group,
        claim_min_idle = ?claim_min_idle,
        "consuming"
    );
    // The task holds a drain handle: the process does not exit before it
    // has finished its batch (or the drain timeout passed) and said so.
    let generation = baton.generation();
    let shutdown = baton.shutdown();
    tokio::spawn(async move {
        let (consumer, expired) = consumer.run(shutdown.clone()).await;
        consumer.announce_drained(generation, expired);
        drop(shutdown);
    });
    baton.wait().await;
    Ok(())
}

/// Connects (bounded by `REDIS_TIMEOUT`), checks that the server answers,
/// and creates the group if it is missing.
async fn connect(addr: &str, stream: &str, group: &str) -> anyhow::Result<ConnectionManager> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}/")
    };
    let client = redis::Client::open(url.as_str()).with_context(|| format!("redis {addr}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(REDIS_TIMEOUT)
        .set_response_timeout(REDIS_TIMEOUT)
        // No retries of its own: the consumer loop retries (with its own
        // back-off, each attempt reconnecting), and a new generation that
        // cannot connect should say so at once.
        .set_number_of_retries(0)
        .set_max_delay(BACKOFF_MAX.as_millis() as u64);
    let mut con = tokio::time::timeout(
        REDIS_TIMEOUT,
        ConnectionManager::new_with_config(client, config),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no connection within {REDIS_TIMEOUT:?}"))
    .and_then(|r| r.map_err(anyhow::Error::from))
    .with_context(|| format!("cannot connect to redis at {addr}"))?;
    let _: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .with_context(|| format!("redis at {addr} does not answer PING"))?;
    ensure_group(&mut con, stream, group)
        .await
        .with_context(|| format!("cannot create group {group} on stream {stream}"))?;
    Ok(con)
}

/// `XGROUP CREATE <stream> <group> 0 MKSTREAM`, unless the group exists.
///
/// `0`, not `$`: the group then starts at the beginning of the stream, so
/// messages added before any consumer ran (a producer deployed first, or a
/// stream that outlived a deleted group) are delivered. With `$` they would
/// be behind the group's last-delivered id for good. Creating an existing
/// group fails with `BUSYGROUP` and changes nothing, so two generations
/// starting at once cannot move the group's position.
async fn ensure_group(
    con: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> redis::RedisResult<()> {
    match con
        .xgroup_create_mkstream::<_, _, _, ()>(stream, group, "0")
        .await
    {
        Ok(()) => {
            info!(
                stream,
                group, "created the consumer group at the start of the stream"
            );
            Ok(())
        }
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// What this generation did, for its `drained` line and `status`.
#[derive(Debug, Default)]
struct Counts {
    /// Messages processed (the transaction ran), from every source.
    processed: AtomicU64,
    /// Of those, entries that were already pending for this consumer.
    recovered: AtomicU64,
    /// Of those, entries taken over from consumers that are gone.
    claimed: AtomicU64,
    /// Of those, messages processed after the drain began: the rest of
    /// the batch this generation held then.
    after_drain: AtomicU64,
    /// Transactions whose `XACK` found the entry already acknowledged: the
    /// message was processed twice. Never expected.
    duplicates: AtomicU64,
    /// Messages held when the drain timeout passed, left pending.
    abandoned: AtomicU64,
}

impl Counts {
    fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "processed": get(&self.processed),
            "recovered": get(&self.recovered),
            "claimed": get(&self.claimed),
            "after_drain": get(&self.after_drain),
            "duplicates": get(&self.duplicates),
            "abandoned": get(&self.abandoned),
        })
    }
}

/// Where a batch came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    New,
    Own,
    Claimed,
}

/// The drain timeout passed: stop now.
#[derive(Debug)]
struct Expired;

/// A failed step of the loop.
#[derive(Debug)]
enum Stop {
    Expired,
    Redis(redis::RedisError),
}

impl From<redis::RedisError> for Stop {
    fn from(e: redis::RedisError) -> Stop {
        Stop::Redis(e)
    }
}

struct Consumer {
    con: ConnectionManager,
    stream: String,
    group: String,
    name: String,
    processed_key: String,
    claim_min_idle: Duration,
    counts: Arc<Counts>,
}

impl Consumer {
    /// The consumer loop, until this generation will not consume again.
    /// Returns whether it ended at the drain timeout.
    async fn run(mut self, mut shutdown: baton::Shutdown) -> (Consumer, bool) {
        let mut periods = watch_periods(shutdown.clone());
        let claim_every =
            (self.claim_min_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
        // Our own pending list first: empty for a fresh consumer name, but
        // not after a take-back or a read whose answer was lost.
        let mut own_pending = true;
        let mut next_claim = Instant::now();
        let mut backoff = BACKOFF_FIRST;
        loop {
            if shutdown.is_draining() {
                // Nothing new is read from here on; the batch this
                // generation held is processed (the loop only gets here
                // between batches). One more look at our own pending list,
                // in case a read's answer was lost on the way.
                if let Err(Stop::Redis(e)) = self.own_pending(&shutdown).await {
                    warn!(error = %e, "cannot re-check this consumer's pending entries while draining");
                }
                // A take-back (the new generation died within the settle
                // period): consume again under the same name.
                match periods.recv().await.flatten() {
                    Some(next) => {
                        info!(consumer = %self.name, "consuming again: the new generation died within the settle period");
                        shutdown = next;
                        own_pending = true;
                        next_claim = Instant::now();
                        continue;
                    }
                    None => break,
                }
            }
            match self
                .step(&shutdown, &mut own_pending, &mut next_claim, claim_every)
                .await
            {
                Ok(()) => backoff = BACKOFF_FIRST,
                Err(Stop::Expired) => return (self, true),
                Err(Stop::Redis(e)) => {
                    warn!(error = %e, retry_in = ?backoff, "redis command failed");
                    if e.code() == Some("NOGROUP") {
                        // The stream or the group was deleted under us.
                        if let Err(e) = ensure_group(&mut self.con, &self.stream, &self.group).await
                        {
                            warn!(error = %e, "cannot create the consumer group again");
                        }
                    }
                    // A read that failed may have been delivered anyway.
                    own_pending = true;
                    tokio::select! {
                        _ = shutdown.draining() => {}
                        _ = shutdown.expired() => return (self, true),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        self.leave().await;
        (self, false)
    }

    /// One turn: own pending entries if needed, a claim pass when due, one
    /// read of new messages and their processing.
    async fn step(
        &mut self,
        shutdown: &baton::Shutdown,
        own_pending: &mut bool,
        next_claim: &mut Instant,
        claim_every: Duration,
    ) -> Result<(), Stop> {
        if *own_pending {
            self.own_pending(shutdown).await?;
            *own_pending = false;
        }
        if Instant::now() >= *next_claim {
            self.claim(shutdown).await?;
            *next_claim = Instant::now() + claim_every;
        }
        if shutdown.is_draining() {
            return Ok(());
        }
        let options = StreamReadOptions::default()
            .group(&self.group, &self.name)
            .count(BATCH)
            .block(BLOCK.as_millis() as usize);
        // Not cancelled when the drain begins (see BLOCK); only when the
        // drain timeout passes, after which nothing is processed anyway.
        let (keys, ids) = ([self.stream.as_str()], [">"]);
        let reply: Option<StreamReadReply> = tokio::select! {
            _ = shutdown.expired() => return Err(Stop::Expired),
            r = self.con.xread_options(&keys, &ids, &options) => r?,
        };
        let batch = entries(reply);
        // Processed to the end even if the drain began meanwhile: these
        // messages are ours now.
        self.process_batch(batch, Source::New, shutdown).await?;
        Ok(())
    }

    /// Processes the entries already pending for this consumer
    /// (`XREADGROUP … STREAMS <stream> 0`).
    async fn own_pending(&mut self, shutdown: &baton::Shutdown) -> Result<(), Stop> {
        let options = StreamReadOptions::default()
            .group(&self.group, &self.name)
            .count(BATCH);
        let mut after = "0".to_owned();
        loop {
            let (keys, ids) = ([self.stream.as_str()], [after.as_str()]);
            let reply: Option<StreamReadReply> = tokio::select! {
                _ = shutdown.expired() => return Err(Stop::Expired),
                r = self.con.xread_options(&keys, &ids, &options) => r?,
            };
            let batch = entries(reply);
            let Some(last) = batch.last() else {
                return Ok(());
            };
            after = last.id.clone();
            info!(consumer = %self.name, count = batch.len(), "processing this consumer's pending entries");
            self.process_batch(batch, Source::Own, shutdown).await?;
        }
    }

    /// Takes over the entries that have been pending for at least
    /// `claim_min_idle` (`XAUTOCLAIM`), whoever they were delivered to, and
    /// processes them. A live generation acknowledges its messages within
    /// milliseconds, and a draining one within the drain timeout, so an entry
    /// that idle belongs to a consumer that is gone (killed, or cut off at
    /// its drain timeout).
    async fn claim(&mut self, shutdown: &baton::Shutdown) -> Result<(), Stop> {
        let min_idle = self.claim_min_idle.as_millis() as u64;
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = tokio::select! {
                _ = shutdown.expired() => return Err(Stop::Expired),
                r = self.con.xautoclaim_options(
                    &self.stream,
                    &self.group,
                    &self.name,
                    min_idle,
                    &cursor,
                    StreamAutoClaimOptions::default().count(BATCH),
                ) => r?,
            };
            if !reply.deleted_ids.is_empty() {
                warn!(count = reply.deleted_ids.len(), "pending entries whose messages were deleted from the stream: dropped from the group");
            }
            if !reply.claimed.is_empty() {
                info!(consumer = %self.name, count = reply.claimed.len(), min_idle_ms = min_idle, "took over pending entries of a consumer that is gone");
            }
            self.process_batch(reply.claimed, Source::Claimed, shutdown)
                .await?;
            cursor = reply.next_stream_id;
            // A draining generation takes no more work.
            if cursor == "0-0" || shutdown.is_draining() {
                return Ok(());
            }
        }
    }

    async fn process_batch(
        &mut self,
        batch: Vec<StreamId>,
        source: Source,
        shutdown: &baton::Shutdown,
    ) -> Result<(), Stop> {
        let total = batch.len();
        for (i, entry) in batch.iter().enumerate() {
            if let Err(Expired) = self.process(entry, source, shutdown).await {
                let left = (total - i) as u64;
                self.counts.abandoned.fetch_add(left, Ordering::Relaxed);
                warn!(
                    consumer = %self.name,
                    left,
                    "drain timeout: messages left pending, for a later generation to claim"
                );
                return Err(Stop::Expired);
            }
        }
        Ok(())
    }

    /// Processes one message: `HINCRBY <stream>:processed <id> 1` and `XACK`
    /// in one `MULTI`/`EXEC`. Returns once that ran (or the entry is no
    /// longer ours); retries through Redis failures until the drain timeout.
    ///
    /// Because both commands run or neither does, "still pending for us" is
    /// the same as "not processed". So when an answer is lost (the `EXEC`
    /// may or may not have run), the entry's pending state says which, and
    /// the transaction is retried only if it did not run.
    async fn process(
        &mut self,
        entry: &StreamId,
        source: Source,
        shutdown: &baton::Shutdown,
    ) -> Result<(), Expired> {
        let id = entry.id.as_str();
        if entry.map.is_empty() {
            // XADD needs a field, so an entry without any is one that was
            // deleted from the stream while pending: nothing to process.
            warn!(
                id,
                "pending entry whose message was deleted: acknowledged without processing"
            );
        }
        let mut unknown = false;
        let mut backoff = BACKOFF_FIRST;
        loop {
            if shutdown.is_expired() {
                return Err(Expired);
            }
            if unknown {
                match self.pending_owner(id).await {
                    Ok(None) => {
                        // No longer pending, so processed: our EXEC ran
                        // (only its answer was lost).
                        self.count(source, shutdown.is_draining());
                        return Ok(());
                    }
                    Ok(Some(owner)) if owner == self.name => unknown = false,
                    Ok(Some(owner)) => {
                        warn!(
                            id,
                            owner, "entry was taken over by another consumer meanwhile"
                        );
                        return Ok(());
                    }
                    Err(e) => warn!(id, error = %e, "cannot check the entry's pending state"),
                }
            }
            if !unknown {
                let mut tx = redis::pipe();
                tx.atomic();
                if !entry.map.is_empty() {
                    tx.hincr(&self.processed_key, id, 1).ignore();
                }
                tx.xack(&self.stream, &self.group, &[id]);
                let result: redis::RedisResult<(u64,)> = tokio::select! {
                    _ = shutdown.expired() => return Err(Expired),
                    r = tx.query_async(&mut self.con) => r,
                };
                match result {
                    Ok((1,)) => {
                        debug!(id, "processed");
                        self.count(source, shutdown.is_draining());
                        return Ok(());
                    }
                    Ok((_,)) => {
                        // The entry was acknowledged before our EXEC: someone
                        // else processed it too (a claim that came too soon).
                        error!(id, "message processed twice: it was already acknowledged");
                        self.counts.duplicates.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Err(e) => {
                        warn!(id, error = %e, "processing transaction failed; checking whether it ran");
                        unknown = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.expired() => return Err(Expired),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Counts one processed message.
    fn count(&self, source: Source, draining: bool) {
        self.counts.processed.fetch_add(1, Ordering::Relaxed);
        if draining {
            self.counts.after_drain.fetch_add(1, Ordering::Relaxed);
        }
        let by_source = match source {
            Source::New => None,
            Source::Own => Some(&self.counts.recovered),
            Source::Claimed => Some(&self.counts.claimed),
        };
        if let Some(c) = by_source {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Which consumer holds pending entry `id`, if it is pending.
    async fn pending_owner(&mut self, id: &str) -> redis::RedisResult<Option<String>> {
        let reply: StreamPendingCountReply = self
            .con
            .xpending_count(&self.stream, &self.group, id, id, 1)
            .await?;
        Ok(reply.ids.into_iter().next().map(|p| p.consumer))
    }

    /// Removes this consumer from the group if nothing is pending for it,
    /// so the group does not keep one consumer per generation forever. (A
    /// consumer deleted with pending entries would take them along: they
    /// could never be delivered again.)
    async fn leave(&mut self) {
        let pending: redis::RedisResult<StreamPendingCountReply> = self
            .con
            .xpending_consumer_count(&self.stream, &self.group, "-", "+", 1, &self.name)
            .await;
        match pending {
            Ok(p) if p.ids.is_empty() => {
                let deleted: redis::RedisResult<u64> = self
                    .con
                    .xgroup_delconsumer(&self.stream, &self.group, &self.name)
                    .await;
                match deleted {
                    Ok(0) => debug!(consumer = %self.name, "left the group"),
                    Ok(n) => {
                        error!(consumer = %self.name, pending = n, "left the group with pending entries")
                    }
                    Err(e) => warn!(consumer = %self.name, error = %e, "cannot leave the group"),
                }
            }
            Ok(_) => {
                info!(consumer = %self.name, "entries still pending: staying in the group for a later generation to claim them")
            }
            Err(e) => {
                warn!(consumer = %self.name, error = %e, "cannot check this consumer's pending entries")
            }
        }
    }

    /// One JSON line on stdout: what this generation did.
    fn announce_drained(&self, generation: u64, expired: bool) {
        let mut v = serde_json::json!({
            "event": "drained",
            "pid": std::process::id(),
            "generation": generation,
            "consumer": self.name,
            "expired": expired,
        });
        if let (Some(obj), serde_json::Value::Object(counts)) =
            (v.as_object_mut(), self.counts.to_json())
        {
            obj.extend(counts);
        }
        info!(consumer = %self.name, counts = %self.counts.to_json(), expired, "stopped consuming");
        // Not println!: a closed stdout must not panic the drain.
        let _ = writeln!(std::io::stdout(), "{v}");
    }
}

/// Waits in [`baton::Shutdown::resumed`] from the moment each drain
/// begins, and passes on what it answers: `Some(handle)` if this generation
/// serves again, `None` once it will not.
///
/// The consumer loop cannot wait there itself: when the drain begins it is
/// still finishing its batch, and a generation takes the service back only
/// if something waits in `resumed` at the moment the new one dies. This
/// task waits from the first instant; the loop picks up the answer once
/// its batch is done.
fn watch_periods(
    mut shutdown: baton::Shutdown,
) -> tokio::sync::mpsc::Receiver<Option<baton::Shutdown>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            shutdown.draining().await;
            let next = shutdown.resumed().await;
            let again = next.clone();
            if tx.send(next).await.is_err() {
                return;
            }
            match again {
                Some(next) => shutdown = next,
                None => return,
            }
        }
    });
    rx
}

/// The entries of an `XREADGROUP` answer (`None`: nothing within `BLOCK`).
fn entries(reply: Option<StreamReadReply>) -> Vec<StreamId> {
    reply
        .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
        .unwrap_or_default()
}
