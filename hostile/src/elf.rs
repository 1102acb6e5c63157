//! Broken guest images, made from a valid one by changing one field at a time. The fields are
//! read here from the System V gABI layout (ELF64 header and program headers), independently of
//! smudge's loader; each broken image is one the gABI or the guest ABI (README: static ET_EXEC
//! x86-64, PT_LOAD below the reserved top 1 MiB, entry inside a segment) rules out.

/// ELF64 header offsets (gABI, "ELF Header").
mod ehdr {
    pub const CLASS: usize = 4;
    pub const DATA: usize = 5;
    pub const TYPE: usize = 16;
    pub const MACHINE: usize = 18;
    pub const ENTRY: usize = 24;
    pub const PHOFF: usize = 32;
    pub const PHENTSIZE: usize = 54;
    pub const PHNUM: usize = 56;
}

/// ELF64 program header offsets (gABI, "Program Header").
mod phdr {
    pub const TYPE: usize = 0;
    pub const OFFSET: usize = 8;
    pub const PADDR: usize = 24;
    pub const FILESZ: usize = 32;
    pub const MEMSZ: usize = 40;
    pub const PT_LOAD: u32 = 1;
}

fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn rd64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}
fn wr16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// The facts of a valid image the mutations need.
pub struct Image {
    bytes: Vec<u8>,
    /// File offsets of the PT_LOAD program headers.
    loads: Vec<usize>,
}

impl Image {
    /// Reads a valid ELF64 image (panics on a file that is not one: the test guests are).
    pub fn new(bytes: Vec<u8>) -> Image {
        assert!(
            bytes.len() > 64 && bytes.starts_with(b"\x7fELF"),
            "not an ELF file"
        );
        let phoff = rd64(&bytes, ehdr::PHOFF) as usize;
        let phentsize = rd16(&bytes, ehdr::PHENTSIZE) as usize;
        let phnum = rd16(&bytes, ehdr::PHNUM) as usize;
        let loads = (0..phnum)
            .map(|i| phoff + i * phentsize)
            .filter(|&o| rd32(&bytes, o + phdr::TYPE) == phdr::PT_LOAD)
            .collect::<Vec<_>>();
        assert!(!loads.is_empty(), "no PT_LOAD");
        Image { bytes, loads }
    }

    /// The entry point (e_entry).
    pub fn entry(&self) -> u64 {
        rd64(&self.bytes, ehdr::ENTRY)
    }

    /// The file offset of guest-physical address `addr` inside a PT_LOAD's file bytes, with
    /// `addr` itself (the guest runs identity-mapped, so code addresses are p_paddr based).
    pub fn code_at(&self, addr: u64) -> Option<(usize, u64)> {
        self.loads.iter().find_map(|&o| {
            let paddr = rd64(&self.bytes, o + phdr::PADDR);
            let filesz = rd64(&self.bytes, o + phdr::FILESZ);
            let offset = rd64(&self.bytes, o + phdr::OFFSET);
            (addr >= paddr && addr - paddr < filesz)
                .then(|| ((offset + (addr - paddr)) as usize, addr))
        })
    }

    /// The image bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn with(&self, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = self.bytes.clone();
        f(&mut b);
        b
    }

    /// One past the last file byte a PT_LOAD needs.
    fn load_end(&self) -> usize {
        self.loads
            .iter()
            .map(|&o| {
                (rd64(&self.bytes, o + phdr::OFFSET) + rd64(&self.bytes, o + phdr::FILESZ)) as usize
            })
            .max()
            .unwrap_or(0)
    }

    /// Broken images (name, bytes) for a VM with `mem_bytes` of RAM: every one must be refused.
    pub fn broken(&self, mem_bytes: u64) -> Vec<(String, Vec<u8>)> {
        let first = self.loads[0];
        let reserved = mem_bytes - (1 << 20);
        let phoff = rd64(&self.bytes, ehdr::PHOFF) as usize;
        let mut v: Vec<(String, Vec<u8>)> = vec![
            ("garbage".into(), garbage(4096)),
            ("one-byte".into(), vec![0x7f]),
            ("magic-only".into(), b"\x7fELF".to_vec()),
            ("elf32".into(), self.with(|b| b[ehdr::CLASS] = 1)),
            ("big-endian".into(), self.with(|b| b[ehdr::DATA] = 2)),
            ("i386".into(), self.with(|b| wr16(b, ehdr::MACHINE, 3))),
            ("et-dyn".into(), self.with(|b| wr16(b, ehdr::TYPE, 3))),
            ("et-rel".into(), self.with(|b| wr16(b, ehdr::TYPE, 1))),
            (
                "phentsize-0".into(),
                self.with(|b| wr16(b, ehdr::PHENTSIZE, 0)),
            ),
            (
                "phnum-65535".into(),
                self.with(|b| wr16(b, ehdr::PHNUM, 0xffff)),
            ),
            (
                "phoff-beyond-file".into(),
                self.with(|b| {
                    let n = b.len() as u64;
                    wr64(b, ehdr::PHOFF, n + 100)
                }),
            ),
            (
                "phoff-wraps".into(),
                self.with(|b| wr64(b, ehdr::PHOFF, u64::MAX - 10)),
            ),
            (
                "no-pt-load".into(),
                self.with(|b| {
                    for &o in &self.loads {
                        wr32(b, o + phdr::TYPE, 0);
                    }
                }),
            ),
            (
                "filesz-above-memsz".into(),
                self.with(|b| {
                    let m = rd64(b, first + phdr::MEMSZ);
                    wr64(b, first + phdr::FILESZ, m + 1)
                }),
            ),
            (
                "offset-wraps".into(),
                self.with(|b| wr64(b, first + phdr::OFFSET, u64::MAX - 8)),
            ),
            (
                "offset-beyond-file".into(),
                self.with(|b| {
                    let n = b.len() as u64;
                    wr64(b, first + phdr::OFFSET, n)
                }),
            ),
            (
                "paddr-wraps".into(),
                self.with(|b| wr64(b, first + phdr::PADDR, u64::MAX - 0xfff)),
            ),
            (
                "paddr-in-reserved-region".into(),
                self.with(|b| wr64(b, first + phdr::PADDR, reserved + 0x1000)),
            ),
            (
                "segment-ends-in-reserved-region".into(),
                self.with(|b| {
                    wr64(b, first + phdr::PADDR, reserved - 0x10);
                }),
            ),
            (
                "paddr-beyond-ram".into(),
                self.with(|b| wr64(b, first + phdr::PADDR, 3 << 30)),
            ),
            (
                "memsz-1-tib".into(),
                self.with(|b| wr64(b, first + phdr::MEMSZ, 1 << 40)),
            ),
            (
                "entry-outside-segments".into(),
                self.with(|b| wr64(b, ehdr::ENTRY, 0)),
            ),
            (
                "entry-beyond-ram".into(),
                self.with(|b| wr64(b, ehdr::ENTRY, u64::MAX)),
            ),
        ];
        // Truncations: inside the header, inside the program headers, inside the segment data.
        let end = self.load_end();
        for len in [16, 63, 64, phoff + 20, end / 2, end - 1] {
            if len < end {
                v.push((format!("truncated-at-{len}"), self.bytes[..len].to_vec()));
            }
        }
        v
    }
}

/// Pseudo-random bytes (an LCG, so every run sends the same garbage).
fn garbage(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}
