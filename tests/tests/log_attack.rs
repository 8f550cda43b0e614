//! Task output is readable only by whom the scheduler allows (issue 18, #2).
//!
//! An agent serves logs on a port anyone can reach, and `muster nodes` tells
//! every user where agents listen. The attack here is the one a local user
//! made: ask the agent directly for another user's job output, with no
//! ticket, with a forged one, and with a real ticket for a job of their own.
//! Each must be refused, and the owner must still read their logs.

use muster_proto::agent_local_client::AgentLocalClient;
use muster_proto::muster_client::MusterClient;
use muster_proto::{LogAccessRequest, LogRequest, LogTicket};
use muster_tests::{is_root, Cluster, ClusterSpec};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const SECRET: &str = "alice-secret-7f3a";
/// Real local users (jobs run as their users): created if missing.
const ALICE: &str = "muster-log-alice";
const MALLORY: &str = "muster-log-mallory";

fn submit_as(c: &Cluster, tok: &std::path::Path, args: &[&str]) -> u64 {
    let mut a = vec!["--json", "submit"];
    a.extend_from_slice(args);
    let out = c.muster_with_token(tok, &a);
    assert!(
        out.status.success(),
        "submit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["id"].as_u64().expect("id")
}

/// Read a whole log stream straight from the agent.
async fn read(addr: &str, req: LogRequest) -> Result<String, tonic::Status> {
    let mut agent = AgentLocalClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut stream = agent.read_logs(req).await?.into_inner();
    let mut text = String::new();
    while let Some(chunk) = stream.message().await? {
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    Ok(text)
}

fn request(job: u64, ticket: Option<LogTicket>) -> LogRequest {
    LogRequest {
        job_id: job,
        task_index: 0,
        streams: vec![],
        follow: false,
        ticket,
    }
}

/// A ticket from the scheduler, asked with `secret` as the bearer token.
async fn ticket_for(addr: &str, secret: &str, job: u64) -> Result<LogTicket, tonic::Status> {
    let mut client = MusterClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(LogAccessRequest {
        job_id: job,
        task_index: 0,
    });
    let bearer = format!("Bearer {secret}").parse().expect("header");
    req.metadata_mut().insert("authorization", bearer);
    let r = client.log_access(req).await?.into_inner();
    Ok(r.ticket.expect("a ticket"))
}

#[test]
fn another_users_output_is_refused_at_every_door() {
    if !is_root() {
        eprintln!("skipping: jobs of two real users need root to create them (CI runs as root)");
        return;
    }
    muster_tests::ensure_user(ALICE).expect("user");
    muster_tests::ensure_user(MALLORY).expect("user");
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let (alice, _) = c.issue_token(ALICE).expect("token");
    let (mallory, mallory_secret) = c.issue_token(MALLORY).expect("token");
    let job = submit_as(&c, &alice, &["--", "sh", "-c", &format!("echo {SECRET}")]);
    let own = submit_as(&c, &mallory, &["--", "true"]);
    c.wait_state(job, "completed", T).expect("alice's job");
    c.wait_state(own, "completed", T).expect("mallory's job");

    // The owner reads her output through the CLI.
    let out = c.muster_with_token(&alice, &["logs", &job.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(SECRET));

    // Mallory through the CLI: refused, and told why (not "unplaced").
    let out = c.muster_with_token(&mallory, &["logs", &job.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mallory read alice's logs");
    assert!(err.contains("belongs to another user"), "{err}");
    assert!(!err.contains("not been placed"), "{err}");

    // Mallory straight at the agent, whose address `muster nodes` shows.
    let nodes = c.muster_with_token(&mallory, &["--json", "nodes"]);
    let nodes: serde_json::Value = serde_json::from_slice(&nodes.stdout).expect("nodes json");
    let agent = nodes["nodes"][0]["address"]
        .as_str()
        .expect("address")
        .to_string();
    let sched = c.sched_addrs[0].trim_start_matches("http://").to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // No ticket.
        let e = read(&agent, request(job, None))
            .await
            .expect_err("no ticket");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        // A real ticket for her own job, replayed for alice's.
        let mine = ticket_for(&sched, &mallory_secret, own)
            .await
            .expect("own ticket");
        assert!(read(&agent, request(own, Some(mine.clone()))).await.is_ok());
        let e = read(&agent, request(job, Some(mine.clone())))
            .await
            .expect_err("replayed ticket");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        // The same ticket with the job id changed: the signature breaks.
        let forged = LogTicket {
            job_id: job,
            ..mine
        };
        let e = read(&agent, request(job, Some(forged)))
            .await
            .expect_err("forged ticket");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
        assert!(e.message().contains("signature"), "{e}");
        // And the scheduler will not sign one for alice's job.
        let e = ticket_for(&sched, &mallory_secret, job)
            .await
            .expect_err("no ticket for alice's job");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    });
}
