//! The role rules as a table: who, what, allowed or the right it lacks.

use super::*;
use crate::model::{JobId, JobSpec, Resources, Tenant};
use crate::state::{ApplyResult, AuditEntry, TenantPatch};

fn ap(s: &mut State, w: &Principal, at_ms: i64, cmd: &Command) -> ApplyResult {
    s.apply(&Command::Authorized {
        who: w.clone(),
        at_ms,
        cmd: Box::new(cmd.clone()),
    })
}

fn who(name: &str, admin: bool) -> Principal {
    Principal {
        name: name.into(),
        cluster_admin: admin,
        via: "test".into(),
        from: "127.0.0.1:1".into(),
    }
}

fn spec(tenant: &str) -> JobSpec {
    JobSpec {
        name: "j".into(),
        tenant: tenant.into(),
        tasks: 1,
        per_task: Resources {
            gpus: 0,
            cpu_millis: 1000,
            memory_bytes: 1 << 20,
        },
        time_limit_secs: None,
        command: vec!["true".into()],
        env: Default::default(),
        workdir: String::new(),
        checkpoint_dir: None,
        priority: String::new(),
        topology: None,
        lifecycle: Default::default(),
    }
}

/// ml (admin: ann), ml/nlp (admin: nora, members alice), ml/cv (members bob);
/// job 1 is alice's in ml/nlp.
fn state() -> State {
    let mut s = State::new();
    let root = who("root", true);
    for (name, members) in [
        ("ml", vec![]),
        ("ml/nlp", vec!["alice"]),
        ("ml/cv", vec!["bob"]),
    ] {
        let mut t = Tenant::open(name);
        t.members = members.into_iter().map(String::from).collect();
        let create = Command::CreateTenant {
            tenant: Box::new(t),
            default_for: vec![],
        };
        assert_eq!(ap(&mut s, &root, 0, &create), ApplyResult::Applied);
    }
    for (t, a) in [("ml", "ann"), ("ml/nlp", "nora")] {
        let set = Command::SetTenantAdmins {
            tenant: t.into(),
            add: vec![a.into()],
            remove: vec![],
        };
        assert_eq!(ap(&mut s, &root, 0, &set), ApplyResult::Applied);
    }
    let submit = Command::Submit {
        spec: spec("ml/nlp"),
        user: "alice".into(),
        at_ms: 0,
        request_id: None,
    };
    assert_eq!(
        ap(&mut s, &who("alice", false), 0, &submit),
        ApplyResult::Submitted(JobId(1))
    );
    s
}

fn quota(name: &str) -> Command {
    Command::UpdateTenant {
        name: name.into(),
        patch: Box::new(TenantPatch {
            gpu_limit: Some(Some(8)),
            ..Default::default()
        }),
    }
}

fn members(name: &str) -> Command {
    Command::UpdateTenant {
        name: name.into(),
        patch: Box::new(TenantPatch {
            add_members: vec!["carol".into()],
            ..Default::default()
        }),
    }
}

fn cancel(id: u64) -> Command {
    Command::Cancel {
        job: JobId(id),
        at_ms: 0,
    }
}

fn submit(user: &str, tenant: &str) -> Command {
    Command::Submit {
        spec: spec(tenant),
        user: user.into(),
        at_ms: 0,
        request_id: None,
    }
}

#[test]
fn the_role_table() {
    let s = state();
    let new_child = |n: &str| Command::CreateTenant {
        tenant: Box::new(Tenant::open(n)),
        default_for: vec![],
    };
    // (who, cluster admin, command, None = allowed / Some(part of the denial))
    let table: Vec<(&str, bool, Command, Option<&str>)> = vec![
        ("root", true, quota("ml"), None),
        ("alice", false, submit("alice", "ml/nlp"), None),
        (
            "alice",
            false,
            submit("alice", "ml/cv"),
            Some("needs membership of ml/cv"),
        ),
        (
            "alice",
            false,
            submit("bob", "ml/nlp"),
            Some("may not submit as bob"),
        ),
        ("alice", false, cancel(1), None),
        (
            "bob",
            false,
            cancel(1),
            Some("may not cancel job 1 of alice"),
        ),
        (
            "alice",
            false,
            quota("ml/nlp"),
            Some("needs tenant-admin on ml or an ancestor"),
        ),
        ("alice", false, quota("ml"), Some("needs cluster-admin")),
        ("nora", false, cancel(1), None),
        ("nora", false, members("ml/nlp"), None),
        (
            "nora",
            false,
            quota("ml/nlp"),
            Some("may not change the quota of tenant ml/nlp"),
        ),
        (
            "nora",
            false,
            members("ml/cv"),
            Some("may not change the members of tenant ml/cv"),
        ),
        (
            "nora",
            false,
            quota("ml/cv"),
            Some("needs tenant-admin on ml"),
        ),
        ("nora", false, new_child("ml/nlp/x"), None),
        (
            "nora",
            false,
            new_child("ml/cv/x"),
            Some("may not create tenant ml/cv/x"),
        ),
        ("ann", false, quota("ml/nlp"), None),
        ("ann", false, quota("ml/cv"), None),
        ("ann", false, quota("ml"), Some("needs cluster-admin")),
        ("ann", false, cancel(1), None),
        ("ann", false, new_child("bio"), Some("needs cluster-admin")),
        (
            "ann",
            false,
            Command::RevokeToken { id: "x".into() },
            Some("is not a cluster admin"),
        ),
        (
            "ann",
            false,
            Command::DrainNode {
                name: "gpu1".into(),
                reason: Some("x".into()),
            },
            Some("is not a cluster admin"),
        ),
        (
            "root",
            true,
            Command::DrainNode {
                name: "gpu1".into(),
                reason: None,
            },
            None,
        ),
    ];
    for (name, admin, cmd, expect) in table {
        let got = check(&s, &who(name, admin), &cmd);
        match expect {
            None => assert!(got.is_ok(), "{name} {cmd:?}: {got:?}"),
            Some(needle) => {
                let e = got.expect_err(&format!("{name} {cmd:?} should be denied"));
                assert!(e.starts_with("permission denied: "), "{e}");
                assert!(e.contains(needle), "{name}: {e}");
            }
        }
    }
}

#[test]
fn apply_checks_again_and_audits_every_outcome() {
    let mut s = state();
    let before = s.audit.len();
    let r = ap(&mut s, &who("bob", false), 5, &cancel(1));
    assert!(
        matches!(&r, ApplyResult::Denied(m) if m.contains("of alice")),
        "{r:?}"
    );
    assert_eq!(s.jobs[&JobId(1)].state, crate::model::JobState::Pending);
    let r = ap(&mut s, &who("alice", false), 6, &cancel(1));
    assert_eq!(r, ApplyResult::Applied);
    let r = ap(&mut s, &who("alice", false), 7, &cancel(99));
    assert!(matches!(r, ApplyResult::NotFound(_)));
    let tail: Vec<&AuditEntry> = s.audit.iter().skip(before).collect();
    assert_eq!(tail.len(), 3);
    assert_eq!(
        (tail[0].who.as_str(), tail[0].action.as_str()),
        ("bob", "cancel")
    );
    assert!(tail[0].outcome.starts_with("denied: "), "{:?}", tail[0]);
    assert_eq!(tail[1].outcome, "applied");
    assert!(tail[2].outcome.starts_with("rejected: "));
    assert_eq!(tail[1].at_ms, 6);
    // Deleting a tenant forgets its admins.
    let del = Command::DeleteTenant {
        name: "ml/nlp".into(),
    };
    assert_eq!(
        ap(&mut s, &who("ann", false), 8, &del),
        ApplyResult::Applied
    );
    assert!(s.admins("ml/nlp").is_empty());
}

#[test]
fn user_names_are_checked() {
    assert!(check_user_name("alice").is_ok());
    assert!(check_user_name("").is_err());
    assert!(check_user_name("a b").is_err());
    assert!(check_user_name(&"x".repeat(MAX_USER_LEN + 1)).is_err());
}

fn default_for(tenant: &str, users: &[&str]) -> Command {
    Command::UpdateTenant {
        name: tenant.into(),
        patch: Box::new(TenantPatch {
            default_for: users.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        }),
    }
}

/// A tenant admin may not decide where another user's jobs go (issue 18
/// #5): only the user or a cluster admin sets a default, and only to a
/// tenant the user may submit to. Checked here and again at apply.
#[test]
fn only_the_user_or_a_cluster_admin_sets_a_default_tenant() {
    let mut s = state();
    // nora administers ml/nlp; alice is a member there. ann administers ml
    // (open: no member list); bob is a member of ml/cv only.
    let capture = [
        (
            "nora",
            default_for("ml/nlp", &["alice"]),
            "default tenant of alice",
        ),
        ("ann", default_for("ml", &["bob"]), "default tenant of bob"),
        (
            "ann",
            Command::CreateTenant {
                tenant: Box::new(Tenant::open("ml/trap")),
                default_for: vec!["alice".into()],
            },
            "default tenant of alice",
        ),
        // Adding the victim as a member in the same request changes nothing.
        (
            "nora",
            Command::UpdateTenant {
                name: "ml/nlp".into(),
                patch: Box::new(TenantPatch {
                    add_members: vec!["bob".into()],
                    default_for: vec!["bob".into()],
                    ..Default::default()
                }),
            },
            "default tenant of bob",
        ),
        // The user themselves, but not to a tenant they are no member of.
        (
            "alice",
            default_for("ml/cv", &["alice"]),
            "not a member of ml/cv",
        ),
    ];
    for (name, cmd, needle) in capture {
        let e = check(&s, &who(name, false), &cmd).expect_err(needle);
        assert!(e.contains(needle), "{name}: {e}");
        let before = s.user_defaults.clone();
        let r = ap(&mut s, &who(name, false), 1, &cmd);
        assert!(
            matches!(&r, ApplyResult::Denied(m) if m.contains(needle)),
            "{r:?}"
        );
        assert_eq!(s.user_defaults, before, "{name}: {cmd:?}");
    }
    // Alice picks her own default (no tenant right needed), to a tenant she
    // is a member of or to an open one; a cluster admin picks anyone's.
    let alice = who("alice", false);
    assert_eq!(
        ap(&mut s, &alice, 2, &default_for("ml/nlp", &["alice"])),
        ApplyResult::Applied
    );
    assert_eq!(s.user_defaults["alice"], "ml/nlp");
    assert_eq!(
        ap(&mut s, &alice, 3, &default_for("ml", &["alice"])),
        ApplyResult::Applied
    );
    assert_eq!(s.user_defaults["alice"], "ml");
    let root = who("root", true);
    assert_eq!(
        ap(&mut s, &root, 4, &default_for("ml/cv", &["bob"])),
        ApplyResult::Applied
    );
    assert_eq!(s.user_defaults["bob"], "ml/cv");
    // Even a cluster admin cannot point a default at a closed tenant.
    let r = ap(&mut s, &root, 5, &default_for("ml/cv", &["alice"]));
    assert!(
        matches!(&r, ApplyResult::Denied(m) if m.contains("not a member")),
        "{r:?}"
    );
}

/// Issue 18 #7: refusals (which anyone can cause) never push applied
/// changes out of the bounded trail.
#[test]
fn refusals_never_push_changes_out_of_the_audit_trail() {
    let mut s = state();
    let changes: Vec<AuditEntry> = s.audit.iter().cloned().collect();
    assert!(!changes.is_empty() && changes.iter().all(crate::state::is_change));
    let refusal = |i: usize| AuditEntry {
        at_ms: i as i64,
        who: "?".into(),
        via: "none".into(),
        from: "10.0.0.9:1".into(),
        action: "whoami".into(),
        target: String::new(),
        outcome: format!("unauthenticated: bad token {i}"),
    };
    let total = crate::state::MAX_AUDIT + 1000;
    for batch in (0..total).collect::<Vec<_>>().chunks(4096) {
        let entries = batch.iter().map(|i| refusal(*i)).collect();
        assert_eq!(s.apply(&Command::Audit { entries }), ApplyResult::Applied);
    }
    assert_eq!(s.audit.len(), crate::state::MAX_AUDIT);
    let kept: Vec<&AuditEntry> = s.audit.iter().take(changes.len()).collect();
    assert_eq!(kept, changes.iter().collect::<Vec<_>>());
    // The newest refusals are the ones kept.
    assert_eq!(s.audit.back(), Some(&refusal(total - 1)));
    // Changes age out only as newer entries come: the oldest goes first.
    let r = ap(&mut s, &who("alice", false), 9, &cancel(1));
    assert_eq!(r, ApplyResult::Applied);
    assert_eq!(s.audit.len(), crate::state::MAX_AUDIT);
    assert_eq!(s.audit.front(), changes.get(1));
    assert_eq!(s.audit.back().map(|e| e.action.as_str()), Some("cancel"));
}

/// Issue 12: a tenant with members takes jobs only from them, cluster
/// admins included (README, roles table): jobs are charged to a tenant on
/// behalf of its members. An admin who needs to run there adds itself, and
/// that change is audited; the refusal says how.
#[test]
fn cluster_admins_join_a_tenant_with_members_to_submit_there() {
    let mut s = state();
    let denied = check(&s, &who("root", true), &submit("root", "ml/cv"));
    assert!(
        denied
            .as_ref()
            .is_err_and(|e| e.contains("needs membership of ml/cv")),
        "{denied:?}"
    );
    let join = Command::UpdateTenant {
        name: "ml/cv".into(),
        patch: Box::new(TenantPatch {
            add_members: vec!["root".into()],
            ..Default::default()
        }),
    };
    assert_eq!(
        ap(&mut s, &who("root", true), 0, &join),
        ApplyResult::Applied
    );
    assert!(matches!(
        ap(&mut s, &who("root", true), 0, &submit("root", "ml/cv")),
        ApplyResult::Submitted(_)
    ));
}
