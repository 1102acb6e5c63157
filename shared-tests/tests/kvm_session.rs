//! KVM's user API over the session layer, driven as KVM's selftest library drives it (the
//! requests of `tools/testing/selftests/kvm/lib/kvm_util.c` and `lib/x86_64/processor.c`): user
//! memory slots at the top of the guest-physical space, the selftests' long-mode state through
//! SET_SREGS, a ucall through `in` with RDI read back by GET_REGS and completed from the
//! `kvm_run` page, the dirty bitmap with and without manual protection, and the errno of every
//! refused request. The CPU is the SDM model behind a model of VMX that records rule breaks.

use std::collections::BTreeSet;

use smudge_core::abi::Wire;
use smudge_core::dirty::Mode;
use smudge_core::kvm::abi::{
    self as k, cap, exit, run, ClearDirtyLog, Cpuid2, DirtyLog, EnableCap, Ioctl, KvmRegs, MpState,
    Sregs,
};
use smudge_core::platform::{read_bytes, write_bytes};
use smudge_core::session::kvm::{self as sk, IO_DATA};
use smudge_core::session::{Driver, Fail, Session};
use smudge_tests::selftest;
use smudge_tests::session_model::{MockOs, Step};

/// Slot 1 where the selftests put it with MAXPHYADDR 40.
const SLOT1_GPA: u64 = (1 << 40) - (1 << 30);
const SLOT1_PAGES: u64 = 512;
const SLOT1_UADDR: u64 = 0x7f00_4000_0000;
const SLOT0_UADDR: u64 = 0x7f00_0000_0000;
/// The selftests' ucall port.
const UCALL_PORT: u16 = 0x1000;

fn machine() -> (Driver, MockOs<false>) {
    smudge_tests::session_model::skylake(2)
}

struct Kvm<'a> {
    s: &'a Session<MockOs<false>>,
    os: &'a MockOs<false>,
    d: &'a Driver,
}

impl Kvm<'_> {
    fn vm<T: Wire>(&self, ioctl: Ioctl, v: &T) -> Result<u64, Fail> {
        let mut b = vec![0u8; 512];
        let n = v.to_bytes(&mut b).expect("fits");
        b.truncate(n);
        self.s
            .kvm_vm_request(self.os, self.d, ioctl, b.as_ptr() as u64)
    }
    fn vm_val(&self, ioctl: Ioctl, arg: u64) -> Result<u64, Fail> {
        self.s.kvm_vm_request(self.os, self.d, ioctl, arg)
    }
    fn vcpu<T: Wire>(&self, i: u32, ioctl: Ioctl, v: &T) -> Result<u64, Fail> {
        let mut b = vec![0u8; 512];
        let n = v.to_bytes(&mut b).expect("fits");
        b.truncate(n);
        self.s
            .kvm_vcpu_request(self.os, self.d, i, ioctl, b.as_ptr() as u64)
    }
    fn vcpu_get<T: Wire>(&self, i: u32, ioctl: Ioctl) -> Result<T, Fail> {
        let b = vec![0u8; 512];
        self.s
            .kvm_vcpu_request(self.os, self.d, i, ioctl, b.as_ptr() as u64)?;
        Ok(T::from_bytes(&b).expect("decodes"))
    }
    fn run(&self, i: u32) -> Result<u64, Fail> {
        self.s.kvm_vcpu_request(self.os, self.d, i, Ioctl::Run, 0)
    }
    /// KVM_RUN of a guest that writes forever while a signal is pending: EINTR with
    /// KVM_EXIT_INTR.
    fn run_until_signal(&self, i: u32) {
        use std::sync::atomic::Ordering::SeqCst;
        self.os.m.program(i, vec![Step::WriteForever(SLOT1_GPA)]);
        self.os.signal.store(true, SeqCst);
        assert_eq!(self.run(i), Err(Fail::Interrupted));
        assert_eq!(self.run_u32(i, run::EXIT_REASON), exit::INTR);
        self.os.signal.store(false, SeqCst);
    }
    fn region(&self, slot: u32, flags: u32, gpa: u64, size: u64, uaddr: u64) -> Result<u64, Fail> {
        let r = selftest::region(slot, flags, gpa, size, uaddr);
        self.vm(Ioctl::SetUserMemoryRegion2, &r)
    }
    fn dirty_log(&self, slot: u32) -> Result<BTreeSet<u64>, Fail> {
        let bits = vec![0u64; SLOT1_PAGES.div_ceil(64) as usize];
        self.vm(
            Ioctl::GetDirtyLog,
            &DirtyLog {
                slot,
                padding: 0,
                dirty_bitmap: bits.as_ptr() as u64,
            },
        )?;
        Ok((0..SLOT1_PAGES)
            .filter(|i| bits[(i / 64) as usize] >> (i % 64) & 1 != 0)
            .collect())
    }
    fn clear(&self, slot: u32, first: u64, num: u32, mask: &[u64]) -> Result<u64, Fail> {
        self.vm(
            Ioctl::ClearDirtyLog,
            &ClearDirtyLog {
                slot,
                num_pages: num,
                first_page: first,
                dirty_bitmap: mask.as_ptr() as u64,
            },
        )
    }
    /// The vCPU's `kvm_run` page, read through the platform (as user space reads its mapping).
    fn run_page(&self, i: u32) -> u64 {
        self.s.kvm_vcpu_page(self.os, i, 0).expect("kvm_run page") << 12
    }
    fn run_u32(&self, i: u32, off: usize) -> u32 {
        let mut b = [0u8; 4];
        read_bytes(self.os, self.run_page(i), off, &mut b);
        u32::from_le_bytes(b)
    }
    fn run_u8(&self, i: u32, off: usize) -> u8 {
        let mut b = [0u8];
        read_bytes(self.os, self.run_page(i), off, &mut b);
        b[0]
    }
}

/// A VM as the selftests build it: slot 0 (code, no logging), slot 1 (logged), manual
/// protection as asked, one vCPU in long mode with the supported CPUID.
/// A session on the model machine: `body` drives it, then the VM is released; no rule of the
/// model broken, no page left.
fn with_kvm(body: impl FnOnce(&Kvm<'_>)) {
    let (d, os) = machine();
    let mut session = Session::new();
    body(&Kvm {
        s: &session,
        os: &os,
        d: &d,
    });
    assert!(os.m.violations().is_empty(), "{:?}", os.m.violations());
    session.release(&os);
    os.p.assert_all_freed();
}

fn selftest_vm(c: &Kvm<'_>, manual: bool) {
    c.s.kvm_create(c.os, c.d, Some(Mode::Pml)).expect("create");
    assert_eq!(
        c.vm_val(Ioctl::CheckExtension, cap::MANUAL_DIRTY_LOG_PROTECT2.into()),
        Ok(1)
    );
    assert_eq!(
        c.vm_val(Ioctl::CheckExtension, 9999),
        Ok(0),
        "unknown capability"
    );
    c.region(0, 0, 0, 1 << 20, SLOT0_UADDR).expect("slot 0");
    c.region(
        1,
        k::MEM_LOG_DIRTY_PAGES,
        SLOT1_GPA,
        SLOT1_PAGES * 4096,
        SLOT1_UADDR,
    )
    .expect("slot 1");
    if manual {
        c.vm(
            Ioctl::EnableCap,
            &EnableCap {
                cap: cap::MANUAL_DIRTY_LOG_PROTECT2,
                args: [k::MANUAL_PROTECT_ENABLE, 0, 0, 0],
                ..Default::default()
            },
        )
        .expect("manual protect");
    }
    assert_eq!(
        c.vm_val(Ioctl::CreateVcpu, 0),
        Ok(0),
        "vCPU id 0 is index 0"
    );
    let reset: Sregs = c.vcpu_get(0, Ioctl::GetSregs).expect("GET_SREGS");
    c.vcpu(0, Ioctl::SetSregs, &selftest::long_mode(&reset))
        .expect("SET_SREGS");
    let mut regs: KvmRegs = c.vcpu_get(0, Ioctl::GetRegs).expect("GET_REGS");
    regs.rip = 0x40_0000;
    regs.gprs[6] = 0x80_0000; // RSP
    c.vcpu(0, Ioctl::SetRegs, &regs).expect("SET_REGS");
    c.vcpu(
        0,
        Ioctl::SetMpState,
        &MpState {
            mp_state: k::mp_state::RUNNABLE,
        },
    )
    .expect("RUNNABLE");
    // KVM_GET_SUPPORTED_CPUID, then KVM_SET_CPUID2 with it.
    let mut buf = vec![0u8; 8 + 100 * 40];
    buf[..4].copy_from_slice(&100u32.to_le_bytes());
    sk::system_request(c.os, Ioctl::GetSupportedCpuid, buf.as_ptr() as u64, true)
        .expect("supported");
    let n = Cpuid2::from_bytes(&buf).expect("hdr").nent as usize;
    assert!(n > 5, "{n} supported CPUID entries");
    c.s.kvm_vcpu_request(c.os, c.d, 0, Ioctl::SetCpuid2, buf.as_ptr() as u64)
        .expect("SET_CPUID2");
}

#[test]
fn a_ucall_round_trip_and_the_dirty_log() {
    for manual in [false, true] {
        with_kvm(|c| {
            selftest_vm(&c, manual);
            let pages = [0u64, 1, 63, 64, 300, 511];
            let mut steps: Vec<Step> = pages
                .iter()
                .map(|p| Step::Write(SLOT1_GPA + p * 4096 + 8))
                .collect();
            steps.push(Step::Write(0x1000)); // slot 0: not logged
            steps.push(Step::PortIn {
                port: UCALL_PORT,
                size: 1,
                rdi: 0x1234_5678,
            });
            steps.push(Step::RecordRax);
            steps.push(Step::PortOut {
                port: UCALL_PORT,
                size: 4,
                value: 0xdead_beef,
            });
            steps.push(Step::Hlt);
            steps.push(Step::Write(SLOT1_GPA + 7 * 4096));
            steps.push(Step::Hlt);
            c.os.m.program(0, steps);
            // The ucall: an IN exit, RDI from GET_REGS, the data from the kvm_run page.
            assert_eq!(c.run(0), Ok(0));
            assert_eq!(c.run_u32(0, run::EXIT_REASON), exit::IO);
            assert_eq!(c.run_u8(0, run::IO_DIRECTION), k::EXIT_IO_IN);
            assert_eq!(c.run_u8(0, run::IO_SIZE), 1);
            let mut port = [0u8; 2];
            read_bytes(c.os, c.run_page(0), run::IO_PORT, &mut port);
            assert_eq!(u16::from_le_bytes(port), UCALL_PORT);
            assert_eq!(c.run_u32(0, run::IO_DATA_OFFSET), IO_DATA as u32);
            let regs: KvmRegs = c.vcpu_get(0, Ioctl::GetRegs).expect("GET_REGS");
            assert_eq!(regs.gprs[5], 0x1234_5678, "RDI as the guest left it");
            write_bytes(c.os, c.run_page(0), IO_DATA, &[0x5a]);
            // As the selftests' get_ucall: complete the I/O with immediate_exit (EINTR, the
            // record still says IO), then run on.
            write_bytes(c.os, c.run_page(0), run::IMMEDIATE_EXIT, &[1]);
            assert_eq!(c.run(0), Err(Fail::Interrupted));
            assert_eq!(c.run_u32(0, run::EXIT_REASON), exit::IO);
            write_bytes(c.os, c.run_page(0), run::IMMEDIATE_EXIT, &[0]);
            assert_eq!(c.run(0), Ok(0));
            assert_eq!(
                c.os.m.recorded().last().map(|r| r & 0xff),
                Some(0x5a),
                "AL from the page"
            );
            assert_eq!(c.run_u32(0, run::EXIT_REASON), exit::IO);
            assert_eq!(c.run_u8(0, run::IO_DIRECTION), k::EXIT_IO_OUT);
            assert_eq!(c.run_u32(0, IO_DATA), 0xdead_beef);
            assert_eq!(c.run(0), Ok(0));
            assert_eq!(c.run_u32(0, run::EXIT_REASON), exit::HLT);
            // HLT without an interrupt controller: the next KVM_RUN goes on.
            assert_eq!(c.run(0), Ok(0));
            assert_eq!(c.run_u32(0, run::EXIT_REASON), exit::HLT);
            let want: BTreeSet<u64> = pages.iter().copied().chain([7]).collect();
            // Slot 0 logs nothing: ENOENT (KVM: no dirty bitmap).
            assert_eq!(c.dirty_log(0), Err(Fail::NoEntry));
            assert_eq!(c.dirty_log(5), Err(Fail::NoEntry), "no such slot");
            assert_eq!(c.dirty_log(1), Ok(want.clone()));
            if manual {
                // GET is a snapshot; CLEAR re-arms the masked pages only.
                assert_eq!(c.dirty_log(1), Ok(want.clone()));
                let mut mask = vec![0u64; 8];
                mask[0] = 1 << 1 | 1 << 63; // pages 1 and 63
                assert_eq!(c.clear(1, 0, 64, &mask), Ok(0));
                let mut left = want.clone();
                left.remove(&1);
                left.remove(&63);
                assert_eq!(c.dirty_log(1), Ok(left));
                // KVM's rules: first page a multiple of 64, the count too unless it ends the slot.
                assert_eq!(c.clear(1, 1, 64, &mask), Err(Fail::Invalid));
                assert_eq!(c.clear(1, 0, 65, &mask), Err(Fail::Invalid));
                assert_eq!(c.clear(1, 448, 64, &mask), Ok(0));
                assert_eq!(c.clear(1, 448, 65, &mask), Err(Fail::Invalid));
                assert_eq!(c.clear(1, 512, 0, &mask), Ok(0));
                assert_eq!(c.clear(0, 0, 64, &mask), Err(Fail::NoEntry));
            } else {
                // Without manual protection GET clears.
                assert_eq!(c.dirty_log(1), Ok(BTreeSet::new()));
            }
        });
    }
}

#[test]
fn refused_requests_get_kvms_errno() {
    with_kvm(|c| {
        selftest_vm(&c, true);
        let big = 1u64 << 30;
        // Overlap: EEXIST; misaligned, read-only, beyond user space, an address space: EINVAL.
        assert_eq!(
            c.region(2, 0, SLOT1_GPA + 4096, 4096, 0x7f10_0000_0000),
            Err(Fail::Exists)
        );
        assert_eq!(
            c.region(2, 0, 0x1000_0001, 4096, 0x7f10_0000_0000),
            Err(Fail::Invalid)
        );
        assert_eq!(
            c.region(2, k::MEM_READONLY, 0x1000_0000, 4096, 0x7f10_0000_0000),
            Err(Fail::Invalid)
        );
        assert_eq!(
            c.region(2, 0, 0x1000_0000, big, 0x7fff_ffff_0000),
            Err(Fail::Invalid)
        );
        assert_eq!(
            c.region(1 << 16 | 2, 0, 0x1000_0000, 4096, 0x7f10_0000_0000),
            Err(Fail::Invalid)
        );
        // Deleting a slot that does not exist: EINVAL; the existing one's size may not change.
        assert_eq!(c.region(9, 0, 0, 0, 0), Err(Fail::Invalid));
        assert_eq!(
            c.region(1, 0, SLOT1_GPA, 4096, SLOT1_UADDR),
            Err(Fail::Invalid)
        );
        // Unmapped user memory: EFAULT, nothing stays pinned.
        let pins = c.os.p.user_pins();
        c.os.p.unmap_user(0x7f20_0000_0000, 0x7f20_0000_1000);
        assert_eq!(
            c.region(3, 0, 0x2000_0000, 8 * 4096, 0x7f20_0000_0000 - 4096),
            Err(Fail::Fault)
        );
        assert_eq!(c.os.p.user_pins(), pins);
        // vCPUs: a duplicate id, an id beyond KVM's limit.
        assert_eq!(c.vm_val(Ioctl::CreateVcpu, 0), Err(Fail::Exists));
        assert_eq!(c.vm_val(Ioctl::CreateVcpu, 5000), Err(Fail::Invalid));
        // Capabilities: INITIALLY_SET is not offered; an unknown one is refused.
        let en = |cap, arg| EnableCap {
            cap,
            args: [arg, 0, 0, 0],
            ..Default::default()
        };
        assert_eq!(
            c.vm(Ioctl::EnableCap, &en(cap::MANUAL_DIRTY_LOG_PROTECT2, 3)),
            Err(Fail::Invalid)
        );
        assert_eq!(c.vm(Ioctl::EnableCap, &en(12345, 0)), Err(Fail::Invalid));
        // The vCPU's requests.
        let bad = Sregs {
            cr0: 1 << 31, // PG without PE
            ..c.vcpu_get(0, Ioctl::GetSregs).expect("sregs")
        };
        assert_eq!(c.vcpu(0, Ioctl::SetSregs, &bad), Err(Fail::Invalid));
        assert_eq!(
            c.vcpu(0, Ioctl::SetMpState, &MpState { mp_state: 3 }),
            Err(Fail::Invalid),
            "HALTED needs an in-kernel local APIC"
        );
        let mut many = vec![0u8; 8 + 200 * 40];
        many[..4].copy_from_slice(&200u32.to_le_bytes());
        assert_eq!(
            c.s.kvm_vcpu_request(c.os, c.d, 0, Ioctl::SetCpuid2, many.as_ptr() as u64),
            Err(Fail::TooBig)
        );
        let small = vec![0u8; 8 + 40];
        small_nent(&small, 1);
        assert_eq!(
            c.s.kvm_vcpu_request(c.os, c.d, 0, Ioctl::GetCpuid2, small.as_ptr() as u64),
            Err(Fail::TooBig)
        );
        assert_eq!(
            c.s.kvm_vcpu_request(c.os, c.d, 7, Ioctl::GetRegs, small.as_ptr() as u64),
            Err(Fail::Invalid),
            "no such vCPU"
        );
        // A bad pointer: EFAULT.
        assert_eq!(
            c.s.kvm_vm_request(c.os, c.d, Ioctl::GetDirtyLog, 8),
            Err(Fail::Fault)
        );
        // immediate_exit: EINTR, the guest not entered, the last exit record left as it was (KVM
        // writes no exit_reason then).
        let entries = c.os.m.entries().0;
        let before = c.run_u32(0, run::EXIT_REASON);
        write_bytes(c.os, c.run_page(0), run::IMMEDIATE_EXIT, &[1]);
        assert_eq!(c.run(0), Err(Fail::Interrupted));
        assert_eq!(c.run_u32(0, run::EXIT_REASON), before);
        assert_eq!(c.os.m.entries().0, entries);
        write_bytes(c.os, c.run_page(0), run::IMMEDIATE_EXIT, &[0]);
        // A pending signal: EINTR with KVM_EXIT_INTR.
        c.run_until_signal(0);
    });
}

fn small_nent(b: &[u8], n: u32) {
    // The buffer is the caller's "user memory": written through its pointer as user space would.
    // SAFETY: `b` has at least 4 bytes and nothing else borrows it mutably meanwhile.
    unsafe { std::ptr::copy_nonoverlapping(n.to_le_bytes().as_ptr(), b.as_ptr().cast_mut(), 4) };
}

#[test]
fn the_reset_state_fails_entry_with_the_rule() {
    with_kvm(|c| {
        c.s.kvm_create(c.os, c.d, None).expect("create");
        c.region(0, 0, 0, 1 << 20, SLOT0_UADDR).expect("slot 0");
        assert_eq!(c.vm_val(Ioctl::CreateVcpu, 3), Ok(0));
        let entries = c.os.m.entries().0;
        assert_eq!(c.run(0), Ok(0));
        assert_eq!(c.run_u32(0, run::EXIT_REASON), exit::FAIL_ENTRY);
        assert_eq!(
            c.run_u32(0, run::FAIL_ENTRY_REASON),
            33 | 1 << 31,
            "invalid guest state, refused before VMLAUNCH"
        );
        assert_eq!(c.os.m.entries().0, entries, "the guest never ran");
    });
}

#[test]
fn moving_and_unlogging_a_slot() {
    with_kvm(|c| {
        selftest_vm(&c, true);
        c.os.m
            .program(0, vec![Step::Write(SLOT1_GPA + 4096), Step::Hlt]);
        assert_eq!(c.run(0), Ok(0));
        assert_eq!(c.dirty_log(1), Ok([1].into()));
        // Logging off: no dirty log any more; on again: a clean log.
        assert_eq!(
            c.region(1, 0, SLOT1_GPA, SLOT1_PAGES * 4096, SLOT1_UADDR),
            Ok(0)
        );
        assert_eq!(c.dirty_log(1), Err(Fail::NoEntry));
        assert_eq!(
            c.region(
                1,
                k::MEM_LOG_DIRTY_PAGES,
                SLOT1_GPA,
                SLOT1_PAGES * 4096,
                SLOT1_UADDR
            ),
            Ok(0)
        );
        assert_eq!(c.dirty_log(1), Ok(BTreeSet::new()));
        // A move keeps the memory: what the guest wrote is at the new address.
        let new_gpa = 0x4000_0000;
        assert_eq!(
            c.region(
                1,
                k::MEM_LOG_DIRTY_PAGES,
                new_gpa,
                SLOT1_PAGES * 4096,
                SLOT1_UADDR
            ),
            Ok(0)
        );
        assert_eq!(
            c.os.p.user_pins(),
            256 + SLOT1_PAGES,
            "slot 0 and slot 1 pinned once each"
        );
        c.os.m
            .program(0, vec![Step::Write(new_gpa + 2 * 4096), Step::Hlt]);
        assert_eq!(c.run(0), Ok(0));
        assert_eq!(c.dirty_log(1), Ok([2].into()));
        // Delete both: nothing stays pinned.
        assert_eq!(c.region(1, 0, 0, 0, 0), Ok(0));
        assert_eq!(c.region(0, 0, 0, 0, 0), Ok(0));
        assert_eq!(c.os.p.user_pins(), 0);
    });
}

#[test]
fn check_extension_answers() {
    assert_eq!(sk::check_extension(cap::MAX_VCPUS.into(), true), 8);
    assert_eq!(sk::check_extension(cap::NR_MEMSLOTS.into(), true), 8);
    assert_eq!(sk::check_extension(cap::USER_MEMORY2.into(), true), 1);
    assert_eq!(sk::check_extension(cap::IMMEDIATE_EXIT.into(), true), 1);
    assert_eq!(
        sk::check_extension(cap::MANUAL_DIRTY_LOG_PROTECT2.into(), true),
        1
    );
    // The dirty ring: 1 MiB at most, in the modes that can feed it.
    for c in [cap::DIRTY_LOG_RING, cap::DIRTY_LOG_RING_ACQ_REL] {
        assert_eq!(sk::check_extension(c.into(), true), 1 << 20);
        assert_eq!(sk::check_extension(c.into(), false), 0, "A/D scan");
    }
    assert_eq!(sk::check_extension(u64::MAX, true), 0);
}

/// KVM_SET_SIGNAL_MASK: the mask is in force while the guest runs and only then (KVM's
/// kvm_sigset_activate/deactivate around the run), whichever way KVM_RUN ends: an exit, a
/// signal, immediate_exit, a refused kvm_run page; and not at all once the mask is cleared.
#[test]
fn the_signal_mask_holds_only_inside_kvm_run() {
    with_kvm(|c| {
        selftest_vm(&c, false);
        let mask = |m: Option<u64>| {
            let mut b = [0u8; 12];
            b[..4].copy_from_slice(&8u32.to_le_bytes());
            b[4..].copy_from_slice(&m.unwrap_or(0).to_le_bytes());
            let arg = if m.is_some() { b.as_ptr() as u64 } else { 0 };
            c.s.kvm_vcpu_request(c.os, c.d, 0, Ioctl::SetSignalMask, arg)
        };
        // The selftests' mask: everything the thread blocks but SIG_IPI (SIGUSR1, bit 9).
        assert_eq!(mask(Some(0)), Ok(0));
        let mut bad = [0u8; 12];
        bad[..4].copy_from_slice(&128u32.to_le_bytes());
        assert_eq!(
            c.s.kvm_vcpu_request(c.os, c.d, 0, Ioctl::SetSignalMask, bad.as_ptr() as u64),
            Err(Fail::Invalid),
            "KVM takes 8-byte masks only"
        );
        c.os.m.program(
            0,
            vec![Step::PortOut {
                port: UCALL_PORT,
                size: 1,
                value: 1,
            }],
        );
        // An exit to user space.
        assert_eq!(c.run(0), Ok(0));
        assert_eq!(c.run_u32(0, run::EXIT_REASON), exit::IO);
        let stays = c.os.masked_stays();
        assert!(stays > 0, "the guest ran with the mask in force");
        assert_eq!(c.os.thread_mask(), None, "the thread's own mask is back");
        // A pending signal ends the run with EINTR.
        c.run_until_signal(0);
        assert_eq!(c.os.thread_mask(), None);
        // immediate_exit and a refused kvm_run page end it before the guest: no mask at all.
        write_bytes(c.os, c.run_page(0), run::IMMEDIATE_EXIT, &[1]);
        let before = c.os.masked_stays();
        assert_eq!(c.run(0), Err(Fail::Interrupted));
        write_bytes(c.os, c.run_page(0), run::IMMEDIATE_EXIT, &[0]);
        write_bytes(c.os, c.run_page(0), run::CR8, &16u64.to_le_bytes());
        assert_eq!(c.run(0), Err(Fail::Invalid), "CR8 above 15");
        write_bytes(c.os, c.run_page(0), run::CR8, &0u64.to_le_bytes());
        assert_eq!((c.os.masked_stays(), c.os.thread_mask()), (before, None));
        // Cleared: the guest runs under the thread's own mask.
        assert_eq!(mask(None), Ok(0));
        c.os.m.program(0, vec![Step::Hlt]);
        assert_eq!(c.run(0), Ok(0));
        assert_eq!(c.run_u32(0, run::EXIT_REASON), exit::HLT);
        assert_eq!(c.os.masked_stays(), before, "no mask once cleared");
    });
}

/// The descriptors' lifecycle as a shim drives it (`kvm_ioctl`, `kvm_mmap`, `kvm_put`):
/// KVM_CREATE_VM on `/dev/kvm` makes a VM handle, KVM_CREATE_VCPU on it a vCPU handle that
/// holds the VM too; the VM outlives its own descriptor while a vCPU's is open, and the last
/// one to close frees every page. An allocation failure makes no handle and leaks nothing.
#[test]
fn descriptors_keep_their_vm_until_the_last_closes() {
    use smudge_tests::session_model::{fail_alloc_after, fail_allocs};
    let (d, os) = machine();
    let before = os.p.live_pages();
    // Each of KVM_CREATE_VM's allocations fails in turn (the VM, what it makes, the handle):
    // NoMemory, and no page held.
    let mut failures = 0;
    let vm = loop {
        fail_alloc_after(failures);
        match sk::kvm_ioctl(&os, &d, None, Ioctl::CreateVm.number(), 0, 0) {
            Err(e) => assert_eq!((e, os.p.live_pages()), (Fail::NoMemory, before)),
            Ok((_, vm)) => break vm.expect("a VM handle"),
        }
        failures += 1;
    };
    fail_allocs(0);
    assert!(failures >= 2, "the VM and its handle are allocations");
    assert!(vm.is_vm());
    // Each of KVM_CREATE_VCPU's: NoMemory, and only the VM's pages held; a vCPU made before its
    // handle failed goes again (as KVM destroys a vCPU whose descriptor it cannot make), so
    // its id is free. Then a vCPU handle.
    let vm_pages = os.p.live_pages();
    let mut failures = 0;
    let vcpu = loop {
        fail_alloc_after(failures);
        match sk::kvm_ioctl(&os, &d, Some(&vm), Ioctl::CreateVcpu.number(), 0, 0) {
            Err(e) => assert_eq!((e, os.p.live_pages()), (Fail::NoMemory, vm_pages)),
            Ok((_, vcpu)) => break vcpu.expect("a vCPU handle"),
        }
        failures += 1;
    };
    fail_allocs(0);
    assert!(failures >= 2, "the vCPU and its handle are allocations");
    // The shim could not make a descriptor for it (no file, no descriptor number): it goes too,
    // and the same id is created again.
    sk::kvm_put(&os, vcpu, false);
    assert_eq!(
        os.p.live_pages(),
        vm_pages,
        "the vCPU without a descriptor is gone"
    );
    let (_, vcpu) = sk::kvm_ioctl(&os, &d, Some(&vm), Ioctl::CreateVcpu.number(), 0, 0)
        .expect("vCPU 0 again, after its first descriptor could not be made");
    let vcpu = vcpu.expect("a vCPU handle");
    assert_eq!(
        sk::kvm_ioctl(&os, &d, Some(&vm), Ioctl::CreateVcpu.number(), 0, 0).err(),
        Some(Fail::Exists),
        "a vCPU with a descriptor keeps its id"
    );
    assert!(!vcpu.is_vm());
    // A VM request on a vCPU's descriptor names nothing there; the VM's has no mapping.
    let wrong = sk::kvm_ioctl(&os, &d, Some(&vcpu), Ioctl::CreateVcpu.number(), 1, 0);
    assert_eq!(wrong.err(), Some(Fail::NoSuchRequest));
    assert_eq!(
        sk::kvm_mmap(&os, &vm, 0, 1, &mut |_, _| Ok(())),
        Err(Fail::Invalid)
    );
    let with_vm = os.p.live_pages();
    assert!(with_vm > before);

    sk::kvm_put(&os, vm, true);
    assert_eq!(
        os.p.live_pages(),
        with_vm,
        "the vCPU's descriptor still holds the VM"
    );
    let regs = [0u8; 512];
    sk::kvm_ioctl(
        &os,
        &d,
        Some(&vcpu),
        Ioctl::GetRegs.number(),
        regs.as_ptr() as u64,
        0,
    )
    .expect("GET_REGS after the VM's descriptor closed");
    let mut frames = Vec::new();
    sk::kvm_mmap(&os, &vcpu, 0, 1, &mut |i, f| {
        frames.push((i, f));
        Ok(())
    })
    .expect("mmap of kvm_run");
    assert_eq!(frames.len(), 1);

    sk::kvm_put(&os, vcpu, true);
    assert_eq!(
        os.p.live_pages(),
        before,
        "the last descriptor freed every page"
    );
}
