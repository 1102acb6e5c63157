//! A vCPU's host pages: its VMCS region, PML buffer and MSR bitmap, prepared the same way for
//! every shim, and the per-vCPU page cache the run loop backs guest memory from.
//!
//! The exit handler runs with interrupts off and cannot sleep, so it must not ask the OS for
//! memory. It takes pages from a small [`PageCache`] instead, which the shim refills outside the
//! atomic section (GFP_KERNEL on Linux, PASSIVE_LEVEL on Windows), as KVM's MMU caches are.
//! When the cache cannot cover another EPT violation, `vmx::hw::run` returns to the shim, which
//! refills it and enters again; the guest re-executes the faulting access.

use core::cell::Cell;
use core::sync::atomic::Ordering::Relaxed;

use crate::error::Error;
use crate::platform::{AllocError, PageWords, Platform};
use crate::vmx::caps::VmxCaps;

/// Writes the VMCS revision identifier (IA32_VMX_BASIC bits 30:0) into the first dword of a
/// VMXON region or VMCS region, with bit 31 clear (SDM 25.2, 25.11.5). The rest of the page
/// stays as it is (zero for a fresh page).
pub fn write_revision_id<P: Platform + ?Sized>(p: &P, hpa: u64, caps: &VmxCaps) {
    if let Some(w) = p.page(hpa).first() {
        w.store(u64::from(caps.revision_id()), Relaxed);
    }
}

/// The MSRs a guest reads and writes without an exit: those the VMCS switches on entry and
/// exit (IA32_EFER by the load/save-EFER controls, FS/GS base by the guest-state area).
/// IA32_KERNEL_GS_BASE, STAR, LSTAR, SFMASK and TSC_AUX stay intercepted.
pub const PASSTHROUGH_MSRS: [u32; 3] = [0xC000_0080, 0xC000_0100, 0xC000_0101];

/// Quadword `index` (0..512) of a 4 KiB MSR bitmap (SDM 25.6.9): all ones (every access exits)
/// except the read and write bits of the MSRs in `passthrough`. The bitmap is four 1 KiB parts:
/// read-low (MSRs 0..=0x1FFF), read-high (0xC0000000..=0xC0001FFF), write-low, write-high; bit
/// n of a part (byte n/8, bit n%8) stands for MSR base+n. MSRs outside both ranges always exit.
pub fn msr_bitmap_word(index: usize, passthrough: &[u32]) -> u64 {
    let mut word = u64::MAX;
    for &msr in passthrough {
        let (read_part, write_part) = match msr {
            0..=0x1FFF => (0usize, 2048usize),
            0xC000_0000..=0xC000_1FFF => (1024, 3072),
            _ => continue,
        };
        let bit = (msr & 0x1FFF) as usize;
        for part in [read_part, write_part] {
            let byte = part + bit / 8;
            if byte / 8 == index {
                word &= !(1u64 << ((byte % 8) * 8 + bit % 8));
            }
        }
    }
    word
}

/// Fills `page` with the MSR bitmap that passes [`PASSTHROUGH_MSRS`] through.
pub fn write_msr_bitmap(page: &PageWords) {
    for (i, w) in page.iter().enumerate() {
        w.store(msr_bitmap_word(i, &PASSTHROUGH_MSRS), Relaxed);
    }
}

/// The pages every vCPU owns for its whole life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuPages {
    /// VMCS region (starts with the revision identifier).
    pub vmcs: u64,
    /// PML buffer (512 GPAs; used in PML mode).
    pub pml: u64,
    /// MSR bitmap.
    pub msr_bitmap: u64,
}

impl VcpuPages {
    /// Pages in a [`VcpuPages`].
    pub const COUNT: u64 = 3;

    /// Allocates and prepares the pages: the VMCS region with the revision identifier, a zeroed
    /// PML buffer, the MSR bitmap. On failure nothing stays allocated.
    pub fn alloc<P: Platform + ?Sized>(p: &P, caps: &VmxCaps) -> Result<VcpuPages, Error> {
        let mut pages = [0u64; 3];
        for i in 0..pages.len() {
            match (p.alloc_page(), pages.get_mut(i)) {
                (Ok(pg), Some(slot)) => *slot = pg,
                (got, _) => {
                    for pg in pages.iter().chain(got.as_ref().ok()).filter(|&&x| x != 0) {
                        p.free_page(*pg);
                    }
                    return Err(got.err().map_or(Error::OutOfMemory, Error::from));
                }
            }
        }
        let [vmcs, pml, msr_bitmap] = pages;
        write_revision_id(p, vmcs, caps);
        write_msr_bitmap(p.page(msr_bitmap));
        Ok(VcpuPages {
            vmcs,
            pml,
            msr_bitmap,
        })
    }

    /// Frees the pages (each once: the addresses are cleared). The VMCS must be clear on every
    /// CPU (VMCLEAR) before.
    pub fn free<P: Platform + ?Sized>(&mut self, p: &P) {
        for page in [&mut self.vmcs, &mut self.pml, &mut self.msr_bitmap] {
            if *page != 0 {
                p.free_page(*page);
                *page = 0;
            }
        }
    }
}

/// Pages a [`PageCache`] holds at most.
pub const CACHE_PAGES: usize = 16;

/// Pages one EPT violation may take: the backing page, and with a 4-level EPT whose PML4 table
/// always exists, at most a new PDPT, PD and PT (SDM 29.3.2).
pub const PAGES_PER_FAULT: usize = 4;

/// A per-vCPU stack of zeroed pages for the exit handler. Only the thread that runs the vCPU
/// touches it (hence `Cell`, no atomics).
pub struct PageCache {
    pages: [Cell<u64>; CACHE_PAGES],
    len: Cell<usize>,
    /// The last refill could not fill the cache, and why (the OS is out of memory, or the
    /// driver's page cap is reached). The run loop then lets a fault run with what is left (and
    /// fail with that reason) instead of asking again.
    dry: Cell<Option<AllocError>>,
}

impl Default for PageCache {
    fn default() -> Self {
        PageCache::new()
    }
}

impl core::fmt::Debug for PageCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageCache")
            .field("len", &self.len.get())
            .field("dry", &self.dry.get())
            .finish()
    }
}

impl PageCache {
    /// An empty cache.
    pub const fn new() -> PageCache {
        PageCache {
            pages: [const { Cell::new(0) }; CACHE_PAGES],
            len: Cell::new(0),
            dry: Cell::new(None),
        }
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.len.get()
    }

    /// No page held.
    pub fn is_empty(&self) -> bool {
        self.len.get() == 0
    }

    /// True if the run loop may handle an EPT violation now: the cache covers the worst case
    /// ([`PAGES_PER_FAULT`]), or the OS has no more to give.
    pub fn ready_for_fault(&self) -> bool {
        self.len.get() >= PAGES_PER_FAULT || self.dry.get().is_some()
    }

    /// Fills the cache up to [`CACHE_PAGES`] from `p`; call where the OS may sleep. Returns the
    /// pages added. A refill that stops short marks the cache dry (see [`Self::ready_for_fault`]).
    pub fn refill<P: Platform + ?Sized>(&self, p: &P) -> usize {
        let mut added = 0;
        self.dry.set(None);
        while let Some(slot) = self.pages.get(self.len.get()) {
            match p.alloc_page() {
                Ok(hpa) => slot.set(hpa),
                Err(e) => {
                    self.dry.set(Some(e));
                    break;
                }
            }
            self.len.set(self.len.get() + 1);
            added += 1;
        }
        added
    }

    /// Takes a page (zeroed, from `Platform::alloc_page`).
    pub fn take(&self) -> Option<u64> {
        let n = self.len.get().checked_sub(1)?;
        let hpa = self.pages.get(n)?.get();
        self.len.set(n);
        Some(hpa)
    }

    /// Returns every page to `p` (the vCPU is destroyed).
    pub fn free_all<P: Platform + ?Sized>(&self, p: &P) {
        while let Some(hpa) = self.take() {
            p.free_page(hpa);
        }
        self.dry.set(None);
    }
}

/// The platform the run loop hands to the VM: allocations come from the vCPU's [`PageCache`]
/// only (never from the OS, which may not be called while interrupts are off), everything else
/// goes to the OS's platform.
pub struct Cached<'a, P: ?Sized> {
    platform: &'a P,
    cache: &'a PageCache,
}

impl<'a, P: Platform + ?Sized> Cached<'a, P> {
    /// `platform` backed by `cache` for allocations.
    pub fn new(platform: &'a P, cache: &'a PageCache) -> Cached<'a, P> {
        Cached { platform, cache }
    }
}

impl<P: Platform + ?Sized> Platform for Cached<'_, P> {
    fn alloc_page(&self) -> Result<u64, AllocError> {
        self.cache
            .take()
            .ok_or(self.cache.dry.get().unwrap_or(AllocError::OutOfMemory))
    }
    fn free_page(&self, hpa: u64) {
        // A freed page is not zero any more: it goes back to the OS, not to the cache.
        self.platform.free_page(hpa)
    }
    fn page(&self, hpa: u64) -> &PageWords {
        self.platform.page(hpa)
    }
    fn unpin_user_page(&self, hpa: u64) {
        self.platform.unpin_user_page(hpa)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn msr_bitmap_clears_exactly_the_passthrough_bits() {
        // SDM 25.6.9 by hand: EFER 0xC0000080 -> bit 0x80 of the read-high part (byte 1024 + 16,
        // quadword 130, bit 0) and of the write-high part (byte 3072 + 16, quadword 386, bit 0).
        // FS_BASE 0xC0000100 and GS_BASE 0xC0000101 -> bits 0x100/0x101: byte 1024 + 32
        // (quadword 132, bits 0 and 1) and byte 3072 + 32 (quadword 388).
        let words: Vec<u64> = (0..512)
            .map(|i| msr_bitmap_word(i, &PASSTHROUGH_MSRS))
            .collect();
        assert_eq!(words.get(130), Some(&!1));
        assert_eq!(words.get(386), Some(&!1));
        assert_eq!(words.get(132), Some(&!3));
        assert_eq!(words.get(388), Some(&!3));
        let cleared: u32 = words.iter().map(|w| w.count_zeros()).sum();
        assert_eq!(cleared, 6, "three MSRs, read and write each");
        // A low MSR (IA32_SYSENTER_CS 0x174) lands in the read-low part (quadword 0x174/64 = 5,
        // bit 0x174%64 = 52) and the write-low part (2048 bytes = 256 quadwords later).
        assert_eq!(msr_bitmap_word(5, &[0x174]), !(1u64 << 52));
        assert_eq!(msr_bitmap_word(261, &[0x174]), !(1u64 << 52));
        // MSRs outside both ranges cannot be passed through (SDM 25.6.9: they always exit).
        assert!((0..512).all(|i| msr_bitmap_word(i, &[0x4000_0000]) == u64::MAX));
    }

    #[test]
    fn bitmap_bytes_match_the_sdm_byte_layout() {
        // The same rule seen as bytes, the way the SDM states it: the processor reads byte
        // base + (MSR & 0x1FFF) / 8, bit (MSR & 7); the page is little-endian quadwords.
        let bytes: Vec<u8> = (0..512)
            .flat_map(|i| msr_bitmap_word(i, &PASSTHROUGH_MSRS).to_le_bytes())
            .collect();
        let clear = |base: usize, msr: u32| {
            let off = (msr & 0x1FFF) as usize;
            bytes.get(base + off / 8).map(|b| b & (1 << (off % 8)) == 0)
        };
        for msr in PASSTHROUGH_MSRS {
            assert_eq!(clear(1024, msr), Some(true), "read {msr:#x}");
            assert_eq!(clear(3072, msr), Some(true), "write {msr:#x}");
        }
        // IA32_KERNEL_GS_BASE (0xC0000102) and LSTAR (0xC0000082) stay intercepted.
        for msr in [0xC000_0102u32, 0xC000_0082] {
            assert_eq!(clear(1024, msr), Some(false));
            assert_eq!(clear(3072, msr), Some(false));
        }
    }
}
