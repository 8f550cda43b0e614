//! The replicated state machine.
//!
//! Every change that must survive a crash is a [`Command`] in the Raft log, and
//! [`State::apply`] is the only way state changes. `apply` is deterministic: it
//! reads no clock, no randomness and no environment, and iterates only sorted
//! maps, so every replica that applies the same log reaches the same state
//! (the tests compare digests). The leader stamps times and the allocation's
//! term into a command before proposing it.
//!
//! A command that is not allowed (an unknown tenant, a stale plan, a cancel of
//! a finished job) is not an error: `apply` returns [`ApplyResult::Rejected`]
//! with the reason and leaves the state exactly as it was.
//!
//! Plans are re-checked here against the state they land on with the same fit
//! function the planner uses ([`crate::planner::fit`]), all or nothing per
//! gang, so a stale plan can never over-commit a GPU or a quota.
//!
//! The derived indexes (`pending`, `active`, `usage`, `tenant_use`) are kept
//! up to date incrementally, and must always equal what a restore from a
//! snapshot rebuilds: otherwise a restarted replica would accept a plan its
//! peers refuse. So a task gives its resources back in exactly one place
//! (`end_task`, which does nothing for a task that no longer holds them),
//! the indexes hold no empty entries, [`State::digest`] covers them, and
//! `random_tests.rs` checks the equality after every command of random logs.

mod apply;
mod decay;
mod lifecycle;
mod security;
mod tenants;
mod usage;

pub use apply::{array_element_name, validate_array, MAX_ARRAY};
pub use security::{is_change, AuditEntry, Principal, TokenRecord, MAX_AUDIT};
pub use tenants::{TenantPatch, TenantUse};
pub use usage::NodeUsage;

use crate::model::{ExitInfo, GpuRecord, Job, JobId, JobSpec, Node, TaskPlacement, Tenant};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The name of the tenant every cluster starts with.
pub const DEFAULT_TENANT: &str = "default";

/// A node as an agent registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub name: String,
    pub address: String,
    pub gpus: Vec<GpuRecord>,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// The agent's secret for log tickets (`muster_proto::ticket`); never
    /// shown by any API.
    pub log_key: Vec<u8>,
}

/// A task the agent says it still has (running, or exited but not yet reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskKey {
    pub job: JobId,
    pub alloc: u64,
    pub task: u32,
}

/// One gang of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub job: JobId,
    pub tasks: Vec<TaskPlacement>,
}

/// One preemption decided by the planner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreemptOrder {
    pub victim: JobId,
    /// The victim's allocation, so a stale order cannot stop a newer run.
    pub alloc: u64,
    /// The job the room is for.
    pub for_job: JobId,
    /// Why, in words (`higher priority`, `reclaiming guarantee of ml`).
    pub reason: String,
}

/// Everything that changes the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Submit {
        spec: JobSpec,
        user: String,
        at_ms: i64,
        /// The client's idempotency key: a retry returns the first job's id.
        request_id: Option<String>,
    },
    /// `count` identical jobs (a job array) in one entry; job `i` of the
    /// array gets `MUSTER_ARRAY_INDEX=i` and the name `name[i]`.
    SubmitArray {
        spec: JobSpec,
        user: String,
        at_ms: i64,
        request_id: Option<String>,
        count: u32,
    },
    Cancel {
        job: JobId,
        at_ms: i64,
    },
    CreateTenant {
        tenant: Box<Tenant>,
        /// Users whose default tenant becomes this one.
        default_for: Vec<String>,
    },
    UpdateTenant {
        name: String,
        patch: Box<TenantPatch>,
    },
    DeleteTenant {
        name: String,
    },
    /// Decay fair-share usage and charge live allocations up to `at_ms`.
    AccrueUsage {
        at_ms: i64,
        half_life_secs: u64,
    },
    /// Stop these jobs to make room for others; each goes back to pending
    /// once its tasks have exited.
    Preempt {
        orders: Vec<PreemptOrder>,
        at_ms: i64,
    },
    RegisterNode {
        node: NodeRegistration,
        /// Tasks the agent reports it still has; running tasks of this node
        /// that are missing here were lost.
        running: Vec<TaskKey>,
        at_ms: i64,
    },
    NodeLost {
        name: String,
        at_ms: i64,
    },
    ApplyPlan {
        term: u64,
        at_ms: i64,
        placements: Vec<Placement>,
    },
    TaskStarted {
        key: TaskKey,
        at_ms: i64,
    },
    TaskExited {
        key: TaskKey,
        exit: ExitInfo,
        at_ms: i64,
    },
    TimeOut {
        job: JobId,
        at_ms: i64,
    },
    /// A task reported a finished checkpoint through its agent (which
    /// vouches for which task is calling).
    TaskCheckpointed {
        key: TaskKey,
        step: Option<u64>,
        at_ms: i64,
    },
    /// An agent saw a GPU fail (a critical XID, a double-bit ECC error, lost
    /// from the bus): the GPU is marked unhealthy, the jobs on it are
    /// requeued without counting against their restarts, and with `drain`
    /// the node is drained.
    GpuFailed {
        node: String,
        gpu: u32,
        reason: String,
        drain: bool,
        at_ms: i64,
    },
    /// `muster node drain` (with a reason) or `muster node resume` (`None`,
    /// which also clears the GPU faults the scheduler recorded there).
    DrainNode {
        name: String,
        reason: Option<String>,
    },
    // ---- security (see `security.rs`)
    /// A client's request with the principal that made it: its rights are
    /// checked again here, and an audit entry records the outcome.
    Authorized {
        who: Principal,
        at_ms: i64,
        cmd: Box<Command>,
    },
    /// Requests refused before they reached the log, for the audit trail.
    Audit {
        entries: Vec<AuditEntry>,
    },
    IssueToken {
        token: TokenRecord,
    },
    RevokeToken {
        id: String,
    },
    /// Add and remove admins of a tenant.
    SetTenantAdmins {
        tenant: String,
        add: Vec<String>,
        remove: Vec<String>,
    },
}

impl Command {
    /// Serialize for the Raft log.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain owned data into a Vec cannot fail.
        bincode::serialize(self).unwrap_or_default()
    }

    /// Parse a Raft log entry.
    pub fn decode(data: &[u8]) -> Result<Command, bincode::Error> {
        bincode::deserialize(data)
    }
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyResult {
    /// The state changed (or the command was a harmless no-op).
    Applied,
    /// A job was accepted with this id.
    Submitted(JobId),
    /// A plan was applied: these jobs were placed, the others rejected.
    Planned {
        placed: Vec<JobId>,
        rejected: Vec<(JobId, String)>,
    },
    /// Not allowed; the state is unchanged.
    Rejected(String),
    /// The job does not exist; the state is unchanged.
    NotFound(String),
    /// The principal lacks a right; names it. The state is unchanged
    /// (but for the audit entry).
    Denied(String),
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub jobs: BTreeMap<JobId, Job>,
    pub nodes: BTreeMap<String, Node>,
    pub tenants: BTreeMap<String, Tenant>,
    pub next_job_id: u64,
    pub next_alloc_id: u64,
    /// User → the tenant their jobs go to when they name none.
    pub user_defaults: BTreeMap<String, String>,
    /// Tenant → decayed GPU-seconds of its own jobs, as of `usage_at_ms`.
    pub fair_usage: BTreeMap<String, f64>,
    pub usage_at_ms: i64,
    /// Idempotency keys of recent submissions → the job each created
    /// (bounded: the oldest keys are forgotten first, see `apply`).
    pub submit_keys: BTreeMap<String, JobId>,
    /// Order in which `submit_keys` were added, for bounded forgetting.
    pub submit_key_order: std::collections::VecDeque<String>,
    /// Scheduler members' addresses, from membership changes through the log.
    pub peers: BTreeMap<u64, String>,
    /// Security: issued tokens by id (hashes only).
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Security: tenant → its admins.
    pub tenant_admins: BTreeMap<String, BTreeSet<String>>,
    /// Security: the audit trail, oldest first (bounded, see `security.rs`).
    pub audit: std::collections::VecDeque<AuditEntry>,
    /// Derived: jobs waiting to be placed, in id (submission) order.
    #[serde(skip)]
    pub pending: BTreeSet<JobId>,
    /// Derived: jobs with an allocation that still holds resources.
    #[serde(skip)]
    pub active: BTreeSet<JobId>,
    /// Derived: what each node has handed out.
    #[serde(skip)]
    pub usage: BTreeMap<String, NodeUsage>,
    /// Derived: what each tenant's subtree holds (see [`TenantUse`]).
    #[serde(skip)]
    pub tenant_use: BTreeMap<String, TenantUse>,
}

impl State {
    /// A fresh cluster: the default tenant and nothing else.
    pub fn new() -> State {
        let mut s = State {
            next_job_id: 1,
            next_alloc_id: 1,
            ..State::default()
        };
        s.tenants
            .insert(DEFAULT_TENANT.to_string(), Tenant::open(DEFAULT_TENANT));
        s
    }

    /// Serialize the whole state for a Raft snapshot.
    pub fn to_snapshot(&self) -> Vec<u8> {
        bincode::serialize(self).unwrap_or_default()
    }

    /// Restore from a Raft snapshot, rebuilding the derived indexes.
    pub fn from_snapshot(data: &[u8]) -> Result<State, bincode::Error> {
        if data.is_empty() {
            return Ok(State::new());
        }
        let mut s: State = bincode::deserialize(data)?;
        s.rebuild_indexes();
        Ok(s)
    }

    /// Recompute `pending`, `active` and `usage` from the jobs.
    pub fn rebuild_indexes(&mut self) {
        self.pending.clear();
        self.active.clear();
        self.usage.clear();
        self.tenant_use.clear();
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            self.index_job(id);
        }
    }

    /// A stable digest of the whole state (for comparing replicas): the
    /// replicated part *and* the derived indexes as this replica keeps them,
    /// so a replica whose incremental bookkeeping drifted from what a
    /// restore would rebuild (the double release of issue 11 #1) shows a
    /// different digest from its peers. The indexes are canonical (no empty
    /// entries), so equal states give equal bytes.
    pub fn digest(&self) -> u64 {
        // FNV-1a over the canonical serialization: stable across processes.
        let derived =
            bincode::serialize(&(&self.pending, &self.active, &self.usage, &self.tenant_use))
                .unwrap_or_default();
        muster_proto::fnv::extend(
            muster_proto::fnv::OFFSET,
            self.to_snapshot().into_iter().chain(derived),
        )
    }

    /// GPUs held by the live allocations of the tenant and its children.
    pub fn tenant_gpus_in_use(&self, tenant: &str) -> u32 {
        self.tenant_use(tenant).gpus
    }

    /// Usage of one node (zero if nothing was ever placed there).
    pub fn node_usage(&self, node: &str) -> NodeUsage {
        self.usage.get(node).cloned().unwrap_or_default()
    }
}

/// GPUs still held by a job's tasks.
pub fn held_gpus(job: &Job) -> u32 {
    job.alloc
        .as_ref()
        .map(|a| {
            a.tasks
                .iter()
                .filter(|t| t.state.holds_resources())
                .map(|t| t.placement.gpus.len() as u32)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod random_tests;
#[cfg(test)]
pub(crate) mod tests;
