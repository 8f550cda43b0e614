//! The replicated half of security: who holds a token, who administers which
//! tenant, and the audit trail.
//!
//! Tokens are kept as SHA-256 hashes only (the secret is shown once, when it
//! is issued). A client request that changes state arrives here wrapped in
//! [`Command::Authorized`](super::Command::Authorized), carrying the
//! principal the receiving scheduler authenticated; [`State::apply`] checks
//! that principal's rights again against the state the command lands on (the
//! same pure check, [`crate::auth::roles`]), applies the inner command only
//! if allowed, and appends one [`AuditEntry`] whatever the outcome. Requests
//! refused before they reach the log (unauthenticated, denied on the
//! receiving node, rate-limited) arrive in batches as `Command::Audit`.

use super::{ApplyResult, Command, State};
use crate::auth::roles;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Audit entries kept; the oldest are forgotten first.
pub const MAX_AUDIT: usize = 100_000;
/// Tokens kept (revoked and expired ones included, until removed).
pub const MAX_TOKENS: usize = 100_000;

/// Who made a request, as the receiving scheduler authenticated them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// The user name (`agent:NAME` / `node:NAME` for daemons).
    pub name: String,
    /// Listed in `cluster_admins` (or root) on the node that authenticated it.
    pub cluster_admin: bool,
    /// How: `token ID`, `cert user:NAME`, `peer uid N`.
    pub via: String,
    /// The caller's address.
    pub from: String,
}

/// One issued token (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub user: String,
    /// SHA-256 of the whole token string.
    pub hash: Vec<u8>,
    pub created_at_ms: i64,
    /// `None`: never expires.
    pub expires_at_ms: Option<i64>,
    pub revoked: bool,
    pub created_by: String,
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    pub who: String,
    pub via: String,
    pub from: String,
    pub action: String,
    pub target: String,
    /// `applied`, `rejected: ...`, `denied: ...`, `unauthenticated: ...`.
    pub outcome: String,
}

impl AuditEntry {
    /// An entry for `who` doing `cmd`, with `outcome`.
    pub fn of(who: &Principal, at_ms: i64, cmd: &Command, outcome: String) -> AuditEntry {
        let (action, target) = roles::describe(cmd);
        AuditEntry::by(who, at_ms, action, target, outcome)
    }

    /// An entry for `who` doing something that is not a command (a
    /// membership change).
    pub fn by(
        who: &Principal,
        at_ms: i64,
        action: &str,
        target: String,
        outcome: String,
    ) -> AuditEntry {
        AuditEntry {
            at_ms,
            who: who.name.clone(),
            via: who.via.clone(),
            from: who.from.clone(),
            action: action.to_string(),
            target,
            outcome,
        }
    }
}

/// Whether an audit entry records a change that was applied (not a
/// refusal: unauthenticated, denied, rejected).
pub fn is_change(e: &AuditEntry) -> bool {
    e.outcome.starts_with("applied")
}

/// The audit outcome of an apply result.
pub fn outcome_of(r: &ApplyResult) -> String {
    match r {
        ApplyResult::Rejected(m) => format!("rejected: {m}"),
        ApplyResult::NotFound(m) => format!("rejected: {m}"),
        ApplyResult::Denied(m) => format!("denied: {m}"),
        ApplyResult::Submitted(id) => format!("applied: job {id}"),
        _ => "applied".to_string(),
    }
}

impl State {
    /// `Command::Authorized`: check, apply, record.
    pub(super) fn apply_authorized(
        &mut self,
        who: &Principal,
        at_ms: i64,
        cmd: &Command,
    ) -> ApplyResult {
        let r = if matches!(cmd, Command::Authorized { .. } | Command::Audit { .. }) {
            ApplyResult::Rejected("an authorized command cannot wrap another".into())
        } else if let Err(denial) = roles::check(self, who, cmd) {
            ApplyResult::Denied(denial)
        } else {
            self.apply(cmd)
        };
        if let (Command::DeleteTenant { name }, ApplyResult::Applied) = (cmd, &r) {
            self.tenant_admins.remove(name);
        }
        self.record(AuditEntry::of(who, at_ms, cmd, outcome_of(&r)));
        r
    }

    /// Append an audit entry; past [`MAX_AUDIT`], forget the oldest one (a
    /// change ages out as newer entries come), but never an applied change
    /// to make room for a refusal: a flood of
    /// refused requests (anyone can send them) must not push the record of
    /// what was changed out of the trail. A refusal then displaces the oldest
    /// refusal, or is itself forgotten when the trail holds only changes.
    pub(super) fn record(&mut self, e: AuditEntry) {
        let refusal = !is_change(&e);
        self.audit.push_back(e);
        if self.audit.len() <= MAX_AUDIT {
            return;
        }
        let front_is_change = self.audit.front().is_some_and(is_change);
        if !(refusal && front_is_change) {
            self.audit.pop_front();
            return;
        }
        // Refusals reach the log at a bounded rate (see `crate::auth`), so
        // this search runs at most that often.
        match self.audit.iter().position(|e| !is_change(e)) {
            Some(i) if i + 1 < self.audit.len() => {
                self.audit.remove(i);
            }
            _ => {
                self.audit.pop_back();
            }
        }
    }

    pub(super) fn issue_token(&mut self, t: &TokenRecord) -> ApplyResult {
        if self.tokens.contains_key(&t.id) {
            return ApplyResult::Rejected(format!("token {} already exists", t.id));
        }
        if let Err(e) = roles::check_user_name(&t.user) {
            return ApplyResult::Rejected(e);
        }
        if self.tokens.len() >= MAX_TOKENS {
            return ApplyResult::Rejected(format!(
                "too many tokens ({MAX_TOKENS}); revoke some first"
            ));
        }
        self.tokens.insert(t.id.clone(), t.clone());
        ApplyResult::Applied
    }

    pub(super) fn revoke_token(&mut self, id: &str) -> ApplyResult {
        match self.tokens.get_mut(id) {
            Some(t) => {
                t.revoked = true;
                ApplyResult::Applied
            }
            None => ApplyResult::NotFound(format!("token {id} not found")),
        }
    }

    pub(super) fn set_tenant_admins(
        &mut self,
        tenant: &str,
        add: &[String],
        remove: &[String],
    ) -> ApplyResult {
        if !self.tenants.contains_key(tenant) {
            return ApplyResult::NotFound(format!("tenant {tenant} not found"));
        }
        for u in add {
            if let Err(e) = roles::check_user_name(u) {
                return ApplyResult::Rejected(format!("tenant {tenant}: admin: {e}"));
            }
        }
        let admins = self.tenant_admins.entry(tenant.to_string()).or_default();
        admins.extend(add.iter().cloned());
        for u in remove {
            admins.remove(u);
        }
        if admins.is_empty() {
            self.tenant_admins.remove(tenant);
        }
        ApplyResult::Applied
    }

    /// The tenants `user` administers directly.
    pub fn admin_of(&self, user: &str) -> Vec<String> {
        self.tenant_admins
            .iter()
            .filter(|(_, a)| a.contains(user))
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Admins of `tenant` itself.
    pub fn admins(&self, tenant: &str) -> BTreeSet<String> {
        self.tenant_admins.get(tenant).cloned().unwrap_or_default()
    }
}
