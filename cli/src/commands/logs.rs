//! `muster logs`: find the agent that runs a task and stream its output.
//!
//! The scheduler only knows where a task runs; the output lives on the agent,
//! which serves it over `AgentLocal.ReadLogs` to holders of a ticket the
//! scheduler issues (`Muster.LogAccess`) to whoever may see the job in full. Standard output goes to our
//! stdout and standard error to our stderr, so redirections work as if the
//! task ran here. A closed pipe (`muster logs 1 | head`) ends quietly.

use std::io::ErrorKind;

use anyhow::Context as _;
use muster_proto::{LogRequest, LogStream};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::Ctx;
use crate::args::LogsArgs;
use crate::client::{agent_status_error, connect_agent};
use crate::json;

/// Streams one task's output.
pub async fn run(ctx: &Ctx, args: LogsArgs) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let access = scheduler.log_access(args.job, args.task).await?;
    let agent_addr = access.agent_address.clone();
    let mut agent = connect_agent(&agent_addr).await?;
    let request = LogRequest {
        job_id: args.job,
        task_index: args.task,
        streams: streams(&args),
        follow: args.follow,
        ticket: access.ticket,
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
