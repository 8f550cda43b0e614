//! Reservations for blocked gangs, and the rule that keeps backfill honest.
//!
//! When a gang near the head of the queue cannot start, the planner plays
//! the running jobs' ends forward (start + time limit; a job without a limit
//! never ends as far as planning goes) until the gang would fit, and
//! reserves the nodes it would get at that time `T`. Those nodes are then
//! usable in this pass only by jobs whose own time limit ends by `T`, so a
//! job that starts early can never delay a reservation. A gang that could
//! only fit once jobs without a limit end holds its nodes outright: nothing
//! else starts there, so it cannot be starved by a stream of small jobs.
//! A job that is stopping (cancelled, preempted, ended while some tasks
//! still run) frees its resources now as far as planning goes.

use super::placement::{choose_topo, tasks_fit, Cand, Cluster, Req, FOREVER};
use crate::model::{JobState, TaskPlacement, TopologySpec};
use crate::state::State;

/// One running (or just planned) task's resources and when they come free.
#[derive(Debug, Clone, Copy)]
struct Release {
    at: i64,
    node: u32,
    gpus: u32,
    cpu: u32,
    mem: u64,
}

/// Future releases of resources, built lazily once per pass.
pub struct Timeline {
    releases: Vec<Release>,
    sorted: bool,
}

/// Whether a job that still holds resources is only stopping: ended,
/// cancelled or preempted, its tasks are being killed. Its resources come
/// back as soon as they have exited, whatever its time limit says.
pub fn stopping(state: JobState) -> bool {
    state.is_terminal() || state.is_stopping()
}

/// When a job that starts now would end.
pub fn end_of(now_ms: i64, limit_secs: Option<u64>) -> i64 {
    match limit_secs {
        Some(s) => now_ms.saturating_add(crate::model::limit_ms(s)),
        None => FOREVER,
    }
}

impl Timeline {
    /// Releases of every live allocation in `state`.
    pub fn new(state: &State, cl: &Cluster, now_ms: i64) -> Timeline {
        let mut t = Timeline {
            releases: Vec::new(),
            sorted: false,
        };
        for job in state.active.iter().filter_map(|id| state.jobs.get(id)) {
            let Some(a) = job.alloc.as_ref() else {
                continue;
            };
            let at = if stopping(job.state) {
                now_ms
            } else {
                let start = if job.started_at_ms > 0 {
                    job.started_at_ms
                } else {
                    a.placed_at_ms
                };
                end_of(start, job.spec.time_limit_secs).max(now_ms)
            };
            for task in a.tasks.iter().filter(|t| t.state.holds_resources()) {
                t.add(cl, at, &task.placement);
            }
        }
        t
    }

    /// Add a task (e.g. one placed in this pass) ending at `at`.
    pub fn add(&mut self, cl: &Cluster, at: i64, p: &TaskPlacement) {
        if let Some(node) = cl.index_of(&p.node) {
            self.releases.push(Release {
                at,
                node,
                gpus: p.gpus.len() as u32,
                cpu: p.cpu_millis,
                mem: p.memory_bytes,
            });
            self.sorted = false;
        }
    }

    /// The earliest time the gang fits on nodes not already reserved, and
    /// the nodes it would get then.
    pub fn reserve(
        &mut self,
        cl: &Cluster,
        req: &Req,
        topo: Option<&TopologySpec>,
    ) -> Option<(i64, Vec<(u32, u32)>)> {
        if !self.sorted {
            self.releases.sort_by_key(|r| (r.at, r.node));
            self.sorted = true;
        }
        let r = &req.per_task;
        let mut gpus: Vec<u32> = cl.slots.iter().map(|s| s.free.count_ones()).collect();
        let mut cpu: Vec<u32> = cl.slots.iter().map(|s| s.cpu).collect();
        let mut mem: Vec<u64> = cl.slots.iter().map(|s| s.mem).collect();
        let open = |i: usize| cl.slots[i].reserved_until.is_none();
        let fit = |i: usize, g: &[u32], c: &[u32], m: &[u64]| {
            if open(i) {
                tasks_fit(g[i], c[i], m[i], r)
            } else {
                0
            }
        };
        let mut room: u64 = (0..gpus.len())
            .map(|i| u64::from(fit(i, &gpus, &cpu, &mem)))
            .sum();
        let mut tries = 0;
        let mut k = 0;
        while k < self.releases.len() {
            let at = self.releases[k].at;
            while k < self.releases.len() && self.releases[k].at == at {
                let rel = self.releases[k];
                let i = rel.node as usize;
                let before = u64::from(fit(i, &gpus, &cpu, &mem));
                gpus[i] += rel.gpus;
                cpu[i] = cpu[i].saturating_add(rel.cpu);
                mem[i] = mem[i].saturating_add(rel.mem);
                room = room - before + u64::from(fit(i, &gpus, &cpu, &mem));
                k += 1;
            }
            if room < u64::from(req.tasks) {
                continue;
            }
            let cands: Vec<Cand> = (0..gpus.len())
                .map(|i| Cand {
                    node: i as u32,
                    fits: fit(i, &gpus, &cpu, &mem),
                    free: gpus[i],
                })
                .filter(|c| c.fits > 0)
                .collect();
            if let Ok(picks) = choose_topo(&cl.nodes, cands, req.tasks, topo) {
                return Some((at, picks));
            }
            tries += 1;
            if tries >= 32 {
                return None;
            }
        }
        None
    }
}
