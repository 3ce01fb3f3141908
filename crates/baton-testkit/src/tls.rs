//! TLS for tests: certificates made on the spot (rcgen, ECDSA P-256), a
//! client configuration that trusts them, and blocking HTTPS requests that
//! report which certificate the server presented and whether the session
//! was resumed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use rustls;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// A certificate written as PEM files.
#[derive(Debug, Clone)]
pub struct TestCert {
    /// The chain (one self-signed certificate).
    pub cert: PathBuf,
    /// Its key (PKCS#8).
    pub key: PathBuf,
    /// The certificate, DER.
    pub der: CertificateDer<'static>,
}

/// Writes `dir/STEM.pem` and `dir/STEM.key`: a self-signed certificate for
/// `names` (replacing earlier files of that stem).
pub fn cert(dir: impl AsRef<Path>, stem: &str, names: &[&str]) -> TestCert {
    let params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    write(dir.as_ref(), stem, params)
}

/// Like [`cert`], but expired yesterday.
pub fn expired_cert(dir: impl AsRef<Path>, stem: &str, names: &[&str]) -> TestCert {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    write(dir.as_ref(), stem, params)
}

fn write(dir: &Path, stem: &str, params: rcgen::CertificateParams) -> TestCert {
    let key = rcgen::KeyPair::generate().unwrap();
    let c = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    // Written next to the final names and renamed, so a reader never sees
    // half a file.
    let tmp = dir.join(format!(".{stem}.tmp"));
    std::fs::write(&tmp, c.pem()).unwrap();
    std::fs::rename(&tmp, &cert_path).unwrap();
    std::fs::write(&tmp, key.serialize_pem()).unwrap();
    std::fs::rename(&tmp, &key_path).unwrap();
    TestCert {
        cert: cert_path,
        key: key_path,
        der: c.der().clone(),
    }
}

/// A client configuration that trusts `roots` (ALPN `http/1.1`), with
/// rustls's in-memory session store.
pub fn client(roots: &[&TestCert]) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.der.clone()).unwrap();
    }
    let mut config = ClientConfig::builder()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS stream to `addr` with handshake done, SNI `name`.
pub type Stream = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes the handshake (bounded by 5 s reads).
pub fn connect(
    addr: SocketAddr,
    name: &str,
    config: &Arc<ClientConfig>,
) -> std::io::Result<Stream> {
    let t = Duration::from_secs(5);
    let tcp = TcpStream::connect_timeout(&addr, t)?;
    tcp.set_read_timeout(Some(t))?;
    tcp.set_nodelay(true)?;
    let server = ServerName::try_from(name.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let conn = ClientConnection::new(config.clone(), server)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// What one HTTPS request saw.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: String,
    /// The end-entity certificate the server presented.
    pub cert: CertificateDer<'static>,
    /// Whether the handshake resumed an earlier session.
    pub resumed: bool,
    /// The negotiated TLS version, e.g. `TLSv1_3`.
    pub version: String,
}

/// `GET path` with `Host: name` over a new TLS connection (SNI `name`),
/// `Connection: close`.
pub fn get(addr: SocketAddr, name: &str, path: &str, config: &Arc<ClientConfig>) -> Answer {
    let mut s =
        connect(addr, name, config).unwrap_or_else(|e| panic!("TLS to {addr} ({name}): {e}"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    // A server that closes without close_notify is an error here.
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("read from {addr}: {e}"));
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        body: body.to_owned(),
        cert: s.conn.peer_certificates().unwrap()[0].clone().into_owned(),
        resumed: s.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        version: format!("{:?}", s.conn.protocol_version().unwrap()),
    }
}
