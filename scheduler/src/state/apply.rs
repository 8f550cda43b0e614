//! `State::apply`: one function per command, each checking before it changes
//! anything, so a rejected command leaves no trace.

use super::{
    ApplyResult, Command, NodeRegistration, NodeUsage, Placement, PreemptOrder, State, TaskKey,
    TenantUse,
};
use crate::model::{
    AllocId, Allocation, ExitInfo, GpuRecord, Job, JobId, JobSpec, JobState, Node, NodeState,
    TaskPlacement, TaskState, TaskStatus,
};
use crate::planner::fit;

/// First port handed out as `MASTER_PORT`; each rank-0 node gets the lowest free
/// port of the range.
pub const MASTER_PORT_BASE: u16 = 29500;
const MASTER_PORT_RANGE: u16 = 1000;
/// Idempotency keys remembered; a client retries within seconds, so the last
/// hundred thousand submissions are plenty.
const MAX_SUBMIT_KEYS: usize = 100_000;
/// Most jobs in one array submission.
pub const MAX_ARRAY: u32 = 100_000;

/// The idempotency key of `user`'s request `key`, as remembered.
fn submit_key(user: &str, key: &str) -> String {
    format!("{user}\u{0}{key}")
}

impl State {
    /// Apply one command. Deterministic; see the module docs.
    pub fn apply(&mut self, cmd: &Command) -> ApplyResult {
        match cmd {
            Command::Submit {
                spec,
                user,
                at_ms,
                request_id,
            } => {
                // Keys are the user's own: another user's equal key is
                // another request (and learns nothing of the first).
                let key = request_id.as_ref().map(|k| submit_key(user, k));
                if let Some(id) = key.as_ref().and_then(|k| self.submit_keys.get(k)) {
                    return ApplyResult::Submitted(*id);
                }
                let r = self.submit(spec, user, *at_ms);
                if let (ApplyResult::Submitted(id), Some(key)) = (&r, key) {
                    self.remember_submit_key(&key, *id);
                }
                r
            }
            Command::SubmitArray {
                spec,
                user,
                at_ms,
                request_id,
                count,
            } => {
                // Keys are the user's own: another user's equal key is
                // another request (and learns nothing of the first).
                let key = request_id.as_ref().map(|k| submit_key(user, k));
                if let Some(id) = key.as_ref().and_then(|k| self.submit_keys.get(k)) {
                    return ApplyResult::Submitted(*id);
                }
                let r = self.submit_array(spec, user, *at_ms, *count);
                if let (ApplyResult::Submitted(id), Some(key)) = (&r, key) {
                    self.remember_submit_key(&key, *id);
                }
                r
            }
            Command::Cancel { job, at_ms } => self.cancel(*job, *at_ms),
            Command::CreateTenant {
                tenant,
                default_for,
            } => self.create_tenant(tenant, default_for),
            Command::UpdateTenant { name, patch } => self.update_tenant(name, patch),
            Command::DeleteTenant { name } => self.delete_tenant(name),
            Command::AccrueUsage {
                at_ms,
                half_life_secs,
            } => self.accrue_usage(*at_ms, *half_life_secs),
            Command::Preempt { orders, at_ms } => self.preempt(orders, *at_ms),
            Command::RegisterNode {
                node,
                running,
                at_ms,
            } => self.register_node(node, running, *at_ms),
            Command::NodeLost { name, at_ms } => self.node_lost(name, *at_ms),
            Command::ApplyPlan {
                term,
                at_ms,
                placements,
            } => self.apply_plan(*term, *at_ms, placements),
            Command::TaskStarted { key, at_ms } => self.task_started(*key, *at_ms),
            Command::TaskExited { key, exit, at_ms } => self.task_exited(*key, exit, *at_ms),
            Command::TimeOut { job, at_ms } => self.time_out(*job, *at_ms),
            Command::TaskCheckpointed { key, step, at_ms } => {
                self.task_checkpointed(*key, *step, *at_ms)
            }
            Command::GpuFailed {
                node,
                gpu,
                reason,
                drain,
                at_ms,
            } => self.gpu_failed(node, *gpu, reason, *drain, *at_ms),
            Command::DrainNode { name, reason } => self.drain_node(name, reason.as_deref()),
            Command::Authorized { who, at_ms, cmd } => self.apply_authorized(who, *at_ms, cmd),
            Command::Audit { entries } => {
                for e in entries {
                    self.record(e.clone());
                }
                ApplyResult::Applied
            }
            Command::IssueToken { token } => self.issue_token(token),
            Command::RevokeToken { id } => self.revoke_token(id),
            Command::SetTenantAdmins {
                tenant,
                add,
                remove,
            } => self.set_tenant_admins(tenant, add, remove),
        }
    }

    /// Every element is checked before any is created: all or nothing. The
    /// elements differ only in `name[i]` and `MUSTER_ARRAY_INDEX`, so the
    /// first is checked whole and the longest name (the last index) against
    /// the name limit; then every element is created, none can be dropped.
    fn submit_array(&mut self, spec: &JobSpec, user: &str, at_ms: i64, count: u32) -> ApplyResult {
        if let Err(e) = validate_array(spec, count) {
            return ApplyResult::Rejected(e);
        }
        let element = |i: u32| {
            let mut s = spec.clone();
            s.name = array_element_name(&spec.name, i);
            s.env.insert("MUSTER_ARRAY_INDEX".into(), i.to_string());
            s
        };
        let first = match self.admit(&element(0), user) {
            Ok(spec) => spec,
            Err(e) => return ApplyResult::Rejected(e),
        };
        let first_id = self.create_job(first, user, at_ms);
        for i in 1..count {
            let spec = JobSpec {
                tenant: self.jobs[&first_id].spec.tenant.clone(),
                ..element(i)
            };
            self.create_job(spec, user, at_ms);
        }
        ApplyResult::Submitted(first_id)
    }

    fn submit(&mut self, spec: &JobSpec, user: &str, at_ms: i64) -> ApplyResult {
        match self.admit(spec, user) {
            Ok(spec) => ApplyResult::Submitted(self.create_job(spec, user, at_ms)),
            Err(e) => ApplyResult::Rejected(e),
        }
    }

    /// The spec as it would be accepted (its tenant resolved), or why not.
    fn admit(&self, spec: &JobSpec, user: &str) -> Result<JobSpec, String> {
        let tenant = self.resolve_tenant(user, &spec.tenant)?;
        let spec = JobSpec {
            tenant,
            ..spec.clone()
        };
        fit::validate_spec(self, &spec)?;
        // The configured maximum is checked before proposing (the API);
        // here the hard one, so no accepted limit can overflow a deadline.
        crate::model::check_time_limit(&spec, crate::model::MAX_TIME_LIMIT_SECS)?;
        Ok(spec)
    }

    /// Add an admitted job to the queue.
    fn create_job(&mut self, spec: JobSpec, user: &str, at_ms: i64) -> JobId {
        let id = JobId(self.next_job_id);
        self.next_job_id += 1;
        self.jobs.insert(
            id,
            Job {
                id,
                spec,
                user: user.to_string(),
                state: JobState::Pending,
                submitted_at_ms: at_ms,
                started_at_ms: 0,
                ended_at_ms: 0,
                reason: String::new(),
                restart_count: 0,
                alloc: None,
                preempted_for: None,
                last_checkpoint: None,
                failures: 0,
            },
        );
        self.pending.insert(id);
        id
    }

    fn remember_submit_key(&mut self, key: &str, id: JobId) {
        self.submit_keys.insert(key.to_string(), id);
        self.submit_key_order.push_back(key.to_string());
        while self.submit_key_order.len() > MAX_SUBMIT_KEYS {
            if let Some(old) = self.submit_key_order.pop_front() {
                self.submit_keys.remove(&old);
            }
        }
    }

    fn cancel(&mut self, id: JobId, at_ms: i64) -> ApplyResult {
        let Some(job) = self.jobs.get(&id) else {
            return ApplyResult::NotFound(format!("job {id} not found"));
        };
        // Cancelling a cancelled job changes nothing and succeeds: a
        // retried cancel (its first answer lost) is not an error.
        if job.state == JobState::Cancelled {
            return ApplyResult::Applied;
        }
        if job.state.is_terminal() {
            return ApplyResult::Rejected(format!("job {id} already {}", job.state.as_str()));
        }
        self.finish_job(id, JobState::Cancelled, "cancelled by user".into(), at_ms);
        ApplyResult::Applied
    }

    fn register_node(
        &mut self,
        reg: &NodeRegistration,
        running: &[TaskKey],
        at_ms: i64,
    ) -> ApplyResult {
        let before = self.nodes.get(&reg.name);
        let registered_at_ms = before.map(|n| n.registered_at_ms).unwrap_or(at_ms);
        let drain = before.and_then(|n| n.drain.clone());
        // A fault the scheduler recorded outlives an agent restart: only
        // `muster node resume` clears it.
        let gpus = reg
            .gpus
            .iter()
            .map(|g| {
                let fault = before
                    .and_then(|n| n.gpus.iter().find(|o| o.uuid == g.uuid))
                    .map(|o| o.fault.clone())
                    .unwrap_or_default();
                // `healthy` is the agent's report as it is now; the
                // recorded fault is kept apart (see `GpuRecord::usable`).
                GpuRecord { fault, ..g.clone() }
            })
            .collect();
        self.nodes.insert(
            reg.name.clone(),
            Node {
                name: reg.name.clone(),
                address: reg.address.clone(),
                gpus,
                cpu_millis: reg.cpu_millis,
                memory_bytes: reg.memory_bytes,
                labels: reg.labels.clone(),
                state: NodeState::Ready,
                registered_at_ms,
                drain,
                log_key: reg.log_key.clone(),
            },
        );
        // Tasks the scheduler believes run there but the agent no longer has.
        let lost: Vec<TaskKey> = self
            .tasks_on_node(&reg.name)
            .into_iter()
            .filter(|(k, st)| *st == TaskState::Running && !running.contains(k))
            .map(|(k, _)| k)
            .collect();
        let msg = format!("task lost: node {} came back without it", reg.name);
        self.lose_tasks(&lost, &msg, at_ms);
        ApplyResult::Applied
    }

    fn node_lost(&mut self, name: &str, at_ms: i64) -> ApplyResult {
        match self.nodes.get_mut(name) {
            None => return ApplyResult::NotFound(format!("node {name} not found")),
            Some(n) if n.state == NodeState::Lost => return ApplyResult::Applied,
            Some(n) => n.state = NodeState::Lost,
        }
        let keys: Vec<TaskKey> = self
            .tasks_on_node(name)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        self.lose_tasks(&keys, &format!("node {name} lost"), at_ms);
        ApplyResult::Applied
    }

    fn apply_plan(&mut self, term: u64, at_ms: i64, placements: &[Placement]) -> ApplyResult {
        let mut placed = Vec::new();
        let mut rejected = Vec::new();
        for p in placements {
            match fit::check_placement(self, p) {
                Ok(()) => {
                    self.place(p, term, at_ms);
                    placed.push(p.job);
                }
                Err(reason) => rejected.push((p.job, reason)),
            }
        }
        ApplyResult::Planned { placed, rejected }
    }

    fn place(&mut self, p: &Placement, term: u64, at_ms: i64) {
        let alloc_id = AllocId(self.next_alloc_id);
        self.next_alloc_id += 1;
        let master_port = self.free_master_port(&p.tasks[0].node);
        let borrowed = self.jobs.get(&p.job).is_some_and(|j| {
            let guarantee = self
                .tenants
                .get(&j.spec.tenant)
                .map_or(0, |t| t.guarantee_gpus);
            self.tenant_use(&j.spec.tenant)
                .plus(TenantUse::of_job(j))
                .gpus
                > guarantee
        });
        let Some(job) = self.jobs.get_mut(&p.job) else {
            return;
        };
        job.state = JobState::Placed;
        job.preempted_for = None;
        job.reason.clear();
        job.alloc = Some(Allocation {
            id: alloc_id,
            term,
            placed_at_ms: at_ms,
            master_port,
            borrowed,
            tasks: p
                .tasks
                .iter()
                .map(|t| TaskStatus {
                    placement: t.clone(),
                    state: TaskState::Assigned,
                    exit: None,
                    started_at_ms: 0,
                    ended_at_ms: 0,
                })
                .collect(),
        });
        self.pending.remove(&p.job);
        self.index_job(p.job);
    }

    /// The host a node's agent runs on (its address without the port), so
    /// that nodes sharing a host (`muster dev`: every node is 127.0.0.1)
    /// share one pool of ports.
    fn host_of(&self, node: &str) -> String {
        self.nodes
            .get(node)
            .and_then(|n| n.address.rsplit_once(':').map(|(h, _)| h.to_string()))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| node.to_string())
    }

    /// A `MASTER_PORT` no active gang led from the same host uses.
    fn free_master_port(&self, rank0_node: &str) -> u16 {
        let host = self.host_of(rank0_node);
        let used: std::collections::BTreeSet<u16> = self
            .active
            .iter()
            .filter_map(|id| self.jobs.get(id)?.alloc.as_ref())
            .filter(|a| {
                a.tasks
                    .first()
                    .is_some_and(|t| self.host_of(&t.placement.node) == host)
            })
            .map(|a| a.master_port)
            .collect();
        (MASTER_PORT_BASE..MASTER_PORT_BASE + MASTER_PORT_RANGE)
            .find(|p| !used.contains(p))
            .unwrap_or(MASTER_PORT_BASE)
    }

    fn task_started(&mut self, key: TaskKey, at_ms: i64) -> ApplyResult {
        let Some(task) = self.task_mut(key) else {
            return ApplyResult::Rejected(format!("no task {}.{}", key.job, key.task));
        };
        if task.state != TaskState::Assigned {
            return ApplyResult::Applied;
        }
        task.state = TaskState::Running;
        task.started_at_ms = at_ms;
        if let Some(job) = self.jobs.get_mut(&key.job) {
            if job.state == JobState::Placed {
                job.state = JobState::Running;
                job.started_at_ms = at_ms;
            }
        }
        ApplyResult::Applied
    }

    fn task_exited(&mut self, key: TaskKey, exit: &ExitInfo, at_ms: i64) -> ApplyResult {
        if self.task_mut(key).is_none() {
            return ApplyResult::Rejected(format!("no task {}.{}", key.job, key.task));
        }
        if !self.end_task(key, TaskState::Exited, exit.clone(), at_ms) {
            return ApplyResult::Applied;
        }
        let Some(job) = self.jobs.get(&key.job) else {
            return ApplyResult::Applied;
        };
        if job.state.is_stopping() {
            self.requeue_if_stopped(key.job);
        } else if !job.state.is_terminal() {
            if !exit.success() {
                let reason = format!("task {} {}", key.task, exit.describe());
                if job.failures < job.spec.lifecycle.max_restarts {
                    self.requeue(key.job, reason, true, at_ms);
                } else {
                    self.finish_job(key.job, JobState::Failed, reason, at_ms);
                }
            } else if all_tasks(job, |t| t.state == TaskState::Exited) {
                self.finish_job(key.job, JobState::Completed, String::new(), at_ms);
            }
        }
        self.index_job(key.job);
        ApplyResult::Applied
    }

    fn time_out(&mut self, id: JobId, at_ms: i64) -> ApplyResult {
        let Some(job) = self.jobs.get(&id) else {
            return ApplyResult::NotFound(format!("job {id} not found"));
        };
        let (Some(limit), Some(deadline)) = (job.spec.time_limit_secs, job.deadline_ms()) else {
            return ApplyResult::Rejected(format!("job {id} has no time limit"));
        };
        if job.state != JobState::Running || at_ms < deadline {
            return ApplyResult::Rejected(format!("job {id} is not past its time limit"));
        }
        let reason = format!("time limit of {limit}s reached");
        self.finish_job(id, JobState::TimedOut, reason, at_ms);
        ApplyResult::Applied
    }

    /// Move a job to a terminal state. Tasks that never started give their
    /// resources back now; running ones hold them until their agent reports
    /// the exit (the agent kills them because they are no longer desired).
    fn finish_job(&mut self, id: JobId, state: JobState, reason: String, at_ms: i64) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        job.state = state;
        job.reason = reason;
        job.ended_at_ms = at_ms;
        self.release_unstarted(id, at_ms);
        self.pending.remove(&id);
        self.index_job(id);
    }

    /// Tasks of the job that never started give their resources back now;
    /// running ones hold them until their agent reports the exit.
    pub(super) fn release_unstarted(&mut self, id: JobId, at_ms: i64) {
        let Some(alloc) = self.jobs.get(&id).and_then(|j| j.alloc.as_ref()) else {
            return;
        };
        let unstarted: Vec<TaskKey> = alloc
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state == TaskState::Assigned)
            .map(|(i, _)| TaskKey {
                job: id,
                alloc: alloc.id.0,
                task: i as u32,
            })
            .collect();
        for key in unstarted {
            let exit = ExitInfo {
                message: "never started".into(),
                ..ExitInfo::default()
            };
            self.end_task(key, TaskState::Exited, exit, at_ms);
        }
    }

    /// The one way a task of the current allocation stops holding its
    /// node's resources: moves it to `to` (exited or lost) and gives back
    /// what it booked, exactly once. Returns `false`, changing nothing, when
    /// the task is not current or no longer holds resources, so a task
    /// reached twice (a node loss that requeues its job, then meets the
    /// job's other tasks) is never released twice.
    pub(super) fn end_task(
        &mut self,
        key: TaskKey,
        to: TaskState,
        exit: ExitInfo,
        at_ms: i64,
    ) -> bool {
        let Some(task) = self.task_mut(key) else {
            return false;
        };
        if !task.state.holds_resources() {
            return false;
        }
        task.state = to;
        task.exit = Some(exit);
        task.ended_at_ms = at_ms;
        let placement = task.placement.clone();
        self.unbook(key.job, &placement);
        true
    }

    /// Mark these tasks lost (a node lost, or back without them), then
    /// decide each job once: all of a job's lost tasks are ended before its
    /// requeue looks at which of its tasks still hold resources.
    fn lose_tasks(&mut self, keys: &[TaskKey], message: &str, at_ms: i64) {
        let mut jobs: Vec<JobId> = Vec::new();
        for key in keys {
            let exit = ExitInfo {
                message: message.to_string(),
                ..ExitInfo::default()
            };
            if self.end_task(*key, TaskState::Lost, exit, at_ms) && !jobs.contains(&key.job) {
                jobs.push(key.job);
            }
        }
        for id in jobs {
            let state = self.jobs.get(&id).map(|j| j.state);
            if state.is_some_and(JobState::is_stopping) {
                self.requeue_if_stopped(id);
            } else if state.is_some_and(|s| !s.is_terminal()) {
                // The infrastructure failed the job, not the job itself.
                self.requeue(id, message.to_string(), false, at_ms);
            }
            self.index_job(id);
        }
    }

    /// Give back what one task booked on its node and its tenant.
    fn unbook(&mut self, job: JobId, p: &TaskPlacement) {
        if let Some(u) = self.usage.get_mut(&p.node) {
            u.remove(job, p);
            // Canonical: a node that holds nothing has no entry, as after a
            // rebuild from a snapshot (so the two compare equal).
            if *u == NodeUsage::default() {
                self.usage.remove(&p.node);
            }
        }
        if let Some(tenant) = self.jobs.get(&job).map(|j| j.spec.tenant.clone()) {
            self.book_tenant(&tenant, p, false);
        }
    }

    /// Carry out the planner's preemptions: each victim leaves its nodes'
    /// desired sets (the agents stop it) and becomes `Preempting`. A stale
    /// order (job no longer running that allocation) is skipped.
    fn preempt(&mut self, orders: &[PreemptOrder], at_ms: i64) -> ApplyResult {
        let mut done = 0;
        for o in orders {
            let Some(job) = self.jobs.get_mut(&o.victim) else {
                continue;
            };
            let live = matches!(job.state, JobState::Placed | JobState::Running);
            if !live || job.alloc.as_ref().map(|a| a.id.0) != Some(o.alloc) {
                continue;
            }
            job.state = JobState::Preempting;
            job.preempted_for = Some(o.for_job);
            job.reason = format!("preempted for job {}: {}", o.for_job, o.reason);
            self.release_unstarted(o.victim, at_ms);
            self.requeue_if_stopped(o.victim);
            done += 1;
        }
        if done == 0 && !orders.is_empty() {
            return ApplyResult::Rejected("every preemption order was stale".into());
        }
        ApplyResult::Applied
    }

    /// A preempting or requeued job whose tasks have all stopped goes back
    /// to pending, with its restart count raised.
    pub(super) fn requeue_if_stopped(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if all_tasks(job, |t| !t.state.holds_resources()) {
            self.index_job(id);
            let Some(job) = self.jobs.get_mut(&id) else {
                return;
            };
            job.state = JobState::Pending;
            job.restart_count += 1;
            job.alloc = None;
            job.started_at_ms = 0;
            self.pending.insert(id);
        }
    }

    pub(super) fn task_mut(&mut self, key: TaskKey) -> Option<&mut TaskStatus> {
        let alloc = self.jobs.get_mut(&key.job)?.alloc.as_mut()?;
        if alloc.id.0 != key.alloc {
            return None;
        }
        alloc.tasks.get_mut(key.task as usize)
    }

    /// Tasks of live allocations placed on `node`, with their states.
    pub fn tasks_on_node(&self, node: &str) -> Vec<(TaskKey, TaskState)> {
        let mut out = Vec::new();
        for id in &self.active {
            let Some(alloc) = self.jobs.get(id).and_then(|j| j.alloc.as_ref()) else {
                continue;
            };
            for (i, t) in alloc.tasks.iter().enumerate() {
                if t.placement.node == node && t.state.holds_resources() {
                    let key = TaskKey {
                        job: *id,
                        alloc: alloc.id.0,
                        task: i as u32,
                    };
                    out.push((key, t.state));
                }
            }
        }
        out
    }

    /// Bring the derived indexes in line with one job (after a change to it).
    pub(super) fn index_job(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.state == JobState::Pending {
            self.pending.insert(id);
        }
        let holds = job
            .alloc
            .as_ref()
            .is_some_and(|a| a.tasks.iter().any(|t| t.state.holds_resources()));
        if holds && !self.active.contains(&id) {
            self.active.insert(id);
            let tenant = job.spec.tenant.clone();
            let held: Vec<TaskPlacement> = job
                .alloc
                .iter()
                .flat_map(|a| a.tasks.iter())
                .filter(|t| t.state.holds_resources())
                .map(|t| t.placement.clone())
                .collect();
            for p in held {
                self.usage.entry(p.node.clone()).or_default().add(id, &p);
                self.book_tenant(&tenant, &p, true);
            }
        } else if !holds && self.active.remove(&id) {
            self.charge_finished(id);
        }
    }
}

/// The name of element `i` of an array named `name`.
pub fn array_element_name(name: &str, i: u32) -> String {
    format!("{name}[{i}]")
}

/// Check what an array submission adds to its spec, before anything is
/// proposed (the API calls it too, to refuse early): the count, and that
/// every element's generated name fits the name limit. Errors name the field.
pub fn validate_array(spec: &JobSpec, count: u32) -> Result<(), String> {
    if count == 0 || count > MAX_ARRAY {
        return Err(format!("array: must be 1 to {MAX_ARRAY} jobs, got {count}"));
    }
    // Names grow with the index: the last element's is the longest.
    let longest = array_element_name(&spec.name, count - 1);
    if longest.len() > fit::MAX_NAME_LEN {
        return Err(format!(
            "name: with its array index, element {}'s name is {} characters, over the \
             limit of {}; for an array of {count} use a name of at most {} characters",
            count - 1,
            longest.len(),
            fit::MAX_NAME_LEN,
            fit::MAX_NAME_LEN.saturating_sub(longest.len() - spec.name.len()),
        ));
    }
    Ok(())
}

fn all_tasks(job: &Job, f: impl Fn(&TaskStatus) -> bool) -> bool {
    job.alloc.as_ref().is_some_and(|a| a.tasks.iter().all(f))
}
