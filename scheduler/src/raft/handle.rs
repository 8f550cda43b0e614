//! [`RaftHandle`]: how the rest of the scheduler talks to the Raft driver —
//! propose (forwarding to the leader from a follower), read barriers,
//! membership changes, and read access to the applied state.

use super::forward::Forwarder;
use super::transport::Transport;
use super::{PeerChange, ProposeError, RaftStatus, Request};
use crate::state::{ApplyResult, Command, State};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// A cheap handle to the running driver.
#[derive(Clone)]
pub struct RaftHandle {
    /// The stream that forwards proposals to the current leader, reused.
    pub(super) forwards: Arc<std::sync::Mutex<Option<(u64, Forwarder)>>>,
    pub(super) tx: mpsc::Sender<Request>,
    pub(super) state: Arc<RwLock<State>>,
    pub(super) status: watch::Receiver<RaftStatus>,
    pub(super) transport: Arc<Transport>,
    pub(super) timeout: Duration,
    /// Read barriers the driver holds (asked, or waiting for the apply).
    pub(super) waiting_reads: Arc<std::sync::atomic::AtomicUsize>,
}

impl RaftHandle {
    /// Propose a command and wait until it is committed and applied. On a
    /// follower the command is forwarded to the leader. Only a proposal that
    /// never reached a log ([`ProposeError::NotLeader`]) is sent on to the
    /// leader; [`ProposeError::OutcomeUnknown`] goes back to the caller.
    pub async fn propose(&self, cmd: Command) -> Result<ApplyResult, ProposeError> {
        let data = cmd.encode();
        let (id, leader, is_leader) = {
            let st = self.status.borrow();
            (st.id, st.leader, st.is_leader)
        };
        let call = async {
            if !is_leader && leader != 0 && leader != id {
                return self.forward(leader, data).await;
            }
            match self.local(data.clone()).await {
                Err(ProposeError::NotLeader {
                    leader: Some(leader),
                }) if leader != id => self.forward(leader, data).await,
                other => other,
            }
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(ProposeError::Timeout(self.timeout)))
    }

    /// Hand an encoded command to this node's driver and wait for its fate.
    async fn local(&self, data: Vec<u8>) -> Result<ApplyResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Propose { data, reply })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        // Handed over but never answered: the driver stopped after it may
        // have appended (or even applied) it, so its fate is unknown, not
        // "never sent".
        rx.await.map_err(|_| {
            ProposeError::OutcomeUnknown("the raft driver stopped before answering".into())
        })?
    }

    async fn forward(&self, leader: u64, data: Vec<u8>) -> Result<ApplyResult, ProposeError> {
        let forwarder =
            {
                let mut current = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
                match &*current {
                    Some((to, f)) if *to == leader && !f.is_closed() => f.clone(),
                    _ => {
                        let addr = self.transport.book().get(leader).ok_or_else(|| {
                            ProposeError::Forward {
                                leader,
                                message: "no address known".into(),
                            }
                        })?;
                        // Replacing the previous leader's forwarder lets it finish
                        // what it carries and end.
                        let f = Forwarder::start(leader, addr);
                        *current = Some((leader, f.clone()));
                        f
                    }
                }
            };
        forwarder.propose(leader, data).await
    }

    /// Propose `cmd` here and only here: for the leader's own commands
    /// (plans, preemptions, lost nodes, time-outs), which only the leader
    /// may decide. A node that is no longer the leader gets
    /// [`ProposeError::NotLeader`]; the command is never forwarded to the
    /// new leader, which judges for itself.
    pub async fn propose_as_leader(&self, cmd: Command) -> Result<ApplyResult, ProposeError> {
        self.propose_local(cmd.encode()).await
    }

    /// Propose on this node only (the leader's side of a forwarded proposal):
    /// `data` is an encoded command.
    pub async fn propose_local(&self, data: Vec<u8>) -> Result<ApplyResult, ProposeError> {
        tokio::time::timeout(self.timeout, self.local(data))
            .await
            .unwrap_or(Err(ProposeError::Timeout(self.timeout)))
    }

    /// Wait until this node has applied everything committed before the call
    /// (Raft ReadIndex): a read after this is linearizable.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        let wait = async {
            self.tx
                .send(Request::Read { reply })
                .await
                .map_err(|_| ProposeError::Stopped)?;
            rx.await.map_err(|_| ProposeError::Stopped)?
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .unwrap_or(Err(ProposeError::Timeout(self.timeout)))
    }

    /// Add or remove a member (joint consensus); waits until applied.
    pub async fn change_peers(&self, change: PeerChange) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        let wait = async {
            self.tx
                .send(Request::Change { change, reply })
                .await
                .map_err(|_| ProposeError::Stopped)?;
            rx.await.map_err(|_| ProposeError::Stopped)?
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .unwrap_or(Err(ProposeError::Timeout(self.timeout)))
    }

    /// How many read barriers the driver holds now.
    pub fn waiting_reads(&self) -> usize {
        self.waiting_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The applied state. Hold the guard briefly: the driver waits for it.
    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The latest status; `changed()` on the receiver wakes on every apply.
    pub fn status(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// This node's Raft id.
    pub fn id(&self) -> u64 {
        self.status.borrow().id
    }

    /// Where a member can be reached.
    pub fn address_of(&self, id: u64) -> Option<String> {
        self.transport.book().get(id)
    }

    /// Health of this node's links to its peers.
    pub fn links(&self) -> BTreeMap<u64, String> {
        self.transport.links()
    }
}
