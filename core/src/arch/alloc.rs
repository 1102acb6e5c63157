//! OS allocations as Rust values. A shim vouches for its allocator once ([`RawAlloc`]); these
//! types own what it returns: the request buffers ([`RawWords`]), the objects the core keeps
//! per open, per vCPU and per KVM descriptor ([`RawBox`]), and a KVM VM ([`Shared`]). Guest memory and EPT tables are
//! pages of the `Platform` seam instead.

use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The alignment every [`RawAlloc`] allocation has, and the granularity of its sizes.
pub const RAW_ALIGN: usize = 16;

/// An OS allocator of zeroed memory.
///
/// # Safety
/// `alloc_zeroed(bytes)`, for a nonzero multiple of [`RAW_ALIGN`], returns null or the address
/// of `bytes` zeroed, writable bytes aligned to [`RAW_ALIGN`], which nothing else uses until
/// `free` of that address, callable wherever a value holding it is dropped.
pub unsafe trait RawAlloc {
    /// `bytes` zeroed bytes, or null when memory is short (never waking an OOM killer).
    fn alloc_zeroed(bytes: usize) -> *mut u8;
    /// Frees what `alloc_zeroed(bytes)` returned.
    ///
    /// # Safety
    /// `p` came from `alloc_zeroed(bytes)` and is freed once.
    unsafe fn free(p: *mut u8, bytes: usize);
}

/// The size [`RawAlloc::alloc_zeroed`] is asked for, for `bytes` (None: too large).
const fn raw_size(bytes: usize) -> Option<usize> {
    if bytes == 0 {
        Some(RAW_ALIGN)
    } else {
        bytes.checked_next_multiple_of(RAW_ALIGN)
    }
}

/// Zeroed quadwords from `A`, freed on drop.
pub struct RawWords<A: RawAlloc> {
    ptr: NonNull<u64>,
    len: usize,
    alloc: PhantomData<A>,
}

// SAFETY: RawWords owns its quadwords exclusively, like a Vec<u64>.
unsafe impl<A: RawAlloc> Send for RawWords<A> {}
// SAFETY: as above; shared access only reads.
unsafe impl<A: RawAlloc> Sync for RawWords<A> {}

impl<A: RawAlloc> RawWords<A> {
    /// `n` zeroed quadwords, or None when memory is short.
    pub fn zeroed(n: usize) -> Option<RawWords<A>> {
        let bytes = raw_size(n.checked_mul(8)?)?;
        let ptr = NonNull::new(A::alloc_zeroed(bytes).cast::<u64>())?;
        Some(RawWords {
            ptr,
            len: n,
            alloc: PhantomData,
        })
    }
}

impl<A: RawAlloc> core::ops::Deref for RawWords<A> {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        // SAFETY: `len` zeroed (so initialised), aligned quadwords owned by self (RawAlloc).
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<A: RawAlloc> core::ops::DerefMut for RawWords<A> {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as above, borrowed exclusively.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<A: RawAlloc> Drop for RawWords<A> {
    fn drop(&mut self) {
        // `zeroed` computed the same size without overflow.
        let bytes = raw_size(self.len * 8).unwrap_or(0);
        // SAFETY: from `A::alloc_zeroed(bytes)` in `zeroed`, freed once.
        unsafe { A::free(self.ptr.as_ptr().cast(), bytes) }
    }
}

/// One `T` in memory from `A` (a Box whose allocator is the OS's), freed on drop.
pub struct RawBox<T, A: RawAlloc> {
    ptr: NonNull<T>,
    owns: PhantomData<(T, A)>,
}

// SAFETY: a RawBox owns its T exclusively, like a Box.
unsafe impl<T: Send, A: RawAlloc> Send for RawBox<T, A> {}
// SAFETY: as above: shared access to the box is shared access to the T.
unsafe impl<T: Sync, A: RawAlloc> Sync for RawBox<T, A> {}

impl<T, A: RawAlloc> RawBox<T, A> {
    const BYTES: Option<usize> = raw_size(core::mem::size_of::<T>());

    /// Moves `value` into OS memory, or gives it back when memory is short.
    pub fn new(value: T) -> Result<RawBox<T, A>, T> {
        const { assert!(core::mem::align_of::<T>() <= RAW_ALIGN) };
        let Some(bytes) = Self::BYTES else {
            return Err(value);
        };
        let Some(ptr) = NonNull::new(A::alloc_zeroed(bytes).cast::<T>()) else {
            return Err(value);
        };
        // SAFETY: fresh memory of at least size_of::<T>() bytes, aligned for T (checked above).
        unsafe { ptr.as_ptr().write(value) };
        Ok(RawBox {
            ptr,
            owns: PhantomData,
        })
    }

    /// Gives up ownership (to an OS object's private pointer); [`RawBox::from_raw`] takes it
    /// back.
    pub fn into_raw(b: RawBox<T, A>) -> *mut T {
        let p = b.ptr.as_ptr();
        core::mem::forget(b);
        p
    }

    /// Moves the `T` out and frees its memory.
    pub fn into_inner(b: RawBox<T, A>) -> T {
        let p = RawBox::into_raw(b);
        // SAFETY: `p` holds an initialised T owned by `b`, read once; its memory (of `BYTES`)
        // is then freed once, without dropping the T again.
        unsafe {
            let value = p.read();
            A::free(p.cast(), Self::BYTES.unwrap_or(0));
            value
        }
    }

    /// Takes back what [`RawBox::into_raw`] gave up (None for null).
    ///
    /// # Safety
    /// `p` is null or came from `RawBox::<T, A>::into_raw` and is owned by no one else.
    pub unsafe fn from_raw(p: *mut T) -> Option<RawBox<T, A>> {
        NonNull::new(p).map(|ptr| RawBox {
            ptr,
            owns: PhantomData,
        })
    }
}

impl<T, A: RawAlloc> core::ops::Deref for RawBox<T, A> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: an initialised T owned by self.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T, A: RawAlloc> core::ops::DerefMut for RawBox<T, A> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, borrowed exclusively.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T, A: RawAlloc> Drop for RawBox<T, A> {
    fn drop(&mut self) {
        // SAFETY: an initialised T from `new`, dropped once, then its memory (of `BYTES`, which
        // `new` computed) freed once.
        unsafe {
            core::ptr::drop_in_place(self.ptr.as_ptr());
            A::free(self.ptr.as_ptr().cast(), Self::BYTES.unwrap_or(0));
        }
    }
}

/// A `T` and its count of references, in memory from an OS allocator.
struct Counted<T> {
    refs: AtomicUsize,
    value: T,
}

/// One `T` in memory from `A`, shared by counted references (an Arc whose allocator is the
/// OS's): a KVM VM, held by its descriptor and by its vCPUs'. The last reference to go drops
/// the `T` ([`Shared::release`] lets it finish the `T` first).
pub struct Shared<T, A: RawAlloc> {
    ptr: NonNull<Counted<T>>,
    owns: PhantomData<(T, A)>,
}

// SAFETY: as for an Arc: the T is reached from several threads and dropped on any of them.
unsafe impl<T: Send + Sync, A: RawAlloc> Send for Shared<T, A> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync, A: RawAlloc> Sync for Shared<T, A> {}

impl<T, A: RawAlloc> Shared<T, A> {
    /// The first reference to `value`, or the value back when memory is short.
    pub fn new(value: T) -> Result<Shared<T, A>, T> {
        let counted = Counted {
            refs: AtomicUsize::new(1),
            value,
        };
        match RawBox::<Counted<T>, A>::new(counted) {
            Ok(b) => Ok(Shared {
                // SAFETY: into_raw of a live box is never null.
                ptr: unsafe { NonNull::new_unchecked(RawBox::into_raw(b)) },
                owns: PhantomData,
            }),
            Err(c) => Err(c.value),
        }
    }

    fn counted(&self) -> &Counted<T> {
        // SAFETY: this reference keeps the allocation alive.
        unsafe { self.ptr.as_ref() }
    }

    /// The `T`, writable while this is its only reference.
    pub fn get_mut(&mut self) -> Option<&mut T> {
        if self.counted().refs.load(Ordering::Acquire) != 1 {
            return None;
        }
        // SAFETY: the only reference, borrowed exclusively.
        Some(unsafe { &mut self.ptr.as_mut().value })
    }

    /// One more reference.
    pub fn share(&self) -> Shared<T, A> {
        // Relaxed as in Arc::clone: a new reference comes from an existing one.
        self.counted().refs.fetch_add(1, Ordering::Relaxed);
        Shared {
            ptr: self.ptr,
            owns: PhantomData,
        }
    }

    /// Drops this reference; if it was the last, `last` finishes the `T` before it is dropped
    /// and its memory freed.
    pub fn release(self, last: impl FnOnce(&mut T)) {
        let ptr = self.ptr;
        core::mem::forget(self);
        // SAFETY: this reference kept the allocation alive until here.
        if unsafe { ptr.as_ref() }.refs.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        // Every other reference's use happens before the T goes (as in Arc's drop).
        core::sync::atomic::fence(Ordering::Acquire);
        // SAFETY: the last reference: the box `new` made is owned by no one else now.
        if let Some(mut b) = unsafe { RawBox::<Counted<T>, A>::from_raw(ptr.as_ptr()) } {
            last(&mut b.value);
        }
    }
}

impl<T, A: RawAlloc> core::ops::Deref for Shared<T, A> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.counted().value
    }
}

impl<T, A: RawAlloc> Drop for Shared<T, A> {
    fn drop(&mut self) {
        Shared {
            ptr: self.ptr,
            owns: PhantomData::<(T, A)>,
        }
        .release(|_| {});
    }
}
