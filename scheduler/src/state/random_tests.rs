//! A randomized test of the whole state machine (issue 11, "what must
//! exist"): random command sequences (submits, arrays, fresh and stale
//! plans, starts, exits, stale task events, node loss with mixed running and
//! assigned tasks, re-registrations, GPU faults, drains, resumes,
//! preemptions, cancels, time-outs, checkpoints, accruals, snapshots). After
//! every command:
//!
//! - the live state, derived indexes included, equals what
//!   `State::from_snapshot(&state.to_snapshot())` rebuilds;
//! - a replica that applies the same log but restarts from its own snapshot
//!   at random points gives the same result for every command and has the
//!   same digest;
//! - the indexes equal an independent recomputation from the jobs: no GPU is
//!   held by two tasks, node and tenant usage are the sums of the held
//!   placements, and no tenant or node holds more than its limits.

use super::tests::{node, spec};
use super::*;
use crate::model::{ExitInfo, JobState, Lifecycle, TaskState};
use crate::planner::{self, Policy};
use proptest::prelude::*;

const NODES: [(&str, u32); 3] = [("a", 4), ("b", 4), ("c", 2)];
const TENANTS: [&str; 3] = [DEFAULT_TENANT, "ml", "ml/nlp"];

#[derive(Debug, Clone)]
enum Op {
    Submit {
        tasks: u32,
        gpus: u32,
        tenant: usize,
        limit: Option<u64>,
        restarts: u32,
        priority: usize,
    },
    Array {
        count: u32,
        tenant: usize,
        long_name: bool,
    },
    Plan,
    SavePlan,
    ApplySaved,
    Start(usize),
    Exit(usize, i32),
    StaleEvent(usize, bool),
    NodeLost(usize),
    Register(usize, u8),
    GpuFail(usize, u32, bool),
    Drain(usize),
    Resume(usize),
    Preempt(usize, bool),
    Cancel(usize),
    TimeOut(usize, i64),
    Checkpoint(usize),
    Accrue(i64),
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    let sel = any::<usize>();
    prop_oneof![
        4 => (1u32..=3, 0u32..=3, 0..TENANTS.len(), prop::option::of(1u64..100), 0u32..=2, 0usize..3)
            .prop_map(|(tasks, gpus, tenant, limit, restarts, priority)| Op::Submit {
                tasks, gpus, tenant, limit, restarts, priority
            }),
        1 => (1u32..=4, 0..TENANTS.len(), any::<bool>())
            .prop_map(|(count, tenant, long_name)| Op::Array { count, tenant, long_name }),
        4 => Just(Op::Plan),
        1 => Just(Op::SavePlan),
        1 => Just(Op::ApplySaved),
        5 => sel.prop_map(Op::Start),
        4 => (sel, prop_oneof![Just(0), Just(1), Just(137)]).prop_map(|(s, c)| Op::Exit(s, c)),
        1 => (sel, any::<bool>()).prop_map(|(s, e)| Op::StaleEvent(s, e)),
        1 => (0..NODES.len()).prop_map(Op::NodeLost),
        2 => (0..NODES.len(), any::<u8>()).prop_map(|(n, m)| Op::Register(n, m)),
        1 => (0..NODES.len(), 0u32..4, any::<bool>()).prop_map(|(n, g, d)| Op::GpuFail(n, g, d)),
        1 => (0..NODES.len()).prop_map(Op::Drain),
        1 => (0..NODES.len()).prop_map(Op::Resume),
        1 => (sel, any::<bool>()).prop_map(|(s, st)| Op::Preempt(s, st)),
        1 => sel.prop_map(Op::Cancel),
        1 => (sel, 0i64..200_000).prop_map(|(s, dt)| Op::TimeOut(s, dt)),
        1 => sel.prop_map(Op::Checkpoint),
        1 => (0i64..100_000).prop_map(Op::Accrue),
        1 => Just(Op::Snapshot),
    ]
}

/// The state under test, a replica that restarts from snapshots, and the
/// little bit of memory the generator needs (stashed plans, the clock).
struct Sim {
    live: State,
    replica: State,
    saved: Vec<planner::Plan>,
    now: i64,
}

impl Sim {
    fn new() -> Sim {
        let mut sim = Sim {
            live: State::new(),
            replica: State::new(),
            saved: vec![],
            now: 1_000,
        };
        for (n, g) in NODES {
            sim.apply(Command::RegisterNode {
                node: node(n, g),
                running: vec![],
                at_ms: 0,
            });
        }
        let tenant = |name: &str, guarantee: u32, limit: u32| Tenant {
            guarantee_gpus: guarantee,
            gpu_limit: Some(limit),
            cpu_limit_millis: Some(8_000),
            ..Tenant::open(name)
        };
        for t in [tenant("ml", 2, 6), tenant("ml/nlp", 1, 3)] {
            let r = sim.apply(Command::CreateTenant {
                tenant: Box::new(t),
                default_for: vec![],
            });
            assert_eq!(r, ApplyResult::Applied);
        }
        sim
    }

    /// Apply to both; both must answer alike and stay alike.
    fn apply(&mut self, c: Command) -> ApplyResult {
        let r = self.live.apply(&c);
        let r2 = self.replica.apply(&c);
        assert_eq!(r, r2, "replicas answered {c:?} differently");
        r
    }

    /// Every task of every allocation, current or not, in id order.
    fn tasks(&self, f: impl Fn(&Job, TaskState) -> bool) -> Vec<TaskKey> {
        let mut out = Vec::new();
        for (id, j) in &self.live.jobs {
            let Some(a) = &j.alloc else { continue };
            for (i, t) in a.tasks.iter().enumerate() {
                if f(j, t.state) {
                    out.push(TaskKey {
                        job: *id,
                        alloc: a.id.0,
                        task: i as u32,
                    });
                }
            }
        }
        out
    }

    fn pick<T: Clone>(v: &[T], sel: usize) -> Option<T> {
        (!v.is_empty()).then(|| v[sel % v.len()].clone())
    }

    fn job_where(&self, sel: usize, f: impl Fn(&Job) -> bool) -> Option<JobId> {
        let ids: Vec<JobId> = self
            .live
            .jobs
            .values()
            .filter(|j| f(j))
            .map(|j| j.id)
            .collect();
        Self::pick(&ids, sel)
    }

    fn step(&mut self, op: &Op) {
        self.now += 250;
        let now = self.now;
        let exit = |code: i32| ExitInfo {
            code: Some(code),
            ..ExitInfo::default()
        };
        let cmd = match op.clone() {
            Op::Submit {
                tasks,
                gpus,
                tenant,
                limit,
                restarts,
                priority,
            } => Command::Submit {
                spec: JobSpec {
                    tenant: TENANTS[tenant].into(),
                    time_limit_secs: limit,
                    priority: ["", "low", "high"][priority].into(),
                    lifecycle: Lifecycle {
                        max_restarts: restarts,
                        ..Lifecycle::default()
                    },
                    ..spec(tasks, gpus)
                },
                user: "alice".into(),
                at_ms: now,
                request_id: None,
            },
            Op::Array {
                count,
                tenant,
                long_name,
            } => Command::SubmitArray {
                spec: JobSpec {
                    tenant: TENANTS[tenant].into(),
                    // At the name limit: every element's `name[i]` is over it.
                    name: if long_name {
                        "x".repeat(crate::planner::fit::MAX_NAME_LEN)
                    } else {
                        "arr".into()
                    },
                    ..spec(1, 1)
                },
                user: "bob".into(),
                at_ms: now,
                request_id: None,
                count,
            },
            Op::Plan => {
                let plan = planner::plan(&self.live, &Policy::default(), now);
                if !plan.preemptions.is_empty() {
                    let r = self.apply(Command::Preempt {
                        orders: plan.preemptions.clone(),
                        at_ms: now,
                    });
                    assert_eq!(r, ApplyResult::Applied, "fresh preemptions");
                }
                let r = self.apply(Command::ApplyPlan {
                    term: 1,
                    at_ms: now,
                    placements: plan.placements,
                });
                if let ApplyResult::Planned { rejected, .. } = &r {
                    assert!(
                        rejected.is_empty(),
                        "a fresh plan was rejected: {rejected:?}"
                    );
                }
                return;
            }
            Op::SavePlan => {
                self.saved
                    .push(planner::plan(&self.live, &Policy::default(), now));
                return;
            }
            Op::ApplySaved => {
                if self.saved.is_empty() {
                    return;
                }
                let plan = self.saved.remove(0);
                Command::ApplyPlan {
                    term: 1,
                    at_ms: now,
                    placements: plan.placements,
                }
            }
            Op::Start(sel) => {
                let Some(key) = Self::pick(&self.tasks(|_, s| s == TaskState::Assigned), sel)
                else {
                    return;
                };
                Command::TaskStarted { key, at_ms: now }
            }
            Op::Exit(sel, code) => {
                let Some(key) = Self::pick(&self.tasks(|_, s| s.holds_resources()), sel) else {
                    return;
                };
                Command::TaskExited {
                    key,
                    exit: exit(code),
                    at_ms: now,
                }
            }
            Op::StaleEvent(sel, exited) => {
                let Some(mut key) = Self::pick(&self.tasks(|_, _| true), sel) else {
                    return;
                };
                key.alloc = key.alloc.saturating_sub(1);
                if exited {
                    Command::TaskExited {
                        key,
                        exit: exit(1),
                        at_ms: now,
                    }
                } else {
                    Command::TaskStarted { key, at_ms: now }
                }
            }
            Op::NodeLost(n) => Command::NodeLost {
                name: NODES[n].0.into(),
                at_ms: now,
            },
            Op::Register(n, mask) => {
                let name = NODES[n].0;
                // The top bit: the agent reports its first GPU unhealthy.
                let mut reg = node(name, NODES[n].1);
                reg.gpus[0].healthy = mask & 0x80 == 0;
                let running = self
                    .live
                    .tasks_on_node(name)
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << (i % 7)) != 0)
                    .map(|(_, (k, _))| k)
                    .collect();
                Command::RegisterNode {
                    node: reg,
                    running,
                    at_ms: now,
                }
            }
            Op::GpuFail(n, gpu, drain) => Command::GpuFailed {
                node: NODES[n].0.into(),
                gpu: gpu % NODES[n].1,
                reason: "XID 79".into(),
                drain,
                at_ms: now,
            },
            Op::Drain(n) => Command::DrainNode {
                name: NODES[n].0.into(),
                reason: Some("maintenance".into()),
            },
            Op::Resume(n) => Command::DrainNode {
                name: NODES[n].0.into(),
                reason: None,
            },
            Op::Preempt(sel, stale) => {
                let Some(id) = self.job_where(sel, |j| j.alloc.is_some()) else {
                    return;
                };
                let alloc = self.live.jobs[&id].alloc.as_ref().map_or(0, |a| a.id.0);
                Command::Preempt {
                    orders: vec![PreemptOrder {
                        victim: id,
                        alloc: if stale { alloc + 1 } else { alloc },
                        for_job: id,
                        reason: "test".into(),
                    }],
                    at_ms: now,
                }
            }
            Op::Cancel(sel) => {
                let Some(job) = self.job_where(sel, |_| true) else {
                    return;
                };
                Command::Cancel { job, at_ms: now }
            }
            Op::TimeOut(sel, dt) => {
                let Some(job) = self.job_where(sel, |j| j.state == JobState::Running) else {
                    return;
                };
                let at_ms = self.live.jobs[&job].started_at_ms + dt;
                Command::TimeOut { job, at_ms }
            }
            Op::Checkpoint(sel) => {
                let Some(key) = Self::pick(&self.tasks(|_, s| s.holds_resources()), sel) else {
                    return;
                };
                Command::TaskCheckpointed {
                    key,
                    step: Some(7),
                    at_ms: now,
                }
            }
            Op::Accrue(dt) => {
                self.now += dt;
                Command::AccrueUsage {
                    at_ms: self.now,
                    half_life_secs: 3600,
                }
            }
            Op::Snapshot => {
                self.replica = State::from_snapshot(&self.replica.to_snapshot()).expect("decodes");
                return;
            }
        };
        self.apply(cmd);
    }
}

/// What the indexes must be, computed from the jobs alone.
fn check_invariants(s: &State) {
    let restored = State::from_snapshot(&s.to_snapshot()).expect("snapshot decodes");
    assert_eq!(restored.pending, s.pending, "pending");
    assert_eq!(restored.active, s.active, "active");
    assert_eq!(restored.usage, s.usage, "node usage");
    assert_eq!(restored.tenant_use, s.tenant_use, "tenant use");
    assert!(restored.to_snapshot() == s.to_snapshot(), "replicated part");
    assert_eq!(restored.digest(), s.digest(), "digest");

    let mut usage: BTreeMap<String, NodeUsage> = BTreeMap::new();
    let mut tenant_use: BTreeMap<String, TenantUse> = BTreeMap::new();
    let mut active = BTreeSet::new();
    let mut pending = BTreeSet::new();
    for (id, j) in &s.jobs {
        if j.state == JobState::Pending {
            pending.insert(*id);
            assert!(j.alloc.is_none(), "pending job {id} keeps an allocation");
        }
        if matches!(j.state, JobState::Placed | JobState::Running) {
            assert!(j.alloc.is_some(), "live job {id} without an allocation");
        }
        let Some(a) = &j.alloc else { continue };
        for t in a.tasks.iter().filter(|t| t.state.holds_resources()) {
            active.insert(*id);
            let u = usage.entry(t.placement.node.clone()).or_default();
            for g in &t.placement.gpus {
                assert!(
                    u.gpus.insert(*g, *id).is_none(),
                    "GPU {g} of node {} held twice",
                    t.placement.node
                );
            }
            u.cpu_millis += t.placement.cpu_millis;
            u.memory_bytes += t.placement.memory_bytes;
            for name in Tenant::lineage(&j.spec.tenant) {
                let e = tenant_use.entry(name.to_string()).or_default();
                *e = e.plus(TenantUse::of_task(&t.placement));
            }
        }
    }
    assert_eq!(s.pending, pending, "pending index vs jobs");
    assert_eq!(s.active, active, "active index vs jobs");
    assert_eq!(s.usage, usage, "node usage vs held placements");
    assert_eq!(s.tenant_use, tenant_use, "tenant use vs held placements");
    for (name, u) in &usage {
        let n = &s.nodes[name];
        assert!(u.cpu_millis <= n.cpu_millis && u.memory_bytes <= n.memory_bytes);
        assert!(u.gpus.keys().all(|g| (*g as usize) < n.gpus.len()));
    }
    for (name, u) in &tenant_use {
        let t = &s.tenants[name];
        assert!(
            t.gpu_limit.is_none_or(|l| u.gpus <= l),
            "{name} over its GPU limit"
        );
        assert!(
            t.cpu_limit_millis.is_none_or(|l| u.cpu_millis <= l),
            "{name} over its CPU limit"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_command_keeps_indexes_equal_to_a_restore(ops in prop::collection::vec(op(), 1..80)) {
        let mut sim = Sim::new();
        for op in &ops {
            sim.step(op);
            check_invariants(&sim.live);
            let (l, r) = (&sim.live, &sim.replica);
            prop_assert_eq!(&l.usage, &r.usage, "replica's node usage diverged at {:?}", op);
            prop_assert_eq!(&l.tenant_use, &r.tenant_use, "replica's tenant use diverged at {:?}", op);
            prop_assert_eq!(&l.pending, &r.pending);
            prop_assert_eq!(&l.active, &r.active);
            prop_assert_eq!(l.digest(), r.digest(), "replica diverged at {:?}", op);
        }
    }
}
