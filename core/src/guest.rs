//! The guest ABI: memory layout, entry state and the ELF64 image loader.
//!
//! - The top 1 MiB of guest memory is reserved for smudge: guest page tables, GDT, TSS and a
//!   16 KiB stack per vCPU. The guest page tables identity-map the first 4 GiB with 2 MiB pages,
//!   so an access beyond RAM reaches EPT and becomes an MMIO exit, not a guest #PF.
//! - A guest image is a static ELF64; PT_LOAD segments load at p_paddr; the guest starts at
//!   e_entry in 64-bit mode with RSP at the top of its stack and RDI = the vCPU index.

use crate::error::Error;
use crate::regs::{
    CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR0_WP, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_PAE, EFER_LMA,
    EFER_LME, EFER_NXE,
};

/// Size of the reserved region at the top of guest memory.
pub const RESERVED: u64 = 1 << 20;
/// Per-vCPU stack size.
pub const STACK_SIZE: u64 = 16 * 1024;
/// Offsets inside the reserved region.
pub const PML4_OFF: u64 = 0x0000;
/// Guest PDPT.
pub const PDPT_OFF: u64 = 0x1000;
/// Four guest page directories (4 GiB of 2 MiB pages).
pub const PD_OFF: u64 = 0x2000;
/// GDT.
pub const GDT_OFF: u64 = 0x6000;
/// 64-bit TSS (104 bytes).
pub const TSS_OFF: u64 = 0x7000;
/// First vCPU stack.
pub const STACKS_OFF: u64 = 0x10000;
/// vCPUs the reserved region has stacks for.
pub const MAX_VCPUS: u64 = (RESERVED - STACKS_OFF) / STACK_SIZE;

/// Guest selectors in the GDT smudge writes.
pub const CS_SELECTOR: u16 = 0x08;
/// Data selector.
pub const DS_SELECTOR: u16 = 0x10;
/// TSS selector.
pub const TR_SELECTOR: u16 = 0x18;
/// GDT limit: null, code, data, 16-byte TSS descriptor.
pub const GDT_LIMIT: u16 = 5 * 8 - 1;

/// 64-bit code segment descriptor: base 0, limit 4G, L=1, P=1, DPL0, execute/read (SDM 3.4.5).
pub const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
/// Data segment descriptor: base 0, limit 4G, D/B=1, P=1, DPL0, read/write.
pub const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;

/// Guest CR0: PE|MP|ET|NE|WP|PG.
pub const CR0: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
/// Guest CR4 as the guest sees it: PAE|OSFXSR|OSXMMEXCPT (SSE works).
pub const CR4: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
/// Guest EFER: LME|LMA|NXE.
pub const EFER: u64 = EFER_LME | EFER_LMA | EFER_NXE;

/// Where the reserved region and each structure lie for a guest of `mem_size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of guest RAM (slot 0 starts at GPA 0).
    pub mem_size: u64,
}

impl Layout {
    /// Layout for `mem_size` bytes of RAM (a multiple of 2 MiB, at least 4 MiB, at most 4 GiB).
    pub fn new(mem_size: u64) -> Result<Layout, Error> {
        if !mem_size.is_multiple_of(2 << 20) {
            return Err(Error::Misaligned);
        }
        if !(4 << 20..=4 << 30).contains(&mem_size) {
            return Err(Error::GpaOutOfRange);
        }
        Ok(Layout { mem_size })
    }
    /// First GPA of the reserved region.
    pub fn reserved_base(&self) -> u64 {
        self.mem_size - RESERVED
    }
    /// GPA of the guest PML4 (guest CR3).
    pub fn cr3(&self) -> u64 {
        self.reserved_base() + PML4_OFF
    }
    /// GPA of the GDT.
    pub fn gdt(&self) -> u64 {
        self.reserved_base() + GDT_OFF
    }
    /// GPA of the TSS.
    pub fn tss(&self) -> u64 {
        self.reserved_base() + TSS_OFF
    }
    /// Initial RSP of vCPU `index`: the top of its stack.
    pub fn stack_top(&self, index: u64) -> u64 {
        self.reserved_base() + STACKS_OFF + (index + 1) * STACK_SIZE
    }
    /// True when `gpa` lies in the reserved region.
    pub fn is_reserved(&self, gpa: u64) -> bool {
        gpa >= self.reserved_base() && gpa < self.mem_size
    }

    /// The contents smudge writes into the reserved region: (GPA, quadword) pairs, produced one
    /// at a time so no buffer is needed. Page tables identity-map 4 GiB with 2 MiB pages.
    pub fn for_each_system_qword<F: FnMut(u64, u64) -> Result<(), Error>>(
        &self,
        mut f: F,
    ) -> Result<(), Error> {
        let r = self.reserved_base();
        // PML4[0] -> PDPT; P|RW (SDM Vol. 3A 4.5.4).
        f(r + PML4_OFF, (r + PDPT_OFF) | 0x3)?;
        for i in 0..4u64 {
            f(r + PDPT_OFF + i * 8, (r + PD_OFF + i * 0x1000) | 0x3)?;
            for j in 0..512u64 {
                let page = (i * 512 + j) << 21;
                // P|RW|PS: a 2 MiB page.
                f(r + PD_OFF + i * 0x1000 + j * 8, page | 0x83)?;
            }
        }
        let tss = self.tss();
        f(r + GDT_OFF + 8, GDT_CODE64)?;
        f(r + GDT_OFF + 16, GDT_DATA)?;
        // 64-bit available TSS descriptor, limit 0x67 (SDM 8.2.3).
        let lo = 0x67 | ((tss & 0xff_ffff) << 16) | (0x89u64 << 40) | (((tss >> 24) & 0xff) << 56);
        f(r + GDT_OFF + 24, lo)?;
        f(r + GDT_OFF + 32, tss >> 32)?;
        // TSS: I/O map base beyond the limit (no I/O bitmap).
        f(tss + 0x60, 0x68u64 << 48)?;
        Ok(())
    }
}

/// A PT_LOAD segment of an ELF64 image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the file bytes.
    pub offset: u64,
    /// Load address (p_paddr).
    pub paddr: u64,
    /// Bytes in the file.
    pub filesz: u64,
    /// Bytes in memory (the rest is zero).
    pub memsz: u64,
}

/// Errors of the ELF loader; each names what is wrong with the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Shorter than the ELF header, or a header/segment points outside the file.
    Truncated,
    /// Not `\x7fELF`, not 64-bit little-endian, or not x86-64.
    NotElf64X86,
    /// Not an executable (ET_EXEC) image.
    NotExecutable,
    /// No PT_LOAD segment.
    NoLoadSegment,
    /// A segment has p_filesz > p_memsz, or its range wraps.
    BadSegment,
    /// A segment lies outside guest RAM or overlaps the reserved top 1 MiB.
    SegmentOutOfRange,
    /// The entry point is not inside a loaded segment.
    EntryOutsideImage,
}

impl ElfError {
    /// A one-line description.
    pub const fn message(&self) -> &'static str {
        match self {
            ElfError::Truncated => {
                "guest image truncated: a header or segment lies outside the file"
            }
            ElfError::NotElf64X86 => "guest image is not an ELF64 little-endian x86-64 file",
            ElfError::NotExecutable => "guest image is not a static executable (ET_EXEC)",
            ElfError::NoLoadSegment => "guest image has no PT_LOAD segment",
            ElfError::BadSegment => {
                "guest image has a segment with p_filesz > p_memsz or a wrapping range"
            }
            ElfError::SegmentOutOfRange => {
                "guest image segment lies outside guest RAM or overlaps the reserved top 1 MiB"
            }
            ElfError::EntryOutsideImage => "guest entry point is outside every loaded segment",
        }
    }
}

fn rd<const N: usize>(b: &[u8], off: u64) -> Result<[u8; N], ElfError> {
    let off = usize::try_from(off).map_err(|_| ElfError::Truncated)?;
    let end = off.checked_add(N).ok_or(ElfError::Truncated)?;
    let s = b.get(off..end).ok_or(ElfError::Truncated)?;
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    Ok(a)
}
fn u16_at(b: &[u8], off: u64) -> Result<u16, ElfError> {
    rd::<2>(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: u64) -> Result<u32, ElfError> {
    rd::<4>(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: u64) -> Result<u64, ElfError> {
    rd::<8>(b, off).map(u64::from_le_bytes)
}

/// A validated ELF64 image.
#[derive(Clone, Copy, Debug)]
pub struct Elf<'a> {
    bytes: &'a [u8],
    /// e_entry.
    pub entry: u64,
    phoff: u64,
    phnum: u16,
    phentsize: u16,
}

impl<'a> Elf<'a> {
    /// Validates the header and every PT_LOAD against `layout` (RAM below the reserved region).
    pub fn parse(bytes: &'a [u8], layout: &Layout) -> Result<Elf<'a>, ElfError> {
        let magic = rd::<4>(bytes, 0)?;
        if magic != *b"\x7fELF" || rd::<1>(bytes, 4)?[0] != 2 || rd::<1>(bytes, 5)?[0] != 1 {
            return Err(ElfError::NotElf64X86);
        }
        if u16_at(bytes, 18)? != 62 {
            return Err(ElfError::NotElf64X86);
        }
        if u16_at(bytes, 16)? != 2 {
            return Err(ElfError::NotExecutable);
        }
        let elf = Elf {
            bytes,
            entry: u64_at(bytes, 24)?,
            phoff: u64_at(bytes, 32)?,
            phentsize: u16_at(bytes, 54)?,
            phnum: u16_at(bytes, 56)?,
        };
        if elf.phentsize < 56 {
            return Err(ElfError::Truncated);
        }
        let mut loads = 0;
        let mut entry_ok = false;
        let mut err = None;
        elf.for_each_load(|s| {
            loads += 1;
            let end = match s.paddr.checked_add(s.memsz) {
                Some(e) if s.filesz <= s.memsz && s.offset.checked_add(s.filesz).is_some() => e,
                _ => {
                    err.get_or_insert(ElfError::BadSegment);
                    return;
                }
            };
            if s.offset + s.filesz > bytes.len() as u64 {
                err.get_or_insert(ElfError::Truncated);
            }
            if end > layout.reserved_base() {
                err.get_or_insert(ElfError::SegmentOutOfRange);
            }
            if elf.entry >= s.paddr && elf.entry < end {
                entry_ok = true;
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        if loads == 0 {
            return Err(ElfError::NoLoadSegment);
        }
        if !entry_ok {
            return Err(ElfError::EntryOutsideImage);
        }
        Ok(elf)
    }

    /// Calls `f` for every PT_LOAD segment with a non-zero memory size.
    pub fn for_each_load<F: FnMut(Segment)>(&self, mut f: F) -> Result<(), ElfError> {
        for i in 0..u64::from(self.phnum) {
            let ph = self
                .phoff
                .checked_add(i * u64::from(self.phentsize))
                .ok_or(ElfError::Truncated)?;
            if u32_at(self.bytes, ph)? != 1 {
                continue; // not PT_LOAD
            }
            let s = Segment {
                offset: u64_at(self.bytes, ph + 8)?,
                paddr: u64_at(self.bytes, ph + 24)?,
                filesz: u64_at(self.bytes, ph + 32)?,
                memsz: u64_at(self.bytes, ph + 40)?,
            };
            if s.memsz > 0 {
                f(s);
            }
        }
        Ok(())
    }

    /// The file bytes of a segment (validated by `parse`).
    pub fn segment_bytes(&self, s: &Segment) -> &'a [u8] {
        let start = s.offset as usize;
        self.bytes
            .get(start..start.saturating_add(s.filesz as usize))
            .unwrap_or(&[])
    }
}
