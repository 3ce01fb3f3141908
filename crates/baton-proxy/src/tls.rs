//! TLS files of a configuration: the certificates of `https` listeners and
//! the CA certificates that upstreams with `tls = true` are verified
//! against. Read and checked as a whole, at start, by `baton check` and by
//! every reload, with each problem reported at the entry in the
//! configuration file that names the file.

use std::collections::HashMap;
use std::sync::Arc;

use baton::tls::{Acceptor, Certificate, Certificates, Options, Tickets, TlsError, Versions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::config::{
    Config, ConfigError, ListenerConfig, Problem, TlsSettings, TlsVersion, UpstreamConfig,
};

/// The TLS material of a configuration: certificates of every `https`
/// listener, by listener name, and the client side of every upstream with
/// `tls = true`, by upstream name.
#[derive(Debug, Default)]
pub struct Material {
    by_listener: HashMap<String, Certificates>,
    pub(crate) upstreams: HashMap<String, Arc<UpstreamTls>>,
}

impl Material {
    /// Listener `name`'s certificates.
    pub(crate) fn take(&mut self, name: &str) -> Option<Certificates> {
        self.by_listener.remove(name)
    }
}

/// How the proxy speaks TLS to one upstream's servers: TLS 1.2 and 1.3,
/// ALPN `http/1.1`, certificates verified against the upstream's CA file or
/// the system's store, for `server_name` (else each server's IP address).
pub(crate) struct UpstreamTls {
    connector: tokio_rustls::TlsConnector,
    name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// The TLS handshake over `tcp`, verifying the server's certificate.
    pub(crate) async fn connect(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => ServerName::IpAddress(tcp.peer_addr()?.ip().into()),
        };
        self.connector.connect(name, tcp).await
    }
}

/// The client side of upstream `u` (one with `tls`).
fn upstream(u: &UpstreamConfig) -> Result<Option<UpstreamTls>, String> {
    let Some(tls) = &u.tls else { return Ok(None) };
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            let p = path.display();
            let pem = std::fs::read(path).map_err(|e| format!("{p}: cannot read: {e}"))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{p}: not PEM certificates: {e}"))?;
            if certs.is_empty() {
                return Err(format!("{p}: no CERTIFICATE in the file"));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{p}: unusable CA certificate: {e}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(
                    "no ca_file, and no CA certificates found in the system's store; set ca_file"
                        .to_owned(),
                );
            }
        }
    }
    let name = match &tls.server_name {
        Some(n) => {
            Some(ServerName::try_from(n.clone()).map_err(|e| format!("server_name {n:?}: {e}"))?)
        }
        None => None,
    };
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        name,
    }))
}

/// Reads every certificate and key of `config`'s `https` listeners, and
/// the CA certificates of its upstreams with `tls = true`. Every
/// problem (a file that cannot be read or parsed, a key that is not its
/// certificate's, a DNS name two certificates of a listener share) is an
/// error `FILE:LINE:COL: …` at the entry, naming the file that is wrong;
/// an expired certificate is only a warning (returned beside).
pub fn load(config: &Config) -> Result<(Material, Vec<Problem>), ConfigError> {
    let mut material = Material::default();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        if let Some(set) = listener(l, tls, &mut problems, &mut warnings) {
            material.by_listener.insert(l.name.clone(), set);
        }
    }
    for u in config.upstreams.values() {
        match upstream(u) {
            Ok(Some(t)) => {
                material.upstreams.insert(u.name.clone(), Arc::new(t));
            }
            Ok(None) => {}
            Err(e) => {
                if let Some(tls) = &u.tls {
                    problems.push(tls.at.problem(format!("upstream {:?}: {e}", u.name)));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok((material, warnings))
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

fn listener(
    l: &ListenerConfig,
    tls: &TlsSettings,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Option<Certificates> {
    let name = &l.name;
    let mut list = Vec::new();
    for files in &tls.certificates {
        match Certificate::load(&files.cert, &files.key) {
            Ok(c) => {
                if c.expired() {
                    warnings.push(files.at.problem(format!(
                        "warning: listener {name:?}: certificate {} has expired; clients will refuse it",
                        files.cert.display()
                    )));
                }
                list.push(c);
            }
            Err(e) => problems.push(files.at.problem(format!("listener {name:?}: {e}"))),
        }
    }
    if list.len() != tls.certificates.len() {
        return None;
    }
    match Certificates::new(list) {
        Ok(set) => Some(set),
        Err(e) => {
            // Name the entry of the certificate that repeats a name.
            let at = match &e {
                TlsError::DuplicateName { second, .. } => tls
                    .certificates
                    .iter()
                    .find(|f| &f.cert == second)
                    .map(|f| f.at.clone()),
                _ => None,
            };
            let at = at.unwrap_or_else(|| l.address_at.clone());
            problems.push(at.problem(format!("listener {name:?}: {e}")));
            None
        }
    }
}

/// How an `https` listener serves TLS: its minimum version, ALPN `h2`
/// then `http/1.1`, and session tickets sealed with `tickets` (which the
/// process passes on to the next generation).
pub(crate) fn options(tls: &TlsSettings, tickets: Option<&Arc<Tickets>>) -> Options {
    let versions = match tls.min_version {
        TlsVersion::Tls12 => Versions::Tls12And13,
        TlsVersion::Tls13 => Versions::Tls13,
    };
    let options = Options::default()
        .versions(versions)
        .alpn(&[b"h2", b"http/1.1"]);
    match tickets {
        Some(t) => options.tickets(t.clone()),
        None => options,
    }
}

/// A new acceptor for listener `l` (an `https` one) with `certificates`.
pub(crate) fn acceptor(
    l: &ListenerConfig,
    certificates: Certificates,
    tickets: Option<&Arc<Tickets>>,
) -> Option<Acceptor> {
    let tls = l.tls.as_ref()?;
    Some(Acceptor::new(certificates, options(tls, tickets)))
}
