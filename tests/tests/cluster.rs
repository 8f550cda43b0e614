//! End-to-end tests of real `muster-scheduler` and `muster-agent` processes
//! on loopback, with GPUs from the NVML mock, driven through the `muster` CLI.
//! Isolation tests need root and cgroup v1 (CI has both); elsewhere they say
//! why they skip.

use muster_tests::{has_cgroup_v1, wait_for, Cluster, ClusterSpec};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn env_of(c: &Cluster, job: u64, task: u32) -> std::collections::BTreeMap<String, String> {
    let out = c
        .ok(&["logs", &job.to_string(), "--task", &task.to_string()])
        .expect("logs");
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn gang_runs_on_disjoint_gpus_with_rank_env() {
    let c = Cluster::start(ClusterSpec::default()).expect("cluster");
    let id = c
        .submit(&[
            "--tasks", "2", "--gpus", "4", "--cpus", "1", "--mem", "256M", "--", "env",
        ])
        .expect("submit");
    let job = c.wait_state(id, "completed", T).expect("completed");
    let tasks = job["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 2);
    let mut seen = BTreeSet::new();
    for t in tasks {
        assert_eq!(t["exit_code"], 0, "{job}");
        let node = t["node"].as_str().expect("node").to_string();
        for g in t["gpus"].as_array().expect("gpus") {
            assert!(
                seen.insert((node.clone(), g.as_u64())),
                "GPU booked twice: {job}"
            );
        }
    }
    assert_eq!(seen.len(), 8);
    let nodes: BTreeSet<&str> = tasks.iter().filter_map(|t| t["node"].as_str()).collect();
    assert_eq!(nodes.len(), 2, "a 4-GPU task per 4-GPU node: {job}");
    for rank in 0..2u32 {
        let env = env_of(&c, id, rank);
        assert_eq!(env["RANK"], rank.to_string());
        assert_eq!(env["MUSTER_RANK"], rank.to_string());
        assert_eq!(env["WORLD_SIZE"], "2");
        assert_eq!(env["LOCAL_RANK"], "0");
        assert_eq!(env["MASTER_ADDR"], "127.0.0.1");
        assert!(env["MASTER_PORT"].parse::<u16>().is_ok());
        assert_eq!(env["MUSTER_JOB_ID"], id.to_string());
        assert_eq!(env["MUSTER_RESTART_COUNT"], "0");
        assert!(env["MUSTER_CHECKPOINT_DIR"].ends_with(&format!("checkpoints/{id}")));
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "0,1,2,3");
    }
    let e0 = env_of(&c, id, 0);
    let e1 = env_of(&c, id, 1);
    assert_eq!(e0["MASTER_PORT"], e1["MASTER_PORT"]);
}

#[test]
fn bad_jobs_are_rejected_without_state_change() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let before = c.json(&["queue", "--all"]).expect("queue");
    let cases: &[(&[&str], &str)] = &[
        (&["--gpus", "5", "--", "true"], "largest node has 4"),
        (&["--tenant", "nope", "--", "true"], "nope"),
        (&["--tasks", "0", "--", "true"], "tasks"),
        (&["--mem", "0", "--", "true"], "mem"),
    ];
    for (args, needle) in cases {
        let mut a = vec!["submit"];
        a.extend_from_slice(args);
        let out = c.muster(&a).expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        let first = err.lines().next().unwrap_or("");
        assert!(
            first.contains(needle),
            "{args:?}: the first line should say why: {err}"
        );
    }
    let out = c.muster(&["show", "999"]).expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("999"));
    let out = c.muster(&["cancel", "999"]).expect("run");
    assert!(!out.status.success());
    assert_eq!(c.json(&["queue", "--all"]).expect("queue"), before);
}

#[test]
fn cancel_kills_the_whole_process_tree() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let pidfile = c.path("grandchild.pid");
    // A shell that starts a grandchild ignoring SIGTERM, then waits.
    let script = format!(
        "sh -c 'trap \"\" TERM; sleep 600' & echo $! > {}; sleep 600",
        pidfile.display()
    );
    let id = c
        .submit(&["--gpus", "1", "--", "sh", "-c", &script])
        .expect("submit");
    c.wait_state(id, "running", T).expect("running");
    let pid: i32 = wait_for("grandchild pid", T, || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })
    .expect("pid");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let out = c.ok(&["cancel", &id.to_string()]).expect("cancel");
    assert!(out.contains("cancelled"), "{out}");
    wait_for("the process tree to be gone", T, || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .expect("tree killed");
    let job = c.wait_state(id, "cancelled", T).expect("cancelled");
    // The GPU comes back once the agent reports the exit.
    wait_for("the GPU to be released", T, || {
        let nodes = c.json(&["nodes"]).ok()?;
        let free = nodes["nodes"][0]["gpus"]
            .as_array()?
            .iter()
            .all(|g| g["allocated_to"].is_null());
        free.then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {job}"));
}

#[test]
fn scheduler_kill_9_and_restart_keeps_every_job() {
    let mut c = Cluster::start(ClusterSpec::default()).expect("cluster");
    let done = c.submit(&["--", "true"]).expect("submit");
    c.wait_state(done, "completed", T).expect("completed");
    let running = c
        .submit(&["--tasks", "2", "--gpus", "4", "--", "sleep", "600"])
        .expect("submit");
    c.wait_state(running, "running", T).expect("running");
    let pending = c.submit(&["--gpus", "1", "--", "true"]).expect("submit");
    let cancelled = c.submit(&["--gpus", "1", "--", "true"]).expect("submit");
    c.ok(&["cancel", &cancelled.to_string()]).expect("cancel");
    let before = c.json(&["queue", "--all"]).expect("queue");
    let pid_before = task_pid_files(&c);
    c.kill_scheduler();
    c.start_scheduler().expect("restart");
    let after = c.json(&["queue", "--all"]).expect("queue");
    let summary = |v: &Value| -> Vec<(u64, String)> {
        let mut s: Vec<(u64, String)> = v["jobs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|j| (j["id"].as_u64().unwrap_or(0), j["state"].to_string()))
            .collect();
        s.sort();
        s
    };
    assert_eq!(summary(&before), summary(&after));
    assert_eq!(c.show(pending).expect("show")["state"], "pending");
    assert_eq!(c.show(running).expect("show")["state"], "running");
    // Agents reconnect; the running gang is adopted, not restarted.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.show(running).expect("show")["state"], "running");
    assert_eq!(pid_before, task_pid_files(&c), "tasks were restarted");
    let next = c.submit(&["--", "true"]).expect("submit after restart");
    assert!(next > cancelled, "ids are not reused");
}

fn task_pid_files(c: &Cluster) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for i in 0..c.spec.agents {
        if let Ok(entries) = std::fs::read_dir(c.path(&format!("agent-{i}-data/tasks"))) {
            for e in entries.flatten() {
                if let Ok(pid) = std::fs::read_to_string(e.path().join("pid")) {
                    out.insert(format!(
                        "{}:{}",
                        e.file_name().to_string_lossy(),
                        pid.trim()
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn task_cannot_open_a_gpu_it_was_not_given() {
    if !has_cgroup_v1() {
        println!("skipped: needs root and writable cgroup v1 controllers (CI has both)");
        return;
    }
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let devdir = c.path("dev");
    std::fs::create_dir_all(&devdir).expect("mkdir");
    for minor in 0..4u64 {
        let node = devdir.join(format!("nvidia{minor}"));
        nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(195, minor),
        )
        .expect("mknod");
    }
    // The job gets one GPU (minor 0 on an idle node) and tries every node.
    let script = format!(
        "for m in 0 1 2 3; do if cat {d}/nvidia$m 2>&1; then echo \"$m ok\"; fi; done; echo visible=$CUDA_VISIBLE_DEVICES",
        d = devdir.display()
    );
    let id = c
        .submit(&["--gpus", "1", "--", "sh", "-c", &script])
        .expect("submit");
    let job = c.wait_state(id, "completed", T).expect("completed");
    let gpu = job["tasks"][0]["gpus"][0].as_u64().expect("gpu");
    let out = c.ok(&["logs", &id.to_string()]).expect("logs");
    for m in 0..4u64 {
        let line = out
            .lines()
            .find(|l| l.contains(&format!("nvidia{m}")))
            .unwrap_or_else(|| panic!("no line for nvidia{m}: {out}"));
        if m == gpu {
            assert!(
                line.contains("No such device or address"),
                "own GPU: {line}"
            );
        } else {
            assert!(line.contains("Operation not permitted"), "GPU {m}: {line}");
        }
    }
}

#[test]
fn task_past_its_memory_limit_is_oom_killed() {
    if !has_cgroup_v1() {
        println!("skipped: needs root and writable cgroup v1 controllers (CI has both)");
        return;
    }
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let id = c
        .submit(&[
            "--mem",
            "32M",
            "--",
            "sh",
            "-c",
            "head -c 300000000 /dev/zero | tail > /dev/null; echo survived",
        ])
        .expect("submit");
    let job = c.wait_state(id, "failed", T).expect("failed");
    assert_eq!(job["tasks"][0]["oom_killed"], true, "{job}");
    assert!(
        job["reason"].as_str().unwrap_or("").contains("OOM"),
        "{job}"
    );
    let show = c.ok(&["show", &id.to_string()]).expect("show");
    assert!(show.contains("OOM") || show.contains("yes"), "{show}");
}

#[test]
fn failed_task_fails_its_gang_and_kills_the_others() {
    let c = Cluster::start(ClusterSpec::default()).expect("cluster");
    let id = c
        .submit(&[
            "--tasks",
            "2",
            "--gpus",
            "1",
            "--",
            "sh",
            "-c",
            "if [ $RANK = 1 ]; then exit 3; fi; sleep 600",
        ])
        .expect("submit");
    let job = c.wait_state(id, "failed", T).expect("failed");
    assert!(
        job["reason"]
            .as_str()
            .unwrap_or("")
            .contains("task 1 exit code 3"),
        "{job}"
    );
    wait_for("the surviving task to be killed", T, || {
        let j = c.show(id).ok()?;
        let states: Vec<&str> = j["tasks"]
            .as_array()?
            .iter()
            .filter_map(|t| t["state"].as_str())
            .collect();
        states.iter().all(|s| *s == "exited").then_some(())
    })
    .expect("killed");
}

#[test]
fn job_array_submits_n_jobs_with_their_index() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let v = c
        .json(&[
            "submit",
            "--array",
            "3",
            "--name",
            "sweep",
            "--",
            "sh",
            "-c",
            "echo $MUSTER_ARRAY_INDEX",
        ])
        .expect("submit");
    let first = v["id"].as_u64().expect("id");
    assert_eq!(v["count"], 3);
    for i in 0..3u64 {
        let job = c.wait_state(first + i, "completed", T).expect("completed");
        assert_eq!(job["spec"]["name"], format!("sweep[{i}]"));
        let out = c.ok(&["logs", &(first + i).to_string()]).expect("logs");
        assert_eq!(out.trim(), i.to_string());
    }
    let out = c
        .muster(&["submit", "--array", "0", "--", "true"])
        .expect("run");
    assert!(!out.status.success());
}
