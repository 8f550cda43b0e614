//! Tests of the v2 backend: file contents on a temp dir, and, as root with a cgroup2 hierarchy
//! mounted, membership and killing against the kernel.

use std::fs;

use super::*;
use crate::cgroup::testutil::{self, eventually, Held, TempCgroup};

/// A temp dir shaped like a v2 root offering the controllers Muster needs.
fn fake_root() -> (tempfile::TempDir, V2Cgroups) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("cgroup.controllers"),
        "cpuset cpu io memory hugetlb pids\n",
    )
    .unwrap();
    let cg = V2Cgroups::without_device_filter(dir.path(), "muster").unwrap();
    (dir, cg)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn create_delegates_controllers_and_writes_limits() {
    let (dir, cg) = fake_root();
    let job = dir.path().join("muster/job-3.1-b2");
    // A kernel with swap accounting shows memory.swap.max once memory is enabled.
    fs::create_dir_all(&job).unwrap();
    fs::write(job.join("memory.swap.max"), "max").unwrap();
    let limits = Limits {
        memory_bytes: Some(32 << 20),
        cpu_millis: Some(1500),
        cpuset: Some(vec![0, 1, 2, 6]),
        pids_max: Some(100),
        gpu_minors: vec![0],
    };
    cg.create("job-3.1-b2", &limits).unwrap();
    let enable = "+memory +cpu +cpuset +pids";
    assert_eq!(read(&dir.path().join("cgroup.subtree_control")), enable);
    assert_eq!(
        read(&dir.path().join("muster/cgroup.subtree_control")),
        enable
    );
    assert_eq!(read(&job.join("memory.max")), "33554432");
    assert_eq!(read(&job.join("memory.swap.max")), "0");
    assert_eq!(read(&job.join("cpu.max")), "150000 100000");
    assert_eq!(read(&job.join("cpuset.cpus")), "0-2,6");
    assert_eq!(read(&job.join("pids.max")), "100");
    assert_eq!(cg.procs_files("job-3.1-b2"), vec![job.join("cgroup.procs")]);

    cg.create("job-3.1-b2", &Limits::default()).unwrap();
    assert_eq!(read(&job.join("memory.max")), "max");
    assert_eq!(read(&job.join("cpu.max")), "max 100000");
    assert_eq!(read(&job.join("cpuset.cpus")).trim(), "");
    assert_eq!(read(&job.join("pids.max")), "max");
}

#[test]
fn nested_parent_enables_controllers_at_every_level() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("cgroup.controllers"),
        "memory cpu cpuset pids",
    )
    .unwrap();
    let cg =
        V2Cgroups::without_device_filter(dir.path(), "system.slice/muster.service/tasks").unwrap();
    cg.create("a", &Limits::default()).unwrap();
    let mut level = dir.path().to_owned();
    for part in ["", "system.slice", "muster.service", "tasks"] {
        level.push(part);
        assert!(read(&level.join("cgroup.subtree_control")).contains("+cpuset"));
    }
    assert!(level.join("a/memory.max").is_file());
}

#[test]
fn missing_controller_is_named() {
    let (dir, cg) = fake_root();
    fs::write(dir.path().join("cgroup.controllers"), "cpu io memory pids").unwrap();
    let err = cg.create("a", &Limits::default()).unwrap_err();
    assert!(
        matches!(&err, CgroupError::ControllerUnavailable { controller: "cpuset", path }
            if path == &dir.path().join("cgroup.controllers")),
        "{err}"
    );
    assert!(!dir.path().join("muster/a").exists());
}

#[test]
fn device_filter_is_on_by_default_and_fails_loudly_off_cgroupfs() {
    let (dir, _) = fake_root();
    let cg = V2Cgroups::new(dir.path(), "muster").unwrap();
    let err = cg.create("a", &Limits::default()).unwrap_err();
    assert!(matches!(err, CgroupError::Bpf { .. }), "{err}");
}

#[test]
fn oom_reads_memory_events() {
    let (dir, cg) = fake_root();
    cg.create("a", &Limits::default()).unwrap();
    let events = dir.path().join("muster/a/memory.events");
    fs::write(&events, "low 0\nhigh 0\nmax 4\noom 1\noom_kill 0\n").unwrap();
    assert!(!cg.oom_killed("a").unwrap());
    fs::write(&events, "low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n").unwrap();
    assert!(cg.oom_killed("a").unwrap());
    fs::remove_file(&events).unwrap();
    assert!(matches!(cg.oom_killed("a"), Err(CgroupError::Read { .. })));
}

#[test]
fn kill_uses_cgroup_kill_or_freezes_and_remove_refuses_busy() {
    let (dir, cg) = fake_root();
    cg.create("a", &Limits::default()).unwrap();
    let a = dir.path().join("muster/a");
    // Without cgroup.kill (kernel < 5.14): freeze, wait for "frozen 1", signal, thaw.
    fs::write(a.join("cgroup.events"), "populated 0\nfrozen 1\n").unwrap();
    cg.kill_all("a", Signal::SIGKILL).unwrap();
    assert_eq!(read(&a.join("cgroup.freeze")), "0");
    fs::write(a.join("cgroup.kill"), "").unwrap();
    cg.kill_all("a", Signal::SIGKILL).unwrap();
    assert_eq!(read(&a.join("cgroup.kill")), "1");

    fs::create_dir(a.join("sub")).unwrap();
    fs::write(a.join("sub/cgroup.procs"), "999999\n").unwrap();
    let err = cg.remove("a").unwrap_err();
    assert!(
        matches!(&err, CgroupError::Busy { pids, .. } if pids == &[999999]),
        "{err}"
    );
    fs::remove_file(a.join("sub/cgroup.procs")).unwrap();
    cg.remove("a").unwrap();
    assert!(!a.exists());
    assert!(dir.path().join("muster").is_dir());
    cg.remove("a").unwrap();
    cg.kill_all("a", Signal::SIGKILL).unwrap();
}

/// A bare cgroup2 directory under the real hierarchy and a backend pointing at it. `create`
/// cannot run on hybrid's controller-less `unified/`, but membership, freezing and
/// `cgroup.kill` are core cgroup2 files present everywhere.
fn real(test: &str) -> Option<(TempCgroup, V2Cgroups, String)> {
    let mount = testutil::cgroup2_mount(test)?;
    let name = testutil::unique("v2");
    let cg = TempCgroup::new(&mount.join("muster-test"), &name);
    let backend = V2Cgroups::new(&mount, "muster-test").expect("backend");
    Some((cg, backend, name))
}

/// SIGKILL through cgroup.kill stops a shell that keeps forking, and nothing is left behind.
#[test]
fn real_kill_all_stops_a_forking_tree() {
    let Some((_cg, backend, name)) = real("real_kill_all_stops_a_forking_tree") else {
        return;
    };
    let mut held = Held::spawn(
        "sh -c 'sleep 1000 & wait' & i=0; while [ $i -lt 300 ]; do sleep 1000 & i=$((i+1)); done; wait",
        false,
    );
    held.join_and_release(&backend.procs_files(&name));
    assert!(eventually(|| backend.pids(&name).unwrap().len() >= 10));
    backend.kill_all(&name, Signal::SIGKILL).unwrap();
    assert!(eventually(|| backend.pids(&name).unwrap().is_empty()));
    let status = held.output().status;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    // Nothing forked after the kill survived to repopulate the cgroup.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(backend.pids(&name).unwrap().is_empty());
    backend.remove(&name).unwrap();
}

/// Other signals go through the freezer: every process gets SIGTERM and the cgroup thaws.
#[test]
fn real_kill_all_terminates_through_the_freezer() {
    let Some((cg, backend, name)) = real("real_kill_all_terminates_through_the_freezer") else {
        return;
    };
    let mut held = Held::spawn("sleep 1000 & sleep 1000 & wait", false);
    held.join_and_release(&backend.procs_files(&name));
    assert!(eventually(|| backend.pids(&name).unwrap().len() == 3));
    let err = backend.remove(&name).unwrap_err();
    assert!(
        matches!(&err, CgroupError::Busy { pids, .. } if pids.len() == 3),
        "{err}"
    );

    backend.kill_all(&name, Signal::SIGTERM).unwrap();
    assert_eq!(read(&cg.path.join("cgroup.freeze")).trim(), "0");
    assert!(eventually(|| backend.pids(&name).unwrap().is_empty()));
    let status = held.output().status;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(15)
    );
    backend.remove(&name).unwrap();
    assert!(!cg.path.exists());
}
