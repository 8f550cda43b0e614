//! The per-task supervisor ("shim").
//!
//! The agent never runs a task as its own child. It starts a small shim
//! process (the agent's own executable with a hidden `__shim` argument) in a
//! new session; the shim starts the task and waits for it, and writes the
//! task's pid and then its exit status into the task's folder. Because the
//! shim — not the agent — is the task's parent, and stdout/stderr go straight
//! to files, an agent restart (an upgrade, a crash, `kill -9`) leaves tasks
//! running and their exit status recorded; the restarted agent re-adopts them
//! from those files.
//!
//! Between `fork` and `exec` the task's child process joins its cgroup (by
//! writing to file descriptors opened beforehand), starts its own session (so
//! the whole process group can be signalled), drops to the submitting user
//! (`setgroups`, `setgid`, `setuid`, in that order), sets the usual umask
//! (022; the agent's own is 077) and changes to its working directory as
//! that user. Only async-signal-safe calls happen there.
//!
//! Before that the shim makes the task's checkpoint directory, as the user
//! or, for the scheduler's default, safely as root ([`super::userdir`]); a
//! directory it cannot make fails the task, with the path in the message.
//!
//! The shim's stdin is the task's `lock` file, which the agent locked
//! (`flock`) before starting it: the lock is held exactly as long as some
//! shim lives, so a restarted agent can tell a record whose supervisor never
//! started from one whose supervisor runs (see `launch.rs`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

/// Everything the shim needs, written by the agent as `shim.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimSpec {
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    /// `None`: run with the shim's own identity (an unprivileged agent).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: Vec<u32>,
    /// Files the task's pid is written into to join its cgroup.
    pub cgroup_procs: Vec<PathBuf>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Where the shim records the task's pid once it started.
    pub pid_file: PathBuf,
    /// Where the shim records how the task ended.
    pub exit_file: PathBuf,
    /// Each log file is rotated at this size (0: the default, 64 MiB).
    #[serde(default)]
    pub log_max_bytes: u64,
    /// Files kept per stream, the live one included (0: the default, 3).
    #[serde(default)]
    pub log_files: u32,
    /// The agent's lease file; `None` turns self-fencing off (see [`super::fence`]).
    #[serde(default)]
    pub lease_file: Option<PathBuf>,
    /// Where to leave the marker when the task is frozen for want of a lease.
    #[serde(default)]
    pub fence_marker: Option<PathBuf>,
    /// The job's user, for messages.
    #[serde(default)]
    pub user: String,
    /// The checkpoint directory to make before the task starts.
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    /// The scheduler's `checkpoint_root`, when `checkpoint_dir` is its
    /// default `<checkpoint_root>/<job id>` (see [`super::userdir`]).
    #[serde(default)]
    pub checkpoint_root: Option<PathBuf>,
}

/// Default cap of one log file.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 64 << 20;
/// Default number of files kept per stream.
pub const DEFAULT_LOG_FILES: u32 = 3;
/// How often the shim checks the lease while its task runs.
const POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// How long the shim waits, after the task exited, for its output to drain
/// (an orphan that keeps the pipe open must not hold up the exit record).
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How a task ended, as the shim saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when the task could not be started at all.
    pub message: String,
}

/// Write `data` to `path` atomically and durably: a temporary file readable
/// only by its owner (0600, whatever the umask), fsync, rename over `path`,
/// fsync of the folder. A reader sees the old contents or the new, never a
/// part, even after a crash.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The shim's `main`: run the task described in `spec_path`, record its pid
/// and exit status, and return the process exit code for the shim itself.
pub fn run(spec_path: &Path) -> i32 {
    // Leave the agent's session so a signal to the agent (Ctrl-C in a
    // terminal, systemd stopping the agent) does not reach the task.
    let _ = nix::unistd::setsid();
    let spec: ShimSpec = match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("muster shim: cannot read {}: {e}", spec_path.display());
            return 2;
        }
    };
    let record = match spawn_and_wait(&spec) {
        Ok(r) => r,
        Err(e) => ExitRecord {
            message: e,
            ..ExitRecord::default()
        },
    };
    let data = serde_json::to_vec(&record).unwrap_or_default();
    if let Err(e) = write_atomic(&spec.exit_file, &data) {
        eprintln!(
            "muster shim: cannot write {}: {e}",
            spec.exit_file.display()
        );
        return 3;
    }
    0
}

fn log_writer(spec: &ShimSpec, p: &Path) -> Result<super::logs::RotatingWriter, String> {
    let max = match spec.log_max_bytes {
        0 => DEFAULT_LOG_MAX_BYTES,
        n => n,
    };
    let keep = match spec.log_files {
        0 => DEFAULT_LOG_FILES,
        n => n,
    };
    super::logs::RotatingWriter::open(p, max, keep)
        .map_err(|e| format!("cannot open log file {}: {e}", p.display()))
}

/// Copy a pipe into its log on a thread; the receiver hears when it is drained.
fn pump(
    w: super::logs::RotatingWriter,
    src: Option<impl std::io::Read + Send + 'static>,
    done: std::sync::mpsc::Sender<()>,
) {
    if let Some(src) = src {
        std::thread::spawn(move || {
            w.pump(src);
            let _ = done.send(());
        });
    } else {
        let _ = done.send(());
    }
}

/// Make the checkpoint directory (see [`super::userdir`]).
fn prepare_checkpoint_dir(spec: &ShimSpec) -> Result<(), String> {
    let Some(dir) = &spec.checkpoint_dir else {
        return Ok(());
    };
    let owner = match (spec.uid, spec.gid) {
        (Some(uid), Some(gid)) => Some(super::userdir::Owner {
            name: &spec.user,
            uid,
            gid,
            groups: &spec.groups,
        }),
        _ => None,
    };
    super::userdir::prepare(dir, spec.checkpoint_root.as_deref(), owner.as_ref())
        .map_err(|e| format!("checkpoint directory {e}"))
}

fn spawn_and_wait(spec: &ShimSpec) -> Result<ExitRecord, String> {
    let program = spec.command.first().ok_or("empty command")?;
    prepare_checkpoint_dir(spec)?;
    let procs: Vec<OwnedFd> = spec
        .cgroup_procs
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map(OwnedFd::from)
                .map_err(|e| format!("cannot open {}: {e}", p.display()))
        })
        .collect::<Result<_, _>>()?;
    let workdir = CString::new(spec.workdir.as_os_str().as_encoded_bytes())
        .map_err(|_| "workdir contains a NUL byte".to_string())?;
    let out_log = log_writer(spec, &spec.stdout)?;
    let err_log = log_writer(spec, &spec.stderr)?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(&spec.command[1..])
        .env_clear()
        .envs(&spec.env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let identity = Identity {
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.clone(),
    };
    let raw_procs: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    setup_child(&mut cmd, raw_procs, identity, workdir);
    let mut child = cmd
        .spawn()
        .map_err(|e| spawn_error(program, &spec.workdir, &e))?;
    drop(procs);
    // Threads only from here on: the fork is behind us.
    let (drained_tx, drained) = std::sync::mpsc::channel();
    pump(out_log, child.stdout.take(), drained_tx.clone());
    pump(err_log, child.stderr.take(), drained_tx);
    let pid = child.id();
    write_atomic(&spec.pid_file, pid.to_string().as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", spec.pid_file.display()))?;
    let (exit_tx, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exit_tx.send(child.wait());
    });
    let status = loop {
        match exited.recv_timeout(POLL) {
            Ok(status) => break status.map_err(|e| format!("waiting for task {pid}: {e}"))?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let (Some(lease), Some(marker)) = (&spec.lease_file, &spec.fence_marker) {
                    if super::fence::check(lease, marker, pid, &spec.cgroup_procs) {
                        eprintln!("muster shim: agent lease passed; task {pid} frozen");
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(format!("lost track of task {pid}"));
            }
        }
    };
    let until = std::time::Instant::now() + DRAIN_WAIT;
    for _ in 0..2 {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if drained.recv_timeout(left).is_err() {
            break;
        }
    }
    Ok(ExitRecord {
        code: status.code(),
        signal: status.signal(),
        message: String::new(),
    })
}

/// Why the task did not start, naming what is at fault: the child's
/// `chdir` and `execve` failures look alike (both ENOENT or EACCES), so a
/// missing or closed working directory is told apart by looking at it.
fn spawn_error(program: &str, workdir: &std::path::Path, e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match std::fs::metadata(workdir) {
        Err(w) if w.kind() == ErrorKind::NotFound => format!(
            "cannot start {program:?}: the working directory {} does not exist (--workdir)",
            workdir.display()
        ),
        Ok(m) if !m.is_dir() => format!(
            "cannot start {program:?}: the working directory {} is not a directory (--workdir)",
            workdir.display()
        ),
        _ if e.kind() == ErrorKind::PermissionDenied => format!(
            "cannot start {program:?}: permission denied (to the program, or to the working directory {})",
            workdir.display()
        ),
        _ => format!("cannot start {program:?}: {e}"),
    }
}

struct Identity {
    uid: Option<u32>,
    gid: Option<u32>,
    groups: Vec<u32>,
}

/// Install the between-fork-and-exec steps. See the module docs.
#[allow(unsafe_code)]
fn setup_child(cmd: &mut std::process::Command, procs: Vec<i32>, id: Identity, workdir: CString) {
    use nix::unistd::{Gid, Uid};
    let groups: Vec<Gid> = id.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    // SAFETY: the closure runs in the forked child of a single-threaded shim
    // and makes only async-signal-safe system calls (write, setsid,
    // setgroups, setgid, setuid, umask, chdir) on data prepared before the fork; it
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &procs {
                let fd = std::os::fd::BorrowedFd::borrow_raw(*fd);
                nix::unistd::write(fd, b"0\n").map_err(std::io::Error::from)?;
            }
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if let (Some(uid), Some(gid)) = (id.uid, id.gid) {
                nix::unistd::setgroups(&groups).map_err(std::io::Error::from)?;
                nix::unistd::setgid(Gid::from_raw(gid)).map_err(std::io::Error::from)?;
                nix::unistd::setuid(Uid::from_raw(uid)).map_err(std::io::Error::from)?;
            }
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            nix::unistd::chdir(workdir.as_c_str()).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_workdir_is_named() {
        let e = std::io::Error::from(std::io::ErrorKind::NotFound);
        let m = spawn_error("sh", std::path::Path::new("/no/such/run"), &e);
        assert!(
            m.contains("working directory /no/such/run does not exist"),
            "{m}"
        );
        let m = spawn_error("nope", std::path::Path::new("/"), &e);
        assert!(m.starts_with("cannot start \"nope\": "), "{m}");
        assert!(!m.contains("working directory"), "{m}");
    }
}
