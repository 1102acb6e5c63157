//! Target `ept_ops`: map / unmap / protect / split / split_range / invept_done on one [`Ept`]
//! over [`MockPlatform`], with allocation fault injection, against an interval model of the
//! mappings (what the documentation of each operation promises).
//!
//! Checked after every operation: no panic; the verdict (an operation the documentation calls
//! invalid fails; a valid one fails only with `OutOfMemory`, and only when allocations can fail);
//! the translations (hpa, rights, memory type) of sampled GPAs agree with the model, which
//! changes only on success, so a failed operation left every translation as it was; the
//! platform's live pages equal `tables_in_use() + tables_pending_free()`. After destroy, every
//! page is back.

use smudge_core::ept::{Ept, EptFeatures, Invept, MemoryType, Perms, GPA_LIMIT, PAGE_SIZE};
use smudge_core::Error;
use smudge_tests::platform::MockPlatform;

use crate::Cursor;

/// Operations per input.
pub const MAX_OPS: usize = 64;
/// Longest range protect and split_range are fuzzed with (they step page by page).
pub const MAX_STEPPED: u64 = 64 << 20;
/// Most leaves one map may create.
pub const MAX_LEAVES: u64 = 1 << 15;

/// Operation codes.
pub mod op {
    /// `map(gpa sel, hpa sel, len sel, u8 perms, u8 memtype, u8 allow_large)`.
    pub const MAP: u8 = 0;
    /// `unmap(gpa sel, len sel)`.
    pub const UNMAP: u8 = 1;
    /// `protect(gpa sel, len sel, u8 perms)`.
    pub const PROTECT: u8 = 2;
    /// `split(gpa sel)`.
    pub const SPLIT: u8 = 3;
    /// `split_range(gpa sel, len sel)`.
    pub const SPLIT_RANGE: u8 = 4;
    /// `invept_done()`.
    pub const INVEPT_DONE: u8 = 5;
    /// `fail_nth_alloc(u8 % 8 + 1)`.
    pub const FAIL_NTH: u8 = 6;
    /// `fail_allocs_after(u8 % 16)`.
    pub const FAIL_AFTER: u8 = 7;
    /// `clear_faults()`.
    pub const CLEAR_FAULTS: u8 = 8;
    /// Number of operations.
    pub const COUNT: u8 = 9;
}

const MEMTYPES: [MemoryType; 5] = [
    MemoryType::Uncacheable,
    MemoryType::WriteCombining,
    MemoryType::WriteThrough,
    MemoryType::WriteProtected,
    MemoryType::WriteBack,
];

/// One mapped interval of the model.
#[derive(Clone, Copy, Debug)]
struct Iv {
    start: u64,
    end: u64,
    hpa: u64,
    perms: u8,
    memtype: u8,
}

/// The mappings as the documentation says they are: sorted, disjoint intervals.
#[derive(Default)]
struct Model {
    ivs: Vec<Iv>,
}

impl Model {
    fn lookup(&self, gpa: u64) -> Option<(u64, u8, u8)> {
        self.ivs
            .iter()
            .find(|i| gpa >= i.start && gpa < i.end)
            .map(|i| (i.hpa + (gpa - i.start), i.perms, i.memtype))
    }
    fn overlaps(&self, s: u64, e: u64) -> bool {
        self.ivs.iter().any(|i| s < i.end && i.start < e)
    }
    fn covered(&self, s: u64, e: u64) -> bool {
        let mut g = s;
        for i in &self.ivs {
            if i.end <= g {
                continue;
            }
            if i.start > g {
                return false;
            }
            g = i.end;
            if g >= e {
                return true;
            }
        }
        g >= e
    }
    /// Cuts the intervals at `s` and `e`, so that every interval lies inside or outside [s, e).
    fn cut(&mut self, s: u64, e: u64) {
        let mut out = Vec::with_capacity(self.ivs.len() + 2);
        for &i in &self.ivs {
            let mut cur = i;
            for x in [s, e] {
                if x > cur.start && x < cur.end {
                    out.push(Iv { end: x, ..cur });
                    cur = Iv {
                        start: x,
                        hpa: cur.hpa + (x - cur.start),
                        ..cur
                    };
                }
            }
            out.push(cur);
        }
        self.ivs = out;
    }
    fn remove(&mut self, s: u64, e: u64) {
        self.cut(s, e);
        self.ivs.retain(|i| i.end <= s || i.start >= e);
    }
    fn insert(&mut self, iv: Iv) {
        let at = self.ivs.partition_point(|i| i.start < iv.start);
        self.ivs.insert(at, iv);
    }
    fn protect(&mut self, s: u64, e: u64, perms: u8) {
        self.cut(s, e);
        for i in self.ivs.iter_mut().filter(|i| i.start >= s && i.end <= e) {
            i.perms = perms;
        }
    }
}

fn range_ok(gpa: u64, len: u64) -> bool {
    gpa % PAGE_SIZE == 0
        && len % PAGE_SIZE == 0
        && len > 0
        && gpa.checked_add(len).is_some_and(|e| e <= GPA_LIMIT)
}

/// SDM 29.3.3.1: no W without R; execute-only only with the capability; some right.
fn perms_ok(perms: u8, f: &EptFeatures) -> bool {
    perms != 0
        && perms <= 7
        && !(perms & 2 != 0 && perms & 1 == 0)
        && (perms & 1 != 0 || f.execute_only)
}

struct Run<'p> {
    p: &'p MockPlatform,
    ept: Ept,
    f: EptFeatures,
    model: Model,
    faults: bool,
    /// What the successful operations returned since the last INVEPT (a failed one returns only
    /// its error; what it owes is the EPT's own record, `Ept::owed`).
    owed: Invept,
    /// A running value that picks extra sample points.
    salt: u64,
}

impl Run<'_> {
    fn gpa(&self, c: &mut Cursor) -> Option<u64> {
        let (k, v) = (c.u8()?, c.u64()?);
        Some(match k % 5 {
            0 => v,
            1 => (v & 0xfff_ffff) << 12,
            2 => (v & 0x3ff) << 21,
            3 => (v & 0x3f) << 30,
            _ => match self.model.ivs.get((v % 64) as usize) {
                // Near an interval boundary, page aligned.
                Some(i) => {
                    let b = if v & 0x40 != 0 { i.end } else { i.start };
                    let d = ((v >> 8) & 0x3ff) << 12;
                    if v & 0x80 != 0 {
                        b.wrapping_sub(d)
                    } else {
                        b.wrapping_add(d)
                    }
                }
                None => v & !0xfff,
            },
        })
    }

    fn len(c: &mut Cursor) -> Option<u64> {
        let (k, v) = (c.u8()?, c.u64()?);
        Some(match k % 4 {
            0 => v,
            1 => ((v & 0xfff) + 1) << 12,
            2 => ((v & 0x3f) + 1) << 21,
            _ => ((v & 0x7) + 1) << 30,
        })
    }

    /// Leaves `map` would create at most (4 KiB leaves unless both addresses share 2 MiB
    /// alignment and large leaves are allowed).
    fn leaves(&self, gpa: u64, hpa: u64, len: u64, large: bool) -> u64 {
        if large && self.f.large_2m && (gpa.wrapping_sub(hpa)) % (1 << 21) == 0 {
            len / (1 << 21) + 1024
        } else {
            len / PAGE_SIZE
        }
    }

    fn verdict(&self, what: &str, r: Result<(), Error>, valid: bool) -> bool {
        match r {
            Ok(()) => {
                assert!(
                    valid,
                    "{what}: accepted, but the documentation says it is invalid"
                );
                true
            }
            Err(Error::OutOfMemory) if valid => {
                assert!(self.faults, "{what}: OutOfMemory without fault injection");
                false
            }
            Err(e) => {
                assert!(!valid, "{what}: refused a valid request with {e:?}");
                false
            }
        }
    }

    fn check(&mut self, extra: &[u64]) {
        let mut pts: Vec<u64> = extra.to_vec();
        for i in self.model.ivs.iter().take(32) {
            pts.extend([
                i.start,
                i.end - PAGE_SIZE,
                i.end,
                i.start + ((i.end - i.start) / 2 & !0xfff),
                i.start.wrapping_sub(PAGE_SIZE),
            ]);
        }
        for _ in 0..4 {
            self.salt = self
                .salt
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let g = match self
                .model
                .ivs
                .get((self.salt >> 40) as usize % (self.model.ivs.len() + 1))
            {
                Some(i) => i.start + (self.salt >> 12) % (i.end - i.start),
                None => (self.salt >> 16) & 0xff_ffff_ffff,
            };
            pts.push(g);
        }
        for g in pts.into_iter().filter(|&g| g < GPA_LIMIT) {
            let t = self
                .ept
                .translate(self.p, g)
                .map(|t| (t.hpa, t.perms.0, t.entry.memory_type()));
            assert_eq!(
                t,
                self.model.lookup(g),
                "translation of {g:#x}: EPT (left) vs model (right)"
            );
        }
        assert_eq!(
            self.p.live_pages(),
            (self.ept.tables_in_use() + self.ept.tables_pending_free()) as u64,
            "live pages differ from tables in use + pending free"
        );
    }

    fn step(&mut self, c: &mut Cursor) -> Option<()> {
        let p = self.p;
        let f = self.f;
        match c.u8()? % op::COUNT {
            op::MAP => {
                let gpa = self.gpa(c)?;
                let (k, v) = (c.u8()?, c.u64()?);
                let len = Self::len(c)?;
                let (perms, mt, large) = (c.u8()? % 9, c.u8()?, c.u8()? & 1 != 0);
                let hpa = match k % 4 {
                    0 => v,
                    1 => gpa,
                    2 => (v & 0xffff_ffff) << 12,
                    _ => gpa.wrapping_add((v & 0xff) << 21),
                };
                if self.leaves(gpa, hpa, len, large) > MAX_LEAVES && range_ok(gpa, len) {
                    return Some(());
                }
                let memtype = MEMTYPES[usize::from(mt) % MEMTYPES.len()];
                let maxpa = 1u64 << f.max_phys_bits.min(52);
                let valid = range_ok(gpa, len)
                    && hpa % PAGE_SIZE == 0
                    && hpa.checked_add(len).is_some_and(|e| e <= maxpa)
                    && perms_ok(perms, &f)
                    && !self.model.overlaps(gpa, gpa + len);
                let r = self.ept.map(p, gpa, hpa, len, Perms(perms), memtype, large);
                if self.verdict(
                    &format!("map({gpa:#x}, {hpa:#x}, {len:#x}, {perms}, {memtype:?}, {large})"),
                    r,
                    valid,
                ) {
                    self.model.insert(Iv {
                        start: gpa,
                        end: gpa + len,
                        hpa,
                        perms,
                        memtype: memtype as u8,
                    });
                }
                self.check(&[gpa, gpa.wrapping_add(len).wrapping_sub(PAGE_SIZE)]);
            }
            op::UNMAP => {
                let (gpa, len) = (self.gpa(c)?, Self::len(c)?);
                let r = self.ept.unmap(p, gpa, len).map(|o| self.owed.add(o));
                if self.verdict(&format!("unmap({gpa:#x}, {len:#x})"), r, range_ok(gpa, len)) {
                    assert!(
                        self.owed.is_owed() && self.ept.needs_invept(),
                        "unmap must return the INVEPT it owes"
                    );
                    self.model.remove(gpa, gpa + len);
                }
                self.check(&[gpa, gpa.wrapping_sub(PAGE_SIZE), gpa.wrapping_add(len)]);
            }
            op::PROTECT => {
                let (gpa, len, perms) = (self.gpa(c)?, Self::len(c)?, c.u8()? % 9);
                if len > MAX_STEPPED {
                    return Some(());
                }
                let valid =
                    range_ok(gpa, len) && perms_ok(perms, &f) && self.model.covered(gpa, gpa + len);
                let narrowing = valid
                    && self
                        .model
                        .ivs
                        .iter()
                        .any(|i| i.start < gpa + len && gpa < i.end && i.perms & !perms != 0);
                let r = self
                    .ept
                    .protect(p, gpa, len, Perms(perms))
                    .map(|o| self.owed.add(o));
                if self.verdict(&format!("protect({gpa:#x}, {len:#x}, {perms})"), r, valid) {
                    // SDM 29.4.3.4: a narrowed right may be cached, INVEPT is required.
                    assert!(
                        !narrowing || (self.owed.is_owed() && self.ept.needs_invept()),
                        "narrowing protect without returning the INVEPT it owes"
                    );
                    self.model.protect(gpa, gpa + len, perms);
                }
                self.check(&[gpa, gpa.wrapping_sub(PAGE_SIZE), gpa.wrapping_add(len)]);
            }
            op::SPLIT => {
                let gpa = self.gpa(c)?;
                let mapped = gpa < GPA_LIMIT && self.model.lookup(gpa).is_some();
                match self.ept.split(p, gpa) {
                    Ok(owed) => {
                        assert!(mapped, "split({gpa:#x}) of an unmapped address succeeded");
                        if owed.is_owed() {
                            assert!(
                                self.ept.needs_invept(),
                                "a split that owes INVEPT must have recorded it"
                            );
                        }
                        self.owed.add(owed);
                    }
                    Err(Error::NotMapped) => {
                        assert!(!mapped, "split({gpa:#x}): NotMapped on a mapped address")
                    }
                    Err(Error::OutOfMemory) => assert!(mapped && self.faults),
                    Err(e) => panic!("split({gpa:#x}): {e:?}"),
                }
                self.check(&[gpa]);
            }
            op::SPLIT_RANGE => {
                let (gpa, len) = (self.gpa(c)?, Self::len(c)?);
                if len > MAX_STEPPED {
                    return Some(());
                }
                let r = self.ept.split_range(p, gpa, len).map(|o| self.owed.add(o));
                self.verdict(
                    &format!("split_range({gpa:#x}, {len:#x})"),
                    r,
                    range_ok(gpa, len),
                );
                if r.is_ok() {
                    let mut g = gpa;
                    while g < gpa + len {
                        if let Some(t) = self.ept.translate(p, g) {
                            assert_eq!(t.level, 1, "split_range left a large leaf at {g:#x}");
                        }
                        g += (len / 16).max(PAGE_SIZE) & !0xfff;
                    }
                }
                self.check(&[gpa]);
            }
            op::INVEPT_DONE => {
                let owed = core::mem::replace(&mut self.owed, Invept::NONE).and(self.ept.owed());
                self.ept.invept_done(p, owed);
                assert_eq!(self.ept.tables_pending_free(), 0);
                assert!(!self.ept.needs_invept());
                self.check(&[]);
            }
            op::FAIL_NTH => {
                p.fail_nth_alloc(u64::from(c.u8()? % 8) + 1);
                self.faults = true;
            }
            op::FAIL_AFTER => {
                p.fail_allocs_after(u64::from(c.u8()? % 16));
                self.faults = true;
            }
            op::CLEAR_FAULTS => {
                p.clear_faults();
                self.faults = false;
            }
            _ => unreachable!("op code below COUNT"),
        }
        Some(())
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut c = Cursor::new(data);
    let (Some(fb), Some(mpb), Some(salt)) = (c.u8(), c.u8(), c.u64()) else {
        return;
    };
    let f = EptFeatures {
        ad: fb & 1 != 0,
        large_2m: fb & 2 != 0,
        large_1g: fb & 4 != 0,
        execute_only: fb & 8 != 0,
        max_phys_bits: 36 + mpb % 17,
    };
    let p = MockPlatform::new();
    let ept = Ept::new(&p, f).expect("EPT");
    let mut run = Run {
        p: &p,
        ept,
        f,
        model: Model::default(),
        faults: false,
        owed: Invept::NONE,
        salt,
    };
    for _ in 0..MAX_OPS {
        if run.step(&mut c).is_none() {
            break;
        }
    }
    let Run { ept, .. } = run;
    p.clear_faults();
    ept.destroy(&p);
    p.assert_all_freed();
}
