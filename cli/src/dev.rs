//! `muster dev`: a whole cluster in one process, for a laptop or a first try.
//!
//! One scheduler and N agents with simulated GPUs, all in this process, state
//! in one folder. The agents run real tasks (through this executable acting
//! as each task's supervisor) as the user who started `muster dev`. As root,
//! tasks get real cgroups; otherwise there is no isolation, and the log says
//! so. Ctrl-C stops the daemons; tasks still running keep running and are
//! re-adopted by the next `muster dev` on the same folder.

use anyhow::Context;
use muster_agent::config::CgroupMode;
use muster_agent::gpu::GpuBackendConfig;
use muster_agent::AgentConfig;
use muster_scheduler::SchedulerConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;

/// Options of `muster dev`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  muster dev --agents 2 --gpus 8\n  \
    # then, in another terminal:\n  muster submit --gpus 1 -- sh -c 'echo rank $RANK sees GPU $CUDA_VISIBLE_DEVICES'\n  \
    muster queue --all")]
pub struct DevArgs {
    /// Number of agents (simulated GPU hosts).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub agents: u32,
    /// Simulated GPUs per agent.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub gpus: u32,
    /// Folder for the cluster's state and task logs [default: ~/.local/share/muster/dev].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address the scheduler listens on.
    #[arg(long, default_value = "127.0.0.1:7470")]
    pub listen: SocketAddr,
    /// Task isolation: auto (real cgroups when run as root), v1, v2 or none.
    #[arg(long, default_value = "auto", value_parser = ["auto", "v1", "v2", "none"])]
    pub cgroups: String,
    /// Time between SIGTERM and SIGKILL when a task is stopped.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub kill_grace: Duration,
}

fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("muster/dev")
}

fn cgroup_mode(requested: &str) -> CgroupMode {
    match requested {
        "v1" => CgroupMode::V1,
        "v2" => CgroupMode::V2,
        "none" => CgroupMode::None,
        _ if nix::unistd::Uid::effective().is_root() => CgroupMode::Auto,
        _ => CgroupMode::None,
    }
}

/// Run the dev cluster until Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,raft=warn,sled=warn".into()),
        )
        .try_init();
    let data = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data)
        .with_context(|| format!("cannot create data folder {}", data.display()))?;
    let sched_cfg = SchedulerConfig {
        listen: args.listen,
        data_dir: data.join("scheduler"),
        checkpoint_root: data.join("checkpoints"),
        ..SchedulerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (--listen); is another muster dev running?",
                args.listen
            )
        })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let stop = wait_stop(stop_rx.clone());
    tasks.push(tokio::spawn(async move {
        muster_scheduler::server::run(sched_cfg, listener, stop, || {})
            .await
            .map_err(anyhow::Error::from)
    }));
    let mode = cgroup_mode(&args.cgroups);
    for i in 0..args.agents {
        let cfg = agent_config(&args, &data, i, mode);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let stop = wait_stop(stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            muster_agent::run(cfg, listener, stop, || {})
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    print_banner(&args, &data, mode);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        r = first_failure(&mut tasks) => {
            let _ = stop_tx.send(true);
            return r;
        }
    }
    eprintln!(
        "\nstopping the dev cluster (running tasks keep running and are re-adopted next time)"
    );
    let _ = stop_tx.send(true);
    for t in tasks {
        t.await.context("a dev cluster component panicked")??;
    }
    Ok(())
}

fn agent_config(args: &DevArgs, data: &std::path::Path, i: u32, mode: CgroupMode) -> AgentConfig {
    let name = format!("dev-{i}");
    AgentConfig {
        node_name: Some(name.clone()),
        schedulers: vec![format!("http://{}", args.listen)],
        data_dir: data.join(&name),
        cgroups: mode,
        cgroup_parent: format!("muster-dev/{name}"),
        // `muster dev` is the user's own cluster: it runs jobs as whoever
        // started it, root included.
        allow_root_jobs: true,
        kill_grace: args.kill_grace,
        gpu: GpuBackendConfig::Simulated {
            count: args.gpus,
            model: muster_agent::gpu::DEFAULT_SIMULATED_MODEL.to_string(),
            memory_bytes: muster_agent::gpu::DEFAULT_SIMULATED_MEMORY_BYTES,
            first_minor: 0,
            seed: name,
        },
        ..AgentConfig::default()
    }
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves when any component stops on its own (an error, or a bug).
async fn first_failure(
    tasks: &mut [tokio::task::JoinHandle<anyhow::Result<()>>],
) -> anyhow::Result<()> {
    let (r, _, _) = futures::future::select_all(tasks.iter_mut()).await;
    match r {
        Ok(Ok(())) => anyhow::bail!("a dev cluster component stopped unexpectedly"),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!("a dev cluster component panicked: {e}")),
    }
}

fn print_banner(args: &DevArgs, data: &std::path::Path, mode: CgroupMode) {
    let addr = args.listen;
    let isolation = match mode {
        CgroupMode::None => "none (run as root for cgroup isolation)".to_string(),
        m => format!("cgroups ({m:?})").to_lowercase(),
    };
    println!(
        "Muster dev cluster: scheduler on http://{addr}, {} agents x {} simulated GPUs\n\
         state and logs: {}\nisolation: {isolation}\n\n\
         Try, in another terminal:\n  \
         muster submit --gpus 1 -- sh -c 'echo rank $RANK of $WORLD_SIZE on GPU $CUDA_VISIBLE_DEVICES'\n  \
         muster queue --all\n  muster logs 1\n  muster nodes\n\nCtrl-C stops the cluster.",
        args.agents,
        args.gpus,
        data.display()
    );
}
