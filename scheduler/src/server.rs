//! Wiring: start Raft, the gRPC services and the leader loops on a given
//! listener, and stop them all when the shutdown future resolves.

use crate::api::{agent::AgentService, client::ClientApi, Ctx};
use crate::config::SchedulerConfig;
use crate::raft::{self, RaftSettings};
use muster_proto::agent_api_server::AgentApiServer;
use muster_proto::muster_server::MusterServer;
use std::future::Future;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

/// Largest gRPC message accepted (a job spec with a long environment).
const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Errors that stop the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create data folder {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Raft(#[from] raft::StartError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Accepted connections with Nagle's algorithm off: small gRPC frames (an
/// assignment, a reply) must not wait for the peer's delayed ACK (~40 ms).
pub fn nodelay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    })
}

/// Run a scheduler on `listener` until `shutdown` resolves. `ready` is called
/// once the state is loaded and the listener is serving.
pub async fn run(
    cfg: SchedulerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce() + Send,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| ServerError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let settings = RaftSettings {
        id: cfg.node_id,
        voters: vec![cfg.node_id],
        tick: cfg.raft_tick,
        election_ticks: cfg.election_ticks,
        heartbeat_ticks: cfg.heartbeat_ticks,
        snapshot_entries: cfg.snapshot_entries,
    };
    let (handle, raft_task) = raft::start(settings, &cfg.data_dir, stop_rx.clone())?;
    let ctx = Ctx::new(handle, cfg);
    let planner = tokio::spawn(crate::leader::plan_loop(ctx.clone(), stop_rx.clone()));
    let keeper = tokio::spawn(crate::leader::housekeeping_loop(
        ctx.clone(),
        stop_rx.clone(),
    ));
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "scheduler serving");
    ready();
    let mut grpc_stop = stop_rx.clone();
    let result = tonic::transport::Server::builder()
        .add_service(
            MusterServer::new(ClientApi::new(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AgentApiServer::new(AgentService::new(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(nodelay(listener), async move {
            tokio::select! {
                _ = shutdown => {}
                _ = grpc_stop.changed() => {}
            }
        })
        .await;
    let _ = stop_tx.send(true);
    let _ = tokio::join!(planner, keeper, raft_task);
    tracing::info!("scheduler stopped");
    result.map_err(ServerError::from)
}
