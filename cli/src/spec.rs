//! Job specs from flags and TOML files.
//!
//! A spec arrives from up to two sources: a TOML file (`-f job.toml`) and the
//! flags on the command line. Each source is parsed and validated on its own,
//! into a [`PartialSpec`], so an error can name exactly what the user wrote
//! (`--mem` or `job.toml: mem`). The flags are then laid over the file and the
//! defaults fill what neither gave. Everything here runs before any RPC.
//!
//! Value syntax shared by flags and files:
//! * sizes: plain bytes, or a number with `K`/`M`/`G`/`T` (powers of 1024,
//!   also spelled `KiB`, `MiB`, ...) or `KB`/`MB`/`GB`/`TB` (powers of 1000);
//! * durations: humantime (`90s`, `2h`, `1h30m`) or Slurm's `MM:SS`,
//!   `HH:MM:SS` and `D-HH:MM:SS`;
//! * CPUs: a decimal with at most three places (`0.5`) or millis (`500m`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use muster_proto::JobSpec;
use serde::Deserialize;

/// Tasks per job when neither the flags nor the file say.
pub const DEFAULT_TASKS: u32 = 1;
/// GPUs per task by default.
pub const DEFAULT_GPUS: u32 = 0;
/// Milli-CPUs per task by default (one CPU).
pub const DEFAULT_CPU_MILLIS: u32 = 1000;
/// Memory per task by default (1 GiB).
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;

/// A spec that one source gave: every field optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartialSpec {
    pub name: Option<String>,
    pub tenant: Option<String>,
    pub tasks: Option<u32>,
    pub gpus: Option<u32>,
    pub cpu_millis: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub time_limit_secs: Option<u64>,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub priority: Option<String>,
    /// Node label whose value all the gang's nodes must share.
    pub same: Option<String>,
    /// Node label whose value the gang's nodes should share if they can.
    pub prefer_same: Option<String>,
    /// Stop signal (number).
    pub signal: Option<i32>,
    /// Seconds between the stop signal and SIGKILL.
    pub grace_secs: Option<u64>,
    pub checkpoint_on_preempt: Option<bool>,
    pub max_restarts: Option<u32>,
}

/// A spec that cannot be used; the message names the flag, or the file and key.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("cannot read job file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Key {
        path: String,
        key: String,
        message: String,
    },
    #[error("{flag}: {message}")]
    Flag { flag: String, message: String },
    #[error("no command given: put it after `--` (muster submit -- CMD ARGS...) or set `command` in a job file")]
    NoCommand,
}

impl PartialSpec {
    /// This spec with every field that `over` sets replaced; env merges by key.
    pub fn overlay(mut self, over: PartialSpec) -> PartialSpec {
        self.env.extend(over.env);
        let label_over = over.same.is_some() || over.prefer_same.is_some();
        PartialSpec {
            name: over.name.or(self.name),
            tenant: over.tenant.or(self.tenant),
            tasks: over.tasks.or(self.tasks),
            gpus: over.gpus.or(self.gpus),
            cpu_millis: over.cpu_millis.or(self.cpu_millis),
            memory_bytes: over.memory_bytes.or(self.memory_bytes),
            time_limit_secs: over.time_limit_secs.or(self.time_limit_secs),
            command: over.command.or(self.command),
            env: self.env,
            workdir: over.workdir.or(self.workdir),
            priority: over.priority.or(self.priority),
            // A label given at one level replaces both at the other.
            same: if label_over { over.same } else { self.same },
            prefer_same: if label_over {
                over.prefer_same
            } else {
                self.prefer_same
            },
            signal: over.signal.or(self.signal),
            grace_secs: over.grace_secs.or(self.grace_secs),
            checkpoint_on_preempt: over.checkpoint_on_preempt.or(self.checkpoint_on_preempt),
            max_restarts: over.max_restarts.or(self.max_restarts),
        }
    }

    /// The wire spec, with defaults filled in; relative workdirs resolve against `cwd`.
    pub fn finish(self, cwd: &Path) -> Result<JobSpec, SpecError> {
        let command = self.command.ok_or(SpecError::NoCommand)?;
        let name = self.name.unwrap_or_else(|| default_name(&command));
        let workdir = match self.workdir {
            Some(dir) => cwd.join(dir),
            None => cwd.to_path_buf(),
        };
        Ok(JobSpec {
            name,
            // Empty: the scheduler uses the user's default tenant.
            tenant: self.tenant.unwrap_or_default(),
            tasks: self.tasks.unwrap_or(DEFAULT_TASKS),
            gpus_per_task: self.gpus.unwrap_or(DEFAULT_GPUS),
            cpu_millis_per_task: self.cpu_millis.unwrap_or(DEFAULT_CPU_MILLIS),
            memory_bytes_per_task: self.memory_bytes.unwrap_or(DEFAULT_MEMORY_BYTES),
            time_limit_secs: self.time_limit_secs.unwrap_or(0),
            command,
            env: self.env.into_iter().collect(),
            workdir: workdir.to_string_lossy().into_owned(),
            checkpoint_dir: String::new(),
            priority: self.priority.unwrap_or_default(),
            topology_required: self.same.is_some(),
            topology_label: self.same.or(self.prefer_same).unwrap_or_default(),
            stop_signal: self.signal.unwrap_or(0),
            grace_secs: self.grace_secs,
            checkpoint_on_preempt: self.checkpoint_on_preempt.unwrap_or(false),
            max_restarts: self.max_restarts.unwrap_or(0),
        })
    }
}

/// The job name used when none is given: the program's file name, or for a
/// `/bin/sh -c SCRIPT` command the first word of the script.
pub fn default_name(command: &[String]) -> String {
    let program = match command {
        [sh, flag, script] if sh == "/bin/sh" && flag == "-c" => {
            script.split_whitespace().next().unwrap_or("sh")
        }
        [first, ..] => first.as_str(),
        [] => "job",
    };
    let base = Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if base.is_empty() {
        "job".to_string()
    } else {
        base
    }
}

// ---------------------------------------------------------------- values

/// Parses a size (`512M`, `16G`, `1.5GiB`, `4096`) into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let multiplier = size_unit(unit.trim()).ok_or_else(|| {
        format!("invalid size {text:?}: unknown unit {unit:?} (use e.g. 512M, 16G, 1.5GiB or plain bytes)")
    })?;
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected a number then a unit, e.g. 16G"))?;
    let bytes = (value * multiplier as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("invalid size {text:?}: too large"));
    }
    Ok(bytes as u64)
}

fn size_unit(unit: &str) -> Option<u64> {
    const K: u64 = 1 << 10;
    let u = unit.to_ascii_lowercase();
    Some(match u.as_str() {
        "" | "b" => 1,
        "k" | "kib" => K,
        "m" | "mib" => K * K,
        "g" | "gib" => K * K * K,
        "t" | "tib" => K * K * K * K,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    })
}

/// Parses a memory amount: a size that is not zero.
pub fn parse_mem(text: &str) -> Result<u64, String> {
    if text.trim_start().starts_with('-') {
        return Err(format!(
            "{text:?} is negative: give a size like 512M, 16G or 1.5GiB"
        ));
    }
    match parse_size(text)? {
        0 => Err("must be greater than zero".to_string()),
        n => Ok(n),
    }
}

/// Parses a time limit into whole seconds (rounded up), at least one second.
pub fn parse_time_limit(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let duration = if s.contains(':') || s.contains('-') {
        parse_clock(s).ok_or_else(|| {
            format!("invalid duration {text:?}: expected MM:SS, HH:MM:SS or D-HH:MM:SS")
        })?
    } else if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "invalid duration {text:?}: missing unit (e.g. 90s, 30m, 2h, 1h30m or HH:MM:SS)"
        ));
    } else {
        humantime::parse_duration(s).map_err(|e| {
            format!("invalid duration {text:?} ({e}): expected e.g. 90s, 30m, 2h, 1h30m, HH:MM:SS or D-HH:MM:SS")
        })?
    };
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    if secs == 0 {
        return Err("must be at least 1s (omit it for no limit)".to_string());
    }
    Ok(secs)
}

/// Slurm's `MM:SS`, `HH:MM:SS` and `D-HH[:MM[:SS]]`.
fn parse_clock(s: &str) -> Option<std::time::Duration> {
    let (days, clock) = match s.split_once('-') {
        Some((d, rest)) => (Some(d.parse::<u64>().ok()?), rest),
        None => (None, s),
    };
    let parts: Vec<u64> = clock
        .split(':')
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    let (h, m, sec) = match (days, parts.as_slice()) {
        (None, [m, s]) => (0, *m, *s),
        (Some(_), [h]) => (*h, 0, 0),
        (Some(_), [h, m]) => (*h, *m, 0),
        (_, [h, m, s]) => (*h, *m, *s),
        _ => return None,
    };
    let clock_form = parts.len() == 3 || days.is_some();
    if sec >= 60 || (clock_form && (m >= 60 || (days.is_some() && h >= 24))) {
        return None;
    }
    let total = days
        .unwrap_or(0)
        .checked_mul(24)?
        .checked_add(h)?
        .checked_mul(60)?
        .checked_add(m)?
        .checked_mul(60)?
        .checked_add(sec)?;
    Some(std::time::Duration::from_secs(total))
}

/// Parses CPUs per task (`2`, `0.5`, `500m`) into milli-CPUs, greater than zero.
pub fn parse_cpus(text: &str) -> Result<u32, String> {
    let s = text.trim();
    let millis = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u64>()
            .map_err(|_| format!("invalid CPU count {text:?}: expected e.g. 2, 0.5 or 500m"))?
    } else {
        let cpus: f64 = s
            .parse()
            .map_err(|_| format!("invalid CPU count {text:?}: expected e.g. 2, 0.5 or 500m"))?;
        cpus_to_millis(cpus).map_err(|e| format!("invalid CPU count {text:?}: {e}"))?
    };
    if millis == 0 {
        return Err("must be greater than zero".to_string());
    }
    u32::try_from(millis).map_err(|_| format!("invalid CPU count {text:?}: too large"))
}

fn cpus_to_millis(cpus: f64) -> Result<u64, String> {
    if !cpus.is_finite() || cpus < 0.0 {
        return Err("must be a positive number".to_string());
    }
    let millis = (cpus * 1000.0).round();
    if (cpus * 1000.0 - millis).abs() > 1e-6 {
        return Err("at most three decimal places (1 milli-CPU)".to_string());
    }
    if millis > f64::from(u32::MAX) {
        return Err("too large".to_string());
    }
    Ok(millis as u64)
}

/// Parses the task count: at least one.
pub fn parse_tasks(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "invalid task count {text:?}: expected a whole number ≥ 1"
        )),
    }
}

/// Checks an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn check_env_key(key: &str) -> Result<(), String> {
    let mut chars = key.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(format!(
            "invalid variable name {key:?}: use letters, digits and '_', not starting with a digit"
        ))
    }
}

/// Parses `KEY=VALUE` (the value may contain `=`).
pub fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("invalid {text:?}: expected KEY=VALUE"))?;
    check_env_key(key)?;
    Ok((key.to_string(), value.to_string()))
}

/// Checks a name-like value (job name, tenant) is not blank.
/// A stop signal by name (`TERM`, `SIGUSR1`) or number; KILL and STOP,
/// which no program can catch, are refused.
pub fn parse_signal(text: &str) -> Result<i32, String> {
    use nix::sys::signal::Signal;
    let t = text.trim();
    let sig = match t.parse::<i32>() {
        Ok(n) => Signal::try_from(n).map_err(|_| format!("{n} is not a signal number"))?,
        Err(_) => {
            let upper = t.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            name.parse::<Signal>()
                .map_err(|_| format!("unknown signal {t:?} (try TERM, INT, USR1, USR2)"))?
        }
    };
    if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
        return Err(format!(
            "{sig} cannot be caught, so it cannot start a graceful stop"
        ));
    }
    Ok(sig as i32)
}

/// A grace period, e.g. `30s`, `5m`, `00:05:00`.
pub fn parse_grace(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    parse_time_limit(text)
}

pub fn parse_nonempty(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err("must not be empty".to_string())
    } else {
        Ok(text.to_string())
    }
}

// ---------------------------------------------------------------- files

/// The TOML job file as written; loosely typed values are checked in [`from_toml`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobFile {
    name: Option<String>,
    tenant: Option<String>,
    tasks: Option<i64>,
    gpus: Option<i64>,
    cpus: Option<toml::Value>,
    mem: Option<toml::Value>,
    time: Option<toml::Value>,
    command: Option<toml::Value>,
    env: Option<BTreeMap<String, toml::Value>>,
    workdir: Option<String>,
    priority: Option<String>,
    same: Option<String>,
    prefer_same: Option<String>,
    signal: Option<toml::Value>,
    grace: Option<toml::Value>,
    checkpoint_on_preempt: Option<bool>,
    max_restarts: Option<i64>,
}

/// Reads and validates a job file.
pub fn load_job_file(path: &Path) -> Result<PartialSpec, SpecError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SpecError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    from_toml(&shown, &text)
}

/// Parses job-file text; `path` is only used in error messages.
pub fn from_toml(path: &str, text: &str) -> Result<PartialSpec, SpecError> {
    let raw: RawJobFile = toml::from_str(text).map_err(|e| syntax_error(path, text, &e))?;
    let key_err = |key: &str, message: String| SpecError::Key {
        path: path.to_string(),
        key: key.to_string(),
        message,
    };
    let nonempty = |key: &str, v: Option<String>| {
        v.map(|s| parse_nonempty(&s).map_err(|m| key_err(key, m)))
            .transpose()
    };
    let spec = PartialSpec {
        name: nonempty("name", raw.name)?,
        tenant: nonempty("tenant", raw.tenant)?,
        priority: nonempty("priority", raw.priority)?,
        same: nonempty("same", raw.same)?,
        prefer_same: nonempty("prefer_same", raw.prefer_same)?,
        tasks: raw
            .tasks
            .map(toml_tasks)
            .transpose()
            .map_err(|m| key_err("tasks", m))?,
        gpus: raw
            .gpus
            .map(toml_gpus)
            .transpose()
            .map_err(|m| key_err("gpus", m))?,
        cpu_millis: raw
            .cpus
            .map(toml_cpus)
            .transpose()
            .map_err(|m| key_err("cpus", m))?,
        memory_bytes: raw
            .mem
            .map(toml_mem)
            .transpose()
            .map_err(|m| key_err("mem", m))?,
        time_limit_secs: raw
            .time
            .map(toml_time)
            .transpose()
            .map_err(|m| key_err("time", m))?,
        command: raw
            .command
            .map(toml_command)
            .transpose()
            .map_err(|m| key_err("command", m))?,
        env: toml_env(raw.env.unwrap_or_default()).map_err(|m| key_err("env", m))?,
        workdir: nonempty("workdir", raw.workdir)?.map(PathBuf::from),
        signal: raw
            .signal
            .map(|v| match v {
                toml::Value::String(s) => parse_signal(&s),
                toml::Value::Integer(n) => parse_signal(&n.to_string()),
                _ => Err("must be a signal name or number".to_string()),
            })
            .transpose()
            .map_err(|m| key_err("signal", m))?,
        grace_secs: raw
            .grace
            .map(|v| match v {
                toml::Value::String(s) => parse_grace(&s),
                toml::Value::Integer(n) if n >= 0 => Ok(n as u64),
                _ => Err("must be a duration such as \"30s\" or seconds".to_string()),
            })
            .transpose()
            .map_err(|m| key_err("grace", m))?,
        checkpoint_on_preempt: raw.checkpoint_on_preempt,
        max_restarts: raw
            .max_restarts
            .map(|n| u32::try_from(n).map_err(|_| "must be 0 or more".to_string()))
            .transpose()
            .map_err(|m| key_err("max_restarts", m))?,
    };
    if spec.same.is_some() && spec.prefer_same.is_some() {
        return Err(key_err(
            "prefer_same",
            "give `same` (required) or `prefer_same`, not both".to_string(),
        ));
    }
    Ok(spec)
}

/// A one-line `path:line:col: message` from toml's error.
fn syntax_error(path: &str, text: &str, err: &toml::de::Error) -> SpecError {
    let start = err.span().map_or(0, |s| s.start).min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    SpecError::Syntax {
        path: path.to_string(),
        line,
        column,
        message: err.message().trim().replace('\n', " "),
    }
}

fn toml_tasks(n: i64) -> Result<u32, String> {
    if n < 1 {
        return Err("must be at least 1".to_string());
    }
    u32::try_from(n).map_err(|_| "too large".to_string())
}

fn toml_gpus(n: i64) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("invalid GPU count {n}: must be 0 or more"))
}

fn toml_cpus(v: toml::Value) -> Result<u32, String> {
    match v {
        toml::Value::Integer(n) => parse_cpus(&n.to_string()),
        toml::Value::Float(f) => parse_cpus(&f.to_string()),
        toml::Value::String(s) => parse_cpus(&s),
        other => Err(format!(
            "expected a number or a string, found {}",
            other.type_str()
        )),
    }
}

fn toml_mem(v: toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(n) if n > 0 => Ok(n.unsigned_abs()),
        toml::Value::Integer(_) => Err("must be greater than zero".to_string()),
        toml::Value::String(s) => parse_mem(&s),
        other => Err(format!(
            "expected a size string like \"16G\" or bytes, found {}",
            other.type_str()
        )),
    }
}

fn toml_time(v: toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(n) if n > 0 => Ok(n.unsigned_abs()),
        toml::Value::Integer(_) => {
            Err("must be at least 1 second (omit it for no limit)".to_string())
        }
        toml::Value::String(s) => parse_time_limit(&s),
        other => Err(format!(
            "expected a duration string like \"2h\" or seconds, found {}",
            other.type_str()
        )),
    }
}

fn toml_command(v: toml::Value) -> Result<Vec<String>, String> {
    let argv = match v {
        toml::Value::String(script) if script.trim().is_empty() => {
            return Err("must not be empty".to_string())
        }
        toml::Value::String(script) => vec!["/bin/sh".to_string(), "-c".to_string(), script],
        toml::Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                toml::Value::String(s) => Ok(s),
                other => Err(format!(
                    "array items must be strings, found {}",
                    other.type_str()
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        other => {
            return Err(format!(
                "expected an array of strings or a shell string, found {}",
                other.type_str()
            ))
        }
    };
    match argv.first() {
        None => Err("must not be empty".to_string()),
        Some(p) if p.is_empty() => Err("the program (first item) must not be empty".to_string()),
        Some(_) => Ok(argv),
    }
}

fn toml_env(table: BTreeMap<String, toml::Value>) -> Result<BTreeMap<String, String>, String> {
    table
        .into_iter()
        .map(|(key, value)| {
            check_env_key(&key)?;
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(format!(
                        "{key}: expected a string, number or boolean, found {}",
                        other.type_str()
                    ))
                }
            };
            Ok((key, text))
        })
        .collect()
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "spec_fuzz.rs"]
mod fuzz;
