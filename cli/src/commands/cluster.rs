//! `muster status` and `muster tenant ...`.

use muster_proto::{CreateTenantRequest, StatusResponse, TenantInfo};

use super::{current_user, Ctx};
use crate::args::TenantCreateArgs;
use crate::json;
use crate::output::Table;

/// Prints the scheduler's view of the cluster.
pub async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let status = scheduler.status().await?;
    if ctx.json() {
        return json::print(&json::Status::new(scheduler.addr(), &status));
    }
    print!("{}", status_text(scheduler.addr(), &status));
    Ok(())
}

/// The `muster status` report.
pub fn status_text(addr: &str, s: &StatusResponse) -> String {
    let leader = match s.leader_id {
        0 => "none (no leader elected)".to_string(),
        id if id == s.node_id => format!("{id} (this node)"),
        id => id.to_string(),
    };
    let lines = [
        ("Scheduler", format!("{addr} (node {})", s.node_id)),
        ("Leader", leader),
        ("Term", s.term.to_string()),
        (
            "Log",
            format!("commit {}, applied {}", s.commit_index, s.applied_index),
        ),
        ("Nodes", s.nodes.to_string()),
        (
            "Jobs",
            format!("{} pending, {} running", s.jobs_pending, s.jobs_running),
        ),
    ];
    lines
        .iter()
        .map(|(k, v)| format!("{:10} {v}\n", format!("{k}:")))
        .collect()
}

/// Creates a tenant and prints it.
pub async fn tenant_create(ctx: &Ctx, args: TenantCreateArgs) -> anyhow::Result<()> {
    let user = current_user()?;
    let mut scheduler = ctx.scheduler().await?;
    let request = CreateTenantRequest {
        name: args.name,
        gpu_limit: args.gpu_limit,
        user,
    };
    let tenant = scheduler.create_tenant(request).await?;
    if ctx.json() {
        return json::print(&json::Tenant::from(&tenant));
    }
    println!(
        "tenant {} created (GPU limit: {})",
        tenant.name,
        gpu_limit(tenant.gpu_limit)
    );
    Ok(())
}

/// Lists tenants.
pub async fn tenant_list(ctx: &Ctx) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let mut tenants = scheduler.list_tenants().await?;
    tenants.sort_by(|a, b| a.name.cmp(&b.name));
    if ctx.json() {
        let tenants = tenants.iter().map(json::Tenant::from).collect();
        return json::print(&json::Tenants { tenants });
    }
    print!("{}", tenant_table(&tenants).render());
    Ok(())
}

fn gpu_limit(limit: u32) -> String {
    match limit {
        0 => "unlimited".to_string(),
        n => n.to_string(),
    }
}

/// One row per tenant.
pub fn tenant_table(tenants: &[TenantInfo]) -> Table {
    let mut table = Table::new(&["NAME", "GPU_LIMIT", "GPUS_IN_USE"]);
    for t in tenants {
        table.row(vec![
            t.name.clone(),
            gpu_limit(t.gpu_limit),
            t.gpus_in_use.to_string(),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_leader() {
        let s = StatusResponse {
            node_id: 1,
            leader_id: 1,
            term: 3,
            commit_index: 10,
            applied_index: 9,
            nodes: 2,
            jobs_pending: 4,
            jobs_running: 1,
        };
        let text = status_text("http://h:1", &s);
        assert!(text.contains("Leader:    1 (this node)"), "{text}");
        assert!(text.contains("commit 10, applied 9"), "{text}");
        assert!(text.contains("4 pending, 1 running"), "{text}");
        let none = StatusResponse { leader_id: 0, ..s };
        assert!(status_text("x", &none).contains("no leader"));
    }

    #[test]
    fn tenant_rows_show_unlimited() {
        let t = TenantInfo {
            name: "ml".into(),
            gpu_limit: 0,
            gpus_in_use: 3,
        };
        let text = tenant_table(&[t]).render();
        assert_eq!(text, "NAME  GPU_LIMIT  GPUS_IN_USE\nml    unlimited  3\n");
    }
}
