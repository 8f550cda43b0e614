//! Queue order: priority class first, then fair share, then age.
//!
//! Fair share is hierarchical (in the spirit of Slurm's fair tree): at each
//! level of the tenant tree, siblings are compared by their subtree's
//! decayed GPU-seconds divided by their weight, and the tenant with the
//! smaller figure goes first. Over time each sibling's share of GPU-seconds
//! converges to its share of the weights. Usage is decayed and charged by
//! `Command::AccrueUsage` (half-life from config); the planner only reads it.

use super::Policy;
use crate::model::{JobId, Tenant};
use crate::state::State;
use std::cmp::Reverse;
use std::collections::BTreeMap;

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
    let ranks = tenant_ranks(state);
    let mut keyed: Vec<(Reverse<u32>, u32, i64, JobId)> = state
        .pending
        .iter()
        .filter_map(|id| state.jobs.get(id))
        .map(|j| {
            let rank = ranks
                .get(j.spec.tenant.as_str())
                .copied()
                .unwrap_or(u32::MAX);
            (
                Reverse(policy.weight(&j.spec.priority)),
                rank,
                j.submitted_at_ms,
                j.id,
            )
        })
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|k| k.3).collect()
}
