//! Launching a task, in an order that survives a crash at any point.
//!
//! 1. The task's folder `tasks/<job>.<task>.<alloc>/` and its log folder
//!    (0700, inside the agent's data folder, which only root may enter).
//! 2. Its cgroup.
//! 3. `shim.json`, what the shim runs (0600: it holds the job's environment).
//! 4. `task.json`, the record adoption reads, written atomically and durably
//!    (temporary file, fsync, rename, fsync of the folder), *before* any
//!    supervisor exists.
//! 5. `lock`, locked (`flock`) by the agent and given to the shim as its
//!    stdin: from its first instruction the shim holds the lock, and holds
//!    it as long as it lives, whichever agent started it.
//! 6. The shim; the agent then drops its own copy of the lock.
//!
//! A crash before 4 leaves a folder without a record: adoption skips it and
//! the next assignment set launches the task (every step is idempotent). A
//! crash between 4 and 6 leaves a record whose lock nobody holds and no exit
//! record: the restarted agent reports the task exited ("its supervisor never
//! started") and, since reconcile never starts a key it has, does not start
//! it a second time; the scheduler decides what follows. After 6 the lock is
//! held while the shim runs, so an adopted task is never taken for dead.

use super::identity::{self, Who};
use super::shim::{self, ExitRecord, ShimSpec};
use super::{fence, Runtime, TaskMeta};
use crate::cgroup::Limits;
use crate::reconcile::TaskKey;
use muster_proto as pb;
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The file whose lock a live shim holds.
pub(super) const LOCK: &str = "lock";

/// A task whose record is written and whose shim is yet to start.
pub(super) struct Prepared {
    pub meta: TaskMeta,
    pub dir: PathBuf,
    spec_path: PathBuf,
}

/// Create `dir` (and its parents) as private to root (0700).
pub(super) fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

impl Runtime {
    /// Steps 1 to 4 (see the module docs).
    pub(super) fn prepare(&self, key: TaskKey, a: &pb::TaskAssignment) -> Result<Prepared, String> {
        let who = identity::resolve(&a.user, self.settings.allow_root_jobs)?;
        let dir = self.task_dir(key);
        private_dir(&dir)?;
        let stdout = self.log_path(key.job, key.task, "stdout");
        if let Some(parent) = stdout.parent() {
            private_dir(parent)?;
        }
        let (cgroup, procs) = match &self.cgroups {
            Some(cg) => {
                let name = format!("job{}.t{}.a{}", key.job, key.task, key.alloc);
                let limits = Limits {
                    memory_bytes: Some(a.memory_bytes).filter(|m| *m > 0),
                    cpu_millis: Some(a.cpu_millis).filter(|c| *c > 0),
                    cpuset: None,
                    pids_max: None,
                    gpu_minors: a.gpu_minors.clone(),
                };
                cg.create(&name, &limits).map_err(|e| e.to_string())?;
                let procs = cg.procs_files(&name);
                (Some(name), procs)
            }
            None => (None, vec![]),
        };
        let spec = self.spec(key, a, &who, &dir, procs);
        let spec_path = dir.join("shim.json");
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| e.to_string())?;
        shim::write_atomic(&spec_path, &json)
            .map_err(|e| format!("cannot write {}: {e}", spec_path.display()))?;
        let meta = TaskMeta {
            key,
            gpus: a.gpu_indices.clone(),
            cgroup,
            shim_pid: 0,
            stop_signal: a.stop_signal,
            grace_ms: a.grace_ms,
            kill_on_checkpoint: a.kill_on_checkpoint,
            uid: Some(who.uid),
        };
        write_record(&dir, &meta)?;
        Ok(Prepared {
            meta,
            dir,
            spec_path,
        })
    }

    /// What the shim runs.
    fn spec(
        &self,
        key: TaskKey,
        a: &pb::TaskAssignment,
        who: &Who,
        dir: &Path,
        procs: Vec<PathBuf>,
    ) -> ShimSpec {
        let mut env: BTreeMap<String, String> = a.env.clone().into_iter().collect();
        identity::base_env(&mut env, who);
        let visible = a
            .gpu_indices
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(",");
        env.insert("CUDA_VISIBLE_DEVICES".into(), visible.clone());
        env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
        env.insert("MUSTER_GPUS".into(), visible);
        env.insert(
            "MUSTER_AGENT_SOCKET".into(),
            self.settings.task_socket.to_string_lossy().into_owned(),
        );
        let workdir = if a.workdir.is_empty() {
            who.home.clone()
        } else {
            PathBuf::from(&a.workdir)
        };
        let nonempty = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        ShimSpec {
            command: a.command.clone(),
            env,
            workdir,
            uid: who.switch.then_some(who.uid),
            gid: who.switch.then_some(who.gid),
            groups: who.groups.clone(),
            cgroup_procs: procs,
            stdout: self.log_path(key.job, key.task, "stdout"),
            stderr: self.log_path(key.job, key.task, "stderr"),
            pid_file: dir.join("pid"),
            exit_file: dir.join("exit.json"),
            log_max_bytes: self.settings.log_max_bytes,
            log_files: self.settings.log_files,
            lease_file: self.settings.lease_file.clone(),
            fence_marker: Some(dir.join(fence::MARKER)),
            user: who.name.clone(),
            checkpoint_dir: nonempty(&a.checkpoint_dir),
            checkpoint_root: nonempty(&a.checkpoint_root),
        }
    }

    /// Steps 5 and 6: start the shim holding the lock. A failure is
    /// recorded as the task's exit, so adoption finds the same outcome.
    pub(super) fn spawn_shim(
        &self,
        p: Prepared,
        reaped: std::sync::Arc<tokio::sync::Notify>,
    ) -> Result<TaskMeta, String> {
        let Prepared {
            mut meta,
            dir,
            spec_path,
        } = p;
        let child = self.spawn_locked(&dir, &spec_path).inspect_err(|message| {
            let rec = ExitRecord {
                message: message.clone(),
                ..ExitRecord::default()
            };
            let data = serde_json::to_vec(&rec).unwrap_or_default();
            if let Err(e) = shim::write_atomic(&dir.join("exit.json"), &data) {
                tracing::warn!("cannot record the failed start in {}: {e}", dir.display());
            }
        })?;
        meta.shim_pid = child.id();
        // The shim reparents to init if we die; reap it from a thread meanwhile.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
            reaped.notify_one();
        });
        // The pid only helps a future agent's messages: the lock is what
        // tells whether the shim lives, so a failure here is not fatal.
        if let Err(e) = write_record(&dir, &meta) {
            tracing::warn!(task = %meta.key, "{e}");
        }
        Ok(meta)
    }

    fn spawn_locked(&self, dir: &Path, spec_path: &Path) -> Result<std::process::Child, String> {
        let lock_path = dir.join(LOCK);
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        lock.try_lock()
            .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        #[cfg(test)]
        tests::at_spawn(dir);
        std::process::Command::new(&self.settings.shim_path)
            .arg("__shim")
            .arg(spec_path)
            .stdin(std::process::Stdio::from(lock))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the task supervisor {}: {e}",
                    self.settings.shim_path.display()
                )
            })
    }
}

/// Write `task.json` (step 4).
fn write_record(dir: &Path, meta: &TaskMeta) -> Result<(), String> {
    let json = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
    let path = dir.join("task.json");
    shim::write_atomic(&path, &json).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Whether a shim holds the task's lock; `None` for a folder without one
/// (left by an agent from before the lock existed).
pub(super) fn shim_holds_lock(dir: &Path) -> Option<bool> {
    let f = std::fs::File::open(dir.join(LOCK)).ok()?;
    match f.try_lock() {
        Ok(()) => Some(false), // released when `f` closes
        Err(std::fs::TryLockError::WouldBlock) => Some(true),
        // Cannot tell: assume it lives rather than report a running task dead.
        Err(std::fs::TryLockError::Error(_)) => Some(true),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};

    thread_local! {
        /// What the test hook saw at the moment of the spawn.
        pub static AT_SPAWN: RefCell<Vec<(PathBuf, bool)>> = const { RefCell::new(Vec::new()) };
    }

    /// Called just before the shim is spawned: note whether the record is
    /// already on disk.
    pub fn at_spawn(dir: &Path) {
        let exists = dir.join("task.json").exists();
        AT_SPAWN.with(|v| v.borrow_mut().push((dir.to_path_buf(), exists)));
    }
}
