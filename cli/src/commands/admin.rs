//! `muster admin status` and `muster admin peers ...`.

use super::Ctx;
use crate::client::connect_admin;
use crate::output::Table;
use muster_proto::{change_peers_request::Op, AdminStatusRequest, ChangePeersRequest};
use serde::Serialize;
use std::collections::BTreeMap;

/// One member's own report (`--json`).
#[derive(Debug, Serialize)]
struct MemberStatus {
    id: u64,
    address: String,
    role: String,
    leader_id: Option<u64>,
    term: u64,
    commit_index: u64,
    applied_index: u64,
    last_index: u64,
    snapshot_index: u64,
    state_digest: String,
    /// Leader's view: entries this member is behind.
    lag: Option<u64>,
    /// This member's links to the others ("ok", "unreachable: ...").
    links: BTreeMap<u64, String>,
    error: Option<String>,
}

/// Ask every reachable member for its status.
pub async fn status(ctx: &Ctx) -> anyhow::Result<()> {
    let listed: Vec<String> = ctx
        .addr()?
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    let mut by_addr: BTreeMap<String, Option<u64>> =
        listed.iter().map(|a| (a.clone(), None)).collect();
    let mut reports: BTreeMap<String, MemberStatus> = BTreeMap::new();
    let mut lags: BTreeMap<u64, u64> = BTreeMap::new();
    // Visit listed addresses, then members they name, once each.
    let mut queue: Vec<String> = listed.clone();
    while let Some(addr) = queue.pop() {
        if reports.contains_key(&addr) {
            continue;
        }
        let report = match ask(&addr).await {
            Ok(r) => {
                for m in &r.members {
                    if !m.address.is_empty() && !by_addr.contains_key(&m.address) {
                        by_addr.insert(m.address.clone(), Some(m.id));
                        queue.push(m.address.clone());
                    }
                    if r.role == "leader" && m.link != "self" {
                        lags.insert(m.id, m.lag);
                    }
                }
                MemberStatus {
                    id: r.node_id,
                    address: addr.clone(),
                    role: r.role,
                    leader_id: Some(r.leader_id).filter(|l| *l != 0),
                    term: r.term,
                    commit_index: r.commit_index,
                    applied_index: r.applied_index,
                    last_index: r.last_index,
                    snapshot_index: r.snapshot_index,
                    state_digest: format!("{:016x}", r.state_digest),
                    lag: None,
                    links: r
                        .members
                        .iter()
                        .filter(|m| m.link != "self")
                        .map(|m| (m.id, m.link.clone()))
                        .collect(),
                    error: None,
                }
            }
            Err(e) => MemberStatus {
                id: by_addr.get(&addr).copied().flatten().unwrap_or(0),
                address: addr.clone(),
                role: "unreachable".into(),
                leader_id: None,
                term: 0,
                commit_index: 0,
                applied_index: 0,
                last_index: 0,
                snapshot_index: 0,
                state_digest: String::new(),
                lag: None,
                links: BTreeMap::new(),
                error: Some(e),
            },
        };
        reports.insert(addr, report);
    }
    let mut members: Vec<MemberStatus> = reports.into_values().collect();
    for m in &mut members {
        m.lag = lags
            .get(&m.id)
            .copied()
            .or((m.role == "leader").then_some(0));
    }
    members.sort_by_key(|m| (m.id, m.address.clone()));
    if ctx.json() {
        return crate::json::print(&serde_json::json!({ "members": members }));
    }
    let mut t = Table::new(&[
        "ID", "ADDRESS", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED", "LAG", "DIGEST", "LINKS",
    ]);
    for m in &members {
        let links = if let Some(e) = &m.error {
            e.clone()
        } else {
            m.links
                .iter()
                .map(|(id, l)| format!("{id}:{l}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        t.row(vec![
            m.id.to_string(),
            m.address.clone(),
            m.role.clone(),
            m.leader_id.map(|l| l.to_string()).unwrap_or("-".into()),
            m.term.to_string(),
            m.commit_index.to_string(),
            m.applied_index.to_string(),
            m.lag.map(|l| l.to_string()).unwrap_or("-".into()),
            m.state_digest.clone(),
            links,
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

async fn ask(addr: &str) -> Result<muster_proto::AdminStatusResponse, String> {
    let mut c = connect_admin(addr).await.map_err(|e| e.to_string())?;
    c.status(AdminStatusRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string())
}

/// Add or remove a member, on whichever listed scheduler is the leader.
pub async fn change(ctx: &Ctx, op: Op, id: u64, address: String) -> anyhow::Result<()> {
    let addrs = ctx.addr()?;
    let mut last = String::from("no scheduler address given");
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let Ok(mut c) = connect_admin(addr).await else {
            last = format!("cannot reach {addr}");
            continue;
        };
        // Only the leader changes membership; find it through this member.
        let leader_addr = match c.status(AdminStatusRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                r.members
                    .iter()
                    .find(|m| m.id == r.leader_id)
                    .map(|m| m.address.clone())
                    .filter(|a| !a.is_empty() && r.leader_id != r.node_id)
            }
            Err(s) => {
                last = s.message().to_string();
                continue;
            }
        };
        if let Some(l) = leader_addr {
            if let Ok(lc) = connect_admin(&l).await {
                c = lc;
            }
        }
        let req = ChangePeersRequest {
            op: op as i32,
            id,
            address: address.clone(),
        };
        match c.change_peers(req).await {
            Ok(r) => {
                let members = r.into_inner().members;
                if ctx.json() {
                    let list: Vec<_> = members
                        .iter()
                        .map(|m| serde_json::json!({"id": m.id, "address": m.address, "voter": m.voter}))
                        .collect();
                    return crate::json::print(&serde_json::json!({ "members": list }));
                }
                let mut t = Table::new(&["ID", "ADDRESS", "VOTER"]);
                for m in members {
                    t.row(vec![m.id.to_string(), m.address, m.voter.to_string()]);
                }
                print!("{}", t.render());
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::Unavailable => last = s.message().to_string(),
            Err(s) => anyhow::bail!("{}", s.message()),
        }
    }
    anyhow::bail!("membership change failed: {last}")
}
