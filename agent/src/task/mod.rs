//! Tasks on this node: launching them through a shim, watching them, stopping
//! them, and re-adopting them after an agent restart.
//!
//! Each task has a folder `<data_dir>/tasks/<job>.<task>.<alloc>/` with:
//! `task.json` (what the agent needs to re-adopt it), `shim.json` (what the
//! shim runs), `lock` (held by the shim while it lives), `pid` (written by
//! the shim once the task runs) and `exit.json` (written by the shim when it
//! ends), and `fenced` while the shim holds the task frozen for want of a
//! lease ([`fence`]). Logs go through the shim to
//! `<data_dir>/logs/<job>/<task>.stdout|stderr`, capped and rotated
//! ([`logs`]), and outlive the folder. All of it is root's alone (folders
//! 0700, files 0600): the environment and the output of a job are no other
//! local user's business. The order in which a launch writes these, so that
//! a crash at any point neither loses a task nor starts it twice, is in
//! `launch.rs`; folders made for the user (the checkpoint directory) are
//! made with the user's rights ([`userdir`]).
//!
//! Stopping a task (the job's signal, its grace, SIGKILL; cut short by a
//! checkpoint report or by fencing) lives in `stop.rs`; telling which task a
//! local process belongs to, for the task socket, in [`peer`].
//!
//! [`Runtime`] holds the observed tasks and the latest desired set, runs
//! [`crate::reconcile::reconcile`] whenever either changes, and carries out its
//! actions. The desired set is unknown (nothing is started or stopped) from
//! the agent's start, and again from each new session's start
//! ([`Runtime::begin_session`]), until that session's first assignment set
//! arrives: a restarted agent must not kill the tasks it just re-adopted. Task starts and exits are sent as [`Event`]s to the session with
//! the scheduler; an exit is re-sent on every reconnect until the scheduler
//! stops asking for the task, so a lost connection never loses an exit code.

pub mod fence;
pub mod identity;
mod launch;
pub mod logs;
pub mod peer;
pub mod shim;
mod stop;
pub mod userdir;

use crate::cgroup::Cgroups;
use crate::reconcile::{self, Action, Desired, DesiredSet, Observed, Phase, TaskKey};
use muster_proto as pb;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use shim::ExitRecord;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Something the scheduler must hear about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started {
        key: TaskKey,
        pid: u32,
    },
    Exited {
        key: TaskKey,
        exit: pb::TaskExited,
    },
    /// The task reported a finished checkpoint (`muster checkpoint done`).
    Checkpointed {
        key: TaskKey,
        step: Option<u64>,
    },
    /// A GPU of this host failed.
    GpuFault {
        index: u32,
        uuid: String,
        reason: String,
    },
}

/// What the agent remembers about a task across restarts (`task.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskMeta {
    pub key: TaskKey,
    pub gpus: Vec<u32>,
    pub cgroup: Option<String>,
    pub shim_pid: u32,
    /// How to stop it (from the assignment), kept so that an adopted task
    /// is stopped the same way. 0: SIGTERM / the agent's `kill_grace`.
    #[serde(default)]
    pub stop_signal: i32,
    #[serde(default)]
    pub grace_ms: u64,
    #[serde(default)]
    pub kill_on_checkpoint: bool,
    /// The uid the task runs as (only a process of this uid may speak for
    /// it on the task socket). `None` in records from older agents.
    #[serde(default)]
    pub uid: Option<u32>,
}

struct Local {
    /// Woken when the shim this agent started exits.
    reaped: Arc<tokio::sync::Notify>,
    meta: TaskMeta,
    phase: Phase,
    pid: Option<u32>,
    exit: Option<pb::TaskExited>,
    exit_reported: bool,
    /// Woken when the task reports a checkpoint (a stop may be waiting for one).
    checkpointed: Arc<tokio::sync::Notify>,
}

impl Local {
    /// A task in `phase`, with nothing reported yet.
    fn new(
        meta: TaskMeta,
        phase: Phase,
        pid: Option<u32>,
        reaped: Arc<tokio::sync::Notify>,
    ) -> Local {
        Local {
            reaped,
            meta,
            phase,
            pid,
            exit: None,
            exit_reported: false,
            checkpointed: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

/// Settings the runtime needs from the agent's configuration.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub data_dir: PathBuf,
    pub shim_path: PathBuf,
    pub allow_root_jobs: bool,
    /// Grace for tasks whose assignment names none.
    pub kill_grace: Duration,
    /// The lease file the shims watch; `None`: self-fencing off.
    pub lease_file: Option<PathBuf>,
    /// The socket tasks reach the agent on (`MUSTER_AGENT_SOCKET`).
    pub task_socket: PathBuf,
    pub log_max_bytes: u64,
    pub log_files: u32,
    /// The agent's cgroup parent (`cgroup_parent`): a task's cgroup path is
    /// `/<parent>/<name>` ([`peer`]).
    pub cgroup_parent: String,
}

/// The task runtime. Cheap to share (`Arc`).
pub struct Runtime {
    settings: RuntimeSettings,
    cgroups: Option<Arc<dyn Cgroups>>,
    events: mpsc::UnboundedSender<Event>,
    inner: Mutex<Inner>,
    /// Held for a whole reconcile, decision and actions: two concurrent
    /// reconciles (a new assignment set and a task exit) would otherwise both
    /// see a task as missing and start it twice.
    reconciling: Mutex<()>,
}

#[derive(Default)]
struct Inner {
    tasks: BTreeMap<TaskKey, Local>,
    /// `None` until the current session's first assignment set arrived.
    desired: Option<BTreeMap<TaskKey, pb::TaskAssignment>>,
}

const START_POLL: Duration = Duration::from_millis(5);
const RUN_POLL: Duration = Duration::from_millis(200);

impl Runtime {
    /// A runtime over `data_dir`; adopts tasks left by a previous agent.
    pub fn new(
        settings: RuntimeSettings,
        cgroups: Option<Arc<dyn Cgroups>>,
        events: mpsc::UnboundedSender<Event>,
    ) -> std::io::Result<Arc<Runtime>> {
        for sub in ["tasks", "logs"] {
            let dir = settings.data_dir.join(sub);
            launch::private_dir(&dir).map_err(std::io::Error::other)?;
            // Folders made by older agents were world-readable.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let rt = Arc::new(Runtime {
            settings,
            cgroups,
            events,
            inner: Mutex::new(Inner::default()),
            reconciling: Mutex::new(()),
        });
        rt.adopt()?;
        Ok(rt)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn task_dir(&self, key: TaskKey) -> PathBuf {
        self.settings
            .data_dir
            .join("tasks")
            .join(format!("{}.{}.{}", key.job, key.task, key.alloc))
    }

    /// Where a task's stdout or stderr is kept.
    pub fn log_path(&self, job: u64, task: u32, stream: &str) -> PathBuf {
        self.settings
            .data_dir
            .join("logs")
            .join(job.to_string())
            .join(format!("{task}.{stream}"))
    }

    /// Whether the task (any allocation of it) may still write output.
    pub fn is_live(&self, job: u64, task: u32) -> bool {
        self.lock()
            .tasks
            .values()
            .any(|t| t.meta.key.job == job && t.meta.key.task == task && t.phase != Phase::Exited)
    }

    /// Every task this agent has, for `Register`.
    pub fn inventory(&self) -> Vec<pb::RunningTask> {
        self.lock()
            .tasks
            .values()
            .map(|t| pb::RunningTask {
                job_id: t.meta.key.job,
                alloc_id: t.meta.key.alloc,
                task_index: t.meta.key.task,
                pid: t.pid.unwrap_or(0),
            })
            .collect()
    }

    /// Events the scheduler may have missed (called after each registration):
    /// starts of running tasks and exits not yet acknowledged.
    pub fn replay_events(&self) -> Vec<Event> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for t in inner.tasks.values_mut() {
            if let Some(pid) = t.pid {
                out.push(Event::Started {
                    key: t.meta.key,
                    pid,
                });
            }
            if let Some(exit) = &t.exit {
                out.push(Event::Exited {
                    key: t.meta.key,
                    exit: exit.clone(),
                });
                t.exit_reported = true;
            }
        }
        out
    }

    /// Mark an exit as delivered to a live session.
    pub fn exit_sent(&self, key: TaskKey) {
        if let Some(t) = self.lock().tasks.get_mut(&key) {
            t.exit_reported = true;
        }
    }

    /// A new session with a scheduler begins (call it before registering):
    /// until its first assignment set arrives ([`Runtime::set_desired`]) the
    /// desired set is unknown and no task is started, stopped or forgotten.
    pub fn begin_session(&self) {
        self.lock().desired = None;
    }

    /// Whether the current session's first assignment set has arrived.
    pub fn desired_known(&self) -> bool {
        self.lock().desired.is_some()
    }

    /// Replace the desired set and act on the difference.
    pub fn set_desired(self: &Arc<Self>, tasks: Vec<pb::TaskAssignment>) {
        {
            let mut inner = self.lock();
            let desired = tasks
                .into_iter()
                .map(|a| {
                    let key = TaskKey {
                        job: a.job_id,
                        alloc: a.alloc_id,
                        task: a.task_index,
                    };
                    (key, a)
                })
                .collect();
            inner.desired = Some(desired);
        }
        self.reconcile();
    }

    /// Run the pure reconcile and carry out its actions.
    pub fn reconcile(self: &Arc<Self>) {
        let _one_at_a_time = self.reconciling.lock().unwrap_or_else(|p| p.into_inner());
        let (actions, starts) = {
            let inner = self.lock();
            let desired: Option<Vec<Desired>> = inner.desired.as_ref().map(|d| {
                d.iter()
                    .map(|(k, a)| Desired {
                        key: *k,
                        gpus: a.gpu_indices.clone(),
                    })
                    .collect()
            });
            let observed: Vec<Observed> = inner
                .tasks
                .values()
                .map(|t| Observed {
                    key: t.meta.key,
                    gpus: t.meta.gpus.clone(),
                    phase: t.phase,
                    exit_reported: t.exit_reported,
                })
                .collect();
            let set = match &desired {
                Some(d) => DesiredSet::Known(d),
                None => DesiredSet::Unknown,
            };
            let actions = reconcile::reconcile(set, &observed);
            let starts: BTreeMap<TaskKey, pb::TaskAssignment> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Start(k) => inner
                        .desired
                        .as_ref()
                        .and_then(|d| d.get(k))
                        .map(|d| (*k, d.clone())),
                    _ => None,
                })
                .collect();
            (actions, starts)
        };
        for action in actions {
            match action {
                Action::Start(key) => {
                    if let Some(a) = starts.get(&key) {
                        self.start(key, a);
                    }
                }
                Action::Kill(key) => self.kill(key),
                Action::Forget(key) => self.forget(key),
            }
        }
    }

    fn start(self: &Arc<Self>, key: TaskKey, a: &pb::TaskAssignment) {
        let reaped = Arc::new(tokio::sync::Notify::new());
        match self.launch(key, a, reaped.clone()) {
            Ok(meta) => {
                self.lock()
                    .tasks
                    .insert(key, Local::new(meta, Phase::Starting, None, reaped));
                tracing::info!(task = %key, "task starting");
                let rt = self.clone();
                tokio::spawn(async move { rt.supervise(key).await });
            }
            Err(message) => {
                tracing::warn!(task = %key, "task cannot start: {message}");
                let exit = pb::TaskExited {
                    code: None,
                    signal: None,
                    oom_killed: false,
                    message,
                };
                let meta = TaskMeta {
                    key,
                    gpus: vec![],
                    cgroup: None,
                    shim_pid: 0,
                    stop_signal: 0,
                    grace_ms: 0,
                    kill_on_checkpoint: false,
                    uid: None,
                };
                let mut local = Local::new(meta, Phase::Exited, None, reaped);
                local.exit = Some(exit.clone());
                self.lock().tasks.insert(key, local);
                let _ = self.events.send(Event::Exited { key, exit });
            }
        }
    }

    /// Prepare the folder, cgroup, shim spec and record, then start the
    /// shim (see `launch.rs` for the order and why).
    fn launch(
        &self,
        key: TaskKey,
        a: &pb::TaskAssignment,
        reaped: Arc<tokio::sync::Notify>,
    ) -> Result<TaskMeta, String> {
        let prepared = self.prepare(key, a)?;
        self.spawn_shim(prepared, reaped)
    }

    /// Watch a task until it exits; report its start and its exit.
    async fn supervise(self: Arc<Self>, key: TaskKey) {
        let dir = self.task_dir(key);
        loop {
            let (phase, reaped) = match self.lock().tasks.get(&key) {
                Some(t) => (t.phase, t.reaped.clone()),
                None => return,
            };
            let poll = if phase == Phase::Starting {
                START_POLL
            } else {
                RUN_POLL
            };
            // Adopted shims are not our children: for them only the poll wakes us.
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = reaped.notified() => {}
            }
            if phase == Phase::Starting || phase == Phase::Killing {
                if let Some(pid) = read_pid(&dir.join("pid")) {
                    self.mark_started(key, pid);
                }
            }
            if let Some(exit) = self.check_exit(key, &dir) {
                self.finish(key, exit).await;
                return;
            }
        }
    }

    fn mark_started(&self, key: TaskKey, pid: u32) {
        let mut inner = self.lock();
        let Some(t) = inner.tasks.get_mut(&key) else {
            return;
        };
        if t.pid.is_some() {
            return;
        }
        t.pid = Some(pid);
        if t.phase == Phase::Starting {
            t.phase = Phase::Running;
        }
        drop(inner);
        tracing::info!(task = %key, pid, "task running");
        let _ = self.events.send(Event::Started { key, pid });
    }

    /// The task's exit, if it has ended (or its shim died without a record).
    fn check_exit(&self, key: TaskKey, dir: &Path) -> Option<ExitRecord> {
        let exit_file = dir.join("exit.json");
        if let Some(rec) = read_exit(&exit_file) {
            return Some(rec);
        }
        let shim_pid = self.lock().tasks.get(&key)?.meta.shim_pid;
        let running = match launch::shim_holds_lock(dir) {
            Some(held) => held,
            // A folder from an agent before the lock: the pid must do.
            None => shim_pid != 0 && alive(shim_pid),
        };
        if running {
            return None;
        }
        // The shim may have written the record just now.
        let message = if dir.join("pid").exists() {
            "the task's supervisor died without recording an exit"
        } else {
            "the task's supervisor never started (the agent stopped while launching it)"
        };
        Some(read_exit(&exit_file).unwrap_or(ExitRecord {
            message: message.into(),
            ..ExitRecord::default()
        }))
    }

    async fn finish(self: &Arc<Self>, key: TaskKey, rec: ExitRecord) {
        let cgroup = self
            .lock()
            .tasks
            .get(&key)
            .and_then(|t| t.meta.cgroup.clone());
        let mut oom = false;
        if let (Some(cg), Some(name)) = (self.cgroups.clone(), cgroup) {
            // Freezing and emptying a cgroup can block: keep it off the reactor.
            let cleanup = tokio::task::spawn_blocking(move || {
                let oom = cg.oom_killed(&name).unwrap_or(false);
                // Orphans the task left behind go with it.
                let _ = cg.kill_all(&name, Signal::SIGKILL);
                if let Err(e) = remove_cgroup(cg.as_ref(), &name) {
                    tracing::warn!(task = %key, "cgroup not removed: {e}");
                }
                oom
            });
            oom = cleanup.await.unwrap_or(false);
        }
        let exit = pb::TaskExited {
            code: rec.code,
            signal: rec.signal,
            oom_killed: oom,
            message: rec.message,
        };
        {
            let mut inner = self.lock();
            if let Some(t) = inner.tasks.get_mut(&key) {
                t.phase = Phase::Exited;
                t.exit = Some(exit.clone());
            }
        }
        tracing::info!(task = %key, code = ?exit.code, signal = ?exit.signal, oom, "task exited");
        let _ = self.events.send(Event::Exited { key, exit });
        self.reconcile();
    }

    fn forget(&self, key: TaskKey) {
        self.lock().tasks.remove(&key);
        let dir = self.task_dir(key);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }

    /// Load the task folders a previous agent left and resume watching them.
    fn adopt(self: &Arc<Self>) -> std::io::Result<()> {
        let root = self.settings.data_dir.join("tasks");
        for entry in std::fs::read_dir(&root)? {
            let dir = entry?.path();
            let Some(mut meta) = std::fs::read(dir.join("task.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<TaskMeta>(&b).ok())
            else {
                tracing::warn!("ignoring {}: no readable task.json", dir.display());
                continue;
            };
            if meta.uid.is_none() {
                meta.uid = uid_of_spec(&dir.join("shim.json"));
            }
            let key = meta.key;
            let pid = read_pid(&dir.join("pid"));
            let phase = if pid.is_some() {
                Phase::Running
            } else {
                Phase::Starting
            };
            self.lock().tasks.insert(
                key,
                Local::new(meta, phase, pid, Arc::new(tokio::sync::Notify::new())),
            );
            tracing::info!(task = %key, ?pid, "adopted task from a previous agent");
            let rt = self.clone();
            tokio::spawn(async move { rt.supervise(key).await });
        }
        Ok(())
    }
}

fn remove_cgroup(cg: &dyn Cgroups, name: &str) -> Result<(), crate::cgroup::CgroupError> {
    // The kernel may need a moment to empty a cgroup after SIGKILL.
    let mut last = Ok(());
    for _ in 0..50 {
        last = cg.remove(name);
        if last.is_ok() {
            return last;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    last
}

/// The uid a shim spec runs its task as (a record from an older agent).
fn uid_of_spec(p: &Path) -> Option<u32> {
    let spec: shim::ShimSpec = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    Some(
        spec.uid
            .unwrap_or_else(|| nix::unistd::Uid::effective().as_raw()),
    )
}

fn read_pid(p: &Path) -> Option<u32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn read_exit(p: &Path) -> Option<ExitRecord> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

fn alive(pid: u32) -> bool {
    // A zombie shim (exited, not yet reaped by our reaper thread) counts as dead.
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        if let Some(state) = stat.rsplit(") ").next().and_then(|s| s.chars().next()) {
            return state != 'Z' && state != 'X';
        }
    }
    signal::kill(Pid::from_raw(pid as i32), None).is_ok()
}

#[cfg(test)]
mod tests;
