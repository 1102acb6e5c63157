//! Dirty bitmaps as lists of guest frame numbers: conversion, the reserved-region filter, and
//! the human formatting.

use smudge_core::guest::RESERVED;

/// Bytes of a page.
pub const PAGE: u64 = 4096;

/// u64 words of a dirty bitmap for `mem_bytes` of RAM (one bit per 4 KiB page, KVM layout:
/// bit i of word w is page 64 * w + i).
pub fn bitmap_words(mem_bytes: u64) -> usize {
    (mem_bytes / PAGE).div_ceil(64) as usize
}

/// The set bits of `bitmap` below `pages`, as sorted page numbers.
pub fn bitmap_to_gfns(bitmap: &[u64], pages: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let gfn = w as u64 * 64 + u64::from(bits.trailing_zeros());
            if gfn < pages {
                out.push(gfn);
            }
            bits &= bits - 1;
        }
    }
    out
}

/// First page of the reserved top 1 MiB (guest page tables, GDT, TSS, stacks) for this RAM size.
pub fn reserved_first_gfn(mem_bytes: u64) -> u64 {
    mem_bytes.saturating_sub(RESERVED) / PAGE
}

/// Drops the pages of the reserved region: smudge's own structures, which the CPU dirties
/// (A/D updates of the guest page tables, the stack) whatever the guest meant to write.
pub fn without_reserved(gfns: Vec<u64>, mem_bytes: u64) -> Vec<u64> {
    let first = reserved_first_gfn(mem_bytes);
    gfns.into_iter().filter(|&g| g < first).collect()
}

/// The page numbers of a bitmap that the guest wrote: set bits, the reserved region left out.
pub fn guest_dirty_gfns(bitmap: &[u64], mem_bytes: u64) -> Vec<u64> {
    without_reserved(bitmap_to_gfns(bitmap, mem_bytes / PAGE), mem_bytes)
}

/// Sorted page numbers for humans: hex, runs of three or more consecutive pages as `first-last`.
pub fn format_gfns(gfns: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < gfns.len() {
        let mut j = i;
        while j + 1 < gfns.len() && gfns[j + 1] == gfns[j] + 1 {
            j += 1;
        }
        if j - i >= 2 {
            parts.push(format!("{:#x}-{:#x}", gfns[i], gfns[j]));
        } else {
            for g in &gfns[i..=j] {
                parts.push(format!("{g:#x}"));
            }
        }
        i = j + 1;
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_follows_the_kvm_layout() {
        // Bit 0 of word 0 = page 0; bit 63 of word 0 = page 63; bit 1 of word 1 = page 65.
        let bm = [1u64 | (1 << 63), 1 << 1, 0, 1 << 5];
        assert_eq!(bitmap_to_gfns(&bm, 256), vec![0, 63, 65, 197]);
        // Bits beyond the slot are ignored (the bitmap is rounded up to 64 pages).
        assert_eq!(bitmap_to_gfns(&bm, 100), vec![0, 63, 65]);
        assert_eq!(bitmap_to_gfns(&[0; 4], 256), Vec::<u64>::new());
        assert_eq!(bitmap_to_gfns(&[u64::MAX], 64), (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn bitmap_words_round_up() {
        // 64 MiB = 16384 pages = 256 words; 6 MiB = 1536 pages = 24 words.
        assert_eq!(bitmap_words(64 << 20), 256);
        assert_eq!(bitmap_words(6 << 20), 24);
    }

    #[test]
    fn reserved_top_mib_is_filtered() {
        // 64 MiB: pages 0x3f00..0x4000 are the reserved 1 MiB (core/src/guest.rs).
        let mem = 64 << 20;
        assert_eq!(reserved_first_gfn(mem), 0x3f00);
        let gfns = vec![0x100, 0x400, 0x3eff, 0x3f00, 0x3f02, 0x3f10, 0x3fff];
        assert_eq!(without_reserved(gfns, mem), vec![0x100, 0x400, 0x3eff]);
        // From a bitmap: page 0x3f00 is bit 0 of word 0xfc, the stack page 0x3f10 bit 16.
        let mut bm = vec![0u64; bitmap_words(mem)];
        bm[0x400 / 64] |= 1;
        bm[0x3f00 / 64] |= 1 | (1 << 16);
        assert_eq!(guest_dirty_gfns(&bm, mem), vec![0x400]);
    }

    #[test]
    fn human_list_groups_runs() {
        assert_eq!(format_gfns(&[]), "");
        assert_eq!(format_gfns(&[0x400, 0x401]), "0x400 0x401");
        assert_eq!(
            format_gfns(&[0x400, 0x401, 0x402, 0x7ff, 0x1000]),
            "0x400-0x402 0x7ff 0x1000"
        );
    }
}
