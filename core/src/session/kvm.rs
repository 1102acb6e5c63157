//! KVM's user API over the session layer (the KVM personality): `/dev/kvm`'s own requests, a
//! VM descriptor's (memory slots, dirty logs, vCPUs, capabilities) and a vCPU descriptor's
//! (KVM_RUN and its `kvm_run` page, registers, CPUID, MP state, signal mask). One session is one
//! KVM VM; the shim gives it a descriptor and one per vCPU. Arguments are validated as Linux
//! 6.12's `virt/kvm/kvm_main.c` and `arch/x86/kvm` do, with the errno they give.

use crate::abi::Wire;
use crate::arch::{RawBox, Shared};
use crate::dirty::Mode;
use crate::kvm::abi::{
    self as k, cap, exit, mp_state, run as r, ClearDirtyLog, Cpuid2, DirtyLog, EnableCap, Ioctl,
    KvmRegs, MemoryRegion2, MpState, Sregs,
};
use crate::kvm::{cpuid, ring, state};
use crate::msg::MsgBuf;
use crate::platform::{read_bytes, write_bytes, Platform};
use crate::vcpu::VcpuPages;
use crate::vm::{Backing, KvmExits, RunExit, StopCause, Vm, MAX_SLOTS};
use crate::vmx::hw::{HwError, HwVcpu};

use super::{pay, waiter, Driver, Fail, Os, Session, VmState, MAX_VCPUS};
use crate::ept::Invept;

/// What a KVM VM keeps beside smudge's VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct KvmVm {
    /// KVM's view of each smudge slot (same index).
    slots: [Option<KvmSlot>; MAX_SLOTS],
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled: GET_DIRTY_LOG no longer clears.
    manual_protect: bool,
    /// Bytes of each vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING_ACQ_REL), 0: the bitmap.
    ring_bytes: u64,
}

/// A KVM memory slot.
#[derive(Clone, Copy, Debug)]
struct KvmSlot {
    /// KVM's slot id.
    id: u16,
    /// Its `KVM_MEM_*` flags.
    flags: u32,
}

use cpuid::ENTRY;
/// The highest user address plus one (x86-64 with 4-level paging, `TASK_SIZE_MAX`): a slot's
/// memory must lie below it (KVM's `access_ok`).
const USER_END: u64 = 0x7fff_ffff_f000;
/// KVM's limit on slot ids (`KVM_USER_MEM_SLOTS` on x86).
const KVM_USER_MEM_SLOTS: u32 = 32764;
/// KVM's limit on vCPU ids (`KVM_MAX_VCPU_IDS` on x86 without a larger `max_vcpu_ids`).
const KVM_MAX_VCPU_IDS: u64 = 4096;
/// Where port I/O data sits in the `kvm_run` page (`kvm_run.io.data_offset`): after the struct.
pub const IO_DATA: usize = 3072;
/// Bytes of a vCPU descriptor's mapping at offset 0 (KVM_GET_VCPU_MMAP_SIZE): the `kvm_run`
/// page, with the I/O data inside it.
pub const VCPU_MMAP_SIZE: u64 = 4096;
/// `kvm_run.internal.suberror`: emulation failed (smudge emulates no instruction).
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// `kvm_run.internal.suberror`: an exit reason the hypervisor does not handle.
const INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: u32 = 4;

/// Dirty modes that can feed a dirty ring: PML (drained at every exit) and write-protect (the
/// faults); A/D scanning has no event per page.
pub fn ring_capable(mode: Mode) -> bool {
    matches!(mode, Mode::Pml | Mode::WriteProtect)
}

/// KVM_CHECK_EXTENSION, for `/dev/kvm` and a VM alike; `ring`: the VM's (or, for `/dev/kvm`,
/// the driver's) dirty mode can feed a dirty ring.
pub fn check_extension(c: u64, ring: bool) -> u64 {
    match u32::try_from(c).unwrap_or(u32::MAX) {
        cap::DIRTY_LOG_RING | cap::DIRTY_LOG_RING_ACQ_REL if ring => ring::MAX_BYTES,
        cap::MAX_VCPUS | cap::NR_VCPUS => MAX_VCPUS as u64,
        cap::NR_MEMSLOTS => MAX_SLOTS as u64,
        cap::USER_MEMORY | cap::USER_MEMORY2 | cap::IMMEDIATE_EXIT | cap::GET_TSC_KHZ => 1,
        // Without KVM_DIRTY_LOG_INITIALLY_SET: pages start clean.
        cap::MANUAL_DIRTY_LOG_PROTECT2 => k::MANUAL_PROTECT_ENABLE,
        _ => 0,
    }
}

/// `/dev/kvm`'s own requests but KVM_CREATE_VM, which [`request`] answers with the VM to make.
pub fn system_request<O: Os>(os: &O, ioctl: Ioctl, arg: u64, ring: bool) -> Result<u64, Fail> {
    match ioctl {
        Ioctl::GetApiVersion => Ok(k::API_VERSION.into()),
        Ioctl::CheckExtension => Ok(check_extension(arg, ring)),
        Ioctl::GetVcpuMmapSize => Ok(VCPU_MMAP_SIZE),
        Ioctl::GetSupportedCpuid => {
            let mut hdr = Cpuid2::default();
            let mut b = [0u8; 8];
            os.copy_from_user(&mut b, arg)?;
            hdr.nent = Cpuid2::from_bytes(&b).map_err(|_| Fail::Invalid)?.nent;
            if hdr.nent < 1 {
                return Err(Fail::TooBig);
            }
            let max = (hdr.nent as usize).min(cpuid::MAX_ENTRIES);
            let mut buf = os.buffer(max * ENTRY).ok_or(Fail::NoMemory)?;
            let out = buf.bytes_mut();
            let n = cpuid::supported(&crate::arch::cpuid, max, &mut |i, e| {
                if let Some(dst) = out.get_mut(i * ENTRY..(i + 1) * ENTRY) {
                    let _ = e.to_bytes(dst);
                }
            })
            .ok_or(Fail::TooBig)?;
            hdr.nent = n as u32;
            os.copy_to_user(arg + 8, buf.bytes().get(..n * ENTRY).ok_or(Fail::Invalid)?)?;
            let _ = hdr.to_bytes(&mut b);
            os.copy_to_user(arg, &b)?;
            Ok(0)
        }
        _ => Err(Fail::Invalid),
    }
}

/// Writes `v` at byte `off` of the page at `page`.
fn put<P: Platform + ?Sized>(p: &P, page: u64, off: usize, v: &[u8]) {
    write_bytes(p, page, off, v);
}

impl<O: Os> Session<O> {
    /// Makes this session a KVM VM (after KVM_CREATE_VM made its descriptor): a VM without
    /// memory, tracking dirty pages with `mode` (None: the best the processor offers).
    pub fn kvm_create(&self, os: &O, drv: &Driver, mode: Option<Mode>) -> Result<(), Fail> {
        let _claim = self.share.vm_request(false, waiter(os)).ok_or(Fail::Busy)?;
        let mut st = self.vm.lock();
        if st.vm.is_some() {
            return Err(Fail::Busy);
        }
        let (mode, ctls) = crate::answer::mode_controls(&drv.caps, drv.mode, mode)?;
        st.vm = Some(Vm::new(os, drv.caps.ept_features(), mode, 0)?);
        st.ctls = Some(ctls);
        st.kvm = KvmVm::default();
        self.ready
            .store(true, core::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// A request on the VM descriptor. `arg` is the ioctl argument (a user pointer or a value).
    /// KVM_CREATE_VCPU returns the new vCPU's index, for which the shim makes a descriptor.
    pub fn kvm_vm_request(
        &self,
        os: &O,
        drv: &Driver,
        ioctl: Ioctl,
        arg: u64,
    ) -> Result<u64, Fail> {
        match ioctl {
            Ioctl::CheckExtension => {
                let mode = self.vm.lock().vm.as_ref().map(|v| v.mode());
                return Ok(check_extension(arg, mode.is_some_and(ring_capable)));
            }
            Ioctl::GetTscKhz => {
                return match os.tsc_khz() {
                    0 => Err(Fail::Io),
                    khz => Ok(khz),
                }
            }
            _ => {}
        }
        let _claim = self.kvm_claim(os);
        let mut st = self.vm.lock();
        let r = self.kvm_vm_locked(os, drv, &mut st, ioctl, arg);
        super::pay_after_failure(os, st.vm.as_mut(), &r);
        r
    }

    fn kvm_vm_locked(
        &self,
        os: &O,
        drv: &Driver,
        st: &mut VmState,
        ioctl: Ioctl,
        arg: u64,
    ) -> Result<u64, Fail> {
        let copy_in = |b: &mut [u8]| os.copy_from_user(b, arg);
        match ioctl {
            // Accepted as KVM does; no interrupt controller is emulated (the selftests never
            // use it).
            Ioctl::CreateIrqchip => Ok(0),
            Ioctl::EnableCap => {
                let mut b = [0u8; core::mem::size_of::<EnableCap>()];
                copy_in(&mut b)?;
                let c = EnableCap::from_bytes(&b).map_err(|_| Fail::Invalid)?;
                match c.cap {
                    cap::MANUAL_DIRTY_LOG_PROTECT2 => {
                        if c.flags != 0 || c.args[0] & !k::MANUAL_PROTECT_ENABLE != 0 {
                            return Err(Fail::Invalid);
                        }
                        st.kvm.manual_protect = c.args[0] & k::MANUAL_PROTECT_ENABLE != 0;
                        Ok(0)
                    }
                    cap::DIRTY_LOG_RING | cap::DIRTY_LOG_RING_ACQ_REL => {
                        self.enable_ring(st, c.args[0])?;
                        Ok(0)
                    }
                    _ => Err(Fail::Invalid),
                }
            }
            Ioctl::SetUserMemoryRegion2 => {
                let mut b = [0u8; core::mem::size_of::<MemoryRegion2>()];
                copy_in(&mut b)?;
                let m = MemoryRegion2::from_bytes(&b).map_err(|_| Fail::Invalid)?;
                self.kvm_set_region(os, st, &m)
            }
            // A dirty-ring VM has no bitmap (KVM: ENXIO).
            Ioctl::GetDirtyLog | Ioctl::ClearDirtyLog if st.kvm.ring_bytes != 0 => {
                Err(Fail::NoDevice)
            }
            Ioctl::GetDirtyLog => {
                let mut b = [0u8; 16];
                copy_in(&mut b)?;
                let d = DirtyLog::from_bytes(&b).map_err(|_| Fail::Invalid)?;
                let (idx, pages) = logged_slot(st, d.slot)?;
                let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
                let words = pages.div_ceil(64) as usize;
                let mut bits = os.buffer(words * 8).ok_or(Fail::NoMemory)?;
                if st.kvm.manual_protect {
                    vm.get_dirty_log(os, idx, bits.words_mut())?;
                } else {
                    let owed = vm.harvest(os, idx, bits.words_mut())?;
                    // The bitmap goes out after the flush (SDM 29.4.3.4).
                    pay(os, vm, owed);
                }
                os.copy_to_user(d.dirty_bitmap, bits.bytes())?;
                Ok(0)
            }
            Ioctl::ClearDirtyLog => {
                let mut b = [0u8; 24];
                copy_in(&mut b)?;
                let c = ClearDirtyLog::from_bytes(&b).map_err(|_| Fail::Invalid)?;
                if c.first_page % 64 != 0 {
                    return Err(Fail::Invalid);
                }
                let (idx, pages) = logged_slot(st, c.slot)?;
                let num = u64::from(c.num_pages);
                if c.first_page > pages
                    || num > pages - c.first_page
                    || (num < pages - c.first_page && num % 64 != 0)
                {
                    return Err(Fail::Invalid);
                }
                let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
                let mut m = os
                    .buffer(num.div_ceil(64) as usize * 8)
                    .ok_or(Fail::NoMemory)?;
                os.copy_from_user(m.bytes_mut(), c.dirty_bitmap)?;
                let owed = vm.clear_dirty_log(os, idx, c.first_page, num, m.words_mut())?;
                pay(os, vm, owed);
                Ok(0)
            }
            Ioctl::CreateVcpu => {
                if arg >= KVM_MAX_VCPU_IDS {
                    return Err(Fail::Invalid);
                }
                let id = arg as u32;
                if self.created().any(|s| {
                    s.hw.lock()
                        .as_ref()
                        .is_some_and(|hw| hw.state.kvm.is_some_and(|k| k.id == id))
                }) {
                    return Err(Fail::Exists);
                }
                if self.nr_vcpus.load(core::sync::atomic::Ordering::Acquire) as usize >= MAX_VCPUS {
                    return Err(Fail::Invalid);
                }
                let pml = st.vm.as_ref().is_some_and(|v| v.mode() == Mode::Pml);
                self.add_kvm_vcpu(os, drv, id, st.kvm.ring_bytes, pml)
                    .map(u64::from)
            }
            // Without a dirty ring there is nothing to reset (KVM: EINVAL).
            Ioctl::ResetDirtyRings if st.kvm.ring_bytes == 0 => Err(Fail::Invalid),
            Ioctl::ResetDirtyRings => {
                let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
                let (mut count, mut owed) = (0, Invept::NONE);
                let mut cache = crate::ept::TableCache::default();
                for slot in self.created() {
                    let mut g = slot.hw.lock();
                    let Some(r) = g
                        .as_mut()
                        .and_then(|hw| hw.state.kvm.as_mut()?.ring.as_mut())
                    else {
                        continue;
                    };
                    count += r.reset(os, &mut |batch| {
                        owed.add(vm.rearm_ring_pages(os, batch, &mut cache));
                    });
                }
                // The re-armed pages' cached translations go before any vCPU runs again.
                pay(os, vm, owed);
                Ok(count)
            }
            _ => Err(Fail::Invalid),
        }
    }

    /// KVM_SET_USER_MEMORY_REGION2 (`__kvm_set_memory_region`): create, delete (size 0),
    /// move, or change the flags of a slot.
    fn kvm_set_region(&self, os: &O, st: &mut VmState, m: &MemoryRegion2) -> Result<u64, Fail> {
        if m.flags & !k::MEM_LOG_DIRTY_PAGES != 0 {
            // Read-only and guest_memfd slots are not offered.
            return Err(Fail::Invalid);
        }
        let (as_id, id) = (m.slot >> 16, m.slot & 0xffff);
        let size_ok = m.memory_size.is_multiple_of(4096);
        let user_ok = m.userspace_addr.is_multiple_of(4096)
            && m.userspace_addr
                .checked_add(m.memory_size)
                .is_some_and(|e| e <= USER_END);
        if !size_ok
            || !m.guest_phys_addr.is_multiple_of(4096)
            || !user_ok
            || as_id != 0
            || id >= KVM_USER_MEM_SLOTS
            || m.guest_phys_addr.checked_add(m.memory_size).is_none()
        {
            return Err(Fail::Invalid);
        }
        let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
        let old = st
            .kvm
            .slots
            .iter()
            .position(|s| s.is_some_and(|s| u32::from(s.id) == id));
        let logging = m.flags & k::MEM_LOG_DIRTY_PAGES != 0;
        let Some(idx) = old else {
            if m.memory_size == 0 {
                return Err(Fail::Invalid);
            }
            let (idx, owed) = vm.add_user_slot(
                os,
                m.guest_phys_addr,
                m.memory_size,
                m.userspace_addr,
                logging,
            )?;
            pay(os, vm, owed);
            if let Some(s) = st.kvm.slots.get_mut(idx) {
                *s = Some(KvmSlot {
                    id: id as u16,
                    flags: m.flags,
                });
            }
            sync_ring_id(st, idx);
            return Ok(0);
        };
        let (base, pages, uaddr) = vm
            .slots()
            .find(|(i, _)| *i == idx)
            .map(|(_, s)| {
                let uaddr = match s.backing {
                    Backing::User { uaddr } => uaddr,
                    Backing::Own => 0,
                };
                (s.base, s.pages, uaddr)
            })
            .ok_or(Fail::Invalid)?;
        let flags = st
            .kvm
            .slots
            .get(idx)
            .copied()
            .flatten()
            .map_or(0, |s| s.flags);
        if m.memory_size == 0 {
            let owed = vm.remove_slot(os, idx);
            pay(os, vm, owed);
            if let Some(s) = st.kvm.slots.get_mut(idx) {
                *s = None;
            }
            return Ok(0);
        }
        if m.userspace_addr != uaddr || m.memory_size / 4096 != pages {
            return Err(Fail::Invalid);
        }
        if m.guest_phys_addr != base {
            // A move: the slot again at its new place, the same memory pinned there.
            let owed = vm.remove_slot(os, idx);
            pay(os, vm, owed);
            if let Some(s) = st.kvm.slots.get_mut(idx) {
                *s = None;
            }
            let (new, owed) =
                vm.add_user_slot(os, m.guest_phys_addr, m.memory_size, uaddr, logging)?;
            pay(os, vm, owed);
            if let Some(s) = st.kvm.slots.get_mut(new) {
                *s = Some(KvmSlot {
                    id: id as u16,
                    flags: m.flags,
                });
            }
            sync_ring_id(st, new);
            return Ok(0);
        }
        if m.flags != flags {
            let owed = vm.set_slot_logging(os, idx, logging)?;
            pay(os, vm, owed);
            if let Some(Some(s)) = st.kvm.slots.get_mut(idx) {
                s.flags = m.flags;
            }
            sync_ring_id(st, idx);
        }
        Ok(0)
    }

    /// KVM_ENABLE_CAP of the dirty ring (`kvm_vm_ioctl_enable_dirty_log_ring`): a power of two
    /// of at least a page and of the reserve, at most 1 MiB (E2BIG), once, before any vCPU, in
    /// a mode that can feed it.
    fn enable_ring(&self, st: &mut VmState, bytes: u64) -> Result<(), Fail> {
        let mode = st.vm.as_ref().ok_or(Fail::Invalid)?.mode();
        let rsvd = u64::from(ring::reserved_entries(mode == Mode::Pml)) * ring::ENTRY;
        if !ring_capable(mode) || !bytes.is_power_of_two() || bytes < rsvd || bytes < 4096 {
            return Err(Fail::Invalid);
        }
        if bytes > ring::MAX_BYTES {
            return Err(Fail::TooBig);
        }
        if st.kvm.ring_bytes != 0 || self.nr_vcpus.load(core::sync::atomic::Ordering::Acquire) != 0
        {
            return Err(Fail::Invalid);
        }
        st.kvm.ring_bytes = bytes;
        for idx in 0..MAX_SLOTS {
            sync_ring_id(st, idx);
        }
        Ok(())
    }

    /// Creates KVM vCPU `id` with its `kvm_run` and CPUID pages and, when `ring` is not 0, a
    /// dirty ring of that many bytes; returns its index. The caller holds the VM's lock.
    fn add_kvm_vcpu(
        &self,
        os: &O,
        drv: &Driver,
        id: u32,
        ring: u64,
        pml: bool,
    ) -> Result<u32, Fail> {
        let index = self.nr_vcpus.load(core::sync::atomic::Ordering::Acquire);
        let slot = self.slots.get(index as usize).ok_or(Fail::Invalid)?;
        let pages = VcpuPages::alloc(os, &drv.caps)?;
        let mut v = HwVcpu::new_kvm(index, pages);
        let mut failed = None;
        if let Some(k) = v.state.kvm.as_mut() {
            k.id = id;
            for page in [&mut k.run_page, &mut k.cpuid.page] {
                match os.alloc_page() {
                    Ok(p) => *page = p,
                    Err(e) => failed = Some(e.into()),
                }
            }
            if ring != 0 && failed.is_none() {
                match ring::Ring::alloc(os, ring, pml) {
                    Ok(r) => k.ring = Some(r),
                    Err(e) => failed = Some(e),
                }
            }
        }
        if let Some(e) = failed {
            v.free_pages(os);
            return Err(Fail::from(e));
        }
        let hw = RawBox::new(v).map_err(|mut hw| {
            hw.free_pages(os);
            Fail::NoMemory
        })?;
        *slot.hw.lock() = Some(hw);
        self.nr_vcpus
            .store(index + 1, core::sync::atomic::Ordering::Release);
        Ok(index)
    }

    /// The VM for a VM-level KVM request, its vCPUs kicked out of the run loop. KVM serializes a
    /// VM's requests (kvm->lock, slots_lock): this waits for the one in progress.
    fn kvm_claim(&self, os: &O) -> super::share::VmRequest<'_> {
        loop {
            if let Some(c) = self.share.vm_request(true, waiter(os)) {
                break c;
            }
            os.pause(0);
        }
    }

    /// Undoes KVM_CREATE_VCPU of vCPU `index` when no descriptor could be made for it, as KVM
    /// destroys such a vCPU: it goes, pages and all, so that its id can be created again. Only
    /// the last vCPU created can go (the index of the others stays theirs); an earlier one, made
    /// while another creation raced ahead, stays until the VM goes.
    fn kvm_unmake_vcpu(&self, os: &O, index: u32) {
        let _claim = self.kvm_claim(os);
        let _st = self.vm.lock();
        let last = self.nr_vcpus.load(core::sync::atomic::Ordering::Acquire);
        let Some(slot) = self.slots.get(index as usize).filter(|_| last == index + 1) else {
            return;
        };
        if let Some(mut hw) = slot.hw.lock().take() {
            // Never run (it had no descriptor), so its VMCS is active nowhere.
            hw.free_pages(os);
        }
        self.nr_vcpus
            .store(index, core::sync::atomic::Ordering::Release);
        os.after_free();
    }

    /// A request on vCPU `index`'s descriptor.
    pub fn kvm_vcpu_request(
        &self,
        os: &O,
        drv: &Driver,
        index: u32,
        ioctl: Ioctl,
        arg: u64,
    ) -> Result<u64, Fail> {
        if ioctl == Ioctl::Run {
            return self.kvm_run(os, drv, index);
        }
        // One request of a vCPU at a time (KVM's vcpu->mutex): wait for a RUN of it to end.
        let slot = self.slot(index)?;
        let _claim = loop {
            if let Some(c) = slot.busy.claim() {
                break c;
            }
            os.pause(0);
        };
        let mut g = slot.hw.lock();
        let hw = g.as_mut().ok_or(Fail::Invalid)?;
        let kvm = hw.state.kvm.ok_or(Fail::Invalid)?;
        match ioctl {
            Ioctl::GetRegs => {
                let g = hw.guest.unwrap_or_default();
                let regs = state::regs(&hw.gprs, g.rsp, g.rip, g.rflags);
                let mut b = [0u8; core::mem::size_of::<KvmRegs>()];
                let _ = regs.to_bytes(&mut b);
                os.copy_to_user(arg, &b)?;
                Ok(0)
            }
            Ioctl::SetRegs => {
                let mut b = [0u8; core::mem::size_of::<KvmRegs>()];
                os.copy_from_user(&mut b, arg)?;
                let regs = KvmRegs::from_bytes(&b).map_err(|_| Fail::Invalid)?;
                let (rsp, rip, rflags) = state::set_regs(&mut hw.gprs, &regs);
                let g = hw.guest.get_or_insert_with(Default::default);
                (g.rsp, g.rip, g.rflags) = (rsp, rip, rflags);
                // The next run writes the whole state into the VMCS.
                hw.programmed = false;
                Ok(0)
            }
            Ioctl::GetSregs => {
                let g = hw.guest.unwrap_or_default();
                let s = state::sregs(&g, hw.gprs.cr2, hw.state.cr8, APIC_BASE);
                let mut b = [0u8; core::mem::size_of::<Sregs>()];
                let _ = s.to_bytes(&mut b);
                os.copy_to_user(arg, &b)?;
                Ok(0)
            }
            Ioctl::SetSregs => {
                let mut b = [0u8; core::mem::size_of::<Sregs>()];
                os.copy_from_user(&mut b, arg)?;
                let s = Sregs::from_bytes(&b).map_err(|_| Fail::Invalid)?;
                let mut g = hw.guest.unwrap_or_default();
                state::set_sregs(&mut g, &s, &drv.caps, maxphyaddr()).map_err(|_| Fail::Invalid)?;
                hw.guest = Some(g);
                hw.gprs.cr2 = s.cr2;
                hw.state.cr8 = s.cr8 & 0xf;
                hw.programmed = false;
                Ok(0)
            }
            Ioctl::SetCpuid2 => {
                let mut b = [0u8; 8];
                os.copy_from_user(&mut b, arg)?;
                let n = Cpuid2::from_bytes(&b).map_err(|_| Fail::Invalid)?.nent as usize;
                if n > cpuid::MAX_ENTRIES {
                    return Err(Fail::TooBig);
                }
                let mut raw = os.buffer(n * ENTRY + 8).ok_or(Fail::NoMemory)?;
                let dst = raw.bytes_mut().get_mut(..n * ENTRY).ok_or(Fail::Invalid)?;
                os.copy_from_user(dst, arg + 8)?;
                let new = raw.bytes().get(..n * ENTRY).ok_or(Fail::Invalid)?;
                let k = hw.state.kvm.as_mut().ok_or(Fail::Invalid)?;
                if k.ran {
                    // After KVM_RUN only the same table is accepted (KVM's kvm_set_cpuid).
                    return if k.cpuid.same(os, new) {
                        Ok(0)
                    } else {
                        Err(Fail::Invalid)
                    };
                }
                if !k.cpuid.set(os, new) {
                    return Err(Fail::TooBig);
                }
                Ok(0)
            }
            Ioctl::GetCpuid2 => {
                let mut b = [0u8; 8];
                os.copy_from_user(&mut b, arg)?;
                let mut hdr = Cpuid2::from_bytes(&b).map_err(|_| Fail::Invalid)?;
                let n = kvm.cpuid.len;
                if (hdr.nent as usize) < n {
                    return Err(Fail::TooBig);
                }
                let mut out = os.buffer(n * ENTRY + 8).ok_or(Fail::NoMemory)?;
                for i in 0..n {
                    if let Some(dst) = out.bytes_mut().get_mut(i * ENTRY..(i + 1) * ENTRY) {
                        let _ = kvm.cpuid.entry(os, i).to_bytes(dst);
                    }
                }
                os.copy_to_user(arg + 8, out.bytes().get(..n * ENTRY).unwrap_or(&[]))?;
                hdr.nent = n as u32;
                let _ = hdr.to_bytes(&mut b);
                os.copy_to_user(arg, &b)?;
                Ok(0)
            }
            Ioctl::GetMpState => {
                let mut b = [0u8; 4];
                let _ = MpState {
                    mp_state: mp_state::RUNNABLE,
                }
                .to_bytes(&mut b);
                os.copy_to_user(arg, &b)?;
                Ok(0)
            }
            Ioctl::SetMpState => {
                let mut b = [0u8; 4];
                os.copy_from_user(&mut b, arg)?;
                // Without an in-kernel local APIC only RUNNABLE is valid (KVM's
                // kvm_arch_vcpu_ioctl_set_mpstate).
                match MpState::from_bytes(&b).map_err(|_| Fail::Invalid)?.mp_state {
                    mp_state::RUNNABLE => Ok(0),
                    _ => Err(Fail::Invalid),
                }
            }
            Ioctl::SetSignalMask => {
                let k = hw.state.kvm.as_mut().ok_or(Fail::Invalid)?;
                if arg == 0 {
                    k.sigmask = None;
                    return Ok(0);
                }
                // struct kvm_signal_mask { __u32 len; __u8 sigset[]; } with len = 8.
                let mut b = [0u8; 12];
                os.copy_from_user(&mut b, arg)?;
                let len = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if len != 8 {
                    return Err(Fail::Invalid);
                }
                let mut m = [0u8; 8];
                m.copy_from_slice(&b[4..12]);
                k.sigmask = Some(u64::from_le_bytes(m));
                Ok(0)
            }
            _ => Err(Fail::Invalid),
        }
    }

    /// KVM_RUN: completes a pending port read from the `kvm_run` page, honours
    /// `immediate_exit`, runs until an exit for user space, and describes it in the page.
    /// Ok(0) for a guest exit; `Err(Interrupted)` (EINTR) with KVM_EXIT_INTR for a signal.
    fn kvm_run(&self, os: &O, drv: &Driver, index: u32) -> Result<u64, Fail> {
        let mut masked = false;
        let r = self.run_loop(
            os,
            drv,
            index,
            |hw| {
                let k = hw.state.kvm.as_mut()?;
                let page = k.run_page;
                // KVM checks the ring before it enters: still full, exit again at once.
                if k.ring.is_some_and(|r| r.soft_full()) {
                    put(
                        os,
                        page,
                        r::EXIT_REASON,
                        &exit::DIRTY_RING_FULL.to_le_bytes(),
                    );
                    return Some(Ok(0));
                }
                if let Some(size) = k.pending_in.take() {
                    let mut d = [0u8; 4];
                    read_bytes(os, page, IO_DATA, &mut d);
                    let mask = if size >= 4 {
                        u64::from(u32::MAX)
                    } else {
                        (1u64 << (u32::from(size) * 8)) - 1
                    };
                    // A 32-bit result zero-extends into RAX (SDM 3.4.1.1); 8/16 bits merge.
                    let v = u64::from(u32::from_le_bytes(d)) & mask;
                    hw.gprs.rax = if size >= 4 {
                        v
                    } else {
                        (hw.gprs.rax & !mask) | v
                    };
                }
                // immediate_exit: the I/O is complete, the exit record stays as it was (KVM
                // returns -EINTR without writing exit_reason; the selftests' get_ucall reads the
                // ucall's record again after it).
                let mut imm = [0u8];
                read_bytes(os, page, r::IMMEDIATE_EXIT, &mut imm);
                if imm[0] != 0 {
                    return Some(Err(Fail::Interrupted));
                }
                // Without an in-kernel local APIC, KVM_RUN takes CR8 from the page (KVM's
                // "re-sync apic's tpr").
                let mut cr8 = [0u8; 8];
                read_bytes(os, page, r::CR8, &mut cr8);
                match u64::from_le_bytes(cr8) {
                    v @ 0..=15 => hw.state.cr8 = v,
                    _ => return Some(Err(Fail::Invalid)),
                }
                if let Some(m) = k.sigmask {
                    os.signal_mask_enter(m);
                    masked = true;
                }
                k.ran = true;
                None
            },
            |hw, result| {
                let Some(k) = hw.state.kvm else {
                    return Err(Fail::Invalid);
                };
                let cpu = hw.cpu.unwrap_or(0);
                // KVM's post_kvm_run_save: CR8, the APIC base, RFLAGS.IF, no injection window
                // (smudge injects no interrupts).
                let rflags = hw.guest.map_or(hw.rflags, |g| g.rflags);
                put(os, k.run_page, r::CR8, &hw.state.cr8.to_le_bytes());
                put(os, k.run_page, r::APIC_BASE, &APIC_BASE.to_le_bytes());
                put(
                    os,
                    k.run_page,
                    r::IF_FLAG,
                    &[u8::from(rflags & (1 << 9) != 0)],
                );
                put(os, k.run_page, r::READY_FOR_INTERRUPT_INJECTION, &[0]);
                put(os, k.run_page, r::FLAGS, &[0, 0]);
                self.kvm_exit(os, k.run_page, cpu, result)
            },
        );
        if masked {
            os.signal_mask_leave();
        }
        r?
    }

    /// Describes an exit in the `kvm_run` page at `page`.
    fn kvm_exit(
        &self,
        os: &O,
        page: u64,
        cpu: u32,
        result: Result<RunExit, HwError>,
    ) -> Result<u64, Fail> {
        let reason = |v: u32| put(os, page, r::EXIT_REASON, &v.to_le_bytes());
        let internal = |sub: u32, data: &[u64]| {
            reason(exit::INTERNAL_ERROR);
            put(os, page, r::EXIT, &sub.to_le_bytes());
            put(os, page, r::EXIT + 4, &(data.len() as u32).to_le_bytes());
            for (i, d) in data.iter().enumerate() {
                put(os, page, r::EXIT + 8 + 8 * i, &d.to_le_bytes());
            }
        };
        let fail_entry = |hw_reason: u64| {
            reason(exit::FAIL_ENTRY);
            put(os, page, r::FAIL_ENTRY_REASON, &hw_reason.to_le_bytes());
            put(os, page, r::FAIL_ENTRY_CPU, &cpu.to_le_bytes());
        };
        match result {
            Ok(RunExit::Io {
                port,
                size,
                write,
                data,
            }) => {
                reason(exit::IO);
                let dir = if write { k::EXIT_IO_OUT } else { k::EXIT_IO_IN };
                put(os, page, r::IO_DIRECTION, &[dir]);
                put(os, page, r::IO_SIZE, &[size]);
                put(os, page, r::IO_PORT, &port.to_le_bytes());
                put(os, page, r::IO_COUNT, &1u32.to_le_bytes());
                put(os, page, r::IO_DATA_OFFSET, &(IO_DATA as u64).to_le_bytes());
                if write {
                    put(os, page, IO_DATA, &data.to_le_bytes());
                }
                Ok(0)
            }
            Ok(RunExit::Hlt) => {
                reason(exit::HLT);
                Ok(0)
            }
            Ok(RunExit::TripleFault) => {
                reason(exit::SHUTDOWN);
                Ok(0)
            }
            Ok(RunExit::RingFull) => {
                reason(exit::DIRTY_RING_FULL);
                Ok(0)
            }
            Ok(RunExit::Interrupted) => {
                reason(exit::INTR);
                Err(Fail::Interrupted)
            }
            Ok(RunExit::Mmio { gpa, write }) => {
                internal(INTERNAL_ERROR_EMULATION, &[gpa, write.into()]);
                Ok(0)
            }
            Ok(RunExit::Stopped {
                reason: basic,
                what: StopCause::EntryFailed,
            }) => {
                fail_entry(u64::from(basic) | 1 << 31);
                Ok(0)
            }
            Ok(RunExit::Stopped { reason: basic, .. }) => {
                internal(INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, &[basic.into()]);
                Ok(0)
            }
            Ok(RunExit::ExitCode(_) | RunExit::Checkpoint | RunExit::Console) => {
                internal(INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, &[]);
                Ok(0)
            }
            Err(HwError::EntryCheck {
                violation,
                exit_reason,
                ..
            }) => {
                // SDM 27.8: basic reason 33, "VM-entry failure due to invalid guest state",
                // when the entry was refused before it was attempted.
                let hw_reason = if exit_reason != 0 {
                    exit_reason
                } else {
                    33 | 1 << 31
                };
                fail_entry(hw_reason.into());
                self.log_limited(os, |m| {
                    use core::fmt::Write;
                    let _ = write!(m, "KVM vCPU: VM entry refused: {violation}");
                });
                Ok(0)
            }
            Err(HwError::Vmx { step, fail }) => {
                let code = match fail {
                    crate::arch::VmFail::Valid(e) => u64::from(e),
                    crate::arch::VmFail::Invalid => u64::MAX,
                };
                if matches!(step, "vmlaunch" | "vmresume") {
                    fail_entry(code);
                } else {
                    internal(INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, &[code]);
                }
                Ok(0)
            }
        }
    }

    /// Logs one line at most once a second, driver-wide (a user must not flood the log).
    fn log_limited(&self, os: &O, f: impl FnOnce(&mut MsgBuf)) {
        use core::sync::atomic::{AtomicU64, Ordering};
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = os.now_ns();
        let last = LAST.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 1_000_000_000 {
            return;
        }
        if LAST
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let mut m = MsgBuf::new();
            f(&mut m);
            os.log(m.as_str());
        }
    }

    /// mmap of vCPU `index`'s descriptor: `map(i, frame)` for its pages `pgoff..pgoff + count`
    /// ([`Session::kvm_vcpu_page`]); the first that is not there fails it.
    pub fn kvm_map_vcpu(
        &self,
        os: &O,
        index: u32,
        pgoff: u64,
        count: u64,
        map: &mut dyn FnMut(u64, u64) -> Result<(), Fail>,
    ) -> Result<(), Fail> {
        (0..count).try_for_each(|i| map(i, self.kvm_vcpu_page(os, index, pgoff + i)?))
    }

    /// The frame of page `pgoff` of vCPU `index`'s descriptor, for its mmap: the `kvm_run`
    /// page at 0, the dirty ring from KVM_DIRTY_LOG_PAGE_OFFSET.
    pub fn kvm_vcpu_page(&self, os: &O, index: u32, pgoff: u64) -> Result<u64, Fail> {
        let slot = self.slot(index)?;
        let g = slot.hw.lock();
        let hw = g.as_ref().ok_or(Fail::Invalid)?;
        let k: KvmExits = hw.state.kvm.ok_or(Fail::Invalid)?;
        let hpa = match pgoff {
            0 => Some(k.run_page),
            o if o >= k::DIRTY_LOG_PAGE_OFFSET => k
                .ring
                .and_then(|r| r.page(os, o - k::DIRTY_LOG_PAGE_OFFSET)),
            _ => None,
        };
        hpa.map(|h| h >> 12).ok_or(Fail::Invalid)
    }
}

/// A KVM VM: its session, shared by its descriptor and its vCPUs' ([`KvmHandle`]); the last
/// of them to go releases it.
pub struct KvmVmFile<O: Os> {
    /// The VM.
    pub session: Session<O>,
}

/// What a KVM descriptor's private data holds (`/dev/kvm` holds nothing): a reference to the
/// VM, and for a vCPU its index.
pub enum KvmHandle<O: Os> {
    /// A VM's descriptor.
    Vm(SharedVm<O>),
    /// A vCPU's descriptor.
    Vcpu(SharedVm<O>, u32),
}

/// A reference to a KVM VM.
pub type SharedVm<O> = Shared<KvmVmFile<O>, <O as Os>::Alloc>;
/// A [`KvmHandle`] in OS memory, for a descriptor's private data (`RawBox::into_raw`).
pub type KvmHandleBox<O> = RawBox<KvmHandle<O>, <O as Os>::Alloc>;

impl<O: Os> KvmHandle<O> {
    /// A VM's descriptor (else a vCPU's).
    pub fn is_vm(&self) -> bool {
        matches!(self, KvmHandle::Vm(_))
    }
}

/// A KVM descriptor as a request sees it.
enum KvmFile<'a, O: Os> {
    /// `/dev/kvm`.
    System,
    /// A VM's.
    Vm(&'a KvmVmFile<O>),
    /// A vCPU's: its VM and its index.
    Vcpu(&'a KvmVmFile<O>, u32),
}

/// What a KVM request answers: a value for user space, or a descriptor to make.
enum KvmAnswer {
    /// The ioctl's return value.
    Value(u64),
    /// KVM_CREATE_VM with this dirty mode.
    NewVm(Option<Mode>),
    /// KVM_CREATE_VCPU: vCPU `index` of the VM.
    NewVcpu(u32),
}

/// An ioctl on a KVM descriptor whose private data is `handle` (None: `/dev/kvm`). Answers the
/// ioctl's value, and for KVM_CREATE_VM and KVM_CREATE_VCPU the new descriptor's handle (the
/// value is then the shim's: the descriptor's number), which the shim gives a descriptor or
/// returns to [`kvm_put`]. `kvm_mode` is the driver's dirty mode for KVM VMs (`abi::mode_of`
/// numbers; 0 the driver's own).
pub fn kvm_ioctl<O: Os>(
    os: &O,
    drv: &Driver,
    handle: Option<&KvmHandle<O>>,
    cmd: u32,
    arg: u64,
    kvm_mode: u32,
) -> Result<(u64, Option<KvmHandleBox<O>>), Fail> {
    let file = match handle {
        None => KvmFile::System,
        Some(KvmHandle::Vm(vm)) => KvmFile::Vm(vm),
        Some(KvmHandle::Vcpu(vm, index)) => KvmFile::Vcpu(vm, *index),
    };
    let made = match request(os, drv, file, cmd, arg, kvm_mode)? {
        KvmAnswer::Value(v) => return Ok((v, None)),
        KvmAnswer::NewVm(mode) => {
            let vm = KvmVmFile {
                session: Session::new(),
            };
            let mut vm = SharedVm::<O>::new(vm).map_err(|_| Fail::NoMemory)?;
            let session = &mut vm.get_mut().ok_or(Fail::Invalid)?.session;
            if let Err(e) = session.kvm_create(os, drv, mode) {
                session.release(os);
                return Err(e);
            }
            KvmHandle::Vm(vm)
        }
        // Only a VM's descriptor creates vCPUs: each holds a reference to it.
        KvmAnswer::NewVcpu(index) => match handle {
            Some(KvmHandle::Vm(vm)) => KvmHandle::Vcpu(vm.share(), index),
            _ => return Err(Fail::Invalid),
        },
    };
    match KvmHandleBox::<O>::new(made) {
        Ok(b) => Ok((0, Some(b))),
        Err(h) => {
            drop_handle(os, h, false);
            Err(Fail::NoMemory)
        }
    }
}

/// Release of a KVM descriptor (`made`), or of a handle [`kvm_ioctl`] gave for which the shim
/// could make none: its reference to the VM goes, and the last one releases the VM. A vCPU
/// without a descriptor goes from its VM too, as in KVM.
pub fn kvm_put<O: Os>(os: &O, handle: KvmHandleBox<O>, made: bool) {
    drop_handle(os, RawBox::into_inner(handle), made);
}

fn drop_handle<O: Os>(os: &O, handle: KvmHandle<O>, made: bool) {
    if let (KvmHandle::Vcpu(vm, index), false) = (&handle, made) {
        vm.session.kvm_unmake_vcpu(os, *index);
    }
    let (KvmHandle::Vm(vm) | KvmHandle::Vcpu(vm, _)) = handle;
    vm.release(|vm| vm.session.release(os));
}

/// mmap of a vCPU descriptor: its `kvm_run` page and ring ([`Session::kvm_map_vcpu`]).
pub fn kvm_mmap<O: Os>(
    os: &O,
    handle: &KvmHandle<O>,
    pgoff: u64,
    count: u64,
    map: &mut dyn FnMut(u64, u64) -> Result<(), Fail>,
) -> Result<(), Fail> {
    match handle {
        KvmHandle::Vcpu(vm, index) => vm.session.kvm_map_vcpu(os, *index, pgoff, count, map),
        KvmHandle::Vm(_) => Err(Fail::Invalid),
    }
}

/// One request on a KVM descriptor: `cmd` decoded for the descriptor's scope (ENOTTY when it
/// names no request there) and answered.
fn request<O: Os>(
    os: &O,
    drv: &Driver,
    file: KvmFile<'_, O>,
    cmd: u32,
    arg: u64,
    kvm_mode: u32,
) -> Result<KvmAnswer, Fail> {
    use crate::kvm::abi::Scope;
    let scope = match file {
        KvmFile::System => Scope::System,
        KvmFile::Vm(_) => Scope::Vm,
        KvmFile::Vcpu(..) => Scope::Vcpu,
    };
    let ioctl = Ioctl::decode(cmd, scope).ok_or(Fail::NoSuchRequest)?;
    let mode = || crate::abi::mode_of(kvm_mode).map_err(Fail::Abi);
    match file {
        // KVM_CREATE_VM's argument is the machine type: only the default (0) here.
        KvmFile::System if ioctl == Ioctl::CreateVm => match arg {
            0 => Ok(KvmAnswer::NewVm(mode()?)),
            _ => Err(Fail::Invalid),
        },
        KvmFile::System => {
            let ring = ring_capable(mode()?.unwrap_or(drv.mode));
            system_request(os, ioctl, arg, ring).map(KvmAnswer::Value)
        }
        KvmFile::Vm(vm) => match vm.session.kvm_vm_request(os, drv, ioctl, arg)? {
            index if ioctl == Ioctl::CreateVcpu => Ok(KvmAnswer::NewVcpu(index as u32)),
            v => Ok(KvmAnswer::Value(v)),
        },
        KvmFile::Vcpu(vm, index) => vm
            .session
            .kvm_vcpu_request(os, drv, index, ioctl, arg)
            .map(KvmAnswer::Value),
    }
}

/// The APIC base KVM reports for a vCPU without an in-kernel local APIC: the default address,
/// enabled, bootstrap processor (SDM 11.4.4).
const APIC_BASE: u64 = 0xfee0_0000 | (1 << 11) | (1 << 8);

/// The guest's physical-address width: the host's (CPUID.80000008H:EAX[7:0]).
fn maxphyaddr() -> u8 {
    let r = crate::arch::cpuid(0x8000_0000, 0);
    if r[0] >= 0x8000_0008 {
        (crate::arch::cpuid(0x8000_0008, 0)[0] & 0xff) as u8
    } else {
        36
    }
}

/// Points slot `idx`'s dirty pages at the vCPUs' rings when the VM has rings and the slot logs
/// (KVM's slot id with its address space, as `kvm_dirty_gfn.slot`), at its log otherwise.
fn sync_ring_id(st: &mut VmState, idx: usize) {
    let id = match st.kvm.slots.get(idx).copied().flatten() {
        Some(s) if st.kvm.ring_bytes != 0 && s.flags & k::MEM_LOG_DIRTY_PAGES != 0 => {
            Some(u32::from(s.id))
        }
        _ => None,
    };
    if let Some(vm) = st.vm.as_mut() {
        vm.set_ring_id(idx, id);
    }
}

/// The smudge slot of KVM slot `slot` that logs dirty pages, and its pages (KVM: EINVAL for an
/// impossible id, ENOENT for a slot without a dirty log).
fn logged_slot(st: &VmState, slot: u32) -> Result<(usize, u64), Fail> {
    let (as_id, id) = (slot >> 16, slot & 0xffff);
    if as_id != 0 || id >= KVM_USER_MEM_SLOTS {
        return Err(Fail::Invalid);
    }
    let idx = st
        .kvm
        .slots
        .iter()
        .position(|s| {
            s.is_some_and(|s| u32::from(s.id) == id && s.flags & k::MEM_LOG_DIRTY_PAGES != 0)
        })
        .ok_or(Fail::NoEntry)?;
    let vm = st.vm.as_ref().ok_or(Fail::Invalid)?;
    let pages = vm
        .slots()
        .find(|(i, _)| *i == idx)
        .map(|(_, s)| s.pages)
        .ok_or(Fail::NoEntry)?;
    Ok((idx, pages))
}
