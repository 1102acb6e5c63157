//! The seam between the core and an operating system (SimpleVisor's `ShvOs*` idea, kept small).
//!
//! A shim (Linux module, Windows driver) or a test mock implements [`Platform`]. The core reaches
//! every page it owns (EPT tables, PML buffers, dirty bitmaps, guest backing pages) through
//! [`Platform::page`], as 512 atomic 64-bit words. Atomics because the processor sets EPT A/D bits
//! with locked read-modify-write cycles while other CPUs may run the guest (SDM 29.3.5).

use core::sync::atomic::AtomicU64;

/// A 4 KiB page seen as 512 atomic quadwords.
pub type PageWords = [AtomicU64; 512];

/// What the core needs from an operating system.
pub trait Platform {
    /// A zeroed, 4 KiB-aligned page of host memory; returns its host-physical address, or `None`
    /// when memory is exhausted (never panics).
    fn alloc_page(&self) -> Option<u64>;
    /// Returns a page obtained from [`Platform::alloc_page`].
    fn free_page(&self, hpa: u64);
    /// The page at `hpa` (4 KiB aligned, owned by the caller through `alloc_page`).
    fn page(&self, hpa: u64) -> &PageWords;
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
        if off % 8 == 0 && src.len() - i >= 8 {
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
