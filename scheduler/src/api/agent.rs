//! `AgentApi.Session`: one bidirectional stream per agent.
//!
//! The agent's first message must be `Register`; it becomes a `RegisterNode`
//! command (with the tasks the agent still has, so running work is adopted
//! rather than restarted). After that the stream carries heartbeats (leases in
//! memory) and task events (commands) in, and the node's full desired task set
//! out. The desired set is recomputed whenever the applied state changes and
//! sent only when it differs from what the agent last got.

use super::{convert, now_ms, Ctx};
use crate::model::{Job, JobState, Node};
use crate::state::{Command, State, TaskKey};
use muster_proto as pb;
use muster_proto::agent_api_server::AgentApi;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// The agent-facing service.
pub struct AgentService {
    ctx: Arc<Ctx>,
}

impl AgentService {
    /// A service over the shared context.
    pub fn new(ctx: Arc<Ctx>) -> AgentService {
        AgentService { ctx }
    }
}

type Out = Pin<Box<dyn Stream<Item = Result<pb::SchedulerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for AgentService {
    type SessionStream = Out;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Out>, Status> {
        let st = self.ctx.raft.status().borrow().clone();
        if !st.is_leader {
            // Leases live in the leader's memory: agents talk to the leader.
            return Err(not_leader(&self.ctx, st.leader));
        }
        let from = crate::auth::remote_of(&req);
        let caller = self.ctx.auth.daemon(&req, crate::auth::Daemon::Agent);
        let mut inbound = req.into_inner();
        let first = inbound
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("session closed before Register"))??;
        let Some(pb::agent_message::Kind::Register(reg)) = first.kind else {
            return Err(Status::invalid_argument(
                "the first message must be Register",
            ));
        };
        let (node, running) = convert::registration_from_pb(&reg)?;
        let name = node.name.clone();
        check_agent(&self.ctx, caller, &name, from.clone())?;
        self.ctx
            .propose(Command::RegisterNode {
                node,
                running,
                at_ms: now_ms(),
            })
            .await?;
        self.ctx.touch(&name);
        tracing::info!(node = %name, gpus = reg.gpus.len(), "agent registered");
        let (tx, rx) = mpsc::channel(16);
        let term = self.ctx.raft.status().borrow().term;
        let hb = self.ctx.cfg.heartbeat_interval.as_millis() as u64;
        let registered = pb::SchedulerMessage {
            kind: Some(pb::scheduler_message::Kind::Registered(pb::Registered {
                term,
                heartbeat_interval_ms: hb,
                lease_ms: self.ctx.cfg.agent_lease.as_millis() as u64,
            })),
        };
        tx.send(Ok(registered))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        tokio::spawn(run_session(self.ctx.clone(), name, from, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// An agent may register only as itself: with TLS its certificate must be
/// `agent:NAME` for the node it registers. Every attempt is audited.
fn check_agent(
    ctx: &Ctx,
    caller: Result<String, Status>,
    node: &str,
    from: String,
) -> Result<(), Status> {
    let checked = caller.and_then(|who| {
        let own = format!("agent:{node}");
        if ctx.cfg.tls.is_some() && who != own {
            return Err(Status::permission_denied(format!(
                "permission denied: certificate {who} may not register node {node} (needs {own})"
            )));
        }
        Ok(who)
    });
    let (who, outcome) = match &checked {
        Ok(w) => (w.clone(), "applied".to_string()),
        Err(s) => ("?".to_string(), format!("denied: {}", s.message())),
    };
    ctx.auth.audit(crate::state::AuditEntry {
        at_ms: now_ms(),
        via: if ctx.cfg.tls.is_some() {
            "cert"
        } else {
            "local daemon"
        }
        .to_string(),
        who,
        from,
        action: "register-node".into(),
        target: node.to_string(),
        outcome,
    });
    if let Err(s) = &checked {
        tracing::warn!(node, error = %s.message(), "agent refused");
    }
    checked.map(|_| ())
}

async fn run_session(
    ctx: Arc<Ctx>,
    node: String,
    from: String,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: mpsc::Sender<Result<pb::SchedulerMessage, Status>>,
) {
    let mut status = ctx.raft.status();
    let mut last_sent: Option<Vec<pb::TaskAssignment>> = None;
    loop {
        let st = status.borrow().clone();
        if !st.is_leader {
            let _ = tx.send(Err(not_leader(&ctx, st.leader))).await;
            break;
        }
        let (desired, lost) = {
            let state = ctx.raft.state();
            let lost = state
                .nodes
                .get(&node)
                .is_some_and(|n| n.state == crate::model::NodeState::Lost);
            (desired_for_node(&state, &node, &ctx.cfg), lost)
        };
        if lost {
            // Its lease expired while this stream stayed open (a stalled
            // agent): make it register again, reporting what it still runs.
            let msg = format!("node {node} was marked lost; register again");
            let _ = tx.send(Err(Status::unavailable(msg))).await;
            break;
        }
        if last_sent.as_ref() != Some(&desired) {
            let msg = pb::SchedulerMessage {
                kind: Some(pb::scheduler_message::Kind::Assignments(pb::Assignments {
                    term: status.borrow().term,
                    tasks: desired.clone(),
                })),
            };
            if tx.send(Ok(msg)).await.is_err() {
                break;
            }
            last_sent = Some(desired);
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { break },
            msg = inbound.next() => match msg {
                Some(Ok(m)) => {
                    ctx.touch(&node);
                    if let Some(pb::agent_message::Kind::Heartbeat(hb)) = &m.kind {
                        // The ack tells the agent its lease was renewed
                        // (self-fencing): only under a leadership a quorum
                        // confirmed lately, never on this node's belief.
                        if !ctx.leadership_confirmed(status.borrow().term) {
                            tracing::debug!(%node, "heartbeat not acknowledged: leadership not confirmed by a quorum lately");
                            continue;
                        }
                        let ack = pb::SchedulerMessage {
                            kind: Some(pb::scheduler_message::Kind::HeartbeatAck(
                                pb::HeartbeatAck { seq: hb.seq },
                            )),
                        };
                        if tx.send(Ok(ack)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    if let Err(e) = handle_message(&ctx, &node, &from, m).await {
                        tracing::warn!(node = %node, "agent message not applied: {e}");
                    }
                }
                Some(Err(e)) => {
                    tracing::info!(node = %node, "agent stream error: {e}");
                    break;
                }
                None => break,
            },
        }
    }
    tracing::info!(node = %node, "agent session ended");
}

/// Header naming the leader's address on a "not the leader" answer.
pub const LEADER_HEADER: &str = "muster-leader";
/// Set on every not-leader refusal, with or without a known leader: the
/// agent then retries soon (an election is under way) instead of backing off.
pub const NOT_LEADER_HEADER: &str = "muster-not-leader";

/// `Unavailable`, with the leader's address in a header when it is known.
pub fn not_leader(ctx: &Ctx, leader: u64) -> Status {
    let addr = (leader != 0).then(|| ctx.raft.address_of(leader)).flatten();
    let msg = match (&addr, leader) {
        (Some(a), l) => format!("this scheduler is not the leader; the leader is node {l} at {a}"),
        (None, 0) => "this scheduler is not the leader and no leader is known".to_string(),
        (None, l) => format!("this scheduler is not the leader; the leader is node {l}"),
    };
    let mut status = Status::unavailable(msg);
    status.metadata_mut().insert(
        NOT_LEADER_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    if let Some(a) = addr.and_then(|a| a.parse().ok()) {
        status.metadata_mut().insert(LEADER_HEADER, a);
    }
    status
}

async fn handle_message(
    ctx: &Ctx,
    node: &str,
    from: &str,
    m: pb::AgentMessage,
) -> Result<(), Status> {
    let ev = match m.kind {
        Some(pb::agent_message::Kind::Event(ev)) => ev,
        Some(pb::agent_message::Kind::GpuFault(f)) => {
            tracing::warn!(%node, gpu = f.index, "GPU failed: {}", f.reason);
            let cmd = Command::GpuFailed {
                node: node.to_string(),
                gpu: f.index,
                reason: super::limits::printable(&f.reason),
                drain: ctx.cfg.scheduling.drain_on_gpu_fault,
                at_ms: now_ms(),
            };
            return ctx.propose(cmd).await.map(|_| ());
        }
        _ => return Ok(()), // heartbeats only renew the lease
    };
    let key = TaskKey {
        job: crate::model::JobId(ev.job_id),
        alloc: ev.alloc_id,
        task: ev.task_index,
    };
    if !own_task(ctx, node, from, key) {
        return Err(Status::permission_denied(format!(
            "node {node} reported an event for task {}.{} of allocation {}, which is not \
             placed there",
            key.job, key.task, key.alloc
        )));
    }
    if matches!(ev.kind, Some(pb::task_event::Kind::Checkpointed(_))) {
        let task = format!("{}.{}.{}", key.job, key.alloc, key.task);
        if let Err(wait) = ctx.auth.checkpoint_limit(&task) {
            return Err(Status::resource_exhausted(format!(
                "checkpoint reports of task {task} come too fast; dropped (next in {:.1}s)",
                wait.as_secs_f64()
            )));
        }
    }
    let cmd = match ev.kind {
        Some(pb::task_event::Kind::Started(_)) => Command::TaskStarted {
            key,
            at_ms: now_ms(),
        },
        Some(pb::task_event::Kind::Exited(e)) => {
            let mut exit = convert::exit_from_pb(&e);
            // Part of the job's failure reason, which other users see.
            exit.message = super::limits::printable(&exit.message);
            Command::TaskExited {
                key,
                exit,
                at_ms: now_ms(),
            }
        }
        Some(pb::task_event::Kind::Checkpointed(c)) => Command::TaskCheckpointed {
            key,
            step: c.step,
            at_ms: now_ms(),
        },
        None => return Err(Status::invalid_argument("task event without a kind")),
    };
    ctx.propose(cmd).await.map(|_| ())
}

/// Whether `key` is a task of its job's current allocation placed on `node`.
///
/// An agent speaks only for its own node: an event for a task placed
/// elsewhere (a stolen or rogue agent certificate failing another node's
/// job) is refused and audited. An event for an allocation that is no longer
/// current is refused quietly: after a requeue the agent still reports the
/// old tasks' exits, which apply would ignore anyway. Allocation ids are never
/// reused, so a task found on `node` here is still there when the command is
/// applied, or no longer current.
fn own_task(ctx: &Ctx, node: &str, from: &str, key: TaskKey) -> bool {
    let placed_on = {
        let state = ctx.raft.state();
        state
            .jobs
            .get(&key.job)
            .and_then(|j| j.alloc.as_ref())
            .filter(|a| a.id.0 == key.alloc)
            .and_then(|a| a.tasks.get(key.task as usize))
            .map(|t| t.placement.node.clone())
    };
    match placed_on {
        Some(n) if n == node => true,
        Some(other) => {
            tracing::warn!(%node, %other, job = %key.job, "task event for another node's task");
            ctx.auth.audit(crate::state::AuditEntry {
                at_ms: now_ms(),
                who: format!("agent:{node}"),
                via: "agent session".into(),
                from: from.to_string(),
                action: "task-event".into(),
                target: format!("job {} task {} on node {other}", key.job, key.task),
                outcome: format!("denied: node {node} may report only the tasks placed on it"),
            });
            false
        }
        None => false,
    }
}

/// The tasks `node` should be running: tasks of live (placed or running)
/// jobs assigned there, each with its full environment.
pub fn desired_for_node(
    state: &State,
    node: &str,
    cfg: &crate::config::SchedulerConfig,
) -> Vec<pb::TaskAssignment> {
    let mut out = Vec::new();
    for id in &state.active {
        let Some(job) = state.jobs.get(id) else {
            continue;
        };
        if !matches!(job.state, JobState::Placed | JobState::Running) {
            continue;
        }
        let Some(alloc) = &job.alloc else { continue };
        for (i, t) in alloc.tasks.iter().enumerate() {
            if t.placement.node == node && t.state.holds_resources() {
                out.push(assignment(state, job, i, cfg));
            }
        }
    }
    out
}

fn host_of(node: Option<&Node>) -> String {
    let addr = node.map(|n| n.address.as_str()).unwrap_or("127.0.0.1");
    match addr.rsplit_once(':') {
        Some((host, _)) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        None => addr.to_string(),
    }
}

/// The job's checkpoint directory: its own, or `<checkpoint_root>/<id>`.
pub fn checkpoint_dir_of(job: &Job, checkpoint_root: &std::path::Path) -> String {
    job.spec.checkpoint_dir.clone().unwrap_or_else(|| {
        checkpoint_root
            .join(job.id.0.to_string())
            .to_string_lossy()
            .into_owned()
    })
}

fn assignment(
    state: &State,
    job: &Job,
    index: usize,
    cfg: &crate::config::SchedulerConfig,
) -> pb::TaskAssignment {
    let checkpoint_root = &cfg.checkpoint_root;
    let (stop_signal, grace) = cfg.scheduling.stop_of(&job.spec.lifecycle);
    let Some(alloc) = &job.alloc else {
        return pb::TaskAssignment::default();
    };
    let t = &alloc.tasks[index];
    let node = &t.placement.node;
    let local_rank = alloc.tasks[..index]
        .iter()
        .filter(|o| &o.placement.node == node)
        .count();
    let local_world = alloc
        .tasks
        .iter()
        .filter(|o| &o.placement.node == node)
        .count();
    let mut nodes_in_order: Vec<&str> = Vec::new();
    for o in &alloc.tasks {
        if !nodes_in_order.contains(&o.placement.node.as_str()) {
            nodes_in_order.push(&o.placement.node);
        }
    }
    let node_rank = nodes_in_order.iter().position(|n| n == node).unwrap_or(0);
    let master = host_of(state.nodes.get(&alloc.tasks[0].placement.node));
    let checkpoint_dir = checkpoint_dir_of(job, checkpoint_root);
    let mut env: BTreeMap<String, String> = job.spec.env.clone();
    let pairs = [
        ("RANK", index.to_string()),
        ("WORLD_SIZE", alloc.tasks.len().to_string()),
        ("LOCAL_RANK", local_rank.to_string()),
        ("LOCAL_WORLD_SIZE", local_world.to_string()),
        ("NODE_RANK", node_rank.to_string()),
        ("MASTER_ADDR", master),
        ("MASTER_PORT", alloc.master_port.to_string()),
    ];
    for (k, v) in pairs {
        env.insert(format!("MUSTER_{k}"), v.clone());
        env.insert(k.to_string(), v);
    }
    env.insert("MUSTER_JOB_ID".into(), job.id.0.to_string());
    env.insert("MUSTER_JOB_NAME".into(), job.spec.name.clone());
    env.insert("MUSTER_TENANT".into(), job.spec.tenant.clone());
    env.insert("MUSTER_ALLOC_ID".into(), alloc.id.0.to_string());
    env.insert("MUSTER_NODE".into(), node.clone());
    env.insert("MUSTER_RESTART_COUNT".into(), job.restart_count.to_string());
    env.insert("MUSTER_CHECKPOINT_DIR".into(), checkpoint_dir.clone());
    let minors = state
        .nodes
        .get(node)
        .map(|n| {
            t.placement
                .gpus
                .iter()
                .filter_map(|g| n.gpus.iter().find(|x| x.index == *g).map(|x| x.minor))
                .collect()
        })
        .unwrap_or_default();
    pb::TaskAssignment {
        job_id: job.id.0,
        alloc_id: alloc.id.0,
        term: alloc.term,
        task_index: index as u32,
        user: job.user.clone(),
        command: job.spec.command.clone(),
        env: env.into_iter().collect(),
        workdir: job.spec.workdir.clone(),
        gpu_indices: t.placement.gpus.clone(),
        gpu_minors: minors,
        cpu_millis: t.placement.cpu_millis,
        memory_bytes: t.placement.memory_bytes,
        checkpoint_dir,
        stop_signal,
        grace_ms: grace.as_millis() as u64,
        kill_on_checkpoint: job.spec.lifecycle.checkpoint_on_preempt,
        // The default directory lies in the operator's tree: the agent may
        // make it as root there (safely); a job's own is made as its user.
        checkpoint_root: if job.spec.checkpoint_dir.is_none() {
            checkpoint_root.to_string_lossy().into_owned()
        } else {
            String::new()
        },
    }
}
