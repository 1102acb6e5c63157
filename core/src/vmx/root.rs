//! VMX operation on every CPU: each CPU's VMXON region, which CPUs are in VMX root operation,
//! and the rules before VMXON (SDM 24.7, 24.8, A.7, A.8), the same for both drivers. A shim
//! supplies its processors ([`Processors`]: running a function on one, its control registers,
//! a page for a region); [`VmxRoot::vmxon_all`] and [`VmxRoot::vmxoff_all`] do the rest. The
//! emergency paths (reboot, panic, crash, bug check) call [`VmxRoot::emergency_here`] on the CPU they run on. Part of
//! the arch layer: it executes VMXON and VMXOFF.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::arch::{self, VmFail};
use crate::platform::Platform;
use crate::vcpu::write_revision_id;
use crate::vmx::caps::VmxCaps;
use crate::vmx::hw::VmxCpu;

use crate::regs::CR4_VMXE;

/// CR0 or CR4 breaks the VMX fixed-bit rules, so VMXON would fail (SDM 24.8, A.7, A.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrMismatch {
    /// CR0 lacks a FIXED0 bit or has a bit FIXED1 forbids.
    Cr0 {
        /// Bits that must be 1 but are 0.
        missing: u64,
        /// Bits that must be 0 but are 1.
        forbidden: u64,
    },
    /// CR4 (with VMXE set) lacks a FIXED0 bit or has a bit FIXED1 forbids.
    Cr4 {
        /// Bits that must be 1 but are 0.
        missing: u64,
        /// Bits that must be 0 but are 1.
        forbidden: u64,
    },
}

fn fits(value: u64, fixed0: u64, fixed1: u64) -> (u64, u64) {
    // SDM A.7/A.8: a bit set in FIXED0 must be 1; a bit clear in FIXED1 must be 0.
    (fixed0 & !value, value & !fixed1)
}

/// The CR4 to load before VMXON: the current CR4 plus VMXE. The driver changes no other bit of a
/// register Windows owns; if anything else breaks the fixed bits it refuses instead.
pub fn cr4_for_vmxon(cr0: u64, cr4: u64, caps: &VmxCaps) -> Result<u64, CrMismatch> {
    let (missing, forbidden) = fits(cr0, caps.cr0_fixed0, caps.cr0_fixed1);
    if missing != 0 || forbidden != 0 {
        return Err(CrMismatch::Cr0 { missing, forbidden });
    }
    let new = cr4 | CR4_VMXE;
    let (missing, forbidden) = fits(new, caps.cr4_fixed0, caps.cr4_fixed1);
    if missing != 0 || forbidden != 0 {
        return Err(CrMismatch::Cr4 { missing, forbidden });
    }
    Ok(new)
}

/// How a shim reads and changes this CPU's control registers: read from the registers by
/// default; CR4.VMXE written through the kernel's CR4 shadow on Linux, directly with interrupts
/// off on Windows ([`RawCr`]).
pub trait ControlRegs {
    /// CR0.
    fn cr0(&self) -> u64 {
        // SAFETY: a driver runs at ring 0.
        unsafe { arch::read_cr0() }
    }
    /// CR4.
    fn cr4(&self) -> u64 {
        // SAFETY: a driver runs at ring 0.
        unsafe { arch::read_cr4() }
    }
    /// Sets or clears CR4.VMXE, and nothing else.
    fn set_vmxe(&self, on: bool);
}

/// CR0 and CR4 of the processor that runs it, CR4 written directly with interrupts off: for an
/// OS that keeps no shadow of CR4 (Windows; Linux has one and goes through the kernel).
pub struct RawCr;

impl ControlRegs for RawCr {
    fn set_vmxe(&self, on: bool) {
        // SAFETY: ring 0; interrupts off between the read and the write of CR4 (no handler
        // rewrites it meanwhile), and only VMXE changes; the OS keeps no shadow (the type's
        // contract).
        unsafe {
            let flags = arch::irq_save();
            let cr4 = arch::read_cr4();
            arch::write_cr4(if on { cr4 | CR4_VMXE } else { cr4 & !CR4_VMXE });
            arch::irq_restore(flags);
        }
    }
}

/// Processors a driver keeps VMX state for (Windows refuses machines with more active ones;
/// Linux uses the CPU numbers below it).
pub const MAX_CPUS: usize = 256;

/// The driver's VMX state: one per driver (a kernel module or a driver image links one core).
pub static ROOT: VmxRoot<MAX_CPUS> = VmxRoot::new();

/// The processors of the machine as a driver reaches them: what [`VmxRoot::vmxon_all`],
/// [`VmxRoot::vmxoff_all`], [`on_cpu`] and [`crate::vmx::admission::check_every`] run on.
///
/// # Safety
/// [`Processors::on`] runs `f` on processor `i`, with interrupts off, and returns only after it;
/// [`Processors::on_all`] runs `f(i)` on every present processor `i` that way: [`on_cpu`] and
/// [`on_each_cpu`] give `f` a proof of VMX operation on the processor it runs on.
pub unsafe trait Processors {
    /// Processor numbers run from 0 to this bound (exclusive).
    fn bound(&self) -> u32;
    /// False for a number without a processor to use (Linux: an offline CPU). By default every
    /// number below the bound has one (Windows counts active processors only).
    fn present(&self, i: u32) -> bool {
        i < self.bound()
    }
    /// The number of the processor that calls it (only a hint unless preemption is off).
    fn current(&self) -> u32;
    /// Runs `f` on processor `i` with interrupts off, and returns when it is done; false when
    /// the processor cannot be reached.
    fn on(&self, i: u32, f: &mut (dyn FnMut() + Send)) -> bool;
    /// Runs `f(i)` on every present processor `i` with interrupts off, and returns when all are
    /// done. The default reaches them one after the other; an OS that can reach them at once
    /// (Linux's on_each_cpu) does.
    fn on_all(&self, f: &(dyn Fn(u32) + Sync)) {
        for i in (0..self.bound()).filter(|&i| self.present(i)) {
            self.on(i, &mut || f(i));
        }
    }
    /// The control registers of the processor that calls them (the same value serves every
    /// processor: it reads and writes whichever one runs it). By default the registers
    /// themselves, for an OS that keeps no shadow of CR4.
    fn cr(&self) -> &(dyn ControlRegs + Sync) {
        &RawCr
    }
    /// Interrupts off on the calling processor, the OS's way (Linux's lockdep must see it);
    /// returns what [`Processors::irq_restore`] takes back. By default RFLAGS.IF itself.
    fn irq_save(&self) -> usize {
        // SAFETY: a driver runs at ring 0; the caller pairs it with irq_restore here.
        unsafe { arch::irq_save() as usize }
    }
    /// Interrupts back as [`Processors::irq_save`] found them.
    fn irq_restore(&self, flags: usize) {
        // SAFETY: what irq_save returned on this processor.
        unsafe { arch::irq_restore(flags as u64) }
    }
    /// Runs `f` on the calling processor between [`Processors::irq_save`] and
    /// [`Processors::irq_restore`].
    fn with_irqs_off(&self, f: &mut dyn FnMut()) {
        let flags = self.irq_save();
        f();
        self.irq_restore(flags);
    }
    /// A zeroed page for a VMXON region: the driver's, outside the VMs' page budget.
    fn alloc_region(&self) -> Option<u64>;
    /// Returns a page of [`Processors::alloc_region`].
    fn free_region(&self, pa: u64);
}

/// The processor that runs the caller, alone, reached without an IPI: for the paths that run on
/// the CPU they concern, where another CPU cannot be asked (Linux: the CPU-hotplug callbacks, and
/// the system-sleep callbacks, which run with interrupts off and every other CPU offline).
pub struct ThisCpu<'a> {
    procs: &'a dyn Processors,
    cpu: u32,
}

impl<'a> ThisCpu<'a> {
    /// Processor `cpu`, the caller's, of `procs`.
    ///
    /// # Safety
    /// The caller runs on processor `cpu` and stays there while the value lives (preemption or
    /// interrupts off, or a thread bound to it).
    pub unsafe fn new(procs: &'a dyn Processors, cpu: u32) -> ThisCpu<'a> {
        ThisCpu { procs, cpu }
    }
}

// SAFETY: `on` runs `f` only on `cpu`, where the caller stays (`ThisCpu::new`'s contract), with
// interrupts off by the OS's `irq_save`, and returns after it.
unsafe impl Processors for ThisCpu<'_> {
    fn bound(&self) -> u32 {
        self.procs.bound()
    }
    fn present(&self, i: u32) -> bool {
        i == self.cpu
    }
    fn current(&self) -> u32 {
        self.cpu
    }
    fn on(&self, i: u32, f: &mut (dyn FnMut() + Send)) -> bool {
        if i != self.cpu {
            return false;
        }
        self.procs.with_irqs_off(f);
        true
    }
    fn cr(&self) -> &(dyn ControlRegs + Sync) {
        self.procs.cr()
    }
    fn irq_save(&self) -> usize {
        self.procs.irq_save()
    }
    fn irq_restore(&self, flags: usize) {
        self.procs.irq_restore(flags)
    }
    fn alloc_region(&self) -> Option<u64> {
        self.procs.alloc_region()
    }
    fn free_region(&self, pa: u64) {
        self.procs.free_region(pa)
    }
}

/// Runs `f` on processor `cpu` (as [`Processors::on`]) with the proof of VMX operation there,
/// or None where this driver did not VMXON.
pub fn on_cpu(procs: &dyn Processors, cpu: u32, f: &(dyn Fn(Option<&VmxCpu>) + Sync)) {
    procs.on(cpu, &mut || {
        // SAFETY: `on` runs this on `cpu` with interrupts off (the trait's contract): the CPU
        // stays this one while `f` holds the proof.
        f(unsafe { ROOT.here(cpu) }.as_ref())
    });
}

/// [`on_cpu`] on every present processor ([`Processors::on_all`]).
pub fn on_each_cpu(procs: &dyn Processors, f: &(dyn Fn(Option<&VmxCpu>) + Sync)) {
    procs.on_all(&|cpu| {
        // SAFETY: `on_all` runs this on `cpu` with interrupts off (the trait's contract).
        f(unsafe { ROOT.here(cpu) }.as_ref())
    });
}

/// Why VMXON failed on a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxonFailure {
    /// No VMXON region for this CPU (no page, or a CPU beyond the driver's table).
    NoRegion,
    /// CR4.VMXE was already set: another hypervisor.
    InUse,
    /// CR0/CR4 break the VMX fixed bits.
    FixedBits(CrMismatch),
    /// VMXON itself failed.
    Vmxon(VmFail),
}

/// The VMX state of a driver's CPUs (`N` at most).
#[derive(Debug)]
pub struct VmxRoot<const N: usize> {
    region: [AtomicU64; N],
    on: [AtomicBool; N],
    /// Per CPU, how it left VMX operation in an emergency (0: it did not): bit 63 set, bit 62
    /// when VMXOFF succeeded, CR4 after it below. What the CPU that panics reports for the
    /// others, whose own messages Linux drops then.
    left: [AtomicU64; N],
}

impl<const N: usize> Default for VmxRoot<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> VmxRoot<N> {
    /// No region, no CPU in VMX operation.
    pub const fn new() -> VmxRoot<N> {
        VmxRoot {
            region: [const { AtomicU64::new(0) }; N],
            on: [const { AtomicBool::new(false) }; N],
            left: [const { AtomicU64::new(0) }; N],
        }
    }

    /// The line that says CPU `cpu` left VMX operation in an emergency
    /// ([`VmxRoot::emergency_here`]): whether VMXOFF succeeded, and CR4.VMXE after it.
    pub fn left_in_emergency(&self, cpu: u32) -> Option<crate::msg::MsgBuf> {
        let v = self.left.get(cpu as usize)?.load(Ordering::Acquire);
        if v == 0 {
            return None;
        }
        let how = if v & 1 << 62 != 0 {
            "VMXOFF"
        } else {
            "VMXOFF FAILED"
        };
        let vmxe = u8::from(v & CR4_VMXE != 0);
        let mut m = crate::msg::MsgBuf::new();
        let _ = write!(m, "CPU {cpu} left VMX operation ({how}, CR4.VMXE {vmxe})");
        Some(m)
    }

    /// Makes the page at `pa` (4 KiB, zeroed, the driver's) CPU `cpu`'s VMXON region: it starts
    /// with the revision identifier (SDM 25.11.5). False for a CPU beyond the table.
    pub fn set_region<P: Platform + ?Sized>(
        &self,
        cpu: u32,
        pa: u64,
        p: &P,
        caps: &VmxCaps,
    ) -> bool {
        let Some(r) = self.region.get(cpu as usize) else {
            return false;
        };
        write_revision_id(p, pa, caps);
        r.store(pa, Ordering::Release);
        true
    }

    /// Gives the regions back through `free`, but not one of a CPU still in VMX operation (one
    /// VMXOFF could not reach): the processor may use its VMXON region until VMXOFF (SDM
    /// 25.11.5), so that page stays the driver's.
    pub fn take_regions(&self, mut free: impl FnMut(u64)) {
        for (r, on) in self.region.iter().zip(&self.on) {
            if on.load(Ordering::Acquire) {
                continue;
            }
            let pa = r.swap(0, Ordering::AcqRel);
            if pa != 0 {
                free(pa);
            }
        }
    }

    /// True if CPU `cpu` is in VMX root operation (read on that CPU, preemption off).
    pub fn is_on(&self, cpu: u32) -> bool {
        self.on
            .get(cpu as usize)
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// The proof of VMX operation on CPU `cpu`, if this driver did VMXON there.
    ///
    /// # Safety
    /// The caller runs on CPU `cpu` and stays there (preemption or interrupts off) while the
    /// proof lives.
    pub unsafe fn here(&self, cpu: u32) -> Option<VmxCpu> {
        // SAFETY: the flag says VMX root operation here; the caller stays on this CPU.
        self.is_on(cpu).then(|| unsafe { VmxCpu::assume(cpu) })
    }

    /// VMXON on the current CPU, number `cpu`, then INVEPT all-context (stale translations of an
    /// earlier VMM must not survive, SDM 29.4.3.4). Call with interrupts off, where nothing else
    /// changes CR4 meanwhile, after the admission check accepted this CPU (IA32_FEATURE_CONTROL
    /// locked with VMX outside SMX on). On failure CR4 is as it was.
    pub fn vmxon_here(
        &self,
        cpu: u32,
        caps: &VmxCaps,
        cr: &dyn ControlRegs,
    ) -> Result<(), VmxonFailure> {
        let region = self
            .region
            .get(cpu as usize)
            .map(|r| r.load(Ordering::Acquire))
            .filter(|&r| r != 0)
            .ok_or(VmxonFailure::NoRegion)?;
        let flag = self.on.get(cpu as usize).ok_or(VmxonFailure::NoRegion)?;
        let cr4 = cr.cr4();
        if cr4 & CR4_VMXE != 0 {
            return Err(VmxonFailure::InUse);
        }
        cr4_for_vmxon(cr.cr0(), cr4, caps).map_err(VmxonFailure::FixedBits)?;
        cr.set_vmxe(true);
        // SAFETY: CR4.VMXE = 1 and CR0/CR4 fit the fixed bits (checked just above), the caller's
        // admission check found IA32_FEATURE_CONTROL locked with VMX outside SMX enabled, and
        // `region` holds the revision identifier (`set_region`).
        if let Err(f) = unsafe { arch::vmxon(region) } {
            cr.set_vmxe(false);
            return Err(VmxonFailure::Vmxon(f));
        }
        // SAFETY: VMX root operation now; all-context INVEPT is required by the admission check
        // (VmxCaps::choose_mode).
        let _ = unsafe { arch::invept(arch::InveptType::AllContext, 0) };
        flag.store(true, Ordering::Release);
        Ok(())
    }

    /// VMX operation on every present processor ([`VmxRoot::vmxon_one`]). On a failure every
    /// processor leaves VMX operation again and the regions go back; the error names the
    /// processor and why (None: it could not be reached). Returns how many processors are in
    /// VMX operation.
    pub fn vmxon_all<P: Platform + ?Sized>(
        &self,
        procs: &dyn Processors,
        p: &P,
        caps: &VmxCaps,
    ) -> Result<u32, (u32, Option<VmxonFailure>)> {
        let mut n = 0;
        for i in (0..procs.bound()).filter(|&i| procs.present(i)) {
            if let Err(why) = self.vmxon_one(procs, p, caps, i) {
                self.vmxoff_all(procs);
                return Err((i, why));
            }
            n += 1;
        }
        Ok(n)
    }

    /// VMX operation on processor `i` (a CPU coming online, or one of [`VmxRoot::vmxon_all`]): a
    /// region (the one it kept from before, or a new one), then VMXON there with interrupts off
    /// ([`VmxRoot::vmxon_here`]). A processor flagged in VMX operation is left so if CR4.VMXE
    /// is still set there; otherwise it lost VMX operation without this driver (a sleep VMXOFF
    /// could not reach it before), the flag was stale, and the VMCSs active there are lost. On
    /// failure the region stays (`vmxoff_all`, at a failed load or at unload, returns it);
    /// None: the processor could not be reached. Ok(true): VMXON was executed; Ok(false): it already was in VMX operation.
    pub fn vmxon_one<P: Platform + ?Sized>(
        &self,
        procs: &dyn Processors,
        p: &P,
        caps: &VmxCaps,
        i: u32,
    ) -> Result<bool, Option<VmxonFailure>> {
        let cr = procs.cr();
        if self.is_on(i) {
            let mut still = false;
            procs.on(i, &mut || still = cr.cr4() & CR4_VMXE != 0);
            if still {
                return Ok(false);
            }
            // Its VMCSs are marked lost first: a run elsewhere that sees the flag off must not
            // take them for clear, or it would make one current whose data went with the CPU.
            if let Some(list) = crate::vmx::active::list(i) {
                crate::vmx::active::mark_lost(list);
            }
            crate::vmx::hw::forget_loaded(i);
            if let Some(f) = self.on.get(i as usize) {
                f.store(false, Ordering::Release);
            }
        }
        let kept = self
            .region
            .get(i as usize)
            .map(|r| r.load(Ordering::Acquire))
            .filter(|&r| r != 0);
        match kept.or_else(|| procs.alloc_region()) {
            Some(pa) if self.set_region(i, pa, p, caps) => {
                let mut r = Err(None);
                if procs.on(i, &mut || r = self.vmxon_here(i, caps, cr).map_err(Some)) {
                    r.map(|()| true)
                } else {
                    Err(None)
                }
            }
            Some(pa) => {
                procs.free_region(pa);
                Err(Some(VmxonFailure::NoRegion))
            }
            None => Err(Some(VmxonFailure::NoRegion)),
        }
    }

    /// VMXOFF on processor `i` (a CPU going offline), run there; its region stays. True if it
    /// was in VMX operation and left it.
    pub fn vmxoff_one(&self, procs: &dyn Processors, i: u32) -> bool {
        let (cr, mut left) = (procs.cr(), false);
        procs.on(i, &mut || left = self.vmxoff_here(i, cr));
        left
    }

    /// VMXOFF wherever this driver did VMXON, then every region back.
    pub fn vmxoff_all(&self, procs: &dyn Processors) {
        self.vmxoff_each(procs);
        self.take_regions(|pa| procs.free_region(pa));
    }

    /// VMXOFF wherever this driver did VMXON; the regions stay for the next
    /// [`VmxRoot::vmxon_all`] (a host sleep).
    pub fn vmxoff_each(&self, procs: &dyn Processors) {
        for (i, on) in self.on.iter().enumerate() {
            if on.load(Ordering::Acquire) {
                let _ = self.vmxoff_one(procs, i as u32);
            }
        }
    }

    /// VMCLEAR of every VMCS active on the current CPU, number `cpu`, then VMXOFF, if this
    /// driver did VMXON here; clears CR4.VMXE. True if it was on. Call with interrupts off.
    pub fn vmxoff_here(&self, cpu: u32, cr: &dyn ControlRegs) -> bool {
        self.leave_here(cpu, cr, false)
    }

    /// What the emergency paths (reboot, panic, crash, bug check) call on the CPU they run on:
    /// [`VmxRoot::vmxoff_here`], whose VMCLEARs put the guests' state where a crash dump finds
    /// it, and a record for [`VmxRoot::left_in_emergency`]. INIT is blocked in VMX root
    /// operation (SDM 25.8): a CPU left in it hangs a reboot and keeps a crash kernel from
    /// starting it.
    pub fn emergency_here(&self, cpu: u32, cr: &dyn ControlRegs) -> bool {
        self.leave_here(cpu, cr, true)
    }

    fn leave_here(&self, cpu: u32, cr: &dyn ControlRegs, emergency: bool) -> bool {
        let was_on = self
            .on
            .get(cpu as usize)
            .is_some_and(|f| f.swap(false, Ordering::AcqRel));
        if was_on {
            // SAFETY: this driver did VMXON on this CPU (the flag), so it is in VMX operation,
            // and the caller runs here with interrupts off. Every VMCS active here is VMCLEARed
            // first, so none is lost (`vmx::active`).
            let off = unsafe {
                crate::vmx::hw::clear_all_active(cpu);
                arch::vmxoff()
            };
            cr.set_vmxe(false);
            if let Some(l) = self.left.get(cpu as usize).filter(|_| emergency) {
                let ok = u64::from(off.is_ok()) << 62;
                l.store(cr.cr4() | ok | 1 << 63, Ordering::Release);
            }
        }
        was_on
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    extern crate std;
    use super::*;

    /// Bochs corei7_skylake_x, read from the fixture dump like the driver reads the MSRs: CR0
    /// FIXED0 0x80000021 (PE, NE, PG), CR4 FIXED0 0x2000 (VMXE), CR4 FIXED1 0x3727ff.
    fn caps() -> VmxCaps {
        use crate::vmx::caps::MsrValue;
        use crate::vmx::msr_dump::MsrDump;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared-tests/fixtures/vmx-msrs/bochs-corei7_skylake_x.msr"
        );
        let d = MsrDump::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        let caps = VmxCaps::from_reader(|m| d.msr(m), |l, s| d.cpuid(l, s));
        assert!(matches!(d.msr(0x489), MsrValue::Value(0x3727ff)));
        caps
    }

    #[test]
    fn vmxon_adds_only_vmxe() {
        let cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE: a Windows x64 CR0
        assert_eq!(cr4_for_vmxon(cr0, 0x0035_06f8, &caps()), Ok(0x0035_26f8));
    }

    #[test]
    fn fixed_bit_violations_are_named() {
        let caps = caps();
        // CR0 without NE (bit 5).
        assert_eq!(
            cr4_for_vmxon(0x8005_0013, 0x6f8, &caps),
            Err(CrMismatch::Cr0 {
                missing: 0x20,
                forbidden: 0
            })
        );
        // CR4 with bit 22 (PKS, not allowed by this FIXED1).
        assert_eq!(
            cr4_for_vmxon(0x8005_0033, 0x6f8 | 1 << 22, &caps),
            Err(CrMismatch::Cr4 {
                missing: 0,
                forbidden: 1 << 22
            })
        );
    }
}
