//! Answers of the ABI built from core results, the same for every shim: RUN's exit record
//! ([`RunResp`]) from what `vmx::hw::run` returned, and CAPS's capability MSRs ([`CapsResp`]).

use core::fmt::Write;

use crate::abi::{exit_kind as k, CapsResp, RunResp, MESSAGE_LEN};
use crate::arch::VmFail;
use crate::dirty::Mode;
use crate::error::Error;
use crate::vm::{RunExit, StopCause, VcpuState, Vm};
use crate::vmx::caps::{msr, secondary, Controls, VmxCaps};
use crate::vmx::hw::HwError;
use crate::vmx::setup;

// ---------------------------------------------------------------------------------------------
// RUN
// ---------------------------------------------------------------------------------------------

/// Moves the vCPU's pending console bytes into `resp` (they belong to this answer only).
pub fn take_console(resp: &mut RunResp, st: &mut VcpuState) {
    let n = st.console_len.min(st.console.len()).min(resp.console.len());
    if let (Some(dst), Some(src)) = (resp.console.get_mut(..n), st.console.get(..n)) {
        dst.copy_from_slice(src);
    }
    resp.console_len = n as u32;
    st.console_len = 0;
}

/// Fills the exit fields of `resp`. A VMX instruction failure also stops the vCPU (`halted`):
/// its VMCS state is unknown.
pub fn fill_run(resp: &mut RunResp, result: Result<RunExit, HwError>, st: &mut VcpuState) {
    match result {
        Ok(x) => fill_exit(resp, x),
        Err(HwError::Vmx { step, fail }) => {
            resp.kind = k::ERROR;
            resp.reason = crate::abi::NO_VM_EXIT;
            resp.code = match fail {
                VmFail::Valid(e) => e.into(),
                VmFail::Invalid => crate::abi::VMFAIL_INVALID,
            };
            st.halted = true;
            let mut msg = Message::new();
            // Message truncates instead of failing.
            let _ = write!(msg, "{step} failed: {fail:?}");
            resp.set_message(msg.as_str());
        }
        Err(HwError::EntryCheck {
            violation,
            fail,
            exit_reason,
        }) => {
            resp.kind = k::ERROR;
            resp.reason = exit_reason & 0xffff;
            resp.code = match fail {
                Some(VmFail::Valid(e)) => e.into(),
                _ => 0,
            };
            let who = if fail.is_some() || exit_reason != 0 {
                "VM entry failed"
            } else {
                "VMCS refused before VMLAUNCH"
            };
            let mut msg = Message::new();
            // Message truncates instead of failing.
            let _ = write!(msg, "{who}: {violation}");
            resp.set_message(msg.as_str());
        }
    }
}

fn fill_exit(resp: &mut RunResp, x: RunExit) {
    match x {
        RunExit::Hlt => resp.kind = k::HLT,
        RunExit::ExitCode(c) => {
            resp.kind = k::EXIT;
            resp.code = c;
        }
        RunExit::Checkpoint => resp.kind = k::CHECKPOINT,
        RunExit::Console => resp.kind = k::CONSOLE,
        RunExit::Mmio { gpa, write } => {
            resp.kind = k::MMIO;
            resp.gpa = gpa;
            resp.write = write.into();
        }
        RunExit::TripleFault => resp.kind = k::TRIPLE_FAULT,
        // Only KVM vCPUs have a dirty ring.
        RunExit::RingFull => {
            resp.kind = k::ERROR;
            resp.set_message("dirty ring full (a KVM vCPU)");
        }
        // Only KVM vCPUs exit for port I/O; smudge's ABI has no record for it.
        RunExit::Io { port, .. } => {
            resp.kind = k::ERROR;
            resp.reason = crate::vm::reason::IO;
            resp.gpa = port.into();
            resp.set_message("port I/O for user space (a KVM vCPU)");
        }
        RunExit::Interrupted => resp.kind = k::INTERRUPTED,
        RunExit::Stopped { reason, what } => {
            resp.kind = k::ERROR;
            resp.reason = reason;
            resp.set_message(stop_message(what));
        }
    }
}

/// The message for a stopped vCPU.
pub const fn stop_message(what: StopCause) -> &'static str {
    match what {
        StopCause::UnhandledExit => "unhandled VM exit",
        StopCause::VmxInstruction => "the guest executed a VMX instruction",
        StopCause::EptMisconfig => "EPT misconfiguration (a smudge bug)",
        StopCause::PageLimit => "the VM reached its page limit",
        StopCause::OutOfMemory => "host out of memory while backing guest memory",
        StopCause::HostPageCap => crate::error::HOST_PAGE_CAP_MESSAGE,
        StopCause::UnexpectedViolation => "unexpected EPT violation",
        StopCause::EntryFailed => "VM entry failed",
        StopCause::HostOwnedCr4 => {
            "the guest tried to set a host-owned CR4 bit (OSXSAVE: smudge offers no extended state beyond x87/SSE)"
        }
    }
}

/// Text for [`RunResp::message`], formatted without allocation; truncated on a char boundary to
/// what the message holds besides its NUL.
struct Message {
    buf: [u8; MESSAGE_LEN - 1],
    len: usize,
}

impl Message {
    fn new() -> Message {
        Message {
            buf: [0; MESSAGE_LEN - 1],
            len: 0,
        }
    }
    fn as_str(&self) -> &str {
        self.buf
            .get(..self.len)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("")
    }
}

impl Write for Message {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.chars() {
            let mut tmp = [0u8; 4];
            let bytes = c.encode_utf8(&mut tmp).as_bytes();
            let end = self.len + bytes.len();
            match self.buf.get_mut(self.len..end) {
                Some(dst) if c != '\0' => dst.copy_from_slice(bytes),
                _ => return Ok(()),
            }
            self.len = end;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// SETUP, SET_MODE, CREATE_VCPU
// ---------------------------------------------------------------------------------------------

/// The dirty-tracking mode a SETUP or SET_MODE asks for (`None`: `best`, the driver's choice for
/// this CPU), checked against the capabilities, with the VMX controls it needs.
pub fn mode_controls(
    caps: &VmxCaps,
    best: Mode,
    asked: Option<Mode>,
) -> Result<(Mode, Controls), Error> {
    let mode = asked.unwrap_or(best);
    caps.mode_available(mode).map_err(|_| Error::Unsupported)?;
    // VPID when INVVPID exists (EPT_VPID_CAP bit 32, SDM A.10).
    let vpid = caps.ept_vpid_cap & (1 << 32) != 0;
    let ctls = setup::guest_controls(caps, mode, vpid).map_err(|_| Error::Unsupported)?;
    Ok((mode, ctls))
}

/// Where vCPU `index` of `vm` starts (the guest ABI's entry state): RIP at the loaded image's
/// entry point (0 before one is loaded; LOAD_ELF sets it) and RSP at the top of its stack.
pub fn vcpu_entry(vm: &Vm, index: u32) -> Result<(u64, u64), Error> {
    let layout = vm.layout().ok_or(Error::NotMapped)?;
    Ok((vm.entry(), layout.stack_top(index.into())))
}

// ---------------------------------------------------------------------------------------------
// CAPS
// ---------------------------------------------------------------------------------------------

/// The MSRs of the CAPS answer, in its order (the answer has room for 24): IA32_FEATURE_CONTROL
/// and every VMX capability MSR from IA32_VMX_BASIC to IA32_VMX_VMFUNC.
pub const CAPS_MSRS: [u32; 19] = [
    msr::IA32_FEATURE_CONTROL,
    msr::IA32_VMX_BASIC,
    msr::IA32_VMX_PINBASED_CTLS,
    msr::IA32_VMX_PROCBASED_CTLS,
    msr::IA32_VMX_EXIT_CTLS,
    msr::IA32_VMX_ENTRY_CTLS,
    msr::IA32_VMX_MISC,
    msr::IA32_VMX_CR0_FIXED0,
    msr::IA32_VMX_CR0_FIXED1,
    msr::IA32_VMX_CR4_FIXED0,
    msr::IA32_VMX_CR4_FIXED1,
    msr::IA32_VMX_VMCS_ENUM,
    msr::IA32_VMX_PROCBASED_CTLS2,
    msr::IA32_VMX_EPT_VPID_CAP,
    msr::IA32_VMX_TRUE_PINBASED_CTLS,
    msr::IA32_VMX_TRUE_PROCBASED_CTLS,
    msr::IA32_VMX_TRUE_EXIT_CTLS,
    msr::IA32_VMX_TRUE_ENTRY_CTLS,
    msr::IA32_VMX_VMFUNC,
];

/// Whether `msr` (one of [`CAPS_MSRS`]) exists on a processor with these capabilities, so that
/// RDMSR cannot #GP (Windows gives a driver no #GP-safe RDMSR). SDM Appendix A: 0x3A and
/// 0x480-0x48A exist with VMX; 0x48B (PROCBASED_CTLS2) when the primary controls allow "activate
/// secondary controls" (A.3.3); 0x48C (EPT_VPID_CAP) when the secondary controls allow EPT or
/// VPID (A.10); 0x48D-0x490 (TRUE_*) when IA32_VMX_BASIC bit 55 is set (A.2); 0x491 (VMFUNC)
/// when the secondary controls allow "enable VM functions" (A.11).
pub fn caps_msr_exists(m: u32, caps: &VmxCaps) -> bool {
    if caps.vmx_supported() != Some(true) {
        return false;
    }
    let sec = |mask: u32| caps.secondary_controls() && caps.procbased2.may_be_1 & mask != 0;
    match m {
        msr::IA32_FEATURE_CONTROL | msr::IA32_VMX_BASIC..=msr::IA32_VMX_VMCS_ENUM => true,
        msr::IA32_VMX_PROCBASED_CTLS2 => caps.secondary_controls(),
        msr::IA32_VMX_EPT_VPID_CAP => sec(secondary::ENABLE_EPT | secondary::ENABLE_VPID),
        msr::IA32_VMX_TRUE_PINBASED_CTLS..=msr::IA32_VMX_TRUE_ENTRY_CTLS => caps.true_ctls(),
        msr::IA32_VMX_VMFUNC => sec(1 << secondary::ENABLE_VM_FUNCTIONS_BIT),
        _ => false,
    }
}

/// The CAPS answer: every MSR of [`CAPS_MSRS`] with its value where it exists and `rdmsr`
/// read it (`present` bit i), and the dirty-tracking mode the driver chose. `rdmsr` is called
/// only for MSRs that exist ([`caps_msr_exists`]).
pub fn caps_resp(
    caps: &VmxCaps,
    mode: Mode,
    rdmsr: &mut dyn FnMut(u32) -> Option<u64>,
) -> CapsResp {
    let mut c = CapsResp {
        mode: mode as u32,
        ..CapsResp::default()
    };
    for (i, (&m, pair)) in CAPS_MSRS.iter().zip(c.msrs.iter_mut()).enumerate() {
        pair[0] = u64::from(m);
        if caps_msr_exists(m, caps) {
            if let Some(v) = rdmsr(m) {
                pair[1] = v;
                c.present |= 1 << i;
            }
        }
    }
    c
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    extern crate std;
    use super::*;
    use crate::vmx::caps::MsrValue;
    use crate::vmx::msr_dump::MsrDump;
    use std::string::{String, ToString};

    fn message(r: &RunResp) -> &str {
        let end = r.message.iter().position(|&b| b == 0).unwrap();
        core::str::from_utf8(&r.message[..end]).unwrap()
    }

    #[test]
    fn exits_map_to_the_abi_kinds() {
        let mut st = VcpuState::new(0);
        for (x, kind) in [
            (RunExit::Hlt, k::HLT),
            (RunExit::Checkpoint, k::CHECKPOINT),
            (RunExit::Console, k::CONSOLE),
            (RunExit::TripleFault, k::TRIPLE_FAULT),
            (RunExit::Interrupted, k::INTERRUPTED),
        ] {
            let mut r = RunResp::default();
            fill_run(&mut r, Ok(x), &mut st);
            assert_eq!(r.kind, kind, "{x:?}");
        }
        let mut r = RunResp::default();
        fill_run(&mut r, Ok(RunExit::ExitCode(42)), &mut st);
        assert_eq!((r.kind, r.code), (k::EXIT, 42));
        let mut r = RunResp::default();
        fill_run(
            &mut r,
            Ok(RunExit::Mmio {
                gpa: 0xfee0_0000,
                write: true,
            }),
            &mut st,
        );
        assert_eq!((r.kind, r.gpa, r.write), (k::MMIO, 0xfee0_0000, 1));
        assert!(
            !st.halted,
            "only a VMX failure halts the vCPU here; the VM halts the others"
        );
    }

    #[test]
    fn a_stop_carries_its_reason_and_message() {
        let mut st = VcpuState::new(0);
        let mut r = RunResp::default();
        fill_run(
            &mut r,
            Ok(RunExit::Stopped {
                reason: 49,
                what: StopCause::EptMisconfig,
            }),
            &mut st,
        );
        assert_eq!((r.kind, r.reason), (k::ERROR, 49));
        assert_eq!(message(&r), "EPT misconfiguration (a smudge bug)");
    }

    #[test]
    fn a_vmx_failure_reports_the_instruction_error_and_halts() {
        // SDM 31.4: VM-instruction error 7 = "VM entry with invalid control field(s)".
        let mut st = VcpuState::new(0);
        let mut r = RunResp::default();
        fill_run(
            &mut r,
            Err(HwError::Vmx {
                step: "vmlaunch",
                fail: VmFail::Valid(7),
            }),
            &mut st,
        );
        assert_eq!(
            (r.kind, r.code, r.reason),
            (k::ERROR, 7, crate::abi::NO_VM_EXIT)
        );
        assert_eq!(message(&r), "vmlaunch failed: Valid(7)");
        assert!(st.halted);
        let mut r = RunResp::default();
        fill_run(
            &mut r,
            Err(HwError::Vmx {
                step: "vmptrld",
                fail: VmFail::Invalid,
            }),
            &mut st,
        );
        assert_eq!(r.code, crate::abi::VMFAIL_INVALID);
    }

    #[test]
    fn an_entry_check_names_the_rule() {
        use crate::vmx::checks::check_entry;
        use crate::vmx::vmcs::VmcsImage;
        // An all-zero VMCS breaks some SDM 27.2/27.3 rule; which one is the checker's business,
        // the answer must carry its id, the exit reason and the instruction error.
        let violation = check_entry(&VmcsImage::new(), &VmxCaps::default()).unwrap_err();
        let mut st = VcpuState::new(0);
        let mut r = RunResp::default();
        fill_run(
            &mut r,
            Err(HwError::EntryCheck {
                violation,
                fail: None,
                exit_reason: 0,
            }),
            &mut st,
        );
        assert_eq!((r.kind, r.reason, r.code), (k::ERROR, 0, 0));
        let text = message(&r);
        assert!(
            text.starts_with("VMCS refused before VMLAUNCH: ["),
            "{text}"
        );
        assert!(text.contains(violation.id()), "{text}");
        let mut r = RunResp::default();
        let failed = HwError::EntryCheck {
            violation,
            fail: Some(VmFail::Valid(7)),
            exit_reason: 0x8000_0021,
        };
        fill_run(&mut r, Err(failed), &mut st);
        assert_eq!((r.reason, r.code), (33, 7));
        assert!(message(&r).starts_with("VM entry failed: ["));
    }

    #[test]
    fn long_messages_are_truncated_on_a_char_boundary_and_terminated() {
        let mut m = Message::new();
        write!(m, "{}", "é".repeat(400)).unwrap(); // 800 bytes of 2-byte chars
                                                   // MESSAGE_LEN - 1 = 479 bytes of room: 239 whole chars (478 bytes).
        assert_eq!(m.as_str().len(), 478);
        let mut r = RunResp::default();
        r.set_message(m.as_str());
        assert_eq!(message(&r).chars().count(), 239);
    }

    #[test]
    fn console_bytes_move_once() {
        let mut st = VcpuState::new(0);
        st.console[..3].copy_from_slice(b"hi\n");
        st.console_len = 3;
        let mut r = RunResp::default();
        take_console(&mut r, &mut st);
        assert_eq!((r.console_len, &r.console[..3]), (3, &b"hi\n"[..]));
        assert_eq!(st.console_len, 0);
        let mut again = RunResp::default();
        take_console(&mut again, &mut st);
        assert_eq!(again.console_len, 0);
    }

    fn fixtures() -> std::vec::Vec<(String, MsrDump)> {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared-tests/fixtures/vmx-msrs"
        );
        let mut out = std::vec::Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(".msr") {
                out.push((
                    name,
                    MsrDump::parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
                ));
            }
        }
        out
    }

    #[test]
    fn caps_msrs_exist_exactly_where_the_fixture_dumps_have_them() {
        // The Bochs dumps record every MSR as a value or `absent` (what RDMSR did there): the
        // existence rule must never claim an absent MSR and must find every present one.
        let mut checked = 0;
        for (name, d) in fixtures().iter().filter(|(n, _)| n.starts_with("bochs-")) {
            let caps = VmxCaps::from_reader(|m| d.msr(m), |l, s| d.cpuid(l, s));
            for m in CAPS_MSRS {
                match d.msr(m) {
                    MsrValue::Value(_) => {
                        assert!(caps_msr_exists(m, &caps), "{name}: {m:#x} present")
                    }
                    MsrValue::Absent => {
                        assert!(!caps_msr_exists(m, &caps), "{name}: {m:#x} absent")
                    }
                    MsrValue::Unknown => {}
                }
                checked += 1;
            }
        }
        assert!(checked >= 10 * CAPS_MSRS.len());
    }

    #[test]
    fn the_caps_answer_reads_only_existing_msrs() {
        for (name, d) in fixtures().iter().filter(|(n, _)| n.starts_with("bochs-")) {
            let caps = VmxCaps::from_reader(|m| d.msr(m), |l, s| d.cpuid(l, s));
            // A reader that fails the test on any MSR the dump says would #GP.
            let mut read = |m: u32| match d.msr(m) {
                MsrValue::Value(v) => Some(v),
                other => panic!("{name}: read {m:#x} ({other:?})"),
            };
            let c = caps_resp(&caps, Mode::Pml, &mut read);
            assert_eq!(c.mode, 2);
            for (i, m) in CAPS_MSRS.iter().enumerate() {
                assert_eq!(c.msrs[i][0], u64::from(*m));
                let present = c.present & (1 << i) != 0;
                assert_eq!(
                    present,
                    matches!(d.msr(*m), MsrValue::Value(_)),
                    "{name}: {m:#x}"
                );
                if let MsrValue::Value(v) = d.msr(*m) {
                    assert_eq!(c.msrs[i][1], v);
                }
            }
            assert_eq!(c.present >> CAPS_MSRS.len(), 0);
        }
    }
}

/// The guest's and the EPT's part of an EXPLAIN answer for `gpa`: the guest's own PDE (its
/// tables map 4 GiB with 2 MiB pages) and the EPT leaf with the backing page. The shim adds
/// what only the OS knows: the host mappings of that page (`host_va`, `host_pte`, `user_pte`).
pub fn explain_guest<P: crate::platform::Platform + ?Sized>(
    vm: &crate::vm::Vm,
    p: &P,
    gpa: u64,
) -> Result<crate::abi::ExplainResp, crate::Error> {
    let mut r = crate::abi::ExplainResp::default();
    if let Some(pde) = vm.guest_pde(p, gpa)? {
        r.guest_pte = pde;
        r.guest_level = 2;
    }
    if let Some(t) = vm.ept().translate(p, gpa) {
        r.ept_leaf = t.entry.0;
        r.ept_level = t.level.into();
        r.hpa = t.hpa & !0xfff;
    }
    Ok(r)
}
