//! Property tests of the planner over random clusters, tenant trees and
//! queues: no GPU booked twice, no limit exceeded, gangs all or nothing, no
//! preemption unless the preemptor then fits, and the same plan for the same
//! input.

use super::placement::{Cluster, Req};
use super::{plan, Policy};
use crate::model::{JobSpec, JobState, Tenant, TopologySpec};
use crate::state::tests::{node, spec};
use crate::state::{ApplyResult, Command, State};
use proptest::prelude::*;
use std::collections::BTreeSet;

const TENANTS: [&str; 5] = ["default", "t1", "t1/a", "t1/b", "t2"];
const CLASSES: [&str; 3] = ["low", "normal", "high"];

#[derive(Debug, Clone)]
struct JobGen {
    tenant: usize,
    tasks: u32,
    gpus: u32,
    class: usize,
    limit: Option<u64>,
    topo: Option<bool>,
}

fn job_gen() -> impl Strategy<Value = JobGen> {
    (
        0..TENANTS.len(),
        1u32..4,
        0u32..5,
        0..CLASSES.len(),
        prop::option::of(60u64..7200),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(tenant, tasks, gpus, class, limit, topo)| JobGen {
            tenant,
            tasks,
            gpus,
            class,
            limit,
            topo,
        })
}

#[derive(Debug, Clone)]
struct World {
    nodes: Vec<(u32, bool)>,
    quotas: Vec<(u32, Option<u32>)>,
    running: Vec<JobGen>,
    pending: Vec<JobGen>,
}

fn world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec((1u32..9, any::<bool>()), 1..8),
        prop::collection::vec((0u32..6, prop::option::of(2u32..24)), 4),
        prop::collection::vec(job_gen(), 0..12),
        prop::collection::vec(job_gen(), 0..25),
    )
        .prop_map(|(nodes, quotas, running, pending)| World {
            nodes,
            quotas,
            running,
            pending,
        })
}

fn submit(s: &mut State, j: &JobGen, at_ms: i64) {
    let sp = JobSpec {
        tenant: TENANTS[j.tenant].into(),
        priority: CLASSES[j.class].into(),
        time_limit_secs: j.limit,
        topology: j.topo.map(|required| TopologySpec {
            label: "block".into(),
            required,
        }),
        ..spec(j.tasks, j.gpus)
    };
    // Jobs that can never fit are rejected at submit; that is fine here.
    let _ = s.apply(&Command::Submit {
        request_id: None,
        spec: sp,
        user: "u".into(),
        at_ms,
    });
}

/// Build the state: nodes, a tenant tree (guarantees that add up), running
/// jobs placed by the planner itself, then the pending queue.
fn build(w: &World, policy: &Policy) -> State {
    let mut s = State::new();
    for (i, (gpus, block)) in w.nodes.iter().enumerate() {
        let mut reg = node(&format!("n{i}"), *gpus);
        reg.labels
            .insert("block".into(), if *block { "x" } else { "y" }.into());
        s.apply(&Command::RegisterNode {
            node: reg,
            running: vec![],
            at_ms: 0,
        });
    }
    let (g1, l1) = w.quotas[0];
    let children = [(g1 / 2, w.quotas[1].1), (g1 / 2, w.quotas[2].1)];
    let tree = [
        ("t1", g1, l1),
        ("t1/a", children[0].0, children[0].1),
        ("t1/b", children[1].0, children[1].1),
        ("t2", w.quotas[3].0, w.quotas[3].1),
    ];
    for (name, g, l) in tree {
        let r = s.apply(&Command::CreateTenant {
            tenant: Box::new(Tenant {
                guarantee_gpus: g,
                gpu_limit: l.map(|l| l.max(g)),
                ..Tenant::open(name)
            }),
            default_for: vec![],
        });
        assert_eq!(r, ApplyResult::Applied, "{name}");
    }
    for j in &w.running {
        submit(&mut s, j, 1);
    }
    let p = plan(&s, policy, 1_000);
    s.apply(&Command::ApplyPlan {
        term: 1,
        at_ms: 1_000,
        placements: p.placements,
    });
    for j in &w.pending {
        submit(&mut s, j, 2_000);
    }
    s
}

fn gpus_booked_once(s: &State) -> Result<(), TestCaseError> {
    let mut seen = BTreeSet::new();
    for id in &s.active {
        for t in s.jobs[id].alloc.iter().flat_map(|a| &a.tasks) {
            if !t.state.holds_resources() {
                continue;
            }
            let n = &s.nodes[&t.placement.node];
            for g in &t.placement.gpus {
                prop_assert!(seen.insert((t.placement.node.clone(), *g)), "GPU {g} twice");
                prop_assert!(n.gpus.iter().any(|x| x.index == *g));
            }
        }
    }
    Ok(())
}

fn limits_hold(s: &State) -> Result<(), TestCaseError> {
    for t in s.tenants.values() {
        if let Some(l) = t.gpu_limit {
            prop_assert!(s.tenant_use(&t.name).gpus <= l, "{} over {l}", t.name);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn plans_are_safe_and_deterministic(w in world()) {
        let policy = Policy { min_runtime_ms: 0, ..Policy::default() };
        let mut s = build(&w, &policy);
        let now = 600_000;
        let p = plan(&s, &policy, now);
        prop_assert_eq!(&p, &plan(&s.clone(), &policy, now));

        for pl in &p.placements {
            prop_assert_eq!(pl.tasks.len() as u32, s.jobs[&pl.job].spec.tasks, "all or nothing");
        }
        if !p.preemptions.is_empty() {
            prop_assert_eq!(
                s.apply(&Command::Preempt { orders: p.preemptions.clone(), at_ms: now }),
                ApplyResult::Applied
            );
        }
        match s.apply(&Command::ApplyPlan { term: 1, at_ms: now, placements: p.placements.clone() }) {
            ApplyResult::Planned { rejected, placed } => {
                prop_assert!(rejected.is_empty(), "apply rejected a fresh plan: {:?}", rejected);
                for id in placed {
                    prop_assert_eq!(s.jobs[&id].state, JobState::Placed);
                }
            }
            o => prop_assert!(false, "{:?}", o),
        }
        gpus_booked_once(&s)?;
        limits_hold(&s)?;

        // Every preemptor fits once its victims have stopped.
        let victims: Vec<_> = s.jobs.values()
            .filter(|j| j.state == JobState::Preempting)
            .map(|j| j.id)
            .collect();
        for v in victims {
            let keys: Vec<_> = s.jobs[&v].alloc.iter()
                .flat_map(|a| a.tasks.iter().enumerate().map(move |(i, _)| (a.id.0, i as u32)))
                .collect();
            for (alloc, task) in keys {
                s.apply(&Command::TaskExited {
                    key: crate::state::TaskKey { job: v, alloc, task },
                    exit: Default::default(),
                    at_ms: now,
                });
            }
            prop_assert_eq!(s.jobs[&v].state, JobState::Pending);
        }
        let cl = Cluster::new(&s);
        for for_job in p.preemptions.iter().map(|o| o.for_job).collect::<BTreeSet<_>>() {
            let j = &s.jobs[&for_job];
            let req = Req { tasks: j.spec.tasks, per_task: j.spec.per_task };
            prop_assert!(
                cl.pick(&req, j.spec.topology.as_ref(), i64::MAX).is_ok(),
                "preemptor {} does not fit after its victims stopped", for_job
            );
        }
    }
}
