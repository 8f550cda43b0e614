//! `muster admin ca init` and `muster admin cert issue`: a cluster CA and
//! the certificates of nodes, agents and users, made with `rcgen`.
//!
//! A certificate says who it belongs to in its common name: `node:NAME`
//! (a scheduler), `agent:NAME` (an agent; NAME is its node name) or
//! `user:NAME`. Every certificate is good for both ends of a connection
//! (server and client auth) and names `localhost`, `127.0.0.1` and any
//! `--san` in its subject alternative names. Keys are ECDSA P-256, written
//! with mode 0600; a file that exists is never overwritten.

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The CA's common name.
const CA_NAME: &str = "Muster cluster CA";

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Agent,
    User,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Agent => "agent",
            Kind::User => "user",
        }
    }
}

/// Paths of the CA's files in `dir`.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca-key.pem"))
}

/// Paths of a leaf's files in `dir`: `<kind>-<name>.pem`, `<kind>-<name>-key.pem`.
pub fn leaf_paths(dir: &Path, kind: Kind, name: &str) -> (PathBuf, PathBuf) {
    let stem = format!("{}-{name}", kind.prefix());
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    )
}

/// Write `text` to a new file with `mode`; refuse to overwrite.
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// How long a CA made by `muster admin ca init` is valid.
pub const CA_VALIDITY: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 86_400);

/// Valid from an hour ago (hosts' clocks differ) for `validity`.
fn set_validity(p: &mut CertificateParams, validity: std::time::Duration) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let secs = i64::try_from(validity.as_secs()).context("validity too long")?;
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now
        .checked_add(time::Duration::seconds(secs))
        .context("validity too long")?;
    Ok(())
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    set_validity(&mut p, CA_VALIDITY)?;
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Create a CA in `dir` (made if missing); returns the certificate's path.
pub fn ca_init(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert_path, key_path) = ca_paths(dir);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            bail!("{} already exists; not overwriting a CA", p.display());
        }
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

/// Issue a certificate for `name` of `kind`, signed by the CA in `dir`;
/// returns the certificate's and key's paths.
pub fn issue(
    dir: &Path,
    kind: Kind,
    name: &str,
    sans: &[String],
    validity: std::time::Duration,
) -> anyhow::Result<Issued> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_graphic()) {
        bail!("name {name:?}: use 1-64 printable characters without spaces");
    }
    let (ca_cert, ca_key_path) = ca_paths(dir);
    if !ca_cert.is_file() {
        bail!(
            "no CA in {} (create one with 'muster admin ca init --dir {}')",
            dir.display(),
            dir.display()
        );
    }
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("cannot read the CA key {}", ca_key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .with_context(|| format!("{} is not a private key", ca_key_path.display()))?;
    // The issuer's name and key are what a signature needs; the CA's own
    // certificate on disk is what peers trust.
    let issuer = ca_params()?.self_signed(&ca_key)?;
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if kind != Kind::User {
        names.push(name.to_string());
    }
    names.extend(sans.iter().cloned());
    names.sort();
    names.dedup();
    let mut p = CertificateParams::new(names)?;
    set_validity(&mut p, validity)?;
    p.distinguished_name
        .push(DnType::CommonName, format!("{}:{name}", kind.prefix()));
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer, &ca_key)?;
    let (cert_path, key_path) = leaf_paths(dir, kind, name);
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    let serial =
        muster_proto::tls::serial(cert.der()).context("the new certificate has no serial")?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        serial,
    })
}

/// What `issue` wrote, and the serial number to revoke it by.
#[derive(Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_who_they_are() {
        let dir = tempfile::tempdir().unwrap();
        ca_init(dir.path()).unwrap();
        assert!(ca_init(dir.path())
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        let issued = issue(dir.path(), Kind::Agent, "node-0", &[], YEAR).unwrap();
        let (cert, key) = (issued.cert, issued.key);
        assert!(!issued.serial.is_empty());
        let pem = std::fs::read_to_string(&cert).unwrap();
        let der = pem_to_der(&pem);
        assert_eq!(
            muster_proto::tls::common_name(&der).as_deref(),
            Some("agent:node-0")
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(issue(dir.path(), Kind::Agent, "node-0", &[], YEAR).is_err());
        let other = tempfile::tempdir().unwrap();
        let e = issue(other.path(), Kind::User, "alice", &[], YEAR).unwrap_err();
        assert!(e.to_string().contains("muster admin ca init"), "{e}");
    }

    const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

    /// The `UTCTime` values of a certificate: not-before, not-after.
    fn utc_times(der: &[u8]) -> Vec<time::OffsetDateTime> {
        der.windows(15)
            .filter(|w| w[0] == 0x17 && w[1] == 13 && w[14] == b'Z')
            .filter_map(|w| {
                let d = std::str::from_utf8(&w[2..14]).ok()?;
                let n = |i: usize| d[i..i + 2].parse::<u8>().ok();
                let date = time::Date::from_calendar_date(
                    2000 + i32::from(n(0)?),
                    time::Month::try_from(n(2)?).ok()?,
                    n(4)?,
                )
                .ok()?;
                let t = time::Time::from_hms(n(6)?, n(8)?, n(10)?).ok()?;
                Some(time::PrimitiveDateTime::new(date, t).assume_utc())
            })
            .collect()
    }

    #[test]
    fn certificates_expire_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        ca_init(dir.path()).unwrap();
        let days = std::time::Duration::from_secs(90 * 86_400);
        let issued = issue(dir.path(), Kind::User, "alice", &[], days).unwrap();
        let der = pem_to_der(&std::fs::read_to_string(&issued.cert).unwrap());
        assert_eq!(muster_proto::tls::serial(&der), Some(issued.serial));
        let times = utc_times(&der);
        assert_eq!(times.len(), 2, "not-before and not-after");
        let lifetime = times[1] - time::OffsetDateTime::now_utc();
        assert!(
            (lifetime.whole_days() - 90).abs() <= 1,
            "expires in {lifetime}"
        );
    }

    /// The first PEM block's bytes.
    fn pem_to_der(pem: &str) -> Vec<u8> {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in b64.bytes().filter(|c| *c != b'=') {
            let v = table.iter().position(|t| *t == c).unwrap() as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }
}
