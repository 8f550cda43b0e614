//! Fault injection with real processes: three `muster-scheduler`s and two
//! `muster-agent`s on loopback, concurrent submitters, and faults injected
//! while jobs run: `kill -9` of the leader (again and again), partitions of
//! the leader (symmetric and each one-way), an agent killed under its
//! running tasks and restarted, an agent down for longer than a lease, and a
//! leader stalled (SIGSTOP) for longer than the agent lease.
//!
//! Watchers run throughout and record every breach; each test asserts at the
//! end that there was none:
//! - (a) no job restarted by a fault that did not last a lease: restart
//!   counts stay 0, except for jobs that had a task on a node whose agent was
//!   gone for longer than a lease;
//! - (b) no GPU held by two running tasks (per node, from `queue --all`);
//! - (c) no task process runs twice at once on the host: every job's command
//!   carries a unique marker; the /proc scanner counts, per (marker, `RANK`),
//!   the live, not stopped processes whose parent does not carry the same
//!   marker (so a shell's forked child and a fenced, SIGSTOPped task do not
//!   count; the shim's command line carries no marker);
//! - (d) every acknowledged submission (distinct `--name`, its own
//!   `--request-id`, retried with the same key until acknowledged) exists
//!   exactly once, and completes;
//! - (e) all members converge to the same digest at the end;
//! - (f) no agent is without a session for longer than a lease: `nodes`
//!   never shows a node other than `ready` (but for an agent we kept down
//!   past a lease); each agent's lease file (the send time of its newest
//!   heartbeat a leader acknowledged) is never older than a lease; and the
//!   agents' logs show every session that ended followed by a registration
//!   within the lease.
//!
//! Timings: the harness's `agent_lease` (5 s), heartbeats every 500 ms,
//! elections after 0.5 to 1 s. The tests of this file run one at a time (a
//! lock), since on a 2-core machine two 5-process clusters at once would
//! starve each other's leases. `soak` (ignored) repeats random faults for
//! `MUSTER_SOAK_SECS` seconds; `scripts/soak.sh` runs it.

use muster_tests::{binary, wait_for, Cluster, ClusterSpec};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// One cluster at a time in this file (see the module's comment).
static SERIAL: Mutex<()> = Mutex::new(());

/// Everything the watchers and submitters saw.
#[derive(Default)]
struct Seen {
    /// name → acknowledged job id.
    acked: BTreeMap<String, u64>,
    /// Submissions never acknowledged (given up after retrying).
    unacked: Vec<String>,
    /// Submit attempts that failed and were retried with the same key.
    retries: u64,
    /// Breaches of (b) and (c), with what was seen.
    breaches: Vec<String>,
    /// job id → (restart count, nodes it was ever seen on).
    jobs: BTreeMap<u64, (u64, BTreeSet<String>)>,
    /// (node, state, seconds since start) for every non-ready sighting.
    not_ready: Vec<(String, String, f64)>,
    host_scans: u64,
    queue_polls: u64,
    /// Distinct (marker, rank) task processes seen on the host.
    task_procs: BTreeSet<(String, String)>,
    /// Per agent: the longest time seen since the send time of its newest
    /// heartbeat a leader acknowledged (from its lease file).
    max_unacked: BTreeMap<usize, Duration>,
}

/// A cluster with its submitters and watchers running.
struct Run {
    c: Cluster,
    tag: String,
    started: Instant,
    stop_submit: Arc<AtomicBool>,
    stop_watch: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    submitters: Vec<JoinHandle<()>>,
    watchers: Vec<JoinHandle<()>>,
    faults: u64,
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|p| p.into_inner())
}

impl Run {
    fn start(submitters: usize) -> Run {
        let c = Cluster::start(ClusterSpec {
            schedulers: 3,
            proxies: true,
            agents: 2,
            gpus_per_agent: 4,
            ..ClusterSpec::default()
        })
        .expect("cluster");
        let mut r = Run {
            tag: c.name().to_string(),
            c,
            started: Instant::now(),
            stop_submit: Arc::new(AtomicBool::new(false)),
            stop_watch: Arc::new(AtomicBool::new(false)),
            seen: Arc::new(Mutex::new(Seen::default())),
            submitters: vec![],
            watchers: vec![],
            faults: 0,
        };
        r.watchers.push(r.host_scanner());
        r.watchers.push(r.queue_poller());
        for k in 0..submitters {
            let s = r.submitter(k);
            r.submitters.push(s);
        }
        r
    }

    fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Print what happens, with the wall-clock time the daemons' logs use.
    fn note(&self, what: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ms = now.as_millis() % 86_400_000;
        let (h, m, sec) = (ms / 3_600_000, ms / 60_000 % 60, ms % 60_000);
        println!(
            "[{:7.2}s {h:02}:{m:02}:{:06.3}Z] {what}",
            self.secs(),
            sec as f64 / 1000.0
        );
    }

    /// Submit jobs named `<tag>-s<k>-<n>` until stopped. Shapes: a gang over
    /// both nodes, gangs and single tasks; each sleeps 1 to 3 s.
    fn submitter(&self, k: usize) -> JoinHandle<()> {
        let (addr, tag) = (self.c.addr.clone(), self.tag.clone());
        let (stop, seen) = (self.stop_submit.clone(), self.seen.clone());
        std::thread::spawn(move || {
            let muster = binary("muster");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let name = format!("{tag}-s{k}-{n}");
                let shape: &[&str] = match n % 6 {
                    0 => &["--tasks", "2", "--gpus", "4"],
                    1 | 2 => &["--tasks", "2", "--gpus", "1"],
                    3 => &["--gpus", "2"],
                    _ => &["--gpus", "1"],
                };
                let script = format!("echo JOBMARK-{name}; sleep {}", 1 + (n + k as u64) % 3);
                let rid = format!("rid-{name}");
                let give_up = Instant::now() + Duration::from_secs(90);
                loop {
                    let out = Command::new(&muster)
                        .args(["--addr", &addr, "--json", "submit", "--name", &name])
                        .args(["--request-id", &rid])
                        .args(shape)
                        .args(["--", "sh", "-c", &script])
                        .output();
                    let id = out.ok().filter(|o| o.status.success()).and_then(|o| {
                        serde_json::from_slice::<Value>(&o.stdout).ok()?["id"].as_u64()
                    });
                    let mut s = lock(&seen);
                    if let Some(id) = id {
                        s.acked.insert(name.clone(), id);
                        break;
                    }
                    if Instant::now() > give_up {
                        s.unacked.push(name.clone());
                        break;
                    }
                    s.retries += 1;
                    drop(s);
                    std::thread::sleep(Duration::from_millis(200));
                }
                // About 60% of the cluster's GPUs busy, so the queue drains.
                std::thread::sleep(Duration::from_millis(2000));
            }
        })
    }

    /// (c): scan /proc every 100 ms; (f): read the agents' lease files.
    fn host_scanner(&self) -> JoinHandle<()> {
        let (stop, seen) = (self.stop_watch.clone(), self.seen.clone());
        let prefix = format!("JOBMARK-{}-", self.tag);
        let leases: Vec<_> = (0..self.c.spec.agents)
            .map(|i| self.c.agent_data(i).join("lease"))
            .collect();
        let lease = self.c.agent_lease();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let ages: Vec<Option<Duration>> =
                    leases.iter().map(|l| unacked_for(l, lease)).collect();
                let live = task_processes(&prefix);
                let mut by_task: BTreeMap<(String, String), Vec<u32>> = BTreeMap::new();
                for p in live {
                    by_task.entry((p.marker, p.rank)).or_default().push(p.pid);
                }
                let mut s = lock(&seen);
                s.host_scans += 1;
                for (i, age) in ages.into_iter().enumerate() {
                    let max = s.max_unacked.entry(i).or_default();
                    *max = (*max).max(age.unwrap_or_default());
                }
                for (task, pids) in by_task {
                    if pids.len() > 1 {
                        let detail = pids.iter().map(|p| describe(*p)).collect::<Vec<_>>();
                        s.breaches
                            .push(format!("(c) task {task:?} runs twice: {detail:?}"));
                    }
                    s.task_procs.insert(task);
                }
                drop(s);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    }

    /// (a), (b), (f): poll `queue --all` and `nodes` every 300 ms.
    fn queue_poller(&self) -> JoinHandle<()> {
        let (addr, started) = (self.c.addr.clone(), self.started);
        let (stop, seen) = (self.stop_watch.clone(), self.seen.clone());
        std::thread::spawn(move || {
            let muster = binary("muster");
            let json = |args: &[&str]| -> Option<Value> {
                let o = Command::new(&muster)
                    .args(["--addr", &addr, "--json"])
                    .args(args)
                    .output()
                    .ok()?;
                o.status
                    .success()
                    .then(|| serde_json::from_slice(&o.stdout).ok())?
            };
            while !stop.load(Ordering::Relaxed) {
                if let Some(q) = json(&["queue", "--all"]) {
                    let mut s = lock(&seen);
                    s.queue_polls += 1;
                    check_queue(&q, &mut s);
                }
                if let Some(n) = json(&["nodes"]) {
                    let mut s = lock(&seen);
                    for node in n["nodes"].as_array().into_iter().flatten() {
                        if node["state"] != "ready" {
                            let name = node["name"].as_str().unwrap_or("?").to_string();
                            let state = node["state"].as_str().unwrap_or("?").to_string();
                            let at = started.elapsed().as_secs_f64();
                            s.not_ready.push((name, state, at));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    }

    fn leader(&self) -> usize {
        self.c.wait_leader(T).expect("a leader")
    }

    /// `kill -9` the leader, wait for a new one, restart the old one.
    fn kill_leader(&mut self) {
        let old = self.leader();
        self.note(&format!("kill -9 scheduler {old} (the leader)"));
        self.c.kill_scheduler_node(old);
        self.faults += 1;
        let new = self.leader();
        self.note(&format!("scheduler {new} leads"));
        std::thread::sleep(Duration::from_millis(500));
        self.c.start_scheduler_node(old).expect("restart scheduler");
    }

    /// Cut the leader's links to the others for `dur`: `out` cuts what it
    /// sends, `inn` what it receives (both: a symmetric partition).
    fn partition_leader(&mut self, out: bool, inn: bool, dur: Duration) {
        let l = self.leader();
        let links = self.leader_links(l, out, inn);
        self.note(&format!(
            "partition scheduler {l} (the leader) for {dur:?}: out={out} in={inn}"
        ));
        for k in &links {
            self.c.proxies[k].set_blocked(true);
        }
        self.faults += 1;
        std::thread::sleep(dur);
        for k in &links {
            self.c.proxies[k].set_blocked(false);
        }
        self.note("healed");
    }

    fn leader_links(&self, l: usize, out: bool, inn: bool) -> Vec<(usize, usize)> {
        let others = (0..3).filter(|j| *j != l);
        others
            .flat_map(|j| {
                let mut v = vec![];
                if out {
                    v.push((l, j));
                }
                if inn {
                    v.push((j, l));
                }
                v
            })
            .collect()
    }

    /// SIGSTOP the leader for `dur`, then SIGCONT.
    fn stall_leader(&mut self, dur: Duration) {
        let l = self.leader();
        self.note(&format!("SIGSTOP scheduler {l} (the leader) for {dur:?}"));
        self.c.signal_scheduler(l, Signal::SIGSTOP).expect("stop");
        self.faults += 1;
        std::thread::sleep(dur);
        self.c.signal_scheduler(l, Signal::SIGCONT).expect("cont");
        self.note(&format!("SIGCONT scheduler {l}"));
    }

    /// `kill -9` agent `i` while its tasks run; restart it after `down`.
    fn kill_agent(&mut self, i: usize, down: Duration) {
        self.note(&format!("kill -9 agent {i}, down for {down:?}"));
        self.c.kill_agent(i);
        self.faults += 1;
        std::thread::sleep(down);
        self.c.start_agent(i).expect("restart agent");
        self.note(&format!("agent {i} restarted"));
    }

    /// Stop submitting, let every acknowledged job finish, stop watching,
    /// then check (a) to (f). `lost_ok`: nodes whose agent we kept down for
    /// longer than a lease (they may be lost, their jobs restarted).
    fn finish(mut self, lost_ok: &[&str]) -> Report {
        self.note("stopping submitters");
        self.stop_submit.store(true, Ordering::Relaxed);
        for s in self.submitters.drain(..) {
            s.join().expect("submitter");
        }
        let acked = lock(&self.seen).acked.clone();
        let mut last = String::new();
        let done = wait_for(
            "every acknowledged job to end",
            Duration::from_secs(180),
            || {
                let q = self.c.json(&["queue", "--all"]).ok()?;
                let open: Vec<String> = jobs(&q)
                    .filter(|j| {
                        !matches!(
                            j["state"].as_str(),
                            Some("completed" | "failed" | "cancelled")
                        )
                    })
                    .map(|j| format!("{}:{}", j["id"], j["state"]))
                    .collect();
                last = format!("{} open: {open:?}", open.len());
                open.is_empty().then_some(q)
            },
        );
        let q = done.unwrap_or_else(|e| panic!("{e}; {last}; logs: {}", self.c.log_tail()));
        self.stop_watch.store(true, Ordering::Relaxed);
        for w in self.watchers.drain(..) {
            w.join().expect("watcher");
        }
        let digest = self.c.wait_converged(T).expect("(e) members converge");
        let seen = std::mem::take(&mut *lock(&self.seen));
        let gaps = session_gaps(&self.c);
        let report = Report::new(&self, &q, &acked, &seen, gaps, lost_ok);
        report.print(&self, &seen, &digest);
        report.assert_clean(&self.c);
        report
    }
}

/// What one run ended with.
struct Report {
    acked: usize,
    lost: Vec<String>,
    duplicated: Vec<String>,
    problems: Vec<String>,
    max_gap: Duration,
    max_unacked: Duration,
    restarted: usize,
    /// job id → restart count, for jobs restarted.
    restarts: BTreeMap<u64, u64>,
    /// Nodes seen in a state other than `ready`.
    not_ready: BTreeSet<String>,
}

impl Report {
    fn new(
        run: &Run,
        q: &Value,
        acked: &BTreeMap<String, u64>,
        seen: &Seen,
        gaps: Vec<(usize, Duration)>,
        lost_ok: &[&str],
    ) -> Report {
        let lease = run.c.agent_lease();
        let mut by_name: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
        for j in jobs(q) {
            let name = j["spec"]["name"].as_str().unwrap_or("").to_string();
            let id = j["id"].as_u64().unwrap_or(0);
            let state = j["state"].as_str().unwrap_or("?").to_string();
            by_name.entry(name).or_default().push((id, state));
        }
        let mut r = Report {
            acked: acked.len(),
            lost: vec![],
            duplicated: vec![],
            problems: seen.breaches.clone(),
            max_gap: gaps.iter().map(|g| g.1).max().unwrap_or_default(),
            max_unacked: Duration::ZERO,
            restarts: BTreeMap::new(),
            not_ready: seen.not_ready.iter().map(|n| n.0.clone()).collect(),
            restarted: 0,
        };
        for (name, id) in acked {
            match by_name.get(name).map(|v| v.as_slice()) {
                Some([(got, state)]) if got == id => {
                    if state != "completed" {
                        r.problems
                            .push(format!("(d) {name} (job {id}) ended {state}"));
                    }
                }
                None | Some([]) => r.lost.push(format!("{name} (job {id})")),
                Some(v) => r
                    .duplicated
                    .push(format!("{name}: acked {id}, found {v:?}")),
            }
        }
        for name in &seen.unacked {
            if by_name.get(name).is_some_and(|v| v.len() > 1) {
                r.duplicated.push(format!("{name} (never acknowledged)"));
            }
        }
        // (a): the final restart counts, with every node a job was seen on.
        let mut nodes_of = seen.jobs.clone();
        for j in jobs(q) {
            let e = nodes_of.entry(j["id"].as_u64().unwrap_or(0)).or_default();
            e.0 = e.0.max(j["restart_count"].as_u64().unwrap_or(0));
            e.1.extend(task_nodes(j));
        }
        for (id, (restarts, nodes)) in &nodes_of {
            if *restarts == 0 {
                continue;
            }
            r.restarted += 1;
            r.restarts.insert(*id, *restarts);
            if !nodes.iter().any(|n| lost_ok.contains(&n.as_str())) {
                r.problems.push(format!(
                    "(a) job {id} restarted {restarts}x though its nodes {nodes:?} kept their agents"
                ));
            }
        }
        // (f)
        for (node, state, at) in &seen.not_ready {
            if !lost_ok.contains(&node.as_str()) {
                r.problems
                    .push(format!("(f) {node} was {state} at {at:.1}s"));
            }
        }
        for (agent, age) in &seen.max_unacked {
            if lost_ok.contains(&run.c.node_name(*agent).as_str()) {
                continue;
            }
            r.max_unacked = r.max_unacked.max(*age);
            if *age >= lease {
                r.problems.push(format!(
                    "(f) agent {agent} went {age:?} without an acknowledged heartbeat"
                ));
            }
        }
        for (agent, gap) in &gaps {
            if *gap >= lease && !lost_ok.contains(&run.c.node_name(*agent).as_str()) {
                r.problems
                    .push(format!("(f) agent {agent} had no session for {gap:?}"));
            }
        }
        r
    }

    fn print(&self, run: &Run, seen: &Seen, digest: &str) {
        println!(
            "FIGURES faults={} acknowledged={} lost={} duplicated={} unacknowledged={} \
             submit_retries={} restarted_jobs={} max_agent_without_session_ms={} \
             max_agent_without_ack_ms={} \
             host_scans={} queue_polls={} task_processes_seen={} elapsed_s={:.0} digest={digest}",
            run.faults,
            self.acked,
            self.lost.len(),
            self.duplicated.len(),
            seen.unacked.len(),
            seen.retries,
            self.restarted,
            self.max_gap.as_millis(),
            self.max_unacked.as_millis(),
            seen.host_scans,
            seen.queue_polls,
            seen.task_procs.len(),
            run.secs(),
        );
    }

    fn assert_clean(&self, c: &Cluster) {
        let mut all = self.problems.clone();
        all.extend(self.lost.iter().map(|l| format!("(d) lost: {l}")));
        all.extend(
            self.duplicated
                .iter()
                .map(|d| format!("(d) duplicated: {d}")),
        );
        assert!(self.acked > 0, "nothing was acknowledged");
        if !all.is_empty() {
            all.truncate(40);
            let kept = keep_logs(c);
            panic!(
                "breaches:\n{}\nall daemon logs kept in {kept}; their tails: {}",
                all.join("\n"),
                c.log_tail()
            );
        }
    }
}

/// Copy the daemons' logs out of the cluster's folder (removed on drop).
fn keep_logs(c: &Cluster) -> String {
    let to = std::env::temp_dir().join(format!("muster-faults-{}", c.name()));
    let _ = std::fs::create_dir_all(&to);
    for e in std::fs::read_dir(c.dir.path())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".log") || name.to_string_lossy().ends_with(".toml") {
            let _ = std::fs::copy(e.path(), to.join(name));
        }
    }
    to.display().to_string()
}

fn jobs(q: &Value) -> impl Iterator<Item = &Value> {
    q["jobs"].as_array().into_iter().flatten()
}

fn task_nodes(j: &Value) -> impl Iterator<Item = String> + '_ {
    j["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["node"].as_str().map(str::to_string))
}

/// (b) on one view of the queue, and what (a) needs later.
fn check_queue(q: &Value, s: &mut Seen) {
    let mut held: BTreeMap<(String, u64), u64> = BTreeMap::new();
    for j in jobs(q) {
        let id = j["id"].as_u64().unwrap_or(0);
        let e = s.jobs.entry(id).or_default();
        e.0 = e.0.max(j["restart_count"].as_u64().unwrap_or(0));
        e.1.extend(task_nodes(j));
        for t in j["tasks"].as_array().into_iter().flatten() {
            if t["state"] != "running" {
                continue;
            }
            let node = t["node"].as_str().unwrap_or("?").to_string();
            for g in t["gpus"].as_array().into_iter().flatten() {
                let g = g.as_u64().unwrap_or(u64::MAX);
                if let Some(other) = held.insert((node.clone(), g), id) {
                    let b = format!("(b) GPU {g} of {node} held by running jobs {other} and {id}");
                    s.breaches.push(b);
                }
            }
        }
    }
}

/// A task process of this run seen on the host.
struct TaskProc {
    pid: u32,
    marker: String,
    rank: String,
}

/// Every live (not zombie, not stopped) process whose command line carries
/// a marker starting with `prefix` and whose parent's does not carry the same
/// marker: the task's own process, not a child its shell forked.
fn task_processes(prefix: &str) -> Vec<TaskProc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let marker_of = |pid: u32| -> Option<String> {
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let text = String::from_utf8_lossy(&raw).replace('\0', " ");
        let at = text.find(prefix)?;
        let rest = &text[at..];
        let end = rest.find([';', ' ']).unwrap_or(rest.len());
        Some(rest[..end].to_string())
    };
    let mut out = vec![];
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some(marker) = marker_of(pid) else {
            continue;
        };
        let Some((state, ppid)) = stat(pid) else {
            continue;
        };
        if matches!(state, 'Z' | 'X' | 'T' | 't') || marker_of(ppid).as_ref() == Some(&marker) {
            continue;
        }
        let rank = environ(pid, "RANK").unwrap_or_else(|| "?".into());
        out.push(TaskProc { pid, marker, rank });
    }
    out
}

/// A process's state letter and parent pid.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    Some((state, f.next()?.parse().ok()?))
}

fn environ(pid: u32, key: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    raw.split(|b| *b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{key}=")).map(str::to_string)
    })
}

fn describe(pid: u32) -> String {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|r| String::from_utf8_lossy(&r).replace('\0', " "))
        .unwrap_or_default();
    let st = stat(pid)
        .map(|(s, p)| format!("{s} ppid={p}"))
        .unwrap_or_default();
    format!(
        "pid {pid} {st} job={:?}: {cmd}",
        environ(pid, "MUSTER_JOB_ID")
    )
}

/// How long ago agent's newest acknowledged heartbeat was sent: its lease
/// file holds that send time plus 90% of the lease (`agent/src/session.rs`).
/// `None` before the first acknowledgement.
fn unacked_for(lease_file: &std::path::Path, lease: Duration) -> Option<Duration> {
    let deadline: i64 = std::fs::read_to_string(lease_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let sent = deadline - (lease.as_millis() as f64 * 0.9) as i64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as i64;
    Some(Duration::from_millis((now - sent).max(0) as u64))
}

/// (f) from the agents' own logs: for every session that ended, the time
/// until the agent registered again (a restarted agent: from its start).
fn session_gaps(c: &Cluster) -> Vec<(usize, Duration)> {
    let mut gaps = vec![];
    for i in 0..c.spec.agents {
        let log = std::fs::read_to_string(c.path(&format!("agent-{i}.log"))).unwrap_or_default();
        let mut ended: Option<f64> = None;
        for line in log.lines() {
            let line = strip_ansi(line);
            let Some(at) = log_time(&line) else {
                continue;
            };
            if line.contains("session ended") && ended.is_none() {
                ended = Some(at);
            } else if line.contains(" registered") {
                if let Some(from) = ended.take() {
                    gaps.push((i, Duration::from_secs_f64((at - from).max(0.0))));
                }
            }
        }
    }
    gaps
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Seconds since the epoch of a tracing log line (`2026-01-02T03:04:05.678901Z ...`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let d: Vec<i64> = date.split('-').filter_map(|x| x.parse().ok()).collect();
    let t: Vec<f64> = time.split(':').filter_map(|x| x.parse().ok()).collect();
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(days as f64 * 86_400.0 + t[0] * 3600.0 + t[1] * 60.0 + t[2])
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Let jobs flow for `d` between faults.
fn settle(d: Duration) {
    std::thread::sleep(d);
}

#[test]
fn leader_kill_9_again_and_again_restarts_and_duplicates_nothing() {
    let _one = serial();
    let mut r = Run::start(2);
    settle(Duration::from_secs(4));
    for _ in 0..3 {
        r.kill_leader();
        settle(Duration::from_secs(4));
    }
    r.finish(&[]);
}

#[test]
fn leader_partitions_symmetric_and_one_way_restart_nothing() {
    let _one = serial();
    let mut r = Run::start(2);
    let lease = r.c.agent_lease();
    settle(Duration::from_secs(4));
    // Longer than a lease: the agents talk to the schedulers directly, so
    // they must find the majority's leader in time.
    let long = lease + Duration::from_secs(1);
    for (out, inn) in [(true, true), (true, false), (false, true)] {
        r.partition_leader(out, inn, long);
        settle(Duration::from_secs(4));
    }
    r.finish(&[]);
}

#[test]
fn agent_kill_9_under_running_tasks_adopts_them() {
    let _one = serial();
    let mut r = Run::start(2);
    settle(Duration::from_secs(4));
    for i in [0, 1, 0] {
        r.kill_agent(i, Duration::from_secs(1));
        settle(Duration::from_secs(4));
    }
    r.finish(&[]);
}

#[test]
fn agent_down_longer_than_a_lease_restarts_only_its_jobs() {
    let _one = serial();
    let mut r = Run::start(2);
    let lease = r.c.agent_lease();
    settle(Duration::from_secs(2));
    // A gang over both nodes, surely running on node-1 when its agent dies.
    let name = format!("{}-anchor", r.tag);
    let script = format!("echo JOBMARK-{name}; sleep 8");
    let args = [
        "--name", &name, "--tasks", "2", "--gpus", "4", "--", "sh", "-c", &script,
    ];
    let anchor = r.c.submit(&args).expect("submit");
    lock(&r.seen).acked.insert(name, anchor);
    r.c.wait_state(anchor, "running", T)
        .expect("anchor running");
    r.kill_agent(1, lease + Duration::from_secs(3));
    settle(Duration::from_secs(6));
    let report = r.finish(&["node-1"]);
    // The fault did what it should: the node was lost, its work moved.
    assert!(
        report.not_ready.contains("node-1"),
        "node-1 was never seen lost"
    );
    assert!(report.restarted > 0, "no job of node-1 was restarted");
    assert_eq!(
        report.restarts.get(&anchor),
        Some(&1),
        "the gang over node-1 restarted once"
    );
}

#[test]
fn leader_stalled_longer_than_a_lease_restarts_nothing() {
    let _one = serial();
    let mut r = Run::start(2);
    let lease = r.c.agent_lease();
    settle(Duration::from_secs(4));
    for _ in 0..2 {
        r.stall_leader(lease + Duration::from_secs(3));
        settle(Duration::from_secs(5));
    }
    r.finish(&[]);
}

/// The faults the soak draws from (`MUSTER_SOAK_FAULTS`, comma-separated,
/// chooses some; default all).
const SOAK_FAULTS: [&str; 6] = [
    "kill-leader",
    "partition",
    "partition-out",
    "partition-in",
    "kill-agent",
    "stall-leader",
];

/// Random faults for `MUSTER_SOAK_SECS` (default 180) seconds, of the kinds
/// in `MUSTER_SOAK_FAULTS`; prints the figures, then asserts as the tests
/// do. `scripts/soak.sh` runs it.
#[test]
#[ignore = "long: run by scripts/soak.sh"]
fn soak() {
    let _one = serial();
    let secs: u64 = std::env::var("MUSTER_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(180);
    let kinds: Vec<String> = match std::env::var("MUSTER_SOAK_FAULTS") {
        Ok(list) if !list.trim().is_empty() => {
            list.split(',').map(|k| k.trim().to_string()).collect()
        }
        _ => SOAK_FAULTS.iter().map(|k| k.to_string()).collect(),
    };
    for k in &kinds {
        assert!(
            SOAK_FAULTS.contains(&k.as_str()),
            "MUSTER_SOAK_FAULTS: unknown fault {k:?}; known: {SOAK_FAULTS:?}"
        );
    }
    let mut r = Run::start(2);
    let lease = r.c.agent_lease();
    let seed = AtomicU64::new(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let next = |n: u64| {
        let mut x = seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        seed.store(x, Ordering::Relaxed);
        x % n
    };
    let end = Instant::now() + Duration::from_secs(secs);
    let long = lease + Duration::from_secs(1);
    settle(Duration::from_secs(3));
    while Instant::now() < end {
        match kinds[next(kinds.len() as u64) as usize].as_str() {
            "kill-leader" => r.kill_leader(),
            "partition" => r.partition_leader(true, true, long),
            "partition-out" => r.partition_leader(true, false, long),
            "partition-in" => r.partition_leader(false, true, long),
            "kill-agent" => r.kill_agent(next(2) as usize, Duration::from_secs(1)),
            _ => r.stall_leader(long + Duration::from_secs(1)),
        }
        settle(Duration::from_secs(3 + next(4)));
    }
    r.finish(&[]);
}

/// The host scanner's rule on real processes: two live copies of one task
/// count twice; a shell's forked child and a stopped (fenced) copy do not.
#[test]
fn host_scanner_counts_live_task_copies_only() {
    let tag = format!("selftest{}", std::process::id());
    let marker = format!("JOBMARK-{tag}-x");
    let spawn = || {
        Command::new("sh")
            // The subshell is a forked copy of the shell: same command line.
            .args([
                "-c",
                &format!("echo {marker} >/dev/null; (sleep 30; true); true"),
            ])
            .env("RANK", "0")
            .process_group(0)
            .spawn()
            .expect("sh")
    };
    let count = || {
        wait_for("the shells to fork their sleep", T, || {
            let n = task_processes(&format!("JOBMARK-{tag}-"));
            (!n.is_empty()).then_some(n.len())
        })
        .expect("scan")
    };
    let mut a = spawn();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(), 1, "one task, its forked subshell not counted");
    let mut b = spawn();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(), 2, "a second live copy counts");
    let pid = nix::unistd::Pid::from_raw(b.id() as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("stop");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(), 1, "a stopped copy does not run");
    for c in [&mut a, &mut b] {
        let group = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
        let _ = c.wait();
    }
}
