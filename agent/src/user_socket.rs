//! The local user socket (`user_socket` in `agent.toml`): on a GPU host,
//! users reach the cluster through a Unix socket instead of a token.
//!
//! The kernel tells us who is on the other end of a Unix socket
//! (`SO_PEERCRED`, read by tokio as the connection's `peer_cred`). The agent
//! maps that uid to a user name and forwards the call to a scheduler over
//! its own connection (mutual TLS with its `agent:NAME` certificate where
//! configured), naming the user in `muster-on-behalf-of`. A scheduler
//! believes that header only from an agent it has authenticated, and never
//! makes such a caller a cluster admin by virtue of being root.
//!
//! The socket is created mode 0666: anyone on the host may connect, and
//! each is exactly who the kernel says they are.

// Services return tonic's `Status`; boxing it here would only be undone there.
#![allow(clippy::result_large_err)]

use muster_proto as pb;
use muster_proto::muster_client::MusterClient;
use muster_proto::muster_server::{Muster, MusterServer};
use muster_proto::security_client::SecurityClient;
use muster_proto::security_server::{Security, SecurityServer};
use std::future::Future;
use std::path::Path;
use tokio::sync::Mutex;
use tonic::transport::server::UdsConnectInfo;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use muster_proto::headers::{ON_BEHALF_OF, PEER_UID};

/// Forwards the client API to the schedulers for local users.
pub struct Forwarder {
    schedulers: Vec<String>,
    channel: Mutex<Option<Channel>>,
}

impl Forwarder {
    /// Forward to the first of `schedulers` that answers.
    pub fn new(schedulers: Vec<String>) -> Forwarder {
        Forwarder {
            schedulers,
            channel: Mutex::new(None),
        }
    }

    async fn channel(&self) -> Result<Channel, Status> {
        let mut cached = self.channel.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let mut last = String::from("no scheduler configured");
        for addr in &self.schedulers {
            let url = if addr.contains("://") {
                addr.clone()
            } else {
                format!("http://{addr}")
            };
            let endpoint = muster_proto::tls::endpoint(&url)
                .map_err(|e| Status::internal(format!("bad scheduler address {addr}: {e}")))?
                .connect_timeout(std::time::Duration::from_secs(3));
            match endpoint.connect().await {
                Ok(c) => {
                    *cached = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(Status::unavailable(format!(
            "the agent cannot reach a scheduler: {last}"
        )))
    }

    /// The caller's identity, and the request re-addressed on its behalf.
    fn on_behalf<T>(req: Request<T>) -> Result<Request<T>, Status> {
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid())
            .ok_or_else(|| Status::unauthenticated("cannot tell who is on this socket"))?;
        let name = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map(|u| u.name)
            .ok_or_else(|| Status::unauthenticated(format!("uid {uid} has no user name")))?;
        let mut out = Request::new(req.into_inner());
        let md = out.metadata_mut();
        md.insert(
            ON_BEHALF_OF,
            name.parse()
                .map_err(|_| Status::unauthenticated("user name cannot travel in a header"))?,
        );
        md.insert(PEER_UID, uid.into());
        Ok(out)
    }
}

/// A service whose every method re-addresses the request on the caller's
/// behalf, sends it on, and answers with the scheduler's reply.
macro_rules! forward {
    ($trait:path, $ty:ty, $client:ident, $($method:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl $trait for $ty {
            $(
                async fn $method(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                    let req = Forwarder::on_behalf(req)?;
                    let mut c = $client::new(self.channel().await?);
                    let r = c.$method(req).await;
                    if matches!(&r, Err(s) if s.code() == tonic::Code::Unavailable) {
                        // Reconnect (perhaps elsewhere) next time.
                        *self.channel.lock().await = None;
                    }
                    r
                }
            )*
        }
    };
}

forward! { Muster, Forwarder, MusterClient,
    submit(pb::SubmitRequest) -> pb::SubmitResponse;
    cancel(pb::CancelRequest) -> pb::CancelResponse;
    get_job(pb::GetJobRequest) -> pb::JobInfo;
    list_jobs(pb::ListJobsRequest) -> pb::ListJobsResponse;
    list_nodes(pb::ListNodesRequest) -> pb::ListNodesResponse;
    create_tenant(pb::CreateTenantRequest) -> pb::TenantInfo;
    list_tenants(pb::ListTenantsRequest) -> pb::ListTenantsResponse;
    update_tenant(pb::UpdateTenantRequest) -> pb::TenantInfo;
    delete_tenant(pb::DeleteTenantRequest) -> pb::DeleteTenantResponse;
    status(pb::StatusRequest) -> pb::StatusResponse;
    drain_node(pb::DrainNodeRequest) -> pb::NodeInfo;
    log_access(pb::LogAccessRequest) -> pb::LogAccessResponse;
}

/// The security calls, over the same channel.
pub struct SecurityForwarder(std::sync::Arc<Forwarder>);

impl std::ops::Deref for SecurityForwarder {
    type Target = Forwarder;
    fn deref(&self) -> &Forwarder {
        &self.0
    }
}

forward! { Security, SecurityForwarder, SecurityClient,
    issue_token(pb::IssueTokenRequest) -> pb::IssueTokenResponse;
    list_tokens(pb::ListTokensRequest) -> pb::ListTokensResponse;
    revoke_token(pb::RevokeTokenRequest) -> pb::RevokeTokenResponse;
    list_audit(pb::ListAuditRequest) -> pb::ListAuditResponse;
    who_am_i(pb::WhoAmIRequest) -> pb::WhoAmIResponse;
}

/// Serve the user socket at `path` until `shutdown`.
pub async fn serve(
    path: &Path,
    schedulers: Vec<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), crate::AgentError> {
    let io = |source| crate::AgentError::UserSocket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            // Made under the agent's umask 077 otherwise: users must reach it.
            std::fs::create_dir_all(dir).map_err(io)?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(io)?;
        }
    }
    // A socket left by an earlier agent.
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
    tracing::info!(path = %path.display(), "serving local users on a Unix socket");
    let forwarder = std::sync::Arc::new(Forwarder::new(schedulers));
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(MusterServer::from_arc(forwarder.clone()))
        .add_service(SecurityServer::new(SecurityForwarder(forwarder)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    let _ = std::fs::remove_file(path);
    Ok(())
}
