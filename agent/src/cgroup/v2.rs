//! The cgroup v2 backend: one unified hierarchy, devices filtered by eBPF.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::Signal;

use super::util::{self, FREEZE_TIMEOUT};
use super::{bpf, CgroupError, CgroupVersion, Cgroups, Limits};

/// Controllers every level above a task must delegate to it.
const CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuset", "pids"];

/// Cgroup v2 backend rooted at the unified hierarchy's mount.
#[derive(Debug)]
pub struct V2Cgroups {
    root: PathBuf,
    parent: Vec<String>,
    proc_devices: PathBuf,
    /// Whether `create` attaches the eBPF device filter. Only the test constructor turns it off.
    device_filter: bool,
    warned_no_swap: AtomicBool,
}

impl V2Cgroups {
    /// Backend for Muster's subtree `parent` below `root`. `create` always installs the eBPF
    /// device filter and fails if the kernel refuses it.
    pub fn new(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        Ok(Self {
            root: root.to_owned(),
            parent: util::parse_parent(parent)?,
            proc_devices: PathBuf::from("/proc/devices"),
            device_filter: true,
            warned_no_swap: AtomicBool::new(false),
        })
    }

    /// Like [`new`](Self::new) but `create` leaves devices unrestricted. Only for tests on a
    /// plain directory, where there is no cgroup to attach an eBPF program to; a task in such
    /// a cgroup can open every GPU.
    pub fn without_device_filter(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        Ok(Self {
            device_filter: false,
            ..Self::new(root, parent)?
        })
    }

    /// Reads the `nvidia-uvm` major from `path` instead of `/proc/devices` (tests).
    pub fn with_proc_devices(mut self, path: &Path) -> Self {
        path.clone_into(&mut self.proc_devices);
        self
    }

    /// Fails with [`CgroupError::ControllerUnavailable`] if the root does not offer one of
    /// memory, cpu, cpuset and pids.
    pub fn check_controllers(&self) -> Result<(), CgroupError> {
        let path = self.root.join("cgroup.controllers");
        let text = util::read(&path)?;
        let available: Vec<&str> = text.split_whitespace().collect();
        match CONTROLLERS.into_iter().find(|c| !available.contains(c)) {
            Some(controller) => Err(CgroupError::ControllerUnavailable { controller, path }),
            None => Ok(()),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        let mut dir = self.root.clone();
        dir.extend(&self.parent);
        dir.join(name)
    }

    /// Switches the controllers on from the root down to Muster's parent, creating the levels.
    /// A level below the root must hold no processes for this to succeed ("no internal
    /// processes"), which is why tasks live in leaves of their own.
    fn delegate_controllers(&self) -> Result<(), CgroupError> {
        let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        let mut dir = self.root.clone();
        util::write(&dir.join("cgroup.subtree_control"), &enable)?;
        for level in &self.parent {
            dir.push(level);
            util::ensure_dir(&dir)?;
            util::write(&dir.join("cgroup.subtree_control"), &enable)?;
        }
        Ok(())
    }

    fn apply_memory(&self, dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
        let max = limits
            .memory_bytes
            .map_or_else(|| "max".to_owned(), |b| b.to_string());
        util::write(&dir.join("memory.max"), &max)?;
        let swap = dir.join("memory.swap.max");
        if swap.is_file() {
            util::write(&swap, "0")?;
        } else if !self.warned_no_swap.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                path = %swap.display(),
                "no memory.swap.max (swap accounting off): tasks may swap instead of being OOM-killed"
            );
        }
        Ok(())
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
        self.apply_memory(dir, limits)?;
        let quota = limits
            .cpu_millis
            .map_or_else(|| "max".to_owned(), |m| util::cpu_quota_us(m).to_string());
        util::write(
            &dir.join("cpu.max"),
            &format!("{quota} {}", util::CPU_PERIOD_US),
        )?;
        // An empty cpuset.cpus means "the parent's CPUs" in v2.
        let cpus = match &limits.cpuset {
            Some(list) if list.is_empty() => {
                return Err(CgroupError::InvalidLimit {
                    path: dir.to_owned(),
                    detail: "an empty cpuset leaves the task nowhere to run".to_owned(),
                })
            }
            Some(list) => util::format_cpu_list(list),
            None => "\n".to_owned(),
        };
        util::write(&dir.join("cpuset.cpus"), &cpus)?;
        let pids = limits
            .pids_max
            .map_or_else(|| "max".to_owned(), |n| n.to_string());
        util::write(&dir.join("pids.max"), &pids)
    }

    fn freeze(dir: &Path, frozen: bool) -> Result<(), CgroupError> {
        util::write(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })
    }

    /// Waits for `cgroup.events` to say `frozen 1`.
    fn wait_frozen(dir: &Path) -> Result<bool, CgroupError> {
        let events = dir.join("cgroup.events");
        util::wait_until(FREEZE_TIMEOUT, || {
            Ok(util::stat_value(&util::read(&events)?, "frozen") == Some("1"))
        })
    }
}

impl Cgroups for V2Cgroups {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        util::validate_name(name)?;
        self.check_controllers()?;
        self.delegate_controllers()?;
        let dir = self.dir(name);
        util::ensure_dir(&dir)?;
        self.apply(&dir, limits)?;
        if self.device_filter {
            let uvm = util::nvidia_uvm_major(&self.proc_devices)?;
            bpf::install(&dir, &util::device_whitelist(&limits.gpu_minors, uvm))?;
        }
        Ok(())
    }

    fn procs_files(&self, name: &str) -> Vec<PathBuf> {
        vec![self.dir(name).join("cgroup.procs")]
    }

    fn pids(&self, name: &str) -> Result<Vec<i32>, CgroupError> {
        util::validate_name(name)?;
        let mut pids = Vec::new();
        util::pids_recursive(&self.dir(name), &mut pids)?;
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn kill_all(&self, name: &str, signal: Signal) -> Result<(), CgroupError> {
        util::validate_name(name)?;
        let dir = self.dir(name);
        if !dir.is_dir() {
            return Ok(());
        }
        let kill = dir.join("cgroup.kill");
        if signal == Signal::SIGKILL && kill.is_file() {
            // Linux ≥ 5.14: the kernel kills the whole subtree, racing forks included.
            return util::write(&kill, "1");
        }
        Self::freeze(&dir, true)?;
        // From here on the cgroup must be thawed whatever happens.
        let frozen = Self::wait_frozen(&dir);
        let signalled = self
            .pids(name)
            .and_then(|pids| util::signal_all(&dir, &pids, signal));
        Self::freeze(&dir, false)?;
        if frozen? {
            return signalled;
        }
        signalled?;
        Err(CgroupError::FreezeTimeout {
            path: dir.join("cgroup.freeze"),
            waited_ms: FREEZE_TIMEOUT.as_millis() as u64,
        })
    }

    fn oom_killed(&self, name: &str) -> Result<bool, CgroupError> {
        util::validate_name(name)?;
        let events = self.dir(name).join("memory.events");
        let text = util::read(&events)?;
        match util::stat_value(&text, "oom_kill") {
            Some(count) => util::parse_count(&events, count).map(|n| n > 0),
            None => Err(CgroupError::Parse {
                path: events,
                detail: "no oom_kill line".to_owned(),
            }),
        }
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        util::validate_name(name)?;
        let dir = self.dir(name);
        let pids = self.pids(name)?;
        if !pids.is_empty() {
            return Err(CgroupError::Busy { path: dir, pids });
        }
        util::remove_cgroup_dir(&dir)
    }
}

#[cfg(test)]
#[path = "v2_tests.rs"]
mod tests;
