//! `RaftPeer`: what schedulers serve each other — raft-rs messages in, and
//! proposals forwarded by followers to the leader.

use crate::raft::{Inbound, ProposeError, RaftHandle};
use crate::state::Command;
use muster_proto as pb;
use muster_proto::raft_peer_server::RaftPeer;
use protobuf::Message as _;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// The peer service. Only scheduler daemons may call it (a `node:`
/// certificate, or a local daemon without TLS; see [`crate::auth`]).
pub struct PeerService {
    raft: RaftHandle,
    inbound: Inbound,
    ctx: std::sync::Arc<super::Ctx>,
}

impl PeerService {
    /// A service feeding `inbound` (the Raft driver) and proposing on `raft`.
    pub fn new(raft: RaftHandle, inbound: Inbound, ctx: std::sync::Arc<super::Ctx>) -> PeerService {
        PeerService { raft, inbound, ctx }
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.ctx
            .auth
            .daemon(req, crate::auth::Daemon::Node)
            .map(|_| ())
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn send(
        &self,
        req: Request<Streaming<pb::RaftEnvelope>>,
    ) -> Result<Response<pb::PeerAck>, Status> {
        self.check(&req)?;
        let mut stream = req.into_inner();
        while let Some(env) = stream.next().await {
            let env = env?;
            let mut m = raft::eraftpb::Message::default();
            if let Err(e) = m.merge_from_bytes(&env.message) {
                return Err(Status::invalid_argument(format!(
                    "undecodable raft message from node {}: {e}",
                    env.from
                )));
            }
            if self.inbound.send(m).await.is_err() {
                return Err(Status::unavailable("the raft driver has stopped"));
            }
        }
        Ok(Response::new(pb::PeerAck {}))
    }

    async fn propose(
        &self,
        req: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        self.check(&req)?;
        let cmd = Command::decode(&req.into_inner().command)
            .map_err(|e| Status::invalid_argument(format!("undecodable command: {e}")))?;
        let resp = match self.raft.propose_local(cmd).await {
            Ok(result) => pb::ProposeResponse {
                result: bincode::serialize(&result).unwrap_or_default(),
                error: String::new(),
                leader_hint: 0,
            },
            Err(e) => pb::ProposeResponse {
                result: vec![],
                error: e.to_string(),
                leader_hint: match e {
                    ProposeError::NotLeader { leader } => leader.unwrap_or(0),
                    _ => 0,
                },
            },
        };
        Ok(Response::new(resp))
    }
}
