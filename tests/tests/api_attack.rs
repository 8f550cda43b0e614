//! Attacks on the scheduler's API doors (issue 18), each through real
//! daemons: a local unprivileged user claiming to be an agent speaking for
//! someone else on an `insecure` cluster, a tenant admin capturing another
//! user's jobs with a default tenant, a rogue agent reporting another node's
//! tasks, control characters meant for other users' terminals, write floods
//! (every write, and checkpoint reports from inside a task), and the
//! scheduler's data folder on the host.
//!
//! Tests that act as a real unprivileged user create one (`muster-attack`)
//! and need root, as CI runs them; elsewhere they say so and skip.

// tonic's calls answer `Result<_, Status>`; the attacker maps them as they come.
#![allow(clippy::result_large_err)]

use muster_proto as pb;
use muster_tests::{
    audit_is, binary, ensure_user, is_root, run_as, wait_for, Cluster, ClusterSpec,
};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The unprivileged local user the attacks run as.
const ATTACKER: &str = "muster-attack";

fn ok_as(c: &Cluster, tok: &Path, args: &[&str]) -> String {
    let out = c.muster_with_token(tok, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command fails, saying every needle.
fn fails(out: std::process::Output, what: &str, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} should fail");
    for n in needles {
        assert!(err.contains(n), "{what}: expected {n:?} in: {err}");
    }
}

fn skip_unless_root(what: &str) -> bool {
    if !is_root() {
        eprintln!("skipping: {what} needs root (CI runs as root)");
    }
    !is_root()
}

// ---------------------------------------------------------------------------
// #4: insecure = true let anyone act as anyone.

/// Not a test of its own: the attacker, this test binary run again as
/// [`ATTACKER`] by [`insecure_does_not_let_a_local_user_act_as_anyone`].
/// Prints one `RESULT name outcome` line per attempt.
#[test]
#[ignore = "run as an unprivileged user by another test"]
fn attacker_as_an_unprivileged_user() {
    let Ok(addr) = std::env::var("MUSTER_ATTACK_ADDR") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let outcome = |r: Result<String, tonic::Status>| match r {
            Ok(s) => format!("ok {s}"),
            Err(s) => format!("err {:?} {}", s.code(), s.message().replace('\n', " ")),
        };
        let channel = tonic::transport::Endpoint::from_shared(addr.clone())
            .expect("address")
            .connect()
            .await
            .expect("connect");
        let mut sec = pb::security_client::SecurityClient::new(channel.clone());
        let plain = sec.who_am_i(pb::WhoAmIRequest {}).await;
        let who = |r: Result<tonic::Response<pb::WhoAmIResponse>, tonic::Status>| {
            r.map(|w| {
                let w = w.into_inner();
                format!("{} admin={}", w.user, w.cluster_admin)
            })
        };
        println!("RESULT whoami {}", outcome(who(plain)));
        let claimed = sec
            .who_am_i(as_alice(tonic::Request::new(pb::WhoAmIRequest {})))
            .await;
        println!("RESULT whoami-as-alice {}", outcome(who(claimed)));
        let issue = sec
            .issue_token(as_alice(tonic::Request::new(pb::IssueTokenRequest {
                user: "alice".into(),
                expires_in_secs: 0,
            })))
            .await
            .map(|t| t.into_inner().user);
        println!("RESULT token-as-alice {}", outcome(issue));
        // Claiming to be an agent outright: register a node.
        let mut agent = pb::agent_api_client::AgentApiClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let register = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Register(pb::Register {
                node: "attacker-node".into(),
                address: "127.0.0.1:1".into(),
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                log_key: vec![7; 32],
                ..Default::default()
            })),
        };
        tx.send(register).await.expect("queue");
        let stream = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
        let session = agent.session(stream).await.map(|_| "session".to_string());
        println!("RESULT agent-session {}", outcome(session));
        drop(tx);
    });
}

/// `r` claiming to come from an agent speaking for alice (a cluster admin).
fn as_alice<T>(mut r: tonic::Request<T>) -> tonic::Request<T> {
    let md = r.metadata_mut();
    md.insert(pb::headers::ON_BEHALF_OF, "alice".parse().expect("ascii"));
    md.insert(pb::headers::PEER_UID, "0".parse().expect("ascii"));
    r
}

/// The attacker's results, by name.
fn attack(addr: &str) -> std::collections::BTreeMap<String, String> {
    let exe = std::env::current_exe().expect("test binary");
    let out = run_as(
        ATTACKER,
        &exe,
        &[
            "--exact",
            "attacker_as_an_unprivileged_user",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ],
        &[("MUSTER_ATTACK_ADDR", addr)],
    )
    .expect("run the attacker");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "attacker: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        // The harness may print its "test ... " on the same line.
        .filter_map(|l| l.find("RESULT ").map(|at| &l[at + "RESULT ".len()..]))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn insecure_does_not_let_a_local_user_act_as_anyone() {
    if skip_unless_root("acting as a second local user") {
        return;
    }
    ensure_user(ATTACKER).expect("user");
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        scheduler_toml: "insecure = true\ncluster_admins = [\"alice\"]\n",
        agent_toml: "user_socket = \"{dir}/agent-{i}.sock\"\n",
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let results = attack(&c.sched_addrs[0]);
    let get = |k: &str| results.get(k).cloned().unwrap_or_default();
    // The kernel says who the caller is; the cluster being insecure does not
    // change that.
    assert_eq!(
        get("whoami"),
        format!("ok {ATTACKER} admin=false"),
        "{results:?}"
    );
    for k in ["whoami-as-alice", "token-as-alice"] {
        let r = get(k);
        assert!(
            r.starts_with("err Unauthenticated") && r.contains("only an agent may speak"),
            "{k}: {r}"
        );
    }
    let r = get("agent-session");
    assert!(
        r.starts_with("err PermissionDenied") && r.contains("not a daemon"),
        "agent-session: {r}"
    );
    let nodes = c.json(&["nodes"]).expect("nodes");
    assert!(!nodes.to_string().contains("attacker-node"), "{nodes}");
    let tokens = c.json(&["admin", "token", "list"]).expect("tokens");
    assert!(!tokens.to_string().contains("alice"), "{tokens}");
    c.audited(T, "the refused claim", |e| {
        e["who"] == "?"
            && e["outcome"]
                .as_str()
                .is_some_and(|o| o.contains("only an agent may speak"))
    });
    // The real agent (root on this host) still speaks for its local users.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = c.path("agent-0.sock");
    wait_for("the user socket", T, || sock.exists().then_some(())).unwrap();
    let addr = format!("unix:{}", sock.display());
    let out = run_as(
        ATTACKER,
        &binary("muster"),
        &["--addr", &addr, "--json", "whoami"],
        &[],
    )
    .expect("whoami through the socket");
    let who: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(who["user"], ATTACKER, "{who}");
    assert_eq!(who["cluster_admin"], false);
}

// ---------------------------------------------------------------------------
// #5: a tenant admin captured other users' jobs with --default-for.

#[test]
fn a_tenant_admin_cannot_capture_another_users_jobs() {
    let c = Cluster::start(ClusterSpec {
        agents: 0,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    c.ok(&["tenant", "create", "ml", "--user", "alice"])
        .expect("ml");
    c.ok(&["tenant", "create", "evil", "--admin", "mallory"])
        .expect("evil");
    let mallory = c.issue_token("mallory").expect("token").0;
    let alice = c.issue_token("alice").expect("token").0;
    fails(
        c.muster_with_token(
            &mallory,
            &["tenant", "set", "evil", "--default-for", "alice"],
        ),
        "mallory sets alice's default",
        &["permission denied", "default tenant of alice"],
    );
    fails(
        c.muster_with_token(
            &mallory,
            &["tenant", "create", "evil/trap", "--default-for", "alice"],
        ),
        "mallory makes a trap for alice",
        &["permission denied", "default tenant of alice"],
    );
    // Alice's next job does not land in mallory's tenant.
    let job: Value =
        serde_json::from_str(&ok_as(&c, &alice, &["--json", "submit", "--", "true"])).unwrap();
    let id = job["id"].as_u64().expect("id").to_string();
    let shown: Value = serde_json::from_str(&ok_as(&c, &alice, &["--json", "show", &id])).unwrap();
    assert_ne!(shown["spec"]["tenant"], "evil", "{shown}");
    // Alice picks her own default, to a tenant she belongs to, without
    // being its admin; not to one she does not belong to.
    ok_as(
        &c,
        &alice,
        &["tenant", "set", "ml", "--default-for", "alice"],
    );
    let t: Value = serde_json::from_str(&ok_as(&c, &alice, &["--json", "tenant", "show", "ml"]))
        .expect("json");
    assert!(t.to_string().contains("alice"), "{t}");
    c.ok(&["tenant", "create", "closed", "--user", "bob"])
        .expect("closed");
    fails(
        c.muster_with_token(
            &alice,
            &["tenant", "set", "closed", "--default-for", "alice"],
        ),
        "alice defaults to a tenant she is not in",
        &["not a member of closed"],
    );
    c.audited(T, "mallory's attempt", |e| {
        audit_is(e, "mallory", "tenant-update", "denied")
    });
}

// ---------------------------------------------------------------------------
// #9: an agent reported events for another node's tasks.

/// A session as an agent of node `name` (the test runs as root on the
/// scheduler's host, which is how a local agent is let in without TLS).
async fn rogue_session(addr: &str, name: &str) -> tokio::sync::mpsc::Sender<pb::AgentMessage> {
    let mut agent = pb::agent_api_client::AgentApiClient::connect(addr.to_string())
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let register = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Register(pb::Register {
            node: name.into(),
            address: "127.0.0.1:1".into(),
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
            log_key: vec![7; 32],
            ..Default::default()
        })),
    };
    tx.send(register).await.expect("queue");
    let stream = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut answers = agent.session(stream).await.expect("session").into_inner();
    // Keep reading what the scheduler sends, so the session stays open.
    tokio::spawn(async move { while let Ok(Some(_)) = answers.message().await {} });
    tx
}

#[test]
fn an_agent_reports_only_its_own_nodes_tasks() {
    if skip_unless_root("joining as a local agent") {
        return;
    }
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let id = c.submit(&["--", "sleep", "600"]).expect("submit");
    c.wait_state(id, "running", T).expect("running");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr = c.sched_addrs[0].clone();
    let tx = rt.block_on(rogue_session(&addr, "rogue"));
    rt.block_on(async {
        // The victim's allocation id is not shown; the first few cover it.
        for alloc in 1..=3 {
            let exited = pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Event(pb::TaskEvent {
                    job_id: id,
                    alloc_id: alloc,
                    task_index: 0,
                    kind: Some(pb::task_event::Kind::Exited(pb::TaskExited {
                        code: Some(1),
                        message: "forged".into(),
                        ..Default::default()
                    })),
                })),
            };
            tx.send(exited).await.expect("send");
        }
    });
    let e = c.audited(T, "the forged event", |e| {
        audit_is(e, "agent:rogue", "task-event", "denied")
    });
    assert!(
        e["target"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("job {id}")) && t.contains("node-0")),
        "{e}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let job = c.show(id).expect("show");
    assert_eq!(job["state"], "running", "{job}");
    drop(tx);
    c.ok(&["cancel", &id.to_string()]).expect("cancel");
}

// ---------------------------------------------------------------------------
// #11: control characters for other users' terminals.

#[test]
fn control_characters_are_refused_naming_the_field() {
    let c = Cluster::start(ClusterSpec {
        agents: 0,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let title = "x\u{1b}]0;owned\u{7}";
    fails(
        c.muster(&["submit", "--name", title, "--", "true"])
            .unwrap(),
        "a job name with an escape",
        &["name: contains the control character"],
    );
    fails(
        c.muster(&["submit", "--tenant", "ml\r", "--", "true"])
            .unwrap(),
        "a tenant with a carriage return",
        &["tenant: contains the control character"],
    );
    fails(
        c.muster(&["tenant", "create", "ml\u{1b}[2J"]).unwrap(),
        "a tenant name with an escape",
        &["name: contains the control character"],
    );
    fails(
        c.muster(&["node", "drain", "node-0", "--reason", "x\u{1b}[2J"])
            .unwrap(),
        "a drain reason with an escape",
        &["reason: contains the control character"],
    );
    let queue = c.ok(&["queue", "--all"]).expect("queue");
    assert!(!queue.contains('\u{1b}'), "{queue:?}");
}

// ---------------------------------------------------------------------------
// #8: every write is rate-limited, checkpoint reports per task.

#[test]
fn every_write_is_rate_limited() {
    let c = Cluster::start(ClusterSpec {
        agents: 0,
        scheduler_toml: "[limits]\nsubmits_per_second = 0.01\nsubmit_burst = 2\n",
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let alice = c.issue_token("alice").expect("token").0;
    let job: Value =
        serde_json::from_str(&ok_as(&c, &alice, &["--json", "submit", "--", "true"])).unwrap();
    let id = job["id"].as_u64().expect("id").to_string();
    ok_as(&c, &alice, &["cancel", &id]);
    fails(
        c.muster_with_token(&alice, &["cancel", &id]),
        "a third write",
        &["rate limit: alice"],
    );
    c.audited(T, "the refused cancel", |e| {
        audit_is(e, "alice", "cancel", "rejected: rate limit")
    });
    // Tenant writes too, and one request costs one token.
    c.ok(&["tenant", "create", "t", "--admin", "nora"])
        .expect("t");
    let nora = c.issue_token("nora").expect("token").0;
    ok_as(&c, &nora, &["tenant", "create", "t/x", "--admin", "b"]);
    ok_as(&c, &nora, &["tenant", "set", "t", "--add-user", "c"]);
    fails(
        c.muster_with_token(&nora, &["tenant", "set", "t", "--add-user", "d"]),
        "a third tenant write",
        &["rate limit: nora"],
    );
    // Cluster admins (root here) are not limited.
    for _ in 0..3 {
        c.ok(&["tenant", "set", "t", "--weight", "2"])
            .expect("root");
    }
}

#[test]
fn checkpoint_reports_are_limited_per_task() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let bin = format!("MUSTER_BIN={}", binary("muster").display());
    // The flood from the issue: a loop of reports from inside a task.
    let id = c
        .submit(&[
            "--env",
            &bin,
            "--",
            "sh",
            "-c",
            r#"for i in $(seq 1 60); do "$MUSTER_BIN" checkpoint done --step $i; done; sleep 600"#,
        ])
        .expect("submit");
    c.wait_state(id, "running", T).expect("running");
    let log = c.path("scheduler-0.log");
    let dropped = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("come too fast")
            .count()
    };
    // 60 reports in a few seconds: at most the burst (10) and one a second
    // get through; the rest are dropped.
    wait_for("dropped checkpoint reports", T, || {
        (dropped() >= 30).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {} dropped; {}", dropped(), c.log_tail()));
    let job = c.show(id).expect("show");
    assert!(job["checkpoint"]["step"].as_u64().is_some(), "{job}");
    c.ok(&["cancel", &id.to_string()]).expect("cancel");
}

// ---------------------------------------------------------------------------
// #3 (scheduler side): the data folder held every job's environment,
// world-readable.

/// Every file and folder under `dir` with group or other permission bits.
fn not_private(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            out.push(format!("{} {mode:o}", p.display()));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                todo.push(e.path());
            }
        }
    }
    out
}

#[test]
fn the_schedulers_data_folder_is_private() {
    let mut c = Cluster::start(ClusterSpec {
        agents: 0,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let secret = "MUSTER_TEST_SECRET=hunter2";
    c.submit(&["--env", secret, "--", "true"]).expect("submit");
    let data = c.path("scheduler-0-data");
    assert_eq!(not_private(&data), Vec::<String>::new());
    // A folder left world-readable (by an older version) is made private.
    c.kill_scheduler();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(data.join("old-file"), "x").unwrap();
    std::fs::set_permissions(
        data.join("old-file"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    c.start_scheduler().expect("restart");
    assert_eq!(not_private(&data), Vec::<String>::new());
    c.submit(&["--", "true"]).expect("submit after restart");
    assert_eq!(not_private(&data), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// #7: unauthenticated requests rolled the audit trail.

#[test]
fn bad_token_floods_do_not_fill_the_audit_trail() {
    let c = Cluster::start(ClusterSpec {
        agents: 0,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    c.ok(&["tenant", "create", "victim"])
        .expect("the victim's change");
    let bogus = c.path("bogus.token");
    std::fs::write(&bogus, "mst_bogus_0000\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&bogus, std::fs::Permissions::from_mode(0o600)).unwrap();
    for _ in 0..60 {
        let out = c.muster_with_token(&bogus, &["whoami"]);
        assert!(!out.status.success());
    }
    // Wait for the refusals to be written, then count them.
    let v = c.audited(T, "a refused bad token", |e| {
        e["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("unauthenticated"))
    });
    assert_eq!(v["who"], "?");
    std::thread::sleep(Duration::from_secs(1));
    let all = c.json(&["admin", "audit"]).expect("audit");
    let entries = all["entries"].as_array().expect("entries");
    let refused = entries
        .iter()
        .filter(|e| {
            e["outcome"]
                .as_str()
                .is_some_and(|o| o.starts_with("unauthenticated"))
        })
        .count();
    assert!(
        (1..=20).contains(&refused),
        "{refused} refusals written one by one: {all:#}"
    );
    assert!(
        entries
            .iter()
            .any(|e| audit_is(e, "root", "tenant-create", "applied") && e["target"] == "victim"),
        "{all:#}"
    );
}
