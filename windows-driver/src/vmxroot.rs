//! VMX operation on every processor: VMXON at load, VMXOFF at unload, and the driver-wide
//! capabilities every request uses.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use smudge_core::arch;
use smudge_core::vcpu::write_revision_id;
use smudge_core::vmx::caps::VmxCaps;
use smudge_windows::vmxon::{cr4_for_vmxon, CrMismatch, CR4_VMXE};

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
/// Each processor's VMXON region (0 = none).
static VMXON_REGION: [AtomicU64; MAX_PROCESSORS] = [const { AtomicU64::new(0) }; MAX_PROCESSORS];
/// Processors in VMX root operation.
static VMX_ON: [AtomicBool; MAX_PROCESSORS] = [const { AtomicBool::new(false) }; MAX_PROCESSORS];

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
    VMX_ON
        .get(index as usize)
        .is_some_and(|f| f.load(Ordering::Acquire))
}

/// Why VMXON failed on a processor.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)] // the fields are read by the Debug message DriverEntry logs
pub enum VmxonFailure {
    /// No page for the VMXON region.
    NoMemory,
    /// The processor could not be selected.
    NoProcessor,
    /// CR4.VMXE was already set: another hypervisor.
    InUse,
    /// CR0/CR4 break the VMX fixed bits.
    FixedBits(CrMismatch),
    /// VMXON itself failed.
    Vmxon(arch::VmFail),
}

/// VMXON on every processor, then INVEPT all-context there (stale EPT translations from an
/// earlier VMM must not survive, SDM 29.4.3.4). On failure every processor is switched back.
pub fn vmxon_all(caps: &VmxCaps) -> Result<(), (u32, VmxonFailure)> {
    let p = NtPlatform;
    let count = processors::count();
    for i in 0..count {
        // VMXON regions belong to the driver, not to a VM: out of the page count and its cap.
        let Some(page) = NtPlatform::os_alloc() else {
            vmxoff_all();
            return Err((i, VmxonFailure::NoMemory));
        };
        // SDM 25.11.5: the VMXON region starts with the revision identifier.
        write_revision_id(&p, page, caps);
        if let Some(slot) = VMXON_REGION.get(i as usize) {
            slot.store(page, Ordering::Relaxed);
        }
        let r = processors::on_processor(i, || vmxon_here(i, page, caps))
            .unwrap_or(Err(VmxonFailure::NoProcessor));
        if let Err(why) = r {
            vmxoff_all();
            return Err((i, why));
        }
    }
    Ok(())
}

/// Runs at DISPATCH_LEVEL on processor `index`.
fn vmxon_here(index: u32, region: u64, caps: &VmxCaps) -> Result<(), VmxonFailure> {
    // Interrupts off: nothing else may rewrite CR4 between our read and write.
    let flags = cpu::irq_save();
    let cr4 = cpu::cr4();
    let r = if cr4 & CR4_VMXE != 0 {
        Err(VmxonFailure::InUse)
    } else {
        match cr4_for_vmxon(cpu::cr0(), cr4, caps) {
            Err(m) => Err(VmxonFailure::FixedBits(m)),
            Ok(new) => {
                // SAFETY: interrupts are off and only VMXE changes.
                unsafe { cpu::write_cr4(new) };
                // SAFETY: CR4.VMXE=1, CR0/CR4 fit the fixed bits (checked), IA32_FEATURE_CONTROL
                // is locked with VMX on (vtx::check at load), `region` holds the revision id.
                match unsafe { arch::vmxon(region) } {
                    Ok(()) => {
                        // SAFETY: VMX root operation now; INVEPT type 2 is required by the
                        // admission check (core choose_mode).
                        let _ = unsafe { arch::invept(arch::InveptType::AllContext, 0) };
                        Ok(())
                    }
                    Err(fail) => {
                        // SAFETY: as above: only VMXE changes back.
                        unsafe { cpu::write_cr4(cr4) };
                        Err(VmxonFailure::Vmxon(fail))
                    }
                }
            }
        }
    };
    cpu::irq_restore(flags);
    if r.is_ok() {
        if let Some(f) = VMX_ON.get(index as usize) {
            f.store(true, Ordering::Release);
        }
    }
    r
}

/// VMXOFF wherever this driver did VMXON, and frees the VMXON regions.
pub fn vmxoff_all() {
    for i in 0..processors::count().min(MAX_PROCESSORS as u32) {
        let _ = processors::on_processor(i, || {
            if VMX_ON
                .get(i as usize)
                .is_some_and(|f| f.swap(false, Ordering::AcqRel))
            {
                let flags = cpu::irq_save();
                // SAFETY: this processor is in VMX root operation (VMX_ON) and no guest runs
                // on it (no VM exists at unload; we are at DISPATCH_LEVEL here).
                let _ = unsafe { arch::vmxoff() };
                // SAFETY: interrupts off; only VMXE changes.
                unsafe { cpu::write_cr4(cpu::cr4() & !CR4_VMXE) };
                cpu::irq_restore(flags);
            }
        });
    }
    for slot in VMXON_REGION.iter() {
        let page = slot.swap(0, Ordering::Relaxed);
        if page != 0 {
            NtPlatform::os_free(page);
        }
    }
}
