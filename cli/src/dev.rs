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
//! Each node is simulated with the shape of a real 8-GPU server (64 CPUs,
//! 512 GiB: `--node-cpus`, `--node-mem`) so that examples written for real
//! clusters run as written; the host's own CPUs and memory are not checked.
//! Ctrl-C (or SIGTERM) cancels the jobs still running (their tasks get the
//! stop signal, the grace, then SIGKILL) and stops the daemons; with
//! `--keep-tasks` the tasks keep running under their supervisors and are
//! re-adopted by the next `muster dev` on the same folder.
//!
//! Two dev clusters on one host are independent: each has its own data
//! folder, address and cgroup parent (named after the data folder).

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
    /// Time between SIGTERM and SIGKILL when a task is stopped, e.g. 5s
    /// (the scheduler's `scheduling.default_grace` and the agents' `kill_grace`).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub kill_grace: String,
    /// Simulated CPUs per node offered to jobs (fractions allowed).
    #[arg(long, default_value = "64", value_name = "C", value_parser = crate::spec::parse_cpus)]
    pub node_cpus: u32,
    /// Simulated memory per node offered to jobs, e.g. 512G.
    #[arg(long, default_value = "512G", value_name = "SIZE", value_parser = crate::spec::parse_mem)]
    pub node_mem: u64,
    /// Set a scheduler config key, e.g. --set scheduling.min_runtime=10m
    /// (repeatable; keys as in config/scheduler.toml). muster dev's own
    /// defaults: scheduling.min_runtime=0s (preemption is visible at once)
    /// and scheduling.default_grace from --kill-grace.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_setting)]
    pub set: Vec<(String, toml::Value)>,
    /// On Ctrl-C leave running tasks alive (to be re-adopted by the next
    /// `muster dev` on the same --data-dir) instead of cancelling their jobs.
    #[arg(long)]
    pub keep_tasks: bool,
}

/// `section.key=value`: the value as TOML if it parses (numbers, booleans,
/// arrays, quoted strings), else as a plain string (`10m`).
fn parse_setting(s: &str) -> Result<(String, toml::Value), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(format!("invalid key {key:?} (e.g. scheduling.min_runtime)"));
    }
    let value = value.trim();
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok((key.to_string(), parsed))
}

/// Sets `key` (dotted) in `table`, creating tables on the way.
fn set_key(table: &mut toml::Table, key: &str, value: toml::Value) -> anyhow::Result<()> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(inner) => inner,
            _ => bail!("--set {key}: {p} is not a table"),
        };
    }
    t.insert(last.to_string(), value);
    Ok(())
}

/// A short stable name for the cluster in `data`, for its cgroup parent.
fn cluster_id(data: &Path) -> String {
    let canonical = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
    // Stable across runs and builds (std's hasher is not).
    let h = muster_proto::fnv::hash(canonical.as_os_str().as_encoded_bytes());
    format!("{:08x}", h >> 32)
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

fn scheduler_config(args: &DevArgs, data: &Path) -> anyhow::Result<String> {
    let mut t = toml::Table::new();
    let s = |v: String| toml::Value::String(v);
    t.insert("listen".into(), s(args.listen.to_string()));
    t.insert(
        "data_dir".into(),
        s(data.join("scheduler").to_string_lossy().into_owned()),
    );
    t.insert(
        "checkpoint_root".into(),
        s(data.join("checkpoints").to_string_lossy().into_owned()),
    );
    set_key(&mut t, "scheduling.min_runtime", s("0s".into()))?;
    set_key(
        &mut t,
        "scheduling.default_grace",
        s(args.kill_grace.clone()),
    )?;
    for (k, v) in &args.set {
        set_key(&mut t, k, v.clone())?;
    }
    Ok(format!(
        "# Written by `muster dev` on every start (change it with --set KEY=VALUE);\n\
         # see config/scheduler.toml for every key.\n{}",
        toml::to_string(&t).context("cannot write the scheduler's config")?
    ))
}

fn write_configs(args: &DevArgs, data: &Path) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let sched = data.join("scheduler.toml");
    let text = scheduler_config(args, data)?;
    std::fs::write(&sched, text).with_context(|| format!("cannot write {}", sched.display()))?;
    let mode = cgroup_mode(&args.cgroups);
    let cluster = cluster_id(data);
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
             data_dir = {}\ncgroups = \"{mode}\"\ncgroup_parent = \"muster-dev-{cluster}/{name}\"\n\
             allow_root_jobs = true\nkill_grace = \"{}\"\ncpu_millis = {}\nmemory_bytes = {}\n\n\
             [gpu]\nbackend = \"simulated\"\ncount = {}\nseed = \"{name}\"\n",
            args.listen,
            q(&dir.join("state")),
            args.kill_grace,
            args.node_cpus,
            args.node_mem,
            args.gpus,
        );
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        agents.push(path);
    }
    Ok((sched, agents))
}

fn spawn(bin: &Path, config: &Path) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    // A process group of its own: Ctrl-C on the terminal goes to the whole
    // foreground group, and a scheduler that stopped on it at once would
    // leave `muster dev` unable to cancel the running jobs first.
    cmd.arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .process_group(0);
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
    if args.keep_tasks {
        eprintln!("\nstopping the dev cluster (--keep-tasks: running tasks keep running and are re-adopted next time)");
    } else {
        eprintln!("\nstopping the dev cluster: cancelling its running jobs first");
        let grace = humantime::parse_duration(&args.kill_grace).unwrap_or(Duration::from_secs(5));
        if let Err(e) = cancel_running(&addr, grace + Duration::from_secs(10)).await {
            eprintln!("could not cancel every running job ({e}); their tasks may still run");
        }
    }
    stop(&mut children).await;
    outcome
}

/// Cancel every job that has tasks (placed, running, stopping) and wait
/// until each has ended, at most `wait`.
async fn cancel_running(addr: &str, wait: Duration) -> anyhow::Result<()> {
    let mut c = crate::client::Scheduler::connect(addr).await?;
    let user = crate::commands::current_user()?;
    let pending = muster_proto::JobState::Pending as i32;
    let mut ids = Vec::new();
    for j in c.list_jobs(false).await? {
        if j.state != pending {
            // One that ended meanwhile is refused; cancel the others anyway.
            match c.cancel(j.id, user.clone()).await {
                Ok(_) => ids.push(j.id),
                Err(e) => eprintln!("job {}: {e}", j.id),
            }
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        let active: Vec<u64> = c
            .list_jobs(false)
            .await?
            .iter()
            .filter(|j| ids.contains(&j.id))
            .map(|j| j.id)
            .collect();
        if active.is_empty() {
            if !ids.is_empty() {
                eprintln!("cancelled {} running job(s)", ids.len());
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("jobs still stopping after {}s", wait.as_secs())
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
    let stopping = if args.keep_tasks {
        "Ctrl-C stops the cluster; running tasks keep running (--keep-tasks)."
    } else {
        "Ctrl-C cancels the running jobs and stops the cluster (--keep-tasks to keep them)."
    };
    println!(
        "Muster dev cluster: scheduler on http://{}, {} agents x {} simulated GPUs\n\
         each node simulated as {} CPUs, {} (--node-cpus, --node-mem)\n\
         scheduler settings: {}/scheduler.toml (--set KEY=VALUE to change)\n\
         state, configuration and logs: {}\nisolation: {isolation}\n\n\
         Try, in another terminal:\n  \
         muster submit --gpus 1 -- sh -c 'echo rank $RANK of $WORLD_SIZE on GPU $CUDA_VISIBLE_DEVICES'\n  \
         muster queue --all\n  muster logs 1\n  muster nodes\n\n{stopping}",
        args.listen,
        args.agents,
        args.gpus,
        crate::output::format_cpus(args.node_cpus),
        crate::output::format_bytes(args.node_mem),
        data.display(),
        data.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn args(extra: &[&str]) -> DevArgs {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            dev: DevArgs,
        }
        let mut argv = vec!["dev"];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv).expect("parse").dev
    }

    #[test]
    fn settings_parse_as_toml_or_text() {
        assert_eq!(
            parse_setting("scheduling.min_runtime=10m"),
            Ok((
                "scheduling.min_runtime".into(),
                toml::Value::String("10m".into())
            ))
        );
        assert_eq!(
            parse_setting("limits.submit_burst = 5"),
            Ok(("limits.submit_burst".into(), toml::Value::Integer(5)))
        );
        assert!(parse_setting("no-equals").is_err());
        assert!(parse_setting("a..b=1").is_err());
    }

    #[test]
    fn the_scheduler_config_has_dev_defaults_and_overrides() {
        let a = args(&["--kill-grace", "2s", "--set", "scheduling.min_runtime=5m"]);
        let text = scheduler_config(&a, Path::new("/d")).expect("config");
        let t: toml::Table = text.parse().expect("toml");
        let sched = t["scheduling"].as_table().expect("table");
        assert_eq!(sched["min_runtime"].as_str(), Some("5m"), "{text}");
        assert_eq!(sched["default_grace"].as_str(), Some("2s"), "{text}");
        let plain = scheduler_config(&args(&[]), Path::new("/d")).expect("config");
        assert!(plain.contains("min_runtime = \"0s\""), "{plain}");
    }

    #[test]
    fn nodes_are_shaped_like_real_servers_and_clusters_apart() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = args(&["--node-cpus", "32", "--node-mem", "256G", "--agents", "1"]);
        let (_, agents) = write_configs(&a, dir.path()).expect("write");
        let text = std::fs::read_to_string(&agents[0]).expect("read");
        assert!(text.contains("cpu_millis = 32000"), "{text}");
        assert!(
            text.contains(&format!("memory_bytes = {}", 256u64 << 30)),
            "{text}"
        );
        let other = tempfile::tempdir().expect("tmp");
        assert_ne!(cluster_id(dir.path()), cluster_id(other.path()));
        assert_eq!(cluster_id(dir.path()), cluster_id(dir.path()));
        assert!(text.contains(&format!("muster-dev-{}/dev-0", cluster_id(dir.path()))));
        let defaults = args(&[]);
        assert_eq!((defaults.node_cpus, defaults.node_mem), (64_000, 512 << 30));
    }
}
