//! The host page-table entry that maps a kernel virtual address (for EXPLAIN's seed question:
//! the host PTE beside the EPT leaf of the same backing page). Windows exports no lookup, so
//! the driver walks the x86-64 tables from CR3 itself, reading each table entry through a
//! physical-memory read the caller supplies (`MmCopyMemory` with MM_COPY_MEMORY_PHYSICAL, which
//! fails instead of faulting).

/// Bits 51:12 of a table entry or of CR3: the next table's (or page's) physical address.
const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
/// Present (bit 0).
const P: u64 = 1;
/// Page size (bit 7) in a PDPTE (1 GiB page) or PDE (2 MiB page).
const PS: u64 = 1 << 7;

/// Walks the 4-level (or, with CR4.LA57, 5-level) tables at `cr3` for `va`. Returns the entry
/// that maps the page and its level (1 = 4 KiB PTE, 2 = 2 MiB PDE, 3 = 1 GiB PDPTE), or None if
/// a level is not present or unreadable. `read(pa)` returns the quadword at physical `pa`.
/// SDM Vol. 3A 4.5 (4-level and 5-level paging).
pub fn walk(cr3: u64, va: u64, la57: bool, read: &mut dyn FnMut(u64) -> Option<u64>) -> Option<(u64, u32)> {
    let top: u32 = if la57 { 5 } else { 4 };
    let mut table = cr3 & ADDR;
    for level in (1..=top).rev() {
        let index = (va >> (12 + 9 * (level - 1))) & 0x1FF;
        let entry = read(table + index * 8)?;
        if entry & P == 0 {
            return None;
        }
        if level == 1 || ((level == 2 || level == 3) && entry & PS != 0) {
            return Some((entry, level));
        }
        table = entry & ADDR;
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn mem(entries: &[(u64, u64)]) -> HashMap<u64, u64> {
        entries.iter().copied().collect()
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
        let got = walk(0x8000_0000_0000_1005, va, false, &mut |pa| m.get(&pa).copied());
        assert_eq!(got, Some((0x8000_0000_0ABC_D163, 1)));
    }

    #[test]
    fn large_pages_stop_the_walk() {
        let va = (0x1F0u64 << 39) | (1 << 30) | (2 << 21);
        let m = mem(&[(0x1000 + 0x1F0 * 8, 0x2000 | 3), (0x2000 + 8, 0x3000 | 3), (0x3000 + 2 * 8, 0x20_0000 | PS | 3)]);
        assert_eq!(walk(0x1000, va, false, &mut |pa| m.get(&pa).copied()), Some((0x20_0000 | PS | 3, 2)));
        let m = mem(&[(0x1000 + 0x1F0 * 8, 0x2000 | 3), (0x2000 + 8, 0x4000_0000 | PS | 3)]);
        assert_eq!(walk(0x1000, va, false, &mut |pa| m.get(&pa).copied()), Some((0x4000_0000 | PS | 3, 3)));
    }

    #[test]
    fn not_present_or_unreadable_is_none_and_la57_adds_a_level() {
        let va = 0x1F0u64 << 39;
        let m = mem(&[(0x1000 + 0x1F0 * 8, 0x2000)]);
        assert_eq!(walk(0x1000, va, false, &mut |pa| m.get(&pa).copied()), None);
        assert_eq!(walk(0x1000, va, false, &mut |_| None), None);
        // 5-level: PML5 index is bits 56:48 (here 0), then the same 4 levels below.
        let m = mem(&[(0x9000, 0x1000 | 1), (0x1000 + 0x1F0 * 8, 0x2000 | 1), (0x2000, 0x4000_0000 | PS | 1)]);
        assert_eq!(walk(0x9000, va, true, &mut |pa| m.get(&pa).copied()), Some((0x4000_0000 | PS | 1, 3)));
    }
}
