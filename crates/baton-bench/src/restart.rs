//! Carrying out one restart action and reporting how it ended.
//!
//! Nothing here returns an error: a restart that could not be carried out
//! is a measurement ([`RestartOutcome::Failed`]), and the load goes on.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Command;
use tracing::{debug, warn};

use crate::config::RestartAction;
use crate::result::RestartOutcome;

/// Most bytes of a restart command's standard error kept in the result.
const STDERR_KEEP: usize = 4096;
/// Longest control socket answer accepted.
const MAX_ANSWER: u64 = 64 * 1024;
/// How long to keep reading a finished command's stderr: a background
/// process it started may hold the pipe open forever.
const STDERR_GRACE: Duration = Duration::from_millis(200);

/// Carry out `action`, giving up after `limit`.
pub(crate) async fn execute(action: &RestartAction, limit: Duration) -> RestartOutcome {
    match action {
        RestartAction::Command { command } => run_command(command, limit).await,
        RestartAction::Signal { signal, pid_file } => {
            match tokio::time::timeout(limit, send_signal(*signal, pid_file)).await {
                Ok(outcome) => outcome,
                Err(_) => RestartOutcome::TimedOut,
            }
        }
        RestartAction::Control { socket, action } => {
            match tokio::time::timeout(limit, control(socket, action)).await {
                Ok(outcome) => outcome,
                Err(_) => RestartOutcome::TimedOut,
            }
        }
    }
}

fn failed(error: impl std::fmt::Display) -> RestartOutcome {
    RestartOutcome::Failed {
        error: error.to_string(),
    }
}

async fn run_command(command: &str, limit: Duration) -> RestartOutcome {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so that a command that outlives the timeout
        // can be killed with everything it started.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format_args!("cannot run sh -c {command:?}: {e}")),
    };
    let stderr_task = child
        .stderr
        .take()
        .map(|stderr| tokio::spawn(read_capped(stderr)));
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return failed(format_args!("waiting for the restart command: {e}")),
        Err(_) => {
            warn!(
                command,
                "restart command timed out, killing its process group"
            );
            if let Some(pid) = child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .and_then(Pid::from_raw)
            {
                let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            }
            // Reap it; SIGKILL makes this quick.
            let _ = child.kill().await;
            if let Some(task) = stderr_task {
                task.abort();
            }
            return RestartOutcome::TimedOut;
        }
    };
    let stderr = match stderr_task {
        Some(mut task) => match tokio::time::timeout(STDERR_GRACE, &mut task).await {
            Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Ok(Err(_)) => String::new(),
            Err(_) => {
                // Something it started still holds stderr open.
                task.abort();
                String::new()
            }
        },
        None => String::new(),
    };
    use std::os::unix::process::ExitStatusExt;
    debug!(command, ?status, "restart command finished");
    RestartOutcome::Exited {
        code: status.code(),
        signal: status.signal(),
        stderr,
    }
}

/// Read to EOF, keeping the first [`STDERR_KEEP`] bytes; the rest is read
/// and dropped so that the writer never blocks on a full pipe.
async fn read_capped(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = STDERR_KEEP.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}

async fn send_signal(signal: i32, pid_file: &Path) -> RestartOutcome {
    let text = match tokio::fs::read_to_string(pid_file).await {
        Ok(text) => text,
        Err(e) => {
            return failed(format_args!(
                "cannot read pid file {}: {e}",
                pid_file.display()
            ))
        }
    };
    let Some(pid) = text.trim().parse::<i32>().ok().filter(|p| *p > 0) else {
        return failed(format_args!(
            "pid file {} does not hold a pid: {:?}",
            pid_file.display(),
            text.trim()
        ));
    };
    let (Some(target), Some(sig)) = (Pid::from_raw(pid), Signal::from_named_raw(signal)) else {
        return failed(format_args!("cannot send signal {signal} to pid {pid}"));
    };
    match rustix::process::kill_process(target, sig) {
        Ok(()) => RestartOutcome::SignalSent { pid, signal },
        Err(e) => failed(format_args!("sending signal {signal} to pid {pid}: {e}")),
    }
}

async fn control(socket: &Path, action: &str) -> RestartOutcome {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            return failed(format_args!(
                "cannot connect to control socket {}: {e}",
                socket.display()
            ))
        }
    };
    let (read, mut write) = stream.into_split();
    let mut request = serde_json::json!({ "command": action }).to_string();
    request.push('\n');
    if let Err(e) = write.write_all(request.as_bytes()).await {
        return failed(format_args!("writing to control socket: {e}"));
    }
    // The answer comes when the outcome is known, which may take seconds.
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_ANSWER));
    match reader.read_line(&mut line).await {
        Ok(0) => return failed("control socket closed without answering"),
        Ok(_) => {}
        Err(e) => return failed(format_args!("reading from control socket: {e}")),
    }
    if !line.ends_with('\n') {
        return failed("control socket answer is incomplete or too long");
    }
    let response: serde_json::Value = match serde_json::from_str(line.trim_end()) {
        Ok(v) => v,
        Err(e) => return failed(format_args!("control socket answer is not JSON: {e}")),
    };
    let Some(ok) = response.get("ok").and_then(serde_json::Value::as_bool) else {
        return failed(format_args!(
            "control socket answer has no boolean \"ok\": {response}"
        ));
    };
    let error = response
        .get("error")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    RestartOutcome::Control {
        ok,
        error,
        response,
    }
}
