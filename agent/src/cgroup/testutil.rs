//! Helpers for the cgroup tests that run against the real kernel (as root).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
use nix::unistd::geteuid;

/// The mounted cgroup2 hierarchy (pure v2 at /sys/fs/cgroup, or hybrid's `unified/`), or
/// `None` with the reason printed when the test cannot run here.
pub(crate) fn cgroup2_mount(test: &str) -> Option<PathBuf> {
    if !geteuid().is_root() {
        eprintln!("skipping {test}: needs root to create cgroups");
        return None;
    }
    let found = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| statfs(p).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC));
    if found.is_none() {
        eprintln!("skipping {test}: no cgroup2 hierarchy mounted");
    }
    found
}

/// A cgroup name unique to this process and call.
pub(crate) fn unique(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("t{}-{n}-{label}", std::process::id())
}

/// Polls `f` every 10 ms for up to 10 s.
pub(crate) fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A `/bin/sh` that blocks reading a line before running its script, so the test can move it
/// into a cgroup before it does anything. Killed and reaped on drop.
pub(crate) struct Held {
    child: Option<Child>,
}

impl Held {
    pub(crate) fn spawn(script: &str, capture: bool) -> Self {
        let out = || {
            if capture {
                Stdio::piped()
            } else {
                Stdio::null()
            }
        };
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("read go; {script}"))
            .stdin(Stdio::piped())
            .stdout(out())
            .stderr(out())
            .spawn()
            .expect("spawn /bin/sh");
        Self { child: Some(child) }
    }

    pub(crate) fn pid(&self) -> i32 {
        let child = self.child.as_ref().expect("child");
        i32::try_from(child.id()).expect("pid fits i32")
    }

    /// Writes the pid into each file in `procs`, then lets the script run.
    pub(crate) fn join_and_release(&mut self, procs: &[PathBuf]) {
        for file in procs {
            std::fs::write(file, self.pid().to_string())
                .unwrap_or_else(|e| panic!("join {}: {e}", file.display()));
        }
        let child = self.child.as_mut().expect("child");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("release child");
    }

    pub(crate) fn output(mut self) -> Output {
        self.child
            .take()
            .expect("child")
            .wait_with_output()
            .expect("wait")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A bare cgroup2 directory made by hand (the hybrid `unified/` hierarchy offers no
/// controllers, so `create` cannot run there); killed and removed on drop.
pub(crate) struct TempCgroup {
    pub(crate) path: PathBuf,
}

impl TempCgroup {
    pub(crate) fn new(parent: &Path, name: &str) -> Self {
        let path = parent.join(name);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for TempCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.freeze"), "0");
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        eventually(|| std::fs::remove_dir(&self.path).is_ok() || !self.path.exists());
    }
}
