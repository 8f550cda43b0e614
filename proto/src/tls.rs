//! Mutual TLS between the daemons and their clients, through tonic's rustls
//! support.
//!
//! One `[tls]` table (`ca`, `cert`, `key`: PEM files) configures a process:
//! the scheduler serves with its node certificate and asks every caller for
//! a certificate signed by the cluster CA (optional at the TLS layer, so a
//! user with only a token can still connect; the services decide what each
//! kind of caller may do); agents, schedulers dialling their peers and the
//! CLI present theirs. A process has one identity, so the client side is
//! installed once ([`install_client`]) and every outgoing channel picks it
//! up in [`endpoint`]; `http://` addresses then become `https://`.
//!
//! Certificates carry who they are in their common name: `node:NAME` for a
//! scheduler, `agent:NAME` for an agent, `user:NAME` for a person
//! (`muster admin cert issue`). [`common_name`] reads it back from the DER
//! bytes rustls verified.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The `[tls]` table of a daemon's (or the CLI's) configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM) that every peer's certificate must chain to.
    pub ca: PathBuf,
    /// This process's certificate (PEM).
    pub cert: PathBuf,
    /// This process's private key (PEM).
    pub key: PathBuf,
    /// Schedulers only: a file of revoked certificate serial numbers (hex,
    /// one per line, `#` comments), as `muster admin cert issue` prints
    /// them; re-read when it changes. A client, agent or peer presenting a
    /// revoked certificate is refused.
    #[serde(default)]
    pub revoked: Option<PathBuf>,
}

/// A TLS file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("tls: cannot read {key} file {path}: {source}")]
pub struct TlsError {
    pub key: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError {
        key,
        path: path.to_path_buf(),
        source,
    })
}

impl TlsFiles {
    /// Check that the three files can be read (config validation, before binding).
    pub fn check(&self) -> Result<(), String> {
        for (key, p) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            read(key, p).map_err(|e| format!("key `tls.{key}`: {}", e.source))?;
        }
        Ok(())
    }

    /// The server side: our certificate, and the CA that client
    /// certificates must chain to (a client may also come without one).
    pub fn server(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity = Identity::from_pem(read("cert", &self.cert)?, read("key", &self.key)?);
        Ok(ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(Certificate::from_pem(read("ca", &self.ca)?))
            .client_auth_optional(true))
    }

    /// The client side: trust only the cluster CA, present our certificate.
    pub fn client(&self) -> Result<ClientTlsConfig, TlsError> {
        let identity = Identity::from_pem(read("cert", &self.cert)?, read("key", &self.key)?);
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca", &self.ca)?))
            .identity(identity))
    }
}

/// A client's `[tls]` table: the CA is required; a certificate is optional
/// (a user may authenticate with a token instead).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTlsFiles {
    /// Trust only the cluster CA; present a certificate if one is configured.
    pub fn client(&self) -> Result<ClientTlsConfig, TlsError> {
        let tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca", &self.ca)?));
        Ok(match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                tls.identity(Identity::from_pem(read("cert", c)?, read("key", k)?))
            }
            _ => tls,
        })
    }
}

static CLIENT: OnceLock<ClientTlsConfig> = OnceLock::new();

/// Make every channel this process opens through [`endpoint`] use `tls`.
/// Only the first call counts (a process has one identity).
pub fn install_client(tls: ClientTlsConfig) {
    let _ = CLIENT.set(tls);
}

/// Whether [`install_client`] was called.
pub fn client_installed() -> bool {
    CLIENT.get().is_some()
}

/// An endpoint for `url`, over TLS if this process has a client identity
/// (an `http://` address is then dialled as `https://`).
pub fn endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    match CLIENT.get() {
        Some(tls) => {
            let url = match url.strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => url.to_string(),
            };
            Endpoint::from_shared(url)?.tls_config(tls.clone())
        }
        None => Endpoint::from_shared(url.to_string()),
    }
}

/// The daemons' rule for `listen`: check the `[tls]` files if there are
/// any; without them serve only on loopback unless `insecure = true`.
/// `cert_kind` (`node`, `agent`) names the certificate the fix needs.
pub fn check_listen(
    tls: Option<&TlsFiles>,
    insecure: bool,
    listen: &std::net::SocketAddr,
    cert_kind: &str,
) -> Result<(), String> {
    match tls {
        Some(tls) => tls.check(),
        None if !insecure && !listen.ip().is_loopback() => Err(format!(
            "key `listen`: {listen} is not a loopback address; serving it without TLS needs a \
             [tls] table (see 'muster admin cert issue --{cert_kind}') or insecure = true"
        )),
        None => Ok(()),
    }
}

/// The subject common name of a DER certificate (`agent:node-0`), if any.
///
/// Walks Certificate → TBSCertificate → subject → RDNs with a minimal DER
/// reader; the bytes come from a certificate rustls has already verified
/// against the cluster CA, and anything unexpected yields `None`.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    // Optional [0] version.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    // serial, signature algorithm, issuer, validity, then subject.
    for _ in 0..4 {
        tbs = tlv(tbs)?.2;
    }
    let (_, mut subject, _) = tlv(tbs)?;
    let mut cn = None;
    while !subject.is_empty() {
        let (_, set, rest) = tlv(subject)?;
        subject = rest;
        let (_, atv, _) = tlv(set)?;
        let (tag, oid, after) = tlv(atv)?;
        if tag == 0x06 && oid == [0x55, 0x04, 0x03] {
            let (_, value, _) = tlv(after)?;
            cn = Some(String::from_utf8_lossy(value).into_owned());
        }
    }
    cn
}

/// The serial number of a DER certificate, in lower-case hex without
/// leading zeros (`3f9c...`), as `muster admin cert issue` prints it.
pub fn serial(der: &[u8]) -> Option<String> {
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    let (tag, value, _) = tlv(tbs)?;
    if tag != 0x02 {
        return None;
    }
    Some(normalize_serial(
        &value.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    ))
}

/// A serial number as written by people (`0x3F:9C`, `003f9c`) in the form
/// [`serial`] gives.
pub fn normalize_serial(text: &str) -> String {
    let hex: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    }
}

/// One DER tag-length-value: (tag, contents, the bytes after it).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)? as usize;
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some((tag, b.get(start..end)?, b.get(end..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_refuses_truncated_input() {
        assert!(tlv(&[0x30]).is_none());
        assert!(tlv(&[0x30, 0x05, 1, 2]).is_none());
        assert!(tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_none());
        assert_eq!(
            tlv(&[0x04, 0x01, 7, 9]),
            Some((0x04, &[7u8][..], &[9u8][..]))
        );
    }

    #[test]
    fn garbage_has_no_common_name() {
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x30, 0x00]), None);
        assert_eq!(common_name(b"not a certificate at all"), None);
    }

    #[test]
    fn plain_serving_is_for_loopback_only() {
        let ok = |a: &str, insecure| check_listen(None, insecure, &a.parse().unwrap(), "node");
        assert!(ok("127.0.0.1:1", false).is_ok());
        assert!(ok("[::1]:1", false).is_ok());
        assert!(ok("10.0.0.1:1", true).is_ok());
        let e = ok("0.0.0.0:1", false).unwrap_err();
        assert!(e.contains("key `listen`") && e.contains("--node"), "{e}");
        assert!(!e.contains("  "), "one line, no run of spaces: {e}");
    }
}
