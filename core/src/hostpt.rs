//! The host page-table walk for EXPLAIN's seed question: which host page-table entry maps a
//! host virtual address (the backing page's kernel mapping, beside its EPT leaf).
//!
//! A generic walk of x86-64 4-level and 5-level paging (SDM Vol. 3A 4.5) over a "read the
//! quadword at this physical address" function, so a shim supplies only CR3, CR4.LA57 and a
//! physical read that fails instead of faulting (Windows: MmCopyMemory). A shim whose OS has its
//! own lookup may use that instead (Linux: `lookup_address`).

/// Bits 51:12 of a paging-structure entry or of CR3: the next table's (or the page's) physical
/// address (SDM 4.5, Tables 4-14 to 4-20).
pub const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
/// Present (bit 0).
const P: u64 = 1;
/// Page size (bit 7) in a PDPTE (1 GiB page) or PDE (2 MiB page).
const PS: u64 = 1 << 7;

/// The entry that maps a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLeaf {
    /// The entry (A = bit 5, D = bit 6).
    pub entry: u64,
    /// Its level: 1 = 4 KiB PTE, 2 = 2 MiB PDE, 3 = 1 GiB PDPTE.
    pub level: u32,
}

/// Walks the tables at `cr3` for `va`: 4 levels, or 5 with CR4.LA57 (`la57`). Returns the entry
/// that maps the page, or `None` if an entry on the way is not present or `read` fails.
/// `read(pa)` returns the quadword at physical address `pa`. PCID bits and bit 63 of CR3 are
/// ignored (SDM 4.5: CR3 bits 51:12 locate the top table).
pub fn walk(
    cr3: u64,
    va: u64,
    la57: bool,
    read: &mut dyn FnMut(u64) -> Option<u64>,
) -> Option<HostLeaf> {
    let top: u32 = if la57 { 5 } else { 4 };
    let mut table = cr3 & ADDR;
    for level in (1..=top).rev() {
        // SDM 4.5: each level indexes 9 bits of the address, from bits 20:12 (PT) up.
        let index = (va >> (12 + 9 * (level - 1))) & 0x1FF;
        let entry = read(table + index * 8)?;
        if entry & P == 0 {
            return None;
        }
        // PS maps a page only in a PDE or PDPTE (it is reserved in PML4Es and PML5Es).
        if level == 1 || ((level == 2 || level == 3) && entry & PS != 0) {
            return Some(HostLeaf { entry, level });
        }
        table = entry & ADDR;
    }
    None
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::HashMap;

    fn mem(entries: &[(u64, u64)]) -> HashMap<u64, u64> {
        entries.iter().copied().collect()
    }

    fn leaf(entry: u64, level: u32) -> Option<HostLeaf> {
        Some(HostLeaf { entry, level })
    }

    #[test]
    fn four_level_walk_to_a_4k_pte() {
        // A kernel address: PML4 index 0x1F0, PDPT 1, PD 2, PT 3 (SDM 4.5: bits 47:39, 38:30,
        // 29:21, 20:12), sign-extended.
        let va = (0x1F0u64 << 39) | (1 << 30) | (2 << 21) | (3 << 12) | 0xFFFF_0000_0000_0000;
        let m = mem(&[
            (0x1000 + 0x1F0 * 8, 0x2000 | 0x63),
            (0x2000 + 8, 0x3000 | 0x63),
            (0x3000 + 2 * 8, 0x4000 | 0x63),
            (0x4000 + 3 * 8, 0x8000_0000_0ABC_D163),
        ]);
        // CR3 with PCID bits and the no-flush bit 63 set: both ignored.
        let got = walk(0x8000_0000_0000_1005, va, false, &mut |pa| {
            m.get(&pa).copied()
        });
        assert_eq!(got, leaf(0x8000_0000_0ABC_D163, 1));
    }

    #[test]
    fn large_pages_stop_the_walk() {
        let va = (0x1F0u64 << 39) | (1 << 30) | (2 << 21);
        let m = mem(&[
            (0x1000 + 0x1F0 * 8, 0x2000 | 3),
            (0x2000 + 8, 0x3000 | 3),
            (0x3000 + 2 * 8, 0x20_0000 | PS | 3),
        ]);
        assert_eq!(
            walk(0x1000, va, false, &mut |pa| m.get(&pa).copied()),
            leaf(0x20_0000 | PS | 3, 2)
        );
        let m = mem(&[
            (0x1000 + 0x1F0 * 8, 0x2000 | 3),
            (0x2000 + 8, 0x4000_0000 | PS | 3),
        ]);
        assert_eq!(
            walk(0x1000, va, false, &mut |pa| m.get(&pa).copied()),
            leaf(0x4000_0000 | PS | 3, 3)
        );
        // PS in a PML4E is reserved, not a 512 GiB page: the walk goes on through it.
        let m = mem(&[
            (0x1000 + 0x1F0 * 8, 0x2000 | PS | 3),
            (0x2000 + 8, 0x4000_0000 | PS | 3),
        ]);
        assert_eq!(
            walk(0x1000, va, false, &mut |pa| m.get(&pa).copied()),
            leaf(0x4000_0000 | PS | 3, 3)
        );
    }

    #[test]
    fn not_present_or_unreadable_is_none() {
        let va = 0x1F0u64 << 39;
        let m = mem(&[(0x1000 + 0x1F0 * 8, 0x2000)]);
        assert_eq!(walk(0x1000, va, false, &mut |pa| m.get(&pa).copied()), None);
        assert_eq!(walk(0x1000, va, false, &mut |_| None), None);
    }

    #[test]
    fn la57_adds_a_level_indexed_by_bits_56_48() {
        // PML5 index 0x1FF (bits 56:48 of a sign-extended kernel address), then the same 4
        // levels below.
        let va = 0xFF00_0000_0000_0000 | (0x1FFu64 << 48) | (0x1F0 << 39) | (5 << 12);
        let m = mem(&[
            (0x9000 + 0x1FF * 8, 0x1000 | 1),
            (0x1000 + 0x1F0 * 8, 0x2000 | 1),
            (0x2000, 0x3000 | 1),
            (0x3000, 0x4000 | 1),
            (0x4000 + 5 * 8, 0x7000_0000 | 0x61),
        ]);
        assert_eq!(
            walk(0x9000, va, true, &mut |pa| m.get(&pa).copied()),
            leaf(0x7000_0000 | 0x61, 1)
        );
        // The same tables read as 4-level start at the PML4 (0x9000 is read at index 0x1F0).
        assert_eq!(walk(0x9000, va, false, &mut |pa| m.get(&pa).copied()), None);
    }
}
