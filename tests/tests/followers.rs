//! Any member gives the leader's answer (issue 11, #10): `muster why`,
//! `queue` and `nodes` asked of a follower used to say "waiting for the
//! planner" and `last_seen 0`, because verdicts and agent leases live in
//! the leader's memory. Followers now ask the leader.

use muster_tests::{binary, wait_for, Cluster, ClusterSpec};
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn json_at(addr: &str, args: &[&str]) -> Value {
    let out = std::process::Command::new(binary("muster"))
        .args(["--addr", addr, "--json"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run muster");
    assert!(
        out.status.success(),
        "{args:?} at {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn every_member_gives_the_leaders_verdicts_and_leases() {
    let c = Cluster::start(ClusterSpec {
        schedulers: 3,
        agents: 1,
        gpus_per_agent: 4,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let busy = c
        .submit(&["--gpus", "4", "--", "sleep", "300"])
        .expect("submit");
    c.wait_state(busy, "running", T).expect("running");
    let waiting = c.submit(&["--gpus", "2", "--", "true"]).expect("submit");
    let leader = c.wait_leader(T).expect("leader");
    let at_leader = wait_for("the planner's verdict", T, || {
        let v = json_at(&c.sched_addrs[leader], &["why", &waiting.to_string()]);
        let r = v["reason"].as_str()?.to_string();
        (!r.contains("waiting for the planner")).then_some(r)
    })
    .expect("verdict");
    for (i, addr) in c.sched_addrs.iter().enumerate() {
        let why = json_at(addr, &["why", &waiting.to_string()]);
        assert_eq!(
            why["reason"].as_str(),
            Some(at_leader.as_str()),
            "member {} (leader {}) answers differently",
            i + 1,
            leader + 1
        );
        let queue = json_at(addr, &["queue"]);
        let pending = queue["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .find(|j| j["id"] == waiting)
            .cloned()
            .expect("pending job listed");
        // `why` adds the queue position to the planner's verdict.
        let reason = pending["reason"].as_str().unwrap_or_default();
        assert!(
            !reason.is_empty() && at_leader.ends_with(reason),
            "member {}: queue says {reason:?}, the leader {at_leader:?}",
            i + 1
        );
        let nodes = json_at(addr, &["nodes"]);
        let seen = nodes["nodes"][0]["last_seen_ms"].as_i64().unwrap_or(0);
        assert!(seen > 0, "member {}: last_seen {seen}", i + 1);
    }
}
