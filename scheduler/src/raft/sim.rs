//! Deterministic scenario tests of replication: raft-rs `RawNode`s on
//! `MemStorage`, each applying the log to its own [`State`], connected by an
//! in-memory network that can partition and heal. Nobody campaigns by timer
//! (the election timeout is huge); the scripts elect leaders explicitly, so
//! every run takes the same steps.

use crate::state::{ApplyResult, Command, State};
use raft::eraftpb::{EntryType, Message};
use raft::storage::MemStorage;
use raft::{Config, RawNode, StateRole};
use std::collections::BTreeSet;

struct Replica {
    node: RawNode<MemStorage>,
    state: State,
}

/// A little cluster: replicas, messages in flight, and cut links.
struct Net {
    nodes: Vec<Replica>,
    in_flight: Vec<Message>,
    /// (from, to) pairs whose messages are dropped.
    cut: BTreeSet<(u64, u64)>,
}

impl Net {
    fn new(n: u64) -> Net {
        let voters: Vec<u64> = (1..=n).collect();
        let nodes = voters
            .iter()
            .map(|id| {
                let storage = MemStorage::new_with_conf_state((voters.clone(), vec![]));
                let cfg = Config {
                    id: *id,
                    election_tick: 1000,
                    heartbeat_tick: 1,
                    pre_vote: true,
                    ..Default::default()
                };
                Replica {
                    node: RawNode::new(&cfg, storage, &super::logger::logger()).unwrap(),
                    state: State::new(),
                }
            })
            .collect();
        Net {
            nodes,
            in_flight: vec![],
            cut: BTreeSet::new(),
        }
    }

    fn replica(&mut self, id: u64) -> &mut Replica {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Isolate `id` from everyone, both ways.
    fn isolate(&mut self, id: u64) {
        for other in 1..=self.nodes.len() as u64 {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    /// Process every node's Ready and deliver messages until quiet.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut progressed = false;
            for r in &mut self.nodes {
                if !r.node.has_ready() {
                    continue;
                }
                progressed = true;
                let mut rd = r.node.ready();
                self.in_flight.extend(rd.take_messages());
                if !rd.snapshot().is_empty() {
                    r.node
                        .mut_store()
                        .wl()
                        .apply_snapshot(rd.snapshot().clone())
                        .unwrap();
                    r.state = State::from_snapshot(&rd.snapshot().data).unwrap();
                }
                apply(&mut r.state, rd.take_committed_entries());
                r.node.mut_store().wl().append(rd.entries()).unwrap();
                if let Some(hs) = rd.hs() {
                    r.node.mut_store().wl().set_hardstate(hs.clone());
                }
                self.in_flight.extend(rd.take_persisted_messages());
                let mut light = r.node.advance(rd);
                if let Some(c) = light.commit_index() {
                    r.node.mut_store().wl().mut_hard_state().commit = c;
                }
                self.in_flight.extend(light.take_messages());
                apply(&mut r.state, light.take_committed_entries());
                r.node.advance_apply();
            }
            let msgs = std::mem::take(&mut self.in_flight);
            for m in msgs {
                progressed = true;
                if self.cut.contains(&(m.from, m.to)) {
                    continue;
                }
                let _ = self.replica(m.to).node.step(m);
            }
            if !progressed {
                return;
            }
        }
        panic!("the network did not settle");
    }

    /// Tick every node a few times (heartbeats) and settle.
    fn tick(&mut self, times: usize) {
        for _ in 0..times {
            for r in &mut self.nodes {
                r.node.tick();
            }
            self.settle();
        }
    }

    fn elect(&mut self, id: u64) {
        self.replica(id).node.campaign().unwrap();
        self.settle();
        assert_eq!(
            self.replica(id).node.raft.state,
            StateRole::Leader,
            "node {id} not elected"
        );
    }

    fn submit(&mut self, via: u64, name: &str) {
        let mut spec = crate::state::tests::spec(1, 1);
        spec.name = name.to_string();
        let cmd = Command::Submit {
            spec,
            user: "u".into(),
            at_ms: 1,
            request_id: Some(name.to_string()),
        };
        let _ = self.replica(via).node.propose(vec![], cmd.encode());
        self.settle();
    }

    fn names(&self, id: u64) -> BTreeSet<String> {
        self.nodes[(id - 1) as usize]
            .state
            .jobs
            .values()
            .map(|j| j.spec.name.clone())
            .collect()
    }

    fn digests(&self) -> BTreeSet<u64> {
        self.nodes.iter().map(|r| r.state.digest()).collect()
    }
}

fn apply(state: &mut State, entries: Vec<raft::eraftpb::Entry>) {
    for e in entries {
        if e.get_entry_type() == EntryType::EntryNormal && !e.data.is_empty() {
            let cmd = Command::decode(&e.data).unwrap();
            let r = state.apply(&cmd);
            assert!(!matches!(r, ApplyResult::Rejected(_)), "{r:?}");
        }
    }
}

#[test]
fn three_replicas_apply_the_same_log() {
    let mut net = Net::new(3);
    net.elect(1);
    for i in 0..20 {
        net.submit(1, &format!("j{i}"));
    }
    net.tick(3);
    assert_eq!(net.digests().len(), 1, "replicas diverged");
    assert_eq!(net.names(3).len(), 20);
}

#[test]
fn partitioned_leader_loses_uncommitted_writes_and_the_majority_goes_on() {
    let mut net = Net::new(3);
    net.elect(1);
    net.submit(1, "before");
    net.tick(2);
    net.isolate(1);
    // The old leader cannot commit: its write never applies anywhere.
    net.submit(1, "lost");
    assert!(!net.names(1).contains("lost"));
    net.elect(2);
    net.submit(2, "after");
    assert!(net.names(3).contains("after"));
    net.heal();
    net.tick(5);
    // Everyone converges on the majority's history.
    assert_eq!(net.digests().len(), 1);
    let names = net.names(1);
    assert!(names.contains("before") && names.contains("after"));
    assert!(
        !names.contains("lost"),
        "an uncommitted write from a deposed leader survived"
    );
}

#[test]
fn one_way_partition_still_elects_and_heals() {
    let mut net = Net::new(3);
    net.elect(1);
    net.submit(1, "a");
    // Node 1 can hear but not speak.
    net.cut.insert((1, 2));
    net.cut.insert((1, 3));
    net.elect(2);
    net.submit(2, "b");
    net.heal();
    net.tick(5);
    assert_eq!(net.digests().len(), 1);
    assert!(net.names(1).contains("b"));
}

#[test]
fn a_minority_cannot_commit() {
    let mut net = Net::new(5);
    net.elect(1);
    net.isolate(4);
    net.isolate(5);
    net.cut.insert((1, 3));
    net.cut.insert((3, 1));
    // Leader 1 reaches only node 2: 2 of 5 is no quorum.
    net.submit(1, "nope");
    net.tick(3);
    assert!(net.names(2).is_empty() && net.names(1).is_empty());
    net.heal();
    net.tick(5);
    assert_eq!(net.digests().len(), 1);
    assert!(
        net.names(5).contains("nope"),
        "committed once a quorum is back"
    );
}
