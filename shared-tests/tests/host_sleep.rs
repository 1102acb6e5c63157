//! A CPU that leaves VMX operation and enters it again (a host sleep: `session::load::suspend`
//! and `resume`; a CPU taken offline and back: `cpu_offline`, `cpu_online`) starts a new epoch
//! there. A vCPU whose VMCS was active on it cannot run again (VMXOFF does not write an active
//! VMCS back, and the processor's copy is lost with its power, SDM 25.11.1): its RUN says so
//! instead of making the stale region current, on that CPU or another. A VM made after runs.
//! Its own test binary: it changes the driver-wide `vmx::root::ROOT`.

use smudge_core::abi::{self, exit_kind, Op, Wire};
use smudge_core::regs::CR4_VMXE;
use smudge_core::session::{Driver, Session};
use smudge_core::vmx::root::{ControlRegs, Processors, VmxonFailure, ROOT};
use smudge_tests::session_model::{MockOs, Step};

/// Two processors whose VMX operation another VMM holds (CR4.VMXE set): a VMXON there is
/// refused before the instruction, after the driver started a new epoch on it, as a wake or a
/// CPU coming online does. (The VMXON itself runs under Bochs.)
struct Taken<'a>(&'a smudge_tests::MockPlatform);

impl ControlRegs for Taken<'_> {
    fn cr0(&self) -> u64 {
        0x8005_0033
    }
    fn cr4(&self) -> u64 {
        0x6f8 | CR4_VMXE
    }
    fn set_vmxe(&self, _on: bool) {}
}

// SAFETY: `on` runs `f` in place and returns after it; this driver never enters VMX operation
// on these processors (VMXON is refused before the instruction), so no proof is handed out.
unsafe impl Processors for Taken<'_> {
    fn bound(&self) -> u32 {
        2
    }
    fn present(&self, _i: u32) -> bool {
        true
    }
    fn current(&self) -> u32 {
        0
    }
    fn on(&self, _i: u32, f: &mut (dyn FnMut() + Send)) -> bool {
        f();
        true
    }
    fn cr(&self) -> &(dyn ControlRegs + Sync) {
        self
    }
    fn irq_save(&self) -> usize {
        0
    }
    fn irq_restore(&self, _flags: usize) {}
    fn alloc_region(&self) -> Option<u64> {
        smudge_core::platform::Platform::alloc_page(self.0).ok()
    }
    fn free_region(&self, pa: u64) {
        smudge_core::platform::Platform::free_page(self.0, pa)
    }
}

/// SETUP with one vCPU, then RUN of vCPU 0 with the model guest `steps`.
fn run(
    s: &Session<MockOs<false>>,
    os: &MockOs<false>,
    d: &Driver,
    steps: Option<Vec<Step>>,
) -> abi::RunResp {
    if let Some(steps) = steps {
        let setup = abi::SetupReq {
            version: abi::VERSION,
            mode: 0,
            mem_bytes: 16 << 20,
            vcpus: 1,
            page_limit: 0,
        };
        let mut buf = vec![0u8; Op::Setup.buffer_size()];
        setup.to_bytes(&mut buf).expect("fits");
        s.request(os, d, Op::Setup, &mut buf).expect("SETUP");
        os.m.program(0, steps);
    }
    let mut buf = vec![0u8; Op::Run.buffer_size()];
    let req = abi::VcpuReq {
        version: abi::VERSION,
        vcpu: 0,
    };
    req.to_bytes(&mut buf).expect("fits");
    let n = s.request(os, d, Op::Run, &mut buf).expect("RUN");
    abi::RunResp::from_bytes(&buf[..n]).expect("RunResp")
}

#[test]
fn a_vcpu_whose_cpu_left_vmx_operation_stops_on_any_cpu_and_new_vms_run() {
    let (d, os) = smudge_tests::session_model::skylake::<false>(2);
    let mut s = Session::new();
    let mut t = Session::new();
    os.migrate_to(0);
    let steps = vec![Step::Write(0x20_0000), Step::Checkpoint, Step::Exit(0)];
    assert_eq!(
        run(&s, &os, &d, Some(steps.clone())).kind,
        exit_kind::CHECKPOINT
    );
    assert_eq!(run(&t, &os, &d, Some(steps)).kind, exit_kind::CHECKPOINT);

    // Both CPUs enter VMX operation again (a wake; a CPU back online): a new epoch on each.
    let before = [ROOT.epoch(0), ROOT.epoch(1)];
    let procs = Taken(&os.p);
    for cpu in 0..2 {
        let r = ROOT.vmxon_one(&procs, &os.p, &d.caps, cpu);
        assert_eq!(r, Err(Some(VmxonFailure::InUse)));
    }
    ROOT.vmxoff_all(&procs);
    assert_eq!(
        [ROOT.epoch(0), ROOT.epoch(1)],
        [before[0] + 1, before[1] + 1]
    );

    // On the CPU it ran on, and on another one (where the session first VMCLEARs it on its old
    // CPU): the programmed VMCS is not made current again.
    for (session, cpu) in [(&s, 0), (&t, 1)] {
        os.migrate_to(cpu);
        let r = run(session, &os, &d, None);
        let msg = String::from_utf8_lossy(&r.message);
        assert_eq!(r.kind, exit_kind::ERROR, "CPU {cpu}: {msg}");
        assert!(msg.contains("VMCS lost"), "{msg}");
        // The vCPU stays stopped.
        assert_eq!(run(session, &os, &d, None).kind, exit_kind::HLT);
    }
    s.release(&os);
    t.release(&os);

    let mut u = Session::new();
    let steps = vec![Step::Write(0x20_0000), Step::Exit(0)];
    assert_eq!(run(&u, &os, &d, Some(steps)).kind, exit_kind::EXIT);
    u.release(&os);
    os.p.assert_all_freed();
}
