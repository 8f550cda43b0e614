//! `muster-scheduler`: the scheduler daemon.

use anyhow::Context;
use clap::Parser;
use muster_scheduler::SchedulerConfig;
use std::path::PathBuf;

/// Muster scheduler daemon: replicated state, gang planner, client and agent gRPC.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Configuration file (every key is documented in config/scheduler.toml).
    #[arg(
        short,
        long,
        default_value = "/etc/muster/scheduler.toml",
        env = "MUSTER_SCHEDULER_CONFIG"
    )]
    config: PathBuf,
    /// Override `listen` from the config file.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Override `data_dir` from the config file.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    // Everything this daemon creates (the sled database holds every job's
    // command and environment) is private to its user.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,raft=warn,sled=warn".into()),
        )
        .with_ansi(muster_proto::daemon::log_colours())
        .init();
    let mut cfg = SchedulerConfig::load(&args.config)?;
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    // The overrides are checked like the file (e.g. a public --listen needs TLS).
    cfg.validate()
        .map_err(|m| anyhow::anyhow!("{} with overrides: {m}", args.config.display()))?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {} (key `listen`)", cfg.listen))?;
        let shutdown = async {
            muster_proto::daemon::stop_signal().await;
            tracing::info!("shutting down");
        };
        muster_scheduler::server::run(cfg, listener, shutdown, || {
            // Type=notify: tell systemd we serve. Outside systemd this is a no-op.
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        })
        .await?;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        Ok(())
    })
}
