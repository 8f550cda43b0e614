//! The leader's loops: planning, agent leases, time limits, and the
//! quorum's confirmation of this leadership that agent leases depend on.
//!
//! Each loop does its work only while this node is the Raft leader, reads the
//! applied state, and changes it only by proposing commands. The planner runs
//! whenever the applied state changes (so a submission is placed within one
//! round trip through the log) and at least every `PLAN_INTERVAL`.

use crate::api::{now_ms, Ctx};
use crate::model::{JobState, NodeState};
use crate::planner;
use crate::state::{ApplyResult, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const PLAN_INTERVAL: Duration = Duration::from_secs(1);
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);

/// Run the planner loop until shutdown.
pub async fn plan_loop(ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    let mut status = ctx.raft.status();
    let mut last_planned_applied = u64::MAX;
    loop {
        let st = status.borrow_and_update().clone();
        if st.is_leader && st.applied != last_planned_applied {
            last_planned_applied = st.applied;
            let started = std::time::Instant::now();
            plan_once(&ctx, st.term).await;
            // A pass reads the whole queue under the state's read lock, which
            // holds up applying the log. With a long queue and a stream of
            // submissions, planning after every entry would starve the log:
            // keep planning to `planner_share` of the time. A short queue
            // plans in microseconds, so this adds nothing there.
            let spent = started.elapsed();
            if spent > std::time::Duration::from_micros(50) {
                let pause = spent.mul_f64(1.0 / ctx.cfg.scheduling.planner_share - 1.0);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
        tokio::select! {
            r = status.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(PLAN_INTERVAL) => { last_planned_applied = u64::MAX; }
            _ = shutdown.changed() => return,
        }
    }
}

async fn plan_once(ctx: &Ctx, term: u64) {
    let policy = ctx.cfg.scheduling.policy();
    let now = now_ms();
    let plan = {
        let state = ctx.raft.state();
        planner::plan(&state, &policy, now)
    };
    *ctx.verdicts.write().unwrap_or_else(|p| p.into_inner()) = plan.verdicts;
    if !plan.preemptions.is_empty() {
        for o in &plan.preemptions {
            tracing::info!(victim = %o.victim, for_job = %o.for_job, "preempting: {}", o.reason);
        }
        let cmd = Command::Preempt {
            orders: plan.preemptions,
            at_ms: now,
        };
        if let Err(e) = ctx.raft.propose_as_leader(cmd).await {
            tracing::debug!("preemption not proposed: {e}");
        }
    }
    if plan.placements.is_empty() {
        return;
    }
    let cmd = Command::ApplyPlan {
        term,
        at_ms: now,
        placements: plan.placements,
    };
    match ctx.raft.propose_as_leader(cmd).await {
        Ok(ApplyResult::Planned { placed, rejected }) => {
            tracing::debug!(
                placed = placed.len(),
                rejected = rejected.len(),
                "plan applied"
            );
            for (job, why) in rejected {
                tracing::info!(%job, "placement rejected at apply: {why}");
            }
        }
        Ok(other) => tracing::warn!("unexpected plan result {other:?}"),
        Err(e) => tracing::debug!("plan not proposed: {e}"),
    }
}

/// On the leader, have a quorum confirm the leadership twice per window
/// that a confirmation buys (a read barrier: a quorum round trip, which
/// raft-rs sends as an extra heartbeat), and record when the confirming
/// read was asked. Agent leases are renewed only inside the
/// window this buys ([`Ctx::leadership_confirmed`]): a leader whose driver
/// stalls (a disk that does not return) or that lost its quorum stops
/// renewing them, so its agents freeze their tasks and look for the new
/// leader before that leader can run their gangs elsewhere.
pub async fn confirm_loop(ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    // A confirmation asked at T holds until T + the followers' election
    // timeout less a tick (`Ctx::leadership_confirmed`); asking twice per
    // window keeps one alive, with room for the round trip.
    let every = ctx
        .cfg
        .raft_tick
        .saturating_mul(ctx.cfg.election_ticks.saturating_sub(1).max(2) as u32)
        / 2;
    let mut first = true;
    loop {
        // At once the first time, then twice per window.
        if !std::mem::take(&mut first) {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
        let (leader, term) = {
            let st = ctx.raft.status().borrow().clone();
            (st.is_leader, st.term)
        };
        if !leader {
            *ctx.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = None;
            continue;
        }
        let asked = Instant::now();
        let ok = tokio::select! {
            r = ctx.raft.read_barrier() => r.is_ok(),
            _ = shutdown.changed() => return,
        };
        let st = ctx.raft.status().borrow().clone();
        if ok && st.is_leader && st.term == term {
            *ctx.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = Some((term, asked));
        }
    }
}

/// Mark nodes lost when their lease expires, and time out jobs past their
/// limit, while this node's leadership is confirmed. Runs until shutdown.
pub async fn housekeeping_loop(ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    let lease = ctx.cfg.agent_lease;
    let mut was_leader = false;
    let mut was_confirmed = false;
    let mut last_accrual = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(HOUSEKEEPING_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        let (is_leader, term) = {
            let st = ctx.raft.status().borrow().clone();
            (st.is_leader, st.term)
        };
        // Leases are judged only under a leadership a quorum confirmed
        // lately: a leader that stalled (SIGSTOP, a frozen VM, a disk that
        // hung) wakes with stale leases and may have been deposed meanwhile.
        let confirmed = is_leader && ctx.leadership_confirmed(term);
        if confirmed && !was_confirmed {
            // A new leader, or one confirmed again after a stall: every
            // node gets a full lease before it is judged (agents were
            // unacknowledged meanwhile).
            let state_nodes: Vec<String> = ctx.raft.state().nodes.keys().cloned().collect();
            for n in state_nodes {
                ctx.touch(&n);
            }
        }
        was_confirmed = confirmed;
        if was_leader && !is_leader {
            // Leader memory is not state: a deposed leader keeps no stale
            // verdicts or leases to answer with (followers ask the leader).
            ctx.verdicts
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            ctx.leases.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        was_leader = is_leader;
        if !is_leader {
            continue;
        }
        let sched = &ctx.cfg.scheduling;
        if last_accrual.elapsed() >= sched.usage_interval {
            last_accrual = Instant::now();
            let cmd = Command::AccrueUsage {
                at_ms: now_ms(),
                half_life_secs: sched.fair_share_half_life.as_secs().max(1),
            };
            if let Err(e) = ctx.raft.propose_as_leader(cmd).await {
                tracing::debug!("usage accrual not applied: {e}");
            }
        }
        if !confirmed {
            continue;
        }
        for cmd in due_commands(&ctx, lease) {
            if let Err(e) = ctx.raft.propose_as_leader(cmd).await {
                tracing::debug!("housekeeping command not applied: {e}");
            }
        }
    }
}

fn due_commands(ctx: &Ctx, lease: Duration) -> Vec<Command> {
    let now = now_ms();
    let state = ctx.raft.state();
    let leases = ctx.leases.lock().unwrap_or_else(|p| p.into_inner());
    let mut cmds = Vec::new();
    for node in state.nodes.values().filter(|n| n.state == NodeState::Ready) {
        let expired = leases
            .get(&node.name)
            .is_none_or(|t| Instant::now().duration_since(*t) > lease);
        if expired {
            tracing::warn!(node = %node.name, "agent lease expired; marking the node lost");
            cmds.push(Command::NodeLost {
                name: node.name.clone(),
                at_ms: now,
            });
        }
    }
    for job in state.jobs.values().filter(|j| j.state == JobState::Running) {
        // Saturating, and the same deadline `apply` checks: a huge limit
        // never looks past (a wrapped sum proposed a refused time-out
        // every pass).
        if job.deadline_ms().is_some_and(|d| now >= d) {
            cmds.push(Command::TimeOut {
                job: job.id,
                at_ms: now,
            });
        }
    }
    cmds
}
