//! `muster`: the command line for a Muster cluster.
//!
//! Submit, watch and cancel jobs, read their logs, look at nodes and tenants,
//! and run a one-machine cluster with `muster dev`. Human-readable tables by
//! default; `--json` everywhere for scripts (shapes in [`json`]).
//!
//! Errors print as one line, `muster: error: ...`, and exit with status 1;
//! usage errors print the same way (with where to find help) and exit with
//! status 2. Slurm habits (`--gres`, `-n`, `--partition`, ...) are answered
//! with Muster's spelling.
#![forbid(unsafe_code)]

mod args;
mod client;
mod commands;
mod config;
mod dev;
mod json;
mod output;
mod pki;
mod security_args;
mod spec;
mod tenant_args;
mod usage;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage::report(e),
    };
    // One short RPC needs no thread pool; `muster dev` runs a whole cluster.
    let runtime = if matches!(cli.command, args::Command::Dev(_)) {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("muster: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let text = format!("{err:#}").replace('\n', " ");
            eprintln!("muster: error: {text}");
            ExitCode::FAILURE
        }
    }
}
