//! Tenants: the tree, its quota bookkeeping, and the commands that change it.
//!
//! A tenant's name is its place in the tree (`ml/nlp` is a child of `ml`).
//! `tenant_use` (derived, never serialized) holds what each tenant's whole
//! subtree has booked, so a limit check on every ancestor is one lookup per
//! level. Rules checked before any change: a child's parent exists; a limit
//! is not below the guarantee; children's guarantees do not add up past
//! their parent's; a tenant with children or unfinished jobs is not deleted.

use super::{ApplyResult, State, DEFAULT_TENANT};
use crate::model::{Job, JobId, TaskPlacement, Tenant};
use crate::planner::fit;
use serde::{Deserialize, Serialize};

/// What a tenant's subtree holds (or a job asks for).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TenantUse {
    pub gpus: u32,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl TenantUse {
    /// What one task placement books.
    pub fn of_task(p: &TaskPlacement) -> TenantUse {
        TenantUse {
            gpus: p.gpus.len() as u32,
            cpu_millis: u64::from(p.cpu_millis),
            memory_bytes: p.memory_bytes,
        }
    }

    /// What a whole gang asks for.
    pub fn of_job(job: &Job) -> TenantUse {
        let t = u64::from(job.spec.tasks);
        TenantUse {
            gpus: job.total_gpus(),
            cpu_millis: u64::from(job.spec.per_task.cpu_millis) * t,
            memory_bytes: job.spec.per_task.memory_bytes.saturating_mul(t),
        }
    }

    /// Sum.
    pub fn plus(self, o: TenantUse) -> TenantUse {
        TenantUse {
            gpus: self.gpus.saturating_add(o.gpus),
            cpu_millis: self.cpu_millis.saturating_add(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(o.memory_bytes),
        }
    }

    /// Difference, floored at zero.
    pub fn minus(self, o: TenantUse) -> TenantUse {
        TenantUse {
            gpus: self.gpus.saturating_sub(o.gpus),
            cpu_millis: self.cpu_millis.saturating_sub(o.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(o.memory_bytes),
        }
    }
}

/// A change to a tenant; `None` fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantPatch {
    pub guarantee_gpus: Option<u32>,
    /// `Some(None)` removes the limit.
    pub gpu_limit: Option<Option<u32>>,
    pub cpu_limit_millis: Option<Option<u64>>,
    pub memory_limit_bytes: Option<Option<u64>>,
    pub weight: Option<u32>,
    pub add_members: Vec<String>,
    pub remove_members: Vec<String>,
    /// Users whose default tenant becomes this one.
    pub default_for: Vec<String>,
}

impl State {
    pub(super) fn create_tenant(&mut self, tenant: &Tenant, default_for: &[String]) -> ApplyResult {
        if let Err(e) = fit::validate_tenant_name(&tenant.name) {
            return ApplyResult::Rejected(e);
        }
        if self.tenants.contains_key(&tenant.name) {
            return ApplyResult::Rejected(format!("tenant {} already exists", tenant.name));
        }
        if let Some(parent) = Tenant::parent_of(&tenant.name) {
            if !self.tenants.contains_key(parent) {
                return ApplyResult::Rejected(format!(
                    "tenant {}: parent tenant {parent} does not exist (create it first)",
                    tenant.name
                ));
            }
        }
        if let Err(e) = self.check_tenant(tenant, default_for) {
            return ApplyResult::Rejected(e);
        }
        self.tenants.insert(tenant.name.clone(), tenant.clone());
        self.set_defaults(&tenant.name, default_for);
        ApplyResult::Applied
    }

    pub(super) fn update_tenant(&mut self, name: &str, patch: &TenantPatch) -> ApplyResult {
        let Some(old) = self.tenants.get(name) else {
            return ApplyResult::NotFound(format!("tenant {name} not found"));
        };
        let mut t = old.clone();
        if let Some(g) = patch.guarantee_gpus {
            t.guarantee_gpus = g;
        }
        if let Some(l) = patch.gpu_limit {
            t.gpu_limit = l;
        }
        if let Some(l) = patch.cpu_limit_millis {
            t.cpu_limit_millis = l;
        }
        if let Some(l) = patch.memory_limit_bytes {
            t.memory_limit_bytes = l;
        }
        if let Some(w) = patch.weight {
            t.weight = w;
        }
        for u in &patch.add_members {
            t.members.insert(u.clone());
        }
        for u in &patch.remove_members {
            t.members.remove(u);
        }
        if let Err(e) = self.check_tenant(&t, &patch.default_for) {
            return ApplyResult::Rejected(e);
        }
        self.tenants.insert(name.to_string(), t);
        self.set_defaults(name, &patch.default_for);
        ApplyResult::Applied
    }

    pub(super) fn delete_tenant(&mut self, name: &str) -> ApplyResult {
        if !self.tenants.contains_key(name) {
            return ApplyResult::NotFound(format!("tenant {name} not found"));
        }
        if name == DEFAULT_TENANT {
            return ApplyResult::Rejected(format!("tenant {name} cannot be deleted"));
        }
        if let Some(child) = self.children(name).next() {
            return ApplyResult::Rejected(format!(
                "tenant {name} has child tenant {child}; delete the children first"
            ));
        }
        let live = self
            .jobs
            .values()
            .filter(|j| j.spec.tenant == name && !j.state.is_terminal())
            .count();
        if live > 0 {
            return ApplyResult::Rejected(format!(
                "tenant {name} has {live} unfinished job(s); cancel them or wait"
            ));
        }
        self.tenants.remove(name);
        self.fair_usage.remove(name);
        self.user_defaults.retain(|_, t| t != name);
        ApplyResult::Applied
    }

    /// Names of the direct children of `name`.
    pub fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tenants
            .keys()
            .filter(move |k| Tenant::parent_of(k) == Some(name))
            .map(|k| k.as_str())
    }

    /// What `name`'s subtree holds now.
    pub fn tenant_use(&self, name: &str) -> TenantUse {
        self.tenant_use.get(name).copied().unwrap_or_default()
    }

    /// The tenant a job of `user` naming `requested` is charged to, or why not.
    pub fn resolve_tenant(&self, user: &str, requested: &str) -> Result<String, String> {
        let name = if requested.is_empty() {
            self.user_defaults
                .get(user)
                .cloned()
                .unwrap_or_else(|| DEFAULT_TENANT.to_string())
        } else {
            requested.to_string()
        };
        let Some(t) = self.tenants.get(&name) else {
            return Err(format!("unknown tenant {name:?}"));
        };
        if !t.members.is_empty() && !t.members.contains(user) {
            return Err(format!("user {user} is not a member of tenant {name}"));
        }
        Ok(name)
    }

    fn check_tenant(&self, t: &Tenant, default_for: &[String]) -> Result<(), String> {
        let n = &t.name;
        if t.weight == 0 {
            return Err(format!("tenant {n}: weight must be at least 1"));
        }
        if let Some(l) = t.gpu_limit {
            if l < t.guarantee_gpus {
                return Err(format!(
                    "tenant {n}: GPU limit {l} is below its guarantee of {}",
                    t.guarantee_gpus
                ));
            }
        }
        for u in t.members.iter().chain(default_for) {
            if u.is_empty() || u.len() > 64 || u.contains(char::is_whitespace) {
                return Err(format!("tenant {n}: invalid user name {u:?}"));
            }
        }
        for u in default_for {
            if !t.members.is_empty() && !t.members.contains(u) {
                return Err(format!(
                    "tenant {n}: user {u} must be a member to make it their default"
                ));
            }
        }
        let kids: u64 = self
            .children(n)
            .filter_map(|c| self.tenants.get(c))
            .map(|c| u64::from(c.guarantee_gpus))
            .sum();
        if kids > u64::from(t.guarantee_gpus) {
            return Err(format!(
                "tenant {n}: its children's guarantees add up to {kids} GPUs, \
                 more than its guarantee of {}",
                t.guarantee_gpus
            ));
        }
        if let Some(parent) = Tenant::parent_of(n).and_then(|p| self.tenants.get(p)) {
            let siblings: u64 = self
                .children(&parent.name)
                .filter(|c| c != n)
                .filter_map(|c| self.tenants.get(c))
                .map(|c| u64::from(c.guarantee_gpus))
                .sum();
            let total = siblings + u64::from(t.guarantee_gpus);
            if total > u64::from(parent.guarantee_gpus) {
                return Err(format!(
                    "tenant {n}: guarantees of {}'s children would add up to {total} GPUs, \
                     more than its guarantee of {}",
                    parent.name, parent.guarantee_gpus
                ));
            }
        }
        Ok(())
    }

    fn set_defaults(&mut self, name: &str, users: &[String]) {
        for u in users {
            self.user_defaults.insert(u.clone(), name.to_string());
        }
    }

    /// Book (or, with `add == false`, release) a task against its job's
    /// tenant and every ancestor.
    pub(super) fn book_tenant(&mut self, tenant: &str, p: &TaskPlacement, add: bool) {
        let u = TenantUse::of_task(p);
        for name in Tenant::lineage(tenant) {
            let e = self.tenant_use.entry(name.to_string()).or_default();
            *e = if add { e.plus(u) } else { e.minus(u) };
            // Canonical: a tenant holding nothing has no entry, as after a
            // rebuild from a snapshot.
            if *e == TenantUse::default() {
                self.tenant_use.remove(name);
            }
        }
    }

    /// Decay every tenant's fair-share usage to `at_ms` and charge the
    /// GPU-seconds that live allocations have run since the last accrual.
    pub(super) fn accrue_usage(&mut self, at_ms: i64, half_life_secs: u64) -> ApplyResult {
        if at_ms <= self.usage_at_ms {
            return ApplyResult::Applied;
        }
        // In integers, not `powf`: see `decay.rs`.
        let elapsed = u64::try_from(at_ms.saturating_sub(self.usage_at_ms)).unwrap_or(0);
        let factor = super::decay::decay_factor(elapsed, half_life_secs);
        for v in self.fair_usage.values_mut() {
            *v *= factor;
        }
        let since = self.usage_at_ms;
        let charges: Vec<(String, f64)> = self
            .active
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter_map(|j| {
                let a = j.alloc.as_ref()?;
                let from = a.placed_at_ms.max(since);
                let secs = (at_ms - from).max(0) as f64 / 1000.0;
                Some((j.spec.tenant.clone(), secs * f64::from(super::held_gpus(j))))
            })
            .collect();
        for (t, c) in charges {
            *self.fair_usage.entry(t).or_default() += c;
        }
        self.usage_at_ms = at_ms;
        ApplyResult::Applied
    }

    /// Charge an allocation that stopped holding resources for the time it
    /// ran since the last accrual.
    pub(super) fn charge_finished(&mut self, id: JobId) {
        let Some(j) = self.jobs.get(&id) else { return };
        let Some(a) = j.alloc.as_ref() else { return };
        let end = a.tasks.iter().map(|t| t.ended_at_ms).max().unwrap_or(0);
        let from = a.placed_at_ms.max(self.usage_at_ms);
        if end <= from {
            return;
        }
        let gpus = a
            .tasks
            .iter()
            .map(|t| t.placement.gpus.len())
            .sum::<usize>() as f64;
        let c = gpus * (end - from) as f64 / 1000.0;
        *self.fair_usage.entry(j.spec.tenant.clone()).or_default() += c;
    }

    /// Reason a tenant is unknown, for commands that name one.
    pub fn tenant_exists(&self, name: &str) -> bool {
        self.tenants.contains_key(name)
    }
}
