//! The fit function, shared by the planner (to decide) and by `apply` (to
//! re-check a plan against the state it lands on). One definition of "fits"
//! is what makes a stale plan harmless.

use crate::model::{JobSpec, Node, NodeState, Resources, TaskPlacement};
use crate::state::{NodeUsage, Placement, State};
use std::collections::BTreeSet;

/// Longest job or tenant name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Check a job spec before it is accepted: sizes, command, tenant, and that
/// the gang could run on the registered nodes ([`super::feasible`]).
pub fn validate_spec(state: &State, spec: &JobSpec) -> Result<(), String> {
    if spec.tasks == 0 {
        return Err("tasks must be at least 1".into());
    }
    if spec.per_task.cpu_millis == 0 {
        return Err("cpus must be greater than 0".into());
    }
    if spec.per_task.memory_bytes == 0 {
        return Err("memory must be greater than 0".into());
    }
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err("command must not be empty".into());
    }
    if spec.name.len() > MAX_NAME_LEN {
        return Err(format!("name is longer than {MAX_NAME_LEN} characters"));
    }
    if spec.time_limit_secs == Some(0) {
        return Err("time limit must be greater than 0".into());
    }
    if let Some(sig) = spec.lifecycle.stop_signal {
        // SIGKILL (9) and SIGSTOP (19) cannot be caught: no grace would help.
        if !(1..=64).contains(&sig) || sig == 9 || sig == 19 {
            return Err(format!(
                "signal: {sig} cannot be a stop signal (KILL and STOP are refused)"
            ));
        }
    }
    if !state.tenants.contains_key(&spec.tenant) {
        return Err(format!("unknown tenant {:?}", spec.tenant));
    }
    let nothing = |_: &str| crate::state::TenantUse::default();
    if let Err(b) = super::quota::check(
        &state.tenants,
        nothing,
        &spec.tenant,
        super::quota::need_of(spec),
    ) {
        return Err(format!("job can never start: {b}"));
    }
    // Judged against every registered node, whatever its state: drained,
    // lost and unhealthy nodes may come back.
    let nodes: Vec<&Node> = state.nodes.values().collect();
    if let Some(why) = super::feasible::never_fits(&nodes, spec) {
        return Err(format!("job can never start: {why}"));
    }
    Ok(())
}

/// Tenant names: `a-z0-9-_` segments separated by `/`.
pub fn validate_tenant_name(name: &str) -> Result<(), String> {
    let ok_seg = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    };
    if name.len() > MAX_NAME_LEN || !name.split('/').all(ok_seg) {
        return Err(format!(
            "invalid tenant name {name:?}: use lower-case letters, digits, '-' and '_', \
             with '/' between levels"
        ));
    }
    Ok(())
}

/// Healthy GPUs of `node` that `usage` does not hold, in index order.
pub fn free_gpus(node: &Node, usage: &NodeUsage) -> Vec<u32> {
    node.gpus
        .iter()
        .filter(|g| g.usable() && !usage.gpus.contains_key(&g.index))
        .map(|g| g.index)
        .collect()
}

/// Take the resources of one task from `node`, if they fit: the GPUs chosen.
pub fn take(node: &Node, usage: &NodeUsage, r: &Resources) -> Option<Vec<u32>> {
    if !node.schedulable()
        || usage.cpu_millis.saturating_add(r.cpu_millis) > node.cpu_millis
        || usage.memory_bytes.saturating_add(r.memory_bytes) > node.memory_bytes
    {
        return None;
    }
    let free = free_gpus(node, usage);
    if free.len() < r.gpus as usize {
        return None;
    }
    Some(free[..r.gpus as usize].to_vec())
}

/// Re-check one gang of a plan against the current state, all or nothing.
pub fn check_placement(state: &State, p: &Placement) -> Result<(), String> {
    let Some(job) = state.jobs.get(&p.job) else {
        return Err(format!("job {} not found", p.job));
    };
    if job.state != crate::model::JobState::Pending {
        return Err(format!(
            "job {} is {}, not pending",
            p.job,
            job.state.as_str()
        ));
    }
    if p.tasks.len() != job.spec.tasks as usize {
        return Err(format!(
            "plan places {} tasks, job {} has {}",
            p.tasks.len(),
            p.job,
            job.spec.tasks
        ));
    }
    check_tenant_room(state, &job.spec)?;
    let mut tentative: std::collections::BTreeMap<&str, NodeUsage> = Default::default();
    for (i, t) in p.tasks.iter().enumerate() {
        check_task(state, &mut tentative, job.id, &job.spec.per_task, t)
            .map_err(|e| format!("task {i}: {e}"))?;
    }
    Ok(())
}

fn check_task<'a>(
    state: &State,
    tentative: &mut std::collections::BTreeMap<&'a str, NodeUsage>,
    job: crate::model::JobId,
    r: &Resources,
    t: &'a TaskPlacement,
) -> Result<(), String> {
    let Some(node) = state.nodes.get(&t.node) else {
        return Err(format!("node {} not found", t.node));
    };
    if t.gpus.len() != r.gpus as usize
        || t.cpu_millis != r.cpu_millis
        || t.memory_bytes != r.memory_bytes
    {
        return Err("placement does not match the job's request".into());
    }
    if let Some(why) = &node.drain {
        return Err(format!("node {} is draining ({why})", t.node));
    }
    if node.state != NodeState::Ready {
        return Err(format!("node {} is {}", t.node, node.state.as_str()));
    }
    let usage = tentative
        .entry(t.node.as_str())
        .or_insert_with(|| state.node_usage(&t.node));
    let distinct: BTreeSet<u32> = t.gpus.iter().copied().collect();
    let free: BTreeSet<u32> = free_gpus(node, usage).into_iter().collect();
    if distinct.len() != t.gpus.len() || !distinct.is_subset(&free) {
        return Err(format!("GPUs {:?} on {} are not free", t.gpus, t.node));
    }
    if take(node, usage, r).is_none() {
        return Err(format!("node {} has no room", t.node));
    }
    usage.add(job, t);
    Ok(())
}

/// Whether the limits of the job's tenant and of every ancestor leave room
/// for the whole gang.
pub fn check_tenant_room(state: &State, spec: &JobSpec) -> Result<(), String> {
    if !state.tenants.contains_key(&spec.tenant) {
        return Err(format!("unknown tenant {:?}", spec.tenant));
    }
    super::quota::check(
        &state.tenants,
        |t| state.tenant_use(t),
        &spec.tenant,
        super::quota::need_of(spec),
    )
    .map_err(|b| b.to_string())
}
