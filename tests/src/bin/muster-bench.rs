//! `muster-bench`: measurements against a running cluster (normally
//! `muster dev`). Prints one JSON object per run; BENCHMARKS.md records the
//! figures with the exact commands.
//!
//!   muster-bench latency [--addr URL] [--jobs 200]
//!     Submit-to-running latency of 1-GPU jobs on an idle cluster, one job at
//!     a time: from just before the Submit RPC until GetJob first shows the job
//!     running (or already finished), polled every millisecond.
//!
//!   muster-bench concurrent [--addr URLS] [--clients 32] [--jobs 20000]
//!                           [--to all|leader]
//!     Acknowledged submissions per second from many concurrent clients (one
//!     connection each), with p50/p99 latency. Without --addr it starts its
//!     own 3-scheduler cluster on loopback (release binaries beside this one)
//!     and spreads the clients over its members (followers forward), or with
//!     `--to leader` points them all at the leader.
//!
//!   muster-bench failover [--runs 10]
//!     Starts a 3-scheduler cluster; each run kills the leader with SIGKILL and
//!     measures the time to the first submission acknowledged after it.
//!
//!   muster-bench agent-failover [--runs 10] [--agents 2]
//!     Starts 3 schedulers and N agents; each run kills the leader with
//!     SIGKILL and measures, per agent, the time from the kill until the
//!     agent logs its registration with the new leader: how long agents go
//!     without a scheduler per failover. A run's figure is its slowest agent.
//!
//!   muster-bench array [--jobs 10000] [--runs 5]
//!     One array submission of N jobs into its own 3-scheduler cluster, timed
//!     from the RPC to its acknowledgement: jobs per second.
//!
//!   muster-bench preempt [--runs 10]
//!     Starts 1 scheduler and 2 agents x 8 GPUs; each run fills all 16 GPUs
//!     with a low-priority 2x8 gang whose tasks exit at once on SIGTERM, then
//!     submits a high-priority 2x8 gang and times from that Submit RPC until
//!     every task of the new gang is reported running.
//!
//!   muster-bench submit [--addr URL] [--jobs 1000]
//!     Sequential Submit RPCs on one connection (no process start per job):
//!     the server side of `muster submit`. Jobs ask for 16 GPUs and queue.

use muster_proto::muster_client::MusterClient;
use muster_proto::{GetJobRequest, JobSpec, JobState, SubmitRequest};
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// Sort the samples; their median, minimum and maximum.
fn spread(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let last = samples.last().copied().unwrap_or(f64::NAN);
    let first = samples.first().copied().unwrap_or(f64::NAN);
    (percentile(samples, 50.0), first, last)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("latency") => latency(&args).await,
        Some("submit") => submit(&args).await,
        Some("concurrent") => concurrent(&args).await,
        Some("failover") => failover(&args).await,
        Some("agent-failover") => agent_failover(&args).await,
        Some("array") => array(&args).await,
        Some("preempt") => preempt(&args).await,
        _ => {
            eprintln!(
                "usage: muster-bench latency|submit|concurrent|failover|agent-failover|array|preempt [options]"
            );
            std::process::exit(2);
        }
    }
}

fn queued_spec() -> JobSpec {
    JobSpec {
        name: "bench".into(),
        tasks: 2,
        gpus_per_task: 8,
        cpu_millis_per_task: 100,
        memory_bytes_per_task: 64 << 20,
        command: vec!["true".into()],
        workdir: "/".into(),
        ..Default::default()
    }
}

/// Three schedulers and two 8-GPU agents, one GPU held by a long job: the
/// benchmarks' 2 × 8-GPU jobs queue behind it (a gang that could never run
/// would be refused at submit).
fn three_schedulers() -> anyhow::Result<muster_tests::Cluster> {
    let c = muster_tests::Cluster::start(muster_tests::ClusterSpec {
        schedulers: 3,
        agents: 2,
        gpus_per_agent: 8,
        cgroups: false,
        ..Default::default()
    })?;
    let blocker = c.submit(&["--gpus", "1", "--", "sleep", "86400"])?;
    c.wait_state(blocker, "running", Duration::from_secs(30))?;
    Ok(c)
}

async fn concurrent(args: &[String]) -> anyhow::Result<()> {
    // `--to leader`: every client writes to the leader, as clients that
    // follow the leader hint do; `all` (the default) spreads them over the
    // members, and followers forward.
    let to_leader = match arg(args, "--to", "all").as_str() {
        "all" => false,
        "leader" => true,
        other => anyhow::bail!("--to: {other:?} is neither `all` nor `leader`"),
    };
    let own = if args.iter().any(|a| a == "--addr") {
        None
    } else {
        Some(three_schedulers()?)
    };
    let addrs: Vec<String> = match &own {
        Some(c) if to_leader => {
            vec![c.sched_addrs[c.wait_leader(Duration::from_secs(20))?].clone()]
        }
        Some(c) => c.sched_addrs.clone(),
        None if to_leader => anyhow::bail!("--to leader: only without --addr (own cluster)"),
        None => arg(args, "--addr", "")
            .split(',')
            .map(str::to_string)
            .collect(),
    };
    let clients: usize = arg(args, "--clients", "32").parse()?;
    let jobs: usize = arg(args, "--jobs", "20000").parse()?;
    let user = user()?;
    let per_client = jobs / clients;
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..clients {
        let addr = addrs[i % addrs.len()].clone();
        let user = user.clone();
        handles.push(tokio::spawn(async move {
            let mut client = MusterClient::connect(addr).await?;
            let mut lat = Vec::with_capacity(per_client);
            for n in 0..per_client {
                let t0 = Instant::now();
                client
                    .submit(SubmitRequest {
                        spec: Some(queued_spec()),
                        user: user.clone(),
                        request_id: format!("bench-{i}-{n}"),
                        array: 0,
                    })
                    .await?;
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut samples = Vec::new();
    for h in handles {
        samples.extend(h.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    samples.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"bench\":\"concurrent_submit\",\"schedulers\":{},\"clients\":{clients},\"jobs\":{},\"per_second\":{:.1},\"p50_ms\":{:.2},\"p99_ms\":{:.2}}}",
        addrs.len(),
        samples.len(),
        samples.len() as f64 / secs,
        percentile(&samples, 50.0),
        percentile(&samples, 99.0)
    );
    Ok(())
}

async fn failover(args: &[String]) -> anyhow::Result<()> {
    let runs: usize = arg(args, "--runs", "10").parse()?;
    let mut c = three_schedulers()?;
    let user = user()?;
    let mut samples = Vec::new();
    for run in 0..runs {
        let leader = c.wait_leader(Duration::from_secs(20))?;
        let others: Vec<String> = (0..3)
            .filter(|i| *i != leader)
            .map(|i| c.sched_addrs[i].clone())
            .collect();
        c.kill_scheduler_node(leader);
        let t0 = Instant::now();
        let mut k = 0;
        'retry: loop {
            for addr in &others {
                k += 1;
                let Ok(mut client) = MusterClient::connect(addr.clone()).await else {
                    continue;
                };
                let req = SubmitRequest {
                    spec: Some(queued_spec()),
                    user: user.clone(),
                    request_id: format!("failover-{run}"),
                    array: 0,
                };
                if client.submit(req).await.is_ok() {
                    break 'retry;
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("no write acknowledged 30 s after killing the leader");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        eprintln!(
            "run {run}: killed node {} -> first ack after {ms:.0} ms ({k} attempts)",
            leader + 1
        );
        samples.push(ms);
        c.start_scheduler_node(leader)?;
        c.wait_converged(Duration::from_secs(30))?;
    }
    let (median, min, max) = spread(&mut samples);
    println!(
        "{{\"bench\":\"failover\",\"runs\":{runs},\"median_ms\":{median:.0},\"min_ms\":{min:.0},\"max_ms\":{max:.0}}}"
    );
    Ok(())
}

/// A log line without its colour codes.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for ch in line.chars() {
        match (esc, ch) {
            (_, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// Milliseconds since midnight UTC of a (plain) log line's leading RFC 3339
/// timestamp (`2026-12-05T03:04:27.271563Z ...`).
fn log_time_of_day_ms(line: &str) -> Option<i64> {
    let t = line.trim_start().get(11..23)?; // HH:MM:SS.mmm
    let n = |r: std::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    Some(((n(0..2)? * 60 + n(3..5)?) * 60 + n(6..8)?) * 1000 + n(9..12)?)
}

/// Per agent, the time (ms after `since_ms`) of its first "registered"
/// log line after `since_ms`; `None` until every agent has one.
fn registrations_after(
    c: &muster_tests::Cluster,
    agents: usize,
    since_ms: i64,
) -> Option<Vec<i64>> {
    const DAY: i64 = 86_400_000;
    let since = since_ms.rem_euclid(DAY);
    (0..agents)
        .map(|i| {
            let log = std::fs::read_to_string(c.path(&format!("agent-{i}.log"))).ok()?;
            log.lines()
                .map(plain)
                .filter(|l| l.contains("registered") && l.contains("scheduler="))
                .filter_map(|l| log_time_of_day_ms(&l))
                .map(|t| (t - since).rem_euclid(DAY))
                // Past midnight wraps to a small positive gap; lines from
                // before the kill wrap to almost a day.
                .find(|gap| *gap < DAY / 2)
        })
        .collect()
}

async fn agent_failover(args: &[String]) -> anyhow::Result<()> {
    let runs: usize = arg(args, "--runs", "10").parse()?;
    let agents: usize = arg(args, "--agents", "2").parse()?;
    let mut c = muster_tests::Cluster::start(muster_tests::ClusterSpec {
        schedulers: 3,
        agents,
        gpus_per_agent: 8,
        cgroups: false,
        ..Default::default()
    })?;
    let mut samples = Vec::new();
    for run in 0..runs {
        let leader = c.wait_leader(Duration::from_secs(20))?;
        let killed_ms = muster_proto::daemon::now_ms();
        c.kill_scheduler_node(leader);
        let t0 = Instant::now();
        // Each agent's own gap: from the kill to its first registration
        // with the new leader, from its log.
        let back = loop {
            if let Some(gaps) = registrations_after(&c, agents, killed_ms) {
                break gaps;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("agents had no session 60 s after killing the leader");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let all_ms = back.iter().copied().max().unwrap_or(0) as f64;
        eprintln!(
            "run {run}: killed node {} -> agents registered with the new leader after {back:?} ms",
            leader + 1
        );
        samples.push(all_ms);
        c.start_scheduler_node(leader)?;
        c.wait_converged(Duration::from_secs(30))?;
    }
    let (median, min, max) = spread(&mut samples);
    println!(
        "{{\"bench\":\"agent-failover\",\"runs\":{runs},\"agents\":{agents},\"median_ms\":{median:.0},\"min_ms\":{min:.0},\"max_ms\":{max:.0}}}"
    );
    Ok(())
}

fn gang_spec(priority: &str) -> JobSpec {
    JobSpec {
        name: format!("bench-{priority}"),
        tasks: 2,
        gpus_per_task: 8,
        cpu_millis_per_task: 100,
        memory_bytes_per_task: 64 << 20,
        // `sleep` dies at once on SIGTERM: the victim exits on its signal.
        command: vec!["sleep".into(), "600".into()],
        workdir: "/".into(),
        priority: priority.into(),
        ..Default::default()
    }
}

/// Wait until every task of `id` is reported running.
async fn all_running(
    client: &mut MusterClient<tonic::transport::Channel>,
    id: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = client.get_job(GetJobRequest { id }).await?.into_inner();
        let running = !job.tasks.is_empty()
            && job
                .tasks
                .iter()
                .all(|t| t.state == muster_proto::TaskState::TaskRunning as i32);
        if running {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("job {id} did not run within 60 s: {job:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn preempt(args: &[String]) -> anyhow::Result<()> {
    let runs: usize = arg(args, "--runs", "10").parse()?;
    let c = muster_tests::Cluster::start(muster_tests::ClusterSpec {
        agents: 2,
        gpus_per_agent: 8,
        cgroups: false,
        scheduler_toml: "[scheduling]\nmin_runtime = \"0s\"\n",
        ..Default::default()
    })?;
    let user = user()?;
    let mut client = MusterClient::connect(c.sched_addrs[0].clone()).await?;
    let mut samples = Vec::new();
    for run in 0..runs {
        let submit = |priority: &str| SubmitRequest {
            spec: Some(gang_spec(priority)),
            user: user.clone(),
            request_id: String::new(),
            array: 0,
        };
        let low = client.submit(submit("low")).await?.into_inner().id;
        all_running(&mut client, low).await?;
        let t0 = Instant::now();
        let high = client.submit(submit("high")).await?.into_inner().id;
        all_running(&mut client, high).await?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        eprintln!("run {run}: job {low} preempted, job {high} running after {ms:.1} ms");
        samples.push(ms);
        for id in [low, high] {
            let _ = client
                .cancel(muster_proto::CancelRequest {
                    id,
                    user: user.clone(),
                })
                .await;
        }
        // The next run starts on an idle cluster.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = client
                .status(muster_proto::StatusRequest {})
                .await?
                .into_inner();
            let nodes = client
                .list_nodes(muster_proto::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            let busy = nodes
                .iter()
                .any(|n| n.gpus.iter().any(|g| g.allocated_to != 0));
            if s.jobs_running == 0 && !busy {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("the cluster did not become idle");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let (median, min, max) = spread(&mut samples);
    println!(
        "{{\"bench\":\"preempt_to_running\",\"runs\":{runs},\"gpus\":16,\"median_ms\":{median:.1},\"min_ms\":{min:.1},\"max_ms\":{max:.1}}}"
    );
    Ok(())
}

async fn array(args: &[String]) -> anyhow::Result<()> {
    let jobs: u32 = arg(args, "--jobs", "10000").parse()?;
    let runs: usize = arg(args, "--runs", "5").parse()?;
    let c = three_schedulers()?;
    let user = user()?;
    let mut client =
        MusterClient::connect(c.sched_addrs[c.wait_leader(Duration::from_secs(20))?].clone())
            .await?;
    let mut rates = Vec::new();
    for run in 0..runs {
        let t0 = Instant::now();
        let resp = client
            .submit(SubmitRequest {
                spec: Some(queued_spec()),
                user: user.clone(),
                request_id: format!("array-{run}"),
                array: jobs,
            })
            .await?
            .into_inner();
        let secs = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            resp.count == jobs,
            "asked for {jobs} jobs, got {}",
            resp.count
        );
        eprintln!("run {run}: {jobs} jobs in {:.1} ms", secs * 1000.0);
        rates.push(f64::from(jobs) / secs);
    }
    rates.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"bench\":\"array_submit\",\"jobs\":{jobs},\"runs\":{runs},\"median_jobs_per_second\":{:.0}}}",
        percentile(&rates, 50.0)
    );
    Ok(())
}

fn user() -> anyhow::Result<String> {
    Ok(nix::unistd::User::from_uid(nix::unistd::getuid())?
        .map(|u| u.name)
        .unwrap_or_else(|| "root".into()))
}

async fn submit(args: &[String]) -> anyhow::Result<()> {
    let addr = arg(args, "--addr", "http://127.0.0.1:7470");
    let jobs: usize = arg(args, "--jobs", "1000").parse()?;
    let user = user()?;
    let mut client = MusterClient::connect(addr.clone()).await?;
    let mut samples = Vec::with_capacity(jobs);
    let start = Instant::now();
    for _ in 0..jobs {
        let spec = JobSpec {
            name: "bench".into(),
            tasks: 2,
            gpus_per_task: 8,
            cpu_millis_per_task: 100,
            memory_bytes_per_task: 64 << 20,
            command: vec!["sleep".into(), "600".into()],
            workdir: "/".into(),
            ..Default::default()
        };
        let t0 = Instant::now();
        client
            .submit(SubmitRequest {
                spec: Some(spec),
                user: user.clone(),
                request_id: String::new(),
                array: 0,
            })
            .await?;
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let secs = start.elapsed().as_secs_f64();
    samples.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"bench\":\"sequential_submit_rpc\",\"jobs\":{},\"per_second\":{:.1},\"median_ms\":{:.3},\"p99_ms\":{:.3}}}",
        jobs,
        jobs as f64 / secs,
        percentile(&samples, 50.0),
        percentile(&samples, 99.0)
    );
    Ok(())
}

async fn latency(args: &[String]) -> anyhow::Result<()> {
    let addr = arg(args, "--addr", "http://127.0.0.1:7470");
    let jobs: usize = arg(args, "--jobs", "200").parse()?;
    let user = user()?;
    let mut client = MusterClient::connect(addr.clone()).await?;
    let mut samples = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let spec = JobSpec {
            name: "bench".into(),
            tasks: 1,
            gpus_per_task: 1,
            cpu_millis_per_task: 100,
            memory_bytes_per_task: 64 << 20,
            command: vec!["true".into()],
            workdir: "/".into(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let id = client
            .submit(SubmitRequest {
                spec: Some(spec),
                user: user.clone(),
                request_id: String::new(),
                array: 0,
            })
            .await?
            .into_inner()
            .id;
        let deadline = t0 + Duration::from_secs(30);
        loop {
            let job = client.get_job(GetJobRequest { id }).await?.into_inner();
            let state = JobState::try_from(job.state).unwrap_or(JobState::Unspecified);
            if matches!(state, JobState::Running | JobState::Completed) || job.started_at_ms > 0 {
                samples.push(t0.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if state == JobState::Failed || Instant::now() > deadline {
                anyhow::bail!("job {id} did not start: {job:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Wait for it to finish so the next job meets an idle cluster.
        loop {
            let job = client.get_job(GetJobRequest { id }).await?.into_inner();
            let state = JobState::try_from(job.state).unwrap_or(JobState::Unspecified);
            if matches!(state, JobState::Completed | JobState::Failed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"bench\":\"submit_to_running\",\"jobs\":{},\"median_ms\":{:.2},\"p99_ms\":{:.2},\"min_ms\":{:.2},\"max_ms\":{:.2}}}",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples[0],
        samples[samples.len() - 1]
    );
    Ok(())
}
