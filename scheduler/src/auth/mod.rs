//! Authentication, roles and the audit trail.
//!
//! No request is taken at its word. Every RPC first finds out who is
//! calling ([`Auth::authenticate`]), in this order:
//!
//! 1. a bearer token (`authorization: Bearer mst_...` metadata), looked up
//!    by id in the replicated state and compared by SHA-256 hash in constant
//!    time ([`token`]); a forged, expired or revoked token is refused, not
//!    ignored;
//! 2. a client certificate signed by the cluster CA whose common name is
//!    `user:NAME` (mutual TLS, see `muster_proto::tls`);
//! 3. on the scheduler's own host, the uid that owns the caller's loopback
//!    socket ([`peer_uid`]): root there is a cluster admin, which is how
//!    `muster dev`, bootstrapping the first token and a sysadmin's shell work.
//!
//! Agents and peer schedulers are daemons, not users: with TLS they must
//! present an `agent:NAME` / `node:NAME` certificate; without TLS only a
//! loopback caller running as root or as this scheduler's own uid is
//! accepted, unless the configuration says `insecure = true`.
//!
//! What a principal may do is [`roles::check`], a pure function of the
//! state, run here before proposing and again in `apply`. A job's user is
//! always the authenticated name; a `user` field in a request is ignored.
//!
//! Every state-changing request leaves an audit entry in the replicated
//! log: requests that reach the log record their outcome when applied
//! (`Command::Authorized`); requests refused before (unauthenticated,
//! denied here, rate-limited) are queued and written in batches by
//! [`audit_loop`] (best effort: a flood beyond the queue is only logged).

// Services return tonic's `Status`; boxing it here would only be undone there.
#![allow(clippy::result_large_err)]

pub mod peer_uid;

use muster_proto::daemon::PeerInfo;
pub mod rate;
pub mod revoked;
pub mod roles;
pub mod token;

use crate::state::{AuditEntry, Principal, State};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Request, Status};

/// Denied and unauthenticated requests queued for the audit trail.
const AUDIT_QUEUE: usize = 4096;
/// Entries written in one log entry.
const AUDIT_BATCH: usize = 256;
/// Attempts to write a batch (250 ms apart) before it is only logged.
const AUDIT_RETRIES: u32 = 40;

/// Which kind of daemon a certificate must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Agent,
    Node,
}

impl Daemon {
    fn prefix(self) -> &'static str {
        match self {
            Daemon::Agent => "agent:",
            Daemon::Node => "node:",
        }
    }
}

/// What the services need to authenticate callers.
pub struct Auth {
    cluster_admins: BTreeSet<String>,
    tls: bool,
    insecure: bool,
    own_uid: u32,
    audit_tx: mpsc::Sender<AuditEntry>,
    audit_rx: Mutex<Option<mpsc::Receiver<AuditEntry>>>,
    limiter: Mutex<rate::RateLimiter>,
    /// Refused requests' audit entries in the current window.
    refusals: Mutex<Refusals>,
    /// Checkpoint reports, per task (`muster checkpoint done` from inside it).
    checkpoints: Mutex<rate::RateLimiter>,
    /// Account names of loopback callers' uids, looked up at most once a
    /// [`NAME_TTL`] (each lookup reads the password database).
    names: Mutex<HashMap<u32, (String, Instant)>>,
    /// Revoked certificate serials (`[tls] revoked`).
    revoked: Option<revoked::Revoked>,
}

/// Audit entries of refused requests (unauthenticated, denied, rate-limited)
/// written one by one per source (address and claimed user) per window, and
/// for all sources together; the rest are counted and written as one summary
/// per source when the window ends. Anyone can send refused requests: they
/// must not flood the log or the trail.
const REFUSALS_PER_SOURCE: u32 = 20;
const REFUSALS_PER_WINDOW: u32 = 600;
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked in one window; beyond, new sources share one count.
const REFUSAL_SOURCES: usize = 10_000;

/// Refusals seen in the current window, by (source address, claimed user).
struct Refusals {
    since: Instant,
    total: u32,
    by_source: HashMap<(String, String), SourceRefusals>,
}

struct SourceRefusals {
    written: u32,
    suppressed: u32,
    last: Option<AuditEntry>,
}

/// Checkpoint reports one task may make per second, and at once: a real
/// checkpoint takes far longer; a loop in a task must not flood the log.
const CHECKPOINTS_PER_SECOND: f64 = 1.0;
const CHECKPOINT_BURST: u32 = 10;

/// How long a uid's account name is believed before it is looked up again.
const NAME_TTL: Duration = Duration::from_secs(30);

impl Auth {
    /// From the scheduler's configuration.
    pub fn new(cfg: &crate::config::SchedulerConfig) -> Auth {
        let (audit_tx, audit_rx) = mpsc::channel(AUDIT_QUEUE);
        Auth {
            cluster_admins: cfg.cluster_admins.iter().cloned().collect(),
            tls: cfg.tls.is_some(),
            insecure: cfg.insecure,
            own_uid: nix::unistd::Uid::effective().as_raw(),
            audit_tx,
            audit_rx: Mutex::new(Some(audit_rx)),
            limiter: Mutex::new(rate::RateLimiter::new(
                cfg.limits.submits_per_second,
                cfg.limits.submit_burst,
            )),
            refusals: Mutex::new(Refusals {
                since: Instant::now(),
                total: 0,
                by_source: HashMap::new(),
            }),
            checkpoints: Mutex::new(rate::RateLimiter::new(
                CHECKPOINTS_PER_SECOND,
                CHECKPOINT_BURST,
            )),
            names: Mutex::new(HashMap::new()),
            revoked: cfg
                .tls
                .as_ref()
                .and_then(|t| t.revoked.clone())
                .map(revoked::Revoked::new),
        }
    }

    /// The caller's certificate's serial, if it is revoked.
    fn revoked_cert<T>(&self, req: &Request<T>) -> Option<String> {
        let list = self.revoked.as_ref()?;
        let certs = PeerInfo::peer_certs(req).or_else(|| req.peer_certs())?;
        let serial = muster_proto::tls::serial(certs.first()?.as_ref())?;
        list.contains(&serial).then_some(serial)
    }

    fn principal(&self, name: String, via: String, from: String) -> Principal {
        Principal {
            cluster_admin: name == "root" || self.cluster_admins.contains(&name),
            name,
            via,
            from,
        }
    }

    /// Who is calling, or `Unauthenticated` (and an audit entry) for `action`.
    pub fn authenticate<T>(
        &self,
        state: &State,
        req: &Request<T>,
        action: &str,
    ) -> Result<Principal, Status> {
        let from = remote_of(req);
        match self.identify(state, req, from.clone()) {
            Ok(p) => Ok(p),
            Err(why) => {
                self.audit(AuditEntry {
                    at_ms: crate::api::now_ms(),
                    who: "?".into(),
                    via: "none".into(),
                    from,
                    action: action.to_string(),
                    target: String::new(),
                    outcome: format!("unauthenticated: {why}"),
                });
                Err(Status::unauthenticated(why))
            }
        }
    }

    fn identify<T>(
        &self,
        state: &State,
        req: &Request<T>,
        from: String,
    ) -> Result<Principal, String> {
        // A revoked certificate is refused whatever else the request says.
        if let Some(serial) = self.revoked_cert(req) {
            return Err(format!("certificate {serial} is revoked"));
        }
        if let Some(user) = req.metadata().get(muster_proto::headers::ON_BEHALF_OF) {
            return self.on_behalf(req, user, from);
        }
        if let Some(v) = req.metadata().get("authorization") {
            let v = v
                .to_str()
                .map_err(|_| "invalid token: not text".to_string())?;
            let t = v.strip_prefix("Bearer ").unwrap_or(v).trim();
            let rec = token::verify(state, t, crate::api::now_ms())?;
            return Ok(self.principal(rec.user.clone(), format!("token {}", rec.id), from));
        }
        if let Some(cn) = peer_cn(req) {
            if let Some(user) = cn.strip_prefix("user:") {
                return Ok(self.principal(user.to_string(), format!("cert {cn}"), from));
            }
        }
        // Looked up once per connection, when it was accepted.
        if let Some(uid) = PeerInfo::of(req).and_then(|p| p.uid) {
            let name = self.account_name(uid);
            return Ok(self.principal(name, format!("peer uid {uid}"), from));
        }
        Err(
            "no credentials: present a token (muster --token-file FILE; an admin issues one \
             with 'muster admin token issue') or a client certificate"
                .to_string(),
        )
    }

    /// The account name of `uid` (`uid:N` when it has none), from a cache
    /// renewed every [`NAME_TTL`].
    fn account_name(&self, uid: u32) -> String {
        let names = || self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((name, at)) = names().get(&uid) {
            if at.elapsed() < NAME_TTL {
                return name.clone();
            }
        }
        // Not under the lock: the password database may be slow (NSS).
        let name = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map_or_else(|| format!("uid:{uid}"), |u| u.name);
        let mut names = names();
        if names.len() > 4096 {
            names.clear();
        }
        names.insert(uid, (name.clone(), Instant::now()));
        name
    }

    /// A user of an agent's host, speaking through the agent's user socket:
    /// believed only if the caller is an authenticated agent, and never a
    /// cluster admin for being root there.
    fn on_behalf<T>(
        &self,
        req: &Request<T>,
        user: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        from: String,
    ) -> Result<Principal, String> {
        let agent = self.vouching_agent(req)?;
        let name = user
            .to_str()
            .map_err(|_| "on-behalf-of: not text".to_string())?
            .to_string();
        roles::check_user_name(&name).map_err(|e| format!("on-behalf-of: {e}"))?;
        let uid = req
            .metadata()
            .get(muster_proto::headers::PEER_UID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        Ok(Principal {
            cluster_admin: name != "root" && self.cluster_admins.contains(&name),
            via: format!("{agent} socket uid {uid}"),
            name,
            from,
        })
    }

    /// The agent allowed to speak for a user of its host: one that proved who
    /// it is, with an `agent:` certificate or as root (or this scheduler's
    /// own uid) on this host, identified by the kernel. Never one accepted
    /// only because the cluster is `insecure`: anyone could claim to be it.
    fn vouching_agent<T>(&self, req: &Request<T>) -> Result<String, String> {
        if self.tls {
            return self
                .daemon(req, Daemon::Agent)
                .map_err(|s| format!("only an agent may speak for a local user: {}", s.message()));
        }
        match PeerInfo::of(req).and_then(|p| p.uid) {
            Some(u) if u == 0 || u == self.own_uid => Ok(format!("agent:uid-{u}")),
            Some(u) => Err(format!(
                "only an agent may speak for a local user: the caller runs as uid {u}, not \
                 as root or the scheduler's user"
            )),
            None => Err(
                "only an agent may speak for a local user: without TLS, only an agent \
                 on the scheduler's own host running as root may (configure [tls] for agents \
                 on other hosts)"
                    .to_string(),
            ),
        }
    }

    /// Check that a daemon of `kind` is calling; returns its name (`agent:NAME`).
    ///
    /// With `insecure = true` a caller that cannot be identified (another
    /// host) is believed; one the kernel identifies as an unprivileged user
    /// of this host never is.
    pub fn daemon<T>(&self, req: &Request<T>, kind: Daemon) -> Result<String, Status> {
        if let Some(serial) = self.revoked_cert(req) {
            return Err(Status::permission_denied(format!(
                "permission denied: certificate {serial} is revoked"
            )));
        }
        if self.tls {
            return match peer_cn(req) {
                Some(cn) if cn.starts_with(kind.prefix()) => Ok(cn),
                other => Err(Status::permission_denied(format!(
                    "permission denied: this scheduler needs a certificate {}NAME signed by the \
                     cluster CA (muster admin cert issue --{} NAME); got {}",
                    kind.prefix(),
                    kind.prefix().trim_end_matches(':'),
                    other.map_or("none".to_string(), |cn| format!("CN {cn}"))
                ))),
            };
        }
        let uid = PeerInfo::of(req).and_then(|p| p.uid);
        match uid {
            Some(u) if u == 0 || u == self.own_uid => Ok(format!("{}uid-{u}", kind.prefix())),
            Some(u) if self.insecure => Err(Status::permission_denied(format!(
                "permission denied: uid {u} of this host is a user, not a daemon; only root or \
                 the scheduler's user may connect here"
            ))),
            None if self.insecure => Ok(format!("{}insecure", kind.prefix())),
            _ => Err(Status::permission_denied(
                "permission denied: without TLS only a local daemon running as root or as \
                 the scheduler's user may connect here (configure [tls], or insecure = true)",
            )),
        }
    }

    /// Take a token from `task`'s checkpoint-report bucket; when empty, how
    /// long until one is back.
    pub fn checkpoint_limit(&self, task: &str) -> Result<(), Duration> {
        let mut l = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        l.take(task, Instant::now())
    }

    /// Take a write token for `who` (every request that changes state costs
    /// one), or a `ResourceExhausted` that says when to retry. Cluster admins
    /// (operators' own tooling) are not limited.
    pub fn rate_limit(&self, who: &Principal) -> Result<(), Status> {
        if who.cluster_admin {
            return Ok(());
        }
        let mut l = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        l.take(&who.name, std::time::Instant::now())
            .map_err(|wait| Status::resource_exhausted(l.message(&who.name, wait)))
    }

    /// Queue an entry for the audit trail (dropped, with a warning, if the
    /// queue is full). A refusal beyond its source's share of the window is
    /// only counted, for the window's summary.
    pub fn audit(&self, e: AuditEntry) {
        let e = if crate::state::is_change(&e) {
            e
        } else {
            match self.count_refusal(e, Instant::now()) {
                Some(e) => e,
                None => return,
            }
        };
        self.enqueue(e);
    }

    fn enqueue(&self, e: AuditEntry) {
        if let Err(e) = self.audit_tx.try_send(e) {
            tracing::warn!(entry = ?e, "audit queue full; entry only logged here");
        }
    }

    /// The refusal, if it is to be written one by one; else counted.
    fn count_refusal(&self, e: AuditEntry, now: Instant) -> Option<AuditEntry> {
        self.roll_refusals(now);
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (source_ip(&e.from), e.who.clone());
        if r.by_source.len() >= REFUSAL_SOURCES && !r.by_source.contains_key(&key) {
            key = ("*".to_string(), "*".to_string());
        }
        let under_total = r.total < REFUSALS_PER_WINDOW;
        let src = r.by_source.entry(key).or_insert(SourceRefusals {
            written: 0,
            suppressed: 0,
            last: None,
        });
        if src.written < REFUSALS_PER_SOURCE && under_total {
            src.written += 1;
            r.total += 1;
            return Some(e);
        }
        src.suppressed += 1;
        tracing::debug!(entry = ?e, "refusal counted, not written one by one");
        src.last = Some(e);
        None
    }

    /// End the refusal window if it is over: queue one summary per source
    /// whose refusals were only counted. [`audit_loop`] calls this on a tick.
    pub fn roll_refusals(&self, now: Instant) {
        let ended = {
            let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            if now.saturating_duration_since(r.since) < REFUSAL_WINDOW {
                return;
            }
            r.since = now;
            r.total = 0;
            std::mem::take(&mut r.by_source)
        };
        for ((ip, who), src) in ended {
            let Some(last) = src.last.filter(|_| src.suppressed > 0) else {
                continue;
            };
            let kind = last.outcome.split(':').next().unwrap_or("denied");
            self.enqueue(AuditEntry {
                at_ms: crate::api::now_ms(),
                who,
                via: last.via.clone(),
                from: ip.clone(),
                action: "refusals".into(),
                target: last.action.clone(),
                outcome: format!(
                    "{kind}: {} more refused request(s) from {ip} in the last {}s, counted \
                     here rather than one by one (last: {} {}: {})",
                    src.suppressed,
                    REFUSAL_WINDOW.as_secs(),
                    last.action,
                    last.target,
                    last.outcome
                ),
            });
        }
    }

    /// The queue's receiving end (once, for [`audit_loop`]).
    pub fn take_audit_queue(&self) -> Option<mpsc::Receiver<AuditEntry>> {
        self.audit_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

/// The common name of the caller's TLS certificate.
fn peer_cn<T>(req: &Request<T>) -> Option<String> {
    let certs = PeerInfo::peer_certs(req).or_else(|| req.peer_certs())?;
    muster_proto::tls::common_name(certs.first()?.as_ref())
}

/// The address part of a caller's `ip:port` (every connection of one host
/// is one source).
fn source_ip(from: &str) -> String {
    from.parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| from.to_string())
}

/// The caller's address, for the audit trail.
pub fn remote_of<T>(req: &Request<T>) -> String {
    PeerInfo::of(req)
        .and_then(|p| p.remote)
        .or_else(|| req.remote_addr())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// Write queued audit entries through Raft in batches until `stop`.
pub async fn audit_loop(
    ctx: std::sync::Arc<crate::api::Ctx>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(mut rx) = ctx.auth.take_audit_queue() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let first = tokio::select! {
            e = rx.recv() => match e { Some(e) => e, None => return },
            _ = tick.tick() => {
                ctx.auth.roll_refusals(Instant::now());
                continue;
            }
            _ = stop.changed() => return,
        };
        let mut entries = vec![first];
        while entries.len() < AUDIT_BATCH {
            match rx.try_recv() {
                Ok(e) => entries.push(e),
                Err(_) => break,
            }
        }
        let cmd = crate::state::Command::Audit { entries };
        // Through an election, keep trying for a while; then give up (logged).
        for attempt in 1..=AUDIT_RETRIES {
            match ctx.raft.propose(cmd.clone()).await {
                Ok(_) => break,
                Err(e) if attempt == AUDIT_RETRIES || *stop.borrow() => {
                    tracing::warn!(error = %e, ?cmd, "could not write audit entries");
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
            }
        }
    }
}

/// Unix milliseconds as RFC 3339 (UTC, seconds).
pub fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TokenRecord;

    fn auth() -> Auth {
        let cfg = crate::config::SchedulerConfig {
            cluster_admins: vec!["alice".into()],
            ..Default::default()
        };
        Auth::new(&cfg)
    }

    fn with_token(t: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
        r
    }

    #[test]
    fn a_token_names_the_principal_and_configured_admins_are_admins() {
        let (id, t) = token::generate().unwrap();
        let mut s = State::new();
        s.tokens.insert(
            id.clone(),
            TokenRecord {
                id: id.clone(),
                user: "alice".into(),
                hash: token::hash(&t),
                created_at_ms: 0,
                expires_at_ms: None,
                revoked: false,
                created_by: "root".into(),
            },
        );
        let a = auth();
        let p = a.authenticate(&s, &with_token(&t), "x").unwrap();
        assert_eq!((p.name.as_str(), p.cluster_admin), ("alice", true));
        assert_eq!(p.via, format!("token {id}"));
        // The user field of a request plays no part; a bad token is an error,
        // not a fall-back to another identity.
        let e = a
            .authenticate(&s, &with_token("mst_bogus"), "x")
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // No credentials at all (no socket to look up either).
        let e = a.authenticate(&s, &Request::new(()), "x").unwrap_err();
        assert!(e.message().starts_with("no credentials"), "{}", e.message());
        // Both refusals were queued for the audit trail.
        let mut rx = a.take_audit_queue().unwrap();
        let first = rx.try_recv().unwrap();
        assert_eq!(first.who, "?");
        assert!(first.outcome.starts_with("unauthenticated: invalid token"));
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn the_rate_limit_spares_cluster_admins() {
        let a = Auth::new(&crate::config::SchedulerConfig {
            limits: crate::config::LimitsConfig {
                submits_per_second: 0.001,
                submit_burst: 1,
                ..Default::default()
            },
            ..Default::default()
        });
        let p = |name: &str, admin: bool| Principal {
            name: name.into(),
            cluster_admin: admin,
            via: String::new(),
            from: String::new(),
        };
        assert!(a.rate_limit(&p("bob", false)).is_ok());
        let e = a.rate_limit(&p("bob", false)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().starts_with("rate limit: bob"),
            "{}",
            e.message()
        );
        for _ in 0..5 {
            assert!(a.rate_limit(&p("root", true)).is_ok());
        }
    }

    #[test]
    fn daemons_need_a_local_socket_or_insecure_without_tls() {
        let a = auth();
        let e = a.daemon(&Request::new(()), Daemon::Agent).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let insecure = Auth::new(&crate::config::SchedulerConfig {
            insecure: true,
            ..Default::default()
        });
        assert!(insecure.daemon(&Request::new(()), Daemon::Node).is_ok());
        // A local user the kernel names is never a daemon, insecure or not.
        let user = from_uid(4242, Request::new(()));
        for a in [&a, &insecure] {
            let e = a.daemon(&user, Daemon::Node).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
        }
        assert!(insecure
            .daemon(&from_uid(0, Request::new(())), Daemon::Agent)
            .is_ok());
    }

    fn entry(from: &str, outcome: &str) -> AuditEntry {
        AuditEntry {
            at_ms: 1,
            who: "?".into(),
            via: "none".into(),
            from: from.into(),
            action: "whoami".into(),
            target: String::new(),
            outcome: outcome.into(),
        }
    }

    /// Issue 18 #7: anyone could roll the audit trail with bad requests.
    #[test]
    fn refusals_are_counted_past_a_share_per_source() {
        let a = auth();
        let mut rx = a.take_audit_queue().unwrap();
        let t0 = Instant::now();
        for port in 0..100 {
            let from = format!("10.0.0.1:{}", 1000 + port);
            if let Some(e) = a.count_refusal(entry(&from, "unauthenticated: bad"), t0) {
                a.enqueue(e);
            }
        }
        // Another source, and applied changes, are not held back.
        a.audit(entry("10.0.0.2:5", "denied: no"));
        for _ in 0..30 {
            a.audit(entry("10.0.0.1:1", "applied"));
        }
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(e);
        }
        let from_1 = |o: &str| {
            got.iter()
                .filter(|e| e.from.starts_with("10.0.0.1") && e.outcome.starts_with(o))
                .count()
        };
        assert_eq!(from_1("unauthenticated"), REFUSALS_PER_SOURCE as usize);
        assert_eq!(from_1("applied"), 30);
        assert!(got.iter().any(|e| e.from == "10.0.0.2:5"));
        // The window ends: one summary for what was only counted.
        a.roll_refusals(t0 + REFUSAL_WINDOW);
        let summary = rx.try_recv().unwrap();
        assert_eq!(
            (summary.from.as_str(), summary.action.as_str()),
            ("10.0.0.1", "refusals")
        );
        assert!(
            summary
                .outcome
                .starts_with("unauthenticated: 80 more refused request(s) from 10.0.0.1"),
            "{}",
            summary.outcome
        );
        assert!(rx.try_recv().is_err(), "one summary, for the one source");
        // A new window: written one by one again.
        let e = a.count_refusal(entry("10.0.0.1:9", "denied: x"), t0 + REFUSAL_WINDOW);
        assert!(e.is_some());
    }

    fn from_uid<T>(uid: u32, mut r: Request<T>) -> Request<T> {
        r.extensions_mut().insert(PeerInfo {
            remote: Some("127.0.0.1:40000".parse().unwrap()),
            local: Some("127.0.0.1:7470".parse().unwrap()),
            uid: Some(uid),
        });
        r
    }

    fn on_behalf_of(user: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert(muster_proto::headers::ON_BEHALF_OF, user.parse().unwrap());
        r.metadata_mut()
            .insert(muster_proto::headers::PEER_UID, "1000".parse().unwrap());
        r
    }

    /// Issue 18 #4: `insecure = true` once made anyone a daemon, and a
    /// daemon's on-behalf-of header was believed: any caller became anyone.
    #[test]
    fn only_a_proven_agent_speaks_for_a_user() {
        let s = State::new();
        for insecure in [false, true] {
            let a = Auth::new(&crate::config::SchedulerConfig {
                insecure,
                cluster_admins: vec!["alice".into()],
                ..Default::default()
            });
            // Unknown caller (another host, or no socket at all).
            let e = a.authenticate(&s, &on_behalf_of("alice"), "x").unwrap_err();
            assert_eq!(
                e.code(),
                tonic::Code::Unauthenticated,
                "insecure {insecure}"
            );
            assert!(
                e.message().contains("only an agent may speak"),
                "{}",
                e.message()
            );
            // A local unprivileged user claiming to be an agent.
            let e = a
                .authenticate(&s, &from_uid(4242, on_behalf_of("alice")), "x")
                .unwrap_err();
            assert!(e.message().contains("uid 4242"), "{}", e.message());
            // Root's agent on this host vouches for its user.
            let p = a
                .authenticate(&s, &from_uid(0, on_behalf_of("alice")), "x")
                .unwrap();
            assert_eq!((p.name.as_str(), p.cluster_admin), ("alice", true));
            assert_eq!(p.via, "agent:uid-0 socket uid 1000");
        }
    }
}
