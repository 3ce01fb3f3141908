//! The control socket: one JSON object per line, in each direction.
//!
//! Requests: `{"command":"upgrade"}` (optionally `"binary":"PATH"`),
//! `{"command":"reload"}`, `{"command":"status"}`, `{"command":"stop"}`,
//! and `{"command":"takeover"}` from a process that takes over.
//! Each is answered with exactly one line, once the outcome is known, with
//! `"ok":true` and command-specific fields, or `"ok":false` and `"error"`.
//! The full protocol is in `docs/CONTROL.md`.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::error::LineError;
use crate::line::{self, MAX_LINE};
use crate::{Baton, Shutdown};

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Start the next generation; answered once it is ready or has failed.
    Upgrade {
        /// Binary to start instead of the current one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<PathBuf>,
    },
    /// Reload the configuration in-process.
    Reload {},
    /// Describe this generation.
    Status {},
    /// Stop gracefully (drain, then exit).
    Stop {},
    /// Hand every listener and the control socket over to the asking
    /// process (with `SCM_RIGHTS`), then run the readiness handshake with it
    /// on the same connection; see `docs/HANDOFF.md`.
    Takeover {},
}

/// The answer to an `upgrade` that worked (and to `baton run`'s `reload`,
/// which starts a new child): `{"ok":true,"pid":P,"generation":G,"elapsed_ms":T}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeAnswer {
    /// True.
    pub ok: bool,
    /// The new generation's (or child's) pid.
    pub pid: u32,
    /// Its generation number.
    pub generation: u64,
    /// From the request to its readiness, in milliseconds.
    pub elapsed_ms: f64,
}

/// The answer to a Baton server's `reload` that worked: `{"ok":true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadAnswer {
    /// True.
    pub ok: bool,
}

/// The answer to `stop`: `{"ok":true,"pid":P}`, at once; the process
/// then drains and exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopAnswer {
    /// True.
    pub ok: bool,
    /// The pid that stops (a Baton server's, or `baton run`'s own).
    pub pid: u32,
}

/// Every failure: `{"ok":false,"error":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// False.
    pub ok: bool,
    /// Why, for a person.
    pub error: String,
}

/// An answer as the JSON value sent on the wire.
pub fn answer<T: Serialize>(a: &T) -> Value {
    serde_json::to_value(a).unwrap_or_else(|e| json!({"ok": false, "error": e.to_string()}))
}

/// `{"ok":false,"error":error}`.
pub fn failure(error: impl Into<String>) -> Value {
    answer(&ErrorAnswer {
        ok: false,
        error: error.into(),
    })
}

/// The answer to `{"command":"status"}`: the same type for a Baton server
/// and for `baton run`, so that tools read one shape. What only one kind of
/// server has (the proxy's `proxy` section, `baton run`'s supervisor pid and
/// restarts, an application's own fields) is in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// True (a failure is `{"ok":false,"error":…}`).
    pub ok: bool,
    /// The serving process: this generation (a Baton server), or the
    /// current child (`baton run`; `None` while none runs).
    pub pid: Option<u32>,
    /// Its generation number.
    pub generation: Option<u64>,
    /// `starting`, `active`, `draining` or `stopped`.
    pub state: String,
    /// How long the serving process has been up, in milliseconds.
    pub uptime_ms: Option<f64>,
    /// When it started, Unix time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_unix_ms: Option<f64>,
    /// The binary the next upgrade starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// An upgrade (for `baton run`: a reload, which starts a new child) is
    /// in flight.
    pub upgrade_in_progress: bool,
    /// The listening sockets.
    pub listeners: Vec<ListenerStatus>,
    /// The last upgrade or take-over, once there was one.
    pub last_upgrade: Option<Outcome>,
    /// The last reload, once there was one.
    pub last_reload: Option<Outcome>,
    /// Earlier generations (for `baton run`: old children) still finishing
    /// what they had when they were replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<DrainingGeneration>,
    /// Everything else, by name.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// One listener in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Its name (`LISTEN_FDNAMES`).
    pub name: String,
    /// `tcp`, `udp` or `unix`.
    pub kind: String,
    /// The bound address or path.
    pub address: String,
    /// Whether this generation inherited it (a Baton server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inherited: Option<bool>,
    /// `baton run --port-env`: the variable of the child's own port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_env: Option<String>,
    /// Connections open on it now, where the server counts them (`baton
    /// proxy`, servers that record through
    /// [`RequestMetrics::connection`](crate::RequestMetrics::connection),
    /// `baton run --http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
}

/// An earlier generation that is still draining, in [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainingGeneration {
    /// Its generation number.
    pub generation: u64,
    /// Its pid.
    pub pid: u32,
}

/// How an upgrade, take-over or reload ended, in [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Whether it worked.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `upgrade` or `take-over` (upgrades only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The new generation's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The new generation's number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// How long it took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<f64>,
    /// When it ended, Unix time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_unix_ms: Option<f64>,
    /// The new generation died within the settle period and this one took
    /// the service back (true), or could not (false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_back: Option<bool>,
}

/// How long the server waits for a complete request line: from the
/// connection (or the previous answer) to the newline. A client that sends
/// nothing, or part of a line, for this long is disconnected. It bounds only
/// the reading of a request, never the wait for its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest answer line [`request`] accepts.
pub const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Answers control requests. [`Baton`] implements it; so can any program
/// that wants to speak the same protocol (`baton run` does).
pub trait Handler: Clone + Send + Sync + 'static {
    /// Carries out one request and returns the answer (an object with
    /// `"ok"`), once the outcome is known.
    fn handle(&self, request: Request) -> impl std::future::Future<Output = Value> + Send;

    /// Answers `{"command":"takeover"}`, which needs the connection itself:
    /// the sockets go over it and the handshake follows on it. The default
    /// refuses with an `"ok":false` line.
    fn takeover(&self, conn: UnixStream) -> impl std::future::Future<Output = ()> + Send {
        refuse(conn, "this server does not support take-over".to_owned())
    }
}

/// What [`Handler::handle`] answers to a [`Request::Takeover`] that reached
/// it: [`serve`] gives take-overs to [`Handler::takeover`] instead.
pub const TAKEOVER_ELSEWHERE: &str =
    "a take-over is answered on its own connection (control::Handler::takeover)";

/// Answers a take-over request with `{"ok":false,"error":reason}`.
pub async fn refuse(mut conn: UnixStream, reason: String) {
    let _ = conn.write_all(&line(&failure(reason))).await;
}

impl Handler for Baton {
    async fn handle(&self, request: Request) -> Value {
        Baton::handle(self, request).await
    }

    async fn takeover(&self, conn: UnixStream) {
        self.take_over(conn).await;
    }
}

/// Runs the control server on `listener` until `shutdown` starts draining.
/// Peers with another uid than ours are refused (`SO_PEERCRED`). Each
/// connection may send several requests; once draining begins, the answer
/// in progress, or to a request that arrives within 200 ms, is the last.
pub async fn serve<H: Handler>(listener: UnixListener, handler: H, shutdown: Shutdown) {
    let my_uid = rustix::process::getuid().as_raw();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.draining() => break,
            a = listener.accept() => a,
        };
        let Some((stream, _)) = crate::accept::accepted(accepted, "control socket").await else {
            continue;
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == my_uid => {}
            Ok(cred) => {
                tracing::warn!(
                    peer_uid = cred.uid(),
                    "control socket: refused a peer with another uid"
                );
                let mut stream = stream;
                let _ = stream
                    .write_all(&line(&failure(format!(
                        "permission denied: uid {} is not the server's uid {my_uid}",
                        cred.uid()
                    ))))
                    .await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: cannot read peer credentials");
                continue;
            }
        }
        let (h, s) = (handler.clone(), shutdown.clone());
        shutdown.spawn(async move { connection(h, stream, s).await });
    }
    // Dropping the listener here closes this process's control fd; for a
    // Baton server the socket itself lives on in the next generation.
}

async fn connection<H: Handler>(handler: H, stream: UnixStream, shutdown: Shutdown) {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut buf = Vec::new();
    let mut last = false;
    loop {
        let read = tokio::select! {
            biased;
            r = line::read_line(&mut reader, &mut buf, MAX_LINE, Some(REQUEST_TIMEOUT)) => r,
            _ = shutdown.draining() => {
                // A request already on its way (the connection was accepted
                // just before draining began) is still answered, by this
                // generation; then the connection closes.
                last = true;
                match tokio::time::timeout(
                    DRAINING_GRACE,
                    line::read_line(&mut reader, &mut buf, MAX_LINE, None),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => break,
                }
            }
        };
        let refusal = match read {
            Ok(true) => None,
            Ok(false) | Err(LineError::Io(_)) => break,
            // Silent and idle: nothing to answer, just let the task go.
            Err(LineError::Timeout(_)) if buf.is_empty() => break,
            Err(e @ (LineError::TooLong { .. } | LineError::Timeout(_))) => {
                Some(format!("bad request: {e}"))
            }
        };
        if let Some(error) = refusal {
            tracing::warn!(
                error,
                "control socket: request refused, closing the connection"
            );
            let _ = w.write_all(&line(&failure(error))).await;
            break;
        }
        let answer = match std::str::from_utf8(&buf) {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => match serde_json::from_str::<Request>(text.trim()) {
                Ok(Request::Takeover {}) => {
                    tracing::info!("control request: takeover");
                    let pending = reader.buffer().len();
                    match reader.into_inner().reunite(w) {
                        Ok(conn) if pending == 0 => handler.takeover(conn).await,
                        Ok(conn) => refuse(
                            conn,
                            "bad request: nothing may follow a takeover request before its answer"
                                .to_owned(),
                        )
                        .await,
                        Err(_) => {}
                    }
                    return;
                }
                Ok(req) => {
                    tracing::info!(request = ?req, "control request");
                    handler.handle(req).await
                }
                Err(e) => failure(format!("bad request: {e}")),
            },
            Err(e) => failure(format!("bad request: not UTF-8: {e}")),
        };
        if w.write_all(&line(&answer)).await.is_err() || last {
            break;
        }
    }
}

/// How long a connection open when draining begins may take to deliver the
/// request it is sending.
const DRAINING_GRACE: Duration = Duration::from_millis(200);

fn line(v: &Value) -> Vec<u8> {
    let mut out = v.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// Binds a control socket at `path` with mode 0600 (creating the parent
/// directory). A stale socket file is replaced; one in use is an error.
pub fn bind(path: &Path) -> io::Result<OwnedFd> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let sock = crate::listeners::bind_unix(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(sock.into())
}

/// Sends one request to a control socket and returns the answer line as
/// JSON. Waits as long as the server takes (an upgrade answers only once the
/// new generation is ready or has failed); bound it with a timeout if needed.
/// An answer longer than [`MAX_ANSWER`] is an `InvalidData` error.
///
/// ```no_run
/// # async fn f() -> std::io::Result<()> {
/// let answer = baton::control::request("/run/app.sock".as_ref(), &baton::control::Request::Status {}).await?;
/// println!("generation {}", answer["generation"]);
/// # Ok(()) }
/// ```
pub async fn request(socket: &Path, req: &Request) -> io::Result<Value> {
    let stream = UnixStream::connect(socket).await?;
    let (r, mut w) = stream.into_split();
    let mut body = serde_json::to_vec(req).map_err(io::Error::other)?;
    body.push(b'\n');
    w.write_all(&body).await?;
    let mut reader = BufReader::new(r);
    let mut answer = Vec::new();
    // The time is the caller's to bound: an upgrade may take minutes.
    if !line::read_line(&mut reader, &mut answer, MAX_ANSWER, None).await? {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "control socket closed without answering",
        ));
    }
    serde_json::from_slice(&answer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Echo;
    impl Handler for Echo {
        async fn handle(&self, request: Request) -> Value {
            json!({"ok": true, "request": format!("{request:?}")})
        }
    }

    #[tokio::test]
    async fn a_request_sent_just_as_draining_begins_is_still_answered() {
        let dir = std::env::temp_dir().join(format!("baton-control-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let _ = std::fs::remove_file(&path);
        let std = std::os::unix::net::UnixListener::from(bind(&path).unwrap());
        std.set_nonblocking(true).unwrap();
        let listener = UnixListener::from_std(std).unwrap();
        let drain = crate::Drain::new(Duration::from_secs(1));
        let server = tokio::spawn(serve(listener, Echo, drain.handle()));
        let c = UnixStream::connect(&path).await.unwrap();
        let (r, mut w) = c.into_split();
        let mut r = BufReader::new(r);
        // One answer: the connection is accepted and waits for the next
        // request.
        w.write_all(b"{\"command\":\"reload\"}\n").await.unwrap();
        let mut first = Vec::new();
        assert!(line::read_line(&mut r, &mut first, MAX_LINE, None)
            .await
            .unwrap());
        drain.start();
        // The accept loop has seen the drain (and, on this one-thread
        // runtime, so has the connection's task, woken with it).
        server.await.unwrap();
        w.write_all(b"{\"command\":\"status\"}\n").await.unwrap();
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut r, &mut answer)
            .await
            .unwrap();
        assert!(answer.contains("Status"), "{answer:?}");
        // And the connection closed after it.
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_status_example_in_control_md_is_a_status() {
        let doc = include_str!("../../../docs/CONTROL.md");
        let section = doc.split("## Status").nth(1).unwrap();
        let json = section.split("```json").nth(1).unwrap();
        let json = json.split("```").next().unwrap();
        let status: Status = serde_json::from_str(json).unwrap();
        assert_eq!(status.state, "active");
        assert_eq!(status.listeners[0].inherited, Some(true));
        assert_eq!(status.last_reload.as_ref().map(|o| o.ok), Some(true));
        assert!(
            status.extra.is_empty(),
            "undocumented fields: {:?}",
            status.extra
        );
        // And back: nothing is lost or renamed.
        let again: Value = serde_json::to_value(&status).unwrap();
        let original: Value = serde_json::from_str(json).unwrap();
        assert_eq!(again, original);
    }

    #[test]
    fn answers_have_the_documented_shapes() {
        let up = UpgradeAnswer {
            ok: true,
            pid: 4242,
            generation: 3,
            elapsed_ms: 12.5,
        };
        assert_eq!(
            answer(&up).to_string(),
            r#"{"elapsed_ms":12.5,"generation":3,"ok":true,"pid":4242}"#
        );
        assert_eq!(
            answer(&ReloadAnswer { ok: true }).to_string(),
            r#"{"ok":true}"#
        );
        assert_eq!(
            answer(&StopAnswer { ok: true, pid: 7 }).to_string(),
            r#"{"ok":true,"pid":7}"#
        );
        assert_eq!(failure("no").to_string(), r#"{"error":"no","ok":false}"#);
        let back: UpgradeAnswer = serde_json::from_value(answer(&up)).unwrap();
        assert_eq!(back, up);
    }

    #[test]
    fn request_wire_format() {
        let up: Request = serde_json::from_str(r#"{"command":"upgrade"}"#).unwrap();
        assert_eq!(up, Request::Upgrade { binary: None });
        let up: Request =
            serde_json::from_str(r#"{"command":"upgrade","binary":"/usr/bin/x"}"#).unwrap();
        assert_eq!(
            up,
            Request::Upgrade {
                binary: Some("/usr/bin/x".into())
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Status {}).unwrap(),
            r#"{"command":"status"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"command":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"command":"reload","x":1}"#).is_err());
    }
}
