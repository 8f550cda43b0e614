//! Reconcile: the pure heart of the agent.
//!
//! The agent keeps two pictures: the *desired* tasks (the scheduler's latest
//! assignment set for this node) and the *observed* tasks (what its shims
//! report). [`reconcile`] computes the actions that move the second towards
//! the first. It is a function of data only, so every rule below is a unit
//! test:
//!
//! * desired and not observed → start it, unless one of its GPUs is still
//!   held by a local task that is running or being killed (the new task waits
//!   for the old one to be gone; two tasks never share a GPU on this node);
//! * observed, running and not desired → kill it (a cancelled or failed job,
//!   or an allocation revoked while the agent was away);
//! * observed, exited, its exit reported, and not desired → forget it;
//! * desired and observed → nothing: the same allocation is never started
//!   twice, even after it exited (an exited task waits to be forgotten).
//!
//! All of the above needs a desired set to compare with. Until the current
//! session's first assignment set has arrived the agent does not know what
//! the scheduler wants (a restarted agent has just re-adopted its tasks; a
//! new leader has not spoken yet), and "not desired" would mean "not known":
//! so with no desired set ([`DesiredSet::Unknown`]) nothing is started,
//! killed or forgotten. The type makes a kill impossible without one.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Identifies one run of one task: a new allocation is a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskKey {
    pub job: u64,
    pub alloc: u64,
    pub task: u32,
}

impl std::fmt::Display for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}@{}", self.job, self.task, self.alloc)
    }
}

/// Where a local task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// The shim was started; the task has not been seen running yet.
    Starting,
    Running,
    /// Signalled to stop; waiting for it to exit.
    Killing,
    Exited,
}

/// A task the scheduler wants here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub key: TaskKey,
    pub gpus: Vec<u32>,
}

/// A task this agent has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub key: TaskKey,
    pub gpus: Vec<u32>,
    pub phase: Phase,
    /// Whether its exit was sent to the scheduler at least once.
    pub exit_reported: bool,
}

/// What the scheduler wants here, as far as this agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesiredSet<'a> {
    /// No assignment set has arrived in the current session yet.
    Unknown,
    /// The newest assignment set of the current session.
    Known(&'a [Desired]),
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Start(TaskKey),
    Kill(TaskKey),
    Forget(TaskKey),
}

/// Compute the actions; see the module docs for the rules. The result is
/// sorted, so equal inputs give equal outputs. An unknown desired set yields
/// no action at all.
pub fn reconcile(desired: DesiredSet<'_>, observed: &[Observed]) -> Vec<Action> {
    let DesiredSet::Known(desired) = desired else {
        return Vec::new();
    };
    let want: BTreeMap<TaskKey, &Desired> = desired.iter().map(|d| (d.key, d)).collect();
    let have: BTreeMap<TaskKey, &Observed> = observed.iter().map(|o| (o.key, o)).collect();
    let mut actions = Vec::new();
    for o in observed {
        if want.contains_key(&o.key) {
            continue;
        }
        match o.phase {
            Phase::Starting | Phase::Running => actions.push(Action::Kill(o.key)),
            Phase::Exited if o.exit_reported => actions.push(Action::Forget(o.key)),
            Phase::Exited | Phase::Killing => {}
        }
    }
    let busy: BTreeSet<u32> = observed
        .iter()
        .filter(|o| o.phase != Phase::Exited)
        .flat_map(|o| o.gpus.iter().copied())
        .collect();
    for d in desired {
        if have.contains_key(&d.key) {
            continue;
        }
        if d.gpus.iter().any(|g| busy.contains(g)) {
            continue; // wait for the previous holder to be gone
        }
        actions.push(Action::Start(d.key));
    }
    actions.sort();
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(job: u64) -> TaskKey {
        TaskKey {
            job,
            alloc: job,
            task: 0,
        }
    }
    fn want(job: u64, gpus: &[u32]) -> Desired {
        Desired {
            key: key(job),
            gpus: gpus.to_vec(),
        }
    }
    fn have(job: u64, gpus: &[u32], phase: Phase, reported: bool) -> Observed {
        Observed {
            key: key(job),
            gpus: gpus.to_vec(),
            phase,
            exit_reported: reported,
        }
    }

    type Case = (&'static str, Vec<Desired>, Vec<Observed>, Vec<Action>);

    #[test]
    fn table() {
        use Action::*;
        use Phase::*;
        let cases: Vec<Case> = vec![
            (
                "new task starts",
                vec![want(1, &[0])],
                vec![],
                vec![Start(key(1))],
            ),
            (
                "running desired: nothing",
                vec![want(1, &[0])],
                vec![have(1, &[0], Running, false)],
                vec![],
            ),
            (
                "undesired running is killed",
                vec![],
                vec![have(1, &[0], Running, false)],
                vec![Kill(key(1))],
            ),
            (
                "undesired starting is killed",
                vec![],
                vec![have(1, &[0], Starting, false)],
                vec![Kill(key(1))],
            ),
            (
                "killing: wait",
                vec![],
                vec![have(1, &[0], Killing, false)],
                vec![],
            ),
            (
                "exited unreported: keep",
                vec![],
                vec![have(1, &[0], Exited, false)],
                vec![],
            ),
            (
                "exited reported: forget",
                vec![],
                vec![have(1, &[0], Exited, true)],
                vec![Forget(key(1))],
            ),
            (
                "exited but desired: never restarted",
                vec![want(1, &[0])],
                vec![have(1, &[0], Exited, true)],
                vec![],
            ),
            (
                "GPU still held by a dying task: wait",
                vec![want(2, &[0])],
                vec![have(1, &[0], Killing, false)],
                vec![],
            ),
            (
                "GPU held by an undesired running task: kill it, start later",
                vec![want(2, &[0, 1])],
                vec![have(1, &[1], Running, false)],
                vec![Kill(key(1))],
            ),
            (
                "GPU freed by an exited task: start",
                vec![want(2, &[0])],
                vec![have(1, &[0], Exited, true)],
                vec![Start(key(2)), Forget(key(1))],
            ),
            (
                "CPU-only tasks never wait",
                vec![want(2, &[])],
                vec![have(1, &[], Running, false)],
                vec![Start(key(2)), Kill(key(1))],
            ),
        ];
        for (name, d, o, expect) in cases {
            let mut expect = expect;
            expect.sort();
            assert_eq!(reconcile(DesiredSet::Known(&d), &o), expect, "{name}");
        }
    }

    /// A restarted agent re-adopts its tasks; one of them exited while the
    /// agent was down, and its exit triggers a reconcile before the session's
    /// first assignment set arrived. Nothing may be killed (the old rule,
    /// with "no set" read as "empty set", killed every adopted task).
    #[test]
    fn unknown_desired_set_kills_nothing() {
        let adopted = vec![
            have(1, &[0], Phase::Running, false),
            have(2, &[1], Phase::Starting, false),
            have(3, &[2], Phase::Exited, true),
        ];
        assert_eq!(reconcile(DesiredSet::Unknown, &adopted), vec![]);
        // Once the set is known the ordinary rules apply again.
        let d = vec![want(1, &[0])];
        assert_eq!(
            reconcile(DesiredSet::Known(&d), &adopted),
            vec![Action::Kill(key(2)), Action::Forget(key(3))]
        );
        // An empty set that did arrive is a real order: stop everything.
        assert_eq!(
            reconcile(DesiredSet::Known(&[]), &adopted),
            vec![
                Action::Kill(key(1)),
                Action::Kill(key(2)),
                Action::Forget(key(3))
            ]
        );
    }

    #[test]
    fn deterministic_regardless_of_input_order() {
        let d = vec![want(3, &[2]), want(2, &[1])];
        let o = vec![
            have(5, &[4], Phase::Running, false),
            have(4, &[3], Phase::Exited, true),
        ];
        let mut d2 = d.clone();
        d2.reverse();
        let mut o2 = o.clone();
        o2.reverse();
        assert_eq!(
            reconcile(DesiredSet::Known(&d), &o),
            reconcile(DesiredSet::Known(&d2), &o2)
        );
    }
}
