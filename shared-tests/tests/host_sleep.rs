//! A CPU that leaves VMX operation (a host sleep: `session::load::suspend`; a CPU taken offline:
//! `cpu_offline`) VMCLEARs the VMCSs active on it first (`vmx::active`), so their vCPUs run on,
//! there or elsewhere, with VMLAUNCH (the launch state is clear, SDM 25.11.3). One that lost VMX
//! operation without those VMCLEARs lost its VMCSs' data: their vCPUs stop with an error that
//! says so, on any CPU, and the model CPU (which refuses a VMPTRLD of a lost VMCS) shows that
//! none is made current again. A VM made after runs.
use smudge_core::abi::{self, exit_kind, Op, Wire};
use smudge_core::session::{Driver, Session};
use smudge_tests::session_model::{MockOs, Step};

/// SETUP with one vCPU.
fn setup(s: &Session<MockOs<true>>, os: &MockOs<true>, d: &Driver) {
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
}

/// With `steps`: SETUP and the model guest `steps` for vCPU 0. Then RUN of vCPU 0.
fn run(
    s: &Session<MockOs<true>>,
    os: &MockOs<true>,
    d: &Driver,
    steps: Option<Vec<Step>>,
) -> abi::RunResp {
    if let Some(steps) = steps {
        setup(s, os, d);
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
fn vcpus_run_on_after_their_cpus_left_vmx_operation_and_stop_where_it_was_lost() {
    let (d, os) = smudge_tests::session_model::skylake::<true>(2);
    // Windows' personality: a RUN stays on the CPU it starts on, so each VMCS is where the
    // test put it.
    let steps = vec![
        Step::Write(0x20_0000),
        Step::Checkpoint,
        Step::Write(0x20_1000),
        Step::Checkpoint,
        Step::Exit(0),
    ];
    let (s, t) = (Session::new(), Session::new());
    // A vCPU on each CPU, each stopped at its first checkpoint with its VMCS active there.
    for (session, cpu) in [(&s, 0), (&t, 1)] {
        os.migrate_to(cpu);
        let r = run(session, &os, &d, Some(steps.clone()));
        assert_eq!(r.kind, exit_kind::CHECKPOINT, "CPU {cpu}");
    }
    // Both CPUs leave VMX operation as the driver does: one VMCLEAR each.
    assert_eq!((os.m.leave_vmx(0), os.m.leave_vmx(1)), (1, 1));
    // Both vCPUs run on from their checkpoint, on CPU 0: its own (VMRESUME would now fail with
    // VM-instruction error 5) and the other's (no cross-CPU VMCLEAR is owed to CPU 1).
    // (The model's scripts go by vCPU index: each vCPU 0 gets the rest of the script anew.)
    os.migrate_to(0);
    for session in [&s, &t] {
        os.m.program(0, steps[2..].to_vec());
        assert_eq!(run(session, &os, &d, None).kind, exit_kind::CHECKPOINT);
        assert_eq!(run(session, &os, &d, None).kind, exit_kind::EXIT);
    }
    assert!(os.m.violations().is_empty(), "{:?}", os.m.violations());

    // A CPU that loses VMX operation without the VMCLEARs: each vCPU stops, on that CPU and on
    // another, and stays stopped.
    let (u, w) = (Session::new(), Session::new());
    os.migrate_to(1);
    for session in [&u, &w] {
        assert_eq!(
            run(session, &os, &d, Some(steps.clone())).kind,
            exit_kind::CHECKPOINT
        );
    }
    assert_eq!(os.m.lose_vmx(1), 2);
    for (session, cpu) in [(&u, 1), (&w, 0)] {
        os.migrate_to(cpu);
        let r = run(session, &os, &d, None);
        let msg = String::from_utf8_lossy(&r.message);
        assert_eq!(r.kind, exit_kind::ERROR, "CPU {cpu}: {msg}");
        assert!(msg.contains("VMCS lost"), "{msg}");
        assert_eq!(run(session, &os, &d, None).kind, exit_kind::HLT);
    }
    assert!(os.m.violations().is_empty(), "{:?}", os.m.violations());
    let (mut s, mut t, mut u, mut w) = (s, t, u, w);
    for session in [&mut s, &mut t, &mut u, &mut w] {
        session.release(&os);
    }

    let mut v = Session::new();
    let steps = vec![Step::Write(0x20_0000), Step::Exit(0)];
    assert_eq!(run(&v, &os, &d, Some(steps)).kind, exit_kind::EXIT);
    v.release(&os);
    os.p.assert_all_freed();
}

/// More vCPUs on one CPU than its list of active VMCSs holds (`vmx::active::PER_CPU`): each
/// VMPTRLD past the limit VMCLEARs another VMCS there first, and that vCPU VMLAUNCHes again at
/// its next run (the model CPU fails a VMRESUME of a clear VMCS with VM-instruction error 5).
#[test]
fn a_cpu_makes_room_for_more_vcpus_than_it_lists() {
    use smudge_core::vmx::active::PER_CPU;
    let (d, os) = smudge_tests::session_model::skylake::<true>(2);
    let n = PER_CPU + 3;
    // The model's scripts go by vCPU index: every vCPU 0 takes its next two steps from one.
    let mut steps: Vec<Step> = (0..3 * n as u64)
        .flat_map(|i| [Step::Write(0x20_0000 + (i % 64) * 0x1000), Step::Checkpoint])
        .collect();
    steps.push(Step::Exit(0));
    os.migrate_to(0);
    let sessions: Vec<Session<MockOs<true>>> = (0..n).map(|_| Session::new()).collect();
    for (i, session) in sessions.iter().enumerate() {
        // The script once, for the first; the others share it.
        if i > 0 {
            setup(session, &os, &d);
        }
        let r = run(session, &os, &d, (i == 0).then(|| steps.clone()));
        assert_eq!(r.kind, exit_kind::CHECKPOINT, "vCPU of session {i}");
    }
    // Twice round: every vCPU was pushed out of the list by the later ones at least once.
    for round in 0..2 {
        for (i, session) in sessions.iter().enumerate() {
            let r = run(session, &os, &d, None);
            let msg = String::from_utf8_lossy(&r.message);
            assert_eq!(
                r.kind,
                exit_kind::CHECKPOINT,
                "round {round}, session {i}: {msg}"
            );
        }
    }
    assert!(os.m.violations().is_empty(), "{:?}", os.m.violations());
    for mut session in sessions {
        session.release(&os);
    }
    os.p.assert_all_freed();
}
