//! `Security`: tokens (`muster admin token`), the audit trail
//! (`muster admin audit`) and `muster whoami`.

use super::{now_ms, Ctx};
use crate::auth::{roles, token};
use crate::state::{Command, TokenRecord};
use muster_proto as pb;
use muster_proto::security_server::Security;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Longest token lifetime accepted (ten years).
const MAX_EXPIRY_SECS: u64 = 10 * 365 * 86_400;
/// Audit entries returned when the request names no limit.
const DEFAULT_AUDIT_LIMIT: usize = 1000;

/// The security service.
pub struct SecurityService {
    ctx: Arc<Ctx>,
}

impl SecurityService {
    /// A service over the shared context.
    pub fn new(ctx: Arc<Ctx>) -> SecurityService {
        SecurityService { ctx }
    }
}

fn token_to_pb(t: &TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.clone(),
        user: t.user.clone(),
        created_at_ms: t.created_at_ms,
        expires_at_ms: t.expires_at_ms.unwrap_or(0),
        revoked: t.revoked,
        created_by: t.created_by.clone(),
    }
}

#[tonic::async_trait]
impl Security for SecurityService {
    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let who = self.ctx.authenticate(&req, "token-issue")?;
        let req = req.into_inner();
        roles::check_user_name(&req.user)
            .map_err(|e| Status::invalid_argument(format!("user: {e}")))?;
        if req.expires_in_secs > MAX_EXPIRY_SECS {
            return Err(Status::invalid_argument(format!(
                "expires_in_secs: at most {MAX_EXPIRY_SECS} (ten years)"
            )));
        }
        let (id, secret) = token::generate()
            .map_err(|e| Status::internal(format!("cannot read /dev/urandom: {e}")))?;
        let at = now_ms();
        let expires_at_ms =
            (req.expires_in_secs > 0).then(|| at + req.expires_in_secs as i64 * 1000);
        let record = TokenRecord {
            id: id.clone(),
            user: req.user.clone(),
            hash: token::hash(&secret),
            created_at_ms: at,
            expires_at_ms,
            revoked: false,
            created_by: who.name.clone(),
        };
        self.ctx
            .authorized(&who, Command::IssueToken { token: record })
            .await?;
        Ok(Response::new(pb::IssueTokenResponse {
            id,
            token: secret,
            user: req.user,
            expires_at_ms: expires_at_ms.unwrap_or(0),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let who = self.ctx.authenticate(&req, "token-list")?;
        roles::cluster_admin(&who, "listing tokens").map_err(Status::permission_denied)?;
        self.ctx.linearize(&req).await?;
        let state = self.ctx.raft.state();
        let tokens = state.tokens.values().map(token_to_pb).collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let who = self.ctx.authenticate(&req, "token-revoke")?;
        let id = req.into_inner().id;
        super::limits::line("id", &id, 128)?;
        self.ctx
            .authorized(&who, Command::RevokeToken { id })
            .await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let who = self.ctx.authenticate(&req, "audit-read")?;
        roles::cluster_admin(&who, "reading the audit trail").map_err(Status::permission_denied)?;
        self.ctx.linearize(&req).await?;
        let req = req.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_AUDIT_LIMIT,
            n => n as usize,
        };
        let state = self.ctx.raft.state();
        let mut entries: Vec<pb::AuditEntry> = state
            .audit
            .iter()
            .rev()
            .filter(|e| e.at_ms >= req.since_ms && (req.user.is_empty() || e.who == req.user))
            .take(limit)
            .map(|e| pb::AuditEntry {
                at_ms: e.at_ms,
                who: e.who.clone(),
                via: e.via.clone(),
                from: e.from.clone(),
                action: e.action.clone(),
                target: e.target.clone(),
                outcome: e.outcome.clone(),
            })
            .collect();
        entries.reverse();
        Ok(Response::new(pb::ListAuditResponse { entries }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let who = self.ctx.authenticate(&req, "whoami")?;
        let state = self.ctx.raft.state();
        Ok(Response::new(pb::WhoAmIResponse {
            tenant_admin_of: state.admin_of(&who.name),
            user: who.name,
            via: who.via,
            cluster_admin: who.cluster_admin,
        }))
    }
}
