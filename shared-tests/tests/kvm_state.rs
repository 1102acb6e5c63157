//! KVM_GET/SET_SREGS and KVM_GET/SET_REGS on smudge's guest state: the state KVM's selftest
//! library builds (tools/testing/selftests/kvm/lib/x86_64/processor.c, `vcpu_init_sregs`: GET
//! the reset state, change CR0/CR4/EFER/CR3, CS/DS/ES/GS/TR/LDT, keep SS and FS) is accepted
//! and makes a VMCS the SDM entry checker accepts, on every captured processor; what KVM refuses
//! with EINVAL is refused; the RESET state is kept as given and fails at entry with a named
//! rule (the KVM_EXIT_FAIL_ENTRY of a real-mode guest without "unrestricted guest").

use smudge_core::arch::GuestGprs;
use smudge_core::dirty::Mode;
use smudge_core::kvm::abi::{KvmRegs, Sregs};
use smudge_core::kvm::state;
use smudge_core::vmx::caps::VmxCaps;
use smudge_core::vmx::checks::check_entry;
use smudge_core::vmx::guest_state::GuestState;
use smudge_core::vmx::setup::{self, VcpuConfig};
use smudge_core::vmx::vmcs::VmcsImage;
use smudge_tests::selftest;

fn vmcs_of(caps: &VmxCaps, g: &GuestState) -> VmcsImage {
    let ctls = setup::guest_controls(caps, Mode::WriteProtect, false).expect("controls");
    let cfg = VcpuConfig {
        eptp: smudge_core::ept::Eptp::new(0x20_0000, false).0,
        vpid: 1,
        pml_buffer: 0x30_0000,
        msr_bitmap: 0x31_0000,
    };
    let mut img = VmcsImage::new();
    setup::program(
        &mut img,
        caps,
        &ctls,
        &smudge_tests::fixtures::linux_host(caps),
        g,
        &cfg,
    )
    .expect("program");
    img
}

#[test]
fn the_selftests_state_enters_on_every_processor() {
    let all = smudge_tests::fixtures::all_caps();
    assert!(all.len() >= 3, "the captured processors");
    for (name, caps) in all {
        if caps.check_usable(false).is_err() {
            continue;
        }
        let mut g = GuestState::reset();
        let reset = state::sregs(&g, 0, 0, 0xfee0_0900);
        let s = selftest::long_mode(&reset);
        state::set_sregs(&mut g, &s, &caps, 40).unwrap_or_else(|_| panic!("{name}: refused"));
        g.rip = 0x40_0000;
        g.rsp = 0x80_0000;
        let img = vmcs_of(&caps, &g);
        if let Err(v) = check_entry(&img, &caps) {
            panic!("{name}: the selftests' state breaks {v}");
        }
        // GET_SREGS gives back what SET_SREGS took (the guest's CR0/CR4 view, every segment).
        let back = state::sregs(&g, 0, 0, 0xfee0_0900);
        assert_eq!(back.cr0, s.cr0, "{name}");
        assert_eq!(back.cr4, s.cr4, "{name}");
        for (a, b) in [
            (back.cs, s.cs),
            (back.ds, s.ds),
            (back.ss, s.ss),
            (back.fs, s.fs),
            (back.tr, s.tr),
        ] {
            assert_eq!(a, b, "{name}");
        }
        assert_eq!(back.ldt.unusable, 1);
        assert_eq!(back.ldt.present, 0);
    }
}

#[test]
fn reset_state_is_kept_but_cannot_enter() {
    let (_, caps) = smudge_tests::fixtures::all_caps()
        .into_iter()
        .find(|(n, _)| n.contains("skylake_x"))
        .expect("skylake_x");
    let mut g = GuestState::reset();
    let reset = state::sregs(&g, 0, 0, 0);
    // Real mode at F000:FFF0, as the SDM's RESET state.
    assert_eq!((reset.cs.selector, reset.cs.base), (0xf000, 0xffff_0000));
    assert_eq!(reset.cr0, 0x6000_0010);
    state::set_sregs(&mut g, &reset, &caps, 40).expect("KVM accepts the reset state");
    assert_eq!(state::sregs(&g, 0, 0, 0), reset);
    let v = check_entry(&vmcs_of(&caps, &g), &caps).expect_err("PE and PG are fixed to 1");
    assert!(v.to_string().contains("cr0"), "{v}");
}

#[test]
fn what_kvm_refuses_is_refused() {
    let (_, caps) = smudge_tests::fixtures::all_caps()
        .into_iter()
        .find(|(n, _)| n.contains("skylake_x"))
        .expect("skylake_x");
    let good = selftest::long_mode(&state::sregs(&GuestState::reset(), 0, 0, 0));
    let cases: [(&str, fn(&mut Sregs)); 10] = [
        ("long mode without PAE", |s| s.cr4 &= !(1 << 5)),
        ("LME and PG without LMA", |s| s.efer &= !(1 << 10)),
        ("CR3 beyond MAXPHYADDR", |s| s.cr3 = 1 << 41),
        ("LMA without paging", |s| s.cr0 &= !(1 << 31)),
        ("a 64-bit CS outside long mode", |s| {
            s.cr0 &= !(1 << 31);
            s.efer &= !(1 << 10);
        }),
        ("PG without PE", |s| s.cr0 = 1 << 31),
        ("NW without CD", |s| s.cr0 |= 1 << 29),
        ("CR0 bits 63:32", |s| s.cr0 |= 1 << 40),
        ("CR4.VMXE (no nested VMX)", |s| s.cr4 |= 1 << 13),
        ("CR4.OSXSAVE (XSAVE hidden)", |s| s.cr4 |= 1 << 18),
    ];
    for (what, f) in cases {
        let mut s = good;
        f(&mut s);
        let mut g = GuestState::reset();
        let before = g;
        assert!(state::set_sregs(&mut g, &s, &caps, 40).is_err(), "{what}");
        assert_eq!(g, before, "{what}: a refused SET_SREGS changes nothing");
    }
    let mut s = good;
    s.efer |= 1 << 12; // SVME
    assert!(state::set_sregs(&mut GuestState::reset(), &s, &caps, 40).is_err());
    s = good;
    s.interrupt_bitmap[0] = 1 << 32; // a pending interrupt: no interrupt controller here
    assert!(state::set_sregs(&mut GuestState::reset(), &s, &caps, 40).is_err());
}

#[test]
fn regs_round_trip_with_rflags_bit_1() {
    let r = KvmRegs {
        gprs: core::array::from_fn(|i| 0x1000 + i as u64),
        rip: 0x40_1000,
        rflags: 0x200,
    };
    let mut g = GuestGprs::default();
    let (rsp, rip, rflags) = state::set_regs(&mut g, &r);
    assert_eq!((rsp, rip, rflags), (0x1006, 0x40_1000, 0x202));
    assert_eq!(g.rdi, 0x1005);
    assert_eq!(g.r15, 0x100f);
    let back = state::regs(&g, rsp, rip, rflags);
    assert_eq!(back.gprs, r.gprs);
    assert_eq!(back.rflags, 0x202);
}
