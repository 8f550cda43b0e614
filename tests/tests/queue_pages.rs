//! A deep queue stays readable and bounded per user (issue 18, #6): one
//! user's 100,000-element array had made `muster queue` fail for everyone
//! ("decoded message length too large"). Lists now come in pages the CLI
//! walks, and each user has a cap on unfinished jobs.

use muster_tests::{Cluster, ClusterSpec};
use std::time::Duration;

#[test]
fn the_queue_pages_through_thousands_of_jobs_and_users_are_capped() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        gpus_per_agent: 4,
        scheduler_toml: "[limits]\nmax_jobs_per_user = 2600\nsubmit_burst = 1000\n",
        ..ClusterSpec::default()
    })
    .expect("cluster");
    // A token user: cluster admins (root here) are exempt from the cap.
    let tok = c.path("u.token");
    let tok_s = tok.to_string_lossy().into_owned();
    c.json(&[
        "admin", "token", "issue", "--user", "root-ish", "--out", &tok_s,
    ])
    .expect("token");
    let as_user = |args: &[&str]| {
        let mut a = vec!["--token-file", tok_s.as_str()];
        a.extend_from_slice(args);
        c.muster(&a).expect("run muster")
    };
    // Queued, not run: each element wants more GPUs than are free while the
    // first one holds them.
    let busy = c
        .submit(&["--gpus", "4", "--", "sleep", "300"])
        .expect("busy");
    c.wait_state(busy, "running", Duration::from_secs(30))
        .expect("running");
    let out = as_user(&["submit", "--array", "2500", "--gpus", "4", "--", "true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queue = c.json(&["queue"]).expect("queue");
    let jobs = queue["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 2501, "every job, over three pages");
    let mut ids: Vec<u64> = jobs.iter().filter_map(|j| j["id"].as_u64()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 2501, "each job once");
    // 2500 unfinished + 200 > 2600: refused whole, naming the limit.
    let out = as_user(&["submit", "--array", "200", "--gpus", "4", "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "over the cap");
    assert!(err.contains("max_jobs_per_user"), "{err}");
    let after = c.json(&["queue"]).expect("queue");
    assert_eq!(
        after["jobs"].as_array().map(Vec::len),
        Some(2501),
        "nothing half-made"
    );
}
