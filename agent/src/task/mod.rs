//! Tasks on this node: launching them through a shim, watching them, stopping
//! them, and re-adopting them after an agent restart.
//!
//! Each task has a folder `<data_dir>/tasks/<job>.<task>.<alloc>/` with:
//! `task.json` (what the agent needs to re-adopt it), `shim.json` (what the
//! shim runs), `pid` (written by the shim once the task runs) and `exit.json`
//! (written by the shim when it ends), and `fenced` while the shim holds the
//! task frozen for want of a lease ([`fence`]). Logs go through the shim to
//! `<data_dir>/logs/<job>/<task>.stdout|stderr`, capped and rotated
//! ([`logs`]), and outlive the folder.
//!
//! Stopping a task (the job's signal, its grace, SIGKILL; cut short by a
//! checkpoint report or by fencing) lives in `stop.rs`; telling which task a
//! local process belongs to, for the task socket, in [`peer`].
//!
//! [`Runtime`] holds the observed tasks and the latest desired set, runs
//! [`crate::reconcile::reconcile`] whenever either changes, and carries out its
//! actions. Task starts and exits are sent as [`Event`]s to the session with
//! the scheduler; an exit is re-sent on every reconnect until the scheduler
//! stops asking for the task, so a lost connection never loses an exit code.

pub mod fence;
pub mod identity;
pub mod logs;
pub mod peer;
pub mod shim;
mod stop;

use crate::cgroup::{Cgroups, Limits};
use crate::reconcile::{self, Action, Desired, Observed, Phase, TaskKey};
use muster_proto as pb;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use shim::{ExitRecord, ShimSpec};
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
    desired: BTreeMap<TaskKey, pb::TaskAssignment>,
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
        std::fs::create_dir_all(settings.data_dir.join("tasks"))?;
        std::fs::create_dir_all(settings.data_dir.join("logs"))?;
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

    /// Replace the desired set and act on the difference.
    pub fn set_desired(self: &Arc<Self>, tasks: Vec<pb::TaskAssignment>) {
        {
            let mut inner = self.lock();
            inner.desired = tasks
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
        }
        self.reconcile();
    }

    /// Run the pure reconcile and carry out its actions.
    pub fn reconcile(self: &Arc<Self>) {
        let _one_at_a_time = self.reconciling.lock().unwrap_or_else(|p| p.into_inner());
        let (actions, starts) = {
            let inner = self.lock();
            let desired: Vec<Desired> = inner
                .desired
                .iter()
                .map(|(k, a)| Desired {
                    key: *k,
                    gpus: a.gpu_indices.clone(),
                })
                .collect();
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
            let actions = reconcile::reconcile(&desired, &observed);
            let starts: BTreeMap<TaskKey, pb::TaskAssignment> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Start(k) => inner.desired.get(k).map(|d| (*k, d.clone())),
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
                };
                let mut local = Local::new(meta, Phase::Exited, None, reaped);
                local.exit = Some(exit.clone());
                self.lock().tasks.insert(key, local);
                let _ = self.events.send(Event::Exited { key, exit });
            }
        }
    }

    /// Prepare the folder, cgroup and shim spec, and start the shim.
    fn launch(
        &self,
        key: TaskKey,
        a: &pb::TaskAssignment,
        reaped: Arc<tokio::sync::Notify>,
    ) -> Result<TaskMeta, String> {
        let who = identity::resolve(&a.user, self.settings.allow_root_jobs)?;
        let dir = self.task_dir(key);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let stdout = self.log_path(key.job, key.task, "stdout");
        let stderr = self.log_path(key.job, key.task, "stderr");
        if let Some(parent) = stdout.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        identity::prepare_dir(Path::new(&a.checkpoint_dir), &who);
        let (cgroup, procs) = match &self.cgroups {
            Some(cg) => {
                let name = format!("job{}.t{}.a{}", key.job, key.task, key.alloc);
                let limits = Limits {
                    memory_bytes: Some(a.memory_bytes).filter(|m| *m > 0),
                    cpu_millis: Some(a.cpu_millis).filter(|c| *c > 0),
                    cpuset: None,
                    pids_max: None,
                    gpu_minors: a.gpu_minors.clone(),
                };
                cg.create(&name, &limits).map_err(|e| e.to_string())?;
                let procs = cg.procs_files(&name);
                (Some(name), procs)
            }
            None => (None, vec![]),
        };
        let mut env: BTreeMap<String, String> = a.env.clone().into_iter().collect();
        identity::base_env(&mut env, &who);
        let visible = a
            .gpu_indices
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(",");
        env.insert("CUDA_VISIBLE_DEVICES".into(), visible.clone());
        env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
        env.insert("MUSTER_GPUS".into(), visible);
        env.insert(
            "MUSTER_AGENT_SOCKET".into(),
            self.settings.task_socket.to_string_lossy().into_owned(),
        );
        let workdir = if a.workdir.is_empty() {
            who.home.clone()
        } else {
            PathBuf::from(&a.workdir)
        };
        let spec = ShimSpec {
            command: a.command.clone(),
            env,
            workdir,
            uid: who.switch.then_some(who.uid),
            gid: who.switch.then_some(who.gid),
            groups: who.groups.clone(),
            cgroup_procs: procs,
            stdout,
            stderr,
            pid_file: dir.join("pid"),
            exit_file: dir.join("exit.json"),
            log_max_bytes: self.settings.log_max_bytes,
            log_files: self.settings.log_files,
            lease_file: self.settings.lease_file.clone(),
            fence_marker: Some(dir.join(fence::MARKER)),
        };
        let spec_path = dir.join("shim.json");
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| e.to_string())?;
        shim::write_atomic(&spec_path, &json)
            .map_err(|e| format!("cannot write {}: {e}", spec_path.display()))?;
        let child = std::process::Command::new(&self.settings.shim_path)
            .arg("__shim")
            .arg(&spec_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the task supervisor {}: {e}",
                    self.settings.shim_path.display()
                )
            })?;
        let meta = TaskMeta {
            key,
            gpus: a.gpu_indices.clone(),
            cgroup,
            shim_pid: child.id(),
            stop_signal: a.stop_signal,
            grace_ms: a.grace_ms,
            kill_on_checkpoint: a.kill_on_checkpoint,
        };
        // The shim reparents to init if we die; reap it from a thread meanwhile.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
            reaped.notify_one();
        });
        let json = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
        shim::write_atomic(&dir.join("task.json"), &json)
            .map_err(|e| format!("cannot write task record: {e}"))?;
        Ok(meta)
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
        if shim_pid != 0 && !alive(shim_pid) {
            // The shim may have written the record just now.
            return Some(read_exit(&exit_file).unwrap_or(ExitRecord {
                message: "the task's supervisor died without recording an exit".into(),
                ..ExitRecord::default()
            }));
        }
        None
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
            let Some(meta) = std::fs::read(dir.join("task.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<TaskMeta>(&b).ok())
            else {
                tracing::warn!("ignoring {}: no readable task.json", dir.display());
                continue;
            };
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
