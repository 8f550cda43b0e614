//! `muster queue`, `muster show`, `muster cancel`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use muster_proto::{JobInfo, JobSpec, JobState};

use super::{current_user, Ctx};
use crate::args::QueueArgs;
use crate::json;
use crate::output::{
    exit_text, format_bytes, format_command, format_cpus, format_span_ms, format_time_ms,
    job_state_name, join_numbers, now_ms, or_dash, task_state_name, Table,
};

/// Lists jobs: running first, then pending in queue order, then finished.
pub async fn queue(ctx: &Ctx, args: QueueArgs) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let mut jobs = scheduler.list_jobs(args.all).await?;
    sort_for_queue(&mut jobs);
    if ctx.json() {
        let jobs = jobs.iter().map(json::Job::from).collect();
        return json::print(&json::Jobs { jobs });
    }
    print!("{}", queue_table(&jobs, now_ms()).render());
    Ok(())
}

/// Prints one job and its tasks.
pub async fn show(ctx: &Ctx, id: u64) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let job = scheduler.get_job(id).await?;
    if ctx.json() {
        return json::print(&json::Job::from(&job));
    }
    print!("{}", show_text(&job, now_ms()));
    Ok(())
}

/// Prints why a job is not running (or how it ended): the planner's verdict.
pub async fn why(ctx: &Ctx, id: u64) -> anyhow::Result<()> {
    let mut scheduler = ctx.scheduler().await?;
    let job = scheduler.get_job(id).await?;
    if ctx.json() {
        return json::print(&serde_json::json!({
            "id": job.id,
            "state": job_state_name(job.state),
            "queue_position": (job.queue_position > 0).then_some(job.queue_position),
            "reason": why_reason(&job),
            "borrowed": job.borrowed,
        }));
    }
    println!("{}", why_text(&job));
    Ok(())
}

/// One line: the job, its state, and the reason.
pub fn why_text(job: &JobInfo) -> String {
    let spec = job.spec.clone().unwrap_or_default();
    format!(
        "job {} ({}, tenant {}, priority {}): {}",
        job.id,
        job_state_name(job.state),
        crate::output::escape(&spec.tenant),
        or_dash(&job.priority),
        crate::output::escape(&why_reason(job))
    )
}

/// Why the job is where it is: its place and the planner's verdict while
/// pending, where it runs, or how it ended (the same text for humans and
/// for `--json`).
pub fn why_reason(job: &JobInfo) -> String {
    let state = state_of(job);
    match state {
        JobState::Pending => format!(
            "position {} in the queue; {}",
            job.queue_position,
            or_dash(&job.reason)
        ),
        JobState::Placed | JobState::Running => {
            let borrowed = if job.borrowed {
                " on borrowed capacity (may be reclaimed)"
            } else {
                ""
            };
            let verb = if state == JobState::Placed {
                "starting"
            } else {
                "running"
            };
            format!("{verb}{borrowed} on {}", nodes_of(job))
        }
        _ if !job.reason.is_empty() => job.reason.clone(),
        JobState::Completed => {
            let ran = format_span_ms(job.started_at_ms, job.ended_at_ms, job.ended_at_ms);
            format!("completed: every task exited 0 (ran {ran})")
        }
        other => format!("{} ({})", job_state_name(job.state), ended_how(job, other)),
    }
}

/// A short account of a finished job without a recorded reason.
fn ended_how(job: &JobInfo, state: JobState) -> String {
    let failed: Vec<String> = job
        .tasks
        .iter()
        .filter_map(|t| match (t.exit_code, t.signal) {
            (_, Some(sig)) => Some(format!("task {} killed by signal {sig}", t.index)),
            (Some(c), None) if c != 0 => Some(format!("task {} exited {c}", t.index)),
            _ => None,
        })
        .collect();
    match (state, failed.is_empty()) {
        (_, false) => failed.join(", "),
        (JobState::Cancelled, true) => "cancelled before it ran".to_string(),
        _ => "no task reported a failure".to_string(),
    }
}

/// Cancels a job and prints its new state.
pub async fn cancel(ctx: &Ctx, id: u64) -> anyhow::Result<()> {
    let user = current_user()?;
    let mut scheduler = ctx.scheduler().await?;
    let state = job_state_name(scheduler.cancel(id, user).await?);
    if ctx.json() {
        return json::print(&json::Cancelled { id, state });
    }
    println!("job {id}: {state}");
    Ok(())
}

fn state_of(job: &JobInfo) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

fn is_active(state: JobState) -> bool {
    matches!(state, JobState::Placed | JobState::Running)
}

/// Running and placed jobs by id, then pending by queue position, then the rest.
pub fn sort_for_queue(jobs: &mut [JobInfo]) {
    jobs.sort_by_key(|j| {
        let state = state_of(j);
        let group = if is_active(state) {
            0
        } else if state == JobState::Pending {
            1
        } else {
            2
        };
        let position = match j.queue_position {
            0 => u32::MAX,
            p => p,
        };
        (group, position, j.id)
    });
}

fn spec_of(job: &JobInfo) -> JobSpec {
    job.spec.clone().unwrap_or_default()
}

/// The distinct nodes a job's tasks run on, in order, comma-separated.
fn nodes_of(job: &JobInfo) -> String {
    let nodes: BTreeSet<&str> = job
        .tasks
        .iter()
        .map(|t| t.node.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    or_dash(&nodes.into_iter().collect::<Vec<_>>().join(","))
}

/// How long a job waited: from submission to its (latest) start, or until
/// now while it is pending; `-` for a job that ended without starting.
fn job_wait(job: &JobInfo, now: i64) -> String {
    match state_of(job) {
        JobState::Pending => format_span_ms(job.submitted_at_ms, 0, now),
        _ if job.started_at_ms > 0 => format_span_ms(job.submitted_at_ms, job.started_at_ms, now),
        _ => "-".to_string(),
    }
}

/// How long a job has run (active) or ran (finished); `-` if it never did.
fn job_run(job: &JobInfo, now: i64) -> String {
    match state_of(job) {
        JobState::Pending => "-".to_string(),
        state if is_active(state) || job.ended_at_ms <= 0 => {
            format_span_ms(job.started_at_ms, 0, now)
        }
        _ => format_span_ms(job.started_at_ms, job.ended_at_ms, now),
    }
}

/// Where the job runs, or why it is pending or ended.
fn nodes_or_reason(job: &JobInfo) -> String {
    let state = state_of(job);
    if state == JobState::Pending || (!is_active(state) && !job.reason.is_empty()) {
        format!("({})", or_dash(&job.reason))
    } else {
        nodes_of(job)
    }
}

/// The queue as a table.
pub fn queue_table(jobs: &[JobInfo], now: i64) -> Table {
    let mut table = Table::new(&[
        "ID",
        "POS",
        "NAME",
        "USER",
        "TENANT",
        "PRIORITY",
        "STATE",
        "TASKS",
        "GPUS",
        "WAIT",
        "RUN",
        "NODES(REASON)",
    ]);
    for job in jobs {
        let spec = spec_of(job);
        let gpus = u64::from(spec.tasks) * u64::from(spec.gpus_per_task);
        let pos = match job.queue_position {
            0 => "-".to_string(),
            p => p.to_string(),
        };
        table.row(vec![
            job.id.to_string(),
            pos,
            spec.name,
            job.user.clone(),
            spec.tenant,
            or_dash(&job.priority),
            job_state_name(job.state),
            spec.tasks.to_string(),
            gpus.to_string(),
            job_wait(job, now),
            job_run(job, now),
            nodes_or_reason(job),
        ]);
    }
    table
}

/// The per-task resources, e.g. `2 GPUs, 0.5 CPUs, 16GiB`.
fn per_task(spec: &JobSpec) -> String {
    format!(
        "{} GPU{}, {} CPU{}, {}",
        spec.gpus_per_task,
        if spec.gpus_per_task == 1 { "" } else { "s" },
        format_cpus(spec.cpu_millis_per_task),
        if spec.cpu_millis_per_task == 1000 {
            ""
        } else {
            "s"
        },
        format_bytes(spec.memory_bytes_per_task),
    )
}

fn time_limit(spec: &JobSpec) -> String {
    match spec.time_limit_secs {
        0 => "none".to_string(),
        s => humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
    }
}

fn when(ms: i64, now: i64) -> String {
    match format_time_ms(ms).as_str() {
        "-" => "-".to_string(),
        text => format!("{text} UTC ({} ago)", format_span_ms(ms, 0, now)),
    }
}

/// The job's fields, one `Key: value` line each.
fn job_fields(job: &JobInfo, now: i64) -> Vec<(&'static str, String)> {
    let spec = spec_of(job);
    let env = spec
        .env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<BTreeSet<_>>();
    let mut fields = vec![
        ("Name", spec.name.clone()),
        ("User", job.user.clone()),
        ("Tenant", spec.tenant.clone()),
        ("State", job_state_name(job.state)),
    ];
    if !job.priority.is_empty() {
        fields.push(("Priority", job.priority.clone()));
    }
    if job.queue_position > 0 {
        fields.push(("Queue position", job.queue_position.to_string()));
    }
    if job.borrowed {
        fields.push(("Borrowed", "yes: beyond the tenant's guarantee".to_string()));
    }
    if job.redacted {
        let why = "another user's job: command, environment and folders are not shown";
        fields.push(("Summary", why.to_string()));
    }
    fields.extend([
        ("Reason", or_dash(&job.reason)),
        ("Restarts", restarts(job, &spec)),
        ("Stop", stop_text(job, &spec)),
        ("Checkpoint", checkpoint_text(job, now)),
        ("Tasks", format!("{} × ({})", spec.tasks, per_task(&spec))),
        ("Time limit", time_limit(&spec)),
        ("Command", format_command(&spec.command)),
        ("Workdir", or_dash(&spec.workdir)),
        (
            "Env",
            or_dash(&env.into_iter().collect::<Vec<_>>().join(" ")),
        ),
        ("Checkpoint dir", checkpoint_dir(job, &spec)),
        ("Submitted", when(job.submitted_at_ms, now)),
        ("Started", when(job.started_at_ms, now)),
        ("Ended", when(job.ended_at_ms, now)),
    ]);
    fields
}

/// `2 (1 of 3 allowed after failures used)`.
fn restarts(job: &JobInfo, spec: &muster_proto::JobSpec) -> String {
    if spec.max_restarts == 0 {
        return job.restart_count.to_string();
    }
    format!(
        "{} ({} of {} failure restarts used)",
        job.restart_count, job.failures, spec.max_restarts
    )
}

/// `SIGUSR1, then SIGKILL after 30s (killed at once after a checkpoint)`.
fn stop_text(job: &JobInfo, spec: &muster_proto::JobSpec) -> String {
    if job.stop_signal == 0 {
        return "-".to_string();
    }
    let mut text = format!(
        "{}, then SIGKILL after {}",
        crate::output::signal_name(job.stop_signal),
        humantime::format_duration(std::time::Duration::from_secs(job.grace_secs))
    );
    if spec.checkpoint_on_preempt {
        text.push_str(" (or as soon as a checkpoint is reported)");
    }
    text
}

/// `step 1200 at 2026-12-01 10:00:00 UTC (5m ago), by task 0`.
fn checkpoint_text(job: &JobInfo, now: i64) -> String {
    if job.checkpoint_at_ms == 0 {
        return "none reported".to_string();
    }
    let step = job
        .checkpoint_step
        .map_or_else(String::new, |s| format!("step {s} "));
    format!(
        "{step}at {}, by task {}",
        when(job.checkpoint_at_ms, now),
        job.checkpoint_task
    )
}

/// The task table of `muster show`.
fn task_table(job: &JobInfo, now: i64) -> Table {
    let mut table = Table::new(&[
        "TASK", "NODE", "GPUS", "STATE", "TIME", "EXIT", "OOM", "MESSAGE",
    ]);
    for t in &job.tasks {
        table.row(vec![
            t.index.to_string(),
            or_dash(&t.node),
            join_numbers(&t.gpus),
            task_state_name(t.state),
            format_span_ms(t.started_at_ms, t.ended_at_ms, now),
            exit_text(t.exit_code, t.signal),
            if t.oom_killed { "yes" } else { "no" }.to_string(),
            t.message.clone(),
        ]);
    }
    table
}

/// The job's checkpoint directory, as its tasks are told (the scheduler
/// fills in its default); hidden for another user's job.
fn checkpoint_dir(job: &JobInfo, spec: &muster_proto::JobSpec) -> String {
    if job.redacted {
        return "-".to_string();
    }
    or_dash(&spec.checkpoint_dir)
}

/// Everything `muster show` prints.
pub fn show_text(job: &JobInfo, now: i64) -> String {
    let fields = job_fields(job, now);
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = format!("Job {}\n", job.id);
    for (key, value) in fields {
        let value = crate::output::escape(&value);
        let _ = writeln!(out, "  {:width$} {value}", format!("{key}:"));
    }
    out.push('\n');
    if job.tasks.is_empty() {
        out.push_str("No tasks placed yet.\n");
    } else {
        out.push_str(&task_table(job, now).render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use muster_proto::TaskInfo;

    fn job(id: u64, state: JobState, position: u32) -> JobInfo {
        JobInfo {
            id,
            state: state as i32,
            queue_position: position,
            user: "alice".into(),
            submitted_at_ms: 1_000,
            spec: Some(JobSpec {
                name: format!("j{id}"),
                tenant: "default".into(),
                tasks: 2,
                gpus_per_task: 4,
                cpu_millis_per_task: 500,
                memory_bytes_per_task: 1 << 30,
                command: vec!["python".into(), "train.py".into()],
                ..JobSpec::default()
            }),
            ..JobInfo::default()
        }
    }

    #[test]
    fn queue_orders_running_then_pending_by_position() {
        let mut jobs = vec![
            job(1, JobState::Pending, 2),
            job(2, JobState::Completed, 0),
            job(3, JobState::Pending, 1),
            job(4, JobState::Running, 0),
        ];
        sort_for_queue(&mut jobs);
        let ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
        assert_eq!(ids, [4, 3, 1, 2]);
    }

    #[test]
    fn why_says_position_and_verdict() {
        let mut pending = job(7, JobState::Pending, 3);
        pending.priority = "high".into();
        pending.reason = "waiting for the preemption of job 2".into();
        let text = why_text(&pending);
        assert_eq!(
            why_reason(&pending),
            "position 3 in the queue; waiting for the preemption of job 2"
        );
        assert!(text.starts_with("job 7 (pending, tenant "), "{text}");
        assert!(
            text.ends_with(
                "priority high): position 3 in the queue; waiting for the preemption of job 2"
            ),
            "{text}"
        );
        let mut running = job(8, JobState::Running, 0);
        running.borrowed = true;
        assert!(why_text(&running).contains("on borrowed capacity"));
        // --json gets the same reason the text shows, not "".
        assert!(why_reason(&running).contains("on borrowed capacity"));
        let mut done = job(9, JobState::Completed, 0);
        done.started_at_ms = 1_000;
        done.ended_at_ms = 33_000;
        assert_eq!(
            why_reason(&done),
            "completed: every task exited 0 (ran 32s)"
        );
        let mut failed = job(10, JobState::Failed, 0);
        failed.tasks = vec![TaskInfo {
            index: 1,
            exit_code: Some(3),
            ..TaskInfo::default()
        }];
        assert_eq!(why_reason(&failed), "failed (task 1 exited 3)");
    }

    #[test]
    fn the_queue_says_wait_and_run_apart() {
        let mut cancelled = job(3, JobState::Cancelled, 0);
        cancelled.submitted_at_ms = 1_000;
        cancelled.started_at_ms = 2_000;
        cancelled.ended_at_ms = 34_000;
        let text = queue_table(&[cancelled], 100_000).render();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("WAIT  RUN"), "{text}");
        assert!(lines[1].contains("1s    32s"), "{text}");
    }

    #[test]
    fn queue_table_shows_reason_or_nodes() {
        let mut pending = job(1, JobState::Pending, 1);
        pending.reason = "waiting for 8 GPUs".into();
        let mut running = job(2, JobState::Running, 0);
        running.started_at_ms = 61_000;
        running.tasks = vec![
            TaskInfo {
                node: "n2".into(),
                ..TaskInfo::default()
            },
            TaskInfo {
                node: "n1".into(),
                ..TaskInfo::default()
            },
        ];
        let text = queue_table(&[running, pending], 253_000).render();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  POS  NAME  USER"), "{text}");
        assert!(lines[2].starts_with("1   1  "), "queue position: {text}");
        assert!(
            lines[1].contains("running") && lines[1].ends_with("3m12s  n1,n2"),
            "{text}"
        );
        assert!(lines[2].ends_with("(waiting for 8 GPUs)"), "{text}");
        assert!(
            lines[2].contains("  8  "),
            "GPUs are tasks × per task: {text}"
        );
    }

    #[test]
    fn show_lists_fields_and_tasks() {
        let mut j = job(42, JobState::Failed, 0);
        j.restart_count = 1;
        j.tasks = vec![TaskInfo {
            index: 0,
            node: "gpu-1".into(),
            gpus: vec![0, 1],
            signal: Some(9),
            oom_killed: true,
            message: "memory limit".into(),
            ..TaskInfo::default()
        }];
        let text = show_text(&j, 10_000);
        assert!(text.starts_with("Job 42\n"), "{text}");
        assert!(text.contains("State:"), "{text}");
        assert!(text.contains("failed"), "{text}");
        assert!(text.contains("2 × (4 GPUs, 0.5 CPUs, 1GiB)"), "{text}");
        let limit = text
            .lines()
            .find(|l| l.trim_start().starts_with("Time limit:"));
        assert!(limit.is_some_and(|l| l.ends_with(" none")), "{text}");
        let row = text.lines().last().unwrap_or_default();
        assert!(row.starts_with("0     gpu-1  0,1"), "{text}");
        assert!(row.contains("SIGKILL  yes  memory limit"), "{text}");
    }

    #[test]
    fn show_without_tasks_says_so() {
        let text = show_text(&job(1, JobState::Pending, 3), 5_000);
        assert!(text.contains("Queue position:"), "{text}");
        assert!(text.ends_with("No tasks placed yet.\n"), "{text}");
    }
}
