//! Membership (issue 11 #3): real `muster-scheduler` processes grown from one
//! member with `muster admin peers add`, before any snapshot was taken, and
//! replaced one at a time. The members added must be able to lead once the
//! first one is gone: they learn the configuration from the log's initial
//! snapshot (before, they replayed "add node" onto an empty configuration,
//! and no leader was ever elected again).

use muster_tests::{wait_for, Cluster, ClusterSpec};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// One scheduler, no agents (writes are what matters here).
fn one() -> Cluster {
    Cluster::start(ClusterSpec {
        schedulers: 1,
        agents: 0,
        ..ClusterSpec::default()
    })
    .expect("cluster")
}

/// Start scheduler slot `i` (Raft id `i + 1`) as a joiner and add it with
/// `muster admin peers add`; wait until it has caught up and votes.
fn add(c: &mut Cluster, i: usize) {
    c.reserve_schedulers(1);
    assert_eq!(c.sched_addrs.len(), i + 1);
    c.write_scheduler_config(i, i + 1, true).unwrap();
    c.start_scheduler_node(i).unwrap();
    let id = (i + 1).to_string();
    let addr = c.sched_addrs[i].clone();
    c.ok(&["admin", "peers", "add", "--id", &id, "--peer-addr", &addr])
        .unwrap_or_else(|e| panic!("adding {id}: {e}; logs: {}", c.log_tail()));
    wait_for(&format!("member {id} to catch up and vote"), T, || {
        let st = c.admin_status(i)?;
        let role = st["role"].as_str()?;
        (!role.contains("catching up")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; logs: {}", c.log_tail()));
}

/// Point the CLI at the members still running.
fn use_members(c: &mut Cluster, members: &[usize]) {
    c.addr = members
        .iter()
        .map(|i| c.sched_addrs[*i].clone())
        .collect::<Vec<_>>()
        .join(",");
}

/// Members `members` elect a leader among themselves and acknowledge a
/// write, and they converge.
fn leads_and_writes(c: &Cluster, members: &[usize], what: &str) {
    let leader = c
        .wait_leader(T)
        .unwrap_or_else(|e| panic!("{what}: {e}; logs: {}", c.log_tail()));
    assert!(members.contains(&leader), "{what}: leader {leader}");
    let id = wait_for(&format!("{what}: a write acknowledged"), T, || {
        c.submit(&["--name", what, "--", "true"]).ok()
    })
    .unwrap_or_else(|e| panic!("{e}; logs: {}", c.log_tail()));
    assert_eq!(c.show(id).unwrap()["spec"]["name"], what);
    c.wait_converged(T)
        .unwrap_or_else(|e| panic!("{what}: {e}; logs: {}", c.log_tail()));
}

#[test]
fn a_cluster_grown_from_one_member_elects_a_leader_without_it() {
    let mut c = one();
    let before = c.submit(&["--name", "before", "--", "true"]).unwrap();
    for i in [1, 2] {
        add(&mut c, i);
    }
    use_members(&mut c, &[0, 1, 2]);
    c.wait_converged(T).expect("three members converge");
    let v = c.json(&["admin", "status"]).unwrap();
    let members = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] != "unreachable")
        .count();
    assert_eq!(members, 3, "{v}");
    // Member 1 goes for good.
    c.kill_scheduler_node(0);
    use_members(&mut c, &[1, 2]);
    leads_and_writes(&c, &[1, 2], "after-member-1");
    assert_eq!(c.show(before).unwrap()["spec"]["name"], "before");
}

#[test]
fn replacing_every_member_one_at_a_time_keeps_a_leader_and_the_data() {
    let mut c = one();
    let first = c.submit(&["--name", "first", "--", "true"]).unwrap();
    for i in [1, 2] {
        add(&mut c, i);
    }
    // Replace 1, 2 and 3 by 4, 5 and 6: add one, remove one.
    for (new, old) in [(3, 0), (4, 1), (5, 2)] {
        add(&mut c, new);
        let running: Vec<usize> = (old..=new).collect();
        use_members(&mut c, &running);
        c.ok(&["admin", "peers", "remove", &(old + 1).to_string()])
            .unwrap_or_else(|e| panic!("removing {}: {e}; logs: {}", old + 1, c.log_tail()));
        wait_for(&format!("removed member {} to stop", old + 1), T, || {
            c.scheduler_exited(old).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}; logs: {}", c.log_tail()));
        c.kill_scheduler_node(old); // reap
        let running: Vec<usize> = (old + 1..=new).collect();
        use_members(&mut c, &running);
        leads_and_writes(&c, &running, &format!("without-{}", old + 1));
    }
    // None of the first members is left; the last three can still lose
    // their leader and elect another.
    let leader = c.wait_leader(T).unwrap();
    c.kill_scheduler_node(leader);
    let rest: Vec<usize> = [3, 4, 5].into_iter().filter(|i| *i != leader).collect();
    use_members(&mut c, &rest);
    leads_and_writes(&c, &rest, "after-a-new-leader");
    assert_eq!(c.show(first).unwrap()["spec"]["name"], "first");
}
