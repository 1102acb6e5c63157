//! Malformed requests, one broken thing at a time: request numbers, the argument pointer,
//! versions, reserved fields, sizes and ranges, pointers inside requests, requests out of order,
//! broken images, and a closed descriptor. Each must fail with a precise errno and change
//! nothing (the next valid request still works).

use smudge_core::abi::{self, Op, MAX_COPY, MAX_IMAGE, VERSION};

use crate::elf::Image;
use crate::sys::{self, Mem, PAGE};
use crate::tally::Tally;
use crate::vm::{encode, sample, version_only, Vm};

use libc::{EBADF, EBUSY, EFAULT, EINVAL, ENOEXEC, ENOTTY, ESPIPE};

/// A kernel direct-map address (x86-64 page_offset_base without KASLR).
pub const KERNEL_PTR: u64 = 0xffff_8880_0000_0000;
/// The kernel text.
const KERNEL_TEXT: u64 = 0xffff_ffff_8100_0000;

/// The size field of a Linux ioctl number (include/uapi/asm-generic/ioctl.h: bits 29:16).
fn with_size(cmd: u32, size: u32) -> u32 {
    (cmd & !(0x3fff << 16)) | ((size & 0x3fff) << 16)
}
/// The direction field (bits 31:30).
fn with_dir(cmd: u32, dir: u32) -> u32 {
    (cmd & !(3 << 30)) | (dir << 30)
}
/// The type field (bits 15:8).
fn with_type(cmd: u32, ty: u8) -> u32 {
    (cmd & !(0xff << 8)) | (u32::from(ty) << 8)
}

fn name(op: Op) -> String {
    format!("{op:?}").to_lowercase()
}

/// Request numbers that are not ours: other sizes, directions, types, numbers.
pub fn numbers(t: &mut Tally, mem: &Mem) {
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("open", Err(e), 0),
    };
    for op in Op::ALL {
        let good = op.linux_ioctl();
        let size = op.buffer_size() as u32;
        let mut buf = sample(op, mem.addr(), mem.addr());
        buf.resize(2048, 0);
        for (label, cmd) in [
            ("size+8", with_size(good, size + 8)),
            ("size-1", with_size(good, size - 1)),
            ("size-0", with_size(good, 0)),
            ("size-max", with_size(good, 0x3fff)),
            ("dir-none", with_dir(good, 0)),
            ("dir-write-only", with_dir(good, 1)),
            ("dir-read-only", with_dir(good, 2)),
            ("type-T", with_type(good, b'T')),
            ("windows-code", op.windows_ioctl()),
        ] {
            t.errno(
                &format!("ioctl-number-{}-{label}", name(op)),
                vm.send_raw(cmd, &mut buf),
                ENOTTY,
            );
        }
    }
    let setup = Op::Setup.linux_ioctl();
    let mut buf = sample(Op::Setup, 0, 0);
    for nr in [0u32, 17, 18, 0x7f, 0xff] {
        t.errno(
            &format!("ioctl-number-nr-{nr}"),
            vm.send_raw((setup & !0xff) | nr, &mut buf),
            ENOTTY,
        );
    }
    // KVM_GET_API_VERSION (_IO(0xAE, 0)) and TCGETS: other drivers' requests.
    t.errno(
        "ioctl-number-kvm-get-api-version",
        vm.send_raw(0xae00, &mut buf),
        ENOTTY,
    );
    t.errno("ioctl-number-tcgets", vm.send_raw(0x5401, &mut buf), ENOTTY);
    // The VM is untouched: SETUP still works.
    t.errno(
        "after-bad-numbers-setup-works",
        vm.setup(4 << 20, 1, 0, 0),
        0,
    );
}

/// The ioctl argument itself: null, unmapped, kernel, wrapping, straddling an inaccessible page.
pub fn arg_pointers(t: &mut Tally) {
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("open", Err(e), 0),
    };
    let hole = Mem::with_hole(1);
    for op in Op::ALL {
        let cmd = op.linux_ioctl();
        for (label, arg) in [
            ("null", 0u64),
            ("unmapped-low", 0x1000),
            ("kernel-direct-map", KERNEL_PTR),
            ("kernel-text", KERNEL_TEXT),
            ("wraps", u64::MAX - 3),
            ("non-canonical", 0x0000_8000_0000_0000),
        ] {
            t.errno(
                &format!("arg-{label}-{}", name(op)),
                sys::ioctl(vm.fd, cmd, arg),
                EFAULT,
            );
        }
        // The request runs into an inaccessible page half-way.
        let req = sample(op, 0, 0);
        let n = op.request_size();
        let at = hole.hole() - (n / 2) as u64;
        hole.put(at, &req[..n / 2]);
        t.errno(
            &format!("arg-straddles-hole-{}", name(op)),
            sys::ioctl(vm.fd, cmd, at),
            EFAULT,
        );
    }
    // Requests that are readable but whose response cannot be written back.
    let ro = Mem::new(1);
    for op in [Op::Stats, Op::Caps] {
        let req = version_only(op, VERSION);
        let at = hole.hole() - 4;
        hole.put(at, &req[..4]);
        t.errno(
            &format!("response-into-hole-{}", name(op)),
            sys::ioctl(vm.fd, op.linux_ioctl(), at),
            EFAULT,
        );
        ro.put(ro.addr(), &req);
        ro.protect(0, 1, libc::PROT_READ);
        t.errno(
            &format!("response-into-read-only-{}", name(op)),
            sys::ioctl(vm.fd, op.linux_ioctl(), ro.addr()),
            EFAULT,
        );
        ro.protect(0, 1, libc::PROT_READ | libc::PROT_WRITE);
    }
    t.errno("after-bad-args-setup-works", vm.setup(4 << 20, 1, 0, 0), 0);
}

/// Field validation: versions, reserved fields, modes, sizes, counts, lengths, pointers.
pub fn fields(t: &mut Tally) {
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("open", Err(e), 0),
    };
    let m = Mem::new(4);
    let a = m.addr();
    for op in Op::ALL {
        for v in [0u32, VERSION + 1, u32::MAX] {
            let mut b = sample(op, a, a);
            b[..4].copy_from_slice(&v.to_le_bytes());
            t.errno(
                &format!("version-{v:#x}-{}", name(op)),
                vm.send(op, &mut b),
                EINVAL,
            );
        }
    }
    let setup = |mode: u32, mem_bytes: u64, vcpus: u32| abi::SetupReq {
        version: VERSION,
        mode,
        mem_bytes,
        vcpus,
        page_limit: 0,
    };
    let mut cases: Vec<(String, Op, Vec<u8>, i32)> = Vec::new();
    for mode in [4u32, 0x8000_0000, u32::MAX] {
        cases.push((
            format!("setup-mode-{mode:#x}"),
            Op::Setup,
            encode(Op::Setup, &setup(mode, 4 << 20, 1)),
            EINVAL,
        ));
    }
    for (label, mem) in [
        ("0", 0u64),
        ("2mib-too-small", 2 << 20),
        ("4mib-plus-4k", (4 << 20) + 4096),
        ("5mib", 5 << 20),
        ("4gib-plus-2mib", (4 << 30) + (2 << 20)),
        ("2pow63", 1 << 63),
        ("max-2mib-multiple", !((2u64 << 20) - 1)),
    ] {
        cases.push((
            format!("setup-mem-{label}"),
            Op::Setup,
            encode(Op::Setup, &setup(0, mem, 1)),
            EINVAL,
        ));
    }
    for vcpus in [0u32, abi::MAX_VCPUS + 1, u32::MAX] {
        cases.push((
            format!("setup-vcpus-{vcpus}"),
            Op::Setup,
            encode(Op::Setup, &setup(0, 4 << 20, vcpus)),
            EINVAL,
        ));
    }
    let load = |reserved: u32, image: u64, len: u64| abi::LoadElfReq {
        version: VERSION,
        reserved,
        image,
        len,
    };
    cases.extend([
        (
            "load-elf-reserved-1".to_string(),
            Op::LoadElf,
            encode(Op::LoadElf, &load(1, a, 64)),
            EINVAL,
        ),
        (
            "load-elf-null-image".into(),
            Op::LoadElf,
            encode(Op::LoadElf, &load(0, 0, 64)),
            EFAULT,
        ),
        (
            "load-elf-len-0".into(),
            Op::LoadElf,
            encode(Op::LoadElf, &load(0, a, 0)),
            EINVAL,
        ),
        (
            "load-elf-len-above-max".into(),
            Op::LoadElf,
            encode(Op::LoadElf, &load(0, a, MAX_IMAGE + 1)),
            EINVAL,
        ),
        (
            "load-elf-len-u64-max".into(),
            Op::LoadElf,
            encode(Op::LoadElf, &load(0, a, u64::MAX)),
            EINVAL,
        ),
        (
            "load-elf-image-wraps".into(),
            Op::LoadElf,
            encode(Op::LoadElf, &load(0, u64::MAX - 100, 4096)),
            EFAULT,
        ),
        (
            "explain-reserved".into(),
            Op::Explain,
            encode(
                Op::Explain,
                &abi::ExplainReq {
                    version: VERSION,
                    reserved: 0x8000_0000,
                    ..Default::default()
                },
            ),
            EINVAL,
        ),
    ]);
    for vcpu in [abi::MAX_VCPUS, u32::MAX] {
        cases.push((
            format!("run-vcpu-{vcpu}"),
            Op::Run,
            encode(
                Op::Run,
                &abi::RunReq {
                    version: VERSION,
                    vcpu,
                },
            ),
            EINVAL,
        ));
    }
    for op in [Op::GetDirtyLog, Op::HarvestDirtyLog] {
        let d = |bitmap: u64, bitmap_len: u64| abi::DirtyLogReq {
            version: VERSION,
            slot: 0,
            bitmap,
            bitmap_len,
        };
        for (label, req, want) in [
            ("null-bitmap", d(0, 4096), EFAULT),
            ("len-0", d(a, 0), EINVAL),
            ("len-above-2mib", d(a, (2 << 20) + 8), EINVAL),
            ("len-u64-max", d(a, u64::MAX), EINVAL),
            ("bitmap-wraps", d(u64::MAX - 100, 4096), EFAULT),
        ] {
            cases.push((format!("{}-{label}", name(op)), op, encode(op, &req), want));
        }
    }
    let c = |first_page: u64, num_pages: u64, mask: u64| abi::ClearDirtyLogReq {
        version: VERSION,
        slot: 0,
        first_page,
        num_pages,
        mask,
    };
    for (label, req, want) in [
        ("null-mask", c(0, 64, 0), EFAULT),
        ("num-0", c(0, 0, a), EINVAL),
        ("num-u64-max", c(0, u64::MAX, a), EINVAL),
        ("mask-wraps", c(0, 64, u64::MAX - 4), EFAULT),
    ] {
        cases.push((
            format!("clear-dirty-log-{label}"),
            Op::ClearDirtyLog,
            encode(Op::ClearDirtyLog, &req),
            want,
        ));
    }
    for op in [Op::ReadGuest, Op::WriteGuest] {
        let r = |reserved: u32, buf: u64, len: u64| abi::MemReq {
            version: VERSION,
            reserved,
            gpa: 0x200000,
            buf,
            len,
        };
        for (label, req, want) in [
            ("reserved-1", r(1, a, 64), EINVAL),
            ("null-buf", r(0, 0, 64), EFAULT),
            ("len-0", r(0, a, 0), EINVAL),
            ("len-above-max", r(0, a, MAX_COPY + 1), EINVAL),
            ("buf-wraps", r(0, u64::MAX - 10, 64), EFAULT),
        ] {
            cases.push((format!("{}-{label}", name(op)), op, encode(op, &req), want));
        }
    }
    for (label, op, mut b, want) in cases {
        t.errno(&label, vm.send(op, &mut b), want);
    }
    t.errno(
        "after-bad-fields-setup-works",
        vm.setup(4 << 20, 1, 0, 0),
        0,
    );
}

/// Every request before SETUP: the VM does not exist yet.
pub fn before_setup(t: &mut Tally, hello: &[u8]) {
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("open", Err(e), 0),
    };
    let m = Mem::new(4);
    let mut bm = vec![0u64; 512];
    t.errno("before-setup-load-elf", vm.load(hello).map(|_| ()), EINVAL);
    t.errno("before-setup-run", vm.run(0).map(|_| ()), EINVAL);
    t.errno(
        "before-setup-get-dirty-log",
        vm.dirty_log(false, &mut bm),
        EINVAL,
    );
    t.errno(
        "before-setup-harvest-dirty-log",
        vm.dirty_log(true, &mut bm),
        EINVAL,
    );
    t.errno(
        "before-setup-clear-dirty-log",
        vm.clear(0, 0, 64, m.addr()),
        EINVAL,
    );
    t.errno(
        "before-setup-explain",
        vm.explain(0x100000).map(|_| ()),
        EINVAL,
    );
    t.errno(
        "before-setup-read-guest",
        vm.mem(false, 0x100000, m.addr(), 64),
        EINVAL,
    );
    t.errno(
        "before-setup-write-guest",
        vm.mem(true, 0x100000, m.addr(), 64),
        EINVAL,
    );
    match vm.stats() {
        Ok(s) => t.check(
            "before-setup-stats",
            s.vm_pages == 0 && s.vcpus == 0,
            &format!("0 (success), vm_pages {}, vcpus {}", s.vm_pages, s.vcpus),
        ),
        Err(e) => t.errno("before-setup-stats", Err(e), 0),
    }
    let mut caps = version_only(Op::Caps, VERSION);
    t.errno("before-setup-caps", vm.send(Op::Caps, &mut caps), 0);
    t.errno(
        "before-setup-then-setup-works",
        vm.setup(4 << 20, 1, 0, 0),
        0,
    );
}

/// Requests on a set-up VM that break a range, a slot, a bitmap or a user pointer.
pub fn after_setup(t: &mut Tally, hello: &Image) {
    const MEM: u64 = 64 << 20;
    const PAGES: u64 = MEM / 4096;
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("open", Err(e), 0),
    };
    t.errno("setup-64mib-2-vcpus", vm.setup(MEM, 2, 0, 0), 0);
    t.errno("setup-twice", vm.setup(MEM, 2, 0, 0), EBUSY);
    t.errno("setup-twice-other-size", vm.setup(4 << 20, 1, 3, 0), EBUSY);
    t.errno("run-vcpu-2-of-2", vm.run(2).map(|_| ()), EINVAL);
    t.errno("run-vcpu-7-of-2", vm.run(7).map(|_| ()), EINVAL);

    let words = PAGES.div_ceil(64) as usize;
    // 2048 bytes: fits the one read-only page below.
    let bytes = (words * 8) as u64;
    let buf = Mem::new(8);
    let hole = Mem::with_hole(1);
    let ro = Mem::new(1);
    ro.protect(0, 1, libc::PROT_READ);
    for harvest in [false, true] {
        let n = if harvest {
            "harvest-dirty-log"
        } else {
            "get-dirty-log"
        };
        for slot in [1u32, 7, 8, u32::MAX] {
            t.errno(
                &format!("{n}-slot-{slot}"),
                vm.dirty_log_at(harvest, slot, buf.addr(), bytes),
                EINVAL,
            );
        }
        t.errno(
            &format!("{n}-bitmap-8-bytes"),
            vm.dirty_log_at(harvest, 0, buf.addr(), 8),
            EINVAL,
        );
        t.errno(
            &format!("{n}-bitmap-one-word-short"),
            vm.dirty_log_at(harvest, 0, buf.addr(), bytes - 8),
            EINVAL,
        );
        t.errno(
            &format!("{n}-bitmap-kernel"),
            vm.dirty_log_at(harvest, 0, KERNEL_PTR, bytes),
            EFAULT,
        );
        t.errno(
            &format!("{n}-bitmap-read-only"),
            vm.dirty_log_at(harvest, 0, ro.addr(), bytes),
            EFAULT,
        );
        t.errno(
            &format!("{n}-bitmap-straddles-hole"),
            vm.dirty_log_at(harvest, 0, hole.hole() - bytes / 2, bytes),
            EFAULT,
        );
        t.errno(
            &format!("{n}-bitmap-exact"),
            vm.dirty_log_at(harvest, 0, buf.addr(), bytes),
            0,
        );
        // A bitmap_len larger than needed is a capacity: only pages/8 bytes are written.
        buf.put(buf.addr(), &vec![0xaa; 8 * PAGE]);
        let r = vm.dirty_log_at(harvest, 0, buf.addr(), 2 << 20);
        let untouched = buf
            .get(buf.addr() + bytes, 8 * PAGE - bytes as usize)
            .iter()
            .all(|&b| b == 0xaa);
        t.check(
            &format!("{n}-bitmap-len-2mib-writes-only-pages-bits"),
            r.is_ok() && untouched,
            &format!(
                "{:?}, bytes past {bytes} untouched: {untouched}",
                r.map_err(sys::errno_name)
            ),
        );
    }
    let mask = Mem::new(8);
    mask.put(mask.addr(), &vec![0xff; 8 * PAGE]);
    let ma = mask.addr();
    for (label, slot, first, num, m, want) in [
        ("first-page-1", 0u32, 1u64, 64u64, ma, EINVAL),
        ("first-page-32", 0, 32, 64, ma, EINVAL),
        ("num-63", 0, 0, 63, ma, EINVAL),
        ("num-65", 0, 0, 65, ma, EINVAL),
        ("first-at-slot-end", 0, PAGES, 64, ma, EINVAL),
        ("runs-past-slot-end", 0, PAGES - 64, 128, ma, EINVAL),
        ("first-wraps", 0, u64::MAX - 63, 64, ma, EINVAL),
        ("slot-1", 1, 0, 64, ma, EINVAL),
        ("slot-u32-max", u32::MAX, 0, 64, ma, EINVAL),
        ("mask-kernel", 0, 0, 64, KERNEL_PTR, EFAULT),
        ("mask-straddles-hole", 0, 0, 128, hole.hole() - 8, EFAULT),
        ("valid-first-64", 0, 0, 64, ma, 0),
        ("valid-last-64", 0, PAGES - 64, 64, ma, 0),
        ("valid-whole-slot", 0, 0, PAGES, ma, 0),
    ] {
        t.errno(
            &format!("clear-dirty-log-{label}"),
            vm.clear(slot, first, num, m),
            want,
        );
    }
    for write in [false, true] {
        let n = if write { "write-guest" } else { "read-guest" };
        let b = buf.addr();
        for (label, gpa, ubuf, len, want) in [
            ("gpa-at-ram-end", MEM, b, 1u64, EINVAL),
            ("straddles-ram-end", MEM - 1, b, 2, EINVAL),
            ("gpa-u64-max", u64::MAX, b, 1, EINVAL),
            ("gpa-wraps", u64::MAX - 4095, b, 4096, EINVAL),
            ("gpa-2pow48", 1 << 48, b, 64, EINVAL),
            ("buf-kernel", 0x200000, KERNEL_PTR, 64, EFAULT),
            ("buf-straddles-hole", 0x200000, hole.hole() - 32, 64, EFAULT),
            (
                "max-copy-into-short-buffer",
                0,
                hole.hole() - 4096,
                MAX_COPY,
                EFAULT,
            ),
        ] {
            t.errno(&format!("{n}-{label}"), vm.mem(write, gpa, ubuf, len), want);
        }
    }
    t.errno(
        "read-guest-into-read-only-buffer",
        vm.mem(false, 0x200000, ro.addr(), 64),
        EFAULT,
    );
    t.errno(
        "write-guest-from-read-only-buffer",
        vm.mem(true, 0x200000, ro.addr(), 64),
        0,
    );
    // A round trip across a page boundary into pages never backed before.
    let data: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    buf.put(buf.addr(), &data);
    let w = vm.mem(true, 0x1f_f800, buf.addr(), 4096);
    buf.put(buf.addr(), &[0u8; 4096]);
    let r = vm.mem(false, 0x1f_f800, buf.addr(), 4096);
    let same = buf.get(buf.addr(), 4096) == data;
    t.check(
        "write-then-read-guest-round-trip",
        w.is_ok() && r.is_ok() && same,
        &format!(
            "write {:?}, read {:?}, bytes equal: {same}",
            w.err(),
            r.err()
        ),
    );
    let big = Mem::new(MAX_COPY as usize / PAGE);
    t.errno(
        "read-guest-max-copy",
        vm.mem(false, 0, big.addr(), MAX_COPY),
        0,
    );

    for (label, gpa) in [
        ("u64-max", u64::MAX),
        ("ram-end", MEM),
        ("2pow47", 1u64 << 47),
        ("unbacked", 0x300_0000),
    ] {
        match vm.explain(gpa) {
            Ok(x) => t.check(
                &format!("explain-{label}"),
                x.ept_leaf == 0 && x.hpa == 0,
                &format!("0 (success), EPT leaf {:#x}", x.ept_leaf),
            ),
            Err(e) => t.errno(&format!("explain-{label}"), Err(e), 0),
        }
    }
    for op in [Op::Explain, Op::Stats] {
        let req = sample(op, 0, 0);
        let n = op.request_size();
        let at = hole.hole() - n as u64;
        hole.put(at, &req[..n]);
        t.errno(
            &format!("response-into-hole-{}", name(op)),
            sys::ioctl(vm.fd, op.linux_ioctl(), at),
            EFAULT,
        );
    }

    let img = hello.bytes();
    t.errno(
        "load-elf-image-kernel",
        vm.load_at(KERNEL_PTR, img.len() as u64).map(|_| ()),
        EFAULT,
    );
    let short = Mem::with_hole(1);
    short.put(short.addr(), &img[..PAGE.min(img.len())]);
    t.errno(
        "load-elf-image-straddles-hole",
        vm.load_at(short.addr(), 2 * PAGE as u64).map(|_| ()),
        EFAULT,
    );
    t.errno(
        "load-elf-max-len-short-buffer",
        vm.load_at(short.addr(), MAX_IMAGE).map(|_| ()),
        EFAULT,
    );
    for (label, bytes) in hello.broken(MEM) {
        t.errno(
            &format!("load-elf-{label}"),
            vm.load(&bytes).map(|_| ()),
            ENOEXEC,
        );
    }
    match vm.load(img) {
        Ok(entry) => t.check(
            "load-elf-valid-after-broken",
            entry == hello.entry(),
            &format!("entry {entry:#x}, e_entry {:#x}", hello.entry()),
        ),
        Err(e) => t.errno("load-elf-valid-after-broken", Err(e), 0),
    }
    match vm.run_to_end(0, MEM) {
        Ok((r, console)) => t.check(
            "run-after-malformed-requests",
            r.kind == abi::exit_kind::EXIT
                && r.code == 0
                && console.contains("hello from the smudge guest"),
            &crate::vm::describe(&r),
        ),
        Err(e) => t.errno("run-after-malformed-requests", Err(e), 0),
    }
    drop(vm);
    crate::expect_no_pages(t, "after-setup-cases-pages-freed");

    // RUN whose response cannot be written: the request is readable, the record is not.
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("open", Err(e), 0),
    };
    if vm.setup(4 << 20, 1, 0, 0).is_ok() && vm.load(img).is_ok() {
        let req = sample(Op::Run, 0, 0);
        let at = hole.hole() - 8;
        hole.put(at, &req[..8]);
        t.errno(
            "run-response-into-hole",
            sys::ioctl(vm.fd, Op::Run.linux_ioctl(), at),
            EFAULT,
        );
    } else {
        t.fail("run-response-into-hole", "setup or load failed");
    }
}

/// The other file operations. read, write and lseek do not exist (the VFS answers EINVAL,
/// EINVAL, ESPIPE).
pub fn other_fops(t: &mut Tally) {
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("open", Err(e), 0),
    };
    for stage in ["fresh", "set-up"] {
        t.errno(&format!("read-{stage}"), sys::read(vm.fd), EINVAL);
        t.errno(&format!("write-{stage}"), sys::write(vm.fd), EINVAL);
        t.errno(&format!("lseek-{stage}"), sys::lseek(vm.fd), ESPIPE);
        if stage == "fresh" {
            t.errno("setup-for-fops", vm.setup(4 << 20, 1, 0, 0), 0);
        }
    }
}

/// mmap of the VM: a read-only view of guest RAM. A writable or executable mapping, or a
/// read-only one made writable later, would let user space write guest memory behind the EPT
/// and the dirty log: all refused (the driver: EPERM; mprotect without VM_MAYWRITE: EACCES).
/// The mapping keeps the VM alive after its descriptor is closed, until munmap.
pub fn mmap(t: &mut Tally) {
    const MEM: usize = 4 << 20;
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("open", Err(e), 0),
    };
    let (rw, ro) = (libc::PROT_READ | libc::PROT_WRITE, libc::PROT_READ);
    let (shared, private) = (libc::MAP_SHARED, libc::MAP_PRIVATE);
    let map = |len: usize, prot: i32, flags: i32, off: i64| {
        let r = sys::mmap_dev(vm.fd, len, prot, flags, off);
        if let Ok(a) = r {
            sys::munmap(a, len);
        }
        r.map(|_| ())
    };
    t.errno("mmap-before-setup", map(MEM, ro, shared, 0), EINVAL);
    t.errno("mmap-setup", vm.setup(MEM as u64, 1, 0, 0), 0);
    t.errno("mmap-writable-shared", map(MEM, rw, shared, 0), libc::EPERM);
    t.errno(
        "mmap-writable-private",
        map(MEM, rw, private, 0),
        libc::EPERM,
    );
    t.errno(
        "mmap-executable",
        map(MEM, ro | libc::PROT_EXEC, shared, 0),
        libc::EPERM,
    );
    t.errno("mmap-longer-than-ram", map(2 * MEM, ro, shared, 0), EINVAL);
    t.errno(
        "mmap-offset-at-ram-end",
        map(PAGE, ro, shared, MEM as i64),
        EINVAL,
    );
    t.errno("mmap-offset-2pow50", map(PAGE, ro, shared, 1 << 50), EINVAL);
    // A page written through WRITE_GUEST reads back through the mapping.
    let pattern: Vec<u8> = (0..PAGE as u32)
        .map(|i| (i.wrapping_mul(40503) >> 8) as u8)
        .collect();
    let src = Mem::new(1);
    src.put(src.addr(), &pattern);
    t.errno(
        "mmap-write-guest-page",
        vm.mem(true, 0x20_0000, src.addr(), PAGE as u64),
        0,
    );
    for (label, flags) in [("shared", shared), ("private", private)] {
        match sys::mmap_dev(vm.fd, MEM, ro, flags, 0) {
            Err(e) => t.errno(&format!("mmap-read-only-{label}"), Err(e), 0),
            Ok(a) => {
                t.errno(
                    &format!("mmap-read-only-{label}-then-mprotect-writable"),
                    sys::mprotect(a, MEM, rw),
                    libc::EACCES,
                );
                t.errno(
                    &format!("mmap-read-only-{label}-then-mprotect-executable"),
                    sys::mprotect(a, MEM, ro | libc::PROT_EXEC),
                    libc::EACCES,
                );
                // SAFETY: the page at 2 MiB is backed (written above) and mapped read-only.
                let seen =
                    unsafe { std::slice::from_raw_parts((a + 0x20_0000) as *const u8, PAGE) }
                        == &pattern[..];
                t.check(
                    &format!("mmap-read-only-{label}-shows-guest-memory"),
                    seen,
                    &format!("page at 2 MiB equals what WRITE_GUEST wrote: {seen}"),
                );
                sys::munmap(a, MEM);
            }
        }
    }
    // The mapping outlives the descriptor: the VM must stay alive until munmap.
    let Ok(a) = sys::mmap_dev(vm.fd, MEM, ro, shared, 0) else {
        return t.fail("mmap-outlives-close", "mmap failed");
    };
    t.errno("mmap-close-descriptor", vm.close(), 0);
    let held = sys::pages_held().unwrap_or(0);
    // SAFETY: as above; the VM lives while the mapping holds its file.
    let seen =
        unsafe { std::slice::from_raw_parts((a + 0x20_0000) as *const u8, PAGE) } == &pattern[..];
    t.check(
        "mmap-outlives-close",
        seen && held > 0,
        &format!("after close: page still readable {seen}, {held} pages held"),
    );
    sys::munmap(a, MEM);
    crate::expect_no_pages(t, "mmap-munmap-frees-the-vm");
}

/// Requests on a closed descriptor and on one that never existed.
pub fn closed_fd(t: &mut Tally) {
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("open", Err(e), 0),
    };
    let fd = vm.fd;
    let _ = vm.setup(4 << 20, 1, 0, 0);
    t.errno("close", vm.close(), 0);
    let m = Mem::new(1);
    for op in Op::ALL {
        let mut b = sample(op, m.addr(), m.addr());
        t.errno(
            &format!("closed-fd-{}", name(op)),
            sys::ioctl(fd, op.linux_ioctl(), b.as_mut_ptr() as u64),
            EBADF,
        );
    }
    let mut b = sample(Op::Stats, 0, 0);
    t.errno(
        "fd-minus-1",
        sys::ioctl(-1, Op::Stats.linux_ioctl(), b.as_mut_ptr() as u64),
        EBADF,
    );
    t.errno(
        "fd-never-opened",
        sys::ioctl(100_000, Op::Stats.linux_ioctl(), b.as_mut_ptr() as u64),
        EBADF,
    );
    t.errno("close-twice", sys::close(fd), EBADF);
}
