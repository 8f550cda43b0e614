//! Why a pending job did not start: the planner's own words.

use super::placement::FOREVER;
use super::quota::QuotaBlock;
use super::short::{self, Lack};
use crate::model::{JobId, JobState, Resources};

/// Why a pending job was not placed in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No node is ready.
    NoNodes,
    /// A limit of the tenant or of an ancestor would be exceeded.
    TenantLimit(QuotaBlock),
    /// Not enough free room right now, and what is short.
    NoRoom {
        tasks: u32,
        per_task: Resources,
        slots_free: u32,
        lack: Lack,
    },
    /// The job requires one value of a node label; no value has room.
    NoRoomInGroup {
        tasks: u32,
        per_task: Resources,
        label: String,
        best: u32,
        /// The value that came closest, and what its nodes lack.
        closest: Option<(String, Lack)>,
    },
    /// Nodes are held for it; it starts when running jobs reach their limits.
    Reserved {
        start_ms: i64,
        now_ms: i64,
        nodes: Vec<String>,
    },
    /// It would fit only on nodes reserved for an earlier job, and would
    /// run past that job's start.
    BehindReservation { job: JobId, start_ms: i64 },
    /// Jobs are being preempted to make room for it.
    WaitingForPreemption(Vec<JobId>),
    /// Only jobs still within their minimum runtime would make room: they
    /// will be preempted when the last one's protection ends at `at_ms`.
    PreemptionPlanned {
        victims: Vec<JobId>,
        at_ms: i64,
        now_ms: i64,
    },
    /// It fits once these jobs, already ended, cancelled or preempted,
    /// have stopped their tasks.
    WaitingForStop(Vec<(JobId, JobState)>),
}

/// `1 task`, `8 GPUs`: a count and a noun, plural when it is not 1.
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Bytes with a binary unit: `512 MiB`, `1.5 GiB`, `100 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    match muster_proto::units::binary_size(bytes) {
        Some((value, unit)) => format!("{value} {unit}"),
        None => format!("{bytes} bytes"),
    }
}

/// Milli-CPUs as CPUs: `1 CPU`, `0.5 CPUs`, `64 CPUs`.
pub fn cpus_text(millis: u64) -> String {
    if millis == 1000 {
        return "1 CPU".into();
    }
    let (whole, frac) = (millis / 1000, millis % 1000);
    if frac == 0 {
        return format!("{whole} CPUs");
    }
    let frac = format!("{frac:03}");
    format!("{whole}.{} CPUs", frac.trim_end_matches('0'))
}

/// What one task asks for: `8 GPUs, 1 CPU, 1 GiB`.
pub fn task_resources(r: &Resources) -> String {
    let mut parts = Vec::new();
    if r.gpus > 0 {
        parts.push(plural(u64::from(r.gpus), "GPU"));
    }
    parts.push(cpus_text(u64::from(r.cpu_millis)));
    parts.push(human_bytes(r.memory_bytes));
    parts.join(", ")
}

fn task_shape(tasks: u32, r: &Resources) -> String {
    format!(
        "{} of {}",
        plural(u64::from(tasks), "task"),
        task_resources(r)
    )
}

fn job_list(ids: &[JobId]) -> String {
    let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let s = if ids.len() == 1 { "" } else { "s" };
    format!("job{s} {}", list.join(", "))
}

/// `18:02:10 UTC (in 3m)`-style: a time and how far off it is.
fn when(at_ms: i64, now_ms: i64) -> String {
    // Rounded up: "in 3m" is never earlier than the time it names.
    let wait = (at_ms.saturating_sub(now_ms).max(0) as u64).div_ceil(1000);
    format!(
        "{} (in {})",
        format_time(at_ms),
        humantime::format_duration(std::time::Duration::from_secs(wait))
    )
}

/// Why a job that holds resources is stopping.
fn stop_cause(state: JobState) -> &'static str {
    match state {
        JobState::Cancelled => "cancelled",
        JobState::Preempting => "preempted",
        JobState::Requeued => "being restarted",
        JobState::TimedOut => "timed out",
        JobState::Failed => "failed",
        _ => "ended",
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::NoNodes => write!(f, "no ready nodes"),
            Verdict::TenantLimit(b) => write!(f, "{b}"),
            Verdict::NoRoom {
                tasks,
                per_task,
                slots_free,
                lack,
            } => write!(
                f,
                "needs {}; room for {slots_free} now{}",
                task_shape(*tasks, per_task),
                short::describe(lack, per_task)
            ),
            Verdict::NoRoomInGroup {
                tasks,
                per_task,
                label,
                best,
                closest,
            } => {
                write!(
                    f,
                    "needs {} in one {label}; at most {best} available in any {label}",
                    task_shape(*tasks, per_task)
                )?;
                match closest {
                    Some((value, lack)) => write!(
                        f,
                        " (closest is {label} {value} with {}{})",
                        plural(u64::from(lack.usable + lack.held), "ready node"),
                        short::describe(lack, per_task)
                    ),
                    None => write!(f, " (no ready node has a {label} label)"),
                }
            }
            Verdict::Reserved {
                start_ms,
                now_ms,
                nodes,
            } => {
                let list = name_list(nodes);
                if *start_ms == FOREVER {
                    write!(
                        f,
                        "reserved: holds {list}, whose running jobs have no time limit; \
                         starts when they end"
                    )
                } else {
                    write!(
                        f,
                        "reserved to start at {} on {list}",
                        when(*start_ms, *now_ms)
                    )
                }
            }
            Verdict::BehindReservation { job, start_ms } => {
                if *start_ms == FOREVER {
                    write!(f, "would delay the reservation of job {job}")
                } else {
                    write!(
                        f,
                        "would delay the reservation of job {job} (starting at {}); \
                         a shorter time limit could let it backfill",
                        format_time(*start_ms)
                    )
                }
            }
            Verdict::WaitingForPreemption(ids) => {
                write!(f, "waiting for the preemption of {}", job_list(ids))
            }
            Verdict::PreemptionPlanned {
                victims,
                at_ms,
                now_ms,
            } => {
                let their = if victims.len() == 1 { "its" } else { "their" };
                write!(
                    f,
                    "will preempt {} when {their} minimum runtime ends at {}",
                    job_list(victims),
                    when(*at_ms, *now_ms)
                )
            }
            Verdict::WaitingForStop(jobs) => match jobs.as_slice() {
                [(id, state)] => write!(
                    f,
                    "waiting for job {id} to stop ({}; its tasks are being killed)",
                    stop_cause(*state)
                ),
                _ => {
                    let list: Vec<String> = jobs
                        .iter()
                        .map(|(id, s)| format!("{id} ({})", stop_cause(*s)))
                        .collect();
                    write!(
                        f,
                        "waiting for jobs {} to stop; their tasks are being killed",
                        list.join(", ")
                    )
                }
            },
        }
    }
}

fn name_list(nodes: &[String]) -> String {
    const SHOW: usize = 4;
    let s = if nodes.len() == 1 { "" } else { "s" };
    let mut out = format!("node{s} {}", nodes[..nodes.len().min(SHOW)].join(", "));
    if nodes.len() > SHOW {
        out.push_str(&format!(" and {} more", nodes.len() - SHOW));
    }
    out
}

/// `2026-11-29 14:03:00 UTC` for Unix milliseconds (no clock, no time zone).
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_calendar_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(1_795_910_400_000), "2026-11-29 00:00:00 UTC");
        assert_eq!(
            format_time(951_782_400_000 + 3_723_000),
            "2000-02-29 01:02:03 UTC"
        );
    }

    #[test]
    fn amounts_read_in_human_units() {
        assert_eq!(human_bytes(107_374_182_400), "100 GiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(cpus_text(1000), "1 CPU");
        assert_eq!(cpus_text(500), "0.5 CPUs");
        assert_eq!(cpus_text(64_000), "64 CPUs");
        let r = Resources {
            gpus: 8,
            cpu_millis: 2500,
            memory_bytes: 100 << 30,
        };
        assert_eq!(task_shape(1, &r), "1 task of 8 GPUs, 2.5 CPUs, 100 GiB");
    }
}
