//! End-to-end tests of the scheduling policy through the `muster` CLI:
//! tenant administration with its errors, and a preemption carried out by
//! real agents (SIGTERM, exit, requeue, restart).

use muster_tests::{wait_for, Cluster, ClusterSpec};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn fails_with(c: &Cluster, args: &[&str], needle: &str) {
    let out = c.muster(args).expect("run muster");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(err.contains(needle), "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn tenant_commands_end_to_end() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    c.ok(&[
        "tenant",
        "create",
        "ml",
        "--guarantee",
        "4",
        "--gpu-limit",
        "4",
    ])
    .expect("create ml");
    c.ok(&[
        "tenant",
        "create",
        "ml/nlp",
        "--guarantee",
        "2",
        "--weight",
        "3",
    ])
    .expect("create ml/nlp");
    fails_with(
        &c,
        &["tenant", "create", "ml/cv", "--guarantee", "3"],
        "tenant ml/cv: guarantees of ml's children would add up to 5 GPUs",
    );
    fails_with(
        &c,
        &["tenant", "create", "bio/x"],
        "parent tenant bio does not exist",
    );
    fails_with(
        &c,
        &["tenant", "set", "nope", "--weight", "2"],
        "tenant nope not found",
    );
    c.ok(&["tenant", "set", "ml/nlp", "--gpu-limit", "3"])
        .expect("set");
    let t = c.json(&["tenant", "show", "ml/nlp"]).expect("show");
    assert_eq!(
        (t["gpu_limit"].as_u64(), t["weight"].as_u64()),
        (Some(3), Some(3))
    );

    let id = c
        .submit(&[
            "--tenant", "ml/nlp", "--gpus", "2", "--mem", "64M", "--", "sleep", "30",
        ])
        .expect("submit");
    c.wait_state(id, "running", T).expect("running");
    let blocked = c
        .submit(&[
            "--tenant", "ml/nlp", "--gpus", "2", "--mem", "64M", "--", "true",
        ])
        .expect("submit");
    let why = wait_for("a verdict", T, || {
        let out = c.ok(&["why", &blocked.to_string()]).ok()?;
        out.contains("at its limit").then_some(out)
    })
    .expect("why");
    assert!(
        why.contains("tenant ml/nlp at its limit of 3 GPUs (2 GPUs in use, job needs 2 GPUs)"),
        "{why}"
    );
    let usage = c.json(&["tenant", "usage"]).expect("usage");
    let ml = usage["tenants"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == "ml"))
        .cloned()
        .expect("ml listed");
    assert_eq!(ml["gpus_in_use"], 2, "a parent counts its children: {ml}");
    fails_with(&c, &["tenant", "delete", "ml/nlp"], "unfinished job(s)");
    c.ok(&["cancel", &id.to_string()]).expect("cancel");
    c.ok(&["cancel", &blocked.to_string()]).expect("cancel");
    c.wait_state(id, "cancelled", T).expect("cancelled");
    wait_for("GPUs back", T, || {
        let t = c.json(&["tenant", "show", "ml/nlp"]).ok()?;
        (t["gpus_in_use"] == 0).then_some(())
    })
    .expect("released");
    c.ok(&["tenant", "delete", "ml/nlp"]).expect("delete");
    fails_with(&c, &["tenant", "show", "ml/nlp"], "tenant ml/nlp not found");
}

#[test]
fn high_priority_job_preempts_and_the_victim_is_requeued() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        scheduler_toml: "[scheduling]\nmin_runtime = \"0s\"\n",
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let low = c
        .submit(&[
            "--priority",
            "low",
            "--gpus",
            "4",
            "--mem",
            "64M",
            "--",
            "sleep",
            "300",
        ])
        .expect("submit low");
    c.wait_state(low, "running", T).expect("low running");
    let high = c
        .submit(&[
            "--priority",
            "high",
            "--gpus",
            "2",
            "--mem",
            "64M",
            "--",
            "true",
        ])
        .expect("submit high");
    fails_with(
        &c,
        &["submit", "--priority", "urgent", "--", "true"],
        "unknown class \"urgent\"",
    );
    c.wait_state(high, "completed", T).expect("high ran");
    let job = wait_for("the victim to run again", T, || {
        let j = c.show(low).ok()?;
        (j["state"] == "running" && j["restart_count"] == 1).then_some(j)
    })
    .expect("requeued and restarted");
    assert_eq!(job["restart_count"], 1, "{job}");
}
