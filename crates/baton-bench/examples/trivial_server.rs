//! A trivial keep-alive HTTP/1.1 server for measuring the load generator.
//!
//! `cargo run --release -p baton-bench --example trivial_server -- 127.0.0.1:8089`
//!
//! One thread (a current-thread runtime); answers every request with
//! `200 OK` and a 2-byte body, honouring `Connection: close`. Not a real
//! HTTP server: it assumes requests without bodies.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8089".to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind(&addr).await.unwrap();
        eprintln!("listening on http://{}/", listener.local_addr().unwrap());
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                let mut out = Vec::with_capacity(4096);
                loop {
                    match s.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                    // Answer every complete request head in the buffer.
                    let mut close = false;
                    let mut start = 0;
                    while let Some(pos) = buf[start..len].windows(4).position(|w| w == b"\r\n\r\n")
                    {
                        let head = &buf[start..start + pos];
                        close |= head
                            .windows(17)
                            .any(|w| w.eq_ignore_ascii_case(b"connection: close"));
                        out.extend_from_slice(RESPONSE);
                        start += pos + 4;
                    }
                    buf.copy_within(start..len, 0);
                    len -= start;
                    if len == buf.len() {
                        return;
                    }
                    if !out.is_empty() {
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
}
