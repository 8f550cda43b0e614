//! Scenario tests of the scheduling policy, each a short story: tenants and
//! quotas, borrowing and reclaim, fair share over time, backfill and
//! reservations, topology, preemption, and the verdicts `muster why` prints.

use super::{plan, Plan, Policy, Verdict};
use crate::model::{JobId, JobSpec, JobState, Tenant, TopologySpec};
use crate::state::tests::{node, spec, World};
use crate::state::{ApplyResult, Command, TenantPatch};

pub(super) const MIN: i64 = 60_000;

/// A world with a policy, a clock in milliseconds, and the leader's moves.
pub(super) struct Sim {
    pub(super) w: World,
    pub(super) policy: Policy,
}

impl Sim {
    pub(super) fn new(nodes: &[(&str, u32)]) -> Sim {
        let mut w = World::new(nodes);
        w.now = 1_000_000;
        Sim {
            w,
            policy: Policy {
                min_runtime_ms: 5 * MIN,
                ..Policy::default()
            },
        }
    }

    pub(super) fn tenant(&mut self, name: &str, guarantee: u32, limit: Option<u32>, weight: u32) {
        let r = self.w.s.apply(&Command::CreateTenant {
            tenant: Box::new(Tenant {
                guarantee_gpus: guarantee,
                gpu_limit: limit,
                weight,
                ..Tenant::open(name)
            }),
            default_for: vec![],
        });
        assert_eq!(r, ApplyResult::Applied, "create {name}");
    }

    pub(super) fn job(
        &mut self,
        tenant: &str,
        tasks: u32,
        gpus: u32,
        f: impl FnOnce(&mut JobSpec),
    ) -> JobId {
        let mut s = JobSpec {
            tenant: tenant.into(),
            ..spec(tasks, gpus)
        };
        f(&mut s);
        match self.w.s.apply(&Command::Submit {
            request_id: None,
            spec: s,
            user: "alice".into(),
            at_ms: self.w.now,
        }) {
            ApplyResult::Submitted(id) => id,
            o => panic!("{o:?}"),
        }
    }

    /// One leader pass: plan, record preemptions, apply placements, start them.
    pub(super) fn pass(&mut self) -> Plan {
        let p = plan(&self.w.s, &self.policy, self.w.now);
        let now = self.w.now;
        if !p.preemptions.is_empty() {
            let r = self.w.s.apply(&Command::Preempt {
                orders: p.preemptions.clone(),
                at_ms: now,
            });
            assert_eq!(r, ApplyResult::Applied);
        }
        match self.w.s.apply(&Command::ApplyPlan {
            term: 1,
            at_ms: now,
            placements: p.placements.clone(),
        }) {
            ApplyResult::Planned { rejected, .. } => assert!(rejected.is_empty(), "{rejected:?}"),
            o => panic!("{o:?}"),
        }
        for pl in &p.placements {
            self.w.start_all(pl.job);
        }
        p
    }

    /// Let time pass: tasks past their limit and preempted tasks exit.
    pub(super) fn advance(&mut self, ms: i64) {
        self.w.now += ms;
        let now = self.w.now;
        let ids: Vec<JobId> = self.w.s.active.iter().copied().collect();
        for id in ids {
            let j = &self.w.s.jobs[&id];
            let due = j
                .spec
                .time_limit_secs
                .is_some_and(|l| j.started_at_ms + l as i64 * 1000 <= now);
            if due || j.state == JobState::Preempting {
                let code = if due { 0 } else { 143 };
                for t in 0..j.spec.tasks {
                    let key = self.w.key(id, t);
                    self.w.s.apply(&Command::TaskExited {
                        key,
                        exit: crate::model::ExitInfo {
                            code: Some(code),
                            ..Default::default()
                        },
                        at_ms: now,
                    });
                }
            }
        }
        self.w.s.apply(&Command::AccrueUsage {
            at_ms: now,
            half_life_secs: 30 * 24 * 3600,
        });
    }

    pub(super) fn state(&self, id: JobId) -> JobState {
        self.w.s.jobs[&id].state
    }
}

fn limit(secs: u64) -> impl FnOnce(&mut JobSpec) {
    move |s| s.time_limit_secs = Some(secs)
}

#[test]
fn tenant_tree_rules_are_enforced_with_clear_errors() {
    let mut s = Sim::new(&[("a", 8)]);
    s.tenant("ml", 16, Some(32), 1);
    s.tenant("ml/nlp", 10, Some(24), 1);
    let too_much = s.w.s.apply(&Command::CreateTenant {
        tenant: Box::new(Tenant {
            guarantee_gpus: 8,
            ..Tenant::open("ml/cv")
        }),
        default_for: vec![],
    });
    assert_eq!(
        too_much,
        ApplyResult::Rejected(
            "tenant ml/cv: guarantees of ml's children would add up to 18 GPUs, \
             more than its guarantee of 16"
                .into()
        )
    );
    let orphan = s.w.s.apply(&Command::CreateTenant {
        tenant: Box::new(Tenant::open("bio/x")),
        default_for: vec![],
    });
    assert!(
        matches!(orphan, ApplyResult::Rejected(m) if m.contains("parent tenant bio does not exist"))
    );
    let shrink = s.w.s.apply(&Command::UpdateTenant {
        name: "ml".into(),
        patch: Box::new(TenantPatch {
            guarantee_gpus: Some(4),
            ..Default::default()
        }),
    });
    assert!(
        matches!(shrink, ApplyResult::Rejected(m) if m.contains("children's guarantees add up to 10"))
    );
    let below = s.w.s.apply(&Command::UpdateTenant {
        name: "ml/nlp".into(),
        patch: Box::new(TenantPatch {
            gpu_limit: Some(Some(5)),
            ..Default::default()
        }),
    });
    assert!(matches!(below, ApplyResult::Rejected(m) if m.contains("below its guarantee")));
    let j = s.job("ml/nlp", 1, 1, |_| {});
    let busy = s.w.s.apply(&Command::DeleteTenant {
        name: "ml/nlp".into(),
    });
    assert!(matches!(busy, ApplyResult::Rejected(m) if m.contains("1 unfinished job(s)")));
    let parent = s.w.s.apply(&Command::DeleteTenant { name: "ml".into() });
    assert!(matches!(parent, ApplyResult::Rejected(m) if m.contains("has child tenant ml/nlp")));
    s.w.s.apply(&Command::Cancel { job: j, at_ms: 1 });
    let digest = s.w.s.digest();
    assert_eq!(
        s.w.s.apply(&Command::DeleteTenant {
            name: "nope".into()
        }),
        ApplyResult::NotFound("tenant nope not found".into())
    );
    assert_eq!(s.w.s.digest(), digest, "a rejected command changes nothing");
    assert_eq!(
        s.w.s.apply(&Command::DeleteTenant {
            name: "ml/nlp".into()
        }),
        ApplyResult::Applied
    );
}

#[test]
fn members_and_default_tenants() {
    let mut s = Sim::new(&[("a", 8)]);
    s.tenant("ml", 0, None, 1);
    let r = s.w.s.apply(&Command::UpdateTenant {
        name: "ml".into(),
        patch: Box::new(TenantPatch {
            add_members: vec!["alice".into()],
            default_for: vec!["alice".into()],
            ..Default::default()
        }),
    });
    assert_eq!(r, ApplyResult::Applied);
    let j = s.job("", 1, 1, |_| {});
    assert_eq!(
        s.w.s.jobs[&j].spec.tenant, "ml",
        "empty tenant: the user's default"
    );
    let bob = s.w.s.apply(&Command::Submit {
        request_id: None,
        spec: JobSpec {
            tenant: "ml".into(),
            ..spec(1, 1)
        },
        user: "bob".into(),
        at_ms: 1,
    });
    assert_eq!(
        bob,
        ApplyResult::Rejected("user bob is not a member of tenant ml".into())
    );
}

#[test]
fn limits_hold_on_every_ancestor_and_say_which() {
    let mut s = Sim::new(&[("a", 8), ("b", 8)]);
    s.tenant("ml", 0, Some(8), 1);
    s.tenant("ml/nlp", 0, Some(16), 1);
    let first = s.job("ml/nlp", 1, 6, |_| {});
    let second = s.job("ml/nlp", 1, 4, |_| {});
    let p = s.pass();
    assert_eq!(p.placements.len(), 1);
    assert_eq!(s.state(first), JobState::Running);
    assert_eq!(
        p.verdicts[&second].to_string(),
        "tenant ml/nlp at its limit of 8 GPUs on ancestor ml (6 GPUs in use, job needs 4 GPUs)"
    );
    let never = s.w.s.apply(&Command::Submit {
        request_id: None,
        spec: JobSpec {
            tenant: "ml/nlp".into(),
            ..spec(2, 8)
        },
        user: "u".into(),
        at_ms: 1,
    });
    assert!(matches!(never, ApplyResult::Rejected(m) if m.contains("can never start")));
}

#[test]
fn borrowing_then_reclaim() {
    let mut s = Sim::new(&[("a", 8), ("b", 8)]);
    s.tenant("x", 8, Some(16), 1);
    s.tenant("y", 8, Some(16), 1);
    let xs: Vec<JobId> = (0..16).map(|_| s.job("x", 1, 1, |_| {})).collect();
    s.pass();
    let borrowed = xs
        .iter()
        .filter(|id| s.w.s.jobs[id].alloc.as_ref().is_some_and(|a| a.borrowed))
        .count();
    assert_eq!(borrowed, 8, "x's use beyond its guarantee of 8 is borrowed");
    // y wants its guarantee back; x's jobs are protected for min_runtime.
    let y = s.job("y", 1, 4, |_| {});
    let p = s.pass();
    assert!(p.preemptions.is_empty(), "min runtime protects");
    // ... and y is told whom it will preempt, and when.
    let text = p.verdicts[&y].to_string();
    assert!(
        text.starts_with("will preempt jobs ")
            && text.contains("when their minimum runtime ends at")
            && text.ends_with("(in 5m)"),
        "{text}"
    );
    s.advance(6 * MIN);
    let p = s.pass();
    assert_eq!(p.preemptions.len(), 4, "{:?}", p.preemptions);
    for o in &p.preemptions {
        assert!(s.w.s.jobs[&o.victim].alloc.as_ref().unwrap().borrowed);
        assert!(o
            .reason
            .contains("tenant y reclaiming its guarantee of 8 GPUs"));
    }
    let text = p.verdicts[&y].to_string();
    assert!(
        text.starts_with("waiting for the preemption of jobs"),
        "{text}"
    );
    // Victims stop, go back to pending with a restart, and y starts.
    s.advance(MIN);
    for o in &p.preemptions {
        assert_eq!(s.state(o.victim), JobState::Pending);
        assert_eq!(s.w.s.jobs[&o.victim].restart_count, 1);
    }
    s.pass();
    assert_eq!(s.state(y), JobState::Running);
    assert!(!s.w.s.jobs[&y].alloc.as_ref().unwrap().borrowed);
}

#[test]
fn higher_priority_preempts_lower_but_only_if_it_then_fits() {
    let mut s = Sim::new(&[("a", 8), ("b", 8)]);
    let low: Vec<JobId> = (0..2)
        .map(|_| s.job("default", 1, 4, |j| j.priority = "low".into()))
        .collect();
    s.pass();
    // Node b runs a high job, which no other high job may preempt.
    s.job("default", 1, 8, |j| j.priority = "high".into());
    s.pass();
    s.advance(10 * MIN);
    let too_big = s.job("default", 2, 8, |j| j.priority = "high".into());
    let p = s.pass();
    assert!(
        p.preemptions.is_empty(),
        "a 16-GPU gang cannot fit on the 8 GPUs preemption could free"
    );
    assert!(p.verdicts.contains_key(&too_big));
    s.w.s.apply(&Command::Cancel {
        job: too_big,
        at_ms: 1,
    });
    let high = s.job("default", 1, 6, |j| j.priority = "high".into());
    let p = s.pass();
    let mut victims: Vec<JobId> = p.preemptions.iter().map(|o| o.victim).collect();
    victims.sort();
    assert_eq!(victims, low, "both 4-GPU gangs must go for 6 GPUs");
    s.advance(MIN);
    s.pass();
    assert_eq!(s.state(high), JobState::Running);
}

#[test]
fn fair_share_converges_to_the_weights() {
    let mut s = Sim::new(&[("a", 4)]);
    s.tenant("heavy", 0, None, 3);
    s.tenant("light", 0, None, 1);
    for _ in 0..200 {
        s.job("light", 1, 1, limit(60));
        s.job("heavy", 1, 1, limit(60));
    }
    for _ in 0..60 {
        s.pass();
        s.advance(MIN);
    }
    let h = s.w.s.fair_usage["heavy"];
    let l = s.w.s.fair_usage["light"];
    let ratio = h / l;
    assert!(
        (2.5..=3.5).contains(&ratio),
        "heavy/light = {ratio} (usage {h} vs {l})"
    );
}

#[test]
fn backfill_never_delays_the_reservation() {
    let mut s = Sim::new(&[("a", 8)]);
    let running = s.job("default", 1, 4, limit(3600));
    s.pass();
    let big = s.job("default", 1, 8, limit(3600));
    let long = s.job("default", 1, 4, limit(2 * 3600));
    let short = s.job("default", 1, 4, limit(1800));
    let p = s.pass();
    let start = s.w.s.jobs[&running].started_at_ms + 3600 * 1000;
    assert_eq!(p.reservations.len(), 1);
    assert_eq!(
        (p.reservations[0].job, p.reservations[0].start_ms),
        (big, start)
    );
    assert_eq!(
        s.state(short),
        JobState::Running,
        "ends before the reservation"
    );
    assert_eq!(s.state(long), JobState::Pending, "would run past it");
    assert_eq!(
        p.verdicts[&long],
        Verdict::BehindReservation {
            job: big,
            start_ms: start
        }
    );
    // At the reserved time the big gang starts, as promised.
    s.advance(3600 * 1000);
    s.pass();
    assert_eq!(s.state(big), JobState::Running);
    let started = s.w.s.jobs[&big].started_at_ms;
    assert!(
        (start..start + 10).contains(&started),
        "{started} vs {start}"
    );
}

#[test]
fn a_large_gang_is_not_starved_by_small_jobs() {
    let mut s = Sim::new(&[("a", 8), ("b", 8)]);
    for _ in 0..16 {
        s.job("default", 1, 1, limit(1800));
    }
    s.pass();
    let gang = s.job("default", 2, 8, limit(3600));
    let mut started = None;
    for round in 0..20 {
        for _ in 0..4 {
            s.job("default", 1, 1, limit(1800)); // a steady stream
        }
        s.pass();
        if s.state(gang) == JobState::Running {
            started = Some(round);
            break;
        }
        s.advance(10 * MIN);
    }
    assert!(
        started.is_some_and(|r| r <= 4),
        "gang started in round {started:?}"
    );
}

#[test]
fn topology_keeps_gangs_in_one_block_and_gpus_in_one_link_group() {
    let mut w = World::new(&[]);
    for (name, block) in [("n1", "x"), ("n2", "y"), ("n3", "y"), ("n4", "z")] {
        let mut reg = node(name, 8);
        reg.labels.insert("block".into(), block.into());
        w.cmd(Command::RegisterNode {
            node: reg,
            running: vec![],
            at_ms: 0,
        });
    }
    let mut s = Sim {
        w,
        policy: Policy::default(),
    };
    let same = |required| {
        move |j: &mut JobSpec| {
            j.topology = Some(TopologySpec {
                label: "block".into(),
                required,
            })
        }
    };
    // Both small jobs go to n1 (best fit); only block y has two whole nodes.
    s.job("default", 1, 1, |_| {});
    s.job("default", 1, 1, |_| {});
    s.pass();
    let gang = s.job("default", 2, 8, same(true));
    s.pass();
    let nodes: Vec<String> = s.w.s.jobs[&gang]
        .alloc
        .as_ref()
        .unwrap()
        .tasks
        .iter()
        .map(|t| t.placement.node.clone())
        .collect();
    assert_eq!(nodes, ["n2", "n3"]);
    let stuck = s.job("default", 2, 8, same(true));
    s.policy.reservations = 0; // show the raw verdict, not a reservation
    let p = s.pass();
    assert_eq!(
        p.verdicts[&stuck].to_string(),
        "needs 2 tasks of 8 GPUs, 1 CPU, 1 GiB in one block; \
         at most 1 available in any block (closest is block z with 1 ready node: \
         short of GPUs (8 free, at most 8 on one node))"
    );
    // Within a node: link groups are GPUs 0-3 and 4-7 (see `state::tests::node`).
    let first = s.w.s.jobs[&JobId(1)].alloc.as_ref().unwrap().tasks[0]
        .placement
        .clone();
    assert_eq!(
        (first.node.as_str(), first.gpus.as_slice()),
        ("n1", &[0][..])
    );
    s.w.s.apply(&Command::Cancel {
        job: stuck,
        at_ms: 1,
    });
    let four = s.job("default", 1, 4, |_| {});
    s.pass();
    let t = &s.w.s.jobs[&four].alloc.as_ref().unwrap().tasks[0].placement;
    assert_eq!(t.gpus, [4, 5, 6, 7], "one whole link group, not 1-4");
}

#[test]
fn verdicts_read_as_sentences() {
    let mut s = Sim::new(&[("a", 8)]);
    let hog = s.job("default", 1, 8, |_| {});
    s.pass();
    let waiting = s.job("default", 1, 8, |_| {});
    let p = s.pass();
    assert_eq!(s.state(hog), JobState::Running);
    let text = p.verdicts[&waiting].to_string();
    assert!(
        text.starts_with("reserved: holds node a, whose running jobs have no time limit"),
        "{text}"
    );
    assert_eq!(p.order, vec![waiting]);
}

#[test]
fn a_reservation_counts_jobs_placed_in_the_same_pass() {
    let mut s = Sim::new(&[("a", 8)]);
    let first = s.job("default", 1, 8, limit(3600));
    let second = s.job("default", 1, 8, limit(3600));
    let now = s.w.now;
    let p = plan(&s.w.s, &s.policy, now);
    assert_eq!(p.placements.len(), 1);
    assert_eq!(p.placements[0].job, first);
    assert_eq!(
        p.verdicts[&second],
        Verdict::Reserved {
            start_ms: now + 3600 * 1000,
            now_ms: now,
            nodes: vec!["a".into()],
        }
    );
}
