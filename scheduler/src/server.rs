//! Wiring: start Raft, the gRPC services and the leader loops on a given
//! listener, and stop them all when the shutdown future resolves.

use crate::api::{
    admin::AdminService, agent::AgentService, client::ClientApi, peer::PeerService,
    security::SecurityService, Ctx,
};
use crate::config::SchedulerConfig;
use crate::raft::{self, RaftSettings};
use muster_proto::admin_server::AdminServer;
use muster_proto::agent_api_server::AgentApiServer;
use muster_proto::muster_server::MusterServer;
use muster_proto::raft_peer_server::RaftPeerServer;
use muster_proto::security_server::SecurityServer;
use std::future::Future;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long in-flight calls may run after shutdown is asked for.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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
    #[error("gRPC server task: {0}")]
    Join(String),
    #[error(transparent)]
    Tls(#[from] muster_proto::tls::TlsError),
}

/// A member that starts with no data while its peers already run a cluster
/// lost its data folder: it must not bootstrap (and vote) as if the cluster
/// were new, but wait for the leader to send it the state.
async fn rejoining(cfg: &SchedulerConfig, peers: &std::collections::BTreeMap<u64, String>) -> bool {
    if cfg.data_dir.join("raft").exists() || peers.len() < 2 {
        return false;
    }
    for (id, addr) in peers.iter().filter(|(id, _)| **id != cfg.node_id) {
        let Ok(endpoint) = muster_proto::tls::endpoint(addr) else {
            continue;
        };
        let probe = async {
            let channel = endpoint
                .connect_timeout(std::time::Duration::from_millis(500))
                .connect()
                .await
                .ok()?;
            let mut c = muster_proto::admin_client::AdminClient::new(channel);
            let st = c
                .status(muster_proto::AdminStatusRequest {})
                .await
                .ok()?
                .into_inner();
            Some(st.commit_index > 0)
        };
        if let Ok(Some(true)) = tokio::time::timeout(std::time::Duration::from_secs(1), probe).await
        {
            tracing::warn!(
                peer = id,
                "no local data but the cluster already exists: joining it and waiting for a snapshot"
            );
            return true;
        }
    }
    false
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
    // TLS first: the peer transport and the rejoin probe dial with it.
    let server_tls = match &cfg.tls {
        Some(tls) => {
            muster_proto::tls::install_client(tls.client()?);
            Some(tls.server()?)
        }
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let peers = cfg.peer_map().unwrap_or_default();
    let join = cfg.join || rejoining(&cfg, &peers).await;
    let settings = RaftSettings {
        id: cfg.node_id,
        voters: if join { vec![] } else { cfg.initial_voters() },
        peers,
        commit_timeout: cfg.commit_timeout,
        tick: cfg.raft_tick,
        election_ticks: cfg.election_ticks,
        heartbeat_ticks: cfg.heartbeat_ticks,
        snapshot_entries: cfg.snapshot_entries,
        snapshot_interval: cfg.snapshot_interval,
    };
    let (handle, inbound, raft_task) = raft::start(settings, &cfg.data_dir, stop_rx.clone())?;
    let ctx = Ctx::new(handle.clone(), cfg);
    let peer = PeerService::new(handle, inbound, ctx.clone());
    let auditor = tokio::spawn(crate::auth::audit_loop(ctx.clone(), stop_rx.clone()));
    let planner = tokio::spawn(crate::leader::plan_loop(ctx.clone(), stop_rx.clone()));
    let keeper = tokio::spawn(crate::leader::housekeeping_loop(
        ctx.clone(),
        stop_rx.clone(),
    ));
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "scheduler serving");
    ready();
    let mut grpc_stop = stop_rx.clone();
    let mut removed = ctx.raft.status();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls)?;
    }
    let mut server = tokio::spawn(
        builder
            .add_service(
                MusterServer::new(ClientApi::new(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                AgentApiServer::new(AgentService::new(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                RaftPeerServer::new(peer)
                    .max_decoding_message_size(raft::transport::MAX_PEER_MESSAGE)
                    .max_encoding_message_size(raft::transport::MAX_PEER_MESSAGE),
            )
            .add_service(AdminServer::new(AdminService::new(ctx.clone())))
            .add_service(
                SecurityServer::new(SecurityService::new(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                muster_proto::daemon::identified(listener, crate::auth::peer_uid::uid_of),
                async move {
                    let _ = grpc_stop.changed().await;
                },
            ),
    );
    let early = tokio::select! {
        _ = shutdown => None,
        // A member removed from the cluster stops serving.
        _ = removed.wait_for(|s| s.removed) => None,
        r = &mut server => Some(r),
    };
    let _ = stop_tx.send(true);
    let result = match early {
        Some(r) => r,
        // Peers and agents hold long-lived streams: give in-flight calls a
        // moment, then close everything.
        None => match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    let _ = tokio::join!(planner, keeper, auditor, raft_task);
    tracing::info!("scheduler stopped");
    match result {
        Ok(r) => r.map_err(ServerError::from),
        Err(e) => Err(ServerError::Join(e.to_string())),
    }
}
