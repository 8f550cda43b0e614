//! File-system helpers and the device whitelist shared by the v1 and v2 backends.
//!
//! Every helper maps an I/O failure to a [`CgroupError`] that names the path involved, so a
//! sysadmin reading the agent's log knows which control file refused what.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
use nix::unistd::Pid;

use super::CgroupError;

/// How long `kill_all` waits for a freezer to report the cgroup frozen.
pub(crate) const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// CFS period used by both versions: 100 ms, so a millicpu is 100 µs of quota.
pub(crate) const CPU_PERIOD_US: u64 = 100_000;

/// Quota in µs per [`CPU_PERIOD_US`] for `millis` thousandths of a CPU. The kernel refuses
/// quotas under 1 ms, so tiny requests are rounded up to that.
pub(crate) fn cpu_quota_us(millis: u32) -> u64 {
    (u64::from(millis) * CPU_PERIOD_US / 1000).max(1000)
}

/// Writes `value` to a control file in a single `write(2)`, creating it when the directory is a
/// plain one (tests); on cgroupfs the file already exists.
pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// Writes each line in its own `write(2)`: v1 `devices.allow` parses one rule per write.
/// Appends, so that on a plain directory the file shows every rule written.
pub(crate) fn write_lines(path: &Path, lines: &[String]) -> Result<(), CgroupError> {
    let err = |value: &str, source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| err("", e))?;
    for line in lines {
        file.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| err(line, e))?;
    }
    Ok(())
}

/// Reads a control file.
pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a control file, `None` if it does not exist.
pub(crate) fn read_opt(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Creates one directory level; an existing one is fine (create is idempotent).
pub(crate) fn ensure_dir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks that `name` is one plain path component.
pub(crate) fn validate_name(name: &str) -> Result<(), CgroupError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not cgroup names")
    } else if name.contains('/') || name.contains('\0') {
        Some("must be a single path component")
    } else if name.starts_with("cgroup.") {
        Some("'cgroup.' prefix is reserved by the kernel")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CgroupError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Splits Muster's parent ("muster", or a delegated "system.slice/muster.service/tasks") into
/// validated components.
pub(crate) fn parse_parent(parent: &str) -> Result<Vec<String>, CgroupError> {
    let parts: Vec<String> = parent
        .split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    if parts.is_empty() {
        return Err(CgroupError::InvalidName {
            name: parent.to_owned(),
            reason: "the parent must name at least one directory below the root",
        });
    }
    for part in &parts {
        validate_name(part)?;
    }
    Ok(parts)
}

/// Parses a `cgroup.procs` file; a missing file (no such cgroup) holds no processes.
/// Zero is dropped: it is what the kernel shows for a process outside our pid namespace, and
/// `kill(0, …)` would signal the agent's own process group.
pub(crate) fn read_pids(path: &Path) -> Result<Vec<i32>, CgroupError> {
    let Some(text) = read_opt(path)? else {
        return Ok(Vec::new());
    };
    let mut pids = Vec::new();
    for word in text.split_whitespace() {
        let pid: i32 = word.parse().map_err(|_| CgroupError::Parse {
            path: path.to_owned(),
            detail: format!("{word:?} is not a process id"),
        })?;
        if pid > 0 {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The processes in `dir` and in any cgroup a (root) task created below it.
pub(crate) fn pids_recursive(dir: &Path, out: &mut Vec<i32>) -> Result<(), CgroupError> {
    out.extend(read_pids(&dir.join("cgroup.procs"))?);
    for sub in subdirs(dir)? {
        pids_recursive(&sub, out)?;
    }
    Ok(())
}

fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CgroupError::Read {
            path: dir.to_owned(),
            source,
        })?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Sends `signal` to each pid; a process that exited meanwhile (ESRCH) is not an error.
/// Every pid is tried; the first other failure is returned.
pub(crate) fn signal_all(cgroup: &Path, pids: &[i32], signal: Signal) -> Result<(), CgroupError> {
    let mut first_err = None;
    for &pid in pids.iter().filter(|&&p| p > 0) {
        match kill(Pid::from_raw(pid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(source) => {
                first_err.get_or_insert(CgroupError::Signal {
                    path: cgroup.to_owned(),
                    pid,
                    source,
                });
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Polls `done` until it says true or `timeout` passes; returns whether it finished.
pub(crate) fn wait_until(
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<bool, CgroupError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if done()? {
            return Ok(true);
        }
        if start.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Removes a cgroup directory and any cgroups below it, deepest first. Missing is fine.
/// Callers check for processes first; a kernel EBUSY still becomes [`CgroupError::Busy`].
pub(crate) fn remove_cgroup_dir(dir: &Path) -> Result<(), CgroupError> {
    for sub in subdirs(dir)? {
        remove_cgroup_dir(&sub)?;
    }
    let err = match fs::remove_dir(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => e,
    };
    match err.raw_os_error() {
        Some(libc::EBUSY) => {
            let mut pids = Vec::new();
            pids_recursive(dir, &mut pids)?;
            Err(CgroupError::Busy {
                path: dir.to_owned(),
                pids,
            })
        }
        // cgroupfs lets rmdir remove a directory full of control files; a plain directory
        // (a test's temp dir standing in for the hierarchy) needs its files removed first.
        Some(libc::ENOTEMPTY) if !is_cgroupfs(dir) => {
            fs::remove_dir_all(dir).map_err(|source| CgroupError::Remove {
                path: dir.to_owned(),
                source,
            })
        }
        _ => Err(CgroupError::Remove {
            path: dir.to_owned(),
            source: err,
        }),
    }
}

/// The value of `key` in a "key value" per line file (`memory.oom_control`, `memory.events`).
pub(crate) fn stat_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(key)).then(|| words.next()).flatten()
    })
}

/// Parses a counter read from `path`.
pub(crate) fn parse_count(path: &Path, value: &str) -> Result<u64, CgroupError> {
    value.parse().map_err(|_| CgroupError::Parse {
        path: path.to_owned(),
        detail: format!("{value:?} is not a count"),
    })
}

/// True if `path` lies on a cgroup (v1) or cgroup2 file system.
pub(crate) fn is_cgroupfs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == CGROUP_SUPER_MAGIC || t == CGROUP2_SUPER_MAGIC
    })
}

/// Formats CPU ids as the kernel's list syntax, e.g. `[0,1,2,5]` → `"0-2,5"`.
pub(crate) fn format_cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// One whitelisted character device; `minor: None` means every minor of `major`.
/// Access is always read, write and mknod (`rwm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceRule {
    pub(crate) major: u32,
    pub(crate) minor: Option<u32>,
}

impl DeviceRule {
    fn new(major: u32, minor: Option<u32>) -> Self {
        Self { major, minor }
    }

    /// The rule in v1 `devices.allow` syntax.
    pub(crate) fn v1_line(&self) -> String {
        match self.minor {
            Some(minor) => format!("c {}:{} rwm", self.major, minor),
            None => format!("c {}:* rwm", self.major),
        }
    }
}

/// Major number of the NVIDIA GPU device nodes (`/dev/nvidiaN`, `nvidiactl`, `nvidia-modeset`).
pub(crate) const NVIDIA_MAJOR: u32 = 195;

/// What every task may open, plus the GPUs it was given:
/// `/dev/{null,zero,full,random,urandom}`, `/dev/tty`, `/dev/ptmx`, `/dev/pts/*`,
/// `/dev/nvidia<minor>` for each GPU, `nvidiactl` (195:255), `nvidia-modeset` (195:254), and
/// `nvidia-uvm` / `nvidia-uvm-tools` when the driver registered that major.
pub(crate) fn device_whitelist(gpu_minors: &[u32], uvm_major: Option<u32>) -> Vec<DeviceRule> {
    let mut rules: Vec<DeviceRule> = [3, 5, 7, 8, 9]
        .into_iter()
        .map(|minor| DeviceRule::new(1, Some(minor)))
        .collect();
    rules.push(DeviceRule::new(5, Some(0)));
    rules.push(DeviceRule::new(5, Some(2)));
    rules.push(DeviceRule::new(136, None));
    let mut gpus = gpu_minors.to_vec();
    gpus.sort_unstable();
    gpus.dedup();
    rules.extend(
        gpus.into_iter()
            .map(|m| DeviceRule::new(NVIDIA_MAJOR, Some(m))),
    );
    rules.push(DeviceRule::new(NVIDIA_MAJOR, Some(255)));
    rules.push(DeviceRule::new(NVIDIA_MAJOR, Some(254)));
    if let Some(major) = uvm_major {
        rules.push(DeviceRule::new(major, Some(0)));
        rules.push(DeviceRule::new(major, Some(1)));
    }
    rules
}

/// The dynamic major of `nvidia-uvm` from `/proc/devices` ("Character devices:" section),
/// `None` if the module is not loaded.
pub(crate) fn nvidia_uvm_major(proc_devices: &Path) -> Result<Option<u32>, CgroupError> {
    let text = read(proc_devices)?;
    let mut in_char = false;
    for line in text.lines() {
        let line = line.trim();
        if line.ends_with(':') {
            in_char = line == "Character devices:";
            continue;
        }
        let mut words = line.split_whitespace();
        if let (true, Some(major), Some("nvidia-uvm")) = (in_char, words.next(), words.next()) {
            return major.parse().map(Some).map_err(|_| CgroupError::Parse {
                path: proc_devices.to_owned(),
                detail: format!("bad major {major:?} for nvidia-uvm"),
            });
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_compresses_ranges() {
        assert_eq!(format_cpu_list(&[5, 0, 1, 2, 2]), "0-2,5");
        assert_eq!(format_cpu_list(&[3]), "3");
        assert_eq!(format_cpu_list(&[0, 2, 4, 5]), "0,2,4-5");
    }

    #[test]
    fn quota_is_millis_times_hundred_with_kernel_floor() {
        assert_eq!(cpu_quota_us(1500), 150_000);
        assert_eq!(cpu_quota_us(1), 1000);
    }

    #[test]
    fn names_must_be_one_component() {
        assert!(validate_name("job-12.0-a7").is_ok());
        for bad in ["", ".", "..", "a/b", "cgroup.procs"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_parent("/a/b/").unwrap(), vec!["a", "b"]);
        assert!(parse_parent("a/../b").is_err());
        assert!(parse_parent("/").is_err());
    }

    #[test]
    fn uvm_major_comes_from_the_character_section() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices");
        let text = "Character devices:\n  1 mem\n195 nvidia\n510 nvidia-uvm\n\n\
                    Block devices:\n  7 loop\n";
        fs::write(&path, text).unwrap();
        assert_eq!(nvidia_uvm_major(&path).unwrap(), Some(510));
        fs::write(
            &path,
            "Character devices:\n  1 mem\nBlock devices:\n9 nvidia-uvm\n",
        )
        .unwrap();
        assert_eq!(nvidia_uvm_major(&path).unwrap(), None);
        assert!(nvidia_uvm_major(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn whitelist_lists_base_devices_gpus_and_uvm() {
        let lines: Vec<String> = device_whitelist(&[2, 0, 2], Some(510))
            .iter()
            .map(DeviceRule::v1_line)
            .collect();
        let expected = [
            "c 1:3 rwm",
            "c 1:5 rwm",
            "c 1:7 rwm",
            "c 1:8 rwm",
            "c 1:9 rwm",
            "c 5:0 rwm",
            "c 5:2 rwm",
            "c 136:* rwm",
            "c 195:0 rwm",
            "c 195:2 rwm",
            "c 195:255 rwm",
            "c 195:254 rwm",
            "c 510:0 rwm",
            "c 510:1 rwm",
        ];
        assert_eq!(lines, expected);
        assert_eq!(device_whitelist(&[], None).len(), 10);
    }

    #[test]
    fn pids_skip_zero_and_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let procs = dir.path().join("cgroup.procs");
        assert!(read_pids(&procs).unwrap().is_empty());
        fs::write(&procs, "12\n0\n40\n").unwrap();
        assert_eq!(read_pids(&procs).unwrap(), vec![12, 40]);
        fs::write(&procs, "x\n").unwrap();
        assert!(matches!(read_pids(&procs), Err(CgroupError::Parse { .. })));
    }

    #[test]
    fn remove_handles_plain_dirs_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let cg = dir.path().join("job");
        fs::create_dir_all(cg.join("sub")).unwrap();
        fs::write(cg.join("memory.max"), "max").unwrap();
        remove_cgroup_dir(&cg).unwrap();
        assert!(!cg.exists());
        remove_cgroup_dir(&cg).unwrap();
    }
}
