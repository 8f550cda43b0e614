//! Revoked certificates: a file of serial numbers the scheduler refuses.
//!
//! Certificates are issued by `muster admin cert issue`, which prints each
//! one's serial number. To revoke one (a stolen agent or user certificate,
//! a retired node), an operator adds its serial to the file named by
//! `[tls] revoked` on every scheduler; the file is re-read when it changes
//! (looked at no more than once a second), so no restart is needed. A
//! caller whose certificate is listed is refused on every door, and the
//! refusal is audited like any other.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How often the file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// The revocation list of one scheduler.
pub struct Revoked {
    path: PathBuf,
    inner: Mutex<Loaded>,
}

struct Loaded {
    checked: Option<Instant>,
    modified: Option<SystemTime>,
    serials: BTreeSet<String>,
}

impl Revoked {
    /// The list in `path` (read on first use; a missing file lists none).
    pub fn new(path: PathBuf) -> Revoked {
        Revoked {
            path,
            inner: Mutex::new(Loaded {
                checked: None,
                modified: None,
                serials: BTreeSet::new(),
            }),
        }
    }

    /// Whether the certificate with `serial` (as [`muster_proto::tls::serial`]
    /// gives it) is revoked.
    pub fn contains(&self, serial: &str) -> bool {
        let mut l = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if l.checked.is_none_or(|t| t.elapsed() >= RECHECK) {
            l.checked = Some(Instant::now());
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified != l.modified {
                l.modified = modified;
                l.serials = read(&self.path);
                tracing::info!(
                    file = %self.path.display(),
                    count = l.serials.len(),
                    "revoked certificates loaded"
                );
            }
        }
        l.serials.contains(serial)
    }
}

/// The serials in `path`: one per line, `#` starts a comment.
fn read(path: &std::path::Path) -> BTreeSet<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .map(|l| l.split('#').next().unwrap_or_default().trim())
            .filter(|l| !l.is_empty())
            .map(muster_proto::tls::normalize_serial)
            .collect(),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(file = %path.display(), "cannot read the revocation list: {e}");
            }
            BTreeSet::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_read_normalized_and_reloaded_on_change() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("revoked");
        let list = Revoked::new(path.clone());
        assert!(!list.contains("3f9c"), "no file: nothing revoked");
        std::fs::write(&path, "# stolen laptop\n0x3F:9C  # alice\n\n00abcd\n").expect("write");
        // Looked at again only after RECHECK.
        list.inner.lock().unwrap().checked = None;
        assert!(list.contains("3f9c"));
        assert!(list.contains("abcd"));
        assert!(!list.contains("1234"));
        std::fs::write(&path, "1234\n").expect("write");
        let mut l = list.inner.lock().unwrap();
        l.checked = None;
        l.modified = None; // coarse file-system clocks: force the re-read
        drop(l);
        assert!(list.contains("1234"));
        assert!(!list.contains("3f9c"), "taken off the list");
    }
}
