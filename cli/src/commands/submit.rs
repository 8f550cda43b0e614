//! `muster submit`: build a spec from a file and flags, validate it, send it.

use std::collections::BTreeMap;

use anyhow::Context as _;
use muster_proto::{JobSpec, SubmitRequest};

use super::{current_user, Ctx};
use crate::args::SubmitArgs;
use crate::json;
use crate::spec::{self, PartialSpec, SpecError};

/// Submits the job and prints its id.
pub async fn run(ctx: &Ctx, args: SubmitArgs) -> anyhow::Result<()> {
    let array = args.array.unwrap_or(1);
    let request_id = args.request_id.clone().unwrap_or_default();
    let spec = build_spec(args)?;
    let user = current_user()?;
    let mut scheduler = ctx.scheduler().await?;
    let request = SubmitRequest {
        spec: Some(spec),
        user,
        request_id,
        array,
    };
    let count = request.array.max(1);
    let id = scheduler.submit(request).await?;
    if ctx.json() {
        json::print(&json::Submitted { id, count })
    } else if count > 1 {
        println!("{id}-{}", id + u64::from(count) - 1);
        Ok(())
    } else {
        println!("{id}");
        Ok(())
    }
}

/// The complete spec: the file (if any), overridden by flags, then defaults.
fn build_spec(args: SubmitArgs) -> anyhow::Result<JobSpec> {
    let base = match &args.file {
        Some(path) => spec::load_job_file(path)?,
        None => PartialSpec::default(),
    };
    let flags = flag_spec(args)?;
    let cwd = std::env::current_dir().context("cannot determine the current directory")?;
    Ok(base.overlay(flags).finish(&cwd)?)
}

/// What the flags said. Scalar values were validated by clap's parsers.
fn flag_spec(args: SubmitArgs) -> Result<PartialSpec, SpecError> {
    let command = match args.command.first() {
        None => None,
        Some(program) if program.is_empty() => {
            return Err(SpecError::Flag {
                flag: "COMMAND".to_string(),
                message: "the program name must not be empty".to_string(),
            })
        }
        Some(_) => Some(args.command),
    };
    Ok(PartialSpec {
        name: args.name,
        tenant: args.tenant,
        priority: args.priority,
        same: args.same,
        prefer_same: args.prefer_same,
        tasks: args.tasks,
        gpus: args.gpus,
        cpu_millis: args.cpus,
        memory_bytes: args.mem,
        time_limit_secs: args.time,
        command,
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
        workdir: args.workdir,
        signal: args.signal,
        grace_secs: args.grace,
        checkpoint_on_preempt: args.checkpoint_on_preempt.then_some(true),
        max_restarts: args.max_restarts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;

    fn submit_args(argv: &[&str]) -> SubmitArgs {
        let full = ["muster", "submit"].iter().chain(argv).copied();
        match Cli::try_parse_from(full).map(|c| c.command) {
            Ok(Command::Submit(args)) => args,
            other => panic!("not a submit: {other:?}"),
        }
    }

    #[test]
    fn flags_alone_make_a_spec() {
        let args = submit_args(&[
            "--cpus",
            "0.5",
            "-e",
            "A=1",
            "-e",
            "A=2",
            "--",
            "/bin/echo",
            "hi",
        ]);
        let spec = build_spec(args).expect("valid");
        assert_eq!(spec.name, "echo");
        assert_eq!(spec.cpu_millis_per_task, 500);
        assert_eq!(spec.env.get("A").map(String::as_str), Some("2"));
        assert_eq!(spec.command, ["/bin/echo", "hi"]);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.toml");
        std::fs::write(&path, "tasks = 2\ngpus = 4\ncommand = \"make\"\n").expect("write");
        let file = path.to_string_lossy().into_owned();
        let spec = build_spec(submit_args(&["-f", &file, "--gpus", "1"])).expect("valid");
        assert_eq!((spec.tasks, spec.gpus_per_task), (2, 1));
        assert_eq!(spec.name, "make");
    }

    #[test]
    fn a_missing_command_is_an_error() {
        let err = build_spec(submit_args(&["--gpus", "1"])).expect_err("no command");
        assert!(err.to_string().contains("no command"), "{err}");
    }

    #[test]
    fn an_empty_program_is_an_error() {
        let err = build_spec(submit_args(&["--", ""])).expect_err("empty");
        assert!(err.to_string().starts_with("COMMAND:"), "{err}");
    }
}
