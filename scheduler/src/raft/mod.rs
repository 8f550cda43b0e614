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
//!
//! # Bootstrap and joining
//!
//! A brand-new cluster's initial members each begin their storage with the
//! same [`initial_snapshot`]: index 1, term 1, the first voters and the
//! empty state; the log begins at index 2. A member added later (`join`)
//! starts with nothing, not even a configuration, so it must never replay
//! the log from index 1: a membership change applied onto an empty
//! configuration is refused by raft ("can't make a zero-voter config
//! joint"), and the member never learns who the voters are, so it can never
//! campaign. Because the log starts after a snapshot, the leader sends a
//! joiner a snapshot first, and a snapshot carries the configuration. raft-rs
//! refuses a snapshot whose configuration does not name the recipient (one
//! taken before it was added); the storage then answers "temporarily
//! unavailable" and asks the driver for a fresh snapshot, taken at once
//! (`SledStorage::take_snapshot_wanted`). Data folders of older schedulers,
//! whose log starts at index 1 without a snapshot, get their first snapshot
//! as soon as anything is applied.
//!
//! # A member that lost its data
//!
//! Raft's safety rests on every member remembering what it acknowledged and
//! whom it voted for. A member whose data folder was wiped (a replaced disk)
//! and that comes back under the same id with an empty log would vote for a
//! candidate lacking writes it had acknowledged: with member 3 down, 1 and 2
//! commit E; 2 is wiped and restarts; 1 crashes; 3 returns and 2's vote
//! elects 3, and E is gone. A member cannot tell by itself that it had data
//! before, and a peer may not be there to say so. So every data folder
//! begun by a run is marked *catching up* (durably: a crash while catching
//! up keeps the mark). While catching up, a member
//!
//! - grants no vote and no pre-vote to a candidate whose log holds more
//!   than the initial snapshot. Only the first election of a brand-new
//!   cluster, whose members all catch up, is voted in;
//! - otherwise follows, acknowledges and applies as any member does;
//! - stops catching up once it has heard from leaders for two election
//!   timeouts (a stale, cut-off leader steps down within one: check-quorum)
//!   and applied the highest commit index they sent it, or once it is
//!   elected (its log then holds every committed entry).
//!
//! A member that lost its data therefore rejoins by itself, under the same
//! id and with the same config, and votes again once it holds what it had
//! acknowledged; while a majority of the other members is unreachable it
//! cannot help elect a leader (no leader is better than a leader that lost
//! acknowledged writes). A member added with `muster admin peers add` is
//! caught up the same way. What this cannot protect: a wiped member that
//! believes the cluster is new votes for a candidate whose log is also only
//! the initial snapshot, so a member down since the cluster was created,
//! together with a wiped one and a third crashed, can elect a leader without
//! the writes only the crashed one holds. Two lost members of three are
//! beyond what Raft survives anyway. And a member whose config lists only
//! itself bootstraps a new one-member cluster on an empty data folder: list
//! every member in `peers` once a cluster has grown.

#[cfg(test)]
mod driver_tests;
pub mod format;
mod forward;
mod handle;
mod logger;
#[cfg(test)]
mod sim;
pub mod storage;
pub mod transport;

pub use handle::RaftHandle;

use crate::state::{ApplyResult, State};
use format::FormatError;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Entry,
    EntryType, Message,
};
use raft::{RawNode, StateRole};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use storage::{SledStorage, StoreError};
use tokio::sync::{mpsc, oneshot, watch};
use transport::{AddressBook, Feedback, Transport};

/// Why a proposal was not applied.
///
/// Two kinds of failure must not be confused: [`ProposeError::NotLeader`]
/// and [`ProposeError::Raft`] mean the command never reached a log, so it is
/// safe to send it again (to the leader named); [`ProposeError::OutcomeUnknown`]
/// means it was appended to a leader's log and may still commit, so sending
/// the same bytes again could apply it twice: only a retry that carries the
/// same idempotency key is safe.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProposeError {
    #[error("this scheduler is not the leader and knows no leader (election in progress, or cut off from a quorum)")]
    NotLeader { leader: Option<u64> },
    #[error("{OUTCOME_UNKNOWN}: {0}; it may still be applied: retry with the same idempotency key (a retry without one may apply it twice)")]
    OutcomeUnknown(String),
    #[error("a membership change is already in progress; wait until it is applied (muster admin status), then retry")]
    ChangeInProgress,
    #[error("not committed within {0:?}: no quorum of schedulers is reachable")]
    Timeout(Duration),
    #[error("the raft driver has stopped")]
    Stopped,
    #[error("raft rejected the proposal: {0}")]
    Raft(String),
    #[error("forwarding to the leader (node {leader}) failed: {message}")]
    Forward { leader: u64, message: String },
}

/// Run blocking disk I/O from the driver: on a multi-threaded runtime
/// through `block_in_place` (other tasks are moved off this worker while it
/// waits on the disk), as is elsewhere (tests on a current-thread runtime).
/// A stalled disk then stalls the driver alone; leases are not renewed
/// without a leadership the quorum confirmed (`leader::confirm_loop`).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// How an [`ProposeError::OutcomeUnknown`] begins, also when it travels back
/// from the leader to a follower as text (see `forward.rs`).
pub const OUTCOME_UNKNOWN: &str = "outcome unknown";

/// Why the driver stopped on its own. The daemon exits non-zero with it:
/// a member that cannot apply what the others apply must not go on serving.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("raft storage failed: {0}")]
    Store(#[from] StoreError),
    #[error("committed log entry {index} (term {term}) cannot be applied, stopping rather than diverge from the other members: {source}")]
    Entry {
        index: u64,
        term: u64,
        #[source]
        source: FormatError,
    },
    #[error(
        "committed membership change in log entry {index} does not decode, stopping: {message}"
    )]
    ConfChange { index: u64, message: String },
    #[error("the leader's snapshot at index {index} cannot be installed (storage is left as it was), stopping: {source}")]
    Snapshot {
        index: u64,
        #[source]
        source: FormatError,
    },
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
    /// Voters of the configuration being left while it is joint (they are
    /// among `members` too), sorted.
    pub voters_outgoing: Vec<u64>,
    /// This member is catching up since its data folder was begun and does
    /// not vote yet (see the module essay).
    pub catching_up: bool,
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
    #[error("the snapshot at index {index} in the data folder cannot be read: {source}")]
    Snapshot {
        index: u64,
        #[source]
        source: FormatError,
    },
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

/// Where peers' raft messages enter the driver.
pub type Inbound = mpsc::Sender<Message>;

/// Open the storage in `data_dir`, restore the state and spawn the driver.
/// Returns the handle, the sender the peer service feeds incoming raft
/// messages into, and the driver task.
/// The driver task ends with `Err` when the node must stop (see
/// [`DriverError`]); the caller exits with it.
pub fn start(
    settings: RaftSettings,
    data_dir: &std::path::Path,
    shutdown: watch::Receiver<bool>,
) -> Result<(RaftHandle, Inbound, DriverTask), StartError> {
    start_with(settings, data_dir, shutdown, |id, book, feedback| {
        Transport::new(id, book, feedback)
    })
}

/// The running driver: its end says why it stopped.
pub type DriverTask = tokio::task::JoinHandle<Result<(), DriverError>>;

/// [`start`] with the transport `make` builds (tests tap it).
fn start_with(
    settings: RaftSettings,
    data_dir: &std::path::Path,
    shutdown: watch::Receiver<bool>,
    make: impl FnOnce(u64, Arc<AddressBook>, mpsc::UnboundedSender<Feedback>) -> Transport,
) -> Result<(RaftHandle, Inbound, DriverTask), StartError> {
    let storage = SledStorage::open(data_dir)?;
    if storage.is_empty()? {
        // A data folder begun by this run: this member may be one that lost
        // its data. It catches up before it votes for a candidate with data.
        storage.set_catching_up(true)?;
        if settings.voters.is_empty() {
            storage.flush()?;
        } else {
            storage.bootstrap_snapshot(&initial_snapshot(&settings.voters))?;
        }
    }
    let catch_up = storage.catching_up()?.then(CatchUp::default);
    let (state, applied) = match storage.load_snapshot()? {
        Some((meta, data)) => (
            format::decode_snapshot(&data).map_err(|source| StartError::Snapshot {
                index: meta.index,
                source,
            })?,
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
    let transport = Arc::new(make(settings.id, book, feedback_tx));
    let state = Arc::new(RwLock::new(state));
    let (tx, rx) = mpsc::channel(65536);
    let (inbound_tx, inbound_rx) = mpsc::channel(65536);
    let (status_tx, status_rx) = watch::channel(RaftStatus {
        id: settings.id,
        applied,
        catching_up: catch_up.is_some(),
        ..Default::default()
    });
    let timeout = settings.commit_timeout;
    let waiting_reads = Arc::new(AtomicUsize::new(0));
    let driver = Driver {
        node,
        storage,
        state: state.clone(),
        transport: transport.clone(),
        pending: HashMap::new(),
        leader_term: 0,
        changes: HashMap::new(),
        leaving: Vec::new(),
        reads: HashMap::new(),
        parked_reads: Vec::new(),
        waiting_reads: waiting_reads.clone(),
        ticks: 0,
        reads_asked_at: 0,
        next_proposal: proposal_nonce(),
        applied,
        applied_term: 0,
        last_snapshot: applied,
        last_snapshot_at: std::time::Instant::now(),
        settings,
        status: status_tx,
        removed: false,
        catch_up,
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
            waiting_reads,
        },
        inbound_tx,
        task,
    ))
}

type Reply<T> = oneshot::Sender<Result<T, ProposeError>>;

/// Index and term of every cluster's initial snapshot.
pub const BOOTSTRAP_INDEX: u64 = 1;
const BOOTSTRAP_TERM: u64 = 1;

/// What every initial member of a new cluster starts from: a snapshot at
/// index 1, term 1, holding the first configuration and the empty state.
/// The log begins after it, so a member added later (whose log is empty)
/// is sent a snapshot, which carries the configuration, and never replays
/// membership changes onto a configuration it does not have.
pub(crate) fn initial_snapshot(voters: &[u64]) -> raft::eraftpb::Snapshot {
    let mut snap = raft::eraftpb::Snapshot::default();
    let meta = snap.mut_metadata();
    meta.index = BOOTSTRAP_INDEX;
    meta.term = BOOTSTRAP_TERM;
    meta.mut_conf_state().voters = voters.to_vec();
    snap.data = format::encode_snapshot(&State::new()).into();
    snap
}

/// A member catching up since its data folder was begun (see the module
/// essay): what leaders have told it so far.
#[derive(Debug, Default)]
struct CatchUp {
    /// The highest commit index a leader sent (or snapshot index).
    target: u64,
    /// The tick it first heard from a leader.
    heard_at: Option<u64>,
}

/// A read barrier waiting for its read index.
struct ReadWait {
    reply: Reply<()>,
    /// The (term, leader) it was last asked under; `None`: not yet asked.
    asked: Option<(u64, u64)>,
}

struct Driver {
    node: RawNode<SledStorage>,
    storage: SledStorage,
    state: Arc<RwLock<State>>,
    transport: Arc<Transport>,
    /// Proposals appended to this leader's log, waiting to be applied.
    pending: HashMap<u64, Reply<ApplyResult>>,
    /// The term in which `pending` (and `changes`) were appended.
    leader_term: u64,
    changes: HashMap<u64, Reply<()>>,
    /// Membership changes applied (the configuration is joint), answered
    /// once raft-rs has left the joint configuration, so that the next
    /// change can be made as soon as the caller hears of this one.
    leaving: Vec<Reply<()>>,
    /// Read barriers by their request context, until raft gives an index.
    reads: HashMap<Vec<u8>, ReadWait>,
    /// Read barriers with an index, until it is applied.
    parked_reads: Vec<(u64, Reply<()>)>,
    /// How many read barriers wait (reads and parked), for the handle.
    waiting_reads: Arc<AtomicUsize>,
    /// Ticks since start, and the tick when reads were last asked again.
    ticks: u64,
    reads_asked_at: u64,
    next_proposal: u64,
    applied: u64,
    applied_term: u64,
    last_snapshot: u64,
    last_snapshot_at: std::time::Instant,
    settings: RaftSettings,
    status: watch::Sender<RaftStatus>,
    removed: bool,
    /// `Some` while this member catches up (it votes only in a brand-new
    /// cluster's first election until then).
    catch_up: Option<CatchUp>,
}

impl Driver {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        mut inbound: mpsc::Receiver<Message>,
        mut feedback: mpsc::UnboundedReceiver<Feedback>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), DriverError> {
        let mut ticker = tokio::time::interval(self.settings.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.node.tick();
                    self.ticks += 1;
                }
                r = rx.recv() => {
                    let Some(r) = r else { break Ok(()) };
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
                    let Some(m) = m else { break Ok(()) };
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
                    None => break Ok(()),
                },
                _ = shutdown.changed() => break Ok(()),
            }
            self.ask_reads();
            if let Err(e) = self.on_ready().and_then(|()| Ok(self.check_caught_up()?)) {
                // Storage failure, or an entry this node cannot apply: stop
                // serving rather than diverge.
                tracing::error!("stopping the raft driver: {e}");
                break Err(e);
            }
            self.fail_if_not_leader();
        };
        let unknown = || ProposeError::OutcomeUnknown("the raft driver stopped".into());
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(unknown()));
        }
        for (_, reply) in self.changes.drain() {
            let _ = reply.send(Err(unknown()));
        }
        self.answer_leaving();
        result
    }

    /// Ask raft for the read index of every read barrier that needs it:
    /// new ones, ones asked under an earlier term or leader, and, every few
    /// heartbeats, all of them (a leader drops a read until it has committed
    /// an entry of its term, a follower drops it while it knows no leader,
    /// and neither says so). Asking is only done when it can be served; a
    /// barrier whose caller gave up is forgotten.
    fn ask_reads(&mut self) {
        self.reads.retain(|_, r| !r.reply.is_closed());
        self.parked_reads.retain(|(_, r)| !r.is_closed());
        let raft = &self.node.raft;
        let servable = if raft.state == StateRole::Leader {
            raft.commit_to_current_term()
        } else {
            raft.leader_id != 0
        };
        let now = (raft.term, raft.leader_id);
        let again =
            self.ticks >= self.reads_asked_at + 2 * self.settings.heartbeat_ticks.max(1) as u64;
        if servable && !self.reads.is_empty() {
            for (ctx, r) in self.reads.iter_mut() {
                if again || r.asked != Some(now) {
                    self.node.read_index(ctx.clone());
                    r.asked = Some(now);
                }
            }
            if again {
                self.reads_asked_at = self.ticks;
            }
        }
        self.waiting_reads.store(
            self.reads.len() + self.parked_reads.len(),
            Ordering::Relaxed,
        );
    }

    fn step(&mut self, mut m: Message) {
        use raft::eraftpb::MessageType as T;
        if let Some(c) = &mut self.catch_up {
            match m.get_msg_type() {
                // A member that may have lost its data grants no vote to a
                // candidate that holds more than the bootstrap: its empty
                // log would let a candidate without acknowledged writes win.
                T::MsgRequestVote | T::MsgRequestPreVote if m.index > BOOTSTRAP_INDEX => {
                    tracing::debug!(
                        candidate = m.from,
                        term = m.term,
                        "no vote while catching up with the leader"
                    );
                    return;
                }
                T::MsgAppend | T::MsgHeartbeat | T::MsgSnapshot
                    if m.term >= self.node.raft.term =>
                {
                    let index = if m.get_msg_type() == T::MsgSnapshot {
                        m.get_snapshot().get_metadata().index
                    } else {
                        m.commit
                    };
                    c.target = c.target.max(index);
                    c.heard_at.get_or_insert(self.ticks);
                }
                _ => {}
            }
        }
        if m.get_msg_type() == T::MsgHeartbeat {
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

    /// End the catch-up once this member holds what the leaders it heard
    /// from had committed: it has heard from a leader for two election
    /// timeouts (long enough for a stale, cut-off leader to have stepped
    /// down: check-quorum) and applied the highest commit index they sent.
    /// A member that is elected holds every committed entry already.
    fn check_caught_up(&mut self) -> Result<(), StoreError> {
        let Some(c) = &self.catch_up else {
            return Ok(());
        };
        let window = 2 * self.settings.election_ticks as u64;
        let leading = self.node.raft.state == StateRole::Leader;
        let heard_long_enough = c.heard_at.is_some_and(|t| self.ticks >= t + window);
        if !(leading || (heard_long_enough && self.applied >= c.target)) {
            return Ok(());
        }
        self.storage.set_catching_up(false)?;
        blocking(|| self.storage.flush())?;
        tracing::info!(
            applied = self.applied,
            "caught up with the cluster: this member votes again"
        );
        self.catch_up = None;
        Ok(())
    }

    fn not_leader(&self) -> ProposeError {
        let leader = Some(self.node.raft.leader_id).filter(|l| *l != 0);
        ProposeError::NotLeader { leader }
    }

    /// A deposed leader's pending proposals may or may not commit (a new
    /// leader that holds them commits them): fail them now with
    /// [`ProposeError::OutcomeUnknown`] so clients retry with their
    /// idempotency key instead of waiting, and so that nobody re-proposes
    /// the same bytes to the new leader (they could be applied twice).
    fn fail_if_not_leader(&mut self) {
        let raft = &self.node.raft;
        if (raft.state == StateRole::Leader && raft.term == self.leader_term)
            || (self.pending.is_empty() && self.changes.is_empty() && self.leaving.is_empty())
        {
            return;
        }
        let err = ProposeError::OutcomeUnknown(format!(
            "this scheduler appended the proposal as leader in term {} but lost the leadership \
             before it was applied (leader now: {})",
            self.leader_term,
            match raft.leader_id {
                0 => "unknown".to_string(),
                id => format!("node {id}"),
            }
        ));
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, reply) in self.changes.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        // Changes already applied stay applied; the next leader leaves the
        // joint configuration.
        self.answer_leaving();
    }

    /// Answer the membership changes that were waiting for the joint
    /// configuration to be left.
    fn answer_leaving(&mut self) {
        for reply in self.leaving.drain(..) {
            let _ = reply.send(Ok(()));
        }
    }

    fn request(&mut self, r: Request) {
        match r {
            Request::Propose { data, reply } => self.propose(data, reply),
            Request::Read { reply } => {
                // Asked for in `ask_reads`, once raft can serve it.
                let ctx = self.next_proposal.to_be_bytes().to_vec();
                self.next_proposal += 1;
                self.reads.insert(ctx, ReadWait { reply, asked: None });
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
        // Commands from followers of an older version come without the
        // format header: the log gets it either way.
        let data = format::wrap_command(data);
        match self.node.propose(id.to_be_bytes().to_vec(), data) {
            Ok(()) => {
                self.note_leader_term();
                self.pending.insert(id, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
            }
        }
    }

    /// Proposals wait under one leadership: start a new one if the term
    /// moved on (anything older was failed by `fail_if_not_leader`).
    fn note_leader_term(&mut self) {
        self.leader_term = self.node.raft.term;
    }

    fn change(&mut self, change: PeerChange, reply: Reply<()>) {
        if self.node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        // raft-rs turns a change proposed while another is unapplied, or
        // while the configuration is joint, into an empty entry without a
        // word: refuse it here instead.
        let raft = &self.node.raft;
        if raft.has_pending_conf()
            || !raft.prs().conf().to_conf_state().voters_outgoing.is_empty()
            || !self.changes.is_empty()
        {
            let _ = reply.send(Err(ProposeError::ChangeInProgress));
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
                self.note_leader_term();
                self.changes.insert(pid, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(ProposeError::Raft(e.to_string())));
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), DriverError> {
        if !self.node.has_ready() {
            // An idle node still takes a snapshot that fell due.
            return Ok(self.maybe_snapshot()?);
        }
        let mut rd = self.node.ready();
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
        }
        for rs in rd.take_read_states() {
            if let Some(wait) = self.reads.remove(&rs.request_ctx) {
                self.parked_reads.push((rs.index, wait.reply));
            }
        }
        self.apply_entries(rd.take_committed_entries())?;
        self.storage.append(rd.entries())?;
        if let Some(hs) = rd.hs() {
            self.storage.set_hard_state(hs)?;
        }
        // fsync: seconds on a sick disk. Tell tokio, so the other tasks on
        // this worker (agent sessions, requests) move to another thread.
        blocking(|| self.storage.flush())?;
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

    /// Install a leader's snapshot: decoded first, so that one this node
    /// cannot read stops it before its storage is replaced.
    fn install_snapshot(&mut self, snap: raft::eraftpb::Snapshot) -> Result<(), DriverError> {
        let index = snap.get_metadata().index;
        let s = format::decode_snapshot(&snap.data)
            .map_err(|source| DriverError::Snapshot { index, source })?;
        self.storage.apply_snapshot(&snap)?;
        tracing::info!(
            index,
            bytes = snap.data.len(),
            "installed a snapshot from the leader"
        );
        self.transport.book().set_replicated(s.peers.clone());
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = s;
        self.applied = index;
        self.applied_term = snap.get_metadata().term;
        self.last_snapshot = self.applied;
        self.last_snapshot_at = std::time::Instant::now();
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), DriverError> {
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
                        // An entry this node cannot read stops it: skipping
                        // it would leave it apart from members that apply it.
                        let cmd = format::decode_command(&e.data).map_err(|source| {
                            DriverError::Entry {
                                index: e.index,
                                term: e.term,
                                source,
                            }
                        })?;
                        let result = state.apply(&cmd);
                        if let Some(id) = proposal_id(&e.context) {
                            if let Some(reply) = self.pending.remove(&id) {
                                replies.push((reply, result));
                            }
                        }
                    }
                    EntryType::EntryConfChange => {
                        let mut cc = ConfChange::default();
                        cc.merge_from_bytes(&e.data)
                            .map_err(|err| conf_change_error(&e, err))?;
                        let cs = self.node.apply_conf_change(&cc);
                        self.store_conf_state(cs)?;
                    }
                    EntryType::EntryConfChangeV2 => {
                        let mut cc = ConfChangeV2::default();
                        cc.merge_from_bytes(&e.data)
                            .map_err(|err| conf_change_error(&e, err))?;
                        let cs = self.node.apply_conf_change(&cc);
                        let joint = cs.as_ref().is_ok_and(|cs| !cs.voters_outgoing.is_empty());
                        self.store_conf_state(cs)?;
                        self.record_members(&mut state, &cc, joint);
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
    fn record_members(&mut self, state: &mut State, cc: &ConfChangeV2, joint: bool) {
        if cc.get_changes().is_empty() {
            // raft-rs left the joint configuration: the changes are done.
            self.answer_leaving();
            return;
        }
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
            if joint {
                self.leaving.push(reply);
            } else {
                let _ = reply.send(Ok(()));
            }
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
        // At once when raft-rs needs one to send (a member added since the
        // last, or none yet: a data folder of an older scheduler, whose log
        // starts at index 1 without the configuration).
        let wanted = self.storage.take_snapshot_wanted() || self.last_snapshot == 0;
        let due = (since > 0 && wanted)
            || snapshot_due(since, self.last_snapshot_at.elapsed(), &self.settings);
        if !due {
            return Ok(());
        }
        self.last_snapshot_at = std::time::Instant::now();
        let data = format::encode_snapshot(&self.state.read().unwrap_or_else(|p| p.into_inner()));
        let conf = self.node.raft.prs().conf().to_conf_state();
        self.storage
            .save_snapshot(self.applied, self.applied_term, &conf, &data)?;
        blocking(|| self.storage.flush())?;
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
            voters_outgoing: {
                let mut v = conf.voters_outgoing.clone();
                v.sort_unstable();
                v
            },
            catching_up: self.catch_up.is_some(),
        };
        self.status.send_if_modified(|old| {
            let changed = *old != st;
            *old = st;
            changed
        });
    }
}

fn conf_change_error(e: &Entry, err: protobuf::ProtobufError) -> DriverError {
    DriverError::ConfChange {
        index: e.index,
        message: err.to_string(),
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
