//! A revoked certificate is refused without a restart (issue 18, #16): an
//! operator adds the serial `muster admin cert issue` printed to the
//! schedulers' `[tls] revoked` file, and the next request with it fails.

use muster_tests::{binary, wait_for, Cluster, ClusterSpec};
use std::time::Duration;

#[test]
fn a_revoked_user_certificate_is_refused_on_the_next_request() {
    let c = Cluster::start(ClusterSpec {
        agents: 1,
        tls: true,
        ..ClusterSpec::default()
    })
    .expect("cluster");
    let pki = c.path("pki");
    let dir = pki.to_string_lossy().into_owned();
    let out = std::process::Command::new(binary("muster"))
        .args([
            "--json", "admin", "cert", "issue", "--user", "mallory", "--dir", &dir,
        ])
        .output()
        .expect("issue");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issued: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let serial = issued["serial"].as_str().expect("serial").to_string();
    let cfg = c.path("mallory.toml");
    std::fs::write(&cfg, c.tls_toml("user", "mallory")).expect("config");
    let whoami = || {
        std::process::Command::new(binary("muster"))
            .arg("--config")
            .arg(&cfg)
            .args(["--addr", &c.addr, "--json", "whoami"])
            .output()
            .expect("run muster")
    };
    let ok = whoami();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let who: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(who["user"], "mallory");
    // Revoked: a note, the serial written with a prefix as people do.
    std::fs::write(pki.join("revoked"), format!("# lost laptop\n0x{serial}\n")).expect("revoke");
    let refused = wait_for(
        "the revocation to take effect",
        Duration::from_secs(10),
        || {
            let out = whoami();
            (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
        },
    )
    .expect("refused");
    assert!(refused.contains("revoked"), "{refused}");
    // Other certificates still work: the CLI's own (user:root).
    assert!(c.ok(&["whoami"]).is_ok());
}
