//! Scenario tests of the job lifecycle in `apply`: restarts after failures,
//! infrastructure requeues, GPU faults, drains, checkpoints steering
//! preemption. Each reads as a short story over a [`World`].

use super::tests::{node, spec, World};
use super::*;
use crate::model::{JobState, Lifecycle};
use crate::planner::{self, Policy};

fn submit_with(w: &mut World, tasks: u32, gpus: u32, f: impl FnOnce(&mut JobSpec)) -> JobId {
    let mut s = spec(tasks, gpus);
    f(&mut s);
    match w.cmd(Command::Submit {
        request_id: None,
        spec: s,
        user: "alice".into(),
        at_ms: w.now,
    }) {
        ApplyResult::Submitted(id) => id,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failed_task_restarts_the_gang_until_restarts_run_out() {
    let mut w = World::new(&[("a", 4), ("b", 4)]);
    let j = submit_with(&mut w, 2, 4, |s| {
        s.lifecycle = Lifecycle {
            max_restarts: 1,
            ..Lifecycle::default()
        }
    });
    w.schedule();
    w.start_all(j);
    w.exit(j, 0, 3);
    assert_eq!(
        w.state(j),
        JobState::Requeued,
        "task 1 is still being stopped"
    );
    assert!(w.s.jobs[&j].reason.contains("exit code 3; restart 1 of 1"));
    assert_eq!(w.s.jobs[&j].failures, 1);
    assert_eq!(w.s.jobs[&j].restart_count, 0);
    w.exit(j, 1, 143);
    assert_eq!(w.state(j), JobState::Pending);
    assert_eq!(w.s.jobs[&j].restart_count, 1);
    assert_eq!(w.free_gpus("a") + w.free_gpus("b"), 8);
    w.schedule();
    w.start_all(j);
    w.exit(j, 1, 3);
    assert_eq!(w.state(j), JobState::Failed, "no restarts left");
}

#[test]
fn a_gpu_fault_requeues_its_job_onto_healthy_gpus_and_outlives_reregistration() {
    let mut w = World::new(&[("a", 2)]);
    let j = w.submit(1, 1);
    w.schedule();
    w.start_all(j);
    let bad = w.s.jobs[&j].alloc.as_ref().unwrap().tasks[0].placement.gpus[0];
    let r = w.cmd(Command::GpuFailed {
        node: "a".into(),
        gpu: bad,
        reason: "XID 79: GPU has fallen off the bus".into(),
        drain: false,
        at_ms: w.now,
    });
    assert_eq!(r, ApplyResult::Applied);
    assert_eq!(w.state(j), JobState::Requeued);
    assert!(
        w.s.jobs[&j].reason.contains("not counted"),
        "{}",
        w.s.jobs[&j].reason
    );
    w.exit(j, 0, 137);
    assert_eq!(w.state(j), JobState::Pending);
    assert_eq!(w.s.jobs[&j].failures, 0);
    // The agent restarts and reports the GPU healthy again: the mark stays.
    w.cmd(Command::RegisterNode {
        node: node("a", 2),
        running: vec![],
        at_ms: w.now,
    });
    let g = &w.s.nodes["a"].gpus[bad as usize];
    assert!(!g.usable() && g.fault.contains("XID 79"));
    w.schedule();
    let placed = &w.s.jobs[&j].alloc.as_ref().unwrap().tasks[0].placement.gpus;
    assert_eq!(placed, &vec![1 - bad], "only the healthy GPU is used");
    // Resume clears the mark.
    w.cmd(Command::DrainNode {
        name: "a".into(),
        reason: None,
    });
    assert!(w.s.nodes["a"].gpus[bad as usize].usable());
}

/// Issue 11 #10: `muster node resume` marked healthy a GPU the agent still
/// reported unhealthy (it cleared the fault and set `healthy`). Resume
/// clears only what the scheduler recorded; the agent's latest report
/// decides the rest.
#[test]
fn resume_never_marks_healthy_a_gpu_the_agent_reports_unhealthy() {
    let mut w = World::new(&[("a", 2)]);
    w.cmd(Command::GpuFailed {
        node: "a".into(),
        gpu: 0,
        reason: "XID 48: double-bit ECC error".into(),
        drain: true,
        at_ms: w.now,
    });
    // The agent restarts and NVML still says GPU 0 is bad.
    let mut reg = node("a", 2);
    reg.gpus[0].healthy = false;
    w.cmd(Command::RegisterNode {
        node: reg,
        running: vec![],
        at_ms: w.now,
    });
    w.cmd(Command::DrainNode {
        name: "a".into(),
        reason: None,
    });
    let g = &w.s.nodes["a"].gpus[0];
    assert!(g.fault.is_empty(), "resume clears the recorded fault");
    assert!(!g.usable(), "the agent still reports it unhealthy");
    assert!(w.s.nodes["a"].drain.is_none());
    let j = w.submit(1, 2);
    let plan = planner::plan(&w.s, &Policy::default(), w.now);
    assert!(
        plan.placements.is_empty(),
        "one usable GPU, the job needs two"
    );
    // The agent reports it healthy again: usable, no resume needed.
    w.cmd(Command::RegisterNode {
        node: node("a", 2),
        running: vec![],
        at_ms: w.now,
    });
    assert!(w.s.nodes["a"].gpus[0].usable());
    assert_eq!(w.schedule(), vec![j]);
}

#[test]
fn a_gpu_fault_drains_the_node_when_the_policy_says_so() {
    let mut w = World::new(&[("a", 4), ("b", 4)]);
    w.cmd(Command::GpuFailed {
        node: "a".into(),
        gpu: 0,
        reason: "double-bit ECC error".into(),
        drain: true,
        at_ms: w.now,
    });
    assert_eq!(
        w.s.nodes["a"].drain.as_deref(),
        Some("GPU 0: double-bit ECC error")
    );
    let j = w.submit(1, 1);
    w.schedule();
    assert_eq!(
        w.s.jobs[&j].alloc.as_ref().unwrap().tasks[0].placement.node,
        "b"
    );
}

#[test]
fn a_drained_node_keeps_its_work_takes_none_and_refuses_a_stale_plan() {
    let mut w = World::new(&[("a", 4)]);
    let running = w.submit(1, 2);
    w.schedule();
    w.start_all(running);
    let waiting = w.submit(1, 2);
    let stale = planner::plan(&w.s, &Policy::default(), w.now);
    assert_eq!(stale.placements.len(), 1);
    let r = w.cmd(Command::DrainNode {
        name: "a".into(),
        reason: Some("maintenance".into()),
    });
    assert_eq!(r, ApplyResult::Applied);
    assert_eq!(w.state(running), JobState::Running, "running work finishes");
    match w.cmd(Command::ApplyPlan {
        term: 1,
        at_ms: w.now,
        placements: stale.placements,
    }) {
        ApplyResult::Planned { placed, rejected } => {
            assert!(placed.is_empty());
            assert!(
                rejected[0].1.contains("draining (maintenance)"),
                "{rejected:?}"
            );
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(w.state(waiting), JobState::Pending);
    assert!(planner::plan(&w.s, &Policy::default(), w.now)
        .placements
        .is_empty());
    assert_eq!(
        w.cmd(Command::DrainNode {
            name: "ghost".into(),
            reason: None
        }),
        ApplyResult::NotFound("node ghost not found".into())
    );
}

#[test]
fn checkpoints_are_recorded_for_the_current_run_only() {
    let mut w = World::new(&[("a", 4)]);
    let j = w.submit(1, 1);
    w.schedule();
    let key = w.key(j, 0);
    // A report may overtake the start on its way: still recorded.
    let early = w.cmd(Command::TaskCheckpointed {
        key,
        step: Some(1),
        at_ms: w.now,
    });
    assert_eq!(early, ApplyResult::Applied);
    w.start_all(j);
    let at = w.now;
    assert_eq!(
        w.cmd(Command::TaskCheckpointed {
            key,
            step: Some(7),
            at_ms: at
        }),
        ApplyResult::Applied
    );
    let cp = w.s.jobs[&j].last_checkpoint.clone().unwrap();
    assert_eq!((cp.at_ms, cp.step, cp.task), (at, Some(7), 0));
    let stale = TaskKey {
        alloc: key.alloc + 99,
        ..key
    };
    let r = w.cmd(Command::TaskCheckpointed {
        key: stale,
        step: None,
        at_ms: w.now,
    });
    assert!(matches!(r, ApplyResult::Rejected(m) if m.contains("not current")));
    w.exit(j, 0, 0);
    let late = w.cmd(Command::TaskCheckpointed {
        key,
        step: Some(8),
        at_ms: w.now,
    });
    assert!(matches!(late, ApplyResult::Rejected(m) if m.contains("not running")));
}

#[test]
fn the_victim_is_the_job_that_loses_least_work_since_its_checkpoint() {
    let mut w = World::new(&[("a", 2)]);
    let low = |s: &mut JobSpec| s.priority = "low".into();
    let older = submit_with(&mut w, 1, 1, low);
    let checkpointed = submit_with(&mut w, 1, 1, low);
    w.schedule();
    w.start_all(older);
    w.start_all(checkpointed);
    // Both started together; one reported a checkpoint an hour later.
    w.now += 3_600_000;
    let key = w.key(checkpointed, 0);
    w.cmd(Command::TaskCheckpointed {
        key,
        step: Some(100),
        at_ms: w.now,
    });
    w.now += 60_000;
    let urgent = submit_with(&mut w, 1, 1, |s| s.priority = "high".into());
    let plan = planner::plan(&w.s, &Policy::default(), w.now);
    assert_eq!(plan.preemptions.len(), 1, "{:?}", plan.verdicts);
    assert_eq!(plan.preemptions[0].victim, checkpointed);
    assert_eq!(plan.preemptions[0].for_job, urgent);
    w.cmd(Command::Preempt {
        orders: plan.preemptions,
        at_ms: w.now,
    });
    assert_eq!(w.state(checkpointed), JobState::Preempting);
    w.exit(checkpointed, 0, 0);
    assert_eq!(w.state(checkpointed), JobState::Pending);
    let j = &w.s.jobs[&checkpointed];
    assert_eq!(j.restart_count, 1);
    assert_eq!(j.failures, 0);
    assert_eq!(
        j.last_checkpoint.as_ref().unwrap().step,
        Some(100),
        "kept for the restart"
    );
}

#[test]
fn stop_signals_that_cannot_be_caught_are_refused() {
    let mut w = World::new(&[("a", 4)]);
    let before = w.s.digest();
    for sig in [9, 19, 0, 65] {
        let mut s = spec(1, 1);
        s.lifecycle.stop_signal = Some(sig);
        let r = w.cmd(Command::Submit {
            request_id: None,
            spec: s,
            user: "alice".into(),
            at_ms: w.now,
        });
        assert!(
            matches!(&r, ApplyResult::Rejected(m) if m.starts_with("signal")),
            "{sig}: {r:?}"
        );
    }
    assert_eq!(w.s.digest(), before, "a rejected submit changes nothing");
}
