//! Tests of the device program: its encoding, its logic (by interpretation), and, as root with
//! a cgroup2 hierarchy, the kernel's verdict.

use super::*;
use crate::cgroup::testutil::{self, Held, TempCgroup};
use crate::cgroup::util::device_whitelist;

const BLOCK: u32 = 1;
const MKNOD: u32 = 1;
const READ: u32 = 2;
const WRITE: u32 = 4;

/// Runs `prog` the way the kernel would for one access, for the opcodes `program` emits.
/// Panics on anything the verifier would reject: unknown opcodes, backward or out-of-range
/// jumps, context reads other than aligned u32 fields through r1, falling off the end.
fn run(prog: &[Insn], dev_type: u32, access: u32, major: u32, minor: u32) -> u64 {
    let ctx = [(access << 16) | dev_type, major, minor];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    loop {
        let insn = *prog.get(pc).expect("fell off the end of the program");
        pc += 1;
        let dst = insn.dst();
        match insn.code {
            LDX_MEM_W => {
                assert_eq!(insn.src(), usize::from(R1), "loads only from the context");
                let off = usize::try_from(insn.off).expect("non-negative offset");
                assert!(off % 4 == 0 && off < 12, "bad context offset {off}");
                r[dst] = u64::from(ctx[off / 4]);
            }
            ALU32_AND_K => r[dst] = u64::from((r[dst] as u32) & (insn.imm as u32)),
            JNE_K => {
                let skip = usize::try_from(insn.off).expect("forward jumps only");
                if r[dst] != i64::from(insn.imm) as u64 {
                    pc += skip;
                }
                assert!(pc < prog.len(), "jump out of the program");
            }
            MOV64_K => r[dst] = i64::from(insn.imm) as u64,
            EXIT => return r[0],
            other => panic!("unexpected opcode {other:#x}"),
        }
    }
}

fn allowed(prog: &[Insn], major: u32, minor: u32) -> bool {
    let verdicts: Vec<u64> = [READ, WRITE, MKNOD, READ | WRITE]
        .into_iter()
        .map(|access| run(prog, DEV_CHAR, access, major, minor))
        .collect();
    assert!(
        verdicts.iter().all(|&v| v == verdicts[0]),
        "access bits changed the verdict for {major}:{minor}"
    );
    verdicts[0] == 1
}

#[test]
fn instructions_are_encoded_like_struct_bpf_insn() {
    assert_eq!(std::mem::size_of::<Insn>(), 8);
    let rules = [
        DeviceRule {
            major: 195,
            minor: Some(3),
        },
        DeviceRule {
            major: 136,
            minor: None,
        },
    ];
    let expected = vec![
        Insn::new(0x61, 2, 1, 0, 0),
        Insn::new(0x54, 2, 0, 0, 0xffff),
        Insn::new(0x61, 4, 1, 4, 0),
        Insn::new(0x61, 5, 1, 8, 0),
        // 195:3 — type, major, minor, allow.
        Insn::new(0x55, 2, 0, 4, 2),
        Insn::new(0x55, 4, 0, 3, 195),
        Insn::new(0x55, 5, 0, 2, 3),
        Insn::new(0xb7, 0, 0, 0, 1),
        Insn::new(0x95, 0, 0, 0, 0),
        // 136:* — type, major, allow.
        Insn::new(0x55, 2, 0, 3, 2),
        Insn::new(0x55, 4, 0, 2, 136),
        Insn::new(0xb7, 0, 0, 0, 1),
        Insn::new(0x95, 0, 0, 0, 0),
        // Deny by default.
        Insn::new(0xb7, 0, 0, 0, 0),
        Insn::new(0x95, 0, 0, 0, 0),
    ];
    assert_eq!(program(&rules), expected);
    if cfg!(target_endian = "little") {
        // r2 = *(u32 *)(r1 + 0): dst 2 in the low nibble, src 1 in the high one.
        assert_eq!(expected[0].regs, 0x12);
        assert_eq!(expected[2].off, 4);
    }
}

#[test]
fn program_allows_exactly_the_whitelist() {
    let prog = program(&device_whitelist(&[0, 2], Some(510)));
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 2),
        (136, 0),
        (136, 4095),
        (195, 0),
        (195, 2),
        (195, 254),
        (195, 255),
        (510, 0),
        (510, 1),
    ] {
        assert!(allowed(&prog, major, minor), "{major}:{minor} denied");
    }
    for (major, minor) in [
        (195, 1), // another task's GPU
        (195, 3),
        (195, 253),
        (1, 1), // /dev/mem
        (1, 4), // /dev/port
        (1, 2),
        (5, 1), // /dev/console
        (4, 0),
        (510, 2),
        (10, 200),
        (0, 0),
    ] {
        assert!(!allowed(&prog, major, minor), "{major}:{minor} allowed");
    }
    // A block device with a whitelisted number is still denied.
    assert_eq!(run(&prog, BLOCK, READ, 1, 3), 0);
    assert_eq!(run(&prog, BLOCK, READ, 195, 0), 0);
}

#[test]
fn no_rules_deny_everything() {
    let prog = program(&[]);
    assert_eq!(prog.len(), 6);
    assert!(!allowed(&prog, 1, 3));
}

fn mknod_char(dir: &Path, name: &str, major: u64, minor: u64) -> String {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let path = dir.join(name);
    mknod(
        &path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(major, minor),
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
    path.to_str().expect("utf-8 temp path").to_owned()
}

/// Runs `cat` on each node from inside `cgroup` and returns its stderr.
fn cat_in(cgroup: &Path, nodes: &[&str]) -> String {
    let script = nodes
        .iter()
        .map(|n| format!("cat '{n}'"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut held = Held::spawn(&script, true);
    held.join_and_release(&[cgroup.join("cgroup.procs")]);
    String::from_utf8_lossy(&held.output().stderr).into_owned()
}

/// The kernel accepts the program and enforces it: a node for a GPU the cgroup was not given
/// fails with EPERM, one it was given reaches the (absent) driver and fails with ENXIO; and
/// re-installing swaps the filter instead of stacking a second one.
#[test]
fn kernel_enforces_and_replaces_the_filter() {
    let Some(mount) = testutil::cgroup2_mount("kernel_enforces_and_replaces_the_filter") else {
        return;
    };
    let cg = TempCgroup::new(&mount.join("muster-test"), &testutil::unique("bpf"));
    let nodes = tempfile::tempdir().expect("tempdir");
    let nv3 = mknod_char(nodes.path(), "nvidia3", 195, 3);
    let nv7 = mknod_char(nodes.path(), "nvidia7", 195, 7);
    let denied = "Operation not permitted";
    let no_driver = "No such device or address";

    install(&cg.path, &device_whitelist(&[3], None)).expect("install filter");
    assert_eq!(attached_count(&cg.path).expect("query"), 1);
    let err = cat_in(&cg.path, &[&nv3, &nv7]);
    assert!(err.contains(&format!("{nv3}: {no_driver}")), "{err}");
    assert!(err.contains(&format!("{nv7}: {denied}")), "{err}");

    install(&cg.path, &device_whitelist(&[7], None)).expect("reinstall filter");
    assert_eq!(attached_count(&cg.path).expect("query"), 1);
    let err = cat_in(&cg.path, &[&nv3, &nv7]);
    assert!(err.contains(&format!("{nv3}: {denied}")), "{err}");
    assert!(err.contains(&format!("{nv7}: {no_driver}")), "{err}");
}
