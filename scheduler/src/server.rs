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
    #[error("the raft driver stopped: {0}")]
    RaftStopped(#[from] raft::DriverError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC server task: {0}")]
    Join(String),
    #[error(transparent)]
    Tls(#[from] muster_proto::tls::TlsError),
}

/// A member that starts with no data while its peers already run a cluster
/// lost its data folder: it does not bootstrap a configuration of its own
/// (its config may name members the cluster no longer has) but waits for
/// the leader to send it the state. Either way it does not vote until it
/// has caught up (see `raft/mod.rs`): this probe is not what keeps it safe,
/// since no peer may answer.
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
            // A fresh member holds the initial snapshot (index 1, term 1);
            // one of a running cluster has seen an election.
            Some(st.commit_index > raft::BOOTSTRAP_INDEX || st.term > 1 || st.leader_id != 0)
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

/// Create the data folder 0700 and take group and other bits off an
/// existing one and everything in it: the state it holds (every job's
/// command and environment, token hashes) is for this daemon only.
/// Symbolic links are neither followed nor changed.
pub fn private_data_dir(dir: &std::path::Path) -> Result<(), (std::path::PathBuf, std::io::Error)> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    fn at(
        p: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> (std::path::PathBuf, std::io::Error) + '_ {
        move |e| (p.to_path_buf(), e)
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(at(dir))?;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(at(&p))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o7777;
        let private = if p == dir { 0o700 } else { mode & 0o700 };
        if mode != private {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(private))
                .map_err(at(&p))?;
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).map_err(at(&p))? {
                todo.push(e.map_err(at(&p))?.path());
            }
        }
    }
    Ok(())
}

/// Run a scheduler on `listener` until `shutdown` resolves. `ready` is called
/// once the state is loaded and the listener is serving.
pub async fn run(
    cfg: SchedulerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce() + Send,
) -> Result<(), ServerError> {
    private_data_dir(&cfg.data_dir)
        .map_err(|(path, source)| ServerError::DataDir { path, source })?;
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
    let (handle, inbound, mut raft_task) = raft::start(settings, &cfg.data_dir, stop_rx.clone())?;
    let ctx = Ctx::new(handle.clone(), cfg);
    let peer = PeerService::new(handle, inbound, ctx.clone());
    let auditor = tokio::spawn(crate::auth::audit_loop(ctx.clone(), stop_rx.clone()));
    let planner = tokio::spawn(crate::leader::plan_loop(ctx.clone(), stop_rx.clone()));
    let confirmer = tokio::spawn(crate::leader::confirm_loop(ctx.clone(), stop_rx.clone()));
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
    // A driver that stops on its own (an entry it cannot apply, failed
    // storage) takes the daemon down with its error.
    let mut raft_end = None;
    let early = tokio::select! {
        _ = shutdown => None,
        // A member removed from the cluster stops serving.
        _ = removed.wait_for(|s| s.removed) => None,
        r = &mut server => Some(r),
        r = &mut raft_task => {
            raft_end = Some(r);
            None
        }
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
    let raft_end = match raft_end {
        Some(r) => r,
        None => tokio::join!(planner, keeper, confirmer, auditor, raft_task).4,
    };
    tracing::info!("scheduler stopped");
    if let Ok(Err(e)) = raft_end {
        return Err(ServerError::RaftStopped(e));
    }
    match result {
        Ok(r) => r.map_err(ServerError::from),
        Err(e) => Err(ServerError::Join(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// Issue 18 #3: the data folder (every job's environment) was world-readable.
    #[test]
    fn the_data_folder_is_private_new_or_old() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b/data");
        super::private_data_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        // An existing folder from an older version, world-readable.
        let old = tmp.path().join("old");
        std::fs::create_dir_all(old.join("raft")).unwrap();
        std::fs::write(old.join("raft/db"), b"x").unwrap();
        for (p, m) in [(&old, 0o755), (&old.join("raft"), 0o755)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        std::fs::set_permissions(old.join("raft/db"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        // A link inside is left alone (and not followed).
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"y").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, old.join("link")).unwrap();
        super::private_data_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700);
        assert_eq!(mode(&old.join("raft")), 0o700);
        assert_eq!(mode(&old.join("raft/db")), 0o600);
        assert_eq!(mode(&outside), 0o644);
    }
}
