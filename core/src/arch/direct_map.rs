//! The host's pages as Rust values. A shim vouches once that it maps every page it allocated
//! for the core ([`DirectMap`]); [`page`] and [`with_page_mut`] turn that mapping into the views
//! of the `Platform` seam, the same on both OSes.

use core::sync::atomic::AtomicU64;

use crate::platform::{PageMut, PageWords};

/// The kernel's mapping of physical memory (Linux's direct map; Windows' system-space mapping
/// of its nonpaged allocations).
///
/// # Safety
/// For a page `hpa` the shim's `Platform::alloc_page` gave and that is not freed yet, `va(hpa)`
/// is null or the 4 KiB-aligned address of a writable mapping of it, valid until it is freed.
pub unsafe trait DirectMap {
    /// The address where the kernel maps page `hpa`, or null.
    fn va(&self, hpa: u64) -> *mut u8;
}

/// What a page without a mapping reads as (a shim's bug): writes land here instead of at null.
static SCRATCH: PageWords = [const { AtomicU64::new(0) }; 512];

/// `Platform::page` through the direct map.
///
/// # Safety
/// `hpa` is a page of `m`'s `Platform::alloc_page`, not freed while the reference lives.
pub unsafe fn page<M: DirectMap + ?Sized>(m: &M, hpa: u64) -> &PageWords {
    let va = m.va(hpa);
    if va.is_null() || !va.addr().is_multiple_of(4096) {
        return &SCRATCH;
    }
    // SAFETY: a live, aligned mapping of the 4 KiB page (DirectMap, the caller's page). AtomicU64 has the layout
    // of u64 and no invalid values, and every access to the page goes through the atomics or,
    // while `with_page_mut` lends it, through that one `&mut`.
    unsafe { &*va.cast::<PageWords>() }
}

/// `Platform::with_page_mut` through the direct map: the page as plain memory.
///
/// # Safety
/// As for [`page`], and nothing else reads or writes the page until `f` returns (the contract
/// of `Platform::with_page_mut`).
pub unsafe fn with_page_mut<M: DirectMap + ?Sized>(
    m: &M,
    hpa: u64,
    f: &mut dyn FnMut(PageMut<'_>),
) {
    let va = m.va(hpa);
    if va.is_null() || !va.addr().is_multiple_of(4096) {
        return f(PageMut::Shared(&SCRATCH));
    }
    // SAFETY: as in `page`; u64 has no invalid values. Nothing else reads or writes the page
    // until `f` returns (the caller's contract: every vCPU kicked out of VMX non-root operation,
    // so no processor sets A/D flags in it, SDM 29.3.5; the EPT borrowed mutably).
    f(PageMut::Exclusive(unsafe { &mut *va.cast::<[u64; 512]>() }))
}
