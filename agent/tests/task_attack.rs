//! Attacks on the agent's task runtime as a real unprivileged user (issue
//! 18, #1 and #3): the runtime runs as root, as in production, with the
//! agent binary itself as the shim, and launches tasks for local users.
//!
//! * A checkpoint directory that is a symlink to a root-owned folder, or a
//!   path in `/etc`, fails the task with a message naming the path, and the
//!   root-owned target is untouched (the old agent did `mkdir -p` and
//!   `chown` as root, handing such folders to the user).
//! * A task's record (`shim.json` holds its environment) and its logs are
//!   root's alone: another local user cannot read them.

use muster_agent::reconcile::TaskKey;
use muster_agent::task::{Event, Runtime, RuntimeSettings};
use muster_proto as pb;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const VICTIM: &str = "muster-agent-t1";
const OTHER: &str = "muster-agent-t2";

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn ensure_user(name: &str) -> u32 {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let find = || nix::unistd::User::from_name(name).ok().flatten();
    if let Some(u) = find() {
        return u.uid.as_raw();
    }
    let out = std::process::Command::new("useradd")
        .args(["-M", "-s", "/bin/sh", name])
        .output()
        .expect("run useradd");
    let u = find()
        .unwrap_or_else(|| panic!("useradd {name}: {}", String::from_utf8_lossy(&out.stderr)));
    u.uid.as_raw()
}

struct Agent {
    _dir: tempfile::TempDir,
    root: PathBuf,
    rt: Arc<Runtime>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        // The test's folder is open like a home or /tmp would be.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = root.join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let settings = RuntimeSettings {
            data_dir: data.clone(),
            shim_path: PathBuf::from(env!("CARGO_BIN_EXE_muster-agent")),
            allow_root_jobs: false,
            kill_grace: Duration::from_secs(5),
            lease_file: None,
            task_socket: root.join("task.sock"),
            log_max_bytes: 1 << 20,
            log_files: 2,
            cgroup_parent: "muster-attack-test".into(),
        };
        let (tx, events) = mpsc::unbounded_channel();
        let rt = Runtime::new(settings, None, tx).unwrap();
        Agent {
            _dir: dir,
            root,
            rt,
            events,
        }
    }

    /// Run one task of `user` to its end; its exit.
    async fn run(&mut self, job: u64, user: &str, checkpoint: (&Path, &str)) -> pb::TaskExited {
        let key = TaskKey {
            job,
            alloc: job,
            task: 0,
        };
        let a = pb::TaskAssignment {
            job_id: job,
            alloc_id: job,
            task_index: 0,
            user: user.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo out-$SECRET; touch $MUSTER_CHECKPOINT_DIR/step-1 || true".into(),
            ],
            env: [
                ("SECRET".to_string(), format!("env-secret-{job}")),
                (
                    "MUSTER_CHECKPOINT_DIR".to_string(),
                    checkpoint.0.to_string_lossy().into_owned(),
                ),
            ]
            .into(),
            workdir: "/".into(),
            checkpoint_dir: checkpoint.0.to_string_lossy().into_owned(),
            checkpoint_root: checkpoint.1.into(),
            ..Default::default()
        };
        self.rt.set_desired(vec![a]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("the task ends in time")
                .expect("events open");
            if let Event::Exited { key: k, exit } = ev {
                if k == key {
                    return exit;
                }
            }
        }
    }

    fn task_dir(&self, job: u64) -> PathBuf {
        self.root.join(format!("data/tasks/{job}.0.{job}"))
    }
}

/// Whether `user` can read `path` (as a real process of theirs).
fn can_read(user: &str, path: &Path) -> bool {
    std::process::Command::new("runuser")
        .args(["-u", user, "--", "cat"])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run runuser")
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_dirs_are_made_with_the_users_rights_only() {
    if !is_root() {
        eprintln!("skipping: needs root to run tasks as another user (CI runs as root)");
        return;
    }
    let uid = ensure_user(VICTIM);
    let mut agent = Agent::start();
    // A folder root owns, and a symlink to it the user planted.
    let precious = agent.root.join("precious");
    std::fs::create_dir(&precious).unwrap();
    let scratch = agent.root.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let link = scratch.join("ckpt-link");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let exit = agent.run(1, VICTIM, (&link, "")).await;
    assert!(
        exit.message.contains(&*link.to_string_lossy()) && exit.code.is_none(),
        "{exit:?}"
    );
    let m = std::fs::metadata(&precious).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o755), "target untouched");
    assert!(!precious.join("step-1").exists());

    // A path in /etc.
    let etc = PathBuf::from(format!("/etc/muster-attack-{}", std::process::id()));
    let exit = agent.run(2, VICTIM, (&etc, "")).await;
    assert!(
        exit.message.contains(&*etc.to_string_lossy()) && exit.message.contains(VICTIM),
        "{exit:?}"
    );
    assert!(!etc.exists(), "{} was created", etc.display());

    // The scheduler's default, below its root-owned checkpoint_root: made as
    // root, given to the user; the task writes into it.
    // (The root does not exist yet: the agent makes it, open to users.)
    let ckroot = agent.root.join("checkpoints");
    let own = ckroot.join("3");
    let exit = agent
        .run(3, VICTIM, (&own, &ckroot.to_string_lossy()))
        .await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert_eq!(std::fs::metadata(&own).unwrap().uid(), uid);
    assert_eq!(std::fs::metadata(own.join("step-1")).unwrap().uid(), uid);
    // ...but a symlink planted where the default would go is not followed.
    std::os::unix::fs::symlink(&precious, ckroot.join("4")).unwrap();
    let exit = agent
        .run(4, VICTIM, (&ckroot.join("4"), &ckroot.to_string_lossy()))
        .await;
    assert!(exit.message.contains("symlinks are refused"), "{exit:?}");
    assert_eq!(std::fs::metadata(&precious).unwrap().uid(), 0);

    // A folder of the user's own choosing where they may create one.
    let mine = scratch.join("mine/deep");
    let exit = agent.run(5, VICTIM, (&mine, "")).await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert_eq!(std::fs::metadata(&mine).unwrap().uid(), uid);
    assert_eq!(
        std::fs::metadata(scratch.join("mine")).unwrap().uid(),
        uid,
        "every level made as the user"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_cannot_read_a_tasks_record_or_logs() {
    if !is_root() {
        eprintln!("skipping: needs root to run tasks as other users (CI runs as root)");
        return;
    }
    ensure_user(VICTIM);
    ensure_user(OTHER);
    let mut agent = Agent::start();
    let scratch = agent.root.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let exit = agent.run(7, VICTIM, (&scratch.join("c7"), "")).await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
    let dir = agent.task_dir(7);
    let spec = dir.join("shim.json");
    assert!(std::fs::read_to_string(&spec)
        .unwrap()
        .contains("env-secret-7"));
    let log = agent.rt.log_path(7, 0, "stdout");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "out-env-secret-7\n");
    for f in [&spec, &dir.join("task.json"), &log] {
        let mode = std::fs::metadata(f).unwrap().mode();
        assert_eq!(mode & 0o077, 0, "{} is {:o}", f.display(), mode & 0o777);
    }
    for d in ["data", "data/tasks", "data/logs", "data/logs/7"] {
        let mode = std::fs::metadata(agent.root.join(d)).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700, "{d} is {:o}", mode & 0o777);
    }
    for who in [OTHER, VICTIM] {
        assert!(!can_read(who, &spec), "{who} read {}", spec.display());
        assert!(!can_read(who, &log), "{who} read {}", log.display());
    }
    // Even with the data folder opened up (an operator's chmod), the files
    // stay private.
    for d in ["data", "data/tasks", "data/logs", "data/logs/7"] {
        let p = agent.root.join(d);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(!can_read(OTHER, &spec));
    assert!(!can_read(OTHER, &log));
}
