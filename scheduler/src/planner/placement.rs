//! Gang placement over a compact, mutable view of the cluster.
//!
//! [`Cluster`] holds, per ready node, a bitmask of free healthy GPUs and the
//! free CPU and memory, plus an index of nodes by free-GPU count. A gang is
//! placed all or nothing, in this order of preference:
//!
//! 1. the fewest nodes: the whole gang on one node if any can hold it, else
//!    the nodes with the most room first;
//! 2. best fit: of the nodes that would do, the one with the least room left
//!    (so whole nodes stay free for whole-node gangs), also for the last node
//!    of a multi-node gang;
//! 3. within a node, GPUs of one link group (NVLink island, PCIe switch, NUMA
//!    node, as the agent reports it), the tightest group that holds the task;
//! 4. across nodes, one value of a node label (`block`, `rack`, ...) when
//!    the job asks: required (wait otherwise) or preferred.
//!
//! The common case (no label, no reserved node usable) never scans the
//! cluster: the index answers "is there room at all" in O(GPUs per node) and
//! hands out candidates best-fit first. Everything is deterministic: ties go
//! to the lower node index (nodes are in name order).

use crate::model::{Node, Resources, TaskPlacement, TopologySpec};
use crate::state::State;
use std::collections::{BTreeMap, BTreeSet};

/// GPUs per node the index tracks (bit positions of the free mask).
pub const MAX_GPUS_PER_NODE: usize = 64;

/// A reservation horizon meaning "until further notice": nothing may use the node.
pub const FOREVER: i64 = i64::MAX;

/// One gang's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Req {
    pub tasks: u32,
    pub per_task: Resources,
}

/// Free resources of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub free: u64,
    pub cpu: u32,
    pub mem: u64,
    /// Held for a reservation starting at this time: only jobs that end by
    /// then may use it (none when `FOREVER`).
    pub reserved_until: Option<i64>,
}

impl Slot {
    /// How many tasks of `r` fit.
    pub fn tasks_fit(&self, r: &Resources) -> u32 {
        tasks_fit(self.free.count_ones(), self.cpu, self.mem, r)
    }
}

/// How many tasks of `r` fit in the given free amounts.
pub fn tasks_fit(gpus: u32, cpu: u32, mem: u64, r: &Resources) -> u32 {
    let mut n = u32::MAX;
    if let Some(k) = gpus.checked_div(r.gpus) {
        n = n.min(k);
    }
    if let Some(k) = cpu.checked_div(r.cpu_millis) {
        n = n.min(k);
    }
    if let Some(k) = mem.checked_div(r.memory_bytes) {
        n = n.min(k.min(u64::from(u32::MAX)) as u32);
    }
    n
}

/// A node that could take some of a gang: index, tasks it fits, free GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cand {
    pub node: u32,
    pub fits: u32,
    pub free: u32,
}

/// Chosen nodes and how many of the gang's tasks each takes.
pub type Picks = Vec<(u32, u32)>;

/// Why a gang could not be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// Room for only this many tasks.
    Room(u32),
    /// A required label: at most `best` tasks fit under any one value.
    Group { label: String, best: u32 },
}

/// The planner's working view of the cluster.
pub struct Cluster<'a> {
    pub nodes: Vec<&'a Node>,
    pub slots: Vec<Slot>,
    /// `buckets[k]`: unreserved nodes with exactly `k` free GPUs.
    buckets: Vec<BTreeSet<u32>>,
    /// Nodes currently held by a reservation.
    pub reserved: BTreeSet<u32>,
    /// The most free GPUs any node had at the start (the index's top bucket).
    top: usize,
}

impl<'a> Cluster<'a> {
    /// The ready nodes of `state` with what their live allocations leave free.
    pub fn new(state: &'a State) -> Cluster<'a> {
        let mut c = Cluster {
            nodes: Vec::new(),
            slots: Vec::new(),
            buckets: vec![BTreeSet::new(); MAX_GPUS_PER_NODE + 1],
            reserved: BTreeSet::new(),
            top: 0,
        };
        for n in state.nodes.values().filter(|n| n.schedulable()) {
            let u = state.usage.get(&n.name);
            let mut free = 0u64;
            for g in n.gpus.iter().filter(|g| g.usable()) {
                let held = u.is_some_and(|u| u.gpus.contains_key(&g.index));
                if (g.index as usize) < MAX_GPUS_PER_NODE && !held {
                    free |= 1 << g.index;
                }
            }
            let (cpu, mem) = u.map_or((0, 0), |u| (u.cpu_millis, u.memory_bytes));
            let i = c.nodes.len() as u32;
            c.nodes.push(n);
            c.slots.push(Slot {
                free,
                cpu: n.cpu_millis.saturating_sub(cpu),
                mem: n.memory_bytes.saturating_sub(mem),
                reserved_until: None,
            });
            c.buckets[free.count_ones() as usize].insert(i);
            c.top = c.top.max(free.count_ones() as usize);
        }
        c
    }

    /// Index of a node by name (nodes are in name order).
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.nodes
            .binary_search_by(|n| n.name.as_str().cmp(name))
            .ok()
            .map(|i| i as u32)
    }

    /// Whether a job ending at `end` may use node `i`.
    pub fn usable(&self, i: u32, end: i64) -> bool {
        match self.slots[i as usize].reserved_until {
            None => true,
            Some(t) => t != FOREVER && end <= t,
        }
    }

    /// Hold node `i` for a reservation starting at `until`.
    pub fn reserve(&mut self, i: u32, until: i64) {
        let s = &mut self.slots[i as usize];
        // The tighter hold wins: an earlier start, or a hold with no end.
        let t = match s.reserved_until {
            Some(t) if t == FOREVER || until == FOREVER => FOREVER,
            Some(t) => t.min(until),
            None => until,
        };
        s.reserved_until = Some(t);
        self.buckets[s.free.count_ones() as usize].remove(&i);
        self.reserved.insert(i);
    }

    /// Upper bound on the tasks of `r` that unreserved nodes can take, from
    /// GPU counts alone (CPU and memory are checked when choosing).
    fn bucket_room(&self, r: &Resources) -> u32 {
        if r.gpus == 0 {
            return u32::MAX;
        }
        let g = r.gpus as usize;
        (g..=self.top)
            .map(|k| self.buckets[k].len() as u32 * (k / g) as u32)
            .sum()
    }

    /// Like the room check of [`Cluster::pick`], counting reserved nodes too.
    pub fn room_ignoring_reservations(&self, r: &Resources) -> u32 {
        let held: u32 = self
            .reserved
            .iter()
            .map(|&i| self.slots[i as usize].tasks_fit(r))
            .sum();
        self.bucket_room(r).saturating_add(held)
    }

    /// Choose nodes for a gang (no change yet): `(node, tasks)` pairs.
    pub fn pick(
        &self,
        req: &Req,
        topo: Option<&TopologySpec>,
        end: i64,
    ) -> Result<Vec<(u32, u32)>, Miss> {
        let r = &req.per_task;
        let reserved: Vec<Cand> = self
            .reserved
            .iter()
            .filter(|&&i| self.usable(i, end))
            .map(|&i| self.cand(i, r))
            .filter(|c| c.fits > 0)
            .collect();
        let extra: u32 = reserved.iter().map(|c| c.fits).sum();
        let room = self.bucket_room(r).saturating_add(extra);
        let required = topo.filter(|t| t.required);
        if room < req.tasks && required.is_none() {
            return Err(Miss::Room(room));
        }
        if topo.is_none() && reserved.is_empty() && r.gpus > 0 {
            return self.pick_indexed(req);
        }
        let cands: Vec<Cand> = (0..self.nodes.len() as u32)
            .filter(|&i| self.usable(i, end))
            .map(|i| self.cand(i, r))
            .filter(|c| c.fits > 0)
            .collect();
        choose_topo(&self.nodes, cands, req.tasks, topo)
    }

    fn cand(&self, i: u32, r: &Resources) -> Cand {
        let s = &self.slots[i as usize];
        Cand {
            node: i,
            fits: s.tasks_fit(r),
            free: s.free.count_ones(),
        }
    }

    /// The fast path: candidates straight from the free-count index.
    fn pick_indexed(&self, req: &Req) -> Result<Vec<(u32, u32)>, Miss> {
        let r = &req.per_task;
        let g = r.gpus as usize;
        let whole = (req.tasks as usize).saturating_mul(g);
        for k in whole..=self.top {
            for &i in &self.buckets[k] {
                if self.slots[i as usize].tasks_fit(r) >= req.tasks {
                    return Ok(vec![(i, req.tasks)]);
                }
            }
        }
        let mut picks: Vec<(u32, u32)> = Vec::new();
        let mut got = 0;
        'outer: for k in (g..=self.top).rev() {
            for &i in &self.buckets[k] {
                let n = self.slots[i as usize].tasks_fit(r).min(req.tasks - got);
                if n > 0 {
                    picks.push((i, n));
                    got += n;
                    if got == req.tasks {
                        break 'outer;
                    }
                }
            }
        }
        if got < req.tasks {
            return Err(Miss::Room(got));
        }
        // Best fit for the last node: the tightest one that takes the rest.
        if let Some(&(last, n)) = picks.last() {
            let taken: BTreeSet<u32> = picks.iter().map(|p| p.0).collect();
            let need = n as usize * g;
            let cur = self.slots[last as usize].free.count_ones() as usize;
            'fit: for k in need..cur {
                for &i in &self.buckets[k] {
                    if !taken.contains(&i) && self.slots[i as usize].tasks_fit(r) >= n {
                        if let Some(p) = picks.last_mut() {
                            *p = (i, n);
                        }
                        break 'fit;
                    }
                }
            }
        }
        Ok(picks)
    }

    /// Book a chosen gang: pick each task's GPUs and update the index.
    pub fn commit(&mut self, req: &Req, picks: &[(u32, u32)]) -> Vec<TaskPlacement> {
        let r = req.per_task;
        let mut out = Vec::with_capacity(req.tasks as usize);
        for &(i, n) in picks {
            let node = self.nodes[i as usize];
            for _ in 0..n {
                let s = self.slots[i as usize];
                let mask = choose_gpus(node, s.free, r.gpus);
                self.set_free(i, s.free & !mask);
                let s = &mut self.slots[i as usize];
                s.cpu = s.cpu.saturating_sub(r.cpu_millis);
                s.mem = s.mem.saturating_sub(r.memory_bytes);
                out.push(TaskPlacement {
                    node: node.name.clone(),
                    gpus: bits(mask),
                    cpu_millis: r.cpu_millis,
                    memory_bytes: r.memory_bytes,
                });
            }
        }
        out
    }

    fn set_free(&mut self, i: u32, free: u64) {
        let s = &mut self.slots[i as usize];
        let (old, new) = (s.free.count_ones() as usize, free.count_ones() as usize);
        s.free = free;
        if s.reserved_until.is_none() && old != new {
            self.buckets[old].remove(&i);
            self.buckets[new].insert(i);
        }
    }

    /// Whether the cluster has no ready node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Choose nodes from explicit candidates, honouring a label request.
pub fn choose_topo(
    nodes: &[&Node],
    cands: Vec<Cand>,
    tasks: u32,
    topo: Option<&TopologySpec>,
) -> Result<Vec<(u32, u32)>, Miss> {
    let Some(topo) = topo else {
        return choose(cands, tasks);
    };
    let mut groups: BTreeMap<&str, Vec<Cand>> = BTreeMap::new();
    for c in &cands {
        if let Some(v) = nodes[c.node as usize].labels.get(&topo.label) {
            groups.entry(v.as_str()).or_default().push(*c);
        }
    }
    let mut best: Option<(usize, u32, Picks)> = None;
    let mut most = 0;
    for g in groups.into_values() {
        let room: u32 = g.iter().map(|c| c.fits).sum();
        most = most.max(room);
        if let Ok(p) = choose(g, tasks) {
            let key = (p.len(), room);
            if best.as_ref().is_none_or(|b| key < (b.0, b.1)) {
                best = Some((key.0, key.1, p));
            }
        }
    }
    match best {
        Some((_, _, p)) => Ok(p),
        None if !topo.required => choose(cands, tasks),
        None => Err(Miss::Group {
            label: topo.label.clone(),
            best: most,
        }),
    }
}

/// Fewest nodes, then best fit, from explicit candidates.
pub fn choose(mut cands: Vec<Cand>, tasks: u32) -> Result<Vec<(u32, u32)>, Miss> {
    if let Some(c) = cands
        .iter()
        .filter(|c| c.fits >= tasks)
        .min_by_key(|c| (c.free, c.node))
    {
        return Ok(vec![(c.node, tasks)]);
    }
    cands.sort_by_key(|c| (std::cmp::Reverse(c.fits), c.free, c.node));
    let mut picks = Vec::new();
    let mut got = 0;
    let mut used = 0;
    for c in &cands {
        let n = c.fits.min(tasks - got);
        picks.push((c.node, n));
        got += n;
        used += 1;
        if got == tasks {
            break;
        }
    }
    if got < tasks {
        return Err(Miss::Room(got));
    }
    let (_, n) = picks[used - 1];
    if let Some(c) = cands[used..]
        .iter()
        .filter(|c| c.fits >= n)
        .min_by_key(|c| (c.free, c.node))
    {
        if c.free < cands[used - 1].free {
            picks[used - 1] = (c.node, n);
        }
    }
    Ok(picks)
}

/// Pick `want` GPUs from `free`: the tightest link group that holds them
/// all, else the fullest groups first.
pub fn choose_gpus(node: &Node, free: u64, want: u32) -> u64 {
    if want == 0 {
        return 0;
    }
    let mut groups: BTreeMap<u32, u64> = BTreeMap::new();
    for g in &node.gpus {
        if (g.index as usize) < MAX_GPUS_PER_NODE && free & (1 << g.index) != 0 {
            *groups.entry(g.link_group).or_default() |= 1 << g.index;
        }
    }
    if let Some((_, m)) = groups
        .iter()
        .filter(|(_, m)| m.count_ones() >= want)
        .min_by_key(|(k, m)| (m.count_ones(), **k))
    {
        return lowest_bits(*m, want);
    }
    let mut order: Vec<(u32, u64)> = groups.into_iter().collect();
    order.sort_by_key(|(k, m)| (std::cmp::Reverse(m.count_ones()), *k));
    let mut out = 0u64;
    let mut left = want;
    for (_, m) in order {
        let take = lowest_bits(m, left);
        out |= take;
        left -= take.count_ones();
        if left == 0 {
            break;
        }
    }
    out
}

fn lowest_bits(mut m: u64, n: u32) -> u64 {
    let mut out = 0;
    for _ in 0..n {
        if m == 0 {
            break;
        }
        let b = m & m.wrapping_neg();
        out |= b;
        m &= !b;
    }
    out
}

fn bits(mut m: u64) -> Vec<u32> {
    let mut v = Vec::with_capacity(m.count_ones() as usize);
    while m != 0 {
        v.push(m.trailing_zeros());
        m &= m - 1;
    }
    v
}
