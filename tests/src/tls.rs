//! The harness's opt-in mutual-TLS mode ([`ClusterSpec::tls`]): a CA and
//! certificates made with the real `muster admin ca init` / `cert issue`.

use crate::{binary, Cluster};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::Command;

#[cfg(doc)]
use crate::ClusterSpec;

impl Cluster {
    /// Make the cluster's CA and certificates with the real CLI: one per
    /// scheduler (`node:sched-I`), per agent (`agent:node-I`) and `user:root`
    /// for the CLI, whose config file gets the `[tls]` table.
    pub(crate) fn make_pki(&self, schedulers: usize) -> Result<()> {
        let pki = self.path("pki");
        let dir = pki.to_string_lossy().into_owned();
        self.offline(&["admin", "ca", "init", "--dir", &dir])?;
        for i in 0..schedulers + 2 {
            self.offline(&[
                "admin",
                "cert",
                "issue",
                "--node",
                &format!("sched-{i}"),
                "--dir",
                &dir,
            ])?;
        }
        for i in 0..self.spec.agents + 2 {
            let name = self.node_name(i);
            self.offline(&["admin", "cert", "issue", "--agent", &name, "--dir", &dir])?;
        }
        self.offline(&["admin", "cert", "issue", "--user", "root", "--dir", &dir])?;
        std::fs::write(self.path("cli.toml"), self.tls_toml("user", "root"))?;
        Ok(())
    }

    fn offline(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(binary("muster")).args(args).output()?;
        if !out.status.success() {
            bail!("muster {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The `[tls]` table for the certificate `<kind>-<name>` (empty without
    /// TLS); a scheduler's also names `pki/revoked`, the revocation list.
    pub fn tls_toml(&self, kind: &str, name: &str) -> String {
        if !self.spec.tls {
            return String::new();
        }
        let pki = self.path("pki");
        let mut t = format!(
            "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.join("ca.pem").display(),
            pki.join(format!("{kind}-{name}.pem")).display(),
            pki.join(format!("{kind}-{name}-key.pem")).display()
        );
        if kind == "node" {
            // Schedulers read revoked serials from here (absent: none).
            t.push_str(&format!(
                "revoked = \"{}\"\n",
                pki.join("revoked").display()
            ));
        }
        t
    }

    /// The CLI's config file in TLS mode (`--config` is passed to every call).
    pub fn cli_config(&self) -> Option<PathBuf> {
        self.spec.tls.then(|| self.path("cli.toml"))
    }

    /// Start one more agent (index `spec.agents + k`) whose config ends with
    /// `tls_toml` instead of its own certificate; returns its index.
    pub fn start_extra_agent(&mut self, tls_toml: &str) -> Result<usize> {
        let i = self.agents.len();
        self.write_agent_config_with(i, tls_toml)?;
        self.agents.push(None);
        self.start_agent(i)?;
        Ok(i)
    }
}
