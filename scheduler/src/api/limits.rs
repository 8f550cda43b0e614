//! Hardening against bad input: size limits on everything a job spec
//! carries, checked before anything else looks at it. Each error names the
//! field. (The gRPC layer separately refuses messages over 4 MiB.)

use muster_proto as pb;
use tonic::Status;

/// Longest job name, tenant name and topology label.
pub const MAX_NAME: usize = crate::planner::fit::MAX_NAME_LEN;
/// Most command-line arguments, and the longest one.
pub const MAX_ARGS: usize = 4096;
pub const MAX_ARG_LEN: usize = 64 << 10;
/// Most environment variables, longest name and longest value.
pub const MAX_ENV: usize = 4096;
pub const MAX_ENV_KEY: usize = 256;
pub const MAX_ENV_VALUE: usize = 64 << 10;
/// Command line plus environment, in bytes.
pub const MAX_TOTAL: usize = 1 << 20;
/// Longest path (working and checkpoint folders).
pub const MAX_PATH: usize = 4096;
/// Longest priority class name.
pub const MAX_PRIORITY: usize = 64;
/// Most tasks in one gang.
pub const MAX_TASKS: u32 = 10_000;

fn bad(msg: String) -> Status {
    Status::invalid_argument(msg)
}

fn text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(bad(format!("{field}: longer than {max} bytes")));
    }
    if value.contains('\0') {
        return Err(bad(format!("{field}: contains a NUL byte")));
    }
    Ok(())
}

/// Text printed to other users (names, labels, reasons): no control
/// characters, which a terminal would obey (escape sequences, carriage
/// returns that overwrite a line), besides [`text`]'s limits.
pub fn line(field: &str, value: &str, max: usize) -> Result<(), Status> {
    text(field, value, max)?;
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(bad(format!(
            "{field}: contains the control character {:?}; names, labels and reasons \
             must be printable",
            c
        )));
    }
    Ok(())
}

/// `value` with every control character written as an escape (`\u{1b}`):
/// for text a daemon reports (a GPU fault, a task's exit), kept rather than
/// refused, but harmless on a terminal.
pub fn printable(value: &str) -> String {
    if !value.chars().any(char::is_control) {
        return value.to_string();
    }
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Check every length and count in a submitted spec.
pub fn check_spec(s: &pb::JobSpec) -> Result<(), Status> {
    line("name", &s.name, MAX_NAME)?;
    line("tenant", &s.tenant, MAX_NAME)?;
    line("topology_label", &s.topology_label, MAX_NAME)?;
    line("priority", &s.priority, MAX_PRIORITY)?;
    line("workdir", &s.workdir, MAX_PATH)?;
    line("checkpoint_dir", &s.checkpoint_dir, MAX_PATH)?;
    if s.tasks > MAX_TASKS {
        return Err(bad(format!("tasks: more than {MAX_TASKS}")));
    }
    if s.command.len() > MAX_ARGS {
        return Err(bad(format!("command: more than {MAX_ARGS} arguments")));
    }
    if s.env.len() > MAX_ENV {
        return Err(bad(format!("env: more than {MAX_ENV} variables")));
    }
    let mut total = 0usize;
    for (i, a) in s.command.iter().enumerate() {
        text(&format!("command[{i}]"), a, MAX_ARG_LEN)?;
        total += a.len();
    }
    for (k, v) in &s.env {
        let shown: String = k.chars().take(32).collect();
        text(&format!("env name {shown:?}"), k, MAX_ENV_KEY)?;
        text(&format!("env {shown}"), v, MAX_ENV_VALUE)?;
        total += k.len() + v.len();
    }
    if total > MAX_TOTAL {
        return Err(bad(format!(
            "command and env: {total} bytes, more than {MAX_TOTAL}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::JobSpec {
        pb::JobSpec {
            name: "x".into(),
            tasks: 1,
            command: vec!["true".into()],
            ..Default::default()
        }
    }

    type Change = Box<dyn Fn(&mut pb::JobSpec)>;

    #[test]
    fn reported_text_is_made_printable() {
        assert_eq!(printable("XID 79"), "XID 79");
        assert_eq!(printable("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
        assert!(line("reason", "maintenance: fan", 256).is_ok());
        let e = line("reason", "x\u{7f}", 256).unwrap_err();
        assert!(
            e.message().starts_with("reason: contains"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn each_limit_names_its_field() {
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.name = "n".repeat(MAX_NAME + 1)), "name:"),
            (Box::new(|s| s.tenant = "t".repeat(MAX_NAME + 1)), "tenant:"),
            (
                Box::new(|s| s.workdir = "/".repeat(MAX_PATH + 1)),
                "workdir:",
            ),
            (Box::new(|s| s.tasks = MAX_TASKS + 1), "tasks:"),
            (
                Box::new(|s| s.command = vec!["a".into(); MAX_ARGS + 1]),
                "command:",
            ),
            (
                Box::new(|s| s.command = vec!["a".repeat(MAX_ARG_LEN + 1)]),
                "command[0]",
            ),
            (Box::new(|s| s.command = vec!["a\0b".into()]), "NUL"),
            (
                Box::new(|s| s.name = "x\u{1b}]0;pwned\u{7}".into()),
                "name: contains the control character '\\u{1b}'",
            ),
            (
                Box::new(|s| s.tenant = "ml\r".into()),
                "tenant: contains the control character '\\r'",
            ),
            (
                Box::new(|s| s.topology_label = "rack\n".into()),
                "topology_label: contains",
            ),
            (
                Box::new(|s| s.priority = "\u{9b}31m".into()),
                "priority: contains",
            ),
            (
                Box::new(|s| s.workdir = "/tmp/\u{1b}[2J".into()),
                "workdir: contains",
            ),
            (
                Box::new(|s| {
                    s.env.insert("K".repeat(MAX_ENV_KEY + 1), "v".into());
                }),
                "env name",
            ),
            (
                Box::new(|s| {
                    s.env.insert("K".into(), "v".repeat(MAX_ENV_VALUE + 1));
                }),
                "env K",
            ),
            (
                Box::new(|s| {
                    s.command = vec!["a".repeat(MAX_ARG_LEN); 17];
                }),
                "command and env",
            ),
        ];
        assert!(check_spec(&spec()).is_ok());
        for (change, needle) in cases {
            let mut s = spec();
            change(&mut s);
            let e = check_spec(&s).unwrap_err();
            assert!(e.message().contains(needle), "{needle}: {}", e.message());
        }
    }
}
