//! Take-over by an independently started process, its side: ask the
//! running generation's control socket for its sockets.
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

use crate::fdpass;
use crate::handoff::{ChildHandshake, Parent};
use crate::line::MAX_LINE;

/// What the running generation handed over.
pub(crate) struct Offered {
    /// This process's generation number.
    pub generation: u64,
    /// (name, fd) as the running generation named them.
    pub fds: Vec<(String, OwnedFd)>,
    /// The connection, now the handshake channel.
    pub handshake: ChildHandshake,
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
/// `Err`: something is there but did not hand over; the reason says why.
pub(crate) fn request(socket: &Path, timeout: Duration) -> Result<Option<Offered>, String> {
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
    Ok(Some(Offered {
        generation,
        fds: answer.fds.into_iter().zip(fds).collect(),
        handshake,
    }))
}
