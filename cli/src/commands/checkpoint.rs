//! `muster checkpoint done`: run inside a task, it tells the task's agent
//! (over the Unix socket in `MUSTER_AGENT_SOCKET`) that a checkpoint is
//! complete. The agent knows which task is calling from the kernel's peer
//! credentials and forwards the report to the scheduler.

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::Ctx;
use crate::args::CheckpointDoneArgs;

#[derive(Serialize)]
struct Request {
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<u64>,
}

#[derive(Deserialize, Serialize)]
struct Reply {
    ok: bool,
    #[serde(default)]
    job: u64,
    #[serde(default)]
    task: u32,
    message: String,
}

/// Report a finished checkpoint to the local agent.
pub async fn done(ctx: &Ctx, args: CheckpointDoneArgs) -> anyhow::Result<()> {
    let Some(path) = args.socket else {
        bail!("MUSTER_AGENT_SOCKET is not set: run `muster checkpoint done` inside a Muster task, or pass --socket");
    };
    let step = args.step;
    let reply = tokio::task::spawn_blocking(move || -> anyhow::Result<Reply> {
        let mut s = UnixStream::connect(&path)
            .with_context(|| format!("cannot reach the agent at {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut line = serde_json::to_vec(&Request {
            op: "checkpoint",
            step,
        })?;
        line.push(b'\n');
        s.write_all(&line)?;
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .with_context(|| format!("no answer from the agent at {}", path.display()))?;
        serde_json::from_str(answer.trim())
            .with_context(|| format!("unreadable answer from the agent: {answer:?}"))
    })
    .await??;
    if !reply.ok {
        bail!("checkpoint not recorded: {}", reply.message);
    }
    if ctx.json() {
        return crate::json::print(&reply);
    }
    println!("{}", reply.message);
    Ok(())
}
