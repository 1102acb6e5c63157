//! Loading and unloading a driver, the same on both OSes: no processor beyond the driver's
//! table, every processor admitted with the first one's capabilities
//! (`vmx::admission::check_every`), the page seam checked once (`platform::self_test`), VMX
//! operation on every processor (`vmx::root`), and what every session reads afterwards
//! ([`driver`]). A shim supplies its processors, its pages, the speculation duties it chose and
//! the log; it maps a [`LoadFailure`] to its error code ([`LoadFailure::errno`], or the NTSTATUS
//! table of `abi::windows`).

use core::fmt::Write;

use spin::Mutex;

use crate::msg::MsgBuf;
use crate::platform::{self, Platform};
use crate::spec::Duties;
use crate::vmx::admission::{self, Admission, Refusal};
use crate::vmx::root::{Processors, VmxonFailure, MAX_CPUS, ROOT};

use super::Driver;

/// What [`load`] decided, until [`unload`]. Requests copy it out (a few hundred bytes, once per
/// request), so no reference outlives an unload.
static LOADED: Mutex<Option<Loaded>> = Mutex::new(None);

/// Held by [`load`], [`unload`], [`suspend`], [`resume`], [`cpu_online`] and [`cpu_offline`] for
/// their whole run: one at a time (Windows may deliver a shutdown while the power callback runs).
/// Taken after the OS's CPU-hotplug lock and before [`LOADED`].
static LIFECYCLE: Mutex<()> = Mutex::new(());

/// The loaded driver's state, or None before [`load`] and after [`unload`].
pub fn driver() -> Option<Driver> {
    loaded().map(|l| l.driver)
}

/// What [`load`] reported, or None before it and after [`unload`].
pub fn loaded() -> Option<Loaded> {
    *LOADED.lock()
}

/// Why a driver did not load. Nothing of it stays: no processor in VMX operation, no region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadFailure {
    /// A present processor is numbered at or beyond `vmx::root::MAX_CPUS`.
    TooManyProcessors,
    /// The admission check refused processor `cpu` (None: it could not be reached).
    Refused {
        /// The processor.
        cpu: u32,
        /// Why.
        why: Option<Refusal>,
    },
    /// The OS's pages failed the self-test (`platform::self_test`).
    Pages(&'static str),
    /// VMXON failed on processor `cpu` (None: it could not be reached).
    Vmxon {
        /// The processor.
        cpu: u32,
        /// Why.
        why: Option<VmxonFailure>,
    },
}

impl LoadFailure {
    /// The log line.
    pub fn message(&self) -> MsgBuf {
        let mut m = MsgBuf::new();
        // MsgBuf truncates instead of failing.
        let _ = match self {
            LoadFailure::TooManyProcessors => {
                write!(m, "refusing to load: more than {MAX_CPUS} processors")
            }
            LoadFailure::Refused { cpu, why: Some(w) } => {
                write!(m, "refusing to load (processor {cpu}): {w}")
            }
            LoadFailure::Refused { cpu, why: None } => {
                write!(m, "refusing to load: processor {cpu} could not be reached")
            }
            LoadFailure::Pages(why) => write!(m, "refusing to load: page self-test: {why}"),
            LoadFailure::Vmxon { cpu, why } => {
                write!(m, "VMXON failed on processor {cpu}: {why:?}")
            }
        };
        m
    }

    /// The Linux errno (positive): EBUSY where another hypervisor holds VMX, ENOMEM without
    /// pages, ENODEV for a processor that cannot run smudge.
    pub const fn errno(&self) -> i32 {
        const EBUSY: i32 = 16;
        const ENOMEM: i32 = 12;
        const ENODEV: i32 = 19;
        match self {
            LoadFailure::Refused {
                why: Some(Refusal::VmxInUse),
                ..
            }
            | LoadFailure::Vmxon {
                why: Some(VmxonFailure::InUse),
                ..
            } => EBUSY,
            LoadFailure::Pages(_)
            | LoadFailure::Vmxon {
                why: Some(VmxonFailure::NoRegion),
                ..
            } => ENOMEM,
            _ => ENODEV,
        }
    }
}

/// What a loaded driver says about itself.
#[derive(Clone, Copy, Debug)]
pub struct Loaded {
    /// Processors in VMX operation.
    pub cpus: u32,
    /// What every session reads.
    pub driver: Driver,
}

impl Loaded {
    /// The two log lines of a load: VMX and the capabilities, then the speculation barriers.
    pub fn report(&self) -> [MsgBuf; 2] {
        let (d, mut vmx, mut spec) = (&self.driver, MsgBuf::new(), MsgBuf::new());
        let _ = write!(
            vmx,
            "VMX on {} CPUs: VMCS revision {:#x}, EPT A/D {}, PML {}, VPID {}, dirty tracking mode: {}",
            self.cpus,
            d.caps.revision_id(),
            d.caps.ept_ad(),
            d.caps.pml(),
            d.caps.vpid(),
            d.mode.name()
        );
        let _ = spec.write_str("speculation barriers before each VM entry: ");
        d.duties.describe(&mut spec);
        [vmx, spec]
    }
}

/// Loads the driver on `procs`: admission on every processor (`check_here` runs on each, with
/// its own CPUID, CR4 and MSRs), the page self-test, VMXON on every processor. On success the
/// sessions see the [`Driver`]; on failure nothing is left in VMX operation.
///
/// Call once, before the device exists (no request may run meanwhile).
pub fn load<P: Platform + ?Sized>(
    procs: &dyn Processors,
    p: &P,
    check_here: &(dyn Fn() -> Result<Admission, Refusal> + Sync),
    duties: Duties,
    probe: bool,
) -> Result<Loaded, LoadFailure> {
    let _one = LIFECYCLE.lock();
    if (MAX_CPUS as u32..procs.bound()).any(|i| procs.present(i)) {
        return Err(LoadFailure::TooManyProcessors);
    }
    let Admission { caps, mode } = admission::check_every(procs, check_here)
        .map_err(|(cpu, why)| LoadFailure::Refused { cpu, why })?;
    platform::self_test(p).map_err(LoadFailure::Pages)?;
    let cpus = ROOT
        .vmxon_all(procs, p, &caps)
        .map_err(|(cpu, why)| LoadFailure::Vmxon { cpu, why })?;
    let driver = Driver {
        caps,
        mode,
        duties,
        probe,
    };
    let loaded = Loaded { cpus, driver };
    *LOADED.lock() = Some(loaded);
    Ok(loaded)
}

/// Unloads: VMXOFF wherever [`load`] did VMXON, the regions back, no [`Driver`] any more. Call
/// once no session exists (the device is gone).
pub fn unload(procs: &dyn Processors) {
    let _one = LIFECYCLE.lock();
    *LOADED.lock() = None;
    ROOT.vmxoff_all(procs);
}

/// The host is about to sleep (Windows's power-state callback, at PASSIVE_LEVEL): every
/// processor leaves VMX operation, so that the OS saves and restores a CR4 without VMXE, and
/// its VMXON region stays for [`resume`]. Each VMCLEARs the VMCSs active on it first (the
/// processor's copy would be lost with its power), so the vCPUs run on after the wake.
pub fn suspend(procs: &dyn Processors) {
    let _one = LIFECYCLE.lock();
    if loaded().is_some() {
        ROOT.vmxoff_each(procs);
    }
}

/// The host woke up: VMX operation on every processor again, with the loaded driver's
/// capabilities. On failure no processor is in VMX operation, so RUNs fail (`Fail::Io`) and
/// the driver can only be unloaded.
pub fn resume<P: Platform + ?Sized>(procs: &dyn Processors, p: &P) -> Result<u32, LoadFailure> {
    let _one = LIFECYCLE.lock();
    let Some(l) = loaded() else {
        return Ok(0);
    };
    ROOT.vmxon_all(procs, p, &l.driver.caps)
        .map_err(|(cpu, why)| LoadFailure::Vmxon { cpu, why })
}

/// CPU `cpu` comes online (Linux's CPU-hotplug callback, run on that CPU): it must pass the
/// admission check (`check_here`, run there) with the loaded driver's capabilities, as the others
/// did at load, and then enters VMX operation with its own region (kept from before it went
/// offline, or a new one). Nothing to do before [`load`] or after [`unload`]. True when it
/// entered VMX operation now (false: it was in it, or there is no driver).
pub fn cpu_online<P: Platform + ?Sized>(
    procs: &dyn Processors,
    p: &P,
    cpu: u32,
    check_here: &(dyn Fn() -> Result<Admission, Refusal> + Sync),
) -> Result<bool, LoadFailure> {
    let _one = LIFECYCLE.lock();
    let Some(l) = loaded() else {
        return Ok(false);
    };
    if cpu as usize >= MAX_CPUS {
        return Err(LoadFailure::TooManyProcessors);
    }
    let mut verdict = Err(None);
    if procs.on(cpu, &mut || verdict = check_here().map_err(Some)) {
        match verdict {
            Ok(a) if a.caps == l.driver.caps => {}
            Ok(_) => verdict = Err(Some(Refusal::AsymmetricProcessors)),
            Err(_) => {}
        }
    }
    if let Err(why) = verdict.map(|_| ()) {
        return Err(LoadFailure::Refused { cpu, why });
    }
    ROOT.vmxon_one(procs, p, &l.driver.caps, cpu)
        .map_err(|why| LoadFailure::Vmxon { cpu, why })
}

/// CPU `cpu` goes offline (run on it while it still is online): it leaves VMX operation, so that
/// the INIT that brings it back is not blocked (SDM 25.8), after VMCLEARs of the VMCSs active
/// there, whose vCPUs run on elsewhere (`vmx::active`). True if it was in VMX operation.
pub fn cpu_offline(procs: &dyn Processors, cpu: u32) -> bool {
    let _one = LIFECYCLE.lock();
    ROOT.vmxoff_one(procs, cpu)
}
