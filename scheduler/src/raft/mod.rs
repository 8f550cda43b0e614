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
//! The state machine is snapshotted every `snapshot_entries` applied entries;
//! the log before the snapshot is compacted away. On restart the driver loads
//! the snapshot and raft-rs re-delivers the committed entries after it.

mod logger;
pub mod storage;

use crate::state::{ApplyResult, Command, State};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, StateRole};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use storage::{SledStorage, StoreError};
use tokio::sync::{mpsc, oneshot, watch};

/// Why a proposal was not applied.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProposeError {
    #[error("this scheduler is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("the raft driver has stopped")]
    Stopped,
    #[error("raft rejected the proposal: {0}")]
    Raft(String),
}

/// Raft's view of this node, published after every `Ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub is_leader: bool,
}

/// Settings of the Raft driver.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub id: u64,
    pub voters: Vec<u64>,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_entries: u64,
}

/// A cheap handle to the running driver.
#[derive(Clone)]
pub struct RaftHandle {
    tx: mpsc::Sender<Proposal>,
    state: Arc<RwLock<State>>,
    status: watch::Receiver<RaftStatus>,
}

struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<Result<ApplyResult, ProposeError>>,
}

impl RaftHandle {
    /// Propose a command and wait until it is committed and applied.
    pub async fn propose(&self, cmd: Command) -> Result<ApplyResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Proposal { cmd, reply })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// The applied state. Hold the guard briefly: the driver waits for it.
    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest status; `changed()` on the receiver wakes on every apply.
    pub fn status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }
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

/// Open the storage in `data_dir`, restore the state and spawn the driver.
pub fn start(
    settings: RaftSettings,
    data_dir: &std::path::Path,
    shutdown: watch::Receiver<bool>,
) -> Result<(RaftHandle, tokio::task::JoinHandle<()>), StartError> {
    let storage = SledStorage::open(data_dir)?;
    if storage.is_empty()? {
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
    let single = settings.voters == [settings.id];
    if single {
        // A lone voter need not wait out an election timeout.
        node.campaign()?;
    }
    let state = Arc::new(RwLock::new(state));
    let (tx, rx) = mpsc::channel(65536);
    let (status_tx, status_rx) = watch::channel(RaftStatus {
        id: settings.id,
        applied,
        ..Default::default()
    });
    let driver = Driver {
        node,
        storage,
        state: state.clone(),
        pending: HashMap::new(),
        next_proposal: proposal_nonce(),
        applied,
        applied_term: 0,
        last_snapshot: applied,
        settings,
        status: status_tx,
    };
    let task = tokio::spawn(driver.run(rx, shutdown));
    Ok((
        RaftHandle {
            tx,
            state,
            status: status_rx,
        },
        task,
    ))
}

struct Driver {
    node: RawNode<SledStorage>,
    storage: SledStorage,
    state: Arc<RwLock<State>>,
    pending: HashMap<u64, oneshot::Sender<Result<ApplyResult, ProposeError>>>,
    next_proposal: u64,
    applied: u64,
    applied_term: u64,
    last_snapshot: u64,
    settings: RaftSettings,
    status: watch::Sender<RaftStatus>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Proposal>, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.settings.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => { self.node.tick(); }
                p = rx.recv() => {
                    let Some(p) = p else { break };
                    self.propose(p);
                    // Batch: everything already queued shares this Ready.
                    while let Ok(p) = rx.try_recv() {
                        self.propose(p);
                    }
                }
                _ = shutdown.changed() => break,
            }
            if let Err(e) = self.on_ready() {
                // Storage failure: stop serving rather than diverge.
                tracing::error!("raft storage failed, stopping the raft driver: {e}");
                break;
            }
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
    }

    fn propose(&mut self, p: Proposal) {
        if self.node.raft.state != StateRole::Leader {
            let leader = Some(self.node.raft.leader_id).filter(|l| *l != 0);
            let _ = p.reply.send(Err(ProposeError::NotLeader { leader }));
            return;
        }
        let id = self.next_proposal;
        self.next_proposal += 1;
        match self.node.propose(id.to_be_bytes().to_vec(), p.cmd.encode()) {
            Ok(()) => {
                self.pending.insert(id, p.reply);
            }
            Err(e) => {
                let _ = p.reply.send(Err(ProposeError::Raft(e.to_string())));
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), StoreError> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut rd = self.node.ready();
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
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
            self.storage.set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.node.advance_apply();
        self.maybe_snapshot()?;
        self.publish_status();
        Ok(())
    }

    fn send(&mut self, msgs: Vec<Message>) {
        // This build runs a single voter: raft produces no messages for peers.
        for m in msgs {
            tracing::warn!(to = m.to, "no transport to raft peer; message dropped");
        }
    }

    fn install_snapshot(&mut self, snap: raft::eraftpb::Snapshot) -> Result<(), StoreError> {
        self.storage.apply_snapshot(&snap)?;
        match State::from_snapshot(&snap.data) {
            Ok(s) => {
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = s;
                self.applied = snap.get_metadata().index;
                self.applied_term = snap.get_metadata().term;
                self.last_snapshot = self.applied;
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
        if self.applied < self.last_snapshot + self.settings.snapshot_entries {
            return Ok(());
        }
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
        let st = RaftStatus {
            id: self.settings.id,
            leader: raft.leader_id,
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: self.applied,
            is_leader: raft.state == StateRole::Leader,
        };
        self.status.send_if_modified(|old| {
            let changed = *old != st;
            *old = st;
            changed
        });
    }
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
