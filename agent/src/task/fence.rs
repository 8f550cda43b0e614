//! Self-fencing: a task whose agent has lost its lease stops running.
//!
//! The scheduler marks a node lost when it has not heard from its agent for
//! `agent_lease`, and requeues the node's gangs elsewhere. If the agent is
//! merely stalled (stopped, swapping, cut off), its tasks would otherwise go
//! on running beside their replacements: two copies writing one checkpoint.
//!
//! So the agent keeps a *lease file*: the Unix-millisecond instant until
//! which its lease is surely alive, the send time of the newest heartbeat the
//! leader acknowledged plus 90% of the lease (the scheduler starts counting
//! only when the heartbeat arrives, so this is always earlier than the
//! scheduler's own deadline). Each task's shim, a separate process that runs
//! on while the agent is stalled, reads the file every
//! [`POLL`](crate::task::shim) and, once the instant has passed, freezes its
//! task (SIGSTOP to its process group and every process of its cgroup) and
//! leaves a `fenced` marker. A frozen task holds its memory but does no work
//! and writes nothing.
//!
//! Freezing rather than killing means a brief outage of every scheduler at
//! once only pauses work. When the agent has a lease again it thaws the
//! tasks the scheduler still wants (SIGCONT) and kills the ones it revoked
//! meanwhile, without a grace period: their replacements may already run.

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};

/// The marker a shim leaves in its task folder when it froze the task.
pub const MARKER: &str = "fenced";

pub use muster_proto::daemon::now_ms;

/// The deadline in a lease file, if there is a readable one.
pub fn read_deadline(lease: &Path) -> Option<i64> {
    std::fs::read_to_string(lease).ok()?.trim().parse().ok()
}

/// Record a new deadline (atomically: a shim never reads half a number).
pub fn write_deadline(lease: &Path, deadline_ms: i64) -> std::io::Result<()> {
    super::shim::write_atomic(lease, deadline_ms.to_string().as_bytes())
}

/// Every pid listed in the task's cgroup (any of its `cgroup.procs` files).
fn cgroup_pids(procs: &[PathBuf]) -> Vec<i32> {
    let mut pids: Vec<i32> = procs
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Send `sig` to the task's process group and to every process of its cgroup.
pub fn signal_task(pid: u32, procs: &[PathBuf], sig: Signal) {
    let _ = killpg(Pid::from_raw(pid as i32), sig);
    for p in cgroup_pids(procs) {
        let _ = kill(Pid::from_raw(p), sig);
    }
}

/// The shim's periodic check: freeze the task once the lease has passed.
/// Returns whether it froze it just now.
pub fn check(lease: &Path, marker: &Path, pid: u32, procs: &[PathBuf]) -> bool {
    let Some(deadline) = read_deadline(lease) else {
        return false; // never registered, or fencing is off
    };
    if now_ms() <= deadline || marker.exists() {
        return false;
    }
    let _ = std::fs::write(marker, now_ms().to_string());
    // Twice: a process forked between the first pass's reads is caught by the second.
    signal_task(pid, procs, Signal::SIGSTOP);
    signal_task(pid, procs, Signal::SIGSTOP);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn freezes_only_past_the_deadline_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let lease = dir.path().join("lease");
        let marker = dir.path().join(MARKER);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(
            !check(&lease, &marker, pid, &[]),
            "no lease file: no fencing"
        );
        write_deadline(&lease, now_ms() + 60_000).unwrap();
        assert!(!check(&lease, &marker, pid, &[]), "lease alive");
        write_deadline(&lease, now_ms() - 1).unwrap();
        assert!(check(&lease, &marker, pid, &[]), "lease passed: frozen");
        assert!(marker.exists());
        // Signals are delivered asynchronously: give the kernel a moment.
        let state = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            stat.rsplit(") ").next().unwrap().chars().next().unwrap()
        };
        let t0 = std::time::Instant::now();
        while state() != 'T' && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(state(), 'T', "stopped");
        assert!(!check(&lease, &marker, pid, &[]), "already frozen");
        signal_task(pid, &[], Signal::SIGKILL);
        let _ = child.wait();
    }
}
