//! Dirty-page tracking for one memory slot, in the `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG`
//! shape: one bit per 4 KiB page of the slot.
//!
//! Three modes behind one interface ([`DirtyLog`]):
//! - [`Mode::AdScan`]: the EPT leaves' dirty flags are the log. A harvest walks the tables,
//!   visiting only subtrees whose upper-level accessed flag is set, and clears D (and A above).
//! - [`Mode::Pml`]: the processor logs the GPA of every write that sets a leaf D flag from 0 to 1
//!   into a 512-entry buffer ([`pml`]); draining it marks a software bitmap. Clearing re-arms the
//!   pages by clearing D.
//! - [`Mode::WriteProtect`]: tracked leaves lose W; the first write is an EPT violation whose
//!   handler marks the page and gives W back ([`DirtyLog::on_write_violation`]).
//!
//! Every clear of D, A or W returns the INVEPT it owes ([`crate::ept::Invept`]): SDM 29.4.3.4
//! (INVEPT guidelines): after software clears an A/D flag or a permission, cached translations
//! may still carry the old value, so a later write could go unrecorded (the lost-dirty-page
//! bug). The harvest is complete only once the caller paid it ([`crate::ept::Ept::pay`]: INVEPT
//! on every CPU that may cache the EPT).
//!
//! Precondition of every method that clears: no vCPU using the EPT is in VMX non-root operation
//! (the VM kicks them out first), so entries are updated with plain loads and stores. The A/D
//! scan goes further: with the EPT borrowed mutably as well, nothing else can touch a page table
//! while it is cleared, so each table is borrowed whole through [`Platform::with_page_mut`],
//! as plain memory where the platform allows it (vectorized loops).

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::ept::{
    bits, level_span, walk, Ept, EptEntry, Invept, Step, TableCache, Visit, PAGE_SIZE, SW_WRITABLE,
};
use crate::error::Error;
use crate::platform::{PageMut, Platform};

/// The dirty-tracking mode of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Mode {
    /// Scan EPT dirty flags (EPTP bit 6).
    AdScan = 1,
    /// Page-modification logging (secondary control bit 17, needs A/D).
    Pml = 2,
    /// Write-protect the leaves and log EPT violations.
    WriteProtect = 3,
}

impl Mode {
    /// Short name, as the user tool prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::AdScan => "ad",
            Mode::Pml => "pml",
            Mode::WriteProtect => "wp",
        }
    }
}

/// Pages one bitmap page tracks (4096 bytes * 8).
pub const BITS_PER_PAGE: u64 = 32768;
/// Largest slot a dirty log tracks: one directory page of 512 bitmap pages, 64 GiB.
pub const MAX_TRACKED_PAGES: u64 = 512 * BITS_PER_PAGE;

/// A bitmap whose storage comes from platform pages: a directory page of up to 512 bitmap-page
/// addresses, each bitmap page 32768 bits.
#[derive(Debug)]
pub struct PagedBitmap {
    dir: u64,
    bits: u64,
}

impl PagedBitmap {
    /// A zeroed bitmap of `bits` bits (at most [`MAX_TRACKED_PAGES`]); all pages or none.
    pub fn new<P: Platform + ?Sized>(p: &P, bits: u64) -> Result<PagedBitmap, Error> {
        if bits == 0 || bits > MAX_TRACKED_PAGES {
            return Err(Error::SlotTooLarge);
        }
        let dir = p.alloc_page()?;
        let n = bits.div_ceil(BITS_PER_PAGE) as usize;
        for i in 0..n {
            match p.alloc_page() {
                Ok(pg) => p.page(dir)[i].store(pg, Relaxed),
                Err(e) => {
                    let partial = PagedBitmap {
                        dir,
                        bits: i as u64 * BITS_PER_PAGE,
                    };
                    partial.free(p);
                    return Err(e.into());
                }
            }
        }
        Ok(PagedBitmap { dir, bits })
    }

    /// Pages the bitmap holds (directory included).
    pub fn pages(&self) -> usize {
        1 + self.bits.div_ceil(BITS_PER_PAGE) as usize
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True when the bitmap has no bits (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    fn word<'a, P: Platform + ?Sized>(&self, p: &'a P, word: u64) -> &'a AtomicU64 {
        let page = p.page(self.dir)[(word / 512) as usize].load(Relaxed);
        &p.page(page)[(word % 512) as usize]
    }

    /// Sets bit `i` (ignored when out of range).
    pub fn set<P: Platform + ?Sized>(&self, p: &P, i: u64) {
        if i < self.bits {
            self.word(p, i / 64).fetch_or(1 << (i % 64), Relaxed);
        }
    }

    /// Reads bit `i`.
    pub fn get<P: Platform + ?Sized>(&self, p: &P, i: u64) -> bool {
        i < self.bits && self.word(p, i / 64).load(Relaxed) & (1 << (i % 64)) != 0
    }

    /// Word `w` (bits 64w..64w+63).
    pub fn load_word<P: Platform + ?Sized>(&self, p: &P, w: u64) -> u64 {
        if w * 64 >= self.bits {
            return 0;
        }
        self.word(p, w).load(Relaxed)
    }

    /// Clears the bits of `mask` in word `w`; returns the bits that were set among them.
    pub fn clear_word<P: Platform + ?Sized>(&self, p: &P, w: u64, mask: u64) -> u64 {
        if w * 64 >= self.bits {
            return 0;
        }
        self.word(p, w).fetch_and(!mask, Relaxed) & mask
    }

    /// Returns the pages to the platform.
    pub fn free<P: Platform + ?Sized>(self, p: &P) {
        let n = self.bits.div_ceil(BITS_PER_PAGE) as usize;
        for i in 0..n {
            let pg = p.page(self.dir)[i].load(Relaxed);
            if pg != 0 {
                p.free_page(pg);
            }
        }
        p.free_page(self.dir);
    }
}

/// The page-modification log (SDM 29.3.6 "Page-Modification Logging").
pub mod pml {
    use super::*;

    /// Entries in the 4 KiB PML buffer.
    pub const ENTRIES: u16 = 512;
    /// The PML index after a reset: the processor logs at the index, then decrements it.
    pub const INDEX_RESET: u16 = 511;

    /// Calls `f(gpa)` for every GPA the processor logged since the index was `INDEX_RESET`,
    /// oldest first, and returns how many there were. `index` is the guest PML index field
    /// (VMCS 0x0812). An index above 511 means the buffer is full: after logging at index 0 the
    /// processor decrements it to 0xFFFF (SDM 29.3.6). The caller then writes back INDEX_RESET.
    ///
    /// The low 12 bits are masked: real processors log 4 KiB-aligned GPAs, Bochs 2.7 does not.
    pub fn drain<P: Platform + ?Sized, F: FnMut(u64)>(
        p: &P,
        buffer: u64,
        index: u16,
        mut f: F,
    ) -> usize {
        let first = if index >= ENTRIES {
            0
        } else {
            index as usize + 1
        };
        let page = p.page(buffer);
        let mut n = 0;
        for i in (first..ENTRIES as usize).rev() {
            f(page[i].load(Relaxed) & !(PAGE_SIZE - 1));
            n += 1;
        }
        n
    }
}

/// The dirty log of one memory slot.
#[derive(Debug)]
pub struct DirtyLog {
    mode: Mode,
    base: u64,
    pages: u64,
    /// The software log of PML and write-protect (A/D scan keeps its log in the EPT).
    bitmap: Option<PagedBitmap>,
}

impl DirtyLog {
    /// A dirty log for the slot `[base, base + pages * 4 KiB)`.
    pub fn new<P: Platform + ?Sized>(
        p: &P,
        mode: Mode,
        base: u64,
        pages: u64,
    ) -> Result<DirtyLog, Error> {
        if !base.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned);
        }
        if pages == 0 || base.checked_add(pages.saturating_mul(PAGE_SIZE)).is_none() {
            return Err(Error::EmptyOrWrappingRange);
        }
        if pages > MAX_TRACKED_PAGES {
            return Err(Error::SlotTooLarge);
        }
        let bitmap = match mode {
            Mode::AdScan => None,
            Mode::Pml | Mode::WriteProtect => Some(PagedBitmap::new(p, pages)?),
        };
        Ok(DirtyLog {
            mode,
            base,
            pages,
            bitmap,
        })
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// First guest-physical address of the slot.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Pages in the slot.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages the log itself holds (its bitmap).
    pub fn pages_held(&self) -> usize {
        self.bitmap.as_ref().map_or(0, |b| b.pages())
    }

    fn end(&self) -> u64 {
        self.base + self.pages * PAGE_SIZE
    }

    /// True when `gpa` lies in the slot.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.base && gpa < self.end()
    }

    /// Starts logging: splits large leaves of the slot to 4 KiB (KVM's eager split; a bit is
    /// one 4 KiB page, so one write must not report 512 pages) and cleans the slot: D and the
    /// upper A flags cleared (A/D, PML) or W removed (write-protect). Owes INVEPT.
    pub fn enable<P: Platform + ?Sized>(&mut self, p: &P, ept: &mut Ept) -> Result<Invept, Error> {
        let split = ept.split_range(p, self.base, self.pages * PAGE_SIZE)?;
        match self.mode {
            Mode::AdScan | Mode::Pml => {
                let mut sink = |_: u64, _: u64| {};
                scan_ad_masks(
                    p,
                    ept,
                    self.base,
                    self.end(),
                    ScanOp::Clear { prune: false },
                    &mut sink,
                );
            }
            Mode::WriteProtect => {
                ept.for_each_leaf(p, self.base, self.end(), &mut |_, _, w: &AtomicU64| {
                    let v = w.load(Relaxed);
                    if v & bits::W != 0 {
                        w.store((v & !bits::W) | SW_WRITABLE, Relaxed);
                    }
                });
            }
        }
        Ok(split.and(ept.owe()))
    }

    /// Stops logging: write-protect gives W back to every writable page. Large pages are not
    /// rebuilt.
    pub fn disable<P: Platform + ?Sized>(&mut self, p: &P, ept: &mut Ept) {
        if self.mode == Mode::WriteProtect {
            ept.for_each_leaf(p, self.base, self.end(), &mut |_, _, w: &AtomicU64| {
                let v = w.load(Relaxed);
                if v & SW_WRITABLE != 0 {
                    w.store(v | bits::W, Relaxed);
                }
            });
        }
    }

    /// Marks the page of `gpa` dirty in the software log (PML drain, write-protect fault).
    /// Returns false when `gpa` is outside the slot or the mode keeps no software log.
    pub fn mark<P: Platform + ?Sized>(&self, p: &P, gpa: u64) -> bool {
        match &self.bitmap {
            Some(b) if self.contains(gpa) => {
                b.set(p, (gpa - self.base) / PAGE_SIZE);
                true
            }
            _ => false,
        }
    }

    /// Write-protect mode: an EPT violation on a write to `gpa`. If the leaf is present, was
    /// write-protected by this log (SW_WRITABLE) and lacks W, the page is logged and W restored.
    /// No INVEPT is needed: the violation invalidated the cached translations for the faulting
    /// address (SDM 29.4.3.1 "Operations that Invalidate Cached Mappings").
    /// Returns false when the fault is not ours to resolve.
    pub fn on_write_violation<P: Platform + ?Sized>(&self, p: &P, ept: &Ept, gpa: u64) -> bool {
        self.unprotect(p, ept, gpa) && self.mark(p, gpa)
    }

    /// The write-protect half of [`DirtyLog::on_write_violation`]: W restored if this log
    /// removed it; true when it did (the caller logs the page: here, or in a dirty ring).
    pub fn unprotect<P: Platform + ?Sized>(&self, p: &P, ept: &Ept, gpa: u64) -> bool {
        if self.mode != Mode::WriteProtect || !self.contains(gpa) {
            return false;
        }
        let Some((word, _)) = ept.leaf(p, gpa) else {
            return false;
        };
        let v = word.load(Relaxed);
        if v & SW_WRITABLE == 0 || v & bits::W != 0 {
            return false;
        }
        word.fetch_or(bits::W, Relaxed);
        true
    }

    /// `KVM_GET_DIRTY_LOG`: ORs nothing, overwrites `out[..pages/64]` with the pages written
    /// since they were last cleared. PML: drain the buffers first. Does not clear.
    pub fn get<P: Platform + ?Sized>(
        &self,
        p: &P,
        ept: &Ept,
        out: &mut [u64],
    ) -> Result<(), Error> {
        let words = self.pages.div_ceil(64) as usize;
        let out = out.get_mut(..words).ok_or(Error::BitmapTooSmall)?;
        out.fill(0);
        match &self.bitmap {
            None => {
                let base = self.base;
                scan_ad_masks(
                    p,
                    ept,
                    self.base,
                    self.end(),
                    ScanOp::Read,
                    &mut |gpa, mask| {
                        or_mask(out, (gpa - base) / PAGE_SIZE, mask);
                    },
                );
            }
            Some(b) => {
                for (w, o) in out.iter_mut().enumerate() {
                    *o = b.load_word(p, w as u64);
                }
            }
        }
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clears the pages `first + i` for every bit `i` set in `mask`,
    /// `i < num`. `first` and `num` must be multiples of 64 unless the range ends at the slot end.
    /// Re-arms the cleared pages (D cleared, or W removed), which owes INVEPT when any was.
    pub fn clear<P: Platform + ?Sized>(
        &self,
        p: &P,
        ept: &mut Ept,
        first: u64,
        num: u64,
        mask: &[u64],
    ) -> Result<Invept, Error> {
        let end = first.checked_add(num).ok_or(Error::InvalidDirtyLogRange)?;
        if !first.is_multiple_of(64)
            || end > self.pages
            || (!num.is_multiple_of(64) && end != self.pages)
        {
            return Err(Error::InvalidDirtyLogRange);
        }
        if (mask.len() as u64) < num.div_ceil(64) {
            return Err(Error::BitmapTooSmall);
        }
        let valid = |w: u64| {
            if (w + 1) * 64 <= num {
                u64::MAX
            } else {
                (1u64 << (num % 64)) - 1
            }
        };
        let any = self.rearm_words(p, ept, first, num.div_ceil(64), &mut |w| {
            let m = mask[w as usize] & valid(w);
            match &self.bitmap {
                Some(b) if m != 0 => b.clear_word(p, first / 64 + w, m),
                _ => m,
            }
        });
        Ok(if any { ept.owe() } else { Invept::NONE })
    }

    /// Re-arms the pages `first + 64 * w + j` for every bit j of `mask(w)`, `w < words`, and
    /// returns true if an entry changed. `mask` is called once per word, in order (`first` is a
    /// multiple of 64). The words are realigned to the page tables' 64-leaf chunks (a slot may
    /// start anywhere in a chunk: `o` pages in), so each chunk is one mask: a table is found once
    /// per 2 MiB and lent whole, as in a harvest, and a full chunk, or a full table, is re-armed
    /// in one branch-free pass.
    fn rearm_words<P: Platform + ?Sized>(
        &self,
        p: &P,
        ept: &Ept,
        first: u64,
        words: u64,
        mask: &mut dyn FnMut(u64) -> u64,
    ) -> bool {
        let o = (self.base / PAGE_SIZE) % 64;
        let chunks = if o == 0 { words } else { words + 1 };
        let wp = self.mode == Mode::WriteProtect;
        let mut cache = TableCache::default();
        let (mut any, mut prev, mut c) = (false, 0u64, 0u64);
        while c < chunks {
            // The chunks of one page table from chunk `c`, whose first leaf maps page
            // `first + 64 * c - o` of the slot (below `base` for c = 0 when o > 0: the bits for
            // those leaves are zero).
            let gpa = self.base + (first + 64 * c) * PAGE_SIZE - o * PAGE_SIZE;
            let start = ((gpa / PAGE_SIZE) % 512) as usize;
            let n = ((512 - start) as u64 / 64).min(chunks - c) as usize;
            let mut masks = [0u64; 8];
            for m in masks.iter_mut().take(n) {
                let cur = if c < words { mask(c) } else { 0 };
                *m = if o == 0 {
                    cur
                } else {
                    prev >> (64 - o) | cur << o
                };
                prev = cur;
                c += 1;
            }
            if masks == [0; 8] {
                continue;
            }
            let Some(table) = ept.page_table_cached(p, gpa, &mut cache) else {
                continue;
            };
            p.with_page_mut(table, &mut |mut page| {
                if let (PageMut::Exclusive(ref mut t), true) = (&mut page, masks == [u64::MAX; 8]) {
                    // The whole table: one pass.
                    any |= rearm_all(&mut t[..], wp);
                    return;
                }
                for (i, &m) in masks.iter().enumerate().filter(|(_, &m)| m != 0) {
                    let leaves = start + i * 64..start + i * 64 + 64;
                    any |= match page {
                        PageMut::Shared(t) => t.get(leaves).is_some_and(|mut c| c.rearm(m, wp)),
                        PageMut::Exclusive(ref mut t) => {
                            t.get_mut(leaves).is_some_and(|mut c| c.rearm(m, wp))
                        }
                    };
                }
            });
        }
        any
    }

    /// The 4 KiB leaf of `gpa` in the slot, for [`DirtyLog::rearm_leaf`] (None outside the slot
    /// or where no page table maps it).
    pub fn leaf<'a, P: Platform + ?Sized>(
        &self,
        p: &'a P,
        ept: &Ept,
        gpa: u64,
        cache: &mut TableCache,
    ) -> Option<&'a AtomicU64> {
        if !self.contains(gpa) {
            return None;
        }
        let table = ept.page_table_cached(p, gpa, cache)?;
        p.page(table).get(crate::ept::index(gpa, 1))
    }

    /// Re-arms tracking of the page whose leaf [`DirtyLog::leaf`] gave; true if it changed (the
    /// caller raises the INVEPT obligation).
    pub fn rearm_leaf(&self, word: &AtomicU64) -> bool {
        rearm_word(word, self.mode == Mode::WriteProtect)
    }

    /// Get and clear in one pass over the whole slot: `out` receives the pages written since the
    /// last harvest, and they are re-armed (which owes INVEPT). For A/D this is the pruned scan.
    pub fn harvest<P: Platform + ?Sized>(
        &self,
        p: &P,
        ept: &mut Ept,
        out: &mut [u64],
    ) -> Result<Invept, Error> {
        let words = self.pages.div_ceil(64) as usize;
        let out = out.get_mut(..words).ok_or(Error::BitmapTooSmall)?;
        out.fill(0);
        match &self.bitmap {
            None => {
                let base = self.base;
                scan_ad_masks(
                    p,
                    ept,
                    self.base,
                    self.end(),
                    ScanOp::Clear { prune: true },
                    &mut |gpa, mask| {
                        or_mask(out, (gpa - base) / PAGE_SIZE, mask);
                    },
                );
            }
            Some(b) => {
                self.rearm_words(p, ept, 0, words as u64, &mut |w| {
                    let v = b.clear_word(p, w, u64::MAX);
                    out[w as usize] = v;
                    v
                });
            }
        }
        Ok(ept.owe())
    }

    /// Returns the log's pages to the platform.
    pub fn free<P: Platform + ?Sized>(self, p: &P) {
        if let Some(b) = self.bitmap {
            b.free(p);
        }
    }
}

/// Pages [`rearm_batch`] re-arms at once.
pub const REARM_BATCH: usize = 16;

/// Re-arms the leaves `find(0..n)` gives (n at most [`REARM_BATCH`]; None skips): every leaf is
/// found first, then all are re-armed. The re-arming loads are independent of each other, so
/// the cache misses of scattered pages overlap instead of following one another's walks (64 GiB
/// benchmark: 0.42 ms instead of 0.65 ms for 16,770 pages; a PREFETCHW of each leaf in the first
/// pass gained nothing).
pub fn rearm_batch<'a>(
    n: usize,
    mut find: impl FnMut(usize) -> Option<(&'a DirtyLog, &'a AtomicU64)>,
) -> bool {
    let mut leaves: [Option<(&DirtyLog, &AtomicU64)>; REARM_BATCH] = [None; REARM_BATCH];
    for (i, leaf) in leaves.iter_mut().enumerate().take(n) {
        *leaf = find(i);
    }
    leaves
        .iter()
        .flatten()
        .fold(false, |any, (log, w)| log.rearm_leaf(w) | any)
}

/// What [`scan_ad`] does to the flags it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanOp {
    /// Report leaves with D=1; change nothing.
    Read,
    /// Report and clear D, and clear A in upper entries whose span lies inside the range.
    /// With `prune`, skip subtrees whose upper entry has A=0. Precondition: the module's (no
    /// vCPU on this EPT in VMX non-root operation), and nothing else uses the EPT during the
    /// scan (as under `&mut Ept`): its page tables are lent by [`Platform::with_page_mut`].
    Clear {
        /// Skip subtrees whose A flag is clear.
        prune: bool,
    },
}

/// ORs `mask` (bit j = page `first + j`) into the bitmap `out`; bits beyond `out` are dropped.
fn or_mask(out: &mut [u64], first: u64, mask: u64) {
    let (w, shift) = ((first / 64) as usize, first % 64);
    if let Some(o) = out.get_mut(w) {
        *o |= mask << shift;
    }
    if shift != 0 {
        if let Some(o) = out.get_mut(w + 1) {
            *o |= mask >> (64 - shift);
        }
    }
}

/// Scans the leaves of `[gpa, end)` for D=1 and reports every dirty 4 KiB page to `f` (a large
/// leaf reports each of its pages inside the range). See [`scan_ad_masks`].
pub fn scan_ad<P: Platform + ?Sized, F: FnMut(u64)>(
    p: &P,
    ept: &Ept,
    gpa: u64,
    end: u64,
    op: ScanOp,
    f: &mut F,
) {
    scan_ad_masks(p, ept, gpa, end, op, &mut |g, mask| {
        let mut m = mask;
        while m != 0 {
            let bit = u64::from(m.trailing_zeros());
            m &= m - 1;
            f(g + bit * PAGE_SIZE);
        }
    })
}

/// Scans the leaves of `[gpa, end)` for D=1 and reports the dirty 4 KiB pages to `f(g, mask)` in
/// runs of up to 64: bit j of `mask` set means page `g + j * 4 KiB` is dirty (never 0).
///
/// The pruning rests on SDM 29.3.5: the processor sets A in every EPT entry it uses for a
/// translation, so a write that sets a leaf's D also sets A in the PML4E, PDPTE and PDE above
/// it, once caches were invalidated after A was cleared. An upper entry with A=0 has no leaf
/// below it dirtied since its A was last cleared, and A is only cleared together with every
/// D below it. A `Read` scan also prunes: it relies on the same invariant.
pub fn scan_ad_masks<P: Platform + ?Sized, F: FnMut(u64, u64)>(
    p: &P,
    ept: &Ept,
    gpa: u64,
    end: u64,
    op: ScanOp,
    f: &mut F,
) {
    if gpa < end {
        let (prune, clear) = match op {
            ScanOp::Read => (true, false),
            ScanOp::Clear { prune } => (prune, true),
        };
        walk(
            p,
            ept.pml4(),
            gpa,
            end,
            &mut AdScan {
                op,
                prune,
                clear,
                f,
            },
        );
    }
}

/// Reports the pages of `[lo, hi)` (a dirty large leaf) in runs of 64.
fn report_range<F: FnMut(u64, u64)>(lo: u64, hi: u64, f: &mut F) {
    let mut g = lo;
    while g < hi {
        let n = ((hi - g) / PAGE_SIZE).min(64);
        f(g, if n == 64 { u64::MAX } else { (1u64 << n) - 1 });
        g += n * PAGE_SIZE;
    }
}

/// 1 when `v` is a present leaf with D set (D is bit 9; the processor ignores the other bits of
/// a not-present entry, SDM 29.3.2), else 0.
fn dirty_bit(v: u64) -> u64 {
    // R, W, X are bits 0-2: their OR lands in bit 0 without a 64-bit compare, which SSE2 lacks.
    const _: () = assert!(bits::RWX == 0b111);
    (v >> 9) & (v | v >> 1 | v >> 2) & 1
}

/// True when every leaf folded into `all` (their AND) is present and dirty: D and one of R, W, X
/// set in all of them.
fn all_dirty(all: u64) -> bool {
    all & bits::D != 0 && all & bits::RWX != 0
}

/// Calls `f(j)` for every bit j set in `mask`, lowest first.
#[inline]
fn for_each_bit(mask: u64, mut f: impl FnMut(usize)) {
    let mut m = mask;
    while m != 0 {
        f(m.trailing_zeros() as usize);
        m &= m - 1;
    }
}

/// Leaf `v` re-armed for tracking: D cleared if it is a present leaf (A/D, PML), or W removed
/// and remembered in SW_WRITABLE (write-protect). Unchanged otherwise. Branch-free, so that a
/// loop over a table vectorizes.
#[inline]
fn rearmed(v: u64, wp: bool) -> u64 {
    if wp {
        let w = (v >> 1) & 1; // bits::W
        (v & !bits::W) | (w.wrapping_neg() & SW_WRITABLE)
    } else {
        v & !(dirty_bit(v) << 9)
    }
}

/// Re-arms the leaf in `word` ([`rearmed`]), one load and a store only if it changes; true if
/// it changed.
#[inline]
fn rearm_word(word: &AtomicU64, wp: bool) -> bool {
    let v = word.load(Relaxed);
    let new = rearmed(v, wp);
    if new != v {
        word.store(new, Relaxed);
    }
    new != v
}

/// Re-arms every leaf of `t`, a load and a store each; true if one changed. For D, the dense
/// case first, as in [`scan_leaves`]: D flipped in every leaf while their AND is taken; if a leaf
/// was not present and dirty, the flip is undone and the leaves re-armed one by one.
#[inline]
fn rearm_all(mut t: &mut [u64], wp: bool) -> bool {
    if !wp {
        if all_dirty(t.flip_d()) {
            return true;
        }
        t.flip_d();
    }
    t.iter_mut().fold(0, |changed, w| {
        let v = *w;
        *w = rearmed(v, wp);
        changed | (v ^ *w)
    }) != 0
}

/// Leaves per cache line (8 bytes each).
const LINE: usize = 8;

/// Up to 64 consecutive leaves of one page table, as [`scan_leaves`] sees them: through the
/// atomics, or as plain memory lent by [`Platform::with_page_mut`], whose loops the compiler
/// vectorizes. Bit j of a mask is leaf j.
trait Chunk {
    /// Number of leaves (1..=64).
    fn leaves(&self) -> usize;
    /// The OR of the leaves.
    fn any(&self) -> u64;
    /// The AND of the leaves.
    fn all(&self) -> u64;
    /// The mask of the present leaves with D set; the per-leaf work is done only in cache lines
    /// whose OR has D.
    fn dirty_mask(&self) -> u64;
    /// Clears D in the leaves of `mask`.
    fn clear_d(&mut self, mask: u64);
    /// Flips D in every leaf and returns the AND of the leaves as they were.
    fn flip_d(&mut self) -> u64;
    /// Re-arms the leaves of `mask` ([`rearmed`]); true if one changed.
    fn rearm(&mut self, mask: u64, wp: bool) -> bool;
}

impl Chunk for &[AtomicU64] {
    #[inline]
    fn leaves(&self) -> usize {
        self.len()
    }
    #[inline]
    fn any(&self) -> u64 {
        self.iter().fold(0, |any, w| any | w.load(Relaxed))
    }
    #[inline]
    fn all(&self) -> u64 {
        self.iter().fold(u64::MAX, |all, w| all & w.load(Relaxed))
    }
    #[inline]
    fn dirty_mask(&self) -> u64 {
        let mut mask = 0;
        for (i, line) in self.chunks(LINE).enumerate() {
            if line.any() & bits::D != 0 {
                let m = line
                    .iter()
                    .enumerate()
                    .fold(0, |m, (j, w)| m | dirty_bit(w.load(Relaxed)) << j);
                mask |= m << (i * LINE);
            }
        }
        mask
    }
    #[inline]
    fn clear_d(&mut self, mask: u64) {
        for_each_bit(mask, |j| {
            if let Some(w) = self.get(j) {
                w.store(w.load(Relaxed) & !bits::D, Relaxed);
            }
        });
    }
    #[inline]
    fn flip_d(&mut self) -> u64 {
        self.iter().fold(u64::MAX, |all, w| {
            let v = w.load(Relaxed);
            w.store(v ^ bits::D, Relaxed);
            all & v
        })
    }
    #[inline]
    fn rearm(&mut self, mask: u64, wp: bool) -> bool {
        let mut changed = false;
        for_each_bit(mask, |j| {
            if let Some(w) = self.get(j) {
                changed |= rearm_word(w, wp);
            }
        });
        changed
    }
}

impl Chunk for &mut [u64] {
    #[inline]
    fn leaves(&self) -> usize {
        self.len()
    }
    #[inline]
    fn any(&self) -> u64 {
        self.iter().fold(0, |any, &v| any | v)
    }
    #[inline]
    fn all(&self) -> u64 {
        self.iter().fold(u64::MAX, |all, &v| all & v)
    }
    #[inline]
    fn dirty_mask(&self) -> u64 {
        let mut mask = 0;
        for (i, line) in self.chunks(LINE).enumerate() {
            if line.iter().fold(0, |any, &v| any | v) & bits::D != 0 {
                let m = line
                    .iter()
                    .enumerate()
                    .fold(0, |m, (j, &v)| m | dirty_bit(v) << j);
                mask |= m << (i * LINE);
            }
        }
        mask
    }
    #[inline]
    fn clear_d(&mut self, mask: u64) {
        for_each_bit(mask, |j| {
            if let Some(w) = self.get_mut(j) {
                *w &= !bits::D;
            }
        });
    }
    #[inline]
    fn flip_d(&mut self) -> u64 {
        self.iter_mut().fold(u64::MAX, |all, w| {
            let v = *w;
            *w = v ^ bits::D;
            all & v
        })
    }
    #[inline]
    fn rearm(&mut self, mask: u64, wp: bool) -> bool {
        if mask == u64::MAX >> (64 - self.leaves()) {
            return rearm_all(self, wp);
        }
        let mut changed = 0;
        for_each_bit(mask, |j| {
            if let Some(w) = self.get_mut(j) {
                let v = *w;
                *w = rearmed(v, wp);
                changed |= v ^ *w;
            }
        });
        changed != 0
    }
}

/// The hot loop: the 4 KiB leaves of one page table from `gpa` on, in chunks of up to 64.
/// Reports every chunk with dirty leaves as `f(gpa of the chunk, mask)`; with `clear`, clears
/// their D. Plain stores suffice: no vCPU runs on this EPT (the module's precondition), and
/// nothing else sees the table while it is being cleared.
///
/// A chunk is sorted without per-leaf bit work when it can be: an OR with no D means clean
/// (skipped); an AND with D and a common R/W/X bit means every leaf is present and dirty (mask
/// all ones, and flipping D clears it). After such a dense chunk the next one is predicted dense
/// and cleared in one pass, a load and a store per leaf: D is flipped in every leaf while the AND
/// of the old values is taken. If the prediction was wrong the flip is undone (flipping again
/// restores every leaf exactly) and the chunk takes the mixed path: mask built leaf by leaf,
/// then D cleared in the dirty leaves only.
fn scan_leaves<C: Chunk, F: FnMut(u64, u64)>(
    chunks: impl Iterator<Item = C>,
    gpa: u64,
    clear: bool,
    f: &mut F,
) {
    let mut dense = false;
    for (c, mut chunk) in chunks.enumerate() {
        let flipped = clear && dense;
        let all = if flipped {
            chunk.flip_d()
        } else if chunk.any() & bits::D != 0 {
            chunk.all()
        } else {
            dense = false;
            continue;
        };
        let full = u64::MAX >> (64 - chunk.leaves());
        let mask = if all_dirty(all) {
            if clear && !flipped {
                chunk.flip_d();
            }
            full
        } else {
            if flipped {
                chunk.flip_d();
            }
            let mask = chunk.dirty_mask();
            if clear {
                chunk.clear_d(mask);
            }
            mask
        };
        dense = mask == full;
        if mask != 0 {
            f(gpa + (c * 64) as u64 * PAGE_SIZE, mask);
        }
    }
}

/// The A/D scan as a visitor of the EPT's one walk (`ept::walk`): upper entries pruned by A and
/// cleared of it where the range covers them, large leaves reported (and cleared when wholly
/// inside), page tables read or lent whole ([`scan_leaves`]).
struct AdScan<'a, F> {
    op: ScanOp,
    /// Skip subtrees whose A flag is clear (every `Read`; a `Clear` that asks for it).
    prune: bool,
    /// Clear what is reported (A above, D in the leaves).
    clear: bool,
    f: &'a mut F,
}

impl<F: FnMut(u64, u64)> Visit for AdScan<'_, F> {
    fn table(&mut self, _level: u8, word: &AtomicU64, v: u64, whole: bool) -> Step {
        if self.prune && v & bits::A == 0 {
            return Step::Skip;
        }
        if self.clear && whole && v & bits::A != 0 {
            word.store(v & !bits::A, Relaxed);
        }
        Step::Go
    }

    fn leaf(&mut self, s: u64, level: u8, word: &AtomicU64, lo: u64, hi: u64) -> Step {
        let v = word.load(Relaxed);
        if EptEntry(v).dirty() {
            // A large leaf is only cleared when it lies wholly in the range; otherwise clearing
            // D would lose the pages outside it.
            if self.clear && lo == s && hi == s + level_span(level) {
                word.store(v & !bits::D, Relaxed);
            }
            report_range(lo, hi, self.f);
        }
        Step::Go
    }

    fn page_table<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        t: u64,
        first: usize,
        last: usize,
        gpa: u64,
    ) -> Step {
        let leaves = first..last + 1;
        match self.op {
            ScanOp::Read => {
                if let Some(t) = p.page(t).get(leaves) {
                    scan_leaves(t.chunks(64), gpa, false, self.f);
                }
            }
            // Clearing: the table is lent for the whole pass, as plain memory where the platform
            // allows it; the module's precondition makes that sound.
            ScanOp::Clear { .. } => p.with_page_mut(t, &mut |page| match page {
                PageMut::Shared(t) => {
                    if let Some(t) = t.get(leaves.clone()) {
                        scan_leaves(t.chunks(64), gpa, true, self.f);
                    }
                }
                PageMut::Exclusive(t) => {
                    if let Some(t) = t.get_mut(leaves.clone()) {
                        scan_leaves(t.chunks_mut(64), gpa, true, self.f);
                    }
                }
            }),
        }
        Step::Go
    }
}

/// A naive scan for comparison (benchmarks and tests): reads every leaf of the range, clears D,
/// no pruning and no A bookkeeping.
pub fn scan_naive<P: Platform + ?Sized, F: FnMut(u64)>(
    p: &P,
    ept: &Ept,
    gpa: u64,
    end: u64,
    f: &mut F,
) {
    ept.for_each_leaf(p, gpa, end, &mut |g, level, w: &AtomicU64| {
        let v = w.load(Relaxed);
        if v & bits::D != 0 {
            w.store(v & !bits::D, Relaxed);
            let span = level_span(level);
            let mut x = g.max(gpa);
            while x < (g + span).min(end) {
                f(x);
                x += PAGE_SIZE;
            }
        }
    });
}
