//! Writes the seed corpus (`fuzz/corpus/<target>/seed-*`) from meaningful inputs built with the
//! harnesses' own input format, then replays every file of the corpus (seeds and regressions)
//! through the harnesses without libFuzzer. `cargo run --release --example seeds` in `fuzz/`.

use std::path::Path;

use smudge_core::abi::*;
use smudge_fuzz::{ept_ops, vm_ops, Builder};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// gpa selector: inside slot `i` at byte offset `off` (kind 1 of `vm_ops`).
fn in_slot(b: Builder, slot_pos: u64, off: u64) -> Builder {
    b.u8(1).u64((off << 8) | slot_pos)
}
fn raw(b: Builder, v: u64) -> Builder {
    b.u8(0).u64(v)
}

fn vm_header(mode: u8, limit: u32) -> Builder {
    use vm_ops::feat::*;
    Builder::new()
        .u8(mode)
        .u8(AD | LARGE_2M | LARGE_1G | EXEC_ONLY | AD_FOR_WP)
        .u32(limit)
}

fn minimal_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
    smudge_tests::elf::minimal(paddr, code, code.len() as u64 + 8192)
}

fn vm_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use vm_ops::op::*;
    let mut v = Vec::new();
    for (name, mode) in [("ad", 0u8), ("pml", 1), ("wp", 2)] {
        // RAM, guest writes, harvest, more writes, get, clear half, harvest again, remove.
        let mut b = vm_header(mode, 1 << 16).u8(ADD_RAM).u16(8);
        b = in_slot(b.u8(CPU_WRITES), 0, 0x10_0000).u8(200);
        b = in_slot(b.u8(CPU_ACCESS), 0, 0x20_0123).u8(0);
        b = b.u8(HARVEST).u8(0).u8(1);
        b = in_slot(b.u8(CPU_WRITES), 0, 0x10_8000).u8(70);
        b = b.u8(GET_LOG).u8(0).u8(1);
        b = b
            .u8(CLEAR_LOG)
            .u8(0)
            .u8(0b100)
            .u32(4)
            .u32(2)
            .u64(0x5555_5555_5555_5555)
            .u8(1);
        b = b.u8(HARVEST).u8(0).u8(1).u8(INVEPT);
        b = in_slot(b.u8(WRITE_GUEST), 0, 0x3_0ff0).u32(0x3000).u8(0x5a);
        b = in_slot(b.u8(READ_GUEST), 0, 0x3_0000).u32(0x5000);
        b = b.u8(REMOVE_SLOT).u8(0).u8(INVEPT);
        v.push((
            Box::leak(format!("ram-writes-harvest-{name}").into_boxed_str()) as &str,
            b.0,
        ));
    }
    // PML log filling up (more than 512 first writes between kicks) with a second slot.
    let mut b = vm_header(1, 1 << 20)
        .u8(ADD_SLOT)
        .u8(1)
        .u64(0x10_0000)
        .u8(3)
        .u64(3);
    for i in 0..3u64 {
        b = in_slot(b.u8(CPU_WRITES), 0, i * 255 * 4096).u8(255);
    }
    b = b.u8(GET_LOG).u8(0).u8(1).u8(HARVEST).u8(0).u8(1);
    v.push(("pml-full", b.0));
    // Two slots, a slot straddling a 1 GiB boundary, an MMIO violation, a removal and re-add.
    let mut b = vm_header(2, 1 << 16)
        .u8(ADD_SLOT)
        .u8(1)
        .u64((GIB - 2 * MIB) >> 12)
        .u8(3)
        .u64(1)
        .u8(ADD_SLOT)
        .u8(3)
        .u64(0x0000)
        .u8(2)
        .u64(15);
    b = in_slot(b.u8(VIOLATION), 0, 0x1ff_000).u8(2);
    b = in_slot(b.u8(VIOLATION), 1, 0x3_000).u8(1);
    b = raw(b.u8(VIOLATION), 0xfee0_0000).u8(2);
    b = b
        .u8(REMOVE_SLOT)
        .u8(0)
        .u8(ADD_SLOT)
        .u8(1)
        .u64((GIB - 2 * MIB) >> 12)
        .u8(2)
        .u64(7);
    b = in_slot(b.u8(CPU_ACCESS), 0, 0x1000).u8(1);
    v.push(("slots-mmio-readd", b.0));
    // Fault injection: RAM set-up fails part-way, then succeeds; backing fails; limit reached.
    let mut b = vm_header(0, 12)
        .u8(FAIL_AFTER)
        .u8(3)
        .u8(ADD_RAM)
        .u16(4)
        .u8(CLEAR_FAULTS)
        .u8(ADD_RAM)
        .u16(4)
        .u8(FAIL_NTH)
        .u8(0);
    b = in_slot(b.u8(CPU_ACCESS), 0, 0x1000).u8(1);
    b = b.u8(CLEAR_FAULTS);
    b = in_slot(b.u8(CPU_WRITES), 0, 0).u8(12);
    v.push(("faults-and-limit", b.0));
    // An image: one PT_LOAD at 1 MiB, loaded into 4 MiB of RAM, read back.
    let elf = minimal_elf(MIB, &[0xf4; 300]);
    let mut b = vm_header(0, 1 << 16)
        .u8(ADD_RAM)
        .u16(4)
        .u8(LOAD_ELF)
        .u16(elf.len() as u16)
        .bytes(&elf);
    b = in_slot(b.u8(READ_GUEST), 0, MIB).u32(0x2000);
    v.push(("load-elf", b.0));
    // Exits: console OUT, CR8 load, EPT violation through handle_exit, and a PML drain.
    let mut b = vm_header(1, 1 << 16).u8(ADD_RAM).u16(4);
    b = raw(b.u8(HANDLE_EXIT).u8(1).u64(0x3f8 << 16), 0)
        .u64(u64::from(b'x'))
        .u64(0);
    b = raw(b.u8(HANDLE_EXIT).u8(2).u64(0x0308), 0).u64(7).u64(0);
    b = in_slot(b.u8(HANDLE_EXIT).u8(0).u64(2), 0, 0x5000)
        .u64(0)
        .u64(0);
    b = b.u8(PML_DRAIN).u16(508).u8(3);
    for off in [0x5000u64, 0x6000, 0x7123] {
        b = in_slot(b, 0, off);
    }
    b = b.u8(GET_LOG).u8(0).u8(1);
    v.push(("exits-pml-drain", b.0));
    v
}

fn ept_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use ept_ops::op::*;
    let h = || Builder::new().u8(0b1111).u8(10).u64(0x1234_5678);
    let gpa1g = |b: Builder, n: u64| b.u8(3).u64(n);
    let mut v = Vec::new();
    // 1 GiB leaf, unmap a 4 KiB page in its middle (split to 2 MiB, then 4 KiB), protect, invept.
    let mut b = gpa1g(h().u8(MAP), 1)
        .u8(1)
        .u64(0)
        .u8(3)
        .u64(0)
        .u8(7)
        .u8(4)
        .u8(1);
    b = b.u8(UNMAP).u8(1).u64((GIB + 5 * MIB) >> 12).u8(1).u64(0);
    b = b
        .u8(PROTECT)
        .u8(1)
        .u64((GIB + 4 * MIB) >> 12)
        .u8(1)
        .u64(0x3ff)
        .u8(5);
    b = b
        .u8(SPLIT)
        .u8(2)
        .u64(0x220)
        .u8(SPLIT_RANGE)
        .u8(2)
        .u64(0x201)
        .u8(2)
        .u64(1);
    b = b.u8(INVEPT_DONE);
    v.push(("large-split-unmap-protect", b.0));
    // The same with allocation failures in the middle of the splits and of a 4 KiB map.
    let mut b = gpa1g(h().u8(MAP), 2)
        .u8(1)
        .u64(0)
        .u8(3)
        .u64(0)
        .u8(3)
        .u8(4)
        .u8(1);
    b = b
        .u8(FAIL_NTH)
        .u8(1)
        .u8(UNMAP)
        .u8(1)
        .u64((2 * GIB + 3 * MIB + 4096) >> 12)
        .u8(1)
        .u64(2);
    b = b
        .u8(FAIL_AFTER)
        .u8(1)
        .u8(PROTECT)
        .u8(1)
        .u64((2 * GIB + 4096) >> 12)
        .u8(2)
        .u64(3)
        .u8(1);
    b = b.u8(CLEAR_FAULTS).u8(FAIL_NTH).u8(2);
    b = b
        .u8(MAP)
        .u8(1)
        .u64(0x7_fe00)
        .u8(1)
        .u64(0)
        .u8(1)
        .u64(0x3ff)
        .u8(3)
        .u8(0)
        .u8(0);
    b = b
        .u8(CLEAR_FAULTS)
        .u8(UNMAP)
        .u8(3)
        .u64(0)
        .u8(3)
        .u64(7)
        .u8(INVEPT_DONE);
    v.push(("faults-in-splits", b.0));
    // Invalid requests: misaligned, W without R, overlap, beyond 2^48, beyond MAXPHYADDR.
    let mut b = h()
        .u8(MAP)
        .u8(0)
        .u64(0x1001)
        .u8(1)
        .u64(0)
        .u8(1)
        .u64(0)
        .u8(3)
        .u8(4)
        .u8(0);
    b = b
        .u8(MAP)
        .u8(1)
        .u64(0x10)
        .u8(1)
        .u64(0)
        .u8(1)
        .u64(0)
        .u8(2)
        .u8(4)
        .u8(0);
    b = b
        .u8(MAP)
        .u8(1)
        .u64(0x10)
        .u8(1)
        .u64(0)
        .u8(1)
        .u64(0)
        .u8(3)
        .u8(4)
        .u8(0);
    b = b
        .u8(MAP)
        .u8(1)
        .u64(0x11)
        .u8(1)
        .u64(0)
        .u8(1)
        .u64(0)
        .u8(3)
        .u8(4)
        .u8(0);
    b = b
        .u8(MAP)
        .u8(0)
        .u64((1 << 48) - 4096)
        .u8(1)
        .u64(0)
        .u8(1)
        .u64(1)
        .u8(3)
        .u8(4)
        .u8(0);
    b = b
        .u8(MAP)
        .u8(1)
        .u64(0x100)
        .u8(0)
        .u64(1 << 52)
        .u8(1)
        .u64(0)
        .u8(3)
        .u8(4)
        .u8(0);
    b = b.u8(PROTECT).u8(1).u64(0x10).u8(1).u64(4).u8(1);
    v.push(("invalid-requests", b.0));
    v
}

fn abi_seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn enc<T: Wire>(op: Op, x: T) -> Vec<u8> {
        let mut b = vec![0u8; op.buffer_size()];
        let n = x.to_bytes(&mut b).expect("encode");
        b.truncate(n.max(4));
        let mut v = vec![Op::ALL.iter().position(|&o| o == op).expect("op") as u8];
        v.extend_from_slice(&b);
        v
    }
    let vs = VERSION;
    let mut v = vec![
        (
            "setup",
            enc(
                Op::Setup,
                SetupReq {
                    version: vs,
                    mode: 2,
                    mem_bytes: 64 << 20,
                    vcpus: 2,
                    page_limit: 0,
                },
            ),
        ),
        (
            "setup-bad-mem",
            enc(
                Op::Setup,
                SetupReq {
                    version: vs,
                    mode: 0,
                    mem_bytes: (64 << 20) + 4096,
                    vcpus: 1,
                    page_limit: 9,
                },
            ),
        ),
        (
            "load-elf",
            enc(
                Op::LoadElf,
                LoadElfReq {
                    version: vs,
                    reserved: 0,
                    image: 0x7f00_0000_0000,
                    len: 4096,
                },
            ),
        ),
        (
            "load-elf-wrap",
            enc(
                Op::LoadElf,
                LoadElfReq {
                    version: vs,
                    reserved: 0,
                    image: u64::MAX - 10,
                    len: 4096,
                },
            ),
        ),
        (
            "run",
            enc(
                Op::Run,
                RunReq {
                    version: vs,
                    vcpu: 7,
                },
            ),
        ),
        (
            "get-log",
            enc(
                Op::GetDirtyLog,
                DirtyLogReq {
                    version: vs,
                    slot: 0,
                    bitmap: 0x1000,
                    bitmap_len: 2 << 20,
                },
            ),
        ),
        (
            "harvest",
            enc(
                Op::HarvestDirtyLog,
                DirtyLogReq {
                    version: vs,
                    slot: 1,
                    bitmap: 0x1000,
                    bitmap_len: 64,
                },
            ),
        ),
        (
            "clear-log",
            enc(
                Op::ClearDirtyLog,
                ClearDirtyLogReq {
                    version: vs,
                    slot: 0,
                    first_page: 64,
                    num_pages: 128,
                    mask: 0x2000,
                },
            ),
        ),
        (
            "explain",
            enc(
                Op::Explain,
                ExplainReq {
                    version: vs,
                    reserved: 0,
                    gpa: 0x10_0000,
                    user_va: 0x7f12_3456_7000,
                },
            ),
        ),
        (
            "write-guest",
            enc(
                Op::WriteGuest,
                MemReq {
                    version: vs,
                    reserved: 0,
                    gpa: 0x1000,
                    buf: 0x5000,
                    len: MAX_COPY,
                },
            ),
        ),
        (
            "read-guest-too-long",
            enc(
                Op::ReadGuest,
                MemReq {
                    version: vs,
                    reserved: 0,
                    gpa: 0,
                    buf: 0x5000,
                    len: MAX_COPY + 1,
                },
            ),
        ),
        ("stats", vec![6, 1, 0, 0, 0]),
        ("caps", vec![10, 1, 0, 0, 0]),
    ];
    v.push(("truncated-setup", vec![0, 1, 0, 0, 0, 2, 0]));
    v
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let sets: [(&str, Vec<(&str, Vec<u8>)>, fn(&[u8])); 3] = [
        ("abi_decode", abi_seeds(), smudge_fuzz::abi_decode::run),
        ("vm_ops", vm_seeds(), smudge_fuzz::vm_ops::run),
        ("ept_ops", ept_seeds(), smudge_fuzz::ept_ops::run),
    ];
    for (target, seeds, run) in sets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
        }
        let mut n = 0;
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("read corpus")
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            run(&std::fs::read(&f).expect("read input"));
            n += 1;
        }
        println!("{target}: {n} corpus inputs replayed without a failure");
    }
}
