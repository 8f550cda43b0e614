//! A real unprivileged user attacks the agent through a whole cluster
//! (issue 18, #1): a job whose checkpoint directory is a symlink to a
//! root-owned folder, or a path in `/etc`, must fail with the path in its
//! reason, and the root-owned target must be untouched. (The old agent ran
//! `mkdir -p` and `chown` on the path as root: the user got the folder.)
//! The library-level twins of these, and the file-permission checks, are in
//! `agent/tests/task_attack.rs`.

use muster_proto::muster_client::MusterClient;
use muster_proto::{JobSpec, SubmitRequest};
use muster_tests::{is_root, Cluster, ClusterSpec};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const USER: &str = "muster-agent-attack";

fn ensure_user() {
    muster_tests::ensure_user(USER).expect("the test user");
}

/// Submit, as the token's user, a job with this checkpoint directory (the
/// CLI has no flag for it; the API takes it).
fn submit(c: &Cluster, secret: &str, checkpoint_dir: &Path) -> u64 {
    let addr = c.sched_addrs[c.leader().unwrap_or(0)]
        .trim_start_matches("http://")
        .to_string();
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let mut client = MusterClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let mut req = tonic::Request::new(SubmitRequest {
            spec: Some(JobSpec {
                name: "attack".into(),
                tasks: 1,
                cpu_millis_per_task: 100,
                memory_bytes_per_task: 64 << 20,
                command: vec!["sh".into(), "-c".into(), "touch \"$1\"/pwned".into()],
                workdir: "/".into(),
                checkpoint_dir: checkpoint_dir.to_string_lossy().into_owned(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let bearer = format!("Bearer {secret}").parse().expect("header");
        req.metadata_mut().insert("authorization", bearer);
        client.submit(req).await.expect("submit").into_inner().id
    })
}

#[test]
fn a_checkpoint_dir_never_hands_a_root_folder_to_its_user() {
    if !is_root() {
        eprintln!("skipping: needs root to create a user and run its jobs (CI runs as root)");
        return;
    }
    ensure_user();
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let secret = c.issue_token(USER).expect("token").1;
    // A root-owned folder, and a symlink to it where the user may write.
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let precious = c.path("precious");
    std::fs::create_dir(&precious).unwrap();
    let scratch = c.path("scratch");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let link = scratch.join("ckpt");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let etc = PathBuf::from(format!("/etc/muster-attack-{}", std::process::id()));
    for path in [&link, &etc] {
        let job = submit(&c, &secret, path);
        let done = c.wait_state(job, "failed", T).expect("the job fails");
        assert_eq!(done["user"], USER);
        let reason = done["reason"].as_str().unwrap_or_default().to_string();
        assert!(
            reason.contains("checkpoint directory")
                && reason.contains(&*path.to_string_lossy())
                && reason.contains(USER),
            "the reason names {}: {done}",
            path.display()
        );
    }
    let m = std::fs::metadata(&precious).unwrap();
    assert_eq!(m.uid(), 0, "the root folder was given away");
    assert_eq!(m.mode() & 0o777, 0o755);
    assert!(!etc.exists(), "{} was created", etc.display());
}
