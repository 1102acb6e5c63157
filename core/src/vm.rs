//! A VM: memory slots backed lazily, its EPT, the dirty logs, page accounting, and the exit
//! handler (safe Rust, so it runs in host tests; the hardware loop is in `vmx::hw`).

use core::sync::atomic::Ordering::Relaxed;

use crate::arch::GuestGprs;
use crate::dirty::{self, DirtyLog, Mode};
use crate::ept::{bits, Ept, EptFeatures, Invept, MemoryType, Perms, PAGE_SIZE, SW_WRITABLE};
use crate::error::Error;
use crate::guest::{Elf, ElfError, Layout};
use crate::platform::{self, AllocError, Platform};

/// Memory slots per VM.
pub const MAX_SLOTS: usize = 8;
/// Console bytes buffered before the run returns to user space.
pub const CONSOLE_BUF: usize = 256;
/// The guest console port (COM1 data register).
pub const CONSOLE_PORT: u16 = 0x3f8;

/// One guest-physical memory slot.
#[derive(Debug)]
pub struct Slot {
    /// First GPA.
    pub base: u64,
    /// Pages.
    pub pages: u64,
    /// Its dirty log.
    pub log: DirtyLog,
    /// Where its pages come from.
    pub backing: Backing,
    /// KVM's slot id when its dirty pages go to the vCPUs' dirty rings instead of its log.
    pub ring_id: Option<u32>,
}

/// Where a slot's pages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// The driver's own zeroed pages, allocated at the first access (smudge's ABI).
    Own,
    /// The caller's memory from `uaddr`, pinned and mapped when the slot is made (KVM's
    /// user-memory slots): host and guest see each other's writes.
    User {
        /// The caller's address of the first page.
        uaddr: u64,
    },
}

impl Slot {
    /// Logs a guest write of `gpa`: in the slot's log, or in `ring` for a ring slot (a ring
    /// slot without a ring to push to logs nothing: only logged slots have a ring id).
    fn log_write<P: Platform + ?Sized>(
        &self,
        p: &P,
        gpa: u64,
        ring: Option<&mut crate::kvm::ring::Ring>,
    ) {
        match (self.ring_id, ring) {
            (Some(id), Some(r)) => {
                r.push(p, id, (gpa - self.base) / PAGE_SIZE);
            }
            (Some(_), None) => {}
            (None, _) => {
                self.log.mark(p, gpa);
            }
        }
    }

    /// One past the last GPA.
    pub fn end(&self) -> u64 {
        self.base + self.pages * PAGE_SIZE
    }
}

/// A VM.
#[derive(Debug)]
pub struct Vm {
    ept: Ept,
    slots: [Option<Slot>; MAX_SLOTS],
    mode: Mode,
    backing: u64,
    /// User pages pinned for user-memory slots.
    pinned: u64,
    page_limit: u64,
    layout: Option<Layout>,
    entry: u64,
    started: bool,
}

impl From<AllocError> for Fault {
    fn from(e: AllocError) -> Fault {
        match e {
            AllocError::OutOfMemory => Fault::OutOfMemory,
            AllocError::HostPageCap => Fault::HostPageCap,
        }
    }
}

/// Why a guest-physical access could not be resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Backed or unprotected: resume the guest.
    Resolved,
    /// Outside every slot: an MMIO access for user space.
    Mmio {
        /// The address.
        gpa: u64,
        /// A write.
        write: bool,
    },
    /// The per-VM page limit is reached.
    LimitReached,
    /// The platform could not supply a page.
    OutOfMemory,
    /// The driver-wide page cap is reached.
    HostPageCap,
    /// A violation on a present page that smudge did not protect (a bug).
    Unexpected,
}

/// The EPT-violation exit qualification bits (SDM 28.2.1, Table 28-7).
pub mod qual {
    /// Data read.
    pub const READ: u64 = 1 << 0;
    /// Data write.
    pub const WRITE: u64 = 1 << 1;
    /// Instruction fetch.
    pub const FETCH: u64 = 1 << 2;
}

impl Vm {
    /// A VM with no memory, tracking dirty pages with `mode`, holding at most `page_limit`
    /// backing pages.
    pub fn new<P: Platform + ?Sized>(
        p: &P,
        features: EptFeatures,
        mode: Mode,
        page_limit: u64,
    ) -> Result<Vm, Error> {
        if matches!(mode, Mode::AdScan | Mode::Pml) && !features.ad {
            return Err(Error::Unsupported);
        }
        let ept = Ept::new(p, features)?;
        Ok(Vm {
            ept,
            slots: Default::default(),
            mode,
            backing: 0,
            pinned: 0,
            page_limit,
            layout: None,
            entry: 0,
            started: false,
        })
    }

    /// The EPT.
    pub fn ept(&self) -> &Ept {
        &self.ept
    }

    /// The EPT, mutably (INVEPT bookkeeping).
    pub fn ept_mut(&mut self) -> &mut Ept {
        &mut self.ept
    }

    /// The dirty-tracking mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The entry point of the last image loaded (0 before).
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// Records that a vCPU is about to enter the guest for the first time: from now on the
    /// VMCS of every vCPU depends on the mode, which [`Vm::set_mode`] then refuses to change.
    pub fn mark_started(&mut self) {
        self.started = true;
    }

    /// Changes the dirty-tracking mode before any vCPU has run. Every slot gets a fresh, empty
    /// log in the new mode (write-protect gives W back first; the new mode cleans the slot and
    /// returns the INVEPT it owes). On failure nothing changed.
    pub fn set_mode<P: Platform + ?Sized>(&mut self, p: &P, mode: Mode) -> Result<Invept, Error> {
        if self.started {
            return Err(Error::AlreadyRunning);
        }
        if matches!(mode, Mode::AdScan | Mode::Pml) && !self.ept.features().ad {
            return Err(Error::Unsupported);
        }
        // Every fallible step first: 4 KiB leaves (already so since each slot's log was
        // enabled; splitting again changes nothing) and the new logs' bitmaps.
        let mut fresh: [Option<DirtyLog>; MAX_SLOTS] = Default::default();
        let mut owed = Invept::NONE;
        for (new, slot) in fresh.iter_mut().zip(self.slots.iter()) {
            if let Some(s) = slot {
                let made = self
                    .ept
                    .split_range(p, s.base, s.pages * PAGE_SIZE)
                    .and_then(|split| {
                        owed.add(split);
                        DirtyLog::new(p, mode, s.base, s.pages)
                    });
                match made {
                    Ok(log) => *new = Some(log),
                    Err(e) => {
                        fresh.into_iter().flatten().for_each(|l| l.free(p));
                        return Err(e);
                    }
                }
            }
        }
        // Then the swap. Enabling cleans the slot in the new mode (D and the upper A cleared, or
        // W removed), which owes INVEPT; with the slot split it cannot fail.
        let mut result = Ok(());
        for (new, slot) in fresh.iter_mut().zip(self.slots.iter_mut()) {
            if let (Some(log), Some(s)) = (new.take(), slot.as_mut()) {
                s.log.disable(p, &mut self.ept);
                core::mem::replace(&mut s.log, log).free(p);
                match s.log.enable(p, &mut self.ept) {
                    Ok(o) => owed = owed.and(o),
                    Err(e) => result = Err(e),
                }
            }
        }
        self.mode = mode;
        // A failure leaves the obligation to the caller's failure path (`Ept::owed`).
        result.map(|()| owed)
    }

    /// The guest RAM layout, once RAM was added with [`Vm::add_ram`].
    pub fn layout(&self) -> Option<Layout> {
        self.layout
    }

    /// Pages held: backing pages, EPT tables (incl. those waiting for INVEPT), dirty bitmaps.
    pub fn pages_held(&self) -> u64 {
        let logs: usize = self
            .slots
            .iter()
            .flatten()
            .map(|s| s.log.pages_held())
            .sum();
        self.backing + (self.ept.tables_in_use() + self.ept.tables_pending_free() + logs) as u64
    }

    /// Backing pages of guest memory.
    pub fn backing_pages(&self) -> u64 {
        self.backing
    }

    /// The slots.
    pub fn slots(&self) -> impl Iterator<Item = (usize, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    /// Adds a slot `[base, base+size)`; returns its index.
    pub fn add_slot<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        base: u64,
        size: u64,
    ) -> Result<usize, Error> {
        self.new_slot(p, base, size, Backing::Own)
    }

    /// Adds a slot `[base, base+size)` backed by the caller's memory at `uaddr`: every page is
    /// pinned and mapped now (4 KiB leaves), then cleaned for dirty logging. On failure nothing
    /// stays pinned or mapped (the caller's failure path pays `Ept::owed`). Returns the slot's
    /// index and the INVEPT the cleaning owes.
    pub fn add_user_slot<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        base: u64,
        size: u64,
        uaddr: u64,
        logging: bool,
    ) -> Result<(usize, Invept), Error> {
        if !uaddr.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned);
        }
        let idx = self.new_slot(p, base, size, Backing::User { uaddr })?;
        let (ept, pinned) = (&mut self.ept, &mut self.pinned);
        let mut failed = None;
        let pinning = platform::pin_user_range(p, uaddr, size / PAGE_SIZE, &mut |i, hpa| {
            let r = if failed.is_some() {
                Err(Error::OutOfMemory)
            } else {
                ept.map(
                    p,
                    base + i * PAGE_SIZE,
                    hpa,
                    PAGE_SIZE,
                    Perms::RWX,
                    MemoryType::WriteBack,
                    false,
                )
            };
            match r {
                Ok(()) => *pinned += 1,
                Err(e) => {
                    p.unpin_user_page(hpa);
                    failed.get_or_insert(e);
                }
            }
        });
        let result = match (pinning, failed) {
            (_, Some(e)) => Err(e),
            (Err(platform::PinError::OutOfMemory), None) => Err(Error::OutOfMemory),
            (Err(platform::PinError::Unsupported), None) => Err(Error::Unsupported),
            (Err(platform::PinError::Fault), None) => Err(Error::UserMemory),
            (Ok(()), None) if logging => self.clean_slot(p, idx),
            (Ok(()), None) => Ok(Invept::NONE),
        };
        match result {
            Ok(owed) => Ok((idx, owed)),
            Err(e) => {
                drop(self.remove_slot(p, idx));
                Err(e)
            }
        }
    }

    /// Starts (`on`) or stops dirty logging of slot `idx` (KVM_MEM_LOG_DIRTY_PAGES changing):
    /// on, a fresh log in the VM's mode cleans the slot (D cleared, or W removed); off,
    /// write-protect gives W back. Returns the INVEPT it owes.
    pub fn set_slot_logging<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        idx: usize,
        on: bool,
    ) -> Result<Invept, Error> {
        let mode = self.mode;
        let s = self
            .slots
            .get_mut(idx)
            .and_then(|s| s.as_mut())
            .ok_or(Error::NotMapped)?;
        if on {
            let fresh = DirtyLog::new(p, mode, s.base, s.pages)?;
            core::mem::replace(&mut s.log, fresh).free(p);
            s.log.enable(p, &mut self.ept)
        } else {
            s.log.disable(p, &mut self.ept);
            Ok(Invept::NONE)
        }
    }

    /// Re-cleans slot `idx` for its dirty log (D cleared, or W removed) after its pages were
    /// mapped.
    fn clean_slot<P: Platform + ?Sized>(&mut self, p: &P, idx: usize) -> Result<Invept, Error> {
        let s = self
            .slots
            .get_mut(idx)
            .and_then(|s| s.as_mut())
            .ok_or(Error::NotMapped)?;
        s.log.enable(p, &mut self.ept)
    }

    /// User pages pinned for this VM's user-memory slots (the process's memory, not the
    /// driver's).
    pub fn pinned_pages(&self) -> u64 {
        self.pinned
    }

    fn new_slot<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        base: u64,
        size: u64,
        backing: Backing,
    ) -> Result<usize, Error> {
        if !base.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Misaligned);
        }
        let end = base.checked_add(size).ok_or(Error::EmptyOrWrappingRange)?;
        if size == 0 {
            return Err(Error::EmptyOrWrappingRange);
        }
        if end > crate::ept::GPA_LIMIT {
            return Err(Error::GpaOutOfRange);
        }
        if self
            .slots
            .iter()
            .flatten()
            .any(|s| base < s.end() && s.base < end)
        {
            return Err(Error::Overlap);
        }
        let idx = self
            .slots
            .iter()
            .position(|s| s.is_none())
            .ok_or(Error::NoFreeSlot)?;
        // The range maps nothing yet (no slot overlaps it, and a removed slot is unmapped), so
        // the log starts clean: pages are mapped later under its rules.
        let log = DirtyLog::new(p, self.mode, base, size / PAGE_SIZE)?;
        self.slots[idx] = Some(Slot {
            base,
            pages: size / PAGE_SIZE,
            log,
            backing,
            ring_id: None,
        });
        Ok(idx)
    }

    /// Adds guest RAM at GPA 0 and writes the reserved region (page tables, GDT, TSS).
    pub fn add_ram<P: Platform + ?Sized>(&mut self, p: &P, size: u64) -> Result<Layout, Error> {
        if self.layout.is_some() {
            return Err(Error::Overlap);
        }
        let layout = Layout::new(size)?;
        let idx = self.add_slot(p, 0, size)?;
        let res = layout.for_each_system_qword(|gpa, v| self.write_guest(p, gpa, &v.to_le_bytes()));
        if let Err(e) = res {
            // The caller's failure path pays `Ept::owed`.
            drop(self.remove_slot(p, idx));
            return Err(e);
        }
        self.layout = Some(layout);
        Ok(layout)
    }

    fn slot_of(&self, gpa: u64) -> Option<&Slot> {
        self.slots
            .iter()
            .flatten()
            .find(|s| gpa >= s.base && gpa < s.end())
    }

    /// Removes slot `idx`, freeing its backing pages. No vCPU of this VM may be in guest mode,
    /// and the caller pays the returned INVEPT before any vCPU enters again, so no stale
    /// translation can reach a freed page.
    pub fn remove_slot<P: Platform + ?Sized>(&mut self, p: &P, idx: usize) -> Invept {
        let Some(slot) = self.slots.get_mut(idx).and_then(|s| s.take()) else {
            return Invept::NONE;
        };
        let mut freed = 0;
        let user = matches!(slot.backing, Backing::User { .. });
        // No vCPU is in guest mode, and none enters before the caller's INVEPT.
        self.ept
            .for_each_leaf(p, slot.base, slot.end(), &mut |_, _, w| {
                let hpa = w.load(Relaxed) & bits::ADDR;
                if user {
                    p.unpin_user_page(hpa);
                } else {
                    p.free_page(hpa);
                }
                freed += 1;
            });
        // A VM maps only 4 KiB leaves, so no edge splits and this cannot fail; if it did, the EPT still records what it owes (`Ept::owed`).
        let owed = self
            .ept
            .unmap(p, slot.base, slot.pages * PAGE_SIZE)
            .unwrap_or(Invept::NONE);
        if user {
            self.pinned -= freed;
        } else {
            self.backing -= freed;
        }
        let (base, end) = (slot.base, slot.end());
        slot.log.free(p);
        if self.layout.is_some_and(|l| base == 0 && end == l.mem_size) {
            self.layout = None;
        }
        owed
    }

    /// Backs the page of `gpa` with a fresh zeroed page. `write` says whether a guest write
    /// caused it (write-protect mode logs it and maps W; otherwise W waits for the first write).
    fn back_page<P: Platform + ?Sized>(&mut self, p: &P, gpa: u64, guest_write: bool) -> Fault {
        if self.backing >= self.page_limit {
            return Fault::LimitReached;
        }
        let hpa = match p.alloc_page() {
            Ok(hpa) => hpa,
            Err(e) => return Fault::from(e),
        };
        let page = gpa & !(PAGE_SIZE - 1);
        // Write-protect logging maps a page it backs for a read or a fetch without W from the
        // start: the other vCPUs run meanwhile and must not cache a writable translation.
        let protect = self.mode == Mode::WriteProtect && !guest_write;
        let perms = if protect { Perms::RX } else { Perms::RWX };
        match self
            .ept
            .map(p, page, hpa, PAGE_SIZE, perms, MemoryType::WriteBack, false)
        {
            Ok(()) => {}
            Err(Error::OutOfMemory) => {
                p.free_page(hpa);
                return Fault::OutOfMemory;
            }
            Err(Error::HostPageCap) => {
                p.free_page(hpa);
                return Fault::HostPageCap;
            }
            Err(_) => {
                p.free_page(hpa);
                return Fault::Unexpected;
            }
        }
        self.backing += 1;
        if self.mode == Mode::WriteProtect {
            if let Some((w, _)) = self.ept.leaf(p, page) {
                if protect {
                    // Writable for the log: its first write faults and gives W back. (A bit the
                    // processor ignores, SDM 29.3.2.)
                    w.fetch_or(SW_WRITABLE, Relaxed);
                } else if let Some(s) = self.slot_of(page) {
                    s.log.mark(p, page);
                }
            }
        }
        Fault::Resolved
    }

    /// Handles an EPT violation at `gpa` with exit qualification `qualification`.
    pub fn on_ept_violation<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        qualification: u64,
    ) -> Fault {
        self.on_ept_violation_into(p, gpa, qualification, None)
    }

    /// [`Vm::on_ept_violation`], a write-protect fault of a ring slot logged in `ring`.
    pub fn on_ept_violation_into<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        qualification: u64,
        ring: Option<&mut crate::kvm::ring::Ring>,
    ) -> Fault {
        let write = qualification & qual::WRITE != 0;
        let Some(slot) = self.slot_of(gpa) else {
            return Fault::Mmio { gpa, write };
        };
        let user = matches!(slot.backing, Backing::User { .. });
        if let Some(t) = self.ept.translate(p, gpa) {
            if write && slot.log.unprotect(p, &self.ept, gpa) {
                slot.log_write(p, gpa, ring);
                return Fault::Resolved;
            }
            // Another CPU may have resolved this fault (backed the page, or given W back) after
            // this CPU's stale translation faulted; the violation itself dropped that translation
            // (SDM 29.4.3.1), so the retried access sees the new entry.
            let needed = qualification & (qual::READ | qual::WRITE | qual::FETCH);
            if needed & !u64::from(t.perms.0) == 0 {
                return Fault::Resolved;
            }
            return Fault::Unexpected;
        }
        if user {
            // Every page of a user-memory slot is mapped when the slot is made.
            return Fault::Unexpected;
        }
        self.back_page(p, gpa, write)
    }

    /// Writes `data` into guest memory at `gpa`, backing pages as needed. These writes are
    /// smudge's own: they go through the host mapping and never set an EPT dirty flag.
    pub fn write_guest<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        data: &[u8],
    ) -> Result<(), Error> {
        self.check_guest_range(gpa, data.len() as u64)?;
        let mut done = 0usize;
        while done < data.len() {
            let g = gpa + done as u64;
            let off = (g % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(data.len() - done);
            let hpa = self.backing_hpa(p, g)?;
            platform::write_bytes(p, hpa, off, &data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Zeroes `[gpa, gpa+len)` in the pages that are backed; unbacked pages read as zero anyway.
    fn zero_backed<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        gpa: u64,
        len: u64,
    ) -> Result<(), Error> {
        self.check_guest_range(gpa, len)?;
        let zeros = [0u8; 512];
        let mut g = gpa;
        let end = gpa + len;
        while g < end {
            let off = (g % PAGE_SIZE) as usize;
            let n = ((PAGE_SIZE - off as u64).min(end - g)) as usize;
            if let Some(t) = self.ept.translate(p, g) {
                let hpa = t.hpa & !(PAGE_SIZE - 1);
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(zeros.len());
                    platform::write_bytes(p, hpa, off + done, &zeros[..k]);
                    done += k;
                }
            }
            g += n as u64;
        }
        Ok(())
    }

    /// The guest's own page-directory entry for `gpa` (its tables map the first 4 GiB with
    /// 2 MiB pages), as the guest sees it now, A/D included; `None` above 4 GiB.
    pub fn guest_pde<P: Platform + ?Sized>(&self, p: &P, gpa: u64) -> Result<Option<u64>, Error> {
        let layout = self.layout.ok_or(Error::NotMapped)?;
        if gpa >= 4 << 30 {
            return Ok(None);
        }
        let mut b = [0u8; 8];
        self.read_guest(
            p,
            layout.reserved_base() + crate::guest::PD_OFF + (gpa >> 21) * 8,
            &mut b,
        )?;
        Ok(Some(u64::from_le_bytes(b)))
    }

    /// Reads guest memory at `gpa` into `out`; unbacked pages read as zero.
    pub fn read_guest<P: Platform + ?Sized>(
        &self,
        p: &P,
        gpa: u64,
        out: &mut [u8],
    ) -> Result<(), Error> {
        self.check_guest_range(gpa, out.len() as u64)?;
        let mut done = 0usize;
        while done < out.len() {
            let g = gpa + done as u64;
            let off = (g % PAGE_SIZE) as usize;
            let n = (PAGE_SIZE as usize - off).min(out.len() - done);
            match self.ept.translate(p, g) {
                Some(t) => {
                    platform::read_bytes(p, t.hpa & !(PAGE_SIZE - 1), off, &mut out[done..done + n])
                }
                None => out[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn check_guest_range(&self, gpa: u64, len: u64) -> Result<(), Error> {
        let end = gpa.checked_add(len).ok_or(Error::EmptyOrWrappingRange)?;
        if len == 0 {
            return Ok(());
        }
        match self.slot_of(gpa) {
            Some(s) if end <= s.end() => Ok(()),
            _ => Err(Error::GpaOutOfRange),
        }
    }

    fn backing_hpa<P: Platform + ?Sized>(&mut self, p: &P, gpa: u64) -> Result<u64, Error> {
        if let Some(t) = self.ept.translate(p, gpa) {
            return Ok(t.hpa & !(PAGE_SIZE - 1));
        }
        match self.back_page(p, gpa, false) {
            Fault::Resolved => {}
            Fault::LimitReached | Fault::OutOfMemory => return Err(Error::OutOfMemory),
            Fault::HostPageCap => return Err(Error::HostPageCap),
            _ => return Err(Error::GpaOutOfRange),
        }
        self.ept
            .translate(p, gpa)
            .map(|t| t.hpa & !(PAGE_SIZE - 1))
            .ok_or(Error::NotMapped)
    }

    /// Loads a static ELF64 image into guest RAM; returns its entry point.
    pub fn load_elf<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        image: &[u8],
    ) -> Result<u64, LoadError> {
        let layout = self.layout.ok_or(LoadError::Vm(Error::NotMapped))?;
        let elf = Elf::parse(image, &layout).map_err(LoadError::Elf)?;
        let mut res = Ok(());
        elf.for_each_load(|s| {
            if res.is_ok() {
                res = self.write_guest(p, s.paddr, elf.segment_bytes(&s));
            }
            if res.is_ok() {
                // Bytes past p_filesz must read as zero: fresh pages already do; pages written
                // before (WRITE_GUEST, an earlier image) are cleared. Unbacked pages stay unbacked.
                res = self.zero_backed(p, s.paddr + s.filesz, s.memsz - s.filesz);
            }
        })
        .map_err(LoadError::Elf)?;
        res.map_err(LoadError::Vm)?;
        self.entry = elf.entry;
        Ok(elf.entry)
    }

    /// Marks every GPA logged in a PML buffer (`index` = the guest PML index) in its slot's
    /// log; returns how many entries there were.
    pub fn pml_drain<P: Platform + ?Sized>(&self, p: &P, buffer: u64, index: u16) -> usize {
        self.pml_drain_into(p, buffer, index, None)
    }

    /// [`Vm::pml_drain`], with the pages of ring slots pushed into `ring` (a KVM vCPU's dirty
    /// ring) when there is one.
    pub fn pml_drain_into<P: Platform + ?Sized>(
        &self,
        p: &P,
        buffer: u64,
        index: u16,
        mut ring: Option<&mut crate::kvm::ring::Ring>,
    ) -> usize {
        dirty::pml::drain(p, buffer, index, |gpa| {
            if let Some(s) = self.slot_of(gpa) {
                s.log_write(p, gpa, ring.as_deref_mut());
            }
        })
    }

    /// Sends slot `idx`'s dirty pages to the vCPUs' dirty rings under KVM slot id `id` (None:
    /// to its log).
    pub fn set_ring_id(&mut self, idx: usize, id: Option<u32>) {
        if let Some(Some(s)) = self.slots.get_mut(idx) {
            s.ring_id = id;
        }
    }

    /// KVM_RESET_DIRTY_RINGS for a batch of entries (KVM slot id, page offset), at most
    /// [`dirty::REARM_BATCH`]: re-arms each page of the slot whose ring id matches; true if an
    /// entry changed, the INVEPT that owes. `cache` serves one reset.
    pub fn rearm_ring_pages<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        batch: &[(u32, u64)],
        cache: &mut crate::ept::TableCache,
    ) -> Invept {
        let mut last: Option<&Slot> = None;
        let changed = dirty::rearm_batch(batch.len(), |i| {
            let (id, offset) = *batch.get(i)?;
            let s = match last {
                Some(s) if s.ring_id == Some(id) => s,
                _ => self
                    .slots
                    .iter()
                    .flatten()
                    .find(|s| s.ring_id == Some(id))?,
            };
            last = Some(s);
            if offset >= s.pages {
                return None;
            }
            let w = s
                .log
                .leaf(p, &self.ept, s.base + offset * PAGE_SIZE, cache)?;
            Some((&s.log, w))
        });
        if changed {
            self.ept.owe()
        } else {
            Invept::NONE
        }
    }

    /// `KVM_GET_DIRTY_LOG` for slot `idx`.
    pub fn get_dirty_log<P: Platform + ?Sized>(
        &self,
        p: &P,
        idx: usize,
        out: &mut [u64],
    ) -> Result<(), Error> {
        let s = self
            .slots
            .get(idx)
            .and_then(|s| s.as_ref())
            .ok_or(Error::NotMapped)?;
        s.log.get(p, &self.ept, out)
    }

    /// `KVM_CLEAR_DIRTY_LOG` for slot `idx`; returns the INVEPT it owes.
    pub fn clear_dirty_log<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        idx: usize,
        first: u64,
        num: u64,
        mask: &[u64],
    ) -> Result<Invept, Error> {
        let s = self
            .slots
            .get(idx)
            .and_then(|s| s.as_ref())
            .ok_or(Error::NotMapped)?;
        s.log.clear(p, &mut self.ept, first, num, mask)
    }

    /// Get and clear slot `idx` in one pass; returns the INVEPT it owes (the pages written from
    /// then on are recorded only once it is paid).
    pub fn harvest<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        idx: usize,
        out: &mut [u64],
    ) -> Result<Invept, Error> {
        let s = self
            .slots
            .get(idx)
            .and_then(|s| s.as_ref())
            .ok_or(Error::NotMapped)?;
        s.log.harvest(p, &mut self.ept, out)
    }

    /// Frees everything. The caller executed INVEPT (all-context) after the last VM exit.
    pub fn destroy<P: Platform + ?Sized>(mut self, p: &P) {
        for i in 0..MAX_SLOTS {
            // Paid already: the precondition's INVEPT came after the last VM exit.
            drop(self.remove_slot(p, i));
        }
        self.ept.destroy(p);
    }
}

/// Loading an image failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The image is malformed.
    Elf(ElfError),
    /// Guest memory could not take it.
    Vm(Error),
}

/// VM-exit basic reasons smudge handles (SDM Appendix C).
pub mod reason {
    /// Exception or NMI.
    pub const EXCEPTION_NMI: u32 = 0;
    /// External interrupt.
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    /// Triple fault.
    pub const TRIPLE_FAULT: u32 = 2;
    /// CPUID.
    pub const CPUID: u32 = 10;
    /// Control-register access.
    pub const CR_ACCESS: u32 = 28;
    /// MOV DR (with "MOV-DR exiting").
    pub const DR_ACCESS: u32 = 29;
    /// HLT.
    pub const HLT: u32 = 12;
    /// VMCALL.
    pub const VMCALL: u32 = 18;
    /// I/O instruction.
    pub const IO: u32 = 30;
    /// RDMSR.
    pub const RDMSR: u32 = 31;
    /// WRMSR.
    pub const WRMSR: u32 = 32;
    /// VM-entry failure due to invalid guest state.
    pub const INVALID_GUEST_STATE: u32 = 33;
    /// VM-entry failure due to MSR loading.
    pub const MSR_LOADING: u32 = 34;
    /// EPT violation.
    pub const EPT_VIOLATION: u32 = 48;
    /// EPT misconfiguration.
    pub const EPT_MISCONFIG: u32 = 49;
    /// VMX-preemption timer expired.
    pub const PREEMPTION_TIMER: u32 = 52;
    /// WBINVD or WBNOINVD (with "WBINVD exiting").
    pub const WBINVD: u32 = 54;
    /// XSETBV.
    pub const XSETBV: u32 = 55;
    /// Page-modification log full.
    pub const PML_FULL: u32 = 62;
    /// Number of counters kept.
    pub const COUNT: usize = 70;

    /// snake_case name of a basic exit reason, for statistics and JSON.
    pub const fn name(r: u32) -> &'static str {
        match r {
            0 => "exception_nmi",
            1 => "external_interrupt",
            2 => "triple_fault",
            7 => "interrupt_window",
            9 => "task_switch",
            10 => "cpuid",
            12 => "hlt",
            13 => "invd",
            14 => "invlpg",
            16 => "rdtsc",
            18 => "vmcall",
            19..=27 => "vmx_instruction",
            28 => "cr_access",
            29 => "dr_access",
            30 => "io",
            31 => "rdmsr",
            32 => "wrmsr",
            33 => "invalid_guest_state",
            34 => "msr_loading",
            36 => "mwait",
            39 => "monitor",
            40 => "pause",
            48 => "ept_violation",
            49 => "ept_misconfig",
            50 => "invept",
            52 => "preemption_timer",
            53 => "invvpid",
            54 => "wbinvd",
            55 => "xsetbv",
            62 => "pml_full",
            _ => "other",
        }
    }
}

/// What a VM exit reported (read from the VMCS by the hardware layer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit reason (0x4402), bit 31 = VM-entry failure.
    pub reason: u32,
    /// Exit qualification (0x6400).
    pub qualification: u64,
    /// Guest-physical address (0x2400).
    pub gpa: u64,
    /// VM-exit instruction length (0x440C).
    pub instr_len: u64,
}

/// Why a run returned to user space (the ABI's exit record kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// Every vCPU stopped with HLT.
    Hlt,
    /// Hypercall 0: exit the VM with this code.
    ExitCode(u64),
    /// Hypercall 1: the guest asks for a checkpoint; resume it after harvesting.
    Checkpoint,
    /// The console buffer is full.
    Console,
    /// Access outside every slot.
    Mmio {
        /// Address.
        gpa: u64,
        /// A write.
        write: bool,
    },
    /// The guest triple-faulted.
    TripleFault,
    /// A KVM vCPU's dirty ring reached its soft limit: user space must collect and reset it.
    RingFull,
    /// Port I/O of a KVM vCPU, for user space (RIP is past the instruction; a read completes
    /// at the next run, [`KvmExits::pending_in`]).
    Io {
        /// The port.
        port: u16,
        /// Bytes: 1, 2 or 4.
        size: u8,
        /// OUT (true) or IN.
        write: bool,
        /// The value written (OUT).
        data: u32,
    },
    /// The run was interrupted (a signal, or the time budget): run again to continue.
    Interrupted,
    /// An exit smudge does not handle, or a resource failure; the vCPU stopped.
    Stopped {
        /// Basic exit reason (or a `Fault` code).
        reason: u32,
        /// What happened.
        what: StopCause,
    },
}

/// Why a vCPU stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// An exit reason smudge does not handle.
    UnhandledExit,
    /// The guest executed a VMX instruction.
    VmxInstruction,
    /// EPT misconfiguration: a bug in smudge's tables.
    EptMisconfig,
    /// Per-VM page limit reached.
    PageLimit,
    /// Host allocation failed.
    OutOfMemory,
    /// The driver-wide page cap is reached.
    HostPageCap,
    /// An EPT violation smudge cannot explain.
    UnexpectedViolation,
    /// VM entry failed (the message comes from the entry checker).
    EntryFailed,
    /// The guest tried to change a CR4 bit the host owns (OSXSAVE).
    HostOwnedCr4,
}

/// What the hardware loop does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Resume the guest, advancing RIP by `advance` bytes.
    Resume {
        /// Instruction length to skip.
        advance: u64,
    },
    /// Return to the host loop (interrupts, preemption timer), then resume.
    Yield,
    /// Return to user space.
    ToUser(RunExit),
}

/// Per-vCPU state the exit handler keeps.
#[derive(Debug)]
pub struct VcpuState {
    /// vCPU index.
    pub index: u32,
    /// Console bytes not yet handed to user space.
    pub console: [u8; CONSOLE_BUF],
    /// Valid bytes in `console`.
    pub console_len: usize,
    /// Exits per basic reason.
    pub exits: [u64; reason::COUNT],
    /// The vCPU stopped (HLT, triple fault, error).
    pub halted: bool,
    /// Set after a checkpoint exit: the guest resumes with RAX = 0.
    pub checkpoint_pending: bool,
    /// The guest's private CR8 (task priority).
    pub cr8: u64,
    /// The guest's debug registers DR0-DR3, DR6 and DR7 (indices 0-3, 6, 7; 4 and 5 alias 6
    /// and 7, SDM 18.2.2), kept here by the MOV-DR exit handler: they never reach the
    /// processor, so a guest can neither read nor change the host's, and its own breakpoints
    /// stay disarmed (the VMCS guest DR7 stays 0x400).
    pub dr: [u64; 8],
    /// What the run loop did for the host around this vCPU's entries.
    pub isolation: crate::abi::Isolation,
    /// A vCPU of KVM's user API (its exits go to user space as KVM's do), or None for
    /// smudge's guest ABI (hypercalls, console).
    pub kvm: Option<KvmExits>,
}

/// The exit state of a KVM vCPU.
#[derive(Clone, Copy, Debug, Default)]
pub struct KvmExits {
    /// Its KVM vCPU id (KVM_CREATE_VCPU's argument).
    pub id: u32,
    /// Host-physical address of its `struct kvm_run` page (mapped by user space).
    pub run_page: u64,
    /// The signal mask KVM_RUN runs with (KVM_SET_SIGNAL_MASK), if set.
    pub sigmask: Option<u64>,
    /// KVM_RUN entered the guest once: the CPUID may no longer change.
    pub ran: bool,
    /// Its dirty ring, when the VM logs into rings.
    pub ring: Option<crate::kvm::ring::Ring>,
    /// Its CPUID (KVM_SET_CPUID2).
    pub cpuid: crate::kvm::cpuid::Table,
    /// A port read (its size in bytes) that user space completes: the next run loads the data
    /// into RAX before the guest resumes (KVM's `complete_fast_pio_in`).
    pub pending_in: Option<u8>,
}

/// What KVM's VMCALL answers without a hypercall interface: -KVM_ENOSYS in RAX.
pub const KVM_ENOSYS: u64 = (-1000i64) as u64;

/// General-purpose register `n` in the SDM's encoding (0 = RAX ... 15 = R15). RSP (4) lives in
/// the VMCS, so it is not available here.
fn gpr(g: &GuestGprs, n: usize) -> Option<u64> {
    let mut c = *g;
    gpr_mut(&mut c, n).map(|r| *r)
}

fn gpr_mut(g: &mut GuestGprs, n: usize) -> Option<&mut u64> {
    Some(match n {
        0 => &mut g.rax,
        1 => &mut g.rcx,
        2 => &mut g.rdx,
        3 => &mut g.rbx,
        5 => &mut g.rbp,
        6 => &mut g.rsi,
        7 => &mut g.rdi,
        8 => &mut g.r8,
        9 => &mut g.r9,
        10 => &mut g.r10,
        11 => &mut g.r11,
        12 => &mut g.r12,
        13 => &mut g.r13,
        14 => &mut g.r14,
        15 => &mut g.r15,
        _ => return None,
    })
}

impl VcpuState {
    /// A fresh vCPU state.
    pub fn new(index: u32) -> VcpuState {
        VcpuState {
            index,
            console: [0; CONSOLE_BUF],
            console_len: 0,
            exits: [0; reason::COUNT],
            halted: false,
            checkpoint_pending: false,
            cr8: 0,
            // SDM 18.2.4, 18.2.6: DR6 and DR7 power up as 0xFFFF0FF0 and 0x400.
            dr: [0, 0, 0, 0, 0, 0, 0xFFFF_0FF0, 0x400],
            isolation: crate::abi::Isolation::default(),
            kvm: None,
        }
    }
}

/// CPUID.1:ECX features the guest does not see: VMX (5); FMA (12), XSAVE (26), OSXSAVE (27),
/// AVX (28) and F16C (29), which need extended state beyond x87/SSE.
const LEAF1_ECX_HIDDEN: u32 = (1 << 5) | (1 << 12) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29);
/// CPUID.(7,0):EBX: AVX2 (5), AVX-512 F, DQ, IFMA, PF, ER, CD, BW, VL (16, 17, 21, 26-28, 30, 31).
const LEAF7_EBX_HIDDEN: u32 =
    (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (7 << 26) | (1 << 30) | (1 << 31);
/// CPUID.(7,0):ECX: AVX-512 VBMI (1), VBMI2 (6), VAES (9), VPCLMULQDQ (10), VNNI (11), BITALG
/// (12), VPOPCNTDQ (14).
const LEAF7_ECX_HIDDEN: u32 =
    (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// CPUID.(7,0):EDX: AVX-512 4VNNIW (2), 4FMAPS (3), VP2INTERSECT (8), AMX-BF16 (22),
/// AVX-512 FP16 (23), AMX-TILE (24), AMX-INT8 (25).
const LEAF7_EDX_HIDDEN: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (0xf << 22);
/// CPUID.(7,1):EAX: AVX-VNNI (4), AVX-512 BF16 (5).
const LEAF7_1_EAX_HIDDEN: u32 = (1 << 4) | (1 << 5);

/// CPUID as the guest sees it: the host's, with VMX hidden, the hypervisor bit set (CPUID.1:ECX
/// bit 31), and no extended state beyond x87/SSE: XSAVE, AVX and AVX-512 are hidden and leaf
/// 0xD is empty. smudge switches only the legacy FXSAVE state between guest and host, and keeps
/// CR4.OSXSAVE host-owned (clear for the guest; `vmx::setup`), so a guest can neither use nor
/// change the host's XCR0 and YMM/ZMM state: AVX instructions #UD in it (SDM 14.3), as on a
/// processor without them.
pub fn filter_cpuid(leaf: u32, subleaf: u32, mut r: [u32; 4]) -> [u32; 4] {
    match (leaf, subleaf) {
        (1, _) => {
            r[2] &= !LEAF1_ECX_HIDDEN;
            r[2] |= 1 << 31;
        }
        (7, 0) => {
            r[1] &= !LEAF7_EBX_HIDDEN;
            r[2] &= !LEAF7_ECX_HIDDEN;
            r[3] &= !LEAF7_EDX_HIDDEN;
        }
        (7, 1) => r[0] &= !LEAF7_1_EAX_HIDDEN,
        (0xD, _) => r = [0; 4],
        _ => {}
    }
    r
}

impl Vm {
    /// Handles one VM exit of `vcpu`. `cpuid` answers CPUID for the host processor.
    pub fn handle_exit<P: Platform + ?Sized>(
        &mut self,
        p: &P,
        vcpu: &mut VcpuState,
        exit: &ExitInfo,
        gprs: &mut GuestGprs,
        cpuid: &dyn Fn(u32, u32) -> [u32; 4],
    ) -> Action {
        let basic = exit.reason & 0xffff;
        if let Some(c) = vcpu.exits.get_mut(basic as usize) {
            *c += 1;
        }
        if exit.reason & (1 << 31) != 0 {
            vcpu.halted = true;
            return Action::ToUser(RunExit::Stopped {
                reason: basic,
                what: StopCause::EntryFailed,
            });
        }
        match basic {
            reason::EXTERNAL_INTERRUPT | reason::PREEMPTION_TIMER | reason::PML_FULL => {
                Action::Yield
            }
            // With the exception bitmap empty, reason 0 is an NMI: the hardware layer hands it to
            // the host; the guest resumes.
            reason::EXCEPTION_NMI => Action::Yield,
            reason::CR_ACCESS => {
                // SDM 28.2.1 Table 28-3: CR number in 3:0, access type in 5:4, register in 11:8.
                // Only CR8 exits (CR8-load/store exiting): the guest gets a private TPR so it can
                // never change the host's task priority (on Windows, the IRQL).
                let q = exit.qualification;
                let (cr, kind, reg) = (q & 0xf, (q >> 4) & 3, ((q >> 8) & 0xf) as usize);
                // A MOV to CR4 exits only when it changes a host-owned bit (OSXSAVE, VMXE; SDM
                // 25.6.6). A processor without XSAVE would #GP; smudge injects no exceptions.
                if cr == 4 && kind == 0 {
                    return self.stop(vcpu, basic, StopCause::HostOwnedCr4);
                }
                if cr != 8 || kind > 1 {
                    return self.stop(vcpu, basic, StopCause::UnhandledExit);
                }
                if kind == 0 {
                    vcpu.cr8 = gpr(gprs, reg).map_or(0, |v| v & 0xf);
                } else if let Some(r) = gpr_mut(gprs, reg) {
                    *r = vcpu.cr8;
                }
                Action::Resume {
                    advance: exit.instr_len,
                }
            }
            reason::DR_ACCESS => {
                // SDM 28.2.1 Table 28-4: DR number in 2:0, direction in 4 (0 = MOV to DR, 1 =
                // MOV from DR), register in 11:8. DR4/DR5 alias DR6/DR7 (SDM 18.2.2; with
                // CR4.DE they would #UD, which smudge does not inject).
                let q = exit.qualification;
                let (dr, from_dr, reg) = (
                    (q & 7) as usize,
                    q & (1 << 4) != 0,
                    ((q >> 8) & 0xf) as usize,
                );
                let dr = match dr {
                    4 => 6,
                    5 => 7,
                    n => n,
                };
                let Some(slot) = vcpu.dr.get_mut(dr) else {
                    return self.stop(vcpu, basic, StopCause::UnhandledExit);
                };
                if from_dr {
                    match gpr_mut(gprs, reg) {
                        Some(r) => *r = *slot,
                        None => return self.stop(vcpu, basic, StopCause::UnhandledExit),
                    }
                } else {
                    match gpr(gprs, reg) {
                        // DR6 and DR7 keep their fixed bits (SDM 18.2.4: DR6 bits 4-11 and 16-31
                        // read 1; 18.2.6: DR7 bit 10 reads 1, bits 11, 12, 14, 15 read 0); their
                        // bits 63:32 must be 0 (a processor raises #GP): kept clear here.
                        Some(v) => {
                            *slot = match dr {
                                6 => (v | 0xFFFF_0FF0) & 0xFFFF_FFFF,
                                7 => (v & 0xFFFF_FFFF & !0xD800) | 0x400,
                                _ => v,
                            }
                        }
                        None => return self.stop(vcpu, basic, StopCause::UnhandledExit),
                    }
                }
                Action::Resume {
                    advance: exit.instr_len,
                }
            }
            reason::TRIPLE_FAULT => {
                vcpu.halted = true;
                Action::ToUser(RunExit::TripleFault)
            }
            reason::HLT => {
                // KVM without an in-kernel interrupt controller: user space decides; the next
                // run continues after the HLT.
                vcpu.halted = vcpu.kvm.is_none();
                Action::ToUser(RunExit::Hlt)
            }
            reason::CPUID => {
                let (leaf, sub) = (gprs.rax as u32, gprs.rcx as u32);
                let r = match &vcpu.kvm {
                    Some(k) => k.cpuid.lookup(p, leaf, sub),
                    None => filter_cpuid(leaf, sub, cpuid(leaf, sub)),
                };
                gprs.rax = r[0].into();
                gprs.rbx = r[1].into();
                gprs.rcx = r[2].into();
                gprs.rdx = r[3].into();
                Action::Resume {
                    advance: exit.instr_len,
                }
            }
            reason::VMCALL if vcpu.kvm.is_some() => {
                gprs.rax = KVM_ENOSYS;
                Action::Resume {
                    advance: exit.instr_len,
                }
            }
            reason::VMCALL => match gprs.rax {
                0 => {
                    vcpu.halted = true;
                    Action::ToUser(RunExit::ExitCode(gprs.rdi))
                }
                1 => {
                    gprs.rax = 0;
                    vcpu.checkpoint_pending = true;
                    Action::ToUser(RunExit::Checkpoint)
                }
                _ => {
                    gprs.rax = u64::MAX;
                    Action::Resume {
                        advance: exit.instr_len,
                    }
                }
            },
            reason::IO => {
                // SDM 28.2.1 Table 28-5: size-1 in 2:0, IN in bit 3, string bit 4, port 31:16.
                let q = exit.qualification;
                let port = (q >> 16) as u16;
                let is_in = q & (1 << 3) != 0;
                let string = q & (1 << 4) != 0;
                if let Some(k) = vcpu.kvm.as_mut() {
                    // Every port goes to user space (no device is emulated); string I/O would
                    // need the instruction emulated.
                    if string {
                        return self.stop(vcpu, basic, StopCause::UnhandledExit);
                    }
                    let size = ((q & 7) + 1) as u8;
                    if is_in {
                        k.pending_in = Some(size);
                    }
                    return Action::ToUser(RunExit::Io {
                        port,
                        size,
                        write: !is_in,
                        data: gprs.rax as u32,
                    });
                }
                if !is_in && !string && port == CONSOLE_PORT {
                    if vcpu.console_len < CONSOLE_BUF {
                        vcpu.console[vcpu.console_len] = gprs.rax as u8;
                        vcpu.console_len += 1;
                    }
                    if vcpu.console_len == CONSOLE_BUF {
                        return Action::ToUser(RunExit::Console);
                    }
                } else if is_in && !string {
                    // Reads of absent ports see all ones, as on a bus with nothing there.
                    let size = (q & 7) + 1;
                    let mask = if size >= 4 {
                        0xffff_ffff
                    } else {
                        (1u64 << (size * 8)) - 1
                    };
                    gprs.rax = (gprs.rax & !mask) | mask;
                }
                Action::Resume {
                    advance: exit.instr_len,
                }
            }
            reason::RDMSR => {
                // Intercepted MSRs read as 0 (the MSR bitmap passes only harmless ones).
                gprs.rax = 0;
                gprs.rdx = 0;
                Action::Resume {
                    advance: exit.instr_len,
                }
            }
            reason::WRMSR | reason::XSETBV => Action::Resume {
                advance: exit.instr_len,
            },
            // Guest memory is write-back and no device is assigned: nothing needs the caches
            // written back, so the instruction is skipped (as KVM does without assigned
            // devices) and the host CPU's caches stay the host's.
            reason::WBINVD => Action::Resume {
                advance: exit.instr_len,
            },
            reason::EPT_VIOLATION => match self.on_ept_violation_into(
                p,
                exit.gpa,
                exit.qualification,
                vcpu.kvm.as_mut().and_then(|k| k.ring.as_mut()),
            ) {
                Fault::Resolved => Action::Resume { advance: 0 },
                Fault::Mmio { gpa, write } => {
                    vcpu.halted = true;
                    Action::ToUser(RunExit::Mmio { gpa, write })
                }
                Fault::LimitReached => self.stop(vcpu, basic, StopCause::PageLimit),
                Fault::OutOfMemory => self.stop(vcpu, basic, StopCause::OutOfMemory),
                Fault::HostPageCap => self.stop(vcpu, basic, StopCause::HostPageCap),
                Fault::Unexpected => self.stop(vcpu, basic, StopCause::UnexpectedViolation),
            },
            reason::EPT_MISCONFIG => self.stop(vcpu, basic, StopCause::EptMisconfig),
            19..=27 | 50 | 53 => self.stop(vcpu, basic, StopCause::VmxInstruction),
            _ => self.stop(vcpu, basic, StopCause::UnhandledExit),
        }
    }

    fn stop(&self, vcpu: &mut VcpuState, reason: u32, what: StopCause) -> Action {
        vcpu.halted = true;
        Action::ToUser(RunExit::Stopped { reason, what })
    }
}
