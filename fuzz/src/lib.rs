//! Fuzz harnesses of smudge-core, run by libFuzzer (`fuzz_targets/`) and replayable from plain
//! Rust (`examples/seeds.rs` writes and replays the checked-in seed corpus).
//!
//! Every harness reads its input through a [`Cursor`]: fixed-width little-endian fields, and the
//! input ends where the bytes end. [`Builder`] writes the same format, for the seeds.
//!
//! - [`abi_decode`]: the ioctl decoder and the wire encoding of every ABI struct.
//! - [`vm_ops`]: a sequence of VM operations over the mock platform, with a model CPU, fault
//!   injection, a shadow of guest memory, a dirty-page oracle and page accounting after every step.
//! - [`ept_ops`]: map/unmap/protect/split against an interval model of the mappings.

pub mod abi_decode;
pub mod ept_ops;
pub mod vm_ops;

/// Little-endian reader over fuzz bytes; `None` once the input is exhausted.
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data, pos: 0 }
    }
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let s = self.data.get(self.pos..self.pos + N)?;
        self.pos += N;
        s.try_into().ok()
    }
    /// Next byte.
    pub fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    /// Next u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take::<2>().map(u16::from_le_bytes)
    }
    /// Next u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    /// Next u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    /// Up to `n` next bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let end = self.pos.saturating_add(n).min(self.data.len());
        let s = &self.data[self.pos..end];
        self.pos = end;
        s
    }
}

/// Writes inputs in the [`Cursor`] format (for the seed corpus).
#[derive(Default, Clone)]
pub struct Builder(pub Vec<u8>);

impl Builder {
    /// An empty input.
    pub fn new() -> Builder {
        Builder(Vec::new())
    }
    /// Appends a byte.
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    /// Appends a u16.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}
