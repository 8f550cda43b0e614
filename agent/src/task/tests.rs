//! The runtime's crash and restart rules, with a stand-in shim (a shell
//! script) so that no real task runs: the record is written before the
//! supervisor starts, a record whose supervisor never started is reported
//! and not started again, and a restarted agent kills nothing before the
//! first assignment set of its session.

use super::launch::tests::AT_SPAWN;
use super::*;
use std::os::unix::fs::PermissionsExt;

/// A stand-in shim: task 1 of any job "runs" (writes its pid and sleeps,
/// holding the lock it got as stdin); every other task exits at once.
const SHIM: &str = r#"#!/bin/sh
d=$(dirname "$2")
case "$d" in
  */1.0.*) echo $$ > "$d/pid.tmp"; mv "$d/pid.tmp" "$d/pid"; exec sleep 30 ;;
esac
touch "$d/shim-ran"
echo '{"code":0,"signal":null,"message":""}' > "$d/exit.json.tmp"
mv "$d/exit.json.tmp" "$d/exit.json"
"#;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let shim = dir.path().join("shim.sh");
        std::fs::write(&shim, SHIM).unwrap();
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        Fixture { dir }
    }

    fn runtime(&self) -> (Arc<Runtime>, mpsc::UnboundedReceiver<Event>) {
        let settings = RuntimeSettings {
            data_dir: self.dir.path().join("data"),
            shim_path: self.dir.path().join("shim.sh"),
            allow_root_jobs: true,
            kill_grace: Duration::from_secs(30),
            lease_file: None,
            task_socket: self.dir.path().join("task.sock"),
            log_max_bytes: 1 << 20,
            log_files: 2,
            cgroup_parent: "muster-test".into(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        (Runtime::new(settings, None, tx).unwrap(), rx)
    }

    fn task_dir(&self, key: TaskKey) -> PathBuf {
        self.dir
            .path()
            .join("data/tasks")
            .join(format!("{}.{}.{}", key.job, key.task, key.alloc))
    }
}

fn key(job: u64) -> TaskKey {
    TaskKey {
        job,
        alloc: job * 10,
        task: 0,
    }
}

fn assignment(key: TaskKey) -> pb::TaskAssignment {
    let me = nix::unistd::User::from_uid(nix::unistd::Uid::effective())
        .unwrap()
        .unwrap();
    pb::TaskAssignment {
        job_id: key.job,
        alloc_id: key.alloc,
        task_index: key.task,
        user: me.name,
        command: vec!["true".into()],
        ..Default::default()
    }
}

/// The next exit event for `key` within a few seconds.
async fn exit_of(rx: &mut mpsc::UnboundedReceiver<Event>, want: TaskKey) -> pb::TaskExited {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("an exit event in time")
            .expect("events open");
        if let Event::Exited { key, exit } = ev {
            if key == want {
                return exit;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_is_on_disk_before_the_shim_starts() {
    let f = Fixture::new();
    let (rt, mut rx) = f.runtime();
    let k = key(2);
    AT_SPAWN.with(|v| v.borrow_mut().clear());
    rt.set_desired(vec![assignment(k)]);
    let seen = AT_SPAWN.with(|v| v.borrow().clone());
    assert_eq!(seen, vec![(f.task_dir(k), true)], "record before spawn");
    let exit = exit_of(&mut rx, k).await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    // Files holding the job's environment are root's alone.
    for name in ["task.json", "shim.json"] {
        let mode = std::fs::metadata(f.task_dir(k).join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name} is {mode:o}");
    }
    for d in ["data/tasks", "data/logs", "data/logs/2"] {
        let mode = std::fs::metadata(f.dir.path().join(d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{d} is {mode:o}");
    }
}

/// The agent wrote the record and stopped before starting the shim: the
/// restarted agent reports the task exited and never starts it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_supervisor_never_started_is_reported_not_restarted() {
    let f = Fixture::new();
    let k = key(2);
    {
        let (rt, _rx) = f.runtime();
        rt.prepare(k, &assignment(k)).expect("prepared");
        // ...and the agent dies here: no shim, the lock released.
    }
    assert!(f.task_dir(k).join("task.json").exists());
    let (rt, mut rx) = f.runtime();
    let exit = exit_of(&mut rx, k).await;
    assert!(exit.message.contains("never started"), "{exit:?}");
    AT_SPAWN.with(|v| v.borrow_mut().clear());
    rt.set_desired(vec![assignment(k)]);
    assert!(AT_SPAWN.with(|v| v.borrow().is_empty()), "started again");
    assert!(!f.task_dir(k).join("shim-ran").exists());
}

/// A restarted agent adopts a running task and one that exited while it
/// was down. The exit triggers a reconcile before the session's first
/// assignment set: the running task must not be stopped (the old code read
/// "no set yet" as "an empty set" and stopped every adopted task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_stops_nothing_before_its_first_assignment_set() {
    let f = Fixture::new();
    let (running, exited) = (key(1), key(2));
    {
        let (rt, _rx) = f.runtime();
        rt.set_desired(vec![assignment(running)]);
        rt.prepare(exited, &assignment(exited)).unwrap();
    }
    // The second task's shim ran and ended while no agent watched.
    let rec = serde_json::to_vec(&ExitRecord::default()).unwrap();
    shim::write_atomic(&f.task_dir(exited).join("exit.json"), &rec).unwrap();
    let pid_file = f.task_dir(running).join("pid");
    for _ in 0..500 {
        if pid_file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = read_pid(&pid_file).expect("the running task's pid");
    let (rt, mut rx) = f.runtime();
    assert!(!rt.desired_known());
    exit_of(&mut rx, exited).await;
    // The exit's reconcile has run; give a kill every chance to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let phase = rt.lock().tasks.get(&running).map(|t| t.phase);
    assert_eq!(phase, Some(Phase::Running), "the adopted task was stopped");
    assert!(alive(pid));
    // The first set arrives: now its rules apply (the exited task, no
    // longer wanted, is kept until its exit was delivered).
    rt.set_desired(vec![assignment(running)]);
    assert!(rt.desired_known());
    assert_eq!(
        rt.lock().tasks.get(&running).map(|t| t.phase),
        Some(Phase::Running)
    );
    // A new session: unknown again.
    rt.begin_session();
    assert!(!rt.desired_known());
    let _ = signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}
