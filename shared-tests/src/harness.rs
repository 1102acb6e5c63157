//! A small VM around the model: one EPT, a few model CPUs, memory slots with dirty logs, and the
//! exit handling the real VM loop does (PML drain on every exit, write-protect faults, INVEPT on
//! every CPU after a clear). It also keeps the oracle: the set of pages the guest wrote
//! (through the model) since the last harvest or clear of each page.

use std::collections::BTreeSet;

use smudge_core::dirty::{pml, DirtyLog, Mode};
use smudge_core::ept::{Ept, EptFeatures, Invept, MemoryType, Perms};
use smudge_core::platform::Platform;
use smudge_core::Error;

use crate::model::{self, qual, Cpu, Exit};
use crate::platform::MockPlatform;

/// How the guest memory of a slot is mapped before logging starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Exactly the slot, 4 KiB leaves.
    Small,
    /// The 2 MiB-aligned hull of the slot, with 2 MiB leaves where aligned.
    Large2M,
    /// The whole 1 GiB region around the slot, one 1 GiB leaf.
    Large1G,
}

/// Which CPUs execute INVEPT after the core clears D, A or W.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InveptPolicy {
    /// Every CPU (correct).
    AllCpus,
    /// Only CPU 0 (the SMP bug: a remote TLB keeps the stale translation).
    OnlyCpu0,
    /// None (the classic lost-dirty-page bug).
    Never,
}

/// One memory slot.
#[derive(Debug)]
pub struct Slot {
    /// First GPA.
    pub base: u64,
    /// Pages.
    pub pages: u64,
    /// `[start, end)` of the EPT mapping created for it (a superset of the slot).
    pub mapped: (u64, u64),
    /// The dirty log, once logging is enabled.
    pub log: Option<DirtyLog>,
    /// Oracle: page indices written since they were last harvested or cleared.
    pub written: BTreeSet<u64>,
}

impl Slot {
    /// End GPA (exclusive).
    pub fn end(&self) -> u64 {
        self.base + self.pages * 4096
    }
}

/// The VM.
pub struct TrackedVm<'p> {
    /// The platform.
    pub p: &'p MockPlatform,
    /// The EPT.
    pub ept: Ept,
    /// Dirty-logging mode of every slot.
    pub mode: Mode,
    /// The EPTP the CPUs run with.
    pub eptp: u64,
    /// The CPUs.
    pub cpus: Vec<Cpu>,
    pml_buffers: Vec<u64>,
    /// The slots.
    pub slots: Vec<Slot>,
    /// INVEPT behaviour after clears.
    pub invept: InveptPolicy,
}

/// HPA of the guest page at `gpa` (identity; no backing memory needed).
pub fn guest_hpa(gpa: u64) -> u64 {
    gpa
}

impl<'p> TrackedVm<'p> {
    /// A VM with `ncpus` CPUs. A/D is on in the EPTP for A/D scan and PML, and `ad_for_wp`
    /// decides it for write-protect. PML is enabled on every CPU in PML mode.
    pub fn new(p: &'p MockPlatform, mode: Mode, ncpus: usize, ad_for_wp: bool) -> TrackedVm<'p> {
        let features = EptFeatures::ALL;
        let ept = Ept::new(p, features).expect("EPT");
        let ad = mode != Mode::WriteProtect || ad_for_wp;
        let eptp = model::eptp(ept.pml4(), ad);
        assert_eq!(
            ept.eptp(ad).0,
            eptp,
            "core's EPTP differs from the SDM layout"
        );
        let mut cpus: Vec<Cpu> = (0..ncpus).map(|_| Cpu::new(features)).collect();
        let mut pml_buffers = Vec::new();
        if mode == Mode::Pml {
            for c in &mut cpus {
                let b = p.alloc_page().expect("PML buffer");
                c.enable_pml(b);
                pml_buffers.push(b);
            }
        }
        TrackedVm {
            p,
            ept,
            mode,
            eptp,
            cpus,
            pml_buffers,
            slots: Vec::new(),
            invept: InveptPolicy::AllCpus,
        }
    }

    /// Maps a slot of `pages` pages at `base` (RW, WB, identity HPAs) with `backing`; logging is
    /// not enabled yet. Returns the slot number.
    pub fn add_slot(&mut self, base: u64, pages: u64, backing: Backing) -> usize {
        let end = base + pages * 4096;
        let (ms, me, large) = match backing {
            Backing::Small => (base, end, false),
            Backing::Large2M => (base & !0x1f_ffff, (end + 0x1f_ffff) & !0x1f_ffff, true),
            Backing::Large1G => {
                let s = base & !0x3fff_ffff;
                assert!(
                    end <= s + (1 << 30),
                    "a Large1G slot must lie in one 1 GiB region"
                );
                (s, s + (1 << 30), true)
            }
        };
        self.ept
            .map(
                self.p,
                ms,
                guest_hpa(ms),
                me - ms,
                Perms::RWX,
                MemoryType::WriteBack,
                large,
            )
            .expect("map slot");
        self.slots.push(Slot {
            base,
            pages,
            mapped: (ms, me),
            log: None,
            written: BTreeSet::new(),
        });
        self.slots.len() - 1
    }

    /// Starts dirty logging of slot `s` (KVM: KVM_MEM_LOG_DIRTY_PAGES), with the exits and
    /// flushes around it.
    pub fn enable_logging(&mut self, s: usize) -> Result<(), Error> {
        self.kick_all();
        let slot = &self.slots[s];
        let mut log = DirtyLog::new(self.p, self.mode, slot.base, slot.pages)?;
        let owed = match log.enable(self.p, &mut self.ept) {
            Ok(owed) => owed,
            Err(e) => {
                log.free(self.p);
                return Err(e);
            }
        };
        assert!(
            owed.is_owed() && self.ept.needs_invept(),
            "enable must return the INVEPT it owes"
        );
        self.slots[s].log = Some(log);
        self.slots[s].written.clear();
        self.flush_tlbs(owed);
        Ok(())
    }

    /// The slot containing `gpa` with logging on.
    fn logged_slot(&self, gpa: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.log.is_some() && gpa >= s.base && gpa < s.end())
    }

    /// Drains CPU `c`'s PML buffer into the slot logs and resets its index (done on every exit).
    pub fn drain_pml(&mut self, c: usize) {
        let Some(state) = self.cpus[c].pml else {
            return;
        };
        let mut logged = Vec::new();
        pml::drain(self.p, state.buffer, state.index, |gpa| logged.push(gpa));
        for gpa in logged {
            if let Some(s) = self.logged_slot(gpa) {
                let marked = self.slots[s]
                    .log
                    .as_ref()
                    .is_some_and(|l| l.mark(self.p, gpa));
                assert!(marked, "mark({gpa:#x}) refused by its own slot");
            }
        }
        self.cpus[c].set_pml_index(pml::INDEX_RESET);
    }

    /// Every vCPU exits (the kick before a dirty-log ioctl): PML buffers are drained.
    pub fn kick_all(&mut self) {
        for c in 0..self.cpus.len() {
            self.drain_pml(c);
        }
    }

    /// Pays `owed` with INVEPT on the CPUs the policy names (the EPT learns of it only if every
    /// CPU flushed; the other policies drop the obligation, as a buggy hypervisor would).
    pub fn flush_tlbs(&mut self, owed: Invept) {
        match self.invept {
            InveptPolicy::AllCpus => {
                let (cpus, eptp) = (&mut self.cpus, self.eptp);
                let flushed = self.ept.pay(self.p, owed, || {
                    cpus.iter_mut().for_each(|c| c.invept_single(eptp));
                    Ok::<(), ()>(())
                });
                assert_eq!(flushed, Ok(()));
            }
            InveptPolicy::OnlyCpu0 => {
                if let Some(c) = self.cpus.first_mut() {
                    c.invept_single(self.eptp);
                }
                drop(owed);
            }
            InveptPolicy::Never => drop(owed),
        }
    }

    /// The guest on CPU `c` accesses `gpa`; exits are handled as the VM loop does, and the
    /// access is retried until it completes. Returns the HPA, or the exit the VM cannot resolve.
    pub fn access(&mut self, c: usize, gpa: u64, write: bool) -> Result<u64, Exit> {
        let mut unresolved = 0;
        for _ in 0..8 {
            match self.cpus[c].access(self.p, self.eptp, gpa, write) {
                Ok(hpa) => {
                    if write {
                        if let Some(s) = self.logged_slot(gpa) {
                            let page = (gpa - self.slots[s].base) / 4096;
                            self.slots[s].written.insert(page);
                        }
                    }
                    return Ok(hpa);
                }
                Err(Exit::PmlFull { .. }) => self.drain_pml(c),
                Err(
                    e @ Exit::EptViolation {
                        gpa: g,
                        qualification,
                    },
                ) => {
                    self.drain_pml(c);
                    let ours = qualification & qual::WRITE != 0
                        && self.logged_slot(g).is_some_and(|s| {
                            self.slots[s]
                                .log
                                .as_ref()
                                .is_some_and(|l| l.on_write_violation(self.p, &self.ept, g))
                        });
                    if !ours {
                        // A violation from a stale cached translation (another CPU already gave W
                        // back) resolves itself: the violation invalidated the cached mapping, so
                        // resume once. A second unresolved one is a real fault.
                        unresolved += 1;
                        if unresolved > 1 {
                            return Err(e);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        panic!("access to {gpa:#x} did not complete after 8 exits");
    }

    /// Guest write; panics on an unresolvable exit.
    pub fn write(&mut self, c: usize, gpa: u64) {
        if let Err(e) = self.access(c, gpa, true) {
            panic!("guest write to {gpa:#x} on CPU {c}: {e:?}");
        }
    }

    /// Guest read; panics on an unresolvable exit.
    pub fn read(&mut self, c: usize, gpa: u64) {
        if let Err(e) = self.access(c, gpa, false) {
            panic!("guest read of {gpa:#x} on CPU {c}: {e:?}");
        }
    }

    fn bits_to_set(bitmap: &[u64], pages: u64) -> BTreeSet<u64> {
        let mut set = BTreeSet::new();
        for (w, &v) in bitmap.iter().enumerate() {
            let mut v = v;
            while v != 0 {
                let b = u64::from(v.trailing_zeros());
                v &= v - 1;
                let page = w as u64 * 64 + b;
                assert!(
                    page < pages,
                    "bit {page} reported beyond the slot's {pages} pages"
                );
                set.insert(page);
            }
        }
        set
    }

    /// KVM_GET_DIRTY_LOG: the reported page indices.
    pub fn get(&mut self, s: usize) -> BTreeSet<u64> {
        self.kick_all();
        let slot = &self.slots[s];
        let mut out = vec![0u64; slot.pages.div_ceil(64) as usize];
        slot.log
            .as_ref()
            .expect("logging enabled")
            .get(self.p, &self.ept, &mut out)
            .expect("get");
        Self::bits_to_set(&out, slot.pages)
    }

    /// Harvest (get + clear in one pass), then INVEPT per policy. Returns the reported pages;
    /// the oracle's set of the slot is emptied.
    pub fn harvest(&mut self, s: usize) -> BTreeSet<u64> {
        self.kick_all();
        let slot = &mut self.slots[s];
        let mut out = vec![0u64; slot.pages.div_ceil(64) as usize];
        let owed = slot
            .log
            .as_ref()
            .expect("logging enabled")
            .harvest(self.p, &mut self.ept, &mut out)
            .expect("harvest");
        assert!(
            owed.is_owed() && self.ept.needs_invept(),
            "harvest must return the INVEPT it owes"
        );
        slot.written.clear();
        let set = Self::bits_to_set(&out, slot.pages);
        self.flush_tlbs(owed);
        set
    }

    /// KVM_CLEAR_DIRTY_LOG of `[first, first+num)` with `mask`, then INVEPT per policy. On
    /// success the oracle forgets the cleared pages.
    pub fn clear(&mut self, s: usize, first: u64, num: u64, mask: &[u64]) -> Result<(), Error> {
        self.kick_all();
        let slot = &mut self.slots[s];
        let owed = slot.log.as_ref().expect("logging enabled").clear(
            self.p,
            &mut self.ept,
            first,
            num,
            mask,
        )?;
        for i in 0..num {
            if mask[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                slot.written.remove(&(first + i));
            }
        }
        self.flush_tlbs(owed);
        Ok(())
    }

    /// Stops logging, frees the logs, the PML buffers and the EPT, and INVEPTs everywhere.
    pub fn destroy(mut self) {
        self.kick_all();
        for slot in &mut self.slots {
            if let Some(mut log) = slot.log.take() {
                log.disable(self.p, &mut self.ept);
                log.free(self.p);
            }
        }
        for b in self.pml_buffers.drain(..) {
            self.p.free_page(b);
        }
        for c in &mut self.cpus {
            c.invept();
        }
        self.ept.destroy(self.p);
    }
}
