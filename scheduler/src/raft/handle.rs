//! [`RaftHandle`]: how the rest of the scheduler talks to the Raft driver —
//! propose (forwarding to the leader from a follower), read barriers,
//! membership changes, and read access to the applied state.

use super::transport::{self, Transport};
use super::{PeerChange, ProposeError, RaftStatus, Request};
use crate::state::{ApplyResult, Command, State};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// A cheap handle to the running driver.
#[derive(Clone)]
pub struct RaftHandle {
    /// Connections to leaders proposals were forwarded to, reused.
    pub(super) forwards: Arc<std::sync::Mutex<HashMap<u64, transport::PeerClient>>>,
    pub(super) tx: mpsc::Sender<Request>,
    pub(super) state: Arc<RwLock<State>>,
    pub(super) status: watch::Receiver<RaftStatus>,
    pub(super) transport: Arc<Transport>,
    pub(super) timeout: Duration,
}

impl RaftHandle {
    /// Propose a command and wait until it is committed and applied. On a
    /// follower the command is forwarded to the leader.
    pub async fn propose(&self, cmd: Command) -> Result<ApplyResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let local = async {
            self.tx
                .send(Request::Propose {
                    cmd: Box::new(cmd.clone()),
                    reply,
                })
                .await
                .map_err(|_| ProposeError::Stopped)?;
            rx.await.map_err(|_| ProposeError::Stopped)?
        };
        let r = tokio::time::timeout(self.timeout, local)
            .await
            .unwrap_or(Err(ProposeError::Timeout(self.timeout)));
        match r {
            Err(ProposeError::NotLeader {
                leader: Some(leader),
            }) if leader != self.id() => self.forward(leader, cmd).await,
            other => other,
        }
    }

    async fn forward(&self, leader: u64, cmd: Command) -> Result<ApplyResult, ProposeError> {
        let fail = |message: String| ProposeError::Forward { leader, message };
        let addr = self
            .transport
            .book()
            .get(leader)
            .ok_or_else(|| fail("no address known".into()))?;
        let cached = self
            .forwards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&leader)
            .cloned();
        let call = async {
            let mut client = match cached {
                Some(c) => c,
                None => {
                    let c = transport::connect(&addr).await.map_err(fail)?;
                    self.forwards
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(leader, c.clone());
                    c
                }
            };
            let resp = client
                .propose(muster_proto::ProposeRequest {
                    command: cmd.encode(),
                })
                .await
                .map_err(|s| {
                    // Drop a broken connection; the next forward reconnects.
                    self.forwards
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&leader);
                    fail(s.message().to_string())
                })?
                .into_inner();
            if !resp.error.is_empty() {
                return Err(fail(resp.error));
            }
            bincode::deserialize(&resp.result).map_err(|e| fail(e.to_string()))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(ProposeError::Timeout(self.timeout)))
    }

    /// Propose on this node only (the leader's side of a forwarded proposal).
    pub async fn propose_local(&self, cmd: Command) -> Result<ApplyResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let local = async {
            self.tx
                .send(Request::Propose {
                    cmd: Box::new(cmd),
                    reply,
                })
                .await
                .map_err(|_| ProposeError::Stopped)?;
            rx.await.map_err(|_| ProposeError::Stopped)?
        };
        tokio::time::timeout(self.timeout, local)
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
