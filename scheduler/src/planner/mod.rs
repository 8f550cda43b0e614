//! The planner: a pure function from a read-only view of the state (and
//! `now`) to a [`Plan`].
//!
//! Only the leader runs it. The plan goes through the Raft log as
//! `Command::ApplyPlan`, and `apply` re-checks every gang with the same
//! [`fit`] functions, so a plan computed on a state that has since moved on
//! can be rejected but never over-commit anything.
//!
//! Placement is all or nothing per gang. Pending jobs are taken in queue
//! order (submission order for now); each gang is packed onto as few nodes as
//! first fit allows: a node takes as many of the gang's tasks as it can
//! before the next node is tried. A job that does not fit gets a [`Verdict`]
//! saying why, in words the CLI prints as-is — a rejection is data, not an
//! error. The planner imports nothing async and does no I/O.

pub mod fit;

use crate::model::{JobId, Resources, TaskPlacement};
use crate::state::{NodeUsage, Placement, State};
use std::collections::BTreeMap;

/// Why a pending job was not placed in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No node is ready.
    NoNodes,
    /// The tenant's limit would be exceeded.
    TenantLimit(String),
    /// Not enough free room right now.
    NoRoom {
        tasks: u32,
        per_task: Resources,
        slots_free: u32,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::NoNodes => write!(f, "no ready nodes"),
            Verdict::TenantLimit(s) => write!(f, "{s}"),
            Verdict::NoRoom {
                tasks,
                per_task,
                slots_free,
            } => write!(
                f,
                "needs {tasks} task(s) of {} GPU(s), {} CPU(s), {} MiB; room for {slots_free} now",
                per_task.gpus,
                f64::from(per_task.cpu_millis) / 1000.0,
                per_task.memory_bytes >> 20
            ),
        }
    }
}

/// The planner's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    /// Every pending job that was not placed, and why.
    pub verdicts: BTreeMap<JobId, Verdict>,
}

/// Compute a plan for the pending jobs of `state`.
pub fn plan(state: &State) -> Plan {
    let mut out = Plan::default();
    let ready: Vec<&crate::model::Node> = state
        .nodes
        .values()
        .filter(|n| n.state == crate::model::NodeState::Ready)
        .collect();
    let mut usage: BTreeMap<&str, NodeUsage> = ready
        .iter()
        .map(|n| (n.name.as_str(), state.node_usage(&n.name)))
        .collect();
    let mut tenant_use: BTreeMap<&str, u32> = BTreeMap::new();
    for id in queue_order(state) {
        let Some(job) = state.jobs.get(&id) else {
            continue;
        };
        if ready.is_empty() {
            out.verdicts.insert(id, Verdict::NoNodes);
            continue;
        }
        let tenant = job.spec.tenant.as_str();
        let extra = *tenant_use.get(tenant).unwrap_or(&0);
        if let Err(why) = tenant_room(state, &job.spec, extra) {
            out.verdicts.insert(id, Verdict::TenantLimit(why));
            continue;
        }
        match place_gang(&ready, &mut usage, id, job.spec.tasks, &job.spec.per_task) {
            Ok(tasks) => {
                *tenant_use.entry(tenant).or_default() += job.total_gpus();
                out.placements.push(Placement { job: id, tasks });
            }
            Err(slots_free) => {
                out.verdicts.insert(
                    id,
                    Verdict::NoRoom {
                        tasks: job.spec.tasks,
                        per_task: job.spec.per_task,
                        slots_free,
                    },
                );
            }
        }
    }
    out
}

/// Pending jobs in the order they are considered.
pub fn queue_order(state: &State) -> Vec<JobId> {
    state.pending.iter().copied().collect()
}

fn tenant_room(state: &State, spec: &crate::model::JobSpec, planned: u32) -> Result<(), String> {
    let Some(limit) = state.tenants.get(&spec.tenant).and_then(|t| t.gpu_limit) else {
        return fit::check_tenant_room(state, spec);
    };
    let used = state
        .tenant_gpus_in_use(&spec.tenant)
        .saturating_add(planned);
    let need = spec.tasks.saturating_mul(spec.per_task.gpus);
    if used.saturating_add(need) > limit {
        return Err(format!(
            "tenant {} at its limit: {used} of {limit} GPUs in use, job needs {need}",
            spec.tenant
        ));
    }
    Ok(())
}

/// How many more tasks of size `r` fit on `node` given `usage` (no allocation).
fn slots(node: &crate::model::Node, usage: &NodeUsage, r: &Resources) -> u32 {
    if node.state != crate::model::NodeState::Ready {
        return 0;
    }
    let free_cpu = node.cpu_millis.saturating_sub(usage.cpu_millis);
    let free_mem = node.memory_bytes.saturating_sub(usage.memory_bytes);
    let mut n = u32::MAX;
    if r.cpu_millis > 0 {
        n = n.min(free_cpu / r.cpu_millis);
    }
    if r.memory_bytes > 0 {
        n = n.min((free_mem / r.memory_bytes).min(u64::from(u32::MAX)) as u32);
    }
    if r.gpus > 0 {
        let free_gpus = node
            .gpus
            .iter()
            .filter(|g| g.healthy && !usage.gpus.contains_key(&g.index))
            .count() as u32;
        n = n.min(free_gpus / r.gpus);
    }
    n
}

/// Place every task of a gang, or nothing: on failure `usage` is untouched and
/// the error is the number of tasks that would have fit. Counting comes first,
/// so a gang that cannot fit costs no allocation.
fn place_gang<'a>(
    nodes: &[&'a crate::model::Node],
    usage: &mut BTreeMap<&'a str, NodeUsage>,
    job: JobId,
    tasks: u32,
    r: &Resources,
) -> Result<Vec<TaskPlacement>, u32> {
    let empty = NodeUsage::default();
    let mut total = 0u32;
    let mut take_from = Vec::new();
    for node in nodes {
        let u = usage.get(node.name.as_str()).unwrap_or(&empty);
        let n = slots(node, u, r).min(tasks - total);
        if n > 0 {
            take_from.push((*node, n));
            total += n;
        }
        if total == tasks {
            break;
        }
    }
    if total < tasks {
        return Err(total);
    }
    let mut out = Vec::with_capacity(tasks as usize);
    for (node, n) in take_from {
        let u = usage.entry(node.name.as_str()).or_default();
        for _ in 0..n {
            let Some(gpus) = fit::take(node, u, r) else {
                break;
            };
            let p = TaskPlacement {
                node: node.name.clone(),
                gpus,
                cpu_millis: r.cpu_millis,
                memory_bytes: r.memory_bytes,
            };
            u.add(job, &p);
            out.push(p);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
