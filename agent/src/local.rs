//! `AgentLocal`: the service each agent serves on its own address. Today it
//! serves task logs (`muster logs`), from the files the shims write, while the
//! task runs (with `follow`) and after it ended.
//!
//! Anyone who can reach the port can ask, so a read needs a ticket that a
//! scheduler signed with this run's key after checking that the caller may
//! see the job (`muster_proto::ticket`); every refusal is logged.

use crate::task::Runtime;
use muster_proto as pb;
use muster_proto::agent_local_server::AgentLocal;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const CHUNK: usize = 64 * 1024;
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The local service.
pub struct LocalService {
    runtime: Arc<Runtime>,
    node: String,
    key: Vec<u8>,
}

impl LocalService {
    /// A service reading the runtime's log files for the holders of tickets
    /// for `node` signed with `key`.
    pub fn new(runtime: Arc<Runtime>, node: String, key: Vec<u8>) -> LocalService {
        LocalService { runtime, node, key }
    }

    /// Whether `req` carries a valid ticket for what it asks.
    fn check(
        &self,
        req: &pb::LogRequest,
        from: Option<std::net::SocketAddr>,
    ) -> Result<(), pb::ticket::TicketError> {
        let now = muster_proto::daemon::now_ms();
        pb::ticket::verify(
            &self.key,
            req.ticket.as_ref(),
            &self.node,
            req.job_id,
            req.task_index,
            now,
        )
        .inspect_err(|e| {
            tracing::warn!(
                job = req.job_id,
                task = req.task_index,
                from = ?from,
                error = %e,
                "log read refused"
            );
        })
    }
}

type LogStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

/// One stream of one task's log: its rotated files (oldest first), then the
/// live file, followed across rotations by its inode.
struct Source {
    stream: pb::LogStream,
    path: PathBuf,
    /// Rotated files still to be read whole before the live one.
    backlog: std::collections::VecDeque<PathBuf>,
    offset: u64,
    /// The inode of the live file being read (0: not opened yet).
    inode: u64,
}

impl Source {
    fn new(stream: pb::LogStream, path: PathBuf) -> Source {
        let mut backlog: std::collections::VecDeque<PathBuf> =
            crate::task::logs::files_oldest_first(&path).into();
        backlog.retain(|p| p != &path);
        Source {
            stream,
            path,
            backlog,
            offset: 0,
            inode: 0,
        }
    }

    /// Read what was appended since the last call (at most one chunk).
    fn read_more(&mut self) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::MetadataExt;
        while let Some(old) = self.backlog.front().cloned() {
            let data = read_chunk(&old, &mut self.offset)?;
            if !data.is_empty() {
                return Ok(data);
            }
            self.backlog.pop_front();
            self.offset = 0;
        }
        let inode = match std::fs::metadata(&self.path) {
            Ok(m) => m.ino(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        if self.inode != 0 && inode != self.inode {
            // Rotated while we read it: finish the old file (now `.1`) first.
            self.inode = inode;
            self.backlog
                .push_back(crate::task::logs::rotated(&self.path, 1));
            return self.read_more();
        }
        self.inode = inode;
        read_chunk(&self.path, &mut self.offset)
    }
}

/// Read up to one chunk of `path` from `offset`, advancing it.
fn read_chunk(path: &std::path::Path, offset: &mut u64) -> std::io::Result<Vec<u8>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(*offset))?;
    let mut buf = vec![0u8; CHUNK];
    let n = f.read(&mut buf)?;
    buf.truncate(n);
    *offset += n as u64;
    Ok(buf)
}

#[tonic::async_trait]
impl AgentLocal for LocalService {
    type ReadLogsStream = LogStream;

    async fn read_logs(&self, req: Request<pb::LogRequest>) -> Result<Response<LogStream>, Status> {
        let from = req.remote_addr();
        let req = req.into_inner();
        self.check(&req, from)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let mut streams: Vec<pb::LogStream> = req
            .streams
            .iter()
            .filter_map(|s| pb::LogStream::try_from(*s).ok())
            .filter(|s| *s != pb::LogStream::Unspecified)
            .collect();
        if streams.is_empty() {
            streams = vec![pb::LogStream::Stdout, pb::LogStream::Stderr];
        }
        let mut sources: Vec<Source> = streams
            .into_iter()
            .map(|s| {
                let name = if s == pb::LogStream::Stdout {
                    "stdout"
                } else {
                    "stderr"
                };
                Source::new(s, self.runtime.log_path(req.job_id, req.task_index, name))
            })
            .collect();
        if !sources.iter().any(|s| s.path.exists())
            && !self.runtime.is_live(req.job_id, req.task_index)
        {
            return Err(Status::not_found(format!(
                "no logs for job {} task {} on this node",
                req.job_id, req.task_index
            )));
        }
        let (tx, rx) = mpsc::channel(16);
        let runtime = self.runtime.clone();
        tokio::spawn(async move {
            loop {
                // Decide before reading: output written before the exit is
                // then always read in this round.
                let live = req.follow && runtime.is_live(req.job_id, req.task_index);
                let mut progressed = false;
                for s in sources.iter_mut() {
                    loop {
                        match s.read_more() {
                            Ok(data) if data.is_empty() => break,
                            Ok(data) => {
                                progressed = true;
                                let chunk = pb::LogChunk {
                                    stream: s.stream as i32,
                                    data,
                                };
                                if tx.send(Ok(chunk)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let _ = tx
                                    .send(Err(Status::internal(format!(
                                        "{}: {e}",
                                        s.path.display()
                                    ))))
                                    .await;
                                return;
                            }
                        }
                    }
                }
                if !live && !progressed {
                    return;
                }
                if !progressed {
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
