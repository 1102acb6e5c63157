//! The VMCS smudge programs (`vmx::setup`), judged by the software VM-entry checker (SDM 27.2,
//! 27.3) as an independent oracle, for every real capability-MSR dump with EPT.
//!
//! For each fixture in `fixtures/vmx-msrs` whose processor allows "enable EPT", each dirty mode
//! it offers and with or without VPID, the controls are adjusted, a whole VMCS (controls, host
//! area from a plausible 64-bit Linux host, guest area) is written into a `VmcsImage`, and
//! `check_entry` must accept it. The control fields are then compared bit by bit with the choices
//! smudge documents, written here as SDM bit numbers (Tables 25-5 to 25-15), not through the
//! crate's constants.

use smudge_core::arch::HostState;
use smudge_core::dirty::Mode;
use smudge_core::ept::Eptp;
use smudge_core::guest::Layout;
use smudge_core::vmx::caps::{Ctls, VmxCaps};
use smudge_core::vmx::checks::check_entry;
use smudge_core::vmx::fields::Field;
use smudge_core::vmx::guest_state::GuestState;
use smudge_core::vmx::setup::{self, VcpuConfig};
use smudge_core::vmx::vmcs::{VmcsAccess, VmcsImage};

fn fixtures() -> Vec<(String, VmxCaps)> {
    smudge_tests::fixtures::all_caps()
}

fn host(caps: &VmxCaps) -> HostState {
    smudge_tests::fixtures::linux_host(caps)
}

fn bits(list: &[u32]) -> u32 {
    list.iter().fold(0, |m, b| m | 1 << b)
}

/// Checks one control field: every `required` bit set, each `optional` bit set exactly when the
/// processor allows it, nothing else but the processor's must-be-1 bits.
fn expect_field(what: &str, value: u64, c: Ctls, required: &[u32], optional: &[u32]) {
    let v = value as u32;
    assert_eq!(value >> 32, 0, "{what}");
    for &b in required {
        assert!(
            v & (1 << b) != 0,
            "{what}: required bit {b} clear in {v:#x}"
        );
    }
    for &b in optional {
        assert_eq!(
            v & (1 << b) != 0,
            c.may_be_1 & (1 << b) != 0,
            "{what}: optional bit {b} in {v:#x}"
        );
    }
    let expected = bits(required) | bits(optional) | c.must_be_1;
    assert_eq!(
        v & !expected,
        0,
        "{what}: unexpected bits {:#x} in {v:#x}",
        v & !expected
    );
    assert!(
        c.valid(v),
        "{what}: {v:#x} breaks the allowed settings {c:x?}"
    );
}

#[test]
fn programmed_vmcs_passes_the_entry_checks_on_every_fixture_with_ept() {
    let layout = Layout::new(64 << 20).expect("layout");
    let mut programmed = 0;
    let mut fixtures_with_ept = 0;
    let mut pml_seen = 0;
    for (name, caps) in fixtures() {
        if !caps.ept() {
            continue;
        }
        fixtures_with_ept += 1;
        let modes: Vec<Mode> = [Mode::WriteProtect, Mode::AdScan, Mode::Pml]
            .into_iter()
            .filter(|m| caps.mode_available(*m).is_ok())
            .collect();
        assert!(
            modes.contains(&Mode::WriteProtect) || caps.check_usable(false).is_err(),
            "{name}"
        );
        for mode in modes {
            for vpid in [false, true] {
                let what = format!("{name} {mode:?} vpid={vpid}");
                let ctls = setup::guest_controls(&caps, mode, vpid)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let cfg = VcpuConfig {
                    // WB, 4-level, A/D only in the modes that read D bits (SDM 25.6.11).
                    eptp: Eptp::new(0x20_0000, mode != Mode::WriteProtect).0,
                    vpid: 1,
                    pml_buffer: 0x30_0000,
                    msr_bitmap: 0x31_0000,
                };
                let guest = GuestState::smudge(&layout, &caps, 0x10_0000, layout.stack_top(0), 0x2);
                let mut img = VmcsImage::new();
                setup::program(&mut img, &caps, &ctls, &host(&caps), &guest, &cfg)
                    .expect("program");
                if let Err(v) = check_entry(&img, &caps) {
                    panic!("{what}: the entry checker refuses the VMCS: {v}\n{img:?}");
                }
                let rd = |f: Field| img.read(f).expect("read");

                // Pin-based (Table 25-5): external interrupts 0, NMI 3; preemption timer 6.
                expect_field(
                    &format!("{what} pin"),
                    rd(Field::PinBasedControls),
                    caps.pinbased,
                    &[0, 3],
                    &[6],
                );
                // Primary (Table 25-6): HLT 7, CR8 load 19 / store 20, MOV-DR 23, unconditional
                // I/O 24, MSR bitmaps 28, secondary 31. CR3 load/store (15, 16) only where
                // must-be-1.
                let primary = rd(Field::PrimaryProcessorBasedControls);
                expect_field(
                    &format!("{what} primary"),
                    primary,
                    caps.procbased,
                    &[7, 19, 20, 23, 24, 28, 31],
                    &[],
                );
                for b in [15, 16] {
                    assert_eq!(
                        primary & (1 << b) != 0,
                        caps.procbased.must_be_1 & (1 << b) != 0,
                        "{what}: CR3 exiting bit {b}"
                    );
                }
                // Secondary (Table 25-7): EPT 1, PML 17 in PML mode; RDTSCP 3, INVPCID 12,
                // VPID 5 when asked.
                let mut sec_req = vec![1];
                if mode == Mode::Pml {
                    sec_req.push(17);
                }
                // Optional: RDTSCP 3, WBINVD exiting 6, INVPCID 12, VPID 5 when asked.
                let mut sec_opt = vec![3, 6, 12];
                if vpid {
                    sec_opt.push(5);
                }
                let secondary = rd(Field::SecondaryProcessorBasedControls);
                expect_field(
                    &format!("{what} secondary"),
                    secondary,
                    caps.procbased2,
                    &sec_req,
                    &sec_opt,
                );
                // CR4 guest/host mask (SDM 25.6.6): VMXE (bit 13) and OSXSAVE (bit 18) are the
                // host's; the read shadow shows them clear.
                let mask = rd(Field::Cr4GuestHostMask);
                assert_eq!(
                    mask & (1 << 18 | 1 << 13),
                    1 << 18 | 1 << 13,
                    "{what}: CR4 mask"
                );
                assert_eq!(
                    rd(Field::Cr4ReadShadow) & (1 << 18 | 1 << 13),
                    0,
                    "{what}: shadow"
                );
                // VM-exit (Table 25-13): host address-space size 9, save/load EFER 20/21; save/load
                // PAT 18/19.
                expect_field(
                    &format!("{what} exit"),
                    rd(Field::VmExitControls),
                    caps.exit,
                    &[9, 20, 21],
                    &[18, 19],
                );
                // VM-entry (Table 25-15): IA-32e mode guest 9, load EFER 15; load PAT 14.
                expect_field(
                    &format!("{what} entry"),
                    rd(Field::VmEntryControls),
                    caps.entry,
                    &[9, 15],
                    &[14],
                );

                // The pointers the vCPU supplies.
                assert_eq!(rd(Field::EptPointer), cfg.eptp, "{what}");
                assert_eq!(rd(Field::MsrBitmapAddress), cfg.msr_bitmap, "{what}");
                if mode == Mode::Pml {
                    // SDM 29.3.6: the PML address and an index of 511 (an empty log).
                    assert!(secondary & (1 << 17) != 0, "{what}: PML control");
                    assert_eq!(rd(Field::PmlAddress), cfg.pml_buffer, "{what}");
                    assert_eq!(rd(Field::GuestPmlIndex), 511, "{what}");
                    pml_seen += 1;
                } else {
                    assert_eq!(secondary & (1 << 17), 0, "{what}: PML off");
                    assert_eq!(rd(Field::PmlAddress), 0, "{what}: no PML buffer");
                }
                if secondary & (1 << 5) != 0 {
                    assert_eq!(rd(Field::VirtualProcessorId), 1, "{what}");
                }
                programmed += 1;
            }
        }
    }
    // README of the fixtures: 11 dumps with EPT, 4 of them with PML.
    assert!(
        fixtures_with_ept >= 11,
        "{fixtures_with_ept} fixtures with EPT"
    );
    assert!(pml_seen >= 4 * 2, "{pml_seen} PML programs");
    assert!(programmed >= 11 * 2, "{programmed} VMCSs programmed");
}

#[test]
fn the_host_area_is_refreshed_alone() {
    // `program_host` (every run after the first, on whichever CPU) writes only host-state fields.
    let (_, caps) = fixtures()
        .into_iter()
        .find(|(n, _)| n == "bochs-corei7_skylake_x.msr")
        .expect("fixture");
    let ctls = setup::guest_controls(&caps, Mode::Pml, true).expect("controls");
    let mut img = VmcsImage::new();
    setup::program_host(&mut img, &ctls, &host(&caps)).expect("program_host");
    for f in Field::ALL {
        if img.read(*f).expect("read") != 0 {
            assert_eq!(f.kind(), smudge_core::vmx::fields::Kind::HostState, "{f}");
        }
    }
    assert_eq!(img.read(Field::HostTrSelector), Ok(0x40));
    assert_eq!(img.read(Field::HostIa32Pat), Ok(0x0007_0406_0007_0406));
}

#[test]
fn a_required_control_the_processor_lacks_is_named() {
    // PML mode on a processor without PML (Bochs haswell: EPT A/D, no PML): the adjustment
    // must refuse, naming secondary bit 17.
    let (_, caps) = fixtures()
        .into_iter()
        .find(|(n, _)| n == "bochs-corei7_haswell_4770.msr")
        .expect("fixture");
    assert!(caps.ept() && !caps.pml());
    let e = setup::guest_controls(&caps, Mode::Pml, false).expect_err("no PML");
    assert!(
        e.is_missing(smudge_core::vmx::caps::ControlField::SecondaryProcBased, 17),
        "{e}"
    );
    assert!(e.to_string().contains("enable PML"), "{e}");
}
