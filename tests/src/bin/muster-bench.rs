//! `muster-bench`: measurements against a running cluster (normally
//! `muster dev`). Prints one JSON object per run; BENCHMARKS.md records the
//! figures with the exact commands.
//!
//!   muster-bench latency [--addr URL] [--jobs 200]
//!     Submit-to-running latency of 1-GPU jobs on an idle cluster, one job at
//!     a time: from just before the Submit RPC until GetJob first shows the job
//!     running (or already finished), polled every millisecond.
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
        _ => {
            eprintln!("usage: muster-bench latency|submit [--addr URL] [--jobs N]");
            std::process::exit(2);
        }
    }
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
