//! The session layer (`core::session`) itself, with the run loop (`vmx::hw::run`) unchanged, on
//! real threads: its CPUs are the SDM model behind a model of VMX operation
//! (`smudge_tests::session_model`). The oracle is the model: every guest write the model
//! completed, in a global order with the harvests; and the SDM rules of VMCS handling the model
//! checks (a VMCS active on one CPU at a time, VMLAUNCH/VMRESUME by launch state).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use smudge_core::abi::{self, exit_kind, Op, Wire};
use smudge_core::session::{Driver, Fail, Session};
use smudge_tests::session_model::{self, MockOs, Step};

const MIB: u64 = 1 << 20;
/// Guest RAM of the tests (the top 1 MiB is smudge's, below it the guests write).
const MEM: u64 = 16 * MIB;
const PAGES: u64 = MEM / 4096;

/// A machine of `ncpus` model CPUs with the Bochs skylake_x capabilities (VMX, EPT A/D, PML),
/// and what the driver would find on it.
fn machine<const W: bool>(ncpus: usize) -> (Driver, MockOs<W>) {
    smudge_tests::session_model::skylake(ncpus)
}

/// A user of one session, as a shim would pass requests to it.
struct Client<'a, const W: bool> {
    s: &'a Session<MockOs<W>>,
    os: &'a MockOs<W>,
    d: &'a Driver,
}

impl<const W: bool> Client<'_, W> {
    fn call(&self, op: Op, req: &dyn Fn(&mut [u8])) -> Result<Vec<u8>, Fail> {
        let mut buf = vec![0u8; op.buffer_size()];
        req(&mut buf);
        // In place at a user address, as the Linux shim passes an ioctl's argument.
        let n = self
            .s
            .user_request(self.os, self.d, op, buf.as_mut_ptr() as u64)?;
        buf.truncate(n);
        Ok(buf)
    }
    fn wire<T: Wire>(&self, op: Op, r: &T) -> Result<Vec<u8>, Fail> {
        self.call(op, &|b| {
            r.to_bytes(b).expect("request fits");
        })
    }
    fn version_only(&self, op: Op) -> Result<Vec<u8>, Fail> {
        self.call(op, &|b| b[..4].copy_from_slice(&abi::VERSION.to_le_bytes()))
    }
    fn setup(&self, mode: u32, vcpus: u32) -> Result<(), Fail> {
        let r = abi::SetupReq {
            version: abi::VERSION,
            mode,
            mem_bytes: MEM,
            vcpus,
            page_limit: 0,
        };
        self.wire(Op::Setup, &r).map(|_| ())
    }
    fn vcpu_req(&self, op: Op, vcpu: u32) -> Result<Vec<u8>, Fail> {
        let r = abi::VcpuReq {
            version: abi::VERSION,
            vcpu,
        };
        self.wire(op, &r)
    }
    fn run(&self, vcpu: u32) -> Result<abi::RunResp, Fail> {
        let b = self.vcpu_req(Op::Run, vcpu)?;
        Ok(abi::RunResp::from_bytes(&b).expect("RunResp"))
    }
    fn dirty_log(&self, harvest: bool) -> Result<Vec<u64>, Fail> {
        let mut bits = vec![0u64; (PAGES / 64) as usize];
        let r = abi::DirtyLogReq {
            version: abi::VERSION,
            slot: 0,
            bitmap: bits.as_mut_ptr() as u64,
            bitmap_len: PAGES / 8,
        };
        let op = if harvest {
            Op::HarvestDirtyLog
        } else {
            Op::GetDirtyLog
        };
        self.wire(op, &r)?;
        Ok(bits)
    }
    fn stats(&self) -> Result<abi::StatsResp, Fail> {
        let b = self.version_only(Op::Stats)?;
        Ok(abi::StatsResp::from_bytes(&b).expect("StatsResp"))
    }
}

fn gfns(bits: &[u64]) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for (i, w) in bits.iter().enumerate() {
        for b in 0..64 {
            if w & (1 << b) != 0 {
                s.insert(i as u64 * 64 + b);
            }
        }
    }
    s
}

/// xorshift64*: reproducible scripts without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// vCPU `i`'s script: `n` writes to random pages of its own 2048-page half below 8 MiB and a
/// shared 16-page window (both vCPUs write those), with checkpoints, then exit 0.
fn script(rng: &mut Rng, i: u32, n: usize) -> Vec<Step> {
    let mut v = Vec::new();
    for k in 0..n {
        let gfn = if rng.next().is_multiple_of(8) {
            0x7f0 + rng.next() % 16
        } else {
            0x100 + u64::from(i) * 0x380 + rng.next() % 0x380
        };
        v.push(Step::Write(gfn * 4096 + rng.next() % 4096));
        if k % 200 == 199 {
            v.push(Step::Checkpoint);
        }
    }
    v.push(Step::Exit(0));
    v
}

/// RUNs vCPU `i` until its guest exits; returns the RUN calls it took. A RUN that finds the
/// vCPU held by another thread's GET_REGS gets Busy, as the protocol says, and is tried again.
/// `at_checkpoint` runs at each checkpoint, between RUNs.
fn run_to_exit<const W: bool>(c: &Client<'_, W>, i: u32, at_checkpoint: &dyn Fn()) -> u64 {
    let mut calls = 0;
    loop {
        calls += 1;
        let r = match c.run(i) {
            Err(Fail::Busy) => {
                thread::yield_now();
                continue;
            }
            r => r.expect("RUN"),
        };
        match r.kind {
            exit_kind::EXIT => {
                assert_eq!(r.code, 0);
                return calls;
            }
            exit_kind::CHECKPOINT => at_checkpoint(),
            exit_kind::INTERRUPTED | exit_kind::CONSOLE => {}
            k => panic!(
                "vCPU {i}: exit kind {k}: {}",
                String::from_utf8_lossy(&r.message)
            ),
        }
    }
}

/// Two vCPUs write while the main thread harvests, reads registers and statistics; then the
/// model's record of every write is held against the harvests.
fn writers_and_harvests<const W: bool>(mode: u32, seed: u64) {
    let (d, os) = machine::<W>(3);
    let mut session = Session::new();
    let c = Client {
        s: &session,
        os: &os,
        d: &d,
    };
    c.setup(mode, 2).expect("SETUP");
    let mut rng = Rng(seed);
    let scripts: Vec<Vec<Step>> = (0..2).map(|i| script(&mut rng, i, 3000)).collect();
    let allowed: BTreeSet<u64> = scripts
        .iter()
        .flatten()
        .filter_map(|s| match s {
            Step::Write(g) | Step::WriteForever(g) => Some(g >> 12),
            _ => None,
        })
        .collect();
    for (i, s) in scripts.into_iter().enumerate() {
        os.m.program(i as u32, s);
    }
    // (start, end, pages) of each harvest, in the model's global order.
    let mut harvests: Vec<(u64, u64, BTreeSet<u64>)> = Vec::new();

    let deadline = Instant::now() + Duration::from_secs(60);
    // Harvests done so far: at each checkpoint a vCPU waits for the next one, so the harvests
    // interleave with the writes however fast the vCPUs run (the other vCPU keeps writing).
    let harvested = AtomicU64::new(0);
    thread::scope(|sc| {
        let (sr, osr, dr, hv) = (&session, &os, &d, &harvested);
        let runners: Vec<_> = (0..2)
            .map(|i| {
                sc.spawn(move || {
                    osr.migrate_to(i);
                    let next_harvest = || {
                        let seen = hv.load(Ordering::SeqCst);
                        while hv.load(Ordering::SeqCst) == seen && Instant::now() < deadline {
                            thread::yield_now();
                        }
                    };
                    run_to_exit(
                        &Client {
                            s: sr,
                            os: osr,
                            d: dr,
                        },
                        i,
                        &next_harvest,
                    )
                })
            })
            .collect();
        while runners.iter().any(|r| !r.is_finished()) {
            assert!(Instant::now() < deadline, "no progress: a deadlock?");
            let start = os.m.tick();
            let bits = c.dirty_log(true).expect("harvest");
            let end = os.m.tick();
            harvests.push((start, end, gfns(&bits)));
            harvested.fetch_add(1, Ordering::SeqCst);
            // A vCPU inside RUN is not available to GET_REGS.
            match c.vcpu_req(Op::GetRegs, rng.next() as u32 % 2) {
                Err(Fail::Busy) | Ok(_) => {}
                Err(e) => panic!("GET_REGS: {e:?}"),
            }
            let s = c.stats().expect("STATS");
            assert_eq!(s.vcpus, 2);
            os.migrate_to(rng.next() as u32);
            thread::yield_now();
        }
        for r in runners {
            r.join().expect("runner");
        }
    });
    let start = os.m.tick();
    let bits = c.dirty_log(true).expect("final harvest");
    harvests.push((start, os.m.tick(), gfns(&bits)));
    // Registers after the exit: RIP past the last VMCALL, RAX = 0 (the exit hypercall).
    let regs = abi::Regs::from_bytes(&c.vcpu_req(Op::GetRegs, 0).expect("GET_REGS")).expect("Regs");
    assert_eq!(regs.rax, 0);

    let writes = os.m.writes();
    assert_eq!(writes.len(), 6000, "every scripted write completed");
    let mut lost = Vec::new();
    for w in &writes {
        // The first harvest that began after the write, or one before it that ended after the
        // write (its scan may have come after it), reports the page. A write whose dirty flag
        // a stale translation swallowed is in no harvest after it.
        let first_after = harvests
            .iter()
            .position(|h| h.0 > w.seq)
            .unwrap_or(harvests.len());
        let seen = harvests
            .iter()
            .take(first_after + 1)
            .any(|(_, e, pages)| *e > w.seq && pages.contains(&w.gfn));
        if !seen {
            lost.push(*w);
        }
    }
    let reported: BTreeSet<u64> = harvests.iter().flat_map(|h| h.2.iter().copied()).collect();
    let foreign: Vec<u64> = reported.difference(&allowed).copied().collect();
    let violations = os.m.violations();
    let (entries, migrations) = os.m.entries();
    let iso = c.stats().expect("STATS").isolation;
    let [flushes, verws, ibpbs] = os.m.barriers();
    session.release(&os);
    assert!(violations.is_empty(), "SDM rules broken: {violations:?}");
    assert!(
        lost.is_empty(),
        "mode {mode}: {} writes lost, first {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(foreign.is_empty(), "pages no guest wrote: {foreign:x?}");
    assert!(harvests.len() > 2, "harvests ran while the vCPUs did");
    assert!(entries > 100, "{entries} VM entries");
    if !W {
        assert!(migrations > 0, "Linux policy: VMCSs moved between CPUs");
    }
    // Every entry had its barriers (the model records any without as a violation above), and
    // STATS counts what the processor saw.
    assert_eq!(
        (iso.entries, iso.l1d_flushes, iso.verws),
        (entries, flushes, verws)
    );
    assert_eq!((flushes, verws), (entries, entries));
    assert_eq!(iso.ibpbs, ibpbs);
    assert!(ibpbs > 0, "two vCPUs shared CPUs: IBPBs on the switches");
    assert_eq!((iso.probes, iso.host_changed), (entries, 0));

    os.p.assert_all_freed();
}

#[test]
fn linux_policy_no_write_lost_in_any_mode() {
    for (mode, seed) in [(1, 0x1234_5678), (2, 0x9abc_def0), (3, 0x0fed_cba9)] {
        writers_and_harvests::<false>(mode, seed);
    }
}

#[test]
fn windows_policy_no_write_lost_in_any_mode() {
    for (mode, seed) in [(1, 0x5555_1234), (2, 0x7777_4321), (3, 0x3333_abcd)] {
        writers_and_harvests::<true>(mode, seed);
    }
}

/// Every request in every state: before SETUP, idle, while a vCPU runs, after the guest's exit,
/// after an allocation failure.
#[test]
fn every_request_in_every_state() {
    let (d, os) = machine::<false>(2);
    let mut session = Session::new();
    let c = Client {
        s: &session,
        os: &os,
        d: &d,
    };
    // Before SETUP: only SETUP, STATS and CAPS make sense.
    assert_eq!(c.run(0).err(), Some(Fail::Invalid));
    assert_eq!(c.dirty_log(true).err(), Some(Fail::Invalid));
    assert_eq!(c.vcpu_req(Op::GetRegs, 0).err(), Some(Fail::Invalid));
    assert_eq!(c.stats().expect("STATS").vcpus, 0);
    assert!(c.version_only(Op::Caps).is_ok());
    assert_eq!(
        c.wire(
            Op::CreateVcpu,
            &abi::CreateVcpuReq {
                version: abi::VERSION,
                reserved: 0
            }
        )
        .err(),
        Some(Fail::Invalid)
    );
    c.setup(2, 1).expect("SETUP");
    assert_eq!(c.setup(2, 1).err(), Some(Fail::Busy), "SETUP twice");
    // Idle.
    assert!(c.vcpu_req(Op::GetRegs, 0).is_ok());
    assert_eq!(
        c.vcpu_req(Op::GetRegs, 1).err(),
        Some(Fail::Invalid),
        "no such vCPU"
    );
    let created = c
        .wire(
            Op::CreateVcpu,
            &abi::CreateVcpuReq {
                version: abi::VERSION,
                reserved: 0,
            },
        )
        .expect("CREATE_VCPU");
    assert_eq!(
        abi::CreateVcpuResp::from_bytes(&created)
            .expect("resp")
            .vcpu,
        1
    );
    // A bad user pointer.
    let r = abi::DirtyLogReq {
        version: abi::VERSION,
        slot: 0,
        bitmap: 8,
        bitmap_len: PAGES / 8,
    };
    assert_eq!(c.wire(Op::HarvestDirtyLog, &r).err(), Some(Fail::Fault));
    // An allocation failure, then the same request works.
    session_model::fail_allocs(1);
    assert_eq!(c.dirty_log(true).err(), Some(Fail::NoMemory));
    assert!(c.dirty_log(true).is_ok());
    // While vCPU 0 runs an endless writer: VM-level requests kick it and proceed; its own
    // RUN and registers are busy; the mode is fixed.
    os.m.program(0, vec![Step::WriteForever(0x20_0000)]);
    thread::scope(|sc| {
        let runner = sc.spawn(|| {
            let c = Client {
                s: &session,
                os: &os,
                d: &d,
            };
            c.run(0)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while os.m.entries().0 == 0 {
            assert!(
                !runner.is_finished() && Instant::now() < deadline,
                "vCPU 0 never entered"
            );
            thread::yield_now();
        }
        assert_eq!(
            c.run(0).err(),
            Some(Fail::Busy),
            "a second RUN of the same vCPU"
        );
        assert_eq!(c.vcpu_req(Op::GetRegs, 0).err(), Some(Fail::Busy));
        for _ in 0..20 {
            let before = os.m.entries().0;
            let bits = c.dirty_log(true).expect("harvest while running");
            assert!(gfns(&bits).iter().all(|&g| g == 0x200));
            // The kick ends with the request: the vCPU enters again.
            let deadline = Instant::now() + Duration::from_secs(10);
            while os.m.entries().0 == before {
                assert!(Instant::now() < deadline, "the vCPU never went on");
                thread::yield_now();
            }
        }
        assert_eq!(
            c.wire(
                Op::SetMode,
                &abi::SetModeReq {
                    version: abi::VERSION,
                    mode: 1
                }
            )
            .err(),
            Some(Fail::Busy),
            "mode change after the first RUN"
        );
        // vCPU 1 runs at the same time as vCPU 0.
        os.m.program(1, vec![Step::Write(0x30_0000), Step::Exit(7)]);
        let r1 = c.run(1).expect("RUN of the other vCPU");
        assert_eq!((r1.kind, r1.code), (exit_kind::EXIT, 7));
        // A signal ends the RUN (Linux: only a signal or a real exit return).
        os.signal.store(true, Ordering::SeqCst);
        let r0 = runner.join().expect("runner").expect("RUN");
        assert_eq!(
            r0.kind,
            exit_kind::INTERRUPTED,
            "{r0:?} {}",
            String::from_utf8_lossy(&r0.message)
        );
        os.signal.store(false, Ordering::SeqCst);
    });
    // After the exit: vCPU 1 is halted and says so again.
    let r = c.run(1).expect("RUN after exit");
    assert_eq!(r.kind, exit_kind::HLT);
    let s = c.stats().expect("STATS");
    assert_eq!(s.vcpus, 2);
    assert!(s.vm_pages > 0);
    assert!(os.m.violations().is_empty(), "{:?}", os.m.violations());
    session.release(&os);
    os.p.assert_all_freed();
}

/// A kick racing a vCPU that enters the loop: thousands of short RUNs against harvests, and
/// neither side waits forever nor overlaps the other.
#[test]
fn kicks_race_entries_without_deadlock() {
    let (d, os) = machine::<true>(2);
    let mut session = Session::new();
    let c = Client {
        s: &session,
        os: &os,
        d: &d,
    };
    c.setup(0, 2).expect("SETUP");
    let mut steps = Vec::new();
    for k in 0..2000u64 {
        steps.push(Step::Write(0x40_0000 + (k % 64) * 4096));
        steps.push(Step::Checkpoint);
    }
    steps.push(Step::Exit(0));
    os.m.program(0, steps.clone());
    os.m.program(
        1,
        steps
            .into_iter()
            .map(|s| match s {
                Step::Write(g) => Step::Write(g + 0x10_0000),
                s => s,
            })
            .collect(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut per_page: BTreeMap<u64, u32> = BTreeMap::new();
    thread::scope(|sc| {
        let runners: Vec<_> = (0..2)
            .map(|i| {
                let (s, os, d) = (&session, &os, &d);
                sc.spawn(move || run_to_exit(&Client { s, os, d }, i, &|| {}))
            })
            .collect();
        while runners.iter().any(|r| !r.is_finished()) {
            assert!(Instant::now() < deadline, "no progress: a deadlock?");
            for g in gfns(&c.dirty_log(true).expect("harvest")) {
                *per_page.entry(g).or_default() += 1;
            }
        }
        let calls: u64 = runners.into_iter().map(|r| r.join().expect("runner")).sum();
        assert!(
            calls >= 4000,
            "every checkpoint returned to user space ({calls} RUNs)"
        );
    });
    for g in gfns(&c.dirty_log(true).expect("harvest")) {
        *per_page.entry(g).or_default() += 1;
    }
    assert_eq!(per_page.len(), 128, "both vCPUs' 64 pages each");
    assert!(os.m.violations().is_empty(), "{:?}", os.m.violations());
    session.release(&os);
    os.p.assert_all_freed();
}

/// The model catches a loop that skips the barriers: a driver that decided on none, on a
/// machine whose entries need them all.
#[test]
fn entries_without_barriers_are_caught() {
    let (mut d, os) = machine::<false>(2);
    d.duties = smudge_core::spec::Duties::NONE;
    let mut session = Session::new();
    let c = Client {
        s: &session,
        os: &os,
        d: &d,
    };
    c.setup(0, 2).expect("SETUP");
    for i in 0..2 {
        // Both on CPU 0: the second is a switch between VMCSs there.
        os.migrate_to(0);
        os.m.program(i, vec![Step::Write(0x20_0000), Step::Exit(0)]);
        assert_eq!(c.run(i).expect("RUN").kind, exit_kind::EXIT);
    }
    let v = os.m.violations();
    for what in ["an L1D flush", "a VERW", "an IBPB"] {
        assert!(v.iter().any(|m| m.contains(what)), "{what}: {v:?}");
    }
    assert_eq!(os.m.barriers(), [0, 0, 0]);
    session.release(&os);
    os.p.assert_all_freed();
}

/// The run loop refuses to enter a guest whose EPT still owes an INVEPT: every obligation is
/// paid by the request that made it (`ept::Invept`), so one left over is a smudge bug, and
/// entering would let the CPUs use stale translations (SDM 29.4.3.4). Driven below the session
/// layer, where a caller can drop an obligation; paid, the same vCPU runs.
#[test]
fn no_entry_while_an_invept_is_owed() {
    use smudge_core::dirty::Mode;
    use smudge_core::session::Os;
    use smudge_core::vcpu::VcpuPages;
    use smudge_core::vm::Vm;
    use smudge_core::vmx::hw::{self, HwError, HwExit, HwVcpu, RunEnv, SharedVm};
    use std::sync::Mutex;

    struct Shared(Mutex<Vm>);
    impl SharedVm for Shared {
        fn with<R, F: FnOnce(&mut Vm) -> R>(&self, f: F) -> Option<R> {
            Some(f(&mut self.0.lock().unwrap()))
        }
    }
    struct Env<'a>(&'a MockOs<false>, &'a Driver);
    impl RunEnv for Env<'_> {
        fn irq_save(&self) -> usize {
            0
        }
        fn irq_restore(&self, _: usize) {}
        fn should_return(&self) -> bool {
            false
        }
        fn vmclear_on(&self, cpu: u32, pages: &VcpuPages) {
            self.0.vmclear_on(cpu, pages)
        }
        fn duties(&self) -> smudge_core::spec::Duties {
            self.1.duties
        }
        fn probe(&self) -> bool {
            false
        }
    }

    let (d, os) = machine::<false>(1);
    let (mode, ctls) =
        smudge_core::answer::mode_controls(&d.caps, d.mode, Some(Mode::AdScan)).expect("A/D mode");
    let mut vm = Vm::new(&os, d.caps.ept_features(), mode, PAGES).expect("vm");
    vm.add_ram(&os, MEM).expect("ram");
    let (rip, rsp) = smudge_core::answer::vcpu_entry(&vm, 0).expect("entry");
    let mut hw = HwVcpu::new(0, VcpuPages::alloc(&os, &d.caps).expect("pages"), rip, rsp);
    // A harvest owes INVEPT; this caller drops the obligation.
    let mut bits = vec![0u64; PAGES.div_ceil(64) as usize];
    drop(vm.harvest(&os, 0, &mut bits).expect("harvest"));
    let shared = Shared(Mutex::new(vm));
    let env = Env(&os, &d);
    os.m.program(0, vec![Step::Write(0x20_0000), Step::Exit(0)]);
    // As the session does: the page cache filled before each stay, again when it ran dry.
    let run = |hw: &mut HwVcpu| loop {
        hw.cache.refill(&os);
        let r = os
            .with_guest_context(|cpu| hw::run(&shared, hw, &os, &d.caps, &ctls, &env, cpu))
            .expect("guest context");
        if !matches!(r, Ok(HwExit::NeedPages)) {
            break r;
        }
    };
    match run(&mut hw) {
        Err(HwError::Vmx { step, .. }) => assert!(step.contains("INVEPT"), "{step}"),
        other => panic!("entered with an INVEPT owed: {other:?}"),
    }
    assert_eq!(os.m.entries().0, 0, "no entry was made");
    assert!(os.m.writes().is_empty(), "the guest did not run");
    // Paid (the failure path's way: what the EPT still owes), the vCPU runs to its exit.
    {
        let mut vm = shared.0.lock().unwrap();
        let owed = vm.ept().owed();
        let paid = vm.ept_mut().pay(&os, owed, || {
            os.invept_everywhere();
            Ok::<(), ()>(())
        });
        assert_eq!(paid, Ok(()));
    }
    assert!(matches!(run(&mut hw), Ok(HwExit::Exit(_))));
    assert_eq!(os.m.writes().len(), 1, "the guest's write");
    if let Some(cpu) = hw.cpu.take() {
        os.vmclear_on(cpu, &hw.pages);
    }
    hw.free_pages(&os);
    os.invept_everywhere();
    shared.0.into_inner().unwrap().destroy(&os);
    os.p.assert_all_freed();
}
