//! The peer transport: raft-rs messages between schedulers over gRPC.
//!
//! Each peer gets one sender task fed by a bounded queue. The task keeps one
//! client stream (`RaftPeer.Send`) open to the peer and pushes envelopes into
//! it; when the connection fails it reports the peer unreachable to raft (so
//! the leader probes instead of pipelining), drops what it had, and reconnects
//! with a short backoff. A full queue drops messages rather than block the
//! Raft driver: Raft retransmits. Snapshots go in a call of their own, so
//! their delivery can be reported back to raft-rs.
//!
//! Addresses come from this node's configuration first (so tests can put a
//! fault-injecting proxy between two nodes) and otherwise from the replicated
//! member list.

use muster_proto::raft_peer_client::RaftPeerClient;
use muster_proto::RaftEnvelope;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Largest peer message (a snapshot carries the whole state).
pub const MAX_PEER_MESSAGE: usize = 512 << 20;
const QUEUE: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const BACKOFF: Duration = Duration::from_millis(100);
/// HTTP/2 pings find a connection that died without a FIN or RST (a cut
/// link, a peer frozen mid-write) instead of waiting on it forever.
const KEEPALIVE: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// A stream that takes no message for this long is replaced.
const STALL: Duration = Duration::from_secs(2);

/// What the transport tells the Raft driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    Unreachable(u64),
    Snapshot { to: u64, ok: bool },
}

/// Peer addresses: configured ones win over replicated ones.
#[derive(Debug, Default)]
pub struct AddressBook {
    configured: BTreeMap<u64, String>,
    replicated: RwLock<BTreeMap<u64, String>>,
}

impl AddressBook {
    /// A book with this node's configured addresses.
    pub fn new(configured: BTreeMap<u64, String>) -> AddressBook {
        AddressBook {
            configured,
            replicated: RwLock::new(BTreeMap::new()),
        }
    }

    /// Replace the replicated addresses (after a membership change or snapshot).
    pub fn set_replicated(&self, peers: BTreeMap<u64, String>) {
        *self.replicated.write().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    /// The address of `id`, if known.
    pub fn get(&self, id: u64) -> Option<String> {
        self.configured.get(&id).cloned().or_else(|| {
            self.replicated
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .cloned()
        })
    }
}

/// Outbound messages to every peer.
pub struct Transport {
    id: u64,
    book: Arc<AddressBook>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    feedback: mpsc::UnboundedSender<Feedback>,
    links: Arc<Mutex<BTreeMap<u64, String>>>,
    /// Tests: every outbound message goes here instead of the network.
    tap: Option<mpsc::UnboundedSender<Message>>,
}

impl Transport {
    /// A transport for node `id`; feedback goes to the driver.
    pub fn new(
        id: u64,
        book: Arc<AddressBook>,
        feedback: mpsc::UnboundedSender<Feedback>,
    ) -> Transport {
        Transport {
            id,
            book,
            queues: Mutex::new(HashMap::new()),
            feedback,
            links: Arc::new(Mutex::new(BTreeMap::new())),
            tap: None,
        }
    }

    /// A transport that hands every outbound message to `tap` (tests drive
    /// the other members themselves).
    #[cfg(test)]
    pub(crate) fn tapped(
        id: u64,
        book: Arc<AddressBook>,
        feedback: mpsc::UnboundedSender<Feedback>,
        tap: mpsc::UnboundedSender<Message>,
    ) -> Transport {
        Transport {
            tap: Some(tap),
            ..Transport::new(id, book, feedback)
        }
    }

    /// The address book.
    pub fn book(&self) -> &Arc<AddressBook> {
        &self.book
    }

    /// Health of each peer link, as last seen: "ok" or why not.
    pub fn links(&self) -> BTreeMap<u64, String> {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queue messages; never blocks.
    pub fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            if to == self.id || to == 0 {
                continue;
            }
            if let Some(tap) = &self.tap {
                let _ = tap.send(m);
                continue;
            }
            let tx = self.queue(to);
            if tx.try_send(m).is_err() {
                let _ = self.feedback.send(Feedback::Unreachable(to));
            }
        }
    }

    fn queue(&self, to: u64) -> mpsc::Sender<Message> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .entry(to)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE);
                let peer = Peer {
                    from: self.id,
                    to,
                    book: self.book.clone(),
                    feedback: self.feedback.clone(),
                    links: self.links.clone(),
                };
                tokio::spawn(peer.run(rx));
                tx
            })
            .clone()
    }
}

struct Peer {
    from: u64,
    to: u64,
    book: Arc<AddressBook>,
    feedback: mpsc::UnboundedSender<Feedback>,
    links: Arc<Mutex<BTreeMap<u64, String>>>,
}

/// A client of another scheduler's peer service.
pub type PeerClient = RaftPeerClient<tonic::transport::Channel>;

/// Connect to a scheduler's gRPC endpoint with the peer limits.
pub async fn connect(addr: &str) -> Result<PeerClient, String> {
    let channel = muster_proto::tls::endpoint(addr)
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    Ok(RaftPeerClient::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE))
}

fn envelope(from: u64, m: &Message) -> RaftEnvelope {
    RaftEnvelope {
        from,
        message: m.write_to_bytes().unwrap_or_default(),
    }
}

impl Peer {
    fn link(&self, state: String) {
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.to, state);
    }

    fn unreachable(&self, why: String) {
        self.link(format!("unreachable: {why}"));
        let _ = self.feedback.send(Feedback::Unreachable(self.to));
    }

    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        while let Some(first) = rx.recv().await {
            let Some(addr) = self.book.get(self.to) else {
                self.unreachable("no address known".into());
                continue;
            };
            let mut client = match connect(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    self.unreachable(e);
                    tokio::time::sleep(BACKOFF).await;
                    // Whatever queued meanwhile is stale; raft will resend.
                    while rx.try_recv().is_ok() {}
                    continue;
                }
            };
            self.link("ok".into());
            if let Err(e) = self.stream(&mut client, first, &mut rx).await {
                self.unreachable(e);
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }

    /// Pump messages into one `Send` stream until it or the queue ends.
    async fn stream(
        &self,
        client: &mut RaftPeerClient<tonic::transport::Channel>,
        first: Message,
        rx: &mut mpsc::Receiver<Message>,
    ) -> Result<(), String> {
        let (tx, srx) = mpsc::channel(QUEUE);
        let mut pending = Some(first);
        let mut streaming = client.clone();
        let mut call = Box::pin(async move { streaming.send(ReceiverStream::new(srx)).await });
        loop {
            let m = match pending.take() {
                Some(m) => m,
                None => tokio::select! {
                    m = rx.recv() => match m { Some(m) => m, None => return Ok(()) },
                    r = &mut call => return match r {
                        Ok(_) => Err("peer closed the stream".into()),
                        Err(s) => Err(s.message().to_string()),
                    },
                },
            };
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshot(client, &m).await;
                continue;
            }
            match tokio::time::timeout(STALL, tx.send(envelope(self.from, &m))).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("stream closed".into()),
                Err(_) => return Err(format!("stream stalled for {STALL:?}; reconnecting")),
            }
        }
    }

    async fn snapshot(&self, client: &mut RaftPeerClient<tonic::transport::Channel>, m: &Message) {
        let env = envelope(self.from, m);
        let ok = client.send(tokio_stream::iter(vec![env])).await.is_ok();
        tracing::info!(to = self.to, ok, "snapshot sent to peer");
        let _ = self.feedback.send(Feedback::Snapshot { to: self.to, ok });
    }
}
