//! KVM's dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, `virt/kvm/dirty_ring.c`): per vCPU, an
//! array of `kvm_dirty_gfn` shared with user space. smudge pushes an entry (slot, page offset)
//! when a page of a logged slot becomes dirty: at every VM exit from the PML buffer, or at a
//! write-protect fault. User space collects entries whose flags say DIRTY and marks them RESET;
//! KVM_RESET_DIRTY_RINGS re-arms their pages (D cleared, or W removed) and frees the entries.
//! The work of a harvest follows the dirty pages, not the memory size.
//!
//! Ordering: an entry's slot and offset are stored before its flags with release semantics;
//! user space reads the flags with acquire, and stores RESET with release, which the reset reads
//! with acquire (the ACQ_REL protocol).

use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crate::error::Error;
use crate::kvm::abi::{DIRTY_GFN_F_DIRTY, DIRTY_GFN_F_RESET};
use crate::platform::{PageWords, Platform};

/// Bytes of one entry (`struct kvm_dirty_gfn`).
pub const ENTRY: u64 = 16;
/// The largest ring (KVM_DIRTY_RING_MAX_ENTRIES entries).
pub const MAX_BYTES: u64 = 65536 * ENTRY;
/// Entries kept free beyond the soft limit for what one exit may add: KVM's
/// KVM_DIRTY_RING_RSVD_ENTRIES (64) plus a full PML buffer (512) where PML is on.
pub fn reserved_entries(pml: bool) -> u32 {
    64 + if pml { 512 } else { 0 }
}

/// Entries in one ring page.
const PER_PAGE: u32 = (4096 / ENTRY) as u32;

/// The flags-and-slot word and the offset word of one entry.
type EntryWords<'a> = (&'a AtomicU64, &'a AtomicU64);

/// Entry `e` (below [`PER_PAGE`]) of the ring page `words`.
fn entry_words(words: &PageWords, e: u32) -> Option<EntryWords<'_>> {
    let w = (u64::from(e) * ENTRY / 8) as usize;
    Some((words.get(w)?, words.get(w + 1)?))
}

/// A vCPU's dirty ring: its pages (listed in a driver page), its size and its indices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    /// Host-physical address of the page that lists the ring's pages.
    pub list: u64,
    /// Entries (a power of two).
    pub entries: u32,
    /// Entries pushed so far.
    pub dirty_index: u32,
    /// Entries reset so far.
    pub reset_index: u32,
    /// Entries beyond which KVM_RUN exits with KVM_EXIT_DIRTY_RING_FULL.
    pub soft_limit: u32,
}

impl Ring {
    /// A ring of `bytes` (checked by the caller: a power of two, at most [`MAX_BYTES`]),
    /// zeroed. On failure nothing stays allocated.
    pub fn alloc<P: Platform + ?Sized>(p: &P, bytes: u64, pml: bool) -> Result<Ring, Error> {
        let pages = bytes.div_ceil(4096) as usize;
        let list = p.alloc_page()?;
        let mut r = Ring {
            list,
            entries: (bytes / ENTRY) as u32,
            dirty_index: 0,
            reset_index: 0,
            soft_limit: ((bytes / ENTRY) as u32).saturating_sub(reserved_entries(pml)),
        };
        for i in 0..pages {
            match p.alloc_page() {
                Ok(pg) => p.page(list)[i].store(pg, Relaxed),
                Err(e) => {
                    r.free(p);
                    return Err(e.into());
                }
            }
        }
        Ok(r)
    }

    /// Returns every page.
    pub fn free<P: Platform + ?Sized>(&mut self, p: &P) {
        if self.list == 0 {
            return;
        }
        for w in p.page(self.list).iter() {
            let pg = w.swap(0, Relaxed);
            if pg != 0 {
                p.free_page(pg);
            }
        }
        p.free_page(core::mem::take(&mut self.list));
    }

    /// Host-physical address of ring page `i` (None beyond the ring).
    pub fn page<P: Platform + ?Sized>(&self, p: &P, i: u64) -> Option<u64> {
        if self.list == 0 || i >= u64::from(self.entries) * ENTRY / 4096 {
            return None;
        }
        p.page(self.list)
            .get(i as usize)
            .map(|w| w.load(Relaxed))
            .filter(|&pg| pg != 0)
    }

    /// The two words of entry `i`: flags | slot << 32, then the offset.
    fn words<'a, P: Platform + ?Sized>(&self, p: &'a P, i: u32) -> Option<EntryWords<'a>> {
        let i = i & self.entries.wrapping_sub(1);
        let page = self.page(p, u64::from(i / PER_PAGE))?;
        entry_words(p.page(page), i % PER_PAGE)
    }

    /// Entries pushed and not reset.
    pub fn used(&self) -> u32 {
        self.dirty_index.wrapping_sub(self.reset_index)
    }

    /// KVM_EXIT_DIRTY_RING_FULL is due: KVM_RUN exits until a reset brings the ring below.
    pub fn soft_full(&self) -> bool {
        self.used() >= self.soft_limit
    }

    /// Pushes page `offset` of slot `slot` (KVM's id); false when the ring is completely full
    /// (the reserve makes that impossible while KVM_RUN honours the soft limit).
    pub fn push<P: Platform + ?Sized>(&mut self, p: &P, slot: u32, offset: u64) -> bool {
        if self.used() >= self.entries {
            return false;
        }
        let Some((flags_slot, off)) = self.words(p, self.dirty_index) else {
            return false;
        };
        off.store(offset, Relaxed);
        flags_slot.store(
            u64::from(DIRTY_GFN_F_DIRTY) | u64::from(slot) << 32,
            Release,
        );
        self.dirty_index = self.dirty_index.wrapping_add(1);
        true
    }

    /// KVM_RESET_DIRTY_RINGS for this ring: every entry from the reset index that user space
    /// marked RESET is freed and goes to `rearm` as (slot, offset), in batches of up to
    /// [`crate::dirty::REARM_BATCH`]; stops at the first that is not. Returns how many were reset.
    pub fn reset<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        rearm: &mut dyn FnMut(&[(u32, u64)]),
    ) -> u64 {
        let mut batch = [(0u32, 0u64); crate::dirty::REARM_BATCH];
        let mut queued = 0;
        let n = self.reset_entries(p, &mut |entry| {
            batch[queued] = entry;
            queued += 1;
            if queued == crate::dirty::REARM_BATCH {
                rearm(&batch);
                queued = 0;
            }
        });
        if queued > 0 {
            rearm(&batch[..queued]);
        }
        n
    }

    /// Frees the entries marked RESET from the reset index on, each to `f`; how many.
    fn reset_entries<P: Platform + ?Sized>(&mut self, p: &P, f: &mut dyn FnMut((u32, u64))) -> u64 {
        let mut n = 0;
        'pages: while self.used() > 0 {
            // The entries of one ring page, the page looked up once.
            let i = self.reset_index & self.entries.wrapping_sub(1);
            let Some(page) = self.page(p, u64::from(i / PER_PAGE)) else {
                break;
            };
            let words = p.page(page);
            for e in i % PER_PAGE..PER_PAGE {
                if self.used() == 0 {
                    break 'pages;
                }
                let Some((flags_slot, off)) = entry_words(words, e) else {
                    break 'pages;
                };
                let v = flags_slot.load(Acquire);
                if v as u32 & DIRTY_GFN_F_RESET == 0 {
                    break 'pages;
                }
                let (slot, offset) = ((v >> 32) as u32, off.load(Relaxed));
                flags_slot.store(v & !0xffff_ffff, Release);
                self.reset_index = self.reset_index.wrapping_add(1);
                f((slot, offset));
                n += 1;
            }
        }
        n
    }
}
