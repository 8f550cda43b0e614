//! Preemption decisions.
//!
//! A pending gang that has no room may stop running gangs when it has a
//! higher priority class than they do, or when its tenant is below its
//! guarantee and they run on capacity their tenant borrowed. Victims are
//! whole gangs, taken in DESIGN.md's cost order: lower priority first, then
//! borrowed before not, then least work lost (the shortest time since
//! its run started or its last reported checkpoint, whichever is later),
//! then fewest GPUs. A gang that has run less than `min_runtime` is
//! protected: when only protected gangs would make room, the preemptor is
//! told which it will preempt and when their protection ends, and holds the
//! nodes it will get. Victims are added one at a time
//! until the preemptor would fit on what they free plus what is free now; if
//! it never would, nothing is preempted. Only victims on the nodes the
//! preemptor would get are kept.

use super::placement::{choose_topo, tasks_fit, Cand, Cluster, Picks, Req};
use super::Policy;
use crate::model::{Job, JobId, JobState, Tenant};
use crate::state::{PreemptOrder, State};
use std::collections::{BTreeMap, BTreeSet};

/// Most victims considered for one preemptor.
const MAX_VICTIMS: usize = 64;

struct Victim<'a> {
    job: &'a Job,
    reason: String,
    /// When its `min_runtime` protection ends (in the past: none left).
    protected_until: i64,
}

/// What preemption can do for a gang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Stop these gangs now; the preemptor gets these nodes.
    Now(Vec<PreemptOrder>, Picks),
    /// Only gangs still within `min_runtime` would make room: these, once
    /// the last one's protection ends at `at_ms`, on these nodes.
    Later {
        victims: Vec<JobId>,
        at_ms: i64,
        picks: Picks,
    },
}

/// Try to make room for `job` by preempting: orders to give now, or the
/// protected gangs it will preempt later; `None` when no allowed set of
/// victims makes it fit.
pub fn find(
    state: &State,
    policy: &Policy,
    cl: &Cluster,
    job: &Job,
    tree: &super::quota::Tree,
    taken: &BTreeSet<JobId>,
    now_ms: i64,
) -> Option<Found> {
    let mut all = candidates(state, policy, job, tree, taken);
    if all.is_empty() {
        return None;
    }
    all.sort_by_key(|v| {
        let borrowed = v.job.alloc.as_ref().is_some_and(|a| a.borrowed);
        (
            policy.weight(&v.job.spec.priority),
            !borrowed,
            now_ms - progress_since(v.job),
            v.job.total_gpus(),
            v.job.id,
        )
    });
    let free: Vec<&Victim> = all
        .iter()
        .filter(|v| v.protected_until <= now_ms)
        .take(MAX_VICTIMS)
        .collect();
    if let Some((n, picks)) = first_fit(cl, job, &free, now_ms) {
        let orders = on_picked(cl, &free[..=n], &picks)
            .map(|v| PreemptOrder {
                victim: v.job.id,
                alloc: v.job.alloc.as_ref().map_or(0, |a| a.id.0),
                for_job: job.id,
                reason: v.reason.clone(),
            })
            .collect();
        return Some(Found::Now(orders, picks));
    }
    if all.iter().all(|v| v.protected_until <= now_ms) {
        return None;
    }
    let every: Vec<&Victim> = all.iter().take(MAX_VICTIMS).collect();
    let (n, picks) = first_fit(cl, job, &every, now_ms)?;
    let kept: Vec<&Victim> = on_picked(cl, &every[..=n], &picks).collect();
    let at_ms = kept.iter().map(|v| v.protected_until).max()?.max(now_ms);
    // Victims that reach their time limit by then free the room anyway:
    // a reservation says so better than a preemption.
    let ends = |v: &&Victim| super::backfill::end_of(start_of(v.job), v.job.spec.time_limit_secs);
    if kept.iter().all(|v| ends(v) <= at_ms) {
        return None;
    }
    let mut victims: Vec<JobId> = kept.iter().map(|v| v.job.id).collect();
    victims.sort();
    Some(Found::Later {
        victims,
        at_ms,
        picks,
    })
}

/// Running gangs `job` may preempt, protected or not, each with the reason.
fn candidates<'a>(
    state: &'a State,
    policy: &Policy,
    job: &Job,
    tree: &super::quota::Tree,
    taken: &BTreeSet<JobId>,
) -> Vec<Victim<'a>> {
    let mine = policy.weight(&job.spec.priority);
    let Some(tenant) = state.tenants.get(&job.spec.tenant) else {
        return Vec::new();
    };
    let used = tree
        .idx(&tenant.name)
        .map(|i| tree.used(i))
        .unwrap_or_default();
    let below_guarantee = used.gpus.saturating_add(job.total_gpus()) <= tenant.guarantee_gpus;
    state
        .active
        .iter()
        .filter(|id| !taken.contains(id))
        .filter_map(|id| state.jobs.get(id))
        .filter(|v| matches!(v.state, JobState::Placed | JobState::Running))
        .filter_map(|v| {
            let theirs = policy.weight(&v.spec.priority);
            let reason = if theirs < mine {
                format!(
                    "priority {} outranks {}",
                    policy.class_name(&job.spec.priority),
                    policy.class_name(&v.spec.priority)
                )
            } else if below_guarantee && theirs <= mine && reclaimable(state, job, v) {
                format!(
                    "tenant {} reclaiming its guarantee of {} GPUs from borrowed capacity",
                    tenant.name, tenant.guarantee_gpus
                )
            } else {
                return None;
            };
            let protected_until = start_of(v).saturating_add(policy.min_runtime_ms);
            Some(Victim {
                job: v,
                reason,
                protected_until,
            })
        })
        .collect()
}

/// Whether `v` runs on capacity its tenant borrowed, beyond its guarantee,
/// and is not of `job`'s own lineage.
fn reclaimable(state: &State, job: &Job, v: &Job) -> bool {
    let borrowed = v.alloc.as_ref().is_some_and(|a| a.borrowed);
    let related = Tenant::lineage(&job.spec.tenant).any(|t| t == v.spec.tenant)
        || Tenant::lineage(&v.spec.tenant).any(|t| t == job.spec.tenant);
    let over = state
        .tenants
        .get(&v.spec.tenant)
        .is_some_and(|t| state.tenant_use(&t.name).gpus > t.guarantee_gpus);
    borrowed && over && !related
}

/// The shortest prefix of `victims` whose resources, with what is free
/// now, let `job` fit: its last index and the nodes `job` would get.
fn first_fit(cl: &Cluster, job: &Job, victims: &[&Victim], now_ms: i64) -> Option<(usize, Picks)> {
    let req = Req {
        tasks: job.spec.tasks,
        per_task: job.spec.per_task,
    };
    let end = super::backfill::end_of(now_ms, job.spec.time_limit_secs);
    let mut extra: BTreeMap<u32, (u32, u32, u64)> = BTreeMap::new();
    for (n, v) in victims.iter().enumerate() {
        for t in v.job.alloc.iter().flat_map(|a| &a.tasks) {
            if !t.state.holds_resources() {
                continue;
            }
            let Some(i) = cl.index_of(&t.placement.node) else {
                continue;
            };
            let e = extra.entry(i).or_default();
            e.0 += t.placement.gpus.len() as u32;
            e.1 = e.1.saturating_add(t.placement.cpu_millis);
            e.2 = e.2.saturating_add(t.placement.memory_bytes);
        }
        let cands: Vec<Cand> = (0..cl.nodes.len() as u32)
            .filter(|&i| cl.usable(i, end))
            .map(|i| {
                let s = &cl.slots[i as usize];
                let (g, c, m) = extra.get(&i).copied().unwrap_or_default();
                let gpus = s.free.count_ones() + g;
                Cand {
                    node: i,
                    fits: tasks_fit(
                        gpus,
                        s.cpu.saturating_add(c),
                        s.mem.saturating_add(m),
                        &req.per_task,
                    ),
                    free: gpus,
                }
            })
            .filter(|c| c.fits > 0)
            .collect();
        if let Ok(picks) = choose_topo(&cl.nodes, cands, req.tasks, job.spec.topology.as_ref()) {
            return Some((n, picks));
        }
    }
    None
}

/// The victims that hold resources on the picked nodes: only they are stopped.
fn on_picked<'v, 'a>(
    cl: &Cluster,
    victims: &'v [&'v Victim<'a>],
    picks: &Picks,
) -> impl Iterator<Item = &'v Victim<'a>> {
    let picked: BTreeSet<String> = picks
        .iter()
        .map(|(i, _)| cl.nodes[*i as usize].name.clone())
        .collect();
    victims.iter().copied().filter(move |v| {
        v.job
            .alloc
            .iter()
            .flat_map(|a| &a.tasks)
            .any(|t| t.state.holds_resources() && picked.contains(&t.placement.node))
    })
}

/// Work since this instant is lost if the job is stopped now: the later of
/// its run's start and its last reported checkpoint.
pub fn progress_since(job: &Job) -> i64 {
    let cp = job.last_checkpoint.as_ref().map_or(0, |c| c.at_ms);
    start_of(job).max(cp)
}

/// When a job's current run started (placement time until it reports a start).
pub fn start_of(job: &Job) -> i64 {
    if job.started_at_ms > 0 {
        job.started_at_ms
    } else {
        job.alloc.as_ref().map_or(0, |a| a.placed_at_ms)
    }
}
