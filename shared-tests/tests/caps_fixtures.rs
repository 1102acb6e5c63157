//! VMX capabilities decoded from real MSR dumps (`fixtures/vmx-msrs`, 10 Bochs 2.7 CPU models
//! and 3 real CPUs). The expectations come from `fixtures/vmx-msrs/README.md`, which was written
//! from the sources of the dumps, independently of this code, and from SDM facts named below.
//! Every file of the directory is parsed, so a new dump gets the generic checks automatically;
//! the per-CPU expectations apply to the files the README describes.

use std::path::{Path, PathBuf};

use smudge_core::dirty::Mode;
use smudge_core::vmx::caps::{
    entry, exit, pin, primary, secondary, ControlField, ControlRequest, MsrValue, Reason, VmxCaps,
};
use smudge_core::vmx::msr_dump::MsrDump;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vmx-msrs")
}

/// Every `*.msr` file: (file stem, parsed dump).
fn dumps() -> Vec<(String, MsrDump)> {
    let mut v: Vec<_> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures/vmx-msrs exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "msr"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable fixture");
            let dump = MsrDump::parse(&text).unwrap_or_else(|e| panic!("{}: {}", p.display(), e));
            (p.file_stem().unwrap().to_string_lossy().into_owned(), dump)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// What README.md says a CPU covers ("What the set covers").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// EPT + A/D + PML.
    Pml,
    /// EPT + A/D without PML.
    AdNoPml,
    /// EPT without A/D.
    EptNoAd,
    /// No EPT.
    NoEpt,
}

const README_CLASSES: &[(&str, Class)] = &[
    ("bochs-corei7_skylake_x", Class::Pml),
    ("bochs-corei7_icelake_u", Class::Pml),
    ("bochs-tigerlake", Class::Pml),
    ("real-intel-core-i7-6700k", Class::Pml),
    ("bochs-corei7_haswell_4770", Class::AdNoPml),
    ("bochs-broadwell_ult", Class::AdNoPml),
    ("bochs-corei7_sandy_bridge_2600k", Class::EptNoAd),
    ("bochs-corei7_ivy_bridge_3770k", Class::EptNoAd),
    ("bochs-corei5_arrandale_m520", Class::EptNoAd),
    ("bochs-corei5_lynnfield_750", Class::EptNoAd),
    ("real-intel-core-i7-3960x", Class::EptNoAd),
    ("bochs-core2_penryn_t9600", Class::NoEpt),
    ("real-intel-core2-x6800", Class::NoEpt),
];

fn class_of(name: &str) -> Option<Class> {
    README_CLASSES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, c)| c)
}

#[test]
fn every_cpu_the_readme_names_is_a_fixture() {
    let names: Vec<String> = dumps().into_iter().map(|(n, _)| n).collect();
    for (n, _) in README_CLASSES {
        assert!(names.iter().any(|x| x == n), "fixture {n}.msr missing");
    }
}

#[test]
fn features_and_mode_match_the_readme() {
    for (name, dump) in dumps() {
        let caps = dump.caps();
        let Some(class) = class_of(&name) else {
            continue;
        };
        let (ept, ad, pml, mode) = match class {
            Class::Pml => (true, true, true, Some(Mode::Pml)),
            Class::AdNoPml => (true, true, false, Some(Mode::AdScan)),
            Class::EptNoAd => (true, false, false, Some(Mode::WriteProtect)),
            Class::NoEpt => (false, false, false, None),
        };
        assert_eq!(caps.ept(), ept, "{name}: EPT");
        assert_eq!(caps.ept_ad(), ad, "{name}: EPT A/D");
        assert_eq!(caps.ept_features().ad, ad, "{name}: EptFeatures.ad");
        assert_eq!(caps.pml(), pml, "{name}: PML");
        match mode {
            Some(m) => assert_eq!(caps.choose_mode(false), Ok(m), "{name}"),
            None => {
                let e = caps.choose_mode(false).unwrap_err();
                let Reason::MissingControl(c) = e.reason else {
                    panic!("{name}: {e}")
                };
                assert!(
                    c.is_missing(ControlField::SecondaryProcBased, 1),
                    "{name}: {e}"
                );
                let msg = e.to_string();
                assert!(
                    msg.contains("secondary control 'enable EPT' (bit 1) not allowed by IA32_VMX_PROCBASED_CTLS2"),
                    "{name}: {msg}"
                );
            }
        }
        // Every mode the class offers is available, the others are refused with a reason.
        for m in [Mode::Pml, Mode::AdScan, Mode::WriteProtect] {
            let expected = match m {
                Mode::Pml => pml && ad,
                Mode::AdScan => ad,
                Mode::WriteProtect => ept,
            };
            let got = caps.mode_available(m);
            assert_eq!(
                got.is_ok(),
                expected,
                "{name}: mode {} -> {:?}",
                m.name(),
                got
            );
            if let Err(e) = got {
                assert!(!e.to_string().is_empty());
            }
        }
    }
}

#[test]
fn no_ept_cpus_as_the_readme_describes_them() {
    let all = dumps();
    let get = |n: &str| all.iter().find(|(x, _)| x == n).map(|(_, d)| d).unwrap();
    // Penryn: secondary controls exist but allow no EPT, and 0x48C is absent.
    let penryn = get("bochs-core2_penryn_t9600");
    let c = penryn.caps();
    assert!(c.secondary_controls() && !c.ept());
    assert_eq!(penryn.msr(0x48c), MsrValue::Absent);
    assert_eq!(
        c.unreadable, None,
        "0x48C must not be read when EPT/VPID are not allowed"
    );
    // Core2 X6800: no TRUE MSRs (VMX_BASIC bit 55 = 0) and no secondary controls.
    let x6800 = get("real-intel-core2-x6800");
    let c = x6800.caps();
    assert!(!c.true_ctls());
    assert!(!c.secondary_controls());
    assert_eq!(c.procbased2, Default::default());
    assert_eq!(
        c.unreadable, None,
        "0x48B-0x490 must not be read on this CPU"
    );
    let e = c.choose_mode(false).unwrap_err().to_string();
    assert!(e.contains("no secondary controls"), "{e}");
}

#[test]
fn unrestricted_guest_only_from_westmere_on() {
    // Unrestricted guest arrived with Westmere (Arrandale); Nehalem (Lynnfield) lacks it.
    for (name, dump) in dumps() {
        let caps = dump.caps();
        let Some(class) = class_of(&name) else {
            continue;
        };
        if class == Class::NoEpt {
            assert!(!caps.unrestricted_guest(), "{name}");
            continue;
        }
        let expected = name != "bochs-corei5_lynnfield_750";
        assert_eq!(caps.unrestricted_guest(), expected, "{name}");
        if expected {
            assert_eq!(caps.choose_mode(true), caps.choose_mode(false), "{name}");
        } else {
            let e = caps.choose_mode(true).unwrap_err();
            let Reason::MissingControl(c) = e.reason else {
                panic!("{name}: {e}")
            };
            assert!(
                c.is_missing(ControlField::SecondaryProcBased, 7),
                "{name}: {e}"
            );
            assert!(
                e.to_string().contains("'unrestricted guest' (bit 7)"),
                "{e}"
            );
        }
    }
}

#[test]
fn no_1g_pages_on_sandy_and_ivy_bridge() {
    for (name, dump) in dumps() {
        if name.contains("sandy_bridge") || name.contains("ivy_bridge") {
            let caps = dump.caps();
            assert!(caps.ept() && caps.large_2m(), "{name}");
            assert!(!caps.large_1g(), "{name}");
            assert!(!caps.ept_features().large_1g, "{name}");
        }
    }
}

#[test]
fn true_ctls_differ_from_plain_ones_where_the_readme_says() {
    // README: 0x481 = 0x48D everywhere; 0x482/0x48E differ in bits 15-16 (CR3-load/store
    // exiting), 0x483/0x48F and 0x484/0x490 in bit 2: the default1 bits (SDM A.2).
    let mut compared = 0;
    for (name, dump) in dumps() {
        let (Some(basic), Some(p0)) = (dump.msr(0x480).value(), dump.msr(0x481).value()) else {
            continue;
        };
        if basic & (1 << 55) == 0 {
            assert_eq!(
                dump.msr(0x48d),
                MsrValue::Unknown,
                "{name}: a CPU without bit 55 lists TRUE MSRs"
            );
            continue;
        }
        let v = |m: u32| {
            dump.msr(m)
                .value()
                .unwrap_or_else(|| panic!("{name}: {m:#x}"))
        };
        assert_eq!(p0, v(0x48d), "{name}: pin");
        assert_eq!(
            v(0x482) ^ v(0x48e),
            (1 << 15) | (1 << 16),
            "{name}: primary"
        );
        assert_eq!(v(0x483) ^ v(0x48f), 1 << 2, "{name}: exit");
        assert_eq!(v(0x484) ^ v(0x490), 1 << 2, "{name}: entry");
        // The TRUE MSR is the one decoded, so the default1 bits can be cleared.
        let caps = dump.caps();
        assert!(caps.true_ctls());
        assert_eq!(
            caps.procbased.must_be_1 & (primary::CR3_LOAD_EXITING | primary::CR3_STORE_EXITING),
            0,
            "{name}"
        );
        assert_eq!(caps.exit.must_be_1 & exit::SAVE_DEBUG_CONTROLS, 0, "{name}");
        assert_eq!(
            caps.entry.must_be_1 & entry::LOAD_DEBUG_CONTROLS,
            0,
            "{name}"
        );
        compared += 1;
    }
    assert!(compared >= 12, "only {compared} dumps had TRUE MSRs");
}

#[test]
fn plain_ctls_force_the_default1_bits() {
    // X6800 has no TRUE MSRs: CR3 exiting (default1, SDM A.3.2) stays forced on.
    let all = dumps();
    let (_, d) = all
        .iter()
        .find(|(n, _)| n == "real-intel-core2-x6800")
        .unwrap();
    let c = d.caps();
    let primary = c
        .adjust(ControlField::PrimaryProcBased, primary::HLT_EXITING, 0)
        .unwrap();
    assert_ne!(primary & primary::CR3_LOAD_EXITING, 0);
    assert_ne!(primary & primary::CR3_STORE_EXITING, 0);
}

#[test]
fn adjusted_controls_are_valid_on_every_cpu() {
    for (name, dump) in dumps() {
        let caps = dump.caps();
        // Only wanted bits: always possible, and always valid.
        let everything = ControlRequest {
            pin: want(u32::MAX),
            primary: want(u32::MAX),
            secondary: want(u32::MAX),
            exit: want(u32::MAX),
            entry: want(u32::MAX),
        };
        for req in [ControlRequest::default(), everything] {
            let c = caps
                .adjust_controls(&req)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            check_valid(&name, &caps, c);
        }
        // smudge's own request for the chosen mode.
        match caps.choose_mode(false) {
            Ok(mode) => {
                let ug = caps.unrestricted_guest();
                let req = ControlRequest::smudge(mode, ug);
                let c = caps
                    .adjust_controls(&req)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                check_valid(&name, &caps, c);
                for (field, got, w) in [
                    ("pin", c.pin, req.pin),
                    ("primary", c.primary, req.primary),
                    ("secondary", c.secondary, req.secondary),
                    ("exit", c.exit, req.exit),
                    ("entry", c.entry, req.entry),
                ] {
                    assert_eq!(
                        got & w.required,
                        w.required,
                        "{name}: {field} required bits"
                    );
                }
                assert_ne!(
                    c.primary & primary::ACTIVATE_SECONDARY_CONTROLS,
                    0,
                    "{name}"
                );
                assert_eq!(
                    c.secondary & secondary::ENABLE_PML != 0,
                    mode == Mode::Pml,
                    "{name}"
                );
                // SDM 27.2.1.2: saving the timer needs the timer.
                if c.exit & exit::SAVE_PREEMPTION_TIMER != 0 {
                    assert_ne!(c.pin & pin::ACTIVATE_PREEMPTION_TIMER, 0, "{name}");
                }
                // With the TRUE MSRs and EPT, CR3 accesses need not exit.
                if caps.true_ctls() {
                    assert_eq!(
                        c.primary & (primary::CR3_LOAD_EXITING | primary::CR3_STORE_EXITING),
                        0,
                        "{name}"
                    );
                }
            }
            Err(_) => {
                let req = ControlRequest::smudge(Mode::WriteProtect, false);
                let e = caps.adjust_controls(&req).unwrap_err();
                assert!(
                    e.is_missing(ControlField::SecondaryProcBased, 1),
                    "{name}: {e}"
                );
            }
        }
    }
}

fn want(bits: u32) -> smudge_core::vmx::caps::Want {
    smudge_core::vmx::caps::Want {
        required: 0,
        wanted: bits,
    }
}

fn check_valid(name: &str, caps: &VmxCaps, c: smudge_core::vmx::caps::Controls) {
    assert!(caps.pinbased.valid(c.pin), "{name}: pin {:#x}", c.pin);
    assert!(
        caps.procbased.valid(c.primary),
        "{name}: primary {:#x}",
        c.primary
    );
    assert!(caps.exit.valid(c.exit), "{name}: exit {:#x}", c.exit);
    assert!(caps.entry.valid(c.entry), "{name}: entry {:#x}", c.entry);
    if c.primary & primary::ACTIVATE_SECONDARY_CONTROLS != 0 {
        assert!(
            caps.procbased2.valid(c.secondary),
            "{name}: secondary {:#x}",
            c.secondary
        );
    } else {
        assert_eq!(c.secondary, 0, "{name}");
    }
    // SDM 27.2.1.1: unrestricted guest and PML need EPT.
    if c.secondary & (secondary::UNRESTRICTED_GUEST | secondary::ENABLE_PML) != 0 {
        assert_ne!(c.secondary & secondary::ENABLE_EPT, 0, "{name}");
    }
}

#[test]
fn basic_decodes_as_the_readme_says() {
    for (name, dump) in dumps() {
        let caps = dump.caps();
        if name.starts_with("bochs-") {
            let rev = if name.contains("icelake_u") || name.contains("tigerlake") {
                0x4
            } else {
                0x2b
            };
            assert_eq!(caps.revision_id(), rev, "{name}");
            // README: only tigerlake sets VMX_BASIC bit 56 and EPT_VPID_CAP bit 23.
            let tiger = name.contains("tigerlake");
            assert_eq!(caps.entry_exception_any_error_code(), tiger, "{name}");
            assert_eq!(caps.ept_vpid_cap & (1 << 23) != 0, tiger, "{name}");
            // README: no Bochs model has 0x492/0x493; FEATURE_CONTROL is 0x5.
            assert_eq!(dump.msr(0x492), MsrValue::Absent, "{name}");
            assert_eq!(dump.msr(0x493), MsrValue::Absent, "{name}");
            assert_eq!(caps.feature_control_locked(), Some(true), "{name}");
            assert_eq!(caps.vmx_outside_smx_enabled(), Some(true), "{name}");
            assert_eq!(caps.vmx_supported(), Some(true), "{name}");
            // TOOLCHAIN.md: VMXON works on the Bochs models; a region of 4 KiB, WB.
            assert_eq!(caps.vmcs_region_size(), 4096, "{name}");
        }
        if caps.vmcs_region_size() != 0 {
            // SDM A.1: the region size is at most 4096 and bit 31 of BASIC is 0.
            assert!(caps.vmcs_region_size() <= 4096, "{name}");
            assert_eq!(caps.basic & (1 << 31), 0, "{name}");
            // SDM A.1: every processor so far reports WB (6) for the VMCS.
            assert_eq!(caps.vmcs_memory_type(), 6, "{name}");
        }
    }
}

#[test]
fn unknown_cpuid_and_feature_control_do_not_block() {
    // The real 3960X dump has neither CPUID nor 0x3A; README: EPT without A/D.
    let all = dumps();
    let (_, d) = all
        .iter()
        .find(|(n, _)| n == "real-intel-core-i7-3960x")
        .unwrap();
    assert_eq!(d.msr(0x3a), MsrValue::Unknown);
    assert!(d.cpuid(1, 0).is_none());
    let caps = d.caps();
    assert_eq!(caps.vmx_supported(), None);
    assert_eq!(caps.feature_control, MsrValue::Unknown);
    assert_eq!(
        caps.max_phys_bits, 36,
        "SDM 4.1.4: MAXPHYADDR is 36 without CPUID.80000008H"
    );
    assert_eq!(caps.choose_mode(false), Ok(Mode::WriteProtect));
}

#[test]
fn max_phys_bits_of_the_real_6700k() {
    // The i7-6700K has 39 physical address bits (Intel ARK; CPUID.80000008H:EAX = 0x3027).
    let all = dumps();
    let (_, d) = all
        .iter()
        .find(|(n, _)| n == "real-intel-core-i7-6700k")
        .unwrap();
    assert_eq!(d.caps().ept_features().max_phys_bits, 39);
}

/// The skylake_x dump with one line replaced.
fn skylake_with(prefix: &str, line: &str) -> VmxCaps {
    let text = std::fs::read_to_string(fixtures_dir().join("bochs-corei7_skylake_x.msr")).unwrap();
    let mut replaced = 0;
    let edited: Vec<&str> = text
        .lines()
        .map(|l| {
            if l.starts_with(prefix) {
                replaced += 1;
                line
            } else {
                l
            }
        })
        .collect();
    assert_eq!(replaced, 1, "{prefix}");
    MsrDump::parse(&edited.join("\n")).unwrap().caps()
}

#[test]
fn refusals_name_their_reason() {
    // VMX disabled and locked: lock bit 0 set, bit 2 clear.
    let c = skylake_with("0x3a ", "0x3a 0x0000000000000001");
    let e = c.choose_mode(false).unwrap_err();
    assert_eq!(e.reason, Reason::VmxDisabledLocked { feature_control: 1 });
    assert!(e.to_string().contains("IA32_FEATURE_CONTROL"), "{e}");
    // Unlocked: VMX MSRs decide (the driver locks it itself).
    let c = skylake_with("0x3a ", "0x3a 0x0000000000000000");
    assert_eq!(c.choose_mode(false), Ok(Mode::Pml));
    assert!(c.feature_control_needs_setup());
    // Unknown FEATURE_CONTROL: VMX MSRs decide.
    let c = skylake_with("0x3a ", "# 0x3a removed");
    assert_eq!(c.choose_mode(false), Ok(Mode::Pml));
    // CPUID.1:ECX bit 5 clear: VMX absent (ecx was 0x77faf3bf).
    let c = skylake_with(
        "cpuid 0x1 ",
        "cpuid 0x1 0x0 eax=0x00050654 ebx=0x00010800 ecx=0x77faf39f edx=0xbfebfbff",
    );
    let e = c.choose_mode(false).unwrap_err();
    assert_eq!(e.reason, Reason::VmxAbsent);
    assert!(e.to_string().contains("CPUID.1:ECX.VMX[bit 5]"), "{e}");
    // A needed MSR missing from the dump is reported, by name.
    let c = skylake_with("0x48c ", "# 0x48c removed");
    let e = c.choose_mode(false).unwrap_err().to_string();
    assert!(
        e.contains("IA32_VMX_EPT_VPID_CAP (0x48c)") && e.contains("unknown"),
        "{e}"
    );
    // EPT without WB paging structures (bit 14 cleared from 0x00000f0106334141).
    let c = skylake_with("0x48c ", "0x48c 0x00000f0106330141");
    let e = c.choose_mode(false).unwrap_err().to_string();
    assert!(e.contains("write-back") && e.contains("bit 14"), "{e}");
    // EPT without a 4-level walk (bit 6 cleared).
    let c = skylake_with("0x48c ", "0x48c 0x00000f0106334101");
    let e = c.choose_mode(false).unwrap_err().to_string();
    assert!(e.contains("4-level") && e.contains("bit 6"), "{e}");
    // PML allowed but A/D cleared (bit 21): PML needs A/D, so write-protect it is.
    let c = skylake_with("0x48c ", "0x48c 0x00000f0106134141");
    assert!(c.pml() && !c.ept_ad());
    assert_eq!(c.choose_mode(false), Ok(Mode::WriteProtect));
    assert!(c
        .mode_available(Mode::Pml)
        .unwrap_err()
        .to_string()
        .contains("accessed and dirty"));
}

#[test]
fn required_control_errors_name_every_missing_control() {
    // Haswell: no PML (secondary bit 17) and no mode-based execute (bit 22).
    let all = dumps();
    let (_, d) = all
        .iter()
        .find(|(n, _)| n == "bochs-corei7_haswell_4770")
        .unwrap();
    let caps = d.caps();
    let e = caps
        .adjust(
            ControlField::SecondaryProcBased,
            secondary::ENABLE_EPT | secondary::ENABLE_PML | (1 << 22),
            0,
        )
        .unwrap_err();
    assert_eq!(e.missing, secondary::ENABLE_PML | (1 << 22));
    let msg = e.to_string();
    assert!(
        msg.contains(
            "secondary control 'enable PML' (bit 17) not allowed by IA32_VMX_PROCBASED_CTLS2"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("'mode-based execute control for EPT' (bit 22)"),
        "{msg}"
    );
    assert!(!msg.contains("enable EPT"), "{msg}");
    // A TRUE MSR is named as such.
    let (_, p) = all
        .iter()
        .find(|(n, _)| n == "bochs-core2_penryn_t9600")
        .unwrap();
    let e = p
        .caps()
        .adjust(ControlField::PinBased, pin::ACTIVATE_PREEMPTION_TIMER, 0)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "pin-based control 'activate VMX-preemption timer' (bit 6) not allowed by IA32_VMX_TRUE_PINBASED_CTLS"
    );
}
