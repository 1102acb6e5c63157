//! Extended page tables (SDM Vol. 3C 29.3, "The Extended Page Table Mechanism (EPT)").
//!
//! An [`Ept`] owns its table pages through the [`Platform`]. It maps guest-physical ranges with
//! 4 KiB, 2 MiB and 1 GiB leaves, unmaps, changes permissions, splits large leaves and walks.
//! Every operation that removes or narrows a translation returns the INVEPT it makes owed, an
//! [`Invept`]; table pages it stops using are only freed when that is paid ([`Ept::pay`]), so no
//! processor can reach a freed page through a stale paging-structure cache.
//!
//! Invariant kept by every operation: no table except the PML4 is empty. `unmap` prunes empty
//! tables, which lets `map` roll back a failed allocation to exactly the previous tables.

use core::sync::atomic::{
    AtomicU64,
    Ordering::{Relaxed, Release},
};

use bitfield::bitfield;

use crate::error::Error;
use crate::platform::{PageWords, Platform};

/// 4 KiB.
pub const PAGE_SIZE: u64 = 1 << 12;
/// 2 MiB, the span of an EPT PDE.
pub const PAGE_SIZE_2M: u64 = 1 << 21;
/// 1 GiB, the span of an EPT PDPTE.
pub const PAGE_SIZE_1G: u64 = 1 << 30;
/// A 4-level EPT translates 48-bit guest-physical addresses (SDM 29.3.2).
pub const GPA_LIMIT: u64 = 1 << 48;

/// Software-available bit 52 of a leaf: the page is writable, even while write-protect dirty
/// logging has cleared W (SDM 29.3.2: bits 62:52 are ignored by the processor).
pub const SW_WRITABLE: u64 = 1 << 52;

bitfield! {
    /// EPT pointer (SDM 25.6.11, "Extended-Page-Table Pointer (EPTP)").
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct Eptp(u64);
    impl Debug;
    /// Bits 2:0: memory type of the paging structures (0 = UC, 6 = WB).
    pub u8, memory_type, set_memory_type: 2, 0;
    /// Bits 5:3: page-walk length minus one (3 for 4 levels).
    pub u8, walk_length_minus_1, set_walk_length_minus_1: 5, 3;
    /// Bit 6: enables EPT accessed and dirty flags (only if IA32_VMX_EPT_VPID_CAP bit 21).
    pub ad_enabled, set_ad_enabled: 6;
    /// Bits 51:12: physical frame of the EPT PML4 table.
    pub u64, pml4_pfn, set_pml4_pfn: 51, 12;
}

impl Eptp {
    /// WB paging structures, 4-level walk, A/D flags when `ad` (which the caller took from the
    /// capability MSR, never blindly).
    pub fn new(pml4_hpa: u64, ad: bool) -> Eptp {
        let mut e = Eptp(0);
        e.set_memory_type(MemoryType::WriteBack as u8);
        e.set_walk_length_minus_1(3);
        e.set_ad_enabled(ad);
        e.set_pml4_pfn(pml4_hpa >> 12);
        e
    }
}

bitfield! {
    /// One EPT paging-structure entry (SDM 29.3.2, Tables 29-1..29-6). The same layout serves
    /// every level; `memory_type`, `ignore_pat` and `dirty` only mean something on leaves, and
    /// `large` only on PDPTEs and PDEs.
    #[derive(Clone, Copy, PartialEq, Eq, Default)]
    pub struct EptEntry(u64);
    impl Debug;
    /// Bit 0: read access.
    pub read, set_read: 0;
    /// Bit 1: write access.
    pub write, set_write: 1;
    /// Bit 2: execute access (supervisor-mode with mode-based execute control).
    pub execute, set_execute: 2;
    /// Bits 5:3: EPT memory type of a leaf.
    pub u8, memory_type, set_memory_type: 5, 3;
    /// Bit 6: ignore the guest PAT (leaf).
    pub ignore_pat, set_ignore_pat: 6;
    /// Bit 7: this PDPTE/PDE maps a 1 GiB/2 MiB page.
    pub large, set_large: 7;
    /// Bit 8: accessed (with EPTP bit 6; SDM 29.3.5).
    pub accessed, set_accessed: 8;
    /// Bit 9: dirty, leaves only (with EPTP bit 6; SDM 29.3.5).
    pub dirty, set_dirty: 9;
    /// Bits 51:12: physical frame of the next table or of the page.
    pub u64, pfn, set_pfn: 51, 12;
}

/// EPT PML4 entry (level 4).
pub type Pml4e = EptEntry;
/// EPT page-directory-pointer-table entry (level 3).
pub type Pdpte = EptEntry;
/// EPT page-directory entry (level 2).
pub type Pde = EptEntry;
/// EPT page-table entry (level 1).
pub type Pte = EptEntry;

/// Bit masks of [`EptEntry`], for atomic updates.
pub mod bits {
    /// Read.
    pub const R: u64 = 1 << 0;
    /// Write.
    pub const W: u64 = 1 << 1;
    /// Execute.
    pub const X: u64 = 1 << 2;
    /// R|W|X.
    pub const RWX: u64 = 0b111;
    /// Large page.
    pub const LARGE: u64 = 1 << 7;
    /// Accessed.
    pub const A: u64 = 1 << 8;
    /// Dirty.
    pub const D: u64 = 1 << 9;
    /// Physical address bits 51:12.
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
}

impl EptEntry {
    /// An entry is present when any of R/W/X is set (SDM 29.3.2).
    pub fn present(&self) -> bool {
        self.0 & bits::RWX != 0
    }
    /// The physical address the entry points to.
    pub fn addr(&self) -> u64 {
        self.0 & bits::ADDR
    }
    /// The access rights as [`Perms`].
    pub fn perms(&self) -> Perms {
        Perms((self.0 & bits::RWX) as u8)
    }
}

/// EPT memory types (SDM 29.3.7). Only UC and WB are used by smudge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MemoryType {
    /// Uncacheable, for MMIO.
    Uncacheable = 0,
    /// Write-combining.
    WriteCombining = 1,
    /// Write-through.
    WriteThrough = 4,
    /// Write-protected.
    WriteProtected = 5,
    /// Write-back, for RAM.
    WriteBack = 6,
}

/// EPT access rights: bit 0 read, bit 1 write, bit 2 execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms(pub u8);

impl Perms {
    /// No access.
    pub const NONE: Perms = Perms(0);
    /// Read.
    pub const R: Perms = Perms(1);
    /// Read + write.
    pub const RW: Perms = Perms(3);
    /// Read + execute.
    pub const RX: Perms = Perms(5);
    /// Read + write + execute.
    pub const RWX: Perms = Perms(7);
    /// Readable.
    pub fn r(self) -> bool {
        self.0 & 1 != 0
    }
    /// Writable.
    pub fn w(self) -> bool {
        self.0 & 2 != 0
    }
    /// Executable.
    pub fn x(self) -> bool {
        self.0 & 4 != 0
    }
}

/// What the processor allows in EPT, from IA32_VMX_EPT_VPID_CAP and MAXPHYADDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptFeatures {
    /// EPT_VPID_CAP bit 16: 2 MiB leaves.
    pub large_2m: bool,
    /// EPT_VPID_CAP bit 17: 1 GiB leaves.
    pub large_1g: bool,
    /// EPT_VPID_CAP bit 21: accessed and dirty flags.
    pub ad: bool,
    /// EPT_VPID_CAP bit 0: execute-only translations.
    pub execute_only: bool,
    /// CPUID.80000008H:EAX[7:0].
    pub max_phys_bits: u8,
}

impl EptFeatures {
    /// Everything on, 46 physical address bits: the host-test default.
    pub const ALL: EptFeatures = EptFeatures {
        large_2m: true,
        large_1g: true,
        ad: true,
        execute_only: true,
        max_phys_bits: 46,
    };
}

/// The result of a walk ([`Ept::translate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Host-physical address the guest-physical address translates to.
    pub hpa: u64,
    /// Level of the leaf: 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB.
    pub level: u8,
    /// The leaf entry as read.
    pub entry: EptEntry,
    /// The access rights of the whole walk (the AND of every level, SDM 29.3.3.2).
    pub perms: Perms,
}

/// Span covered by one entry at `level` (1..=4).
pub const fn level_span(level: u8) -> u64 {
    1u64 << (12 + 9 * (level as u32 - 1))
}

/// Index of `gpa` in the table at `level`.
pub const fn index(gpa: u64, level: u8) -> usize {
    ((gpa >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

/// Non-leaf entries get every right; the leaves decide (SDM 29.3.3.2 ANDs them).
const NON_LEAF: u64 = bits::RWX;

/// The page directories of recently walked GiB regions, for [`Ept::page_table_cached`]:
/// direct-mapped by GiB, so a slot of up to 64 GiB hits after its first lookups.
#[derive(Clone, Debug)]
pub struct TableCache {
    gib: [u64; Self::SLOTS],
    pd: [u64; Self::SLOTS],
}

impl TableCache {
    const SLOTS: usize = 64;
}

impl Default for TableCache {
    fn default() -> Self {
        TableCache {
            gib: [u64::MAX; Self::SLOTS],
            pd: [0; Self::SLOTS],
        }
    }
}

/// What a range walk ([`walk`]) does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Go on: into the table an entry references, or to the next entry.
    Go,
    /// Leave the table this entry references alone.
    Skip,
    /// End the walk.
    Stop,
}

/// A visitor of [`walk`]: the one walk over a range of the EPT that every scan, lookup of a
/// range, unmap and teardown builds on. Only present entries are visited, in address order.
pub trait Visit {
    /// A present entry at `level` (> 1) that references a table; `whole` when the range covers
    /// the entry's whole span. Called before the walk enters the table.
    fn table(&mut self, _level: u8, _word: &AtomicU64, _v: u64, _whole: bool) -> Step {
        Step::Go
    }
    /// After the walk left the table at `child`, which `word` references.
    fn left_table(&mut self, _level: u8, _word: &AtomicU64, _child: u64) {}
    /// A present leaf at `level` (1: 4 KiB; 2, 3: large) spanning `[s, s + level_span)`, of
    /// which `[lo, hi)` lies in the range.
    fn leaf(&mut self, s: u64, level: u8, word: &AtomicU64, lo: u64, hi: u64) -> Step;
    /// The leaves `first..=last` of the page table `t` that lie in the range, the first at
    /// guest-physical `gpa`. By default each present one goes to [`Visit::leaf`]; a scan that
    /// reads a whole table at once overrides it.
    fn page_table<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        t: u64,
        first: usize,
        last: usize,
        gpa: u64,
    ) -> Step {
        for (i, word) in p.page(t).iter().enumerate().take(last + 1).skip(first) {
            if EptEntry(word.load(Relaxed)).present() {
                let g = gpa + (i - first) as u64 * PAGE_SIZE;
                if self.leaf(g, 1, word, g, g + PAGE_SIZE) == Step::Stop {
                    return Step::Stop;
                }
            }
        }
        Step::Go
    }
}

/// Walks the present entries of `[gpa, end)` below the PML4 at `pml4` (SDM 29.3.2: bits 11:3
/// of each level's index come from the guest-physical address), calling `v` as [`Visit`] says.
/// True if the visitor stopped it.
pub fn walk<P: Platform + ?Sized, V: Visit>(
    p: &P,
    pml4: u64,
    gpa: u64,
    end: u64,
    v: &mut V,
) -> bool {
    gpa < end && walk_in(p, pml4, 4, 0, gpa, end.min(GPA_LIMIT), v) == Step::Stop
}

fn walk_in<P: Platform + ?Sized, V: Visit>(
    p: &P,
    table: u64,
    level: u8,
    base: u64,
    gpa: u64,
    end: u64,
    v: &mut V,
) -> Step {
    let span = level_span(level);
    let first = (gpa.saturating_sub(base) / span) as usize;
    let last = (((end - 1 - base) / span) as usize).min(511);
    if level == 1 {
        return v.page_table(p, table, first, last, base + first as u64 * span);
    }
    for (i, word) in p.page(table).iter().enumerate().take(last + 1).skip(first) {
        let val = word.load(Relaxed);
        let e = EptEntry(val);
        if !e.present() {
            continue;
        }
        let s = base + i as u64 * span;
        let (lo, hi) = (gpa.max(s), end.min(s + span));
        let step = if e.large() {
            v.leaf(s, level, word, lo, hi)
        } else {
            match v.table(level, word, val, lo == s && hi == s + span) {
                Step::Go => {
                    let step = walk_in(p, e.addr(), level - 1, s, lo, hi, v);
                    v.left_table(level, word, e.addr());
                    step
                }
                step => step,
            }
        };
        if step == Step::Stop {
            return Step::Stop;
        }
    }
    Step::Go
}

/// An INVEPT owed for one EPT (SDM 29.4.3.4, "Guidelines for Use of the INVEPT
/// Instruction"): an entry was removed, narrowed or split, or an accessed or dirty flag
/// cleared, and a processor may still cache the old translation. Every change that makes one
/// owed returns it; it is neither copied nor cloned, and [`Ept::pay`] (or, for a caller that
/// executed the INVEPT itself, [`Ept::invept_done`]) consumes it, executing at most one INVEPT
/// however many were merged with [`Invept::and`].
#[must_use = "an EPT change is in force only after INVEPT (SDM 29.4.3.4): pay it with Ept::pay"]
#[derive(Debug, PartialEq, Eq)]
pub struct Invept {
    owed: bool,
}

impl Invept {
    /// Nothing owed.
    pub const NONE: Invept = Invept { owed: false };

    /// True when an INVEPT is owed.
    pub fn is_owed(&self) -> bool {
        self.owed
    }

    /// One obligation for both: one INVEPT pays them.
    pub fn and(self, other: Invept) -> Invept {
        Invept {
            owed: self.owed | other.owed,
        }
    }

    /// Takes `other` into this one (an accumulator's [`Invept::and`]).
    pub fn add(&mut self, other: Invept) {
        self.owed |= other.owed;
    }
}

/// An EPT hierarchy with its own tables.
#[derive(Debug)]
pub struct Ept {
    pml4: u64,
    features: EptFeatures,
    tables: usize,
    needs_invept: bool,
    /// Table pages unlinked but not yet freed: a list threaded through word 0 of each page.
    zombie_head: u64,
    zombies: usize,
}

impl Ept {
    /// An empty EPT (one zeroed PML4 page).
    pub fn new<P: Platform + ?Sized>(p: &P, features: EptFeatures) -> Result<Ept, Error> {
        let pml4 = p.alloc_page()?;
        Ok(Ept {
            pml4,
            features,
            tables: 1,
            needs_invept: false,
            zombie_head: 0,
            zombies: 0,
        })
    }

    /// The EPTP for this hierarchy; A/D only when the features allow it and `ad` is asked.
    pub fn eptp(&self, ad: bool) -> Eptp {
        Eptp::new(self.pml4, ad && self.features.ad)
    }

    /// The features this EPT was built for.
    pub fn features(&self) -> EptFeatures {
        self.features
    }

    /// Host-physical address of the PML4 table.
    pub fn pml4(&self) -> u64 {
        self.pml4
    }

    /// Table pages linked into the hierarchy, PML4 included.
    pub fn tables_in_use(&self) -> usize {
        self.tables
    }

    /// Table pages unlinked and waiting for INVEPT before they are freed.
    pub fn tables_pending_free(&self) -> usize {
        self.zombies
    }

    /// True when a translation was removed or narrowed, or an A/D flag cleared, and no INVEPT
    /// was paid since. SDM 29.4.3.4 (INVEPT guidelines): software must invalidate before it
    /// relies on the change.
    pub fn needs_invept(&self) -> bool {
        self.needs_invept
    }

    /// Records a change that makes an INVEPT owed and returns the obligation (dirty tracking
    /// calls it after it clears A/D or W).
    pub(crate) fn owe(&mut self) -> Invept {
        self.needs_invept = true;
        Invept { owed: true }
    }

    /// What this EPT owes whether or not a caller holds it: for a failure path, whose change
    /// may have stopped half-way, after narrowing entries, and returned only its error.
    pub fn owed(&self) -> Invept {
        Invept {
            owed: self.needs_invept,
        }
    }

    /// Pays `owed`: when this EPT still owes an INVEPT, runs `invept` (INVEPT, single-context
    /// for this EPTP or all-context, on every processor that may cache this EPT) and, once it
    /// succeeded, frees the table pages that waited for it. An obligation already paid through
    /// another token costs nothing. Returns what `invept` returned (Ok when it did not run).
    pub fn pay<P: Platform + ?Sized, E>(
        &mut self,
        p: &P,
        owed: Invept,
        invept: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        if owed.owed && self.needs_invept {
            invept()?;
            self.invept_done(p, owed);
        }
        Ok(())
    }

    /// `owed` was paid: the caller executed INVEPT (single-context for this EPTP, or
    /// all-context) on every processor that may cache this EPT. Frees the table pages that were
    /// waiting for it. (A token owing nothing changes nothing.)
    pub fn invept_done<P: Platform + ?Sized>(&mut self, p: &P, owed: Invept) {
        if !owed.owed {
            return;
        }
        self.free_retired(p);
    }

    /// Frees the table pages retired since the last INVEPT.
    fn free_retired<P: Platform + ?Sized>(&mut self, p: &P) {
        while self.zombie_head != 0 {
            let page = self.zombie_head;
            self.zombie_head = p.page(page)[0].load(Relaxed);
            p.page(page)[0].store(0, Relaxed);
            p.free_page(page);
            self.zombies -= 1;
        }
        self.needs_invept = false;
    }

    /// Frees every table. The caller must have executed INVEPT for this EPT (or all-context)
    /// after the last VM exit that used it.
    pub fn destroy<P: Platform + ?Sized>(mut self, p: &P) {
        /// Frees every table below the PML4 once the walk has left it.
        struct Free<'a, P: ?Sized>(&'a P, usize);
        impl<P: Platform + ?Sized> Visit for Free<'_, P> {
            fn left_table(&mut self, _: u8, _: &AtomicU64, child: u64) {
                self.0.free_page(child);
                self.1 += 1;
            }
            fn leaf(&mut self, _: u64, _: u8, _: &AtomicU64, _: u64, _: u64) -> Step {
                Step::Go
            }
            fn page_table<Q: Platform + ?Sized>(
                &mut self,
                _: &Q,
                _: u64,
                _: usize,
                _: usize,
                _: u64,
            ) -> Step {
                Step::Go
            }
        }
        let mut free = Free(p, 0);
        walk(p, self.pml4, 0, GPA_LIMIT, &mut free);
        p.free_page(self.pml4);
        self.tables -= free.1 + 1;
        self.free_retired(p);
    }

    fn table<P: Platform + ?Sized>(p: &P, hpa: u64) -> &PageWords {
        p.page(hpa)
    }

    fn check_range(&self, gpa: u64, len: u64) -> Result<u64, Error> {
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned);
        }
        let end = gpa.checked_add(len).ok_or(Error::EmptyOrWrappingRange)?;
        if len == 0 {
            return Err(Error::EmptyOrWrappingRange);
        }
        if end > GPA_LIMIT {
            return Err(Error::GpaOutOfRange);
        }
        Ok(end)
    }

    fn check_perms(&self, perms: Perms) -> Result<(), Error> {
        // SDM 29.3.3.1: W=1 with R=0 is a misconfiguration; X-only needs EPT_VPID_CAP bit 0.
        if perms.0 & !7 != 0 || perms.0 == 0 || (perms.w() && !perms.r()) {
            return Err(Error::InvalidPermissions);
        }
        if !perms.r() && !self.features.execute_only {
            return Err(Error::InvalidPermissions);
        }
        Ok(())
    }

    /// Maps `[gpa, gpa+len)` to `[hpa, hpa+len)` with `perms` and `memtype`, using the largest
    /// leaves that alignment, the remaining length, `allow_large` and the features permit.
    /// Fails without any change on misalignment, overlap, range or permission errors, and on
    /// allocation failure leaves the tables exactly as before.
    pub fn map<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        hpa: u64,
        len: u64,
        perms: Perms,
        memtype: MemoryType,
        allow_large: bool,
    ) -> Result<(), Error> {
        let end = self.check_range(gpa, len)?;
        if !hpa.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned);
        }
        let hpa_end = hpa.checked_add(len).ok_or(Error::EmptyOrWrappingRange)?;
        if hpa_end > (1u64 << self.features.max_phys_bits.min(52)) {
            return Err(Error::HpaOutOfRange);
        }
        self.check_perms(perms)?;
        if self.any_mapped(p, gpa, end) {
            return Err(Error::Overlap);
        }
        let mut off = 0;
        while off < len {
            let (g, h, rem) = (gpa + off, hpa + off, len - off);
            let level = self.leaf_level_for(g, h, rem, allow_large);
            let leaf = (h & bits::ADDR)
                | u64::from(perms.0)
                | (u64::from(memtype as u8) << 3)
                | if level > 1 { bits::LARGE } else { 0 };
            if let Err(e) = self.set_leaf(p, g, level, leaf) {
                if off > 0 {
                    // Roll back: unmapping what this call mapped prunes the tables it created.
                    let _ = self.unmap(p, gpa, off);
                }
                return Err(e);
            }
            off += level_span(level);
        }
        Ok(())
    }

    fn leaf_level_for(&self, gpa: u64, hpa: u64, rem: u64, allow_large: bool) -> u8 {
        if allow_large {
            if self.features.large_1g
                && gpa.is_multiple_of(PAGE_SIZE_1G)
                && hpa.is_multiple_of(PAGE_SIZE_1G)
                && rem >= PAGE_SIZE_1G
            {
                return 3;
            }
            if self.features.large_2m
                && gpa.is_multiple_of(PAGE_SIZE_2M)
                && hpa.is_multiple_of(PAGE_SIZE_2M)
                && rem >= PAGE_SIZE_2M
            {
                return 2;
            }
        }
        1
    }

    /// Installs a leaf at `level` for `gpa`, creating tables down to it. The missing tables are
    /// all allocated first and chained to the leaf before the top one is linked, in one store:
    /// a processor walking meanwhile (other vCPUs run during exit handling) sees either no entry
    /// or the whole path, and an allocation failure leaves nothing linked that it could have
    /// cached (SDM 29.4.3.1), so nothing owes INVEPT.
    fn set_leaf<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        level: u8,
        leaf: u64,
    ) -> Result<(), Error> {
        // Down the present tables to the first missing entry (or the leaf's own level).
        let (mut table, mut l) = (self.pml4, 4);
        while l > level {
            let e = EptEntry(Self::table(p, table)[index(gpa, l)].load(Relaxed));
            if !e.present() {
                break;
            }
            if e.large() {
                return Err(Error::Overlap);
            }
            (table, l) = (e.addr(), l - 1);
        }
        let missing = usize::from(l - level);
        let mut fresh = [0u64; 3];
        for k in 0..missing {
            match p.alloc_page() {
                Ok(page) => fresh[k] = page,
                Err(e) => {
                    fresh[..k].iter().for_each(|&page| p.free_page(page));
                    return Err(e.into());
                }
            }
        }
        // Bottom up: the leaf in the lowest new table (or in `table`), each new table in the
        // one above, the top one last.
        let mut entry = leaf;
        for k in (0..missing).rev() {
            let at = l - k as u8 - 1;
            Self::table(p, fresh[k])[index(gpa, at)].store(entry, Relaxed);
            entry = fresh[k] | NON_LEAF;
        }
        self.tables += missing;
        // Release: the chain's entries are visible before the link to it.
        Self::table(p, table)[index(gpa, l)].store(entry, Release);
        Ok(())
    }

    /// True if any page of `[gpa, end)` is mapped.
    pub fn any_mapped<P: Platform + ?Sized>(&self, p: &P, gpa: u64, end: u64) -> bool {
        struct Any;
        impl Visit for Any {
            fn leaf(&mut self, _: u64, _: u8, _: &AtomicU64, _: u64, _: u64) -> Step {
                Step::Stop
            }
        }
        walk(p, self.pml4, gpa, end, &mut Any)
    }

    /// The walk the processor does for `gpa` (SDM 29.3.2), without setting A/D, down to level
    /// `stop` at the lowest: the last entry read and its level, a leaf, a hole (not present)
    /// or the entry at `stop`; `perms` gets the AND of the rights on the way (SDM 29.3.3.2).
    fn walk_to<'a, P: Platform + ?Sized>(
        &self,
        p: &'a P,
        gpa: u64,
        stop: u8,
        perms: &mut u8,
    ) -> Option<(&'a AtomicU64, u8)> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let (mut table, mut level) = (self.pml4, 4);
        loop {
            let word = &Self::table(p, table)[index(gpa, level)];
            let e = EptEntry(word.load(Relaxed));
            *perms &= e.perms().0;
            if !e.present() || level <= stop.max(1) || e.large() {
                return Some((word, level));
            }
            (table, level) = (e.addr(), level - 1);
        }
    }

    /// Walks the tables for `gpa` as the processor would (without setting A/D).
    pub fn translate<P: Platform + ?Sized>(&self, p: &P, gpa: u64) -> Option<Translation> {
        let mut perms = 7u8;
        let (word, level) = self.walk_to(p, gpa, 1, &mut perms)?;
        let e = EptEntry(word.load(Relaxed));
        let span = level_span(level);
        e.present().then(|| Translation {
            hpa: (e.addr() & !(span - 1)) | (gpa & (span - 1)),
            level,
            entry: e,
            perms: Perms(perms),
        })
    }

    /// The leaf entry word for `gpa`, if mapped, with its level.
    pub fn leaf<'a, P: Platform + ?Sized>(
        &self,
        p: &'a P,
        gpa: u64,
    ) -> Option<(&'a AtomicU64, u8)> {
        let (word, level) = self.walk_to(p, gpa, 1, &mut 7)?;
        EptEntry(word.load(Relaxed))
            .present()
            .then_some((word, level))
    }

    /// The host-physical address of the table at `level` (1: page table ... 4: PML4) whose
    /// entries map `gpa`, if the walk reaches one (no large leaf, no hole above it).
    pub fn table_at<P: Platform + ?Sized>(&self, p: &P, gpa: u64, level: u8) -> Option<u64> {
        if level >= 4 {
            return (gpa < GPA_LIMIT).then_some(self.pml4);
        }
        let (word, l) = self.walk_to(p, gpa, level + 1, &mut 7)?;
        let e = EptEntry(word.load(Relaxed));
        (l == level + 1 && e.present() && !e.large()).then(|| e.addr())
    }

    /// The host-physical address of the EPT page table (level 1) whose entries map the 2 MiB
    /// region of `gpa`, if the walk reaches one, through `cache`, which remembers the page directories of the last
    /// GiB regions looked up: a lookup that hits reads one entry instead of three. The cache is
    /// only valid while no table is added or freed (one harvest, clear or ring reset).
    pub fn page_table_cached<P: Platform + ?Sized>(
        &self,
        p: &P,
        gpa: u64,
        cache: &mut TableCache,
    ) -> Option<u64> {
        let gib = gpa >> 30;
        let i = (gib % TableCache::SLOTS as u64) as usize;
        let pd = if cache.gib[i] == gib {
            cache.pd[i]
        } else {
            let pd = self.table_at(p, gpa, 2)?;
            (cache.gib[i], cache.pd[i]) = (gib, pd);
            pd
        };
        let e = EptEntry(Self::table(p, pd)[index(gpa, 2)].load(Relaxed));
        (e.present() && !e.large()).then(|| e.addr())
    }

    /// Splits the large leaf that maps `gpa` into 512 leaves of the next level, keeping the
    /// translation, rights, memory type and A/D flags. Owes INVEPT (SDM 29.4.3.4: bit 7 of a
    /// PDE or PDPTE changed), except when `gpa` is already mapped by a 4 KiB leaf.
    pub fn split<P: Platform + ?Sized>(&mut self, p: &P, gpa: u64) -> Result<Invept, Error> {
        let (word, level) = self.leaf(p, gpa).ok_or(Error::NotMapped)?;
        if level == 1 {
            return Ok(Invept::NONE);
        }
        let old = EptEntry(word.load(Relaxed));
        let new = p.alloc_page()?;
        self.tables += 1;
        let child_span = level_span(level - 1);
        let t = Self::table(p, new);
        let keep = old.0 & !(bits::ADDR | bits::LARGE);
        let large = if level - 1 > 1 { bits::LARGE } else { 0 };
        for (i, w) in t.iter().enumerate() {
            w.store(
                ((old.addr() + i as u64 * child_span) & bits::ADDR) | keep | large,
                Relaxed,
            );
        }
        // The new non-leaf keeps the old leaf's accessed flag so the A-pruned scan still visits it.
        let a = old.0 & bits::A;
        word.store(new | NON_LEAF | a, Relaxed);
        Ok(self.owe())
    }

    /// Splits every large leaf in `[gpa, gpa+len)` down to 4 KiB leaves.
    pub fn split_range<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        len: u64,
    ) -> Result<Invept, Error> {
        let end = self.check_range(gpa, len)?;
        let (mut g, mut owed) = (gpa, Invept::NONE);
        while g < end {
            match self.leaf(p, g) {
                Some((_, 1)) => g += PAGE_SIZE,
                Some(_) => owed = owed.and(self.split(p, g)?),
                None => g = self.next_mapped_boundary(p, g),
            }
        }
        Ok(owed)
    }

    /// The start of the next region after an unmapped `gpa` that could be mapped (skips the
    /// whole absent entry).
    fn next_mapped_boundary<P: Platform + ?Sized>(&self, p: &P, gpa: u64) -> u64 {
        let level = self.walk_to(p, gpa, 1, &mut 7).map_or(4, |(_, l)| l);
        let span = level_span(level);
        (gpa & !(span - 1)) + span
    }

    /// Unmaps `[gpa, gpa+len)`. Large leaves that straddle the edges are split first (this may
    /// fail with `OutOfMemory`, before anything is unmapped). Empty tables are unlinked and
    /// wait for the INVEPT it owes.
    pub fn unmap<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        len: u64,
    ) -> Result<Invept, Error> {
        let end = self.check_range(gpa, len)?;
        let split = self.split_edges(p, gpa, end)?;
        /// Clears the leaves (`split_edges` left only leaves wholly inside the range), then
        /// unlinks each table the walk left empty; it waits for INVEPT before it is freed.
        struct Unmap<'a, P: ?Sized>(&'a P, &'a mut Ept);
        impl<P: Platform + ?Sized> Visit for Unmap<'_, P> {
            fn leaf(&mut self, _: u64, _: u8, word: &AtomicU64, _: u64, _: u64) -> Step {
                word.store(0, Relaxed);
                Step::Go
            }
            fn left_table(&mut self, _: u8, word: &AtomicU64, child: u64) {
                if self
                    .0
                    .page(child)
                    .iter()
                    .all(|w| w.load(Relaxed) & bits::RWX == 0)
                {
                    word.store(0, Relaxed);
                    self.1.retire_table(self.0, child);
                }
            }
        }
        let pml4 = self.pml4;
        walk(p, pml4, gpa, end, &mut Unmap(p, self));
        Ok(split.and(self.owe()))
    }

    /// Splits the large leaves that contain `gpa` or `end` but do not start there.
    fn split_edges<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        end: u64,
    ) -> Result<Invept, Error> {
        let mut owed = Invept::NONE;
        for edge in [gpa, end] {
            while let Some((_, level)) = self.leaf(p, edge) {
                if level == 1 || edge % level_span(level) == 0 {
                    break;
                }
                owed = owed.and(self.split(p, edge)?);
            }
        }
        Ok(owed)
    }

    fn retire_table<P: Platform + ?Sized>(&mut self, p: &P, page: u64) {
        p.page(page)[0].store(self.zombie_head, Relaxed);
        self.zombie_head = page;
        self.zombies += 1;
        self.tables -= 1;
        self.needs_invept = true;
    }

    /// Sets the rights of every leaf in `[gpa, gpa+len)` (which must be fully mapped) to `perms`,
    /// splitting large leaves at the edges. Narrowing a right, or a split, owes INVEPT.
    pub fn protect<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        len: u64,
        perms: Perms,
    ) -> Result<Invept, Error> {
        let end = self.check_range(gpa, len)?;
        self.check_perms(perms)?;
        let mut g = gpa;
        while g < end {
            if self.leaf(p, g).is_none() {
                return Err(Error::NotMapped);
            }
            g += PAGE_SIZE;
        }
        let split = self.split_edges(p, gpa, end)?;
        let mut g = gpa;
        let mut narrowed = false;
        while g < end {
            let Some((word, level)) = self.leaf(p, g) else {
                return Err(Error::NotMapped);
            };
            let old = word.load(Relaxed);
            let w = if perms.w() { SW_WRITABLE } else { 0 };
            word.store(
                (old & !(bits::RWX | SW_WRITABLE)) | u64::from(perms.0) | w,
                Relaxed,
            );
            narrowed |= old & bits::RWX & !u64::from(perms.0) != 0;
            g += level_span(level);
        }
        Ok(if narrowed {
            split.and(self.owe())
        } else {
            split
        })
    }

    /// Calls `f(gpa, level, entry word)` for every present leaf overlapping `[gpa, end)`, in
    /// address order, visiting only present tables.
    pub fn for_each_leaf<P: Platform + ?Sized, F: FnMut(u64, u8, &AtomicU64)>(
        &self,
        p: &P,
        gpa: u64,
        end: u64,
        f: &mut F,
    ) {
        struct Leaves<'a, F>(&'a mut F);
        impl<F: FnMut(u64, u8, &AtomicU64)> Visit for Leaves<'_, F> {
            fn leaf(&mut self, s: u64, level: u8, word: &AtomicU64, _: u64, _: u64) -> Step {
                (self.0)(s, level, word);
                Step::Go
            }
        }
        walk(p, self.pml4, gpa, end, &mut Leaves(f));
    }
}
