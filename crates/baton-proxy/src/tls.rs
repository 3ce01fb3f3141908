//! The certificates of `https` listeners: read and checked as a whole, at
//! start, by `baton check` and by every reload, with each problem reported
//! at the certificate's entry in the configuration file.

use std::collections::HashMap;
use std::sync::Arc;

use baton::tls::{Acceptor, Certificate, Certificates, Options, Tickets, TlsError, Versions};

use crate::config::{Config, ConfigError, ListenerConfig, Problem, TlsSettings, TlsVersion};

/// The certificates of every `https` listener of a configuration, by
/// listener name.
#[derive(Debug, Default)]
pub struct Material {
    by_listener: HashMap<String, Certificates>,
}

impl Material {
    /// Listener `name`'s certificates.
    pub(crate) fn take(&mut self, name: &str) -> Option<Certificates> {
        self.by_listener.remove(name)
    }
}

/// Reads every certificate and key of `config`'s `https` listeners. Every
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
