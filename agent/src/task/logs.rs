//! Task logs, capped in size and rotated.
//!
//! The shim reads the task's stdout and stderr through pipes and writes each
//! into `<task>.stdout` (or `.stderr`). When a file would pass `max_bytes`
//! it is renamed `<name>.1` (older ones shift to `.2`, ...; the oldest beyond
//! `keep` is deleted) and a new file is started, so a chatty task can never
//! fill the agent's disk. Readers take the rotated files oldest first, then
//! the live one ([`files_oldest_first`]).
//!
//! The shim writes them as root, inside the agent's root-only data folder:
//! each file is created 0600 and opened with `O_NOFOLLOW`, so job output is
//! readable only through the agent (which asks the scheduler who may read
//! it), never by another local user, and a symlink is never written through.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The rotated file `n` of `live` (`<live>.n`); `n = 0` is `live` itself.
pub fn rotated(live: &Path, n: u32) -> PathBuf {
    if n == 0 {
        return live.to_path_buf();
    }
    let mut s = live.as_os_str().to_os_string();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Every file of one log that exists, oldest first, the live one last.
pub fn files_oldest_first(live: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut n = 1;
    while rotated(live, n).exists() {
        n += 1;
    }
    for i in (1..n).rev() {
        out.push(rotated(live, i));
    }
    if live.exists() {
        out.push(live.to_path_buf());
    }
    out
}

/// Copies a stream into a capped, rotated log.
pub struct RotatingWriter {
    live: PathBuf,
    max_bytes: u64,
    /// Files kept in all, the live one included (at least 1).
    keep: u32,
    file: std::fs::File,
    written: u64,
}

impl RotatingWriter {
    /// Open (appending) the live file.
    pub fn open(live: &Path, max_bytes: u64, keep: u32) -> std::io::Result<RotatingWriter> {
        let file = open_append(live)?;
        let written = file.metadata()?.len();
        Ok(RotatingWriter {
            live: live.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep: keep.max(1),
            file,
            written,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.keep == 1 {
            // Only one file is kept: start it over.
            self.file.set_len(0)?;
            self.file = open_append(&self.live)?;
            self.written = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(rotated(&self.live, self.keep - 1));
        for n in (1..self.keep - 1).rev() {
            let from = rotated(&self.live, n);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.live, n + 1))?;
            }
        }
        std::fs::rename(&self.live, rotated(&self.live, 1))?;
        self.file = open_append(&self.live)?;
        self.written = 0;
        Ok(())
    }

    /// Write `data`, rotating as often as the cap requires.
    pub fn write_all(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            if self.written >= self.max_bytes {
                self.rotate()?;
            }
            let room = (self.max_bytes - self.written) as usize;
            let n = room.min(data.len());
            self.file.write_all(&data[..n])?;
            self.written += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Copy `src` until end of file.
    pub fn pump(mut self, mut src: impl Read) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match src.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if self.write_all(&buf[..n]).is_err() {
                        // Keep draining so the task never blocks on a full pipe.
                        continue;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

fn open_append(p: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_rotates_keeping_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("0.stdout");
        let mut w = RotatingWriter::open(&live, 10, 3).unwrap();
        for i in 0..5u8 {
            w.write_all(&[b'a' + i; 10]).unwrap();
        }
        let files = files_oldest_first(&live);
        assert_eq!(
            files,
            vec![rotated(&live, 2), rotated(&live, 1), live.clone()]
        );
        let all: Vec<u8> = files
            .iter()
            .flat_map(|f| std::fs::read(f).unwrap())
            .collect();
        assert_eq!(all, b"ccccccccccddddddddddeeeeeeeeee".to_vec());
    }

    #[test]
    fn one_file_kept_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("0.stderr");
        let mut w = RotatingWriter::open(&live, 4, 1).unwrap();
        w.write_all(b"abcdefg").unwrap();
        assert_eq!(std::fs::read(&live).unwrap(), b"efg");
        assert_eq!(files_oldest_first(&live), vec![live]);
    }

    #[test]
    fn files_are_private_and_symlinks_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("0.stdout");
        let mut w = RotatingWriter::open(&live, 4, 2).unwrap();
        w.write_all(b"abcdefg").unwrap();
        for f in files_oldest_first(&live) {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", f.display());
        }
        let other = dir.path().join("target");
        std::fs::write(&other, b"keep").unwrap();
        let link = dir.path().join("1.stdout");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        assert!(RotatingWriter::open(&link, 4, 2).is_err());
        assert_eq!(std::fs::read(&other).unwrap(), b"keep");
    }

    #[test]
    fn appends_to_an_existing_file_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("x");
        std::fs::write(&live, b"12345678").unwrap();
        let mut w = RotatingWriter::open(&live, 10, 2).unwrap();
        w.write_all(b"9012").unwrap();
        assert_eq!(std::fs::read(rotated(&live, 1)).unwrap(), b"1234567890");
        assert_eq!(std::fs::read(&live).unwrap(), b"12");
    }
}
