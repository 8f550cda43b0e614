//! Security end to end, through real daemons and the real CLI: tokens
//! (forged, expired, revoked), roles (user, tenant admin, cluster admin),
//! the audit trail, the submission rate limit, a job running as its
//! token's user, and mutual TLS between every daemon and the CLI (an agent
//! without a valid certificate cannot register).
//!
//! The harness's CLI runs as root on the schedulers' host, so without a
//! token it is a cluster admin (identified by its socket's uid); every other
//! identity here comes from a token issued with `muster admin token issue`.

use muster_tests::{audit_is, is_root, wait_for, Cluster, ClusterSpec};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Issue a token for `user` into a new 0600 file; returns (file, token id).
fn token(c: &Cluster, user: &str, extra: &[&str]) -> (PathBuf, String) {
    let file = c.path(&format!("{user}-{}.token", extra.len()));
    let out = file.to_string_lossy().into_owned();
    let mut args = vec!["admin", "token", "issue", "--user", user, "--out", &out];
    args.extend_from_slice(extra);
    let v = c.json(&args).expect("issue token");
    (file, v["id"].as_str().expect("id").to_string())
}

fn ok_as(c: &Cluster, tok: &Path, args: &[&str]) -> String {
    let out = c.muster_with_token(tok, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command fails with one line containing every needle.
fn fails_as(c: &Cluster, tok: &Path, args: &[&str], needles: &[&str]) {
    let out = c.muster_with_token(tok, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected {n:?} in: {err}");
    }
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

fn submit_as(c: &Cluster, tok: &Path, args: &[&str]) -> u64 {
    let mut a = vec!["--json", "submit"];
    a.extend_from_slice(args);
    let v: Value = serde_json::from_str(&ok_as(c, tok, &a)).expect("json");
    v["id"].as_u64().expect("id")
}

#[test]
fn roles_tokens_and_the_audit_trail() {
    // No agent: jobs stay pending (alice and bob are not users of this host).
    let c = Cluster::start(ClusterSpec {
        agents: 0,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let who = c.json(&["whoami"]).expect("whoami");
    assert_eq!(who["user"], "root");
    assert_eq!(who["cluster_admin"], true);
    assert!(
        who["via"].as_str().unwrap().starts_with("peer uid 0"),
        "{who}"
    );

    c.ok(&["tenant", "create", "ml", "--gpu-limit", "4"])
        .unwrap();
    c.ok(&[
        "tenant", "create", "ml/nlp", "--user", "alice", "--admin", "nora",
    ])
    .unwrap();
    c.ok(&["tenant", "create", "ml/cv", "--user", "bob"])
        .unwrap();
    let (alice, _) = token(&c, "alice", &[]);
    let (bob, _) = token(&c, "bob", &[]);
    let (nora, _) = token(&c, "nora", &[]);
    let w = ok_as(&c, &alice, &["--json", "whoami"]);
    assert!(
        w.contains("\"alice\"") && w.contains("\"cluster_admin\": false"),
        "{w}"
    );

    // A user submits to their own tenant, but not to another one.
    let job = submit_as(&c, &alice, &["--tenant", "ml/nlp", "--", "sleep", "300"]);
    fails_as(
        &c,
        &alice,
        &["submit", "--tenant", "ml/cv", "--", "true"],
        &[
            "permission denied: alice may not submit to tenant ml/cv",
            "needs membership of ml/cv",
        ],
    );
    // ... cannot cancel another user's job ...
    fails_as(
        &c,
        &bob,
        &["cancel", &job.to_string()],
        &[&format!(
            "permission denied: bob may not cancel job {job} of alice"
        )],
    );
    // ... sees it only as a summary ...
    let seen: Value = serde_json::from_str(&ok_as(&c, &bob, &["--json", "show", &job.to_string()]))
        .expect("json");
    assert_eq!(seen["user"], "alice");
    assert_eq!(seen["spec"]["command"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["redacted"], true);
    let mine: Value =
        serde_json::from_str(&ok_as(&c, &alice, &["--json", "show", &job.to_string()])).unwrap();
    assert_eq!(mine["spec"]["command"], serde_json::json!(["sleep", "300"]));
    // ... and cannot change a quota, even of their own tenant.
    fails_as(
        &c,
        &alice,
        &["tenant", "set", "ml/nlp", "--gpu-limit", "1"],
        &[
            "permission denied: alice may not change the quota of tenant ml/nlp",
            "needs tenant-admin on ml",
        ],
    );
    // A tenant admin manages its own tenant's members, not a sibling's.
    ok_as(
        &c,
        &nora,
        &["tenant", "set", "ml/nlp", "--add-user", "carol"],
    );
    fails_as(
        &c,
        &nora,
        &["tenant", "set", "ml/cv", "--add-user", "nora"],
        &["permission denied: nora may not change the members of tenant ml/cv"],
    );
    fails_as(
        &c,
        &nora,
        &["tenant", "set", "ml/cv", "--gpu-limit", "1"],
        &["permission denied: nora may not change the quota of tenant ml/cv"],
    );
    // Only cluster admins read the audit trail or issue tokens.
    fails_as(
        &c,
        &alice,
        &["admin", "audit"],
        &["alice is not a cluster admin"],
    );
    fails_as(
        &c,
        &alice,
        &["admin", "token", "issue", "--user", "root"],
        &["alice is not a cluster admin"],
    );
    // The owner cancels her own job.
    ok_as(&c, &alice, &["cancel", &job.to_string()]);

    // Forged, expired and revoked tokens are refused.
    let forged = c.path("forged.token");
    let real = std::fs::read_to_string(&alice).unwrap();
    let flipped = if real.trim().ends_with('0') { '1' } else { '0' };
    let forged_text = format!("{}{flipped}\n", &real.trim()[..real.trim().len() - 1]);
    write_private(&forged, &forged_text);
    fails_as(
        &c,
        &forged,
        &["submit", "--", "true"],
        &["invalid token: unknown or forged"],
    );
    let (short, _) = token(&c, "alice", &["--expires", "1s"]);
    let expired = wait_for("the 1s token to expire", T, || {
        let out = c.muster_with_token(&short, &["submit", "--", "true"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (!out.status.success()).then_some(err)
    })
    .unwrap();
    assert!(expired.contains("expired at"), "{expired}");
    let (revoked, id) = token(&c, "bob", &["--expires", "30d"]);
    ok_as(&c, &revoked, &["queue"]);
    c.ok(&["admin", "token", "revoke", &id]).unwrap();
    fails_as(
        &c,
        &revoked,
        &["submit", "--", "true"],
        &[&format!("token {id} of bob was revoked")],
    );
    let list = c.json(&["admin", "token", "list"]).unwrap();
    let row = list["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .cloned();
    assert_eq!(row.expect("listed")["revoked"], true);
    // A token file others may read is refused by the CLI itself.
    let loose = c.path("loose.token");
    std::fs::write(&loose, &real).unwrap();
    fails_as(&c, &loose, &["queue"], &["has mode 0644", "chmod 600"]);

    // Every attempt above is in the audit trail, denied ones included.
    c.audited(T, "alice's submit", |e| {
        audit_is(e, "alice", "submit", "applied")
    });
    c.audited(T, "alice's denied submit", |e| {
        audit_is(e, "alice", "submit", "denied: permission denied") && e["target"] == "tenant ml/cv"
    });
    c.audited(T, "bob's denied cancel", |e| {
        audit_is(e, "bob", "cancel", "denied")
    });
    c.audited(T, "alice's denied quota change", |e| {
        audit_is(e, "alice", "tenant-update", "denied") && e["target"] == "ml/nlp"
    });
    c.audited(T, "nora touching ml/cv", |e| {
        audit_is(e, "nora", "tenant-update", "denied") && e["target"] == "ml/cv"
    });
    c.audited(T, "nora's member change", |e| {
        audit_is(e, "nora", "tenant-update", "applied")
    });
    c.audited(T, "alice's own cancel", |e| {
        audit_is(e, "alice", "cancel", "applied")
    });
    c.audited(T, "alice's denied token issue", |e| {
        audit_is(e, "alice", "token-issue", "denied")
    });
    for why in ["forged", "expired", "revoked"] {
        c.audited(T, &format!("the {why} token"), |e| {
            e["who"] == "?"
                && e["outcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("unauthenticated") && o.contains(why))
        });
    }
    let e = c.audited(T, "root's revoke", |e| {
        audit_is(e, "root", "token-revoke", "applied")
    });
    assert!(e["via"].as_str().unwrap().starts_with("peer uid 0"), "{e}");
    assert!(e["from"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
    // Filters: by user, and by time.
    let only = c.json(&["admin", "audit", "--user", "bob"]).unwrap();
    let entries = only["entries"].as_array().unwrap();
    assert!(
        !entries.is_empty() && entries.iter().all(|e| e["who"] == "bob"),
        "{only}"
    );
    let none = c
        .json(&["admin", "audit", "--since", "2999-01-01T00:00:00Z"])
        .unwrap();
    assert_eq!(none["entries"], serde_json::json!([]));
    let table = c
        .ok(&["admin", "audit", "--since", "1h", "--user", "nora"])
        .unwrap();
    assert!(
        table.contains("tenant-update") && table.contains("ml/cv"),
        "{table}"
    );
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .expect("create");
    f.write_all(text.as_bytes()).expect("write");
}

#[test]
fn submissions_are_rate_limited_per_user() {
    let c = Cluster::start(ClusterSpec {
        agents: 0,
        scheduler_toml: "[limits]\nsubmits_per_second = 0.01\nsubmit_burst = 2\n",
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let (alice, _) = token(&c, "alice", &[]);
    submit_as(&c, &alice, &["--", "true"]);
    submit_as(&c, &alice, &["--", "true"]);
    fails_as(
        &c,
        &alice,
        &["submit", "--", "true"],
        &[
            "rate limit: alice may submit at most 0.01 request(s) per second (burst 2)",
            "retry in",
        ],
    );
    // Others have buckets of their own (and cluster admins are not limited).
    let (bob, _) = token(&c, "bob", &[]);
    submit_as(&c, &bob, &["--", "true"]);
    for _ in 0..3 {
        c.submit(&["--", "true"]).expect("root submits");
    }
    c.audited(T, "the refused submission", |e| {
        audit_is(e, "alice", "submit", "rejected: rate limit")
    });
}

/// The user the job test runs as: created if missing (CI runs as root).
const TEST_USER: &str = "muster-sec-test";

fn ensure_user() {
    muster_tests::ensure_user(TEST_USER).expect("the test user");
}

#[test]
fn a_job_runs_as_its_tokens_user() {
    if !is_root() {
        eprintln!("skipping: creating a user and running a job as it needs root (CI runs as root)");
        return;
    }
    ensure_user();
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let (tok, id) = token(&c, TEST_USER, &[]);
    // The CLI runs as root and says so in the request; the token decides.
    let job = submit_as(
        &c,
        &tok,
        &["--", "sh", "-c", "echo \"I am $(id -un) uid $(id -u)\""],
    );
    let done = c.wait_state(job, "completed", T).expect("completed");
    assert_eq!(done["user"], TEST_USER);
    let uid = nix::unistd::User::from_name(TEST_USER)
        .unwrap()
        .unwrap()
        .uid;
    let logs = ok_as(&c, &tok, &["logs", &job.to_string()]);
    assert!(
        logs.contains(&format!("I am {TEST_USER} uid {uid}")),
        "{logs}"
    );
    let e = c.audited(T, "the submission", |e| {
        audit_is(e, TEST_USER, "submit", "applied")
    });
    assert_eq!(e["via"], format!("token {id}"));
    // Without a token, root on this host is root.
    let own = c.submit(&["--", "true"]).unwrap();
    assert_eq!(c.show(own).unwrap()["user"], "root");
}

/// Run the CLI as `user` (with runuser) against `addr`.
fn as_local_user(user: &str, addr: &str, args: &[&str]) -> std::process::Output {
    let muster = muster_tests::binary("muster");
    std::process::Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(muster)
        .args(["--addr", addr])
        .args(args)
        .env("HOME", "/nonexistent")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run runuser")
}

fn local_ok(user: &str, addr: &str, args: &[&str]) -> String {
    let out = as_local_user(user, addr, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{user}: {args:?}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn local_users_reach_the_cluster_through_the_agent_socket() {
    if !is_root() {
        eprintln!("skipping: running the CLI as another user needs root (CI runs as root)");
        return;
    }
    ensure_user();
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        agent_toml: "user_socket = \"{dir}/agent-{i}.sock\"\n",
        ..ClusterSpec::default()
    })
    .expect("cluster");
    // The test user must reach the socket inside the cluster's folder.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = format!("unix:{}", c.path("agent-0.sock").display());
    wait_for("the user socket", T, || {
        c.path("agent-0.sock").exists().then_some(())
    })
    .unwrap();
    // Who the kernel says, not a token: the agent vouches for the uid.
    let uid = nix::unistd::User::from_name(TEST_USER)
        .unwrap()
        .unwrap()
        .uid;
    let who: Value =
        serde_json::from_str(&local_ok(TEST_USER, &sock, &["--json", "whoami"])).unwrap();
    assert_eq!(who["user"], TEST_USER, "{who}");
    assert_eq!(who["cluster_admin"], false);
    assert!(
        who["via"]
            .as_str()
            .unwrap()
            .ends_with(&format!("socket uid {uid}")),
        "{who}"
    );
    let out = local_ok(
        TEST_USER,
        &sock,
        &["--json", "submit", "--", "sh", "-c", "id -un"],
    );
    let job = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_u64()
        .unwrap();
    let done = c.wait_state(job, "completed", T).expect("completed");
    assert_eq!(done["user"], TEST_USER);
    let logs = local_ok(TEST_USER, &sock, &["logs", &job.to_string()]);
    assert!(logs.contains(TEST_USER), "{logs}");
    // Root through the socket is root, but not a cluster admin.
    let out = std::process::Command::new(muster_tests::binary("muster"))
        .args(["--json", "--addr", &sock, "whoami"])
        .output()
        .unwrap();
    let root: Value = serde_json::from_slice(&out.stdout).expect("whoami as root");
    assert_eq!(
        (root["user"].as_str(), root["cluster_admin"].as_bool()),
        (Some("root"), Some(false))
    );
    c.audited(T, "the socket submission", |e| {
        audit_is(e, TEST_USER, "submit", "applied")
            && e["via"].as_str().is_some_and(|v| v.contains("socket uid"))
    });
}

/// A folder with a CA of its own, unknown to the cluster.
fn rogue_ca(c: &Cluster, node: &str) -> String {
    let dir = c.path("rogue");
    let d = dir.to_string_lossy().into_owned();
    let muster = muster_tests::binary("muster");
    for args in [
        vec!["admin", "ca", "init", "--dir", &d],
        vec!["admin", "cert", "issue", "--agent", node, "--dir", &d],
    ] {
        let out = std::process::Command::new(&muster)
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    format!(
        "\n[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/agent-{node}.pem\"\nkey = \"{d}/agent-{node}-key.pem\"\n"
    )
}

/// Wait until agent `i` has failed at least one session.
fn refused(c: &Cluster, i: usize) {
    let log = c.path(&format!("agent-{i}.log"));
    wait_for(&format!("agent {i} to be refused"), T, || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("session ended").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", c.log_tail()));
}

#[test]
fn mutual_tls_between_every_daemon_and_the_cli() {
    let mut c = Cluster::start(ClusterSpec {
        schedulers: 3,
        agents: 1,
        tls: true,
        ..ClusterSpec::default()
    })
    .expect("a TLS cluster: three schedulers, an agent, the CLI");
    let who = c.json(&["whoami"]).unwrap();
    assert_eq!(who["via"], "cert user:root", "{who}");
    let job = c.submit(&["--", "echo", "over tls"]).unwrap();
    c.wait_state(job, "completed", T).unwrap();
    assert!(c
        .ok(&["logs", &job.to_string()])
        .unwrap()
        .contains("over tls"));
    c.wait_converged(T).unwrap();

    // A user with only the CA and a token (no certificate of their own).
    let (alice, _) = token(&c, "alice", &[]);
    let ca_only = c.path("ca-only.toml");
    let ca = c.path("pki/ca.pem");
    std::fs::write(&ca_only, format!("[tls]\nca = \"{}\"\n", ca.display())).unwrap();
    let out = std::process::Command::new(muster_tests::binary("muster"))
        .arg("--config")
        .arg(&ca_only)
        .arg("--token-file")
        .arg(&alice)
        .args(["--json", "--addr", &c.addr, "whoami"])
        .output()
        .unwrap();
    let who: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(who["user"], "alice", "{who}");

    // Without TLS the CLI cannot talk to the cluster at all.
    let plain = std::process::Command::new(muster_tests::binary("muster"))
        .args(["--addr", &c.sched_addrs[0], "queue"])
        .output()
        .unwrap();
    assert!(!plain.status.success());

    // Agents that cannot register: no certificate, one from another CA, a
    // valid one of another node, and a user's certificate.
    let none = c.start_extra_agent("").unwrap();
    let rogue = rogue_ca(&c, &c.node_name(2));
    let other_ca = c.start_extra_agent(&rogue).unwrap();
    let wrong_name = c.tls_toml("agent", &c.node_name(0));
    let impostor = c.start_extra_agent(&wrong_name).unwrap();
    let user_cert = c.tls_toml("user", "root");
    let as_user = c.start_extra_agent(&user_cert).unwrap();
    for i in [none, other_ca, impostor, as_user] {
        refused(&c, i);
    }
    let nodes = c.json(&["nodes"]).unwrap();
    let names: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["node-0"], "{nodes}");
    // The refusals that reached the scheduler are audited.
    let e = c.audited(T, "the impostor", |e| {
        e["action"] == "register-node"
            && e["target"] == c.node_name(impostor).as_str()
            && e["outcome"]
                .as_str()
                .is_some_and(|o| o.contains("certificate agent:node-0 may not register"))
    });
    assert!(e["outcome"].as_str().unwrap().starts_with("denied"), "{e}");
    c.audited(T, "the user certificate", |e| {
        e["action"] == "register-node"
            && e["outcome"]
                .as_str()
                .is_some_and(|o| o.contains("needs a certificate agent:NAME"))
    });
    c.audited(T, "node-0's registration", |e| {
        audit_is(e, "agent:node-0", "register-node", "applied")
    });
}

#[test]
fn a_plain_daemon_refuses_a_public_address() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(&cfg, "listen = \"0.0.0.0:7470\"\n").unwrap();
    let out = std::process::Command::new(muster_tests::binary("muster-scheduler"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("key `listen`") && err.contains("insecure = true"),
        "{err}"
    );
}
