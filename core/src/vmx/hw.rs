//! The hardware run loop (part of the arch layer): VMCS load, VM entry, exit decoding, and the
//! hand-off to the safe exit handler in `vm`. Shared by the Linux and Windows shims.

use crate::abi::Regs;
use crate::arch::{self, FxArea, GuestGprs, HostState, InveptType, VmFail};
use crate::kvm::ring::Ring;
use crate::platform::Platform;
use crate::spec::Duties;
use crate::vcpu::{Cached, PageCache, VcpuPages};
use crate::vm::{reason, Action, ExitInfo, RunExit, VcpuState, Vm};
use crate::vmx::active::{self, Held};
use crate::vmx::caps::{pin, secondary, Controls, VmxCaps};
use crate::vmx::checks::{self, Violation};
use crate::vmx::fields::Field;
use crate::vmx::guest_state::GuestState;
use crate::vmx::setup::{self, VcpuConfig};
use crate::vmx::vmcs::{VmcsAccess, VmcsError};
use core::sync::atomic::{AtomicU64, Ordering};

/// The current VMCS of this CPU, through VMREAD/VMWRITE.
pub struct HwVmcs {
    _current: (),
}

impl HwVmcs {
    /// The current VMCS.
    ///
    /// # Safety
    /// VMX operation on this CPU (VMREAD/VMWRITE raise #UD outside it) for as long as the value
    /// is used; without a current VMCS the accesses fail with [`VmcsError::NoCurrentVmcs`].
    pub unsafe fn current() -> HwVmcs {
        HwVmcs { _current: () }
    }
}

impl VmcsAccess for HwVmcs {
    fn read(&self, field: Field) -> Result<u64, VmcsError> {
        // SAFETY: VMX operation (the constructor's contract).
        unsafe { arch::vmread(field.encoding()) }.map_err(|f| vmcs_error(f, field))
    }
    fn write(&mut self, field: Field, value: u64) -> Result<(), VmcsError> {
        // SAFETY: as above.
        unsafe { arch::vmwrite(field.encoding(), value) }.map_err(|f| vmcs_error(f, field))
    }
}

/// SDM 31.4 (VM-instruction error numbers) for VMREAD/VMWRITE.
fn vmcs_error(fail: VmFail, field: Field) -> VmcsError {
    match fail {
        VmFail::Invalid => VmcsError::NoCurrentVmcs,
        VmFail::Valid(12) => VmcsError::UnsupportedField(field),
        VmFail::Valid(13) => VmcsError::ReadOnlyField(field),
        VmFail::Valid(n) => VmcsError::InstructionError(n),
    }
}

/// The VMX instruction outcome behind a [`VmcsError`] (the inverse of `vmcs_error`).
fn vm_fail(e: VmcsError) -> VmFail {
    match e {
        VmcsError::NoCurrentVmcs => VmFail::Invalid,
        VmcsError::UnsupportedField(_) => VmFail::Valid(12),
        VmcsError::ReadOnlyField(_) => VmFail::Valid(13),
        VmcsError::InstructionError(n) => VmFail::Valid(n),
    }
}

/// The preemption-timer value for one stay in the guest (ticks of TSC >> MISC[4:0]): bounds
/// how long the guest runs before the host gets the CPU back (SDM 26.5.1).
pub const PREEMPTION_QUANTUM: u64 = 200_000;

/// A VM shared by the vCPUs of several CPUs: the loop takes the VM only around exit handling,
/// never while the guest runs (`session` keeps it behind a spin lock).
pub trait SharedVm {
    /// Runs `f` with exclusive access to the VM; None when there is no VM (any more).
    fn with<R, F: FnOnce(&mut Vm) -> R>(&self, f: F) -> Option<R>;
}

/// What the OS supplies to the loop.
pub trait RunEnv {
    /// Disables interrupts on this CPU; returns the previous state.
    fn irq_save(&self) -> usize;
    /// Restores the interrupt state (a pending external interrupt is delivered now).
    fn irq_restore(&self, flags: usize);
    /// True when the loop must return to the OS (a signal, a reschedule, a time budget).
    fn should_return(&self) -> bool;
    /// VMCLEAR of `pages`' VMCS on CPU `cpu`, where it was last active (an IPI); called with
    /// preemption off, interrupts on.
    fn vmclear_on(&self, cpu: u32, pages: &VcpuPages);
    /// The speculation duties around each entry (`spec`), fixed at load.
    fn duties(&self) -> Duties;
    /// The test-only read-out: compare the host's debug state before the run with the state
    /// after every exit, and count the differences (`abi::Isolation`).
    fn probe(&self) -> bool;
}

/// CPUs whose last VMPTRLD [`LOADED`] records; beyond them every load counts as a switch.
pub const TRACKED_CPUS: usize = 1024;

/// Per CPU, the VMCS it loaded last (0: none, or cleared since): a load of another one is a
/// switch between vCPUs, where IBPB keeps one guest's branch training from steering another's
/// host work (KVM's per-CPU `current_vmcs`, `vmx_vcpu_load_vmcs`). Reset by VMCLEAR, so a
/// freed VMCS page reused for another vCPU still counts as a switch.
static LOADED: [AtomicU64; TRACKED_CPUS] = [const { AtomicU64::new(0) }; TRACKED_CPUS];

/// Records that CPU `cpu` loads `vmcs`; true when it had another (or none) loaded.
fn note_load(cpu: u32, vmcs: u64) -> bool {
    match LOADED.get(cpu as usize) {
        Some(l) => l.swap(vmcs, Ordering::Relaxed) != vmcs,
        None => true,
    }
}

/// Forgets `vmcs` as CPU `cpu`'s last load (it was cleared there).
fn note_clear(cpu: u32, vmcs: u64) {
    if let Some(l) = LOADED.get(cpu as usize) {
        let _ = l.compare_exchange(vmcs, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Before VMXOFF on CPU `cpu`: VMCLEAR of every VMCS active there ([`active`]), so that their
/// data reaches memory (SDM 25.11.1): their vCPUs run on later, and a crash dump finds their
/// guests' state. Then no VMCS is current there.
///
/// # Safety
/// The caller runs on CPU `cpu`, which is in VMX operation, with interrupts off.
pub unsafe fn clear_all_active(cpu: u32) {
    if let Some(list) = active::list(cpu) {
        active::clear_all(list, &mut |vmcs| {
            // SAFETY: VMX operation on this CPU (the caller's contract); `vmcs` is a VMCS region
            // of the core's that this CPU made active.
            let _ = unsafe { arch::vmclear(vmcs) };
        });
    }
    forget_loaded(cpu);
}

/// Forgets CPU `cpu`'s last VMPTRLD: it left VMX operation, where no VMCS is current.
pub fn forget_loaded(cpu: u32) {
    if let Some(l) = LOADED.get(cpu as usize) {
        l.store(0, Ordering::Relaxed);
    }
}

/// Proof that the current CPU is in VMX root operation and stays the current CPU while the
/// value lives (preemption or interrupts off). Only a shim can know both, so only a shim makes
/// one; with it, the VMX instructions below are safe to call.
#[derive(Debug)]
pub struct VmxCpu {
    cpu: u32,
    /// Neither Send nor Sync: the proof holds on this CPU only.
    _here: core::marker::PhantomData<*const ()>,
}

impl VmxCpu {
    /// The proof for CPU number `cpu`, the current one.
    ///
    /// # Safety
    /// This CPU is in VMX root operation and the caller stays on it (preemption disabled, or
    /// IPI/DPC context) for as long as the value lives.
    pub unsafe fn assume(cpu: u32) -> VmxCpu {
        VmxCpu {
            cpu,
            _here: core::marker::PhantomData,
        }
    }

    /// The CPU's number.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }

    /// VMCLEAR of a vCPU's VMCS here: it may then become active on another CPU, or be freed
    /// (SDM 25.11.1).
    pub fn vmclear(&self, pages: &VcpuPages) -> Result<(), VmFail> {
        note_clear(self.cpu, pages.vmcs);
        // SAFETY: VMX root operation (the proof); `pages.vmcs` is a VMCS region the core
        // allocated with the revision id.
        let r = unsafe { arch::vmclear(pages.vmcs) };
        if let Some(list) = active::list(self.cpu) {
            active::delist(list, pages.vmcs);
        }
        r
    }

    /// INVEPT all-context here (SDM 29.4.3.4): no translation cached from any EPT survives.
    pub fn invept_all(&self) -> Result<(), VmFail> {
        // SAFETY: VMX root operation (the proof); all-context INVEPT is supported wherever
        // smudge loads (VmxCaps::choose_mode requires INVEPT).
        unsafe { arch::invept(InveptType::AllContext, 0) }
    }
}

/// Proof that a guest may run on this CPU now: VMX root operation, preemption off, and the
/// host's FPU and extended state saved so that the guest may own the FPU (Linux
/// kernel_fpu_begin, Windows KeSaveExtendedProcessorState at DISPATCH_LEVEL).
#[derive(Debug)]
pub struct GuestContext {
    vmx: VmxCpu,
}

impl GuestContext {
    /// # Safety
    /// Besides `vmx`'s own promise, the host's FPU state is saved and the caller keeps it so
    /// (and preemption off) for as long as the value lives.
    pub unsafe fn assume(vmx: VmxCpu) -> GuestContext {
        GuestContext { vmx }
    }

    /// This CPU.
    pub fn vmx(&self) -> &VmxCpu {
        &self.vmx
    }
}

/// The processor a vCPU runs on, as [`run`] uses it: the real one ([`Hardware`]), or the SDM
/// model of the host tests, so that the same loop runs in both.
pub trait Processor {
    /// The current VMCS after [`Processor::load`].
    type Vmcs: VmcsAccess;
    /// This CPU's number.
    fn cpu(&self) -> u32;
    /// VMCLEAR of `pages`' VMCS here.
    fn vmclear(&mut self, pages: &VcpuPages) -> Result<(), VmFail>;
    /// Where VMCS `vmcs` stands on CPU `cpu` ([`active`]).
    fn held(&self, cpu: u32, vmcs: u64) -> Held;
    /// VMPTRLD: makes `pages`' VMCS current here; returns access to it, and whether this CPU
    /// loaded another VMCS (or none) last.
    fn load(&mut self, pages: &VcpuPages) -> Result<(Self::Vmcs, bool), VmFail>;
    /// What the VMCS host area must hold on this CPU.
    fn host_state(&self) -> HostState;
    /// VMLAUNCH (`launched` false) or VMRESUME of the current VMCS with the guest's `gprs`;
    /// returns after the VM exit (the host's state restored), or with the failed entry.
    /// Interrupts are off (the caller's).
    fn enter(
        &mut self,
        vmcs: &mut Self::Vmcs,
        gprs: &mut GuestGprs,
        launched: bool,
        host: &HostState,
    ) -> Result<(), VmFail>;
    /// Loads the guest's x87/SSE state and IA32_KERNEL_GS_BASE; returns the host's
    /// IA32_KERNEL_GS_BASE.
    fn guest_state_in(&mut self, fx: &FxArea, kernel_gs_base: u64) -> u64;
    /// Saves the guest's x87/SSE state, restores the host's IA32_KERNEL_GS_BASE; returns the
    /// guest's.
    fn guest_state_out(&mut self, fx: &mut FxArea, host_kernel_gs_base: u64) -> u64;
    /// Hands an NMI that caused a VM exit to the host (SDM 28.2.2: it was not delivered).
    fn raise_nmi(&mut self);
    /// CPUID of this CPU (the guest sees it filtered).
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// L1D flush (`spec`; only when the processor enumerates it).
    fn flush_l1d(&mut self);
    /// VERW with the host's data selector `selector` (`spec`).
    fn clear_cpu_buffers(&mut self, selector: u16);
    /// IBPB (`spec`; only when the processor enumerates it).
    fn ibpb(&mut self);
    /// The test-only read-out: this CPU's debug registers, XCR0 and IA32_DEBUGCTL (0 where the
    /// MSR cannot be read).
    fn host_debug(&self) -> (arch::DebugState, u64);
}

/// The real processor, with the proof that a guest may run here.
pub struct Hardware<'a> {
    ctx: &'a GuestContext,
    debugctl: Option<u64>,
}

/// Calls `f` with CPU `cpu` where a guest may run, if the driver did VMXON there
/// (`vmx::root::ROOT`); None otherwise. `debugctl` reads this CPU's IA32_DEBUGCTL (None when
/// it cannot be read). What each shim's `session::Os::with_guest_context` does between its OS's
/// "preemption off, FPU saved" and "back on".
///
/// # Safety
/// The caller runs on CPU `cpu` with preemption off and the host's FPU state saved, and keeps
/// both until this returns.
pub unsafe fn on_guest_cpu<R>(
    cpu: u32,
    debugctl: impl FnOnce() -> Option<u64>,
    f: impl FnOnce(&mut Hardware<'_>) -> R,
) -> Option<R> {
    // SAFETY: on `cpu` with preemption off (the caller's contract).
    let vmx = unsafe { crate::vmx::root::ROOT.here(cpu) }?;
    // SAFETY: the FPU state saved and preemption off until this returns (the caller's contract).
    let ctx = unsafe { GuestContext::assume(vmx) };
    Some(f(&mut Hardware::new(&ctx, debugctl())))
}

impl<'a> Hardware<'a> {
    /// This CPU, where `ctx` proves a guest may run; `host_debugctl` is its IA32_DEBUGCTL (None
    /// when the processor lacks the MSR, as Bochs 2.7 does), restored after every VM exit.
    pub fn new(ctx: &'a GuestContext, host_debugctl: Option<u64>) -> Hardware<'a> {
        Hardware {
            ctx,
            debugctl: host_debugctl,
        }
    }
}

impl Processor for Hardware<'_> {
    type Vmcs = HwVmcs;
    fn cpu(&self) -> u32 {
        self.ctx.vmx().cpu()
    }
    fn vmclear(&mut self, pages: &VcpuPages) -> Result<(), VmFail> {
        self.ctx.vmx().vmclear(pages)
    }
    fn held(&self, cpu: u32, vmcs: u64) -> Held {
        active::list(cpu).map_or(Held::Clear, |list| active::held(list, vmcs))
    }
    fn load(&mut self, pages: &VcpuPages) -> Result<(HwVmcs, bool), VmFail> {
        let here = self.cpu();
        // Listed before it becomes active, so that every VMCS active here is listed, also for
        // an NMI that leaves VMX operation in between (`clear_all_active`). Interrupts off: a
        // cross-CPU VMCLEAR (`VmxCpu::vmclear`, an IPI) must not come in between the choice of
        // an entry to evict and its VMCLEAR, or that VMCLEAR would reach a VMCS active on
        // another CPU by then, or freed.
        // SAFETY: CPL 0; restored right after, on this CPU (preemption is off, `ctx`).
        let flags = unsafe { arch::irq_save() };
        let listed = active::list(here).is_some_and(|list| {
            active::enlist(list, pages.vmcs, &mut |other| {
                note_clear(here, other);
                // SAFETY: VMX root operation here (`ctx`); `other` is a VMCS region of the
                // core's active here (possibly the current one, which the VMPTRLD below replaces).
                let _ = unsafe { arch::vmclear(other) };
            })
        });
        // SAFETY: as above.
        unsafe { arch::irq_restore(flags) };
        if !listed {
            // Untracked, it would be lost when this CPU leaves VMX operation.
            return Err(VmFail::Invalid);
        }
        // SAFETY: VMX root operation on this CPU (`ctx`), and a VMCS region of the core's that
        // `run` made clear or active here first.
        if let Err(f) = unsafe { arch::vmptrld(pages.vmcs) } {
            // Never made active here: the entry goes without a VMCLEAR.
            if let Some(list) = active::list(here) {
                active::delist(list, pages.vmcs);
            }
            return Err(f);
        }
        let switched = note_load(here, pages.vmcs);
        // SAFETY: VMX root operation (`ctx`), and the VMCS just loaded is current.
        Ok((unsafe { HwVmcs::current() }, switched))
    }
    fn host_state(&self) -> HostState {
        // SAFETY: preemption is off (`ctx`): the snapshot describes this CPU for the whole run.
        let mut s = unsafe { arch::host_state() };
        s.debugctl = self.debugctl.unwrap_or(0);
        s
    }
    fn enter(
        &mut self,
        _vmcs: &mut HwVmcs,
        gprs: &mut GuestGprs,
        launched: bool,
        host: &HostState,
    ) -> Result<(), VmFail> {
        // SAFETY: `run` completed the current VMCS, interrupts are off (the caller), and the host
        // area describes this CPU (`host`, read on it by `run`).
        let entered = unsafe { arch::vm_enter(gprs, launched) };
        // SAFETY: right after the exit (or failed entry) on the same CPU.
        unsafe { arch::restore_after_exit(host) };
        entered
    }
    fn guest_state_in(&mut self, fx: &FxArea, kernel_gs_base: u64) -> u64 {
        // SAFETY: the FPU is the guest's (`ctx`); the area holds a valid image; the MSR exists
        // on every x86-64 processor.
        unsafe {
            arch::fxrstor(fx);
            let host = arch::rdmsr(arch::IA32_KERNEL_GS_BASE);
            arch::wrmsr(arch::IA32_KERNEL_GS_BASE, kernel_gs_base);
            host
        }
    }
    fn guest_state_out(&mut self, fx: &mut FxArea, host_kernel_gs_base: u64) -> u64 {
        // SAFETY: as above; the host's value goes back before anything returns to user space.
        unsafe {
            arch::fxsave(fx);
            let guest = arch::rdmsr(arch::IA32_KERNEL_GS_BASE);
            arch::wrmsr(arch::IA32_KERNEL_GS_BASE, host_kernel_gs_base);
            guest
        }
    }
    fn raise_nmi(&mut self) {
        // SAFETY: right after the exit on this CPU, with the host IDT loaded.
        unsafe { arch::raise_nmi() }
    }
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        arch::cpuid(leaf, subleaf)
    }
    fn flush_l1d(&mut self) {
        // SAFETY: ring 0 (`ctx`); `spec::Duties` asks for the flush only where CPUID enumerates
        // L1D_FLUSH.
        unsafe { arch::flush_l1d() }
    }
    fn clear_cpu_buffers(&mut self, selector: u16) {
        arch::verw(selector)
    }
    fn ibpb(&mut self) {
        // SAFETY: ring 0 (`ctx`); `spec::Duties` asks for IBPB only where CPUID enumerates it.
        unsafe { arch::ibpb() }
    }
    fn host_debug(&self) -> (arch::DebugState, u64) {
        // SAFETY: ring 0 (`ctx`); IA32_DEBUGCTL is read only when the shim could read it.
        unsafe {
            (
                arch::debug_state(),
                self.debugctl
                    .map_or(0, |_| arch::rdmsr(arch::IA32_DEBUGCTL)),
            )
        }
    }
}

/// Why the hardware run failed before the guest could run or after an entry failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwError {
    /// A VMX instruction failed (VMPTRLD, VMWRITE, VMLAUNCH/VMRESUME, INVEPT).
    Vmx {
        /// Which step.
        step: &'static str,
        /// How.
        fail: VmFail,
    },
    /// The software VM-entry checker found a broken rule: before the first VMLAUNCH
    /// (`fail` = None: the entry was not attempted) or after the processor refused the entry.
    EntryCheck {
        /// The first rule the VMCS breaks (SDM 27.2/27.3).
        violation: Violation,
        /// What the processor said, if the entry was attempted.
        fail: Option<VmFail>,
        /// Exit reason with bit 31 set, when the entry failed on guest state (SDM 27.8).
        exit_reason: u32,
    },
}

/// How [`run`] returned when nothing failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwExit {
    /// For user space (or, for [`RunExit::Interrupted`], for the shim's own loop).
    Exit(RunExit),
    /// The vCPU's page cache cannot back another EPT violation: refill it
    /// ([`PageCache::refill`]) where the OS may sleep, then call [`run`] again. The guest
    /// re-executes the faulting access.
    NeedPages,
}

/// A vCPU's hardware state.
pub struct HwVcpu {
    /// Exit-handler state.
    pub state: VcpuState,
    /// Its VMCS region, PML buffer and MSR bitmap.
    pub pages: VcpuPages,
    /// Pages the exit handler backs guest memory from.
    pub cache: PageCache,
    /// Guest GPRs.
    pub gprs: GuestGprs,
    /// Guest x87/SSE state.
    pub fx: FxArea,
    /// VMLAUNCH done since the last VMCLEAR.
    pub launched: bool,
    /// The CPU this VMCS was made active on last (None: clear everywhere). It may have been
    /// VMCLEARed there since ([`active`] says).
    pub cpu: Option<u32>,
    /// The guest-state area was written.
    pub programmed: bool,
    /// Guest RIP, RSP and RFLAGS between runs (they live in the VMCS, which only the CPU that
    /// has it active can read): read back when a run ends, written before the next entry when
    /// `regs_dirty` says SET_REGS changed them. Before the first run: the guest ABI's entry
    /// state (the image's entry point, the top of the vCPU's stack, 0x2).
    pub rip: u64,
    /// Guest RSP (see `rip`).
    pub rsp: u64,
    /// Guest RFLAGS (see `rip`).
    pub rflags: u64,
    /// `rip`, `rsp` or `rflags` changed since the VMCS was programmed.
    pub regs_dirty: bool,
    /// The guest's IA32_KERNEL_GS_BASE between runs.
    pub kernel_gs_base: u64,
    /// Test hook: one VMCS field overwritten after setup (to prove the checker catches a bad
    /// VMCS), and whether to skip the pre-launch check so the processor judges it too.
    pub debug_override: Option<(Field, u64, bool)>,
    /// A KVM vCPU's whole register state (KVM_SET_SREGS/SET_REGS): the VMCS is programmed
    /// from it, and it is read back after every run. None: smudge's guest ABI, from the VM's
    /// layout.
    pub guest: Option<GuestState>,
}

impl HwVcpu {
    /// vCPU `index` on `pages`, before its first run: RDI holds the index, RSP `stack_top`, RIP
    /// `entry` (the guest ABI).
    pub fn new(index: u32, pages: VcpuPages, entry: u64, stack_top: u64) -> HwVcpu {
        HwVcpu {
            state: VcpuState::new(index),
            pages,
            cache: PageCache::new(),
            gprs: GuestGprs {
                rdi: index.into(),
                ..GuestGprs::default()
            },
            fx: FxArea::reset(),
            launched: false,
            cpu: None,
            programmed: false,
            rip: entry,
            rsp: stack_top,
            rflags: 0x2,
            regs_dirty: false,
            kernel_gs_base: 0,
            debug_override: None,
            guest: None,
        }
    }

    /// Before a run on CPU `here`: a VMCS active on another CPU is VMCLEARed there (`vmclear`,
    /// SDM 25.11.1); the run's own checks ([`run`]) then find it clear there.
    pub fn leave_cpu(&mut self, here: u32, vmclear: impl FnOnce(u32)) {
        if let Some(old) = self.cpu.filter(|&c| c != here) {
            vmclear(old);
        }
    }

    /// KVM vCPU `index` on `pages`: the processor's RESET state until KVM_SET_SREGS and
    /// KVM_SET_REGS replace it, an empty CPUID table until KVM_SET_CPUID2.
    pub fn new_kvm(index: u32, pages: VcpuPages) -> HwVcpu {
        let g = GuestState::reset();
        let mut v = HwVcpu::new(index, pages, g.rip, g.rsp);
        v.gprs.rdi = 0;
        v.rflags = g.rflags;
        v.guest = Some(g);
        v.state.kvm = Some(crate::vm::KvmExits::default());
        v
    }

    /// The registers as GET_REGS reports them. A checkpoint's RAX = 0 is already in `gprs`.
    pub fn regs(&self) -> Regs {
        let g = &self.gprs;
        Regs {
            rax: g.rax,
            rbx: g.rbx,
            rcx: g.rcx,
            rdx: g.rdx,
            rsi: g.rsi,
            rdi: g.rdi,
            rsp: self.rsp,
            rbp: g.rbp,
            r8: g.r8,
            r9: g.r9,
            r10: g.r10,
            r11: g.r11,
            r12: g.r12,
            r13: g.r13,
            r14: g.r14,
            r15: g.r15,
            rip: self.rip,
            rflags: self.rflags,
        }
    }

    /// SET_REGS (values validated by `abi::decode`). A stopped vCPU becomes runnable again: it
    /// continues at the new RIP.
    pub fn set_regs(&mut self, r: &Regs) {
        self.gprs = GuestGprs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            cr2: self.gprs.cr2,
        };
        self.rip = r.rip;
        self.rsp = r.rsp;
        self.rflags = r.rflags;
        self.regs_dirty = true;
        self.state.halted = false;
    }

    /// LOAD_ELF: a vCPU that has not run yet starts at the image's entry point. One that has
    /// run keeps its registers (as KVM, a memory load never moves a vCPU; SET_REGS does).
    pub fn load_entry(&mut self, entry: u64) {
        if !self.programmed {
            self.rip = entry;
        }
    }

    /// Pages the vCPU holds: its own and those in its cache.
    pub fn pages_held(&self) -> u64 {
        VcpuPages::COUNT + self.cache.len() as u64
    }

    /// Frees every page of the vCPU (its own and the cache's). The VMCS must be clear on every
    /// CPU (VMCLEAR) before.
    pub fn free_pages<P: Platform + ?Sized>(&mut self, p: &P) {
        self.cache.free_all(p);
        // No list keeps the address of a freed VMCS (a VMCLEAR there would write to memory
        // that is someone else's by then).
        active::forget(self.pages.vmcs);
        self.pages.free(p);
        if let Some(k) = self.state.kvm.as_mut() {
            for page in [&mut k.run_page, &mut k.cpuid.page] {
                if *page != 0 {
                    p.free_page(core::mem::take(page));
                }
            }
            if let Some(r) = k.ring.as_mut() {
                r.free(p);
            }
        }
    }
}

fn step<T>(step: &'static str, r: Result<T, VmFail>) -> Result<T, HwError> {
    r.map_err(|fail| HwError::Vmx { step, fail })
}

fn vmcs_step<T>(step: &'static str, r: Result<T, VmcsError>) -> Result<T, HwError> {
    r.map_err(|e| HwError::Vmx {
        step,
        fail: vm_fail(e),
    })
}

/// Runs `vcpu` on this CPU until something needs user space, the OS, or more pages.
///
/// Every page the VM takes during the run comes from `vcpu.cache`, never from `p` (which may
/// not allocate with interrupts off); `p` frees pages and maps them. A VMCS last active on
/// another CPU is VMCLEARed there first (`env.vmclear_on`, SDM 25.11.1).
#[inline(never)]
pub fn run<P: Platform + ?Sized, S: SharedVm, C: Processor>(
    vm: &S,
    vcpu: &mut HwVcpu,
    p: &P,
    caps: &VmxCaps,
    ctls: &Controls,
    env: &dyn RunEnv,
    cpu: &mut C,
) -> Result<HwExit, HwError> {
    if vcpu.state.halted {
        return Ok(HwExit::Exit(RunExit::Hlt));
    }
    let here = cpu.cpu();
    let lost = HwError::Vmx {
        step: "vmptrld (VMCS lost: its CPU left VMX operation without a VMCLEAR of it)",
        fail: VmFail::Invalid,
    };
    let vmcs = vcpu.pages.vmcs;
    match vcpu.cpu.map(|c| cpu.held(c, vmcs)) {
        Some(Held::Lost) => return Err(lost),
        // VMCLEARed where it was active (that CPU made room for another VMCS, or left VMX
        // operation): its data is in memory, its launch state clear (SDM 25.11.3).
        Some(Held::Clear) => vcpu.cpu = None,
        Some(Held::Active) | None => {}
    }
    if vcpu.cpu != Some(here) {
        match vcpu.cpu {
            Some(old) => env.vmclear_on(old, &vcpu.pages),
            // A VMCS is cleared before its first VMPTRLD (SDM 25.11.3).
            None => step("vmclear", cpu.vmclear(&vcpu.pages))?,
        }
        // Made active on two CPUs at once, a VMCS would be corrupted: it must be clear on its
        // old one now (which may have left VMX operation before the VMCLEAR reached it).
        match vcpu.cpu.map(|c| cpu.held(c, vmcs)) {
            Some(Held::Lost) => return Err(lost),
            Some(Held::Active) => {
                return Err(HwError::Vmx {
                    step: "vmclear on the VMCS's last CPU (not reached)",
                    fail: VmFail::Invalid,
                })
            }
            Some(Held::Clear) | None => {}
        }
        vcpu.launched = false;
        vcpu.cpu = Some(here);
    }
    let started = vm.with(|vm| {
        if !vcpu.programmed {
            vm.mark_started();
        }
        (vm.layout(), vm.mode(), vm.ept().eptp(true))
    });
    // smudge's guest ABI starts from the VM's layout; a KVM vCPU from its own state.
    let (guest, mode, eptp_ad) = match (started, vcpu.guest) {
        (Some((_, mode, eptp)), Some(g)) => (g, mode, eptp),
        (Some((Some(l), mode, eptp)), None) => (
            GuestState::smudge(&l, caps, vcpu.rip, vcpu.rsp, vcpu.rflags),
            mode,
            eptp,
        ),
        _ => {
            return Ok(HwExit::Exit(RunExit::Stopped {
                reason: 0,
                what: crate::vm::StopCause::EntryFailed,
            }))
        }
    };
    let p = &Cached::new(p, &vcpu.cache);
    let (mut vmcs, switched) = step("vmptrld", cpu.load(&vcpu.pages))?;
    let duties = env.duties();
    if switched && duties.ibpb {
        cpu.ibpb();
        vcpu.state.isolation.ibpbs += 1;
    }
    let host: HostState = cpu.host_state();
    let probe = env.probe().then(|| cpu.host_debug());
    let mut eptp_v = eptp_ad;
    eptp_v.set_ad_enabled(
        eptp_ad.ad_enabled()
            && matches!(mode, crate::dirty::Mode::AdScan | crate::dirty::Mode::Pml),
    );
    let eptp = eptp_v.0;
    let cfg = VcpuConfig {
        eptp,
        vpid: 1 + vcpu.state.index as u16,
        pml_buffer: vcpu.pages.pml,
        msr_bitmap: vcpu.pages.msr_bitmap,
    };
    if !vcpu.programmed {
        vmcs_step(
            "vmwrite (setup)",
            setup::program(&mut vmcs, caps, ctls, &host, &guest, &cfg),
        )?;
        let mut precheck = true;
        if let Some((field, value, skip)) = vcpu.debug_override {
            vmcs_step("vmwrite (override)", vmcs.write(field, value))?;
            precheck = !skip;
        }
        vcpu.programmed = true;
        vcpu.regs_dirty = false;
        // Cheap, and turns an opaque VM-entry failure into a named SDM rule.
        if precheck {
            if let Err(violation) = checks::check_entry(&vmcs, caps) {
                vcpu.state.halted = true;
                return Err(HwError::EntryCheck {
                    violation,
                    fail: None,
                    exit_reason: 0,
                });
            }
        }
    } else {
        // The host state can differ per CPU (GDT, TSS, GS base): refresh it every run.
        vmcs_step(
            "vmwrite (host)",
            setup::program_host(&mut vmcs, ctls, &host),
        )?;
        if vcpu.regs_dirty {
            vmcs_step("vmwrite (rip)", vmcs.write(Field::GuestRip, vcpu.rip))?;
            vmcs_step("vmwrite (rsp)", vmcs.write(Field::GuestRsp, vcpu.rsp))?;
            vmcs_step(
                "vmwrite (rflags)",
                vmcs.write(Field::GuestRflags, vcpu.rflags),
            )?;
            // New registers start a fresh instruction stream: no STI/MOV-SS blocking or pending
            // debug exception of the old one may survive, or the new RFLAGS (IF, TF) could break
            // SDM 27.3.1.5 (checks on guest non-register state).
            vmcs_step(
                "vmwrite (interruptibility)",
                vmcs.write(Field::GuestInterruptibilityState, 0),
            )?;
            vmcs_step(
                "vmwrite (pending debug)",
                vmcs.write(Field::GuestPendingDebugExceptions, 0),
            )?;
            vcpu.regs_dirty = false;
        }
    }
    if ctls.pin & pin::ACTIVATE_PREEMPTION_TIMER != 0 {
        // Once per run, not per entry: without the "save VMX-preemption timer value" exit
        // control, a VM exit leaves the field alone and every entry counts down from it again
        // (SDM 26.5.1, "VMX-Preemption Timer").
        vmcs_step(
            "vmwrite (timer)",
            vmcs.write(Field::VmxPreemptionTimerValue, PREEMPTION_QUANTUM),
        )?;
    }
    let pml = ctls.secondary & secondary::ENABLE_PML != 0;
    let kernel_gs_base = cpu.guest_state_in(&vcpu.fx, vcpu.kernel_gs_base);
    let result = loop {
        // Every INVEPT an EPT change owes is paid before a vCPU runs again (`Ept::pay`, by the
        // VM-level request that made the change, every vCPU out of this loop meanwhile). An EPT
        // still owing one here is a core bug: entering would use stale translations (SDM
        // 29.4.3.4), so the run fails instead.
        if vm.with(|vm| vm.ept().needs_invept()).unwrap_or(false) {
            break Err(HwError::Vmx {
                step: "VM entry (an INVEPT is still owed: a smudge bug)",
                fail: VmFail::Invalid,
            });
        }
        let flags = env.irq_save();
        // Last before the entry, with interrupts off (`spec`; KVM's vmx_vcpu_enter_exit).
        if duties.l1d_flush {
            cpu.flush_l1d();
        }
        if duties.verw {
            cpu.clear_cpu_buffers(host.ss);
        }
        let entered = cpu.enter(&mut vmcs, &mut vcpu.gprs, vcpu.launched, &host);
        let iso = &mut vcpu.state.isolation;
        iso.entries += 1;
        iso.l1d_flushes += u64::from(duties.l1d_flush);
        iso.verws += u64::from(duties.verw);
        if let Some(before) = probe {
            iso.probes += 1;
            iso.host_changed += u64::from(cpu.host_debug() != before);
        }
        env.irq_restore(flags);
        if let Err(fail) = entered {
            if let (VmFail::Valid(7 | 8), Err(violation)) = (fail, checks::check_entry(&vmcs, caps))
            {
                break Err(HwError::EntryCheck {
                    violation,
                    fail: Some(fail),
                    exit_reason: 0,
                });
            }
            break Err(HwError::Vmx {
                step: if vcpu.launched {
                    "vmresume"
                } else {
                    "vmlaunch"
                },
                fail,
            });
        }
        vcpu.launched = true;
        let exit = ExitInfo {
            reason: vmcs.read(Field::ExitReason).unwrap_or(0) as u32,
            qualification: vmcs.read(Field::ExitQualification).unwrap_or(0),
            gpa: vmcs.read(Field::GuestPhysicalAddress).unwrap_or(0),
            instr_len: vmcs.read(Field::VmExitInstructionLength).unwrap_or(0),
        };
        if exit.reason == reason::EXCEPTION_NMI {
            let info = vmcs.read(Field::VmExitInterruptionInformation).unwrap_or(0);
            // SDM 25.9.2: valid (bit 31) with type 2 (NMI) in bits 10:8.
            if info & (1 << 31) != 0 && (info >> 8) & 7 == 2 {
                cpu.raise_nmi();
            }
        }
        if pml {
            // Drain on every exit, before anything reports the dirty log (SDM 29.3.6).
            let index = vmcs.read(Field::GuestPmlIndex).unwrap_or(511) as u16;
            if index != crate::dirty::pml::INDEX_RESET {
                let ring = vcpu.state.kvm.as_mut().and_then(|k| k.ring.as_mut());
                let _ = vm.with(|vm| vm.pml_drain_into(p, vcpu.pages.pml, index, ring));
                if let Err(e) =
                    vmcs.write(Field::GuestPmlIndex, crate::dirty::pml::INDEX_RESET.into())
                {
                    break Err(HwError::Vmx {
                        step: "vmwrite (pml index)",
                        fail: vm_fail(e),
                    });
                }
            }
        }
        if exit.reason & (1 << 31) != 0 {
            // VM-entry failure (SDM 27.8): ask the checker which rule the guest state breaks.
            if let Err(violation) = checks::check_entry(&vmcs, caps) {
                vcpu.state.halted = true;
                break Err(HwError::EntryCheck {
                    violation,
                    fail: None,
                    exit_reason: exit.reason,
                });
            }
        }
        if exit.reason == reason::EPT_VIOLATION && !vcpu.cache.ready_for_fault() {
            // Leave unhandled (and uncounted): the violation invalidated the GPA's cached
            // translations (SDM 29.4.3.1), so the guest faults again at the same access once it
            // re-enters, and that exit is handled.
            break Ok(HwExit::NeedPages);
        }
        let cpuid = |leaf: u32, sub: u32| cpu.cpuid(leaf, sub);
        let action = vm
            .with(|vm| vm.handle_exit(p, &mut vcpu.state, &exit, &mut vcpu.gprs, &cpuid))
            .unwrap_or(Action::ToUser(RunExit::Stopped {
                reason: exit.reason,
                what: crate::vm::StopCause::EntryFailed,
            }));
        let advance = match action {
            Action::Resume { advance } => advance,
            // A hypercall or console write that goes to user space resumes after it.
            Action::ToUser(_) if exit.reason == reason::VMCALL || exit.reason == reason::IO => {
                exit.instr_len
            }
            _ => 0,
        };
        if advance != 0 {
            let rip = vmcs.read(Field::GuestRip).unwrap_or(0);
            if let Err(e) = vmcs.write(Field::GuestRip, rip.wrapping_add(advance)) {
                break Err(HwError::Vmx {
                    step: "vmwrite (rip)",
                    fail: vm_fail(e),
                });
            }
        }
        // A KVM vCPU whose dirty ring reached its soft limit goes to user space before it
        // enters again (KVM_EXIT_DIRTY_RING_FULL), the exit handled.
        let ring_full = vcpu
            .state
            .kvm
            .as_ref()
            .and_then(|k| k.ring.as_ref())
            .is_some_and(Ring::soft_full);
        if ring_full && !matches!(action, Action::ToUser(_)) {
            break Ok(HwExit::Exit(RunExit::RingFull));
        }
        match action {
            Action::Resume { .. } => {}
            Action::Yield => {
                if env.should_return() {
                    break Ok(HwExit::Exit(RunExit::Interrupted));
                }
            }
            Action::ToUser(x) => break Ok(HwExit::Exit(x)),
        }
        if env.should_return() {
            break Ok(HwExit::Exit(RunExit::Interrupted));
        }
    };
    // The VMCS is still current here: keep RIP/RSP/RFLAGS for GET_REGS and the next run.
    for (field, shadow) in [
        (Field::GuestRip, &mut vcpu.rip),
        (Field::GuestRsp, &mut vcpu.rsp),
        (Field::GuestRflags, &mut vcpu.rflags),
    ] {
        if let Ok(v) = vmcs.read(field) {
            *shadow = v;
        }
    }
    if vcpu.guest.is_some() {
        let save_pat = ctls.exit & crate::vmx::caps::exit::SAVE_IA32_PAT != 0;
        if let Ok(g) = GuestState::read(&vmcs, save_pat) {
            vcpu.guest = Some(g);
        }
    }
    vcpu.kernel_gs_base = cpu.guest_state_out(&mut vcpu.fx, kernel_gs_base);
    result
}
