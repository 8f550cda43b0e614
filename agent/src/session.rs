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
/// The longest wait for a registration's answer (a commit through the
/// leader's log: milliseconds when all is well) before the first session;
/// after it, a fifth of the lease (see [`register_timeout`]).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// How long to wait for a registration's answer given the scheduler's
/// lease: short enough that a stalled member costs little of it.
fn register_timeout(lease_ms: u64) -> Duration {
    Duration::from_millis(lease_ms / 5).clamp(Duration::from_millis(500), REGISTER_TIMEOUT)
}
/// The first wait before trying a member again, and the wait after a member
/// that answered but knew no leader (an election is under way).
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait before trying an unreachable member again.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Keep a session with some scheduler until `shutdown` flips.
pub async fn run(
    cfg: SessionConfig,
    node: NodeInfo,
    runtime: Arc<Runtime>,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut fence = Fence::load(cfg.fence_path.clone());
    let mut dialer = Dialer::new(cfg.schedulers.clone(), jitter_seed());
    let mut wait_registered = REGISTER_TIMEOUT;
    loop {
        let (addr, at) = dialer.pick(tokio::time::Instant::now().into_std());
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = shutdown.changed() => return,
        }
        let lost = std::time::Instant::now();
        tokio::select! {
            r = session(&addr, &node, &runtime, &mut events, &mut fence, cfg.lease_file.as_deref(), &mut wait_registered) => match r {
                Ok(()) => return, // the runtime's event channel closed: shutting down
                Err(e) => {
                    tracing::warn!(scheduler = %addr, leader = ?e.leader, "session ended: {}", e.message);
                    if e.registered {
                        tracing::info!(down_after_ms = lost.elapsed().as_millis() as u64, "looking for the leader");
                    }
                    dialer.ended(&addr, &e, std::time::Instant::now());
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Which scheduler to dial next, and when: the leader a scheduler named at
/// once; otherwise the members in turn, each with a backoff of its own
/// (doubling while it cannot be reached, short while it answers without
/// knowing a leader, as during an election), jittered so that the agents of
/// a cluster do not dial in step. After a session that was up ends, every
/// member is fair game again at once, starting after the one just lost:
/// a failover should cost about one election, not a walk through backoffs.
struct Dialer {
    members: Vec<String>,
    /// Index in `members` of the next member to try on a tie.
    next: usize,
    /// Per address: its current backoff and the earliest time to dial it.
    waits: std::collections::HashMap<String, (Duration, std::time::Instant)>,
    hint: Option<String>,
    /// The member whose session was lost last, and when: hints naming it
    /// are ignored for a while (followers name a stalled or dead leader
    /// until they have elected another).
    lost: Option<(String, std::time::Instant)>,
    rng: u64,
}

/// The same scheduler, however its address is spelled (with or without a
/// scheme: the configuration and a leader hint may differ).
fn same_addr(a: &str, b: &str) -> bool {
    let bare = |s: &str| {
        s.trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string()
    };
    bare(a) == bare(b)
}

impl Dialer {
    fn new(members: Vec<String>, seed: u64) -> Dialer {
        Dialer {
            members,
            next: 0,
            waits: Default::default(),
            hint: None,
            lost: None,
            rng: seed | 1,
        }
    }

    /// The address to dial and when.
    fn pick(&mut self, now: std::time::Instant) -> (String, std::time::Instant) {
        if let Some(h) = self.hint.take() {
            return (h, now);
        }
        let n = self.members.len().max(1);
        let mut best: Option<(usize, std::time::Instant)> = None;
        for k in 0..self.members.len() {
            let i = (self.next + k) % n;
            let at = self
                .waits
                .get(&self.members[i])
                .map_or(now, |(_, at)| (*at).max(now));
            if best.is_none_or(|(_, b)| at < b) {
                best = Some((i, at));
            }
        }
        let Some((i, at)) = best else {
            return (String::new(), now + MAX_BACKOFF);
        };
        self.next = (i + 1) % n;
        (self.members[i].clone(), at)
    }

    /// A session with `addr` ended (or never started) with `e` at `now`.
    fn ended(&mut self, addr: &str, e: &SessionError, now: std::time::Instant) {
        if e.registered {
            // It was up: whatever failed, look for the leader at once.
            self.lost = Some((addr.to_string(), now));
            self.waits.clear();
            if let Some(i) = self.members.iter().position(|m| m == addr) {
                self.next = (i + 1) % self.members.len();
            }
        }
        let current = self.waits.get(addr).map(|(d, _)| *d);
        let wait = if e.answered {
            // It is alive and not the leader: an election is under way, or
            // it named a leader.
            BASE_BACKOFF
        } else {
            current.map_or(BASE_BACKOFF, |d| (d * 2).min(MAX_BACKOFF))
        };
        let jittered = wait.mul_f64(self.jitter());
        self.waits.insert(addr.to_string(), (wait, now + jittered));
        // Follow a named leader at once, unless it is the one refusing us,
        // or the one just lost (its followers may not know it yet).
        let just_lost = |l: &str| {
            self.lost.as_ref().is_some_and(|(a, at)| {
                same_addr(a, l) && now.saturating_duration_since(*at) < MAX_BACKOFF
            })
        };
        self.hint = e
            .leader
            .clone()
            .filter(|l| !same_addr(l, addr) && !just_lost(l));
    }

    /// A factor in [0.8, 1.2) (xorshift: no need for a crypto generator).
    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        0.8 + (self.rng % 400) as f64 / 1000.0
    }
}

fn jitter_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Why a session ended, and the leader's address when a scheduler named it.
struct SessionError {
    message: String,
    leader: Option<String>,
    /// A live scheduler answered that it is not the leader (as opposed to
    /// unreachable, or refusing us for good reason).
    answered: bool,
    /// The session had been registered (it was up for a while).
    registered: bool,
}

impl From<String> for SessionError {
    fn from(message: String) -> Self {
        SessionError {
            message,
            leader: None,
            answered: false,
            registered: false,
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
        // A scheduler that is alive but not the leader says so; anything
        // else (a transport failure, a refused certificate) backs off.
        let answered = leader.is_some() || s.metadata().get("muster-not-leader").is_some();
        SessionError {
            message: s.message().to_string(),
            leader,
            answered,
            registered: false,
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
    wait_registered: &mut Duration,
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
    // No kill until this session's first assignment set has arrived.
    runtime.begin_session();
    let register_sent = crate::task::fence::now_ms();
    send(&tx, pb::agent_message::Kind::Register(register)).await?;
    // A stopped scheduler's kernel still accepts the connection: without a
    // deadline the agent would wait on it for as long as it stays stopped,
    // while the new leader marks the node lost.
    let opened = async {
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|e| {
                let mut e = SessionError::from(e);
                e.message = format!("session refused: {}", e.message);
                e
            })?
            .into_inner();
        let first = inbound.message().await?;
        Ok::<_, SessionError>((inbound, first))
    };
    let limit = *wait_registered;
    let (mut inbound, first) = tokio::time::timeout(limit, opened).await.map_err(|_| {
        format!(
            "no answer to the registration within {:.1}s (the scheduler may be stalled)",
            limit.as_secs_f64()
        )
    })??;
    let Some(pb::SchedulerMessage {
        kind: Some(pb::scheduler_message::Kind::Registered(reg)),
    }) = first
    else {
        return Err(String::from("scheduler did not acknowledge the registration").into());
    };
    if !fence.admit(reg.term) {
        // A leader of an older term than one whose orders we followed has
        // been deposed (it may not know yet): take nothing from it.
        return Err(SessionError {
            message: format!(
                "the scheduler leads term {}, older than term {} whose orders this agent followed: it was deposed",
                reg.term, fence.term
            ),
            leader: None,
            answered: true,
            registered: false,
        });
    }
    tracing::info!(scheduler = %addr, term = reg.term, "registered");
    *wait_registered = register_timeout(reg.lease_ms);
    // The registration went through the leader's log: its answer renews the
    // lease like an acknowledged heartbeat, so a task started before the
    // first acknowledgement is fenced too. Nothing is thawed yet: revoked
    // tasks are killed when the first assignment set arrives.
    if let Some(path) = lease_file {
        let lease = Duration::from_millis(reg.lease_ms).mul_f64(LEASE_SHARE);
        if let Err(e) =
            crate::task::fence::write_deadline(path, register_sent + lease.as_millis() as i64)
        {
            tracing::warn!("cannot write the lease file {}: {e}", path.display());
        }
    }
    let up: Result<(), SessionError> = async {
    for ev in runtime.replay_events() {
        send(&tx, event_to_pb(&ev)).await?;
    }
    let mut heartbeat =
        tokio::time::interval(Duration::from_millis(reg.heartbeat_interval_ms.max(100)));
    let lease = Duration::from_millis(reg.lease_ms).mul_f64(LEASE_SHARE);
    let mut seq = 0u64;
    let mut unacked: std::collections::VecDeque<(u64, i64)> = Default::default();
    // A scheduler that stops acknowledging (stalled, deposed, cut off from
    // its quorum) is left for another well before the lease runs out.
    let ack_timeout = ack_timeout(reg.lease_ms, reg.heartbeat_interval_ms);
    let mut last_ack = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if last_ack.elapsed() > ack_timeout {
                    return Err(format!(
                        "no heartbeat acknowledged for {:.1}s: the scheduler is stalled or no longer leads",
                        last_ack.elapsed().as_secs_f64()
                    ).into());
                }
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
                        last_ack = tokio::time::Instant::now();
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
    .await;
    up.map_err(|mut e| {
        e.registered = true;
        e
    })
}

/// How long a session may go without a heartbeat acknowledged: a third of
/// the lease (so the agent looks for the new leader while its lease still
/// holds), but never less than three heartbeats.
fn ack_timeout(lease_ms: u64, heartbeat_ms: u64) -> Duration {
    Duration::from_millis((lease_ms / 3).max(heartbeat_ms.max(100) * 3))
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
    use std::time::Instant;

    fn members() -> Vec<String> {
        vec!["a:1".into(), "b:1".into(), "c:1".into()]
    }

    fn unreachable() -> SessionError {
        SessionError::from(String::from("cannot connect"))
    }

    fn refused(leader: Option<&str>) -> SessionError {
        let mut s = tonic::Status::unavailable("not the leader");
        s.metadata_mut()
            .insert("muster-not-leader", "1".parse().expect("ascii"));
        if let Some(l) = leader {
            s.metadata_mut()
                .insert("muster-leader", l.parse().expect("ascii"));
        }
        SessionError::from(s)
    }

    #[test]
    fn a_named_leader_is_dialed_at_once() {
        let now = Instant::now();
        let mut d = Dialer::new(members(), 42);
        let (first, at) = d.pick(now);
        assert_eq!((first.as_str(), at), ("a:1", now));
        // The refusal that names the leader was once turned into plain text
        // and the hint lost: it must survive the conversion.
        d.ended("a:1", &refused(Some("c:1")), now);
        assert_eq!(d.pick(now), ("c:1".to_string(), now));
    }

    #[test]
    fn a_member_naming_itself_is_not_redialed_in_a_loop() {
        let now = Instant::now();
        let mut d = Dialer::new(members(), 42);
        d.pick(now);
        d.ended("a:1", &refused(Some("a:1")), now);
        assert_eq!(d.pick(now).0, "b:1");
    }

    #[test]
    fn unreachable_members_back_off_each_on_its_own_with_a_cap() {
        let now = Instant::now();
        let mut d = Dialer::new(vec!["a:1".into(), "b:1".into()], 7);
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            d.ended("a:1", &unreachable(), now);
            let (wait, _) = d.waits["a:1"];
            assert!(wait >= last && wait <= MAX_BACKOFF, "{wait:?}");
            last = wait;
        }
        assert_eq!(last, MAX_BACKOFF);
        // b has no backoff of its own: it is tried now, not after a's.
        assert_eq!(d.pick(now), ("b:1".to_string(), now));
    }

    #[test]
    fn a_refusal_for_good_reason_backs_off() {
        let now = Instant::now();
        let mut d = Dialer::new(vec!["a:1".into()], 5);
        for _ in 0..10 {
            let denied = SessionError::from(tonic::Status::permission_denied("bad certificate"));
            d.ended("a:1", &denied, now);
        }
        assert_eq!(d.waits["a:1"].0, MAX_BACKOFF);
    }

    #[test]
    fn during_an_election_members_are_retried_quickly() {
        let now = Instant::now();
        let mut d = Dialer::new(members(), 9);
        for m in ["a:1", "b:1", "c:1"] {
            for _ in 0..5 {
                d.ended(m, &refused(None), now);
            }
        }
        let (_, at) = d.pick(now);
        assert!(at - now <= BASE_BACKOFF.mul_f64(1.2), "{:?}", at - now);
    }

    #[test]
    fn a_lost_session_resets_every_backoff_and_moves_on() {
        let now = Instant::now();
        let mut d = Dialer::new(members(), 3);
        for _ in 0..6 {
            d.ended("b:1", &unreachable(), now);
            d.ended("c:1", &unreachable(), now);
        }
        // The session with a was up, then the leader died.
        let mut lost = unreachable();
        lost.registered = true;
        d.ended("a:1", &lost, now);
        let (next, at) = d.pick(now);
        assert_eq!(next, "b:1", "the member after the lost one");
        assert_eq!(at, now, "no backoff left over from before the session");
    }

    #[test]
    fn a_silent_scheduler_is_left_before_the_lease_ends() {
        assert_eq!(ack_timeout(15_000, 1_000), Duration::from_secs(5));
        assert_eq!(ack_timeout(1_000, 500), Duration::from_millis(1_500));
    }

    #[test]
    fn a_hint_naming_the_leader_just_lost_is_not_followed() {
        let now = Instant::now();
        let mut d = Dialer::new(members(), 11);
        // The session with a (the leader) is lost: it stalled.
        let mut lost = unreachable();
        lost.registered = true;
        d.ended("a:1", &lost, now);
        // b has not noticed yet and names a (spelt with a scheme).
        d.ended("b:1", &refused(Some("http://a:1")), now);
        assert_ne!(d.pick(now).0, "a:1", "the stalled leader is not redialed");
        // Once an election could have happened, a hint naming a counts.
        let later = now + MAX_BACKOFF;
        d.ended("c:1", &refused(Some("a:1")), later);
        assert_eq!(d.pick(later), ("a:1".to_string(), later));
    }

    #[test]
    fn registrations_wait_a_fifth_of_the_lease() {
        assert_eq!(register_timeout(5_000), Duration::from_secs(1));
        assert_eq!(register_timeout(15_000), Duration::from_secs(3));
        assert_eq!(register_timeout(1_000), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_within_a_fifth() {
        let mut d = Dialer::new(members(), jitter_seed());
        for _ in 0..1000 {
            let j = d.jitter();
            assert!((0.8..1.2).contains(&j), "{j}");
        }
    }

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
