//! The real VMX capability MSR dumps in `fixtures/vmx-msrs` (Bochs models and real CPUs).

use std::path::Path;

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
