//! Windows for the core's session layer: the one implementation of
//! `smudge_core::session::Os`. What a request does is decided in the core; here are only the
//! Windows means (pool, user buffers, processor affinity, IRQL, extended state, interrupt time).

use smudge_core::hostpt;
use smudge_core::session::{Fail, HostMapping, Os, RunPolicy};
use smudge_core::vmx::hw::{GuestContext, Hardware, HwVcpu, VmxCpu};
use smudge_core::vmx::root::{self, ROOT};
use smudge_windows::budget;

use crate::platform::{self, NtPlatform};
use crate::pool::{PoolBox, PoolBuf};
use crate::usermem::{copy_from_user, copy_to_user};
use crate::vmxroot::NtProcessors;
use crate::{cpu, nt, processors};

/// Interrupt time, 100 ns units.
fn interrupt_time() -> u64 {
    let mut qpc = 0u64;
    // SAFETY: a valid out pointer; callable at any IRQL.
    unsafe { nt::KeQueryInterruptTimePrecise(&mut qpc) }
}

impl Os for NtPlatform {
    type Buf = PoolBuf;
    type VcpuBox = PoolBox<HwVcpu>;
    type Pin = processors::Pinned;
    type Cpu<'a> = Hardware<'a>;
    const POLICY: RunPolicy = budget::POLICY;

    fn buffer(&self, len: usize) -> Option<PoolBuf> {
        PoolBuf::zeroed(len)
    }
    fn box_vcpu(&self, vcpu: HwVcpu) -> Result<PoolBox<HwVcpu>, HwVcpu> {
        PoolBox::new(vcpu)
    }
    fn copy_from_user(&self, dst: &mut [u8], src: u64) -> Result<(), Fail> {
        copy_from_user(dst, src).map_err(|_| Fail::Fault)
    }
    fn copy_to_user(&self, dst: u64, src: &[u8]) -> Result<(), Fail> {
        copy_to_user(dst, src).map_err(|_| Fail::Fault)
    }
    fn current_cpu(&self) -> u32 {
        processors::current()
    }
    fn on_cpu(&self, cpu: u32, f: &(dyn Fn(Option<&VmxCpu>) + Sync)) {
        root::on_cpu(&NtProcessors, cpu, f)
    }
    fn on_each_cpu(&self, f: &(dyn Fn(Option<&VmxCpu>) + Sync)) {
        root::on_each_cpu(&NtProcessors, f)
    }
    fn pin(&self, cpu: u32) -> Result<processors::Pinned, Fail> {
        processors::pin(cpu).map_err(|_| Fail::Io)
    }
    fn with_guest_context<R>(&self, f: impl FnOnce(&mut Hardware<'_>) -> R) -> Result<R, Fail> {
        let mut xsave = nt::XStateSave::new();
        // SAFETY: PASSIVE_LEVEL (a RUN request); `xsave` stays in place until the matching
        // restore below.
        let status =
            unsafe { nt::KeSaveExtendedProcessorState(nt::XSTATE_MASK_LEGACY, &mut xsave) };
        if status < 0 {
            return Err(Fail::Io);
        }
        // SAFETY: PASSIVE_LEVEL; lowered below.
        let old_irql = unsafe { cpu::raise_to_dispatch() };
        // SAFETY: DISPATCH_LEVEL: this thread stays on this processor until the IRQL drops.
        let r = match unsafe { ROOT.here(processors::current()) } {
            Some(vmx) => {
                // SAFETY: DISPATCH_LEVEL (no preemption) and the legacy FPU state saved until
                // the lines below.
                let ctx = unsafe { GuestContext::assume(vmx) };
                // SAFETY: IA32_DEBUGCTL is architectural on every Intel 64 processor; CPL 0.
                let debugctl = Some(unsafe { cpu::rdmsr(smudge_core::arch::IA32_DEBUGCTL) });
                Ok(f(&mut Hardware::new(&ctx, debugctl)))
            }
            None => Err(Fail::Io),
        };
        // SAFETY: pairs with the raise above.
        unsafe { cpu::lower_irql(old_irql) };
        // SAFETY: pairs with the save above, at the same IRQL.
        unsafe { nt::KeRestoreExtendedProcessorState(&mut xsave) };
        r
    }
    fn irq_save(&self) -> usize {
        cpu::irq_save()
    }
    fn irq_restore(&self, flags: usize) {
        cpu::irq_restore(flags)
    }
    /// No signals reach a thread in a driver: the RUN slice ([`budget::POLICY`]) brings it back.
    fn signal_pending(&self) -> bool {
        false
    }
    fn resched_pending(&self) -> bool {
        false
    }
    fn resched(&self) {}
    fn pause(&self, waited_ns: u64) {
        match budget::pause(waited_ns) {
            budget::Pause::Spin => core::hint::spin_loop(),
            budget::Pause::Sleep => {
                let interval = budget::SLEEP;
                // SAFETY: PASSIVE_LEVEL (every waiter waits there); a non-alertable kernel-mode
                // wait on a valid relative interval that outlives the call.
                let _ = unsafe { nt::KeDelayExecutionThread(nt::KERNEL_MODE, 0, &interval) };
            }
        }
    }
    fn now_ns(&self) -> u64 {
        interrupt_time().saturating_mul(100)
    }
    fn host_mapping(&self, hpa: u64) -> Option<HostMapping> {
        // SAFETY: MmGetVirtualForPhysical only looks the address up.
        let va = unsafe { nt::MmGetVirtualForPhysical(hpa as i64) } as u64;
        let leaf = host_pte(va)?;
        Some(HostMapping {
            va,
            pte: leaf.entry,
            level: leaf.level,
        })
    }
    /// The tool's read-only mapping of guest RAM is Linux only.
    fn user_pte(&self, _va: u64) -> Option<(u64, u32)> {
        None
    }
    fn rdmsr(&self, msr: u32) -> Option<u64> {
        // SAFETY: Windows has no #GP-safe RDMSR: `answer::caps_resp` asks only for MSRs that
        // `answer::caps_msr_exists` held to the SDM's existence rules, on a processor the
        // admission check accepted; CPL 0.
        Some(unsafe { cpu::rdmsr(msr) })
    }
    fn driver_pages(&self) -> u64 {
        platform::pages_held()
    }
    fn after_free(&self) {
        platform::drain_deferred();
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
    let la57 = cpu::cr4() & smudge_core::regs::CR4_LA57 != 0;
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
