//! Connection migration: an old generation hands live connections (the fd
//! and the application's state for it) to the next one over the handshake
//! channel, instead of draining them.
//!
//! Negotiated in the handshake: the new generation's `ready` lists the
//! listeners whose connections it takes (`"migrate":["echo"]`); an old
//! binary ignores the field and drains as before, and a new binary that
//! lists nothing gets nothing. Once the new generation is active, the old
//! one sends, for each connection, one line
//! `{"event":"conn","id":N,"listener":"echo","kind":"tcp","state":LEN,"deadline_us":T}`
//! followed by `LEN` bytes of application state, with the connection's fd
//! attached to the line's first byte. The new one adopts it and answers
//! `{"event":"adopted","id":N}`, or `{"event":"refused","id":N,"message":"…"}`
//! (no receiver, or past the deadline, `CLOCK_MONOTONIC` microseconds). The
//! old side closes its copy only on `adopted`; on anything else (refused,
//! no answer by the deadline, the channel closed) it keeps the connection
//! and the application drains it as without migration. Nothing is read from
//! the connection while it is in flight, so no byte is lost or duplicated.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::BufReader;
use tokio::sync::{mpsc, oneshot, watch};

use crate::fdpass;
use crate::line::{self, MAX_LINE};
use crate::sync::lock;
use crate::sys;

/// How long the new generation has to adopt a connection.
const ADOPT_WITHIN: Duration = Duration::from_secs(5);
/// How much longer the old side waits for the answer: an adoption that
/// made the deadline is acknowledged well within it.
const ANSWER_MARGIN: Duration = Duration::from_secs(1);
/// Most application state that travels with one connection.
pub const MAX_STATE: usize = 1024 * 1024;
/// Queue of migrated connections per listener on the receiving side; one
/// that finds it full is refused (and drained by the old generation).
const QUEUE: usize = 4096;

/// A connection that can move to the next generation.
#[derive(Debug)]
#[non_exhaustive]
pub enum Connection {
    /// From a TCP listener.
    Tcp(tokio::net::TcpStream),
    /// From a Unix listener.
    Unix(tokio::net::UnixStream),
    /// A client connection from a TCP listener together with the
    /// connection a proxy opened for it (a WebSocket or TCP pass-through):
    /// both fds travel in one message.
    TcpPair {
        /// The client's connection.
        client: tokio::net::TcpStream,
        /// The upstream connection.
        upstream: tokio::net::TcpStream,
    },
}

fn tcp_of(fd: OwnedFd) -> io::Result<tokio::net::TcpStream> {
    let s = std::net::TcpStream::from(fd);
    s.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(s)
}

impl Connection {
    fn kind(&self) -> &'static str {
        match self {
            Connection::Tcp(_) => "tcp",
            Connection::Unix(_) => "unix",
            Connection::TcpPair { .. } => "tcp-pair",
        }
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            Connection::Tcp(s) => vec![s.as_fd()],
            Connection::Unix(s) => vec![s.as_fd()],
            Connection::TcpPair { client, upstream } => vec![client.as_fd(), upstream.as_fd()],
        }
    }

    /// How many fds a connection of `kind` comes with (`None`: unknown).
    fn fd_count(kind: &str) -> Option<usize> {
        match kind {
            "tcp" | "unix" => Some(1),
            "tcp-pair" => Some(2),
            _ => None,
        }
    }

    fn adopt(kind: &str, mut fds: Vec<OwnedFd>) -> io::Result<Connection> {
        let wrong = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("connection kind {kind:?} with the wrong fds"),
            )
        };
        match (kind, fds.len()) {
            ("tcp", 1) => Ok(Connection::Tcp(tcp_of(fds.remove(0))?)),
            ("unix", 1) => {
                let s = std::os::unix::net::UnixStream::from(fds.remove(0));
                s.set_nonblocking(true)?;
                Ok(Connection::Unix(tokio::net::UnixStream::from_std(s)?))
            }
            ("tcp-pair", 2) => {
                let upstream = tcp_of(fds.remove(1))?;
                let client = tcp_of(fds.remove(0))?;
                Ok(Connection::TcpPair { client, upstream })
            }
            ("tcp" | "unix" | "tcp-pair", _) => Err(wrong()),
            (other, _) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown connection kind {other:?}"),
            )),
        }
    }
}

/// A connection the previous generation handed over, with the state the
/// application gave it (bytes read but not consumed, a protocol position).
#[derive(Debug)]
pub struct Migrated {
    /// The connection, ready to serve.
    pub connection: Connection,
    /// The application's state for it.
    pub state: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Wire {
    Conn {
        id: u64,
        listener: String,
        kind: String,
        state: usize,
        deadline_us: u64,
    },
    Adopted {
        id: u64,
    },
    Refused {
        id: u64,
        message: String,
    },
    Leaving,
}

fn line_of(w: &Wire) -> Vec<u8> {
    let mut v = serde_json::to_vec(w).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    v
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<(), String>>>>;

/// The old generation's side, once the new one is active.
#[derive(Debug)]
pub(crate) struct Outgoing {
    writer: tokio::sync::Mutex<tokio::net::UnixStream>,
    takes: Vec<String>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    /// True once the new generation said `leaving`.
    left: watch::Receiver<bool>,
    /// True once the channel closed.
    closed: watch::Receiver<bool>,
}

impl Outgoing {
    /// Starts reading the new generation's answers on `reader`; writes go
    /// through a duplicate of the same socket.
    pub(crate) fn start(
        reader: BufReader<tokio::net::UnixStream>,
        takes: Vec<String>,
    ) -> io::Result<Arc<Outgoing>> {
        let dup = reader.get_ref().as_fd().try_clone_to_owned()?;
        let std = std::os::unix::net::UnixStream::from(dup);
        std.set_nonblocking(true)?;
        let writer = tokio::net::UnixStream::from_std(std)?;
        let pending: Arc<Pending> = Arc::default();
        let (left_tx, left) = watch::channel(false);
        let (closed_tx, closed) = watch::channel(false);
        let answers = pending.clone();
        tokio::spawn(async move {
            let mut reader = reader;
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match line::read_line(&mut reader, &mut buf, MAX_LINE, None).await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => break,
                }
                let answer = match serde_json::from_slice::<Wire>(&buf) {
                    Ok(Wire::Adopted { id }) => Some((id, Ok(()))),
                    Ok(Wire::Refused { id, message }) => Some((id, Err(message))),
                    Ok(Wire::Leaving) => {
                        left_tx.send_replace(true);
                        None
                    }
                    _ => None,
                };
                if let Some((id, result)) = answer {
                    if let Some(tx) = lock(&answers).remove(&id) {
                        let _ = tx.send(result);
                    }
                }
            }
            closed_tx.send_replace(true);
            // Whatever is still waiting stays with the old generation.
            lock(&answers).clear();
        });
        Ok(Arc::new(Outgoing {
            writer: tokio::sync::Mutex::new(writer),
            takes,
            pending,
            next_id: AtomicU64::new(1),
            left,
            closed,
        }))
    }

    /// Resolves once the new generation said it stops or hands over on
    /// purpose (never, if the channel closes without it).
    pub(crate) async fn left(&self) {
        let mut left = self.left.clone();
        if left.wait_for(|l| *l).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Hands `conn` over; `Ok` once the new generation adopted it.
    pub(crate) async fn send(
        &self,
        listener: &str,
        conn: &Connection,
        state: &[u8],
    ) -> Result<(), String> {
        if !self.takes.iter().any(|t| t == listener) {
            return Err(format!(
                "the new generation takes no connections of listener {listener:?}"
            ));
        }
        if *self.closed.borrow() {
            return Err("the channel to the new generation is closed".to_owned());
        }
        if state.len() > MAX_STATE {
            return Err(format!(
                "state of {} bytes; at most {MAX_STATE}",
                state.len()
            ));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let header = Wire::Conn {
            id,
            listener: listener.to_owned(),
            kind: conn.kind().to_owned(),
            state: state.len(),
            deadline_us: sys::monotonic_usec() + ADOPT_WITHIN.as_micros() as u64,
        };
        let mut frame = line_of(&header);
        frame.extend_from_slice(state);
        let sent = {
            let writer = self.writer.lock().await;
            fdpass::send_all(&writer, &frame, &conn.fds()).await
        };
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            return Err(format!("sending it: {e}"));
        }
        match tokio::time::timeout(ADOPT_WITHIN + ANSWER_MARGIN, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the channel to the new generation closed".to_owned()),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(format!("not adopted within {ADOPT_WITHIN:?}"))
            }
        }
    }
}

/// The new generation's receivers, by listener name.
pub(crate) type Receivers = HashMap<String, mpsc::Sender<Migrated>>;

/// A receiver for migrated connections of one listener.
pub(crate) fn channel() -> (mpsc::Sender<Migrated>, mpsc::Receiver<Migrated>) {
    mpsc::channel(QUEUE)
}

/// The new generation's side: reads connections off the channel until it
/// closes, hands each to its listener's receiver, and answers.
pub(crate) async fn receive(stream: Arc<tokio::net::UnixStream>, receivers: Receivers) {
    let mut buf: Vec<u8> = Vec::new();
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Every complete message in the buffer first.
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let header = serde_json::from_slice::<Wire>(&buf[..end]);
            let Ok(Wire::Conn {
                id,
                listener,
                kind,
                state,
                deadline_us,
            }) = header
            else {
                // Not for us (or garbled): skip the line.
                buf.drain(..=end);
                continue;
            };
            if state > MAX_STATE {
                tracing::warn!(
                    state,
                    "migrated connection with too much state; closing the channel"
                );
                return;
            }
            if buf.len() < end + 1 + state {
                break;
            }
            let body = buf[end + 1..end + 1 + state].to_vec();
            buf.drain(..end + 1 + state);
            // Its fds came with the line's first byte, after those of the
            // messages before it.
            let wanted = Connection::fd_count(&kind).unwrap_or(1);
            let mine: Vec<OwnedFd> = (0..wanted).filter_map(|_| fds.pop_front()).collect();
            let answer = adopt(&receivers, mine, &listener, &kind, body, deadline_us);
            let line = match answer {
                Ok(()) => line_of(&Wire::Adopted { id }),
                Err(message) => {
                    tracing::warn!(id, listener, message, "refused a migrated connection");
                    line_of(&Wire::Refused { id, message })
                }
            };
            if write_all(&stream, &line).await.is_err() {
                return;
            }
        }
        if buf.len() > MAX_LINE + MAX_STATE {
            tracing::warn!("migration channel: message too long; closing it");
            return;
        }
        let mut got = Vec::new();
        let read = stream
            .async_io(tokio::io::Interest::READABLE, || {
                fdpass::recv(stream.as_fd(), &mut chunk, &mut got)
            })
            .await;
        fds.extend(got);
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn adopt(
    receivers: &Receivers,
    fds: Vec<OwnedFd>,
    listener: &str,
    kind: &str,
    state: Vec<u8>,
    deadline_us: u64,
) -> Result<(), String> {
    if fds.is_empty() {
        return Err("no fd came with it".to_owned());
    }
    if sys::monotonic_usec() > deadline_us {
        return Err("past its deadline".to_owned());
    }
    let tx = receivers
        .get(listener)
        .ok_or_else(|| format!("no receiver for listener {listener:?}"))?;
    let connection = Connection::adopt(kind, fds).map_err(|e| e.to_string())?;
    tx.try_send(Migrated { connection, state })
        .map_err(|e| format!("the application does not take it: {e}"))
}

async fn write_all(stream: &tokio::net::UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
