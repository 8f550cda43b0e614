//! Raft: the one task that owns `RawNode`, and the sled storage under it.
//!
//! Every change to the cluster's state is proposed here as an encoded
//! [`Command`]; once committed it is applied to the shared [`State`] and the
//! proposer is answered with the [`ApplyResult`]. The driver runs raft-rs's
//! documented `Ready` order: send messages, apply a snapshot, apply committed
//! entries, persist entries and hard state (one sled flush per `Ready`), send
//! persisted messages, `advance`, handle the `LightReady`, `advance_apply`.
//! Proposals are drained in batches so that many of them share one `Ready`
//! and one flush.
//!
//! The state machine is snapshotted once `snapshot_entries` entries have been
//! applied since the last snapshot, looked at every `snapshot_interval` (as
//! Consul and Nomad do), or at once when eight times as many have piled up;
//! the log before the snapshot is compacted away. A snapshot costs the whole
//! state's size, so under a stream of writes it is taken at most once an
//! interval rather than every few seconds. On restart the driver loads
//! the snapshot and raft-rs re-delivers the committed entries after it.

mod forward;
mod handle;
mod logger;
#[cfg(test)]
mod sim;
pub mod storage;
pub mod transport;

pub use handle::RaftHandle;

use crate::state::{ApplyResult, Command, State};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Entry,
    EntryType, Message,
};
use raft::{RawNode, StateRole};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use storage::{SledStorage, StoreError};
use tokio::sync::{mpsc, oneshot, watch};
use transport::{AddressBook, Feedback, Transport};

/// Why a proposal was not applied.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProposeError {
    #[error("this scheduler is not the leader and knows no leader (election in progress, or cut off from a quorum)")]
    NotLeader { leader: Option<u64> },
    #[error("not committed within {0:?}: no quorum of schedulers is reachable")]
    Timeout(Duration),
    #[error("the raft driver has stopped")]
    Stopped,
    #[error("raft rejected the proposal: {0}")]
    Raft(String),
    #[error("forwarding to the leader (node {leader}) failed: {message}")]
    Forward { leader: u64, message: String },
}

/// One member as this node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub voter: bool,
    /// Leader's view: highest index replicated there (0 elsewhere).
    pub matched: u64,
}

/// Raft's view of this node, published after every `Ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub is_leader: bool,
    pub role: &'static str,
    pub members: Vec<Member>,
    /// This node was removed from the cluster and must stop serving.
    pub removed: bool,
}

/// Settings of the Raft driver.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub id: u64,
    /// Voters of a brand-new cluster; empty when joining an existing one.
    pub voters: Vec<u64>,
    /// Configured peer addresses (this node's view).
    pub peers: BTreeMap<u64, String>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_entries: u64,
    pub snapshot_interval: Duration,
    pub commit_timeout: Duration,
}

/// A membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    Add { id: u64, address: String },
    Remove { id: u64 },
}

pub(crate) enum Request {
    /// An encoded [`Command`] (encoded by the caller, off the driver's task).
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<ApplyResult, ProposeError>>,
    },
    Read {
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    Change {
        change: PeerChange,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
}

/// Errors starting the driver.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("corrupt snapshot in the data folder: {0}")]
    Snapshot(String),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// Where peers' raft messages enter the driver.
pub type Inbound = mpsc::Sender<Message>;

/// Open the storage in `data_dir`, restore the state and spawn the driver.
/// Returns the handle, the sender the peer service feeds incoming raft
/// messages into, and the driver task.
pub fn start(
    settings: RaftSettings,
    data_dir: &std::path::Path,
    shutdown: watch::Receiver<bool>,
) -> Result<(RaftHandle, Inbound, tokio::task::JoinHandle<()>), StartError> {
    let storage = SledStorage::open(data_dir)?;
    if storage.is_empty()? && !settings.voters.is_empty() {
        storage.bootstrap(settings.voters.clone())?;
    }
    let (state, applied) = match storage.load_snapshot()? {
        Some((meta, data)) => (
            State::from_snapshot(&data).map_err(|e| StartError::Snapshot(e.to_string()))?,
            meta.index,
        ),
        None => (State::new(), 0),
    };
    let cfg = raft::Config {
        id: settings.id,
        election_tick: settings.election_ticks,
        heartbeat_tick: settings.heartbeat_ticks,
        applied,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    cfg.validate()?;
    let mut node = RawNode::new(&cfg, storage.clone(), &logger::logger())?;
    if settings.voters == [settings.id] {
        // A lone voter need not wait out an election timeout.
        node.campaign()?;
    }
    let book = Arc::new(AddressBook::new(settings.peers.clone()));
    book.set_replicated(state.peers.clone());
    let (feedback_tx, feedback_rx) = mpsc::unbounded_channel();
    let transport = Arc::new(Transport::new(settings.id, book, feedback_tx));
    let state = Arc::new(RwLock::new(state));
    let (tx, rx) = mpsc::channel(65536);
    let (inbound_tx, inbound_rx) = mpsc::channel(65536);
    let (status_tx, status_rx) = watch::channel(RaftStatus {
        id: settings.id,
        applied,
        ..Default::default()
    });
    let timeout = settings.commit_timeout;
    let driver = Driver {
        node,
        storage,
        state: state.clone(),
        transport: transport.clone(),
        pending: HashMap::new(),
        changes: HashMap::new(),
        reads: HashMap::new(),
        parked_reads: Vec::new(),
        next_proposal: proposal_nonce(),
        applied,
        applied_term: 0,
        last_snapshot: applied,
        last_snapshot_at: std::time::Instant::now(),
        settings,
        status: status_tx,
        removed: false,
    };
    let task = tokio::spawn(driver.run(rx, inbound_rx, feedback_rx, shutdown));
    Ok((
        RaftHandle {
            forwards: Arc::default(),
            tx,
            state,
            status: status_rx,
            transport,
            timeout,
        },
        inbound_tx,
        task,
    ))
}

type Reply<T> = oneshot::Sender<Result<T, ProposeError>>;

struct Driver {
    node: RawNode<SledStorage>,
    storage: SledStorage,
    state: Arc<RwLock<State>>,
    transport: Arc<Transport>,
    pending: HashMap<u64, Reply<ApplyResult>>,
    changes: HashMap<u64, Reply<()>>,
    reads: HashMap<Vec<u8>, Reply<()>>,
    parked_reads: Vec<(u64, Reply<()>)>,
    next_proposal: u64,
    applied: u64,
    applied_term: u64,
    last_snapshot: u64,
    last_snapshot_at: std::time::Instant,
    settings: RaftSettings,
    status: watch::Sender<RaftStatus>,
    removed: bool,
}

impl Driver {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        mut inbound: mpsc::Receiver<Message>,
        mut feedback: mpsc::UnboundedReceiver<Feedback>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(self.settings.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => { self.node.tick(); }
                r = rx.recv() => {
                    let Some(r) = r else { break };
                    self.request(r);
                    // Batch: everything already queued shares this Ready.
                    // Yielding once first lets the request tasks that are
                    // ready to run queue theirs too.
                    tokio::task::yield_now().await;
                    while let Ok(r) = rx.try_recv() {
                        self.request(r);
                    }
                }
                m = inbound.recv() => {
                    let Some(m) = m else { break };
                    self.step(m);
                    while let Ok(m) = inbound.try_recv() {
                        self.step(m);
                    }
                }
                f = feedback.recv() => match f {
                    Some(Feedback::Unreachable(id)) => self.node.report_unreachable(id),
                    Some(Feedback::Snapshot { to, ok }) => {
                        let status = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
                        self.node.report_snapshot(to, status);
                    }
                    None => break,
                },
                _ = shutdown.changed() => break,
            }
            if let Err(e) = self.on_ready() {
                // Storage failure: stop serving rather than diverge.
                tracing::error!("raft storage failed, stopping the raft driver: {e}");
                break;
            }
            self.fail_if_not_leader();
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
    }

    fn step(&mut self, mut m: Message) {
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeat {
            // A member whose data folder was wiped comes back with an empty
            // log while the leader still remembers it at a higher index; the
            // heartbeat's commit must not point past what this node holds
            // (raft-rs would panic). Appends and a snapshot bring it back.
            let last = self.node.raft.raft_log.last_index();
            if m.commit > last {
                m.commit = last;
            }
        }
        if let Err(e) = self.node.step(m) {
            tracing::debug!("raft message ignored: {e}");
        }
    }

    fn not_leader(&self) -> ProposeError {
        let leader = Some(self.node.raft.leader_id).filter(|l| *l != 0);
        ProposeError::NotLeader { leader }
    }

    /// A deposed leader's pending proposals may never commit: fail them now
    /// so clients retry (with their idempotency key) instead of waiting.
    fn fail_if_not_leader(&mut self) {
        if self.node.raft.state == StateRole::Leader
            || (self.pending.is_empty() && self.changes.is_empty())
        {
            return;
        }
        let err = self.not_leader();
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, reply) in self.changes.drain() {
            let _ = reply.send(Err(err.clone()));
        }
    }

    fn request(&mut self, r: Request) {
        match r {
            Request::Propose { data, reply } => self.propose(data, reply),
            Request::Read { reply } => {
                let ctx = self.next_proposal.to_be_bytes().to_vec();
                self.next_proposal += 1;
                self.node.read_index(ctx.clone());
                self.reads.insert(ctx, reply);
            }
            Request::Change { change, reply } => self.change(change, reply),
        }
    }

    fn propose(&mut self, data: Vec<u8>, reply: Reply<ApplyResult>) {
        if self.node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let id = self.next_proposal;
        self.next_proposal += 1;
        match self.node.propose(id.to_be_bytes().to_vec(), data) {
            Ok(()) => {
                self.pending.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
            }
        }
    }

    fn change(&mut self, change: PeerChange, reply: Reply<()>) {
        if self.node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let (kind, id, address) = match change {
            PeerChange::Add { id, address } => (ConfChangeType::AddNode, id, address),
            PeerChange::Remove { id } => (ConfChangeType::RemoveNode, id, String::new()),
        };
        let single = ConfChangeSingle {
            change_type: kind,
            node_id: id,
            ..Default::default()
        };
        let cc = ConfChangeV2 {
            // Joint consensus, left automatically once the joint config commits.
            transition: ConfChangeTransition::Implicit,
            changes: vec![single].into(),
            ..Default::default()
        };
        let pid = self.next_proposal;
        self.next_proposal += 1;
        // The change carries its proposal id and the new member's address;
        // every replica records the address when it applies the change.
        let context = bincode::serialize(&(pid, address)).unwrap_or_default();
        let mut cc = cc;
        cc.context = context.clone().into();
        match self.node.propose_conf_change(context, cc) {
            Ok(()) => {
                self.changes.insert(pid, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), StoreError> {
        if !self.node.has_ready() {
            // An idle node still takes a snapshot that fell due.
            return self.maybe_snapshot();
        }
        let mut rd = self.node.ready();
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
        }
        for rs in rd.take_read_states() {
            if let Some(reply) = self.reads.remove(&rs.request_ctx) {
                self.parked_reads.push((rs.index, reply));
            }
        }
        self.apply_entries(rd.take_committed_entries())?;
        self.storage.append(rd.entries())?;
        if let Some(hs) = rd.hs() {
            self.storage.set_hard_state(hs)?;
        }
        self.storage.flush()?;
        self.send(rd.take_persisted_messages());
        let mut light = self.node.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit);
        }
        self.send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.node.advance_apply();
        self.release_reads();
        self.maybe_snapshot()?;
        self.publish_status();
        Ok(())
    }

    /// Answer reads whose read index is now applied.
    fn release_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.parked_reads = waiting;
        for (_, reply) in ready {
            let _ = reply.send(Ok(()));
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        if !msgs.is_empty() {
            self.transport.send(msgs);
        }
    }

    fn install_snapshot(&mut self, snap: raft::eraftpb::Snapshot) -> Result<(), StoreError> {
        self.storage.apply_snapshot(&snap)?;
        match State::from_snapshot(&snap.data) {
            Ok(s) => {
                tracing::info!(
                    index = snap.get_metadata().index,
                    bytes = snap.data.len(),
                    "installed a snapshot from the leader"
                );
                self.transport.book().set_replicated(s.peers.clone());
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = s;
                self.applied = snap.get_metadata().index;
                self.applied_term = snap.get_metadata().term;
                self.last_snapshot = self.applied;
                self.last_snapshot_at = std::time::Instant::now();
            }
            Err(e) => tracing::error!("snapshot from the leader does not decode: {e}"),
        }
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut replies = Vec::new();
        {
            let shared = self.state.clone();
            let mut state = shared.write().unwrap_or_else(|p| p.into_inner());
            for e in entries {
                self.applied = e.index;
                self.applied_term = e.term;
                match e.get_entry_type() {
                    EntryType::EntryNormal => {
                        if e.data.is_empty() {
                            continue; // the leader's no-op at the start of its term
                        }
                        let result = match Command::decode(&e.data) {
                            Ok(cmd) => state.apply(&cmd),
                            Err(err) => {
                                tracing::error!(index = e.index, "undecodable log entry: {err}");
                                ApplyResult::Rejected(format!("undecodable entry: {err}"))
                            }
                        };
                        if let Some(id) = proposal_id(&e.context) {
                            if let Some(reply) = self.pending.remove(&id) {
                                replies.push((reply, result));
                            }
                        }
                    }
                    EntryType::EntryConfChange => {
                        let mut cc = ConfChange::default();
                        if cc.merge_from_bytes(&e.data).is_ok() {
                            let cs = self.node.apply_conf_change(&cc);
                            self.store_conf_state(cs)?;
                        }
                    }
                    EntryType::EntryConfChangeV2 => {
                        let mut cc = ConfChangeV2::default();
                        if cc.merge_from_bytes(&e.data).is_ok() {
                            let cs = self.node.apply_conf_change(&cc);
                            self.store_conf_state(cs)?;
                            self.record_members(&mut state, &cc);
                        }
                    }
                }
            }
        }
        for (reply, result) in replies {
            let _ = reply.send(Ok(result));
        }
        Ok(())
    }

    /// Keep the replicated address book in step with a membership change, and
    /// answer the admin call that proposed it.
    fn record_members(&mut self, state: &mut State, cc: &ConfChangeV2) {
        let (pid, address): (u64, String) =
            bincode::deserialize(&cc.context).unwrap_or((0, String::new()));
        for c in cc.get_changes() {
            match c.get_change_type() {
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                    if !address.is_empty() {
                        state.peers.insert(c.node_id, address.clone());
                    }
                }
                ConfChangeType::RemoveNode => {
                    state.peers.remove(&c.node_id);
                    if c.node_id == self.settings.id {
                        tracing::warn!(
                            "this scheduler was removed from the cluster; it stops serving"
                        );
                        self.removed = true;
                    }
                }
            }
        }
        self.transport.book().set_replicated(state.peers.clone());
        if let Some(reply) = self.changes.remove(&pid) {
            let _ = reply.send(Ok(()));
        }
    }

    fn store_conf_state(
        &mut self,
        cs: raft::Result<raft::eraftpb::ConfState>,
    ) -> Result<(), StoreError> {
        match cs {
            Ok(cs) => self.storage.set_conf_state(&cs),
            Err(e) => {
                tracing::warn!("conf change not applied: {e}");
                Ok(())
            }
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
        let since = self.applied.saturating_sub(self.last_snapshot);
        if !snapshot_due(since, self.last_snapshot_at.elapsed(), &self.settings) {
            return Ok(());
        }
        self.last_snapshot_at = std::time::Instant::now();
        let data = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .to_snapshot();
        let conf = self.node.raft.prs().conf().to_conf_state();
        self.storage
            .save_snapshot(self.applied, self.applied_term, &conf, &data)?;
        self.storage.flush()?;
        self.last_snapshot = self.applied;
        tracing::info!(
            index = self.applied,
            bytes = data.len(),
            "state snapshot saved, log compacted"
        );
        Ok(())
    }

    fn publish_status(&mut self) {
        let raft = &self.node.raft;
        let is_leader = raft.state == StateRole::Leader;
        let conf = raft.prs().conf().to_conf_state();
        let mut members: Vec<Member> = conf
            .voters
            .iter()
            .chain(conf.voters_outgoing.iter())
            .map(|id| Member {
                id: *id,
                voter: true,
                matched: 0,
            })
            .chain(conf.learners.iter().map(|id| Member {
                id: *id,
                voter: false,
                matched: 0,
            }))
            .collect();
        members.sort_by_key(|m| m.id);
        members.dedup_by_key(|m| m.id);
        if is_leader {
            for m in &mut members {
                m.matched = raft.prs().get(m.id).map(|p| p.matched).unwrap_or(0);
            }
        }
        let st = RaftStatus {
            id: self.settings.id,
            leader: raft.leader_id,
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: self.applied,
            last_index: raft.raft_log.last_index(),
            snapshot_index: self.last_snapshot,
            is_leader,
            role: match raft.state {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre-candidate",
            },
            members,
            removed: self.removed,
        };
        self.status.send_if_modified(|old| {
            let changed = *old != st;
            *old = st;
            changed
        });
    }
}

/// Whether to snapshot now, `since` entries and `elapsed` after the last.
fn snapshot_due(since: u64, elapsed: Duration, s: &RaftSettings) -> bool {
    (since >= s.snapshot_entries && elapsed >= s.snapshot_interval)
        || since >= s.snapshot_entries.saturating_mul(8)
}

/// Proposal ids start from the wall clock so that entries replayed after a
/// restart (whose contexts hold the previous run's ids) never match a proposal
/// of this run.
fn proposal_nonce() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

fn proposal_id(ctx: &[u8]) -> Option<u64> {
    let b: [u8; 8] = ctx.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

#[cfg(test)]
mod snapshot_policy_tests {
    use super::*;

    #[test]
    fn snapshots_wait_for_both_the_entries_and_the_interval_unless_far_behind() {
        let s = RaftSettings {
            id: 1,
            voters: vec![1],
            peers: BTreeMap::new(),
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_entries: 1000,
            snapshot_interval: Duration::from_secs(30),
            commit_timeout: Duration::from_secs(2),
        };
        let (soon, later) = (Duration::from_secs(1), Duration::from_secs(31));
        assert!(!snapshot_due(999, later, &s), "too few entries");
        assert!(!snapshot_due(5000, soon, &s), "too soon");
        assert!(snapshot_due(1000, later, &s));
        assert!(snapshot_due(8000, soon, &s), "8x the entries: at once");
    }
}
