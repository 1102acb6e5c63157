//! One open of `\\.\Smudge` = one VM: the same requests as the Linux module's `/dev/smudge`,
//! decoded by `smudge_core::abi` and served by the same core (Vm, vCPU pages, `vmx::hw::run`,
//! the RUN and CAPS answers, the host page-table walk).
//!
//! The per-handle object lives in nonpaged pool, reached through FILE_OBJECT.FsContext. Its
//! requests share the VM as the Linux module's do (`smudge_windows::share` holds the protocol
//! and its tests): vCPUs are indices within the VM, and RUN calls for different vCPUs run at
//! once from different threads, one RUN per vCPU. VM-level requests (everything else) run one
//! at a time; most of them first kick every vCPU out of guest mode and wait until none is in the
//! run loop. A request that finds its vCPU, or the VM, taken gets STATUS_DEVICE_BUSY.
//!
//! Note that the I/O manager serialises every request on a file object opened for synchronous
//! I/O (no FILE_FLAG_OVERLAPPED) before the driver sees it; concurrent RUNs need a handle opened
//! with FILE_FLAG_OVERLAPPED.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};

use smudge_core::abi::{self, Request, Wire};
use smudge_core::arch;
use smudge_core::vcpu::VcpuPages;
use smudge_core::vm::{LoadError, RunExit, Vm};
use smudge_core::vmx::caps::Controls;
use smudge_core::vmx::hw::{self, HwError, HwExit, HwVcpu, RunEnv, SharedVm};
use smudge_core::{answer, hostpt};
use smudge_windows::budget;
use smudge_windows::share::{Backoff, Busy, Pause, Share};
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

/// A vCPU slot: one RUN (or GET_REGS/SET_REGS) of it at a time.
struct VcpuSlot {
    busy: Busy,
    /// Used by the holder of `busy` while it is in the run loop or holds the handle's VM-level
    /// claim, and by kicking VM-level requests (no vCPU in the loop then).
    v: UnsafeCell<WinVcpu>,
}

/// The per-handle object (the Linux module's `VmFile`).
pub struct VmFile {
    /// The handle's half of the protocol: VM-level claim, kick, vCPUs in the loop.
    share: Share,
    /// Setup finished: the VM exists until IRP_MJ_CLOSE.
    ready: AtomicBool,
    /// The spin lock around the VM: vCPUs take it only around exit handling (inside
    /// `hw::run`, at DISPATCH_LEVEL). VM-level requests do not need it: they use the VM only
    /// while every vCPU is kicked out of the loop.
    locked: AtomicBool,
    /// The VM (from `PoolBox::into_raw`), set by Setup, freed at IRP_MJ_CLOSE (or by a failed
    /// Setup).
    vm: AtomicPtr<Vm>,
    /// Written by Setup and SET_MODE (VM-level, every vCPU kicked out), read by RUN inside the
    /// run loop's protocol.
    ctls: UnsafeCell<Option<Controls>>,
    /// vCPU `i` (from `PoolBox::into_raw`), published before `nr_vcpus` counts it; freed only
    /// when no request of the handle runs (IRP_MJ_CLOSE, a failed Setup).
    vcpus: [AtomicPtr<VcpuSlot>; abi::MAX_VCPUS as usize],
    nr_vcpus: AtomicU32,
}

// SAFETY: every field is atomic or guarded by the protocol documented on it (`share`).
unsafe impl Sync for VmFile {}

// PoolBox holds objects aligned to at most 16 bytes (x64 pool granularity).
const _: () = assert!(
    core::mem::align_of::<VcpuSlot>() <= 16
        && core::mem::align_of::<Vm>() <= 16
        && core::mem::align_of::<VmFile>() <= 16
);

impl VmFile {
    pub const fn new() -> VmFile {
        VmFile {
            share: Share::new(),
            ready: AtomicBool::new(false),
            locked: AtomicBool::new(false),
            vm: AtomicPtr::new(core::ptr::null_mut()),
            ctls: UnsafeCell::new(None),
            vcpus: [const { AtomicPtr::new(core::ptr::null_mut()) }; abi::MAX_VCPUS as usize],
            nr_vcpus: AtomicU32::new(0),
        }
    }

    /// Frees the VM (IRP_MJ_CLOSE: no request of the handle is outstanding). Call at
    /// PASSIVE_LEVEL.
    pub fn free_all(&mut self) {
        self.release();
    }

    /// vCPU `index`, once created.
    fn vcpu(&self, index: u32) -> Option<&VcpuSlot> {
        if index >= self.nr_vcpus.load(Ordering::Acquire) {
            return None;
        }
        let ptr = self.vcpus.get(index as usize)?.load(Ordering::Acquire);
        // SAFETY: a published vCPU stays allocated until IRP_MJ_CLOSE or a failed Setup, and
        // neither overlaps a request that reaches this (Setup holds the VM-level claim and runs
        // before `ready`, which RUN checks first).
        unsafe { ptr.as_ref() }
    }

    /// The vCPUs created so far.
    fn vcpus(&self) -> impl Iterator<Item = &VcpuSlot> {
        (0..self.nr_vcpus.load(Ordering::Acquire)).filter_map(|i| self.vcpu(i))
    }

    /// Frees the vCPUs, the controls and the VM. No other request of the handle runs (CLOSE, or
    /// a failed Setup: it holds the VM-level claim and `ready` is false, so no RUN started).
    /// Call at PASSIVE_LEVEL.
    fn release(&self) {
        let p = NtPlatform;
        self.ready.store(false, Ordering::Release);
        self.nr_vcpus.store(0, Ordering::Release);
        for ptr in self.vcpus.iter() {
            let raw = ptr.swap(core::ptr::null_mut(), Ordering::AcqRel);
            if raw.is_null() {
                continue;
            }
            // SAFETY: published by add_vcpu from PoolBox::into_raw and taken back exactly once
            // (the swap); no other request runs, so nobody references the vCPU.
            let mut slot = unsafe { PoolBox::from_raw(raw) };
            let v = slot.v.get_mut();
            if let Some(c) = v.cpu.take() {
                vmxroot::vmclear_on(c, v.hw.pages.vmcs);
            }
            // At PASSIVE_LEVEL: the pages are freed at once, the cache's included.
            v.hw.free_pages(&p);
        }
        // SAFETY: no other request runs (see above), so nobody reads the controls.
        unsafe { *self.ctls.get() = None };
        let raw = self.vm.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !raw.is_null() {
            // SAFETY: stored by Setup from PoolBox::into_raw, taken back once (the swap).
            let vm = unsafe { PoolBox::from_raw(raw) }.into_inner();
            // Vm::destroy's precondition: INVEPT all-context after the last VM exit, on every
            // processor that may cache this EPT.
            vmxroot::invept_everywhere();
            vm.destroy(&p);
        }
        platform::drain_deferred();
    }
}

/// The waiting of the protocol, at PASSIVE_LEVEL: spin while a kick normally ends, then sleep
/// (KeDelayExecutionThread) 1 ms at a time.
fn waiter() -> impl FnMut() {
    let mut backoff = Backoff::new();
    move || match backoff.step(now()) {
        Pause::Spin => core::hint::spin_loop(),
        Pause::Sleep => {
            let interval = smudge_windows::share::SLEEP;
            // SAFETY: PASSIVE_LEVEL (every caller waits there); a non-alertable kernel-mode wait
            // on a valid relative interval that outlives the call.
            let _ = unsafe { nt::KeDelayExecutionThread(nt::KERNEL_MODE, 0, &interval) };
        }
    }
}

/// Answers one request. `buf` is the METHOD_BUFFERED system buffer, at least the request size
/// (checked by the caller); the answer is written over it. Returns the answer's length. Call at
/// PASSIVE_LEVEL.
pub fn request(f: &VmFile, op: abi::Op, buf: &mut [u8]) -> Result<usize, NtStatus> {
    let req = abi::decode(
        op,
        buf.get(..op.request_size())
            .ok_or(STATUS_INVALID_PARAMETER)?,
    )
    .map_err(from_abi)?;
    let g = vmxroot::global().ok_or(STATUS_INVALID_DEVICE_STATE)?;
    let enc = |r: Result<usize, abi::AbiError>| r.map_err(|_| STATUS_BUFFER_TOO_SMALL);
    if let Request::Run { vcpu } = req {
        let resp = run_request(f, g, vcpu)?;
        return enc(resp.to_bytes(buf));
    }
    // Setup has no vCPU to kick yet, GET_REGS and SET_REGS hold their vCPU instead, CAPS uses
    // no VM state.
    let kick = !matches!(
        req,
        Request::Setup { .. } | Request::GetRegs { .. } | Request::SetRegs { .. } | Request::Caps
    );
    let claim = f
        .share
        .vm_request(kick, waiter())
        .ok_or(STATUS_DEVICE_BUSY)?;
    let r = match req {
        Request::Setup {
            mode,
            mem_bytes,
            vcpus,
            page_limit,
        } => setup(f, g, mode, mem_bytes, vcpus, page_limit),
        Request::GetRegs { vcpu } => {
            let regs = with_idle_vcpu(f, vcpu, |hw| hw.regs())?;
            enc(regs.to_bytes(buf))
        }
        Request::SetRegs { vcpu, regs } => {
            with_idle_vcpu(f, vcpu, |hw| hw.set_regs(&regs))?;
            Ok(0)
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
        // Every other request kicked (`kick` above); checked, since the SAFETY below rests on it.
        _ if !claim.kicked() => Err(STATUS_INVALID_DEVICE_REQUEST),
        req => {
            // SAFETY: the VM-level claim excludes every other request but RUNs, and its kick
            // (checked just above) keeps every RUN out of the run loop, the only place where
            // RUNs touch the VM and the controls. The VM stays allocated until CLOSE.
            let (mut vm, ctls) =
                unsafe { (f.vm.load(Ordering::Acquire).as_mut(), &mut *f.ctls.get()) };
            let r = handle(f, vm.as_deref_mut(), ctls, req, buf);
            // No INVEPT obligation may outlive the kick: vCPUs of other processors could run
            // on stale translations otherwise.
            if let Some(vm) = vm {
                invept_vm(vm);
            }
            r
        }
    };
    drop(claim);
    r
}

/// SETUP: the VM, its controls and its first vCPUs. The caller holds the VM-level claim.
fn setup(
    f: &VmFile,
    g: &Global,
    mode: Option<smudge_core::dirty::Mode>,
    mem_bytes: u64,
    vcpus: u32,
    page_limit: u64,
) -> Result<usize, NtStatus> {
    let p = NtPlatform;
    if f.ready.load(Ordering::Acquire) || !f.vm.load(Ordering::Acquire).is_null() {
        return Err(STATUS_INVALID_DEVICE_STATE);
    }
    let (mode, ctls) = answer::mode_controls(&g.caps, g.mode, mode).map_err(from_core)?;
    let mut vm = Vm::new(&p, g.caps.ept_features(), mode, page_limit).map_err(from_core)?;
    if let Err(e) = vm.add_ram(&p, mem_bytes) {
        vm.destroy(&p);
        return Err(from_core(e));
    }
    let vm = match PoolBox::new(vm) {
        Ok(b) => b.into_raw(),
        Err(vm) => {
            vm.destroy(&p);
            return Err(STATUS_INSUFFICIENT_RESOURCES);
        }
    };
    // SAFETY: `ready` is false, so no RUN has started, and the caller's claim excludes every
    // other request: nobody else reads the controls.
    unsafe { *f.ctls.get() = Some(ctls) };
    f.vm.store(vm, Ordering::Release);
    for _ in 0..vcpus {
        // SAFETY: stored just above, freed only by `release` (below, or at CLOSE); no other
        // request uses it yet (see above).
        let r = add_vcpu(f, g, unsafe { &*vm });
        if let Err(e) = r {
            f.release();
            return Err(e);
        }
    }
    // SAFETY: as above; the shared borrows of the loop have ended.
    invept_vm(unsafe { &mut *vm });
    f.ready.store(true, Ordering::Release);
    Ok(0)
}

/// A VM-level request with every vCPU kicked out: `vm` and `ctls` are this thread's alone.
fn handle(
    f: &VmFile,
    vm: Option<&mut Vm>,
    ctls: &mut Option<Controls>,
    req: Request,
    buf: &mut [u8],
) -> Result<usize, NtStatus> {
    let g = vmxroot::global().ok_or(STATUS_INVALID_DEVICE_STATE)?;
    let p = NtPlatform;
    let enc = |r: Result<usize, abi::AbiError>| r.map_err(|_| STATUS_BUFFER_TOO_SMALL);
    match req {
        Request::LoadElf { image, len } => {
            let vm = vm.ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let mut bytes = PoolBuf::zeroed(len as usize).ok_or(STATUS_INSUFFICIENT_RESOURCES)?;
            copy_from_user(bytes.bytes_mut(), image)?;
            let entry = match vm.load_elf(&p, bytes.bytes()) {
                Ok(e) => e,
                Err(LoadError::Elf(_)) => return Err(STATUS_INVALID_IMAGE_FORMAT),
                Err(LoadError::Vm(e)) => return Err(from_core(e)),
            };
            for slot in f.vcpus() {
                // SAFETY: every vCPU is kicked out and no other VM-level request runs: this
                // thread alone uses the vCPUs' state (only the `hw` field is borrowed).
                let hw = unsafe { &mut (*slot.v.get()).hw };
                hw.load_entry(entry);
            }
            enc(abi::LoadElfResp { entry }.to_bytes(buf))
        }
        Request::AddSlot { gpa, size } => {
            let vm = vm.ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let slot = vm.add_slot(&p, gpa, size).map_err(from_core)?;
            invept_vm(vm);
            enc(abi::AddSlotResp {
                slot: slot as u32,
                reserved: 0,
            }
            .to_bytes(buf))
        }
        Request::CreateVcpu => {
            let vm = vm.ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let index = add_vcpu(f, g, vm)?;
            enc(abi::CreateVcpuResp {
                vcpu: index,
                reserved: 0,
            }
            .to_bytes(buf))
        }
        Request::SetMode { mode } => {
            let vm = vm.ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let (mode, new) = answer::mode_controls(&g.caps, g.mode, mode).map_err(from_core)?;
            vm.set_mode(&p, mode).map_err(from_core)?;
            invept_vm(vm);
            *ctls = Some(new);
            Ok(0)
        }
        Request::DirtyLog {
            slot,
            bitmap,
            bitmap_len,
            harvest,
        } => {
            let vm = vm.ok_or(STATUS_INVALID_DEVICE_STATE)?;
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
            let vm = vm.ok_or(STATUS_INVALID_DEVICE_STATE)?;
            let words = num_pages.div_ceil(64) as usize;
            let mut m = PoolBuf::zeroed(words * 8).ok_or(STATUS_INSUFFICIENT_RESOURCES)?;
            copy_from_user(m.bytes_mut(), mask)?;
            vm.clear_dirty_log(&p, slot as usize, first_page, num_pages, m.words_mut())
                .map_err(from_core)?;
            invept_vm(vm);
            Ok(0)
        }
        Request::Stats => {
            let mut s = abi::StatsResp {
                vm_pages: vm.as_ref().map_or(0, |v| v.pages_held()),
                driver_pages: platform::pages_held(),
                mode: vm.as_ref().map_or(0, |v| v.mode() as u32),
                vcpus: f.nr_vcpus.load(Ordering::Acquire),
                ..Default::default()
            };
            for slot in f.vcpus() {
                // SAFETY: every vCPU is kicked out: nobody writes its state now.
                let hw = unsafe { &(*slot.v.get()).hw };
                s.vm_pages += hw.pages_held();
                for (a, b) in s.exits.iter_mut().zip(hw.state.exits.iter()) {
                    *a += *b;
                }
            }
            enc(s.to_bytes(buf))
        }
        Request::Explain { gpa, .. } => {
            let vm = vm.ok_or(STATUS_INVALID_DEVICE_STATE)?;
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
            let vm = vm.ok_or(STATUS_INVALID_DEVICE_STATE)?;
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
        // Served by `request` itself.
        Request::Setup { .. }
        | Request::Run { .. }
        | Request::GetRegs { .. }
        | Request::SetRegs { .. }
        | Request::Caps => Err(STATUS_INVALID_DEVICE_REQUEST),
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

/// INVEPT on every processor when the EPT asks for it (after a harvest or clear). Only with
/// every vCPU kicked out (or none running yet).
fn invept_vm(vm: &mut Vm) {
    if vm.ept().needs_invept() {
        vmxroot::invept_everywhere();
        vm.ept_mut().invept_done(&NtPlatform);
        platform::drain_deferred();
    }
}

/// Runs `op` on vCPU `index` between its runs: a RUN of it in progress gets STATUS_DEVICE_BUSY.
/// The caller holds the VM-level claim.
fn with_idle_vcpu<R>(
    f: &VmFile,
    index: u32,
    op: impl FnOnce(&mut HwVcpu) -> R,
) -> Result<R, NtStatus> {
    let slot = f.vcpu(index).ok_or(STATUS_INVALID_PARAMETER)?;
    let claim = slot.busy.claim().ok_or(STATUS_DEVICE_BUSY)?;
    // SAFETY: the vCPU's claim excludes its RUN, the caller's VM-level claim every other
    // request that touches vCPU state (LOAD_ELF, STATS); only the `hw` field is borrowed.
    let r = op(unsafe { &mut (*slot.v.get()).hw });
    drop(claim);
    Ok(r)
}

/// Creates the next vCPU of `vm` and publishes it; returns its index. Only VM-level requests call
/// it (the claim held), so indices cannot race.
fn add_vcpu(f: &VmFile, g: &Global, vm: &Vm) -> Result<u32, NtStatus> {
    let p = NtPlatform;
    let index = f.nr_vcpus.load(Ordering::Acquire);
    let ptr = f.vcpus.get(index as usize).ok_or(STATUS_QUOTA_EXCEEDED)?;
    let (rip, rsp) = answer::vcpu_entry(vm, index).map_err(from_core)?;
    let pages = VcpuPages::alloc(&p, &g.caps).map_err(|_| STATUS_INSUFFICIENT_RESOURCES)?;
    let slot = VcpuSlot {
        busy: Busy::new(),
        v: UnsafeCell::new(WinVcpu {
            hw: HwVcpu::new(index, pages, rip, rsp),
            cpu: None,
        }),
    };
    match PoolBox::new(slot) {
        Ok(b) => {
            ptr.store(b.into_raw(), Ordering::Release);
            f.nr_vcpus.store(index + 1, Ordering::Release);
            Ok(index)
        }
        Err(mut slot) => {
            slot.v.get_mut().hw.free_pages(&p);
            Err(STATUS_INSUFFICIENT_RESOURCES)
        }
    }
}

/// The VM as `hw::run` sees it: a spin lock around it. The loop takes it at DISPATCH_LEVEL
/// (interrupts on) only around exit handling and never nests those calls, so a holder never
/// waits for anything and two vCPUs pinned to one processor never meet in it (only one of them
/// can be at DISPATCH_LEVEL there).
struct LockedVm<'a> {
    locked: &'a AtomicBool,
    vm: NonNull<Vm>,
}

impl SharedVm for LockedVm<'_> {
    fn with<R, F: FnOnce(&mut Vm) -> R>(&self, f: F) -> R {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the flag excludes the other vCPUs until it is released below; VM-level
        // requests touch the VM only while no vCPU is in the run loop, and the caller of
        // `hw::run` is in it; the VM stays allocated until CLOSE, after every RUN.
        let r = f(unsafe { &mut *self.vm.as_ptr() });
        self.locked.store(false, Ordering::Release);
        r
    }
}

/// Interrupt time, 100 ns units.
fn now() -> u64 {
    let mut qpc = 0u64;
    // SAFETY: a valid out pointer; callable at any IRQL.
    unsafe { nt::KeQueryInterruptTimePrecise(&mut qpc) }
}

/// The run loop's view of Windows: one stay at DISPATCH_LEVEL ends after `budget::DISPATCH_STAY`,
/// or at the first VM exit after a VM-level request kicked the vCPUs.
struct NtEnv<'a> {
    stay_start: u64,
    share: &'a Share,
}

impl RunEnv for NtEnv<'_> {
    fn irq_save(&self) -> usize {
        cpu::irq_save()
    }
    fn irq_restore(&self, flags: usize) {
        cpu::irq_restore(flags)
    }
    fn should_return(&self) -> bool {
        self.share.kicked() || budget::stay_over(self.stay_start, now())
    }
}

/// RUN of vCPU `index`: one at a time per vCPU, several vCPUs at once.
fn run_request(f: &VmFile, g: &Global, index: u32) -> Result<abi::RunResp, NtStatus> {
    if !f.ready.load(Ordering::Acquire) {
        return Err(STATUS_INVALID_DEVICE_STATE);
    }
    let slot = f.vcpu(index).ok_or(STATUS_INVALID_PARAMETER)?;
    let vm = NonNull::new(f.vm.load(Ordering::Acquire)).ok_or(STATUS_INVALID_DEVICE_STATE)?;
    let claim = slot.busy.claim().ok_or(STATUS_DEVICE_BUSY)?;
    let r = run(f, g, slot, vm);
    drop(claim);
    r
}

/// What one pass of the loop decided.
type Outcome = Result<Result<RunExit, HwError>, NtStatus>;

/// The RUN itself; the caller holds the vCPU's claim. Everything that touches the vCPU or the
/// VM happens inside the run loop's protocol (`f.share.enter`), so a kicking VM-level request
/// never overlaps it; between passes the thread waits at PASSIVE_LEVEL while a kick is on.
fn run(f: &VmFile, g: &Global, slot: &VcpuSlot, vm: NonNull<Vm>) -> Result<abi::RunResp, NtStatus> {
    let vp = slot.v.get();
    let shared = LockedVm {
        locked: &f.locked,
        vm,
    };
    let here = processors::current();
    {
        let inside = f.share.enter(waiter());
        // SAFETY: the claim makes this thread the vCPU's only RUN (and excludes GET_REGS and
        // SET_REGS of it); `inside` keeps the VM-level requests that touch vCPUs out.
        let v = unsafe { &mut *vp };
        if let Some(old) = v.cpu {
            if old != here {
                // SDM 25.11.1: the VMCS leaves `old` through VMCLEAR there.
                vmxroot::vmclear_on(old, v.hw.pages.vmcs);
                v.cpu = None;
            }
        }
        drop(inside);
    }
    // The request stays on this processor; every stay at DISPATCH_LEVEL below is on it.
    let pinned = processors::pin(here)?;
    let start = now();
    let (result, inside) = loop {
        let inside = f.share.enter(waiter());
        // SAFETY: as above.
        let v = unsafe { &mut *vp };
        // SAFETY: inside the protocol: Setup and SET_MODE write the controls only while no vCPU
        // is in the loop, and this one counts in it until `inside` is dropped.
        let Some(ctls) = (unsafe { *f.ctls.get() }) else {
            break (Err(STATUS_INVALID_DEVICE_STATE), inside);
        };
        // PASSIVE_LEVEL: the exit handler backs guest memory from this cache only.
        v.hw.cache.refill(&NtPlatform);
        let mut xsave = nt::XStateSave::new();
        // SAFETY: PASSIVE_LEVEL; `xsave` lives until the matching restore below.
        let status =
            unsafe { nt::KeSaveExtendedProcessorState(nt::XSTATE_MASK_LEGACY, &mut xsave) };
        if status < 0 {
            break (Err(status), inside);
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
            let env = NtEnv {
                stay_start: now(),
                share: &f.share,
            };
            // SAFETY: VMX root operation on this processor, DISPATCH_LEVEL (no preemption), the
            // legacy FPU state saved for the guest's use, the VMCS clear or active here.
            Ok(unsafe { hw::run(&shared, &mut v.hw, &NtPlatform, &g.caps, &ctls, &env) })
        };
        // SAFETY: pairs with the raise above.
        unsafe { cpu::lower_irql(old_irql) };
        // SAFETY: pairs with the save above, at the same IRQL.
        unsafe { nt::KeRestoreExtendedProcessorState(&mut xsave) };
        platform::drain_deferred();
        let done: Option<Outcome> = match r {
            Err(s) => Some(Err(s)),
            // Refilled at the top of the loop.
            Ok(Ok(HwExit::NeedPages)) => None,
            // The stay ended (its time, or a kick: the next pass waits for the request).
            Ok(Ok(HwExit::Exit(RunExit::Interrupted))) => {
                if v.hw.state.console_len > 0 {
                    Some(Ok(Ok(RunExit::Console)))
                } else if budget::slice_over(start, now()) {
                    Some(Ok(Ok(RunExit::Interrupted)))
                } else {
                    None
                }
            }
            Ok(Ok(HwExit::Exit(x))) => Some(Ok(Ok(x))),
            Ok(Err(e)) => Some(Ok(Err(e))),
        };
        if let Some(done) = done {
            break (done, inside);
        }
        drop(inside);
    };
    drop(pinned);
    let answer = result.map(|result| {
        // SAFETY: as above (`inside` is still held).
        let v = unsafe { &mut *vp };
        let mut resp = abi::RunResp::default();
        answer::take_console(&mut resp, &mut v.hw.state);
        answer::fill_run(&mut resp, result, &mut v.hw.state);
        resp
    });
    drop(inside);
    answer
}
