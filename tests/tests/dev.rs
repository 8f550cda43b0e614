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
