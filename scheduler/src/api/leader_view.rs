//! What only the leader knows, served by every member.
//!
//! The planner runs on the leader, and agents keep their sessions with it,
//! so the verdict on each pending job ("why is it pending") and the time
//! each agent was last heard from live in the leader's memory, not in the
//! replicated state. A follower asked `muster why`, `queue` or `nodes`
//! would otherwise answer "waiting for the planner" and `last_seen 0`, and
//! a deposed leader its stale verdicts. So a member that is not the leader
//! asks the leader (`RaftPeer.LeaderView`) and answers with what it said;
//! if it cannot, it says so instead of pretending. The leader's memory is
//! cleared when it steps down (`leader::housekeeping_loop`).

use super::{now_ms, Ctx};
use crate::model::JobId;
use muster_proto as pb;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long a follower waits for the leader's view.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The leader's memory as one member answers with it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LeaderView {
    /// Verdicts of pending jobs, as text.
    pub reasons: BTreeMap<JobId, String>,
    /// Agents' last heartbeat, Unix milliseconds.
    pub last_seen_ms: BTreeMap<String, i64>,
    /// Why there is no view (no leader known, the leader did not answer):
    /// used as the reason of every pending job.
    pub missing: Option<String>,
}

impl LeaderView {
    /// The reason to show for pending job `id`.
    pub fn reason(&self, id: JobId) -> Option<String> {
        match (&self.missing, self.reasons.get(&id)) {
            (_, Some(r)) => Some(r.clone()),
            (Some(m), None) => Some(m.clone()),
            (None, None) => None,
        }
    }
}

/// This node's own leader memory (meaningful only while it leads).
pub fn local(ctx: &Ctx, jobs: &[JobId]) -> LeaderView {
    let verdicts = ctx.verdicts.read().unwrap_or_else(|p| p.into_inner());
    let reasons = if jobs.is_empty() {
        verdicts
            .iter()
            .map(|(id, v)| (*id, v.to_string()))
            .collect()
    } else {
        jobs.iter()
            .filter_map(|id| verdicts.get(id).map(|v| (*id, v.to_string())))
            .collect()
    };
    let leases = ctx.leases.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let wall = now_ms();
    let last_seen_ms = leases
        .iter()
        .map(|(n, t)| {
            let ago = now.duration_since(*t).as_millis() as i64;
            (n.clone(), wall - ago)
        })
        .collect();
    LeaderView {
        reasons,
        last_seen_ms,
        missing: None,
    }
}

/// The leader's view, from here if this node leads, else asked of the
/// leader.
pub async fn get(ctx: &Ctx, jobs: &[JobId]) -> LeaderView {
    let st = ctx.raft.status().borrow().clone();
    if st.is_leader {
        return local(ctx, jobs);
    }
    let missing = |why: String| LeaderView {
        missing: Some(why),
        ..LeaderView::default()
    };
    let Some(addr) = (st.leader != 0)
        .then(|| ctx.raft.address_of(st.leader))
        .flatten()
    else {
        return missing("unknown: no leader is known (an election is under way?)".into());
    };
    match tokio::time::timeout(ASK_TIMEOUT, ask(ctx, &addr, jobs)).await {
        Ok(Ok(v)) if v.is_leader => from_pb(v),
        Ok(Ok(_)) => missing(format!(
            "unknown: node {} at {addr} no longer leads (an election is under way?)",
            st.leader
        )),
        Ok(Err(e)) => missing(format!(
            "unknown: the leader (node {}) could not be asked: {e}",
            st.leader
        )),
        Err(_) => missing(format!(
            "unknown: the leader (node {}) did not answer within {}s",
            st.leader,
            ASK_TIMEOUT.as_secs()
        )),
    }
}

async fn ask(ctx: &Ctx, addr: &str, jobs: &[JobId]) -> Result<pb::LeaderViewResponse, String> {
    let channel = channel_to(ctx, addr).await?;
    let mut client = pb::raft_peer_client::RaftPeerClient::new(channel);
    let req = pb::LeaderViewRequest {
        job_ids: jobs.iter().map(|j| j.0).collect(),
    };
    match client.leader_view(req).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => {
            // Dial afresh next time.
            *ctx.leader_channel.lock().unwrap_or_else(|p| p.into_inner()) = None;
            Err(s.message().to_string())
        }
    }
}

/// A channel to `addr`, reused while the leader stays the same.
async fn channel_to(ctx: &Ctx, addr: &str) -> Result<tonic::transport::Channel, String> {
    if let Some((a, c)) = ctx
        .leader_channel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        if a == addr {
            return Ok(c);
        }
    }
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let channel = muster_proto::tls::endpoint(&url)
        .map_err(|e| format!("bad leader address {addr}: {e}"))?
        .connect_timeout(ASK_TIMEOUT)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    *ctx.leader_channel.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((addr.to_string(), channel.clone()));
    Ok(channel)
}

fn from_pb(v: pb::LeaderViewResponse) -> LeaderView {
    LeaderView {
        reasons: v.reasons.into_iter().map(|(k, r)| (JobId(k), r)).collect(),
        last_seen_ms: v.last_seen_ms.into_iter().collect(),
        missing: None,
    }
}

/// The leader's answer to a follower.
pub fn serve(ctx: &Ctx, req: &pb::LeaderViewRequest) -> pb::LeaderViewResponse {
    let st = ctx.raft.status().borrow().clone();
    if !st.is_leader {
        return pb::LeaderViewResponse {
            is_leader: false,
            term: st.term,
            ..Default::default()
        };
    }
    let jobs: Vec<JobId> = req.job_ids.iter().map(|j| JobId(*j)).collect();
    let view = local(ctx, &jobs);
    pb::LeaderViewResponse {
        is_leader: true,
        term: st.term,
        reasons: view.reasons.into_iter().map(|(k, r)| (k.0, r)).collect(),
        last_seen_ms: view.last_seen_ms.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_view_says_why_for_every_pending_job() {
        let mut v = LeaderView {
            missing: Some("unknown: no leader is known".into()),
            ..LeaderView::default()
        };
        assert_eq!(
            v.reason(JobId(3)).as_deref(),
            Some("unknown: no leader is known")
        );
        v.missing = None;
        v.reasons.insert(JobId(3), "tenant ml at its limit".into());
        assert_eq!(
            v.reason(JobId(3)).as_deref(),
            Some("tenant ml at its limit")
        );
        assert_eq!(v.reason(JobId(4)), None);
    }
}
