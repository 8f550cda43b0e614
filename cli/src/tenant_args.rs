//! Arguments of `muster tenant ...`.

use clap::{Args, Subcommand};

use crate::spec;

const TENANT_EXAMPLES: &str = "\
Examples:
  muster tenant create ml --guarantee 64 --gpu-limit 96 --weight 2
  muster tenant create ml/nlp --guarantee 32 --gpu-limit 64 --user alice --default-for alice
  muster tenant set ml/nlp --gpu-limit 80 --cpu-limit 512 --mem-limit 4T
  muster tenant set ml/nlp --gpu-limit none      # remove the limit
  muster tenant set ml --add-admin ann           # ann administers ml's subtree
  muster tenant show ml/nlp
  muster tenant usage
  muster tenant delete ml/nlp

A tenant's name is its place in the tree: ml/nlp is a child of ml. The
guarantee is what the tenant can always get back (reclaiming borrowed GPUs);
the limit caps what its subtree may hold, borrowing included, and holds on
every ancestor too. Children's guarantees may not add up past their parent's.

A tenant admin may change the members and cancel the jobs of its tenant and
every descendant, and the quotas and admins of descendants (not its own
tenant's: that takes an admin above it, or a cluster admin).";

/// `muster tenant ...`.
#[derive(Debug, Subcommand)]
#[command(after_help = TENANT_EXAMPLES)]
pub enum TenantCommand {
    /// Create a tenant (its parent must exist)
    #[command(after_help = TENANT_EXAMPLES)]
    Create(TenantCreateArgs),
    /// Change a tenant's guarantee, limits, weight or members
    #[command(after_help = TENANT_EXAMPLES)]
    Set(TenantSetArgs),
    /// Show one tenant: quotas, use, borrowing, members, fair-share usage
    Show(TenantName),
    /// List tenants, their guarantees, limits and use
    List,
    /// Delete a tenant that has no children and no unfinished jobs
    Delete(TenantName),
    /// Use per tenant: GPUs held, borrowed, jobs, fair-share usage
    Usage,
}

/// A command that takes one tenant name.
#[derive(Debug, Args)]
pub struct TenantName {
    /// Tenant name, e.g. ml/nlp
    #[arg(value_name = "NAME", value_parser = spec::parse_nonempty)]
    pub name: String,
}

/// `muster tenant create`.
#[derive(Debug, Args)]
pub struct TenantCreateArgs {
    /// Tenant name; `org/team` makes a child of `org`
    #[arg(value_name = "NAME", value_parser = spec::parse_nonempty)]
    pub name: String,

    /// GPUs the tenant is guaranteed [default: 0]
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub guarantee: u32,

    /// Most GPUs the tenant's subtree may hold, borrowing included; 0 or
    /// `none` means unlimited [default: none]
    #[arg(long, value_name = "N", value_parser = parse_limit, default_value = "none")]
    pub gpu_limit: u64,

    /// Most CPUs the subtree may hold, e.g. 256 or 0.5; `none` for no limit [default: none]
    #[arg(long, value_name = "C", value_parser = parse_cpu_limit, default_value = "none")]
    pub cpu_limit: u64,

    /// Most memory the subtree may hold, e.g. 2T; `none` for no limit [default: none]
    #[arg(long, value_name = "SIZE", value_parser = parse_mem_limit, default_value = "none")]
    pub mem_limit: u64,

    /// Fair-share weight among its siblings [default: 1]
    #[arg(long, value_name = "W", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub weight: u32,

    /// Only these users may submit to it (repeatable) [default: anyone]
    #[arg(long = "user", value_name = "USER")]
    pub users: Vec<String>,

    /// Make it these users' default tenant (repeatable)
    #[arg(long, value_name = "USER")]
    pub default_for: Vec<String>,

    /// Make this user a tenant admin (repeatable): members, jobs, and the
    /// quotas of child tenants in its subtree
    #[arg(long = "admin", value_name = "USER")]
    pub admins: Vec<String>,
}

/// `muster tenant set`.
#[derive(Debug, Args)]
pub struct TenantSetArgs {
    /// Tenant name
    #[arg(value_name = "NAME", value_parser = spec::parse_nonempty)]
    pub name: String,

    /// GPUs the tenant is guaranteed
    #[arg(long, value_name = "N")]
    pub guarantee: Option<u32>,

    /// Most GPUs the subtree may hold; `none` removes the limit
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub gpu_limit: Option<u64>,

    /// Most CPUs the subtree may hold; `none` removes the limit
    #[arg(long, value_name = "C", value_parser = parse_cpu_limit)]
    pub cpu_limit: Option<u64>,

    /// Most memory the subtree may hold; `none` removes the limit
    #[arg(long, value_name = "SIZE", value_parser = parse_mem_limit)]
    pub mem_limit: Option<u64>,

    /// Fair-share weight among its siblings
    #[arg(long, value_name = "W", value_parser = clap::value_parser!(u32).range(1..))]
    pub weight: Option<u32>,

    /// Let this user submit (repeatable); a tenant with members admits only them
    #[arg(long = "add-user", value_name = "USER")]
    pub add_users: Vec<String>,

    /// Stop this user submitting (repeatable)
    #[arg(long = "remove-user", value_name = "USER")]
    pub remove_users: Vec<String>,

    /// Make this user a tenant admin (repeatable)
    #[arg(long = "add-admin", value_name = "USER")]
    pub add_admins: Vec<String>,

    /// Remove this tenant admin (repeatable)
    #[arg(long = "remove-admin", value_name = "USER")]
    pub remove_admins: Vec<String>,

    /// Make it these users' default tenant (repeatable)
    #[arg(long, value_name = "USER")]
    pub default_for: Vec<String>,
}

fn is_none(text: &str) -> bool {
    matches!(text.trim(), "none" | "unlimited" | "0")
}

/// A GPU count, or `none`/`unlimited`/0 (returned as 0: no limit).
pub fn parse_limit(text: &str) -> Result<u64, String> {
    if is_none(text) {
        return Ok(0);
    }
    text.trim()
        .parse::<u32>()
        .map(u64::from)
        .map_err(|_| format!("{text:?} is not a GPU count or `none`"))
}

/// CPUs (as for `submit --cpus`) in millis, or `none` (0).
pub fn parse_cpu_limit(text: &str) -> Result<u64, String> {
    if is_none(text) {
        return Ok(0);
    }
    spec::parse_cpus(text).map(u64::from)
}

/// A size (as for `submit --mem`) in bytes, or `none` (0).
pub fn parse_mem_limit(text: &str) -> Result<u64, String> {
    if is_none(text) {
        return Ok(0);
    }
    spec::parse_mem(text)
}
