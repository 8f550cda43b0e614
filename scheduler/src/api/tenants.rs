//! Tenant requests ↔ tenant commands, and the tenant report (`TenantInfo`).

use crate::model::{JobState, Tenant};
use crate::state::{Command, State, TenantPatch};
use muster_proto as pb;

fn nonzero<T: PartialEq + Default>(v: T) -> Option<T> {
    Some(v).filter(|v| *v != T::default())
}

/// `CreateTenant` from the request.
pub fn create_command(req: &pb::CreateTenantRequest) -> Command {
    Command::CreateTenant {
        tenant: Box::new(Tenant {
            name: req.name.clone(),
            guarantee_gpus: req.guarantee_gpus,
            gpu_limit: nonzero(req.gpu_limit),
            cpu_limit_millis: nonzero(req.cpu_limit_millis),
            memory_limit_bytes: nonzero(req.memory_limit_bytes),
            weight: req.weight.max(1),
            members: req.members.iter().cloned().collect(),
        }),
        default_for: req.default_for.clone(),
    }
}

/// `UpdateTenant` from the request (0 limits mean "no limit").
pub fn update_command(req: &pb::UpdateTenantRequest) -> Command {
    Command::UpdateTenant {
        name: req.name.clone(),
        patch: Box::new(TenantPatch {
            guarantee_gpus: req.guarantee_gpus,
            gpu_limit: req.gpu_limit.map(nonzero),
            cpu_limit_millis: req.cpu_limit_millis.map(nonzero),
            memory_limit_bytes: req.memory_limit_bytes.map(nonzero),
            weight: req.weight,
            add_members: req.add_members.clone(),
            remove_members: req.remove_members.clone(),
            default_for: req.default_for.clone(),
        }),
    }
}

/// A tenant with its use, as protobuf.
pub fn tenant_info(state: &State, t: &Tenant) -> pb::TenantInfo {
    let used = state.tenant_use(&t.name);
    let (mut pending, mut running) = (0, 0);
    for j in state.jobs.values().filter(|j| j.spec.tenant == t.name) {
        match j.state {
            JobState::Pending => pending += 1,
            JobState::Placed | JobState::Running | JobState::Preempting => running += 1,
            _ => {}
        }
    }
    pb::TenantInfo {
        name: t.name.clone(),
        gpu_limit: t.gpu_limit.unwrap_or(0),
        gpus_in_use: used.gpus,
        guarantee_gpus: t.guarantee_gpus,
        cpu_limit_millis: t.cpu_limit_millis.unwrap_or(0),
        memory_limit_bytes: t.memory_limit_bytes.unwrap_or(0),
        weight: t.weight,
        members: t.members.iter().cloned().collect(),
        default_for: state
            .user_defaults
            .iter()
            .filter(|(_, d)| **d == t.name)
            .map(|(u, _)| u.clone())
            .collect(),
        cpu_millis_in_use: used.cpu_millis,
        memory_bytes_in_use: used.memory_bytes,
        gpus_borrowed: used.gpus.saturating_sub(t.guarantee_gpus),
        fair_share_usage: state.fair_usage.get(&t.name).copied().unwrap_or(0.0),
        jobs_pending: pending,
        jobs_running: running,
    }
}
