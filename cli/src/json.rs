//! The `--json` output shapes.
//!
//! These structs are the CLI's stable machine-readable contract; they are
//! built from the wire messages here and nowhere else, so a protocol change
//! does not silently change what scripts read. Conventions: states are the
//! lowercase names the tables print (`timed-out`), times are Unix
//! milliseconds (`null` when unset), sizes are bytes, CPUs are milli-CPUs,
//! "unlimited"/"none" values are `null`. Every list is wrapped in an object
//! (`{"jobs": [...]}`) so fields can be added later.

use std::collections::BTreeMap;

use muster_proto::{GpuInfo, JobInfo, JobSpec, NodeInfo, StatusResponse, TaskInfo, TenantInfo};
use serde::Serialize;

use crate::output::{job_state_name, signal_name, task_state_name};

/// `muster submit --json`.
#[derive(Debug, Serialize)]
pub struct Submitted {
    pub id: u64,
    /// Jobs created: 1, or the size of a job array (ids `id..id+count`).
    pub count: u32,
}

/// `muster cancel --json`.
#[derive(Debug, Serialize)]
pub struct Cancelled {
    pub id: u64,
    pub state: String,
}

/// `muster queue --json`.
#[derive(Debug, Serialize)]
pub struct Jobs {
    pub jobs: Vec<Job>,
}

/// One job (`muster show --json` prints this alone).
#[derive(Debug, Serialize)]
pub struct Job {
    pub id: u64,
    pub user: String,
    pub state: String,
    pub reason: Option<String>,
    pub restart_count: u32,
    pub queue_position: Option<u32>,
    pub submitted_at_ms: Option<i64>,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    pub spec: Spec,
    pub tasks: Vec<Task>,
    /// The last checkpoint reported; `null` when none.
    pub checkpoint: Option<Checkpoint>,
    /// Restarts used up by task failures (of `spec.max_restarts`).
    pub failures: u32,
    /// The effective stop signal (number and name) and grace in seconds.
    pub stop_signal: i32,
    pub stop_signal_name: String,
    pub grace_secs: u64,
    /// Another user's job, shown as a summary: command, environment,
    /// folders and agent addresses are left out.
    pub redacted: bool,
}

/// A reported checkpoint.
#[derive(Debug, Serialize)]
pub struct Checkpoint {
    pub at_ms: i64,
    pub step: Option<u64>,
    pub task: u32,
}

/// What was asked for.
#[derive(Debug, Serialize)]
pub struct Spec {
    pub name: String,
    pub tenant: String,
    pub tasks: u32,
    pub gpus_per_task: u32,
    pub cpu_millis_per_task: u32,
    pub memory_bytes_per_task: u64,
    pub time_limit_secs: Option<u64>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    /// As the tasks get it (`MUSTER_CHECKPOINT_DIR`): the job's own, or the
    /// scheduler's `<checkpoint_root>/<id>`; `null` for another user's job.
    pub checkpoint_dir: Option<String>,
    /// As asked (`null`: the default).
    pub signal: Option<i32>,
    pub grace_secs: Option<u64>,
    pub checkpoint_on_preempt: bool,
    pub max_restarts: u32,
}

/// One task of a job.
#[derive(Debug, Serialize)]
pub struct Task {
    pub index: u32,
    pub node: Option<String>,
    pub gpus: Vec<u32>,
    pub state: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub signal_name: Option<String>,
    pub oom_killed: bool,
    pub message: Option<String>,
    pub agent_address: Option<String>,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
}

/// `muster nodes --json`.
#[derive(Debug, Serialize)]
pub struct Nodes {
    pub nodes: Vec<Node>,
}

/// One node.
#[derive(Debug, Serialize)]
pub struct Node {
    pub name: String,
    pub address: String,
    pub state: String,
    pub cpu_millis: u32,
    pub cpu_millis_allocated: u32,
    pub memory_bytes: u64,
    pub memory_bytes_allocated: u64,
    pub labels: BTreeMap<String, String>,
    pub last_seen_ms: Option<i64>,
    pub gpus: Vec<Gpu>,
    /// Why the node is drained (`state` is then `draining` or `drained`).
    pub drain_reason: Option<String>,
}

/// One GPU of a node.
#[derive(Debug, Serialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_bytes: u64,
    pub minor: u32,
    pub pci_bus_id: String,
    pub numa_node: i32,
    pub healthy: bool,
    /// Job holding the GPU; `null` when free.
    pub allocated_to: Option<u64>,
    /// Why the scheduler marked it unhealthy (XID, ECC, lost).
    pub fault: Option<String>,
}

/// `muster status --json`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub address: String,
    pub node_id: u64,
    /// `null` when there is no leader.
    pub leader_id: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub nodes: u32,
    pub jobs_pending: u32,
    pub jobs_running: u32,
}

/// `muster tenant list --json`.
#[derive(Debug, Serialize)]
pub struct Tenants {
    pub tenants: Vec<Tenant>,
}

/// One tenant (`muster tenant create --json` prints this alone).
#[derive(Debug, Serialize)]
pub struct Tenant {
    pub name: String,
    /// `null` means unlimited.
    pub gpu_limit: Option<u32>,
    /// Of the tenant and its children.
    pub gpus_in_use: u32,
    pub guarantee_gpus: u32,
    /// Milli-CPUs; `null` means unlimited.
    pub cpu_limit_millis: Option<u64>,
    /// Bytes; `null` means unlimited.
    pub memory_limit_bytes: Option<u64>,
    pub weight: u32,
    /// Empty: anyone may submit.
    pub members: Vec<String>,
    pub default_for: Vec<String>,
    pub cpu_millis_in_use: u64,
    pub memory_bytes_in_use: u64,
    pub gpus_borrowed: u32,
    /// Decayed GPU-seconds of its own jobs.
    pub fair_share_usage: f64,
    pub jobs_pending: u32,
    pub jobs_running: u32,
    /// Tenant admins of this tenant (rights over its subtree).
    pub admins: Vec<String>,
    /// E.g. a guarantee larger than the whole cluster; `null` when none.
    pub warning: Option<String>,
}

/// A chunk of `muster logs --json`, one JSON object per line.
#[derive(Debug, Serialize)]
pub struct LogLine<'a> {
    pub task: u32,
    pub stream: &'a str,
    pub data: String,
}

fn some_str(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn some_ms(ms: i64) -> Option<i64> {
    (ms > 0).then_some(ms)
}

fn nonzero<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}

impl From<&JobInfo> for Job {
    fn from(j: &JobInfo) -> Self {
        Job {
            id: j.id,
            user: j.user.clone(),
            state: job_state_name(j.state),
            reason: some_str(&j.reason),
            restart_count: j.restart_count,
            queue_position: nonzero(j.queue_position),
            submitted_at_ms: some_ms(j.submitted_at_ms),
            started_at_ms: some_ms(j.started_at_ms),
            ended_at_ms: some_ms(j.ended_at_ms),
            spec: j
                .spec
                .as_ref()
                .map_or_else(|| Spec::from(&JobSpec::default()), Spec::from),
            tasks: j.tasks.iter().map(Task::from).collect(),
            checkpoint: (j.checkpoint_at_ms > 0).then_some(Checkpoint {
                at_ms: j.checkpoint_at_ms,
                step: j.checkpoint_step,
                task: j.checkpoint_task,
            }),
            failures: j.failures,
            stop_signal: j.stop_signal,
            stop_signal_name: signal_name(j.stop_signal),
            grace_secs: j.grace_secs,
            redacted: j.redacted,
        }
    }
}

impl From<&JobSpec> for Spec {
    fn from(s: &JobSpec) -> Self {
        Spec {
            name: s.name.clone(),
            tenant: s.tenant.clone(),
            tasks: s.tasks,
            gpus_per_task: s.gpus_per_task,
            cpu_millis_per_task: s.cpu_millis_per_task,
            memory_bytes_per_task: s.memory_bytes_per_task,
            time_limit_secs: nonzero(s.time_limit_secs),
            command: s.command.clone(),
            env: s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            workdir: s.workdir.clone(),
            checkpoint_dir: some_str(&s.checkpoint_dir),
            signal: nonzero(s.stop_signal),
            grace_secs: s.grace_secs,
            checkpoint_on_preempt: s.checkpoint_on_preempt,
            max_restarts: s.max_restarts,
        }
    }
}

impl From<&TaskInfo> for Task {
    fn from(t: &TaskInfo) -> Self {
        Task {
            index: t.index,
            node: some_str(&t.node),
            gpus: t.gpus.clone(),
            state: task_state_name(t.state),
            exit_code: t.exit_code,
            signal: t.signal,
            signal_name: t.signal.map(signal_name),
            oom_killed: t.oom_killed,
            message: some_str(&t.message),
            agent_address: some_str(&t.agent_address),
            started_at_ms: some_ms(t.started_at_ms),
            ended_at_ms: some_ms(t.ended_at_ms),
        }
    }
}

impl From<&NodeInfo> for Node {
    fn from(n: &NodeInfo) -> Self {
        Node {
            name: n.name.clone(),
            address: n.address.clone(),
            state: crate::output::node_state(n),
            cpu_millis: n.cpu_millis,
            cpu_millis_allocated: n.cpu_millis_allocated,
            memory_bytes: n.memory_bytes,
            memory_bytes_allocated: n.memory_bytes_allocated,
            labels: n
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            last_seen_ms: some_ms(n.last_seen_ms),
            gpus: n.gpus.iter().map(Gpu::from).collect(),
            drain_reason: some_str(&n.drain_reason),
        }
    }
}

impl From<&GpuInfo> for Gpu {
    fn from(g: &GpuInfo) -> Self {
        Gpu {
            index: g.index,
            uuid: g.uuid.clone(),
            model: g.model.clone(),
            memory_bytes: g.memory_bytes,
            minor: g.minor,
            pci_bus_id: g.pci_bus_id.clone(),
            numa_node: g.numa_node,
            healthy: g.healthy,
            allocated_to: nonzero(g.allocated_to),
            fault: some_str(&g.fault),
        }
    }
}

impl Status {
    /// The status of the scheduler at `address`.
    pub fn new(address: &str, s: &StatusResponse) -> Self {
        Status {
            address: address.to_string(),
            node_id: s.node_id,
            leader_id: nonzero(s.leader_id),
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            nodes: s.nodes,
            jobs_pending: s.jobs_pending,
            jobs_running: s.jobs_running,
        }
    }
}

impl From<&TenantInfo> for Tenant {
    fn from(t: &TenantInfo) -> Self {
        Tenant {
            name: t.name.clone(),
            gpu_limit: nonzero(t.gpu_limit),
            gpus_in_use: t.gpus_in_use,
            guarantee_gpus: t.guarantee_gpus,
            cpu_limit_millis: (t.cpu_limit_millis > 0).then_some(t.cpu_limit_millis),
            memory_limit_bytes: (t.memory_limit_bytes > 0).then_some(t.memory_limit_bytes),
            weight: t.weight,
            members: t.members.clone(),
            default_for: t.default_for.clone(),
            cpu_millis_in_use: t.cpu_millis_in_use,
            memory_bytes_in_use: t.memory_bytes_in_use,
            gpus_borrowed: t.gpus_borrowed,
            fair_share_usage: t.fair_share_usage,
            jobs_pending: t.jobs_pending,
            jobs_running: t.jobs_running,
            admins: t.admins.clone(),
            warning: some_str(&t.warning),
        }
    }
}

/// Prints a value as pretty JSON on stdout.
pub fn print<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::JobState;

    #[test]
    fn job_json_uses_names_and_nulls() {
        let info = JobInfo {
            id: 7,
            state: JobState::Failed as i32,
            spec: Some(JobSpec {
                name: "t".into(),
                tasks: 1,
                ..JobSpec::default()
            }),
            tasks: vec![TaskInfo {
                signal: Some(9),
                oom_killed: true,
                ..TaskInfo::default()
            }],
            ..JobInfo::default()
        };
        let value = serde_json::to_value(Job::from(&info)).expect("serializable");
        assert_eq!(value["id"], 7);
        assert_eq!(value["state"], "failed");
        assert_eq!(value["reason"], serde_json::Value::Null);
        assert_eq!(value["spec"]["time_limit_secs"], serde_json::Value::Null);
        assert_eq!(value["tasks"][0]["signal_name"], "SIGKILL");
        assert_eq!(value["tasks"][0]["oom_killed"], true);
    }

    #[test]
    fn unlimited_tenant_is_null() {
        let t = TenantInfo {
            name: "a".into(),
            gpu_limit: 0,
            gpus_in_use: 2,
            weight: 1,
            ..TenantInfo::default()
        };
        let value = serde_json::to_value(Tenant::from(&t)).expect("serializable");
        assert_eq!(value["gpu_limit"], serde_json::Value::Null);
        assert_eq!(value["cpu_limit_millis"], serde_json::Value::Null);
        assert_eq!(value["gpus_in_use"], 2);
    }
}
