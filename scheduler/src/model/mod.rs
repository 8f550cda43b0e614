//! The domain model: what the replicated state is made of.
//!
//! Everything here is plain data (serde-serializable, `Clone`, ordered maps) so
//! that the state machine in [`crate::state`] can apply commands
//! deterministically and snapshot the whole state with one `bincode` call.
//! Nothing here knows about gRPC (conversion lives in [`crate::api`]) or about
//! time (the leader stamps times into commands before proposing them).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A job's id, assigned by the state machine at apply time (1, 2, 3, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An allocation's id. A job gets a new allocation each time it is placed, so
/// an order about an old allocation can never touch a newer run of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AllocId(pub u64);

/// What one task of a gang asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// Whole GPUs.
    pub gpus: u32,
    /// CPUs in thousandths of a CPU.
    pub cpu_millis: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// A job as the user described it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub tenant: String,
    /// Number of tasks in the gang; all are placed or none.
    pub tasks: u32,
    pub per_task: Resources,
    /// Wall-clock limit in seconds, counted from the start of the job.
    pub time_limit_secs: Option<u64>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    /// Explicit checkpoint directory; `None` means `<checkpoint_root>/<job id>`.
    pub checkpoint_dir: Option<String>,
    /// Priority class name (scheduler config); empty means the default class.
    pub priority: String,
    /// Keep the gang's nodes under one value of a node label (block, rack, switch).
    pub topology: Option<TopologySpec>,
    /// How the job is stopped and restarted.
    pub lifecycle: Lifecycle,
}

/// How a job is stopped (preemption, time limit, cancel, a failed gang
/// member) and whether it is restarted after a failure.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Lifecycle {
    /// Signal sent first; `None` is SIGTERM. Never SIGKILL or SIGSTOP.
    pub stop_signal: Option<i32>,
    /// Seconds between that signal and SIGKILL to the task's whole cgroup;
    /// `None` is the cluster's `default_grace`. Capped by `max_grace`.
    pub grace_secs: Option<u64>,
    /// On preemption, wait (up to the grace) for the job to report a
    /// checkpoint, then kill it at once instead of waiting for it to exit.
    pub checkpoint_on_preempt: bool,
    /// How many times the whole gang is restarted after a task fails.
    pub max_restarts: u32,
}

/// The last checkpoint a job reported (`muster checkpoint done`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub at_ms: i64,
    /// The step the job says it reached, if it said.
    pub step: Option<u64>,
    /// The task that reported it.
    pub task: u32,
}

/// A job's request to keep its nodes together under one node-label value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologySpec {
    /// The node label, e.g. `block`, `rack` or `switch`.
    pub label: String,
    /// `true`: the gang waits rather than span label values; `false`: only preferred.
    pub required: bool,
}

/// The lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Placed,
    Running,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
    /// Chosen as a preemption victim: its tasks are being stopped, and the
    /// job goes back to pending (restart count + 1) once they have exited.
    Preempting,
    /// Being restarted: a task failed with restarts left (`max_restarts`), or
    /// the infrastructure failed it (node lost, GPU fault). Its other tasks
    /// are being stopped; then it is pending again (restart count + 1).
    Requeued,
}

impl JobState {
    /// Completed, failed, cancelled or timed out: the job will not run again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }

    /// Preempting or requeued: its tasks are being stopped so that it can
    /// run again.
    pub fn is_stopping(self) -> bool {
        matches!(self, JobState::Preempting | JobState::Requeued)
    }

    /// The lower-case name users see.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Placed => "placed",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed-out",
            JobState::Preempting => "preempting",
            JobState::Requeued => "requeued",
        }
    }
}

/// The lifecycle of one task of an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Ordered onto a node; the agent has not reported a start yet.
    Assigned,
    Running,
    Exited,
    /// The node lost the task (node lost, or restarted without it).
    Lost,
}

impl TaskState {
    /// Whether the task may still hold its node's resources.
    pub fn holds_resources(self) -> bool {
        matches!(self, TaskState::Assigned | TaskState::Running)
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub message: String,
}

impl ExitInfo {
    /// Exit code 0 and no signal.
    pub fn success(&self) -> bool {
        self.code == Some(0) && self.signal.is_none() && !self.oom_killed
    }

    /// A short human description: "exit code 3", "OOM-killed", "signal 9".
    pub fn describe(&self) -> String {
        if self.oom_killed {
            return "OOM-killed".to_string();
        }
        match (self.code, self.signal) {
            (_, Some(sig)) => format!("killed by signal {sig}"),
            (Some(code), None) => format!("exit code {code}"),
            (None, None) if !self.message.is_empty() => self.message.clone(),
            (None, None) => "unknown exit".to_string(),
        }
    }
}

/// Where one task of a gang runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPlacement {
    pub node: String,
    /// Node-local GPU indices.
    pub gpus: Vec<u32>,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
}

/// The runtime status of one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub placement: TaskPlacement,
    pub state: TaskState,
    pub exit: Option<ExitInfo>,
    pub started_at_ms: i64,
    pub ended_at_ms: i64,
}

/// A placed gang: one allocation per run of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub id: AllocId,
    /// Raft term of the leader whose plan created it (fencing).
    pub term: u64,
    pub placed_at_ms: i64,
    /// Port for `MASTER_PORT` on the rank-0 node.
    pub master_port: u16,
    pub tasks: Vec<TaskStatus>,
    /// Placed (partly) beyond its tenant's guarantee: first to be reclaimed.
    pub borrowed: bool,
}

/// A job and everything the cluster knows about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub user: String,
    pub state: JobState,
    pub submitted_at_ms: i64,
    pub started_at_ms: i64,
    pub ended_at_ms: i64,
    /// Why the job ended as it did (failed, cancelled, ...).
    pub reason: String,
    pub restart_count: u32,
    pub alloc: Option<Allocation>,
    /// While preempting: the job it makes room for.
    pub preempted_for: Option<JobId>,
    /// The last checkpoint any of its tasks reported (kept across restarts).
    pub last_checkpoint: Option<Checkpoint>,
    /// Restarts used up by task failures (infrastructure requeues and
    /// preemptions do not count); at most `lifecycle.max_restarts`.
    pub failures: u32,
}

impl Job {
    /// GPUs the whole gang asks for.
    pub fn total_gpus(&self) -> u32 {
        self.spec.tasks.saturating_mul(self.spec.per_task.gpus)
    }

    /// When the job's time limit runs out (ms), if it has one: the one
    /// definition the leader (to propose a time-out) and `apply` (to accept
    /// it) share, so they cannot disagree.
    pub fn deadline_ms(&self) -> Option<i64> {
        let limit = self.spec.time_limit_secs?;
        Some(self.started_at_ms.saturating_add(limit_ms(limit)))
    }
}

/// The longest time limit any job may have, whatever the configuration
/// says (about a century): far inside what millisecond times can hold.
pub const MAX_TIME_LIMIT_SECS: u64 = 100 * 365 * 24 * 3600;

/// A time limit in milliseconds, saturating (never wrapping to the past,
/// however large the limit a spec or an old log entry carries).
pub fn limit_ms(limit_secs: u64) -> i64 {
    i64::try_from(limit_secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000)
}

/// Check a job's time limit against `max_secs` (the configured
/// `limits.max_time_limit`, itself at most [`MAX_TIME_LIMIT_SECS`]).
/// The error names the field, `time`.
pub fn check_time_limit(spec: &JobSpec, max_secs: u64) -> Result<(), String> {
    let max = max_secs.min(MAX_TIME_LIMIT_SECS);
    match spec.time_limit_secs {
        Some(0) => Err("time: the time limit must be greater than 0".into()),
        Some(t) if t > max => Err(format!(
            "time: a time limit of {t}s is longer than the cluster's maximum of {max}s"
        )),
        _ => Ok(()),
    }
}

/// One GPU as the scheduler knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_bytes: u64,
    pub minor: u32,
    pub pci_bus_id: String,
    pub numa_node: i32,
    /// Whether the agent's latest registration reports the GPU healthy.
    /// Only the agent changes it; `muster node resume` never does.
    pub healthy: bool,
    /// A fault the scheduler recorded (an XID, an ECC error, lost from the
    /// bus, reported as an event): kept across agent restarts until
    /// `muster node resume` clears it. Empty when there is none.
    pub fault: String,
    /// GPUs of one node with the same group share the closest interconnect
    /// the agent found (an NVLink island, else a PCIe switch, else a NUMA
    /// node); the planner keeps a task's GPUs in one group when it can.
    pub link_group: u32,
}

impl GpuRecord {
    /// Whether work may be placed on it: the agent reports it healthy and
    /// no fault is recorded. Admin state (resume) and the agent's report
    /// are kept apart, so resuming never marks healthy a GPU the agent
    /// still reports unhealthy.
    pub fn usable(&self) -> bool {
        self.healthy && self.fault.is_empty()
    }
}

/// Whether a node takes work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Ready,
    /// Its lease expired; its tasks were lost.
    Lost,
}

impl NodeState {
    /// The lower-case name users see.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Lost => "lost",
        }
    }
}

/// A GPU host running an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// host:port of the agent's local service (logs).
    pub address: String,
    pub gpus: Vec<GpuRecord>,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    pub state: NodeState,
    pub registered_at_ms: i64,
    /// Set by `muster node drain` (the reason): running work finishes,
    /// nothing new is placed. Cleared by `muster node resume`.
    pub drain: Option<String>,
    /// The key the agent verifies log tickets with (sent at registration,
    /// new on every agent start); never shown by any API.
    pub log_key: Vec<u8>,
}

impl Node {
    /// Whether new work may be placed here.
    pub fn schedulable(&self) -> bool {
        self.state == NodeState::Ready && self.drain.is_none()
    }
}

/// A tenant: who jobs are charged to. Tenants form a tree by name
/// (`org/team/...`); limits hold on every ancestor, guarantees add up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    /// GPUs the tenant may always have back, reclaiming borrowed ones.
    pub guarantee_gpus: u32,
    /// Most GPUs the tenant's (and its children's) jobs may hold, borrowing
    /// included; `None` is unlimited.
    pub gpu_limit: Option<u32>,
    /// Most CPUs (millis) the subtree may hold; `None` is unlimited.
    pub cpu_limit_millis: Option<u64>,
    /// Most memory (bytes) the subtree may hold; `None` is unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// Fair-share weight among its siblings (at least 1).
    pub weight: u32,
    /// Users who may submit to it; empty means anyone.
    pub members: std::collections::BTreeSet<String>,
}

impl Tenant {
    /// A tenant with no guarantee, no limits, weight 1 and no member list.
    pub fn open(name: &str) -> Tenant {
        Tenant {
            name: name.to_string(),
            guarantee_gpus: 0,
            gpu_limit: None,
            cpu_limit_millis: None,
            memory_limit_bytes: None,
            weight: 1,
            members: Default::default(),
        }
    }

    /// The parent's name (`ml` for `ml/nlp`), if any.
    pub fn parent_of(name: &str) -> Option<&str> {
        name.rsplit_once('/').map(|(p, _)| p)
    }

    /// `name` and its ancestors, nearest first: `ml/nlp/x`, `ml/nlp`, `ml`.
    pub fn lineage(name: &str) -> impl Iterator<Item = &str> {
        std::iter::successors(Some(name), |n| Tenant::parent_of(n))
    }
}
