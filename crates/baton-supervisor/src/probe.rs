//! Readiness probes: sd_notify datagrams, TCP connects, HTTP GETs.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram};

/// How often a failed probe is retried.
const RETRY: Duration = Duration::from_millis(20);

/// Replaces `{VAR}` with the child's value of VAR.
pub(crate) fn substitute(template: &str, vars: &HashMap<String, String>) -> String {
    let mut out = template.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// Waits for a datagram carrying `READY=1`. A child that reports `ERRNO=`
/// or `STATUS=` before it is ready has that included in the error.
pub(crate) async fn notify(sock: &UnixDatagram) -> Result<(), String> {
    let mut buf = vec![0u8; 4096];
    let mut status = None;
    loop {
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| format!("notify socket: {e}"))?;
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        for line in msg.lines() {
            if line == "READY=1" {
                return Ok(());
            }
            if let Some(s) = line.strip_prefix("STATUS=") {
                status = Some(s.to_owned());
            }
            if let Some(e) = line.strip_prefix("ERRNO=") {
                return Err(format!(
                    "it reported ERRNO={e}{}",
                    status
                        .as_deref()
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default()
                ));
            }
        }
    }
}

/// Connects until the address accepts.
pub(crate) async fn tcp(addr: &str) {
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// GETs the URL until it answers with a status below 500.
pub(crate) async fn http(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs can be probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    loop {
        if let Ok(Some(status)) = get_status(authority, path).await {
            if status < 500 {
                return Ok(());
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn get_status(authority: &str, path: &str) -> std::io::Result<Option<u16>> {
    let mut s = TcpStream::connect(authority).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    Ok(line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_port_variables() {
        let vars = HashMap::from([("PORT".to_owned(), "4242".to_owned())]);
        assert_eq!(
            substitute("http://127.0.0.1:{PORT}/health", &vars),
            "http://127.0.0.1:4242/health"
        );
        assert_eq!(substitute("127.0.0.1:{OTHER}", &vars), "127.0.0.1:{OTHER}");
    }

    #[tokio::test]
    async fn notify_waits_for_ready_and_reports_errno() {
        let dir = std::env::temp_dir().join(format!("baton-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"STATUS=loading", &path).unwrap();
        client.send_to(b"MAINPID=1\nREADY=1", &path).unwrap();
        notify(&sock).await.unwrap();
        client
            .send_to(b"STATUS=no database\nERRNO=5", &path)
            .unwrap();
        let err = notify(&sock).await.unwrap_err();
        assert!(
            err.contains("ERRNO=5") && err.contains("no database"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
