//! Cgroups: the fence around every task.
//!
//! A task Muster runs must get the memory, CPUs and GPUs it was placed with and nothing more,
//! and when the scheduler says stop, every process it started must stop, including ones it
//! forks while being stopped. The kernel's cgroups do all of that; this module is the small
//! amount of code that drives them, behind one trait, [`Cgroups`], with two implementations:
//!
//! * [`V2Cgroups`], for the unified hierarchy that production hosts mostly run. Limits are
//!   `memory.max`, `memory.swap.max = 0`, `cpu.max`, `cpuset.cpus` and `pids.max`, after the
//!   controllers are switched on in `cgroup.subtree_control` of every level above the task.
//!   Cgroup v2 has no devices controller: device access is decided by an eBPF program of type
//!   `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the task's cgroup (see `bpf.rs`, which builds the
//!   instructions in plain Rust and holds the only `unsafe` in this module: the `bpf(2)` calls).
//! * [`V1Cgroups`], for hosts with the legacy per-controller hierarchies. Each controller
//!   (memory, cpu, cpuset, pids, devices, freezer; cpuacct and blkio when mounted) has its own
//!   tree, so a task joins one directory per hierarchy. Devices are a `devices.deny`/`allow`
//!   whitelist; memory includes `memsw` so a greedy task is OOM-killed rather than swapped.
//!
//! Both take the root of the hierarchy as a path ("file-system code rooted at a path", after
//! youki's `CgroupManager`), so the same code is tested on a temp dir, where control files are
//! ordinary files, and, as root, on the real hierarchy. [`detect`] picks the version at start
//! and logs it.
//!
//! **Layout.** Tasks live at `<root>/<parent>/<name>` (v2) or `<root>/<controller>/<parent>/<name>`
//! (v1), where `parent` is Muster's own subtree ("muster", or a delegated path such as
//! `system.slice/muster-agent.service/tasks`) and `name` is one path component per task.
//! `create` is idempotent and declarative: calling it again applies the new [`Limits`], and a
//! limit that is `None` is reset to "unlimited" rather than left as it was.
//!
//! **The device whitelist** is the same on both versions: `/dev/null`, `zero`, `full`,
//! `random`, `urandom`, `tty`, `ptmx`, `/dev/pts/*`, `nvidiactl`, `nvidia-modeset`,
//! `nvidia-uvm`(-tools) (major read from `/proc/devices`), and `/dev/nvidia<minor>` for exactly
//! the GPUs the task was given. Everything else is denied, so a task that opens another GPU's
//! node gets EPERM even though the node exists.
//!
//! **Killing.** A process that forks while we walk `cgroup.procs` could escape a plain loop of
//! `kill(2)`s. So `kill_all` uses v2's `cgroup.kill` for SIGKILL when the kernel has it
//! (atomic against fork); otherwise it freezes the cgroup (v1 `freezer.state`, v2
//! `cgroup.freeze`), waits until the kernel reports it frozen, so the set of processes cannot
//! change, signals every one, and thaws. The signals are delivered as the tasks thaw.
//!
//! **Blocking.** All methods do small synchronous file I/O; `kill_all` may sleep while waiting
//! for a freeze (up to a few seconds). Async callers should use `spawn_blocking`.

mod bpf;
#[cfg(test)]
mod testutil;
mod util;
mod v1;
mod v2;

use std::fmt;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

pub use v1::V1Cgroups;
pub use v2::V2Cgroups;

/// Limits for one task's cgroup. `None` means unlimited (or, for `cpuset`, the parent's CPUs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Hard memory limit in bytes; the task is OOM-killed beyond it and never swaps.
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in thousandths of a CPU (1500 = one and a half CPUs).
    pub cpu_millis: Option<u32>,
    /// CPU ids the task may run on.
    pub cpuset: Option<Vec<u32>>,
    /// Maximum number of processes and threads.
    pub pids_max: Option<u64>,
    /// Minor numbers of the `/dev/nvidia<N>` devices the task may open.
    pub gpu_minors: Vec<u32>,
}

/// Which cgroup interface a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

impl fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "cgroup v1",
            CgroupVersion::V2 => "cgroup v2",
        })
    }
}

/// What went wrong, with the path (or name) involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup or parent name that is not a plain path component.
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A required v1 controller hierarchy is not mounted.
    #[error("cgroup v1 controller {controller:?} is not mounted at {path}")]
    MissingController {
        /// The controller, e.g. "memory".
        controller: &'static str,
        /// Where its hierarchy was expected.
        path: PathBuf,
    },
    /// A v2 controller Muster needs is not offered by the kernel at this level.
    #[error("cgroup v2 controller {controller:?} is not available in {path}")]
    ControllerUnavailable {
        /// The controller, e.g. "cpuset".
        controller: &'static str,
        /// The `cgroup.controllers` file that lacks it.
        path: PathBuf,
    },
    /// Neither a v2 nor a v1 hierarchy was found.
    #[error("no cgroup hierarchy at {path}: neither cgroup.controllers (v2) nor memory/ (v1)")]
    NotDetected {
        /// The root that was searched.
        path: PathBuf,
    },
    /// A limit that cannot be expressed.
    #[error("invalid limit for {path}: {detail}")]
    InvalidLimit {
        /// The cgroup.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Creating a cgroup directory failed.
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing a control file failed.
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        /// The control file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading a control file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A control file held something unexpected.
    #[error("unexpected contents in {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The cgroup still holds processes, so it cannot be removed.
    #[error("cannot remove cgroup {path}: processes remain: {pids:?}")]
    Busy {
        /// The cgroup directory.
        path: PathBuf,
        /// The processes found in it.
        pids: Vec<i32>,
    },
    /// Removing a cgroup directory failed for another reason.
    #[error("cannot remove cgroup {path}: {source}")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `kill(2)` failed for a reason other than the process having exited.
    #[error("cannot signal process {pid} in {path}: {source}")]
    Signal {
        /// The cgroup.
        path: PathBuf,
        /// The process.
        pid: i32,
        /// The errno.
        source: nix::errno::Errno,
    },
    /// The freezer did not report the cgroup frozen in time (a task stuck in the kernel).
    /// The processes seen were still signalled and the cgroup thawed; retry.
    #[error("cgroup {path} did not freeze within {waited_ms} ms; signalled what was visible")]
    FreezeTimeout {
        /// The freezer control file.
        path: PathBuf,
        /// How long we waited.
        waited_ms: u64,
    },
    /// Loading or attaching the v2 eBPF device filter failed.
    #[error("eBPF device filter for {path}: {op} failed: {source}{log}")]
    Bpf {
        /// The cgroup.
        path: PathBuf,
        /// The bpf(2) command, e.g. "BPF_PROG_LOAD".
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
        /// The verifier's log, prefixed with a newline, when there is one.
        log: String,
    },
}

/// A cgroup backend: creates, fills, signals and removes the cgroups of Muster's tasks.
///
/// Every fallible method rejects a `name` that is not one plain path component with
/// [`CgroupError::InvalidName`], so no call can reach outside Muster's subtree.
pub trait Cgroups: Send + Sync + fmt::Debug {
    /// Which interface this backend drives.
    fn version(&self) -> CgroupVersion;

    /// Creates the cgroup `name` (a single path component, e.g. "job-12.0-a7") under Muster's
    /// parent, creating the parent levels as needed, and applies `limits`. Idempotent: calling
    /// again re-applies the (possibly changed) limits.
    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError>;

    /// Every `cgroup.procs` file a process must be written into to join `name`: one for v2,
    /// one per mounted hierarchy Muster uses for v1.
    fn procs_files(&self, name: &str) -> Vec<PathBuf>;

    /// Moves process `pid` (all its threads) into `name` by writing it to every
    /// [`procs_files`](Cgroups::procs_files) entry.
    fn add_process(&self, name: &str, pid: i32) -> Result<(), CgroupError> {
        util::validate_name(name)?;
        let value = pid.to_string();
        for file in self.procs_files(name) {
            util::write(&file, &value)?;
        }
        Ok(())
    }

    /// The processes in the cgroup (and any cgroup below it), sorted, without duplicates.
    fn pids(&self, name: &str) -> Result<Vec<i32>, CgroupError>;

    /// Sends `signal` to every process in the cgroup without missing one forked meanwhile:
    /// SIGKILL goes through v2 `cgroup.kill` where available, otherwise the cgroup is frozen,
    /// signalled and thawed. A cgroup that does not exist holds nothing to signal: `Ok`.
    fn kill_all(&self, name: &str, signal: Signal) -> Result<(), CgroupError>;

    /// True if the kernel OOM-killed a process in this cgroup (v2 `memory.events` `oom_kill`;
    /// v1 `memory.oom_control` `oom_kill`, or on kernels before 4.13 `memory.failcnt > 0`,
    /// which means the limit was hit).
    fn oom_killed(&self, name: &str) -> Result<bool, CgroupError>;

    /// Removes the cgroup. Kills nothing: fails with [`CgroupError::Busy`] if processes remain.
    /// A cgroup that does not exist is `Ok`.
    fn remove(&self, name: &str) -> Result<(), CgroupError>;
}

/// Finds the cgroup version mounted at `root` (normally `/sys/fs/cgroup`), logs it, and
/// returns the backend for Muster's subtree `parent` (e.g. "muster").
///
/// A `cgroup.controllers` file at the root means the unified (v2) hierarchy; its memory, cpu,
/// cpuset and pids controllers must be available, and device filtering uses eBPF. Otherwise a
/// `memory/` directory means v1 (in "hybrid" mode, a v2 mount at `unified/` without
/// controllers is ignored); its required controllers must all be mounted.
pub fn detect(root: &Path, parent: &str) -> Result<Box<dyn Cgroups>, CgroupError> {
    if root.join("cgroup.controllers").is_file() {
        let cgroups = V2Cgroups::new(root, parent)?;
        cgroups.check_controllers()?;
        tracing::info!(root = %root.display(), parent, "using cgroup v2 (unified hierarchy)");
        return Ok(Box::new(cgroups));
    }
    if root.join("memory").is_dir() {
        let cgroups = V1Cgroups::new(root, parent)?;
        cgroups.check_mounts()?;
        let hybrid = root.join("unified").join("cgroup.controllers").is_file();
        tracing::info!(root = %root.display(), parent, hybrid, "using cgroup v1 (legacy hierarchies)");
        return Ok(Box::new(cgroups));
    }
    Err(CgroupError::NotDetected {
        path: root.to_owned(),
    })
}

/// The cgroup v1 backend rooted at `root` (the directory holding `memory/`, `cpu/`, …), for
/// Muster's subtree `parent`. Works on a plain directory too (tests).
pub fn v1(root: &Path, parent: &str) -> Result<V1Cgroups, CgroupError> {
    V1Cgroups::new(root, parent)
}

/// The cgroup v2 backend rooted at `root`, for Muster's subtree `parent`. It always installs
/// the eBPF device filter and `create` fails if it cannot; tests on a plain directory use
/// [`V2Cgroups::without_device_filter`].
pub fn v2(root: &Path, parent: &str) -> Result<V2Cgroups, CgroupError> {
    V2Cgroups::new(root, parent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn detect_prefers_v2_then_v1_then_fails() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(matches!(
            detect(root, "muster"),
            Err(CgroupError::NotDetected { .. })
        ));

        for c in ["memory", "cpu", "cpuset", "devices", "pids"] {
            fs::create_dir(root.join(c)).unwrap();
        }
        let missing = detect(root, "muster").unwrap_err();
        assert!(
            matches!(&missing, CgroupError::MissingController { controller: "freezer", path }
                if path == &root.join("freezer")),
            "{missing}"
        );
        fs::create_dir(root.join("freezer")).unwrap();
        assert_eq!(detect(root, "muster").unwrap().version(), CgroupVersion::V1);

        fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory\n").unwrap();
        let err = detect(root, "muster").unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::ControllerUnavailable {
                    controller: "pids",
                    ..
                }
            ),
            "{err}"
        );
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(detect(root, "muster").unwrap().version(), CgroupVersion::V2);
    }

    #[test]
    fn errors_name_the_path() {
        let err = CgroupError::Busy {
            path: PathBuf::from("/sys/fs/cgroup/muster/job-1"),
            pids: vec![42],
        };
        assert_eq!(
            err.to_string(),
            "cannot remove cgroup /sys/fs/cgroup/muster/job-1: processes remain: [42]"
        );
    }
}
