//! Take-over by an independently started process, both sides, for
//! programs that manage their own children (`baton run`). A Baton server
//! needs none of this: [`Builder::takeover`](crate::Builder::takeover) and
//! the control socket do it.
//!
//! The new process calls [`request`], starts serving on the fds of the
//! [`Offer`], then [`Offer::ready`] and [`Acked::confirm`]. The running one,
//! asked in [`control::Handler::takeover`](crate::control::Handler::takeover),
//! calls [`offer`] and [`Successor::confirm`], then stops.
//!
//! The request is `{"command":"takeover"}`; the answer is one line,
//! `{"ok":true,"generation":N,"pid":P,"fds":["name",...]}`, with the fds
//! attached in that order (every listener, then the control socket), or
//! `{"ok":false,"error":"..."}`. The connection then carries the same
//! handshake as a child's inherited socketpair (see `handoff`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, UpgradeError};
use crate::fdpass;
use crate::handoff::{self, ChildHandshake, Handover, Parent, ReadyChild};
use crate::line::MAX_LINE;

/// What the running generation handed over.
#[derive(Debug)]
pub struct Offer {
    /// This process's generation number.
    pub generation: u64,
    /// The running generation's pid.
    pub pid: u32,
    /// (name, fd) as the running generation named them: its listeners, then
    /// the control socket ([`CONTROL_FD_NAME`](crate::env::CONTROL_FD_NAME)).
    pub fds: Vec<(String, OwnedFd)>,
    /// The connection, now the handshake channel.
    pub(crate) handshake: ChildHandshake,
}

impl Offer {
    /// Reports that this process is ready (it serves on the fds) and waits
    /// for the running generation to stop accepting. `Error::Refused`: it
    /// gave up on this one; exit.
    pub async fn ready(self) -> Result<Acked, Error> {
        match self.handshake.ready(Vec::new()).await? {
            Handover::Confirm(c, totals, _) => Ok(Acked(Some(c), totals.map(Carried::from))),
            Handover::Orphaned => Ok(Acked(None, None)),
        }
    }

    /// Reports a start-up failure to the running generation, which keeps
    /// serving and logs `message`.
    pub fn fail(self, message: &str) {
        self.handshake.fail(message);
    }
}

/// The running generation stopped accepting (or died: then there is no one
/// to confirm to); this process is the service now.
#[derive(Debug)]
pub struct Acked(Option<handoff::Confirm>, Option<Carried>);

/// The counters of the service that the running generation hands to the
/// one taking over, so that they go on instead of starting at zero (see
/// [`Successor::confirm_with`] and [`Acked::carried`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// Reloads that worked.
    pub reloads_ok: u64,
    /// Reloads that failed.
    pub reloads_failed: u64,
    /// Children replaced after they died (`baton run`).
    pub child_restarts: u64,
}

impl From<crate::metrics::Totals> for Carried {
    fn from(t: crate::metrics::Totals) -> Carried {
        Carried {
            reloads_ok: t.reloads_ok,
            reloads_failed: t.reloads_failed,
            child_restarts: t.child_restarts,
        }
    }
}

impl Acked {
    /// What the previous generation counted (`None`: it sent nothing, or
    /// it is gone).
    pub fn carried(&self) -> Option<Carried> {
        self.1
    }

    /// Tells the previous generation that this one is active (pid file
    /// written, control socket served), or what went wrong.
    pub async fn confirm(self, result: Result<(), String>) {
        if let Some(c) = self.0 {
            // The link would carry `leaving`; nobody settles on it here.
            drop(c.send(result).await);
        }
    }
}

/// The running side: sends `fds` (listeners, then the control socket) to
/// the process that asked on `conn`, as generation `generation`, and waits
/// up to `timeout` until it is ready, fails or exits. On failure it has
/// been told why; this side keeps serving.
pub async fn offer(
    conn: tokio::net::UnixStream,
    generation: u64,
    fds: Vec<(String, OwnedFd)>,
    timeout: Duration,
) -> Result<Successor, UpgradeError> {
    let ready = handoff::accept_takeover(
        conn,
        handoff::TakeoverOffer {
            generation,
            fds,
            timeout,
            abort: tokio_util::sync::CancellationToken::new(),
        },
    )
    .await?;
    Ok(Successor(ready))
}

/// A process that took over and is ready: stop accepting, then
/// [`confirm`](Self::confirm).
#[derive(Debug)]
pub struct Successor(ReadyChild);

impl Successor {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.0.upgraded.pid
    }

    /// Tells it to become active and waits (up to `timeout`) for it to
    /// confirm that it is.
    pub async fn confirm(&mut self, timeout: Duration) -> Result<(), String> {
        self.0.ack(timeout, None, Default::default()).await
    }

    /// [`confirm`](Self::confirm), handing over this side's counters.
    pub async fn confirm_with(
        &mut self,
        timeout: Duration,
        carried: Carried,
    ) -> Result<(), String> {
        let totals = crate::metrics::Totals {
            reloads_ok: carried.reloads_ok,
            reloads_failed: carried.reloads_failed,
            child_restarts: carried.child_restarts,
            ..Default::default()
        };
        self.0.ack(timeout, Some(totals), Default::default()).await
    }
}

#[derive(Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    generation: Option<u64>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    fds: Vec<String>,
}

/// Asks whatever serves `socket` to hand its sockets over, waiting at most
/// `timeout` for each step of the answer. `Ok(None)`: nothing listens there
/// (no socket file, or a stale one), so this process starts on its own.
/// `Err` ([`Error::Takeover`]): something is there but did not hand over;
/// the reason says why.
///
/// ```no_run
/// # fn f() -> Result<(), baton::Error> {
/// let offer = baton::takeover::request("/run/app.sock".as_ref(), std::time::Duration::from_secs(30))?;
/// match offer {
///     Some(offer) => println!("generation {} gets {} sockets", offer.generation, offer.fds.len()),
///     None => println!("nothing to take over: bind"),
/// }
/// # Ok(()) }
/// ```
pub fn request(socket: &Path, timeout: Duration) -> Result<Option<Offer>, Error> {
    attempt(socket, timeout).map_err(|reason| Error::Takeover {
        path: socket.to_path_buf(),
        reason,
    })
}

fn attempt(socket: &Path, timeout: Duration) -> Result<Option<Offer>, String> {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            tracing::info!(socket = %socket.display(), "take-over: nothing listens on the control socket; starting on our own");
            return Ok(None);
        }
        Err(e) => return Err(format!("cannot connect: {e}")),
    };
    let io = |what: &str| {
        let what = what.to_owned();
        move |e: io::Error| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                format!("{what}: no answer within {timeout:?}")
            } else {
                format!("{what}: {e}")
            }
        }
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(io("setting up the connection"))?;
    {
        use std::io::Write as _;
        stream
            .write_all(b"{\"command\":\"takeover\"}\n")
            .map_err(io("sending the request"))?;
    }
    let (line, fds) = fdpass::recv_line(stream.as_fd(), MAX_LINE)
        .map_err(io("reading the answer"))?
        .ok_or_else(|| "the connection closed without an answer".to_owned())?;
    let answer: Answer = serde_json::from_slice(&line).map_err(|e| {
        format!(
            "unexpected answer {:?}: {e}",
            String::from_utf8_lossy(&line).trim()
        )
    })?;
    if !answer.ok {
        return Err(format!(
            "refused: {}",
            answer.error.as_deref().unwrap_or("no reason given")
        ));
    }
    // The pid in the answer, not the socket's peer credentials: those name
    // whichever generation called listen(), long gone after a take-over.
    let pid = answer
        .pid
        .ok_or_else(|| "the answer has no pid".to_owned())?;
    let pidfd = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| format!("bad pid {pid} in the answer"))
        .and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                .map_err(|e| format!("cannot watch pid {pid}: {e}"))
        })?;
    let generation = answer
        .generation
        .ok_or_else(|| "the answer has no generation".to_owned())?;
    if answer.fds.len() != fds.len() {
        return Err(format!(
            "the answer names {} sockets but {} came with it",
            answer.fds.len(),
            fds.len()
        ));
    }
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(io("setting up the handshake"))?;
    tracing::info!(
        pid,
        generation,
        sockets = fds.len(),
        "take-over: received the running generation's sockets"
    );
    let handshake = ChildHandshake {
        stream,
        real_stderr: Arc::new(Mutex::new(None)),
        parent: Arc::new(Parent::TakenOver { pid, pidfd }),
        ready_started: Arc::default(),
    };
    Ok(Some(Offer {
        generation,
        pid,
        fds: answer.fds.into_iter().zip(fds).collect(),
        handshake,
    }))
}
