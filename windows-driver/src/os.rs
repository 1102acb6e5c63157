//! Windows for the core's session layer: the one implementation of
//! `smudge_core::session::Os`. What a request does is decided in the core; here are only the
//! Windows means (pool, user buffers, processor affinity, IRQL, extended state, interrupt time).

use smudge_core::abi::windows as budget;
use smudge_core::arch::{self, DirectMap, RawWords};
use smudge_core::hostpt;
use smudge_core::regs::CR4_LA57;
use smudge_core::session::{Fail, HostMapping, Os, RunPolicy};
use smudge_core::vmx::hw::{self, Hardware};
use smudge_core::vmx::root::Processors;

use crate::platform::{self, NtPlatform, Pool};
use crate::processors::{self, NtProcessors};
use crate::{nt, usermem};

impl Os for NtPlatform {
    type Alloc = Pool;
    type Pin = processors::Pinned;
    type Cpu<'a> = Hardware<'a>;
    const POLICY: RunPolicy = budget::POLICY;

    fn copy_from_user(&self, dst: &mut [u8], src: u64) -> Result<(), Fail> {
        usermem::copy_from_user(dst, src)
    }
    fn copy_to_user(&self, dst: u64, src: &[u8]) -> Result<(), Fail> {
        usermem::copy_to_user(dst, src)
    }
    fn processors(&self) -> &dyn Processors {
        &NtProcessors
    }
    fn pin(&self, cpu: u32) -> Result<processors::Pinned, Fail> {
        processors::pin(cpu).ok_or(Fail::Io)
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
        // SAFETY: IA32_DEBUGCTL is architectural on every Intel 64 processor; CPL 0.
        let debugctl = || Some(unsafe { arch::rdmsr(arch::IA32_DEBUGCTL) });
        // SAFETY: at DISPATCH_LEVEL the thread is not preempted, so it stays on this processor,
        // with the legacy FPU state saved around it.
        let r = processors::at_dispatch(|| unsafe {
            hw::on_guest_cpu(NtProcessors.current(), debugctl, f)
        })
        .ok_or(Fail::Io);
        // SAFETY: pairs with the save above, at the same IRQL.
        unsafe { nt::KeRestoreExtendedProcessorState(&mut xsave) };
        r
    }
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
        let mut qpc = 0u64;
        // SAFETY: a valid out pointer; callable at any IRQL. Interrupt time is in 100 ns units.
        unsafe { nt::KeQueryInterruptTimePrecise(&mut qpc) }.saturating_mul(100)
    }
    /// Walks this processor's page tables from CR3, reading them with MmCopyMemory of
    /// physical memory, which fails instead of faulting.
    fn host_mapping(&self, hpa: u64) -> Option<HostMapping> {
        let va = self.va(hpa) as u64;
        let mut cell = RawWords::<Pool>::zeroed(1).filter(|_| va != 0)?;
        // SAFETY: CPL 0 reads of CR3 and CR4.
        let (cr3, cr4) = unsafe { (arch::read_cr3(), arch::read_cr4()) };
        let mut read = |pa: u64| -> Option<u64> {
            let (mut copied, phys) = (0usize, nt::MM_COPY_MEMORY_PHYSICAL);
            // SAFETY: an 8-byte nonpaged target; a physical source that MmCopyMemory validates.
            let s = unsafe { nt::MmCopyMemory(cell.as_mut_ptr().cast(), pa, 8, phys, &mut copied) };
            cell.first().copied().filter(|_| s >= 0 && copied == 8)
        };
        let leaf = hostpt::walk(cr3, va, cr4 & CR4_LA57 != 0, &mut read)?;
        let (pte, level) = (leaf.entry, leaf.level);
        Some(HostMapping { va, pte, level })
    }
    fn rdmsr(&self, msr: u32) -> Option<u64> {
        // SAFETY: Windows has no #GP-safe RDMSR: `answer::caps_resp` asks only for MSRs that
        // `answer::caps_msr_exists` held to the SDM's existence rules, on a processor the
        // admission check accepted; CPL 0.
        Some(unsafe { arch::rdmsr(msr) })
    }
    fn driver_pages(&self) -> u64 {
        platform::budget().held()
    }
    fn after_free(&self) {
        platform::drain_deferred();
    }
}
