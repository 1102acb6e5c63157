//! Memory for the core: pages (`Platform`, `DirectMap`) and objects (`RawAlloc`).
//!
//! Pages come from MmAllocateContiguousMemorySpecifyCache (nonpaged, cached, 4 KiB aligned);
//! MmGetVirtualForPhysical maps a page's physical address back. The run loop allocates nothing
//! at DISPATCH_LEVEL (the vCPU's page cache), but may free there, and MmFreeContiguousMemory
//! needs IRQL <= APC_LEVEL: such a page waits on a list threaded through the pages themselves
//! until [`drain_deferred`] at PASSIVE_LEVEL. Request buffers, vCPUs and sessions come from the
//! nonpaged pool ([`Pool`]), not the 24 KiB stack (frames above 4 KiB would need `__chkstk`).

use core::ffi::c_void;
use core::sync::atomic::{AtomicU64, Ordering};

use smudge_core::arch::{direct_map, DirectMap, RawAlloc};
use smudge_core::hostmem::{self, DeferredFree, PageBudget};
use smudge_core::platform::{AllocError, PageMut, PageWords, Platform};

use crate::nt;

const PAGE: usize = 4096;

/// Pages held by every VM, deferred frees included; not the VMXON regions.
static PAGES: AtomicU64 = AtomicU64::new(0);
/// The driver-wide cap on [`PAGES`] (none until DriverEntry calls [`set_cap`]).
static CAP: AtomicU64 = AtomicU64::new(u64::MAX);
/// Pages freed above APC_LEVEL, freed at PASSIVE_LEVEL by [`drain_deferred`].
static DEFERRED: DeferredFree = DeferredFree::new();

/// The driver's page count (the STATS answer's `driver_pages`) and cap.
pub fn budget() -> PageBudget<'static> {
    PageBudget {
        held: &PAGES,
        cap: CAP.load(Ordering::Relaxed),
    }
}

/// Sets the cap to core's default: half of the RAM that MmGetPhysicalMemoryRanges reports.
/// False when it reports none.
pub fn set_cap() -> bool {
    // SAFETY: no arguments; returns null or an array ended by an all-zero entry, which we own.
    let ranges = unsafe { nt::MmGetPhysicalMemoryRanges() };
    if ranges.is_null() {
        return false;
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
    let cap = hostmem::cap_pages(0, bytes / PAGE as u64);
    CAP.store(cap, Ordering::Relaxed);
    true
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

    /// Frees a page from [`NtPlatform::os_alloc`] at IRQL <= APC_LEVEL, uncounted (the core
    /// frees only pages it allocated, each once).
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
        if self.va(hpa).is_null() {
            return; // not a page of ours: neither freed nor uncounted
        }
        if crate::processors::irql() > nt::APC_LEVEL {
            return DEFERRED.push(self, hpa);
        }
        budget().free(|| Self::os_free(hpa));
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

// SAFETY: x64 pool allocations are 16-byte aligned, zeroed here and freed with the same tag, at
// IRQL <= DISPATCH_LEVEL, where the core allocates and drops these values.
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
