//! Muster's agent: one per GPU host. It discovers the host's GPUs (NVML, or a
//! simulated inventory), registers with the schedulers, and runs the tasks it
//! is assigned as their users, each in a cgroup that admits only its GPUs and
//! limits its memory and CPUs.
//!
//! The map: [`gpu`] (inventory behind a small trait), [`cgroup`] (v1 and v2
//! behind a small trait, rooted at a path), [`task`] (shims, identities,
//! re-adoption), [`reconcile`] (the pure desired-vs-observed function),
//! [`session`] (the stream to the scheduler) and [`local`] (this host's own
//! service: logs).
// deny, not forbid: the shim's pre-exec step and cgroup/bpf.rs's bpf(2)
// wrappers carry narrow, commented `allow(unsafe_code)`.
#![deny(unsafe_code)]

pub mod cgroup;
pub mod config;
pub mod gpu;
pub mod health;
pub mod local;
pub mod reconcile;
pub mod session;
pub mod task;
pub mod task_socket;
pub mod user_socket;

pub use config::AgentConfig;

use config::CgroupMode;
use muster_proto as pb;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

/// Errors that stop the agent before it serves.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("GPU inventory: {0}")]
    Gpu(#[from] gpu::GpuError),
    #[error("cgroups: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("data folder {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find this executable to use as the task supervisor: {0}")]
    Shim(std::io::Error),
    #[error("local service: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tls(#[from] muster_proto::tls::TlsError),
    #[error("user socket {path}: {source}")]
    UserSocket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Open the cgroup manager the configuration asks for.
pub fn open_cgroups(cfg: &AgentConfig) -> Result<Option<Arc<dyn cgroup::Cgroups>>, AgentError> {
    let cg: Arc<dyn cgroup::Cgroups> = match cfg.cgroups {
        CgroupMode::None => {
            tracing::warn!(
                "cgroups = \"none\": tasks are NOT isolated (every GPU visible, no memory or CPU limits)"
            );
            return Ok(None);
        }
        CgroupMode::Auto => Arc::from(cgroup::detect(&cfg.cgroup_root, &cfg.cgroup_parent)?),
        CgroupMode::V1 => Arc::new(cgroup::v1(&cfg.cgroup_root, &cfg.cgroup_parent)?),
        CgroupMode::V2 => Arc::new(cgroup::v2(&cfg.cgroup_root, &cfg.cgroup_parent)?),
    };
    tracing::info!(version = %cg.version(), root = %cfg.cgroup_root.display(), "cgroups in use");
    Ok(Some(cg))
}

fn gpus_to_pb(gpus: Vec<gpu::Gpu>) -> Vec<pb::GpuInfo> {
    gpus.into_iter()
        .map(|g| pb::GpuInfo {
            index: g.index,
            uuid: g.uuid,
            model: g.model,
            memory_bytes: g.memory_bytes,
            minor: g.minor,
            pci_bus_id: g.pci_bus_id,
            numa_node: g.numa_node,
            healthy: g.healthy,
            allocated_to: 0,
            link_group: g.link_group,
            fault: String::new(),
        })
        .collect()
}

/// Run an agent whose local service listens on `listener`, until `shutdown`
/// resolves. `ready` is called once the agent serves.
pub async fn run(
    cfg: AgentConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce() + Send,
) -> Result<(), AgentError> {
    // Whatever the agent creates (records holding jobs' environments, logs,
    // the lease) is root's alone unless it says otherwise; the shim gives
    // tasks the usual 022.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &cfg.tls {
        // One identity for the scheduler sessions and the local service.
        muster_proto::tls::install_client(tls.client()?);
        server = server.tls_config(tls.server()?)?;
    }
    let inventory: Arc<dyn gpu::GpuInventory> = Arc::from(gpu::open(&cfg.gpu)?);
    let gpus = gpus_to_pb(inventory.gpus()?);
    tracing::info!(
        backend = inventory.backend(),
        count = gpus.len(),
        "GPUs found"
    );
    let cgroups = open_cgroups(&cfg)?;
    let data_dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .and_then(|()| {
            // Only root enters it (older agents made it world-readable);
            // the task socket lies outside it (`AgentConfig::task_socket_path`).
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|source| AgentError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    let shim_path = match &cfg.shim_path {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(AgentError::Shim)?,
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let lease_file = cfg.self_fence.then(|| data_dir.join("lease"));
    if lease_file.is_none() {
        tracing::warn!(
            "self_fence = false: a stalled agent's tasks may run beside their replacements"
        );
    }
    let task_socket = cfg.task_socket_path();
    let settings = task::RuntimeSettings {
        data_dir: data_dir.clone(),
        shim_path,
        allow_root_jobs: cfg.allow_root_jobs,
        kill_grace: cfg.kill_grace,
        lease_file: lease_file.clone(),
        task_socket: task_socket.clone(),
        log_max_bytes: cfg.log_max_bytes,
        log_files: cfg.log_files,
        cgroup_parent: cfg.cgroup_parent.clone(),
    };
    let health_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = health::watch(
        inventory.clone(),
        gpus.iter().map(|g| (g.uuid.clone(), g.index)).collect(),
        cfg.ignored_xids.clone(),
        events_tx.clone(),
        health_stop.clone(),
    )
    .map_err(|source| AgentError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let runtime =
        task::Runtime::new(settings, cgroups, events_tx).map_err(|source| AgentError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| AgentError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    // A new key every run: tickets issued for an earlier run stop working.
    let log_key = muster_proto::ticket::new_key().map_err(|source| AgentError::DataDir {
        path: "/dev/urandom".into(),
        source,
    })?;
    let node = session::NodeInfo {
        log_key: log_key.clone(),
        name: cfg.node_name(),
        address: cfg.advertise.clone().unwrap_or_else(|| bound.to_string()),
        gpus,
        cpu_millis: cfg.cpu_millis.unwrap_or_else(config::host_cpu_millis),
        memory_bytes: cfg.memory_bytes.unwrap_or_else(config::host_memory_bytes),
        labels: cfg.labels.clone(),
    };
    tracing::info!(node = %node.name, address = %node.address, "agent starting");
    let node_name = node.name.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task_listener = task_socket::bind(&task_socket).map_err(|source| AgentError::DataDir {
        path: task_socket.clone(),
        source,
    })?;
    tracing::info!(socket = %task_socket.display(), "task socket ready");
    let tasks_served = tokio::spawn(task_socket::serve(
        task_listener,
        runtime.clone(),
        stop_rx.clone(),
    ));
    let sessions = tokio::spawn(session::run(
        session::SessionConfig {
            schedulers: cfg.schedulers.clone(),
            fence_path: data_dir.join("term"),
            lease_file,
        },
        node,
        runtime.clone(),
        events_rx,
        stop_rx.clone(),
    ));
    let users = cfg.user_socket.clone().map(|path| {
        let mut stop = stop_rx.clone();
        let schedulers = cfg.schedulers.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.changed().await;
            };
            if let Err(e) = user_socket::serve(&path, schedulers, stopped).await {
                tracing::error!(error = %e, "the user socket stopped");
            }
        })
    });
    ready();
    let local = muster_proto::agent_local_server::AgentLocalServer::new(local::LocalService::new(
        runtime.clone(),
        node_name,
        log_key,
    ));
    let result = server
        .add_service(local)
        .serve_with_incoming_shutdown(muster_proto::daemon::nodelay(listener), shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = sessions.await;
    let _ = tasks_served.await;
    health_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || watcher.join()).await;
    if let Some(u) = users {
        let _ = u.await;
    }
    tracing::info!("agent stopped; tasks keep running under their supervisors");
    result.map_err(AgentError::from)
}
