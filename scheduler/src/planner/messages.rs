//! Scenario tests of what the planner tells users: gangs that can never run
//! are refused at submit with the numbers that prove it, and a pending
//! job's verdict names what it waits for (the short resource, the protected
//! victim, the job still being killed).

use super::scenarios::{Sim, MIN};
use super::{format_time, Policy, Verdict};
use crate::model::{JobSpec, JobState, TopologySpec};
use crate::state::tests::{node, spec, World};
use crate::state::{ApplyResult, Command};

/// Submit `s` and return the refusal, panicking if it was accepted.
fn refusal(w: &mut World, s: JobSpec) -> String {
    match w.cmd(Command::Submit {
        request_id: None,
        spec: s,
        user: "alice".into(),
        at_ms: 1,
    }) {
        ApplyResult::Rejected(why) => why,
        other => panic!("accepted: {other:?}"),
    }
}

fn accepted(w: &mut World, s: JobSpec) -> bool {
    let r = w.cmd(Command::Submit {
        request_id: None,
        spec: s,
        user: "alice".into(),
        at_ms: 1,
    });
    matches!(r, ApplyResult::Submitted(_))
}

fn with(tasks: u32, gpus: u32, f: impl FnOnce(&mut JobSpec)) -> JobSpec {
    let mut s = spec(tasks, gpus);
    f(&mut s);
    s
}

fn same(label: &str, required: bool) -> impl FnOnce(&mut JobSpec) + '_ {
    move |s| {
        s.topology = Some(TopologySpec {
            label: label.into(),
            required,
        })
    }
}

/// A world of 8-GPU nodes, each with a `block` label.
fn blocks(nodes: &[(&str, &str)]) -> World {
    let mut w = World::new(&[]);
    for (name, block) in nodes {
        let mut reg = node(name, 8);
        reg.labels.insert("block".into(), block.to_string());
        w.cmd(Command::RegisterNode {
            node: reg,
            running: vec![],
            at_ms: 0,
        });
    }
    w
}

#[test]
fn gangs_that_can_never_fit_are_refused_at_submit_naming_why() {
    let mut w = World::new(&[("a", 8), ("b", 8)]);
    assert_eq!(
        refusal(&mut w, spec(4, 8)),
        "job can never start: the gang needs 4 tasks of 8 GPUs, 1 CPU, 1 GiB \
         but at most 2 fit in the whole cluster (2 nodes with 8 GPUs)"
    );
    assert_eq!(
        refusal(&mut w, spec(5, 4)),
        "job can never start: the gang needs 5 tasks of 4 GPUs, 1 CPU, 1 GiB \
         but at most 4 fit in the whole cluster (2 nodes with 8 GPUs (2 tasks each))"
    );
    assert_eq!(
        refusal(&mut w, spec(1, 9)),
        "job can never start: a task asks for 9 GPUs but the largest node has 8"
    );
    let big_mem = with(1, 0, |s| s.per_task.memory_bytes = 600 << 30);
    assert_eq!(
        refusal(&mut w, big_mem),
        "job can never start: a task asks for 600 GiB of memory \
         but the largest node has 512 GiB"
    );
    // CPUs limit how many tasks a node holds (nodes have 64 CPUs).
    let cpu_bound = with(3, 0, |s| s.per_task.cpu_millis = 40_000);
    assert_eq!(
        refusal(&mut w, cpu_bound),
        "job can never start: the gang needs 3 tasks of 40 CPUs, 1 GiB \
         but at most 2 fit in the whole cluster (2 nodes with 64 CPUs)"
    );
    assert!(accepted(&mut w, spec(2, 8)), "exactly the cluster fits");
    assert!(accepted(&mut w, spec(4, 4)));
}

#[test]
fn a_required_label_must_exist_and_hold_the_gang() {
    let mut w = blocks(&[("n1", "x"), ("n2", "y"), ("n3", "y")]);
    assert_eq!(
        refusal(&mut w, with(1, 1, same("rack", true))),
        "job can never start: the gang must stay within one \"rack\" (--same rack) \
         but no node has a \"rack\" label"
    );
    assert_eq!(
        refusal(&mut w, with(3, 8, same("block", true))),
        "job can never start: the gang needs 3 tasks of 8 GPUs, 1 CPU, 1 GiB in one block \
         but at most 2 fit in any one block (the largest, block=y: 2 nodes with 8 GPUs)"
    );
    assert!(accepted(&mut w, with(2, 8, same("block", true))));
    // Only preferred: a missing label is no reason to refuse.
    assert!(accepted(&mut w, with(1, 1, same("rack", false))));
    assert!(accepted(&mut w, with(3, 8, same("block", false))));
}

#[test]
fn nodes_that_may_come_back_count_and_an_empty_cluster_accepts() {
    // No node registered yet: the cluster may be starting.
    let mut w = World::new(&[]);
    assert!(accepted(&mut w, spec(4, 8)));
    // A drained node and a lost one still count: they may come back.
    let mut w = World::new(&[("a", 8), ("b", 8), ("c", 8)]);
    w.cmd(Command::DrainNode {
        name: "a".into(),
        reason: Some("maintenance".into()),
    });
    w.cmd(Command::NodeLost {
        name: "b".into(),
        at_ms: 5,
    });
    assert!(accepted(&mut w, spec(3, 8)));
    assert!(refusal(&mut w, spec(4, 8)).contains("at most 3 fit in the whole cluster"));
}

fn raw_verdict(s: &mut Sim, job: crate::model::JobId) -> String {
    let p = super::plan(
        &s.w.s,
        &Policy {
            reservations: 0,
            ..s.policy.clone()
        },
        s.w.now,
    );
    p.verdicts[&job].to_string()
}

#[test]
fn no_room_names_the_resource_that_is_short() {
    let mut s = Sim::new(&[("a", 8), ("b", 8)]);
    // CPUs: a 60-CPU job on each node leaves 4 CPUs on each.
    for _ in 0..2 {
        s.job("default", 1, 1, |j| j.per_task.cpu_millis = 60_000);
    }
    s.pass();
    let cpu = s.job("default", 1, 1, |j| j.per_task.cpu_millis = 8000);
    assert_eq!(
        raw_verdict(&mut s, cpu),
        "needs 1 task of 1 GPU, 8 CPUs, 1 GiB; room for 0 now: \
         short of CPUs (8 CPUs free, at most 4 CPUs on one node)"
    );
    // Memory, in human units.
    let mut s = Sim::new(&[("a", 8)]);
    s.job("default", 1, 1, |j| j.per_task.memory_bytes = 500 << 30);
    s.pass();
    let mem = s.job("default", 1, 1, |j| j.per_task.memory_bytes = 100 << 30);
    assert_eq!(
        raw_verdict(&mut s, mem),
        "needs 1 task of 1 GPU, 1 CPU, 100 GiB; room for 0 now: \
         short of memory (12 GiB free, at most 12 GiB on one node)"
    );
}

#[test]
fn no_room_says_when_free_resources_are_on_different_nodes() {
    let mut s = Sim::new(&[("a", 2), ("b", 2)]);
    s.job("default", 1, 2, |j| j.per_task.cpu_millis = 4000); // on a
    s.pass();
    s.job("default", 1, 0, |j| j.per_task.cpu_millis = 62_000); // only b holds it
    s.pass();
    let both = s.job("default", 1, 1, |j| j.per_task.cpu_millis = 8000);
    assert_eq!(
        raw_verdict(&mut s, both),
        "needs 1 task of 1 GPU, 8 CPUs, 1 GiB; room for 0 now: enough free GPUs, \
         CPUs and memory in all, but not together on the same nodes"
    );
}

#[test]
fn a_protected_victim_is_named_with_the_end_of_its_protection() {
    let mut s = Sim::new(&[("a", 8)]);
    let low = s.job("default", 1, 8, |j| j.priority = "low".into());
    s.pass();
    let started = s.w.s.jobs[&low].started_at_ms;
    s.advance(2 * MIN);
    let high = s.job("default", 1, 8, |j| j.priority = "high".into());
    let p = s.pass();
    assert!(p.preemptions.is_empty(), "min runtime protects");
    let ends = started + 5 * MIN;
    assert_eq!(
        p.verdicts[&high],
        Verdict::PreemptionPlanned {
            victims: vec![low],
            at_ms: ends,
            now_ms: s.w.now,
        }
    );
    assert_eq!(
        p.verdicts[&high].to_string(),
        format!(
            "will preempt job {low} when its minimum runtime ends at {} (in 3m)",
            format_time(ends)
        )
    );
    // The node is held from then on, and the preemption happens on time.
    assert!(p
        .reservations
        .iter()
        .any(|r| r.job == high && r.start_ms == ends && r.nodes == ["a"]));
    s.advance(3 * MIN);
    let p = s.pass();
    assert_eq!(p.preemptions.len(), 1);
    assert_eq!(p.preemptions[0].victim, low);
}

#[test]
fn a_protected_victim_that_ends_first_is_waited_for_not_preempted() {
    let mut s = Sim::new(&[("a", 8)]);
    let low = s.job("default", 1, 8, |j| {
        j.priority = "low".into();
        j.time_limit_secs = Some(120);
    });
    s.pass();
    s.advance(MIN);
    let high = s.job("default", 1, 8, |j| j.priority = "high".into());
    let p = s.pass();
    let text = p.verdicts[&high].to_string();
    assert!(text.starts_with("reserved to start at "), "{text}");
    assert!(!text.contains(&format!("preempt job {low}")), "{text}");
}

#[test]
fn a_job_still_being_killed_is_named_as_what_is_waited_for() {
    let mut s = Sim::new(&[("a", 8)]);
    let hog = s.job("default", 1, 8, |_| {});
    s.pass();
    let next = s.job("default", 1, 8, |_| {});
    assert!(s.pass().verdicts[&next]
        .to_string()
        .starts_with("reserved: holds node a, whose running jobs have no time limit"));
    let r = s.w.s.apply(&Command::Cancel {
        job: hog,
        at_ms: s.w.now,
    });
    assert_eq!(r, ApplyResult::Applied);
    assert_eq!(s.state(hog), JobState::Cancelled);
    let p = s.pass();
    assert_eq!(
        p.verdicts[&next].to_string(),
        format!("waiting for job {hog} to stop (cancelled; its tasks are being killed)")
    );
}
