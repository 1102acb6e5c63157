//! Target `vm_ops`: a sequence of operations on a [`Vm`] over [`MockPlatform`], then destroy.
//!
//! Input: a header (mode, EPT features, page limit), then operations until the bytes run out
//! (at most [`MAX_OPS`]). A model CPU (`smudge_tests::model::Cpu`) plays the guest: its accesses
//! exit with EPT violations that the VM resolves, set A/D flags and fill the PML log, and the
//! harness keeps the VM loop's protocol (PML drained before every dirty-log call, INVEPT on the
//! CPU and `invept_done` before the guest runs again after an obligation was raised).
//!
//! Checked after every step, besides "no panic" (the mock panics on a double free, a foreign or
//! freed page, and the core's arithmetic runs with overflow checks):
//! - accounting: the platform's live pages equal `Vm::pages_held()` plus the two pages the harness
//!   owns (PML buffer, scratch log), and backing pages never exceed the page limit;
//! - verdicts: every call with arguments the API documents as invalid fails, and a valid one
//!   fails only with an allocation error (and only when allocations can fail);
//! - guest memory: reads return what was written (a byte-exact shadow), zero where never written;
//! - dirty log: every page the model CPU wrote since it was last harvested or cleared is reported
//!   (no lost dirty page), and no bit beyond the slot is set;
//! - after destroy, every page is back (`MockPlatform::assert_all_freed`).

use std::collections::{BTreeMap, BTreeSet};

use smudge_core::arch::GuestGprs;
use smudge_core::dirty::{Mode, MAX_TRACKED_PAGES};
use smudge_core::ept::{EptFeatures, Invept, GPA_LIMIT, PAGE_SIZE};
use smudge_core::guest::{Layout, RESERVED};
use smudge_core::platform::Platform;
use smudge_core::vm::{reason, ExitInfo, Fault, LoadError, VcpuState, Vm, MAX_SLOTS};
use smudge_core::Error;
use smudge_tests::model::{AccessKind, Cpu, Exit};
use smudge_tests::platform::MockPlatform;

use crate::Cursor;

/// Operations per input.
pub const MAX_OPS: usize = 96;

/// Operation codes (the byte before each operation's arguments, modulo [`op::COUNT`]).
pub mod op {
    /// `add_ram(u16 << 20)`.
    pub const ADD_RAM: u8 = 0;
    /// `add_slot(base sel, size sel)`: u8 kind + u64, u8 kind + u64.
    pub const ADD_SLOT: u8 = 1;
    /// `remove_slot(u8)`.
    pub const REMOVE_SLOT: u8 = 2;
    /// `on_ept_violation(gpa sel, u8 qualification)`.
    pub const VIOLATION: u8 = 3;
    /// `write_guest(gpa sel, u32 len, u8 fill)`.
    pub const WRITE_GUEST: u8 = 4;
    /// `read_guest(gpa sel, u32 len)`.
    pub const READ_GUEST: u8 = 5;
    /// `load_elf(u16 len, then len bytes)`.
    pub const LOAD_ELF: u8 = 6;
    /// `get_dirty_log(u8 slot, u8 bitmap-size delta)`.
    pub const GET_LOG: u8 = 7;
    /// `harvest(u8 slot, u8 bitmap-size delta)`.
    pub const HARVEST: u8 = 8;
    /// `clear_dirty_log(u8 slot, u8 kind, u32 first, u32 num, u64 mask pattern, u8 mask delta)`.
    pub const CLEAR_LOG: u8 = 9;
    /// INVEPT on the CPU, then `ept_mut().invept_done()`.
    pub const INVEPT: u8 = 10;
    /// `fail_nth_alloc(u8 % 16 + 1)`.
    pub const FAIL_NTH: u8 = 11;
    /// `fail_allocs_after(u8 % 32)`.
    pub const FAIL_AFTER: u8 = 12;
    /// `clear_faults()`.
    pub const CLEAR_FAULTS: u8 = 13;
    /// One guest access by the model CPU (gpa sel, u8 kind: read/write/fetch).
    pub const CPU_ACCESS: u8 = 14;
    /// Guest writes to consecutive pages (gpa sel, u8 count).
    pub const CPU_WRITES: u8 = 15;
    /// `handle_exit(u8 reason, u64 qualification, gpa sel, u64 rax, u64 rcx)`.
    pub const HANDLE_EXIT: u8 = 16;
    /// `pml_drain` of a scratch log (u16 index, u8 n, then n gpa sels).
    pub const PML_DRAIN: u8 = 17;
    /// Number of operations.
    pub const COUNT: u8 = 18;
}

/// Header feature bits.
pub mod feat {
    /// EPT A/D flags.
    pub const AD: u8 = 1 << 0;
    /// 2 MiB leaves.
    pub const LARGE_2M: u8 = 1 << 1;
    /// 1 GiB leaves.
    pub const LARGE_1G: u8 = 1 << 2;
    /// Execute-only.
    pub const EXEC_ONLY: u8 = 1 << 3;
    /// Write-protect mode runs with A/D on in the EPTP (when available).
    pub const AD_FOR_WP: u8 = 1 << 4;
    /// The model CPU has no paging-structure caches.
    pub const NO_PSC: u8 = 1 << 5;
    /// The allocation of `Vm::new` fails.
    pub const FAIL_NEW: u8 = 1 << 6;
}

/// Guest memory as the harness wrote it: known pages byte-exact, pages that core code wrote on
/// its own (image, system area) or a failed write touched are unknown, everything else is zero.
#[derive(Default)]
struct Shadow {
    pages: BTreeMap<u64, Box<[u8; 4096]>>,
    unknown: BTreeSet<u64>,
    tainted: Vec<(u64, u64)>,
}

fn page_chunks(gpa: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    // (page, offset in page, offset in data, bytes)
    let mut done = 0u64;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let g = gpa + done;
        let off = (g % PAGE_SIZE) as usize;
        let n = ((PAGE_SIZE - g % PAGE_SIZE).min(len - done)) as usize;
        let item = (g - off as u64, off, done as usize, n);
        done += n as u64;
        Some(item)
    })
}

impl Shadow {
    fn is_unknown(&self, page: u64) -> bool {
        self.unknown.contains(&page) || self.tainted.iter().any(|&(b, e)| page >= b && page < e)
    }
    fn write(&mut self, gpa: u64, data: &[u8]) {
        for (page, off, at, n) in page_chunks(gpa, data.len() as u64) {
            if let Some(pg) = self.pages.get_mut(&page) {
                pg[off..off + n].copy_from_slice(&data[at..at + n]);
            } else if !self.is_unknown(page) || n == 4096 {
                let mut pg = Box::new([0u8; 4096]);
                pg[off..off + n].copy_from_slice(&data[at..at + n]);
                self.pages.insert(page, pg);
                self.unknown.remove(&page);
            }
        }
    }
    fn forget(&mut self, gpa: u64, len: u64) {
        for (page, ..) in page_chunks(gpa, len) {
            self.pages.remove(&page);
            self.unknown.insert(page);
        }
    }
    fn drop_range(&mut self, b: u64, e: u64) {
        self.pages.retain(|&p, _| p < b || p >= e);
        self.unknown.retain(|&p| p < b || p >= e);
        self.tainted.retain(|&(tb, te)| te <= b || tb >= e);
    }
    fn check(&self, gpa: u64, out: &[u8]) {
        for (page, off, at, n) in page_chunks(gpa, out.len() as u64) {
            let got = &out[at..at + n];
            match self.pages.get(&page) {
                Some(pg) => assert_eq!(
                    got,
                    &pg[off..off + n],
                    "guest memory at {:#x} differs from what was written",
                    page + off as u64
                ),
                None if self.is_unknown(page) => {}
                None => assert!(
                    got.iter().all(|&b| b == 0),
                    "never-written guest memory at {page:#x} is not zero"
                ),
            }
        }
    }
}

struct Run<'p> {
    p: &'p MockPlatform,
    vm: Vm,
    cpu: Cpu,
    eptp: u64,
    vcpu: VcpuState,
    gprs: GuestGprs,
    page_limit: u64,
    /// The scratch PML log of `PML_DRAIN` (the harness also holds the CPU's PML buffer).
    scratch: u64,
    faults: bool,
    /// What the successful operations returned since the last INVEPT (a failed one returns only
    /// its error; what it owes is the EPT's own record, `Ept::owed`).
    owed: Invept,
    shadow: Shadow,
    /// Pages (GPA) the model CPU wrote since they were last harvested or cleared.
    written: BTreeSet<u64>,
}

fn slot_range(vm: &Vm, idx: usize) -> Option<(u64, u64)> {
    vm.slots()
        .find(|&(i, _)| i == idx)
        .map(|(_, s)| (s.base, s.end()))
}

fn slot_of(vm: &Vm, gpa: u64) -> Option<(u64, u64)> {
    vm.slots()
        .map(|(_, s)| (s.base, s.end()))
        .find(|&(b, e)| gpa >= b && gpa < e)
}

impl<'p> Run<'p> {
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.vm.slots().map(|(_, s)| (s.base, s.end())).collect()
    }

    /// A guest-physical address: raw, inside a slot, near a slot's end, or below 4 GiB.
    fn gpa(&self, c: &mut Cursor) -> Option<u64> {
        let (k, v) = (c.u8()?, c.u64()?);
        let r = self.ranges();
        Some(match (k % 4, r.is_empty()) {
            (0, _) => v,
            (1, false) => {
                let (b, e) = r[(v % r.len() as u64) as usize];
                b + (v >> 8) % (e - b)
            }
            (2, false) => {
                let (b, e) = r[(v % r.len() as u64) as usize];
                e - 1 - ((v >> 8) & 0xffff).min(e - b - 1)
            }
            _ => v & 0xffff_ffff,
        })
    }

    fn check_accounting(&self) {
        let live = self.p.live_pages();
        assert_eq!(
            live,
            self.vm.pages_held() + 2,
            "platform live pages differ from Vm::pages_held() + 2 harness pages"
        );
        assert!(
            self.vm.backing_pages() <= self.page_limit,
            "backing pages above the page limit"
        );
    }

    /// The VM loop's protocol: no guest runs while an INVEPT obligation is pending.
    fn invept(&mut self) {
        self.cpu.invept_single(self.eptp);
        let owed = core::mem::replace(&mut self.owed, Invept::NONE).and(self.vm.ept().owed());
        self.vm.ept_mut().invept_done(self.p, owed);
    }

    fn invept_if_needed(&mut self) {
        if self.vm.ept().needs_invept() {
            self.invept();
        }
    }

    /// Kick: drain the CPU's PML log into the slot logs and reset the index.
    fn drain_pml(&mut self) {
        if let Some(st) = self.cpu.pml {
            self.vm.pml_drain(self.p, st.buffer, st.index);
            self.cpu.set_pml_index(511);
        }
    }

    /// One guest access, retried through the exits the VM resolves.
    fn access(&mut self, gpa: u64, kind: AccessKind) {
        if gpa >= GPA_LIMIT {
            return;
        }
        for _ in 0..8 {
            self.invept_if_needed();
            match self.cpu.access_kind(self.p, self.eptp, gpa, kind) {
                Ok(_) => {
                    if kind == AccessKind::Write {
                        assert!(
                            slot_of(&self.vm, gpa).is_some(),
                            "a guest write outside every slot completed"
                        );
                        self.written.insert(gpa & !(PAGE_SIZE - 1));
                    }
                    return;
                }
                Err(Exit::PmlFull { .. }) => self.drain_pml(),
                Err(Exit::EptViolation {
                    gpa: g,
                    qualification,
                }) => {
                    self.drain_pml();
                    match self.vm.on_ept_violation(self.p, g, qualification) {
                        Fault::Resolved => {}
                        Fault::Mmio { gpa: m, .. } => {
                            assert_eq!(m, g);
                            assert!(slot_of(&self.vm, g).is_none(), "MMIO exit inside a slot");
                            return;
                        }
                        Fault::LimitReached => {
                            assert!(self.vm.backing_pages() >= self.page_limit);
                            return;
                        }
                        Fault::OutOfMemory => {
                            assert!(self.faults, "OutOfMemory without fault injection");
                            return;
                        }
                        Fault::HostPageCap => panic!("host page cap hit without a cap"),
                        Fault::Unexpected => {
                            panic!("guest {kind:?} of {g:#x}: violation the VM cannot explain")
                        }
                    }
                }
                Err(e) => panic!("guest {kind:?} of {gpa:#x}: {e:?}"),
            }
        }
        panic!("guest {kind:?} of {gpa:#x} did not complete after 8 exits");
    }

    fn bitmap_words(&self, c: &mut Cursor, idx: usize) -> Option<usize> {
        let d = c.u8()?;
        let pages = self
            .vm
            .slots()
            .find(|&(i, _)| i == idx)
            .map_or(64, |(_, s)| s.pages);
        Some((pages.div_ceil(64) as usize + usize::from(d % 3)).saturating_sub(1))
    }

    fn check_bitmap(&self, idx: usize, out: &[u64]) {
        let Some((b, e)) = slot_range(&self.vm, idx) else {
            return;
        };
        let pages = (e - b) / PAGE_SIZE;
        for (w, &v) in out.iter().enumerate() {
            let first = w as u64 * 64;
            if first + 64 > pages {
                let valid = if first >= pages {
                    0
                } else {
                    (1u64 << (pages - first)) - 1
                };
                assert_eq!(v & !valid, 0, "dirty bits beyond the slot's {pages} pages");
            }
        }
        for &g in self.written.range(b..e) {
            let i = (g - b) / PAGE_SIZE;
            assert!(
                out[(i / 64) as usize] & (1 << (i % 64)) != 0,
                "lost dirty page {g:#x}: written by the guest, not reported"
            );
        }
    }

    fn step(&mut self, c: &mut Cursor) -> Option<()> {
        let p = self.p;
        match c.u8()? % op::COUNT {
            op::ADD_RAM => {
                let size = u64::from(c.u16()?) << 20;
                let ok = self.vm.layout().is_none()
                    && Layout::new(size).is_ok()
                    && self.ranges().iter().all(|&(b, _)| b >= size)
                    && self.ranges().len() < MAX_SLOTS;
                match self.vm.add_ram(p, size) {
                    Ok(l) => {
                        assert!(ok, "add_ram({size:#x}) accepted an invalid request");
                        assert_eq!(l.mem_size, size);
                        self.shadow.tainted.push((size - RESERVED, size));
                    }
                    // The system area needs 8 backing pages (page tables, GDT, TSS).
                    Err(Error::OutOfMemory) if ok => {
                        assert!(self.faults || self.vm.backing_pages() + 8 > self.page_limit)
                    }
                    Err(e) => assert!(!ok, "add_ram({size:#x}) refused a valid request: {e:?}"),
                }
            }
            op::ADD_SLOT => {
                let (kb, vb, ks, vs) = (c.u8()?, c.u64()?, c.u8()?, c.u64()?);
                let r = self.ranges();
                let base = match kb % 4 {
                    0 => vb,
                    1 => (vb & 0xffff_ffff) << 12,
                    2 => (vb & 0x7ff) << 21,
                    _ => {
                        r.get((vb % 8) as usize).map_or(0, |&(_, e)| e) + (((vb >> 8) & 0xff) << 12)
                    }
                };
                let size = match ks % 4 {
                    0 => vs,
                    1 => (vs & 0xff_ffff) << 12,
                    2 => ((vs & 0x3ff) + 1) << 12,
                    _ => ((vs & 0x3f) + 1) << 21,
                };
                let ok = base % PAGE_SIZE == 0
                    && size % PAGE_SIZE == 0
                    && size > 0
                    && size / PAGE_SIZE <= MAX_TRACKED_PAGES
                    && base.checked_add(size).is_some_and(|e| e <= GPA_LIMIT)
                    && r.iter().all(|&(b, e)| base + size <= b || base >= e)
                    && r.len() < MAX_SLOTS;
                match self.vm.add_slot(p, base, size) {
                    Ok(i) => {
                        assert!(
                            ok,
                            "add_slot({base:#x}, {size:#x}) accepted an invalid slot"
                        );
                        assert_eq!(slot_range(&self.vm, i), Some((base, base + size)));
                    }
                    Err(Error::OutOfMemory) if ok => assert!(self.faults),
                    Err(e) => assert!(
                        !ok,
                        "add_slot({base:#x}, {size:#x}) refused a valid slot: {e:?}"
                    ),
                }
            }
            op::REMOVE_SLOT => {
                let idx = usize::from(c.u8()? % 10);
                let range = slot_range(&self.vm, idx);
                let owed = self.vm.remove_slot(p, idx);
                assert_eq!(
                    owed.is_owed(),
                    range.is_some(),
                    "only a removal owes INVEPT"
                );
                self.owed.add(owed);
                assert_eq!(slot_range(&self.vm, idx), None);
                if let Some((b, e)) = range {
                    self.shadow.drop_range(b, e);
                    self.written.retain(|&g| g < b || g >= e);
                    assert!(
                        self.vm.ept().translate(p, b).is_none()
                            && self.vm.ept().translate(p, e - PAGE_SIZE).is_none()
                    );
                }
            }
            op::VIOLATION => {
                let gpa = self.gpa(c)?;
                let q = u64::from(c.u8()?);
                let mapped_before = self.vm.ept().translate(p, gpa).is_some();
                let f = self.vm.on_ept_violation(p, gpa, q);
                match slot_of(&self.vm, gpa) {
                    None => assert_eq!(
                        f,
                        Fault::Mmio {
                            gpa,
                            write: q & 2 != 0
                        }
                    ),
                    Some(_) if mapped_before => {
                        assert_eq!(f, Fault::Resolved, "violation on a backed page at {gpa:#x}")
                    }
                    Some(_) => match f {
                        Fault::Resolved => assert!(self.vm.ept().translate(p, gpa).is_some()),
                        Fault::LimitReached => assert!(self.vm.backing_pages() >= self.page_limit),
                        Fault::OutOfMemory => assert!(self.faults),
                        f => panic!("violation at {gpa:#x} (q {q:#x}) in a slot: {f:?}"),
                    },
                }
            }
            op::WRITE_GUEST => {
                let gpa = self.gpa(c)?;
                let l = c.u32()?;
                let fill = c.u8()?;
                let len = if l >> 31 == 0 {
                    l & 0xffff
                } else {
                    l & 0x1f_ffff
                } as usize;
                let data: Vec<u8> = (0..len)
                    .map(|i| fill ^ (i as u8) ^ ((i >> 8) as u8).rotate_left(3))
                    .collect();
                let valid = len == 0
                    || gpa
                        .checked_add(len as u64)
                        .is_some_and(|end| slot_of(&self.vm, gpa).is_some_and(|(_, e)| end <= e));
                match self.vm.write_guest(p, gpa, &data) {
                    Ok(()) => {
                        assert!(
                            valid,
                            "write_guest({gpa:#x}, {len}) outside a slot accepted"
                        );
                        self.shadow.write(gpa, &data);
                    }
                    Err(e) => {
                        assert!(
                            !valid || e == Error::OutOfMemory,
                            "write_guest({gpa:#x}, {len}): {e:?}"
                        );
                        if valid {
                            self.shadow.forget(gpa, len as u64);
                        }
                    }
                }
            }
            op::READ_GUEST => {
                let gpa = self.gpa(c)?;
                let len = (c.u32()? & 0x1f_ffff) as usize;
                let mut out = vec![0xa5u8; len];
                let valid = len == 0
                    || gpa
                        .checked_add(len as u64)
                        .is_some_and(|end| slot_of(&self.vm, gpa).is_some_and(|(_, e)| end <= e));
                match self.vm.read_guest(p, gpa, &mut out) {
                    Ok(()) => {
                        assert!(valid, "read_guest({gpa:#x}, {len}) outside a slot accepted");
                        self.shadow.check(gpa, &out);
                    }
                    Err(e) => assert!(!valid, "read_guest({gpa:#x}, {len}) refused: {e:?}"),
                }
            }
            op::LOAD_ELF => {
                let n = usize::from(c.u16()?);
                let image = c.bytes(n);
                let layout = self.vm.layout();
                let r = self.vm.load_elf(p, image);
                if let Some(l) = layout {
                    self.shadow.tainted.push((0, l.mem_size));
                }
                match r {
                    Ok(entry) => assert_eq!(
                        Some(entry),
                        image
                            .get(24..32)
                            .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
                    ),
                    Err(LoadError::Vm(Error::NotMapped)) if layout.is_none() => {}
                    Err(LoadError::Vm(Error::OutOfMemory)) => {
                        assert!(self.faults || self.vm.backing_pages() >= self.page_limit)
                    }
                    Err(LoadError::Elf(_)) => {}
                    Err(e) => panic!("load_elf: {e:?}"),
                }
            }
            code @ (op::GET_LOG | op::HARVEST) => {
                let idx = usize::from(c.u8()? % 10);
                let words = self.bitmap_words(c, idx)?;
                self.drain_pml();
                let mut out = vec![u64::MAX; words];
                let range = slot_range(&self.vm, idx);
                let r = if code == op::GET_LOG {
                    self.vm
                        .get_dirty_log(p, idx, &mut out)
                        .map(|()| Invept::NONE)
                } else {
                    self.vm.harvest(p, idx, &mut out)
                };
                match (r, range) {
                    (Ok(owed), Some((b, e))) => {
                        self.check_bitmap(idx, &out[..((e - b) / PAGE_SIZE).div_ceil(64) as usize]);
                        if code == op::HARVEST {
                            assert!(
                                owed.is_owed() && self.vm.ept().needs_invept(),
                                "harvest must return the INVEPT it owes"
                            );
                            self.written.retain(|&g| g < b || g >= e);
                        }
                        self.owed.add(owed);
                    }
                    (Err(Error::NotMapped), None) => {}
                    (Err(Error::BitmapTooSmall), Some((b, e))) => {
                        assert!((words as u64) < ((e - b) / PAGE_SIZE).div_ceil(64))
                    }
                    (r, range) => {
                        panic!("dirty log of slot {idx} ({range:x?}) with {words} words: {r:?}")
                    }
                }
            }
            op::CLEAR_LOG => {
                let idx = usize::from(c.u8()? % 10);
                let (k, first, num, pat, d) = (
                    c.u8()?,
                    u64::from(c.u32()?),
                    u64::from(c.u32()?),
                    c.u64()?,
                    c.u8()?,
                );
                let pages = slot_range(&self.vm, idx).map_or(64, |(b, e)| (e - b) / PAGE_SIZE);
                let first = if k & 1 == 0 {
                    first % (pages / 64 + 1) * 64
                } else {
                    first
                };
                let num = match (k >> 1) % 3 {
                    0 => num,
                    1 => pages.saturating_sub(first),
                    _ => (num % 8 + 1) * 64,
                };
                let words = (num.div_ceil(64).min(MAX_TRACKED_PAGES / 64 + 2) as usize
                    + usize::from(d % 3))
                .saturating_sub(1);
                let mask: Vec<u64> = (0..words).map(|i| pat.rotate_left(i as u32 * 7)).collect();
                self.drain_pml();
                let r = self.vm.clear_dirty_log(p, idx, first, num, &mask);
                let valid_range = first % 64 == 0
                    && first
                        .checked_add(num)
                        .is_some_and(|end| end <= pages && (num % 64 == 0 || end == pages));
                match (r, slot_range(&self.vm, idx)) {
                    (Ok(owed), Some((b, _))) => {
                        assert!(
                            valid_range && mask.len() as u64 >= num.div_ceil(64),
                            "clear({first}, {num}) accepted"
                        );
                        self.owed.add(owed);
                        for (w, &m) in mask.iter().enumerate().take(num.div_ceil(64) as usize) {
                            let mut m = m;
                            while m != 0 {
                                let bit = u64::from(m.trailing_zeros());
                                m &= m - 1;
                                let i = w as u64 * 64 + bit;
                                if i < num {
                                    self.written.remove(&(b + (first + i) * PAGE_SIZE));
                                }
                            }
                        }
                    }
                    (Err(Error::NotMapped), None) => {}
                    (Err(Error::InvalidDirtyLogRange), Some(_)) => assert!(!valid_range),
                    (Err(Error::BitmapTooSmall), Some(_)) => {
                        assert!((mask.len() as u64) < num.div_ceil(64))
                    }
                    (r, s) => panic!(
                        "clear_dirty_log(slot {idx} {s:x?}, {first}, {num}, {} words): {r:?}",
                        mask.len()
                    ),
                }
            }
            op::INVEPT => self.invept(),
            op::FAIL_NTH => {
                self.p.fail_nth_alloc(u64::from(c.u8()? % 16) + 1);
                self.faults = true;
            }
            op::FAIL_AFTER => {
                self.p.fail_allocs_after(u64::from(c.u8()? % 32));
                self.faults = true;
            }
            op::CLEAR_FAULTS => {
                self.p.clear_faults();
                self.faults = false;
            }
            op::CPU_ACCESS => {
                let gpa = self.gpa(c)?;
                let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch]
                    [usize::from(c.u8()? % 3)];
                self.access(gpa, kind);
            }
            op::CPU_WRITES => {
                let gpa = self.gpa(c)? & !(PAGE_SIZE - 1);
                for i in 0..u64::from(c.u8()?) {
                    self.access(gpa.wrapping_add(i * PAGE_SIZE), AccessKind::Write);
                }
            }
            op::HANDLE_EXIT => {
                let r = c.u8()?;
                let (q, gpa, rax, rcx) = (c.u64()?, self.gpa(c)?, c.u64()?, c.u64()?);
                let basic = match r % 4 {
                    0 => reason::EPT_VIOLATION,
                    1 => reason::IO,
                    2 => reason::CR_ACCESS,
                    _ => u32::from(r >> 2) | if r & 0x80 != 0 { 1 << 31 } else { 0 },
                };
                let info = ExitInfo {
                    reason: basic,
                    qualification: q,
                    gpa,
                    instr_len: 3,
                };
                self.gprs.rax = rax;
                self.gprs.rcx = rcx;
                self.vcpu.halted = false;
                let cpuid = |leaf: u32, sub: u32| [leaf, sub, 0xffff_ffff, 0];
                let _ = self
                    .vm
                    .handle_exit(p, &mut self.vcpu, &info, &mut self.gprs, &cpuid);
                assert!(self.vcpu.console_len <= self.vcpu.console.len());
                if self.vcpu.console_len == self.vcpu.console.len() {
                    self.vcpu.console_len = 0; // user space took the bytes
                }
            }
            op::PML_DRAIN => {
                let index = c.u16()?;
                let n = usize::from(c.u8()?);
                let words = p.page(self.scratch);
                for w in words.iter() {
                    w.store(0, std::sync::atomic::Ordering::Relaxed);
                }
                for i in 0..n.min(512) {
                    let g = self.gpa(c)?;
                    words[511 - i].store(g, std::sync::atomic::Ordering::Relaxed);
                }
                // SDM 29.3.6: entries index+1..=511 were logged; an index above 511 (0xFFFF after
                // the entry at 0) means all 512.
                let want = if index >= 512 {
                    512
                } else {
                    511 - usize::from(index)
                };
                assert_eq!(self.vm.pml_drain(p, self.scratch, index), want);
            }
            _ => unreachable!("op code below COUNT"),
        }
        Some(())
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let (Some(m), Some(f), Some(limit)) = (c.u8(), c.u8(), c.u32()) else {
        return;
    };
    let mode = [Mode::AdScan, Mode::Pml, Mode::WriteProtect][usize::from(m % 3)];
    let features = EptFeatures {
        ad: f & feat::AD != 0,
        large_2m: f & feat::LARGE_2M != 0,
        large_1g: f & feat::LARGE_1G != 0,
        execute_only: f & feat::EXEC_ONLY != 0,
        max_phys_bits: 46,
    };
    let page_limit = u64::from(limit);
    let p = MockPlatform::new();
    let pml_buffer = p.alloc_page().expect("harness page");
    let scratch = p.alloc_page().expect("harness page");
    let free_harness = |p: &MockPlatform| {
        p.clear_faults();
        p.free_page(pml_buffer);
        p.free_page(scratch);
    };
    if f & feat::FAIL_NEW != 0 {
        p.fail_nth_alloc(1);
    }
    let vm = match Vm::new(&p, features, mode, page_limit) {
        Ok(vm) => {
            assert!(
                f & feat::FAIL_NEW == 0,
                "Vm::new succeeded without its page"
            );
            vm
        }
        Err(e) => {
            let unsupported = matches!(mode, Mode::AdScan | Mode::Pml) && !features.ad;
            assert!(
                e == if unsupported {
                    Error::Unsupported
                } else {
                    Error::OutOfMemory
                },
                "Vm::new: {e:?}"
            );
            free_harness(&p);
            p.assert_all_freed();
            return;
        }
    };
    assert!(
        !(matches!(mode, Mode::AdScan | Mode::Pml) && !features.ad),
        "A/D mode without A/D accepted"
    );
    let ad = features.ad && (mode != Mode::WriteProtect || f & feat::AD_FOR_WP != 0);
    let eptp = vm.ept().eptp(ad).0;
    let mut cpu = Cpu::new(features);
    cpu.paging_structure_cache = f & feat::NO_PSC == 0;
    if mode == Mode::Pml {
        cpu.enable_pml(pml_buffer);
    }
    let mut run = Run {
        p: &p,
        vm,
        cpu,
        eptp,
        vcpu: VcpuState::new(0),
        gprs: GuestGprs::default(),
        page_limit,
        scratch,
        faults: false,
        owed: Invept::NONE,
        shadow: Shadow::default(),
        written: BTreeSet::new(),
    };
    run.check_accounting();
    for _ in 0..MAX_OPS {
        if run.step(&mut c).is_none() {
            break;
        }
        run.check_accounting();
    }
    let Run { vm, .. } = run;
    p.clear_faults();
    vm.destroy(&p);
    free_harness(&p);
    p.assert_all_freed();
}
