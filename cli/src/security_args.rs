//! Arguments of the security commands: `muster admin ca|cert|token|audit`.

use clap::{ArgGroup, Args, Subcommand};
use std::path::PathBuf;

const CA_EXAMPLES: &str = "\
Examples:
  muster admin ca init --dir /etc/muster/pki
  muster admin cert issue --node sched1 --san sched1.example.org --dir /etc/muster/pki
  muster admin cert issue --agent gpu07 --san 10.0.1.7 --dir /etc/muster/pki
  muster admin cert issue --user alice --dir /etc/muster/pki

Then, in scheduler.toml, agent.toml or the CLI's config.toml:
  [tls]
  ca = \"/etc/muster/pki/ca.pem\"
  cert = \"/etc/muster/pki/node-sched1.pem\"
  key = \"/etc/muster/pki/node-sched1-key.pem\"";

/// `muster admin ca ...`.
#[derive(Debug, Subcommand)]
#[command(after_help = CA_EXAMPLES)]
pub enum CaCommand {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca-key.pem (mode 0600)
    #[command(after_help = CA_EXAMPLES)]
    Init(DirArg),
}

/// A PKI folder.
#[derive(Debug, Args)]
pub struct DirArg {
    /// Folder of the CA's files (created if missing)
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
}

/// `muster admin cert ...`.
#[derive(Debug, Subcommand)]
#[command(after_help = CA_EXAMPLES)]
pub enum CertCommand {
    /// Issue a certificate signed by the CA in --dir: DIR/<kind>-<name>.pem
    /// and DIR/<kind>-<name>-key.pem
    #[command(after_help = CA_EXAMPLES)]
    Issue(CertIssueArgs),
}

/// `muster admin cert issue`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("who").required(true).args(["node", "agent", "user"])))]
pub struct CertIssueArgs {
    /// A scheduler's certificate (CN node:NAME)
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// An agent's certificate; NAME is its node name (CN agent:NAME)
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// A user's client certificate (CN user:NAME)
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Another host name or IP address the certificate is valid for
    /// (repeatable; localhost and 127.0.0.1 are always included)
    #[arg(long, value_name = "NAME")]
    pub san: Vec<String>,
    /// Folder of the CA's files; the new files are written there too
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// How long the certificate is valid, e.g. 90d, 1y; daemons and the
    /// CLI refuse it after that (issue a new one and restart the daemon)
    #[arg(long, value_name = "DURATION", default_value = "365days", value_parser = humantime::parse_duration)]
    pub expires: std::time::Duration,
}

const TOKEN_EXAMPLES: &str = "\
Examples:
  muster admin token issue --user alice --expires 90d --out alice.token
  muster admin token list
  muster admin token revoke 3f9c0a1b2c3d4e5f

The user then runs: muster --token-file alice.token queue
(or puts token_file = \"...\" in ~/.config/muster/config.toml, or saves the
token as ~/.config/muster/token). The file must have mode 0600.";

/// `muster admin token ...`.
#[derive(Debug, Subcommand)]
#[command(after_help = TOKEN_EXAMPLES)]
pub enum TokenCommand {
    /// Issue a token for a user (cluster admins only); shown once
    #[command(after_help = TOKEN_EXAMPLES)]
    Issue(TokenIssueArgs),
    /// List tokens: id, user, expiry, revoked (never the secrets)
    List,
    /// Revoke a token by id; it is refused from then on
    Revoke(TokenRevokeArgs),
}

/// `muster admin token issue`.
#[derive(Debug, Args)]
pub struct TokenIssueArgs {
    /// The user the token authenticates
    #[arg(long, value_name = "NAME")]
    pub user: String,
    /// Lifetime, e.g. 30d, 12h [default: never expires]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub expires: Option<std::time::Duration>,
    /// Write the token to this new file (mode 0600) instead of stdout
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `muster admin token revoke`.
#[derive(Debug, Args)]
pub struct TokenRevokeArgs {
    /// The token's id (from `token issue` or `token list`)
    #[arg(value_name = "ID")]
    pub id: String,
}

/// `muster admin audit`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  muster admin audit --since 1h\n  \
muster admin audit --since 2026-12-01T08:00:00Z --user alice --json")]
pub struct AuditArgs {
    /// Only entries since this long ago (1h, 30m) or since an RFC 3339 time
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Only this user's entries
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// At most this many entries, the newest
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub limit: u32,
}
