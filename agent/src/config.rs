//! `agent.toml`: every key is documented in `config/agent.toml`. Parsed and
//! validated before anything starts; errors name the key and the file.

use crate::gpu::GpuBackendConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use muster_proto::daemon::ConfigError;

/// Which cgroup hierarchy to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// Detect: v2 if the unified hierarchy has the controllers, else v1.
    Auto,
    V1,
    V2,
    /// No isolation at all (laptops, unprivileged `muster dev`). Tasks can see
    /// every GPU and have no memory or CPU limit.
    None,
}

fn default_schedulers() -> Vec<String> {
    vec![format!("http://127.0.0.1:{}", 7470)]
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7471))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/muster/agent")
}
fn default_cgroup_root() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
}
fn default_cgroup_parent() -> String {
    "muster".into()
}
fn default_cgroups() -> CgroupMode {
    CgroupMode::Auto
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_true() -> bool {
    true
}
fn default_ignored_xids() -> Vec<u64> {
    crate::health::DEFAULT_IGNORED_XIDS.to_vec()
}
fn default_log_max_bytes() -> u64 {
    crate::task::shim::DEFAULT_LOG_MAX_BYTES
}
fn default_log_files() -> u32 {
    crate::task::shim::DEFAULT_LOG_FILES
}
fn default_gpu() -> GpuBackendConfig {
    GpuBackendConfig::Nvml { library_path: None }
}

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Node name; defaults to the host name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Scheduler addresses; the agent tries them in turn.
    #[serde(default = "default_schedulers")]
    pub schedulers: Vec<String>,
    /// Address of this agent's local service (task logs).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address others use to reach `listen`, and the host jobs use as
    /// MASTER_ADDR; defaults to the bound address.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Task records and logs.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_cgroups")]
    pub cgroups: CgroupMode,
    /// Mount point of the cgroup filesystem(s).
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
    /// Cgroup (per hierarchy) under which task cgroups are created.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
    /// Run jobs whose user is root. Off by default: root's jobs are refused
    /// unless this says so (the user itself is the authenticated one).
    #[serde(default)]
    pub allow_root_jobs: bool,
    /// Time between SIGTERM and SIGKILL when a task is stopped.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub kill_grace: Duration,
    /// CPUs offered to jobs, in milli-CPUs; defaults to all online CPUs.
    #[serde(default)]
    pub cpu_millis: Option<u32>,
    /// Memory offered to jobs in bytes; defaults to MemTotal less 1 GiB.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Free-form labels (rack, block, switch) reported to the scheduler.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The GPU inventory backend.
    #[serde(default = "default_gpu")]
    pub gpu: GpuBackendConfig,
    /// The program run as each task's supervisor; defaults to this executable.
    #[serde(default)]
    pub shim_path: Option<PathBuf>,
    /// The Unix socket tasks reach the agent on (`muster checkpoint done`);
    /// defaults to `<data_dir>.task.sock`.
    #[serde(default)]
    pub task_socket: Option<PathBuf>,
    /// Freeze tasks when the agent's lease with the scheduler has lapsed, so
    /// a stalled node never runs a task beside its replacement.
    #[serde(default = "default_true")]
    pub self_fence: bool,
    /// XIDs that are the application's fault (not the GPU's): not acted on.
    #[serde(default = "default_ignored_xids")]
    pub ignored_xids: Vec<u64>,
    /// Each task log file is rotated at this many bytes.
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
    /// Files kept per task stream (stdout, stderr), the live one included.
    #[serde(default = "default_log_files")]
    pub log_files: u32,
    /// Mutual TLS to the schedulers and for the local (logs) service:
    /// `[tls] ca, cert, key` (an `agent:NAME` certificate).
    #[serde(default)]
    pub tls: Option<muster_proto::tls::TlsFiles>,
    /// Serve the local service without TLS on a non-loopback address.
    #[serde(default)]
    pub insecure: bool,
    /// A Unix socket through which users of this host reach the cluster as
    /// themselves (identified by SO_PEERCRED), without a token.
    #[serde(default)]
    pub user_socket: Option<PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_name: None,
            schedulers: default_schedulers(),
            listen: default_listen(),
            advertise: None,
            data_dir: default_data_dir(),
            cgroups: default_cgroups(),
            cgroup_root: default_cgroup_root(),
            cgroup_parent: default_cgroup_parent(),
            allow_root_jobs: false,
            kill_grace: default_grace(),
            cpu_millis: None,
            memory_bytes: None,
            labels: BTreeMap::new(),
            gpu: default_gpu(),
            shim_path: None,
            task_socket: None,
            self_fence: true,
            ignored_xids: default_ignored_xids(),
            log_max_bytes: default_log_max_bytes(),
            log_files: default_log_files(),
            tls: None,
            insecure: false,
            user_socket: None,
        }
    }
}

impl AgentConfig {
    /// Read and validate a TOML file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        muster_proto::daemon::load_toml(path, Self::validate)
    }

    /// Parse and validate TOML text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        muster_proto::daemon::parse_toml(text, path, Self::validate)
    }

    /// Check values that parse but make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.schedulers.is_empty() {
            return Err("key `schedulers`: list at least one scheduler address".into());
        }
        if let Some(n) = &self.node_name {
            if n.is_empty() || n.len() > 253 || n.contains(char::is_whitespace) {
                return Err(format!("key `node_name`: invalid node name {n:?}"));
            }
        }
        if self.cgroup_parent.is_empty() || self.cgroup_parent.contains("..") {
            return Err("key `cgroup_parent`: must be a relative cgroup path".into());
        }
        if self.cpu_millis == Some(0) {
            return Err("key `cpu_millis`: must be greater than 0".into());
        }
        if self.memory_bytes == Some(0) {
            return Err("key `memory_bytes`: must be greater than 0".into());
        }
        if self.log_max_bytes < 1024 {
            return Err("key `log_max_bytes`: must be at least 1024".into());
        }
        if self.log_files == 0 || self.log_files > 100 {
            return Err("key `log_files`: must be 1 to 100".into());
        }
        if let Some(p) = &self.task_socket {
            // sockaddr_un holds 108 bytes, the NUL included.
            if p.as_os_str().len() > 107 {
                return Err("key `task_socket`: path longer than 107 bytes".into());
            }
        }
        muster_proto::tls::check_listen(self.tls.as_ref(), self.insecure, &self.listen, "agent")
    }

    /// The task socket's path: configured, or `<data_dir>.task.sock` beside
    /// the data folder (which only root may enter, so tasks could not reach
    /// a socket inside it).
    pub fn task_socket_path(&self) -> PathBuf {
        self.task_socket.clone().unwrap_or_else(|| {
            // Components drop a trailing slash, which would put it inside.
            let mut p = self
                .data_dir
                .components()
                .collect::<PathBuf>()
                .into_os_string();
            p.push(".task.sock");
            PathBuf::from(p)
        })
    }

    /// The node name: configured, or the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }
}

/// Online CPUs × 1000.
pub fn host_cpu_millis() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32 * 1000)
        .unwrap_or(1000)
}

/// MemTotal from /proc/meminfo less 1 GiB for the system, at least 1 GiB.
pub fn host_memory_bytes() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30);
    total.saturating_sub(1 << 30).max(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_key_and_file() {
        let e = AgentConfig::parse("colour = 1\n", Path::new("/etc/a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/a.toml") && e.contains("colour"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = AgentConfig::parse("kill_grace = \"forever\"\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kill_grace"), "{e}");
        let e = AgentConfig::parse("schedulers = []\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("schedulers"), "{e}");
        let e = AgentConfig::parse("cgroups = \"v3\"\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cgroups"), "{e}");
    }

    #[test]
    fn plain_listening_beyond_loopback_needs_tls_or_insecure() {
        let p = Path::new("a.toml");
        let e = AgentConfig::parse("listen = \"0.0.0.0:7471\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key `listen`") && e.contains("insecure = true"),
            "{e}"
        );
        AgentConfig::parse("listen = \"0.0.0.0:7471\"\ninsecure = true\n", p).unwrap();
        let e = AgentConfig::parse(
            "[tls]\nca = \"/nope/ca.pem\"\ncert = \"/nope/c.pem\"\nkey = \"/nope/k.pem\"\n",
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("key `tls.ca`"), "{e}");
    }

    #[test]
    fn defaults_and_example_config() {
        let d = AgentConfig::default();
        assert_eq!(d.cgroups, CgroupMode::Auto);
        assert!(!d.allow_root_jobs);
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/agent.toml");
        let cfg = AgentConfig::load(&p).unwrap();
        assert_eq!(cfg.kill_grace, Duration::from_secs(10));
        assert!(cfg.self_fence);
        assert_eq!(cfg.ignored_xids, crate::health::DEFAULT_IGNORED_XIDS);
        assert_eq!(cfg.log_files, 3);
        // Beside the data folder, which tasks cannot enter; a trailing
        // slash must not put it inside.
        assert_eq!(
            cfg.task_socket_path(),
            Path::new("/var/lib/muster/agent.task.sock")
        );
        let slash = AgentConfig {
            data_dir: "/x/agent/".into(),
            ..AgentConfig::default()
        };
        assert_eq!(slash.task_socket_path(), Path::new("/x/agent.task.sock"));
    }

    #[test]
    fn lifecycle_keys_are_checked() {
        for (text, key) in [
            ("log_files = 0\n", "log_files"),
            ("log_max_bytes = 10\n", "log_max_bytes"),
            ("self_fence = \"yes\"\n", "self_fence"),
            ("ignored_xids = [\"x\"]\n", "ignored_xids"),
        ] {
            let e = AgentConfig::parse(text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        let long = format!("task_socket = \"/{}\"\n", "x".repeat(120));
        let e = AgentConfig::parse(&long, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("task_socket"), "{e}");
    }
}
