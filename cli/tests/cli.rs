//! Runs the built `muster` binary: help, usage errors, file errors and an
//! unreachable scheduler. None of these needs a running cluster.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// An address where nothing listens (port 1 is privileged and unused).
const DEAD_ADDR: &str = "http://127.0.0.1:1";

/// `muster` with the environment cleared of anything that picks an address.
fn muster(config_home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_muster"));
    cmd.env_remove("MUSTER_ADDR")
        .env("XDG_CONFIG_HOME", config_home)
        .env("HOME", config_home);
    cmd
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("the muster binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temp dir")
}

#[test]
fn help_lists_the_commands() {
    let dir = tempdir();
    let (out, stdout, _) = run(muster(dir.path()).arg("--help"));
    assert!(out.status.success());
    for cmd in [
        "submit", "queue", "show", "cancel", "logs", "nodes", "status", "tenant", "dev",
    ] {
        assert!(stdout.contains(cmd), "missing {cmd} in:\n{stdout}");
    }
    assert!(stdout.contains("MUSTER_ADDR"), "{stdout}");
}

#[test]
fn submit_help_has_examples_and_defaults() {
    let dir = tempdir();
    let (out, stdout, _) = run(muster(dir.path()).args(["submit", "--help"]));
    assert!(out.status.success());
    assert!(stdout.contains("Examples:"), "{stdout}");
    assert!(stdout.contains("[default: 1G]"), "{stdout}");
}

#[test]
fn bad_mem_is_a_usage_error_naming_the_flag() {
    let dir = tempdir();
    let (out, stdout, stderr) =
        run(muster(dir.path()).args(["submit", "--mem", "lots", "--", "true"]));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--mem"), "{stderr}");
    assert!(stdout.is_empty());
}

#[test]
fn malformed_job_file_names_the_file_before_connecting() {
    let dir = tempdir();
    let file = dir.path().join("job.toml");
    std::fs::write(&file, "tasks = 2\ncommand = [\"x\"\n").expect("write");
    let shown = file.display().to_string();
    let (out, _, stderr) =
        run(muster(dir.path()).args(["--addr", DEAD_ADDR, "submit", "-f", &shown]));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!("muster: error: {shown}:")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn unknown_job_file_key_is_named() {
    let dir = tempdir();
    let file = dir.path().join("job.toml");
    std::fs::write(&file, "gpu = 2\ncommand = \"true\"\n").expect("write");
    let shown = file.display().to_string();
    let (out, _, stderr) = run(muster(dir.path()).args(["submit", "-f", &shown]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(&shown) && stderr.contains("`gpu`"),
        "{stderr}"
    );
}

#[test]
fn unreachable_scheduler_fails_fast_naming_the_address() {
    let dir = tempdir();
    let started = Instant::now();
    let (out, stdout, stderr) = run(muster(dir.path()).args(["--addr", DEAD_ADDR, "queue"]));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.is_empty());
    assert!(
        stderr.starts_with(&format!(
            "muster: error: cannot reach the scheduler at {DEAD_ADDR}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("muster dev"), "{stderr}");
}

#[test]
fn submit_to_an_unreachable_scheduler_fails() {
    let dir = tempdir();
    let (out, _, stderr) =
        run(muster(dir.path()).args(["--addr", "127.0.0.1:1", "submit", "--", "true"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains(DEAD_ADDR), "{stderr}");
}

#[test]
fn environment_address_is_used() {
    let dir = tempdir();
    let (out, _, stderr) = run(muster(dir.path())
        .env("MUSTER_ADDR", "127.0.0.1:1")
        .arg("status"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains(DEAD_ADDR), "{stderr}");
}

#[test]
fn config_file_address_is_used_and_unknown_keys_refused() {
    let dir = tempdir();
    let conf_dir = dir.path().join("muster");
    std::fs::create_dir_all(&conf_dir).expect("mkdir");
    let conf = conf_dir.join("config.toml");
    std::fs::write(&conf, format!("addr = \"{DEAD_ADDR}\"\n")).expect("write");
    let (_, _, stderr) = run(muster(dir.path()).arg("nodes"));
    assert!(stderr.contains(DEAD_ADDR), "{stderr}");

    std::fs::write(&conf, "address = \"x\"\n").expect("write");
    let (out, _, stderr) = run(muster(dir.path()).arg("nodes"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains(&conf.display().to_string()), "{stderr}");
    assert!(stderr.contains("`address`"), "{stderr}");
}

#[test]
fn missing_explicit_config_is_an_error() {
    let dir = tempdir();
    let missing = dir.path().join("nope.toml").display().to_string();
    let (out, _, stderr) = run(muster(dir.path()).args(["--config", &missing, "status"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains(&missing), "{stderr}");
}

#[test]
fn logs_stream_flags_conflict() {
    let dir = tempdir();
    let (out, _, _) = run(muster(dir.path()).args(["logs", "1", "--stdout", "--stderr"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn every_subcommand_has_help() {
    let dir = tempdir();
    let commands: [&[&str]; 10] = [
        &["queue"],
        &["show"],
        &["cancel"],
        &["logs"],
        &["nodes"],
        &["status"],
        &["tenant"],
        &["tenant", "create"],
        &["tenant", "list"],
        &["dev"],
    ];
    for args in commands {
        let (out, stdout, _) = run(muster(dir.path()).args(args).arg("--help"));
        assert!(out.status.success(), "{args:?}");
        assert!(stdout.contains("Usage:"), "{args:?}: {stdout}");
    }
}
