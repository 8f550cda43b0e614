//! Real cgroup v1 isolation, through the crate's public API, as root on a host with the v1
//! controllers mounted at /sys/fs/cgroup/<controller>. Each test prints why and returns when it
//! cannot run (not root, no v1 memory hierarchy).
//!
//! Every test uses its own cgroup names (pid + counter) under "muster-test", so tests running
//! in parallel do not collide, and removes them on the way out, even when an assertion fails.
//! The "muster-test" level itself is left in place: removing it could race a test that is
//! creating a cgroup below it.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use muster_agent::cgroup::{self, CgroupError, CgroupVersion, Cgroups, Limits, V1Cgroups};
use nix::sys::signal::Signal;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

const ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "muster-test";

fn backend(test: &str) -> Option<V1Cgroups> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping {test}: needs root to create cgroups");
        return None;
    }
    if !Path::new(ROOT).join("memory").is_dir() {
        eprintln!("skipping {test}: no cgroup v1 memory hierarchy at {ROOT}/memory");
        return None;
    }
    let cg = cgroup::v1(Path::new(ROOT), PARENT).expect("v1 backend");
    cg.check_mounts().expect("v1 controllers mounted");
    assert_eq!(cg.version(), CgroupVersion::V1);
    Some(cg)
}

/// A task cgroup that is killed and removed when the test ends.
struct Scoped<'a> {
    cg: &'a V1Cgroups,
    name: String,
}

impl<'a> Scoped<'a> {
    fn create(cg: &'a V1Cgroups, label: &str, limits: &Limits) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}-{n}-{label}", std::process::id());
        cg.create(&name, limits)
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        Self { cg, name }
    }

    fn pids(&self) -> Vec<i32> {
        self.cg.pids(&self.name).expect("pids")
    }
}

impl Drop for Scoped<'_> {
    fn drop(&mut self) {
        let _ = self.cg.kill_all(&self.name, Signal::SIGKILL);
        eventually(|| self.cg.pids(&self.name).is_ok_and(|p| p.is_empty()));
        if let Err(e) = self.cg.remove(&self.name) {
            eprintln!("cleanup of {}: {e}", self.name);
        }
    }
}

/// Polls `f` every 10 ms for up to 10 s.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A `/bin/sh` that blocks on `read` until it has been moved into the cgroup, then runs
/// `script`. Killed and reaped on drop.
struct Held(Option<Child>);

impl Held {
    fn start_in(cg: &V1Cgroups, name: &str, script: &str, capture: bool) -> Self {
        let out = || {
            if capture {
                Stdio::piped()
            } else {
                Stdio::null()
            }
        };
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("read go; {script}"))
            .stdin(Stdio::piped())
            .stdout(out())
            .stderr(out())
            .spawn()
            .expect("spawn /bin/sh");
        let pid = i32::try_from(child.id()).expect("pid");
        let joined = cg.add_process(name, pid);
        let mut stdin = child.stdin.take().expect("stdin");
        let held = Self(Some(child));
        joined.unwrap_or_else(|e| panic!("join {name}: {e}"));
        stdin.write_all(b"go\n").expect("release");
        held
    }

    fn output(mut self) -> Output {
        self.0
            .take()
            .expect("child")
            .wait_with_output()
            .expect("wait")
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn stderr_of(cg: &V1Cgroups, name: &str, script: &str) -> String {
    let out = Held::start_in(cg, name, script, true).output();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// (a) The device whitelist: `/dev/nvidia7`'s number (c 195:7) opened from a cgroup given
/// only GPU 3 fails with EPERM (the devices cgroup said no) while /dev/null still works; from
/// a cgroup given GPU 7 the same node gets ENXIO (allowed through to a driver that is absent).
#[test]
fn devices_admit_only_the_given_gpus() {
    let Some(cg) = backend("devices_admit_only_the_given_gpus") else {
        return;
    };
    let nodes = tempfile::tempdir().expect("tempdir");
    let nv7 = nodes.path().join("nvidia7");
    mknod(
        &nv7,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(195, 7),
    )
    .expect("mknod");
    let nv7 = nv7.to_str().expect("utf-8 path");
    let script = format!("cat /dev/null && echo null-ok >&2; cat '{nv7}'");

    let other_gpu = Scoped::create(
        &cg,
        "dev-deny",
        &Limits {
            gpu_minors: vec![3],
            ..Limits::default()
        },
    );
    let list = std::fs::read_to_string(
        PathBuf::from(ROOT)
            .join("devices")
            .join(PARENT)
            .join(&other_gpu.name)
            .join("devices.list"),
    )
    .expect("devices.list");
    assert!(
        list.contains("c 195:3 rwm") && !list.contains("a *:*"),
        "{list}"
    );
    let err = stderr_of(&cg, &other_gpu.name, &script);
    assert!(err.contains("null-ok"), "{err}");
    assert!(
        err.contains(&format!("{nv7}: Operation not permitted")),
        "{err}"
    );

    let this_gpu = Scoped::create(
        &cg,
        "dev-allow",
        &Limits {
            gpu_minors: vec![7],
            ..Limits::default()
        },
    );
    let err = stderr_of(&cg, &this_gpu.name, &script);
    assert!(
        err.contains(&format!("{nv7}: No such device or address")),
        "{err}"
    );
}

/// (b) A 32 MiB limit: a process touching a 256 MiB buffer is killed by the kernel with
/// SIGKILL (not left to swap), and `oom_killed` reports it; a quiet cgroup reports no OOM.
#[test]
fn memory_limit_oom_kills_a_greedy_task() {
    let Some(cg) = backend("memory_limit_oom_kills_a_greedy_task") else {
        return;
    };
    let limits = Limits {
        memory_bytes: Some(32 << 20),
        ..Limits::default()
    };
    let greedy = Scoped::create(&cg, "oom", &limits);
    assert!(!cg.oom_killed(&greedy.name).expect("oom_killed"));
    let out = Held::start_in(
        &cg,
        &greedy.name,
        "exec dd if=/dev/zero of=/dev/null bs=256M count=1",
        true,
    )
    .output();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "dd was not OOM-killed: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cg.oom_killed(&greedy.name).expect("oom_killed"));

    let quiet = Scoped::create(&cg, "no-oom", &limits);
    let out = Held::start_in(
        &cg,
        &quiet.name,
        "exec dd if=/dev/zero of=/dev/null bs=1M count=4",
        true,
    )
    .output();
    assert!(out.status.success(), "{:?}", out.status);
    assert!(!cg.oom_killed(&quiet.name).expect("oom_killed"));
}

/// (c) `kill_all(SIGKILL)` kills a whole process tree (a shell, a sub-shell, and sleeps that
/// are still being forked when the kill starts); nothing is left and nothing comes back.
/// SIGTERM goes through the freezer and also reaches every process, and the cgroup thaws.
#[test]
fn kill_all_kills_the_whole_tree() {
    let Some(cg) = backend("kill_all_kills_the_whole_tree") else {
        return;
    };
    let tree = Scoped::create(
        &cg,
        "tree",
        &Limits {
            pids_max: Some(200),
            ..Limits::default()
        },
    );
    let held = Held::start_in(
        &cg,
        &tree.name,
        "sh -c 'sleep 1000 & wait' & i=0; while [ $i -lt 100 ]; do sleep 1000 & i=$((i+1)); done; wait",
        false,
    );
    assert!(eventually(|| tree.pids().len() >= 10), "tree never grew");
    cg.kill_all(&tree.name, Signal::SIGKILL).expect("kill_all");
    assert_eq!(held.output().status.signal(), Some(libc::SIGKILL));
    assert!(
        eventually(|| tree.pids().is_empty()),
        "left: {:?}",
        tree.pids()
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(tree.pids().is_empty(), "came back: {:?}", tree.pids());

    let held = Held::start_in(&cg, &tree.name, "sleep 1000 & sleep 1000 & wait", false);
    assert!(eventually(|| tree.pids().len() == 3));
    cg.kill_all(&tree.name, Signal::SIGTERM).expect("kill_all");
    assert_eq!(held.output().status.signal(), Some(libc::SIGTERM));
    assert!(
        eventually(|| tree.pids().is_empty()),
        "left: {:?}",
        tree.pids()
    );
    let state = PathBuf::from(ROOT)
        .join("freezer")
        .join(PARENT)
        .join(&tree.name)
        .join("freezer.state");
    assert_eq!(
        std::fs::read_to_string(state)
            .expect("freezer.state")
            .trim(),
        "THAWED"
    );
}

/// pids.max caps the number of processes: a shell trying to start 50 sleeps under a limit of
/// 8 gets at most 8 processes, and its fork fails.
#[test]
fn pids_max_caps_forks() {
    let Some(cg) = backend("pids_max_caps_forks") else {
        return;
    };
    let capped = Scoped::create(
        &cg,
        "pids",
        &Limits {
            pids_max: Some(8),
            ..Limits::default()
        },
    );
    // The sleeps must not hold the captured stderr open, or reading it would never end.
    let script = "i=0; while [ $i -lt 50 ]; do sleep 1000 >/dev/null 2>&1 & i=$((i+1)); done";
    let out = Held::start_in(&cg, &capped.name, script, true).output();
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success() && err.contains("fork"),
        "{:?} {err}",
        out.status
    );
    let pids = capped.pids();
    assert!(!pids.is_empty() && pids.len() <= 8, "{pids:?}");
}

/// (d) `create` makes the cgroup in every hierarchy with the kernel accepting each value
/// (including raising memory later, which needs memsw opened up first); `remove` refuses while
/// a process is inside, then removes every directory; removing or killing a missing cgroup is
/// fine.
#[test]
fn create_and_remove_cover_every_hierarchy() {
    let Some(cg) = backend("create_and_remove_cover_every_hierarchy") else {
        return;
    };
    let limits = Limits {
        memory_bytes: Some(32 << 20),
        cpu_millis: Some(1500),
        cpuset: Some(vec![0]),
        pids_max: Some(100),
        gpu_minors: vec![],
    };
    let job = Scoped::create(&cg, "life", &limits);
    let dir = |c: &str| PathBuf::from(ROOT).join(c).join(PARENT).join(&job.name);
    let read = |c: &str, f: &str| {
        let path = dir(c).join(f);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    assert_eq!(read("memory", "memory.limit_in_bytes").trim(), "33554432");
    assert_eq!(read("cpu", "cpu.cfs_quota_us").trim(), "150000");
    assert_eq!(read("cpuset", "cpuset.cpus").trim(), "0");
    assert_eq!(read("pids", "pids.max").trim(), "100");
    cg.create(
        &job.name,
        &Limits {
            memory_bytes: Some(64 << 20),
            ..limits
        },
    )
    .expect("re-create with a higher limit");
    assert_eq!(read("memory", "memory.limit_in_bytes").trim(), "67108864");

    let files = cg.procs_files(&job.name);
    assert!(files.len() >= 6, "{files:?}");
    assert!(files.iter().all(|f| f.is_file()), "{files:?}");

    let held = Held::start_in(&cg, &job.name, "exec sleep 1000", false);
    let err = cg
        .remove(&job.name)
        .expect_err("remove with a live process");
    assert!(
        matches!(&err, CgroupError::Busy { pids, .. } if pids.len() == 1),
        "{err}"
    );
    drop(held);
    assert!(eventually(|| job.pids().is_empty()));

    cg.remove(&job.name).expect("remove");
    for file in &files {
        assert!(
            !file.parent().expect("dir").exists(),
            "{} remains",
            file.display()
        );
    }
    cg.remove(&job.name).expect("removing a missing cgroup");
    cg.kill_all(&job.name, Signal::SIGKILL)
        .expect("killing a missing cgroup");
}
