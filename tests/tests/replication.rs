//! Replication: three (or five) real `muster-scheduler` processes on loopback
//! with real agents, killed, restarted, wiped, cut off and reconfigured.

use muster_tests::{wait_for, Cluster, ClusterSpec};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Three schedulers and one agent with 4 GPUs, one of which a long job
/// holds for an hour: the 4-GPU jobs the tests submit queue (a job that
/// could never run, like a 2 × 4-GPU gang here, is refused at submit), and
/// short jobs with a time limit backfill.
fn three(spec: ClusterSpec) -> Cluster {
    let c = Cluster::start(ClusterSpec {
        schedulers: 3,
        agents: 1,
        ..spec
    })
    .expect("cluster");
    let blocker = c
        .submit(&["--gpus", "1", "--time", "1h", "--", "sleep", "3600"])
        .expect("submit the blocker");
    c.wait_state(blocker, "running", T)
        .expect("blocker running");
    c
}

/// Submit `--gpus 4` jobs (they queue behind the blocker)
/// named `sub-N` in a loop until stopped; returns name → acknowledged id.
fn submitter(
    c: &Cluster,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
) -> std::thread::JoinHandle<u32> {
    let addr = c.addr.clone();
    let muster = muster_tests::binary("muster");
    std::thread::spawn(move || {
        let mut failures = 0;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let name = format!("sub-{n}");
            let out = std::process::Command::new(&muster)
                .args(["--addr", &addr, "--json", "submit", "--name", &name])
                .args(["--gpus", "4", "--", "true"])
                .output();
            match out {
                Ok(o) if o.status.success() => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&o.stdout).unwrap_or_default();
                    if let Some(id) = v["id"].as_u64() {
                        acked.lock().unwrap().insert(name, id);
                    }
                }
                _ => failures += 1,
            }
        }
        failures
    })
}

/// Every acknowledged submission exists exactly once.
fn check_exactly_once(c: &Cluster, acked: &BTreeMap<String, u64>) {
    let jobs = c.json(&["queue", "--all"]).expect("queue");
    let mut by_name: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for j in jobs["jobs"].as_array().unwrap() {
        let name = j["spec"]["name"].as_str().unwrap_or("").to_string();
        by_name
            .entry(name)
            .or_default()
            .push(j["id"].as_u64().unwrap());
    }
    for (name, id) in acked {
        assert_eq!(
            by_name.get(name),
            Some(&vec![*id]),
            "{name} should exist once as job {id}"
        );
    }
}

#[test]
fn leader_kill_9_under_continuous_submits_loses_and_duplicates_nothing() {
    let mut c = three(ClusterSpec::default());
    let running = c
        .submit(&["--gpus", "1", "--", "sleep", "600"])
        .expect("submit");
    c.wait_state(running, "running", T).expect("running");
    let pid_file = c.path("agent-0-data/tasks");
    let pids_before: Vec<String> = std::fs::read_dir(&pid_file)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let worker = submitter(&c, stop.clone(), acked.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let old = c.leader().expect("leader");
    c.kill_scheduler_node(old);
    let before_kill = acked.lock().unwrap().len();
    let new = c
        .wait_leader(Duration::from_secs(10))
        .expect("a new leader");
    assert_ne!(new, old);
    // Submissions resume under the new leader.
    wait_for("submissions to resume", T, || {
        (acked.lock().unwrap().len() > before_kill + 5).then_some(())
    })
    .expect("resumed");
    stop.store(true, Ordering::Relaxed);
    let failures = worker.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    println!(
        "{} acknowledged, {failures} failed while the leader was down",
        acked.len()
    );
    check_exactly_once(&c, &acked);
    // The running task was neither restarted nor lost.
    assert_eq!(c.show(running).unwrap()["state"], "running");
    let pids_after: Vec<String> = std::fs::read_dir(&pid_file)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
        .collect();
    assert_eq!(pids_before, pids_after, "no task launched twice");
    c.start_scheduler_node(old).expect("restart");
    c.wait_converged(T).expect("the old leader catches up");
}

#[test]
fn restarting_every_node_at_once_keeps_identical_state() {
    let mut c = three(ClusterSpec::default());
    let mut ids = BTreeSet::new();
    for _ in 0..20 {
        ids.insert(c.submit(&["--gpus", "4", "--", "true"]).unwrap());
    }
    let done = c.submit(&["--time", "1m", "--", "true"]).unwrap();
    c.wait_state(done, "completed", T).unwrap();
    c.wait_converged(T).expect("converged");
    let before = c.json(&["queue", "--all"]).unwrap();
    let audit_before = c.json(&["admin", "audit"]).unwrap();
    let nodes_before = c.json(&["nodes"]).unwrap();
    for i in 0..3 {
        c.kill_scheduler_node(i);
    }
    for i in 0..3 {
        c.start_scheduler_node(i).unwrap();
    }
    c.wait_leader(T).expect("leader after restart");
    // The agent registers again with the new leader, and every
    // registration is audited: once that entry is in, nothing else changes.
    wait_for("the agent's new registration in the audit trail", T, || {
        let a = c.json(&["admin", "audit"]).ok()?;
        let n = a["entries"].as_array()?.len();
        (n > audit_before["entries"].as_array()?.len()).then_some(())
    })
    .unwrap();
    // Every member holds the same state again (their digests agree).
    c.wait_converged(T).expect("converged after restart");
    let after = c.json(&["queue", "--all"]).unwrap();
    let audit_after = c.json(&["admin", "audit"]).unwrap();
    let nodes_after = c.json(&["nodes"]).unwrap();
    // Everything but the planner's words (kept in the leader's memory).
    let strip = |v: &serde_json::Value| {
        let mut v = v["jobs"].clone();
        for j in v.as_array_mut().unwrap() {
            j["reason"] = serde_json::Value::Null;
        }
        v
    };
    assert_eq!(strip(&before), strip(&after));
    let listed: BTreeSet<u64> = after["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["id"].as_u64())
        .collect();
    assert!(
        ids.is_subset(&listed),
        "acknowledged jobs lost: {ids:?} vs {listed:?}"
    );
    // The audit trail kept every entry; what was added is the agent's
    // registration with the new leader and nothing else.
    let (old, new) = (
        audit_before["entries"].as_array().unwrap(),
        audit_after["entries"].as_array().unwrap(),
    );
    assert_eq!(&new[..old.len()], &old[..], "audit entries lost or changed");
    for e in &new[old.len()..] {
        assert_eq!(e["action"], "register-node", "unexpected new entry {e}");
    }
    // Nodes as they were, but for when the agent was last heard from.
    let seen = |v: &serde_json::Value| {
        let mut v = v["nodes"].clone();
        for n in v.as_array_mut().unwrap() {
            n["last_seen_ms"] = serde_json::Value::Null;
        }
        v
    };
    assert_eq!(seen(&nodes_before), seen(&nodes_after));
}

#[test]
fn a_wiped_node_rejoins_through_a_snapshot() {
    let mut c = three(ClusterSpec {
        snapshot_entries: 20,
        snapshot_interval: Some("100ms"),
        ..ClusterSpec::default()
    });
    for _ in 0..60 {
        c.submit(&["--gpus", "4", "--", "true"]).unwrap();
    }
    c.wait_converged(T).unwrap();
    let victim = (0..3).find(|i| Some(*i) != c.leader()).unwrap();
    c.kill_scheduler_node(victim);
    std::fs::remove_dir_all(c.path(&format!("scheduler-{victim}-data"))).unwrap();
    for _ in 0..30 {
        c.submit(&["--gpus", "4", "--", "true"]).unwrap();
    }
    c.start_scheduler_node(victim).unwrap();
    c.wait_converged(T).expect("the wiped node caught up");
    let st = c.admin_status(victim).unwrap();
    assert!(
        st["snapshot_index"].as_u64().unwrap() > 0,
        "it was sent a snapshot: {st}"
    );
    let log = std::fs::read_to_string(c.path(&format!("scheduler-{victim}.log"))).unwrap();
    assert!(
        log.contains("installed a snapshot from the leader"),
        "node {victim} did not install a snapshot"
    );
}

#[test]
fn membership_3_to_5_to_3_while_clients_submit() {
    let mut c = three(ClusterSpec::default());
    c.reserve_schedulers(2);
    for i in 3..5 {
        c.write_scheduler_config(i, 5, true).unwrap();
        c.start_scheduler_node(i).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let worker = submitter(&c, stop.clone(), acked.clone());
    for i in 3..5 {
        let id = (i + 1).to_string();
        c.ok(&[
            "admin",
            "peers",
            "add",
            "--id",
            &id,
            "--peer-addr",
            &c.sched_addrs[i].clone(),
        ])
        .expect("add");
    }
    let v = c.json(&["admin", "status"]).unwrap();
    let members = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] != "unreachable")
        .count();
    assert_eq!(members, 5, "{v}");
    // The new members catch up while submissions go on.
    let leader = c.leader().expect("leader");
    let target = c.admin_status(leader).unwrap()["commit_index"]
        .as_u64()
        .unwrap();
    wait_for("the new members to catch up", T, || {
        (3..5)
            .all(|i| {
                c.admin_status(i)
                    .and_then(|s| s["applied_index"].as_u64())
                    .is_some_and(|a| a >= target)
            })
            .then_some(())
    })
    .expect("caught up");
    for id in ["4", "5"] {
        c.ok(&["admin", "peers", "remove", id]).expect("remove");
    }
    // Removed members stop serving.
    wait_for("removed nodes to stop", T, || {
        (c.scheduler_exited(3) && c.scheduler_exited(4)).then_some(())
    })
    .expect("stopped");
    c.kill_scheduler_node(3); // reap
    c.kill_scheduler_node(4);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 5, "submissions went on during the changes");
    check_exactly_once(&c, &acked);
    c.wait_converged(T)
        .expect("the three remaining members converge");
}

#[test]
fn a_cut_off_leader_stops_taking_writes_and_the_cluster_heals() {
    let c = three(ClusterSpec {
        proxies: true,
        ..ClusterSpec::default()
    });
    for one_way in [false, true] {
        let old = c.leader().expect("leader");
        let old_addr = c.sched_addrs[old].clone();
        for other in (0..3).filter(|o| *o != old) {
            c.proxies[&(old, other)].set_blocked(true);
            if !one_way {
                c.proxies[&(other, old)].set_blocked(true);
            }
        }
        // The majority elects a new leader.
        let new =
            wait_for("a new leader", T, || c.leader().filter(|l| *l != old)).expect("new leader");
        // The old leader no longer accepts writes: a clear error, in bounded time.
        let start = std::time::Instant::now();
        let out = std::process::Command::new(muster_tests::binary("muster"))
            .args(["--addr", &old_addr, "submit", "--", "true"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the cut-off leader accepted a write (one_way={one_way})"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "took {:?}",
            start.elapsed()
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("leader") || err.contains("quorum"), "{err}");
        // Writes through the majority succeed.
        let addr = c.sched_addrs[new].clone();
        let out = std::process::Command::new(muster_tests::binary("muster"))
            .args(["--addr", &addr, "submit", "--gpus", "4", "--", "true"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for p in c.proxies.values() {
            p.set_blocked(false);
        }
        c.wait_converged(T).expect("converged after healing");
    }
}

#[test]
fn reads_are_linearizable_and_stale_reads_are_opt_in() {
    let c = three(ClusterSpec {
        proxies: true,
        ..ClusterSpec::default()
    });
    let leader = c.leader().expect("leader");
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let muster = |addr: &str, args: &[&str]| {
        std::process::Command::new(muster_tests::binary("muster"))
            .arg("--addr")
            .arg(addr)
            .args(args)
            .output()
            .unwrap()
    };
    // A write through one follower is visible at once through the other.
    let out = muster(
        &c.sched_addrs[followers[0]],
        &["submit", "--gpus", "4", "--", "true"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = muster(&c.sched_addrs[followers[1]], &["show", &id]);
    assert!(
        out.status.success(),
        "read-your-writes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Cut the second follower off: it cannot confirm reads, and says so in bounded time.
    let f = followers[1];
    for other in (0..3).filter(|o| *o != f) {
        c.proxies[&(f, other)].set_blocked(true);
        c.proxies[&(other, f)].set_blocked(true);
    }
    let start = std::time::Instant::now();
    let out = muster(&c.sched_addrs[f], &["show", &id]);
    assert!(
        !out.status.success(),
        "a cut-off node served a linearizable read"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("up-to-date read"));
    // A stale read is served from what it has.
    let out = muster(&c.sched_addrs[f], &["--stale", "show", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in c.proxies.values() {
        p.set_blocked(false);
    }
    c.wait_converged(T).expect("converged");
}
