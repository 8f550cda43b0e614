//! The command line: global options and one struct per subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::dev::DevArgs;
use crate::spec;

/// Muster: a scheduler for bare-metal GPU clusters.
#[derive(Debug, Parser)]
#[command(name = "muster", version, propagate_version = true)]
#[command(
    after_help = "The scheduler address is taken from --addr, then MUSTER_ADDR, then the \
config file, then http://127.0.0.1:7470 (where 'muster dev' listens)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command accepts.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Scheduler address, http://HOST:PORT or HOST:PORT, or an agent's user
    /// socket unix:/PATH [env: MUSTER_ADDR]
    #[arg(
        long,
        global = true,
        value_name = "URL",
        help_heading = "Global options"
    )]
    pub addr: Option<String>,

    /// Config file with `addr = "..."`, `token_file = "..."` and a `[tls]`
    /// table (ca, cert, key) [default: $XDG_CONFIG_HOME/muster/config.toml,
    /// then ~/.config/muster/config.toml, then /etc/muster/cli.toml]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        help_heading = "Global options"
    )]
    pub config: Option<PathBuf>,

    /// Print machine-readable JSON instead of tables
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,

    /// Read from whichever scheduler answers without confirming with the
    /// leader first: faster, but may miss the latest changes (reads are
    /// linearizable by default)
    #[arg(long, global = true, help_heading = "Global options")]
    pub stale: bool,

    /// File with your token (mode 0600) [default: `token_file` in the config
    /// file, then ~/.config/muster/token if it exists; without one, the
    /// scheduler identifies local callers by their uid]
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "MUSTER_TOKEN_FILE",
        help_heading = "Global options"
    )]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job
    Submit(SubmitArgs),
    /// List pending and running jobs
    Queue(QueueArgs),
    /// Show one job and its tasks
    Show(JobArg),
    /// Say why a job is not running: the planner's own verdict
    Why(JobArg),
    /// Cancel a job
    Cancel(JobArg),
    /// Print a task's output
    Logs(LogsArgs),
    /// List nodes and their GPUs
    Nodes(NodesArgs),
    /// Show the scheduler's state (leader, Raft progress, counts)
    Status,
    /// Manage tenants
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Scheduler cluster administration: Raft status and membership, CA and
    /// certificates, tokens, the audit trail
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Run a one-machine cluster (scheduler and agent) for trying Muster out
    Dev(DevArgs),
    /// Say who the scheduler takes you to be, and your roles
    Whoami,
    /// Report from inside a task (to its agent)
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Drain or resume a node
    #[command(subcommand)]
    Node(NodeCommand),
}

/// `muster checkpoint`.
#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Tell the scheduler this task finished writing a checkpoint to
    /// $MUSTER_CHECKPOINT_DIR (run it from inside the task)
    #[command(after_help = "Example, in a training loop:\n  \
        torch.save(state, f\"{os.environ['MUSTER_CHECKPOINT_DIR']}/ckpt.pt\")\n  \
        subprocess.run([\"muster\", \"checkpoint\", \"done\", \"--step\", str(step)], check=True)")]
    Done(CheckpointDoneArgs),
}

/// `muster checkpoint done`.
#[derive(Debug, Args)]
pub struct CheckpointDoneArgs {
    /// The training step the checkpoint holds
    #[arg(long, value_name = "N")]
    pub step: Option<u64>,
    /// The agent's task socket [default: $MUSTER_AGENT_SOCKET, which every task gets]
    #[arg(long, value_name = "PATH", env = "MUSTER_AGENT_SOCKET")]
    pub socket: Option<PathBuf>,
}

/// `muster node`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Let running work finish and place nothing new on the node
    Drain(NodeDrainArgs),
    /// Take work again; also clears the GPU faults recorded on the node
    Resume(NodeNameArg),
}

/// `muster node drain`.
#[derive(Debug, Args)]
pub struct NodeDrainArgs {
    /// Node name (as `muster nodes` lists it)
    #[arg(value_name = "NODE")]
    pub node: String,
    /// Why, shown by `muster nodes` [default: drained by an administrator]
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

/// A command that takes one node name.
#[derive(Debug, Args)]
pub struct NodeNameArg {
    /// Node name (as `muster nodes` lists it)
    #[arg(value_name = "NODE")]
    pub node: String,
}

const SUBMIT_EXAMPLES: &str = "\
Examples:
  muster submit -- python train.py --epochs 3
  muster submit --tasks 4 --gpus 8 --cpus 16 --mem 200G --time 12h -- torchrun train.py
  muster submit --cpus 0.5 --mem 512M --env LOG=debug -- ./check.sh
  muster submit --tenant ml/nlp --priority high --tasks 4 --gpus 8 --same block -- torchrun train.py
  muster submit -f job.toml --gpus 2        # flags override the file

A job file (every key optional except command):
  name = \"train\"
  tenant = \"ml/vision\"
  priority = \"high\"           # a class from the scheduler's config
  same = \"block\"              # all nodes under one `block` label (or prefer_same)
  tasks = 4
  gpus = 8                     # per task
  cpus = 16                    # per task; fractions allowed (0.5)
  mem = \"200G\"                 # per task
  time = \"12h\"                 # or \"12:00:00\"; omit for no limit
  command = [\"torchrun\", \"train.py\"]   # or a string, run by /bin/sh -c
  workdir = \"/data/run\"
  signal = \"USR1\"             # stop signal [default: TERM]
  grace = \"2m\"                # then SIGKILL [default: the scheduler's]
  checkpoint_on_preempt = true  # kill once a checkpoint is reported
  max_restarts = 3             # restarts after a task failure
  [env]
  NCCL_DEBUG = \"INFO\"

Sizes: bytes, or K/M/G/T (powers of 1024, also KiB/MiB/GiB/TiB), or KB/MB/GB/TB
(powers of 1000). Durations: 90s, 30m, 2h, 1h30m, MM:SS, HH:MM:SS, D-HH:MM:SS.
Every task gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and
CUDA_VISIBLE_DEVICES, MUSTER_CHECKPOINT_DIR and MUSTER_RESTART_COUNT. A task
reports a finished checkpoint with `muster checkpoint done --step N`.
The job id is printed on stdout.";

/// `muster submit`.
#[derive(Debug, Args)]
#[command(after_help = SUBMIT_EXAMPLES)]
pub struct SubmitArgs {
    /// Read the job from a TOML file; flags given too override it
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Idempotency key: a submission with a key already used by you returns
    /// the job it created instead of a second one [default: a fresh key;
    /// the CLI's own retries reuse it]
    #[arg(long, value_name = "KEY")]
    pub request_id: Option<String>,

    /// Submit N identical jobs at once (a job array); each gets
    /// MUSTER_ARRAY_INDEX=0..N-1 and prints as FIRST-LAST
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub array: Option<u32>,

    /// Number of tasks, placed all or nothing [default: 1]
    #[arg(long, value_name = "N", value_parser = spec::parse_tasks, allow_hyphen_values = true)]
    pub tasks: Option<u32>,

    /// GPUs per task [default: 0]
    #[arg(long, value_name = "G")]
    pub gpus: Option<u32>,

    /// CPUs per task, fractions allowed (0.5) or millis (500m) [default: 1]
    #[arg(long, value_name = "C", value_parser = spec::parse_cpus, allow_hyphen_values = true)]
    pub cpus: Option<u32>,

    /// Memory per task, e.g. 512M, 16G, 1.5GiB [default: 1G]
    #[arg(long, value_name = "SIZE", value_parser = spec::parse_mem, allow_hyphen_values = true)]
    pub mem: Option<u64>,

    /// Time limit, e.g. 90s, 2h, 1h30m, 01:30:00 [default: none]
    #[arg(long, value_name = "DURATION", value_parser = spec::parse_time_limit, allow_hyphen_values = true)]
    pub time: Option<u64>,

    /// Tenant to charge, e.g. ml/nlp [default: your default tenant, else `default`]
    #[arg(long, value_name = "T", value_parser = spec::parse_nonempty)]
    pub tenant: Option<String>,

    /// Priority class (scheduler config), e.g. low, normal, high [default: the
    /// scheduler's default class]
    #[arg(long, value_name = "CLASS", value_parser = spec::parse_nonempty)]
    pub priority: Option<String>,

    /// Place every task under one value of this node label (e.g. block, rack);
    /// wait rather than spread
    #[arg(long, value_name = "LABEL", value_parser = spec::parse_nonempty, conflicts_with = "prefer_same")]
    pub same: Option<String>,

    /// Prefer one value of this node label for every task; spread if none has room
    #[arg(long, value_name = "LABEL", value_parser = spec::parse_nonempty)]
    pub prefer_same: Option<String>,

    /// Job name [default: the command's file name]
    #[arg(long, value_name = "NAME", value_parser = spec::parse_nonempty)]
    pub name: Option<String>,

    /// Set an environment variable in every task (repeatable)
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = spec::parse_env_pair)]
    pub env: Vec<(String, String)>,

    /// Working directory of the tasks; relative paths are taken from the
    /// current directory [default: the current directory]
    #[arg(long, value_name = "DIR", value_parser = clap::value_parser!(PathBuf))]
    pub workdir: Option<PathBuf>,

    /// Signal sent first when the job is stopped (preemption, time limit,
    /// cancel), e.g. USR1; KILL and STOP are refused [default: TERM]
    #[arg(long, value_name = "SIG", value_parser = spec::parse_signal)]
    pub signal: Option<i32>,

    /// Time between that signal and SIGKILL, e.g. 2m; capped by the
    /// scheduler's `max_grace` [default: the scheduler's `default_grace`]
    #[arg(long, value_name = "DURATION", value_parser = spec::parse_grace)]
    pub grace: Option<u64>,

    /// On preemption, kill the job as soon as it reports a checkpoint
    /// (`muster checkpoint done`) after its signal, instead of waiting for it
    /// to exit (at most the grace period)
    #[arg(long)]
    pub checkpoint_on_preempt: bool,

    /// Restart the whole gang up to N times after a task fails [default: 0]
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,

    /// The command to run, after `--`
    #[arg(value_name = "COMMAND", trailing_var_arg = true)]
    pub command: Vec<String>,
}

/// `muster queue`.
#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Include finished jobs (completed, failed, cancelled, timed out)
    #[arg(long, short = 'a')]
    pub all: bool,
}

/// A command that takes one job id.
#[derive(Debug, Args)]
pub struct JobArg {
    /// Job id
    #[arg(value_name = "JOB")]
    pub job: u64,
}

/// `muster logs`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  muster logs 42\n  muster logs 42 --task 3 --stderr --follow")]
pub struct LogsArgs {
    /// Job id
    #[arg(value_name = "JOB")]
    pub job: u64,

    /// Which task (its index, from 0)
    #[arg(long, short = 't', value_name = "N", default_value_t = 0)]
    pub task: u32,

    /// Only standard output
    #[arg(long, conflicts_with = "stderr")]
    pub stdout: bool,

    /// Only standard error
    #[arg(long)]
    pub stderr: bool,

    /// Keep printing output as the task writes it, until it ends
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// `muster nodes`.
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// Also list every GPU (index, UUID, model, memory, health, job)
    #[arg(long = "gpus", short = 'v', visible_alias = "verbose")]
    pub gpus: bool,
}

pub use crate::tenant_args::TenantCommand;

/// `muster admin ...`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Every member's role, term, commit and applied index, lag and links.
    /// Asks each member listed in --addr (comma-separated) and every member
    /// they know of.
    Status,
    /// Scheduler membership (joint consensus through the Raft log)
    #[command(subcommand)]
    Peers(PeersCommand),
    /// The cluster's certificate authority (mutual TLS)
    #[command(subcommand)]
    Ca(crate::security_args::CaCommand),
    /// Certificates for schedulers, agents and users
    #[command(subcommand)]
    Cert(crate::security_args::CertCommand),
    /// Users' tokens: issue, list, revoke (cluster admins)
    #[command(subcommand)]
    Token(crate::security_args::TokenCommand),
    /// Read the audit trail: who changed what, when, from where (cluster admins)
    Audit(crate::security_args::AuditArgs),
}

/// `muster admin peers ...`.
#[derive(Debug, Subcommand)]
pub enum PeersCommand {
    /// List the members
    List,
    /// Add a member: start it first with `join = true` and its own node_id
    #[command(
        after_help = "Example:\n  muster admin peers add --id 4 --peer-addr http://10.0.0.4:7470"
    )]
    Add(PeerAddArgs),
    /// Remove a member; it stops serving once the change commits
    Remove(PeerRemoveArgs),
}

/// `muster admin peers add`.
#[derive(Debug, Args)]
pub struct PeerAddArgs {
    /// The new member's Raft id (its `node_id`)
    #[arg(long, value_name = "ID")]
    pub id: u64,
    /// The new member's address, as others reach its `listen`
    #[arg(long = "peer-addr", value_name = "URL")]
    pub peer_addr: String,
}

/// `muster admin peers remove`.
#[derive(Debug, Args)]
pub struct PeerRemoveArgs {
    /// The member's Raft id
    #[arg(value_name = "ID")]
    pub id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_takes_the_command_after_the_flags() {
        let cli = Cli::try_parse_from([
            "muster", "submit", "--gpus", "2", "--mem", "1.5GiB", "--", "python", "-u", "x.py",
        ])
        .expect("valid");
        let Command::Submit(s) = cli.command else {
            panic!("not submit");
        };
        assert_eq!(s.gpus, Some(2));
        assert_eq!(s.mem, Some(3 << 29));
        assert_eq!(s.command, ["python", "-u", "x.py"]);
    }

    #[test]
    fn bad_flag_values_name_the_flag() {
        let err = Cli::try_parse_from(["muster", "submit", "--mem", "lots", "--", "x"])
            .expect_err("invalid");
        assert!(err.to_string().contains("--mem"), "{err}");
        let err = Cli::try_parse_from(["muster", "submit", "--env", "1=2", "--", "x"])
            .expect_err("invalid");
        assert!(err.to_string().contains("--env"), "{err}");
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["muster", "queue", "--json", "--addr", "h:1"]).expect("valid");
        assert!(cli.global.json);
        assert_eq!(cli.global.addr.as_deref(), Some("h:1"));
    }
}
