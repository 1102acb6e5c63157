//! `smudge_core::Platform` on Windows: the same core as on Linux, with ntoskrnl's allocator.
//!
//! Pages come from MmAllocateContiguousMemorySpecifyCache (nonpaged, cached, physically
//! contiguous, hence 4 KiB aligned in both address spaces). The core names a page by its physical
//! address; MmGetVirtualForPhysical maps it back to the system-space address.

use core::ffi::c_void;
use core::sync::atomic::AtomicU64;

use smudge_core::platform::{PageWords, Platform};

use crate::nt;

const PAGE: usize = 4096;

/// Returned by [`NtPlatform::page`] for an address that is not one of ours (a core bug): writes
/// land here instead of at a null or foreign address. Never handed out on a correct path.
static SCRATCH: PageWords = [const { AtomicU64::new(0) }; 512];

/// The Windows implementation of the core's platform seam.
pub struct NtPlatform;

impl NtPlatform {
    /// True if `hpa` is a page-aligned address with a system-space mapping.
    pub fn maps(&self, hpa: u64) -> bool {
        !Self::virt(hpa).is_null()
    }

    fn virt(hpa: u64) -> *mut c_void {
        if !hpa.is_multiple_of(PAGE as u64) || hpa > i64::MAX as u64 {
            return core::ptr::null_mut();
        }
        // SAFETY: MmGetVirtualForPhysical only looks the address up (any IRQL); it returns null
        // when no system-space mapping exists.
        unsafe { nt::MmGetVirtualForPhysical(hpa as i64) }
    }
}

impl Platform for NtPlatform {
    /// Callable at IRQL <= DISPATCH_LEVEL.
    fn alloc_page(&self) -> Option<u64> {
        // SAFETY: plain by-value arguments: any physical address (0..=all ones), no boundary
        // restriction, cached memory. Returns null on failure.
        let va = unsafe { nt::MmAllocateContiguousMemorySpecifyCache(PAGE, 0, -1, 0, nt::MM_CACHED) };
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

    /// Callable at IRQL <= APC_LEVEL (MmFreeContiguousMemory's rule).
    fn free_page(&self, hpa: u64) {
        let va = Self::virt(hpa);
        if !va.is_null() {
            // SAFETY: the core returns only addresses from `alloc_page`, each once (trait contract);
            // `va` is that allocation's base address.
            unsafe { nt::MmFreeContiguousMemory(va) };
        }
    }

    fn page(&self, hpa: u64) -> &PageWords {
        let va = Self::virt(hpa);
        if va.is_null() {
            return &SCRATCH;
        }
        // SAFETY: `hpa` is a page from `alloc_page` the caller still owns (trait contract), so `va`
        // maps 4096 bytes of nonpaged, 8-byte aligned memory that stays valid while borrowed.
        // AtomicU64 has the layout of u64, and every access to the page goes through the atomics.
        unsafe { &*va.cast::<PageWords>() }
    }
}
