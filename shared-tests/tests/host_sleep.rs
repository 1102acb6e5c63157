//! A host sleep (Windows's power-state callback: `session::load::suspend`, then `resume`)
//! starts a new generation of VMX operation. A vCPU whose VMCS was active before it cannot run
//! again (the processor's copy of the VMCS is lost with its power, SDM 25.11.1): its RUN says so
//! instead of making the stale region current. A VM made after the wake runs. Its own test
//! binary: it changes the driver-wide `vmx::root::ROOT`.

use smudge_core::abi::{self, exit_kind, Op, Wire};
use smudge_core::session::{Driver, Session};
use smudge_core::vmx::root::ROOT;
use smudge_tests::session_model::{MockOs, NoVmx, Step};

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
fn a_vcpu_that_ran_before_a_host_sleep_stops_on_any_cpu_and_new_vms_run() {
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

    // The host sleeps and wakes.
    let before = ROOT.generation();
    ROOT.vmxoff_each(&NoVmx);
    assert_eq!(ROOT.vmxon_all(&NoVmx, &os.p, &d.caps), Ok(0));
    assert_eq!(ROOT.generation(), before + 1);

    // On the CPU it ran on, and on another one (where the session first VMCLEARs it on its old
    // CPU): the programmed VMCS is not made current again.
    for (session, cpu) in [(&s, 0), (&t, 1)] {
        os.migrate_to(cpu);
        let r = run(session, &os, &d, None);
        let msg = String::from_utf8_lossy(&r.message);
        assert_eq!(r.kind, exit_kind::ERROR, "CPU {cpu}: {msg}");
        assert!(msg.contains("the host slept"), "{msg}");
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
