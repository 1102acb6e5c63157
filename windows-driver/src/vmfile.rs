//! One open of `\\.\Smudge` = one VM: the same requests as the Linux module's `/dev/smudge`,
//! decoded by `smudge_core::abi` and served by the same core (Vm, vCPU pages, `vmx::hw::run`,
//! the RUN and CAPS answers, the host page-table walk).
//!
//! The per-handle object lives in nonpaged pool, reached through FILE_OBJECT.FsContext. Its
//! `busy` flag admits one request at a time (a concurrent one gets STATUS_DEVICE_BUSY), so every
//! request has the VM to itself.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use smudge_core::abi::{self, Request, Wire};
use smudge_core::arch;
use smudge_core::vcpu::VcpuPages;
use smudge_core::vm::{LoadError, RunExit, Vm};
use smudge_core::vmx::caps::Controls;
use smudge_core::vmx::hw::{self, HwExit, HwVcpu, RunEnv, SharedVm};
use smudge_core::{answer, hostpt};
use smudge_windows::budget;
use smudge_windows::status::*;

use crate::platform::{self, NtPlatform};
use crate::pool::{PoolBox, PoolBuf};
use crate::usermem::{copy_from_user, copy_to_user};
use crate::vmxroot::{self, Global};
use crate::{cpu, nt, processors};

/// A vCPU and the processor whose VMCS cache may hold its VMCS.
struct WinVcpu {
    hw: HwVcpu,
    /// Processor index where the VMCS was last made active (None = clear).
    cpu: Option<u32>,
}

/// The per-handle object (the Linux module's `VmFile`).
pub struct VmFile {
    /// A request is in progress; it alone uses `state`.
    busy: AtomicBool,
    state: UnsafeCell<VmState>,
}

// SAFETY: `state` is reached only by the request holding `busy`, or by CLOSE (exclusive).
unsafe impl Sync for VmFile {}

impl VmFile {
    pub const fn new() -> VmFile {
        VmFile {
            busy: AtomicBool::new(false),
            state: UnsafeCell::new(VmState::new()),
        }
    }

    /// Frees the VM (IRP_MJ_CLOSE). Call at PASSIVE_LEVEL.
    pub fn free_all(&mut self) {
        self.state.get_mut().free_all();
    }
}

/// The VM of one handle.
struct VmState {
    vm: Option<Vm>,
    ctls: Option<Controls>,
    vcpus: [Option<PoolBox<WinVcpu>>; abi::MAX_VCPUS as usize],
}

impl VmState {
    const fn new() -> VmState {
        VmState {
            vm: None,
            ctls: None,
            vcpus: [const { None }; abi::MAX_VCPUS as usize],
        }
    }

    fn vcpu_count(&self) -> usize {
        self.vcpus.iter().flatten().count()
    }

    /// Frees everything (IRP_MJ_CLOSE, or a failed Setup). Call at PASSIVE_LEVEL.
    fn free_all(&mut self) {
        let p = NtPlatform;
        for slot in self.vcpus.iter_mut() {
            if let Some(mut v) = slot.take() {
                if let Some(c) = v.cpu {
                    vmxroot::vmclear_on(c, v.hw.pages.vmcs);
                }
                // At PASSIVE_LEVEL: the pages are freed at once, the cache's included.
                v.hw.free_pages(&p);
            }
        }
        self.ctls = None;
        if let Some(vm) = self.vm.take() {
            // Vm::destroy's precondition: INVEPT all-context after the last VM exit, on every
            // processor that may cache this EPT.
            vmxroot::invept_everywhere();
            vm.destroy(&p);
        }
        platform::drain_deferred();
    }
}

/// Answers one request. `buf` is the METHOD_BUFFERED system buffer, at least the request size
/// (checked by the caller); the answer is written over it. Returns the answer's length.
pub fn request(f: &VmFile, op: abi::Op, buf: &mut [u8]) -> Result<usize, NtStatus> {
    let req = abi::decode(
        op,
        buf.get(..op.request_size())
            .ok_or(STATUS_INVALID_PARAMETER)?,
    )
    .map_err(from_abi)?;
    if f.busy.swap(true, Ordering::Acquire) {
        return Err(STATUS_DEVICE_BUSY);
    }
    // SAFETY: `busy` was false and is now ours: no other request uses the state until we
    // release it, and IRP_MJ_CLOSE cannot run while this IRP holds the file object.
    let r = handle(unsafe { &mut *f.state.get() }, req, buf);
    f.busy.store(false, Ordering::Release);
    r
}

fn handle(f: &mut VmState, req: Request, buf: &mut [u8]) -> Result<usize, NtStatus> {
    let g = vmxroot::global().ok_or(STATUS_INVALID_DEVICE_STATE)?;
    let p = NtPlatform;
    let enc = |r: Result<usize, abi::AbiError>| r.map_err(|_| STATUS_BUFFER_TOO_SMALL);
    match req {
        Request::Setup {
            mode,
            mem_bytes,
            vcpus,
            page_limit,
        } => {
            if f.vm.is_some() {
                return Err(STATUS_INVALID_DEVICE_STATE);
            }
            let (mode, ctls) = answer::mode_controls(&g.caps, g.mode, mode).map_err(from_core)?;
            let mut vm = Vm::new(&p, g.caps.ept_features(), mode, page_limit).map_err(from_core)?;
            if let Err(e) = vm.add_ram(&p, mem_bytes) {
                vm.destroy(&p);
                return Err(from_core(e));
            }
            f.vm = Some(vm);
            f.ctls = Some(ctls);
            for _ in 0..vcpus {
                if let Err(e) = add_vcpu(f, g) {
                    f.free_all();
                    return Err(e);
                }
            }
            Ok(0)
        }
        Request::LoadElf { image, len } => {
            let vm = f.vm.as_mut().ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let mut bytes = PoolBuf::zeroed(len as usize).ok_or(STATUS_INSUFFICIENT_RESOURCES)?;
            copy_from_user(bytes.bytes_mut(), image)?;
            let entry = match vm.load_elf(&p, bytes.bytes()) {
                Ok(e) => e,
                Err(LoadError::Elf(_)) => return Err(STATUS_INVALID_IMAGE_FORMAT),
                Err(LoadError::Vm(e)) => return Err(from_core(e)),
            };
            for v in f.vcpus.iter_mut().flatten() {
                v.hw.rip = entry;
                v.hw.regs_dirty = true;
            }
            enc(abi::LoadElfResp { entry }.to_bytes(buf))
        }
        Request::Run { vcpu } => {
            let resp = run(f, g, vcpu)?;
            enc(resp.to_bytes(buf))
        }
        Request::GetRegs { vcpu } => enc(vcpu_mut(f, vcpu)?.hw.regs().to_bytes(buf)),
        Request::SetRegs { vcpu, regs } => {
            vcpu_mut(f, vcpu)?.hw.set_regs(&regs);
            Ok(0)
        }
        Request::AddSlot { gpa, size } => {
            let vm = f.vm.as_mut().ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let slot = vm.add_slot(&p, gpa, size).map_err(from_core)?;
            invept_vm(vm);
            enc(abi::AddSlotResp {
                slot: slot as u32,
                reserved: 0,
            }
            .to_bytes(buf))
        }
        Request::CreateVcpu => {
            let index = add_vcpu(f, g)?;
            enc(abi::CreateVcpuResp {
                vcpu: index,
                reserved: 0,
            }
            .to_bytes(buf))
        }
        Request::SetMode { mode } => {
            let vm = f.vm.as_mut().ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let (mode, ctls) = answer::mode_controls(&g.caps, g.mode, mode).map_err(from_core)?;
            vm.set_mode(&p, mode).map_err(from_core)?;
            invept_vm(vm);
            f.ctls = Some(ctls);
            Ok(0)
        }
        Request::DirtyLog {
            slot,
            bitmap,
            bitmap_len,
            harvest,
        } => {
            let vm = f.vm.as_mut().ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let pages = vm
                .slots()
                .find(|(i, _)| *i == slot as usize)
                .map(|(_, s)| s.pages)
                .ok_or(STATUS_INVALID_PARAMETER)?;
            let words = pages.div_ceil(64) as usize;
            if bitmap_len < words as u64 * 8 {
                return Err(STATUS_BUFFER_TOO_SMALL);
            }
            let mut bits = PoolBuf::zeroed(words * 8).ok_or(STATUS_INSUFFICIENT_RESOURCES)?;
            if harvest {
                vm.harvest(&p, slot as usize, bits.words_mut())
                    .map_err(from_core)?;
            } else {
                vm.get_dirty_log(&p, slot as usize, bits.words_mut())
                    .map_err(from_core)?;
            }
            invept_vm(vm);
            copy_to_user(bitmap, bits.bytes())?;
            Ok(0)
        }
        Request::ClearDirtyLog {
            slot,
            first_page,
            num_pages,
            mask,
        } => {
            let vm = f.vm.as_mut().ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let words = num_pages.div_ceil(64) as usize;
            let mut m = PoolBuf::zeroed(words * 8).ok_or(STATUS_INSUFFICIENT_RESOURCES)?;
            copy_from_user(m.bytes_mut(), mask)?;
            vm.clear_dirty_log(&p, slot as usize, first_page, num_pages, m.words_mut())
                .map_err(from_core)?;
            invept_vm(vm);
            Ok(0)
        }
        Request::Stats => {
            let mut s = abi::StatsResp::default();
            s.vm_pages = f.vm.as_ref().map_or(0, |v| v.pages_held())
                + f.vcpus
                    .iter()
                    .flatten()
                    .map(|v| v.hw.pages_held())
                    .sum::<u64>();
            s.driver_pages = platform::pages_held();
            s.mode = f.vm.as_ref().map_or(0, |v| v.mode() as u32);
            s.vcpus = f.vcpu_count() as u32;
            for v in f.vcpus.iter().flatten() {
                for (a, b) in s.exits.iter_mut().zip(v.hw.state.exits.iter()) {
                    *a += *b;
                }
            }
            enc(s.to_bytes(buf))
        }
        Request::Caps => {
            // Windows has no #GP-safe RDMSR: the core asks only for MSRs that exist.
            let c = answer::caps_resp(&g.caps, g.mode, &mut |msr| {
                // SAFETY: `answer::caps_msr_exists` held the MSR to the SDM's existence rules on
                // a processor the admission check accepted; CPL 0.
                Some(unsafe { cpu::rdmsr(msr) })
            });
            enc(c.to_bytes(buf))
        }
        Request::Explain { gpa, .. } => {
            let vm = f.vm.as_ref().ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let mut r = smudge_core::answer::explain_guest(vm, &p, gpa).map_err(from_core)?;
            if r.ept_leaf != 0 {
                // SAFETY: MmGetVirtualForPhysical only looks the address up.
                r.host_va = unsafe { nt::MmGetVirtualForPhysical(r.hpa as i64) } as u64;
                if let Some(leaf) = host_pte(r.host_va) {
                    r.host_pte = leaf.entry;
                    r.host_level = leaf.level;
                }
            }
            enc(r.to_bytes(buf))
        }
        Request::Mem {
            gpa,
            buf: ubuf,
            len,
            write,
        } => {
            let vm = f.vm.as_mut().ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let mut tmp = PoolBuf::zeroed(len as usize).ok_or(STATUS_INSUFFICIENT_RESOURCES)?;
            if write {
                copy_from_user(tmp.bytes_mut(), ubuf)?;
                vm.write_guest(&p, gpa, tmp.bytes()).map_err(from_core)?;
            } else {
                vm.read_guest(&p, gpa, tmp.bytes_mut()).map_err(from_core)?;
                copy_to_user(ubuf, tmp.bytes())?;
            }
            Ok(0)
        }
    }
}

/// The host PTE that maps `va`, through a walk from this processor's CR3 whose table reads
/// cannot fault (MmCopyMemory of physical memory).
fn host_pte(va: u64) -> Option<hostpt::HostLeaf> {
    if va == 0 {
        return None;
    }
    let mut cell = PoolBuf::zeroed(8)?;
    let cr3: u64;
    // SAFETY: reading CR3 at CPL 0 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags))
    };
    let la57 = cpu::cr4() & (1 << 12) != 0;
    let mut read = |pa: u64| -> Option<u64> {
        let mut copied = 0usize;
        let target = cell.bytes_mut();
        // SAFETY: an 8-byte nonpaged target; a physical source that MmCopyMemory validates
        // (it fails instead of faulting).
        let s = unsafe {
            nt::MmCopyMemory(
                target.as_mut_ptr().cast(),
                pa,
                8,
                nt::MM_COPY_MEMORY_PHYSICAL,
                &mut copied,
            )
        };
        if s < 0 || copied != 8 {
            return None;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(target.get(..8)?);
        Some(u64::from_le_bytes(b))
    };
    hostpt::walk(cr3, va, la57, &mut read)
}

/// INVEPT on every processor when the EPT asks for it (after a harvest or clear).
fn invept_vm(vm: &mut Vm) {
    if vm.ept().needs_invept() {
        vmxroot::invept_everywhere();
        vm.ept_mut().invept_done(&NtPlatform);
        platform::drain_deferred();
    }
}

/// vCPU `index`, between runs (requests of a handle never overlap).
fn vcpu_mut(f: &mut VmState, index: u32) -> Result<&mut WinVcpu, NtStatus> {
    f.vcpus
        .get_mut(index as usize)
        .and_then(|v| v.as_mut())
        .map(|v| &mut **v)
        .ok_or(STATUS_INVALID_PARAMETER)
}

/// Creates the next vCPU of the VM; returns its index.
fn add_vcpu(f: &mut VmState, g: &Global) -> Result<u32, NtStatus> {
    let p = NtPlatform;
    let index = f.vcpu_count() as u32;
    let vm = f.vm.as_ref().ok_or(STATUS_INVALID_DEVICE_STATE)?;
    let (rip, rsp) = answer::vcpu_entry(vm, index).map_err(from_core)?;
    let slot = f
        .vcpus
        .get_mut(index as usize)
        .ok_or(STATUS_QUOTA_EXCEEDED)?;
    let pages = VcpuPages::alloc(&p, &g.caps).map_err(|_| STATUS_INSUFFICIENT_RESOURCES)?;
    let v = WinVcpu {
        hw: HwVcpu::new(index, pages, rip, rsp),
        cpu: None,
    };
    match PoolBox::new(v) {
        Ok(b) => {
            *slot = Some(b);
            Ok(index)
        }
        Err(mut v) => {
            v.hw.free_pages(&p);
            Err(STATUS_INSUFFICIENT_RESOURCES)
        }
    }
}

/// The VM as `hw::run` sees it. RUN holds the handle's `busy` flag, so this thread alone uses
/// the VM; the loop takes it only around exit handling and never nests those calls.
struct Exclusive<'a>(UnsafeCell<&'a mut Vm>);

impl SharedVm for Exclusive<'_> {
    fn with<R, F: FnOnce(&mut Vm) -> R>(&self, f: F) -> R {
        // SAFETY: exclusive by `busy` (see the type); `hw::run` does not call `with` from
        // inside `f`, so no two &mut to the VM exist at once.
        f(unsafe { &mut **self.0.get() })
    }
}

/// Interrupt time, 100 ns units.
fn now() -> u64 {
    let mut qpc = 0u64;
    // SAFETY: a valid out pointer; callable at any IRQL.
    unsafe { nt::KeQueryInterruptTimePrecise(&mut qpc) }
}

/// The run loop's view of Windows: one stay at DISPATCH_LEVEL ends after `budget::DISPATCH_STAY`.
struct NtEnv {
    stay_start: u64,
}

impl RunEnv for NtEnv {
    fn irq_save(&self) -> usize {
        cpu::irq_save()
    }
    fn irq_restore(&self, flags: usize) {
        cpu::irq_restore(flags)
    }
    fn should_return(&self) -> bool {
        budget::stay_over(self.stay_start, now())
    }
}

fn run(f: &mut VmState, g: &Global, index: u32) -> Result<abi::RunResp, NtStatus> {
    let ctls = f.ctls.ok_or(STATUS_INVALID_DEVICE_STATE)?;
    let vm = f.vm.as_mut().ok_or(STATUS_INVALID_DEVICE_STATE)?;
    // Harvests done between runs may have left an INVEPT obligation.
    invept_vm(vm);
    let v = f
        .vcpus
        .get_mut(index as usize)
        .and_then(|v| v.as_mut())
        .ok_or(STATUS_INVALID_PARAMETER)?;
    let here = processors::current();
    if let Some(old) = v.cpu {
        if old != here {
            // SDM 25.11.1: the VMCS leaves `old` through VMCLEAR there.
            vmxroot::vmclear_on(old, v.hw.pages.vmcs);
            v.cpu = None;
        }
    }
    // The request stays on this processor; every stay at DISPATCH_LEVEL below is on it.
    let pinned = processors::pin(here)?;
    let shared = Exclusive(UnsafeCell::new(vm));
    let start = now();
    let result = loop {
        // PASSIVE_LEVEL: the exit handler backs guest memory from this cache only.
        v.hw.cache.refill(&NtPlatform);
        let mut xsave = nt::XStateSave::new();
        // SAFETY: PASSIVE_LEVEL; `xsave` lives until the matching restore below.
        let status =
            unsafe { nt::KeSaveExtendedProcessorState(nt::XSTATE_MASK_LEGACY, &mut xsave) };
        if status < 0 {
            break Err(status);
        }
        // SAFETY: PASSIVE_LEVEL; lowered below.
        let old_irql = unsafe { cpu::raise_to_dispatch() };
        let cpu_now = processors::current();
        let r = if !vmxroot::vmx_on(cpu_now) {
            Err(STATUS_IO_DEVICE_ERROR)
        } else {
            if v.cpu != Some(cpu_now) {
                // SAFETY: VMX root operation; a VMCS not active anywhere is cleared before its
                // first VMPTRLD here, which also resets its launch state (SDM 25.11.3).
                let _ = unsafe { arch::vmclear(v.hw.pages.vmcs) };
                v.hw.launched = false;
                v.cpu = Some(cpu_now);
            }
            let env = NtEnv { stay_start: now() };
            // SAFETY: VMX root operation on this processor, DISPATCH_LEVEL (no preemption), the
            // legacy FPU state saved for the guest's use, the VMCS clear or active here.
            Ok(unsafe { hw::run(&shared, &mut v.hw, &NtPlatform, &g.caps, &ctls, &env) })
        };
        // SAFETY: pairs with the raise above.
        unsafe { cpu::lower_irql(old_irql) };
        // SAFETY: pairs with the save above, at the same IRQL.
        unsafe { nt::KeRestoreExtendedProcessorState(&mut xsave) };
        platform::drain_deferred();
        match r {
            Err(s) => break Err(s),
            // Refilled at the top of the loop.
            Ok(Ok(HwExit::NeedPages)) => {}
            Ok(Ok(HwExit::Exit(RunExit::Interrupted))) => {
                if v.hw.state.console_len > 0 {
                    break Ok(Ok(RunExit::Console));
                }
                if budget::slice_over(start, now()) {
                    break Ok(Ok(RunExit::Interrupted));
                }
            }
            Ok(Ok(HwExit::Exit(x))) => break Ok(Ok(x)),
            Ok(Err(e)) => break Ok(Err(e)),
        }
    };
    drop(pinned);
    let result = result?;
    let mut resp = abi::RunResp::default();
    answer::take_console(&mut resp, &mut v.hw.state);
    answer::fill_run(&mut resp, result, &mut v.hw.state);
    Ok(resp)
}
