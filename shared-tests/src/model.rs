//! A software model of the processor's EPT translation, written from the Intel SDM (Vol. 3C) and
//! independent of `smudge_core::ept`: it reads the raw 64-bit entries of the tables the core
//! built, with its own bit definitions.
//!
//! Modelled:
//! - the 4-level walk (SDM 29.3.2), EPT violations with their exit qualification (29.3.3.2,
//!   Table 28-7 bits 0-5) and EPT misconfigurations (29.3.3.1);
//! - EPTP checks of VM entry (26.2.1.1);
//! - accessed and dirty flags (29.3.5): A in every entry used by a walk, D in the leaf on a
//!   write, with locked read-modify-writes (`fetch_or`);
//! - page-modification logging (29.3.6), with the PML-full exit taken *before* any flag update
//!   or access when the index is outside 0..=511;
//! - caching (29.4): a TLB of guest-physical translations (leaf span, HPA, combined rights and
//!   the dirty flag as cached) and paging-structure caches of non-leaf entries. A TLB hit touches
//!   no entry at all. A write through a translation cached with D=0 re-walks, starting from the
//!   deepest paging-structure-cache entry, so the upper entries' A flags are *not* set again.
//!   Everything stays cached until INVEPT, except that an EPT violation or misconfiguration
//!   invalidates the mappings used for its guest-physical address (29.4.3.1).
//!
//! Not modelled: guest linear addresses (qualification bits 7/8 stay 0), mode-based execute
//! control, sub-page permissions, 5-level EPT, #VE, VPID-tagged combined mappings.
//!
//! Several [`Cpu`]s may share one EPT: each has its own caches, as real logical processors do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use smudge_core::ept::EptFeatures;
use smudge_core::platform::Platform;

/// Raw EPT entry bits (SDM 29.3.2, Tables 29-1..29-6).
pub mod bit {
    /// Read access.
    pub const R: u64 = 1 << 0;
    /// Write access.
    pub const W: u64 = 1 << 1;
    /// Execute access.
    pub const X: u64 = 1 << 2;
    /// Bits 5:3 memory type of a leaf.
    pub const MEMTYPE_SHIFT: u32 = 3;
    /// Bit 7: page size (PDPTE/PDE).
    pub const PS: u64 = 1 << 7;
    /// Bit 8: accessed.
    pub const A: u64 = 1 << 8;
    /// Bit 9: dirty (leaves).
    pub const D: u64 = 1 << 9;
    /// Bits 51:12.
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
}

/// EPT-violation exit-qualification bits (SDM 28.2.1, Table 28-7).
pub mod qual {
    /// Bit 0: the access was a data read.
    pub const READ: u64 = 1 << 0;
    /// Bit 1: the access was a data write.
    pub const WRITE: u64 = 1 << 1;
    /// Bit 2: the access was an instruction fetch.
    pub const FETCH: u64 = 1 << 2;
    /// Bit 3: AND of bit 0 (read) of the EPT entries used.
    pub const READABLE: u64 = 1 << 3;
    /// Bit 4: AND of bit 1 (write) of the EPT entries used.
    pub const WRITABLE: u64 = 1 << 4;
    /// Bit 5: AND of bit 2 (execute) of the EPT entries used.
    pub const EXECUTABLE: u64 = 1 << 5;
}

/// A guest-physical access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

impl AccessKind {
    fn right(self) -> u64 {
        match self {
            AccessKind::Read => bit::R,
            AccessKind::Write => bit::W,
            AccessKind::Fetch => bit::X,
        }
    }
    fn qual(self) -> u64 {
        match self {
            AccessKind::Read => qual::READ,
            AccessKind::Write => qual::WRITE,
            AccessKind::Fetch => qual::FETCH,
        }
    }
}

/// Why an access did not complete: the VM exit it causes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exit reason 48.
    EptViolation {
        /// Guest-physical address of the access.
        gpa: u64,
        /// Exit qualification (bits 0-5, see [`qual`]).
        qualification: u64,
    },
    /// Exit reason 49.
    EptMisconfig {
        /// Guest-physical address of the access.
        gpa: u64,
        /// Level of the misconfigured entry (4 = PML4E ... 1 = PTE).
        level: u8,
        /// The entry as read.
        entry: u64,
        /// Which rule of SDM 29.3.3.1 it breaks.
        reason: &'static str,
    },
    /// Exit reason 62: page-modification log full. The access did not happen and no flag was set.
    PmlFull {
        /// Guest-physical address of the access.
        gpa: u64,
    },
    /// The EPTP fails the VM-entry checks (SDM 26.2.1.1): VM entry would fail.
    InvalidEptp {
        /// Which check.
        reason: &'static str,
    },
}

/// Counters of one [`Cpu`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Accesses that completed.
    pub accesses: u64,
    /// Accesses served by the TLB without touching memory.
    pub tlb_hits: u64,
    /// Walks (TLB misses and dirty-flag re-walks).
    pub walks: u64,
    /// Walks that started from a paging-structure-cache entry.
    pub psc_hits: u64,
    /// GPAs written to the PML buffer.
    pub pml_logged: u64,
    /// EPT violations.
    pub violations: u64,
    /// EPT misconfigurations.
    pub misconfigs: u64,
    /// PML-full exits.
    pub pml_full: u64,
    /// INVEPT executions.
    pub invepts: u64,
}

/// Page-modification-logging state of a vCPU (VMCS PML address and PML index, 25.6.18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmlState {
    /// Host-physical address of the 4 KiB log.
    pub buffer: u64,
    /// The PML index (guest-state field 0x0812).
    pub index: u16,
}

#[derive(Clone, Copy, Debug)]
struct TlbEntry {
    /// Base HPA of the page (leaf span aligned).
    hpa: u64,
    /// Combined rights (AND of every level).
    rights: u64,
    /// The leaf's dirty flag as cached (always true without A/D: nothing to set).
    dirty: bool,
}

#[derive(Clone, Copy, Debug)]
struct PscEntry {
    /// HPA of the table the cached entry points to.
    next: u64,
    /// AND of the rights from the PML4E down to the cached entry.
    rights: u64,
}

/// Key of a cached mapping: (EPT PML4 address, level, span-aligned GPA).
type Key = (u64, u8, u64);

/// Span of an entry at `level` (1 = 4 KiB ... 4 = 512 GiB).
pub const fn span(level: u8) -> u64 {
    1u64 << (12 + 9 * (level as u32 - 1))
}

fn index(gpa: u64, level: u8) -> usize {
    ((gpa >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
}

/// A logical processor in VMX non-root operation, as far as EPT is concerned.
#[derive(Debug)]
pub struct Cpu {
    features: EptFeatures,
    tlb: HashMap<Key, TlbEntry>,
    psc: HashMap<Key, PscEntry>,
    /// PML, when the "enable PML" control is 1.
    pub pml: Option<PmlState>,
    /// Use the paging-structure caches (default true). Off, every miss walks from the PML4.
    pub paging_structure_cache: bool,
    /// Counters.
    pub stats: CpuStats,
}

impl Cpu {
    /// A processor with these EPT capabilities and empty caches.
    pub fn new(features: EptFeatures) -> Cpu {
        Cpu {
            features,
            tlb: HashMap::new(),
            psc: HashMap::new(),
            pml: None,
            paging_structure_cache: true,
            stats: CpuStats::default(),
        }
    }

    /// Turns PML on with the log at `buffer` and the index reset to 511.
    pub fn enable_pml(&mut self, buffer: u64) {
        self.pml = Some(PmlState { buffer, index: 511 });
    }

    /// Writes the PML index (the handler does this after draining the log).
    pub fn set_pml_index(&mut self, index: u16) {
        if let Some(pml) = &mut self.pml {
            pml.index = index;
        }
    }

    /// INVEPT all-context: drops every cached mapping.
    pub fn invept(&mut self) {
        self.tlb.clear();
        self.psc.clear();
        self.stats.invepts += 1;
    }

    /// INVEPT single-context: drops the mappings derived from this EPTP.
    pub fn invept_single(&mut self, eptp: u64) {
        let root = eptp & bit::ADDR;
        self.tlb.retain(|k, _| k.0 != root);
        self.psc.retain(|k, _| k.0 != root);
        self.stats.invepts += 1;
    }

    /// Cached guest-physical translations (TLB entries).
    pub fn cached_translations(&self) -> usize {
        self.tlb.len()
    }

    /// A data read (`write == false`) or data write of `gpa`. Returns the host-physical address.
    pub fn access<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        eptp: u64,
        gpa: u64,
        write: bool,
    ) -> Result<u64, Exit> {
        self.access_kind(
            p,
            eptp,
            gpa,
            if write {
                AccessKind::Write
            } else {
                AccessKind::Read
            },
        )
    }

    /// An access of any kind to `gpa` through the EPT of `eptp`.
    pub fn access_kind<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        eptp: u64,
        gpa: u64,
        kind: AccessKind,
    ) -> Result<u64, Exit> {
        let root = self.check_eptp(eptp)?;
        assert!(
            gpa < 1 << 48,
            "the model translates 48-bit guest-physical addresses only"
        );
        let ad = eptp & (1 << 6) != 0;
        if let Some((level, t)) = self.tlb_lookup(root, gpa) {
            if t.rights & kind.right() == 0 {
                // Rights come from the cached translation, which may be stale: a spurious
                // violation that INVEPT would have avoided. SDM 29.4.3.1: it invalidates.
                return Err(self.violation(root, gpa, kind, t.rights));
            }
            let needs_dirty = kind == AccessKind::Write && ad && !t.dirty;
            if !needs_dirty {
                self.stats.tlb_hits += 1;
                self.stats.accesses += 1;
                return Ok(t.hpa | (gpa & (span(level) - 1)));
            }
            // A write through a translation cached with D=0: the processor must set D in
            // memory, so it walks again (it may use the paging-structure caches to do so).
        }
        self.walk(p, root, ad, gpa, kind)
    }

    /// SDM 26.2.1.1 checks on the EPTP. Returns the PML4 address.
    fn check_eptp(&self, eptp: u64) -> Result<u64, Exit> {
        let memtype = eptp & 7;
        if memtype != 0 && memtype != 6 {
            return Err(Exit::InvalidEptp {
                reason: "EPTP memory type must be UC (0) or WB (6)",
            });
        }
        if (eptp >> 3) & 7 != 3 {
            return Err(Exit::InvalidEptp {
                reason: "EPTP page-walk length must be 4 (bits 5:3 = 3)",
            });
        }
        if eptp & (1 << 6) != 0 && !self.features.ad {
            return Err(Exit::InvalidEptp {
                reason: "EPTP bit 6 set without EPT A/D support",
            });
        }
        if eptp & 0xf80 != 0 {
            return Err(Exit::InvalidEptp {
                reason: "EPTP reserved bits 11:7 set",
            });
        }
        if eptp >> self.features.max_phys_bits != 0 {
            return Err(Exit::InvalidEptp {
                reason: "EPTP address beyond MAXPHYADDR",
            });
        }
        Ok(eptp & bit::ADDR)
    }

    fn tlb_lookup(&self, root: u64, gpa: u64) -> Option<(u8, TlbEntry)> {
        // Prefer the smallest page; a stale large translation next to a fresh small one is
        // possible only without INVEPT, and then either may be used.
        (1..=3).find_map(|l| {
            self.tlb
                .get(&(root, l, gpa & !(span(l) - 1)))
                .map(|t| (l, *t))
        })
    }

    /// Drops every cached mapping used to translate `gpa` (SDM 29.4.3.1).
    fn invalidate_gpa(&mut self, root: u64, gpa: u64) {
        for l in 1..=4 {
            let k = (root, l, gpa & !(span(l) - 1));
            self.tlb.remove(&k);
            self.psc.remove(&k);
        }
    }

    fn violation(&mut self, root: u64, gpa: u64, kind: AccessKind, rights: u64) -> Exit {
        self.invalidate_gpa(root, gpa);
        self.stats.violations += 1;
        Exit::EptViolation {
            gpa,
            qualification: kind.qual() | ((rights & 7) << 3),
        }
    }

    /// Why `entry`, a present entry at `level`, is an EPT misconfiguration (SDM 29.3.3.1), if it
    /// is one. `entry` is a leaf when `level == 1` or bit 7 is set at level 2 or 3.
    pub fn misconfiguration(&self, entry: u64, level: u8) -> Option<&'static str> {
        let rwx = entry & 7;
        if rwx & bit::W != 0 && rwx & bit::R == 0 {
            return Some("write access without read access (bits 2:0 = 010b or 110b)");
        }
        if rwx == bit::X && !self.features.execute_only {
            return Some("execute-only without the execute-only capability");
        }
        let n = u32::from(self.features.max_phys_bits);
        let above_maxphys = bit::ADDR & !((1u64 << n) - 1);
        if entry & above_maxphys != 0 {
            return Some("reserved address bits 51:MAXPHYADDR set");
        }
        let ps = entry & bit::PS != 0;
        let leaf = match level {
            4 => {
                if entry & 0xf8 != 0 {
                    return Some("reserved bits 7:3 of a PML4E set");
                }
                false
            }
            3 | 2 => {
                if ps {
                    let (ok, low) = if level == 3 {
                        (self.features.large_1g, (1u64 << 30) - (1 << 12))
                    } else {
                        (self.features.large_2m, (1u64 << 21) - (1 << 12))
                    };
                    if !ok {
                        return Some("bit 7 set without support for that page size");
                    }
                    if entry & low != 0 {
                        return Some("reserved address bits below the page size set");
                    }
                    true
                } else {
                    if entry & 0x78 != 0 {
                        return Some("reserved bits 6:3 of a non-leaf entry set");
                    }
                    false
                }
            }
            _ => true,
        };
        if leaf {
            let mt = (entry >> bit::MEMTYPE_SHIFT) & 7;
            if mt == 2 || mt == 3 || mt == 7 {
                return Some("leaf memory type 2, 3 or 7");
            }
        }
        None
    }

    fn walk<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        root: u64,
        ad: bool,
        gpa: u64,
        kind: AccessKind,
    ) -> Result<u64, Exit> {
        self.stats.walks += 1;
        let mut table = root;
        let mut rights = 7u64;
        let mut level = 4u8;
        if self.paging_structure_cache {
            // The deepest cached non-leaf entry for this GPA: the walk goes on below it and does
            // not read (nor set A in) the entries above.
            for l in 2..=4u8 {
                if let Some(e) = self.psc.get(&(root, l, gpa & !(span(l) - 1))) {
                    table = e.next;
                    rights = e.rights;
                    level = l - 1;
                    self.stats.psc_hits += 1;
                    break;
                }
            }
        }
        // Entries read from memory by this walk: (level, word, value, rights down to here).
        let mut used: Vec<(u8, &AtomicU64, u64, u64)> = Vec::with_capacity(4);
        loop {
            let word = &p.page(table)[index(gpa, level)];
            let v = word.load(Relaxed);
            if v & 7 == 0 {
                // Not present: the AND of the rights includes this entry's zeros.
                return Err(self.violation(root, gpa, kind, 0));
            }
            if let Some(reason) = self.misconfiguration(v, level) {
                self.invalidate_gpa(root, gpa);
                self.stats.misconfigs += 1;
                return Err(Exit::EptMisconfig {
                    gpa,
                    level,
                    entry: v,
                    reason,
                });
            }
            rights &= v & 7;
            used.push((level, word, v, rights));
            if level == 1 || v & bit::PS != 0 {
                break;
            }
            table = v & bit::ADDR;
            level -= 1;
        }
        if rights & kind.right() == 0 {
            return Err(self.violation(root, gpa, kind, rights));
        }
        let &(leaf_level, leaf_word, leaf_v, _) =
            used.last().expect("a walk reads at least one entry");
        let write = kind == AccessKind::Write;
        let mut dirty = true;
        if ad {
            let needs_update =
                used.iter().any(|u| u.2 & bit::A == 0) || (write && leaf_v & bit::D == 0);
            // SDM 29.3.6: before setting an A or D flag with PML on, an index outside 0..=511
            // is a PML-full exit; no flag is set and the access does not occur.
            if needs_update {
                if let Some(pml) = &self.pml {
                    if pml.index > 511 {
                        self.stats.pml_full += 1;
                        return Err(Exit::PmlFull { gpa });
                    }
                }
            }
            // SDM 29.3.5: A in every entry used, D in the leaf on a write (locked updates).
            for &(_, w, _, _) in &used[..used.len() - 1] {
                w.fetch_or(bit::A, Relaxed);
            }
            let set = if write { bit::A | bit::D } else { bit::A };
            let old = leaf_word.fetch_or(set, Relaxed);
            dirty = write || old & bit::D != 0;
            if write && old & bit::D == 0 {
                if let Some(pml) = &mut self.pml {
                    // SDM 29.3.6: log the 4 KiB-aligned GPA at the index, then decrement it.
                    p.page(pml.buffer)[usize::from(pml.index)].store(gpa & !0xfff, Relaxed);
                    pml.index = pml.index.wrapping_sub(1);
                    self.stats.pml_logged += 1;
                }
            }
        }
        // Fill the caches with what this walk read.
        for &(l, _, v, r) in &used[..used.len() - 1] {
            self.psc.insert(
                (root, l, gpa & !(span(l) - 1)),
                PscEntry {
                    next: v & bit::ADDR,
                    rights: r,
                },
            );
        }
        let s = span(leaf_level);
        let hpa = leaf_v & bit::ADDR & !(s - 1);
        self.tlb.insert(
            (root, leaf_level, gpa & !(s - 1)),
            TlbEntry { hpa, rights, dirty },
        );
        self.stats.accesses += 1;
        Ok(hpa | (gpa & (s - 1)))
    }
}

/// Builds an EPTP from its fields (SDM 25.6.11): WB paging structures, 4-level walk.
pub fn eptp(pml4: u64, ad: bool) -> u64 {
    (pml4 & bit::ADDR) | 6 | (3 << 3) | (u64::from(ad) << 6)
}
