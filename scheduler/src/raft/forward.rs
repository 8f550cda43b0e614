//! A follower's side of forwarding: the proposals its clients make reach the
//! leader over one `RaftPeer.Forward` stream, many per message.
//!
//! One [`Forwarder`] task per leader keeps the stream. Each proposal gets an
//! id on that stream and waits for the answer with that id. Whatever is
//! queued when the task looks is sent as one batch, so under load a hundred
//! client requests cost the leader one message, not a hundred calls. When the
//! stream breaks (the leader died, a partition, the leader stepped down and
//! closed it), every proposal still waiting is failed with the reason: one
//! that was sent is [`ProposeError::OutcomeUnknown`] (the leader may have
//! appended it), one that was not is a plain forwarding error. A proposal
//! the leader had already committed is found again by the client's
//! idempotency key when it retries.

use super::transport;
use super::ProposeError;
use crate::state::ApplyResult;
use muster_proto as pb;
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

/// Most proposals in one message.
const BATCH: usize = 1024;
/// Proposals queued for the stream before callers wait.
const QUEUE: usize = 8192;

/// One proposal on its way to the leader.
struct Forwarded {
    data: Vec<u8>,
    reply: oneshot::Sender<Result<ApplyResult, ProposeError>>,
}

/// A handle on the task that forwards to one leader.
#[derive(Clone)]
pub(super) struct Forwarder {
    tx: mpsc::Sender<Forwarded>,
}

impl Forwarder {
    /// Start forwarding to `leader` at `addr`.
    pub(super) fn start(leader: u64, addr: String) -> Forwarder {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(leader, addr, rx));
        Forwarder { tx }
    }

    /// Whether the task has ended (its stream broke); a new one is needed.
    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Propose `data` (an encoded command) on the leader and wait for the
    /// answer.
    pub(super) async fn propose(
        &self,
        leader: u64,
        data: Vec<u8>,
    ) -> Result<ApplyResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let gone = || ProposeError::Forward {
            leader,
            message: "the connection to the leader closed".into(),
        };
        self.tx
            .send(Forwarded { data, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

type Waiting = HashMap<u64, oneshot::Sender<Result<ApplyResult, ProposeError>>>;

async fn run(leader: u64, addr: String, mut rx: mpsc::Receiver<Forwarded>) {
    let mut waiting = Waiting::new();
    let why = pump(leader, &addr, &mut rx, &mut waiting).await;
    if let Err(why) = &why {
        tracing::debug!(leader, "forwarding stream ended: {why}");
    }
    // Nothing more is taken; whatever was queued or sent is answered now.
    rx.close();
    let why = why.err().unwrap_or_else(|| "the forwarder stopped".into());
    for (_, reply) in waiting.drain() {
        let _ = reply.send(Err(ProposeError::OutcomeUnknown(format!(
            "sent to the leader (node {leader}), which did not answer: {why}"
        ))));
    }
    while let Ok(f) = rx.try_recv() {
        let _ = f.reply.send(Err(ProposeError::Forward {
            leader,
            message: why.clone(),
        }));
    }
}

/// Run the stream until it breaks (`Err` says why) or every handle is gone
/// and every answer is in (`Ok`).
async fn pump(
    leader: u64,
    addr: &str,
    rx: &mut mpsc::Receiver<Forwarded>,
    waiting: &mut Waiting,
) -> Result<(), String> {
    let mut client = transport::connect(addr).await?;
    let (batches, outbound) = mpsc::channel::<pb::ForwardBatch>(64);
    let mut answers = client
        .forward(ReceiverStream::new(outbound))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let mut next_id = 1u64;
    let mut open = true;
    while open || !waiting.is_empty() {
        tokio::select! {
            first = rx.recv(), if open => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                let mut proposals = Vec::with_capacity(16);
                let mut next = Some(first);
                while let Some(f) = next.take() {
                    waiting.insert(next_id, f.reply);
                    proposals.push(pb::ProposeRequest { command: f.data, id: next_id });
                    next_id += 1;
                    if proposals.len() < BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if batches.send(pb::ForwardBatch { proposals }).await.is_err() {
                    return Err("the stream to the leader closed".into());
                }
            }
            batch = answers.message() => match batch {
                Ok(Some(batch)) => {
                    for a in batch.answers {
                        if let Some(reply) = waiting.remove(&a.id) {
                            let _ = reply.send(decode(leader, a));
                        }
                    }
                }
                Ok(None) => return Err("the leader closed the stream".into()),
                Err(s) => return Err(s.message().to_string()),
            },
        }
    }
    Ok(())
}

fn decode(leader: u64, a: pb::ProposeResponse) -> Result<ApplyResult, ProposeError> {
    if let Some(why) = a.error.strip_prefix(super::OUTCOME_UNKNOWN) {
        // The leader's own text, without the advice that is added again.
        let why = why.trim_start_matches(": ");
        let why = why.split("; it may still be applied").next().unwrap_or(why);
        return Err(ProposeError::OutcomeUnknown(format!(
            "at the leader (node {leader}): {why}"
        )));
    }
    if !a.error.is_empty() {
        return Err(ProposeError::Forward {
            leader,
            message: a.error,
        });
    }
    bincode::deserialize(&a.result).map_err(|e| ProposeError::Forward {
        leader,
        message: format!("undecodable answer: {e}"),
    })
}
