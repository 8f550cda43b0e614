//! Which task a local process belongs to.
//!
//! `muster checkpoint done` reaches the agent over a Unix socket; the kernel
//! tells the agent the caller's pid and uid (SO_PEERCRED), which a process
//! cannot forge. The caller belongs to a task if it runs as that task's user
//! *and* it is in that task's cgroup (the whole path under the agent's
//! cgroup parent, as `/proc/<pid>/cgroup` gives it, not merely a cgroup whose
//! last component has the task's name: any user can make such a cgroup
//! elsewhere, e.g. in a delegated subtree), or, where there are no cgroups,
//! if the task's main process is among its ancestors. A process outside
//! every task is refused, so one task can never report for another.

use super::{Runtime, TaskKey};
use std::path::Path;

/// Most parent links followed before giving up.
const MAX_DEPTH: usize = 128;

/// A live task, as the task socket matches callers against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub key: TaskKey,
    /// The uid the task runs as.
    pub uid: u32,
    /// Its cgroup's path from the hierarchy's root (`/<parent>/<name>`).
    pub cgroup: Option<String>,
    /// Its main process.
    pub pid: Option<u32>,
}

/// The path `/proc/<pid>/cgroup` shows for task cgroup `name` under the
/// agent's `parent` (which may have several components).
pub fn cgroup_path(parent: &str, name: &str) -> String {
    let mut out = String::new();
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        out.push('/');
        out.push_str(part);
    }
    out.push('/');
    out.push_str(name);
    out
}

/// The task of user `uid` whose cgroup path is one of the paths in
/// `/proc/<pid>/cgroup` (whole paths compared, not their last component).
pub fn by_cgroup(proc_cgroup: &str, uid: u32, tasks: &[Candidate]) -> Option<TaskKey> {
    for line in proc_cgroup.lines() {
        // hierarchy-id:controllers:path
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let found = tasks
            .iter()
            .find(|t| t.uid == uid && t.cgroup.as_deref() == Some(path));
        if let Some(t) = found {
            return Some(t.key);
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

/// The task of user `uid` among `tasks` whose main process `pid`
/// descends from (or is).
pub fn by_ancestry(proc: &Path, pid: u32, uid: u32, tasks: &[Candidate]) -> Option<TaskKey> {
    let mut p = pid;
    for _ in 0..MAX_DEPTH {
        if let Some(t) = tasks.iter().find(|t| t.pid == Some(p)) {
            return (t.uid == uid).then_some(t.key);
        }
        match parent_of(proc, p) {
            Some(pp) if pp > 1 && pp != p => p = pp,
            _ => return None,
        }
    }
    None
}

impl Runtime {
    /// The live task that process `pid`, running as `uid`, belongs to (see
    /// the module docs).
    pub fn task_of(&self, pid: u32, uid: u32) -> Option<TaskKey> {
        let parent = &self.settings.cgroup_parent;
        let tasks: Vec<Candidate> = {
            let inner = self.lock();
            inner
                .tasks
                .values()
                .filter(|t| t.phase != crate::reconcile::Phase::Exited)
                .filter_map(|t| {
                    Some(Candidate {
                        key: t.meta.key,
                        uid: t.meta.uid?,
                        cgroup: t.meta.cgroup.as_deref().map(|c| cgroup_path(parent, c)),
                        pid: t.pid,
                    })
                })
                .collect()
        };
        let proc = Path::new("/proc");
        if self.cgroups.is_some() {
            let text = std::fs::read_to_string(proc.join(pid.to_string()).join("cgroup")).ok()?;
            return by_cgroup(&text, uid, &tasks);
        }
        by_ancestry(proc, pid, uid, &tasks)
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

    fn task(job: u64, uid: u32, parent: &str, pid: Option<u32>) -> Candidate {
        Candidate {
            key: key(job),
            uid,
            cgroup: Some(cgroup_path(parent, &format!("job{job}.t0.a{job}"))),
            pid,
        }
    }

    #[test]
    fn cgroup_paths_join_the_parent() {
        assert_eq!(cgroup_path("muster", "j"), "/muster/j");
        assert_eq!(cgroup_path("/a/b/", "j"), "/a/b/j");
    }

    #[test]
    fn cgroup_lines_v1_and_v2() {
        let tasks = vec![task(7, 1000, "muster", None)];
        let v1 = "12:memory:/muster/job7.t0.a7\n11:devices:/muster/job7.t0.a7\n";
        assert_eq!(by_cgroup(v1, 1000, &tasks), Some(key(7)));
        let v2 = "0::/muster/job7.t0.a7\n";
        assert_eq!(by_cgroup(v2, 1000, &tasks), Some(key(7)));
        let other = "0::/user.slice/session-1.scope\n12:memory:/muster/job7.t0.a77\n";
        assert_eq!(by_cgroup(other, 1000, &tasks), None, "names match whole");
    }

    /// The old rule matched the last path component only: a process in a
    /// cgroup of the same name elsewhere (a user's delegated subtree) passed
    /// for the task, and so did another user's process.
    #[test]
    fn only_the_whole_path_and_the_tasks_user_match() {
        let tasks = vec![
            task(7, 1000, "system.slice/muster-agent.service/tasks", None),
            task(8, 1001, "system.slice/muster-agent.service/tasks", None),
        ];
        let forged = "0::/user.slice/user-1001.slice/job7.t0.a7\n";
        assert_eq!(by_cgroup(forged, 1001, &tasks), None, "same leaf elsewhere");
        let nested = "0::/system.slice/muster-agent.service/tasks/job8.t0.a8/job7.t0.a7\n";
        assert_eq!(by_cgroup(nested, 1001, &tasks), None, "below another task");
        let real = "0::/system.slice/muster-agent.service/tasks/job7.t0.a7\n";
        assert_eq!(by_cgroup(real, 1000, &tasks), Some(key(7)));
        assert_eq!(
            by_cgroup(real, 1001, &tasks),
            None,
            "another user's process"
        );
        assert_eq!(
            by_cgroup(real, 0, &tasks),
            None,
            "root is no task's user either"
        );
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
        let tasks = vec![task(1, 1000, "m", Some(100))];
        assert_eq!(by_ancestry(proc.path(), 300, 1000, &tasks), Some(key(1)));
        assert_eq!(by_ancestry(proc.path(), 100, 1000, &tasks), Some(key(1)));
        assert_eq!(
            by_ancestry(proc.path(), 300, 1001, &tasks),
            None,
            "wrong user"
        );
        assert_eq!(by_ancestry(proc.path(), 400, 1000, &tasks), None);
        assert_eq!(by_ancestry(proc.path(), 999, 1000, &tasks), None);
    }
}
