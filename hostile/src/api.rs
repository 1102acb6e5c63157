//! The VM-building requests on the live driver: ADD_SLOT, CREATE_VCPU, SET_MODE, GET_REGS and
//! SET_REGS, each with its refusals, and a real guest (`regwriter`) whose registers name the
//! pages it writes in an added slot. The oracles: the guest ABI's entry state (computed here
//! from `smudge_core::guest::Layout`), the registers this side set, the bytes the guest wrote
//! (READ_GUEST), and the dirty log of the added slot, which must hold exactly those pages.

use smudge_core::abi::{exit_kind, Regs, MAX_VCPUS};
use smudge_core::guest::Layout;
use smudge_core::vm::MAX_SLOTS;

use crate::tally::Tally;
use crate::vm::{describe, Vm};

const MEM: u64 = 16 << 20;
/// The added slot: 1 GiB up, 1 MiB long (inside the 4 GiB the guest's page tables map).
const SLOT_BASE: u64 = 1 << 30;
const SLOT_SIZE: u64 = 1 << 20;

/// Every case of this module; `regwriter` is the guest image.
pub fn all(t: &mut Tally, regwriter: &[u8]) {
    before_setup(t);
    vcpus_and_regs(t, regwriter);
    slots(t);
    for mode in [1u32, 2, 3] {
        guest_run(t, regwriter, mode);
    }
    crate::expect_no_pages(t, "api-pages-freed");
}

fn before_setup(t: &mut Tally) {
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("api-open", Err(e), 0),
    };
    let regs = Regs {
        rflags: 0x2,
        ..Regs::default()
    };
    t.errno(
        "api-before-setup-add-slot",
        vm.add_slot(SLOT_BASE, SLOT_SIZE).map(drop),
        libc::EINVAL,
    );
    t.errno(
        "api-before-setup-create-vcpu",
        vm.create_vcpu().map(drop),
        libc::EINVAL,
    );
    t.errno("api-before-setup-set-mode", vm.set_mode(1), libc::EINVAL);
    t.errno(
        "api-before-setup-get-regs",
        vm.get_regs(0).map(drop),
        libc::EINVAL,
    );
    t.errno(
        "api-before-setup-set-regs",
        vm.set_regs(0, &regs),
        libc::EINVAL,
    );
}

/// The entry state of vCPU `i` per the guest ABI (core/src/guest.rs): RIP = e_entry, RSP = the
/// top of its stack, RDI = i, RFLAGS = 0x2, every other GPR 0.
fn entry_regs(layout: &Layout, entry: u64, i: u32) -> Regs {
    Regs {
        rdi: i.into(),
        rsp: layout.stack_top(i.into()),
        rip: entry,
        rflags: 0x2,
        ..Regs::default()
    }
}

fn vcpus_and_regs(t: &mut Tally, regwriter: &[u8]) {
    let Ok(layout) = Layout::new(MEM) else {
        return t.fail("api-layout", "16 MiB is a valid RAM size");
    };
    let vm = match Vm::open().and_then(|vm| vm.setup(MEM, 1, 0, 0).map(|_| vm)) {
        Ok(v) => v,
        Err(e) => return t.errno("api-setup", Err(e), 0),
    };
    let before = vm.get_regs(0);
    t.check(
        "api-get-regs-before-load",
        before == Ok(entry_regs(&layout, 0, 0)),
        &format!("{before:x?}"),
    );
    let entry = match vm.load(regwriter) {
        Ok(e) => e,
        Err(e) => return t.errno("api-load", Err(e), 0),
    };
    let r0 = vm.get_regs(0);
    t.check(
        "api-get-regs-entry-state",
        r0 == Ok(entry_regs(&layout, entry, 0)),
        &format!("{r0:x?}"),
    );
    t.errno(
        "api-get-regs-absent-vcpu",
        vm.get_regs(1).map(drop),
        libc::EINVAL,
    );
    // CREATE_VCPU up to the limit, each in the entry state with its own RDI and stack.
    let mut created = Vec::new();
    let mut wrong = Vec::new();
    for want in 1..MAX_VCPUS {
        match vm.create_vcpu() {
            Ok(i) => {
                created.push(i);
                if i != want || vm.get_regs(i) != Ok(entry_regs(&layout, entry, i)) {
                    wrong.push(i);
                }
            }
            Err(e) => wrong.push(1000 + e as u32),
        }
    }
    t.check(
        "api-create-vcpu-entry-state",
        wrong.is_empty() && created.len() == (MAX_VCPUS - 1) as usize,
        &format!("created {created:?}, wrong {wrong:?}"),
    );
    t.errno(
        "api-create-vcpu-beyond-limit",
        vm.create_vcpu().map(drop),
        libc::ENOSPC,
    );
    match vm.stats() {
        Ok(s) => t.check(
            "api-stats-counts-created-vcpus",
            s.vcpus == MAX_VCPUS,
            &format!("{} vCPUs", s.vcpus),
        ),
        Err(e) => t.errno("api-stats-counts-created-vcpus", Err(e), 0),
    }
    // SET_REGS checks RFLAGS and RIP (SDM 27.3.1.4), then GET_REGS returns what was set.
    let good = Regs {
        rax: 0x1111,
        rbx: 0x2222,
        r15: 0xffff,
        rsp: 0x12_3450,
        rip: entry,
        rflags: 0x2 | 1 << 9,
        ..Regs::default()
    };
    for (name, regs) in [
        ("api-set-regs-rflags-bit1-clear", Regs { rflags: 0, ..good }),
        (
            "api-set-regs-rflags-reserved",
            Regs {
                rflags: 0x2 | 1 << 22,
                ..good
            },
        ),
        (
            "api-set-regs-rflags-vm86",
            Regs {
                rflags: 0x2 | 1 << 17,
                ..good
            },
        ),
        (
            "api-set-regs-rip-noncanonical",
            Regs {
                rip: 0x0000_8000_0000_0000,
                ..good
            },
        ),
    ] {
        t.errno(name, vm.set_regs(3, &regs), libc::EINVAL);
    }
    t.errno(
        "api-set-regs-absent-vcpu",
        vm.set_regs(MAX_VCPUS, &good),
        libc::EINVAL,
    );
    t.errno("api-set-regs", vm.set_regs(3, &good), 0);
    let back = vm.get_regs(3);
    t.check(
        "api-get-regs-returns-set-regs",
        back == Ok(good),
        &format!("{back:x?}"),
    );
    let other = vm.get_regs(2);
    t.check(
        "api-set-regs-touches-one-vcpu",
        other == Ok(entry_regs(&layout, entry, 2)),
        &format!("{other:x?}"),
    );
}

fn slots(t: &mut Tally) {
    let vm = match Vm::open().and_then(|vm| vm.setup(MEM, 1, 0, 0).map(|_| vm)) {
        Ok(v) => v,
        Err(e) => return t.errno("api-slots-setup", Err(e), 0),
    };
    let first = vm.add_slot(SLOT_BASE, SLOT_SIZE);
    t.check(
        "api-add-slot",
        first == Ok(1),
        &format!("{first:?} (RAM is slot 0)"),
    );
    for (name, gpa, size, want) in [
        (
            "api-add-slot-overlap",
            SLOT_BASE + SLOT_SIZE / 2,
            SLOT_SIZE,
            libc::EEXIST,
        ),
        ("api-add-slot-overlaps-ram", MEM - 4096, 8192, libc::EEXIST),
        (
            "api-add-slot-misaligned",
            SLOT_BASE * 2 + 1,
            4096,
            libc::EINVAL,
        ),
        ("api-add-slot-empty", SLOT_BASE * 2, 0, libc::EINVAL),
        ("api-add-slot-too-big", 0, (64 << 30) + 4096, libc::EINVAL),
        (
            "api-add-slot-beyond-2^48",
            (1 << 48) - 4096,
            8192,
            libc::EINVAL,
        ),
    ] {
        t.errno(name, vm.add_slot(gpa, size).map(drop), want);
    }
    let mut got = Vec::new();
    for i in 2..MAX_SLOTS as u64 {
        got.push(vm.add_slot((2 << 30) + i * SLOT_SIZE, 4096));
    }
    t.check(
        "api-add-slot-up-to-the-limit",
        got.iter().all(Result::is_ok),
        &format!("{got:?}"),
    );
    t.errno(
        "api-add-slot-beyond-limit",
        vm.add_slot(3 << 30, 4096).map(drop),
        libc::ENOSPC,
    );
    let mut bitmap = vec![0u64; (SLOT_SIZE / 4096 / 64) as usize];
    t.errno(
        "api-added-slot-has-a-dirty-log",
        vm.dirty_log_at(
            true,
            1,
            bitmap.as_mut_ptr() as u64,
            (bitmap.len() * 8) as u64,
        ),
        0,
    );
    t.errno(
        "api-dirty-log-of-absent-slot",
        vm.dirty_log_at(
            true,
            MAX_SLOTS as u32,
            bitmap.as_mut_ptr() as u64,
            (bitmap.len() * 8) as u64,
        ),
        libc::EINVAL,
    );
}

/// The offset of the first `vmcall` (0F 01 C1) in the image's code after `entry` (the image is
/// a static ELF whose code starts at its first PT_LOAD).
fn rip_after_vmcall(image: &[u8], entry: u64) -> Option<u64> {
    let elf = crate::elf::Image::new(image.to_vec());
    let (off, vaddr) = elf.code_at(entry)?;
    let code = image.get(off..)?;
    let pos = code.windows(3).position(|w| w == [0x0f, 0x01, 0xc1])?;
    Some(vaddr + pos as u64 + 3)
}

/// Runs `regwriter` with `pages` pages at `first` (RSI/RDX/RCX/R8 set through SET_REGS) and
/// checks the exit, GET_REGS, the bytes, and the dirty log of the added slot.
fn guest_run(t: &mut Tally, image: &[u8], mode: u32) {
    let name = |s: &str| format!("api-{s}-mode{mode}");
    let vm = match Vm::open().and_then(|vm| vm.setup(MEM, 1, 0, 0).map(|_| vm)) {
        Ok(v) => v,
        Err(e) => return t.errno(&name("run-setup"), Err(e), 0),
    };
    // The mode is chosen after SETUP, before the first run.
    t.errno(&name("set-mode"), vm.set_mode(mode), 0);
    let stats_mode = vm.stats().map(|s| s.mode);
    t.check(
        &name("stats-mode"),
        stats_mode == Ok(mode),
        &format!("{stats_mode:?}"),
    );
    if let Err(e) = vm.add_slot(SLOT_BASE, SLOT_SIZE) {
        return t.errno(&name("run-add-slot"), Err(e), 0);
    }
    let entry = match vm.load(image) {
        Ok(e) => e,
        Err(e) => return t.errno(&name("run-load"), Err(e), 0),
    };
    let after_vmcall = rip_after_vmcall(image, entry);
    let mut bitmap = vec![0u64; (SLOT_SIZE / 4096 / 64) as usize];
    // Two runs: the second restarts the exited vCPU at the entry point with new registers
    // (SET_REGS on a VMCS that was already launched).
    for (round, first_page, pages) in [(1u64, 3u64, 5u64), (2, 17, 3)] {
        let Ok(mut regs) = vm.get_regs(0) else {
            return t.fail(&name("run-get-regs"), "GET_REGS failed");
        };
        regs.rip = entry;
        regs.rsi = SLOT_BASE + first_page * 4096;
        regs.rdx = pages;
        regs.rcx = 0x5eed_0000 + round;
        regs.r8 = 40 + round;
        t.errno(
            &name(&format!("run{round}-set-regs")),
            vm.set_regs(0, &regs),
            0,
        );
        let r = vm.run_to_end(0, MEM);
        let exited =
            matches!(&r, Ok((resp, _)) if resp.kind == exit_kind::EXIT && resp.code == 41 + round);
        t.check(
            &name(&format!("run{round}-exit-code-from-r8")),
            exited,
            &r.as_ref()
                .map_or_else(|e| format!("errno {e}"), |(x, _)| describe(x)),
        );
        let after = vm.get_regs(0);
        let want_r9 = regs.rsi + pages * 4096;
        t.check(
            &name(&format!("run{round}-get-regs-after-exit")),
            after.as_ref().is_ok_and(|a| {
                a.rdx == 0
                    && a.r9 == want_r9
                    && a.rdi == 41 + round
                    && a.rcx == regs.rcx
                    && Some(a.rip) == after_vmcall
            }),
            &format!("{after:x?}, want r9 {want_r9:#x}, rip {after_vmcall:x?}"),
        );
        let mut buf = [0u8; 8];
        let mut wrong_bytes = Vec::new();
        for p in 0..pages {
            let gpa = regs.rsi + p * 4096;
            let ok = vm.mem(false, gpa, buf.as_mut_ptr() as u64, 8).is_ok()
                && u64::from_le_bytes(buf) == regs.rcx;
            if !ok {
                wrong_bytes.push(gpa);
            }
        }
        t.check(
            &name(&format!("run{round}-guest-wrote-the-slot")),
            wrong_bytes.is_empty(),
            &format!("wrong at {wrong_bytes:x?}"),
        );
        let harvested = vm
            .dirty_log_at(
                true,
                1,
                bitmap.as_mut_ptr() as u64,
                (bitmap.len() * 8) as u64,
            )
            .map(|_| {
                (0..SLOT_SIZE / 4096)
                    .filter(|&i| bitmap[(i / 64) as usize] & (1 << (i % 64)) != 0)
                    .collect::<Vec<_>>()
            });
        let want: Vec<u64> = (first_page..first_page + pages).collect();
        t.check(
            &name(&format!("run{round}-slot-dirty-log-exact")),
            harvested.as_ref() == Ok(&want),
            &format!("harvested {harvested:?}, written {want:?}"),
        );
    }
    // LOAD_ELF again after the runs: the vCPU keeps its registers (only a vCPU that has not
    // run starts at the entry point).
    let before = vm.get_regs(0);
    let reload = vm.load(image);
    let after = vm.get_regs(0);
    t.check(
        &name("load-after-run-keeps-regs"),
        reload.is_ok() && before.is_ok() && after == before,
        &format!("{reload:?}, before {before:x?}, after {after:x?}"),
    );
    // An address outside every slot (below 4 GiB, so the guest maps it) is an MMIO exit.
    if let Ok(mut regs) = vm.get_regs(0) {
        regs.rip = entry;
        regs.rsi = 3 << 30;
        regs.rdx = 1;
        let _ = vm.set_regs(0, &regs);
        let r = vm.run_to_end(0, MEM);
        t.check(
            &name("mmio-outside-every-slot"),
            matches!(&r, Ok((x, _)) if x.kind == exit_kind::MMIO && x.gpa == 3 << 30 && x.write == 1),
            &r.as_ref().map_or_else(|e| format!("errno {e}"), |(x, _)| describe(x)),
        );
    }
    t.errno(&name("set-mode-after-run"), vm.set_mode(3), libc::EBUSY);
}
