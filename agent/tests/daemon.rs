//! The `muster-agent` binary: configuration errors name the key and the file;
//! `--check` reports the GPUs and cgroup version it would use.

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_muster-agent"))
        .args(args)
        .output()
        .expect("run muster-agent")
}

#[test]
fn check_lists_simulated_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.toml");
    std::fs::write(
        &p,
        "cgroups = \"none\"\n[gpu]\nbackend = \"simulated\"\ncount = 3\nseed = \"x\"\n",
    )
    .unwrap();
    let out = run(&["--config", p.to_str().unwrap(), "--check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("gpu ")).count(),
        3,
        "{text}"
    );
    assert!(text.contains("cgroups: none"), "{text}");
}

#[test]
fn bad_value_is_an_error_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("agent.toml");
    std::fs::write(&p, "kill_grace = \"a while\"\n").unwrap();
    let out = run(&["--config", p.to_str().unwrap(), "--check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("kill_grace") && err.contains("agent.toml"),
        "{err}"
    );
}
