//! Apply for the parts of a job's life beyond placement: restarts after a
//! failure, infrastructure requeues, checkpoint reports, GPU faults and
//! drained nodes.
//!
//! Two ways back to the queue: a *failure* restart (a task exited non-zero
//! and the job has `max_restarts` left) uses up one of the user's restarts;
//! an *infrastructure* requeue (a node lost, a task lost across an agent
//! restart, a GPU fault) does not, because the job did nothing wrong. Both
//! move the job to `Requeued`: its other tasks leave their nodes' desired
//! sets (the agents stop them with the job's signal and grace), and once
//! every task has stopped the job is pending again with its restart count
//! raised and the same checkpoint directory.

use super::{ApplyResult, State, TaskKey};
use crate::model::{Checkpoint, JobId, JobState};

impl State {
    /// Send a live job back through `Requeued` to the queue.
    pub(super) fn requeue(&mut self, id: JobId, why: String, failure: bool, at_ms: i64) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state.is_terminal() || job.state.is_stopping() {
            return;
        }
        if failure {
            job.failures += 1;
            job.reason = format!(
                "{why}; restart {} of {}",
                job.failures, job.spec.lifecycle.max_restarts
            );
        } else {
            job.reason = format!("{why}; requeued (not counted against its restarts)");
        }
        job.state = JobState::Requeued;
        self.release_unstarted(id, at_ms);
        // Indexes the job when every task has stopped; until then it holds.
        self.requeue_if_stopped(id);
    }

    /// Record a finished checkpoint of a live task of the current allocation.
    pub(super) fn task_checkpointed(
        &mut self,
        key: TaskKey,
        step: Option<u64>,
        at_ms: i64,
    ) -> ApplyResult {
        let Some(task) = self.task_mut(key) else {
            return ApplyResult::Rejected(format!(
                "job {}: task {} of allocation {} is not current",
                key.job, key.task, key.alloc
            ));
        };
        // Assigned too: the report may overtake the start on its way here;
        // the agent vouches that the task runs.
        if !task.state.holds_resources() {
            return ApplyResult::Rejected(format!(
                "job {}: task {} is not running",
                key.job, key.task
            ));
        }
        let Some(job) = self.jobs.get_mut(&key.job) else {
            return ApplyResult::NotFound(format!("job {} not found", key.job));
        };
        job.last_checkpoint = Some(Checkpoint {
            at_ms,
            step,
            task: key.task,
        });
        ApplyResult::Applied
    }

    /// Mark a GPU failed; requeue what runs on it; drain the node if asked.
    pub(super) fn gpu_failed(
        &mut self,
        node: &str,
        gpu: u32,
        reason: &str,
        drain: bool,
        at_ms: i64,
    ) -> ApplyResult {
        let Some(n) = self.nodes.get_mut(node) else {
            return ApplyResult::NotFound(format!("node {node} not found"));
        };
        let Some(g) = n.gpus.iter_mut().find(|g| g.index == gpu) else {
            return ApplyResult::NotFound(format!("node {node} has no GPU {gpu}"));
        };
        // The agent's own report (`healthy`) is left as it is: resume
        // clears this fault, and the report still decides.
        g.fault = reason.to_string();
        if drain && n.drain.is_none() {
            n.drain = Some(format!("GPU {gpu}: {reason}"));
        }
        let hit: Vec<JobId> = self
            .active
            .iter()
            .copied()
            .filter(|id| {
                self.jobs
                    .get(id)
                    .and_then(|j| j.alloc.as_ref())
                    .is_some_and(|a| {
                        a.tasks.iter().any(|t| {
                            t.state.holds_resources()
                                && t.placement.node == node
                                && t.placement.gpus.contains(&gpu)
                        })
                    })
            })
            .collect();
        for id in hit {
            let why = format!("GPU {gpu} of node {node} failed ({reason})");
            self.requeue(id, why, false, at_ms);
        }
        ApplyResult::Applied
    }

    /// Drain (`Some(reason)`) or resume (`None`) a node. Resuming also clears
    /// the GPU faults the scheduler recorded, and nothing else: a GPU the
    /// agent's latest registration reports unhealthy stays unusable.
    pub(super) fn drain_node(&mut self, name: &str, reason: Option<&str>) -> ApplyResult {
        let Some(n) = self.nodes.get_mut(name) else {
            return ApplyResult::NotFound(format!("node {name} not found"));
        };
        match reason {
            Some(r) => n.drain = Some(r.to_string()),
            None => {
                n.drain = None;
                for g in n.gpus.iter_mut() {
                    g.fault.clear();
                }
            }
        }
        ApplyResult::Applied
    }
}
