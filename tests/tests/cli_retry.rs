//! A submission whose answer is lost is retried with its idempotency key,
//! and creates exactly one job (issue 11, #13).
//!
//! A proxy in front of the scheduler passes the first connection's request
//! through but swallows the answer and then breaks the connection: the
//! scheduler has created the job, the CLI has seen `Unknown: transport
//! error`. The CLI must retry (on a new connection, with the same key) and
//! print the id of the one job that exists.

use muster_tests::{Cluster, ClusterSpec};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Copy `from` to `to` until either closes or `until` passes; with
/// `swallow`, read `from` but write nothing.
fn pump(mut from: TcpStream, mut to: TcpStream, swallow: bool, until: Option<Instant>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if until.is_some_and(|u| Instant::now() > u) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !swallow && to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// A proxy to `target` whose first connection loses every answer and breaks
/// after a second. Returns its port and the count of connections seen.
fn lossy_proxy(target: String) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        // Bounded: the test needs a handful of connections.
        for client in listener.incoming().take(16) {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(&target) else {
                continue;
            };
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            let until = first.then(|| Instant::now() + Duration::from_secs(1));
            let (c2, s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            std::thread::spawn(move || pump(client, server, false, until));
            std::thread::spawn(move || pump(s2, c2, first, until));
        }
    });
    (port, seen)
}

#[test]
fn a_submit_whose_answer_is_lost_is_retried_and_makes_one_job() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let target = c.sched_addrs[0].trim_start_matches("http://").to_string();
    let (port, seen) = lossy_proxy(target);
    let out = std::process::Command::new(muster_tests::binary("muster"))
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .args(["--json", "submit", "--name", "once", "--", "true"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run muster");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "submit failed: {err}");
    assert!(
        seen.load(Ordering::SeqCst) >= 2,
        "the CLI did not retry on a new connection"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = v["id"].as_u64().expect("id");
    let jobs = c.json(&["queue", "--all"]).expect("queue");
    // The cluster is this test's own: every job in it is ours.
    let ids: Vec<u64> = jobs["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["id"].as_u64())
        .collect();
    assert_eq!(ids, vec![id], "exactly the one job the CLI printed: {jobs}");
}
