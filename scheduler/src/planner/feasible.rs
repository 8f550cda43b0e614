//! What can never run, refused at submit.
//!
//! A gang is checked against every registered node as if the cluster were
//! empty: drained, lost and unhealthy nodes (and faulty GPUs) count, since
//! they may come back, so only the truly impossible is refused. With no node
//! registered yet everything is accepted: the cluster may be starting.
//!
//! Three things can make a gang impossible: no node can hold one task; the
//! whole cluster cannot hold all its tasks at once; or, with a required
//! label (`--same block`), no node has the label or no one value of it can
//! hold them all. The answer names which, with the numbers that prove it.

use super::placement::tasks_fit;
use super::verdict::{cpus_text, human_bytes, plural, task_resources};
use crate::model::{JobSpec, Node, Resources};
use std::collections::BTreeMap;

/// Why `spec` can never run on `nodes` (every registered node), or `None`
/// when it could run on an empty cluster.
pub fn never_fits(nodes: &[&Node], spec: &JobSpec) -> Option<String> {
    if nodes.is_empty() {
        return None;
    }
    let r = &spec.per_task;
    if nodes.iter().all(|n| capacity(n, r) == 0) {
        return Some(one_task_reason(nodes, r));
    }
    match spec.topology.as_ref().filter(|t| t.required) {
        Some(t) => group_reason(nodes, spec, &t.label),
        None => {
            let room = room_on(nodes, r);
            (room < u64::from(spec.tasks)).then(|| {
                format!(
                    "{} but at most {room} fit in the whole cluster ({})",
                    gang(spec),
                    describe(nodes, r)
                )
            })
        }
    }
}

/// How many tasks of `r` an empty `node` holds (all its GPUs, healthy or not).
pub fn capacity(node: &Node, r: &Resources) -> u32 {
    let gpus = u32::try_from(node.gpus.len()).unwrap_or(u32::MAX);
    tasks_fit(gpus, node.cpu_millis, node.memory_bytes, r)
}

fn room_on(nodes: &[&Node], r: &Resources) -> u64 {
    nodes.iter().map(|n| u64::from(capacity(n, r))).sum()
}

fn gang(spec: &JobSpec) -> String {
    format!(
        "the gang needs {} of {}",
        plural(u64::from(spec.tasks), "task"),
        task_resources(&spec.per_task)
    )
}

/// The first resource no node has enough of for one task, or the mix.
fn one_task_reason(nodes: &[&Node], r: &Resources) -> String {
    let max_gpus = nodes.iter().map(|n| n.gpus.len()).max().unwrap_or(0);
    let max_cpu = nodes.iter().map(|n| n.cpu_millis).max().unwrap_or(0);
    let max_mem = nodes.iter().map(|n| n.memory_bytes).max().unwrap_or(0);
    if r.gpus as usize > max_gpus {
        format!(
            "a task asks for {} but the largest node has {max_gpus}",
            plural(u64::from(r.gpus), "GPU")
        )
    } else if r.cpu_millis > max_cpu {
        format!(
            "a task asks for {} but the largest node has {}",
            cpus_text(u64::from(r.cpu_millis)),
            f64::from(max_cpu) / 1000.0
        )
    } else if r.memory_bytes > max_mem {
        format!(
            "a task asks for {} of memory but the largest node has {}",
            human_bytes(r.memory_bytes),
            human_bytes(max_mem)
        )
    } else {
        format!(
            "no node has all that a task asks for ({}) at once",
            task_resources(r)
        )
    }
}

/// With a required label: the label exists, and one value holds the gang.
fn group_reason(nodes: &[&Node], spec: &JobSpec, label: &str) -> Option<String> {
    let mut groups: BTreeMap<&str, Vec<&Node>> = BTreeMap::new();
    for n in nodes {
        if let Some(v) = n.labels.get(label) {
            groups.entry(v.as_str()).or_default().push(n);
        }
    }
    let r = &spec.per_task;
    let Some((value, members)) = groups
        .iter()
        .max_by_key(|(v, g)| (room_on(g, r), std::cmp::Reverse(**v)))
    else {
        return Some(format!(
            "the gang must stay within one {label:?} (--same {label}) but no node has a \
             {label:?} label"
        ));
    };
    let best = room_on(members, r);
    (best < u64::from(spec.tasks)).then(|| {
        format!(
            "{} in one {label} but at most {best} fit in any one {label} \
             (the largest, {label}={value}: {})",
            gang(spec),
            describe(members, r)
        )
    })
}

/// `2 nodes with 8 GPUs (4 tasks each), 1 node with 64 CPUs; 3 nodes cannot
/// hold one task`: nodes by what limits them.
fn describe(nodes: &[&Node], r: &Resources) -> String {
    let mut kinds: BTreeMap<(u32, String), u32> = BTreeMap::new();
    let mut small = 0u64;
    for n in nodes {
        let cap = capacity(n, r);
        if cap == 0 {
            small += 1;
            continue;
        }
        *kinds.entry((cap, limiting(n, r))).or_default() += 1;
    }
    const SHOW: usize = 4;
    let mut parts: Vec<String> = kinds
        .iter()
        .rev()
        .take(SHOW)
        .map(|((cap, what), count)| {
            let each = if *cap > 1 {
                format!(" ({cap} tasks each)")
            } else {
                String::new()
            };
            format!("{} with {what}{each}", plural(u64::from(*count), "node"))
        })
        .collect();
    if kinds.len() > SHOW {
        parts.push(format!("{} more kinds", kinds.len() - SHOW));
    }
    let mut out = parts.join(", ");
    if small > 0 {
        let verb = if small == 1 { "holds" } else { "hold" };
        out.push_str(&format!("; {} {verb} no task", plural(small, "other node")));
    }
    out
}

/// What a node has of the resource that limits how many tasks it holds.
fn limiting(n: &Node, r: &Resources) -> String {
    let gpus = u32::try_from(n.gpus.len()).unwrap_or(u32::MAX);
    let by_gpu = gpus.checked_div(r.gpus).unwrap_or(u32::MAX);
    let by_cpu = n.cpu_millis.checked_div(r.cpu_millis).unwrap_or(u32::MAX);
    let by_mem = n
        .memory_bytes
        .checked_div(r.memory_bytes)
        .map_or(u32::MAX, |k| u32::try_from(k).unwrap_or(u32::MAX));
    if by_gpu <= by_cpu && by_gpu <= by_mem {
        plural(u64::from(gpus), "GPU")
    } else if by_cpu <= by_mem {
        cpus_text(u64::from(n.cpu_millis))
    } else {
        format!("{} of memory", human_bytes(n.memory_bytes))
    }
}
