//! VMX operation on every processor (core's `vmx::root`, run on each one at DISPATCH_LEVEL),
//! and the driver-wide capabilities every request uses.

use core::cell::UnsafeCell;

use smudge_core::regs::CR4_VMXE;
use smudge_core::vmx::caps::VmxCaps;
use smudge_core::vmx::root::{ControlRegs, Processors, VmxonFailure, ROOT};

use crate::cpu;
use crate::platform::NtPlatform;
use crate::processors::{self, MAX_PROCESSORS};

/// What DriverEntry decided, read by every request.
pub type Global = smudge_core::session::Driver;

struct GlobalCell(UnsafeCell<Option<Global>>);

// SAFETY: written only by DriverEntry before the device exists and by DriverUnload after it is
// gone (no request can run then); read-only in between.
unsafe impl Sync for GlobalCell {}

static GLOBAL: GlobalCell = GlobalCell(UnsafeCell::new(None));

pub fn global() -> Option<&'static Global> {
    // SAFETY: see GlobalCell: no writer runs while requests can read.
    unsafe { (*GLOBAL.0.get()).as_ref() }
}

/// # Safety
/// Only from DriverEntry before the device exists, or DriverUnload after it is deleted.
pub unsafe fn set_global(g: Option<Global>) {
    // SAFETY: no concurrent reader (caller's contract).
    unsafe { *GLOBAL.0.get() = g };
}

/// CR0 and CR4 of the current processor, CR4 written with interrupts off (Windows keeps no CR4
/// shadow: the register is the truth).
struct NtCr;

impl ControlRegs for NtCr {
    fn cr0(&self) -> u64 {
        cpu::cr0()
    }
    fn cr4(&self) -> u64 {
        cpu::cr4()
    }
    fn set_vmxe(&self, on: bool) {
        let flags = cpu::irq_save();
        let cr4 = cpu::cr4();
        let new = if on { cr4 | CR4_VMXE } else { cr4 & !CR4_VMXE };
        // SAFETY: interrupts are off (no handler rewrites CR4 meanwhile) and only VMXE changes.
        unsafe { cpu::write_cr4(new) };
        cpu::irq_restore(flags);
    }
}

/// The active processors, reached by a group-affinity switch at DISPATCH_LEVEL with
/// interrupts off.
pub struct NtProcessors;

// SAFETY: `on_processor` runs `f` on processor `i` at DISPATCH_LEVEL, here with interrupts off,
// and returns after it.
unsafe impl Processors for NtProcessors {
    fn bound(&self) -> u32 {
        processors::count().min(MAX_PROCESSORS as u32)
    }
    fn present(&self, _i: u32) -> bool {
        true
    }
    fn on(&self, i: u32, f: &mut (dyn FnMut() + Send)) -> bool {
        processors::on_processor(i, || {
            let flags = cpu::irq_save();
            f();
            cpu::irq_restore(flags);
        })
        .is_ok()
    }
    fn cr(&self) -> &(dyn ControlRegs + Sync) {
        &NtCr
    }
    fn alloc_region(&self) -> Option<u64> {
        // VMXON regions belong to the driver, not to a VM: out of the page count and its cap.
        NtPlatform::os_alloc()
    }
    fn free_region(&self, pa: u64) {
        NtPlatform::os_free(pa)
    }
}

/// VMXON on every processor; on failure every processor is switched back.
pub fn vmxon_all(caps: &VmxCaps) -> Result<u32, (u32, Option<VmxonFailure>)> {
    ROOT.vmxon_all(&NtProcessors, &NtPlatform, caps)
}

/// VMXOFF wherever this driver did VMXON, and frees the VMXON regions.
pub fn vmxoff_all() {
    ROOT.vmxoff_all(&NtProcessors);
}
