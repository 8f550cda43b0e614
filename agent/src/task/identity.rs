//! Who a task runs as: the submitting user, looked up on this host.
//!
//! A root agent switches to the user (supplementary groups, gid, uid). An
//! unprivileged agent (a laptop's `muster dev`) can only run tasks as itself
//! and refuses jobs of other users. A job's user is the one the scheduler
//! authenticated (a token, a client certificate, or the uid of a local
//! caller), never a name the request claims; a job whose user is root still
//! runs only where the configuration allows it explicitly.

use nix::unistd::{Gid, Uid, User};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Whether the shim must switch identity (we are root, the user is not us).
    pub switch: bool,
}

/// Resolve `user` and check that this agent may run a task as them.
pub fn resolve(user: &str, allow_root: bool) -> Result<Who, String> {
    let u = User::from_name(user)
        .map_err(|e| format!("cannot look up user {user:?}: {e}"))?
        .ok_or_else(|| format!("user {user:?} does not exist on this node"))?;
    if u.uid.is_root() && !allow_root {
        return Err(format!(
            "refusing to run a job as {user:?} (uid 0): set allow_root_jobs = true in the \
             agent's config to allow it"
        ));
    }
    let me = Uid::effective();
    let switch = me.is_root() && u.uid != me;
    if !me.is_root() && u.uid != me {
        return Err(format!(
            "this agent runs unprivileged (uid {me}) and cannot run jobs as {user:?}"
        ));
    }
    let groups = if switch {
        let cname = std::ffi::CString::new(user).map_err(|_| "user name has a NUL byte")?;
        nix::unistd::getgrouplist(&cname, u.gid)
            .map_err(|e| format!("cannot list the groups of {user:?}: {e}"))?
            .into_iter()
            .map(Gid::as_raw)
            .collect()
    } else {
        vec![]
    };
    Ok(Who {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        groups,
        home: u.dir,
        shell: u.shell,
        switch,
    })
}

/// The system directories, then the one holding the agent (and, as
/// installed, `muster`), so that `muster checkpoint done` works in a task
/// wherever the daemons were installed (`target/release` under `muster dev`).
fn default_path() -> String {
    let system = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    let own = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    match own {
        Some(dir) if !system.split(':').any(|d| Path::new(d) == dir) => {
            format!("{system}:{}", dir.display())
        }
        _ => system.to_string(),
    }
}

/// The login-like variables every task gets unless the job set them.
pub fn base_env(env: &mut BTreeMap<String, String>, who: &Who) {
    let defaults = [
        ("USER", who.name.clone()),
        ("LOGNAME", who.name.clone()),
        ("HOME", who.home.to_string_lossy().into_owned()),
        ("SHELL", who.shell.to_string_lossy().into_owned()),
        ("PATH", default_path()),
    ];
    for (k, v) in defaults {
        env.entry(k.to_string()).or_insert(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_find_muster_beside_the_agent() {
        let me = resolve(&current_name(), true).expect("me");
        let mut env = BTreeMap::new();
        base_env(&mut env, &me);
        let exe_dir = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        assert!(
            env["PATH"].split(':').any(|d| Path::new(d) == exe_dir),
            "{}",
            env["PATH"]
        );
        assert!(env["PATH"].starts_with("/usr/local/sbin:"), "system first");
    }

    fn current_name() -> String {
        User::from_uid(Uid::effective()).unwrap().unwrap().name
    }

    #[test]
    fn unknown_user_is_named() {
        let e = resolve("no-such-user-muster", true).unwrap_err();
        assert!(e.contains("no-such-user-muster"), "{e}");
    }

    #[test]
    fn root_refused_unless_allowed() {
        let e = resolve("root", false).unwrap_err();
        assert!(e.contains("allow_root_jobs"), "{e}");
        if Uid::effective().is_root() {
            let who = resolve("root", true).unwrap();
            assert!(!who.switch);
        }
    }

    #[test]
    fn root_agent_switches_to_other_users() {
        if !Uid::effective().is_root() {
            println!("skipped: needs root to switch users");
            return;
        }
        let who = resolve("nobody", false).unwrap();
        assert!(who.switch);
        assert_ne!(who.uid, 0);
    }

    #[test]
    fn base_env_keeps_job_values() {
        let who = Who {
            name: "u".into(),
            uid: 1,
            gid: 1,
            groups: vec![],
            home: "/h".into(),
            shell: "/bin/sh".into(),
            switch: false,
        };
        let mut env = BTreeMap::from([("PATH".to_string(), "/opt/bin".to_string())]);
        base_env(&mut env, &who);
        assert_eq!(env["PATH"], "/opt/bin");
        assert_eq!(env["HOME"], "/h");
    }
}
