//! The cluster harness: real `muster-scheduler` and `muster-agent` processes
//! on loopback, driven through the real `muster` CLI.
//!
//! Agents discover their GPUs through the NVML mock library (the real
//! `nvml-wrapper` code path). Each cluster lives in its own temporary folder;
//! dropping the [`Cluster`] kills its daemons and every task they started.
//!
//! The binaries are found next to the test executable's `deps/` folder:
//! `cargo test --workspace` builds them, because the scheduler, agent and CLI
//! packages each have integration tests. If one is missing the harness says
//! how to build it.

use anyhow::{anyhow, bail, Context, Result};
use muster_nvml_mock::{MockConfig, MockGpu};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod tls;

/// Path of a workspace binary (`muster`, `muster-scheduler`, `muster-agent`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let found = exe
        .ancestors()
        .skip(1)
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    match found {
        Some(p) => p,
        None => panic!(
            "binary {name} not found near {}; run `cargo build --workspace --bins` \
             (or `cargo test --workspace`, which builds it)",
            exe.display()
        ),
    }
}

/// Whether this process may create cgroups and switch users (CI runs as root).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Whether cgroup v1 controllers are mounted and writable here.
pub fn has_cgroup_v1() -> bool {
    is_root()
        && Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        && Path::new("/sys/fs/cgroup/devices/devices.allow").exists()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Poll `f` until it returns `Some`, or fail after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP proxy on loopback that can cut a link: new connections are
/// refused and live ones are closed while it is blocked. One proxy carries one
/// direction of one scheduler-to-scheduler link (each node dials its peers),
/// so blocking it makes a one-way partition.
pub struct Proxy {
    pub port: u16,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Forward a fresh loopback port to `target`.
    pub fn start(target: u16) -> Result<Proxy> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let blocked = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, st) = (blocked.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if b.load(Ordering::Relaxed) {
                            drop(client);
                            continue;
                        }
                        let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        for (from, to) in [
                            (client.try_clone(), server.try_clone()),
                            (server.try_clone(), client.try_clone()),
                        ] {
                            if let (Ok(from), Ok(to)) = (from, to) {
                                let (b, st) = (b.clone(), st.clone());
                                std::thread::spawn(move || pump(from, to, b, st));
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Proxy {
            port,
            blocked,
            stop,
        })
    }

    /// Cut (or restore) the link.
    pub fn set_blocked(&self, blocked: bool) {
        self.blocked
            .store(blocked, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if blocked.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// The `agent_lease` (seconds) written into every scheduler's config.
pub const AGENT_LEASE_SECS: u64 = 5;

/// How to build a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Scheduler nodes (Raft voters); 1 runs without peers.
    pub schedulers: usize,
    /// Put a fault-injecting proxy on every scheduler-to-scheduler link.
    pub proxies: bool,
    /// Applied entries between snapshots (small values exercise snapshots).
    pub snapshot_entries: u64,
    /// How often a scheduler looks whether a snapshot is due (`None`: the
    /// scheduler's default, 30 s).
    pub snapshot_interval: Option<&'static str>,
    /// Appended to every scheduler's config (e.g. a `[scheduling]` table).
    pub scheduler_toml: &'static str,
    pub agents: usize,
    pub gpus_per_agent: usize,
    /// Use real cgroups (as root) or none.
    pub cgroups: bool,
    pub kill_grace: &'static str,
    /// Mutual TLS everywhere: a CA and certificates made with `muster admin
    /// ca init` / `cert issue` in `pki/`; the CLI runs with a `user:root`
    /// certificate (see [`Cluster::cli_config`]).
    pub tls: bool,
    /// Top-level keys for every agent's config; `{dir}` is the cluster's
    /// folder and `{i}` the agent's index.
    pub agent_toml: &'static str,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            schedulers: 1,
            proxies: false,
            snapshot_entries: 10_000,
            snapshot_interval: None,
            scheduler_toml: "",
            agents: 2,
            gpus_per_agent: 4,
            cgroups: has_cgroup_v1(),
            kill_grace: "1s",
            tls: false,
            agent_toml: "",
        }
    }
}

/// A running test cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// Every scheduler's client address, comma-separated (what the CLI gets).
    pub addr: String,
    /// Each scheduler's own client address.
    pub sched_addrs: Vec<String>,
    pub spec: ClusterSpec,
    schedulers: Vec<Option<Child>>,
    /// proxies[(from, to)]: the link `from` uses to reach `to`.
    pub proxies: std::collections::BTreeMap<(usize, usize), Proxy>,
    agents: Vec<Option<Child>>,
    id: String,
}

impl Cluster {
    /// Start a scheduler and the agents, and wait until every agent registered.
    pub fn start(spec: ClusterSpec) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("muster-test-").tempdir()?;
        let ports: Vec<u16> = (0..spec.schedulers.max(1)).map(|_| free_port()).collect();
        let id = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sched_addrs: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let mut c = Cluster {
            addr: sched_addrs.join(","),
            sched_addrs,
            dir,
            spec,
            schedulers: vec![],
            proxies: Default::default(),
            agents: vec![],
            id,
        };
        let n = c.sched_addrs.len();
        if c.spec.tls {
            c.make_pki(n)?;
        }
        if c.spec.proxies {
            for from in 0..n {
                for to in (0..n).filter(|t| *t != from) {
                    c.proxies.insert((from, to), Proxy::start(ports[to])?);
                }
            }
        }
        for i in 0..n {
            c.write_scheduler_config(i, n, false)?;
            c.schedulers.push(None);
            c.start_scheduler_node(i)?;
        }
        c.wait_leader(Duration::from_secs(30))
            .map_err(|e| anyhow!("{e}; logs: {}", c.log_tail()))?;
        for i in 0..c.spec.agents {
            c.write_agent_config(i)?;
            c.agents.push(None);
            c.start_agent(i)?;
        }
        let n = c.spec.agents;
        let registered = wait_for("agents to register", Duration::from_secs(60), || {
            let v = c.json(&["nodes"]).ok()?;
            let ready = v["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["state"] == "ready")
                .count();
            (ready == n).then_some(())
        });
        // The folder goes with the cluster: say what the daemons said.
        registered.map_err(|e| anyhow!("{e}; logs: {}", c.log_tail()))?;
        Ok(c)
    }

    /// The peers table scheduler `i` uses to reach members `0..members`.
    fn peers_toml(&self, i: usize, members: usize) -> String {
        if members <= 1 {
            return String::new();
        }
        let mut out = String::from("[peers]\n");
        for j in 0..members {
            let addr = match self.proxies.get(&(i, j)) {
                Some(p) => format!("http://127.0.0.1:{}", p.port),
                None => self.sched_addrs[j].clone(),
            };
            out.push_str(&format!("{} = \"{}\"\n", j + 1, addr));
        }
        out
    }

    /// Write scheduler `i`'s config (Raft id `i + 1`) for a cluster of
    /// `members`; `join` for a node added later.
    pub fn write_scheduler_config(&self, i: usize, members: usize, join: bool) -> Result<()> {
        let port = self.sched_addrs[i]
            .rsplit(':')
            .next()
            .unwrap_or("0")
            .to_string();
        std::fs::write(
            self.path(&format!("scheduler-{i}.toml")),
            format!(
                "node_id = {}\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ncheckpoint_root = \"{}\"\n\
                 agent_lease = \"{AGENT_LEASE_SECS}s\"\nheartbeat_interval = \"500ms\"\nraft_tick = \"50ms\"\n\
                 election_ticks = 10\nheartbeat_ticks = 2\ncommit_timeout = \"2s\"\n\
                 snapshot_entries = {}\n{}join = {join}\n{}\n{}",
                i + 1,
                self.path(&format!("scheduler-{i}-data")).display(),
                self.path("checkpoints").display(),
                self.spec.snapshot_entries,
                self.spec
                    .snapshot_interval
                    .map(|every| format!("snapshot_interval = \"{every}\"\n"))
                    .unwrap_or_default(),
                self.peers_toml(i, members),
                self.spec.scheduler_toml,
            ) + &self.tls_toml("node", &format!("sched-{i}")),
        )?;
        Ok(())
    }

    /// Add scheduler slots (addresses) for nodes to be joined later.
    pub fn reserve_schedulers(&mut self, count: usize) {
        for _ in 0..count {
            self.sched_addrs
                .push(format!("http://127.0.0.1:{}", free_port()));
            self.schedulers.push(None);
        }
    }

    /// Wait until some scheduler reports itself leader; returns its index.
    pub fn wait_leader(&self, timeout: Duration) -> Result<usize> {
        wait_for("a leader", timeout, || self.leader())
    }

    /// The index of the scheduler that says it is the leader, if any.
    pub fn leader(&self) -> Option<usize> {
        (0..self.sched_addrs.len()).find(|i| {
            self.schedulers.get(*i).is_some_and(|c| c.is_some())
                && self.admin_status(*i).is_some_and(|v| v["role"] == "leader")
        })
    }

    /// Scheduler `i`'s own admin report (`muster admin status --json`, this member's row).
    pub fn admin_status(&self, i: usize) -> Option<Value> {
        let mut cmd = Command::new(binary("muster"));
        if let Some(cfg) = self.cli_config() {
            cmd.arg("--config").arg(cfg);
        }
        let out = cmd
            .args(["--json", "--addr", &self.sched_addrs[i], "admin", "status"])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["members"]
            .as_array()?
            .iter()
            .find(|m| m["address"] == self.sched_addrs[i].as_str() && m["role"] != "unreachable")
            .cloned()
    }

    /// Wait until every running scheduler has applied the same state.
    pub fn wait_converged(&self, timeout: Duration) -> Result<String> {
        let mut last = String::new();
        let r = wait_for("schedulers to converge", timeout, || {
            let running: Vec<usize> = (0..self.schedulers.len())
                .filter(|i| self.schedulers[*i].is_some())
                .collect();
            let reports: Vec<Value> = running
                .iter()
                .filter_map(|i| self.admin_status(*i))
                .collect();
            last = format!("{reports:?}");
            if reports.len() != running.len() {
                return None;
            }
            let digests: std::collections::BTreeSet<String> = reports
                .iter()
                .map(|r| format!("{}@{}", r["state_digest"], r["applied_index"]))
                .collect();
            (digests.len() == 1).then(|| digests.into_iter().next().unwrap_or_default())
        });
        r.map_err(|e| anyhow!("{e}; last: {last}"))
    }

    /// A path inside the cluster's folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Name of agent `i`'s node.
    pub fn node_name(&self, i: usize) -> String {
        format!("node-{i}")
    }

    fn write_agent_config(&self, i: usize) -> Result<()> {
        let tls = self.tls_toml("agent", &self.node_name(i));
        self.write_agent_config_with(i, &tls)
    }

    fn write_agent_config_with(&self, i: usize, tls_toml: &str) -> Result<()> {
        let lib = muster_nvml_mock::find_cdylib()
            .ok_or_else(|| anyhow!("the NVML mock library was not built"))?;
        let gpus = (0..self.spec.gpus_per_agent)
            .map(|g| MockGpu {
                uuid: format!("GPU-{i:04x}{g:04x}-0000-4000-8000-{}", self.id_hex(i, g)),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_bytes: 80 << 30,
                minor: g as u32,
                pci_bus_id: format!("00000000:{:02x}:00.0", 0x18 + g),
                numa_node: (g / 4) as i32,
                nvlink_group: Some((g / 4) as u32),
            })
            .collect();
        let mock = MockConfig {
            driver_version: "550.54.15".into(),
            gpus,
        };
        muster_nvml_mock::write_config(self.path(&format!("nvml-{i}.json")), &mock)?;
        let cgroups = if self.spec.cgroups { "v1" } else { "none" };
        std::fs::write(
            self.path(&format!("agent-{i}.toml")),
            format!(
                "node_name = \"{}\"\nschedulers = [{}]\nlisten = \"127.0.0.1:0\"\n\
                 data_dir = \"{}\"\ncgroups = \"{cgroups}\"\ncgroup_parent = \"{}/agent-{i}\"\n\
                 allow_root_jobs = true\nkill_grace = \"{}\"\ncpu_millis = 16000\n\
                 memory_bytes = 17179869184\n{}\n[gpu]\nbackend = \"nvml\"\nlibrary_path = \"{}\"\n",
                self.node_name(i),
                self.sched_addrs
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.path(&format!("agent-{i}-data")).display(),
                self.id,
                self.spec.kill_grace,
                self.spec
                    .agent_toml
                    .replace("{dir}", &self.dir.path().to_string_lossy())
                    .replace("{i}", &i.to_string()),
                lib.display()
            ) + tls_toml,
        )?;
        Ok(())
    }

    fn id_hex(&self, i: usize, g: usize) -> String {
        format!("{:012x}", (i * 1000 + g) as u64)
    }

    /// Path of agent `i`'s NVML fault-injection file.
    pub fn faults_file(&self, i: usize) -> PathBuf {
        self.path(&format!("nvml-faults-{i}.json"))
    }

    fn spawn_logged(
        &self,
        bin: &str,
        config: &Path,
        log: &str,
        envs: &[(String, PathBuf)],
    ) -> Result<Child> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(log))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(binary(bin));
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,muster=debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.spawn().with_context(|| format!("starting {bin}"))
    }

    /// Start (or restart) the only scheduler and wait until it answers.
    pub fn start_scheduler(&mut self) -> Result<()> {
        self.start_scheduler_node(0)?;
        self.wait_leader(Duration::from_secs(20))?;
        Ok(())
    }

    /// Start (or restart) scheduler `i`.
    pub fn start_scheduler_node(&mut self, i: usize) -> Result<()> {
        let child = self.spawn_logged(
            "muster-scheduler",
            &self.path(&format!("scheduler-{i}.toml")),
            &format!("scheduler-{i}.log"),
            &[],
        )?;
        self.schedulers[i] = Some(child);
        Ok(())
    }

    /// `kill -9` the only scheduler.
    pub fn kill_scheduler(&mut self) {
        self.kill_scheduler_node(0);
    }

    /// `kill -9` scheduler `i`.
    pub fn kill_scheduler_node(&mut self, i: usize) {
        if let Some(mut c) = self.schedulers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether scheduler `i`'s process has exited (it was started by us).
    pub fn scheduler_exited(&mut self, i: usize) -> bool {
        match self.schedulers[i].as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }

    /// Start (or restart) agent `i`.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let envs = vec![
            (
                muster_nvml_mock::CONFIG_ENV.to_string(),
                self.path(&format!("nvml-{i}.json")),
            ),
            (
                muster_nvml_mock::FAULTS_ENV.to_string(),
                self.faults_file(i),
            ),
        ];
        let child = self.spawn_logged(
            "muster-agent",
            &self.path(&format!("agent-{i}.toml")),
            &format!("agent-{i}.log"),
            &envs,
        )?;
        self.agents[i] = Some(child);
        Ok(())
    }

    /// Send `sig` to agent `i` (SIGSTOP to stall it, SIGCONT to resume it).
    pub fn signal_agent(&self, i: usize, sig: nix::sys::signal::Signal) -> Result<()> {
        let child = self.agents[i]
            .as_ref()
            .ok_or_else(|| anyhow!("agent {i} is not running"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig)
            .with_context(|| format!("signalling agent {i}"))
    }

    /// Agent `i`'s data folder (task records, logs, its sockets).
    pub fn agent_data(&self, i: usize) -> PathBuf {
        self.path(&format!("agent-{i}-data"))
    }

    /// `kill -9` agent `i` (its tasks keep running under their supervisors).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run the CLI against this cluster.
    pub fn muster(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(binary("muster"));
        if let Some(cfg) = self.cli_config() {
            cmd.arg("--config").arg(cfg);
        }
        cmd.arg("--addr")
            .arg(&self.addr)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running muster")
    }

    /// Run the CLI and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.muster(args)?;
        if !out.status.success() {
            bail!(
                "muster {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run the CLI with `--json` and parse the output.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let text = self.ok(&a)?;
        serde_json::from_str(&text)
            .with_context(|| format!("bad JSON from muster {args:?}: {text}"))
    }

    /// Submit a job; returns its id.
    pub fn submit(&self, args: &[&str]) -> Result<u64> {
        let mut a = vec!["submit"];
        a.extend_from_slice(args);
        let v = self.json(&a)?;
        v["id"].as_u64().ok_or_else(|| anyhow!("no id in {v}"))
    }

    /// `muster show JOB --json`.
    pub fn show(&self, id: u64) -> Result<Value> {
        self.json(&["show", &id.to_string()])
    }

    /// Wait until the job reaches `state`; returns the job.
    pub fn wait_state(&self, id: u64, state: &str, timeout: Duration) -> Result<Value> {
        let mut last = Value::Null;
        let r = wait_for(&format!("job {id} to be {state}"), timeout, || {
            last = self.show(id).ok()?;
            (last["state"] == state).then(|| last.clone())
        });
        r.map_err(|e| anyhow!("{e}; last seen: {last}; logs: {}", self.log_tail()))
    }

    /// The last lines of every daemon log, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<String> = (0..self.schedulers.len())
            .map(|i| format!("scheduler-{i}.log"))
            .collect();
        logs.extend((0..self.agents.len()).map(|i| format!("agent-{i}.log")));
        for l in logs {
            let text = std::fs::read_to_string(self.path(&l)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("\n--- {l}\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Kill every task process the agents started (supervisors and tasks).
    fn kill_tasks(&self) {
        for i in 0..self.agents.len() {
            let tasks = self.path(&format!("agent-{i}-data/tasks"));
            let Ok(entries) = std::fs::read_dir(tasks) else {
                continue;
            };
            for e in entries.flatten() {
                if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
}

impl Cluster {
    /// Remove the cgroup folders this cluster's agents created (deepest first).
    fn remove_cgroups(&self) {
        let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for c in controllers.flatten() {
            let top = c.path().join(&self.id);
            if !top.is_dir() {
                continue;
            }
            let mut dirs = Vec::new();
            collect_dirs(&top, &mut dirs);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                for _ in 0..20 {
                    if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Shown with the failure (the test harness captures it).
            eprintln!("daemon logs of the failed test:{}", self.log_tail());
        }
        for i in 0..self.agents.len() {
            self.kill_agent(i);
        }
        for i in 0..self.schedulers.len() {
            self.kill_scheduler_node(i);
        }
        self.kill_tasks();
        self.remove_cgroups();
    }
}

/// Create the local account `user` (no home, `/bin/sh`) if it is missing:
/// attack tests act as a real unprivileged user. Needs root.
pub fn ensure_user(user: &str) -> Result<()> {
    // Tests in one binary may ask at once; useradd locks /etc/passwd.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let exists = || nix::unistd::User::from_name(user).ok().flatten().is_some();
    for _ in 0..20 {
        if exists() {
            return Ok(());
        }
        let out = Command::new("useradd")
            .args(["-M", "-s", "/bin/sh", user])
            .output()
            .context("running useradd")?;
        if out.status.success() || exists() {
            return Ok(());
        }
        // Another test binary holds the lock on /etc/passwd: try again.
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("useradd {user} failed")
}

/// Run `program args` as the local user `user` (with `runuser`), with `envs`.
pub fn run_as(user: &str, program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--"])
        .arg(program)
        .args(args)
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output()
        .with_context(|| format!("running {} as {user}", program.display()))
}

/// Helpers of the fault-injection suite (`tests/tests/faults.rs`).
impl Cluster {
    /// The cluster's name: its folder's name, also its cgroup parent. Unique
    /// among the clusters alive on this host.
    pub fn name(&self) -> &str {
        &self.id
    }

    /// Process id of scheduler `i`, if we started it and it was not killed.
    pub fn scheduler_pid(&self, i: usize) -> Option<u32> {
        self.schedulers.get(i)?.as_ref().map(|c| c.id())
    }

    /// Process id of agent `i`, if we started it and it was not killed.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents.get(i)?.as_ref().map(|c| c.id())
    }

    /// Send `sig` to scheduler `i` (SIGSTOP to stall it, SIGCONT to resume it).
    pub fn signal_scheduler(&self, i: usize, sig: nix::sys::signal::Signal) -> Result<()> {
        let pid = self
            .scheduler_pid(i)
            .ok_or_else(|| anyhow!("scheduler {i} is not running"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .with_context(|| format!("signalling scheduler {i}"))
    }

    /// The `agent_lease` every scheduler of a harness cluster runs with.
    pub fn agent_lease(&self) -> Duration {
        Duration::from_secs(AGENT_LEASE_SECS)
    }
}

/// Tokens and the audit trail, as the security and attack tests use them.
impl Cluster {
    /// Issue a token for `user` into `<user>.token` in the cluster's folder
    /// (mode 0600, as the CLI requires); returns the file and the secret.
    pub fn issue_token(&self, user: &str) -> Result<(PathBuf, String)> {
        let file = self.path(&format!("{user}.token"));
        let out = file.to_string_lossy().into_owned();
        self.json(&["admin", "token", "issue", "--user", user, "--out", &out])
            .with_context(|| format!("issuing a token for {user}"))?;
        let secret = std::fs::read_to_string(&file)?.trim().to_string();
        Ok((file, secret))
    }

    /// Run the CLI with the token in `tok` (`--token-file`); panics if
    /// the CLI cannot be started at all.
    pub fn muster_with_token(&self, tok: &Path, args: &[&str]) -> Output {
        let tok = tok.to_string_lossy().into_owned();
        let mut all = vec!["--token-file", tok.as_str()];
        all.extend_from_slice(args);
        self.muster(&all).expect("run muster")
    }

    /// The first audit entry matching `f`, waiting up to `timeout` for it;
    /// panics with the trail if none comes.
    pub fn audited(&self, timeout: Duration, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let r = wait_for(&format!("an audit entry: {what}"), timeout, || {
            last = self.json(&["admin", "audit"]).ok()?;
            last["entries"].as_array()?.iter().find(|e| f(e)).cloned()
        });
        r.unwrap_or_else(|e| panic!("{e}; audit: {last:#}"))
    }
}

/// Whether audit entry `e` is `who` doing `action` with an outcome that
/// begins with `outcome` (`applied`, `denied`, ...).
pub fn audit_is(e: &Value, who: &str, action: &str, outcome: &str) -> bool {
    e["who"] == who
        && e["action"] == action
        && e["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with(outcome))
}
