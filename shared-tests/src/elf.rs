//! A minimal static ELF64 executable for loader tests and fuzz seeds: the ELF header, one
//! PT_LOAD program header, then the segment's bytes (System V gABI; ET_EXEC = 2,
//! EM_X86_64 = 62, PT_LOAD = 1).

/// One PT_LOAD of `code` at physical and virtual address `paddr` with `memsz` bytes in memory
/// (the rest of `code.len()..memsz` is .bss); the entry point is `paddr`.
pub fn minimal(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
    let mut b = vec![0u8; 120];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // ELFCLASS64
    b[5] = 1; // little-endian
    b[6] = 1; // EV_CURRENT
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[24..32].copy_from_slice(&paddr.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    b[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
    b[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    b[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    b[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    b.extend_from_slice(code);
    b
}
