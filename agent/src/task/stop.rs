//! Stopping tasks, and the two things that can cut a stop short: a
//! checkpoint report (for jobs that asked to be killed once they have
//! checkpointed) and a task frozen by self-fencing (its allocation was
//! revoked while the agent had no lease, so its replacement may already run).
//!
//! A stop is: the job's stop signal (SIGTERM unless it named another) to the
//! task's process group and every process of its cgroup, then the grace
//! period, then SIGKILL to all of them. The signal and grace come from the
//! assignment and are kept in `task.json`, so a task adopted after an agent
//! restart is stopped exactly as it would have been.

use super::{fence, Event, Phase, Runtime, TaskKey};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::sync::Arc;
use std::time::Duration;

impl Runtime {
    /// Stop a task: its signal, its grace, then SIGKILL (see the module docs).
    pub(super) fn kill(self: &Arc<Self>, key: TaskKey) {
        let (pid, cgroup, meta, checkpointed) = {
            let mut inner = self.lock();
            let Some(t) = inner.tasks.get_mut(&key) else {
                return;
            };
            t.phase = Phase::Killing;
            (
                t.pid,
                t.meta.cgroup.clone(),
                t.meta.clone(),
                t.checkpointed.clone(),
            )
        };
        let fenced = self.task_dir(key).join(fence::MARKER).exists();
        let sig = Signal::try_from(meta.stop_signal).unwrap_or(Signal::SIGTERM);
        // A scheduler that sends a stop policy always names the signal; an
        // assignment without one (signal 0) gets the agent's own grace.
        let grace = match meta.stop_signal {
            0 => self.settings.kill_grace,
            _ => Duration::from_millis(meta.grace_ms),
        };
        let rt = self.clone();
        tokio::spawn(async move {
            if fenced {
                tracing::warn!(task = %key, "allocation revoked while fenced; killing at once");
                rt.signal_off_reactor(pid, cgroup, Signal::SIGKILL).await;
                return;
            }
            // Listen before signalling: a report that answers the signal
            // must not be missed, and one from before it must not count.
            let reported = checkpointed.notified();
            tokio::pin!(reported);
            reported.as_mut().enable();
            tracing::info!(task = %key, signal = %sig, ?grace, "stopping task");
            rt.signal_off_reactor(pid, cgroup, sig).await;
            if meta.kill_on_checkpoint {
                tokio::select! {
                    _ = tokio::time::sleep(grace) => {}
                    _ = reported => tracing::info!(task = %key, "checkpoint reported; killing now"),
                }
            } else {
                tokio::time::sleep(grace).await;
            }
            let (pid, cgroup, phase) = match rt.lock().tasks.get(&key) {
                Some(t) => (t.pid, t.meta.cgroup.clone(), t.phase),
                None => return,
            };
            if phase != Phase::Exited {
                tracing::info!(task = %key, "grace period over; killing");
                rt.signal_off_reactor(pid, cgroup, Signal::SIGKILL).await;
            }
        });
    }

    /// `signal` on a blocking thread: freezing a cgroup can take a while.
    pub(super) async fn signal_off_reactor(
        self: &Arc<Self>,
        pid: Option<u32>,
        cgroup: Option<String>,
        sig: Signal,
    ) {
        let rt = self.clone();
        let _ = tokio::task::spawn_blocking(move || rt.signal(pid, cgroup.as_deref(), sig)).await;
    }

    /// Each process of the task gets `sig` once: through its cgroup, which
    /// holds every process the task made (also those that left its process
    /// group); only without a cgroup (or if signalling it failed) through
    /// the process group the task leads. Both at once delivered the stop
    /// signal twice to many tasks, and a handler ran twice.
    fn signal(&self, pid: Option<u32>, cgroup: Option<&str>, sig: Signal) {
        if let (Some(cg), Some(name)) = (&self.cgroups, cgroup) {
            // Only a cgroup that still holds the task's processes: a missing
            // one (renamed parent, removed) signals nothing, and the process
            // group must then be signalled instead.
            let holds = cg.pids(name).is_ok_and(|p| !p.is_empty());
            if holds {
                match cg.kill_all(name, sig) {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(cgroup = name, "signal {sig} failed: {e}"),
                }
            }
        }
        if let Some(pid) = pid {
            // The task leads its own session: signal the whole group.
            let _ = signal::killpg(Pid::from_raw(pid as i32), sig);
        }
    }

    /// A task reported a finished checkpoint: tell the scheduler, and end a
    /// stop that waits for one.
    pub fn checkpoint(&self, key: TaskKey, step: Option<u64>) -> Result<(), String> {
        let started = {
            let inner = self.lock();
            let t = inner
                .tasks
                .get(&key)
                .ok_or_else(|| format!("task {key} is not on this node"))?;
            if t.phase == Phase::Exited {
                return Err(format!("task {key} has exited"));
            }
            t.checkpointed.notify_waiters();
            t.pid.is_some()
        };
        if !started {
            // A task can report before the supervisor's poll saw it start:
            // the scheduler must hear of the start first.
            if let Some(pid) = super::read_pid(&self.task_dir(key).join("pid")) {
                self.mark_started(key, pid);
            }
        }
        tracing::info!(task = %key, ?step, "checkpoint reported");
        self.events
            .send(Event::Checkpointed { key, step })
            .map_err(|_| "the agent is shutting down".to_string())
    }

    /// The agent has a lease again: thaw the frozen tasks the scheduler still
    /// wants. (Revoked ones are killed by reconcile; see [`fence`].)
    pub fn thaw_fenced(self: &Arc<Self>) {
        let thaw: Vec<(TaskKey, Option<u32>, Option<String>)> = {
            let inner = self.lock();
            inner
                .tasks
                .values()
                .filter(|t| matches!(t.phase, Phase::Starting | Phase::Running))
                .filter(|t| {
                    inner
                        .desired
                        .as_ref()
                        .is_some_and(|d| d.contains_key(&t.meta.key))
                })
                .map(|t| (t.meta.key, t.pid, t.meta.cgroup.clone()))
                .collect()
        };
        for (key, pid, cgroup) in thaw {
            let marker = self.task_dir(key).join(fence::MARKER);
            if !marker.exists() {
                continue;
            }
            tracing::info!(task = %key, "lease renewed; thawing task");
            self.signal(pid, cgroup.as_deref(), Signal::SIGCONT);
            let _ = std::fs::remove_file(&marker);
        }
    }
}
