//! One module per group of subcommands; [`run`] dispatches.
//!
//! Commands validate everything they can before connecting, then make their
//! RPCs through [`crate::client::Scheduler`], then print either a table or a
//! [`crate::json`] shape. They return `anyhow::Result`; `main` prints the error.

mod admin;
mod checkpoint;
mod cluster;
mod jobs;
mod logs;
mod nodes;
mod security;
mod submit;
mod tenant;

use anyhow::Context as _;

use crate::args::{AdminCommand, Cli, Command, GlobalArgs, PeersCommand};
use crate::client::Scheduler;
use crate::config;

/// A security-service client with the CLI's interceptor.
pub type SecurityClient = muster_proto::security_client::SecurityClient<
    tonic::codegen::InterceptedService<tonic::transport::Channel, crate::client::ReadMode>,
>;

/// What every command needs: where the scheduler is and how to print.
pub struct Ctx {
    global: GlobalArgs,
}

impl Ctx {
    /// Whether to print JSON.
    pub fn json(&self) -> bool {
        self.global.json
    }

    /// The scheduler address after applying the precedence rules.
    pub fn addr(&self) -> anyhow::Result<String> {
        let env = std::env::var("MUSTER_ADDR").ok();
        let addr = config::resolve_addr(self.global.addr.as_deref(), env.as_deref(), || {
            let defaults = config::default_config_paths(
                std::env::var_os("XDG_CONFIG_HOME"),
                std::env::var_os("HOME"),
            );
            config::address_from_files(self.global.config.as_deref(), &defaults)
        })?;
        Ok(addr)
    }

    fn config_file(&self) -> anyhow::Result<Option<(config::ConfigFile, std::path::PathBuf)>> {
        let defaults = config::default_config_paths(
            std::env::var_os("XDG_CONFIG_HOME"),
            std::env::var_os("HOME"),
        );
        Ok(config::config_from_files(
            self.global.config.as_deref(),
            &defaults,
        )?)
    }

    /// Install this process's credentials: the TLS identity and the token
    /// from the config file, and the token file (see `--token-file`).
    fn setup_credentials(&self) -> anyhow::Result<()> {
        let file = self.config_file()?;
        if let Some((cfg, path)) = &file {
            if let Some(tls) = &cfg.tls {
                if tls.cert.is_some() != tls.key.is_some() {
                    anyhow::bail!(
                        "config file {}: [tls] needs both `cert` and `key`, or neither",
                        path.display()
                    );
                }
                let client = tls
                    .client()
                    .with_context(|| format!("config file {}", path.display()))?;
                muster_proto::tls::install_client(client);
            }
        }
        let default_token = std::env::var_os("HOME")
            .map(|h| std::path::PathBuf::from(h).join(".config/muster/token"))
            .filter(|p| p.is_file());
        let token_file = self
            .global
            .token_file
            .clone()
            .or_else(|| file.and_then(|(c, _)| c.token_file))
            .or(default_token);
        if let Some(p) = token_file {
            let token = config::read_token_file(&p).map_err(anyhow::Error::msg)?;
            crate::client::set_token(&token).map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// A connected scheduler client.
    pub async fn scheduler(&self) -> anyhow::Result<Scheduler> {
        let addr = self.addr()?;
        Ok(Scheduler::connect(&addr).await?)
    }
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    crate::client::set_stale_reads(cli.global.stale);
    let ctx = Ctx { global: cli.global };
    let offline = matches!(
        cli.command,
        Command::Dev(_) | Command::Admin(AdminCommand::Ca(_) | AdminCommand::Cert(_))
    );
    if !offline {
        ctx.setup_credentials()?;
    }
    match cli.command {
        Command::Submit(args) => submit::run(&ctx, args).await,
        Command::Queue(args) => jobs::queue(&ctx, args).await,
        Command::Show(args) => jobs::show(&ctx, args.job).await,
        Command::Cancel(args) => jobs::cancel(&ctx, args.job).await,
        Command::Logs(args) => logs::run(&ctx, args).await,
        Command::Nodes(args) => nodes::run(&ctx, args).await,
        Command::Status => cluster::status(&ctx).await,
        Command::Why(args) => jobs::why(&ctx, args.job).await,
        Command::Tenant(cmd) => tenant::run(&ctx, cmd).await,
        Command::Admin(AdminCommand::Status) => admin::status(&ctx).await,
        Command::Admin(AdminCommand::Peers(PeersCommand::List)) => admin::status(&ctx).await,
        Command::Admin(AdminCommand::Peers(PeersCommand::Add(a))) => {
            admin::change(
                &ctx,
                muster_proto::change_peers_request::Op::Add,
                a.id,
                a.peer_addr,
            )
            .await
        }
        Command::Admin(AdminCommand::Peers(PeersCommand::Remove(a))) => {
            admin::change(
                &ctx,
                muster_proto::change_peers_request::Op::Remove,
                a.id,
                String::new(),
            )
            .await
        }
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Checkpoint(crate::args::CheckpointCommand::Done(a)) => {
            checkpoint::done(&ctx, a).await
        }
        Command::Node(cmd) => nodes::drain(&ctx, cmd).await,
        Command::Whoami => security::whoami(&ctx).await,
        Command::Admin(AdminCommand::Ca(crate::security_args::CaCommand::Init(a))) => {
            security::ca_init(&ctx, &a.dir)
        }
        Command::Admin(AdminCommand::Cert(crate::security_args::CertCommand::Issue(a))) => {
            security::cert_issue(&ctx, a)
        }
        Command::Admin(AdminCommand::Token(cmd)) => security::token(&ctx, cmd).await,
        Command::Admin(AdminCommand::Audit(a)) => security::audit(&ctx, a).await,
    }
}

/// The name of the user running the CLI, sent as the submitter identity.
/// Falls back to `$USER` when the uid has no entry in the user database.
pub fn current_user() -> anyhow::Result<String> {
    let uid = nix::unistd::getuid();
    let from_db = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name);
    from_db
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .with_context(|| {
            format!(
                "cannot tell who you are: uid {uid} has no user-database entry and USER is not set"
            )
        })
}
