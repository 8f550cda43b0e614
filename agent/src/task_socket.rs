//! The task socket: how a running task talks to its own agent.
//!
//! Every task gets `MUSTER_AGENT_SOCKET`, the path of a Unix socket the
//! agent listens on. A request is one JSON line, the answer another:
//!
//! ```text
//! → {"op":"checkpoint","step":1200}
//! ← {"ok":true,"job":42,"task":0,"message":"checkpoint of job 42 task 0 recorded"}
//! ```
//!
//! The caller is identified by the kernel (SO_PEERCRED: its pid and uid),
//! never by what it sends: the agent maps the pid to a task by its whole
//! cgroup path or by ancestry, and the uid must be the task's
//! ([`crate::task::peer`]); a process outside every task is refused. The
//! socket is world-writable because tasks run as their users; the identity
//! check is what guards it. It must therefore lie outside the agent's data
//! folder, which only root may enter (see `AgentConfig::task_socket_path`).

use crate::task::Runtime;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// Longest request line accepted.
const MAX_LINE: usize = 4096;
/// A client that says nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The task finished writing a checkpoint (to `MUSTER_CHECKPOINT_DIR`).
    Checkpoint {
        #[serde(default)]
        step: Option<u64>,
    },
}

/// One answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub job: u64,
    #[serde(default)]
    pub task: u32,
    pub message: String,
}

/// Bind the socket (replacing a stale one) and open it to every local user.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            // Made under the agent's umask 077 otherwise: tasks must reach it.
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serve until `shutdown` flips.
pub async fn serve(
    listener: UnixListener,
    runtime: Arc<Runtime>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let rt = runtime.clone();
                    tokio::spawn(async move { handle(stream, rt).await });
                }
                Err(e) => {
                    tracing::warn!("task socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn handle(stream: UnixStream, runtime: Arc<Runtime>) {
    let cred = stream
        .peer_cred()
        .ok()
        .and_then(|c| Some((c.pid()?, c.uid())));
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64);
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(_)) => answer(&runtime, cred, &line),
        Ok(Err(e)) => refuse(format!("cannot read the request: {e}")),
        Err(_) => refuse("no request within 10s".into()),
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

fn refuse(message: String) -> Reply {
    Reply {
        message,
        ..Reply::default()
    }
}

fn answer(runtime: &Runtime, cred: Option<(i32, u32)>, line: &str) -> Reply {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return refuse(format!("bad request: {e}")),
    };
    let Some((pid, uid)) = cred.filter(|(p, _)| *p > 0) else {
        return refuse("cannot tell which process is calling".into());
    };
    let Some(key) = runtime.task_of(pid as u32, uid) else {
        return refuse(format!(
            "process {pid} (uid {uid}) is not part of any task running on this node"
        ));
    };
    match req {
        Request::Checkpoint { step } => match runtime.checkpoint(key, step) {
            Ok(()) => Reply {
                ok: true,
                job: key.job,
                task: key.task,
                message: format!("checkpoint of job {} task {} recorded", key.job, key.task),
            },
            Err(e) => refuse(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let r: Request = serde_json::from_str(r#"{"op":"checkpoint","step":7}"#).unwrap();
        assert_eq!(r, Request::Checkpoint { step: Some(7) });
        let r: Request = serde_json::from_str(r#"{"op":"checkpoint"}"#).unwrap();
        assert_eq!(r, Request::Checkpoint { step: None });
        assert!(serde_json::from_str::<Request>(r#"{"op":"launch"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"checkpoint","job":3}"#).is_err());
    }
}
