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

/// Most names in one tenant request's member, admin or default lists.
pub const MAX_NAMES: usize = 1000;

/// Limits on the names a tenant request carries; errors name the field.
pub fn check_request_names(tenant: &str, lists: [&Vec<String>; 3]) -> Result<(), tonic::Status> {
    if tenant.len() > crate::planner::fit::MAX_NAME_LEN {
        return Err(tonic::Status::invalid_argument(format!(
            "name: longer than {} characters",
            crate::planner::fit::MAX_NAME_LEN
        )));
    }
    super::limits::line("name", tenant, crate::planner::fit::MAX_NAME_LEN)?;
    for list in lists {
        if list.len() > MAX_NAMES {
            return Err(tonic::Status::invalid_argument(format!(
                "tenant {tenant}: more than {MAX_NAMES} user names in one request"
            )));
        }
        for u in list {
            crate::auth::roles::check_user_name(u)
                .map_err(|e| tonic::Status::invalid_argument(format!("tenant {tenant}: {e}")))?;
        }
    }
    Ok(())
}

/// `SetTenantAdmins` from a request's lists.
pub fn admins_command(tenant: &str, add: &[String], remove: &[String]) -> Command {
    Command::SetTenantAdmins {
        tenant: tenant.to_string(),
        add: add.to_vec(),
        remove: remove.to_vec(),
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
        admins: state.admins(&t.name).into_iter().collect(),
        warning: guarantee_warning(state, t).unwrap_or_default(),
    }
}

/// A guarantee the cluster cannot honour as it stands: more GPUs than all
/// registered nodes have. Accepted (nodes may be on their way), but said.
pub fn guarantee_warning(state: &State, t: &Tenant) -> Option<String> {
    if state.nodes.is_empty() || t.guarantee_gpus == 0 {
        return None;
    }
    let total: u64 = state.nodes.values().map(|n| n.gpus.len() as u64).sum();
    (u64::from(t.guarantee_gpus) > total).then(|| {
        format!(
            "tenant {}: its guarantee of {} GPUs is more than the whole cluster has ({total} GPUs on {} nodes); it can be honoured only once nodes are added",
            t.name,
            t.guarantee_gpus,
            state.nodes.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::World;

    #[test]
    fn a_guarantee_beyond_the_cluster_is_said() {
        let w = World::new(&[("a", 8), ("b", 8)]);
        let mut t = Tenant::open("ml");
        t.guarantee_gpus = 16;
        assert_eq!(guarantee_warning(&w.s, &t), None);
        t.guarantee_gpus = 64;
        let m = guarantee_warning(&w.s, &t).expect("warned");
        assert!(
            m.contains("64 GPUs is more than the whole cluster has (16 GPUs on 2 nodes)"),
            "{m}"
        );
        assert_eq!(
            guarantee_warning(&World::new(&[]).s, &t),
            None,
            "no nodes yet"
        );
    }
}
