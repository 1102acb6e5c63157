//! `smudge_core::Platform` on Windows: the same core as on Linux, with ntoskrnl's allocator.
//!
//! Pages come from MmAllocateContiguousMemorySpecifyCache (nonpaged, cached, physically
//! contiguous, hence 4 KiB aligned in both address spaces). The core names a page by its physical
//! address; MmGetVirtualForPhysical maps it back to the system-space address.
//!
//! The run loop does not allocate at DISPATCH_LEVEL: it backs guest memory from the vCPU's page
//! cache, which the core's run loop refills at PASSIVE_LEVEL. It may free there (the core frees EPT
//! tables after an INVEPT), but MmFreeContiguousMemory requires IRQL <= APC_LEVEL. A page freed
//! above APC_LEVEL is therefore pushed on a lock-free list threaded through the pages themselves
//! and really freed by [`drain_deferred`] at PASSIVE_LEVEL.
//!
//! Request buffers, vCPUs and sessions come from the nonpaged pool ([`Pool`]), not from the
//! 24 KiB kernel stack (frames above 4 KiB would also need `__chkstk`, which is not linked).

use core::ffi::c_void;
use core::sync::atomic::{AtomicU64, Ordering};

use smudge_core::arch::{direct_map, DirectMap, RawAlloc};
use smudge_core::hostmem::{self, DeferredFree, PageBudget};
use smudge_core::platform::{AllocError, PageMut, PageWords, Platform};

use crate::nt;

const PAGE: usize = 4096;

/// Pages held by every VM (the STATS answer's `driver_pages`), deferred frees included; VMXON
/// regions are not counted.
static PAGES: AtomicU64 = AtomicU64::new(0);
/// The driver-wide cap on [`PAGES`] ([`set_cap`]; none until DriverEntry sets it).
static CAP: AtomicU64 = AtomicU64::new(u64::MAX);
/// Pages freed above APC_LEVEL, freed at PASSIVE_LEVEL by [`drain_deferred`].
static DEFERRED: DeferredFree = DeferredFree::new();

fn budget() -> PageBudget<'static> {
    PageBudget {
        held: &PAGES,
        cap: CAP.load(Ordering::Relaxed),
    }
}

/// Pages currently held (allocated and not yet freed, deferred frees included).
pub fn pages_held() -> u64 {
    budget().held()
}

/// Sets the cap to core's default for a machine of `total_ram_pages` (half of RAM).
pub fn set_cap(total_ram_pages: u64) {
    CAP.store(hostmem::cap_pages(0, total_ram_pages), Ordering::Relaxed);
}

/// The pages of RAM the memory manager reports (MmGetPhysicalMemoryRanges), or None.
pub fn total_ram_pages() -> Option<u64> {
    // SAFETY: no arguments; returns null or an array ended by an all-zero entry, which we own.
    let ranges = unsafe { nt::MmGetPhysicalMemoryRanges() };
    if ranges.is_null() {
        return None;
    }
    let bytes = (0..)
        // SAFETY: entries up to and including the all-zero terminator are readable.
        .map(|i| unsafe { ranges.add(i).read() })
        .take_while(|r| r.base_address != 0 || r.number_of_bytes != 0)
        .fold(0u64, |n, r| {
            n.saturating_add(r.number_of_bytes.max(0) as u64)
        });
    // SAFETY: the array is a pool allocation the caller frees (ExFreePool = tag 0), once.
    unsafe { nt::ExFreePoolWithTag(ranges.cast::<c_void>(), 0) };
    Some(bytes / PAGE as u64)
}

/// Frees the pages freed above APC_LEVEL. Call at PASSIVE_LEVEL.
pub fn drain_deferred() {
    DEFERRED.drain(&NtPlatform, |hpa| {
        budget().free(|| NtPlatform::os_free(hpa))
    });
}

/// The Windows implementation of the core's platform seam.
pub struct NtPlatform;

// SAFETY: the core's pages are nonpaged contiguous allocations (`os_alloc`), mapped in system
// space at the address MmGetVirtualForPhysical gives until they are freed.
unsafe impl DirectMap for NtPlatform {
    fn va(&self, hpa: u64) -> *mut u8 {
        if !hpa.is_multiple_of(PAGE as u64) || hpa > i64::MAX as u64 {
            return core::ptr::null_mut();
        }
        // SAFETY: MmGetVirtualForPhysical only looks the address up (any IRQL); it returns null
        // when no system-space mapping exists.
        unsafe { nt::MmGetVirtualForPhysical(hpa as i64).cast() }
    }
}

impl NtPlatform {
    /// A zeroed page, uncounted (VMXON regions belong to the driver). IRQL <= DISPATCH_LEVEL.
    pub fn os_alloc() -> Option<u64> {
        // SAFETY: plain by-value arguments: any physical address (0..=all ones), no boundary
        // restriction, cached memory. Returns null on failure.
        let va =
            unsafe { nt::MmAllocateContiguousMemorySpecifyCache(PAGE, 0, -1, 0, nt::MM_CACHED) };
        if va.is_null() {
            return None;
        }
        // SAFETY: `va` is a fresh, exclusively owned, writable nonpaged allocation of PAGE bytes.
        unsafe { core::ptr::write_bytes(va.cast::<u8>(), 0, PAGE) };
        // SAFETY: `va` is a valid nonpaged system address.
        let pa = unsafe { nt::MmGetPhysicalAddress(va) } as u64;
        if pa == 0 || !pa.is_multiple_of(PAGE as u64) {
            // SAFETY: `va` came from MmAllocateContiguousMemorySpecifyCache and is freed once.
            unsafe { nt::MmFreeContiguousMemory(va) };
            return None;
        }
        Some(pa)
    }

    /// Frees a page from [`NtPlatform::os_alloc`] at IRQL <= APC_LEVEL, uncounted.
    pub fn os_free(hpa: u64) {
        let va = NtPlatform.va(hpa);
        if !va.is_null() {
            // SAFETY: `hpa` came from os_alloc; `va` is that allocation's base, freed once.
            unsafe { nt::MmFreeContiguousMemory(va.cast()) };
        }
    }
}

impl Platform for NtPlatform {
    /// Callable at IRQL <= DISPATCH_LEVEL.
    fn alloc_page(&self) -> Result<u64, AllocError> {
        budget().alloc(Self::os_alloc)
    }

    /// At IRQL <= APC_LEVEL frees at once (MmFreeContiguousMemory's rule), above it defers.
    fn free_page(&self, hpa: u64) {
        let va = self.va(hpa);
        if va.is_null() {
            return;
        }
        if crate::processors::irql() > 1 {
            return DEFERRED.push(self, hpa);
        }
        // SAFETY: the core returns only addresses from `alloc_page`, each once (trait contract);
        // `va` is that allocation's base address.
        budget().free(|| unsafe { nt::MmFreeContiguousMemory(va.cast()) });
    }

    fn page(&self, hpa: u64) -> &PageWords {
        // SAFETY: the core passes only pages of alloc_page it still holds (the trait's contract).
        unsafe { direct_map::page(self, hpa) }
    }

    fn with_page_mut(&self, hpa: u64, f: &mut dyn FnMut(PageMut<'_>)) {
        // SAFETY: as in `page`, lent only while nothing else uses it (the trait's contract).
        unsafe { direct_map::with_page_mut(self, hpa, f) }
    }
}

/// Pool tag "Smdg" (shows as `gdmS` in pool dumps, as tags do).
pub const TAG: u32 = u32::from_le_bytes(*b"Smdg");

/// NonPagedPoolNx with [`TAG`].
pub struct Pool;

// SAFETY: x64 pool allocations are 16-byte aligned; the memory is zeroed before it is returned
// and freed with the same tag. Callable at IRQL <= DISPATCH_LEVEL, where the core allocates and
// drops these values.
unsafe impl RawAlloc for Pool {
    fn alloc_zeroed(bytes: usize) -> *mut u8 {
        // SAFETY: plain arguments; returns null on failure.
        let p = unsafe { nt::ExAllocatePoolWithTag(nt::NON_PAGED_POOL_NX, bytes, TAG) };
        if !p.is_null() {
            // SAFETY: a fresh allocation of `bytes` writable bytes.
            unsafe { core::ptr::write_bytes(p.cast::<u8>(), 0, bytes) };
        }
        p.cast()
    }
    unsafe fn free(p: *mut u8, _bytes: usize) {
        // SAFETY: allocated above with TAG, freed once (the caller's contract).
        unsafe { nt::ExFreePoolWithTag(p.cast::<c_void>(), TAG) };
    }
}
