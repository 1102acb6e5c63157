//! The RUN answer: a `RunResp` from what the shared hardware loop returned.
//!
//! The same record as the Linux module builds (`smudge_main.rs`, `run` and `fill_exit`); it lives
//! here as plain code so the host can test it.

use core::fmt::Write;

use smudge_core::abi::{exit_kind as k, RunResp};
use smudge_core::arch::VmFail;
use smudge_core::vm::{RunExit, StopCause, VcpuState};
use smudge_core::vmx::hw::HwError;

use crate::msg::MsgBuf;

/// Moves the vCPU's pending console bytes into `resp` (they belong to this answer only).
pub fn take_console(resp: &mut RunResp, st: &mut VcpuState) {
    let n = st.console_len.min(st.console.len()).min(resp.console.len());
    if let (Some(dst), Some(src)) = (resp.console.get_mut(..n), st.console.get(..n)) {
        dst.copy_from_slice(src);
    }
    resp.console_len = n as u32;
    st.console_len = 0;
}

/// Fills the exit fields of `resp`. A VMX instruction failure also stops the vCPU (`halted`),
/// as on Linux: its VMCS state is unknown.
pub fn fill(resp: &mut RunResp, result: Result<RunExit, HwError>, st: &mut VcpuState) {
    match result {
        Ok(x) => fill_exit(resp, x),
        Err(HwError::Vmx { step, fail }) => {
            resp.kind = k::ERROR;
            resp.code = match fail {
                VmFail::Valid(e) => e.into(),
                VmFail::Invalid => u64::MAX,
            };
            st.halted = true;
            let mut msg = MsgBuf::new();
            // MsgBuf truncates instead of failing.
            let _ = write!(msg, "{step} failed: {fail:?}");
            resp.set_message(msg.as_cstr().to_str().unwrap_or(""));
        }
        Err(HwError::EntryCheck { violation, fail, exit_reason }) => {
            resp.kind = k::ERROR;
            resp.reason = exit_reason & 0xffff;
            resp.code = match fail {
                Some(VmFail::Valid(e)) => e.into(),
                _ => 0,
            };
            let who = if fail.is_some() || exit_reason != 0 { "VM entry failed" } else { "VMCS refused before VMLAUNCH" };
            let mut msg = MsgBuf::new();
            // MsgBuf truncates instead of failing.
            let _ = write!(msg, "{who}: {violation}");
            resp.set_message(msg.as_cstr().to_str().unwrap_or(""));
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
        RunExit::Interrupted => resp.kind = k::INTERRUPTED,
        RunExit::Stopped { reason, what } => {
            resp.kind = k::ERROR;
            resp.reason = reason;
            resp.set_message(stop_message(what));
        }
    }
}

/// The message for a stopped vCPU (the same text as the Linux module's).
pub const fn stop_message(what: StopCause) -> &'static str {
    match what {
        StopCause::UnhandledExit => "unhandled VM exit",
        StopCause::VmxInstruction => "the guest executed a VMX instruction",
        StopCause::EptMisconfig => "EPT misconfiguration (a smudge bug)",
        StopCause::PageLimit => "the VM reached its page limit",
        StopCause::OutOfMemory => "host out of memory while backing guest memory",
        StopCause::UnexpectedViolation => "unexpected EPT violation",
        StopCause::EntryFailed => "VM entry failed",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

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
            fill(&mut r, Ok(x), &mut st);
            assert_eq!(r.kind, kind, "{x:?}");
        }
        let mut r = RunResp::default();
        fill(&mut r, Ok(RunExit::ExitCode(42)), &mut st);
        assert_eq!((r.kind, r.code), (k::EXIT, 42));
        let mut r = RunResp::default();
        fill(&mut r, Ok(RunExit::Mmio { gpa: 0xfee0_0000, write: true }), &mut st);
        assert_eq!((r.kind, r.gpa, r.write), (k::MMIO, 0xfee0_0000, 1));
        assert!(!st.halted, "only a VMX failure halts the vCPU here; the core halts the others");
    }

    #[test]
    fn a_stop_carries_its_reason_and_message() {
        let mut st = VcpuState::new(0);
        let mut r = RunResp::default();
        fill(&mut r, Ok(RunExit::Stopped { reason: 49, what: StopCause::EptMisconfig }), &mut st);
        assert_eq!((r.kind, r.reason), (k::ERROR, 49));
        assert_eq!(message(&r), "EPT misconfiguration (a smudge bug)");
    }

    #[test]
    fn a_vmx_failure_reports_the_instruction_error_and_halts() {
        // SDM 31.4: VM-instruction error 7 = "VM entry with invalid control field(s)".
        let mut st = VcpuState::new(0);
        let mut r = RunResp::default();
        fill(&mut r, Err(HwError::Vmx { step: "vmlaunch", fail: VmFail::Valid(7) }), &mut st);
        assert_eq!((r.kind, r.code), (k::ERROR, 7));
        assert_eq!(message(&r), "vmlaunch failed: Valid(7)");
        assert!(st.halted);
        let mut r = RunResp::default();
        fill(&mut r, Err(HwError::Vmx { step: "vmptrld", fail: VmFail::Invalid }), &mut st);
        assert_eq!(r.code, u64::MAX);
    }

    #[test]
    fn an_entry_check_names_the_rule() {
        use smudge_core::vmx::checks::check_entry;
        use smudge_core::vmx::vmcs::VmcsImage;
        // An all-zero VMCS breaks some SDM 27.2/27.3 rule; which one is the checker's business,
        // the answer must carry its id, the exit reason and the instruction error.
        let violation = check_entry(&VmcsImage::new(), &smudge_core::vmx::caps::VmxCaps::default()).unwrap_err();
        let mut st = VcpuState::new(0);
        let mut r = RunResp::default();
        fill(&mut r, Err(HwError::EntryCheck { violation, fail: None, exit_reason: 0 }), &mut st);
        assert_eq!((r.kind, r.reason, r.code), (k::ERROR, 0, 0));
        let text = message(&r);
        assert!(text.starts_with("VMCS refused before VMLAUNCH: ["), "{text}");
        assert!(text.contains(violation.id()), "{text}");
        let mut r = RunResp::default();
        let failed = HwError::EntryCheck { violation, fail: Some(VmFail::Valid(7)), exit_reason: 0x8000_0021 };
        fill(&mut r, Err(failed), &mut st);
        assert_eq!((r.reason, r.code), (33, 7));
        assert!(message(&r).starts_with("VM entry failed: ["));
        assert!(r.message.contains(&0), "NUL-terminated even when truncated");
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
}
