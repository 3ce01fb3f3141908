//! A small upstream server for the proxy tests (`tests/proxy/`), not for
//! production: HTTP/1.1 answers naming the server, `/sleep/MS`, `/headers`
//! (the forwarding headers it received), a WebSocket echo at `/ws`, or with
//! `--tcp-echo` a plain TCP echo. Prints one JSON line when listening:
//! `{"event":"ready","pid":P,"listen":"127.0.0.1:PORT","name":NAME}`.
//!
//! The WebSocket handshake is not validated (no `Sec-WebSocket-Accept`
//! computation): the proxy passes bytes through and the tests' client does
//! not check it either.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:0".to_owned();
    let mut name = "upstream".to_owned();
    let mut tcp_echo = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            "--name" => name = args.next().unwrap_or(name),
            "--tcp-echo" => tcp_echo = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let local = listener.local_addr()?;
    println!(
        "{}",
        serde_json::json!({"event": "ready", "pid": std::process::id(), "listen": local.to_string(), "name": name})
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        tokio::spawn(async move {
            if tcp_echo {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                return;
            }
            let svc = hyper::service::service_fn(move |req| handle(req, name.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(
    mut req: Request<hyper::body::Incoming>,
    name: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/ws" {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                ws_echo(TokioIo::new(up)).await;
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = if path == "/headers" {
        let h = |n: &str| {
            req.headers()
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap_or("?").to_owned())
                .collect::<Vec<_>>()
                .join(" | ")
        };
        format!(
            "x-forwarded-for: {}\nx-forwarded-proto: {}\nforwarded: {}\nhost: {}\nconnection: {}\n",
            h("x-forwarded-for"),
            h("x-forwarded-proto"),
            h("forwarded"),
            h("host"),
            h("connection")
        )
    } else if path == "/" {
        format!("upstream {name}\n")
    } else {
        format!("upstream {name} path {path}\n")
    };
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// Echoes WebSocket frames (unmasking client frames) until a close frame,
/// which it answers.
async fn ws_echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    loop {
        let mut h = [0u8; 2];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let opcode = h[0] & 0x0f;
        let masked = h[1] & 0x80 != 0;
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            if s.read_exact(&mut b).await.is_err() {
                return;
            }
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            if s.read_exact(&mut b).await.is_err() {
                return;
            }
            len = u64::from_be_bytes(b);
        }
        let mut mask = [0u8; 4];
        if masked && s.read_exact(&mut mask).await.is_err() {
            return;
        }
        let mut payload = vec![0u8; len as usize];
        if s.read_exact(&mut payload).await.is_err() {
            return;
        }
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        let mut out = vec![0x80 | opcode];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&payload);
        if s.write_all(&out).await.is_err() || opcode == 0x8 {
            return;
        }
    }
}
