//! The scheduler's gRPC services, and the only place where protobuf messages
//! meet the domain model ([`convert`]).
//!
//! * [`client`] serves the `Muster` client API: every write becomes a
//!   [`crate::state::Command`] proposed through Raft and is answered once
//!   applied; a rejected command maps to `InvalidArgument`/`NotFound` with the
//!   state machine's own words.
//! * [`agent`] serves `AgentApi.Session`, one bidirectional stream per agent:
//!   registration, heartbeats (kept as in-memory leases, not log entries) and
//!   task events in; the node's full desired task set out, re-sent whenever
//!   it changes. Agents reconcile against that set.
//! * [`security`] serves tokens and the audit trail. Every service first
//!   authenticates its caller ([`crate::auth`]); client writes are proposed
//!   as `Command::Authorized` through [`Ctx::authorized`].

// tonic's handlers return `Result<_, Status>`; boxing `Status` in our helpers
// would only be undone at the trait boundary.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod agent;
pub mod client;
pub mod convert;
pub mod leader_view;
pub mod limits;
pub mod logs;
pub mod peer;
pub mod security;
pub mod tenants;

#[cfg(test)]
mod fuzz_tests;

use crate::config::SchedulerConfig;
use crate::model::JobId;
use crate::raft::{ProposeError, RaftHandle};
use crate::state::{ApplyResult, AuditEntry, Command, Principal};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tonic::Status;

/// What the services and leader loops share.
pub struct Ctx {
    pub raft: RaftHandle,
    pub cfg: SchedulerConfig,
    /// The planner's latest word on each pending job.
    pub verdicts: RwLock<BTreeMap<JobId, crate::planner::Verdict>>,
    /// Agent leases: node → last heard from (leader memory only).
    pub leases: Mutex<HashMap<String, Instant>>,
    /// Authentication, the submission rate limit and the audit queue.
    pub auth: crate::auth::Auth,
    /// When a quorum last confirmed this node's leadership: the term and
    /// the time the confirming read was asked (leader memory only; see
    /// [`Ctx::leadership_confirmed`]).
    pub confirmed: Mutex<Option<(u64, Instant)>>,
    /// A channel to the leader, for asking it what only it knows
    /// ([`leader_view`]).
    pub leader_channel: Mutex<Option<(String, tonic::transport::Channel)>>,
}

impl Ctx {
    /// Shared context for the services.
    pub fn new(raft: RaftHandle, cfg: SchedulerConfig) -> Arc<Ctx> {
        Arc::new(Ctx {
            auth: crate::auth::Auth::new(&cfg),
            raft,
            cfg,
            verdicts: RwLock::new(BTreeMap::new()),
            leases: Mutex::new(HashMap::new()),
            confirmed: Mutex::new(None),
            leader_channel: Mutex::new(None),
        })
    }

    /// Whether this node may still act as the leader of `term` towards
    /// agents (renew their leases). A quorum confirmed it by answering a
    /// read asked at time T; with check-quorum, those members refuse to
    /// elect anyone else until an election timeout after they heard from
    /// us (after T). So the answer is yes until T + the election timeout,
    /// less a tick for clock granularity. A stalled or deposed leader stops
    /// renewing leases within that window, before a new leader can judge
    /// the nodes lost.
    pub fn leadership_confirmed(&self, term: u64) -> bool {
        let window = self
            .cfg
            .raft_tick
            .saturating_mul(self.cfg.election_ticks.saturating_sub(1) as u32);
        let confirmed = *self.confirmed.lock().unwrap_or_else(|p| p.into_inner());
        confirmed_within(confirmed, term, window, Instant::now())
    }

    /// Propose and map failures to gRPC statuses.
    pub async fn propose(&self, cmd: Command) -> Result<ApplyResult, Status> {
        match self.raft.propose(cmd).await {
            Ok(ApplyResult::Rejected(msg)) => Err(Status::invalid_argument(msg)),
            Ok(ApplyResult::NotFound(msg)) => Err(Status::not_found(msg)),
            Ok(ApplyResult::Denied(msg)) => Err(Status::permission_denied(msg)),
            Ok(r) => Ok(r),
            Err(e) => Err(propose_status(&e)),
        }
    }

    /// Who is calling (see [`crate::auth`]); `action` names the request for
    /// the audit trail if the caller cannot be authenticated.
    pub fn authenticate<T>(
        &self,
        req: &tonic::Request<T>,
        action: &str,
    ) -> Result<Principal, Status> {
        let state = self.raft.state();
        self.auth.authenticate(&state, req, action)
    }

    /// Check `who`'s right to `cmd` here, take a token from `who`'s write
    /// rate limit, then propose it wrapped in `Command::Authorized` (checked
    /// again and audited at apply). A denial or a refusal here is audited too.
    pub async fn authorized(&self, who: &Principal, cmd: Command) -> Result<ApplyResult, Status> {
        self.authorize(who, &cmd, true)?;
        self.propose_authorized(who, cmd).await
    }

    /// [`Ctx::authorized`] for the second command of one request (a tenant's
    /// admins after the tenant): the request already paid its token.
    pub async fn authorized_again(
        &self,
        who: &Principal,
        cmd: Command,
    ) -> Result<ApplyResult, Status> {
        self.authorize(who, &cmd, false)?;
        self.propose_authorized(who, cmd).await
    }

    /// Roles, then (with `limit`) the rate limit; each refusal audited.
    fn authorize(&self, who: &Principal, cmd: &Command, limit: bool) -> Result<(), Status> {
        let at_ms = now_ms();
        let denied = crate::auth::roles::check(&self.raft.state(), who, cmd).err();
        if let Some(d) = denied {
            self.auth
                .audit(AuditEntry::of(who, at_ms, cmd, format!("denied: {d}")));
            return Err(Status::permission_denied(d));
        }
        if limit {
            self.auth.rate_limit(who).inspect_err(|s| {
                let outcome = format!("rejected: {}", s.message());
                self.auth.audit(AuditEntry::of(who, at_ms, cmd, outcome))
            })?;
        }
        Ok(())
    }

    async fn propose_authorized(
        &self,
        who: &Principal,
        cmd: Command,
    ) -> Result<ApplyResult, Status> {
        let at_ms = now_ms();
        self.propose(Command::Authorized {
            who: who.clone(),
            at_ms,
            cmd: Box::new(cmd),
        })
        .await
    }

    /// Make a read linearizable: wait until this node has applied everything
    /// committed before the request arrived (Raft ReadIndex, confirmed by the
    /// leader's quorum). A request with `muster-read: stale` skips this and
    /// reads this node's state as it is.
    pub async fn linearize<T>(&self, req: &tonic::Request<T>) -> Result<(), Status> {
        if req
            .metadata()
            .get(STALE_READ_HEADER)
            .is_some_and(|v| v == "stale")
        {
            return Ok(());
        }
        self.raft
            .read_barrier()
            .await
            .map_err(|e| Status::unavailable(format!("cannot serve an up-to-date read: {e}")))
    }

    /// Record that an agent was heard from.
    pub fn touch(&self, node: &str) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.insert(node.to_string(), Instant::now());
    }
}

/// Request header asking for a stale (local, unconfirmed) read.
pub const STALE_READ_HEADER: &str = "muster-read";

/// Milliseconds since the Unix epoch (stamped into commands by the leader).
pub use muster_proto::daemon::now_ms;

/// Whether a confirmation (term, time its read was asked) still covers
/// `term` at `now`, given the followers' election timeout `window`.
fn confirmed_within(
    confirmed: Option<(u64, Instant)>,
    term: u64,
    window: std::time::Duration,
    now: Instant,
) -> bool {
    confirmed.is_some_and(|(t, at)| t == term && now.saturating_duration_since(at) < window)
}

/// A proposal that failed, as the caller must understand it: `Unavailable`
/// when it was never appended (no leader, the driver stopped: safe to send
/// again), `Unknown` with a message beginning "outcome unknown" when it may
/// still be applied (appended by a leader that then lost leadership, not
/// committed in time, the forward to the leader broke: retry only with the
/// same idempotency key), `FailedPrecondition` for a membership change while
/// another is in progress.
pub fn propose_status(e: &ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { .. } | ProposeError::Stopped | ProposeError::Raft(_) => {
            Status::unavailable(e.to_string())
        }
        ProposeError::ChangeInProgress => Status::failed_precondition(e.to_string()),
        ProposeError::OutcomeUnknown(_) => Status::unknown(e.to_string()),
        ProposeError::Timeout(_) | ProposeError::Forward { .. } => Status::unknown(format!(
            "{}: {e}; it may still be applied: retry with the same idempotency key",
            crate::raft::OUTCOME_UNKNOWN
        )),
    }
}

#[cfg(test)]
mod propose_status_tests {
    use super::*;
    use std::time::Duration;
    use tonic::Code;

    #[test]
    fn leases_are_renewed_only_inside_a_confirmed_window_of_the_same_term() {
        let t0 = Instant::now();
        let w = Duration::from_millis(900);
        assert!(!confirmed_within(None, 3, w, t0), "never confirmed");
        assert!(confirmed_within(
            Some((3, t0)),
            3,
            w,
            t0 + Duration::from_millis(899)
        ));
        assert!(
            !confirmed_within(Some((3, t0)), 3, w, t0 + w),
            "window over"
        );
        assert!(!confirmed_within(Some((2, t0)), 3, w, t0), "an older term");
    }

    #[test]
    fn the_caller_is_told_whether_a_write_may_have_happened() {
        let never = propose_status(&ProposeError::NotLeader { leader: None });
        assert_eq!(never.code(), Code::Unavailable);
        for maybe in [
            ProposeError::OutcomeUnknown("leader changed".into()),
            ProposeError::Timeout(std::time::Duration::from_secs(5)),
            ProposeError::Forward {
                leader: 2,
                message: "reset".into(),
            },
        ] {
            let s = propose_status(&maybe);
            assert_eq!(s.code(), Code::Unknown, "{maybe}");
            assert!(
                s.message().starts_with("outcome unknown"),
                "{}",
                s.message()
            );
        }
        let busy = propose_status(&ProposeError::ChangeInProgress);
        assert_eq!(busy.code(), Code::FailedPrecondition);
    }
}
