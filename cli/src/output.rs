//! Human output: aligned tables and the small formatters they use.
//!
//! Times are printed in UTC as `YYYY-MM-DD HH:MM:SS`, ages and run times as
//! compact durations (`45s`, `3m12s`, `1h02m`, `2d03h`), sizes with binary
//! units (`16GiB`), CPUs as decimals (`0.5`). A zero timestamp (never set)
//! prints as `-`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use muster_proto::{JobState, TaskState};

/// `text` safe to print on a terminal: every control character (escape
/// sequences, carriage returns, backspaces, C1 codes) written as an escape
/// (`\u{1b}`), so a name another user chose cannot move the cursor, rewrite
/// a line or retitle the window. A backslash is kept as it is.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A plain text table: left-aligned columns separated by two spaces. Every
/// cell is printed through [`escape`].
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are blank, extra cells are kept.
    pub fn row(&mut self, cells: Vec<String>) {
        let cells = cells
            .into_iter()
            .map(|c| match escape(&c) {
                std::borrow::Cow::Borrowed(_) => c,
                std::borrow::Cow::Owned(e) => e,
            })
            .collect();
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain(std::iter::once(self.headers.len()))
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map_or("", String::as_str);
                let pad = width - cell.chars().count();
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `2026-11-29 15:41:46` (UTC), or `-` for 0.
pub fn format_time_ms(ms: i64) -> String {
    let Ok(ms) = u64::try_from(ms) else {
        return "-".to_string();
    };
    if ms == 0 {
        return "-".to_string();
    }
    let time = UNIX_EPOCH + Duration::from_millis(ms);
    let text = humantime::format_rfc3339_seconds(time).to_string();
    text.trim_end_matches('Z').replacen('T', " ", 1)
}

/// A compact duration: `45s`, `3m12s`, `1h02m`, `2d03h`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// The time from `from_ms` to `to_ms` (or to now when `to_ms` is 0), or `-`
/// when `from_ms` is unset.
pub fn format_span_ms(from_ms: i64, to_ms: i64, now_ms: i64) -> String {
    if from_ms <= 0 {
        return "-".to_string();
    }
    let end = if to_ms > 0 { to_ms } else { now_ms };
    let millis = u64::try_from(end.saturating_sub(from_ms)).unwrap_or(0);
    format_duration(Duration::from_millis(millis))
}

/// Now as Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Bytes with a binary unit: `512MiB`, `1.5GiB`, `0B`.
pub fn format_bytes(bytes: u64) -> String {
    match muster_proto::units::binary_size(bytes) {
        Some((value, unit)) => format!("{value}{unit}"),
        None => format!("{bytes}B"),
    }
}

/// Milli-CPUs as CPUs: `1`, `0.5`, `2.25`.
pub fn format_cpus(millis: u32) -> String {
    let whole = millis / 1000;
    let frac = millis % 1000;
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:03}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// A job state as the CLI names it (`pending`, `timed-out`, ...).
pub fn job_state_name(state: i32) -> String {
    match JobState::try_from(state) {
        Ok(JobState::Pending) => "pending".into(),
        Ok(JobState::Placed) => "placed".into(),
        Ok(JobState::Running) => "running".into(),
        Ok(JobState::Completed) => "completed".into(),
        Ok(JobState::Failed) => "failed".into(),
        Ok(JobState::Cancelled) => "cancelled".into(),
        Ok(JobState::TimedOut) => "timed-out".into(),
        Ok(JobState::Preempting) => "preempting".into(),
        Ok(JobState::Requeued) => "requeued".into(),
        Ok(JobState::Unspecified) | Err(_) => format!("unknown({state})"),
    }
}

/// A task state as the CLI names it.
pub fn task_state_name(state: i32) -> String {
    match TaskState::try_from(state) {
        Ok(TaskState::TaskAssigned) => "assigned".into(),
        Ok(TaskState::TaskRunning) => "running".into(),
        Ok(TaskState::TaskExited) => "exited".into(),
        Ok(TaskState::TaskLost) => "lost".into(),
        Ok(TaskState::Unspecified) | Err(_) => format!("unknown({state})"),
    }
}

/// `SIGKILL` for 9; `signal 77` for numbers this platform does not name.
pub fn signal_name(signal: i32) -> String {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(sig) => sig.as_str().to_string(),
        Err(_) => format!("signal {signal}"),
    }
}

/// How a task ended: the signal name if killed, else the exit code, else `-`.
pub fn exit_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (signal, code) {
        (Some(sig), _) => signal_name(sig),
        (None, Some(code)) => code.to_string(),
        (None, None) => "-".to_string(),
    }
}

/// `-` for an empty string, the string otherwise (escaped: see [`escape`]).
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        escape(s).into_owned()
    }
}

/// A list of numbers as `0,1,2`, or `-` when empty.
pub fn join_numbers(numbers: &[u32]) -> String {
    let text = numbers
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    or_dash(&text)
}

/// A command line for display, quoting words that need it.
pub fn format_command(argv: &[String]) -> String {
    argv.iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
            if plain {
                w.clone()
            } else {
                format!("'{}'", escape(&w.replace('\'', r"'\''")))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A node's state as users see it: `ready`, `draining` (drained, work still
/// runs), `drained` (drained and empty), or `lost`.
pub fn node_state(n: &muster_proto::NodeInfo) -> String {
    if n.state == "ready" && !n.drain_reason.is_empty() {
        let busy = n.gpus.iter().any(|g| g.allocated_to != 0) || n.cpu_millis_allocated > 0;
        return if busy { "draining" } else { "drained" }.to_string();
    }
    or_dash(&n.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let mut t = Table::new(&["ID", "NAME", "STATE"]);
        t.row(vec!["1".into(), "train".into(), "running".into()]);
        t.row(vec!["12".into(), "x".into(), String::new()]);
        let text = t.render();
        assert_eq!(text, "ID  NAME   STATE\n1   train  running\n12  x\n");
    }

    /// Issue 18 #11: another user's job name must not drive this terminal.
    #[test]
    fn control_characters_are_escaped() {
        let hostile = "x\u{1b}]0;owned\u{7}\u{1b}[2J\r\u{9b}1m\u{8}";
        let mut t = Table::new(&["ID", "NAME"]);
        t.row(vec!["1".into(), hostile.into()]);
        let text = t.render();
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert_eq!(
            text,
            "ID  NAME\n1   x\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\r\\u{9b}1m\\u{8}\n"
        );
        assert_eq!(or_dash("a\tb"), "a\\tb");
        assert_eq!(escape("plain \\ text"), "plain \\ text");
        let argv = vec!["echo".to_string(), "\u{1b}[31m".to_string()];
        assert_eq!(format_command(&argv), r"echo '\u{1b}[31m'");
    }

    #[test]
    fn empty_table_is_just_the_header() {
        assert_eq!(Table::new(&["A", "B"]).render(), "A  B\n");
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(format_time_ms(0), "-");
        assert_eq!(format_time_ms(-5), "-");
        assert_eq!(format_time_ms(1_700_000_000_123), "2023-11-14 22:13:20");
    }

    #[test]
    fn durations_are_compact() {
        let d = Duration::from_secs;
        assert_eq!(format_duration(d(45)), "45s");
        assert_eq!(format_duration(d(192)), "3m12s");
        assert_eq!(format_duration(d(3720)), "1h02m");
        assert_eq!(format_duration(d(2 * 86_400 + 3 * 3600)), "2d03h");
        assert_eq!(format_span_ms(0, 0, 10), "-");
        assert_eq!(format_span_ms(1000, 0, 61_000), "1m00s");
        assert_eq!(format_span_ms(1000, 6000, 61_000), "5s");
    }

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(format_bytes(0), "0B");
        assert_eq!(format_bytes(512 << 20), "512MiB");
        assert_eq!(format_bytes(3 << 29), "1.5GiB");
        assert_eq!(format_cpus(1000), "1");
        assert_eq!(format_cpus(500), "0.5");
        assert_eq!(format_cpus(2250), "2.25");
    }

    #[test]
    fn states_and_exits() {
        assert_eq!(job_state_name(JobState::TimedOut as i32), "timed-out");
        assert_eq!(job_state_name(99), "unknown(99)");
        assert_eq!(task_state_name(TaskState::TaskLost as i32), "lost");
        assert_eq!(exit_text(None, Some(9)), "SIGKILL");
        assert_eq!(exit_text(Some(3), None), "3");
        assert_eq!(exit_text(None, None), "-");
        assert_eq!(signal_name(200), "signal 200");
    }

    #[test]
    fn commands_quote_what_needs_it() {
        let argv: Vec<String> = ["python", "-c", "print('hi')"].map(String::from).to_vec();
        assert_eq!(format_command(&argv), r"python -c 'print('\''hi'\'')'");
    }
}
