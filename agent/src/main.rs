//! `muster-agent`: the per-host agent daemon.

use anyhow::Context;
use clap::Parser;
use muster_agent::AgentConfig;
use std::path::PathBuf;

/// Muster agent: registers this host's GPUs and runs assigned tasks in cgroups.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Configuration file (every key is documented in config/agent.toml).
    #[arg(
        short,
        long,
        default_value = "/etc/muster/agent.toml",
        env = "MUSTER_AGENT_CONFIG"
    )]
    config: PathBuf,
    /// Check the configuration and the GPU inventory, print them, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    // The agent's own executable doubles as the per-task supervisor.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.len() == 3 && argv[1] == "__shim" {
        std::process::exit(muster_agent::task::shim::run(std::path::Path::new(
            &argv[2],
        )));
    }
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(muster_proto::daemon::log_colours())
        .init();
    let cfg = AgentConfig::load(&args.config)?;
    if args.check {
        let inv = muster_agent::gpu::open(&cfg.gpu)?;
        for g in inv.gpus()? {
            println!(
                "gpu {} {} {} minor={} {} bytes",
                g.index, g.uuid, g.model, g.minor, g.memory_bytes
            );
        }
        let cg = muster_agent::open_cgroups(&cfg)?;
        println!(
            "cgroups: {}",
            cg.map(|c| c.version().to_string()).unwrap_or("none".into())
        );
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {} (key `listen`)", cfg.listen))?;
        let shutdown = muster_proto::daemon::stop_signal();
        muster_agent::run(cfg, listener, shutdown, || {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        })
        .await?;
        Ok(())
    })
}
