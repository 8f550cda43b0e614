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

/// How to build a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub agents: usize,
    pub gpus_per_agent: usize,
    /// Use real cgroups (as root) or none.
    pub cgroups: bool,
    pub kill_grace: &'static str,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            agents: 2,
            gpus_per_agent: 4,
            cgroups: has_cgroup_v1(),
            kill_grace: "1s",
        }
    }
}

/// A running test cluster.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub spec: ClusterSpec,
    scheduler: Option<Child>,
    agents: Vec<Option<Child>>,
    id: String,
}

impl Cluster {
    /// Start a scheduler and the agents, and wait until every agent registered.
    pub fn start(spec: ClusterSpec) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("muster-test-").tempdir()?;
        let port = free_port();
        let id = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut c = Cluster {
            addr: format!("http://127.0.0.1:{port}"),
            dir,
            spec,
            scheduler: None,
            agents: vec![],
            id,
        };
        std::fs::write(
            c.path("scheduler.toml"),
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ncheckpoint_root = \"{}\"\n\
                 agent_lease = \"5s\"\nheartbeat_interval = \"500ms\"\n",
                c.path("scheduler-data").display(),
                c.path("checkpoints").display()
            ),
        )?;
        c.start_scheduler()?;
        for i in 0..c.spec.agents {
            c.write_agent_config(i)?;
            c.agents.push(None);
            c.start_agent(i)?;
        }
        let n = c.spec.agents;
        wait_for("agents to register", Duration::from_secs(30), || {
            let v = c.json(&["nodes"]).ok()?;
            let ready = v["nodes"]
                .as_array()?
                .iter()
                .filter(|n| n["state"] == "ready")
                .count();
            (ready == n).then_some(())
        })?;
        Ok(c)
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
                "node_name = \"{}\"\nschedulers = [\"{}\"]\nlisten = \"127.0.0.1:0\"\n\
                 data_dir = \"{}\"\ncgroups = \"{cgroups}\"\ncgroup_parent = \"{}/agent-{i}\"\n\
                 allow_root_jobs = true\nkill_grace = \"{}\"\ncpu_millis = 16000\n\
                 memory_bytes = 17179869184\n[gpu]\nbackend = \"nvml\"\nlibrary_path = \"{}\"\n",
                self.node_name(i),
                self.addr,
                self.path(&format!("agent-{i}-data")).display(),
                self.id,
                self.spec.kill_grace,
                lib.display()
            ),
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

    /// Start (or restart) the scheduler and wait until it answers.
    pub fn start_scheduler(&mut self) -> Result<()> {
        let child = self.spawn_logged(
            "muster-scheduler",
            &self.path("scheduler.toml"),
            "scheduler.log",
            &[],
        )?;
        self.scheduler = Some(child);
        wait_for("the scheduler to answer", Duration::from_secs(20), || {
            self.json(&["status"]).ok()
        })?;
        Ok(())
    }

    /// `kill -9` the scheduler.
    pub fn kill_scheduler(&mut self) {
        if let Some(mut c) = self.scheduler.take() {
            let _ = c.kill();
            let _ = c.wait();
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

    /// `kill -9` agent `i` (its tasks keep running under their supervisors).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run the CLI against this cluster.
    pub fn muster(&self, args: &[&str]) -> Result<Output> {
        Command::new(binary("muster"))
            .arg("--addr")
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
        let mut logs = vec!["scheduler.log".to_string()];
        logs.extend((0..self.spec.agents).map(|i| format!("agent-{i}.log")));
        for l in logs {
            let text = std::fs::read_to_string(self.path(&l)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
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
        for i in 0..self.spec.agents {
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
        for i in 0..self.agents.len() {
            self.kill_agent(i);
        }
        self.kill_scheduler();
        self.kill_tasks();
        self.remove_cgroups();
    }
}
