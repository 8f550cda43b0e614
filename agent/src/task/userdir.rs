//! Folders made on a user's behalf: a task's checkpoint directory.
//!
//! The agent and the shim run as root, and the path a job names is the
//! user's to choose: `/etc/cron.d`, or a symlink in their home to a root
//! folder. Root must never create, open or chown such a path: `mkdir -p`
//! and `chown` as root would hand `/etc/...` to the user. So there are two
//! ways a checkpoint directory is made, both in the shim before the task
//! starts, and a failure of either fails the task with a message naming
//! the path:
//!
//! * **as the user** (the ordinary case): the shim takes the user's
//!   filesystem identity (`setfsuid`/`setfsgid` and their groups; the
//!   kernel drops root's file capabilities with it), creates the folder as
//!   the user would with `mkdir -p`, and checks that the user may write and
//!   enter it; then it takes its own identity back. What the user could not
//!   do themselves fails, and a symlink is followed only with the user's
//!   rights.
//! * **as root, inside the scheduler's `checkpoint_root`**: the scheduler's
//!   default `<checkpoint_root>/<job id>` lies in a folder users usually may
//!   not create in. When the (authenticated) scheduler says the directory is
//!   that default, the shim creates the one last component as root, opens it
//!   with `O_NOFOLLOW | O_DIRECTORY` and changes the owner of the opened
//!   descriptor (`fchown`), so a symlink planted there is never followed and
//!   a folder another user owns is refused.

use nix::unistd::{Gid, Uid};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path};

/// Whom a folder is made for.
#[derive(Debug, Clone)]
pub struct Owner<'a> {
    pub name: &'a str,
    pub uid: u32,
    pub gid: u32,
    pub groups: &'a [u32],
}

/// Make `dir` ready for a task of `who` (`None`: the shim's own identity,
/// for an unprivileged agent or a root job). `root` is the scheduler's
/// `checkpoint_root` when `dir` is its default; see the module docs.
pub fn prepare(dir: &Path, root: Option<&Path>, who: Option<&Owner<'_>>) -> Result<(), String> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    let shown = dir.display();
    let Some(who) = who else {
        return std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {shown}: {e}"));
    };
    if let Some(name) = root.and_then(|r| child_of(dir, r)) {
        if let Some(root) = root {
            return under_root(root, name, who).map_err(|e| format!("{shown}: {e}"));
        }
    }
    let made = as_user(who, || {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create it: {e}"))?;
        let flags = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
        nix::unistd::faccessat(None, dir, flags, nix::fcntl::AtFlags::AT_EACCESS)
            .map_err(|e| format!("not a folder it may write to: {e}"))
    })?;
    made.map_err(|e| format!("{shown}: as user {}: {e}", who.name))
}

/// The single normal last component of `dir` when its parent is `root`.
fn child_of<'p>(dir: &'p Path, root: &Path) -> Option<&'p std::ffi::OsStr> {
    let rest = dir.strip_prefix(root).ok()?;
    let mut parts = rest.components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(name)), None) => Some(name),
        _ => None,
    }
}

/// Create `<root>/<name>` as root and give it to `who`, never following a
/// symlink at `name`; an existing folder must be root's (then it is given to
/// the user) or the user's already.
fn under_root(root: &Path, name: &std::ffi::OsStr, who: &Owner<'_>) -> Result<(), String> {
    make_root(root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let path = root.join(name);
    match std::fs::DirBuilder::new().mode(0o700).create(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create it: {e}")),
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(&path)
        .map_err(|e| format!("cannot open it as a folder (symlinks are refused): {e}"))?;
    let meta = dir.metadata().map_err(|e| format!("cannot stat it: {e}"))?;
    use std::os::unix::fs::MetadataExt;
    if meta.uid() == who.uid {
        return Ok(());
    }
    if meta.uid() != 0 {
        return Err(format!(
            "it exists and belongs to uid {}, not to {}",
            meta.uid(),
            who.name
        ));
    }
    std::os::unix::fs::fchown(&dir, Some(who.uid), Some(who.gid))
        .map_err(|e| format!("cannot give it to {}: {e}", who.name))
}

/// Create the operator's `root` (and missing parents) if needed, each new
/// level 0755 so that users reach their folders below it (the agent's own
/// umask would make them 0700).
fn make_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let missing: Vec<&Path> = root.ancestors().take_while(|p| !p.exists()).collect();
    for level in missing.into_iter().rev() {
        match std::fs::create_dir(level) {
            Ok(()) => std::fs::set_permissions(level, std::fs::Permissions::from_mode(0o755))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Run `f` with `who`'s filesystem identity (see the module docs). Only for
/// a single-threaded process: the groups are the whole process's.
fn as_user<T>(who: &Owner<'_>, f: impl FnOnce() -> T) -> Result<T, String> {
    let fail = |what: &str, e: nix::Error| {
        format!("cannot take the identity of {}: {what}: {e}", who.name)
    };
    let saved = nix::unistd::getgroups().map_err(|e| fail("getgroups", e))?;
    let groups: Vec<Gid> = who.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&groups).map_err(|e| fail("setgroups", e))?;
    let old_gid = nix::unistd::setfsgid(Gid::from_raw(who.gid));
    let old_uid = nix::unistd::setfsuid(Uid::from_raw(who.uid));
    // setfs*id return the previous value whether or not they succeeded:
    // asking again tells whether the switch took.
    let took = nix::unistd::setfsuid(Uid::from_raw(who.uid)) == Uid::from_raw(who.uid)
        && nix::unistd::setfsgid(Gid::from_raw(who.gid)) == Gid::from_raw(who.gid);
    let out = took.then(f);
    nix::unistd::setfsuid(old_uid);
    nix::unistd::setfsgid(old_gid);
    let restored = nix::unistd::setgroups(&saved);
    let out = out.ok_or_else(|| format!("cannot take the filesystem identity of {}", who.name))?;
    restored.map_err(|e| fail("restoring the groups", e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn owner(uid: u32) -> Owner<'static> {
        Owner {
            name: "someone",
            uid,
            gid: uid,
            groups: &[],
        }
    }

    #[test]
    fn only_a_direct_child_of_the_root_counts() {
        let root = Path::new("/ckpt");
        assert_eq!(child_of(Path::new("/ckpt/12"), root), Some("12".as_ref()));
        assert_eq!(child_of(Path::new("/ckpt/12/x"), root), None);
        assert_eq!(child_of(Path::new("/ckpt/../etc"), root), None);
        assert_eq!(child_of(Path::new("/ckpt"), root), None);
        assert_eq!(child_of(Path::new("/other/12"), root), None);
    }

    #[test]
    fn root_side_creation_never_follows_a_symlink() {
        if !Uid::effective().is_root() {
            println!("skipped: needs root to give folders away");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("ckpt");
        let target = tmp.path().join("precious");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&target).unwrap();
        // A fresh folder is made and given away.
        prepare(&root.join("1"), Some(&root), Some(&owner(54321))).unwrap();
        let m = std::fs::metadata(root.join("1")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (54321, 54321, 0o700));
        // A missing root is made, open to users below it.
        let deep = tmp.path().join("a/b");
        prepare(&deep.join("9"), Some(&deep), Some(&owner(54321))).unwrap();
        for p in [tmp.path().join("a"), deep.clone()] {
            assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o755);
        }
        // Again: it is the user's already.
        prepare(&root.join("1"), Some(&root), Some(&owner(54321))).unwrap();
        // Another user's folder is refused.
        let e = prepare(&root.join("1"), Some(&root), Some(&owner(54322))).unwrap_err();
        assert!(
            e.contains("belongs to uid 54321") && e.contains("/ckpt/1"),
            "{e}"
        );
        // A planted symlink is refused and its target untouched.
        std::os::unix::fs::symlink(&target, root.join("2")).unwrap();
        let e = prepare(&root.join("2"), Some(&root), Some(&owner(54321))).unwrap_err();
        assert!(e.contains("symlinks are refused"), "{e}");
        assert_eq!(std::fs::metadata(&target).unwrap().uid(), 0);
    }
}
