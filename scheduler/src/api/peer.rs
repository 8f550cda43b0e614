//! `RaftPeer`: what schedulers serve each other — raft-rs messages in, and
//! proposals forwarded by followers to the leader.

use crate::raft::{Inbound, ProposeError, RaftHandle};
use crate::state::ApplyResult;
use crate::state::Command;
use muster_proto as pb;
use muster_proto::raft_peer_server::RaftPeer;
use protobuf::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
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

    /// What only the leader knows, for a follower's client.
    async fn leader_view(
        &self,
        req: Request<pb::LeaderViewRequest>,
    ) -> Result<Response<pb::LeaderViewResponse>, Status> {
        self.check(&req)?;
        Ok(Response::new(super::leader_view::serve(
            &self.ctx,
            req.get_ref(),
        )))
    }

    type ForwardStream = ReceiverStream<Result<pb::ForwardAnswers, Status>>;

    /// A follower's proposals: each is proposed here as it arrives, and the
    /// answers go back in batches as they are applied.
    async fn forward(
        &self,
        req: Request<Streaming<pb::ForwardBatch>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        self.check(&req)?;
        let mut inbound = req.into_inner();
        let (answer_tx, mut answer_rx) = mpsc::unbounded_channel::<pb::ProposeResponse>();
        let (out_tx, out_rx) = mpsc::channel(64);
        let raft = self.raft.clone();
        tokio::spawn(async move {
            while let Some(Ok(batch)) = inbound.next().await {
                for p in batch.proposals {
                    let raft = raft.clone();
                    let answer_tx = answer_tx.clone();
                    tokio::spawn(async move {
                        let _ = answer_tx.send(propose(&raft, p).await);
                    });
                }
            }
        });
        // Ends once the follower's stream has ended and every answer is out.
        tokio::spawn(async move {
            while let Some(first) = answer_rx.recv().await {
                let mut answers = vec![first];
                while answers.len() < FORWARD_BATCH {
                    match answer_rx.try_recv() {
                        Ok(a) => answers.push(a),
                        Err(_) => break,
                    }
                }
                if out_tx
                    .send(Ok(pb::ForwardAnswers { answers }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

/// Most answers in one message.
const FORWARD_BATCH: usize = 1024;

/// Propose one forwarded command here and say how it went.
async fn propose(raft: &RaftHandle, p: pb::ProposeRequest) -> pb::ProposeResponse {
    let id = p.id;
    let answer = |r: Result<ApplyResult, ProposeError>| match r {
        Ok(result) => pb::ProposeResponse {
            id,
            result: bincode::serialize(&result).unwrap_or_default(),
            error: String::new(),
            leader_hint: 0,
        },
        Err(e) => pb::ProposeResponse {
            id,
            result: vec![],
            error: e.to_string(),
            leader_hint: match e {
                ProposeError::NotLeader { leader } => leader.unwrap_or(0),
                _ => 0,
            },
        },
    };
    // Only what decodes reaches the log.
    if let Err(e) = Command::decode(&p.command) {
        return answer(Err(ProposeError::Raft(format!("undecodable command: {e}"))));
    }
    answer(raft.propose_local(p.command).await)
}
