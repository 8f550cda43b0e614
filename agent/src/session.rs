//! The agent's connection to the schedulers.
//!
//! One `AgentApi.Session` stream at a time. On every (re)connection the agent
//! registers with its GPUs, CPUs, memory and every task it still has (so
//! running work is adopted, not restarted), then replays task events the
//! scheduler may have missed. Assignment sets from a term older than the
//! newest one seen are ignored (fencing): a deposed leader cannot start or
//! stop anything here. If a scheduler is unreachable the next one is tried,
//! with a capped backoff.

use crate::task::{Event, Runtime};
use muster_proto as pb;
use muster_proto::agent_api_client::AgentApiClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// What the agent tells the scheduler about itself (minus its tasks).
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub address: String,
    pub gpus: Vec<pb::GpuInfo>,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub labels: std::collections::BTreeMap<String, String>,
    /// This run's log-ticket key (`muster_proto::ticket`), sent at
    /// registration.
    pub log_key: Vec<u8>,
}

/// The newest Raft term whose orders this agent followed, kept on disk.
struct Fence {
    path: PathBuf,
    term: u64,
}

impl Fence {
    fn load(path: PathBuf) -> Fence {
        let term = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Fence { path, term }
    }

    /// Accept orders of `term`? Raises the fence when `term` is newer.
    fn admit(&mut self, term: u64) -> bool {
        if term < self.term {
            return false;
        }
        if term > self.term {
            self.term = term;
            if let Err(e) = crate::task::shim::write_atomic(&self.path, term.to_string().as_bytes())
            {
                tracing::warn!("cannot persist term fence {}: {e}", self.path.display());
            }
        }
        true
    }
}

/// Where the session keeps what must outlive it.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Scheduler addresses, tried in turn.
    pub schedulers: Vec<String>,
    /// The term fence (newest term whose orders were followed).
    pub fence_path: PathBuf,
    /// The lease file the shims watch (self-fencing); `None`: off.
    pub lease_file: Option<PathBuf>,
}

/// The lease file holds the send time of the newest acknowledged heartbeat
/// plus this share of the lease: the scheduler starts counting only when the
/// heartbeat arrives, so the agent's deadline always comes first.
const LEASE_SHARE: f64 = 0.9;
/// Heartbeats whose send times are remembered while awaiting their acks.
const MAX_UNACKED: usize = 64;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Keep a session with some scheduler until `shutdown` flips.
pub async fn run(
    cfg: SessionConfig,
    node: NodeInfo,
    runtime: Arc<Runtime>,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    let schedulers = cfg.schedulers.clone();
    let mut fence = Fence::load(cfg.fence_path.clone());
    let mut backoff = Duration::from_millis(100);
    let mut i = 0usize;
    let mut hint: Option<String> = None;
    loop {
        // Follow the leader a scheduler named, else try the next address.
        let addr = hint.take().unwrap_or_else(|| {
            i += 1;
            schedulers[(i - 1) % schedulers.len()].clone()
        });
        tokio::select! {
            r = session(&addr, &node, &runtime, &mut events, &mut fence, cfg.lease_file.as_deref()) => match r {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(SessionError { message, leader }) => {
                    tracing::warn!(scheduler = %addr, "session ended: {message}");
                    if let Some(l) = leader {
                        backoff = Duration::from_millis(20);
                        hint = Some(l);
                    }
                }
            },
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Why a session ended, and the leader's address when a scheduler named it.
struct SessionError {
    message: String,
    leader: Option<String>,
}

impl From<String> for SessionError {
    fn from(message: String) -> Self {
        SessionError {
            message,
            leader: None,
        }
    }
}

impl From<tonic::Status> for SessionError {
    fn from(s: tonic::Status) -> Self {
        let leader = s
            .metadata()
            .get("muster-leader")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        SessionError {
            message: s.message().to_string(),
            leader,
        }
    }
}

fn endpoint(addr: &str) -> Result<tonic::transport::Endpoint, String> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    muster_proto::tls::endpoint(&url)
        .map(|e| e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
        .map_err(|e| format!("bad scheduler address {addr:?}: {e}"))
}

async fn session(
    addr: &str,
    node: &NodeInfo,
    runtime: &Arc<Runtime>,
    events: &mut mpsc::UnboundedReceiver<Event>,
    fence: &mut Fence,
    lease_file: Option<&std::path::Path>,
) -> Result<(), SessionError> {
    let channel = endpoint(addr)?
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut client = AgentApiClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1024);
    let register = pb::Register {
        node: node.name.clone(),
        address: node.address.clone(),
        gpus: node.gpus.clone(),
        cpu_millis: node.cpu_millis,
        memory_bytes: node.memory_bytes,
        labels: node.labels.clone().into_iter().collect(),
        running: runtime.inventory(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        seen_term: fence.term,
        log_key: node.log_key.clone(),
    };
    send(&tx, pb::agent_message::Kind::Register(register)).await?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("session refused: {}", e.message()))?
        .into_inner();
    let first = inbound
        .message()
        .await
        .map_err(|e| e.message().to_string())?;
    let Some(pb::SchedulerMessage {
        kind: Some(pb::scheduler_message::Kind::Registered(reg)),
    }) = first
    else {
        return Err(String::from("scheduler did not acknowledge the registration").into());
    };
    fence.admit(reg.term);
    tracing::info!(scheduler = %addr, term = reg.term, "registered");
    for ev in runtime.replay_events() {
        send(&tx, event_to_pb(&ev)).await?;
    }
    let mut heartbeat =
        tokio::time::interval(Duration::from_millis(reg.heartbeat_interval_ms.max(100)));
    let lease = Duration::from_millis(reg.lease_ms).mul_f64(LEASE_SHARE);
    let mut seq = 0u64;
    let mut unacked: std::collections::VecDeque<(u64, i64)> = Default::default();
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                seq += 1;
                unacked.push_back((seq, crate::task::fence::now_ms()));
                if unacked.len() > MAX_UNACKED {
                    unacked.pop_front();
                }
                send(&tx, pb::agent_message::Kind::Heartbeat(pb::Heartbeat { seq })).await?;
            }
            ev = events.recv() => {
                let Some(ev) = ev else { return Ok(()) };
                send(&tx, event_to_pb(&ev)).await?;
                if let Event::Exited { key, .. } = ev {
                    runtime.exit_sent(key);
                }
            }
            msg = inbound.message() => {
                let msg = msg?;
                let Some(msg) = msg else {
                    return Err(String::from("scheduler closed the session").into());
                };
                match msg.kind {
                    Some(pb::scheduler_message::Kind::Assignments(a)) => {
                        if fence.admit(a.term) {
                            runtime.set_desired(a.tasks);
                        } else {
                            tracing::warn!(term = a.term, fence = fence.term, "ignoring orders from an older term");
                        }
                    }
                    Some(pb::scheduler_message::Kind::HeartbeatAck(ack)) => {
                        while unacked.front().is_some_and(|(s, _)| *s < ack.seq) {
                            unacked.pop_front();
                        }
                        if let (Some(path), Some((_, sent))) = (lease_file, unacked.pop_front()) {
                            renew_lease(path, sent, lease, runtime);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The leader acknowledged a heartbeat sent at `sent_ms`: the lease is
/// alive until `sent_ms + lease`. Tasks frozen meanwhile are thawed (the
/// assignments, which arrive before the first ack, already killed revoked ones).
fn renew_lease(path: &std::path::Path, sent_ms: i64, lease: Duration, runtime: &Arc<Runtime>) {
    let deadline = sent_ms + lease.as_millis() as i64;
    if let Err(e) = crate::task::fence::write_deadline(path, deadline) {
        tracing::warn!("cannot write the lease file {}: {e}", path.display());
        return;
    }
    // An ack that waited in the stream while the agent was stalled renews
    // nothing: thaw only on a lease that is alive now.
    if deadline > crate::task::fence::now_ms() {
        runtime.thaw_fenced();
    }
}

async fn send(
    tx: &mpsc::Sender<pb::AgentMessage>,
    kind: pb::agent_message::Kind,
) -> Result<(), String> {
    tx.send(pb::AgentMessage { kind: Some(kind) })
        .await
        .map_err(|_| "session stream closed".to_string())
}

fn event_to_pb(ev: &Event) -> pb::agent_message::Kind {
    let (key, kind) = match ev {
        Event::GpuFault {
            index,
            uuid,
            reason,
        } => {
            return pb::agent_message::Kind::GpuFault(pb::GpuFault {
                index: *index,
                uuid: uuid.clone(),
                reason: reason.clone(),
            })
        }
        Event::Checkpointed { key, step } => (
            key,
            pb::task_event::Kind::Checkpointed(pb::TaskCheckpointed { step: *step }),
        ),
        Event::Started { key, pid } => (
            key,
            pb::task_event::Kind::Started(pb::TaskStarted { pid: *pid }),
        ),
        Event::Exited { key, exit } => (key, pb::task_event::Kind::Exited(exit.clone())),
    };
    pb::agent_message::Kind::Event(pb::TaskEvent {
        job_id: key.job,
        alloc_id: key.alloc,
        task_index: key.task,
        kind: Some(kind),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_refuses_older_terms_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("term");
        let mut f = Fence::load(p.clone());
        assert!(f.admit(3));
        assert!(f.admit(3));
        assert!(!f.admit(2));
        let mut again = Fence::load(p);
        assert_eq!(again.term, 3);
        assert!(!again.admit(1));
        assert!(again.admit(4));
    }
}
