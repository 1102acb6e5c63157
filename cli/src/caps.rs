//! `smudge caps`: the VMX capabilities decoded, from the driver or from an MSR dump.

use smudge_core::abi::CapsResp;
use smudge_core::dirty::Mode;
use smudge_core::vmx::caps::{msr, CpuidRegs, MsrValue, VmxCaps};
use smudge_core::vmx::msr_dump::MsrDump;

use crate::json::Json;

/// Which decoded facts rest on values that were actually read. A dump may not list an MSR
/// ("unknown", not "absent"); then what depends on it is reported as unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Known {
    /// IA32_VMX_BASIC and the primary controls were read.
    pub basic: bool,
    /// The secondary controls are known (read, or known not to exist).
    pub secondary: bool,
    /// IA32_VMX_EPT_VPID_CAP is known (read, or known not to exist).
    pub ept_cap: bool,
    /// CPUID leaf 0x80000008 was available (MAXPHYADDR).
    pub maxphyaddr: bool,
}

/// The decoded capabilities and where they came from.
#[derive(Clone, Debug)]
pub struct Report {
    /// The capabilities.
    pub caps: VmxCaps,
    /// What is known.
    pub known: Known,
    /// "driver" or the dump's path.
    pub source: String,
    /// The driver's own mode choice (live only).
    pub driver_mode: Option<u32>,
}

impl Report {
    /// Decodes through a reader (live values or a dump).
    pub fn new(
        rdmsr: &dyn Fn(u32) -> MsrValue,
        cpuid: &dyn Fn(u32, u32) -> Option<CpuidRegs>,
        source: &str,
        driver_mode: Option<u32>,
    ) -> Report {
        let caps = VmxCaps::from_reader(rdmsr, cpuid);
        let known = if caps.cpuid_vmx == Some(false) {
            // No VMX: nothing to read, and everything is known to be missing.
            Known {
                basic: true,
                secondary: true,
                ept_cap: true,
                maxphyaddr: cpuid(0x8000_0008, 0).is_some(),
            }
        } else {
            let is_known = |m: u32| rdmsr(m) != MsrValue::Unknown;
            let primary = if caps.true_ctls() {
                msr::IA32_VMX_TRUE_PROCBASED_CTLS
            } else {
                msr::IA32_VMX_PROCBASED_CTLS
            };
            let basic = is_known(msr::IA32_VMX_BASIC) && is_known(primary);
            // SDM A.3.3 / A.10: 0x48B exists only with primary bit 31, 0x48C only with EPT or VPID.
            let secondary =
                basic && (!caps.secondary_controls() || is_known(msr::IA32_VMX_PROCBASED_CTLS2));
            let ept_cap =
                secondary && (!(caps.ept() || caps.vpid()) || is_known(msr::IA32_VMX_EPT_VPID_CAP));
            Known {
                basic,
                secondary,
                ept_cap,
                maxphyaddr: cpuid(0x8000_0008, 0).is_some(),
            }
        };
        Report {
            caps,
            known,
            source: source.to_string(),
            driver_mode,
        }
    }

    /// From the text of an MSR dump.
    pub fn from_dump(text: &str, source: &str) -> anyhow::Result<Report> {
        let dump = MsrDump::parse(text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        // MsrDump::caps() is this same reader; the reader is also needed for `Known`.
        let r = Report::new(&|m| dump.msr(m), &|l, s| dump.cpuid(l, s), source, None);
        debug_assert_eq!(r.caps, dump.caps());
        Ok(r)
    }

    /// From the driver's CAPS answer; CPUID is executed here (the same CPU model).
    pub fn from_driver(resp: &CapsResp, cpuid: &dyn Fn(u32, u32) -> Option<CpuidRegs>) -> Report {
        let rdmsr = |m: u32| msr_from_resp(resp, m);
        Report::new(&rdmsr, cpuid, "driver", Some(resp.mode))
    }

    fn tri(&self, known: bool, v: bool) -> Json {
        if known {
            Json::Bool(v)
        } else {
            Json::Null
        }
    }

    /// The chosen mode: PML, else A/D, else write-protect; or why smudge cannot run.
    pub fn mode(&self) -> Result<Mode, String> {
        self.caps.choose_mode(false).map_err(|u| u.to_string())
    }

    /// The JSON object.
    pub fn json(&self) -> Json {
        let c = &self.caps;
        let k = self.known;
        let mut j = Json::object()
            .with("source", self.source.as_str())
            .with("vmx", c.cpuid_vmx)
            .with("feature_control", msr_json(c.feature_control))
            .with(
                "revision",
                if k.basic {
                    Json::U(c.revision_id().into())
                } else {
                    Json::Null
                },
            )
            .with("true_ctls", self.tri(k.basic, c.true_ctls()))
            .with("ept", self.tri(k.secondary, c.ept()))
            .with("ept_ad", self.tri(k.ept_cap, c.ept_ad()))
            .with("pml", self.tri(k.secondary, c.pml()))
            .with("vpid", self.tri(k.secondary, c.vpid()))
            .with(
                "unrestricted_guest",
                self.tri(k.secondary, c.unrestricted_guest()),
            )
            .with("large_2m", self.tri(k.ept_cap, c.large_2m()))
            .with("large_1g", self.tri(k.ept_cap, c.large_1g()))
            .with("invept_single", self.tri(k.ept_cap, c.invept_single()))
            .with("invept_all", self.tri(k.ept_cap, c.invept_all()))
            .with("preemption_timer", self.tri(k.basic, c.preemption_timer()))
            .with(
                "maxphyaddr",
                if k.maxphyaddr {
                    Json::U(c.max_phys_bits.into())
                } else {
                    Json::Null
                },
            );
        let mut modes = Json::object();
        for m in [Mode::Pml, Mode::AdScan, Mode::WriteProtect] {
            modes = modes.with(m.name(), c.mode_available(m).is_ok());
        }
        j = j.with("modes", modes);
        j = match self.mode() {
            Ok(m) => j.with("mode", m.name()),
            Err(reason) => j.with("mode", "unsupported").with("reason", reason),
        };
        if let Some(d) = self.driver_mode {
            j = j.with("driver_mode", crate::run::mode_name(d));
        }
        j
    }

    /// The human report.
    pub fn human(&self) -> String {
        let c = &self.caps;
        let k = self.known;
        let yn = |known: bool, v: bool| -> &'static str {
            match (known, v) {
                (false, _) => "unknown",
                (true, true) => "yes",
                (true, false) => "no",
            }
        };
        let mut s = String::new();
        let mut line = |name: &str, value: String| s.push_str(&format!("  {name:<22}{value}\n"));
        line("source", self.source.clone());
        line(
            "CPUID.1:ECX.VMX",
            match c.cpuid_vmx {
                Some(v) => yn(true, v).to_string(),
                None => "unknown".into(),
            },
        );
        line(
            "IA32_FEATURE_CONTROL",
            feature_control_text(c.feature_control),
        );
        if k.basic {
            line(
                "VMCS",
                format!(
                    "revision {:#x}, {} bytes, memory type {}{}",
                    c.revision_id(),
                    c.vmcs_region_size(),
                    c.vmcs_memory_type(),
                    if c.vmcs_memory_type() == 6 {
                        " (WB)"
                    } else {
                        ""
                    }
                ),
            );
        } else {
            line("VMCS", "unknown (IA32_VMX_BASIC not read)".into());
        }
        line("TRUE controls", yn(k.basic, c.true_ctls()).into());
        line(
            "secondary controls",
            yn(k.basic, c.secondary_controls()).into(),
        );
        let mut ept = yn(k.secondary, c.ept()).to_string();
        if k.ept_cap && c.ept() {
            let mut f = Vec::new();
            if c.ept_walk_4() {
                f.push("4-level walk");
            }
            if c.ept_wb() {
                f.push("WB tables");
            }
            if c.ept_execute_only() {
                f.push("execute-only");
            }
            if !f.is_empty() {
                ept.push_str(&format!(" ({})", f.join(", ")));
            }
        }
        line("EPT", ept);
        line("EPT A/D", yn(k.ept_cap, c.ept_ad()).into());
        line("PML", yn(k.secondary, c.pml()).into());
        line("VPID", yn(k.secondary, c.vpid()).into());
        line(
            "unrestricted guest",
            yn(k.secondary, c.unrestricted_guest()).into(),
        );
        line(
            "2M / 1G EPT pages",
            format!(
                "{} / {}",
                yn(k.ept_cap, c.large_2m()),
                yn(k.ept_cap, c.large_1g())
            ),
        );
        let types = |single: bool, all: bool| -> String {
            let mut t = Vec::new();
            if single {
                t.push("single-context");
            }
            if all {
                t.push("all-context");
            }
            if t.is_empty() {
                "none".into()
            } else {
                t.join(", ")
            }
        };
        line(
            "INVEPT",
            if k.ept_cap {
                types(c.invept_single(), c.invept_all())
            } else {
                "unknown".into()
            },
        );
        line(
            "INVVPID",
            if k.ept_cap {
                types(c.invvpid_single(), c.invvpid_all())
            } else {
                "unknown".into()
            },
        );
        let pt = if k.basic && c.preemption_timer() {
            format!(
                "yes (ticks every 2^{} TSC cycles)",
                c.preemption_timer_rate()
            )
        } else {
            yn(k.basic, c.preemption_timer()).into()
        };
        line("preemption timer", pt);
        line(
            "MAXPHYADDR",
            if k.maxphyaddr {
                c.max_phys_bits.to_string()
            } else {
                format!("unknown ({} assumed)", c.max_phys_bits)
            },
        );
        let avail: Vec<String> = [Mode::Pml, Mode::AdScan, Mode::WriteProtect]
            .iter()
            .map(|&m| {
                format!(
                    "{} {}",
                    m.name(),
                    if c.mode_available(m).is_ok() {
                        "yes"
                    } else {
                        "no"
                    }
                )
            })
            .collect();
        line("modes", avail.join(", "));
        match self.mode() {
            Ok(m) => line("dirty tracking mode", m.name().into()),
            Err(r) => line("dirty tracking mode", format!("unsupported: {r}")),
        }
        if let Some(d) = self.driver_mode {
            line("driver's mode", crate::run::mode_name(d).into());
        }
        format!("VMX capabilities\n{s}")
    }
}

/// The MSR as the driver's CAPS answer reports it: readable (present bit), #GP (listed, bit
/// clear), or unknown (not asked).
pub fn msr_from_resp(resp: &CapsResp, m: u32) -> MsrValue {
    for (i, pair) in resp.msrs.iter().enumerate() {
        if pair[0] == u64::from(m) && (pair[0] != 0 || resp.present & (1 << i) != 0) {
            return if resp.present & (1 << i) != 0 {
                MsrValue::Value(pair[1])
            } else {
                MsrValue::Absent
            };
        }
    }
    MsrValue::Unknown
}

fn msr_json(v: MsrValue) -> Json {
    match v {
        MsrValue::Value(x) => Json::U(x),
        MsrValue::Absent => Json::from("absent"),
        MsrValue::Unknown => Json::from("unknown"),
    }
}

fn feature_control_text(v: MsrValue) -> String {
    match v {
        MsrValue::Value(x) => format!(
            "{x:#x}: {}, VMX outside SMX {}",
            if x & 1 != 0 {
                "locked"
            } else {
                "unlocked (the driver must set and lock it)"
            },
            if x & 4 != 0 { "enabled" } else { "disabled" }
        ),
        MsrValue::Absent => "absent (#GP)".into(),
        MsrValue::Unknown => "unknown".into(),
    }
}

/// CPUID on this CPU.
pub fn host_cpuid(leaf: u32, subleaf: u32) -> Option<CpuidRegs> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID exists on every x86-64 processor.
        #[allow(unused_unsafe)]
        let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
        Some(CpuidRegs {
            eax: r.eax,
            ebx: r.ebx,
            ecx: r.ecx,
            edx: r.edx,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (leaf, subleaf);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> serde_json::Value {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared-tests/fixtures/vmx-msrs")
            .join(name);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let r = Report::from_dump(&text, &p.display().to_string()).unwrap();
        let human = r.human();
        assert!(human.contains("EPT A/D"), "{human}");
        serde_json::from_str(&r.json().to_string()).unwrap()
    }

    // The expected facts come from shared-tests/fixtures/vmx-msrs/README.md ("What the set covers").

    #[test]
    fn ept_ad_and_pml_models() {
        for f in [
            "bochs-corei7_skylake_x.msr",
            "bochs-corei7_icelake_u.msr",
            "bochs-tigerlake.msr",
            "real-intel-core-i7-6700k.msr",
        ] {
            let j = fixture(f);
            assert_eq!(j["ept"], true, "{f}");
            assert_eq!(j["ept_ad"], true, "{f}");
            assert_eq!(j["pml"], true, "{f}");
            assert_eq!(j["mode"], "pml", "{f}");
        }
        // TOOLCHAIN.md: Bochs 2.7's skylake_x, icelake_u and tigerlake report VPID and
        // unrestricted guest too; FEATURE_CONTROL is 0x5 on every Bochs model.
        for f in [
            "bochs-corei7_skylake_x.msr",
            "bochs-corei7_icelake_u.msr",
            "bochs-tigerlake.msr",
        ] {
            let j = fixture(f);
            assert_eq!(j["vpid"], true, "{f}");
            assert_eq!(j["unrestricted_guest"], true, "{f}");
            assert_eq!(j["feature_control"], 5, "{f}");
        }
        // README: the VMCS revision is 0x2b, or 0x4 on icelake_u and tigerlake.
        assert_eq!(fixture("bochs-corei7_skylake_x.msr")["revision"], 0x2b);
        assert_eq!(fixture("bochs-tigerlake.msr")["revision"], 0x4);
    }

    #[test]
    fn ept_ad_without_pml_models() {
        for f in ["bochs-corei7_haswell_4770.msr", "bochs-broadwell_ult.msr"] {
            let j = fixture(f);
            assert_eq!(j["ept_ad"], true, "{f}");
            assert_eq!(j["pml"], false, "{f}");
            assert_eq!(j["mode"], "ad", "{f}");
            assert_eq!(j["modes"]["pml"], false, "{f}");
        }
    }

    #[test]
    fn ept_without_ad_models() {
        for f in [
            "bochs-corei7_sandy_bridge_2600k.msr",
            "bochs-corei7_ivy_bridge_3770k.msr",
            "bochs-corei5_arrandale_m520.msr",
            "bochs-corei5_lynnfield_750.msr",
            "real-intel-core-i7-3960x.msr",
        ] {
            let j = fixture(f);
            assert_eq!(j["ept"], true, "{f}");
            assert_eq!(j["ept_ad"], false, "{f}");
            assert_eq!(j["mode"], "wp", "{f}");
            assert_eq!(
                j["modes"],
                serde_json::json!({"pml": false, "ad": false, "wp": true}),
                "{f}"
            );
        }
    }

    #[test]
    fn no_ept_models_are_unsupported_with_a_reason() {
        for f in ["bochs-core2_penryn_t9600.msr", "real-intel-core2-x6800.msr"] {
            let j = fixture(f);
            assert_eq!(j["ept"], false, "{f}");
            assert_eq!(j["mode"], "unsupported", "{f}");
            let reason = j["reason"].as_str().unwrap();
            assert!(reason.to_lowercase().contains("ept"), "{f}: {reason}");
        }
        // README: the Core2 X6800 has no TRUE MSRs (VMX_BASIC bit 55 = 0) and no secondary controls.
        let j = fixture("real-intel-core2-x6800.msr");
        assert_eq!(j["true_ctls"], false);
        assert_eq!(
            j["ept_ad"], false,
            "no secondary controls: 0x48C cannot exist"
        );
    }

    #[test]
    fn unknown_msrs_are_reported_as_unknown() {
        // Secondary controls allowed (primary allowed-1 bit 31) but 0x48B not in the dump.
        let text = "0x480 0x00d810000000002b\n0x48e 0xfff9fffe04006172\n";
        let r = Report::from_dump(text, "partial").unwrap();
        let j: serde_json::Value = serde_json::from_str(&r.json().to_string()).unwrap();
        assert!(
            j["ept"].is_null() && j["pml"].is_null() && j["ept_ad"].is_null(),
            "{j}"
        );
        assert_eq!(j["feature_control"], "unknown");
        assert!(j["vmx"].is_null());
        assert!(j["maxphyaddr"].is_null());
        assert_eq!(j["mode"], "unsupported");
        assert!(
            r.human().contains("EPT A/D               unknown"),
            "{}",
            r.human()
        );
    }

    #[test]
    fn driver_answer_is_decoded_like_a_dump() {
        // The driver lists MSRs with a present mask: the skylake_x dump, with 0x491 (VMFUNC)
        // listed but not present (#GP), must decode to the same capabilities.
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared-tests/fixtures/vmx-msrs/bochs-corei7_skylake_x.msr");
        let dump = MsrDump::parse(&std::fs::read_to_string(p).unwrap()).unwrap();
        let mut resp = CapsResp {
            mode: 2,
            ..CapsResp::default()
        };
        let list = [
            0x3au32, 0x480, 0x481, 0x482, 0x483, 0x484, 0x485, 0x486, 0x487, 0x488, 0x489, 0x48a,
            0x48b, 0x48c, 0x48d, 0x48e, 0x48f, 0x490,
        ];
        for (i, &m) in list.iter().enumerate() {
            resp.msrs[i][0] = m.into();
            if let MsrValue::Value(v) = dump.msr(m) {
                resp.msrs[i][1] = v;
                resp.present |= 1 << i;
            }
        }
        resp.msrs[list.len()][0] = 0x491;
        assert_eq!(msr_from_resp(&resp, 0x491), MsrValue::Absent);
        assert_eq!(msr_from_resp(&resp, 0x492), MsrValue::Unknown);
        let r = Report::from_driver(&resp, &|l, s| dump.cpuid(l, s));
        let d = dump.caps();
        assert_eq!(
            (r.caps.ept(), r.caps.ept_ad(), r.caps.pml(), r.caps.vpid()),
            (d.ept(), d.ept_ad(), d.pml(), d.vpid())
        );
        assert_eq!(r.caps.procbased2, d.procbased2);
        assert_eq!(r.caps.ept_vpid_cap, d.ept_vpid_cap);
        let j: serde_json::Value = serde_json::from_str(&r.json().to_string()).unwrap();
        assert_eq!(j["driver_mode"], "pml");
        assert_eq!(j["mode"], "pml");
    }
}
