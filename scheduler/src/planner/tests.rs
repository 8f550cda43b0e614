//! Scenario tests of the planner and its fit function.

use super::*;
use crate::model::JobSpec;
use crate::state::tests::{spec, World};
use crate::state::{ApplyResult, Command};

/// The planner with the default policy at a fixed time.
fn plan(s: &State) -> Plan {
    super::plan(s, &Policy::default(), 1_000_000)
}

#[test]
fn gang_is_all_or_nothing() {
    let mut w = World::new(&[("a", 4), ("b", 4)]);
    w.submit(1, 2);
    w.schedule();
    let big = w.submit(2, 4); // needs two 4-GPU slots; only one is free
    let raw = Policy {
        reservations: 0, // the raw verdict, not a reservation
        ..Policy::default()
    };
    let plan = super::plan(&w.s, &raw, 1_000_000);
    assert!(plan.placements.is_empty());
    match &plan.verdicts[&big] {
        Verdict::NoRoom { slots_free, .. } => assert_eq!(*slots_free, 1),
        v => panic!("{v:?}"),
    }
    let text = plan.verdicts[&big].to_string();
    assert!(
        text.contains("needs 2 tasks of 4 GPUs")
            && text.contains("room for 1 now: short of GPUs (6 free, at most 4 on one node)"),
        "{text}"
    );
}

#[test]
fn packs_a_gang_onto_the_fewest_nodes() {
    let mut w = World::new(&[("a", 8), ("b", 8)]);
    let j = w.submit(4, 2);
    let plan = plan(&w.s);
    let nodes: std::collections::BTreeSet<&str> = plan.placements[0]
        .tasks
        .iter()
        .map(|t| t.node.as_str())
        .collect();
    assert_eq!(nodes.len(), 1, "{plan:?}");
    assert_eq!(plan.placements[0].job, j);
}

#[test]
fn later_small_job_fills_gaps_the_head_job_cannot_use() {
    let mut w = World::new(&[("a", 4)]);
    let first = w.submit_limited(1, 1, Some(3600));
    assert_eq!(w.schedule(), vec![first]);
    let head = w.submit_limited(1, 4, None); // 3 GPUs free: must wait (reserved)
    let short = w.submit_limited(1, 1, Some(600)); // ends before the reservation
    let endless = w.submit_limited(1, 1, None); // would delay it
    assert_eq!(w.schedule(), vec![short]);
    assert_eq!(w.state(head), crate::model::JobState::Pending);
    let p = plan(&w.s);
    assert!(
        p.verdicts[&head]
            .to_string()
            .starts_with("reserved to start at"),
        "{p:?}"
    );
    assert!(
        p.verdicts[&endless]
            .to_string()
            .contains("would delay the reservation of job 2"),
        "{p:?}"
    );
}

#[test]
fn no_gpu_is_booked_twice_across_a_plan() {
    let mut w = World::new(&[("a", 8), ("b", 8)]);
    for _ in 0..10 {
        w.submit(1, 3);
    }
    let plan = plan(&w.s);
    let mut seen = std::collections::BTreeSet::new();
    for p in &plan.placements {
        for t in &p.tasks {
            for g in &t.gpus {
                assert!(seen.insert((t.node.clone(), *g)));
            }
        }
    }
    assert_eq!(plan.placements.len(), 4, "two 3-GPU tasks per 8-GPU node");
    assert_eq!(plan.verdicts.len(), 6);
}

#[test]
fn tenant_limit_holds_back_jobs_with_a_reason() {
    let mut w = World::new(&[("a", 8)]);
    w.cmd(Command::CreateTenant {
        tenant: Box::new(crate::model::Tenant {
            gpu_limit: Some(4),
            ..crate::model::Tenant::open("ml")
        }),
        default_for: vec![],
    });
    let mk = |w: &mut World| match w.cmd(Command::Submit {
        request_id: None,
        spec: JobSpec {
            tenant: "ml".into(),
            ..spec(1, 3)
        },
        user: "u".into(),
        at_ms: 1,
    }) {
        ApplyResult::Submitted(id) => id,
        o => panic!("{o:?}"),
    };
    let a = mk(&mut w);
    let b = mk(&mut w);
    let plan = plan(&w.s);
    assert_eq!(plan.placements.len(), 1);
    assert_eq!(plan.placements[0].job, a);
    assert!(plan.verdicts[&b]
        .to_string()
        .contains("tenant ml at its limit"));
}

#[test]
fn unhealthy_and_lost_capacity_is_not_used() {
    let mut w = World::new(&[("a", 2), ("b", 2)]);
    w.s.nodes.get_mut("a").unwrap().gpus[0].healthy = false;
    w.cmd(Command::NodeLost {
        name: "b".into(),
        at_ms: 1,
    });
    let j = w.submit(1, 2);
    let p = plan(&w.s);
    assert!(p.placements.is_empty());
    assert!(p.verdicts.contains_key(&j));
}

#[test]
fn planning_is_deterministic() {
    let mut w = World::new(&[("a", 8), ("b", 4), ("c", 8)]);
    for i in 0..20 {
        w.submit(1 + i % 3, 1 + i % 4);
    }
    assert_eq!(plan(&w.s), plan(&w.s.clone()));
}

#[test]
fn no_nodes_is_said_plainly() {
    let mut w = World::new(&[]);
    let j = w.submit(1, 1);
    assert_eq!(plan(&w.s).verdicts[&j].to_string(), "no ready nodes");
}
