//! What a gang with no room now is short of, so that `muster why` can name
//! the resource (GPUs, CPUs, memory) instead of a bare "room for 0".
//!
//! Each resource is counted alone over the nodes the gang may use: how
//! many tasks its free amount would allow, how much is free in all and on
//! the best node. A resource that alone allows fewer tasks than the gang
//! needs is short; when none is, the free amounts are on different nodes.

use super::placement::Cluster;
use super::verdict::{cpus_text, human_bytes};
use crate::model::Resources;
use std::collections::BTreeMap;

/// A kind of resource a task asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Res {
    Gpus,
    Cpus,
    Memory,
}

/// One resource the usable nodes have too little of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short {
    pub what: Res,
    /// Tasks this resource alone leaves room for.
    pub room: u32,
    /// Free on the usable nodes in all (GPUs, milli-CPUs or bytes).
    pub free: u64,
    /// The most free on any one of them.
    pub most: u64,
}

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let amount = |v: u64| match self.what {
            Res::Gpus => v.to_string(),
            Res::Cpus => cpus_text(v),
            Res::Memory => human_bytes(v),
        };
        let name = match self.what {
            Res::Gpus => "GPUs",
            Res::Cpus => "CPUs",
            Res::Memory => "memory",
        };
        write!(
            f,
            "{name} ({} free, at most {} on one node)",
            amount(self.free),
            amount(self.most)
        )
    }
}

/// What the nodes a gang may use leave for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lack {
    /// Tasks that fit now, all resources together.
    pub room: u32,
    /// Resources that alone allow fewer tasks than the gang needs.
    pub short: Vec<Short>,
    /// Nodes with room for a task that are held for other jobs.
    pub held: u32,
    /// Nodes the gang may use.
    pub usable: u32,
}

/// The lack of a gang of `tasks` × `r` on the nodes of `cl` it may use
/// (`usable`), out of `among` (all of them, or one label value's).
pub fn lack(
    cl: &Cluster,
    among: &[u32],
    usable: impl Fn(u32) -> bool,
    tasks: u32,
    r: &Resources,
) -> Lack {
    let mut out = Lack::default();
    // Per resource: free in all, most on one node, tasks it allows.
    let mut sums: BTreeMap<Res, (u64, u64, u64)> = BTreeMap::new();
    for &i in among {
        let s = &cl.slots[i as usize];
        let fits = s.tasks_fit(r);
        if !usable(i) {
            out.held += u32::from(fits > 0);
            continue;
        }
        out.usable += 1;
        out.room = out.room.saturating_add(fits);
        let gpus = u64::from(s.free.count_ones());
        let each = [
            (Res::Gpus, gpus, u64::from(r.gpus)),
            (Res::Cpus, u64::from(s.cpu), u64::from(r.cpu_millis)),
            (Res::Memory, s.mem, r.memory_bytes),
        ];
        for (what, free, need) in each.into_iter().filter(|e| e.2 > 0) {
            let e = sums.entry(what).or_default();
            e.0 = e.0.saturating_add(free);
            e.1 = e.1.max(free);
            e.2 = e.2.saturating_add(free / need);
        }
    }
    out.short = sums
        .into_iter()
        .filter(|(_, (_, _, room))| *room < u64::from(tasks))
        .map(|(what, (free, most, room))| Short {
            what,
            room: u32::try_from(room).unwrap_or(u32::MAX),
            free,
            most,
        })
        .collect();
    out
}

/// The value of `label` whose usable nodes hold the most tasks of `r`, and
/// those of its nodes: where a gang that must stay in one value came closest.
pub fn best_group(
    cl: &Cluster,
    label: &str,
    usable: impl Fn(u32) -> bool,
    r: &Resources,
) -> Option<(String, Vec<u32>)> {
    let mut groups: BTreeMap<&str, (u64, Vec<u32>)> = BTreeMap::new();
    for (i, n) in cl.nodes.iter().enumerate() {
        let Some(v) = n.labels.get(label) else {
            continue;
        };
        let i = i as u32;
        let g = groups.entry(v.as_str()).or_default();
        if usable(i) {
            g.0 += u64::from(cl.slots[i as usize].tasks_fit(r));
        }
        g.1.push(i);
    }
    groups
        .into_iter()
        .max_by_key(|(v, (room, _))| (*room, std::cmp::Reverse(*v)))
        .map(|(v, (_, nodes))| (v.to_string(), nodes))
}

/// `: short of GPUs (…) and memory (…)`, or where the room went.
pub fn describe(lack: &Lack, r: &Resources) -> String {
    if lack.usable == 0 {
        return ": every ready node it could use is held for other jobs".into();
    }
    let mut out = if lack.short.is_empty() {
        let mut kinds = vec![];
        if r.gpus > 0 {
            kinds.push("GPUs");
        }
        kinds.extend(["CPUs", "memory"]);
        let (last, rest) = kinds.split_last().unwrap_or((&"memory", &[]));
        format!(
            ": enough free {} and {last} in all, but not together on the same nodes",
            rest.join(", ")
        )
    } else {
        let parts: Vec<String> = lack.short.iter().map(|s| s.to_string()).collect();
        format!(": short of {}", parts.join(" and "))
    };
    if lack.held > 0 {
        let s = if lack.held == 1 { "" } else { "s" };
        let verb = if lack.held == 1 { "is" } else { "are" };
        out.push_str(&format!(
            "; {} node{s} with room {verb} held for other jobs",
            lack.held
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_nodes_are_named_as_the_reason() {
        let r = Resources {
            gpus: 0,
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
        };
        let all_held = Lack {
            held: 2,
            ..Lack::default()
        };
        assert_eq!(
            describe(&all_held, &r),
            ": every ready node it could use is held for other jobs"
        );
        let mixed = Lack {
            usable: 1,
            held: 1,
            ..Lack::default()
        };
        assert_eq!(
            describe(&mixed, &r),
            ": enough free CPUs and memory in all, but not together on the same nodes; \
             1 node with room is held for other jobs"
        );
    }
}
