//! Which task a local process belongs to.
//!
//! `muster checkpoint done` reaches the agent over a Unix socket; the kernel
//! tells the agent the caller's pid (SO_PEERCRED), which a process cannot
//! forge. The caller belongs to a task if it is in that task's cgroup, or,
//! where there are no cgroups, if the task's main process is among its
//! ancestors. A process outside every task is refused, so one task can never
//! report for another.

use super::{Runtime, TaskKey};
use std::path::Path;

/// Most parent links followed before giving up.
const MAX_DEPTH: usize = 128;

/// The task whose cgroup name ends one of the paths in `/proc/<pid>/cgroup`.
pub fn by_cgroup(proc_cgroup: &str, tasks: &[(String, TaskKey)]) -> Option<TaskKey> {
    for line in proc_cgroup.lines() {
        // hierarchy-id:controllers:path
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let leaf = path.rsplit('/').next().unwrap_or("");
        if let Some((_, key)) = tasks.iter().find(|(name, _)| name == leaf) {
            return Some(*key);
        }
    }
    None
}

/// The parent pid of `pid`, from `/proc/<pid>/stat` under `proc`.
pub fn parent_of(proc: &Path, pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    // pid (comm) state ppid ...; comm may hold spaces and parentheses.
    let rest = stat.rsplit_once(") ")?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The task among `tasks` (main pid → key) that `pid` descends from.
pub fn by_ancestry(proc: &Path, pid: u32, tasks: &[(u32, TaskKey)]) -> Option<TaskKey> {
    let mut p = pid;
    for _ in 0..MAX_DEPTH {
        if let Some((_, key)) = tasks.iter().find(|(tp, _)| *tp == p) {
            return Some(*key);
        }
        match parent_of(proc, p) {
            Some(pp) if pp > 1 && pp != p => p = pp,
            _ => return None,
        }
    }
    None
}

impl Runtime {
    /// The live task that process `pid` belongs to (see the module docs).
    pub fn task_of_pid(&self, pid: u32) -> Option<TaskKey> {
        let mut by_name: Vec<(String, TaskKey)> = Vec::new();
        let mut by_pid: Vec<(u32, TaskKey)> = Vec::new();
        {
            let inner = self.lock();
            let live = inner
                .tasks
                .values()
                .filter(|t| t.phase != crate::reconcile::Phase::Exited);
            for t in live {
                if let Some(c) = &t.meta.cgroup {
                    by_name.push((c.clone(), t.meta.key));
                }
                if let Some(p) = t.pid {
                    by_pid.push((p, t.meta.key));
                }
            }
        }
        let proc = Path::new("/proc");
        if let Ok(text) = std::fs::read_to_string(proc.join(pid.to_string()).join("cgroup")) {
            if let Some(k) = by_cgroup(&text, &by_name) {
                return Some(k);
            }
        }
        by_ancestry(proc, pid, &by_pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(job: u64) -> TaskKey {
        TaskKey {
            job,
            alloc: job,
            task: 0,
        }
    }

    #[test]
    fn cgroup_lines_v1_and_v2() {
        let tasks = vec![("job7.t0.a3".to_string(), key(7))];
        let v1 = "12:memory:/muster/job7.t0.a3\n11:devices:/muster/job7.t0.a3\n";
        assert_eq!(by_cgroup(v1, &tasks), Some(key(7)));
        let v2 = "0::/muster/job7.t0.a3\n";
        assert_eq!(by_cgroup(v2, &tasks), Some(key(7)));
        let other = "0::/user.slice/session-1.scope\n12:memory:/muster/job7.t0.a33\n";
        assert_eq!(by_cgroup(other, &tasks), None, "names match whole");
    }

    #[test]
    fn ancestry_finds_the_task_above_a_child() {
        let proc = tempfile::tempdir().unwrap();
        let stat = |pid: u32, ppid: u32| {
            let d = proc.path().join(pid.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("stat"), format!("{pid} (sh (x) y) S {ppid} 1 1")).unwrap();
        };
        stat(300, 200);
        stat(200, 100);
        stat(100, 1);
        stat(400, 1);
        let tasks = vec![(100, key(1))];
        assert_eq!(by_ancestry(proc.path(), 300, &tasks), Some(key(1)));
        assert_eq!(by_ancestry(proc.path(), 100, &tasks), Some(key(1)));
        assert_eq!(by_ancestry(proc.path(), 400, &tasks), None);
        assert_eq!(by_ancestry(proc.path(), 999, &tasks), None);
    }
}
