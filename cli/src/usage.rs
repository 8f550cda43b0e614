//! Usage errors as one `muster: error: ...` line, like every other error.
//!
//! clap's own rendering is several lines with tips that mislead here: for
//! `--gres gpu:2` it suggests `-- --gres` (which would make `--gres` part of
//! the task's command), for `--mem -1G` it suggests `-- -1`. We keep clap's
//! first line, keep a "similar argument" suggestion, replace the rest with
//! where to find help, and answer Slurm's spellings with Muster's.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use std::process::ExitCode;

/// Muster's spelling of a Slurm option, if `flag` is one.
pub fn slurm_spelling(flag: &str) -> Option<&'static str> {
    let flag = flag.split('=').next().unwrap_or(flag);
    Some(match flag {
        "--gres" | "--gpus-per-task" | "--gpus-per-node" | "-G" => {
            "Muster asks for GPUs per task with --gpus N (gpu:4 is --gpus 4)"
        }
        "--ntasks" | "-n" => "Muster's gang size is --tasks N",
        "--cpus-per-task" | "-c" => "Muster asks for CPUs per task with --cpus N",
        "--mem-per-cpu" | "--mem-per-gpu" => "Muster asks for memory per task with --mem SIZE",
        "--job-name" | "-J" => "Muster names jobs with --name NAME",
        "--partition" | "-p" | "--account" | "-A" => {
            "Muster charges jobs to a tenant: --tenant NAME"
        }
        "--qos" => "Muster's priority classes are --priority CLASS",
        "--chdir" | "-D" => "Muster's working directory is --workdir DIR",
        "--export" => "Muster sets variables with --env KEY=VALUE",
        "--output" | "-o" | "--error" | "-e" => {
            "the agent keeps each task's output: read it with muster logs JOB --task N"
        }
        "--requeue" | "--no-requeue" => "Muster restarts failed gangs with --max-restarts N",
        "--signal" => "Muster's stop signal is --signal SIG with --grace DURATION",
        _ => return None,
    })
}

/// The one-line message for a usage error (without the `muster: error: `).
pub fn message(e: &clap::Error) -> String {
    let invalid = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let rendered = e.render().to_string();
    let help = rendered
        .lines()
        .find_map(|l| l.strip_prefix("Usage: "))
        .map(|u| {
            let cmd: Vec<&str> = u
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect();
            format!("see '{} --help'", cmd.join(" "))
        })
        .unwrap_or_else(|| "see 'muster --help'".to_string());
    if e.kind() == ErrorKind::UnknownArgument {
        if let Some(flag) = invalid.as_deref() {
            if let Some(spelling) = slurm_spelling(flag) {
                return format!("unknown option '{flag}': {spelling}; {help}");
            }
        }
    }
    let first = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .trim();
    let similar = rendered
        .lines()
        .map(str::trim)
        .find(|l| l.contains("similar") && !l.contains("'-- "))
        .map(|l| format!(" ({})", l.trim_start_matches("tip: ")))
        .unwrap_or_default();
    format!("{first}{similar}; {help}")
}

/// Prints `e` (help and version as clap does) and returns the exit code.
pub fn report(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            eprintln!("muster: error: {}", message(&e));
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Cli;
    use clap::Parser as _;

    fn error_of(argv: &[&str]) -> String {
        let mut full = vec!["muster"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full) {
            Ok(_) => panic!("{argv:?} parsed"),
            Err(e) => message(&e),
        }
    }

    #[test]
    fn slurm_flags_get_musters_spelling() {
        let m = error_of(&["submit", "--gres", "gpu:2", "--", "true"]);
        assert!(m.contains("--gpus N"), "{m}");
        assert!(!m.contains("'-- --gres'"), "{m}");
        assert!(m.contains("muster submit --help"), "{m}");
        let m = error_of(&["submit", "-n", "4", "--", "true"]);
        assert!(m.contains("--tasks N"), "{m}");
        let m = error_of(&["submit", "--partition=gpu", "--", "true"]);
        assert!(m.contains("--tenant NAME"), "{m}");
    }

    #[test]
    fn a_negative_size_is_an_invalid_value_not_a_tip() {
        let m = error_of(&["submit", "--mem", "-1G", "--", "true"]);
        assert!(m.contains("--mem"), "{m}");
        assert!(!m.contains("'-- -1'"), "{m}");
        assert!(!m.contains('\n'), "one line: {m}");
    }

    #[test]
    fn a_bad_time_names_the_accepted_forms() {
        let m = error_of(&["submit", "--time", "2x", "--", "true"]);
        assert!(m.contains("HH:MM:SS"), "{m}");
        assert!(!m.contains('\n'), "one line: {m}");
    }

    #[test]
    fn similar_flags_are_still_suggested() {
        let m = error_of(&["submit", "--gpu", "2", "--", "true"]);
        assert!(m.contains("--gpus"), "{m}");
    }
}
