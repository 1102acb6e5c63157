//! May smudge use VT-x on this processor? The admission check both drivers run at load, on
//! every CPU.
//!
//! CR4.VMXE must be clear, then `VmxCaps::from_reader` + `VmxCaps::choose_mode(false)` (VMX
//! present, not disabled-and-locked, EPT with a 4-level walk, WB and INVEPT; SDM 24.6, 24.7,
//! Appendix A), IA32_FEATURE_CONTROL locked (Linux locks it at boot; a firmware may leave it
//! unlocked), and VMX not hidden by a running hypervisor (Hyper-V/VBS), told apart by
//! CPUID.1:ECX[31].
//!
//! A driver may read MSRs with a plain RDMSR (the Windows one has no #GP recovery without SEH).
//! That is sound because `from_reader`, given real CPUID values, reads an MSR only when the SDM
//! says it exists; the tests below hold it to that on every fixture dump.

use core::fmt::{self, Write};

use crate::dirty::Mode;
use crate::msg::MsgBuf;
use crate::regs::CR4_VMXE;
use crate::vmx::caps::{CpuidRegs, MsrValue, Reason, Unsupported, VmxCaps};

/// CPUID.1:ECX bit 31: a hypervisor is present (reserved for hypervisor use).
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;

/// What the check found on a usable processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The capabilities, as the core decodes them.
    pub caps: VmxCaps,
    /// The dirty-tracking mode the core picks (PML, else A/D scan, else write-protect).
    pub mode: Mode,
}

impl Admission {
    /// Feature bits for the version ioctl: bit 0 EPT A/D, 1 PML, 2 VPID, 3 unrestricted guest;
    /// bits 15:8 the chosen mode (1 A/D scan, 2 PML, 3 write-protect).
    pub const fn feature_bits(&self) -> u32 {
        (self.caps.ept_ad() as u32)
            | (self.caps.pml() as u32) << 1
            | (self.caps.vpid() as u32) << 2
            | (self.caps.unrestricted_guest() as u32) << 3
            | (self.mode as u32) << 8
    }
}

/// Why smudge refuses to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The core's verdict (VMX absent, disabled and locked, EPT missing or unusable...).
    Core(Unsupported),
    /// CPUID.1:ECX.VMX = 0 under a hypervisor (CPUID.1:ECX bit 31): it keeps VT-x for itself.
    VmxHiddenByHypervisor,
    /// IA32_FEATURE_CONTROL not locked: VMXON would raise #GP (SDM 24.7).
    FeatureControlUnlocked,
    /// CR4.VMXE already 1: another hypervisor is in VMX operation.
    VmxInUse,
    /// This processor's VMX capabilities differ from the first processor's.
    AsymmetricProcessors,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Core(u) => u.fmt(f),
            Refusal::VmxHiddenByHypervisor => f.write_str(
                "VT-x hidden: a hypervisor is running (CPUID.1:ECX bit 31) and keeps VMX for itself; \
                 turn off Hyper-V, VBS and HVCI (Memory integrity)",
            ),
            Refusal::FeatureControlUnlocked => f.write_str(
                "IA32_FEATURE_CONTROL (0x3A) is unlocked (bit 0 clear), so VMXON would fault: the firmware \
                 did not configure VT-x; enable it in the firmware setup",
            ),
            Refusal::VmxInUse => f.write_str(
                "CR4.VMXE is already set: another hypervisor is in VMX operation (Hyper-V, VBS/HVCI, \
                 VirtualBox, VMware...); turn it off",
            ),
            Refusal::AsymmetricProcessors => {
                f.write_str("this processor's VMX capability MSRs differ from processor 0's")
            }
        }
    }
}

impl Refusal {
    /// The message as a NUL-terminated string for DbgPrintEx (truncated to the buffer).
    pub fn message(&self) -> MsgBuf {
        let mut m = MsgBuf::new();
        // MsgBuf truncates instead of failing.
        let _ = write!(m, "{self}");
        m
    }
}

/// Decides whether this CPU can run smudge. `cpuid(leaf, subleaf)` and `cr4` are this CPU's;
/// `rdmsr` is called only for MSRs that exist (see the module comment).
pub fn check(
    cpuid: &dyn Fn(u32, u32) -> CpuidRegs,
    cr4: u64,
    rdmsr: &dyn Fn(u32) -> u64,
) -> Result<Admission, Refusal> {
    // SDM 24.7: CR4.VMXE = 1 means a VMM has enabled VMX here (checked first, as on Linux).
    if cr4 & CR4_VMXE != 0 {
        return Err(Refusal::VmxInUse);
    }
    let caps = VmxCaps::from_reader(
        |m| MsrValue::Value(rdmsr(m)),
        |leaf, sub| Some(cpuid(leaf, sub)),
    );
    let mode = caps.choose_mode(false).map_err(|u| {
        if u.reason == Reason::VmxAbsent && cpuid(1, 0).ecx & CPUID1_ECX_HYPERVISOR != 0 {
            Refusal::VmxHiddenByHypervisor
        } else {
            Refusal::Core(u)
        }
    })?;
    // SDM 24.7: VMXON #GPs while the lock bit is clear. The core leaves setting it to the driver
    // (`feature_control_needs_setup`); this driver does not write the lock-once MSR at load.
    if caps.feature_control_needs_setup() {
        return Err(Refusal::FeatureControlUnlocked);
    }
    Ok(Admission { caps, mode })
}

/// [`check`] on the processor that calls it: its own CPUID, `cr`'s CR4, and `rdmsr` (called
/// only for MSRs that exist).
pub fn check_here(
    cr: &dyn crate::vmx::root::ControlRegs,
    rdmsr: &dyn Fn(u32) -> u64,
) -> Result<Admission, Refusal> {
    check(&CpuidRegs::of_this_cpu, cr.cr4(), rdmsr)
}

/// `check_here` (this module's [`check`] with the processor's own CPUID, CR4 and MSRs) on
/// every present processor, run there: all must pass, with the capabilities of the first. Returns
/// the first one's verdict, or the processor that failed and why (None: it could not be reached,
/// or there is none).
pub fn check_every(
    procs: &dyn crate::vmx::root::Processors,
    check_here: &(dyn Fn() -> Result<Admission, Refusal> + Sync),
) -> Result<Admission, (u32, Option<Refusal>)> {
    let mut first: Option<Admission> = None;
    for i in (0..procs.bound()).filter(|&i| procs.present(i)) {
        let mut r = Err(None);
        if !procs.on(i, &mut || r = check_here().map_err(Some)) {
            return Err((i, None));
        }
        let a = r.map_err(|why| (i, why))?;
        match first {
            None => first = Some(a),
            Some(f) if f.caps != a.caps => return Err((i, Some(Refusal::AsymmetricProcessors))),
            Some(_) => {}
        }
    }
    first.ok_or((0, None))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]
mod tests {
    extern crate std;
    use super::*;
    use crate::vmx::msr_dump::MsrDump;
    use std::cell::RefCell;
    use std::panic;
    use std::path::PathBuf;
    use std::string::String;
    use std::vec::Vec;

    fn fixtures() -> Vec<(String, MsrDump)> {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared-tests/fixtures/vmx-msrs");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "msr") {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                let dump = MsrDump::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
                out.push((name, dump));
            }
        }
        assert!(
            out.len() >= 13,
            "fixture dumps missing from {}",
            dir.display()
        );
        out
    }

    /// Runs `check` on a dump like the driver does on hardware. Panics (fails the test) if the
    /// check reads an MSR the dump marks `absent` (a #GP, i.e. a bug check, on real hardware).
    /// `real-*` dumps do not list 0x3A or CPUID: those stand in as 0x5 (locked, VMX on) and
    /// CPUID.1:ECX with only VMX set; any other unknown MSR fails the test.
    fn run(
        name: &str,
        d: &MsrDump,
        cr4: u64,
        ecx_override: Option<u32>,
        fc: Option<u64>,
    ) -> Result<Admission, Refusal> {
        let reads = RefCell::new(Vec::new());
        let cpuid = |leaf: u32, sub: u32| match (leaf, ecx_override) {
            (1, Some(ecx)) => CpuidRegs {
                ecx,
                ..CpuidRegs::default()
            },
            _ => d.cpuid(leaf, sub).unwrap_or(if leaf == 1 {
                CpuidRegs {
                    ecx: 1 << 5,
                    ..CpuidRegs::default()
                }
            } else {
                CpuidRegs::default()
            }),
        };
        let rdmsr = |m: u32| {
            reads.borrow_mut().push(m);
            match (m, fc, d.msr(m)) {
                (0x3a, Some(v), _) => v,
                (_, _, MsrValue::Value(v)) => v,
                (0x3a, None, MsrValue::Unknown) => 0x5,
                (_, _, state) => panic!("{name}: read MSR {m:#x}, which is {state:?}"),
            }
        };
        check(&cpuid, cr4, &rdmsr)
    }

    const CR4: u64 = 0x3706f0; // a typical CR4 with VMXE (bit 13) clear

    #[test]
    fn fixtures_get_the_mode_their_readme_names_and_no_absent_msr_is_read() {
        // shared-tests/fixtures/vmx-msrs/README.md, "What the set covers".
        for (name, d) in fixtures() {
            let got = run(&name, &d, CR4, None, None).map(|a| a.mode);
            let want = match name.as_str() {
                "bochs-corei7_skylake_x"
                | "bochs-corei7_icelake_u"
                | "bochs-tigerlake"
                | "real-intel-core-i7-6700k" => Ok(Mode::Pml),
                "bochs-corei7_haswell_4770" | "bochs-broadwell_ult" => Ok(Mode::AdScan),
                "bochs-corei7_sandy_bridge_2600k"
                | "bochs-corei7_ivy_bridge_3770k"
                | "bochs-corei5_arrandale_m520"
                | "bochs-corei5_lynnfield_750"
                | "real-intel-core-i7-3960x" => Ok(Mode::WriteProtect),
                "bochs-core2_penryn_t9600" | "real-intel-core2-x6800" => {
                    assert!(
                        matches!(
                            got,
                            Err(Refusal::Core(u)) if !matches!(
                                u.reason,
                                Reason::VmxAbsent | Reason::VmxDisabledLocked { .. }
                            )
                        ),
                        "{name}: {got:?}"
                    );
                    continue;
                }
                other => panic!("new fixture {other}: classify it here"),
            };
            assert_eq!(got, want, "{name}");
        }
    }

    fn skylake() -> MsrDump {
        fixtures()
            .into_iter()
            .find(|(n, _)| n == "bochs-corei7_skylake_x")
            .unwrap()
            .1
    }

    #[test]
    fn no_vmx_reads_no_msr_at_all() {
        // AMD CPUs have no MSR 0x3A: the check must stop at CPUID. An empty dump panics on any read.
        let empty = MsrDump::new();
        let ecx = 0x77faf3bf & !(1 << 5);
        let r = run("amd", &empty, CR4, Some(ecx), None).unwrap_err();
        assert_eq!(
            r,
            Refusal::Core(Unsupported {
                reason: Reason::VmxAbsent
            })
        );
        let r = run("hyper-v", &empty, CR4, Some(ecx | 1 << 31), None).unwrap_err();
        assert_eq!(r, Refusal::VmxHiddenByHypervisor);
    }

    #[test]
    fn feature_control_rules_of_sdm_24_7() {
        let d = skylake();
        let locked_off = run("fc", &d, CR4, None, Some(0x1)).unwrap_err();
        let disabled_locked = |r: Refusal| {
            matches!(
                r,
                Refusal::Core(Unsupported {
                    reason: Reason::VmxDisabledLocked { .. }
                })
            )
        };
        assert!(disabled_locked(locked_off));
        // Locked with only VMX-inside-SMX: still unusable outside SMX.
        assert!(disabled_locked(
            run("fc", &d, CR4, None, Some(0x3)).unwrap_err()
        ));
        assert_eq!(
            run("fc", &d, CR4, None, Some(0x4)),
            Err(Refusal::FeatureControlUnlocked)
        );
        assert_eq!(
            run("fc", &d, CR4, None, Some(0x0)),
            Err(Refusal::FeatureControlUnlocked)
        );
        assert!(run("fc", &d, CR4, None, Some(0x5)).is_ok());
        assert!(run("fc", &d, CR4, None, Some(0x7)).is_ok());
    }

    #[test]
    fn vmxe_already_set_means_another_hypervisor() {
        let r = run("vmxe", &skylake(), CR4 | 1 << 13, None, None).unwrap_err();
        assert_eq!(r, Refusal::VmxInUse);
    }

    #[test]
    fn feature_bits_follow_the_capability_msrs() {
        // skylake_x: EPT_VPID_CAP 0xf0106334141 has bit 21 (A/D); CTLS2 0x02177fff00000000 allows
        // bits 1 (EPT), 5 (VPID), 7 (unrestricted guest) and 17 (PML) -> 0b1111, mode PML (2).
        assert_eq!(
            run("sky", &skylake(), CR4, None, None)
                .unwrap()
                .feature_bits(),
            0x20f
        );
    }

    #[test]
    fn messages_are_distinct_and_nul_terminated() {
        let all = [
            Refusal::VmxHiddenByHypervisor,
            Refusal::FeatureControlUnlocked,
            Refusal::VmxInUse,
            Refusal::AsymmetricProcessors,
            Refusal::Core(Unsupported {
                reason: Reason::VmxAbsent,
            }),
        ];
        for (i, a) in all.iter().enumerate() {
            let m = a.message();
            assert!(m.as_cstr().to_bytes().len() > 20);
            for b in &all[i + 1..] {
                assert_ne!(m.as_cstr(), b.message().as_cstr());
            }
        }
    }
}
