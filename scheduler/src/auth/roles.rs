//! Roles: who may do what, as one pure function of the state.
//!
//! * **cluster admin** (`cluster_admins` in `scheduler.toml`, and root on a
//!   scheduler's host): everything.
//! * **tenant admin** (a tenant's `admins`): within the tenant's subtree,
//!   members and jobs of the tenant and its descendants; quotas, admins,
//!   creation and deletion of its *descendants* only — an admin of `ml` may
//!   not raise `ml`'s own limit.
//! * **user**: submits to tenants that list them as a member (or list no
//!   members), sees and cancels their own jobs, sees a summary of the queue
//!   (other users' jobs are redacted: no command, environment or folders).
//!
//! [`check`] runs on the receiving scheduler before a command is proposed
//! and again in `apply`, against the state the command lands on; a denial
//! names the missing right.

use crate::model::{Job, Tenant};
use crate::state::{Command, Principal, State};

/// Longest user name accepted.
pub const MAX_USER_LEN: usize = 64;

/// A user name is 1-64 printable characters without spaces.
pub fn check_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_USER_LEN {
        return Err(format!("user name must be 1-{MAX_USER_LEN} characters"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "user name {name:?} has a space or control character"
        ));
    }
    Ok(())
}

/// Whether `user` administers `tenant` (with `strict`: one of its ancestors).
pub fn is_tenant_admin(state: &State, user: &str, tenant: &str, strict: bool) -> bool {
    Tenant::lineage(tenant)
        .skip(usize::from(strict))
        .any(|t| state.tenant_admins.get(t).is_some_and(|a| a.contains(user)))
}

/// Whether `who` may see everything about `job` (else a summary).
pub fn can_see_job(state: &State, who: &Principal, job: &Job) -> bool {
    who.cluster_admin
        || job.user == who.name
        || is_tenant_admin(state, &who.name, &job.spec.tenant, false)
}

/// Require cluster-admin for `what`.
pub fn cluster_admin(who: &Principal, what: &str) -> Result<(), String> {
    if who.cluster_admin {
        return Ok(());
    }
    Err(format!(
        "permission denied: {} is not a cluster admin ({what} needs cluster-admin)",
        who.name
    ))
}

fn tenant_right(
    state: &State,
    who: &Principal,
    tenant: &str,
    strict: bool,
    what: &str,
) -> Result<(), String> {
    if who.cluster_admin || is_tenant_admin(state, &who.name, tenant, strict) {
        return Ok(());
    }
    let needs = match (strict, Tenant::parent_of(tenant)) {
        (false, _) => format!("tenant-admin on {tenant} or an ancestor, or cluster-admin"),
        (true, Some(p)) => format!("tenant-admin on {p} or an ancestor, or cluster-admin"),
        (true, None) => "cluster-admin".to_string(),
    };
    Err(format!(
        "permission denied: {} may not {what} tenant {tenant} (needs {needs})",
        who.name
    ))
}

/// May `who` make `tenant` (with `members` once changed) the default tenant
/// of `users`? Only for themselves, or as a cluster admin: a default decides
/// where a user's jobs (command, environment, output) go, so a tenant admin
/// who could set it would capture other users' jobs. And only to a tenant
/// the user may submit to (a member, or a tenant without a member list).
fn defaults_right(
    who: &Principal,
    tenant: &str,
    members: &std::collections::BTreeSet<String>,
    users: &[String],
) -> Result<(), String> {
    for u in users {
        if !who.cluster_admin && *u != who.name {
            return Err(format!(
                "permission denied: {} may not make {tenant} the default tenant of {u} \
                 (needs to be {u}, or cluster-admin)",
                who.name
            ));
        }
        if !members.is_empty() && !members.contains(u) {
            return Err(format!(
                "permission denied: {tenant} cannot be the default tenant of {u}: {u} is \
                 not a member of {tenant}"
            ));
        }
    }
    Ok(())
}

/// May `who` apply `cmd` to `state`? A denial names the missing right.
pub fn check(state: &State, who: &Principal, cmd: &Command) -> Result<(), String> {
    match cmd {
        Command::Submit { spec, user, .. } | Command::SubmitArray { spec, user, .. } => {
            if *user != who.name {
                return Err(format!(
                    "permission denied: {} may not submit as {user} (jobs run as the \
                     authenticated user)",
                    who.name
                ));
            }
            let tenant = if spec.tenant.is_empty() {
                state
                    .user_defaults
                    .get(user)
                    .cloned()
                    .unwrap_or_else(|| crate::state::DEFAULT_TENANT.to_string())
            } else {
                spec.tenant.clone()
            };
            match state.tenants.get(&tenant) {
                Some(t) if !t.members.is_empty() && !t.members.contains(user) => Err(format!(
                    "permission denied: {user} may not submit to tenant {tenant} (needs \
                     membership of {tenant}; an admin of {tenant} can add it)"
                )),
                // An unknown tenant is apply's to reject, with its own words.
                _ => Ok(()),
            }
        }
        Command::Cancel { job, .. } => match state.jobs.get(job) {
            Some(j) if !can_see_job(state, who, j) => Err(format!(
                "permission denied: {} may not cancel job {job} of {} (needs to own it, or \
                 tenant-admin on {} or an ancestor, or cluster-admin)",
                who.name, j.user, j.spec.tenant
            )),
            _ => Ok(()),
        },
        Command::CreateTenant {
            tenant,
            default_for,
        } => {
            tenant_right(state, who, &tenant.name, true, "create")?;
            defaults_right(who, &tenant.name, &tenant.members, default_for)
        }
        Command::UpdateTenant { name, patch } => {
            let quota = patch.guarantee_gpus.is_some()
                || patch.gpu_limit.is_some()
                || patch.cpu_limit_millis.is_some()
                || patch.memory_limit_bytes.is_some()
                || patch.weight.is_some();
            let members = !(patch.add_members.is_empty() && patch.remove_members.is_empty());
            if quota {
                tenant_right(state, who, name, true, "change the quota of")?;
            } else if members || patch.default_for.is_empty() {
                tenant_right(state, who, name, false, "change the members of")?;
            }
            // The members the tenant will have once the patch is applied.
            let mut after = state
                .tenants
                .get(name)
                .map(|t| t.members.clone())
                .unwrap_or_default();
            after.extend(patch.add_members.iter().cloned());
            for u in &patch.remove_members {
                after.remove(u);
            }
            defaults_right(who, name, &after, &patch.default_for)
        }
        Command::DeleteTenant { name } => tenant_right(state, who, name, true, "delete"),
        Command::SetTenantAdmins { tenant, .. } => {
            tenant_right(state, who, tenant, true, "change the admins of")
        }
        other => cluster_admin(who, describe(other).0),
    }
}

/// `tenant ml/nlp`, or the default one when the job named none.
fn tenant_of(spec: &crate::model::JobSpec) -> String {
    if spec.tenant.is_empty() {
        "the user's default tenant".to_string()
    } else {
        format!("tenant {}", spec.tenant)
    }
}

/// What a command does and to what, for the audit trail.
pub fn describe(cmd: &Command) -> (&'static str, String) {
    match cmd {
        Command::Submit { spec, .. } => ("submit", tenant_of(spec)),
        Command::SubmitArray { spec, count, .. } => (
            "submit-array",
            format!("{} ({count} jobs)", tenant_of(spec)),
        ),
        Command::Cancel { job, .. } => ("cancel", format!("job {job}")),
        Command::CreateTenant { tenant, .. } => ("tenant-create", tenant.name.clone()),
        Command::UpdateTenant { name, .. } => ("tenant-update", name.clone()),
        Command::DeleteTenant { name } => ("tenant-delete", name.clone()),
        Command::SetTenantAdmins { tenant, .. } => ("tenant-admins", tenant.clone()),
        Command::IssueToken { token } => {
            ("token-issue", format!("{} for {}", token.id, token.user))
        }
        Command::RevokeToken { id } => ("token-revoke", id.clone()),
        Command::RegisterNode { node, .. } => ("register-node", node.name.clone()),
        Command::DrainNode { name, reason } => match reason {
            Some(r) => ("node-drain", format!("{name} ({r})")),
            None => ("node-resume", name.clone()),
        },
        Command::GpuFailed {
            node, gpu, reason, ..
        } => ("gpu-failed", format!("{node} GPU {gpu} ({reason})")),
        Command::Authorized { cmd, .. } => describe(cmd),
        _ => ("internal", String::new()),
    }
}

#[cfg(test)]
#[path = "roles_tests.rs"]
mod tests;
