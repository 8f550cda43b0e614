//! `muster tenant create|set|show|list|delete|usage`.

use muster_proto::{CreateTenantRequest, DeleteTenantRequest, TenantInfo, UpdateTenantRequest};

use super::{current_user, Ctx};
use crate::json;
use crate::output::{format_bytes, Table};
use crate::tenant_args::{TenantCommand, TenantCreateArgs, TenantSetArgs};

/// Runs one tenant subcommand.
pub async fn run(ctx: &Ctx, cmd: TenantCommand) -> anyhow::Result<()> {
    match cmd {
        TenantCommand::Create(a) => create(ctx, a).await,
        TenantCommand::Set(a) => set(ctx, a).await,
        TenantCommand::Show(a) => show(ctx, &a.name).await,
        TenantCommand::List => list(ctx, false).await,
        TenantCommand::Usage => list(ctx, true).await,
        TenantCommand::Delete(a) => delete(ctx, a.name).await,
    }
}

async fn create(ctx: &Ctx, a: TenantCreateArgs) -> anyhow::Result<()> {
    let request = CreateTenantRequest {
        name: a.name,
        gpu_limit: u32::try_from(a.gpu_limit)?,
        user: current_user()?,
        guarantee_gpus: a.guarantee,
        cpu_limit_millis: a.cpu_limit,
        memory_limit_bytes: a.mem_limit,
        weight: a.weight,
        members: a.users,
        default_for: a.default_for,
        admins: a.admins,
    };
    let mut scheduler = ctx.scheduler().await?;
    let t = scheduler.create_tenant(request).await?;
    print_one(ctx, &t, "created")
}

async fn set(ctx: &Ctx, a: TenantSetArgs) -> anyhow::Result<()> {
    let request = UpdateTenantRequest {
        name: a.name,
        user: current_user()?,
        guarantee_gpus: a.guarantee,
        gpu_limit: a.gpu_limit.map(u32::try_from).transpose()?,
        cpu_limit_millis: a.cpu_limit,
        memory_limit_bytes: a.mem_limit,
        weight: a.weight,
        add_members: a.add_users,
        remove_members: a.remove_users,
        default_for: a.default_for,
        add_admins: a.add_admins,
        remove_admins: a.remove_admins,
    };
    let mut scheduler = ctx.scheduler().await?;
    let t = scheduler.update_tenant(request).await?;
    print_one(ctx, &t, "updated")
}

async fn show(ctx: &Ctx, name: &str) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let tenants = scheduler.list_tenants().await?;
    let t = tenants
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| anyhow::anyhow!("tenant {name} not found"))?;
    if ctx.json() {
        return json::print(&json::Tenant::from(t));
    }
    print!("{}", show_text(t));
    Ok(())
}

async fn list(ctx: &Ctx, usage: bool) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let mut tenants = scheduler.list_tenants().await?;
    tenants.sort_by(|a, b| a.name.cmp(&b.name));
    if ctx.json() {
        let tenants = tenants.iter().map(json::Tenant::from).collect();
        return json::print(&json::Tenants { tenants });
    }
    let table = if usage {
        usage_table(&tenants)
    } else {
        tenant_table(&tenants)
    };
    print!("{}", table.render());
    Ok(())
}

async fn delete(ctx: &Ctx, name: String) -> anyhow::Result<()> {
    let user = current_user()?;
    let mut scheduler = ctx.scheduler().await?;
    scheduler
        .delete_tenant(DeleteTenantRequest {
            name: name.clone(),
            user,
        })
        .await?;
    if ctx.json() {
        return json::print(&serde_json::json!({ "deleted": name }));
    }
    println!("tenant {name} deleted");
    Ok(())
}

fn print_one(ctx: &Ctx, t: &TenantInfo, verb: &str) -> anyhow::Result<()> {
    if !t.warning.is_empty() {
        eprintln!("muster: warning: {}", crate::output::escape(&t.warning));
    }
    if ctx.json() {
        return json::print(&json::Tenant::from(t));
    }
    println!(
        "tenant {} {verb} (guarantee {} GPUs, limit {}, weight {})",
        t.name,
        t.guarantee_gpus,
        limit(t.gpu_limit.into(), |v| v.to_string()),
        t.weight
    );
    Ok(())
}

fn limit(v: u64, show: impl Fn(u64) -> String) -> String {
    if v == 0 {
        "unlimited".to_string()
    } else {
        show(v)
    }
}

fn cpus(millis: u64) -> String {
    format!("{}", millis as f64 / 1000.0)
}

/// One row per tenant: quotas and GPUs in use.
pub fn tenant_table(tenants: &[TenantInfo]) -> Table {
    let mut table = Table::new(&[
        "NAME",
        "GUARANTEE",
        "GPU_LIMIT",
        "GPUS_IN_USE",
        "WEIGHT",
        "CPU_LIMIT",
        "MEM_LIMIT",
    ]);
    for t in tenants {
        table.row(vec![
            t.name.clone(),
            t.guarantee_gpus.to_string(),
            limit(t.gpu_limit.into(), |v| v.to_string()),
            t.gpus_in_use.to_string(),
            t.weight.to_string(),
            limit(t.cpu_limit_millis, cpus),
            limit(t.memory_limit_bytes, format_bytes),
        ]);
    }
    table
}

/// One row per tenant: what it holds, borrows and waits for.
pub fn usage_table(tenants: &[TenantInfo]) -> Table {
    let mut table = Table::new(&[
        "NAME",
        "GPUS",
        "GUARANTEE",
        "BORROWED",
        "CPUS",
        "MEMORY",
        "RUNNING",
        "PENDING",
        "GPU_HOURS_DECAYED",
    ]);
    for t in tenants {
        table.row(vec![
            t.name.clone(),
            t.gpus_in_use.to_string(),
            t.guarantee_gpus.to_string(),
            t.gpus_borrowed.to_string(),
            cpus(t.cpu_millis_in_use),
            format_bytes(t.memory_bytes_in_use),
            t.jobs_running.to_string(),
            t.jobs_pending.to_string(),
            format!("{:.1}", t.fair_share_usage / 3600.0),
        ]);
    }
    table
}

/// `muster tenant show`.
pub fn show_text(t: &TenantInfo) -> String {
    let list = |v: &[String], empty: &str| {
        if v.is_empty() {
            empty.to_string()
        } else {
            v.join(", ")
        }
    };
    let lines = [
        ("Tenant", t.name.clone()),
        ("Guarantee", format!("{} GPUs", t.guarantee_gpus)),
        (
            "GPU limit",
            limit(t.gpu_limit.into(), |v| format!("{v} GPUs")),
        ),
        ("CPU limit", limit(t.cpu_limit_millis, cpus)),
        ("Mem limit", limit(t.memory_limit_bytes, format_bytes)),
        ("Weight", t.weight.to_string()),
        (
            "In use",
            format!(
                "{} GPUs ({} borrowed), {} CPUs, {}",
                t.gpus_in_use,
                t.gpus_borrowed,
                cpus(t.cpu_millis_in_use),
                format_bytes(t.memory_bytes_in_use)
            ),
        ),
        (
            "Jobs",
            format!("{} running, {} pending", t.jobs_running, t.jobs_pending),
        ),
        (
            "Fair share",
            format!("{:.1} GPU-hours (decayed)", t.fair_share_usage / 3600.0),
        ),
        ("Members", list(&t.members, "anyone")),
        ("Default for", list(&t.default_for, "-")),
        ("Admins", list(&t.admins, "-")),
    ];
    lines
        .iter()
        .map(|(k, v)| format!("{:12} {v}\n", format!("{k}:")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ml() -> TenantInfo {
        TenantInfo {
            name: "ml/nlp".into(),
            gpu_limit: 64,
            gpus_in_use: 40,
            guarantee_gpus: 32,
            weight: 2,
            gpus_borrowed: 8,
            members: vec!["alice".into()],
            ..TenantInfo::default()
        }
    }

    #[test]
    fn rows_show_unlimited_and_borrowed() {
        let text = tenant_table(&[ml()]).render();
        assert!(text.starts_with("NAME"), "{text}");
        assert!(text.contains("ml/nlp  32         64         40"), "{text}");
        assert!(text.contains("unlimited"), "{text}");
        let text = usage_table(&[ml()]).render();
        assert!(text.contains("ml/nlp  40    32         8"), "{text}");
    }

    #[test]
    fn show_lists_quotas_and_members() {
        let text = show_text(&ml());
        assert!(text.contains("Guarantee:   32 GPUs"), "{text}");
        assert!(text.contains("40 GPUs (8 borrowed)"), "{text}");
        assert!(text.contains("Members:     alice"), "{text}");
    }
}
