//! `muster dev`, the README's first command: it brings up a working cluster,
//! runs a gang job, and stops cleanly on Ctrl-C (SIGINT).

use muster_tests::{binary, wait_for};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn muster_dev_runs_a_job_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
    let mut dev = Command::new(binary("muster"))
        .args([
            "dev",
            "--agents",
            "2",
            "--gpus",
            "2",
            "--listen",
            &listen,
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr = format!("http://{listen}");
    let muster = |args: &[&str]| {
        Command::new(binary("muster"))
            .arg("--addr")
            .arg(&addr)
            .args(args)
            .output()
            .unwrap()
    };
    let dump = || std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
    wait_for("two dev agents", Duration::from_secs(30), || {
        let out = muster(&["--json", "nodes"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["nodes"].as_array()?.len() == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump()));
    let out = muster(&[
        "submit",
        "--tasks",
        "2",
        "--gpus",
        "2",
        "--",
        "sh",
        "-c",
        "echo rank=$RANK",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    wait_for("the job to complete", Duration::from_secs(30), || {
        let out = muster(&["--json", "show", &id]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["state"] == "completed").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump()));
    let logs = String::from_utf8_lossy(&muster(&["logs", &id, "--task", "1"]).stdout).into_owned();
    assert_eq!(logs.trim(), "rank=1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dev.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_for("muster dev to stop", Duration::from_secs(20), || {
        dev.try_wait().ok().flatten()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dump()));
    assert!(
        status.success(),
        "muster dev exited with {status}\n{}",
        dump()
    );
    // Its daemons are gone: the port is free again.
    assert!(std::net::TcpListener::bind(&listen).is_ok());
}

/// A `muster dev` on a free port and its own data folder; SIGINT on drop.
struct Dev {
    dir: tempfile::TempDir,
    listen: String,
    child: std::process::Child,
}

impl Dev {
    fn start(extra: &[&str]) -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let listen = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(binary("muster"))
            .process_group(0)
            .args([
                "dev",
                "--listen",
                &listen,
                "--kill-grace",
                "1s",
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let dev = Dev { dir, listen, child };
        wait_for("the dev agents", Duration::from_secs(30), || {
            let out = dev.muster(&["--json", "nodes"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["nodes"].as_array()?.len() == 2).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", dev.log()));
        dev
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dev.log")).unwrap_or_default()
    }

    fn muster(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("muster"))
            .arg("--addr")
            .arg(format!("http://{}", self.listen))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Ctrl-C as a terminal sends it: to the whole process group of
    /// `muster dev` (it leads its own here, as a shell's job does).
    fn interrupt(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        wait_for("muster dev to stop", Duration::from_secs(40), || {
            self.child.try_wait().ok().flatten()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()))
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.interrupt();
        }
    }
}

/// The fenced blocks of `lang` in the README section under `heading`.
fn readme_blocks(heading: &str, lang: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let fence = format!("```{lang}\n");
    section
        .split(fence.as_str())
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .map(str::to_string)
        .collect()
}

/// The README's commands, one per entry (continuation lines joined).
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in block.lines() {
        let l = line.trim_end();
        if let Some(head) = l.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(l);
        if cur.trim_start().starts_with("muster ") {
            out.push(std::mem::take(&mut cur));
        }
        cur.clear();
    }
    out
}

/// Every command of the README's "Using it" section and its job.toml, then
/// its tenant tree, run
/// as written against `muster dev` with its defaults: the first hour of a
/// new user (issue 12). A command may need a moment (logs of a task that is
/// starting), so each is retried for a while; it must then succeed.
#[test]
fn the_readme_examples_run_on_muster_dev() {
    let dev = Dev::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let toml = readme_blocks("Using it", "toml");
    assert_eq!(toml.len(), 1, "one job.toml example");
    std::fs::write(work.path().join("job.toml"), &toml[0]).unwrap();
    let mut cmds = Vec::new();
    for b in readme_blocks("Using it", "sh") {
        cmds.extend(commands(&b));
    }
    // The job.toml example, as the README's comment says to run it.
    let from_file = toml[0]
        .lines()
        .next()
        .and_then(|l| l.find("muster submit").map(|i| &l[i..]))
        .expect("the first line names the command")
        .to_string();
    cmds.push(from_file);
    // The tenant tree of "Tenants, priorities and why a job waits" (its
    // second block's 4 x 8 and 8 x 8 gangs need a real cluster).
    let tenants = readme_blocks("Tenants, priorities", "sh");
    cmds.extend(commands(&tenants[0]));
    assert!(cmds.len() >= 18, "found {cmds:?}");
    let bin_dir = binary("muster").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for cmd in &cmds {
        let run = || {
            Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .current_dir(work.path())
                .env("PATH", &path)
                .env("MUSTER_ADDR", format!("http://{}", dev.listen))
                .stdin(Stdio::null())
                .output()
                .unwrap()
        };
        let mut last = None;
        let ok = wait_for(cmd, Duration::from_secs(20), || {
            let out = run();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            // `muster cancel 1` comes after job 1 has finished: the CLI
            // says so, which is the truth the example shows.
            let finished = cmd.contains("muster cancel") && err.contains("already");
            let done = (out.status.success() || finished).then_some(());
            last = Some(err);
            done
        });
        if ok.is_err() {
            panic!(
                "README example failed on muster dev: {cmd}\n{}\n--- dev log\n{}",
                last.unwrap_or_default(),
                dev.log()
            );
        }
    }
}

/// Ctrl-C stops the cluster's running tasks too (unless --keep-tasks).
#[test]
fn ctrl_c_on_muster_dev_stops_its_tasks() {
    let mut dev = Dev::start(&["--agents", "2", "--gpus", "2"]);
    let marker = dev.dir.path().join("still-running");
    let script = format!("sleep 600; touch {}", marker.display());
    let out = dev.muster(&["--json", "submit", "--gpus", "1", "--", "sh", "-c", &script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"]
        .as_u64()
        .unwrap();
    wait_for("the task to run", Duration::from_secs(30), || {
        let out = dev.muster(&["--json", "show", &id.to_string()]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["state"] == "running").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", dev.log()));
    let pids = || {
        let out = Command::new("pgrep")
            .args(["-f", &script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(!pids().is_empty(), "the task is not running");
    let status = dev.interrupt();
    assert!(
        status.success(),
        "muster dev exited with {status}\n{}",
        dev.log()
    );
    assert!(
        pids().is_empty(),
        "the task outlived muster dev: pids {}\n{}",
        pids(),
        dev.log()
    );
    assert!(
        dev.log().contains("cancelled 1 running job"),
        "{}",
        dev.log()
    );
}
