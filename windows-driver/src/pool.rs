//! The nonpaged pool as the core's allocator (`arch::RawAlloc`): request buffers, vCPUs and
//! sessions live there instead of on the 24 KiB kernel stack (frames above 4 KiB would also
//! need `__chkstk`, which this driver does not link).

use core::ffi::c_void;

use smudge_core::arch::RawAlloc;

use crate::nt;

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
