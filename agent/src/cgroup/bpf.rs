//! The cgroup v2 device filter: an eBPF program built in plain Rust, loaded and attached with
//! `bpf(2)`.
//!
//! Cgroup v2 has no devices controller. Instead the kernel runs every
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to a task's cgroup (and its ancestors, with
//! `BPF_F_ALLOW_MULTI`) when the task opens or mknods a device node; all must return 1 for
//! the access to be allowed. The program sees a `struct bpf_cgroup_dev_ctx`:
//!
//! ```text
//! u32 access_type;  // (BPF_DEVCG_ACC_{MKNOD,READ,WRITE} << 16) | BPF_DEVCG_DEV_{BLOCK,CHAR}
//! u32 major;
//! u32 minor;
//! ```
//!
//! Ours loads the device type, major and minor into r2, r4 and r5, then tests one block of
//! "jump to the next block unless it matches; return 1" per whitelisted device, and returns 0
//! at the end: deny by default. Every rule grants all access (`rwm`), so the access bits are
//! not examined. No helpers are called, so no BPF library is needed: the program is a
//! `Vec<Insn>` whose logic the tests check with a small interpreter and, as root where a
//! cgroup2 hierarchy is mounted, against the kernel itself.
//!
//! Re-creating a cgroup must replace its filter, not stack another one (stacked programs all
//! have to allow, so the old GPU set would still bind). [`install`] therefore lists the
//! programs attached to the cgroup, attaches the new one, and only then detaches the old
//! ones, so there is no moment without a filter.
//!
//! The `bpf(2)` calls are the only `unsafe` code in the agent's cgroup module: each one is a
//! small function below with its own `#[allow(unsafe_code)]` and a `SAFETY` comment.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::util::DeviceRule;
use super::CgroupError;

// bpf(2) commands, program and attach types, from <linux/bpf.h>.
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_DETACH: libc::c_int = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_int = 13;
const BPF_PROG_QUERY: libc::c_int = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;
/// `BPF_DEVCG_DEV_CHAR`: the low half of `access_type` for a character device.
pub(crate) const DEV_CHAR: u32 = 2;

// Opcodes (class | op | source), from <linux/bpf_common.h> and <linux/bpf.h>.
/// `BPF_LDX | BPF_MEM | BPF_W`: dst = *(u32 *)(src + off).
const LDX_MEM_W: u8 = 0x61;
/// `BPF_ALU | BPF_AND | BPF_K`: dst = (u32)dst & imm.
const ALU32_AND_K: u8 = 0x54;
/// `BPF_JMP | BPF_JNE | BPF_K`: if dst != imm, skip `off` instructions.
const JNE_K: u8 = 0x55;
/// `BPF_ALU64 | BPF_MOV | BPF_K`: dst = imm.
const MOV64_K: u8 = 0xb7;
/// `BPF_JMP | BPF_EXIT`: return r0.
const EXIT: u8 = 0x95;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R4: u8 = 4;
const R5: u8 = 5;

/// One eBPF instruction, laid out as the kernel's `struct bpf_insn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Insn {
    code: u8,
    /// `dst_reg:4, src_reg:4` bit fields: dst in the low nibble on little-endian targets.
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        let regs = if cfg!(target_endian = "little") {
            dst | (src << 4)
        } else {
            (dst << 4) | src
        };
        Self {
            code,
            regs,
            off,
            imm,
        }
    }

    #[cfg(test)]
    fn dst(&self) -> usize {
        usize::from(if cfg!(target_endian = "little") {
            self.regs & 0xf
        } else {
            self.regs >> 4
        })
    }

    #[cfg(test)]
    fn src(&self) -> usize {
        usize::from(if cfg!(target_endian = "little") {
            self.regs >> 4
        } else {
            self.regs & 0xf
        })
    }
}

fn jne(reg: u8, value: i32, skip: i16) -> Insn {
    Insn::new(JNE_K, reg, 0, skip, value)
}

fn ret(value: i32) -> [Insn; 2] {
    [
        Insn::new(MOV64_K, R0, 0, 0, value),
        Insn::new(EXIT, 0, 0, 0, 0),
    ]
}

/// The device program for `rules`: allow (return 1) a character device matching any rule,
/// deny (return 0) everything else.
pub(crate) fn program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut insns = vec![
        Insn::new(LDX_MEM_W, R2, R1, 0, 0),       // r2 = ctx->access_type
        Insn::new(ALU32_AND_K, R2, 0, 0, 0xffff), // r2 &= 0xffff: the device type
        Insn::new(LDX_MEM_W, R4, R1, 4, 0),       // r4 = ctx->major
        Insn::new(LDX_MEM_W, R5, R1, 8, 0),       // r5 = ctx->minor
    ];
    for rule in rules {
        // Immediates are sign-extended s32; real majors (12 bits) and minors (20 bits) fit.
        // A rule that does not fit could never match a device, so it is left out.
        let (Ok(major), Ok(minor)) = (
            i32::try_from(rule.major),
            rule.minor.map(i32::try_from).transpose(),
        ) else {
            continue;
        };
        // Each jump skips the rest of this block: the remaining tests and the `return 1`.
        let tests: i16 = if minor.is_some() { 3 } else { 2 };
        insns.push(jne(R2, DEV_CHAR as i32, tests + 1));
        insns.push(jne(R4, major, tests));
        if let Some(minor) = minor {
            insns.push(jne(R5, minor, 2));
        }
        insns.extend(ret(1));
    }
    insns.extend(ret(0));
    insns
}

/// Replaces the device filter on the cgroup directory `cgroup` with one allowing `rules`.
pub(crate) fn install(cgroup: &Path, rules: &[DeviceRule]) -> Result<(), CgroupError> {
    let fail = |op, source, log| CgroupError::Bpf {
        path: cgroup.to_owned(),
        op,
        source,
        log,
    };
    let dir = File::open(cgroup).map_err(|e| fail("open", e, String::new()))?;
    let old = prog_query(dir.as_fd()).map_err(|e| fail("BPF_PROG_QUERY", e, String::new()))?;
    let prog = prog_load(&program(rules)).map_err(|(e, log)| fail("BPF_PROG_LOAD", e, log))?;
    prog_attach(dir.as_fd(), prog.as_fd())
        .map_err(|e| fail("BPF_PROG_ATTACH", e, String::new()))?;
    for id in old {
        let old_prog = match prog_fd_by_id(id) {
            Ok(fd) => fd,
            // Detached and freed by someone else meanwhile: nothing left to do.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(fail("BPF_PROG_GET_FD_BY_ID", e, String::new())),
        };
        match prog_detach(dir.as_fd(), old_prog.as_fd()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(fail("BPF_PROG_DETACH", e, String::new())),
        }
    }
    Ok(())
}

/// The prefix of `union bpf_attr` used by `BPF_PROG_LOAD`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// The prefix of `union bpf_attr` used by `BPF_PROG_ATTACH` and `BPF_PROG_DETACH`.
#[repr(C)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// The prefix of `union bpf_attr` used by `BPF_PROG_QUERY`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// The prefix of `union bpf_attr` used by `BPF_PROG_GET_FD_BY_ID`.
#[repr(C)]
struct GetFdByIdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// Calls `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `T` must be a `#[repr(C)]` prefix of `union bpf_attr` as `cmd` reads it, and every pointer
/// stored in `attr` must be valid for the reads and writes the kernel makes for `cmd` during
/// this call. Bytes the kernel knows beyond `size_of::<T>()` are treated as zero.
#[allow(unsafe_code)]
unsafe fn sys_bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    let size = std::mem::size_of::<T>() as libc::c_uint;
    // SAFETY: `attr` is a live, exclusive reference of `size` bytes; the caller vouches for
    // the pointers inside it.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a file descriptor that a successful bpf(2) call returned.
#[allow(unsafe_code)]
fn owned_fd(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: bpf(2) returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads `insns` as a cgroup device program. On failure, returns the verifier's log too.
#[allow(unsafe_code)]
fn prog_load(insns: &[Insn]) -> Result<OwnedFd, (io::Error, String)> {
    const LICENSE: &[u8] = b"Apache-2.0\0";
    let insn_cnt = u32::try_from(insns.len())
        .map_err(|_| (io::Error::from_raw_os_error(libc::E2BIG), String::new()))?;
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        ..ProgLoadAttr::default()
    };
    // SAFETY: `insns` (insn_cnt 8-byte instructions) and the NUL-terminated license outlive
    // the call, which only reads them.
    let first = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) };
    let err = match first {
        Ok(ret) => return owned_fd(ret).map_err(|e| (e, String::new())),
        Err(err) => err,
    };
    // Load again with the verifier's log switched on, only to say why.
    let mut log = vec![0u8; 64 * 1024];
    attr.log_level = 1;
    attr.log_size = log.len() as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    // SAFETY: as above, and `log` is a writable buffer of `log_size` bytes that outlives the
    // call. A descriptor from an unexpected success is dropped (closed) at once.
    let retry = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) };
    if let Ok(ret) = retry {
        return owned_fd(ret).map_err(|e| (e, String::new()));
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).trim().to_owned();
    Err((
        err,
        if text.is_empty() {
            text
        } else {
            format!("\n{text}")
        },
    ))
}

/// Attaches `prog` to the cgroup `dir` as a device filter, alongside any others.
#[allow(unsafe_code)]
fn prog_attach(dir: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = AttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    // SAFETY: the attribute holds no pointers; both descriptors are borrowed, so open.
    unsafe { sys_bpf(BPF_PROG_ATTACH, &mut attr) }.map(drop)
}

/// Detaches the device program `prog` from the cgroup `dir`.
#[allow(unsafe_code)]
fn prog_detach(dir: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = AttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: 0,
    };
    // SAFETY: the attribute holds no pointers; both descriptors are borrowed, so open.
    unsafe { sys_bpf(BPF_PROG_DETACH, &mut attr) }.map(drop)
}

/// Ids of the device programs attached directly to the cgroup `dir`.
#[allow(unsafe_code)]
fn prog_query(dir: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = QueryAttr {
            target_fd: dir.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_DEVICE,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..QueryAttr::default()
        };
        // SAFETY: `prog_ids` points to `prog_cnt` writable u32s that outlive the call.
        match unsafe { sys_bpf(BPF_PROG_QUERY, &mut attr) } {
            Ok(_) => {
                ids.truncate(attr.prog_cnt as usize);
                return Ok(ids);
            }
            // More programs than room: the kernel said how many; grow and ask again.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOSPC) && attr.prog_cnt as usize > ids.len() =>
            {
                ids.resize(attr.prog_cnt as usize, 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// A descriptor for the loaded program with id `id`.
#[allow(unsafe_code)]
fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        prog_id: id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: the attribute holds no pointers.
    let ret = unsafe { sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }?;
    owned_fd(ret)
}

/// For the tests: how many device programs are attached directly to `cgroup`.
#[cfg(test)]
pub(crate) fn attached_count(cgroup: &Path) -> io::Result<usize> {
    prog_query(File::open(cgroup)?.as_fd()).map(|ids| ids.len())
}

#[cfg(test)]
#[path = "bpf_tests.rs"]
mod tests;
