//! The job lifecycle end to end, with real daemons, the NVML mock (with
//! fault injection) and, as root, real cgroups: preemption with a
//! checkpoint and resume, time limits, restarts, drain, a GPU fault, an
//! agent killed with `kill -9`, a stalled agent fenced, and capped logs.

use muster_nvml_mock::{write_faults, Fault};
use muster_tests::{binary, wait_for, Cluster, ClusterSpec};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Preemption allowed at once (the default protects jobs for 10 minutes).
const PREEMPT_NOW: &str = "[scheduling]\nmin_runtime = \"0s\"\n";

fn muster_bin() -> String {
    binary("muster").display().to_string()
}

fn logs(c: &Cluster, job: u64, task: u32) -> String {
    c.ok(&["logs", &job.to_string(), "--task", &task.to_string()])
        .unwrap_or_default()
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.rsplit(") ").next().unwrap_or("").starts_with('Z'))
            .unwrap_or(false)
}

/// The main pids of the tasks agent `i` runs.
fn task_pids(c: &Cluster, i: usize) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(c.agent_data(i).join("tasks")) else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

#[test]
fn preemption_signals_waits_for_the_checkpoint_and_resumes_from_it() {
    let c = Cluster::start(ClusterSpec {
        scheduler_toml: PREEMPT_NOW,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    // On USR1 each task writes its checkpoint and reports it, then lingers:
    // the agent must kill it at once, not after the 5-minute grace.
    let script = r#"
ck="$MUSTER_CHECKPOINT_DIR/ckpt.$RANK"
if [ -f "$ck" ]; then echo "resumed restart=$MUSTER_RESTART_COUNT from $(cat "$ck")"; exit 0; fi
trap 'echo step-3 > "$ck"; "$MUSTER_BIN" checkpoint done --step 3; sleep 600' USR1
echo started
while true; do sleep 0.1; done
"#;
    let bin = format!("MUSTER_BIN={}", muster_bin());
    let low = c
        .submit(&[
            "--tasks",
            "2",
            "--gpus",
            "4",
            "--priority",
            "low",
            "--signal",
            "USR1",
            "--grace",
            "5m",
            "--checkpoint-on-preempt",
            "--env",
            &bin,
            "--",
            "sh",
            "-c",
            script,
        ])
        .expect("submit low");
    c.wait_state(low, "running", T).expect("low running");
    wait_for("both tasks to start", T, || {
        (logs(&c, low, 0).contains("started") && logs(&c, low, 1).contains("started")).then_some(())
    })
    .expect("started");
    let high = c
        .submit(&[
            "--tasks",
            "1",
            "--gpus",
            "4",
            "--priority",
            "high",
            "--",
            "sleep",
            "2",
        ])
        .expect("submit high");
    let started = std::time::Instant::now();
    c.wait_state(high, "running", T).expect("high running");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the victim was killed on its checkpoint report, not after its 5-minute grace"
    );
    let shown = c.show(low).expect("show");
    assert_eq!(shown["checkpoint"]["step"], 3, "{shown}");
    assert_eq!(shown["stop_signal_name"], "SIGUSR1", "{shown}");
    let dir = c.path(&format!("checkpoints/{low}")).display().to_string();
    assert_eq!(shown["spec"]["checkpoint_dir"], dir.as_str(), "{shown}");
    let done = c.wait_state(low, "completed", T).expect("low resumed");
    assert_eq!(done["restart_count"], 1, "{done}");
    assert_eq!(done["failures"], 0, "a preemption is not a failure: {done}");
    for task in 0..2 {
        let out = logs(&c, low, task);
        assert!(
            out.contains("resumed restart=1 from step-3"),
            "task {task}: {out}"
        );
    }
    let text = c.ok(&["show", &low.to_string()]).expect("show text");
    assert!(
        text.contains("Checkpoint:") && text.contains("step 3"),
        "{text}"
    );
}

#[test]
fn a_time_limit_sends_the_signal_then_kills_after_the_grace() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    // Ignores its signal: only the SIGKILL after the grace can end it.
    let script = "trap 'echo got USR1' USR1; while true; do sleep 0.1; done";
    let id = c
        .submit(&[
            "--time", "2s", "--signal", "USR1", "--grace", "2s", "--", "sh", "-c", script,
        ])
        .expect("submit");
    let job = c.wait_state(id, "timed-out", T).expect("timed out");
    assert!(
        job["reason"].as_str().unwrap_or("").contains("time limit"),
        "{job}"
    );
    let task = &job["tasks"][0];
    let killed = wait_for("the task's exit", T, || {
        let j = c.show(id).ok()?;
        let t = j["tasks"][0].clone();
        (t["state"] == "exited").then_some(t)
    })
    .unwrap_or_else(|e| panic!("{e}; {task}"));
    assert_eq!(killed["signal_name"], "SIGKILL", "{killed}");
    assert!(
        logs(&c, id, 0).contains("got USR1"),
        "the signal came first"
    );
}

#[test]
fn max_restarts_restarts_the_whole_gang_after_a_failure() {
    let c = Cluster::start(ClusterSpec::default()).expect("cluster");
    let script = r#"echo "run $MUSTER_RESTART_COUNT"; [ "$MUSTER_RESTART_COUNT" = 1 ] && exit 0; [ "$RANK" = 0 ] && exit 3; sleep 600"#;
    let id = c
        .submit(&[
            "--tasks",
            "2",
            "--gpus",
            "1",
            "--max-restarts",
            "1",
            "--",
            "sh",
            "-c",
            script,
        ])
        .expect("submit");
    let job = c
        .wait_state(id, "completed", T)
        .expect("completed after a restart");
    assert_eq!(job["restart_count"], 1, "{job}");
    assert_eq!(job["failures"], 1, "{job}");
    let no_restarts = c.submit(&["--", "sh", "-c", "exit 3"]).expect("submit");
    let failed = c.wait_state(no_restarts, "failed", T).expect("failed");
    assert_eq!(failed["restart_count"], 0, "{failed}");
}

#[test]
fn a_drained_node_finishes_its_work_and_takes_no_more_until_resumed() {
    let c = Cluster::start(ClusterSpec::default()).expect("cluster");
    let long = c
        .submit(&["--gpus", "1", "--", "sleep", "600"])
        .expect("submit");
    let job = c.wait_state(long, "running", T).expect("running");
    let node = job["tasks"][0]["node"].as_str().expect("node").to_string();
    let out = c
        .ok(&["node", "drain", &node, "--reason", "maintenance"])
        .expect("drain");
    assert!(
        out.contains("draining") && out.contains("maintenance"),
        "{out}"
    );
    assert_eq!(
        c.show(long).expect("show")["state"],
        "running",
        "work finishes"
    );
    // Needs both nodes' GPUs: cannot start while one is drained.
    let wide = c
        .submit(&["--tasks", "2", "--gpus", "4", "--", "true"])
        .expect("submit wide");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.show(wide).expect("show")["state"], "pending");
    c.ok(&["cancel", &long.to_string()]).expect("cancel");
    wait_for("the node to be drained", T, || {
        let v = c.json(&["nodes"]).ok()?;
        let n = v["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == node.as_str())?
            .clone();
        (n["state"] == "drained").then_some(())
    })
    .expect("drained");
    let text = c.ok(&["nodes"]).expect("nodes");
    assert!(
        text.contains(&format!("{node}: drained: maintenance")),
        "{text}"
    );
    c.ok(&["node", "resume", &node]).expect("resume");
    c.wait_state(wide, "completed", T)
        .expect("runs after resume");
    let bad = c.muster(&["node", "drain", "no-such-node"]).expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no-such-node"));
}

#[test]
fn an_xid_79_requeues_the_job_onto_healthy_gpus_and_marks_the_gpu() {
    let c = Cluster::start(ClusterSpec::default()).expect("cluster");
    let id = c
        .submit(&["--gpus", "4", "--", "sleep", "600"])
        .expect("submit");
    let job = c.wait_state(id, "running", T).expect("running");
    let node = job["tasks"][0]["node"].as_str().expect("node").to_string();
    let agent: usize = node.trim_start_matches("node-").parse().expect("index");
    let nodes = c.json(&["nodes"]).expect("nodes");
    let uuid = nodes["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == node.as_str()))
        .and_then(|n| n["gpus"][1]["uuid"].as_str())
        .expect("uuid")
        .to_string();
    write_faults(c.faults_file(agent), &[Fault::Xid { uuid, xid: 79 }]).expect("inject");
    let moved = wait_for("the job to run on the other node", T, || {
        let j = c.show(id).ok()?;
        let on = j["tasks"][0]["node"].as_str()?.to_string();
        (j["state"] == "running" && on != node).then_some(j)
    })
    .unwrap_or_else(|e| panic!("{e}; {}", c.log_tail()));
    assert_eq!(moved["restart_count"], 1, "{moved}");
    assert_eq!(
        moved["failures"], 0,
        "a GPU fault is not the job's: {moved}"
    );
    let nodes = c.json(&["nodes"]).expect("nodes");
    let gpu = nodes["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == node.as_str()))
        .map(|n| n["gpus"][1].clone())
        .expect("gpu");
    assert_eq!(gpu["healthy"], false, "{gpu}");
    assert_eq!(gpu["fault"], "XID 79: GPU has fallen off the bus", "{gpu}");
    let text = c.ok(&["nodes"]).expect("nodes text");
    assert!(text.contains(&format!("{node}: GPU 1: XID 79")), "{text}");
    // With one GPU out, that node can no longer take a 4-GPU task.
    c.ok(&["cancel", &id.to_string()]).expect("cancel");
    let again = c
        .submit(&["--tasks", "2", "--gpus", "4", "--", "true"])
        .expect("submit");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.show(again).expect("show")["state"], "pending");
    c.ok(&["node", "resume", &node])
        .expect("resume clears the fault");
    c.wait_state(again, "completed", T)
        .expect("runs after resume");
}

#[test]
fn an_agent_killed_with_kill_9_leaves_its_task_running_and_reports_its_exit() {
    let mut c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let id = c
        .submit(&["--", "sh", "-c", "sleep 4; exit 7"])
        .expect("submit");
    c.wait_state(id, "running", T).expect("running");
    let pids = wait_for("the task's pid", T, || {
        let p = task_pids(&c, 0);
        (!p.is_empty()).then_some(p)
    })
    .expect("pid");
    c.kill_agent(0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(pid_alive(pids[0]), "the task outlives its agent");
    c.start_agent(0).expect("restart agent");
    let job = c
        .wait_state(id, "failed", T)
        .expect("failed with its own code");
    assert_eq!(job["tasks"][0]["exit_code"], 7, "{job}");
    assert_eq!(job["restart_count"], 0, "adopted, not restarted: {job}");
}

/// Lines `<unix-ms>` a copy of the task wrote, per node.
fn beats(c: &Cluster, job: u64, node: &str) -> Vec<u128> {
    let p = c.path(&format!("checkpoints/{job}/beats.{node}"));
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn a_stalled_agent_is_fenced_before_its_job_runs_elsewhere() {
    let c = Cluster::start(ClusterSpec::default()).expect("cluster");
    let script = r#"while true; do date +%s%3N >> "$MUSTER_CHECKPOINT_DIR/beats.$MUSTER_NODE"; sleep 0.05; done"#;
    let id = c
        .submit(&["--gpus", "4", "--", "sh", "-c", script])
        .expect("submit");
    let job = c.wait_state(id, "running", T).expect("running");
    let first = job["tasks"][0]["node"].as_str().expect("node").to_string();
    let agent: usize = first.trim_start_matches("node-").parse().expect("index");
    wait_for("beats", T, || {
        (!beats(&c, id, &first).is_empty()).then_some(())
    })
    .expect("beats");
    c.signal_agent(agent, Signal::SIGSTOP).expect("stop agent");
    let moved = wait_for("the job to run on the other node", T, || {
        let j = c.show(id).ok()?;
        let on = j["tasks"][0]["node"].as_str()?.to_string();
        (j["state"] == "running" && on != first).then_some(on)
    });
    let second = match moved {
        Ok(n) => n,
        Err(e) => {
            let _ = c.signal_agent(agent, Signal::SIGCONT);
            panic!("{e}; {}", c.log_tail());
        }
    };
    wait_for("beats of the new copy", T, || {
        (!beats(&c, id, &second).is_empty()).then_some(())
    })
    .expect("new beats");
    // Give a copy that was not fenced the time to show itself.
    std::thread::sleep(Duration::from_secs(1));
    let old = beats(&c, id, &first);
    let new = beats(&c, id, &second);
    let (last_old, first_new) = (old[old.len() - 1], new[0]);
    assert!(
        last_old < first_new,
        "the stalled copy stopped ({last_old}) before the new one started ({first_new})"
    );
    c.signal_agent(agent, Signal::SIGCONT)
        .expect("resume agent");
    // Back, the agent re-registers and kills its revoked, frozen copy.
    wait_for("the stale copy to be killed", T, || {
        task_pids(&c, agent)
            .iter()
            .all(|p| !pid_alive(*p))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}; {}", c.log_tail()));
    let count = beats(&c, id, &first).len();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        beats(&c, id, &first).len(),
        count,
        "the stale copy never ran again"
    );
    let v: Value = c.show(id).expect("show");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["failures"], 0, "{v}");
}

#[test]
fn task_logs_are_capped_and_rotated() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        agent_toml: "log_max_bytes = 4096\nlog_files = 2",
        ..ClusterSpec::default()
    })
    .expect("cluster");
    // 200 lines of 100 bytes: 20,000 bytes written, at most 8,192 kept.
    let script =
        r#"i=0; while [ $i -lt 200 ]; do printf 'line %04d %089d\n' $i 0; i=$((i+1)); done"#;
    let id = c.submit(&["--", "sh", "-c", script]).expect("submit");
    c.wait_state(id, "completed", T).expect("completed");
    let out = c.ok(&["logs", &id.to_string(), "--stdout"]).expect("logs");
    assert!(out.len() <= 8192, "{} bytes kept", out.len());
    assert!(
        out.ends_with(&format!("line 0199 {:089}\n", 0)),
        "the newest output is kept"
    );
    assert!(
        !out.contains("line 0000"),
        "the oldest output was rotated away"
    );
    // Files rotate at a byte count, so the oldest kept line may be partial:
    // skip it; the rest is one contiguous run, oldest first.
    let numbers: Vec<u32> = out
        .lines()
        .skip(1)
        .map(|l| l[5..9].parse().expect("line number"))
        .collect();
    assert!(numbers.len() >= 70, "{} whole lines kept", numbers.len());
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "oldest first, in order: {numbers:?}"
    );
}

#[test]
fn only_a_task_can_report_a_checkpoint() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let sock = std::path::PathBuf::from(format!("{}.task.sock", c.agent_data(0).display()));
    let out = std::process::Command::new(binary("muster"))
        .args(["checkpoint", "done", "--step", "1", "--socket"])
        .arg(&sock)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not part of any task"), "{err}");
    let unset = std::process::Command::new(binary("muster"))
        .args(["checkpoint", "done"])
        .env_remove("MUSTER_AGENT_SOCKET")
        .output()
        .expect("run");
    assert!(!unset.status.success());
    assert!(String::from_utf8_lossy(&unset.stderr).contains("MUSTER_AGENT_SOCKET"));
}

#[test]
fn checkpoints_drain_and_leases_work_over_mutual_tls() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        tls: true,
        ..ClusterSpec::default()
    })
    .expect("TLS cluster");
    let bin = format!("MUSTER_BIN={}", muster_bin());
    let id = c
        .submit(&[
            "--env",
            &bin,
            "--",
            "sh",
            "-c",
            r#""$MUSTER_BIN" checkpoint done --step 9 && sleep 600"#,
        ])
        .expect("submit");
    let job = wait_for("the checkpoint over TLS", T, || {
        let j = c.show(id).ok()?;
        (j["checkpoint"]["step"] == 9).then_some(j)
    })
    .unwrap_or_else(|e| panic!("{e}; {}", c.log_tail()));
    let node = job["tasks"][0]["node"].as_str().expect("node").to_string();
    // Heartbeats are acknowledged over TLS too: the lease file is kept fresh.
    let lease = c.agent_data(0).join("lease");
    let deadline = wait_for("a lease deadline", T, || {
        std::fs::read_to_string(&lease)
            .ok()?
            .trim()
            .parse::<i64>()
            .ok()
    })
    .expect("lease");
    assert!(
        deadline > muster_proto::daemon::now_ms(),
        "the lease is alive"
    );
    c.ok(&["node", "drain", &node, "--reason", "tls"])
        .expect("drain");
    let audit = c.ok(&["admin", "audit", "--since", "1h"]).expect("audit");
    assert!(audit.contains("node-drain"), "{audit}");
    c.ok(&["node", "resume", &node]).expect("resume");
    c.ok(&["cancel", &id.to_string()]).expect("cancel");
    c.wait_state(id, "cancelled", T).expect("cancelled");
}
