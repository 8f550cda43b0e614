//! `muster dev`: a whole cluster on one machine, for a laptop or a first try.
//!
//! It runs the real daemons — one `muster-scheduler` and N `muster-agent`s
//! with simulated GPUs — as child processes, with configuration files it
//! writes into one data folder, and their logs on this terminal. The daemons
//! are found next to this executable (`cargo build --release` builds all
//! three). Keeping them out of this binary keeps `muster` small and quick to
//! start, which matters for scripts that call it in a loop.
//!
//! Tasks run as the user who started `muster dev`. As root they get real
//! cgroups; otherwise there is no isolation, and the agents' log says so.
//! Ctrl-C (or SIGTERM) stops the daemons; tasks still running keep running under their
//! supervisors and are re-adopted by the next `muster dev` on the same folder.

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

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
    /// Folder for the cluster's state, configuration and task logs [default: ~/.local/share/muster/dev].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address the scheduler listens on.
    #[arg(long, default_value = "127.0.0.1:7470")]
    pub listen: SocketAddr,
    /// Task isolation: auto (real cgroups when run as root, else none), v1, v2 or none.
    #[arg(long, default_value = "auto", value_parser = ["auto", "v1", "v2", "none"])]
    pub cgroups: String,
    /// Time between SIGTERM and SIGKILL when a task is stopped, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub kill_grace: String,
}

fn parse_duration(s: &str) -> Result<String, String> {
    humantime::parse_duration(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("muster/dev")
}

fn cgroup_mode(requested: &str) -> &'static str {
    match requested {
        "v1" => "v1",
        "v2" => "v2",
        "none" => "none",
        _ if nix::unistd::Uid::effective().is_root() => "auto",
        _ => "none",
    }
}

/// A daemon next to this executable.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the muster executable")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "muster dev needs {} next to {} (`cargo build --release` builds it)",
            name,
            exe.display()
        );
    }
    Ok(path)
}

/// A TOML string literal.
fn q(p: &Path) -> String {
    toml::Value::String(p.to_string_lossy().into_owned()).to_string()
}

fn write_configs(args: &DevArgs, data: &Path) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let sched = data.join("scheduler.toml");
    let text = format!(
        "# Written by `muster dev`; see config/scheduler.toml for every key.\n\
         listen = \"{}\"\ndata_dir = {}\ncheckpoint_root = {}\n",
        args.listen,
        q(&data.join("scheduler")),
        q(&data.join("checkpoints")),
    );
    std::fs::write(&sched, text).with_context(|| format!("cannot write {}", sched.display()))?;
    let mode = cgroup_mode(&args.cgroups);
    let mut agents = Vec::new();
    for i in 0..args.agents {
        let name = format!("dev-{i}");
        let dir = data.join(&name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("agent.toml");
        // `muster dev` is the user's own cluster: it runs jobs as whoever
        // started it, root included.
        let text = format!(
            "# Written by `muster dev`; see config/agent.toml for every key.\n\
             node_name = \"{name}\"\nschedulers = [\"http://{}\"]\nlisten = \"127.0.0.1:0\"\n\
             data_dir = {}\ncgroups = \"{mode}\"\ncgroup_parent = \"muster-dev/{name}\"\n\
             allow_root_jobs = true\nkill_grace = \"{}\"\n\n[gpu]\nbackend = \"simulated\"\n\
             count = {}\nseed = \"{name}\"\n",
            args.listen,
            q(&dir.join("state")),
            args.kill_grace,
            args.gpus,
        );
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        agents.push(path);
    }
    Ok((sched, agents))
}

fn spawn(bin: &Path, config: &Path) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(config).stdin(Stdio::null());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info,raft=warn,sled=warn");
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

/// Run the dev cluster until Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let scheduler_bin = sibling("muster-scheduler")?;
    let agent_bin = sibling("muster-agent")?;
    let data = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data)
        .with_context(|| format!("cannot create data folder {}", data.display()))?;
    if std::net::TcpListener::bind(args.listen).is_err() {
        bail!(
            "cannot listen on {} (--listen): the port is in use; is another muster dev running?",
            args.listen
        );
    }
    let (sched_cfg, agent_cfgs) = write_configs(&args, &data)?;
    let mut children = vec![spawn(&scheduler_bin, &sched_cfg)?];
    let addr = format!("http://{}", args.listen);
    if let Err(e) = wait_ready(&addr, &mut children[0]).await {
        stop(&mut children).await;
        return Err(e);
    }
    for cfg in &agent_cfgs {
        children.push(spawn(&agent_bin, cfg)?);
    }
    print_banner(&args, &data);
    let outcome = tokio::select! {
        _ = muster_proto::daemon::stop_signal() => Ok(()),
        name = first_exit(&mut children) => Err(anyhow::anyhow!("{name} stopped unexpectedly; see its log above")),
    };
    eprintln!(
        "\nstopping the dev cluster (running tasks keep running and are re-adopted next time)"
    );
    stop(&mut children).await;
    outcome
}

async fn wait_ready(addr: &str, scheduler: &mut Child) -> anyhow::Result<()> {
    for _ in 0..200 {
        if let Some(status) = scheduler.try_wait()? {
            bail!("muster-scheduler exited ({status}); see its log above");
        }
        if let Ok(mut c) = crate::client::connect(addr).await {
            if c.status(muster_proto::StatusRequest {}).await.is_ok() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("muster-scheduler did not answer on {addr} within 10s")
}

async fn first_exit(children: &mut [Child]) -> String {
    loop {
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(_)) = c.try_wait() {
                return if i == 0 {
                    "muster-scheduler".to_string()
                } else {
                    format!("agent dev-{}", i - 1)
                };
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM every daemon (agents first), then wait; SIGKILL stragglers.
async fn stop(children: &mut [Child]) {
    for c in children.iter().rev() {
        if let Some(pid) = c.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for c in children.iter_mut().rev() {
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
}

fn print_banner(args: &DevArgs, data: &Path) {
    let isolation = match cgroup_mode(&args.cgroups) {
        "none" => "none (run as root for cgroup isolation)".to_string(),
        m => format!("cgroups ({m})"),
    };
    println!(
        "Muster dev cluster: scheduler on http://{}, {} agents x {} simulated GPUs\n\
         state, configuration and logs: {}\nisolation: {isolation}\n\n\
         Try, in another terminal:\n  \
         muster submit --gpus 1 -- sh -c 'echo rank $RANK of $WORLD_SIZE on GPU $CUDA_VISIBLE_DEVICES'\n  \
         muster queue --all\n  muster logs 1\n  muster nodes\n\nCtrl-C stops the cluster.",
        args.listen,
        args.agents,
        args.gpus,
        data.display()
    );
}
