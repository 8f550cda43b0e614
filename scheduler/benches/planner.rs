//! One full planning pass at cluster scale: 10,000 nodes × 8 GPUs, 100,000
//! pending jobs from 1 GPU to 8 × 8-GPU gangs, 50 tenants in 3 levels.
//!
//! Run: `cargo bench -p muster-scheduler --bench planner`. Besides
//! criterion's timing it prints placements per pass, placements per second
//! and the process's peak resident memory (VmHWM) once.

use criterion::{criterion_group, criterion_main, Criterion};
use muster_scheduler::model::{GpuRecord, JobSpec, Resources, Tenant};
use muster_scheduler::planner::{plan, Policy};
use muster_scheduler::state::{Command, NodeRegistration, State};
use std::time::{Duration, Instant};

const NODES: usize = 10_000;
const JOBS: usize = 100_000;
const NOW: i64 = 1_800_000_000_000;

/// A small deterministic generator (no dependency, same cluster every run).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn tenants() -> Vec<Tenant> {
    let mut out = Vec::new();
    for o in 0..5 {
        let org = format!("org{o}");
        out.push(Tenant {
            guarantee_gpus: 12_000,
            gpu_limit: Some(40_000),
            weight: 1 + o,
            ..Tenant::open(&org)
        });
        for t in 0..3 {
            let team = format!("{org}/team{t}");
            out.push(Tenant {
                guarantee_gpus: 4_000,
                weight: 1 + t,
                ..Tenant::open(&team)
            });
            for s in 0..2 {
                out.push(Tenant {
                    guarantee_gpus: 2_000,
                    gpu_limit: Some(12_000),
                    ..Tenant::open(&format!("{team}/sub{s}"))
                });
            }
        }
    }
    out
}

fn cluster() -> State {
    let mut s = State::new();
    for n in 0..NODES {
        let name = format!("node{n:05}");
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("block".to_string(), format!("b{}", n / 32));
        let gpus = (0..8)
            .map(|i| GpuRecord {
                index: i,
                uuid: format!("GPU-{n}-{i}"),
                model: "H100".into(),
                memory_bytes: 80 << 30,
                minor: i,
                pci_bus_id: String::new(),
                numa_node: (i / 4) as i32,
                healthy: true,
                link_group: i / 4,
                fault: String::new(),
            })
            .collect();
        s.apply(&Command::RegisterNode {
            node: NodeRegistration {
                name: name.clone(),
                address: format!("{name}:7471"),
                gpus,
                cpu_millis: 128_000,
                memory_bytes: 2 << 40,
                labels,
                log_key: vec![0; 32],
            },
            running: vec![],
            at_ms: 0,
        });
    }
    let ts = tenants();
    for t in &ts {
        s.apply(&Command::CreateTenant {
            tenant: Box::new(t.clone()),
            default_for: vec![],
        });
    }
    let mut rng = Lcg(42);
    let classes = ["low", "normal", "normal", "high"];
    for i in 0..JOBS {
        let (tasks, gpus) = match rng.next() % 100 {
            0..=39 => (1, 1),
            40..=54 => (1, 2),
            55..=69 => (1, 4),
            70..=84 => (1, 8),
            85..=92 => (2, 8),
            93..=97 => (4, 8),
            _ => (8, 8),
        };
        let tenant = &ts[(rng.next() % ts.len() as u64) as usize].name;
        let spec = JobSpec {
            name: format!("j{i}"),
            tenant: tenant.clone(),
            tasks,
            per_task: Resources {
                gpus,
                cpu_millis: 4_000 * gpus,
                memory_bytes: (32u64 << 30) * u64::from(gpus),
            },
            time_limit_secs: Some(3600 * (1 + rng.next() % 24)),
            command: vec!["train".into()],
            env: Default::default(),
            workdir: "/".into(),
            checkpoint_dir: None,
            priority: classes[(rng.next() % 4) as usize].into(),
            topology: None,
            lifecycle: Default::default(),
        };
        s.apply(&Command::Submit {
            request_id: None,
            spec,
            user: "u".into(),
            at_ms: i as i64,
        });
    }
    assert_eq!(s.pending.len(), JOBS);
    s
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn full_pass(c: &mut Criterion) {
    let state = cluster();
    let policy = Policy::default();
    let before = peak_rss_mib();
    let t0 = Instant::now();
    let order = muster_scheduler::planner::queue_order(&state, &policy);
    eprintln!(
        "queue order of {} jobs: {:.1} ms",
        order.len(),
        t0.elapsed().as_secs_f64() * 1000.0
    );
    let t0 = Instant::now();
    let p = plan(&state, &policy, NOW);
    let dt = t0.elapsed();
    eprintln!(
        "planner pass: {} placements, {} reservations, {} verdicts in {:.1} ms \
         ({:.0} placements/s); peak RSS {} MiB (state built: {} MiB)",
        p.placements.len(),
        p.reservations.len(),
        p.verdicts.len(),
        dt.as_secs_f64() * 1000.0,
        p.placements.len() as f64 / dt.as_secs_f64(),
        peak_rss_mib(),
        before,
    );
    let mut g = c.benchmark_group("planner");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("full_pass_10k_nodes_100k_jobs", |b| {
        b.iter(|| plan(&state, &policy, NOW))
    });
    g.finish();
}

criterion_group!(benches, full_pass);
criterion_main!(benches);
