//! Talking to the scheduler and to agents.
//!
//! [`connect`] is the one way to get a `MusterClient`: it connects eagerly with
//! a short timeout, so a scheduler that is not there is an error within
//! seconds rather than a hang, and it turns transport failures into one line
//! that names the address. [`Scheduler`] wraps the client so every RPC's
//! failure becomes a [`ClientError`] that says what failed (`job 42 not
//! found`) instead of a raw gRPC status.

use std::time::Duration;

use muster_proto::agent_local_client::AgentLocalClient;
use muster_proto::muster_client::MusterClient;
use muster_proto::{
    CancelRequest, CreateTenantRequest, GetJobRequest, JobInfo, ListJobsRequest, ListNodesRequest,
    ListTenantsRequest, NodeInfo, StatusRequest, StatusResponse, SubmitRequest, TenantInfo,
};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A scheduler client; every call carries the read mode (see [`ReadMode`]).
pub type Client = MusterClient<InterceptedService<Channel, ReadMode>>;

static STALE_READS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Ask for stale reads (`--stale`) for the rest of this process.
pub fn set_stale_reads(stale: bool) {
    let _ = STALE_READS.set(stale);
}

/// Marks requests with `muster-read: stale` when `--stale` was given: the
/// scheduler then answers from its own state without a ReadIndex round.
#[derive(Clone, Copy, Debug)]
pub struct ReadMode;

static TOKEN: std::sync::OnceLock<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
    std::sync::OnceLock::new();

/// Send `token` as `authorization: Bearer ...` on every call of this process.
pub fn set_token(token: &str) -> Result<(), String> {
    let v = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| "the token has characters that cannot travel in a header".to_string())?;
    let _ = TOKEN.set(v);
    Ok(())
}

impl tonic::service::Interceptor for ReadMode {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(t) = TOKEN.get() {
            req.metadata_mut().insert("authorization", t.clone());
        }
        if STALE_READS.get().copied().unwrap_or(false) {
            req.metadata_mut().insert(
                "muster-read",
                tonic::metadata::MetadataValue::from_static("stale"),
            );
        }
        Ok(req)
    }
}

/// How long to wait for a TCP (and HTTP/2) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one scheduler RPC may take (a submit waits for a Raft commit).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A failure talking to the cluster, worded for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
    #[error("cannot reach the scheduler at {addr}: {reason} (is it running? start one with 'muster dev')")]
    SchedulerUnreachable { addr: String, reason: String },
    #[error("cannot reach the agent at {addr}: {reason}")]
    AgentUnreachable { addr: String, reason: String },
    #[error("the scheduler at {addr} did not answer within {}s", REQUEST_TIMEOUT.as_secs())]
    TimedOut { addr: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Rejected(String),
    /// The request may or may not have been applied (the connection broke
    /// or the scheduler lost leadership after taking it).
    #[error("the outcome of {what} is unknown: {reason}; {retry}")]
    OutcomeUnknown {
        what: String,
        reason: String,
        /// How to retry safely.
        retry: String,
    },
    #[error("{what} failed: {code}: {message}")]
    Other {
        what: String,
        code: String,
        message: String,
    },
}

/// Which kind of peer an address belongs to, for error wording.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Peer {
    Scheduler,
    Agent,
}

/// Connects to the scheduler at `addr` (`http://host:port` or `host:port`),
/// failing within [`CONNECT_TIMEOUT`] if nothing answers there. `addr` may
/// list several schedulers separated by commas: the first that answers is
/// used (any member serves clients).
pub async fn connect(addr: &str) -> Result<Client, ClientError> {
    connect_any(addr).await.map(|(_, c)| c)
}

/// Like [`connect`], also returning the address that answered.
pub async fn connect_any(addr: &str) -> Result<(String, Client), ClientError> {
    let addrs: Vec<&str> = addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    let mut last = None;
    for a in &addrs {
        match open_channel(a, Peer::Scheduler).await {
            Ok(channel) => {
                return Ok((
                    a.to_string(),
                    MusterClient::with_interceptor(channel, ReadMode),
                ))
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::BadAddress {
        addr: addr.to_string(),
        reason: "no address given".to_string(),
    }))
}

/// Connects to the admin service of one scheduler.
pub async fn connect_admin(
    addr: &str,
) -> Result<
    muster_proto::admin_client::AdminClient<InterceptedService<Channel, ReadMode>>,
    ClientError,
> {
    let channel = open_channel(addr, Peer::Scheduler).await?;
    Ok(muster_proto::admin_client::AdminClient::with_interceptor(
        channel, ReadMode,
    ))
}

/// Connects to the security service (tokens, audit) of the first scheduler that answers.
pub async fn connect_security(
    addr: &str,
) -> Result<
    (
        String,
        muster_proto::security_client::SecurityClient<InterceptedService<Channel, ReadMode>>,
    ),
    ClientError,
> {
    let mut last = None;
    for a in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match open_channel(a, Peer::Scheduler).await {
            Ok(c) => {
                return Ok((
                    a.to_string(),
                    muster_proto::security_client::SecurityClient::with_interceptor(c, ReadMode),
                ))
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::BadAddress {
        addr: addr.to_string(),
        reason: "no address given".to_string(),
    }))
}

/// Connects to an agent's local service (used for logs). No request timeout:
/// a followed log stream lasts as long as the task.
pub async fn connect_agent(addr: &str) -> Result<AgentLocalClient<Channel>, ClientError> {
    let channel = open_channel(addr, Peer::Agent).await?;
    Ok(AgentLocalClient::new(channel))
}

async fn open_channel(addr: &str, peer: Peer) -> Result<Channel, ClientError> {
    let url = crate::config::normalize_addr(addr).map_err(|reason| ClientError::BadAddress {
        addr: addr.to_string(),
        reason,
    })?;
    if let Some(path) = url.strip_prefix("unix:") {
        return unix_channel(path, peer).await;
    }
    let mut endpoint = muster_proto::tls::endpoint(&url)
        .map_err(|e| ClientError::BadAddress {
            addr: addr.to_string(),
            reason: innermost(&e),
        })?
        .connect_timeout(CONNECT_TIMEOUT);
    if peer == Peer::Scheduler {
        endpoint = endpoint.timeout(REQUEST_TIMEOUT);
    }
    // The outer timeout also covers name resolution, which `connect_timeout` does not.
    let attempt =
        tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), endpoint.connect());
    let reason = match attempt.await {
        Ok(Ok(channel)) => return Ok(channel),
        Ok(Err(e)) => innermost(&e),
        Err(_) => format!("timed out after {}s", CONNECT_TIMEOUT.as_secs()),
    };
    Err(unreachable(peer, url, reason))
}

/// Dials an agent's user socket (`unix:/run/muster/agent.sock`): the agent
/// knows who we are from the socket itself and forwards our calls.
async fn unix_channel(path: &str, peer: Peer) -> Result<Channel, ClientError> {
    let path = std::path::PathBuf::from(path);
    let connector = UnixConnector(path.clone());
    // The URI is a placeholder: the connector ignores it.
    let endpoint = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| unreachable(peer, format!("unix:{}", path.display()), innermost(&e)))
}

/// Connects every channel to one Unix socket.
#[derive(Clone)]
struct UnixConnector(std::path::PathBuf);

impl tonic::codegen::Service<tonic::transport::Uri> for UnixConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::transport::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok(hyper_util::rt::TokioIo::new(s))
        })
    }
}

fn unreachable(peer: Peer, addr: String, reason: String) -> ClientError {
    match peer {
        Peer::Scheduler => ClientError::SchedulerUnreachable { addr, reason },
        Peer::Agent => ClientError::AgentUnreachable { addr, reason },
    }
}

/// The most specific description in an error's source chain, e.g.
/// "connection refused" rather than "transport error".
fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &(dyn std::error::Error + 'static) = err;
    while let Some(next) = last.source() {
        if let Some(io) = next.downcast_ref::<std::io::Error>() {
            return describe_io(io);
        }
        last = next;
    }
    last.to_string()
}

fn describe_io(err: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::ConnectionRefused => "connection refused".to_string(),
        ErrorKind::TimedOut => format!("timed out after {}s", CONNECT_TIMEOUT.as_secs()),
        ErrorKind::ConnectionReset => "connection reset".to_string(),
        _ => err.to_string(),
    }
}

/// Turns a failed RPC into a message. `what` names the operation ("submit");
/// `subject` names the object it was about ("job 42"), used for NotFound.
pub fn status_error(status: &Status, addr: &str, what: &str, subject: Option<&str>) -> ClientError {
    let message = status.message().trim().to_string();
    match status.code() {
        Code::NotFound => ClientError::NotFound(match subject {
            Some(s) => format!("{s} not found"),
            None => non_empty(message, || format!("{what}: not found")),
        }),
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::ResourceExhausted
        | Code::OutOfRange => ClientError::Rejected(non_empty(message, || {
            format!("{what} rejected: {}", code_name(status.code()))
        })),
        Code::Unknown if message.starts_with("outcome unknown") => ClientError::OutcomeUnknown {
            what: what.to_string(),
            reason: message
                .trim_start_matches("outcome unknown")
                .trim_start_matches(':')
                .trim()
                .to_string(),
            retry: "check whether it took effect (muster show, queue, tenant list) before running it again".to_string(),
        },
        Code::Unavailable => ClientError::SchedulerUnreachable {
            addr: addr.to_string(),
            reason: non_empty(message, || "unavailable".to_string()),
        },
        Code::DeadlineExceeded => ClientError::TimedOut {
            addr: addr.to_string(),
        },
        Code::Cancelled if message.contains("Timeout expired") => ClientError::TimedOut {
            addr: addr.to_string(),
        },
        Code::Unimplemented => ClientError::Rejected(format!(
            "the server at {addr} does not offer '{what}' ({}); is it a Muster server of the same version?",
            non_empty(message, || "unimplemented".to_string())
        )),
        code => ClientError::Other {
            what: what.to_string(),
            code: code_name(code),
            message: non_empty(message, || "no details".to_string()),
        },
    }
}

/// Like [`status_error`], for a call to an agent: unavailability names the agent.
pub fn agent_status_error(
    status: &Status,
    addr: &str,
    what: &str,
    subject: Option<&str>,
) -> ClientError {
    match status_error(status, addr, what, subject) {
        ClientError::SchedulerUnreachable { addr, reason } => {
            ClientError::AgentUnreachable { addr, reason }
        }
        other => other,
    }
}

fn non_empty(message: String, fallback: impl FnOnce() -> String) -> String {
    if message.is_empty() {
        fallback()
    } else {
        message
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// How long `submit` keeps retrying through a leader change.
pub const SUBMIT_RETRY: Duration = Duration::from_secs(15);

/// The listed addresses starting after `current`, so a retry tries another.
fn rotate(all: &str, current: &str) -> String {
    let addrs: Vec<&str> = all
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    let pos = addrs
        .iter()
        .position(|a| *a == current)
        .map(|p| p + 1)
        .unwrap_or(0);
    let mut out: Vec<&str> = addrs[pos.min(addrs.len())..].to_vec();
    out.extend_from_slice(&addrs[..pos.min(addrs.len())]);
    out.join(",")
}

/// Whether a failed call carrying an idempotency key may be sent again:
/// the scheduler was unavailable (no leader, not reachable), the
/// connection broke mid-request (tonic reports `Unknown: transport error`
/// or a cancelled stream), the request timed out, or the scheduler said
/// the outcome is unknown. Refusals (invalid, denied, ...) are final.
pub fn may_retry(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

/// A submission whose fate could not be learnt within [`SUBMIT_RETRY`].
fn unknown_submit(s: &Status, key: &str) -> ClientError {
    let reason = s.message().trim();
    ClientError::OutcomeUnknown {
        what: "submit".into(),
        reason: if reason.is_empty() {
            format!("{:?}", s.code())
        } else {
            reason.to_string()
        },
        retry: format!(
            "the job may exist (see 'muster queue'); to retry safely, run the same command with --request-id {key}: it cannot create a second job"
        ),
    }
}

/// A fresh idempotency key: host, process, time and a little randomness.
fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut rnd = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut rnd));
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    format!(
        "{host}-{}-{nanos:x}-{:x}",
        std::process::id(),
        u64::from_le_bytes(rnd)
    )
}

/// A connected scheduler client whose calls return readable errors.
pub struct Scheduler {
    addr: String,
    /// Every address given (comma-separated), for failing over.
    all: String,
    inner: Client,
}

impl Scheduler {
    /// Connects as [`connect`] does.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let (chosen, inner) = connect_any(addr).await?;
        Ok(Scheduler {
            addr: chosen,
            all: addr.to_string(),
            inner,
        })
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn fail(&self, status: Status, what: &str, subject: Option<&str>) -> ClientError {
        status_error(&status, &self.addr, what, subject)
    }

    /// Submits a job and returns its id. While the cluster elects a leader
    /// (the scheduler answers Unavailable), the scheduler is unreachable or
    /// the connection breaks mid-request, it retries for up to
    /// [`SUBMIT_RETRY`], on every listed address in turn, with the same
    /// idempotency key, so a retry never creates a second job. If it still
    /// cannot tell, it says the outcome is unknown and how to retry safely.
    pub async fn submit(&mut self, mut req: SubmitRequest) -> Result<u64, ClientError> {
        if req.request_id.is_empty() {
            req.request_id = request_id();
        }
        let deadline = tokio::time::Instant::now() + SUBMIT_RETRY;
        loop {
            let err = match self.inner.submit(req.clone()).await {
                Ok(r) => return Ok(r.into_inner().id),
                Err(s) if may_retry(&s) && tokio::time::Instant::now() < deadline => s,
                Err(s) if may_retry(&s) => return Err(unknown_submit(&s, &req.request_id)),
                Err(s) => return Err(self.fail(s, "submit", None)),
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
            let others = rotate(&self.all, &self.addr);
            match connect_any(&others).await {
                Ok((addr, inner)) => {
                    self.addr = addr;
                    self.inner = inner;
                }
                Err(_) if tokio::time::Instant::now() < deadline => {}
                Err(_) => return Err(unknown_submit(&err, &req.request_id)),
            }
        }
    }

    /// Cancels a job; returns the job's new state (a `JobState` value).
    pub async fn cancel(&mut self, id: u64, user: String) -> Result<i32, ClientError> {
        match self.inner.cancel(CancelRequest { id, user }).await {
            Ok(r) => Ok(r.into_inner().state),
            Err(s) => Err(self.fail(s, "cancel", Some(&format!("job {id}")))),
        }
    }

    /// One job.
    pub async fn get_job(&mut self, id: u64) -> Result<JobInfo, ClientError> {
        match self.inner.get_job(GetJobRequest { id }).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(s, "get job", Some(&format!("job {id}")))),
        }
    }

    /// Where task `task` of job `job` ran, and a ticket its agent accepts
    /// for reading its output (refused unless we may see the job in full).
    pub async fn log_access(
        &mut self,
        job: u64,
        task: u32,
    ) -> Result<muster_proto::LogAccessResponse, ClientError> {
        let req = muster_proto::LogAccessRequest {
            job_id: job,
            task_index: task,
        };
        match self.inner.log_access(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(
                s,
                "read logs",
                Some(&format!("logs of task {task} of job {job}")),
            )),
        }
    }

    /// Active jobs, or all jobs with `all`.
    pub async fn list_jobs(&mut self, all: bool) -> Result<Vec<JobInfo>, ClientError> {
        // Page through: one response stays small however deep the queue.
        let mut jobs: Vec<JobInfo> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut offset = 0;
        loop {
            let req = ListJobsRequest {
                all,
                limit: 0,
                offset,
            };
            let page = match self.inner.list_jobs(req).await {
                Ok(r) => r.into_inner(),
                Err(s) => return Err(self.fail(s, "list jobs", None)),
            };
            // The listing may shift between pages: keep each job once.
            jobs.extend(page.jobs.into_iter().filter(|j| seen.insert(j.id)));
            if page.next_offset <= offset || page.next_offset >= page.total {
                return Ok(jobs);
            }
            offset = page.next_offset;
        }
    }

    /// Every registered node.
    pub async fn list_nodes(&mut self) -> Result<Vec<NodeInfo>, ClientError> {
        match self.inner.list_nodes(ListNodesRequest {}).await {
            Ok(r) => Ok(r.into_inner().nodes),
            Err(s) => Err(self.fail(s, "list nodes", None)),
        }
    }

    /// Creates a tenant.
    pub async fn create_tenant(
        &mut self,
        req: CreateTenantRequest,
    ) -> Result<TenantInfo, ClientError> {
        let subject = format!("tenant {}", req.name);
        match self.inner.create_tenant(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(s, "create tenant", Some(&subject))),
        }
    }

    /// Every tenant.
    pub async fn list_tenants(&mut self) -> Result<Vec<TenantInfo>, ClientError> {
        match self.inner.list_tenants(ListTenantsRequest {}).await {
            Ok(r) => Ok(r.into_inner().tenants),
            Err(s) => Err(self.fail(s, "list tenants", None)),
        }
    }

    /// Changes a tenant.
    pub async fn update_tenant(
        &mut self,
        req: muster_proto::UpdateTenantRequest,
    ) -> Result<TenantInfo, ClientError> {
        let subject = format!("tenant {}", req.name);
        match self.inner.update_tenant(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(s, "update tenant", Some(&subject))),
        }
    }

    /// Deletes a tenant.
    pub async fn delete_tenant(
        &mut self,
        req: muster_proto::DeleteTenantRequest,
    ) -> Result<(), ClientError> {
        let subject = format!("tenant {}", req.name);
        match self.inner.delete_tenant(req).await {
            Ok(_) => Ok(()),
            Err(s) => Err(self.fail(s, "delete tenant", Some(&subject))),
        }
    }

    /// Drains (`drain`) or resumes a node.
    pub async fn drain_node(
        &mut self,
        req: muster_proto::DrainNodeRequest,
    ) -> Result<NodeInfo, ClientError> {
        let subject = format!("node {}", req.name);
        let what = if req.drain {
            "drain node"
        } else {
            "resume node"
        };
        match self.inner.drain_node(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(s, what, Some(&subject))),
        }
    }

    /// The scheduler's view of the cluster.
    pub async fn status(&mut self) -> Result<StatusResponse, ClientError> {
        match self.inner.status(StatusRequest {}).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(self.fail(s, "status", None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_the_subject() {
        let s = Status::not_found("no such job");
        let e = status_error(&s, "http://h:1", "get job", Some("job 42"));
        assert_eq!(e.to_string(), "job 42 not found");
    }

    #[test]
    fn invalid_argument_is_the_server_message() {
        let s = Status::invalid_argument("tenant \"x\" does not exist");
        let e = status_error(&s, "http://h:1", "submit", None);
        assert_eq!(e.to_string(), "tenant \"x\" does not exist");
    }

    #[test]
    fn unavailable_names_the_address() {
        let s = Status::unavailable("tcp connect error");
        let e = status_error(&s, "http://h:1", "submit", None).to_string();
        assert!(
            e.starts_with("cannot reach the scheduler at http://h:1: tcp connect error"),
            "{e}"
        );
    }

    #[test]
    fn client_timeouts_read_as_timeouts() {
        let s = Status::cancelled("Timeout expired");
        let e = status_error(&s, "http://h:1", "submit", None).to_string();
        assert!(e.contains("did not answer"), "{e}");
    }

    #[test]
    fn a_foreign_server_is_called_out() {
        let s =
            Status::unimplemented("grpc-status header missing, mapped from HTTP status code 404");
        let e = status_error(&s, "http://h:1", "status", None).to_string();
        assert!(
            e.starts_with("the server at http://h:1 does not offer 'status'"),
            "{e}"
        );
    }

    #[test]
    fn other_codes_name_the_operation() {
        let s = Status::internal("boom");
        let e = status_error(&s, "http://h:1", "list nodes", None).to_string();
        assert_eq!(e, "list nodes failed: Internal: boom");
    }

    #[tokio::test]
    async fn refused_connection_fails_fast_and_names_the_address() {
        let started = std::time::Instant::now();
        let err = connect("127.0.0.1:1").await.err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.starts_with("cannot reach the scheduler at http://127.0.0.1:1: connection refused"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn malformed_addresses_are_refused_before_connecting() {
        let err = connect("ftp://x").await.err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("unsupported scheme"));
    }
}
