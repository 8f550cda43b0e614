//! `muster nodes`: capacity and use per node, and optionally per GPU.

use std::collections::BTreeSet;

use muster_proto::NodeInfo;

use super::Ctx;
use crate::args::NodesArgs;
use crate::json;
use crate::output::{format_bytes, format_cpus, node_state, or_dash, Table};

/// Lists nodes (and their GPUs with `--gpus`).
pub async fn run(ctx: &Ctx, args: NodesArgs) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let mut nodes = scheduler.list_nodes().await?;
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    if ctx.json() {
        let nodes = nodes.iter().map(json::Node::from).collect();
        return json::print(&json::Nodes { nodes });
    }
    print!("{}", node_table(&nodes).render());
    for line in problems(&nodes) {
        println!("{line}");
    }
    if args.gpus {
        println!();
        print!("{}", gpu_table(&nodes).render());
    }
    Ok(())
}

/// `muster node drain|resume`.
pub async fn drain(ctx: &Ctx, cmd: crate::args::NodeCommand) -> anyhow::Result<()> {
    use crate::args::NodeCommand;
    let req = match cmd {
        NodeCommand::Drain(a) => muster_proto::DrainNodeRequest {
            name: a.node,
            drain: true,
            reason: a.reason.unwrap_or_default(),
        },
        NodeCommand::Resume(a) => muster_proto::DrainNodeRequest {
            name: a.node,
            drain: false,
            reason: String::new(),
        },
    };
    let mut scheduler = ctx.scheduler().await?;
    let drain = req.drain;
    let node = scheduler.drain_node(req).await?;
    if ctx.json() {
        return json::print(&json::Node::from(&node));
    }
    if drain {
        println!(
            "node {} {}: {}",
            node.name,
            node_state(&node),
            node.drain_reason
        );
    } else {
        println!("node {} resumed: {}", node.name, node_state(&node));
    }
    Ok(())
}

/// The distinct GPU models of a node.
fn models(node: &NodeInfo) -> String {
    let models: BTreeSet<&str> = node
        .gpus
        .iter()
        .map(|g| g.model.as_str())
        .filter(|m| !m.is_empty())
        .collect();
    or_dash(&models.into_iter().collect::<Vec<_>>().join(","))
}

/// Why nodes are drained and GPUs unhealthy, one line each.
pub fn problems(nodes: &[NodeInfo]) -> Vec<String> {
    let mut out = Vec::new();
    for n in nodes {
        if !n.drain_reason.is_empty() {
            out.push(format!("{}: {}: {}", n.name, node_state(n), n.drain_reason));
        }
        for g in n.gpus.iter().filter(|g| !g.healthy) {
            let why = if g.fault.is_empty() {
                "reported unhealthy by the agent"
            } else {
                g.fault.as_str()
            };
            out.push(format!("{}: GPU {}: {why}", n.name, g.index));
        }
    }
    out
}

/// One row per node.
pub fn node_table(nodes: &[NodeInfo]) -> Table {
    let mut table = Table::new(&[
        "NAME",
        "STATE",
        "GPUS",
        "ALLOC",
        "UNHEALTHY",
        "MODEL",
        "CPUS(ALLOC/TOTAL)",
        "MEM(ALLOC/TOTAL)",
    ]);
    for n in nodes {
        let allocated = n.gpus.iter().filter(|g| g.allocated_to != 0).count();
        let unhealthy = n.gpus.iter().filter(|g| !g.healthy).count();
        table.row(vec![
            n.name.clone(),
            node_state(n),
            n.gpus.len().to_string(),
            allocated.to_string(),
            unhealthy.to_string(),
            models(n),
            format!(
                "{}/{}",
                format_cpus(n.cpu_millis_allocated),
                format_cpus(n.cpu_millis)
            ),
            format!(
                "{}/{}",
                format_bytes(n.memory_bytes_allocated),
                format_bytes(n.memory_bytes)
            ),
        ]);
    }
    table
}

/// One row per GPU of every node.
pub fn gpu_table(nodes: &[NodeInfo]) -> Table {
    let mut table = Table::new(&["NODE", "GPU", "UUID", "MODEL", "MEMORY", "HEALTH", "JOB"]);
    for n in nodes {
        let mut gpus: Vec<_> = n.gpus.iter().collect();
        gpus.sort_by_key(|g| g.index);
        for g in gpus {
            table.row(vec![
                n.name.clone(),
                g.index.to_string(),
                or_dash(&g.uuid),
                or_dash(&g.model),
                format_bytes(g.memory_bytes),
                match (g.healthy, g.fault.as_str()) {
                    (true, _) => "ok".to_string(),
                    (false, "") => "unhealthy".to_string(),
                    (false, why) => format!("unhealthy: {why}"),
                },
                match g.allocated_to {
                    0 => "-".to_string(),
                    job => job.to_string(),
                },
            ]);
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::GpuInfo;

    fn node() -> NodeInfo {
        let gpu = |index, allocated_to, healthy| GpuInfo {
            index,
            uuid: format!("GPU-{index}"),
            model: "H100".into(),
            memory_bytes: 80 << 30,
            healthy,
            allocated_to,
            ..GpuInfo::default()
        };
        NodeInfo {
            name: "gpu-1".into(),
            state: "ready".into(),
            gpus: vec![gpu(1, 0, false), gpu(0, 42, true)],
            cpu_millis: 64_000,
            cpu_millis_allocated: 2_500,
            memory_bytes: 512 << 30,
            memory_bytes_allocated: 16 << 30,
            ..NodeInfo::default()
        }
    }

    #[test]
    fn node_rows_count_gpus() {
        let text = node_table(&[node()]).render();
        let row = text.lines().nth(1).unwrap_or_default();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "gpu-1",
                "ready",
                "2",
                "1",
                "1",
                "H100",
                "2.5/64",
                "16GiB/512GiB"
            ]
        );
    }

    #[test]
    fn gpu_rows_are_sorted_and_show_the_job() {
        let text = gpu_table(&[node()]).render();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("gpu-1  0    GPU-0"), "{text}");
        assert!(lines[1].ends_with("ok         42"), "{text}");
        assert!(lines[2].ends_with("unhealthy  -"), "{text}");
    }
}
