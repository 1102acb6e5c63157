//! The hardware run loop (part of the arch layer): VMCS load, VM entry, exit decoding, and the
//! hand-off to the safe exit handler in `vm`. Shared by the Linux and Windows shims.

use x86::vmx::vmcs::{guest, ro};

use crate::arch::{self, FxArea, GuestGprs, HostState, InveptType, VmFail};
use crate::platform::Platform;
use crate::vm::{reason, Action, ExitInfo, RunExit, VcpuState, Vm};
use crate::vmx::caps::VmxCaps;
use crate::vmx::checks::{self, Violation};
use crate::vmx::fields::Field;
use crate::vmx::setup::{self, Controls, VcpuConfig};
use crate::vmx::vmcs::{VmcsAccess, VmcsError};

/// The current VMCS of this CPU, through VMREAD/VMWRITE, for the entry checker.
pub struct HwVmcs;

impl VmcsAccess for HwVmcs {
    fn read(&self, field: Field) -> Result<u64, VmcsError> {
        // SAFETY: only constructed inside `run`, where a current VMCS exists.
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

/// The preemption-timer value for one stay in the guest (ticks of TSC >> MISC[4:0]): bounds
/// how long the guest runs before the host gets the CPU back (SDM 26.5.1).
pub const PREEMPTION_QUANTUM: u64 = 200_000;

/// A VM shared by the vCPUs of several CPUs: the loop takes the VM only around exit handling,
/// never while the guest runs. The Linux and Windows shims wrap it in a spin lock; a
/// single-threaded caller can use `core::cell::RefCell`-like exclusive access.
pub trait SharedVm {
    /// Runs `f` with exclusive access to the VM.
    fn with<R, F: FnOnce(&mut Vm) -> R>(&self, f: F) -> R;
}

/// What the OS supplies to the loop.
pub trait RunEnv {
    /// Disables interrupts on this CPU; returns the previous state.
    fn irq_save(&self) -> usize;
    /// Restores the interrupt state (a pending external interrupt is delivered now).
    fn irq_restore(&self, flags: usize);
    /// True when the loop must return to the OS (a signal, a reschedule, a time budget).
    fn should_return(&self) -> bool;
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

/// A vCPU's hardware state.
pub struct HwVcpu {
    /// Exit-handler state.
    pub state: VcpuState,
    /// Host-physical address of the VMCS region.
    pub vmcs: u64,
    /// Host-physical address of the PML buffer (0 without PML).
    pub pml: u64,
    /// Host-physical address of the MSR bitmap.
    pub msr_bitmap: u64,
    /// Guest GPRs.
    pub gprs: GuestGprs,
    /// Guest x87/SSE state.
    pub fx: FxArea,
    /// VMLAUNCH done since the last VMCLEAR.
    pub launched: bool,
    /// The guest-state area was written.
    pub programmed: bool,
    /// Guest entry point (first run).
    pub rip: u64,
    /// The guest's IA32_KERNEL_GS_BASE between runs.
    pub kernel_gs_base: u64,
    /// Test hook: one VMCS field overwritten after setup (to prove the checker catches a bad
    /// VMCS), and whether to skip the pre-launch check so the processor judges it too.
    pub debug_override: Option<(u32, u64, bool)>,
}

fn step<T>(step: &'static str, r: Result<T, VmFail>) -> Result<T, HwError> {
    r.map_err(|fail| HwError::Vmx { step, fail })
}

/// Runs `vcpu` on this CPU until something needs user space or the OS.
///
/// # Safety
/// VMX root operation on this CPU; preemption disabled and the FPU owned by the caller
/// (kernel_fpu_begin / KeSaveExtendedProcessorState); `vcpu.vmcs` is either launched on this
/// CPU or was VMCLEARed (then `launched` is false); `p` gives access to every page involved.
pub unsafe fn run<P: Platform + ?Sized, S: SharedVm>(
    vm: &S,
    vcpu: &mut HwVcpu,
    p: &P,
    caps: &VmxCaps,
    ctls: &Controls,
    env: &dyn RunEnv,
) -> Result<RunExit, HwError> {
    if vcpu.state.halted {
        return Ok(RunExit::Hlt);
    }
    let (layout, mode, eptp_ad) = vm.with(|vm| (vm.layout(), vm.mode(), vm.ept().eptp(true)));
    let layout = match layout {
        Some(l) => l,
        None => return Ok(RunExit::Stopped { reason: 0, what: crate::vm::StopCause::EntryFailed }),
    };
    // SAFETY: caller guarantees VMX root operation and a valid VMCS region.
    step("vmptrld", unsafe { arch::vmptrld(vcpu.vmcs) })?;
    // SAFETY: preemption is off: the snapshot describes this CPU for the whole run.
    let host: HostState = unsafe { arch::host_state() };
    let mut eptp_v = eptp_ad;
    eptp_v.set_ad_enabled(eptp_ad.ad_enabled() && matches!(mode, crate::dirty::Mode::AdScan | crate::dirty::Mode::Pml));
    let eptp = eptp_v.0;
    let cfg = VcpuConfig {
        eptp,
        vpid: 1 + vcpu.state.index as u16,
        pml_buffer: vcpu.pml,
        msr_bitmap: vcpu.msr_bitmap,
        rip: vcpu.rip,
        rsp: layout.stack_top(u64::from(vcpu.state.index)),
    };
    // SAFETY: a current VMCS exists (VMPTRLD above).
    let mut write = |f: u32, v: u64| unsafe { arch::vmwrite(f, v) };
    if !vcpu.programmed {
        step("vmwrite (setup)", setup::program(&mut write, caps, ctls, &host, &layout, &cfg))?;
        let mut precheck = true;
        if let Some((field, value, skip)) = vcpu.debug_override {
            step("vmwrite (override)", write(field, value))?;
            precheck = !skip;
        }
        vcpu.programmed = true;
        // Cheap, and turns an opaque VM-entry failure into a named SDM rule.
        if precheck {
            if let Err(violation) = checks::check_entry(&HwVmcs, caps) {
                vcpu.state.halted = true;
                return Err(HwError::EntryCheck { violation, fail: None, exit_reason: 0 });
            }
        }
    } else {
        // The host state can differ per CPU (GDT, TSS, GS base): refresh it every run.
        step("vmwrite (host)", setup::program_host(&mut write, ctls, &host))?;
    }
    let timer = ctls.pin & setup::pin::PREEMPTION_TIMER != 0;
    // SAFETY: the caller owns the FPU; the area holds a valid image.
    unsafe { arch::fxrstor(&vcpu.fx) };
    // SAFETY: the MSR exists on every x86-64 processor.
    let kernel_gs_base = unsafe { arch::rdmsr(arch::IA32_KERNEL_GS_BASE) };
    // SAFETY: the guest's own value, saved at its last exit (0 at first).
    unsafe { arch::wrmsr(arch::IA32_KERNEL_GS_BASE, vcpu.kernel_gs_base) };
    let result = loop {
        let flushed = vm.with(|vm| {
            if !vm.ept().needs_invept() {
                return Ok(());
            }
            // SDM 29.4.3.4 (INVEPT guidelines): cleared A/D or W bits, or removed entries,
            // must not survive in cached translations when the guest runs again. (Callers
            // that cleared flags while several CPUs may cache the EPT flush them all first.)
            let kind = if caps.ept_vpid_cap & (1 << 25) != 0 { InveptType::SingleContext } else { InveptType::AllContext };
            // SAFETY: VMX root operation.
            unsafe { arch::invept(kind, eptp) }?;
            vm.ept_mut().invept_done(p);
            Ok(())
        });
        if let Err(fail) = flushed {
            break Err(HwError::Vmx { step: "invept", fail });
        }
        if timer {
            // SAFETY: current VMCS.
            if let Err(fail) = unsafe { arch::vmwrite(guest::VMX_PREEMPTION_TIMER_VALUE, PREEMPTION_QUANTUM) } {
                break Err(HwError::Vmx { step: "vmwrite (timer)", fail });
            }
        }
        let flags = env.irq_save();
        // SAFETY: the VMCS is complete, interrupts are off, and the host area describes this CPU.
        let entered = unsafe { arch::vm_enter(&mut vcpu.gprs, vcpu.launched) };
        // SAFETY: right after the exit (or failed entry) on the same CPU.
        unsafe { arch::restore_after_exit(&host) };
        env.irq_restore(flags);
        if let Err(fail) = entered {
            if let (VmFail::Valid(7 | 8), Err(violation)) = (fail, checks::check_entry(&HwVmcs, caps)) {
                break Err(HwError::EntryCheck { violation, fail: Some(fail), exit_reason: 0 });
            }
            break Err(HwError::Vmx { step: if vcpu.launched { "vmresume" } else { "vmlaunch" }, fail });
        }
        vcpu.launched = true;
        // SAFETY: current VMCS after an exit.
        let exit = unsafe {
            ExitInfo {
                reason: arch::vmread(ro::EXIT_REASON).unwrap_or(0) as u32,
                qualification: arch::vmread(ro::EXIT_QUALIFICATION).unwrap_or(0),
                gpa: arch::vmread(ro::GUEST_PHYSICAL_ADDR_FULL).unwrap_or(0),
                instr_len: arch::vmread(ro::VMEXIT_INSTRUCTION_LEN).unwrap_or(0),
            }
        };
        if exit.reason == reason::EXCEPTION_NMI {
            // SAFETY: current VMCS.
            let info = unsafe { arch::vmread(ro::VMEXIT_INTERRUPTION_INFO) }.unwrap_or(0);
            // SDM 25.9.2: valid (bit 31) with type 2 (NMI) in bits 10:8.
            if info & (1 << 31) != 0 && (info >> 8) & 7 == 2 {
                // SAFETY: right after the exit on this CPU, host IDT loaded.
                unsafe { arch::raise_nmi() };
            }
        }
        if ctls.proc2 & setup::proc2::PML != 0 {
            // Drain on every exit, before anything reports the dirty log (SDM 29.3.6).
            // SAFETY: current VMCS.
            let index = unsafe { arch::vmread(guest::PML_INDEX) }.unwrap_or(511) as u16;
            if index != crate::dirty::pml::INDEX_RESET {
                vm.with(|vm| vm.pml_drain(p, vcpu.pml, index));
                // SAFETY: current VMCS.
                if let Err(fail) = unsafe { arch::vmwrite(guest::PML_INDEX, crate::dirty::pml::INDEX_RESET.into()) } {
                    break Err(HwError::Vmx { step: "vmwrite (pml index)", fail });
                }
            }
        }
        if exit.reason & (1 << 31) != 0 {
            // VM-entry failure (SDM 27.8): ask the checker which rule the guest state breaks.
            if let Err(violation) = checks::check_entry(&HwVmcs, caps) {
                vcpu.state.halted = true;
                break Err(HwError::EntryCheck { violation, fail: None, exit_reason: exit.reason });
            }
        }
        let cpuid = |leaf: u32, sub: u32| arch::cpuid(leaf, sub);
        let action = vm.with(|vm| vm.handle_exit(p, &mut vcpu.state, &exit, &mut vcpu.gprs, &cpuid));
        let advance = match action {
            Action::Resume { advance } => advance,
            // A hypercall or console write that goes to user space resumes after it.
            Action::ToUser(_) if exit.reason == reason::VMCALL || exit.reason == reason::IO => exit.instr_len,
            _ => 0,
        };
        if advance != 0 {
            // SAFETY: current VMCS.
            let rip = unsafe { arch::vmread(guest::RIP) }.unwrap_or(0);
            // SAFETY: current VMCS.
            if let Err(fail) = unsafe { arch::vmwrite(guest::RIP, rip.wrapping_add(advance)) } {
                break Err(HwError::Vmx { step: "vmwrite (rip)", fail });
            }
        }
        match action {
            Action::Resume { .. } => {}
            Action::Yield => {
                if env.should_return() {
                    break Ok(RunExit::Interrupted);
                }
            }
            Action::ToUser(x) => break Ok(x),
        }
        if env.should_return() {
            break Ok(RunExit::Interrupted);
        }
    };
    // SAFETY: the caller owns the FPU; the area is aligned.
    unsafe { arch::fxsave(&mut vcpu.fx) };
    // SAFETY: as above; the host's value goes back before anything returns to user space.
    unsafe {
        vcpu.kernel_gs_base = arch::rdmsr(arch::IA32_KERNEL_GS_BASE);
        arch::wrmsr(arch::IA32_KERNEL_GS_BASE, kernel_gs_base);
    }
    result
}
