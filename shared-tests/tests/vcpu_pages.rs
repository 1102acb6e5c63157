//! A vCPU's pages (`vcpu`): the VMCS region header and MSR bitmap, the per-vCPU page cache the
//! exit handler backs guest memory from, and page accounting, on the mock platform (which
//! catches leaks, double frees and foreign pages).

use smudge_core::dirty::Mode;
use smudge_core::ept::EptFeatures;
use smudge_core::platform::Platform;
use smudge_core::vcpu::{Cached, PageCache, VcpuPages, CACHE_PAGES, PAGES_PER_FAULT};
use smudge_core::vm::{Fault, Vm};
use smudge_core::vmx::caps::VmxCaps;
use smudge_core::vmx::hw::HwVcpu;
use smudge_tests::platform::MockPlatform;

fn word(p: &MockPlatform, hpa: u64, i: usize) -> u64 {
    p.page(hpa)[i].load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
fn vcpu_pages_start_with_the_revision_id_and_the_msr_bitmap() {
    let p = MockPlatform::new();
    // IA32_VMX_BASIC of Bochs skylake_x: revision 0x2b in bits 30:0 (SDM A.1).
    let caps = VmxCaps {
        basic: 0x00d8_1000_0000_002b,
        ..VmxCaps::default()
    };
    let mut pages = VcpuPages::alloc(&p, &caps).expect("pages");
    assert_eq!(p.live_pages(), 3);
    // SDM 25.2: the first 4 bytes hold the revision id, bit 31 (shadow VMCS) clear; the next 4
    // (VMX-abort indicator) are 0.
    assert_eq!(word(&p, pages.vmcs, 0), 0x2b);
    assert!(
        (0..512).all(|i| word(&p, pages.pml, i) == 0),
        "PML buffer zeroed"
    );
    // MSR bitmap (SDM 25.6.9): EFER (0xC0000080) read and write pass through, LSTAR (0xC0000082)
    // does not. Read-high starts at byte 1024, write-high at byte 3072.
    let bit =
        |byte: usize, b: usize| word(&p, pages.msr_bitmap, byte / 8) >> ((byte % 8) * 8 + b) & 1;
    assert_eq!((bit(1024 + 0x80 / 8, 0), bit(3072 + 0x80 / 8, 0)), (0, 0));
    assert_eq!((bit(1024 + 0x82 / 8, 2), bit(3072 + 0x82 / 8, 2)), (1, 1));
    assert_eq!(word(&p, pages.msr_bitmap, 0), u64::MAX, "low MSRs exit");
    pages.free(&p);
    pages.free(&p); // idempotent: the mock would catch a double free
    p.assert_all_freed();

    // A revision id with bit 31 set in the MSR value (reserved, SDM A.1) is not copied.
    let caps = VmxCaps {
        basic: 0xffff_ffff,
        ..VmxCaps::default()
    };
    let mut pages = VcpuPages::alloc(&p, &caps).expect("pages");
    assert_eq!(word(&p, pages.vmcs, 0), 0x7fff_ffff);
    pages.free(&p);
    p.assert_all_freed();
}

#[test]
fn a_failed_allocation_leaves_nothing_behind() {
    for n in 1..=3 {
        let p = MockPlatform::new();
        p.fail_nth_alloc(n);
        assert!(
            VcpuPages::alloc(&p, &VmxCaps::default()).is_err(),
            "allocation {n} failed"
        );
        p.assert_all_freed();
    }
}

#[test]
fn the_cache_fills_to_capacity_and_gives_everything_back() {
    let p = MockPlatform::new();
    let c = PageCache::new();
    assert!(!c.ready_for_fault());
    assert_eq!(c.refill(&p), CACHE_PAGES);
    assert_eq!((c.len(), p.live_pages()), (CACHE_PAGES, CACHE_PAGES as u64));
    assert_eq!(c.refill(&p), 0, "a full cache asks for nothing");
    let a = c.take().expect("page");
    assert!(p.is_live(a));
    while c.len() >= PAGES_PER_FAULT {
        assert!(c.ready_for_fault());
        p.free_page(c.take().expect("page"));
    }
    assert!(
        !c.ready_for_fault(),
        "{} pages cannot cover a fault",
        c.len()
    );
    p.free_page(a);
    c.free_all(&p);
    assert!(c.is_empty());
    p.assert_all_freed();
}

#[test]
fn a_short_refill_lets_the_fault_proceed_instead_of_asking_forever() {
    let p = MockPlatform::new();
    let c = PageCache::new();
    p.fail_allocs_after(2);
    assert_eq!(c.refill(&p), 2);
    // Fewer than a fault may need, but the OS has nothing more: handle the fault with what
    // there is (it fails as out of memory if that is not enough), do not loop.
    assert!(c.ready_for_fault());
    p.clear_faults();
    assert_eq!(c.refill(&p), CACHE_PAGES - 2);
    while c.len() >= PAGES_PER_FAULT {
        p.free_page(c.take().expect("page"));
    }
    assert!(!c.ready_for_fault(), "a full refill ends the dry state");
    c.free_all(&p);
    p.assert_all_freed();
}

/// A VM with one slot at 1 TiB (EPT PML4 index 2, SDM 29.3.2): its first fault needs a new
/// PDPT, PD and PT besides the backing page, the worst case.
fn far_vm(p: &MockPlatform, mode: Mode) -> Vm {
    let mut vm = Vm::new(p, EptFeatures::ALL, mode, 1 << 20).expect("vm");
    vm.add_slot(p, 1 << 40, 2 << 20).expect("slot");
    vm
}

#[test]
fn pages_per_fault_covers_the_worst_fault_and_one_less_does_not() {
    for mode in [Mode::AdScan, Mode::Pml, Mode::WriteProtect] {
        let p = MockPlatform::new();
        let mut vm = far_vm(&p, mode);
        let cache = PageCache::new();
        for _ in 0..PAGES_PER_FAULT {
            cache.pages_for_test(&p);
        }
        let live = p.live_pages();
        // SDM 28.2.1 Table 28-7: bit 1 = data write.
        assert_eq!(
            vm.on_ept_violation(&Cached::new(&p, &cache), (1 << 40) + 0x5123, 0x2),
            Fault::Resolved,
            "{mode:?}"
        );
        assert!(
            cache.is_empty(),
            "{mode:?}: the worst fault took {} pages",
            PAGES_PER_FAULT - cache.len()
        );
        assert_eq!(p.live_pages(), live, "{mode:?}: nothing came from the OS");
        assert!(vm.ept().translate(&p, (1 << 40) + 0x5000).is_some());
        vm.destroy(&p);
        p.assert_all_freed();

        let p = MockPlatform::new();
        let mut vm = far_vm(&p, mode);
        let cache = PageCache::new();
        for _ in 0..PAGES_PER_FAULT - 1 {
            cache.pages_for_test(&p);
        }
        assert_eq!(
            vm.on_ept_violation(&Cached::new(&p, &cache), (1 << 40) + 0x5123, 0x2),
            Fault::OutOfMemory,
            "{mode:?}"
        );
        cache.free_all(&p);
        vm.destroy(&p);
        p.assert_all_freed();
    }
}

#[test]
fn a_vcpu_accounts_for_its_cache_and_frees_it() {
    let p = MockPlatform::new();
    let pages = VcpuPages::alloc(&p, &VmxCaps::default()).expect("pages");
    let mut v = HwVcpu::new(3, pages, 0x10_0000, 0x7f_0000);
    assert_eq!(v.gprs.rdi, 3, "guest ABI: RDI = vCPU index");
    assert_eq!(v.pages_held(), 3);
    v.cache.refill(&p);
    assert_eq!(v.pages_held(), 3 + CACHE_PAGES as u64);
    assert_eq!(p.live_pages(), v.pages_held());
    v.free_pages(&p);
    p.assert_all_freed();
}

/// Fills one page into the cache (a refill limited to one page).
trait OnePage {
    fn pages_for_test(&self, p: &MockPlatform);
}

impl OnePage for PageCache {
    fn pages_for_test(&self, p: &MockPlatform) {
        let before = self.len();
        p.fail_allocs_after(1);
        self.refill(p);
        p.clear_faults();
        assert_eq!(self.len(), before + 1);
    }
}

/// Pages freed where the OS cannot free them (`hostmem::DeferredFree`, Windows above
/// APC_LEVEL), pushed from four threads at once while a fifth drains: every page reaches the
/// OS's free exactly once, none is lost.
#[test]
fn deferred_frees_reach_the_os_once_each() {
    use smudge_core::hostmem::DeferredFree;
    use smudge_core::platform::Platform;
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    let p = smudge_tests::MockPlatform::new();
    let list = DeferredFree::new();
    let pages: Vec<Vec<u64>> = (0..4)
        .map(|_| (0..500).map(|_| p.alloc_page().unwrap()).collect())
        .collect();
    let freed = Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                list.drain(&p, |h| freed.lock().unwrap().push(h));
            }
        });
        let pushers: Vec<_> = pages
            .iter()
            .map(|mine| s.spawn(|| mine.iter().for_each(|&h| list.push(&p, h))))
            .collect();
        pushers.into_iter().for_each(|t| t.join().unwrap());
        done.store(true, std::sync::atomic::Ordering::Release);
    });
    list.drain(&p, |h| freed.lock().unwrap().push(h));
    let freed = freed.into_inner().unwrap();
    let unique: BTreeSet<u64> = freed.iter().copied().collect();
    assert_eq!(freed.len(), 2000, "each page once");
    assert_eq!(unique, pages.iter().flatten().copied().collect());
    freed.iter().for_each(|&h| p.free_page(h));
    p.assert_all_freed();
}
