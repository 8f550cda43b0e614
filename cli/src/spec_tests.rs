use super::*;

const GIB: u64 = 1 << 30;

#[test]
fn sizes_parse_with_binary_and_decimal_units() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("512M"), Ok(512 << 20));
    assert_eq!(parse_size("16G"), Ok(16 * GIB));
    assert_eq!(parse_size("16g"), Ok(16 * GIB));
    assert_eq!(parse_size("1.5GiB"), Ok(3 * GIB / 2));
    assert_eq!(parse_size("2KB"), Ok(2000));
    assert_eq!(parse_size("1T"), Ok(1 << 40));
    assert_eq!(parse_size("10B"), Ok(10));
    assert_eq!(parse_size(" 8 G "), Ok(8 * GIB));
}

#[test]
fn bad_sizes_are_rejected_with_the_input() {
    for bad in ["", "G", "1X", "1.2.3G", "-1G", "abc", "1e400G"] {
        let err = parse_size(bad).unwrap_err();
        assert!(err.contains("invalid size"), "{bad}: {err}");
    }
    assert_eq!(parse_mem("0"), Err("must be greater than zero".to_string()));
}

#[test]
fn durations_accept_humantime_and_slurm_clock() {
    assert_eq!(parse_time_limit("90s"), Ok(90));
    assert_eq!(parse_time_limit("2h"), Ok(7200));
    assert_eq!(parse_time_limit("1h30m"), Ok(5400));
    assert_eq!(parse_time_limit("1h 30m"), Ok(5400));
    assert_eq!(parse_time_limit("01:30:00"), Ok(5400));
    assert_eq!(parse_time_limit("90:00"), Ok(5400));
    assert_eq!(parse_time_limit("05:07"), Ok(307));
    assert_eq!(parse_time_limit("1-00:00:10"), Ok(86410));
    assert_eq!(parse_time_limit("2-03"), Ok(2 * 86400 + 3 * 3600));
    assert_eq!(parse_time_limit("1500ms"), Ok(2));
}

#[test]
fn bad_durations_are_rejected() {
    assert!(parse_time_limit("90").unwrap_err().contains("missing unit"));
    assert!(parse_time_limit("1:2:3:4")
        .unwrap_err()
        .contains("HH:MM:SS"));
    assert!(parse_time_limit("01:60:00").is_err());
    assert!(parse_time_limit("00:75").is_err());
    assert!(parse_time_limit("soon")
        .unwrap_err()
        .contains("invalid duration"));
    assert!(parse_time_limit("0s").unwrap_err().contains("at least 1s"));
}

#[test]
fn cpus_take_fractions_and_millis() {
    assert_eq!(parse_cpus("1"), Ok(1000));
    assert_eq!(parse_cpus("0.5"), Ok(500));
    assert_eq!(parse_cpus("2.25"), Ok(2250));
    assert_eq!(parse_cpus("250m"), Ok(250));
    assert!(parse_cpus("0").unwrap_err().contains("greater than zero"));
    assert!(parse_cpus("0.0001").unwrap_err().contains("decimal places"));
    assert!(parse_cpus("-1").is_err());
    assert!(parse_cpus("lots").is_err());
    assert!(parse_cpus("1e12").unwrap_err().contains("too large"));
}

#[test]
fn tasks_must_be_positive() {
    assert_eq!(parse_tasks("4"), Ok(4));
    assert!(parse_tasks("0").unwrap_err().contains("at least 1"));
    assert!(parse_tasks("-2").is_err());
}

#[test]
fn env_pairs_split_at_the_first_equals() {
    assert_eq!(
        parse_env_pair("A_1=x=y"),
        Ok(("A_1".to_string(), "x=y".to_string()))
    );
    assert_eq!(parse_env_pair("_E="), Ok(("_E".to_string(), String::new())));
    assert!(parse_env_pair("NOEQUALS")
        .unwrap_err()
        .contains("KEY=VALUE"));
    assert!(parse_env_pair("1X=a")
        .unwrap_err()
        .contains("invalid variable name"));
    assert!(parse_env_pair("=a").is_err());
    assert!(parse_env_pair("A-B=c").is_err());
}

#[test]
fn default_name_is_the_program_basename() {
    let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        default_name(&argv(&["/usr/bin/python3", "x.py"])),
        "python3"
    );
    assert_eq!(default_name(&argv(&["torchrun"])), "torchrun");
    assert_eq!(
        default_name(&argv(&["/bin/sh", "-c", "./train.sh --fast"])),
        "train.sh"
    );
    assert_eq!(default_name(&argv(&["/"])), "job");
}

const FULL: &str = r#"
name = "train"
tenant = "ml/vision"
tasks = 4
gpus = 8
cpus = 0.5
mem = "16G"
time = "1h30m"
command = ["python", "train.py", "--epochs", "3"]
workdir = "/data/run"
[env]
NCCL_DEBUG = "INFO"
OMP_NUM_THREADS = 4
"#;

#[test]
fn full_job_file_parses() {
    let spec = from_toml("job.toml", FULL).expect("valid file");
    assert_eq!(spec.name.as_deref(), Some("train"));
    assert_eq!(spec.tenant.as_deref(), Some("ml/vision"));
    assert_eq!(spec.tasks, Some(4));
    assert_eq!(spec.gpus, Some(8));
    assert_eq!(spec.cpu_millis, Some(500));
    assert_eq!(spec.memory_bytes, Some(16 * GIB));
    assert_eq!(spec.time_limit_secs, Some(5400));
    assert_eq!(spec.command.as_ref().map(Vec::len), Some(4));
    assert_eq!(
        spec.env.get("OMP_NUM_THREADS").map(String::as_str),
        Some("4")
    );
    assert_eq!(spec.workdir, Some(PathBuf::from("/data/run")));
}

#[test]
fn string_command_runs_through_the_shell() {
    let spec = from_toml("j.toml", "command = \"echo hi && sleep 1\"").expect("valid");
    assert_eq!(
        spec.command,
        Some(vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            "echo hi && sleep 1".to_string()
        ])
    );
    assert_eq!(spec.memory_bytes, None);
}

#[test]
fn unknown_keys_name_the_file_key_and_position() {
    let err = from_toml("job.toml", "name = \"a\"\ngpu = 2\n").unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("job.toml:2:1:"), "{text}");
    assert!(text.contains("gpu"), "{text}");
    assert!(!text.contains('\n'), "{text}");
}

#[test]
fn malformed_toml_names_the_file() {
    let err = from_toml("dir/job.toml", "tasks = = 3").unwrap_err();
    assert!(err.to_string().starts_with("dir/job.toml:1:"), "{err}");
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        ("tasks = 0", "tasks", "at least 1"),
        ("gpus = -1", "gpus", "0 or more"),
        ("cpus = 0", "cpus", "greater than zero"),
        ("mem = \"lots\"", "mem", "invalid size"),
        ("mem = 0", "mem", "greater than zero"),
        ("time = \"soon\"", "time", "invalid duration"),
        ("command = []", "command", "must not be empty"),
        ("command = [1]", "command", "must be strings"),
        ("env = { \"1BAD\" = \"x\" }", "env", "invalid variable name"),
        ("name = \" \"", "name", "must not be empty"),
    ];
    for (text, key, needle) in cases {
        let err = from_toml("job.toml", text).unwrap_err();
        let SpecError::Key {
            key: k, message, ..
        } = &err
        else {
            panic!("{text}: expected a key error, got {err}");
        };
        assert_eq!(k, key, "{text}");
        assert!(message.contains(needle), "{text}: {message}");
        assert!(err.to_string().starts_with(&format!("job.toml: {key}: ")));
    }
}

#[test]
fn missing_file_is_reported_with_its_path() {
    let err = load_job_file(Path::new("/nonexistent/job.toml")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/job.toml"), "{err}");
}

#[test]
fn flags_override_the_file_and_env_merges() {
    let file = from_toml("job.toml", FULL).expect("valid");
    let flags = PartialSpec {
        gpus: Some(2),
        env: [("NCCL_DEBUG".to_string(), "WARN".to_string())].into(),
        ..PartialSpec::default()
    };
    let spec = file
        .overlay(flags)
        .finish(Path::new("/tmp"))
        .expect("complete");
    assert_eq!(spec.gpus_per_task, 2);
    assert_eq!(spec.tasks, 4);
    assert_eq!(spec.env.get("NCCL_DEBUG").map(String::as_str), Some("WARN"));
    assert_eq!(
        spec.env.get("OMP_NUM_THREADS").map(String::as_str),
        Some("4")
    );
    assert_eq!(spec.workdir, "/data/run");
}

#[test]
fn defaults_fill_the_rest() {
    let flags = PartialSpec {
        command: Some(vec!["./run.sh".to_string()]),
        workdir: Some(PathBuf::from("sub")),
        ..PartialSpec::default()
    };
    let spec = flags.finish(Path::new("/home/a")).expect("complete");
    assert_eq!(spec.name, "run.sh");
    assert_eq!(spec.tenant, "", "empty: the user's default tenant");
    assert_eq!(spec.tasks, DEFAULT_TASKS);
    assert_eq!(spec.gpus_per_task, DEFAULT_GPUS);
    assert_eq!(spec.cpu_millis_per_task, DEFAULT_CPU_MILLIS);
    assert_eq!(spec.memory_bytes_per_task, DEFAULT_MEMORY_BYTES);
    assert_eq!(spec.time_limit_secs, 0);
    assert_eq!(spec.workdir, "/home/a/sub");
}

#[test]
fn a_spec_without_command_is_refused() {
    let err = PartialSpec::default().finish(Path::new("/")).unwrap_err();
    assert_eq!(err, SpecError::NoCommand);
}
