//! Protobuf ↔ model conversion. Nothing else in the scheduler touches
//! `muster_proto` message types.

use crate::model::{
    ExitInfo, GpuRecord, Job, JobSpec, JobState, Node, Resources, TaskState, TaskStatus,
};
use crate::state::{NodeRegistration, State, TaskKey};
use muster_proto as pb;
use std::collections::BTreeMap;
use tonic::Status;

/// A submitted spec, checked for shape (the state machine checks the rest).
pub fn spec_from_pb(s: pb::JobSpec) -> Result<JobSpec, Status> {
    super::limits::check_spec(&s)?;
    for k in s.env.keys() {
        let valid = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Status::invalid_argument(format!(
                "env: invalid variable name {k:?}"
            )));
        }
    }
    // An empty tenant means the user's default tenant (resolved at apply).
    let tenant = s.tenant;
    if s.topology_label.is_empty() && s.topology_required {
        return Err(Status::invalid_argument(
            "topology_required: needs topology_label",
        ));
    }
    let topology = Some(s.topology_label)
        .filter(|l| !l.is_empty())
        .map(|label| crate::model::TopologySpec {
            label,
            required: s.topology_required,
        });
    Ok(JobSpec {
        priority: s.priority,
        topology,
        name: s.name,
        tenant,
        tasks: s.tasks,
        per_task: Resources {
            gpus: s.gpus_per_task,
            cpu_millis: s.cpu_millis_per_task,
            memory_bytes: s.memory_bytes_per_task,
        },
        time_limit_secs: Some(s.time_limit_secs).filter(|t| *t > 0),
        command: s.command,
        env: s.env.into_iter().collect(),
        workdir: s.workdir,
        checkpoint_dir: Some(s.checkpoint_dir).filter(|d| !d.is_empty()),
        lifecycle: crate::model::Lifecycle {
            stop_signal: Some(s.stop_signal).filter(|s| *s != 0),
            grace_secs: s.grace_secs,
            checkpoint_on_preempt: s.checkpoint_on_preempt,
            max_restarts: s.max_restarts,
        },
    })
}

/// Reduce another user's job to a queue summary: no command, environment,
/// folders or agent addresses.
pub fn redact(info: &mut pb::JobInfo) {
    info.redacted = true;
    if let Some(spec) = info.spec.as_mut() {
        spec.command.clear();
        spec.env.clear();
        spec.workdir.clear();
        spec.checkpoint_dir.clear();
    }
    for t in &mut info.tasks {
        t.agent_address.clear();
        t.message.clear();
    }
    // A job's own reason (failed, requeued, ...) can quote its tasks' exit
    // messages, which carry paths of the owner's command. A pending job's
    // reason is the planner's (resources, quota, order): that one stays.
    if info.state != pb::JobState::Pending as i32 {
        info.reason.clear();
    }
}

/// The model spec as protobuf.
pub fn spec_to_pb(s: &JobSpec) -> pb::JobSpec {
    pb::JobSpec {
        name: s.name.clone(),
        tenant: s.tenant.clone(),
        tasks: s.tasks,
        gpus_per_task: s.per_task.gpus,
        cpu_millis_per_task: s.per_task.cpu_millis,
        memory_bytes_per_task: s.per_task.memory_bytes,
        time_limit_secs: s.time_limit_secs.unwrap_or(0),
        command: s.command.clone(),
        env: s.env.clone().into_iter().collect(),
        workdir: s.workdir.clone(),
        checkpoint_dir: s.checkpoint_dir.clone().unwrap_or_default(),
        priority: s.priority.clone(),
        topology_label: s
            .topology
            .as_ref()
            .map(|t| t.label.clone())
            .unwrap_or_default(),
        topology_required: s.topology.as_ref().is_some_and(|t| t.required),
        stop_signal: s.lifecycle.stop_signal.unwrap_or(0),
        grace_secs: s.lifecycle.grace_secs,
        checkpoint_on_preempt: s.lifecycle.checkpoint_on_preempt,
        max_restarts: s.lifecycle.max_restarts,
    }
}

/// Job state as protobuf.
pub fn job_state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Placed => pb::JobState::Placed,
        JobState::Running => pb::JobState::Running,
        JobState::Completed => pb::JobState::Completed,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::TimedOut => pb::JobState::TimedOut,
        JobState::Preempting => pb::JobState::Preempting,
        JobState::Requeued => pb::JobState::Requeued,
    }
}

fn task_state_to_pb(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Assigned => pb::TaskState::TaskAssigned,
        TaskState::Running => pb::TaskState::TaskRunning,
        TaskState::Exited => pb::TaskState::TaskExited,
        TaskState::Lost => pb::TaskState::TaskLost,
    }
}

fn task_to_pb(state: &State, index: usize, t: &TaskStatus) -> pb::TaskInfo {
    let exit = t.exit.clone().unwrap_or_default();
    pb::TaskInfo {
        index: index as u32,
        node: t.placement.node.clone(),
        gpus: t.placement.gpus.clone(),
        state: task_state_to_pb(t.state) as i32,
        exit_code: exit.code,
        signal: exit.signal,
        oom_killed: exit.oom_killed,
        message: exit.message,
        agent_address: state
            .nodes
            .get(&t.placement.node)
            .map(|n| n.address.clone())
            .unwrap_or_default(),
        started_at_ms: t.started_at_ms,
        ended_at_ms: t.ended_at_ms,
    }
}

/// A job as protobuf; `reason` and `position` come from the planner.
pub fn job_to_pb(state: &State, j: &Job, reason: Option<&str>, position: u32) -> pb::JobInfo {
    let tasks = j
        .alloc
        .as_ref()
        .map(|a| {
            a.tasks
                .iter()
                .enumerate()
                .map(|(i, t)| task_to_pb(state, i, t))
                .collect()
        })
        .unwrap_or_default();
    let reason = if j.state == JobState::Pending {
        reason.unwrap_or("waiting for the planner").to_string()
    } else {
        j.reason.clone()
    };
    pb::JobInfo {
        id: j.id.0,
        spec: Some(spec_to_pb(&j.spec)),
        user: j.user.clone(),
        state: job_state_to_pb(j.state) as i32,
        tasks,
        submitted_at_ms: j.submitted_at_ms,
        started_at_ms: j.started_at_ms,
        ended_at_ms: j.ended_at_ms,
        reason,
        restart_count: j.restart_count,
        queue_position: position,
        priority: j.spec.priority.clone(),
        // Borrowing matters only where a reclaim can happen: some tenant
        // has a guarantee to take back. Without one, every allocation is
        // "borrowed" and saying so on every job is noise.
        borrowed: j.alloc.as_ref().is_some_and(|a| a.borrowed)
            && state.tenants.values().any(|t| t.guarantee_gpus > 0),
        checkpoint_at_ms: j.last_checkpoint.as_ref().map_or(0, |c| c.at_ms),
        checkpoint_step: j.last_checkpoint.as_ref().and_then(|c| c.step),
        checkpoint_task: j.last_checkpoint.as_ref().map_or(0, |c| c.task),
        failures: j.failures,
        // Filled in by `ClientApi::present`, which knows the cluster's policy.
        stop_signal: 0,
        grace_secs: 0,
        redacted: false,
    }
}

/// A node as protobuf, with what is allocated on it.
pub fn node_to_pb(state: &State, n: &Node, last_seen_ms: i64) -> pb::NodeInfo {
    let usage = state.node_usage(&n.name);
    pb::NodeInfo {
        name: n.name.clone(),
        address: n.address.clone(),
        state: n.state.as_str().to_string(),
        gpus: n
            .gpus
            .iter()
            .map(|g| {
                let mut p = gpu_to_pb(g);
                p.allocated_to = usage.gpus.get(&g.index).map(|j| j.0).unwrap_or(0);
                p
            })
            .collect(),
        cpu_millis: n.cpu_millis,
        memory_bytes: n.memory_bytes,
        cpu_millis_allocated: usage.cpu_millis,
        memory_bytes_allocated: usage.memory_bytes,
        labels: n.labels.clone().into_iter().collect(),
        last_seen_ms,
        drain_reason: n.drain.clone().unwrap_or_default(),
    }
}

fn gpu_to_pb(g: &GpuRecord) -> pb::GpuInfo {
    pb::GpuInfo {
        index: g.index,
        uuid: g.uuid.clone(),
        model: g.model.clone(),
        memory_bytes: g.memory_bytes,
        minor: g.minor,
        pci_bus_id: g.pci_bus_id.clone(),
        numa_node: g.numa_node,
        // Usable: the agent reports it healthy and no fault is recorded.
        healthy: g.usable(),
        allocated_to: 0,
        link_group: g.link_group,
        fault: g.fault.clone(),
    }
}

/// An agent's registration as a command payload.
pub fn registration_from_pb(r: &pb::Register) -> Result<(NodeRegistration, Vec<TaskKey>), Status> {
    if r.node.is_empty() || r.node.len() > 253 {
        return Err(Status::invalid_argument(
            "register: node name must be 1-253 characters",
        ));
    }
    // What users see of a node (`muster nodes`) is printable.
    let line = super::limits::line;
    line("register: node", &r.node, 253)?;
    line("register: address", &r.address, 512)?;
    for (k, v) in &r.labels {
        line("register: label name", k, super::limits::MAX_NAME)?;
        line(&format!("register: label {k}"), v, super::limits::MAX_NAME)?;
    }
    for g in &r.gpus {
        line(&format!("register: GPU {} model", g.index), &g.model, 256)?;
        line(&format!("register: GPU {} uuid", g.index), &g.uuid, 256)?;
        line(
            &format!("register: GPU {} pci_bus_id", g.index),
            &g.pci_bus_id,
            256,
        )?;
    }
    let gpus = r
        .gpus
        .iter()
        .map(|g| GpuRecord {
            index: g.index,
            uuid: g.uuid.clone(),
            model: g.model.clone(),
            memory_bytes: g.memory_bytes,
            minor: g.minor,
            pci_bus_id: g.pci_bus_id.clone(),
            numa_node: g.numa_node,
            healthy: g.healthy,
            link_group: g.link_group,
            fault: String::new(),
        })
        .collect();
    let running = r
        .running
        .iter()
        .map(|t| TaskKey {
            job: crate::model::JobId(t.job_id),
            alloc: t.alloc_id,
            task: t.task_index,
        })
        .collect();
    let labels: BTreeMap<String, String> = r.labels.clone().into_iter().collect();
    if r.log_key.len() != pb::ticket::KEY_LEN {
        return Err(Status::invalid_argument(format!(
            "register: log_key must be {} bytes, got {} (an agent older than its scheduler?)",
            pb::ticket::KEY_LEN,
            r.log_key.len()
        )));
    }
    Ok((
        NodeRegistration {
            name: r.node.clone(),
            address: r.address.clone(),
            gpus,
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            labels,
            log_key: r.log_key.clone(),
        },
        running,
    ))
}

/// A task's exit as the model's `ExitInfo`.
pub fn exit_from_pb(e: &pb::TaskExited) -> ExitInfo {
    ExitInfo {
        code: e.code,
        signal: e.signal,
        oom_killed: e.oom_killed,
        message: e.message.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Tenant;
    use crate::state::tests::World;
    use crate::state::Command;

    #[test]
    fn borrowing_is_shown_only_where_a_reclaim_can_happen() {
        let mut w = World::new(&[("n1", 8)]);
        let id = w.submit(1, 2);
        w.schedule();
        let borrowed = |w: &World| job_to_pb(&w.s, &w.s.jobs[&id], None, 0).borrowed;
        assert!(
            w.s.jobs[&id].alloc.as_ref().is_some_and(|a| a.borrowed),
            "beyond a zero guarantee"
        );
        assert!(
            !borrowed(&w),
            "no tenant has a guarantee: nothing to reclaim"
        );
        let mut t = Tenant::open("ml");
        t.guarantee_gpus = 4;
        w.cmd(Command::CreateTenant {
            tenant: Box::new(t),
            default_for: vec![],
        });
        assert!(borrowed(&w), "ml may reclaim it now");
    }

    /// Issue 18 #13: another user's failed job showed its failure reason,
    /// which quotes the exit message and so paths of the owner's command.
    #[test]
    fn a_redacted_job_shows_no_failure_reason() {
        let mut w = World::new(&[("n1", 8)]);
        let failed = w.submit(1, 1);
        let waiting = w.submit(1, 8);
        w.schedule();
        let key = w.key(failed, 0);
        w.cmd(Command::TaskExited {
            key,
            exit: crate::model::ExitInfo {
                message: "spawn failed: /home/alice/secret-project/run.sh: not found".into(),
                ..Default::default()
            },
            at_ms: w.now,
        });
        let mut info = job_to_pb(&w.s, &w.s.jobs[&failed], None, 0);
        assert!(info.reason.contains("/home/alice"), "{}", info.reason);
        redact(&mut info);
        assert!(info.redacted);
        assert!(info.reason.is_empty(), "{}", info.reason);
        assert!(info.tasks.iter().all(|t| t.message.is_empty()));
        // The planner's reason for a pending job is no secret.
        let mut info = job_to_pb(&w.s, &w.s.jobs[&waiting], Some("waiting for 8 GPUs"), 1);
        redact(&mut info);
        assert_eq!(info.reason, "waiting for 8 GPUs");
    }
}
