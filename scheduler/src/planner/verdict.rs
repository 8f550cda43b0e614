//! Why a pending job did not start: the planner's own words.

use super::placement::FOREVER;
use super::quota::QuotaBlock;
use crate::model::{JobId, Resources};

/// Why a pending job was not placed in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No node is ready.
    NoNodes,
    /// A limit of the tenant or of an ancestor would be exceeded.
    TenantLimit(QuotaBlock),
    /// Not enough free room right now.
    NoRoom {
        tasks: u32,
        per_task: Resources,
        slots_free: u32,
    },
    /// The job requires one value of a node label; no value has room.
    NoRoomInGroup {
        tasks: u32,
        per_task: Resources,
        label: String,
        best: u32,
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
}

fn task_shape(tasks: u32, r: &Resources) -> String {
    format!(
        "{tasks} task(s) of {} GPU(s), {} CPU(s), {} MiB",
        r.gpus,
        f64::from(r.cpu_millis) / 1000.0,
        r.memory_bytes >> 20
    )
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
            } => write!(
                f,
                "needs {}; room for {slots_free} now",
                task_shape(*tasks, per_task)
            ),
            Verdict::NoRoomInGroup {
                tasks,
                per_task,
                label,
                best,
            } => write!(
                f,
                "needs {} in one {label}; at most {best} available in any {label}",
                task_shape(*tasks, per_task)
            ),
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
                    let wait = (start_ms - now_ms).max(0) / 1000;
                    write!(
                        f,
                        "reserved to start at {} (in {}) on {list}",
                        format_time(*start_ms),
                        humantime::format_duration(std::time::Duration::from_secs(wait as u64))
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
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                let s = if ids.len() == 1 { "" } else { "s" };
                write!(f, "waiting for the preemption of job{s} {}", ids.join(", "))
            }
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
}
