//! The planner: a pure function from a read-only view of the state, the
//! scheduling [`Policy`] and `now` to a [`Plan`].
//!
//! Only the leader runs it. The plan goes through the Raft log
//! (`Command::ApplyPlan`, `Command::Preempt`), and `apply` re-checks every
//! gang with the same [`fit`] and [`quota`] functions, so a plan computed on
//! a state that has since moved on can be rejected but never over-commit a
//! GPU or a quota.
//!
//! One pass, in [`queue`] order (priority class, then hierarchical fair
//! share, then age), takes each pending gang and:
//!
//! 1. checks the limits of its tenant and every ancestor ([`quota`]);
//! 2. places it all or nothing, topology-aware and best fit
//!    ([`placement`]), on nodes it may use;
//! 3. if there is no room, tries to make room by preempting whole gangs of
//!    lower priority or borrowed capacity ([`preempt`]); when only gangs
//!    still within `min_runtime` would do, it holds their nodes from the
//!    end of that protection;
//! 4. else reserves the nodes it will get when running jobs reach their
//!    time limits or finish stopping ([`backfill`]); smaller jobs behind it
//!    may start only if they end before that;
//! 5. else says what is short ([`short`]).
//!
//! Gangs that could never run, even on an empty cluster, are refused at
//! submit ([`feasible`]), so none of this is asked of them.
//!
//! Every job that does not start gets a [`Verdict`] in words the CLI prints
//! as-is (`muster why`): a rejection is data, not an error. The planner
//! imports nothing async, does no I/O and reads no clock.

pub mod backfill;
pub mod feasible;
pub mod fit;
pub mod placement;
pub mod preempt;
pub mod queue;
pub mod quota;
pub mod short;
mod verdict;

pub use verdict::{format_time, Verdict};

use crate::model::{Job, JobId, JobState};
use crate::state::{Placement, PreemptOrder, State};
use placement::{Cluster, Miss, Req, FOREVER};
use std::collections::{BTreeMap, BTreeSet};

/// The scheduling policy: what the scheduler's config says, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Priority class name → weight (higher goes first and may preempt).
    pub classes: BTreeMap<String, u32>,
    /// Class of jobs that name none.
    pub default_class: String,
    /// How many blocked gangs per pass get a reservation.
    pub reservations: usize,
    /// Whether the planner may preempt at all.
    pub preemption: bool,
    /// How many blocked gangs per pass may preempt.
    pub preemptors: usize,
    /// A gang that has run less than this is never a victim.
    pub min_runtime_ms: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            classes: [("low", 50), ("normal", 100), ("high", 200)]
                .into_iter()
                .map(|(n, w)| (n.to_string(), w))
                .collect(),
            default_class: "normal".into(),
            reservations: 8,
            preemption: true,
            preemptors: 4,
            min_runtime_ms: 10 * 60 * 1000,
        }
    }
}

impl Policy {
    /// The weight of a class name (empty or unknown: the default class's).
    pub fn weight(&self, class: &str) -> u32 {
        self.classes
            .get(class)
            .or_else(|| self.classes.get(&self.default_class))
            .copied()
            .unwrap_or(0)
    }

    /// The class a job runs in, by name.
    pub fn class_name<'a>(&'a self, class: &'a str) -> &'a str {
        if self.classes.contains_key(class) {
            class
        } else {
            &self.default_class
        }
    }
}

/// A gang held back so that it can start at `start_ms` on `nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub job: JobId,
    /// `i64::MAX` when it waits on jobs without a time limit.
    pub start_ms: i64,
    pub nodes: Vec<String>,
}

/// The planner's output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    pub preemptions: Vec<PreemptOrder>,
    pub reservations: Vec<Reservation>,
    /// Every pending job that was not placed, and why.
    pub verdicts: BTreeMap<JobId, Verdict>,
    /// The queue order this pass used.
    pub order: Vec<JobId>,
}

/// Compute a plan for the pending jobs of `state` at `now_ms`.
pub fn plan(state: &State, policy: &Policy, now_ms: i64) -> Plan {
    let mut pass = Pass {
        state,
        policy,
        now_ms,
        cl: Cluster::new(state),
        tree: quota::Tree::new(state),
        timeline: None,
        taken: BTreeSet::new(),
        out: Plan::default(),
        preemptors: 0,
        reserve_tries: 0,
        ends: Vec::new(),
        lowest_running: state
            .active
            .iter()
            .filter_map(|id| state.jobs.get(id))
            .map(|j| policy.weight(&j.spec.priority))
            .min(),
    };
    let mut waiting: BTreeMap<JobId, Vec<&Job>> = BTreeMap::new();
    for j in state.active.iter().filter_map(|id| state.jobs.get(id)) {
        if let (JobState::Preempting, Some(f)) = (j.state, j.preempted_for) {
            waiting.entry(f).or_default().push(j);
        }
    }
    let order = queue::order_jobs(state, policy);
    let mut verdicts = Vec::new();
    for &job in &order {
        if let Some(v) = pass.consider(job, waiting.get(&job.id).map(Vec::as_slice)) {
            verdicts.push((job.id, v));
        }
    }
    pass.out.verdicts = verdicts.into_iter().collect();
    pass.out.order = order.iter().map(|j| j.id).collect();
    pass.out
}

struct Pass<'a> {
    state: &'a State,
    policy: &'a Policy,
    now_ms: i64,
    cl: Cluster<'a>,
    tree: quota::Tree<'a>,
    timeline: Option<backfill::Timeline>,
    taken: BTreeSet<JobId>,
    out: Plan,
    preemptors: usize,
    /// Gangs that tried for a reservation (each try replays the timeline).
    reserve_tries: usize,
    /// When each of this pass's placements will end, by time limit.
    ends: Vec<i64>,
    /// The lowest priority weight among running jobs (who could be preempted).
    lowest_running: Option<u32>,
}

impl Pass<'_> {
    /// Place one job, or say why not.
    fn consider(&mut self, job: &Job, victims: Option<&[&Job]>) -> Option<Verdict> {
        if self.cl.is_empty() {
            return Some(Verdict::NoNodes);
        }
        let need = quota::need_of(&job.spec);
        let Some(ti) = self.tree.idx(&job.spec.tenant) else {
            return None; // a job of a deleted tenant: nothing to say
        };
        if let Err(b) = self.tree.check(ti, need) {
            return Some(Verdict::TenantLimit(b));
        }
        let req = Req {
            tasks: job.spec.tasks,
            per_task: job.spec.per_task,
        };
        let end = backfill::end_of(self.now_ms, job.spec.time_limit_secs);
        let topo = job.spec.topology.as_ref();
        let miss = match self.cl.pick(&req, topo, end) {
            Ok(picks) => {
                self.place(job, &req, &picks, end);
                self.tree.book(ti, need);
                return None;
            }
            Err(m) => m,
        };
        if let Some(vs) = victims {
            self.hold_nodes_of(vs);
            return Some(Verdict::WaitingForPreemption(
                vs.iter().map(|v| v.id).collect(),
            ));
        }
        if let Some(v) = self.behind_reservation(&req, topo) {
            return Some(v);
        }
        if let Some(v) = self.try_preempt(job) {
            return Some(v);
        }
        if let Some(v) = self.try_reserve(job, &req) {
            return Some(v);
        }
        Some(self.no_room(&req, end, miss))
    }

    /// Why a gang has no room now, naming what is short.
    fn no_room(&self, req: &Req, end: i64, miss: Miss) -> Verdict {
        let cl = &self.cl;
        let usable = |i: u32| cl.usable(i, end);
        let (tasks, r) = (req.tasks, &req.per_task);
        match miss {
            Miss::Room(_) => {
                let all: Vec<u32> = (0..cl.nodes.len() as u32).collect();
                let lack = short::lack(cl, &all, usable, tasks, r);
                Verdict::NoRoom {
                    tasks,
                    per_task: *r,
                    slots_free: lack.room,
                    lack,
                }
            }
            Miss::Group { label, best } => {
                let closest = short::best_group(cl, &label, usable, r)
                    .map(|(v, nodes)| (v, short::lack(cl, &nodes, usable, tasks, r)));
                Verdict::NoRoomInGroup {
                    tasks,
                    per_task: *r,
                    label,
                    best,
                    closest,
                }
            }
        }
    }

    fn place(&mut self, job: &Job, req: &Req, picks: &[(u32, u32)], end: i64) {
        let tasks = self.cl.commit(req, picks);
        if let Some(tl) = self.timeline.as_mut() {
            for t in &tasks {
                tl.add(&self.cl, end, t);
            }
        }
        self.out.placements.push(Placement { job: job.id, tasks });
        self.ends.push(end);
    }

    /// A job that would fit if it could use reserved nodes waits for them.
    fn behind_reservation(
        &self,
        req: &Req,
        topo: Option<&crate::model::TopologySpec>,
    ) -> Option<Verdict> {
        let first = self.out.reservations.first()?;
        if self.cl.room_ignoring_reservations(&req.per_task) < req.tasks {
            return None;
        }
        let everything: Vec<placement::Cand> = (0..self.cl.nodes.len() as u32)
            .map(|i| {
                let s = &self.cl.slots[i as usize];
                placement::Cand {
                    node: i,
                    fits: s.tasks_fit(&req.per_task),
                    free: s.free.count_ones(),
                }
            })
            .filter(|c| c.fits > 0)
            .collect();
        placement::choose_topo(&self.cl.nodes, everything, req.tasks, topo).ok()?;
        Some(Verdict::BehindReservation {
            job: first.job,
            start_ms: first.start_ms,
        })
    }

    fn try_preempt(&mut self, job: &Job) -> Option<Verdict> {
        if !self.policy.preemption || self.preemptors >= self.policy.preemptors {
            return None;
        }
        // Cheap filters first: a victim needs a lower priority, or the job's
        // tenant must be below its guarantee.
        let outranks = self
            .lowest_running
            .is_some_and(|w| w < self.policy.weight(&job.spec.priority));
        let guarantee = self
            .state
            .tenants
            .get(&job.spec.tenant)
            .map_or(0, |t| t.guarantee_gpus);
        let held = self
            .tree
            .idx(&job.spec.tenant)
            .map_or(0, |i| self.tree.used(i).gpus);
        let reclaims = held.saturating_add(job.total_gpus()) <= guarantee;
        if !outranks && !reclaims {
            return None;
        }
        self.preemptors += 1;
        let found = preempt::find(
            self.state,
            self.policy,
            &self.cl,
            job,
            &self.tree,
            &self.taken,
            self.now_ms,
        )?;
        match found {
            preempt::Found::Now(orders, picks) => {
                for (i, _) in &picks {
                    self.cl.reserve(*i, FOREVER);
                }
                let ids: Vec<JobId> = orders.iter().map(|o| o.victim).collect();
                self.taken.extend(ids.iter().copied());
                self.out.preemptions.extend(orders);
                Some(Verdict::WaitingForPreemption(ids))
            }
            preempt::Found::Later {
                victims,
                at_ms,
                picks,
            } => {
                // Held like a reservation starting when the protection
                // ends: only jobs that end by then may use the nodes.
                self.hold(job, at_ms, &picks);
                self.taken.extend(victims.iter().copied());
                Some(Verdict::PreemptionPlanned {
                    victims,
                    at_ms,
                    now_ms: self.now_ms,
                })
            }
        }
    }

    /// Reserve `picks` for `job` from `start`: a [`Reservation`].
    fn hold(&mut self, job: &Job, start: i64, picks: &[(u32, u32)]) -> Vec<String> {
        let nodes: Vec<String> = picks
            .iter()
            .map(|(i, _)| self.cl.nodes[*i as usize].name.clone())
            .collect();
        for (i, _) in picks {
            self.cl.reserve(*i, start);
        }
        self.out.reservations.push(Reservation {
            job: job.id,
            start_ms: start,
            nodes: nodes.clone(),
        });
        nodes
    }

    /// Jobs that are stopping (see [`backfill::stopping`]) and hold
    /// resources on `nodes`.
    fn stopping_on(&self, nodes: &[String]) -> Vec<(JobId, JobState)> {
        let state = self.state;
        state
            .active
            .iter()
            .filter_map(|id| state.jobs.get(id))
            .filter(|j| backfill::stopping(j.state))
            .filter(|j| {
                j.alloc
                    .iter()
                    .flat_map(|a| &a.tasks)
                    .any(|t| t.state.holds_resources() && nodes.contains(&t.placement.node))
            })
            .map(|j| (j.id, j.state))
            .collect()
    }

    fn try_reserve(&mut self, job: &Job, req: &Req) -> Option<Verdict> {
        if self.reserve_tries >= self.policy.reservations {
            return None;
        }
        self.reserve_tries += 1;
        let (state, cl, now) = (self.state, &self.cl, self.now_ms);
        let (placed, ends) = (&self.out.placements, &self.ends);
        let tl = self.timeline.get_or_insert_with(|| {
            let mut tl = backfill::Timeline::new(state, cl, now);
            for (p, end) in placed.iter().zip(ends) {
                for t in &p.tasks {
                    tl.add(cl, *end, t);
                }
            }
            tl
        });
        let (start, picks) = tl.reserve(&self.cl, req, job.spec.topology.as_ref())?;
        let nodes = self.hold(job, start, &picks);
        if start <= self.now_ms {
            // It fits once stopping jobs are gone: say which.
            let dying = self.stopping_on(&nodes);
            if !dying.is_empty() {
                return Some(Verdict::WaitingForStop(dying));
            }
        }
        Some(Verdict::Reserved {
            start_ms: start,
            now_ms: self.now_ms,
            nodes,
        })
    }

    /// Keep the nodes of jobs being preempted for this one out of others' reach.
    fn hold_nodes_of(&mut self, victims: &[&Job]) {
        for v in victims {
            for t in v.alloc.iter().flat_map(|a| &a.tasks) {
                if let Some(i) = self.cl.index_of(&t.placement.node) {
                    self.cl.reserve(i, FOREVER);
                }
            }
        }
    }
}

/// Pending jobs in the order they are considered.
pub fn queue_order(state: &State, policy: &Policy) -> Vec<JobId> {
    queue::order(state, policy)
}

#[cfg(test)]
mod messages;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod tests;
