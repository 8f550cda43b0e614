//! Queue order: priority class first, then fair share, then age.
//!
//! Fair share is hierarchical (in the spirit of Slurm's fair tree): at each
//! level of the tenant tree, siblings are compared by their subtree's
//! decayed GPU-seconds divided by their weight, and the tenant with the
//! smaller figure goes first. Over time each sibling's share of GPU-seconds
//! converges to its share of the weights. Usage is decayed and charged by
//! `Command::AccrueUsage` (half-life from config); the planner only reads it.

use super::Policy;
use crate::model::{Job, JobId, JobState, Tenant};
use crate::state::State;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

/// Each tenant's rank by fair share (0 = most deserving).
pub fn tenant_ranks(state: &State) -> BTreeMap<&str, u32> {
    let mut subtree: BTreeMap<&str, f64> = BTreeMap::new();
    for (name, u) in &state.fair_usage {
        for a in Tenant::lineage(name) {
            if let Some((k, _)) = state.tenants.get_key_value(a) {
                *subtree.entry(k.as_str()).or_default() += *u;
            }
        }
    }
    let share = |name: &str| -> f64 {
        let w = state.tenants.get(name).map_or(1, |t| t.weight.max(1));
        subtree.get(name).copied().unwrap_or(0.0) / f64::from(w)
    };
    let mut keyed: Vec<(Vec<f64>, &str)> = state
        .tenants
        .keys()
        .map(|n| {
            let mut path: Vec<&str> = Tenant::lineage(n).collect();
            path.reverse();
            (path.into_iter().map(share).collect(), n.as_str())
        })
        .collect();
    keyed.sort_by(|a, b| {
        for (x, y) in a.0.iter().zip(&b.0) {
            match x.total_cmp(y) {
                std::cmp::Ordering::Equal => continue,
                o => return o,
            }
        }
        a.0.len().cmp(&b.0.len()).then(a.1.cmp(b.1))
    });
    keyed
        .into_iter()
        .enumerate()
        .map(|(i, (_, n))| (n, i as u32))
        .collect()
}

/// Pending jobs in the order the planner considers them.
pub fn order(state: &State, policy: &Policy) -> Vec<JobId> {
    order_jobs(state, policy).iter().map(|j| j.id).collect()
}

/// [`order`], as the jobs themselves.
pub fn order_jobs<'a>(state: &'a State, policy: &Policy) -> Vec<&'a Job> {
    let ranks: HashMap<&str, u32, Fnv> = tenant_ranks(state).into_iter().collect();
    let weights: HashMap<&str, u32, Fnv> = policy
        .classes
        .keys()
        .map(|c| (c.as_str(), policy.weight(c)))
        .collect();
    let default = policy.weight("");
    // Walking the job map in order beats a lookup per pending id unless
    // most jobs have finished.
    let pending: Box<dyn Iterator<Item = &Job>> = if state.pending.len() * 8 >= state.jobs.len() {
        // `pending` holds exactly the jobs in state Pending.
        Box::new(state.jobs.values().filter(|j| j.state == JobState::Pending))
    } else {
        Box::new(state.pending.iter().filter_map(|id| state.jobs.get(id)))
    };
    let mut keyed: Vec<(Reverse<u32>, u32, i64, JobId, &Job)> = pending
        .map(|j| {
            let rank = ranks
                .get(j.spec.tenant.as_str())
                .copied()
                .unwrap_or(u32::MAX);
            let w = weights
                .get(j.spec.priority.as_str())
                .copied()
                .unwrap_or(default);
            (Reverse(w), rank, j.submitted_at_ms, j.id, j)
        })
        .collect();
    keyed.sort_unstable_by_key(|k| (k.0, k.1, k.2, k.3));
    keyed.into_iter().map(|k| k.4).collect()
}

/// FNV-1a: a fast hasher for the planner's small string-keyed maps (tenant
/// and class names come from admins, not from attackers).
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let start = if self.0 == 0 {
            muster_proto::fnv::OFFSET
        } else {
            self.0
        };
        self.0 = muster_proto::fnv::extend(start, bytes.iter().copied());
    }
}

impl std::hash::BuildHasher for Fnv {
    type Hasher = Fnv;
    fn build_hasher(&self) -> Fnv {
        Fnv(0)
    }
}
