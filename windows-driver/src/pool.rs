//! Nonpaged pool memory: byte buffers ([`PoolBuf`]) and single objects ([`PoolBox`]), freed on
//! drop. Large objects live here instead of on the 24 KiB kernel stack (frames above 4 KiB
//! would also need `__chkstk`, which this driver does not link).

use core::ffi::c_void;

use crate::nt;

/// Pool tag "Smdg" (shows as `gdmS` in pool dumps, as tags do).
pub const TAG: u32 = u32::from_le_bytes(*b"Smdg");

/// A zeroed NonPagedPoolNx buffer, freed on drop. 16-byte aligned (x64 pool granularity), so it
/// may be viewed as u64 words.
pub struct PoolBuf {
    ptr: *mut u8,
    len: usize,
}

impl PoolBuf {
    /// `len` zeroed bytes (at least one), or None when the pool is exhausted.
    pub fn zeroed(len: usize) -> Option<PoolBuf> {
        let bytes = len.max(1);
        // SAFETY: plain arguments; returns null on failure. IRQL <= DISPATCH_LEVEL.
        let p =
            unsafe { nt::ExAllocatePoolWithTag(nt::NON_PAGED_POOL_NX, bytes, TAG) }.cast::<u8>();
        if p.is_null() {
            return None;
        }
        // SAFETY: a fresh allocation of `bytes` writable bytes.
        unsafe { core::ptr::write_bytes(p, 0, bytes) };
        Some(PoolBuf { ptr: p, len })
    }
}

impl core::ops::Deref for PoolBuf {
    type Target = [u64];
    /// The first `len / 8` quadwords.
    fn deref(&self) -> &[u64] {
        // SAFETY: `ptr` holds `len` initialised bytes owned by self, 16-byte aligned (x64 pool);
        // every bit pattern is a valid u64.
        unsafe { core::slice::from_raw_parts(self.ptr.cast::<u64>(), self.len / 8) }
    }
}

impl core::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as above, exclusively borrowed.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.cast::<u64>(), self.len / 8) }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by ExAllocatePoolWithTag with TAG, freed once.
        unsafe { nt::ExFreePoolWithTag(self.ptr.cast::<c_void>(), TAG) };
    }
}

/// One `T` in NonPagedPoolNx (16-byte aligned: enough for every type here, checked below).
pub struct PoolBox<T> {
    ptr: *mut T,
}

// SAFETY: a PoolBox owns its T exclusively (like Box), so it may move to another thread when
// the T may.
unsafe impl<T: Send> Send for PoolBox<T> {}

impl<T> PoolBox<T> {
    /// Moves `value` into the pool, or gives it back when the pool is exhausted.
    pub fn new(value: T) -> Result<PoolBox<T>, T> {
        if core::mem::align_of::<T>() > 16 {
            return Err(value);
        }
        // SAFETY: plain arguments; returns null on failure. IRQL <= DISPATCH_LEVEL.
        let p = unsafe {
            nt::ExAllocatePoolWithTag(nt::NON_PAGED_POOL_NX, core::mem::size_of::<T>().max(1), TAG)
        };
        if p.is_null() {
            return Err(value);
        }
        let ptr = p.cast::<T>();
        // SAFETY: fresh, suitably sized and aligned (x64 pool: 16 bytes) memory.
        unsafe { ptr.write(value) };
        Ok(PoolBox { ptr })
    }

    /// Gives up ownership (for FILE_OBJECT.FsContext); [`PoolBox::from_raw`] takes it back.
    pub fn into_raw(self) -> *mut T {
        let p = self.ptr;
        core::mem::forget(self);
        p
    }

    /// # Safety
    /// `ptr` came from [`PoolBox::into_raw`] and is not owned by anyone else.
    pub unsafe fn from_raw(ptr: *mut T) -> PoolBox<T> {
        PoolBox { ptr }
    }
}

impl<T> core::ops::Deref for PoolBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised T owned by self.
        unsafe { &*self.ptr }
    }
}

impl<T> core::ops::DerefMut for PoolBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, exclusively borrowed.
        unsafe { &mut *self.ptr }
    }
}

impl<T> Drop for PoolBox<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` holds an initialised T from `new`; dropped and freed once.
        unsafe {
            core::ptr::drop_in_place(self.ptr);
            nt::ExFreePoolWithTag(self.ptr.cast::<c_void>(), TAG);
        }
    }
}
