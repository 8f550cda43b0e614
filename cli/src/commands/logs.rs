//! `muster logs`: find the agent that runs a task and stream its output.
//!
//! The scheduler only knows where a task runs; the output lives on the agent,
//! which serves it over `AgentLocal.ReadLogs`. Standard output goes to our
//! stdout and standard error to our stderr, so redirections work as if the
//! task ran here. A closed pipe (`muster logs 1 | head`) ends quietly.

use std::io::ErrorKind;

use anyhow::{bail, Context as _};
use muster_proto::{JobInfo, JobState, LogRequest, LogStream, TaskInfo};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Ctx;
use crate::args::LogsArgs;
use crate::client::{agent_status_error, connect_agent};
use crate::json;
use crate::output::{job_state_name, or_dash};

/// Streams one task's output.
pub async fn run(ctx: &Ctx, args: LogsArgs) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let job = scheduler.get_job(args.job).await?;
    let task = placed_task(&job, args.task)?;
    let agent_addr = task.agent_address.clone();
    let mut agent = connect_agent(&agent_addr).await?;
    let request = LogRequest {
        job_id: args.job,
        task_index: args.task,
        streams: streams(&args),
        follow: args.follow,
    };
    let subject = format!("logs of task {} of job {}", args.task, args.job);
    let mut stream = agent
        .read_logs(request)
        .await
        .map_err(|s| agent_status_error(&s, &agent_addr, "read logs", Some(&subject)))?
        .into_inner();
    let mut out = Output::new(ctx.json(), args.task);
    loop {
        let chunk = match stream.message().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(s) => {
                return Err(agent_status_error(&s, &agent_addr, "read logs", Some(&subject)).into())
            }
        };
        if !out.write(chunk.stream(), &chunk.data).await? {
            break;
        }
    }
    Ok(())
}

fn streams(args: &LogsArgs) -> Vec<i32> {
    match (args.stdout, args.stderr) {
        (true, false) => vec![LogStream::Stdout as i32],
        (false, true) => vec![LogStream::Stderr as i32],
        _ => Vec::new(),
    }
}

/// The task, if it exists and has been placed on a node.
pub fn placed_task(job: &JobInfo, index: u32) -> anyhow::Result<&TaskInfo> {
    let spec_tasks = job.spec.as_ref().map_or(0, |s| s.tasks);
    let total = spec_tasks.max(u32::try_from(job.tasks.len()).unwrap_or(u32::MAX));
    if index >= total {
        bail!(
            "job {} has {total} task{}; --task must be below {total}",
            job.id,
            if total == 1 { "" } else { "s" }
        );
    }
    let task = job.tasks.iter().find(|t| t.index == index);
    match task {
        Some(t) if !t.agent_address.is_empty() => Ok(t),
        _ => {
            let state = job_state_name(job.state);
            let why = if job.state == JobState::Pending as i32 {
                format!(": {}", or_dash(&job.reason))
            } else {
                String::new()
            };
            bail!(
                "task {index} of job {} has not been placed on a node, so it has no logs (job is {state}{why})",
                job.id
            )
        }
    }
}

/// Where chunks go: raw to stdout/stderr, or JSON lines on stdout.
struct Output {
    json: bool,
    task: u32,
    stdout: tokio::io::Stdout,
    stderr: tokio::io::Stderr,
}

impl Output {
    fn new(json: bool, task: u32) -> Self {
        Output {
            json,
            task,
            stdout: tokio::io::stdout(),
            stderr: tokio::io::stderr(),
        }
    }

    /// Writes a chunk; `false` when the reader went away.
    async fn write(&mut self, stream: LogStream, data: &[u8]) -> anyhow::Result<bool> {
        if self.json {
            let line = json::LogLine {
                task: self.task,
                stream: if stream == LogStream::Stderr {
                    "stderr"
                } else {
                    "stdout"
                },
                data: String::from_utf8_lossy(data).into_owned(),
            };
            let mut text = serde_json::to_string(&line)?;
            text.push('\n');
            return write_all(&mut self.stdout, text.as_bytes()).await;
        }
        match stream {
            LogStream::Stderr => write_all(&mut self.stderr, data).await,
            _ => write_all(&mut self.stdout, data).await,
        }
    }
}

async fn write_all(w: &mut (impl AsyncWrite + Unpin), data: &[u8]) -> anyhow::Result<bool> {
    let result = async {
        w.write_all(data).await?;
        w.flush().await
    };
    match result.await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("cannot write the log output"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::JobSpec;

    fn job(tasks: Vec<TaskInfo>) -> JobInfo {
        JobInfo {
            id: 5,
            state: JobState::Pending as i32,
            reason: "no node has 8 free GPUs".into(),
            spec: Some(JobSpec {
                tasks: 2,
                ..JobSpec::default()
            }),
            tasks,
            ..JobInfo::default()
        }
    }

    #[test]
    fn an_unplaced_task_says_why() {
        let err = placed_task(&job(vec![]), 1)
            .expect_err("not placed")
            .to_string();
        assert!(err.contains("task 1 of job 5 has not been placed"), "{err}");
        assert!(err.contains("no node has 8 free GPUs"), "{err}");
    }

    #[test]
    fn an_out_of_range_task_is_refused() {
        let err = placed_task(&job(vec![]), 2)
            .expect_err("out of range")
            .to_string();
        assert!(err.contains("has 2 tasks"), "{err}");
    }

    #[test]
    fn a_placed_task_is_found_by_index() {
        let t = TaskInfo {
            index: 1,
            agent_address: "10.0.0.2:7471".into(),
            ..TaskInfo::default()
        };
        let j = job(vec![TaskInfo::default(), t]);
        let found = placed_task(&j, 1).map(|t| t.agent_address.clone());
        assert_eq!(found.ok().as_deref(), Some("10.0.0.2:7471"));
    }
}
