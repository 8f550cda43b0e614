//! Scenario tests of `apply`: each reads as a short story of commands.

use super::*;
use crate::model::{JobState, NodeState, Resources};
use crate::planner;

pub(crate) fn node(name: &str, gpus: u32) -> NodeRegistration {
    NodeRegistration {
        name: name.into(),
        address: format!("{name}:7471"),
        gpus: (0..gpus)
            .map(|i| GpuRecord {
                index: i,
                uuid: format!("GPU-{name}-{i}"),
                model: "H100".into(),
                memory_bytes: 80 << 30,
                minor: i,
                pci_bus_id: String::new(),
                numa_node: 0,
                healthy: true,
                link_group: i / 4,
                fault: String::new(),
            })
            .collect(),
        cpu_millis: 64_000,
        memory_bytes: 512 << 30,
        labels: Default::default(),
        log_key: vec![7; 32],
    }
}

pub(crate) fn spec(tasks: u32, gpus: u32) -> JobSpec {
    JobSpec {
        name: "j".into(),
        tenant: DEFAULT_TENANT.into(),
        tasks,
        per_task: Resources {
            gpus,
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        },
        time_limit_secs: None,
        command: vec!["true".into()],
        env: Default::default(),
        workdir: "/".into(),
        checkpoint_dir: None,
        priority: String::new(),
        topology: None,
        lifecycle: Default::default(),
    }
}

/// A little world for stories: a state plus the helpers to move it.
pub(crate) struct World {
    pub s: State,
    pub now: i64,
}

impl World {
    pub fn new(nodes: &[(&str, u32)]) -> World {
        let mut w = World {
            s: State::new(),
            now: 1_000,
        };
        for (n, g) in nodes {
            w.cmd(Command::RegisterNode {
                node: node(n, *g),
                running: vec![],
                at_ms: 0,
            });
        }
        w
    }
    pub fn cmd(&mut self, c: Command) -> ApplyResult {
        self.now += 1;
        self.s.apply(&c)
    }
    pub fn submit(&mut self, tasks: u32, gpus: u32) -> JobId {
        match self.cmd(Command::Submit {
            request_id: None,
            spec: spec(tasks, gpus),
            user: "alice".into(),
            at_ms: self.now,
        }) {
            ApplyResult::Submitted(id) => id,
            other => panic!("submit rejected: {other:?}"),
        }
    }
    /// Submit with a time limit (seconds).
    pub fn submit_limited(&mut self, tasks: u32, gpus: u32, limit: Option<u64>) -> JobId {
        let spec = JobSpec {
            time_limit_secs: limit,
            ..spec(tasks, gpus)
        };
        match self.s.apply(&Command::Submit {
            request_id: None,
            spec,
            user: "alice".into(),
            at_ms: self.now,
        }) {
            ApplyResult::Submitted(id) => id,
            other => panic!("submit rejected: {other:?}"),
        }
    }
    /// Run the planner and apply its plan, as the leader would.
    pub fn schedule(&mut self) -> Vec<JobId> {
        let plan = planner::plan(&self.s, &Default::default(), self.now);
        match self.cmd(Command::ApplyPlan {
            term: 1,
            at_ms: self.now,
            placements: plan.placements,
        }) {
            ApplyResult::Planned { placed, rejected } => {
                assert!(rejected.is_empty(), "fresh plan rejected: {rejected:?}");
                placed
            }
            other => panic!("{other:?}"),
        }
    }
    pub fn key(&self, job: JobId, task: u32) -> TaskKey {
        let alloc = self.s.jobs[&job].alloc.as_ref().expect("placed").id.0;
        TaskKey { job, alloc, task }
    }
    pub fn start_all(&mut self, job: JobId) {
        for t in 0..self.s.jobs[&job].spec.tasks {
            let key = self.key(job, t);
            self.cmd(Command::TaskStarted {
                key,
                at_ms: self.now,
            });
        }
    }
    pub fn exit(&mut self, job: JobId, task: u32, code: i32) {
        let key = self.key(job, task);
        self.cmd(Command::TaskExited {
            key,
            exit: ExitInfo {
                code: Some(code),
                ..Default::default()
            },
            at_ms: self.now,
        });
    }
    pub fn state(&self, job: JobId) -> JobState {
        self.s.jobs[&job].state
    }
    pub fn free_gpus(&self, node: &str) -> usize {
        crate::planner::fit::free_gpus(&self.s.nodes[node], &self.s.node_usage(node)).len()
    }
}

#[test]
fn gang_lifecycle_pending_placed_running_completed() {
    let mut w = World::new(&[("a", 4), ("b", 4)]);
    let j = w.submit(2, 4);
    assert_eq!(w.state(j), JobState::Pending);
    assert_eq!(w.schedule(), vec![j]);
    assert_eq!(w.state(j), JobState::Placed);
    assert_eq!(w.free_gpus("a") + w.free_gpus("b"), 0);
    w.start_all(j);
    assert_eq!(w.state(j), JobState::Running);
    w.exit(j, 0, 0);
    assert_eq!(
        w.state(j),
        JobState::Running,
        "one task done, the gang still runs"
    );
    w.exit(j, 1, 0);
    assert_eq!(w.state(j), JobState::Completed);
    assert_eq!(w.free_gpus("a") + w.free_gpus("b"), 8);
    assert!(w.s.active.is_empty());
}

#[test]
fn a_failed_task_fails_the_gang_and_others_hold_gpus_until_they_exit() {
    let mut w = World::new(&[("a", 8)]);
    let j = w.submit(2, 4);
    w.schedule();
    w.start_all(j);
    w.exit(j, 1, 3);
    assert_eq!(w.state(j), JobState::Failed);
    assert!(w.s.jobs[&j].reason.contains("task 1 exit code 3"));
    assert_eq!(
        w.free_gpus("a"),
        4,
        "task 0 still runs until its agent kills it"
    );
    w.exit(j, 0, 143);
    assert_eq!(w.free_gpus("a"), 8);
    assert_eq!(w.state(j), JobState::Failed);
}

#[test]
fn stale_plan_is_rejected_whole_and_changes_nothing() {
    let mut w = World::new(&[("a", 4)]);
    let j1 = w.submit(1, 4);
    let j2 = w.submit(1, 4);
    // Two plans computed on the same state both want all of node a.
    let p1 = planner::plan(&w.s, &Default::default(), w.now);
    let mut p2 = p1.clone();
    p2.placements[0].job = j2;
    w.cmd(Command::ApplyPlan {
        term: 1,
        at_ms: 5,
        placements: p1.placements,
    });
    let before = w.s.digest();
    let r = w.cmd(Command::ApplyPlan {
        term: 1,
        at_ms: 6,
        placements: p2.placements,
    });
    match r {
        ApplyResult::Planned { placed, rejected } => {
            assert!(placed.is_empty());
            assert_eq!(rejected[0].0, j2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.s.digest(), before);
    assert_eq!(w.state(j1), JobState::Placed);
    assert_eq!(w.state(j2), JobState::Pending);
}

#[test]
fn bad_submissions_are_rejected_and_leave_no_trace() {
    let mut w = World::new(&[("a", 4)]);
    let before = w.s.digest();
    let cases: Vec<(JobSpec, &str)> = vec![
        (spec(1, 5), "largest node has 4"),
        (spec(0, 1), "tasks"),
        (
            JobSpec {
                tenant: "ghost".into(),
                ..spec(1, 1)
            },
            "unknown tenant",
        ),
        (
            JobSpec {
                command: vec![],
                ..spec(1, 1)
            },
            "command",
        ),
        (
            JobSpec {
                per_task: Resources {
                    memory_bytes: 0,
                    ..spec(1, 1).per_task
                },
                ..spec(1, 1)
            },
            "memory",
        ),
    ];
    for (sp, needle) in cases {
        let r = w.cmd(Command::Submit {
            request_id: None,
            spec: sp,
            user: "u".into(),
            at_ms: 1,
        });
        match r {
            ApplyResult::Rejected(msg) => assert!(msg.contains(needle), "{msg}"),
            other => panic!("accepted: {other:?}"),
        }
    }
    assert_eq!(w.s.digest(), before);
    assert_eq!(w.s.next_job_id, 1);
}

#[test]
fn cancel_pending_placed_and_finished() {
    let mut w = World::new(&[("a", 4)]);
    let placed = w.submit(1, 4);
    let pending = w.submit(1, 4);
    w.schedule();
    assert_eq!(
        w.cmd(Command::Cancel {
            job: pending,
            at_ms: 9
        }),
        ApplyResult::Applied
    );
    assert_eq!(w.state(pending), JobState::Cancelled);
    assert!(!w.s.pending.contains(&pending));
    // Never started: its GPUs come back at once.
    w.cmd(Command::Cancel {
        job: placed,
        at_ms: 10,
    });
    assert_eq!(w.free_gpus("a"), 4);
    // A retried cancel succeeds and changes nothing.
    let before = w.s.digest();
    assert_eq!(
        w.cmd(Command::Cancel {
            job: placed,
            at_ms: 11
        }),
        ApplyResult::Applied
    );
    assert_eq!(w.s.digest(), before);
    assert!(matches!(
        w.cmd(Command::Cancel {
            job: JobId(77),
            at_ms: 11
        }),
        ApplyResult::NotFound(_)
    ));
}

#[test]
fn lost_node_releases_its_gpus_and_requeues_its_jobs() {
    let mut w = World::new(&[("a", 4), ("b", 4)]);
    let j = w.submit(2, 4);
    w.schedule();
    w.start_all(j);
    w.cmd(Command::NodeLost {
        name: "b".into(),
        at_ms: 50,
    });
    assert_eq!(w.s.nodes["b"].state, NodeState::Lost);
    // The infrastructure failed the job: it is requeued, not failed, and
    // waits for its task on node a to stop.
    assert_eq!(w.state(j), JobState::Requeued);
    assert!(w.s.jobs[&j].reason.contains("node b lost"));
    assert_eq!(w.s.jobs[&j].failures, 0, "not counted against its restarts");
    let b = &w.s.nodes["b"];
    let one = Resources {
        gpus: 1,
        cpu_millis: 1,
        memory_bytes: 1,
    };
    assert!(
        crate::planner::fit::take(b, &w.s.node_usage("b"), &one).is_none(),
        "a lost node offers nothing"
    );
    assert_eq!(w.s.node_usage("b").gpus.len(), 0);
    // Node a's task still holds its GPUs until its agent reports the kill.
    assert_eq!(w.free_gpus("a"), 0);
    w.exit(j, 0, 143);
    assert_eq!(w.state(j), JobState::Pending);
    assert_eq!(w.s.jobs[&j].restart_count, 1);
    assert_eq!(w.free_gpus("a"), 4);
}

/// Issue 11 #1: losing a node that holds one running and one still-assigned
/// task of a gang (its third task runs elsewhere) released the assigned
/// task twice: once when the first loss requeued the job, again when the
/// loss reached it. Usage then disagreed with a replica restored from a
/// snapshot, and quotas admitted past their limits.
#[test]
fn losing_a_node_releases_each_task_once() {
    let mut w = World::new(&[("a", 2), ("b", 1)]);
    let j = w.submit(3, 1);
    w.schedule();
    let on = |w: &World, node: &str| -> Vec<u32> {
        let a = w.s.jobs[&j].alloc.as_ref().unwrap();
        (0..3)
            .filter(|&t| a.tasks[t as usize].placement.node == node)
            .collect()
    };
    let (on_a, on_b) = (on(&w, "a"), on(&w, "b"));
    assert_eq!((on_a.len(), on_b.len()), (2, 1));
    // One task on a runs, the other is still assigned; b's task runs.
    for t in [on_a[0], on_b[0]] {
        let key = w.key(j, t);
        w.cmd(Command::TaskStarted { key, at_ms: w.now });
    }
    w.cmd(Command::NodeLost {
        name: "a".into(),
        at_ms: w.now,
    });
    assert_eq!(w.state(j), JobState::Requeued);
    assert_eq!(
        w.s.tenant_use(DEFAULT_TENANT).gpus,
        1,
        "b's task still holds its GPU"
    );
    assert_eq!(w.s.tenant_use(DEFAULT_TENANT).cpu_millis, 1000);
    let restored = State::from_snapshot(&w.s.to_snapshot()).unwrap();
    assert_eq!(restored.tenant_use, w.s.tenant_use);
    assert_eq!(restored.usage, w.s.usage);
    assert_eq!(restored.digest(), w.s.digest());
    w.exit(j, on_b[0], 143);
    assert_eq!(w.state(j), JobState::Pending);
    assert_eq!(w.s.tenant_use(DEFAULT_TENANT), TenantUse::default());
    let restored = State::from_snapshot(&w.s.to_snapshot()).unwrap();
    assert_eq!(restored.tenant_use, w.s.tenant_use);
}

#[test]
fn reregistration_adopts_reported_tasks_and_loses_the_rest() {
    let mut w = World::new(&[("a", 8)]);
    let kept = w.submit(1, 4);
    let gone = w.submit(1, 4);
    w.schedule();
    w.start_all(kept);
    w.start_all(gone);
    let k = w.key(kept, 0);
    w.cmd(Command::RegisterNode {
        node: node("a", 8),
        running: vec![k],
        at_ms: 70,
    });
    assert_eq!(w.state(kept), JobState::Running);
    // Its only task was lost: straight back to the queue, restart counted.
    assert_eq!(w.state(gone), JobState::Pending);
    assert_eq!(w.s.jobs[&gone].restart_count, 1);
    assert!(w.s.jobs[&gone].reason.contains("came back without it"));
    assert_eq!(w.free_gpus("a"), 4);
}

#[test]
fn time_limit_is_checked_against_the_stamped_time() {
    let mut w = World::new(&[("a", 4)]);
    let id = match w.cmd(Command::Submit {
        request_id: None,
        spec: JobSpec {
            time_limit_secs: Some(60),
            ..spec(1, 1)
        },
        user: "u".into(),
        at_ms: 0,
    }) {
        ApplyResult::Submitted(id) => id,
        o => panic!("{o:?}"),
    };
    w.schedule();
    let key = w.key(id, 0);
    w.cmd(Command::TaskStarted { key, at_ms: 10_000 });
    assert!(matches!(
        w.cmd(Command::TimeOut {
            job: id,
            at_ms: 69_999
        }),
        ApplyResult::Rejected(_)
    ));
    assert_eq!(
        w.cmd(Command::TimeOut {
            job: id,
            at_ms: 70_000
        }),
        ApplyResult::Applied
    );
    assert_eq!(w.state(id), JobState::TimedOut);
}

#[test]
fn snapshot_round_trip_rebuilds_indexes() {
    let mut w = World::new(&[("a", 8)]);
    let a = w.submit(1, 2);
    let _b = w.submit(1, 8);
    w.schedule();
    w.start_all(a);
    let restored = State::from_snapshot(&w.s.to_snapshot()).unwrap();
    assert_eq!(restored.digest(), w.s.digest());
    assert_eq!(restored.pending, w.s.pending);
    assert_eq!(restored.active, w.s.active);
    assert_eq!(restored.usage, w.s.usage);
}

#[test]
fn replaying_the_log_gives_the_same_state() {
    let mut w = World::new(&[("a", 4), ("b", 4)]);
    let mut log = Vec::new();
    let mut run = |w: &mut World, c: Command| {
        log.push(c.clone());
        w.cmd(c);
    };
    run(
        &mut w,
        Command::Submit {
            request_id: None,
            spec: spec(2, 2),
            user: "u".into(),
            at_ms: 1,
        },
    );
    run(
        &mut w,
        Command::Submit {
            request_id: None,
            spec: spec(1, 4),
            user: "u".into(),
            at_ms: 2,
        },
    );
    let plan = planner::plan(&w.s, &Default::default(), w.now);
    run(
        &mut w,
        Command::ApplyPlan {
            term: 3,
            at_ms: 3,
            placements: plan.placements,
        },
    );
    run(
        &mut w,
        Command::Cancel {
            job: JobId(2),
            at_ms: 4,
        },
    );
    let mut replica = World::new(&[("a", 4), ("b", 4)]);
    for c in &log {
        replica.cmd(c.clone());
    }
    assert_eq!(replica.s.digest(), w.s.digest());
    let alloc = w.s.jobs[&JobId(1)].alloc.as_ref().unwrap();
    assert_eq!(alloc.term, 3);
    assert_eq!(alloc.master_port, apply::MASTER_PORT_BASE);
}

#[test]
fn master_ports_differ_for_gangs_led_from_the_same_node() {
    let mut w = World::new(&[("a", 8)]);
    let a = w.submit(1, 1);
    let b = w.submit(1, 1);
    w.schedule();
    let pa = w.s.jobs[&a].alloc.as_ref().unwrap().master_port;
    let pb = w.s.jobs[&b].alloc.as_ref().unwrap().master_port;
    assert_ne!(pa, pb);
}

/// Issue 12: two dev nodes on one host (both 127.0.0.1) led two gangs with
/// the same MASTER_PORT, and the second torch job died with EADDRINUSE.
#[test]
fn master_ports_differ_for_gangs_led_from_nodes_on_one_host() {
    let mut w = World::new(&[]);
    for n in ["dev-0", "dev-1"] {
        let mut reg = node(n, 1);
        reg.address = format!("127.0.0.1:{}", if n == "dev-0" { 4001 } else { 4002 });
        w.cmd(Command::RegisterNode {
            node: reg,
            running: vec![],
            at_ms: 0,
        });
    }
    let a = w.submit(1, 1);
    let b = w.submit(1, 1);
    w.schedule();
    let lead = |id: JobId| {
        let alloc = w.s.jobs[&id].alloc.as_ref().unwrap();
        (alloc.tasks[0].placement.node.clone(), alloc.master_port)
    };
    let ((na, pa), (nb, pb)) = (lead(a), lead(b));
    assert_ne!(
        na, nb,
        "one GPU per node: the gangs lead from different nodes"
    );
    assert_ne!(pa, pb, "same host, so different ports");
}

#[test]
fn job_arrays_are_all_or_nothing_and_idempotent() {
    let mut w = World::new(&[("a", 8)]);
    let arr = |w: &mut World, sp: JobSpec, key: &str| {
        w.cmd(Command::SubmitArray {
            spec: sp,
            user: "u".into(),
            at_ms: 1,
            request_id: Some(key.into()),
            count: 5,
        })
    };
    let first = match arr(&mut w, spec(1, 1), "k1") {
        ApplyResult::Submitted(id) => id,
        o => panic!("{o:?}"),
    };
    let ids: Vec<JobId> = w.s.jobs.keys().copied().collect();
    assert_eq!(ids.len(), 5);
    for (i, id) in ids.iter().enumerate() {
        let j = &w.s.jobs[id];
        assert_eq!(j.spec.name, format!("j[{i}]"));
        assert_eq!(j.spec.env["MUSTER_ARRAY_INDEX"], i.to_string());
    }
    // A retry with the same key creates nothing.
    assert_eq!(arr(&mut w, spec(1, 1), "k1"), ApplyResult::Submitted(first));
    assert_eq!(w.s.jobs.len(), 5);
    // A bad element rejects the whole array.
    let before = w.s.digest();
    assert!(matches!(
        arr(&mut w, spec(1, 9), "k2"),
        ApplyResult::Rejected(_)
    ));
    assert_eq!(w.s.digest(), before);
}

/// Issue 11 #9: an array whose later elements' names (`name[10]`, ...) are
/// over the name limit was accepted, those elements silently dropped, and
/// the submitter told the full count. The whole array is refused, naming
/// the field, and nothing is created.
#[test]
fn an_array_whose_element_names_are_too_long_is_refused_whole() {
    let mut w = World::new(&[("a", 8)]);
    let before = w.s.digest();
    let sp = JobSpec {
        // `name[9]` is exactly at the limit, `name[10]` one over.
        name: "n".repeat(crate::planner::fit::MAX_NAME_LEN - 3),
        ..spec(1, 1)
    };
    assert!(validate_array(&sp, 10).is_ok());
    let r = w.cmd(Command::SubmitArray {
        spec: sp.clone(),
        user: "u".into(),
        at_ms: 1,
        request_id: None,
        count: 12,
    });
    match r {
        ApplyResult::Rejected(msg) => {
            assert!(msg.starts_with("name: "), "{msg}");
            assert!(msg.contains("element 11"), "{msg}");
            assert!(msg.contains("at most 124 characters"), "{msg}");
        }
        other => panic!("accepted: {other:?}"),
    }
    assert_eq!(w.s.digest(), before, "nothing partially applied");
    assert!(w.s.jobs.is_empty());
    // At the limit, every element is created.
    let r = w.cmd(Command::SubmitArray {
        spec: sp,
        user: "u".into(),
        at_ms: 1,
        request_id: None,
        count: 10,
    });
    assert_eq!(r, ApplyResult::Submitted(JobId(1)));
    assert_eq!(w.s.jobs.len(), 10);
    assert_eq!(w.s.pending.len(), 10);
}

/// Issue 18 #12: a huge time limit wrapped the deadline arithmetic (the
/// leader proposed a time-out apply refused, every pass; `apply` read
/// `u64::MAX` seconds as -1 and timed the job out at once). Limits past the
/// maximum are refused naming `time`; deadlines saturate everywhere.
#[test]
fn huge_time_limits_are_refused_and_deadlines_saturate() {
    let mut w = World::new(&[("a", 4)]);
    for t in [u64::MAX, 1 << 62, crate::model::MAX_TIME_LIMIT_SECS + 1] {
        let r = w.cmd(Command::Submit {
            request_id: None,
            spec: JobSpec {
                time_limit_secs: Some(t),
                ..spec(1, 1)
            },
            user: "u".into(),
            at_ms: 1,
        });
        match r {
            ApplyResult::Rejected(msg) => assert!(msg.starts_with("time: "), "{msg}"),
            other => panic!("accepted: {other:?}"),
        }
    }
    assert!(w.s.jobs.is_empty());
    // The configured maximum (checked before proposing).
    let week = JobSpec {
        time_limit_secs: Some(7 * 86_400),
        ..spec(1, 1)
    };
    assert!(crate::model::check_time_limit(&week, 7 * 86_400).is_ok());
    let e = crate::model::check_time_limit(&week, 86_400).unwrap_err();
    assert!(e.starts_with("time: ") && e.contains("86400s"), "{e}");
    // A job that carries a huge limit anyway (written before the check):
    // its deadline is the end of time, not the past.
    let id = w.submit_limited(1, 1, Some(60));
    w.schedule();
    w.start_all(id);
    for t in [u64::MAX, 1 << 62] {
        w.s.jobs.get_mut(&id).unwrap().spec.time_limit_secs = Some(t);
        assert_eq!(w.s.jobs[&id].deadline_ms(), Some(i64::MAX));
        let r = w.cmd(Command::TimeOut {
            job: id,
            at_ms: w.now,
        });
        assert!(matches!(r, ApplyResult::Rejected(_)), "{r:?}");
        assert_eq!(w.state(id), JobState::Running);
    }
    assert_eq!(
        crate::planner::backfill::end_of(5, Some(u64::MAX)),
        i64::MAX
    );
}

/// Idempotency keys are scoped to their user (issue 11 #4): the same key
/// from another user is another request, and does not return (or reveal)
/// the first user's job.
#[test]
fn idempotency_keys_are_per_user() {
    let mut w = World::new(&[("a", 8)]);
    let sub = |w: &mut World, user: &str| match w.cmd(Command::Submit {
        request_id: Some("k".into()),
        spec: spec(1, 1),
        user: user.into(),
        at_ms: 1,
    }) {
        ApplyResult::Submitted(id) => id,
        o => panic!("{o:?}"),
    };
    let alice = sub(&mut w, "alice");
    assert_eq!(sub(&mut w, "alice"), alice, "a retry returns the job");
    let bob = sub(&mut w, "bob");
    assert_ne!(bob, alice, "bob's equal key is bob's own request");
    assert_eq!(w.s.jobs[&bob].user, "bob");
    assert_eq!(w.s.jobs.len(), 2);
}
