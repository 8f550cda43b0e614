//! The `muster-scheduler` binary: configuration errors name the key and the
//! file and stop it before it binds anything; `--check` accepts the example.

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_muster-scheduler"))
        .args(args)
        .output()
        .expect("run muster-scheduler")
}

#[test]
fn example_config_checks_ok() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/scheduler.toml");
    let out = run(&["--config", cfg, "--check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_key_is_an_error_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    std::fs::write(&p, "listen = \"127.0.0.1:0\"\nelection_tiks = 5\n").unwrap();
    let out = run(&["--config", p.to_str().unwrap(), "--check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("election_tiks") && err.contains("s.toml"),
        "{err}"
    );
}

#[test]
fn missing_config_file_is_named() {
    let out = run(&["--config", "/nonexistent/muster.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/muster.toml"), "{err}");
}
