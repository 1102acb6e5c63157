//! VMX operation on every processor (core's `vmx::root`, run on each one at DISPATCH_LEVEL),
//! and the driver-wide capabilities every request uses.

use core::cell::UnsafeCell;

use smudge_core::vmx::caps::VmxCaps;
use smudge_core::vmx::root::{ControlRegs, VmxRoot, VmxonFailure, CR4_VMXE};

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
/// Every processor's VMX state.
static ROOT: VmxRoot<MAX_PROCESSORS> = VmxRoot::new();

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

/// True if processor `index` is in VMX root operation (read at DISPATCH_LEVEL on it).
pub fn vmx_on(index: u32) -> bool {
    ROOT.is_on(index)
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

/// Why VMXON failed on a processor, or that it could not be selected (None).
pub type Failure = Option<VmxonFailure>;

/// VMXON on every processor; on failure every processor is switched back.
pub fn vmxon_all(caps: &VmxCaps) -> Result<(), (u32, Failure)> {
    for i in 0..processors::count() {
        // VMXON regions belong to the driver, not to a VM: out of the page count and its cap.
        let placed = NtPlatform::os_alloc().is_some_and(|page| {
            ROOT.set_region(i, page, &NtPlatform, caps) || {
                NtPlatform::os_free(page);
                false
            }
        });
        let r = match placed {
            false => Err(Some(VmxonFailure::NoRegion)),
            true => processors::on_processor(i, || {
                let flags = cpu::irq_save();
                let r = ROOT.vmxon_here(i, caps, &NtCr);
                cpu::irq_restore(flags);
                r
            })
            .map_err(|_| None)
            .and_then(|r| r.map_err(Some)),
        };
        if let Err(why) = r {
            vmxoff_all();
            return Err((i, why));
        }
    }
    Ok(())
}

/// VMXOFF wherever this driver did VMXON, and frees the VMXON regions.
pub fn vmxoff_all() {
    for i in 0..processors::count().min(MAX_PROCESSORS as u32) {
        let _ = processors::on_processor(i, || ROOT.vmxoff_here(i, &NtCr));
    }
    ROOT.take_regions(NtPlatform::os_free);
}
