//! The cgroup v1 backend: one directory per controller hierarchy.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::Signal;

use super::util::{self, FREEZE_TIMEOUT};
use super::{CgroupError, CgroupVersion, Cgroups, Limits};

/// Controllers whose hierarchy must be mounted: each one enforces part of the contract.
const REQUIRED: [&str; 6] = ["memory", "cpu", "cpuset", "devices", "pids", "freezer"];
/// Controllers joined only for accounting; skipped (with one warning) when not mounted.
const OPTIONAL: [&str; 2] = ["cpuacct", "blkio"];

/// One mounted hierarchy: where it is and which of our controllers it carries (several when
/// co-mounted, e.g. `cpu,cpuacct` with `cpu` and `cpuacct` as symlinks to it).
#[derive(Debug)]
struct Hierarchy {
    controllers: Vec<&'static str>,
    mount: PathBuf,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        self.controllers.contains(&controller)
    }
}

/// Cgroup v1 backend rooted at a directory holding one mount per controller.
#[derive(Debug)]
pub struct V1Cgroups {
    root: PathBuf,
    parent: Vec<String>,
    proc_devices: PathBuf,
    warned_optional: AtomicBool,
    warned_no_memsw: AtomicBool,
}

impl V1Cgroups {
    /// Backend for Muster's subtree `parent` below each controller mount in `root`.
    /// Nothing is touched until [`Cgroups::create`].
    pub fn new(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        Ok(Self {
            root: root.to_owned(),
            parent: util::parse_parent(parent)?,
            proc_devices: PathBuf::from("/proc/devices"),
            warned_optional: AtomicBool::new(false),
            warned_no_memsw: AtomicBool::new(false),
        })
    }

    /// Reads the `nvidia-uvm` major from `path` instead of `/proc/devices` (tests).
    pub fn with_proc_devices(mut self, path: &Path) -> Self {
        path.clone_into(&mut self.proc_devices);
        self
    }

    /// Fails with [`CgroupError::MissingController`] naming the first required controller
    /// whose hierarchy is not mounted.
    pub fn check_mounts(&self) -> Result<(), CgroupError> {
        self.hierarchies(true).map(drop)
    }

    /// The mounted hierarchies, deduplicated by their real path. With `strict`, a missing
    /// required controller is an error and missing optional ones are warned about once.
    fn hierarchies(&self, strict: bool) -> Result<Vec<Hierarchy>, CgroupError> {
        let mut found: Vec<Hierarchy> = Vec::new();
        let mut missing_optional = Vec::new();
        for controller in REQUIRED.into_iter().chain(OPTIONAL) {
            let path = self.root.join(controller);
            if !path.is_dir() {
                if !strict {
                    continue;
                }
                if OPTIONAL.contains(&controller) {
                    missing_optional.push(controller);
                    continue;
                }
                return Err(CgroupError::MissingController { controller, path });
            }
            let mount = path
                .canonicalize()
                .map_err(|source| CgroupError::Read { path, source })?;
            match found.iter_mut().find(|h| h.mount == mount) {
                Some(h) => h.controllers.push(controller),
                None => found.push(Hierarchy {
                    controllers: vec![controller],
                    mount,
                }),
            }
        }
        if !missing_optional.is_empty() && !self.warned_optional.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                root = %self.root.display(),
                missing = ?missing_optional,
                "cgroup v1 accounting controllers not mounted; tasks will not be accounted there"
            );
        }
        Ok(found)
    }

    /// `<mount>/<parent…>/<name>`.
    fn dir_in(&self, mount: &Path, name: &str) -> PathBuf {
        let mut dir = mount.to_owned();
        dir.extend(&self.parent);
        dir.join(name)
    }

    /// The task's directory in the hierarchy carrying `controller` (unresolved path).
    fn dir(&self, controller: &str, name: &str) -> PathBuf {
        self.dir_in(&self.root.join(controller), name)
    }

    /// Creates `<mount>/<parent…>/<name>` level by level. In the cpuset hierarchy every level
    /// needs `cpuset.cpus` and `cpuset.mems` before a task can join (ENOSPC otherwise), so
    /// empty ones are filled from the level above; the task's own CPUs are set last.
    fn make_dirs(&self, h: &Hierarchy, name: &str, cpus: Option<&str>) -> Result<(), CgroupError> {
        let mut dir = h.mount.clone();
        let levels = self.parent.iter().map(String::as_str).chain([name]);
        let depth = self.parent.len() + 1;
        for (i, level) in levels.enumerate() {
            let above = dir.clone();
            dir.push(level);
            util::ensure_dir(&dir)?;
            if !h.has("cpuset") {
                continue;
            }
            let leaf = i + 1 == depth;
            // The task's own level always follows its parent's memory nodes.
            if leaf {
                copy_file(&above, &dir, "cpuset.mems")?;
            } else {
                inherit_if_empty(&above, &dir, "cpuset.mems")?;
            }
            match (leaf, cpus) {
                (true, Some(cpus)) => util::write(&dir.join("cpuset.cpus"), cpus)?,
                (true, None) => copy_file(&above, &dir, "cpuset.cpus")?,
                (false, _) => inherit_if_empty(&above, &dir, "cpuset.cpus")?,
            }
        }
        Ok(())
    }

    /// memory.limit_in_bytes, and memsw to the same value so the task cannot swap instead of
    /// being OOM-killed. memsw must never be below the memory limit, so it is opened up first.
    fn apply_memory(&self, h: &Hierarchy, dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
        let value = limits
            .memory_bytes
            .map_or_else(|| "-1".to_owned(), |b| b.to_string());
        let limit = dir.join("memory.limit_in_bytes");
        if h.mount.join("memory.memsw.limit_in_bytes").is_file() {
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            util::write(&memsw, "-1")?;
            util::write(&limit, &value)?;
            util::write(&memsw, &value)?;
        } else {
            if limits.memory_bytes.is_some() && !self.warned_no_memsw.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    mount = %h.mount.display(),
                    "no memory.memsw (swap accounting off): tasks may swap instead of being OOM-killed"
                );
            }
            util::write(&limit, &value)?;
        }
        util::write(&dir.join("memory.swappiness"), "0")
    }

    /// The device whitelist: deny everything, then allow one rule per write.
    fn apply_devices(&self, dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
        let uvm = util::nvidia_uvm_major(&self.proc_devices)?;
        let lines: Vec<String> = util::device_whitelist(&limits.gpu_minors, uvm)
            .iter()
            .map(util::DeviceRule::v1_line)
            .collect();
        util::write(&dir.join("devices.deny"), "a")?;
        util::write_lines(&dir.join("devices.allow"), &lines)
    }

    fn apply(&self, h: &Hierarchy, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        let dir = self.dir_in(&h.mount, name);
        if h.has("memory") {
            self.apply_memory(h, &dir, limits)?;
        }
        if h.has("cpu") {
            let quota = limits
                .cpu_millis
                .map_or_else(|| "-1".to_owned(), |m| util::cpu_quota_us(m).to_string());
            util::write(
                &dir.join("cpu.cfs_period_us"),
                &util::CPU_PERIOD_US.to_string(),
            )?;
            util::write(&dir.join("cpu.cfs_quota_us"), &quota)?;
        }
        if h.has("pids") {
            let max = limits
                .pids_max
                .map_or_else(|| "max".to_owned(), |n| n.to_string());
            util::write(&dir.join("pids.max"), &max)?;
        }
        if h.has("devices") {
            self.apply_devices(&dir, limits)?;
        }
        Ok(())
    }

    /// Waits for `freezer.state` to read FROZEN.
    fn wait_frozen(state: &Path) -> Result<bool, CgroupError> {
        util::wait_until(FREEZE_TIMEOUT, || Ok(util::read(state)?.trim() == "FROZEN"))
    }
}

/// Writes `file` from `above` into `dir` when `dir`'s copy is empty or missing.
fn inherit_if_empty(above: &Path, dir: &Path, file: &str) -> Result<(), CgroupError> {
    let current = util::read_opt(&dir.join(file))?.unwrap_or_default();
    if current.trim().is_empty() {
        copy_file(above, dir, file)?;
    }
    Ok(())
}

/// Copies `file` from `above` into `dir`; the source must not be empty.
fn copy_file(above: &Path, dir: &Path, file: &str) -> Result<(), CgroupError> {
    let source = above.join(file);
    let value = util::read(&source)?;
    let value = value.trim();
    if value.is_empty() {
        return Err(CgroupError::Parse {
            path: source,
            detail: "empty, so the level below cannot inherit it".to_owned(),
        });
    }
    util::write(&dir.join(file), value)
}

impl Cgroups for V1Cgroups {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError> {
        util::validate_name(name)?;
        let cpus = match &limits.cpuset {
            Some(list) if list.is_empty() => {
                return Err(CgroupError::InvalidLimit {
                    path: self.dir("cpuset", name),
                    detail: "an empty cpuset leaves the task nowhere to run".to_owned(),
                })
            }
            Some(list) => Some(util::format_cpu_list(list)),
            None => None,
        };
        for h in self.hierarchies(true)? {
            self.make_dirs(&h, name, cpus.as_deref())?;
            self.apply(&h, name, limits)?;
        }
        Ok(())
    }

    fn procs_files(&self, name: &str) -> Vec<PathBuf> {
        // Without strict checking this cannot fail; fall back to the unresolved paths if
        // a mount point vanished under us (the write will then report the path).
        match self.hierarchies(false) {
            Ok(hs) => hs
                .iter()
                .map(|h| self.dir_in(&h.mount, name).join("cgroup.procs"))
                .collect(),
            Err(_) => REQUIRED
                .iter()
                .map(|c| self.dir(c, name).join("cgroup.procs"))
                .collect(),
        }
    }

    fn pids(&self, name: &str) -> Result<Vec<i32>, CgroupError> {
        util::validate_name(name)?;
        let mut pids = Vec::new();
        for h in self.hierarchies(false)? {
            util::pids_recursive(&self.dir_in(&h.mount, name), &mut pids)?;
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn kill_all(&self, name: &str, signal: Signal) -> Result<(), CgroupError> {
        util::validate_name(name)?;
        let freezer = self.dir("freezer", name);
        if !freezer.is_dir() {
            // Not (or no longer) a cgroup here: signal whatever other hierarchies still hold.
            return util::signal_all(&freezer, &self.pids(name)?, signal);
        }
        let state = freezer.join("freezer.state");
        util::write(&state, "FROZEN")?;
        // From here on the cgroup must be thawed whatever happens, or its tasks stay stuck.
        let frozen = Self::wait_frozen(&state);
        let signalled = self
            .pids(name)
            .and_then(|pids| util::signal_all(&freezer, &pids, signal));
        util::write(&state, "THAWED")?;
        if frozen? {
            return signalled;
        }
        signalled?;
        Err(CgroupError::FreezeTimeout {
            path: state,
            waited_ms: FREEZE_TIMEOUT.as_millis() as u64,
        })
    }

    fn oom_killed(&self, name: &str) -> Result<bool, CgroupError> {
        util::validate_name(name)?;
        let dir = self.dir("memory", name);
        let control = dir.join("memory.oom_control");
        if let Some(text) = util::read_opt(&control)? {
            if let Some(count) = util::stat_value(&text, "oom_kill") {
                return util::parse_count(&control, count).map(|n| n > 0);
            }
        }
        // Kernels before 4.13 do not count OOM kills; a hit limit is the best signal left.
        let failcnt = dir.join("memory.failcnt");
        util::parse_count(&failcnt, util::read(&failcnt)?.trim()).map(|n| n > 0)
    }

    fn remove(&self, name: &str) -> Result<(), CgroupError> {
        util::validate_name(name)?;
        let pids = self.pids(name)?;
        if !pids.is_empty() {
            return Err(CgroupError::Busy {
                path: self.dir("freezer", name),
                pids,
            });
        }
        for h in self.hierarchies(false)? {
            util::remove_cgroup_dir(&self.dir_in(&h.mount, name))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A temp dir shaped like a v1 host: one directory per controller, a root cpuset, and
    /// swap accounting.
    fn fake_host() -> (tempfile::TempDir, V1Cgroups) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for c in REQUIRED.iter().chain(&OPTIONAL) {
            fs::create_dir(root.join(c)).unwrap();
        }
        fs::write(root.join("cpuset/cpuset.cpus"), "0-7\n").unwrap();
        fs::write(root.join("cpuset/cpuset.mems"), "0\n").unwrap();
        fs::write(root.join("memory/memory.memsw.limit_in_bytes"), "").unwrap();
        let devices = root.join("proc-devices");
        fs::write(&devices, "Character devices:\n195 nvidia\n508 nvidia-uvm\n").unwrap();
        let cg = V1Cgroups::new(root, "muster")
            .unwrap()
            .with_proc_devices(&devices);
        (dir, cg)
    }

    fn read(root: &Path, rel: &str) -> String {
        fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    #[test]
    fn create_writes_every_limit() {
        let (dir, cg) = fake_host();
        let root = dir.path();
        let limits = Limits {
            memory_bytes: Some(1 << 30),
            cpu_millis: Some(2500),
            cpuset: Some(vec![2, 3, 4]),
            pids_max: Some(512),
            gpu_minors: vec![1, 3],
        };
        cg.create("job-12.0-a7", &limits).unwrap();
        let job = |f: &str| read(root, &f.replace("{}", "muster/job-12.0-a7"));
        assert_eq!(job("memory/{}/memory.limit_in_bytes"), "1073741824");
        assert_eq!(job("memory/{}/memory.memsw.limit_in_bytes"), "1073741824");
        assert_eq!(job("memory/{}/memory.swappiness"), "0");
        assert_eq!(job("cpu/{}/cpu.cfs_period_us"), "100000");
        assert_eq!(job("cpu/{}/cpu.cfs_quota_us"), "250000");
        assert_eq!(job("pids/{}/pids.max"), "512");
        assert_eq!(job("cpuset/{}/cpuset.cpus"), "2-4");
        assert_eq!(job("cpuset/{}/cpuset.mems"), "0");
        // The parent level got the root's cpus and mems so tasks can join below it.
        assert_eq!(read(root, "cpuset/muster/cpuset.cpus"), "0-7");
        assert_eq!(read(root, "cpuset/muster/cpuset.mems"), "0");
        assert_eq!(job("devices/{}/devices.deny"), "a");
        let allow = job("devices/{}/devices.allow");
        let expected = "c 1:3 rwm\nc 1:5 rwm\nc 1:7 rwm\nc 1:8 rwm\nc 1:9 rwm\nc 5:0 rwm\n\
            c 5:2 rwm\nc 136:* rwm\nc 195:1 rwm\nc 195:3 rwm\nc 195:255 rwm\nc 195:254 rwm\n\
            c 508:0 rwm\nc 508:1 rwm\n";
        assert_eq!(allow, expected);
        for c in ["freezer", "cpuacct", "blkio"] {
            assert!(root.join(c).join("muster/job-12.0-a7").is_dir(), "{c}");
        }
    }

    #[test]
    fn none_means_unlimited_and_create_is_idempotent() {
        let (dir, cg) = fake_host();
        let root = dir.path();
        let tight = Limits {
            memory_bytes: Some(1000),
            cpu_millis: Some(1),
            cpuset: Some(vec![1]),
            pids_max: Some(3),
            gpu_minors: vec![],
        };
        cg.create("t", &tight).unwrap();
        assert_eq!(read(root, "cpu/muster/t/cpu.cfs_quota_us"), "1000");
        cg.create("t", &Limits::default()).unwrap();
        assert_eq!(read(root, "memory/muster/t/memory.limit_in_bytes"), "-1");
        assert_eq!(
            read(root, "memory/muster/t/memory.memsw.limit_in_bytes"),
            "-1"
        );
        assert_eq!(read(root, "cpu/muster/t/cpu.cfs_quota_us"), "-1");
        assert_eq!(read(root, "pids/muster/t/pids.max"), "max");
        assert_eq!(read(root, "cpuset/muster/t/cpuset.cpus"), "0-7");
    }

    #[test]
    fn procs_files_cover_every_mounted_hierarchy_once() {
        let (dir, cg) = fake_host();
        let root = dir.path().canonicalize().unwrap();
        let files = cg.procs_files("t");
        assert_eq!(files.len(), 8);
        assert!(files.contains(&root.join("memory/muster/t/cgroup.procs")));
        assert!(files.contains(&root.join("freezer/muster/t/cgroup.procs")));

        // Co-mounted cpu,cpuacct (symlinked) is one hierarchy and one file.
        fs::remove_dir(root.join("cpu")).unwrap();
        fs::remove_dir(root.join("cpuacct")).unwrap();
        fs::create_dir(root.join("cpu,cpuacct")).unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpu")).unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", root.join("cpuacct")).unwrap();
        assert_eq!(cg.procs_files("t").len(), 7);
        cg.create("t", &Limits::default()).unwrap();
        assert_eq!(read(&root, "cpu,cpuacct/muster/t/cpu.cfs_quota_us"), "-1");
    }

    #[test]
    fn missing_required_mount_is_named_and_optional_is_skipped() {
        let (dir, cg) = fake_host();
        fs::remove_dir(dir.path().join("blkio")).unwrap();
        cg.create("t", &Limits::default()).unwrap();
        fs::remove_dir_all(dir.path().join("pids")).unwrap();
        let err = cg.create("u", &Limits::default()).unwrap_err();
        assert!(
            matches!(&err, CgroupError::MissingController { controller: "pids", path }
                if path == &dir.path().join("pids")),
            "{err}"
        );
    }

    #[test]
    fn bad_inputs_are_rejected() {
        let (_dir, cg) = fake_host();
        let empty = Limits {
            cpuset: Some(vec![]),
            ..Limits::default()
        };
        assert!(matches!(
            cg.create("t", &empty),
            Err(CgroupError::InvalidLimit { .. })
        ));
        assert!(matches!(
            cg.create("../x", &Limits::default()),
            Err(CgroupError::InvalidName { .. })
        ));
    }

    #[test]
    fn oom_reads_oom_kill_then_failcnt() {
        let (dir, cg) = fake_host();
        cg.create("t", &Limits::default()).unwrap();
        let mem = dir.path().join("memory/muster/t");
        fs::write(mem.join("memory.failcnt"), "0\n").unwrap();
        assert!(!cg.oom_killed("t").unwrap());
        fs::write(mem.join("memory.failcnt"), "3\n").unwrap();
        assert!(cg.oom_killed("t").unwrap());
        let control = "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n";
        fs::write(mem.join("memory.oom_control"), control).unwrap();
        assert!(!cg.oom_killed("t").unwrap());
        fs::write(
            mem.join("memory.oom_control"),
            control.replace("kill 0", "kill 2"),
        )
        .unwrap();
        assert!(cg.oom_killed("t").unwrap());
    }

    #[test]
    fn kill_all_freezes_then_thaws_and_remove_cleans_up() {
        let (dir, cg) = fake_host();
        cg.create("t", &Limits::default()).unwrap();
        // On a plain directory the "kernel" reports FROZEN as soon as we write it.
        cg.kill_all("t", Signal::SIGKILL).unwrap();
        assert_eq!(read(dir.path(), "freezer/muster/t/freezer.state"), "THAWED");

        fs::write(dir.path().join("pids/muster/t/cgroup.procs"), "999999\n").unwrap();
        let err = cg.remove("t").unwrap_err();
        assert!(
            matches!(&err, CgroupError::Busy { pids, .. } if pids == &[999999]),
            "{err}"
        );
        fs::remove_file(dir.path().join("pids/muster/t/cgroup.procs")).unwrap();
        cg.remove("t").unwrap();
        for c in REQUIRED.iter().chain(&OPTIONAL) {
            assert!(!dir.path().join(c).join("muster/t").exists(), "{c}");
            assert!(dir.path().join(c).join("muster").is_dir(), "{c}");
        }
        cg.remove("t").unwrap();
        cg.kill_all("t", Signal::SIGTERM).unwrap();
    }
}
