//! The real VMX capability MSR dumps in `fixtures/vmx-msrs` (Bochs models and real CPUs).

use std::path::Path;

use smudge_core::arch::{DescriptorTablePointer, HostState};
use smudge_core::vmx::caps::VmxCaps;
use smudge_core::vmx::msr_dump::MsrDump;

/// Every `*.msr` dump decoded into capabilities: (file name, capabilities), sorted by name.
/// A dump that does not parse panics with its name (a broken fixture is a broken test).
pub fn all_caps() -> Vec<(String, VmxCaps)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vmx-msrs");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("fixture dir") {
        let path = e.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if !name.ends_with(".msr") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let d = MsrDump::parse(&text).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        out.push((
            name,
            VmxCaps::from_reader(|m| d.msr(m), |l, s| d.cpuid(l, s)),
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A 64-bit Linux host as `arch::host_state` would read it: CR0 PG|WP|NE|ET|MP|PE, CR4
/// PAE|PGE|PSE|OSFXSR|OSXMMEXCPT|VMXE (fitted to the fixed bits, SDM 27.2.2), kernel CS/SS/TR
/// selectors, canonical kernel bases, EFER SCE|LME|LMA|NXE, the power-up PAT.
pub fn linux_host(caps: &VmxCaps) -> HostState {
    let fit = |v: u64, fixed0: u64, fixed1: u64| (v | fixed0) & fixed1;
    HostState {
        cr0: fit(0x8005_0033, caps.cr0_fixed0, caps.cr0_fixed1),
        cr3: 0x0123_4000,
        cr4: fit(0x26b0, caps.cr4_fixed0, caps.cr4_fixed1),
        cs: 0x10,
        ss: 0x18,
        ds: 0,
        es: 0,
        fs: 0,
        gs: 0,
        tr: 0x40,
        fs_base: 0x7f12_3456_7000,
        gs_base: 0xffff_8880_0fa0_0000,
        tr_base: 0xffff_fe00_0000_3000,
        gdtr: DescriptorTablePointer {
            limit: 0x7f,
            base: 0xffff_fe00_0000_1000,
        },
        idtr: DescriptorTablePointer {
            limit: 0xfff,
            base: 0xffff_fe00_0000_0000,
        },
        sysenter_cs: 0x10,
        sysenter_esp: 0xffff_fe00_0000_5000,
        sysenter_eip: 0xffff_ffff_8100_0000,
        efer: 0xd01,
        pat: 0x0007_0406_0007_0406,
        dr7: 0x400,
        debugctl: 0,
    }
}
