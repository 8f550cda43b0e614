//! `scheduler.toml`: every key is documented in `config/scheduler.toml`.
//! Parsing and validation happen before any port is bound; an unknown key or
//! a bad value is an error that names the key and the file.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default client/agent port (`muster dev` listens here too).
pub const DEFAULT_PORT: u16 = 7470;

pub use muster_proto::daemon::ConfigError;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/muster/scheduler")
}
fn default_checkpoint_root() -> PathBuf {
    PathBuf::from("/var/lib/muster/checkpoints")
}
fn default_node_id() -> u64 {
    1
}
fn default_lease() -> Duration {
    Duration::from_secs(15)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(2)
}
fn default_tick() -> Duration {
    Duration::from_millis(50)
}
fn default_election_ticks() -> usize {
    10
}
fn default_heartbeat_ticks() -> usize {
    2
}
fn default_snapshot_entries() -> u64 {
    10_000
}
fn default_snapshot_interval() -> Duration {
    Duration::from_secs(30)
}

/// The scheduler's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Raft id of this scheduler (1..).
    #[serde(default = "default_node_id")]
    pub node_id: u64,
    /// Address for clients and agents (gRPC).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the Raft log, hard state and snapshots live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Root of per-job checkpoint directories (a shared filesystem in production).
    #[serde(default = "default_checkpoint_root")]
    pub checkpoint_root: PathBuf,
    /// An agent silent for this long is marked lost.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub agent_lease: Duration,
    /// How often agents are asked to send a heartbeat.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Raft's logical clock tick.
    #[serde(default = "default_tick", with = "humantime_serde")]
    pub raft_tick: Duration,
    /// Ticks without a leader before a follower campaigns.
    #[serde(default = "default_election_ticks")]
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    #[serde(default = "default_heartbeat_ticks")]
    pub heartbeat_ticks: usize,
    /// Applied entries since the last snapshot that make the next one due
    /// (it is taken at the next `snapshot_interval` look; the log before it
    /// is compacted).
    #[serde(default = "default_snapshot_entries")]
    pub snapshot_entries: u64,
    /// How often to look whether `snapshot_entries` have been applied since
    /// the last snapshot (at 8 times that many, a snapshot is taken at once).
    #[serde(default = "default_snapshot_interval", with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// Priority classes, fair share, backfill and preemption.
    #[serde(default)]
    pub scheduling: crate::scheduling::SchedulingConfig,
    /// Scheduler members by Raft id → address (`http://host:port`), this
    /// node included. Bootstraps a new cluster, and is how this node reaches
    /// the others (members added later are found through the log). Empty: a
    /// single-node cluster.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// Start without bootstrapping: this node waits to be added to an existing
    /// cluster with `muster admin peers add`.
    #[serde(default)]
    pub join: bool,
    /// How long a write may wait to be committed before the client is told
    /// there is no quorum.
    #[serde(default = "default_commit_timeout", with = "humantime_serde")]
    pub commit_timeout: Duration,
    /// Mutual TLS for clients, agents and peers (`[tls] ca, cert, key`).
    #[serde(default)]
    pub tls: Option<muster_proto::tls::TlsFiles>,
    /// Serve without TLS on a non-loopback address (and accept agents and
    /// peers without certificates). For trusted networks only.
    #[serde(default)]
    pub insecure: bool,
    /// Users who are cluster admins (root always is).
    #[serde(default)]
    pub cluster_admins: Vec<String>,
    /// Request limits (`[limits]`).
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[limits]`: how fast one user may submit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Writes (submit, cancel, tenant, token and drain requests; a job array
    /// counts once) per user per second, per scheduler.
    #[serde(default = "default_submits_per_second")]
    pub submits_per_second: f64,
    /// How many writes a user may make at once before the rate applies.
    #[serde(default = "default_submit_burst")]
    pub submit_burst: u32,
    /// The longest time limit (`muster submit --time`) a job may ask for;
    /// a longer one is refused, naming the field `time`.
    #[serde(default = "default_max_time_limit", with = "humantime_serde")]
    pub max_time_limit: Duration,
    /// Most unfinished jobs (pending or running; array elements count one
    /// each) one user may have; a submission past it is refused. Cluster
    /// admins are exempt.
    #[serde(default = "default_max_jobs_per_user")]
    pub max_jobs_per_user: u32,
}

fn default_max_jobs_per_user() -> u32 {
    20_000
}

fn default_max_time_limit() -> Duration {
    Duration::from_secs(365 * 24 * 3600)
}

fn default_submits_per_second() -> f64 {
    20.0
}
fn default_submit_burst() -> u32 {
    200
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            submits_per_second: default_submits_per_second(),
            submit_burst: default_submit_burst(),
            max_time_limit: default_max_time_limit(),
            max_jobs_per_user: default_max_jobs_per_user(),
        }
    }
}

fn default_commit_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            node_id: default_node_id(),
            listen: default_listen(),
            data_dir: default_data_dir(),
            checkpoint_root: default_checkpoint_root(),
            agent_lease: default_lease(),
            heartbeat_interval: default_heartbeat(),
            raft_tick: default_tick(),
            election_ticks: default_election_ticks(),
            heartbeat_ticks: default_heartbeat_ticks(),
            snapshot_entries: default_snapshot_entries(),
            snapshot_interval: default_snapshot_interval(),
            scheduling: Default::default(),
            peers: BTreeMap::new(),
            join: false,
            commit_timeout: default_commit_timeout(),
            tls: None,
            insecure: false,
            cluster_admins: vec![],
            limits: LimitsConfig::default(),
        }
    }
}

impl SchedulerConfig {
    /// Read and validate a TOML file.
    pub fn load(path: &Path) -> Result<SchedulerConfig, ConfigError> {
        muster_proto::daemon::load_toml(path, Self::validate)
    }

    /// Parse and validate TOML text; `path` is used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<SchedulerConfig, ConfigError> {
        muster_proto::daemon::parse_toml(text, path, Self::validate)
    }

    /// Check values that parse but make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("key `node_id`: must be at least 1".into());
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return Err("key `election_ticks`: must be greater than `heartbeat_ticks`".into());
        }
        if self.heartbeat_ticks == 0 {
            return Err("key `heartbeat_ticks`: must be at least 1".into());
        }
        if self.raft_tick.is_zero() {
            return Err("key `raft_tick`: must be greater than 0".into());
        }
        if self.agent_lease <= self.heartbeat_interval {
            return Err("key `agent_lease`: must be longer than `heartbeat_interval`".into());
        }
        if self.snapshot_entries == 0 {
            return Err("key `snapshot_entries`: must be at least 1".into());
        }
        if self.snapshot_interval.is_zero() {
            return Err("key `snapshot_interval`: must be greater than 0".into());
        }
        self.scheduling.validate()?;
        let peers = self.peer_map()?;
        if !peers.is_empty() && !peers.contains_key(&self.node_id) && !self.join {
            return Err(format!(
                "key `peers`: lists no address for this node (node_id = {})",
                self.node_id
            ));
        }
        if self.commit_timeout.is_zero() {
            return Err("key `commit_timeout`: must be greater than 0".into());
        }
        self.validate_security()
    }

    fn validate_security(&self) -> Result<(), String> {
        muster_proto::tls::check_listen(self.tls.as_ref(), self.insecure, &self.listen, "node")?;
        let rate = self.limits.submits_per_second;
        if rate.is_nan() || rate <= 0.0 {
            return Err("key `limits.submits_per_second`: must be greater than 0".into());
        }
        if self.limits.submit_burst == 0 {
            return Err("key `limits.submit_burst`: must be at least 1".into());
        }
        if self.limits.max_jobs_per_user == 0 {
            return Err("key `limits.max_jobs_per_user`: must be at least 1".into());
        }
        let max_time = self.limits.max_time_limit.as_secs();
        if max_time == 0 || max_time > crate::model::MAX_TIME_LIMIT_SECS {
            return Err(format!(
                "key `limits.max_time_limit`: must be from 1s to {}s (about a century)",
                crate::model::MAX_TIME_LIMIT_SECS
            ));
        }
        for u in &self.cluster_admins {
            crate::auth::roles::check_user_name(u)
                .map_err(|e| format!("key `cluster_admins`: {e}"))?;
        }
        Ok(())
    }

    /// `peers` with numeric ids, checked.
    pub fn peer_map(&self) -> Result<BTreeMap<u64, String>, String> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.peers {
            let id: u64 = k.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
                format!("key `peers.{k}`: a peer's key is its Raft id, a number from 1")
            })?;
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                return Err(format!(
                    "key `peers.{k}`: address {v:?} must start with http:// or https://"
                ));
            }
            out.insert(id, v.clone());
        }
        Ok(out)
    }

    /// The voters a brand-new cluster starts with.
    pub fn initial_voters(&self) -> Vec<u64> {
        let peers = self.peer_map().unwrap_or_default();
        if peers.is_empty() {
            vec![self.node_id]
        } else {
            peers.keys().copied().collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_key_and_file() {
        let e = SchedulerConfig::parse(
            "listen = \"127.0.0.1:1\"\nbogus = 1\n",
            Path::new("/x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/x.toml") && e.contains("bogus"), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let e = SchedulerConfig::parse("agent_lease = \"soon\"\n", Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent_lease") && e.contains("s.toml"), "{e}");
        let e = SchedulerConfig::parse("node_id = 0\n", Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("node_id"), "{e}");
    }

    #[test]
    fn plain_listening_beyond_loopback_needs_tls_or_insecure() {
        let p = Path::new("s.toml");
        let e = SchedulerConfig::parse("listen = \"0.0.0.0:7470\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("key `listen`") && e.contains("insecure = true"),
            "{e}"
        );
        SchedulerConfig::parse("listen = \"0.0.0.0:7470\"\ninsecure = true\n", p).unwrap();
        SchedulerConfig::parse("listen = \"127.0.0.1:7470\"\n", p).unwrap();
        let e = SchedulerConfig::parse(
            "[tls]\nca = \"/nope/ca.pem\"\ncert = \"/nope/c.pem\"\nkey = \"/nope/k.pem\"\n",
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("key `tls.ca`"), "{e}");
        let e = SchedulerConfig::parse("[limits]\nsubmits_per_second = 0\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.submits_per_second"), "{e}");
    }

    #[test]
    fn example_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/scheduler.toml");
        let cfg = SchedulerConfig::load(&p).unwrap();
        assert_eq!(cfg.listen.port(), DEFAULT_PORT);
        assert_eq!(cfg.limits.max_time_limit, default_max_time_limit());
    }

    #[test]
    fn max_jobs_per_user_must_allow_a_job() {
        let p = Path::new("s.toml");
        let e = SchedulerConfig::parse("[limits]\nmax_jobs_per_user = 0\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.max_jobs_per_user"), "{e}");
        let cfg = SchedulerConfig::parse("[limits]\nmax_jobs_per_user = 5\n", p).unwrap();
        assert_eq!(cfg.limits.max_jobs_per_user, 5);
    }

    #[test]
    fn max_time_limit_is_bounded() {
        let p = Path::new("t.toml");
        let cfg = SchedulerConfig::parse("[limits]\nmax_time_limit = \"2days\"\n", p).unwrap();
        assert_eq!(cfg.limits.max_time_limit, Duration::from_secs(2 * 86_400));
        for bad in ["0s", "1000years"] {
            let text = format!("[limits]\nmax_time_limit = \"{bad}\"\n");
            let e = SchedulerConfig::parse(&text, p).unwrap_err().to_string();
            assert!(e.contains("limits.max_time_limit"), "{e}");
        }
    }
}
