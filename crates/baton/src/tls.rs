//! TLS for baton services (feature `tls`): certificates chosen by SNI,
//! replaced in place while the service runs.
//!
//! [`Certificates`] is a set of certificate chains with their keys, read
//! from PEM files and checked ([`Certificate::load`]: the key must match
//! the certificate, no DNS name may belong to two chains). An [`Acceptor`]
//! serves them with rustls (its default crypto provider): each handshake
//! picks the chain whose DNS names match the client's SNI (`*.example.com`
//! matches one label), else the first. [`Acceptor::certificates`] is a
//! [`Reloadable`]: a reload reads and checks every file, and only a set
//! that passed is swapped in, so new handshakes use the new certificates
//! at once, a failed reload keeps the old ones serving, and connections
//! already open are not touched.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use baton::tls::{Acceptor, Certificate, Certificates, Options};
//!
//! let load = || -> Result<Certificates, baton::tls::TlsError> {
//!     Certificates::new(vec![Certificate::load("site.pem", "site.key")?])
//! };
//! let acceptor = Acceptor::new(load()?, Options::default().alpn(&[b"http/1.1"]));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
//! let (tcp, _) = listener.accept().await?;
//! let tls = acceptor.accept(tcp).await?; // an AsyncRead + AsyncWrite stream
//! # drop(tls);
//! // On SIGHUP, say: the certificates are read again and swapped in.
//! acceptor.certificates().reload(|| async { load() }).await?;
//! # Ok(()) }
//! ```
//!
//! The protocol versions are TLS 1.2 and 1.3 ([`Versions::Tls12And13`]) or
//! TLS 1.3 alone; the cipher suites are rustls's defaults, all of them AEAD
//! with forward secrecy, and there is no way to weaken them.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::reload::Reloadable;

pub use rustls;
pub use tokio_rustls::server::TlsStream;

/// A certificate or key file larger than this is refused (a chain is a
/// few KiB).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a certificate could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not what it should be (not PEM, no certificate, no key,
    /// a key of a kind rustls cannot use, a certificate it cannot parse).
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key is not the key of the certificate.
    #[error("{}: the key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// Two certificates claim one DNS name.
    #[error("{}: DNS name {name:?} is also a name of {}", second.display(), first.display())]
    DuplicateName {
        /// The name.
        name: String,
        /// The certificate file that has it first.
        first: PathBuf,
        /// The other one.
        second: PathBuf,
    },
    /// A set needs at least one certificate.
    #[error("no certificates")]
    Empty,
}

/// One certificate chain with its private key, as read from PEM files.
#[derive(Clone)]
pub struct Certificate {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    not_after: SystemTime,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("cert", &self.cert_path)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// The crypto provider: the process default, else rustls's default one
/// (installed as the process default).
fn provider() -> Arc<CryptoProvider> {
    if let Some(p) = CryptoProvider::get_default() {
        return p.clone();
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Reads a small regular file (a FIFO or a device is refused rather than
/// waited on).
fn read_small(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if !meta.is_file() {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            reason: "not a regular file".to_owned(),
        });
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "{} bytes is larger than {MAX_PEM_BYTES} bytes; is this a PEM file?",
                meta.len()
            ),
        });
    }
    std::fs::read(path).map_err(read)
}

impl Certificate {
    /// Reads the PEM chain at `cert` (end-entity certificate first) and the
    /// PEM private key at `key` (PKCS#8, RSA or SEC1), and checks that the
    /// key is the certificate's.
    pub fn load(cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Certificate, TlsError> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let invalid = |path: &Path, reason: String| TlsError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let cert_pem = read_small(cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(cert, format!("not a PEM certificate chain: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(invalid(cert, "no CERTIFICATE in the file".to_owned()));
        };
        let (names, not_after) = describe(leaf).map_err(|reason| invalid(cert, reason))?;
        let key_pem = read_small(key)?;
        let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => invalid(
                key,
                "no private key in the file (PKCS#8, RSA or SEC1 PEM)".to_owned(),
            ),
            e => invalid(key, format!("not a PEM private key: {e}")),
        })?;
        let provider = provider();
        let signing = provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| invalid(key, format!("unusable private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::KeyMismatch {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                })
            }
            Err(e) => return Err(invalid(cert, format!("unusable certificate: {e}"))),
        }
        Ok(Certificate {
            key: Arc::new(certified),
            names,
            not_after,
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
        })
    }

    /// The DNS names of the end-entity certificate (its subject alternative
    /// names), lowercase.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// When the end-entity certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Whether it has expired (clients will refuse it).
    pub fn expired(&self) -> bool {
        self.not_after <= SystemTime::now()
    }

    /// The certificate file it was read from.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The key file it was read from.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }
}

/// The DNS names and the expiry of a DER certificate.
fn describe(der: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                let d = d.to_ascii_lowercase();
                if !names.contains(&d) {
                    names.push(d);
                }
            }
        }
    }
    let secs = cert.validity().not_after.timestamp();
    let not_after = if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH
    };
    Ok((names, not_after))
}

/// Certificates to serve, chosen by SNI; the first is the default (for a
/// client that sends no name, or a name none of them has).
#[derive(Debug, Clone)]
pub struct Certificates {
    list: Vec<Certificate>,
    /// Exact names → index.
    exact: HashMap<String, usize>,
    /// `*.suffix` → index, keyed by the suffix.
    wildcard: HashMap<String, usize>,
}

impl Certificates {
    /// A set of `list`, in order; refused if it is empty or if two
    /// certificates share a DNS name.
    pub fn new(list: Vec<Certificate>) -> Result<Certificates, TlsError> {
        if list.is_empty() {
            return Err(TlsError::Empty);
        }
        let mut exact: HashMap<String, usize> = HashMap::new();
        let mut wildcard: HashMap<String, usize> = HashMap::new();
        for (i, c) in list.iter().enumerate() {
            for name in &c.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(suffix) => (&mut wildcard, suffix.to_owned()),
                    None => (&mut exact, name.clone()),
                };
                match map.get(&key) {
                    Some(&first) if first != i => {
                        return Err(TlsError::DuplicateName {
                            name: name.clone(),
                            first: list
                                .get(first)
                                .map(|f| f.cert_path.clone())
                                .unwrap_or_default(),
                            second: c.cert_path.clone(),
                        })
                    }
                    _ => {
                        map.insert(key, i);
                    }
                }
            }
        }
        Ok(Certificates {
            list,
            exact,
            wildcard,
        })
    }

    /// The certificates, in order.
    pub fn list(&self) -> &[Certificate] {
        &self.list
    }

    /// The certificate a handshake naming `server_name` gets.
    pub fn pick(&self, server_name: Option<&str>) -> &Certificate {
        let found = server_name.and_then(|n| {
            let n = n.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&n).copied().or_else(|| {
                let (_, parent): (&str, &str) = n.split_once('.')?;
                self.wildcard.get(parent).copied()
            })
        });
        // `new` refuses an empty list, so the first exists.
        let i = found.unwrap_or(0);
        &self.list[i.min(self.list.len().saturating_sub(1))]
    }
}

/// Which TLS versions are offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Versions {
    /// TLS 1.2 and 1.3 (the default, as nginx's `ssl_protocols` default
    /// is today).
    #[default]
    Tls12And13,
    /// TLS 1.3 only.
    Tls13,
}

/// How an [`Acceptor`] serves.
#[derive(Debug, Clone, Default)]
pub struct Options {
    versions: Versions,
    alpn: Vec<Vec<u8>>,
    tickets: Option<Arc<Tickets>>,
}

impl Options {
    /// The protocol versions offered (default TLS 1.2 and 1.3).
    pub fn versions(mut self, versions: Versions) -> Self {
        self.versions = versions;
        self
    }

    /// Seals session tickets with `tickets` (default: no tickets; TLS 1.3
    /// sessions then resume from this process's memory only).
    pub fn tickets(mut self, tickets: Arc<Tickets>) -> Self {
        self.tickets = Some(tickets);
        self
    }

    /// The ALPN protocols offered, most preferred first (default none).
    pub fn alpn(mut self, protocols: &[&[u8]]) -> Self {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self
    }
}

/// Picks each handshake's certificate from the current set.
struct Resolver(Arc<Reloadable<Certificates>>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get().pick(hello.server_name()).key.clone())
    }
}

/// Completes TLS handshakes with certificates that can be replaced while
/// it serves. Cheap to clone (clones share everything).
#[derive(Debug, Clone)]
pub struct Acceptor {
    certificates: Arc<Reloadable<Certificates>>,
    /// Shared by every configuration this acceptor builds, so that
    /// changing the options keeps the sessions clients can resume.
    sessions: Arc<dyn StoresServerSessions>,
    config: Arc<ArcSwap<ServerConfig>>,
}

/// How many TLS 1.3 sessions are kept for resumption (rustls keeps 256 by
/// default; nginx's `ssl_session_cache shared:SSL:1m` holds about 4,000).
const SESSIONS: usize = 4096;

impl Acceptor {
    /// Serves `certificates` with `options`.
    pub fn new(certificates: Certificates, options: Options) -> Acceptor {
        let certificates = Arc::new(Reloadable::new(certificates));
        let sessions: Arc<dyn StoresServerSessions> =
            rustls::server::ServerSessionMemoryCache::new(SESSIONS);
        let config = build(&certificates, &sessions, &options);
        Acceptor {
            certificates,
            sessions,
            config: Arc::new(ArcSwap::from_pointee(config)),
        }
    }

    /// The certificates served; a [`Reloadable::reload`] of them applies to
    /// every later handshake.
    pub fn certificates(&self) -> &Reloadable<Certificates> {
        &self.certificates
    }

    /// Serves with `options` from the next handshake on (sessions stay
    /// resumable).
    pub fn set_options(&self, options: &Options) {
        self.config
            .store(Arc::new(build(&self.certificates, &self.sessions, options)));
    }

    /// Completes the server side of a handshake on `io`.
    pub async fn accept<IO>(&self, io: IO) -> io::Result<TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        // The ClientHello is in. The server's answer (key exchange and
        // signature) is most of a handshake's CPU: let the connections
        // that are already served go first, so that a burst of new
        // connections does not delay their requests (nginx gets the same
        // effect by accepting one connection per turn of its event loop).
        tokio::task::yield_now().await;
        start.into_stream(self.config.load_full()).await
    }
}

fn build(
    certificates: &Arc<Reloadable<Certificates>>,
    sessions: &Arc<dyn StoresServerSessions>,
    options: &Options,
) -> ServerConfig {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match options.versions {
        Versions::Tls12And13 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Versions::Tls13 => &[&rustls::version::TLS13],
    };
    let builder =
        match ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions) {
            Ok(b) => b,
            // The default provider supports both versions; should another
            // provider be the process default, use its own defaults.
            Err(_) => ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|_| ServerConfig::builder()),
        };
    let mut config = builder
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(certificates.clone())));
    config.alpn_protocols = options.alpn.clone();
    config.session_storage = sessions.clone();
    if let Some(t) = &options.tickets {
        config.ticketer = t.clone();
    }
    config
}

/// Session ticket keys that outlive the process: TLS session tickets
/// (stateless resumption, TLS 1.2 and 1.3) are sealed with keys this
/// holds, and [`Tickets::for_baton`] passes the keys on to the next
/// generation at every upgrade or take-over ([`crate::Baton::pass_on`]),
/// so a client that resumes a session after an upgrade gets an
/// abbreviated handshake instead of a full one.
///
/// A key is used to seal new tickets for [`TICKET_ROTATION`], then kept
/// one more period to open the tickets it sealed; the schedule is the
/// key's creation time (wall clock), which travels with it, so every
/// generation rotates at the same moments. Tickets are AES-256-GCM
/// (aws-lc-rs, rustls's default provider) under a random 256-bit key,
/// with the key's random 16-byte name in front and as associated data.
/// The keys are never written to disk and travel only over the private
/// handshake channel.
pub struct Tickets {
    keys: std::sync::Mutex<Keys>,
}

/// How long a ticket key seals new tickets (then it only opens them, for
/// as long again). rustls's own ticketer and nginx's rotate as often.
pub const TICKET_ROTATION: Duration = Duration::from_secs(6 * 60 * 60);

const KEY_NAME: usize = 16;
const NONCE: usize = 12;

#[derive(Clone)]
struct TicketKey {
    name: [u8; KEY_NAME],
    secret: [u8; 32],
    /// Unix seconds.
    created: u64,
}

struct Keys {
    current: TicketKey,
    previous: Option<TicketKey>,
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tickets { .. }")
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TicketKey {
    fn random(created: u64) -> Option<TicketKey> {
        let mut key = TicketKey {
            name: [0; KEY_NAME],
            secret: [0; 32],
            created,
        };
        aws_lc_rs::rand::fill(&mut key.name).ok()?;
        aws_lc_rs::rand::fill(&mut key.secret).ok()?;
        Some(key)
    }

    fn aead(&self) -> Option<aws_lc_rs::aead::LessSafeKey> {
        let unbound =
            aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &self.secret).ok()?;
        Some(aws_lc_rs::aead::LessSafeKey::new(unbound))
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": hex(&self.name),
            "secret": hex(&self.secret),
            "created": self.created,
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<TicketKey> {
        let mut key = TicketKey {
            name: [0; KEY_NAME],
            secret: [0; 32],
            created: v.get("created")?.as_u64()?,
        };
        unhex(v.get("name")?.as_str()?, &mut key.name)?;
        unhex(v.get("secret")?.as_str()?, &mut key.secret)?;
        Some(key)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str, out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2 || !text.is_ascii() {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(())
}

impl Tickets {
    /// Fresh random keys, or `None` if the system's random source failed.
    pub fn new() -> Option<Arc<Tickets>> {
        Some(Arc::new(Tickets {
            keys: std::sync::Mutex::new(Keys {
                current: TicketKey::random(unix_now())?,
                previous: None,
            }),
        }))
    }

    /// [`Tickets::new`], passed on from `baton`'s previous generation if it
    /// had any, and on to its next one: registered with
    /// [`crate::Baton::pass_on`] under `"tls-tickets"`. Call it before
    /// [`crate::Baton::ready`].
    pub fn for_baton(baton: &crate::Baton) -> Option<Arc<Tickets>> {
        let tickets = Tickets::new()?;
        let (export, import) = (Arc::downgrade(&tickets), Arc::downgrade(&tickets));
        baton.pass_on(
            "tls-tickets",
            move || export.upgrade().map_or(serde_json::Value::Null, |t| t.export()),
            move |value| {
                if let Some(t) = import.upgrade() {
                    if !t.import(&value) {
                        tracing::warn!("the session ticket keys passed on cannot be read; new ones are used (sessions do not resume across this upgrade)");
                    }
                }
            },
        );
        Some(tickets)
    }

    /// The keys, to pass on: `{"keys":[current, previous?]}`.
    pub fn export(&self) -> serde_json::Value {
        let keys = crate::sync::lock(&self.keys);
        let mut list = vec![keys.current.to_json()];
        if let Some(p) = &keys.previous {
            list.push(p.to_json());
        }
        serde_json::json!({ "keys": list })
    }

    /// Takes the keys of an [`export`](Self::export) in place of these;
    /// `false` (and nothing changed) if they cannot be read.
    pub fn import(&self, value: &serde_json::Value) -> bool {
        let Some(list) = value.get("keys").and_then(|k| k.as_array()) else {
            return false;
        };
        let parsed: Option<Vec<TicketKey>> = list.iter().map(TicketKey::from_json).collect();
        let Some(mut parsed) = parsed.filter(|p| !p.is_empty() && p.len() <= 2) else {
            return false;
        };
        let previous = (parsed.len() == 2).then(|| parsed.remove(1));
        let current = parsed.remove(0);
        *crate::sync::lock(&self.keys) = Keys { current, previous };
        true
    }

    /// The keys as of now: the current one rotated out once it has sealed
    /// for [`TICKET_ROTATION`]; one that is two periods old is dropped.
    fn rotated(&self) -> std::sync::MutexGuard<'_, Keys> {
        let mut keys = crate::sync::lock(&self.keys);
        let now = unix_now();
        let period = TICKET_ROTATION.as_secs();
        if now >= keys.current.created.saturating_add(period) {
            // On the current key's schedule, so every holder of these keys
            // rotates at the same moment; the new secret is this process's
            // own, though: tickets that a generation seals after it passed
            // its keys on (while it drains) cost a full handshake later.
            let periods = (now - keys.current.created) / period;
            let created = keys.current.created + periods * period;
            if let Some(next) = TicketKey::random(created) {
                let old = std::mem::replace(&mut keys.current, next);
                keys.previous = (periods == 1).then_some(old);
            }
        }
        if keys
            .previous
            .as_ref()
            .is_some_and(|p| now >= p.created.saturating_add(2 * period))
        {
            keys.previous = None;
        }
        keys
    }
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(TICKET_ROTATION.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.rotated().current.clone();
        let mut nonce = [0u8; NONCE];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(KEY_NAME + NONCE + plain.len() + 16);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.aead()?
            .seal_in_place_append_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(&key.name),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let name = cipher.get(..KEY_NAME)?;
        let nonce = cipher.get(KEY_NAME..KEY_NAME + NONCE)?;
        let sealed = cipher.get(KEY_NAME + NONCE..)?;
        let key = {
            let keys = self.rotated();
            let found = [Some(&keys.current), keys.previous.as_ref()]
                .into_iter()
                .flatten()
                .find(|k| k.name[..] == *name)
                .cloned();
            found?
        };
        let nonce = aws_lc_rs::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key
            .aead()?
            .open_in_place(nonce, aws_lc_rs::aead::Aad::from(&key.name), &mut buf)
            .ok()?;
        let len = plain.len();
        buf.truncate(len);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: PathBuf,
    }

    impl Files {
        fn new(tag: &str) -> Files {
            let dir = std::env::temp_dir().join(format!("baton-tls-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Files { dir }
        }

        /// A self-signed certificate for `names`; returns (cert, key) paths.
        fn cert(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            let c = rcgen::generate_simple_self_signed(names).unwrap();
            let cert = self.dir.join(format!("{stem}.pem"));
            let key = self.dir.join(format!("{stem}.key"));
            std::fs::write(&cert, c.cert.pem()).unwrap();
            std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
            (cert, key)
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn sni_picks_by_exact_then_wildcard_name_else_the_first() {
        let f = Files::new("sni");
        let (a, ak) = f.cert("a", &["a.test"]);
        let (b, bk) = f.cert("b", &["b.test", "*.wild.test"]);
        let set = Certificates::new(vec![
            Certificate::load(&a, &ak).unwrap(),
            Certificate::load(&b, &bk).unwrap(),
        ])
        .unwrap();
        assert_eq!(set.pick(Some("a.test")).cert_path(), a);
        assert_eq!(set.pick(Some("B.TEST.")).cert_path(), b);
        assert_eq!(set.pick(Some("x.wild.test")).cert_path(), b);
        assert_eq!(set.pick(Some("y.x.wild.test")).cert_path(), a);
        assert_eq!(set.pick(Some("other.test")).cert_path(), a);
        assert_eq!(set.pick(None).cert_path(), a);
        assert_eq!(set.list()[1].names(), ["b.test", "*.wild.test"]);
        assert!(!set.list()[0].expired());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let f = Files::new("mismatch");
        let (a, _) = f.cert("a", &["a.test"]);
        let (_, bk) = f.cert("b", &["b.test"]);
        let e = Certificate::load(&a, &bk).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("b.key") && msg.contains("a.pem"), "{msg}");
    }

    #[test]
    fn unreadable_and_unparsable_files_are_named() {
        let f = Files::new("bad");
        let (a, ak) = f.cert("a", &["a.test"]);
        let missing = f.dir.join("missing.pem");
        let e = Certificate::load(&missing, &ak).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }) && e.to_string().contains("missing.pem"));
        let junk = f.dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = Certificate::load(&junk, &ak).unwrap_err();
        assert!(e.to_string().contains("junk.pem"), "{e}");
        // A certificate given as the key.
        let e = Certificate::load(&a, &a).unwrap_err();
        assert!(e.to_string().contains("no private key"), "{e}");
        let e = Certificate::load(&f.dir, &ak).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn two_certificates_may_not_share_a_name() {
        let f = Files::new("dup");
        let (a, ak) = f.cert("a", &["a.test", "*.w.test"]);
        let (b, bk) = f.cert("b", &["b.test", "*.W.test"]);
        let e = Certificates::new(vec![
            Certificate::load(&a, &ak).unwrap(),
            Certificate::load(&b, &bk).unwrap(),
        ])
        .unwrap_err();
        assert!(
            matches!(&e, TlsError::DuplicateName { name, .. } if name == "*.w.test"),
            "{e}"
        );
        assert!(matches!(
            Certificates::new(Vec::new()),
            Err(TlsError::Empty)
        ));
    }

    #[tokio::test]
    async fn a_reload_applies_to_the_next_handshake() {
        let f = Files::new("hs");
        let (a, ak) = f.cert("a", &["one.test"]);
        let (b, bk) = f.cert("b", &["one.test"]);
        let acceptor = Acceptor::new(
            Certificates::new(vec![Certificate::load(&a, &ak).unwrap()]).unwrap(),
            Options::default().alpn(&[b"http/1.1"]),
        );
        let leaf = |p: &Path| {
            CertificateDer::pem_file_iter(p)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
        };
        let roots = vec![leaf(&a), leaf(&b)];
        let seen = |acceptor: &Acceptor| served_leaf(acceptor.clone(), roots.clone());
        assert_eq!(seen(&acceptor).await, leaf(&a));
        // A failed reload keeps the old certificate.
        let err = acceptor
            .certificates()
            .reload(|| async { Certificates::new(vec![Certificate::load(&a, &bk)?]) })
            .await;
        assert!(err.is_err());
        assert_eq!(seen(&acceptor).await, leaf(&a));
        acceptor
            .certificates()
            .reload(|| async { Certificates::new(vec![Certificate::load(&b, &bk)?]) })
            .await
            .unwrap();
        assert_eq!(seen(&acceptor).await, leaf(&b));
        acceptor.set_options(&Options::default().versions(Versions::Tls13));
        assert_eq!(seen(&acceptor).await, leaf(&b));
    }

    /// The end-entity certificate a handshake with `acceptor` presents for
    /// `one.test`, to a client that trusts `roots`.
    async fn served_leaf(
        acceptor: Acceptor,
        roots: Vec<CertificateDer<'static>>,
    ) -> CertificateDer<'static> {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(r).unwrap();
        }
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(store)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { acceptor.accept(s).await.map(|_| ()) });
        let name = rustls_pki_types::ServerName::try_from("one.test").unwrap();
        let tls = connector.connect(name, c).await.unwrap();
        server.await.unwrap().unwrap();
        let (_, conn) = tls.get_ref();
        conn.peer_certificates().unwrap()[0].clone().into_owned()
    }

    #[test]
    fn tickets_open_what_they_sealed_and_what_the_keys_passed_on_sealed() {
        use rustls::server::ProducesTickets;
        let a = Tickets::new().unwrap();
        let sealed = a.encrypt(b"session state").unwrap();
        assert_eq!(a.decrypt(&sealed).unwrap(), b"session state");
        // Another process's keys cannot open it, until they are passed on.
        let b = Tickets::new().unwrap();
        assert!(b.decrypt(&sealed).is_none());
        assert!(b.import(&a.export()));
        assert_eq!(b.decrypt(&sealed).unwrap(), b"session state");
        // Tampered, cut short or garbage: refused.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(b.decrypt(&bad).is_none());
        assert!(b.decrypt(&sealed[..20]).is_none());
        assert!(b.decrypt(b"").is_none());
        // What cannot be read changes nothing.
        assert!(!b.import(&serde_json::json!({"keys": [{"name": "zz"}]})));
        assert!(!b.import(&serde_json::json!({})));
        assert_eq!(b.decrypt(&sealed).unwrap(), b"session state");
    }

    #[test]
    fn a_rotated_key_opens_its_tickets_for_one_more_period() {
        use rustls::server::ProducesTickets;
        let period = TICKET_ROTATION.as_secs();
        let t = Tickets::new().unwrap();
        let sealed = t.encrypt(b"x").unwrap();
        // Age the key by one period and a bit: the next ticket is sealed
        // with a new key on the same schedule, the old one still opens.
        let created = crate::sync::lock(&t.keys).current.created;
        crate::sync::lock(&t.keys).current.created = created - period - 10;
        let newer = t.encrypt(b"y").unwrap();
        assert_ne!(newer[..KEY_NAME], sealed[..KEY_NAME]);
        assert_eq!(crate::sync::lock(&t.keys).current.created, created - 10);
        assert_eq!(t.decrypt(&sealed).unwrap(), b"x");
        // Two periods old: gone.
        crate::sync::lock(&t.keys)
            .previous
            .as_mut()
            .unwrap()
            .created = created - 2 * period - 10;
        assert!(t.decrypt(&sealed).is_none());
        assert_eq!(t.decrypt(&newer).unwrap(), b"y");
    }

    #[tokio::test]
    async fn a_session_resumes_on_another_acceptor_only_with_the_keys_passed_on() {
        let f = Files::new("resume");
        let (a, ak) = f.cert("a", &["one.test"]);
        let certs = || Certificates::new(vec![Certificate::load(&a, &ak).unwrap()]).unwrap();
        let first = Tickets::new().unwrap();
        let acceptor =
            |tickets: Arc<Tickets>| Acceptor::new(certs(), Options::default().tickets(tickets));
        let der = CertificateDer::pem_file_iter(&a)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let mut store = rustls::RootCertStore::empty();
        store.add(der).unwrap();
        let client = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(store)
                .with_no_client_auth(),
        );
        let kind = |acceptor: Acceptor| handshake_kind(acceptor, client.clone());
        assert_eq!(
            kind(acceptor(first.clone())).await,
            rustls::HandshakeKind::Full
        );
        // The next generation, with the keys passed on: resumed.
        let next = Tickets::new().unwrap();
        assert!(next.import(&first.export()));
        assert_eq!(kind(acceptor(next)).await, rustls::HandshakeKind::Resumed);
        // Without them: a full handshake (the client has tickets left).
        let other = Tickets::new().unwrap();
        assert_eq!(kind(acceptor(other)).await, rustls::HandshakeKind::Full);
    }

    /// One handshake of `client` with `acceptor` for `one.test`, with a
    /// byte each way so that the server's tickets reach the client.
    async fn handshake_kind(
        acceptor: Acceptor,
        client: Arc<rustls::ClientConfig>,
    ) -> rustls::HandshakeKind {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let connector = tokio_rustls::TlsConnector::from(client);
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await.unwrap();
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.unwrap();
            tls.write_all(&b).await.unwrap();
            tls.flush().await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let name = rustls_pki_types::ServerName::try_from("one.test").unwrap();
        let mut tls = connector.connect(name, c).await.unwrap();
        tls.write_all(b"x").await.unwrap();
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).await.unwrap();
        server.await.unwrap();
        tls.get_ref().1.handshake_kind().unwrap()
    }
}
