//! The seam between the core and an operating system (SimpleVisor's `ShvOs*` idea, kept small).
//!
//! A shim (Linux module, Windows driver) or a test mock implements [`Platform`]. The core reaches
//! every page it owns (EPT tables, PML buffers, dirty bitmaps, guest backing pages) through
//! [`Platform::page`], as 512 atomic 64-bit words. Atomics because the processor sets EPT A/D bits
//! with locked read-modify-write cycles while other CPUs may run the guest (SDM 29.3.5).

use core::sync::atomic::{AtomicU64, Ordering};

/// A 4 KiB page seen as 512 atomic quadwords.
pub type PageWords = [AtomicU64; 512];

/// A page lent by [`Platform::with_page_mut`].
#[derive(Debug)]
pub enum PageMut<'a> {
    /// Through the atomics, as [`Platform::page`] gives it (the default).
    Shared(&'a PageWords),
    /// As plain memory, which the compiler may vectorize.
    Exclusive(&'a mut [u64; 512]),
}

/// Why [`Platform::alloc_page`] gave no page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocError {
    /// The OS has no page to give (it failed instead of reclaiming by force).
    OutOfMemory,
    /// The driver-wide cap on the pages all VMs hold is reached ([`crate::hostmem`]).
    HostPageCap,
}

impl From<AllocError> for crate::Error {
    fn from(e: AllocError) -> crate::Error {
        match e {
            AllocError::OutOfMemory => crate::Error::OutOfMemory,
            AllocError::HostPageCap => crate::Error::HostPageCap,
        }
    }
}

/// What the core needs from an operating system.
pub trait Platform {
    /// A zeroed, 4 KiB-aligned page of host memory; returns its host-physical address, or why
    /// there is none (never panics).
    fn alloc_page(&self) -> Result<u64, AllocError>;
    /// Returns a page obtained from [`Platform::alloc_page`].
    fn free_page(&self, hpa: u64);
    /// The page at `hpa` (4 KiB aligned, owned by the caller through `alloc_page`).
    fn page(&self, hpa: u64) -> &PageWords;

    /// Calls `f` once with the page at `hpa` (as for [`Platform::page`]) for an update nothing
    /// else observes. The default lends it through the atomics ([`PageMut::Shared`]); a platform
    /// may override this to lend it as plain memory ([`PageMut::Exclusive`]), so that loops over
    /// the page can be vectorized (the full dirty-log harvest of the 1 GiB benchmark: 60 us
    /// instead of 95 us).
    ///
    /// Caller's contract, which an `Exclusive` implementation relies on: while `f` runs, nothing
    /// else reads or writes the page: no other software (and `f` not through the platform), and
    /// no processor. For an EPT page table that means no vCPU using the EPT is in VMX non-root
    /// operation: the processor sets EPT A/D flags with locked read-modify-write cycles whenever
    /// it walks the table (SDM 29.3.5), which would race with plain loads and stores. The core
    /// calls this only from clearing A/D scans, which run after the VM kicked its vCPUs out and
    /// with the EPT to themselves (see the precondition in [`crate::dirty`]).
    fn with_page_mut(&self, hpa: u64, f: &mut dyn FnMut(PageMut<'_>)) {
        f(PageMut::Shared(self.page(hpa)))
    }

    /// Pins up to `hpas.len()` pages of the calling process's memory from `uaddr` (page
    /// aligned) for writing, for as long as a VM maps them (Linux: `pin_user_pages` with
    /// FOLL_LONGTERM and FOLL_WRITE): writes their physical addresses to `hpas` and returns how
    /// many it pinned, at least one, or why it pinned none ([`pin_user_range`] loops). They are
    /// the process's memory, not the driver's: no page cap applies. The default pins nothing
    /// (an OS without the KVM personality).
    fn pin_user_pages(&self, _uaddr: u64, _hpas: &mut [u64]) -> Result<usize, PinError> {
        Err(PinError::Unsupported)
    }

    /// Unpins a page [`Platform::pin_user_pages`] gave, marking it dirty (the guest may have
    /// written it).
    fn unpin_user_page(&self, _hpa: u64) {}
}

/// Pins `count` pages of the calling process's memory from `uaddr` through
/// [`Platform::pin_user_pages`], 16 at a time, and calls `sink(i, hpa)` for page `i` as it is
/// pinned. On an error the pages already given to `sink` stay pinned: the caller unpins them.
pub fn pin_user_range<P: Platform + ?Sized>(
    p: &P,
    uaddr: u64,
    count: u64,
    sink: &mut dyn FnMut(u64, u64),
) -> Result<(), PinError> {
    let (mut done, mut hpas) = (0u64, [0u64; 16]);
    while done < count {
        let want = (count - done).min(hpas.len() as u64) as usize;
        let chunk = hpas.get_mut(..want).unwrap_or(&mut []);
        let at = done
            .checked_mul(4096)
            .and_then(|off| uaddr.checked_add(off))
            .ok_or(PinError::Fault)?;
        let got = p.pin_user_pages(at, chunk)?.min(want);
        if got == 0 {
            return Err(PinError::Fault);
        }
        for &hpa in chunk.iter().take(got) {
            sink(done, hpa);
            done += 1;
        }
    }
    Ok(())
}

/// Why [`Platform::pin_user_pages`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinError {
    /// An address is not mapped, or not writable, in the process (EFAULT).
    Fault,
    /// The OS had no memory to fault a page in or to pin it (ENOMEM).
    OutOfMemory,
    /// This OS does not pin user memory for VMs.
    Unsupported,
}

/// Copies `src` into the page at `hpa` from byte `offset` (`offset + src.len() <= 4096`).
/// Byte-granular writes go through read-modify-write of the containing quadword.
pub fn write_bytes<P: Platform + ?Sized>(p: &P, hpa: u64, offset: usize, src: &[u8]) {
    use core::sync::atomic::Ordering::Relaxed;
    let page = p.page(hpa);
    let mut off = offset;
    let mut i = 0;
    while i < src.len() && off < 4096 {
        let word = &page[off / 8];
        let shift = (off % 8) * 8;
        if off.is_multiple_of(8) && src.len() - i >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&src[i..i + 8]);
            word.store(u64::from_le_bytes(b), Relaxed);
            i += 8;
            off += 8;
        } else {
            let v = word.load(Relaxed);
            let v = (v & !(0xffu64 << shift)) | (u64::from(src[i]) << shift);
            word.store(v, Relaxed);
            i += 1;
            off += 1;
        }
    }
}

/// Copies bytes of the page at `hpa` from `offset` into `dst` (`offset + dst.len() <= 4096`).
pub fn read_bytes<P: Platform + ?Sized>(p: &P, hpa: u64, offset: usize, dst: &mut [u8]) {
    use core::sync::atomic::Ordering::Relaxed;
    let page = p.page(hpa);
    for (i, b) in dst.iter_mut().enumerate() {
        let off = offset + i;
        if off >= 4096 {
            break;
        }
        *b = (page[off / 8].load(Relaxed) >> ((off % 8) * 8)) as u8;
    }
}

/// The page seam checked once, at load: two new pages are distinct and zeroed, and keep what is
/// written to them through the core's byte helpers (a seam that maps every address to one
/// scratch page, or to none, fails); both go back. Returns what failed.
pub fn self_test<P: Platform + ?Sized>(p: &P) -> Result<(), &'static str> {
    let a = p.alloc_page().map_err(|_| "no page")?;
    let b = match p.alloc_page() {
        Ok(b) if b != a => b,
        Ok(_) => {
            p.free_page(a);
            return Err("the same page was handed out twice");
        }
        Err(_) => {
            p.free_page(a);
            return Err("no page");
        }
    };
    let zeroed = [a, b]
        .iter()
        .all(|&h| p.page(h).iter().all(|w| w.load(Ordering::Relaxed) == 0));
    write_bytes(p, a, 4090, b"smudge");
    write_bytes(p, b, 4090, b"SMUDGE");
    let (mut x, mut y) = ([0u8; 6], [0u8; 6]);
    read_bytes(p, a, 4090, &mut x);
    read_bytes(p, b, 4090, &mut y);
    p.free_page(a);
    p.free_page(b);
    if !zeroed {
        Err("a new page is not zeroed")
    } else if &x != b"smudge" || &y != b"SMUDGE" {
        Err("bytes written to two pages did not read back (they do not map to distinct memory)")
    } else {
        Ok(())
    }
}
