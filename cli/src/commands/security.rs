//! `muster admin ca|cert|token|audit` and `muster whoami`.

use super::Ctx;
use crate::client::{connect_security, status_error};
use crate::output::{format_time_ms, or_dash, Table};
use crate::pki;
use crate::security_args::{AuditArgs, CertIssueArgs, TokenCommand, TokenIssueArgs};
use anyhow::Context as _;
use muster_proto as pb;
use serde::Serialize;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;

/// `muster admin ca init`.
pub fn ca_init(ctx: &Ctx, dir: &std::path::Path) -> anyhow::Result<()> {
    let cert = pki::ca_init(dir)?;
    if ctx.json() {
        return crate::json::print(&serde_json::json!({ "ca": cert }));
    }
    println!(
        "CA created: {} (key {}, mode 0600: keep it off the daemons' hosts)",
        cert.display(),
        pki::ca_paths(dir).1.display()
    );
    Ok(())
}

/// `muster admin cert issue`.
pub fn cert_issue(ctx: &Ctx, a: CertIssueArgs) -> anyhow::Result<()> {
    let (kind, name) = match (a.node, a.agent, a.user) {
        (Some(n), _, _) => (pki::Kind::Node, n),
        (_, Some(n), _) => (pki::Kind::Agent, n),
        (_, _, Some(n)) => (pki::Kind::User, n),
        _ => anyhow::bail!("give --node, --agent or --user"),
    };
    let issued = pki::issue(&a.dir, kind, &name, &a.san, a.expires)?;
    let (cert, key) = (&issued.cert, &issued.key);
    let ca = pki::ca_paths(&a.dir).0;
    if ctx.json() {
        return crate::json::print(&serde_json::json!({
            "ca": ca, "cert": cert, "key": key, "serial": issued.serial,
        }));
    }
    println!(
        "certificate written: {} (serial {}; to revoke it, add the serial to the schedulers' [tls] revoked file)\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}",
        cert.display(),
        issued.serial,
        ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string()
    );
    Ok(())
}

async fn security(ctx: &Ctx) -> anyhow::Result<(String, super::SecurityClient)> {
    Ok(connect_security(&ctx.addr()?).await?)
}

/// `muster admin token ...`.
pub async fn token(ctx: &Ctx, cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Issue(a) => issue(ctx, a).await,
        TokenCommand::List => list(ctx).await,
        TokenCommand::Revoke(a) => {
            let (addr, mut c) = security(ctx).await?;
            c.revoke_token(pb::RevokeTokenRequest { id: a.id.clone() })
                .await
                .map_err(|s| {
                    status_error(&s, &addr, "revoke token", Some(&format!("token {}", a.id)))
                })?;
            if ctx.json() {
                return crate::json::print(&serde_json::json!({ "revoked": a.id }));
            }
            println!("token {} revoked", a.id);
            Ok(())
        }
    }
}

async fn issue(ctx: &Ctx, a: TokenIssueArgs) -> anyhow::Result<()> {
    let (addr, mut c) = security(ctx).await?;
    // Create the file first, so a bad path fails before a token exists.
    let mut file = match &a.out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("cannot create token file {}", p.display()))?,
        ),
        None => None,
    };
    let req = pb::IssueTokenRequest {
        user: a.user.clone(),
        expires_in_secs: a.expires.map_or(0, |d| d.as_secs().max(1)),
    };
    let r = match c.issue_token(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            if let Some(p) = &a.out {
                let _ = std::fs::remove_file(p);
            }
            return Err(status_error(&s, &addr, "issue token", None).into());
        }
    };
    let expires = match r.expires_at_ms {
        0 => "never".to_string(),
        ms => format_time_ms(ms),
    };
    if let (Some(f), Some(p)) = (file.as_mut(), &a.out) {
        writeln!(f, "{}", r.token).with_context(|| format!("cannot write {}", p.display()))?;
        if ctx.json() {
            return crate::json::print(&serde_json::json!({
                "id": r.id, "user": r.user, "expires_at_ms": r.expires_at_ms, "file": p,
            }));
        }
        println!(
            "token {} for {} (expires {expires}) written to {} (mode 0600); use it with \
             'muster --token-file {}'",
            r.id,
            r.user,
            p.display(),
            p.display()
        );
        return Ok(());
    }
    if ctx.json() {
        return crate::json::print(&serde_json::json!({
            "id": r.id, "user": r.user, "expires_at_ms": r.expires_at_ms, "token": r.token,
        }));
    }
    eprintln!(
        "token {} for {} (expires {expires}); it is shown only once:",
        r.id, r.user
    );
    println!("{}", r.token);
    Ok(())
}

#[derive(Serialize)]
struct TokenJson {
    id: String,
    user: String,
    created_at_ms: i64,
    /// `null`: never.
    expires_at_ms: Option<i64>,
    revoked: bool,
    created_by: String,
}

async fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let (addr, mut c) = security(ctx).await?;
    let tokens = c
        .list_tokens(pb::ListTokensRequest {})
        .await
        .map_err(|s| status_error(&s, &addr, "list tokens", None))?
        .into_inner()
        .tokens;
    if ctx.json() {
        let v: Vec<TokenJson> = tokens
            .into_iter()
            .map(|t| TokenJson {
                expires_at_ms: (t.expires_at_ms > 0).then_some(t.expires_at_ms),
                id: t.id,
                user: t.user,
                created_at_ms: t.created_at_ms,
                revoked: t.revoked,
                created_by: t.created_by,
            })
            .collect();
        return crate::json::print(&serde_json::json!({ "tokens": v }));
    }
    let mut t = Table::new(&["ID", "USER", "CREATED", "EXPIRES", "REVOKED", "BY"]);
    for k in tokens {
        t.row(vec![
            k.id,
            k.user,
            format_time_ms(k.created_at_ms),
            match k.expires_at_ms {
                0 => "never".into(),
                ms => format_time_ms(ms),
            },
            if k.revoked { "yes" } else { "no" }.into(),
            k.created_by,
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// `--since`: a duration ago (`1h`) or an RFC 3339 time.
pub fn parse_since(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now_ms - d.as_millis() as i64);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        anyhow::anyhow!("--since {s:?}: give a duration (1h, 30m) or a time (2026-12-01T08:00:00Z)")
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64))
}

#[derive(Serialize)]
struct AuditJson {
    at_ms: i64,
    at: String,
    who: String,
    via: String,
    from: String,
    action: String,
    target: String,
    outcome: String,
}

/// `muster admin audit`.
pub async fn audit(ctx: &Ctx, a: AuditArgs) -> anyhow::Result<()> {
    let since_ms = match &a.since {
        Some(s) => parse_since(s, crate::output::now_ms())?,
        None => 0,
    };
    let (addr, mut c) = security(ctx).await?;
    let req = pb::ListAuditRequest {
        since_ms,
        user: a.user.unwrap_or_default(),
        limit: a.limit,
    };
    let entries = c
        .list_audit(req)
        .await
        .map_err(|s| status_error(&s, &addr, "read the audit trail", None))?
        .into_inner()
        .entries;
    if ctx.json() {
        let v: Vec<AuditJson> = entries
            .into_iter()
            .map(|e| AuditJson {
                at: humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at_ms.max(0) as u64),
                )
                .to_string(),
                at_ms: e.at_ms,
                who: e.who,
                via: e.via,
                from: e.from,
                action: e.action,
                target: e.target,
                outcome: e.outcome,
            })
            .collect();
        return crate::json::print(&serde_json::json!({ "entries": v }));
    }
    let mut t = Table::new(&["TIME", "WHO", "VIA", "FROM", "ACTION", "TARGET", "OUTCOME"]);
    for e in entries {
        t.row(vec![
            format_time_ms(e.at_ms),
            e.who,
            e.via,
            or_dash(&e.from),
            e.action,
            or_dash(&e.target),
            e.outcome,
        ]);
    }
    print!("{}", t.render());
    Ok(())
}

/// `muster whoami`.
pub async fn whoami(ctx: &Ctx) -> anyhow::Result<()> {
    let (addr, mut c) = security(ctx).await?;
    let r = c
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(|s| status_error(&s, &addr, "whoami", None))?
        .into_inner();
    if ctx.json() {
        return crate::json::print(&serde_json::json!({
            "user": r.user, "via": r.via, "cluster_admin": r.cluster_admin,
            "tenant_admin_of": r.tenant_admin_of,
        }));
    }
    let mut roles = vec![];
    if r.cluster_admin {
        roles.push("cluster admin".to_string());
    }
    if !r.tenant_admin_of.is_empty() {
        roles.push(format!("tenant admin of {}", r.tenant_admin_of.join(", ")));
    }
    if roles.is_empty() {
        roles.push("user".into());
    }
    println!("{} (by {}): {}", r.user, r.via, roles.join("; "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_times() {
        assert_eq!(
            parse_since("1h", 10_000_000).unwrap(),
            10_000_000 - 3_600_000
        );
        assert_eq!(parse_since("1970-01-01T00:00:01Z", 0).unwrap(), 1000);
        assert!(parse_since("yesterday", 0)
            .unwrap_err()
            .to_string()
            .contains("--since"));
    }
}
