//! Hierarchical quotas: a job may start only if its tenant and every
//! ancestor stay within their limits (GPUs, and CPUs and memory where set).
//! One function, used by the planner (with its in-pass bookings) and by
//! `apply` (with the state's), so both say the same thing.

use crate::model::{JobSpec, Tenant};
use crate::state::TenantUse;
use std::collections::BTreeMap;

/// Which quota blocks a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaResource {
    Gpus,
    Cpus,
    Memory,
}

/// A limit that a job would exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaBlock {
    /// The job's tenant.
    pub tenant: String,
    /// The tenant (the job's own or an ancestor) whose limit is reached.
    pub at: String,
    pub resource: QuotaResource,
    pub limit: u64,
    pub used: u64,
    pub need: u64,
}

impl std::fmt::Display for QuotaBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: u64| match self.resource {
            QuotaResource::Gpus => format!("{v} GPUs"),
            QuotaResource::Cpus => format!("{} CPUs", v as f64 / 1000.0),
            QuotaResource::Memory => format!("{} GiB of memory", v >> 30),
        };
        write!(
            f,
            "tenant {} at its limit of {}",
            self.tenant,
            show(self.limit)
        )?;
        if self.at != self.tenant {
            write!(f, " on ancestor {}", self.at)?;
        }
        write!(
            f,
            " ({} in use, job needs {})",
            show(self.used),
            show(self.need)
        )
    }
}

/// What a gang asks for in total.
pub fn need_of(spec: &JobSpec) -> TenantUse {
    let t = u64::from(spec.tasks);
    TenantUse {
        gpus: spec.tasks.saturating_mul(spec.per_task.gpus),
        cpu_millis: u64::from(spec.per_task.cpu_millis) * t,
        memory_bytes: spec.per_task.memory_bytes.saturating_mul(t),
    }
}

/// Check `need` against the limits of `tenant` and every ancestor, given
/// what each subtree holds (`use_of`). Nearest limit first.
pub fn check(
    tenants: &BTreeMap<String, Tenant>,
    use_of: impl Fn(&str) -> TenantUse,
    tenant: &str,
    need: TenantUse,
) -> Result<(), QuotaBlock> {
    for name in Tenant::lineage(tenant) {
        if let Some(t) = tenants.get(name) {
            check_one(t, use_of(name), tenant, need)?;
        }
    }
    Ok(())
}

/// One tenant's limits against what its subtree holds plus `need`.
fn check_one(
    t: &Tenant,
    used: TenantUse,
    job_tenant: &str,
    need: TenantUse,
) -> Result<(), QuotaBlock> {
    let checks = [
        (
            QuotaResource::Gpus,
            t.gpu_limit.map(u64::from),
            u64::from(used.gpus),
            u64::from(need.gpus),
        ),
        (
            QuotaResource::Cpus,
            t.cpu_limit_millis,
            used.cpu_millis,
            need.cpu_millis,
        ),
        (
            QuotaResource::Memory,
            t.memory_limit_bytes,
            used.memory_bytes,
            need.memory_bytes,
        ),
    ];
    for (resource, limit, used, need) in checks {
        if let Some(limit) = limit {
            if used.saturating_add(need) > limit {
                return Err(QuotaBlock {
                    tenant: job_tenant.to_string(),
                    at: t.name.clone(),
                    resource,
                    limit,
                    used,
                    need,
                });
            }
        }
    }
    Ok(())
}

/// The tenant tree indexed for one planning pass: integer parents and
/// in-pass bookings, so the limit check per job does no string work.
pub struct Tree<'a> {
    index: std::collections::HashMap<&'a str, usize, super::queue::Fnv>,
    tenants: Vec<&'a Tenant>,
    parent: Vec<Option<usize>>,
    used: Vec<TenantUse>,
}

impl<'a> Tree<'a> {
    /// The tree of `state`, with what each subtree holds now.
    pub fn new(state: &'a crate::state::State) -> Tree<'a> {
        let tenants: Vec<&Tenant> = state.tenants.values().collect();
        let index: std::collections::HashMap<&str, usize, super::queue::Fnv> = tenants
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let parent = tenants
            .iter()
            .map(|t| Tenant::parent_of(&t.name).and_then(|p| index.get(p).copied()))
            .collect();
        let used = tenants.iter().map(|t| state.tenant_use(&t.name)).collect();
        Tree {
            index,
            tenants,
            parent,
            used,
        }
    }

    /// A tenant's index.
    pub fn idx(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The tenant at an index.
    pub fn tenant(&self, i: usize) -> &'a Tenant {
        self.tenants[i]
    }

    /// What the subtree holds, with this pass's bookings.
    pub fn used(&self, i: usize) -> TenantUse {
        self.used[i]
    }

    fn lineage(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(i), |&j| self.parent[j])
    }

    /// [`check`] by index.
    pub fn check(&self, i: usize, need: TenantUse) -> Result<(), QuotaBlock> {
        for j in self.lineage(i) {
            check_one(self.tenants[j], self.used[j], &self.tenants[i].name, need)?;
        }
        Ok(())
    }

    /// Book a placed gang on the tenant and its ancestors.
    pub fn book(&mut self, i: usize, need: TenantUse) {
        let line: Vec<usize> = self.lineage(i).collect();
        for j in line {
            self.used[j] = self.used[j].plus(need);
        }
    }
}
