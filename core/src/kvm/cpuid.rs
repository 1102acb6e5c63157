//! CPUID for KVM guests: what KVM_GET_SUPPORTED_CPUID offers (the host's leaves through smudge's
//! filter, `vm::filter_cpuid`), and the table KVM_SET_CPUID2 gives a vCPU, which answers the
//! guest's CPUID exits.

use crate::abi::Wire;
use crate::kvm::abi::CpuidEntry2;
use crate::platform::{read_bytes, write_bytes, Platform};
use crate::vm::filter_cpuid;

/// Entries a vCPU's table holds: one page of them (KVM allows 256; the selftests set about
/// 40). A longer KVM_SET_CPUID2 gets E2BIG.
pub const MAX_ENTRIES: usize = 4096 / ENTRY;
/// Bytes of one entry.
pub const ENTRY: usize = core::mem::size_of::<CpuidEntry2>();

/// Leaves whose subleaf selects the answer (SDM Vol. 2A, CPUID): 4, 7, 0xB, 0xD, 0xF, 0x10,
/// 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x20, 0x23, 0x24, 0x8000001D.
pub fn has_subleaves(leaf: u32) -> bool {
    matches!(
        leaf,
        4 | 7
            | 0xB
            | 0xD
            | 0xF
            | 0x10
            | 0x12
            | 0x14
            | 0x17
            | 0x18
            | 0x1D
            | 0x1E
            | 0x1F
            | 0x20
            | 0x23
            | 0x24
            | 0x8000_001D
    )
}

/// A vCPU's CPUID table: `len` entries in the driver page at `page` (kept out of the vCPU
/// struct, which travels through kernel stacks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Host-physical address of the page (0: none yet).
    pub page: u64,
    /// Entries.
    pub len: usize,
}

impl Table {
    /// Entry `i` (`i < len`).
    pub fn entry<P: Platform + ?Sized>(&self, p: &P, i: usize) -> CpuidEntry2 {
        let mut b = [0u8; ENTRY];
        read_bytes(p, self.page, i * ENTRY, &mut b);
        CpuidEntry2::from_bytes(&b).unwrap_or_default()
    }

    /// Replaces the table with the `kvm_cpuid_entry2` array in `raw`; false (and no change)
    /// when it is too long or there is no page.
    pub fn set<P: Platform + ?Sized>(&mut self, p: &P, raw: &[u8]) -> bool {
        let n = raw.len() / ENTRY;
        if n > MAX_ENTRIES || self.page == 0 {
            return false;
        }
        write_bytes(p, self.page, 0, raw.get(..n * ENTRY).unwrap_or(&[]));
        self.len = n;
        true
    }

    /// True when the table holds exactly the entries in `raw`.
    pub fn same<P: Platform + ?Sized>(&self, p: &P, raw: &[u8]) -> bool {
        raw.len() == self.len * ENTRY
            && (0..self.len).all(|i| {
                let mut b = [0u8; ENTRY];
                read_bytes(p, self.page, i * ENTRY, &mut b);
                raw.get(i * ENTRY..(i + 1) * ENTRY) == Some(&b[..])
            })
    }

    /// The guest's CPUID(`leaf`, `subleaf`): the matching entry (the subleaf matters only for
    /// entries flagged so), or zeros (KVM's answer for a leaf the table lacks, within range).
    pub fn lookup<P: Platform + ?Sized>(&self, p: &P, leaf: u32, subleaf: u32) -> [u32; 4] {
        (0..self.len)
            .map(|i| self.entry(p, i))
            .find(|e| {
                e.function == leaf
                    && (e.flags & CpuidEntry2::SIGNIFICANT_INDEX == 0 || e.index == subleaf)
            })
            .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
    }
}

/// KVM_GET_SUPPORTED_CPUID: the host's basic and extended leaves (with their subleaves) as a
/// guest sees them through smudge's filter, written by `emit` one by one; the number of entries,
/// or None when more than `max` would be needed (KVM's E2BIG).
pub fn supported(
    cpuid: &dyn Fn(u32, u32) -> [u32; 4],
    max: usize,
    emit: &mut dyn FnMut(usize, CpuidEntry2),
) -> Option<usize> {
    let mut n = 0;
    for base in [0u32, 0x8000_0000] {
        let top = cpuid(base, 0)[0];
        if top < base || top - base > 0x40 {
            continue;
        }
        for leaf in base..=top {
            let first = filter_cpuid(leaf, 0, cpuid(leaf, 0));
            let mut sub = 0u32;
            loop {
                let r = filter_cpuid(leaf, sub, cpuid(leaf, sub));
                // Where the subleaves end (SDM Vol. 2A, CPUID): cache leaves at a null cache
                // type; leaves that count their subleaves in subleaf 0's EAX past that count;
                // topology leaves after the level of type 0; others at an all-zero subleaf.
                let end = sub > 0
                    && match leaf {
                        4 | 0x8000_001D => r[0] & 0x1f == 0,
                        7 | 0x14 | 0x17 | 0x18 | 0x1D | 0x20 | 0x23 | 0x24 => sub > first[0],
                        0xB | 0x1F => false,
                        _ => r == [0; 4],
                    };
                if end {
                    break;
                }
                if n >= max {
                    return None;
                }
                let flags = if has_subleaves(leaf) {
                    CpuidEntry2::SIGNIFICANT_INDEX
                } else {
                    0
                };
                emit(
                    n,
                    CpuidEntry2 {
                        function: leaf,
                        index: sub,
                        flags,
                        eax: r[0],
                        ebx: r[1],
                        ecx: r[2],
                        edx: r[3],
                        padding: [0; 3],
                    },
                );
                n += 1;
                sub += 1;
                let topology_end = matches!(leaf, 0xB | 0x1F) && r[2] & 0xff00 == 0;
                if !has_subleaves(leaf) || topology_end || sub >= 64 {
                    break;
                }
            }
        }
    }
    Some(n)
}
