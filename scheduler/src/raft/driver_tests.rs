//! The real driver (sled storage, Ready loop, handle) as member 1 of a
//! cluster whose other members are raft-rs `RawNode`s on `MemStorage` that
//! the test steps itself. Member 1's outbound messages come out of a tapped
//! transport; the test decides which are delivered. The other members never
//! campaign on their own, so each script chooses who leads.

use super::*;
use crate::state::Command;
use raft::storage::MemStorage;
use std::collections::BTreeSet;
use std::time::Instant;

struct Peer {
    node: RawNode<MemStorage>,
    state: State,
}

struct Harness {
    handle: RaftHandle,
    inbound: Inbound,
    task: Option<DriverTask>,
    tap: mpsc::UnboundedReceiver<Message>,
    peers: BTreeMap<u64, Peer>,
    /// (from, to) links whose messages are dropped.
    cut: BTreeSet<(u64, u64)>,
    /// Messages of this type are dropped.
    drop_type: Option<raft::eraftpb::MessageType>,
    dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
}

fn settings(voters: &[u64]) -> RaftSettings {
    RaftSettings {
        id: 1,
        voters: voters.to_vec(),
        peers: BTreeMap::new(),
        tick: Duration::from_millis(10),
        election_ticks: 20,
        heartbeat_ticks: 2,
        snapshot_entries: 1_000_000,
        snapshot_interval: Duration::from_secs(3600),
        commit_timeout: Duration::from_secs(2),
    }
}

fn harness(voters: &[u64]) -> Harness {
    harness_with(voters, BTreeMap::new())
}

/// A harness whose member 1 knows these peer addresses (for forwarding).
fn harness_with(voters: &[u64], peers: BTreeMap<u64, String>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tap_tx, tap) = mpsc::unbounded_channel();
    let settings = RaftSettings {
        peers,
        ..settings(voters)
    };
    let (handle, inbound, task) = start_with(settings, dir.path(), stop_rx, {
        move |id, book, feedback| Transport::tapped(id, book, feedback, tap_tx)
    })
    .unwrap();
    let peers = voters
        .iter()
        .filter(|id| **id != 1)
        .map(|id| (*id, peer(*id, Some(voters))))
        .collect();
    Harness {
        handle,
        inbound,
        task: Some(task),
        tap,
        peers,
        cut: BTreeSet::new(),
        drop_type: None,
        dir,
        stop: stop_tx,
    }
}

/// A `RawNode` peer: an initial member of a cluster of `voters` (begun from
/// the same initial snapshot as the driver), or with `None` a member to be
/// added, with an empty log.
fn peer(id: u64, voters: Option<&[u64]>) -> Peer {
    let storage = MemStorage::new();
    if let Some(voters) = voters {
        storage
            .wl()
            .apply_snapshot(initial_snapshot(voters))
            .unwrap();
    }
    let cfg = raft::Config {
        id,
        election_tick: 100_000,
        heartbeat_tick: 1,
        pre_vote: true,
        ..Default::default()
    };
    let node = RawNode::new(&cfg, storage, &logger::logger()).unwrap();
    Peer {
        node,
        state: State::new(),
    }
}

/// A submission without an idempotency key: applied twice, it makes two jobs.
fn submit(name: &str) -> Command {
    let mut spec = crate::state::tests::spec(1, 1);
    spec.name = name.to_string();
    Command::Submit {
        spec,
        user: "u".into(),
        at_ms: 1,
        request_id: None,
    }
}

fn jobs_named(state: &State, name: &str) -> usize {
    state.jobs.values().filter(|j| j.spec.name == name).count()
}

impl Harness {
    /// One round: let the driver run, tick the peers, process their
    /// Readies, and deliver every message not on a cut link.
    async fn round(&mut self) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut msgs = Vec::new();
        while let Ok(m) = self.tap.try_recv() {
            msgs.push(m);
        }
        for p in self.peers.values_mut() {
            p.node.tick();
        }
        self.settle_peers(msgs).await;
    }

    /// Deliver `msgs` and whatever the peers send in answer among
    /// themselves until they are quiet; messages to member 1 go to the
    /// driver.
    async fn settle_peers(&mut self, mut msgs: Vec<Message>) {
        for _ in 0..100 {
            for p in self.peers.values_mut() {
                msgs.extend(ready(p));
            }
            if msgs.is_empty() {
                return;
            }
            for m in std::mem::take(&mut msgs) {
                if self.cut.contains(&(m.from, m.to)) || self.drop_type == Some(m.get_msg_type()) {
                    continue;
                }
                if m.to == 1 {
                    self.inbound.send(m).await.unwrap();
                } else if let Some(p) = self.peers.get_mut(&m.to) {
                    let _ = p.node.step(m);
                }
            }
        }
    }

    /// Run rounds until `done`, at most about five seconds.
    async fn until(&mut self, what: &str, done: impl Fn(&Harness) -> bool) {
        for _ in 0..1000 {
            if done(self) {
                return;
            }
            self.round().await;
        }
        panic!("never: {what}");
    }

    fn status(&self) -> RaftStatus {
        self.handle.status().borrow().clone()
    }

    fn isolate(&mut self, id: u64) {
        for other in [1, 2, 3] {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    /// Stop the driver and start it again on an empty data folder, as a
    /// member whose disk was replaced and that starts with the config it
    /// had (`voters`: it bootstraps; empty: it joins).
    async fn restart_wiped(&mut self, voters: &[u64]) {
        let _ = self.stop.send(true);
        self.stopped().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (tap_tx, tap) = mpsc::unbounded_channel();
        let (handle, inbound, task) = start_with(settings(voters), dir.path(), stop_rx, {
            move |id, book, feedback| Transport::tapped(id, book, feedback, tap_tx)
        })
        .unwrap();
        self.handle = handle;
        self.inbound = inbound;
        self.task = Some(task);
        self.tap = tap;
        self.dir = dir;
        self.stop = stop_tx;
    }

    /// The driver's end, once it has stopped.
    async fn stopped(&mut self) -> Result<(), DriverError> {
        let task = self.task.take().expect("driver task");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the driver did not stop")
            .expect("the driver task panicked")
    }
}

/// Process one peer's Ready the documented way; returns what it sends.
fn ready(p: &mut Peer) -> Vec<Message> {
    if !p.node.has_ready() {
        return vec![];
    }
    let mut out = Vec::new();
    let mut rd = p.node.ready();
    out.extend(rd.take_messages());
    if !rd.snapshot().is_empty() {
        let snap = rd.snapshot().clone();
        p.state = format::decode_snapshot(&snap.data).unwrap();
        p.node.mut_store().wl().apply_snapshot(snap).unwrap();
    }
    apply(p, rd.take_committed_entries());
    p.node.mut_store().wl().append(rd.entries()).unwrap();
    if let Some(hs) = rd.hs() {
        p.node.mut_store().wl().set_hardstate(hs.clone());
    }
    out.extend(rd.take_persisted_messages());
    let mut light = p.node.advance(rd);
    if let Some(c) = light.commit_index() {
        p.node.mut_store().wl().mut_hard_state().commit = c;
    }
    out.extend(light.take_messages());
    apply(p, light.take_committed_entries());
    p.node.advance_apply();
    out
}

/// Apply committed entries as the driver does: commands to the state,
/// membership changes to raft (a change raft refuses is left unapplied, as
/// the old driver did, so a test sees the member that cannot lead).
fn apply(p: &mut Peer, entries: Vec<Entry>) {
    for e in entries {
        let cs = match e.get_entry_type() {
            EntryType::EntryNormal => {
                if !e.data.is_empty() {
                    p.state.apply(&format::decode_command(&e.data).unwrap());
                }
                continue;
            }
            EntryType::EntryConfChange => {
                let cc = ConfChange::parse_from_bytes(&e.data).unwrap();
                p.node.apply_conf_change(&cc)
            }
            EntryType::EntryConfChangeV2 => {
                let cc = ConfChangeV2::parse_from_bytes(&e.data).unwrap();
                p.node.apply_conf_change(&cc)
            }
        };
        if let Ok(cs) = cs {
            p.node.mut_store().wl().set_conf_state(cs);
        }
    }
}

/// Member 1 leads and every member has applied its first entry.
async fn elect_member_1(h: &mut Harness) {
    h.until("member 1 leads", |h| h.status().is_leader).await;
    h.until("the term's first entry is applied everywhere", |h| {
        let applied = h.status().applied;
        applied > BOOTSTRAP_INDEX
            && h.peers
                .values()
                .all(|p| p.node.raft.raft_log.applied >= applied)
    })
    .await;
}

/// Member 2's side of forwarding, for the test: every forwarded command is
/// handed to the test (which proposes it on member 2) and never answered.
struct ForwardSink(mpsc::UnboundedSender<Vec<u8>>);

#[tonic::async_trait]
impl muster_proto::raft_peer_server::RaftPeer for ForwardSink {
    async fn send(
        &self,
        _: tonic::Request<tonic::Streaming<muster_proto::RaftEnvelope>>,
    ) -> Result<tonic::Response<muster_proto::PeerAck>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    async fn leader_view(
        &self,
        _: tonic::Request<muster_proto::LeaderViewRequest>,
    ) -> Result<tonic::Response<muster_proto::LeaderViewResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }

    type ForwardStream =
        tokio_stream::wrappers::ReceiverStream<Result<muster_proto::ForwardAnswers, tonic::Status>>;

    async fn forward(
        &self,
        req: tonic::Request<tonic::Streaming<muster_proto::ForwardBatch>>,
    ) -> Result<tonic::Response<Self::ForwardStream>, tonic::Status> {
        let mut batches = req.into_inner();
        let sink = self.0.clone();
        let (answers, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let _keep_open = answers;
            while let Ok(Some(b)) = batches.message().await {
                for p in b.proposals {
                    let _ = sink.send(p.command);
                }
            }
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

/// Serve [`ForwardSink`] on a loopback port; returns its address and what
/// it receives.
async fn forward_sink() -> (String, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(muster_proto::raft_peer_server::RaftPeerServer::new(
                ForwardSink(tx),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

#[tokio::test]
async fn a_proposal_appended_by_a_deposed_leader_is_reported_unknown_and_applied_once() {
    // Member 1 can forward to member 2: whatever it forwards, member 2
    // proposes, as the real peer service would.
    let (addr2, mut forwarded) = forward_sink().await;
    let mut h = harness_with(&[1, 2, 3], BTreeMap::from([(2, addr2)]));
    elect_member_1(&mut h).await;
    // Member 1's append reaches member 2 only, and nothing gets back to 1:
    // the entry is in two logs but member 1 cannot know it committed.
    h.cut.extend([(1, 3), (3, 1), (2, 1)]);
    let handle = h.handle.clone();
    let proposal = tokio::spawn(async move { handle.propose(submit("once")).await });
    h.until("member 2 holds the proposal", |h| {
        h.peers[&2].node.raft.raft_log.last_index() > h.status().applied
    })
    .await;
    // Member 2 takes over (member 3 votes for it) and commits the entry.
    h.isolate(1);
    h.peers.get_mut(&2).unwrap().node.campaign().unwrap();
    h.settle_peers(vec![]).await;
    assert_eq!(h.peers[&2].node.raft.state, StateRole::Leader);
    assert_eq!(jobs_named(&h.peers[&3].state, "once"), 1);
    // Member 1 hears of the new leader and steps down.
    h.cut.clear();
    h.until("member 1 follows member 2", |h| h.status().leader == 2)
        .await;
    // Whatever member 1 forwards reaches member 2's log.
    for _ in 0..40 {
        h.round().await;
        while let Ok(data) = forwarded.try_recv() {
            let _ = h.peers.get_mut(&2).unwrap().node.propose(vec![], data);
        }
    }
    h.until("member 1 caught up", |h| {
        h.status().applied >= h.peers[&2].node.raft.raft_log.committed
    })
    .await;
    assert_eq!(jobs_named(&h.handle.state(), "once"), 1, "applied twice");
    for p in h.peers.values() {
        assert_eq!(jobs_named(&p.state, "once"), 1, "applied twice");
    }
    let answer = tokio::time::timeout(Duration::from_secs(1), proposal)
        .await
        .expect("the proposer is answered")
        .unwrap();
    match answer {
        Err(ProposeError::OutcomeUnknown(why)) => assert!(why.contains("lost the leadership")),
        other => panic!("expected OutcomeUnknown, got {other:?}"),
    }
    let e = ProposeError::OutcomeUnknown("x".into()).to_string();
    assert!(e.contains("outcome unknown") && e.contains("same idempotency key"));
}

#[tokio::test]
async fn a_read_right_after_an_election_is_served_once_the_term_has_a_commit() {
    let mut h = harness(&[1, 2, 3]);
    // Member 1 wins the vote, but no acknowledgement of its first entry
    // gets back yet: it has committed nothing in its term.
    h.drop_type = Some(raft::eraftpb::MessageType::MsgAppendResponse);
    h.until("member 1 leads", |h| h.status().is_leader).await;
    let started = Instant::now();
    let handle = h.handle.clone();
    let read = tokio::spawn(async move { handle.read_barrier().await });
    for _ in 0..10 {
        h.round().await;
    }
    assert!(!read.is_finished(), "served before the term had a commit");
    assert_eq!(h.handle.waiting_reads(), 1);
    assert_eq!(h.status().applied, BOOTSTRAP_INDEX, "the term has a commit");
    h.drop_type = None;
    h.until("the read is served", |_| read.is_finished()).await;
    assert_eq!(read.await.unwrap(), Ok(()));
    assert!(
        started.elapsed() < settings(&[1]).commit_timeout,
        "the read waited out the commit timeout"
    );
    h.round().await;
    assert_eq!(h.handle.waiting_reads(), 0, "a served read is forgotten");
}

#[tokio::test]
async fn a_read_that_times_out_is_forgotten() {
    let mut h = harness(&[1, 2, 3]);
    elect_member_1(&mut h).await;
    h.isolate(1);
    let handle = h.handle.clone();
    let read = tokio::spawn(async move { handle.read_barrier().await });
    h.until("the read gives up", |_| read.is_finished()).await;
    assert!(matches!(read.await.unwrap(), Err(ProposeError::Timeout(_))));
    h.until("the driver forgets it", |h| h.handle.waiting_reads() == 0)
        .await;
}

fn add(id: u64) -> PeerChange {
    PeerChange::Add {
        id,
        address: format!("127.0.0.1:{id}"),
    }
}

#[tokio::test]
async fn a_second_membership_change_while_one_is_in_progress_is_refused() {
    let mut h = harness(&[1]);
    h.until("member 1 leads", |h| {
        h.status().is_leader && h.status().applied > BOOTSTRAP_INDEX
    })
    .await;
    // Entering the joint configuration commits on member 1 alone; leaving
    // it needs member 2, which never answers: the change stays in progress.
    let handle = h.handle.clone();
    let first = tokio::spawn(async move { handle.change_peers(add(2)).await });
    h.until("the joint configuration is applied", |h| {
        h.status().members.iter().any(|m| m.id == 2)
    })
    .await;
    let started = Instant::now();
    let second = h.handle.change_peers(add(3)).await;
    assert_eq!(second, Err(ProposeError::ChangeInProgress));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert!(second
        .unwrap_err()
        .to_string()
        .contains("a membership change is already in progress"));
    first.abort();
}

#[tokio::test]
async fn membership_changes_one_after_the_other_both_go_through() {
    let mut h = harness(&[1, 2, 3]);
    elect_member_1(&mut h).await;
    // Members 4 and 5 never answer; 1, 2 and 3 are a quorum of every
    // configuration on the way.
    for id in [4, 5] {
        let handle = h.handle.clone();
        let change = tokio::spawn(async move { handle.change_peers(add(id)).await });
        h.until("the change is answered", |_| change.is_finished())
            .await;
        assert_eq!(change.await.unwrap(), Ok(()), "adding {id}");
    }
    let voters: Vec<u64> = h.status().members.iter().map(|m| m.id).collect();
    assert_eq!(voters, vec![1, 2, 3, 4, 5]);
}

/// Send raw entry bytes through the driver, as a buggy or newer member's
/// entry would arrive.
async fn propose_raw(h: &Harness, data: Vec<u8>) {
    let (reply, _rx) = oneshot::channel();
    h.handle
        .tx
        .send(Request::Propose { data, reply })
        .await
        .unwrap();
}

#[tokio::test]
async fn an_undecodable_entry_stops_the_driver_naming_its_index() {
    let mut h = harness(&[1]);
    h.until("member 1 leads", |h| {
        h.status().is_leader && h.status().applied > BOOTSTRAP_INDEX
    })
    .await;
    let index = h.status().last_index + 1;
    propose_raw(&h, vec![0xFF, b'M', b'C', 1, 0xEE, 0xEE]).await;
    let err = h.stopped().await.unwrap_err();
    assert!(
        matches!(err, DriverError::Entry { index: i, source: FormatError::Undecodable { .. }, .. } if i == index),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&format!("log entry {index}")),
        "{err}"
    );
    // Nothing after it was applied, and the state did not pretend otherwise.
    assert!(h.status().applied < index);
}

#[tokio::test]
async fn an_entry_of_a_newer_format_is_refused_by_name() {
    let mut h = harness(&[1]);
    h.until("member 1 leads", |h| {
        h.status().is_leader && h.status().applied > BOOTSTRAP_INDEX
    })
    .await;
    let mut data = format::encode_command(&submit("future"));
    data[3] = format::COMMAND_VERSION + 1;
    propose_raw(&h, data).await;
    let err = h.stopped().await.unwrap_err();
    assert!(
        matches!(
            err,
            DriverError::Entry {
                source: FormatError::Newer { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer scheduler"), "{err}");
    assert_eq!(jobs_named(&h.handle.state(), "future"), 0);
}

#[tokio::test]
async fn an_undecodable_snapshot_stops_the_driver_before_storage_is_replaced() {
    let mut h = harness(&[1, 2]);
    h.round().await;
    let mut snap = raft::eraftpb::Snapshot::default();
    snap.mut_metadata().index = 10;
    snap.mut_metadata().term = 5;
    snap.mut_metadata().mut_conf_state().voters = vec![1, 2];
    snap.data = vec![0xFF, b'M', b'S', b'N', b'A', b'P', b'V', 1, 0xEE].into();
    let mut m = Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgSnapshot);
    m.from = 2;
    m.to = 1;
    m.term = 5;
    m.set_snapshot(snap);
    h.inbound.send(m).await.unwrap();
    let err = h.stopped().await.unwrap_err();
    assert!(
        matches!(err, DriverError::Snapshot { index: 10, .. }),
        "{err:?}"
    );
    // The storage still holds what it held: no snapshot.
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        match SledStorage::open(h.dir.path()) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("reopen: {e}"),
        }
    };
    let (meta, _) = s.load_snapshot().unwrap().unwrap();
    assert_eq!(meta.index, BOOTSTRAP_INDEX, "only the initial snapshot");
}

fn leader_among(h: &Harness, ids: &[u64]) -> Option<u64> {
    ids.iter().copied().find(|id| match id {
        1 => h.status().is_leader,
        _ => h.peers[id].node.raft.state == StateRole::Leader,
    })
}

/// Issue 11 #3: a cluster grown from one member before any snapshot was
/// taken. The members added never learned the first configuration (they
/// replayed "add node" onto an empty one, which raft refuses), so with
/// member 1 gone nobody could campaign. Now the log begins after an
/// initial snapshot and the joiners are sent one that names them.
#[tokio::test]
async fn a_cluster_grown_from_one_member_before_any_snapshot_elects_without_it() {
    let mut h = harness(&[1]);
    h.until("member 1 leads", |h| {
        h.status().is_leader && h.status().applied > BOOTSTRAP_INDEX
    })
    .await;
    for id in [2, 3] {
        h.peers.insert(id, peer(id, None));
        let handle = h.handle.clone();
        let change = tokio::spawn(async move { handle.change_peers(add(id)).await });
        h.until("the change is answered", |_| change.is_finished())
            .await;
        assert_eq!(change.await.unwrap(), Ok(()), "adding {id}");
    }
    let handle = h.handle.clone();
    let write = tokio::spawn(async move { handle.propose(submit("grown")).await });
    h.until("the write is answered", |_| write.is_finished())
        .await;
    assert!(write.await.unwrap().is_ok());
    h.until("members 2 and 3 know the configuration", |h| {
        [2, 3].iter().all(|id| {
            let conf = h.peers[id].node.raft.prs().conf().to_conf_state();
            conf.voters == [1, 2, 3] && conf.voters_outgoing.is_empty()
        })
    })
    .await;
    // Member 1 stops for good.
    let _ = h.stop.send(true);
    h.stopped().await.unwrap();
    h.isolate(1);
    h.peers.get_mut(&2).unwrap().node.campaign().unwrap();
    h.settle_peers(vec![]).await;
    assert_eq!(
        leader_among(&h, &[2, 3]),
        Some(2),
        "member 2 could not be elected"
    );
    // And the new leader commits.
    h.peers
        .get_mut(&2)
        .unwrap()
        .node
        .propose(vec![], format::encode_command(&submit("after")))
        .unwrap();
    h.settle_peers(vec![]).await;
    for _ in 0..5 {
        h.round().await;
    }
    for id in [2, 3] {
        assert_eq!(jobs_named(&h.peers[&id].state, "grown"), 1, "member {id}");
        assert_eq!(jobs_named(&h.peers[&id].state, "after"), 1, "member {id}");
    }
}

/// Issue 11 #2: member 3 is down, members 1 and 2 commit E, member 1 loses
/// its disk and starts again with its old config, member 2 crashes, member
/// 3 comes back. Member 1's empty log must not elect member 3, which lacks
/// E (no leader is acceptable, losing E is not); once member 2 is back, E
/// survives everywhere.
#[tokio::test]
async fn a_wiped_member_does_not_elect_a_leader_without_an_acknowledged_write() {
    for voters in [&[1u64, 2, 3][..], &[]] {
        let mut h = harness(&[1, 2, 3]);
        elect_member_1(&mut h).await;
        let handle = h.handle.clone();
        let before = tokio::spawn(async move { handle.propose(submit("before")).await });
        h.until("the first write is answered", |_| before.is_finished())
            .await;
        assert!(before.await.unwrap().is_ok());
        h.until("member 3 has it", |h| {
            jobs_named(&h.peers[&3].state, "before") == 1
        })
        .await;
        h.isolate(3);
        let handle = h.handle.clone();
        let e = tokio::spawn(async move { handle.propose(submit("E")).await });
        h.until("E is acknowledged", |_| e.is_finished()).await;
        assert!(e.await.unwrap().is_ok(), "E acknowledged by 1 and 2");
        assert_eq!(jobs_named(&h.peers[&3].state, "E"), 0);
        // Member 1's disk is wiped; it starts again (bootstrapping from its
        // config, as when no peer answered its probe, or joining); member 2
        // crashes before member 1 hears from it; member 3 returns.
        h.restart_wiped(voters).await;
        h.cut.clear();
        h.isolate(2);
        for _ in 0..60 {
            let p3 = h.peers.get_mut(&3).unwrap();
            if p3.node.raft.state == StateRole::Follower {
                p3.node.campaign().unwrap();
            }
            h.round().await;
            assert_ne!(
                leader_among(&h, &[1, 3]),
                Some(3),
                "member 3 was elected without E ({voters:?})"
            );
            assert!(
                !h.status().is_leader,
                "member 1 was elected with an empty log"
            );
        }
        assert!(h.status().catching_up);
        if voters.is_empty() {
            // (A joiner is sent a snapshot, which `MemStorage` peers make
            // without the state's bytes: the rest is for the bootstrap.)
            continue;
        }
        // Member 2 returns and campaigns: it is elected, and E is everywhere.
        h.cut.clear();
        h.peers.get_mut(&2).unwrap().node.campaign().unwrap();
        h.until("a leader with E", |h| {
            leader_among(h, &[1, 2, 3]).is_some()
                && jobs_named(&h.handle.state(), "E") == 1
                && [2, 3]
                    .iter()
                    .all(|id| jobs_named(&h.peers[id].state, "E") == 1)
        })
        .await;
        // Once member 1 has caught up, it votes again.
        h.until("member 1 caught up", |h| !h.status().catching_up)
            .await;
    }
}
