//! KVM's dirty ring on smudge (KVM_CAP_DIRTY_LOG_RING_ACQ_REL), driven as KVM's dirty_log_test
//! drives it: the ring enabled before the vCPUs, entries pushed from the PML buffer at every exit
//! or from write-protect faults, collected by user space (flags DIRTY, then RESET), re-armed by
//! KVM_RESET_DIRTY_RINGS, and KVM_EXIT_DIRTY_RING_FULL at the soft limit until a reset. The
//! oracle is the SDM model's record of the guest's writes.

use smudge_core::abi::Wire;
use smudge_core::dirty::Mode;
use smudge_core::kvm::abi::{self as k, cap, exit, run, DirtyLog, EnableCap, Ioctl, Sregs};
use smudge_core::platform::{read_bytes, write_bytes, Platform};
use smudge_core::session::{Driver, Fail, Session};
use smudge_tests::session_model::{MockOs, Step};

const SLOT1_GPA: u64 = (1 << 40) - (1 << 30);
const SLOT1_PAGES: u64 = 2048;
/// 1,024 entries.
const RING_BYTES: u64 = 16 << 10;

struct Vm {
    s: Session<MockOs<false>>,
    os: MockOs<false>,
    d: Driver,
}

impl Vm {
    fn new(mode: Mode) -> Vm {
        let (d, os) = smudge_tests::session_model::skylake::<false>(2);
        let s = Session::new();
        s.kvm_create(&os, &d, Some(mode)).expect("create");
        Vm { s, os, d }
    }
    fn vm<T: Wire>(&self, ioctl: Ioctl, v: &T) -> Result<u64, Fail> {
        let mut b = vec![0u8; 512];
        let n = v.to_bytes(&mut b).expect("fits");
        b.truncate(n);
        self.s
            .kvm_vm_request(&self.os, &self.d, ioctl, b.as_ptr() as u64)
    }
    fn ring(&self, bytes: u64) -> Result<u64, Fail> {
        self.vm(
            Ioctl::EnableCap,
            &EnableCap {
                cap: cap::DIRTY_LOG_RING_ACQ_REL,
                args: [bytes, 0, 0, 0],
                ..Default::default()
            },
        )
    }
    fn region(&self, slot: u32, flags: u32, gpa: u64, pages: u64, uaddr: u64) {
        let r = smudge_tests::selftest::region(slot, flags, gpa, pages * 4096, uaddr);
        self.vm(Ioctl::SetUserMemoryRegion2, &r).expect("region");
    }
    /// Slot 1 with dirty logging, as the selftests make it, and vCPU 0 in long mode.
    fn logged_slot_and_vcpu(&self) {
        self.region(
            1,
            k::MEM_LOG_DIRTY_PAGES,
            SLOT1_GPA,
            SLOT1_PAGES,
            0x7f00_4000_0000,
        );
        self.vcpu_in_long_mode();
    }
    /// Releases the VM: no rule of the model broken, no page left.
    fn finish(mut self) {
        assert!(
            self.os.m.violations().is_empty(),
            "{:?}",
            self.os.m.violations()
        );
        self.s.release(&self.os);
        self.os.p.assert_all_freed();
    }
    fn vcpu_in_long_mode(&self) {
        assert_eq!(
            self.s
                .kvm_vm_request(&self.os, &self.d, Ioctl::CreateVcpu, 0),
            Ok(0)
        );
        let b = vec![0u8; 512];
        self.s
            .kvm_vcpu_request(&self.os, &self.d, 0, Ioctl::GetSregs, b.as_ptr() as u64)
            .expect("GET_SREGS");
        let s = smudge_tests::selftest::long_mode(&Sregs::from_bytes(&b).expect("sregs"));
        let mut out = vec![0u8; 512];
        s.to_bytes(&mut out).expect("fits");
        self.s
            .kvm_vcpu_request(&self.os, &self.d, 0, Ioctl::SetSregs, out.as_ptr() as u64)
            .expect("SET_SREGS");
    }
    fn run(&self) -> (Result<u64, Fail>, u32) {
        let r = self.s.kvm_vcpu_request(&self.os, &self.d, 0, Ioctl::Run, 0);
        let page = self.s.kvm_vcpu_page(&self.os, 0, 0).expect("run page") << 12;
        let mut b = [0u8; 4];
        read_bytes(&self.os, page, run::EXIT_REASON, &mut b);
        (r, u32::from_le_bytes(b))
    }
    /// Entry `i` of the ring as user space sees it through its mapping: (flags, slot, offset).
    fn entry(&self, i: u64) -> (u32, u32, u64) {
        let byte = (i % (RING_BYTES / 16)) * 16;
        let pfn = self
            .s
            .kvm_vcpu_page(&self.os, 0, k::DIRTY_LOG_PAGE_OFFSET + byte / 4096)
            .expect("ring page");
        let mut b = [0u8; 16];
        read_bytes(&self.os, pfn << 12, (byte % 4096) as usize, &mut b);
        let g = k::DirtyGfn::from_bytes(&b).expect("entry");
        (g.flags, g.slot, g.offset)
    }
    /// Collects every DIRTY entry from `*next` (marking it RESET), as dirty_ring_collect_one.
    fn collect(&self, next: &mut u64) -> Vec<u64> {
        let mut out = Vec::new();
        loop {
            let (flags, slot, off) = self.entry(*next);
            if flags & k::DIRTY_GFN_F_DIRTY == 0 {
                return out;
            }
            assert_eq!(slot, 1, "entries name KVM's slot id");
            let byte = (*next % (RING_BYTES / 16)) * 16;
            let pfn = self
                .s
                .kvm_vcpu_page(&self.os, 0, k::DIRTY_LOG_PAGE_OFFSET + byte / 4096)
                .expect("ring page");
            write_bytes(
                &self.os,
                pfn << 12,
                (byte % 4096) as usize,
                &(flags | k::DIRTY_GFN_F_RESET).to_le_bytes(),
            );
            out.push(off);
            *next += 1;
        }
    }
    fn reset(&self) -> Result<u64, Fail> {
        self.s
            .kvm_vm_request(&self.os, &self.d, Ioctl::ResetDirtyRings, 0)
    }
}

#[test]
fn enabling_the_ring_follows_kvms_rules() {
    let v = Vm::new(Mode::Pml);
    // With PML the reserve is 576 entries: a 4 KiB ring is too small.
    assert_eq!(v.ring(4096), Err(Fail::Invalid));
    assert_eq!(v.ring(3 << 12), Err(Fail::Invalid), "not a power of two");
    assert_eq!(v.ring(2 << 20), Err(Fail::TooBig));
    assert_eq!(v.ring(RING_BYTES), Ok(0));
    assert_eq!(v.ring(RING_BYTES), Err(Fail::Invalid), "only once");
    let w = Vm::new(Mode::WriteProtect);
    assert_eq!(w.ring(4096), Ok(0), "write-protect needs no PML reserve");
    let a = Vm::new(Mode::AdScan);
    assert_eq!(
        a.ring(RING_BYTES),
        Err(Fail::Invalid),
        "A/D scanning cannot feed a ring"
    );
    let c = Vm::new(Mode::Pml);
    c.vcpu_in_long_mode();
    assert_eq!(
        c.ring(RING_BYTES),
        Err(Fail::Invalid),
        "after a vCPU exists"
    );
    for mut vm in [v, w, a, c] {
        vm.s.release(&vm.os);
        vm.os.p.assert_all_freed();
    }
}

#[test]
fn writes_arrive_in_the_ring_and_a_reset_rearms_them() {
    for mode in [Mode::Pml, Mode::WriteProtect] {
        let v = Vm::new(mode);
        v.ring(RING_BYTES).expect("ring");
        v.region(0, 0, 0, 256, 0x7f00_0000_0000);
        v.logged_slot_and_vcpu();
        let pages = [5u64, 6, 700, 5, 2047];
        let mut steps: Vec<Step> = pages
            .iter()
            .map(|p| Step::Write(SLOT1_GPA + p * 4096))
            .collect();
        steps.push(Step::Write(0x1000)); // slot 0 does not log
        steps.push(Step::Hlt);
        v.os.m.program(0, steps);
        assert_eq!(v.run(), (Ok(0), exit::HLT), "{mode:?}");
        // Each page once, in the order written (page 5 was still dirty the second time).
        let mut next = 0;
        assert_eq!(v.collect(&mut next), vec![5, 6, 700, 2047], "{mode:?}");
        // The bitmap requests have nothing to say for a ring VM.
        let bits = vec![0u64; 64];
        assert_eq!(
            v.vm(
                Ioctl::GetDirtyLog,
                &DirtyLog {
                    slot: 1,
                    padding: 0,
                    dirty_bitmap: bits.as_ptr() as u64
                }
            ),
            Err(Fail::NoDevice)
        );
        assert_eq!(v.reset(), Ok(4), "{mode:?}: the collected entries");
        assert_eq!(v.entry(0).0, 0, "a reset entry is free again");
        assert_eq!(v.reset(), Ok(0), "nothing more collected");
        // Re-armed: the same pages written again arrive again.
        v.os.m.program(
            0,
            vec![
                Step::Write(SLOT1_GPA + 6 * 4096),
                Step::Write(SLOT1_GPA + 2047 * 4096),
                Step::Hlt,
            ],
        );
        assert_eq!(v.run(), (Ok(0), exit::HLT));
        assert_eq!(v.collect(&mut next), vec![6, 2047], "{mode:?}");
        assert_eq!(v.reset(), Ok(2));
        v.finish();
    }
}

#[test]
fn a_full_ring_stops_the_vcpu_until_it_is_reset() {
    for mode in [Mode::Pml, Mode::WriteProtect] {
        let v = Vm::new(mode);
        v.ring(RING_BYTES).expect("ring");
        v.logged_slot_and_vcpu();
        let soft = 1024 - if mode == Mode::Pml { 576 } else { 64 };
        // Every page twice: the second write logs again only if a reset re-armed the page
        // (resets go in batches of 16 across the ring's pages and its wrap).
        let wrote: Vec<u64> = (0..1500u64).collect();
        let mut steps: Vec<Step> = wrote
            .iter()
            .chain(&wrote)
            .map(|p| Step::Write(SLOT1_GPA + p * 4096))
            .collect();
        steps.push(Step::Hlt);
        v.os.m.program(0, steps);
        let mut next = 0;
        let mut seen = Vec::new();
        let mut fulls = 0;
        loop {
            let (r, reason) = v.run();
            assert_eq!(r, Ok(0));
            if reason == exit::HLT {
                break;
            }
            assert_eq!(reason, exit::DIRTY_RING_FULL, "{mode:?}");
            fulls += 1;
            let used = v.collect(&mut next);
            assert!(
                used.len() as u64 >= soft && used.len() < 1024,
                "{mode:?}: {} entries at the soft limit {soft}",
                used.len()
            );
            // Still full until the reset: KVM_RUN exits at once, the guest not entered.
            let entries = v.os.m.entries().0;
            assert_eq!(v.run(), (Ok(0), exit::DIRTY_RING_FULL));
            assert_eq!(v.os.m.entries().0, entries);
            assert_eq!(v.reset(), Ok(used.len() as u64));
            seen.extend(used);
        }
        seen.extend(v.collect(&mut next));
        assert!(fulls >= 2, "{mode:?}: 3,000 writes fill a 1,024-entry ring");
        // Write-protect: the write that made the ring full re-executes after the reset that
        // re-protected its page, and is logged again (as in KVM): at most one extra per exit.
        let mut count = std::collections::BTreeMap::new();
        for p in &seen {
            *count.entry(*p).or_insert(0u32) += 1;
        }
        assert!(
            wrote.iter().all(|p| count.get(p).is_some_and(|&n| n >= 2)),
            "{mode:?}: every page at least twice"
        );
        let extra = seen.len() - 2 * wrote.len();
        assert!(
            count.len() == wrote.len() && extra <= if mode == Mode::Pml { 0 } else { fulls },
            "{mode:?}: {extra} entries beyond two per page, {fulls} full exits"
        );
        v.finish();
    }
}

#[test]
fn the_ring_maps_only_where_it_is() {
    let mut v = Vm::new(Mode::Pml);
    v.ring(RING_BYTES).expect("ring");
    v.vcpu_in_long_mode();
    let os = &v.os;
    assert!(v.s.kvm_vcpu_page(os, 0, k::DIRTY_LOG_PAGE_OFFSET).is_ok());
    assert!(v
        .s
        .kvm_vcpu_page(os, 0, k::DIRTY_LOG_PAGE_OFFSET + 3)
        .is_ok());
    assert_eq!(
        v.s.kvm_vcpu_page(os, 0, k::DIRTY_LOG_PAGE_OFFSET + 4),
        Err(Fail::Invalid),
        "beyond the 16 KiB ring"
    );
    assert_eq!(v.s.kvm_vcpu_page(os, 0, 1), Err(Fail::Invalid));
    let page = v.s.kvm_vcpu_page(os, 0, 0).expect("kvm_run") << 12;
    assert!(os.p.is_live(page));
    let _ = os.page(page);
    v.s.release(&v.os);
    v.os.p.assert_all_freed();
}
