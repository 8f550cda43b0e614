//! `muster status`.

use muster_proto::StatusResponse;

use super::Ctx;
use crate::json;

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
}
