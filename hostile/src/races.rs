//! Races: RUN on some threads while others close the descriptor, harvest, explain, clear, load
//! or set up the same VM; two RUNs of one vCPU; SETUP from two threads; and many open/close
//! cycles. The driver's rules: one RUN per vCPU (the other gets EBUSY), VM-level requests kick
//! the vCPUs out and wait for them, and release happens after the last ioctl returns.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use smudge_core::abi::exit_kind;

use crate::sys::{self, interrupt_until_done, wait_for, Mem, Target};
use crate::tally::Tally;
use crate::vm::{describe, Vm};

use libc::{EBADF, EBUSY};

/// Guest RAM of the race VMs.
const MEM: u64 = 64 << 20;

/// How a RUN thread ended.
#[derive(Default)]
struct RunThread {
    target: Target,
    /// The errno that ended it (0: it stopped on request).
    errno: AtomicI32,
    /// Exit kind of the record that ended it, when no errno did.
    kind: AtomicI32,
    /// RUN calls made.
    runs: AtomicU64,
    /// RUN calls refused with EBUSY.
    busy: AtomicU64,
}

/// Runs `vcpu` until an errno (other than EBUSY when `tolerate_busy`), a final exit kind, or
/// `stop` (checked after each INTERRUPTED).
fn spawn_runner(
    vm: Arc<Vm>,
    vcpu: u32,
    stop: Arc<AtomicBool>,
    tolerate_busy: bool,
) -> Arc<RunThread> {
    let st = Arc::new(RunThread::default());
    let s = st.clone();
    thread::spawn(move || {
        s.target.register();
        loop {
            s.runs.fetch_add(1, Ordering::Relaxed);
            match vm.run(vcpu) {
                Ok(r)
                    if matches!(
                        r.kind,
                        exit_kind::CONSOLE | exit_kind::INTERRUPTED | exit_kind::CHECKPOINT
                    ) =>
                {
                    if stop.load(Ordering::Acquire) {
                        s.kind.store(r.kind as i32, Ordering::Release);
                        break;
                    }
                }
                Ok(r) => {
                    s.kind.store(r.kind as i32, Ordering::Release);
                    break;
                }
                Err(e) if e == EBUSY && tolerate_busy => {
                    s.busy.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    thread::yield_now();
                }
                Err(e) => {
                    s.errno.store(e, Ordering::Release);
                    break;
                }
            }
        }
        s.target.finish();
    });
    st
}

fn vm_with(image: &[u8], vcpus: u32) -> Result<Arc<Vm>, i32> {
    let vm = Vm::open()?;
    vm.setup(MEM, vcpus, 0, 0)?;
    vm.load(image)?;
    Ok(Arc::new(vm))
}

/// RUN threads while the main thread sends VM-level requests to the same VM over and over.
pub fn requests_while_running(t: &mut Tally, churn: &[u8]) {
    const ROUNDS: u32 = 60;
    let vm = match vm_with(churn, 2) {
        Ok(v) => v,
        Err(e) => return t.errno("race-requests-setup", Err(e), 0),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let runners: Vec<_> = (0..2)
        .map(|i| spawn_runner(vm.clone(), i, stop.clone(), false))
        .collect();
    wait_for(30, || {
        runners.iter().all(|r| r.runs.load(Ordering::Relaxed) > 0)
    });
    let mut bitmap = vec![0u64; (MEM / 4096 / 64) as usize];
    let mask = vec![u64::MAX; bitmap.len()];
    let page = Mem::new(1);
    let (mut errors, mut dirty, mut ops) = (Vec::new(), 0u64, 0u32);
    let mut note = |what: &str, r: Result<(), i32>, want: i32| {
        ops += 1;
        let got = r.err().unwrap_or(0);
        if got != want {
            errors.push(format!("{what}: {}", sys::errno_name(got)));
        }
    };
    for i in 0..ROUNDS {
        let r = vm.dirty_log(true, &mut bitmap);
        dirty += bitmap
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum::<u64>();
        note("harvest", r, 0);
        note("get", vm.dirty_log(false, &mut bitmap), 0);
        note("clear", vm.clear(0, 0, MEM / 4096, mask.as_ptr() as u64), 0);
        note(
            "explain",
            vm.explain(0x80_0000 + u64::from(i) * 4096).map(|_| ()),
            0,
        );
        note("stats", vm.stats().map(|_| ()), 0);
        note("read-guest", vm.mem(false, 0x80_0000, page.addr(), 4096), 0);
        note("write-guest", vm.mem(true, 0x20_0000, page.addr(), 4096), 0);
        note("setup", vm.setup(MEM, 2, 0, 0), EBUSY);
        if i % 10 == 0 {
            note("load-elf", vm.load(churn).map(|_| ()), 0);
        }
        // A read-only mapping of all guest RAM while the guest writes it.
        let m = sys::mmap_dev(vm.fd, MEM as usize, libc::PROT_READ, libc::MAP_SHARED, 0);
        if let Ok(a) = m {
            sys::munmap(a, MEM as usize);
        }
        note("mmap", m.map(|_| ()), 0);
    }
    stop.store(true, Ordering::Release);
    let targets: Vec<&Target> = runners.iter().map(|r| &r.target).collect();
    let finished = interrupt_until_done(&targets, 30);
    t.check(
        "race-vm-requests-while-2-vcpus-run",
        errors.is_empty() && dirty > 0,
        &format!(
            "{ops} requests while both vCPUs ran, errors {errors:?}, {dirty} dirty pages harvested"
        ),
    );
    let kinds: Vec<String> = runners
        .iter()
        .map(|r| {
            format!(
                "kind {} errno {}",
                r.kind.load(Ordering::Acquire),
                r.errno.load(Ordering::Acquire)
            )
        })
        .collect();
    t.check(
        "race-vcpus-leave-on-signal",
        finished
            && runners.iter().all(|r| {
                r.errno.load(Ordering::Acquire) == 0
                    && r.kind.load(Ordering::Acquire) == exit_kind::INTERRUPTED as i32
            }),
        &format!("RUN threads returned INTERRUPTED: {kinds:?}"),
    );
}

/// Two threads RUN the same vCPU for a while: at most one is inside, the other gets EBUSY.
pub fn same_vcpu_twice(t: &mut Tally, spin: &[u8]) {
    let vm = match vm_with(spin, 1) {
        Ok(v) => v,
        Err(e) => return t.errno("race-same-vcpu-setup", Err(e), 0),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let a = spawn_runner(vm.clone(), 0, stop.clone(), true);
    wait_for(30, || a.runs.load(Ordering::Relaxed) > 0);
    let b = spawn_runner(vm.clone(), 0, stop.clone(), true);
    // B tries 1000 times while A runs the guest; both are interrupted now and then, so that
    // each RUN returns and is issued again and either may win the vCPU.
    let mut polls = 0u32;
    wait_for(60, || {
        polls += 1;
        if polls.is_multiple_of(500) {
            a.target.interrupt();
            b.target.interrupt();
        }
        b.runs.load(Ordering::Relaxed) >= 1000
    });
    stop.store(true, Ordering::Release);
    let finished = interrupt_until_done(&[&a.target, &b.target], 30);
    let busy = a.busy.load(Ordering::Relaxed) + b.busy.load(Ordering::Relaxed);
    let runs = a.runs.load(Ordering::Relaxed) + b.runs.load(Ordering::Relaxed);
    let errs = [
        a.errno.load(Ordering::Acquire),
        b.errno.load(Ordering::Acquire),
    ];
    t.check(
        "race-same-vcpu-two-threads",
        finished && busy > 0 && errs == [0, 0],
        &format!("{runs} RUN calls, {busy} refused with EBUSY, other errors {errs:?}"),
    );
    drop(vm);
}

/// SETUP from two threads at once on one descriptor: exactly one succeeds, the other gets
/// EBUSY.
pub fn concurrent_setup(t: &mut Tally) {
    const REPS: u32 = 20;
    let mut bad = Vec::new();
    for rep in 0..REPS {
        let vm = match Vm::open() {
            Ok(v) => Arc::new(v),
            Err(e) => return t.errno("race-setup-open", Err(e), 0),
        };
        let barrier = Arc::new(Barrier::new(2));
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let (vm, barrier) = (vm.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    vm.setup(8 << 20, 2, 0, 0).err().unwrap_or(0)
                })
            })
            .collect();
        let mut res: Vec<i32> = hs.into_iter().map(|h| h.join().unwrap_or(-1)).collect();
        res.sort();
        if res != [0, EBUSY] {
            bad.push(format!("rep {rep}: {res:?}"));
        }
    }
    t.check(
        "race-setup-from-two-threads",
        bad.is_empty(),
        &format!("{REPS} rounds, each one success and one EBUSY; bad {bad:?}"),
    );
}

/// The descriptor is closed while RUN threads and a harvest thread use it. Release must wait for
/// them; afterwards each gets EBADF and every page is freed.
pub fn close_while_running(t: &mut Tally, churn: &[u8], spin: &[u8]) {
    for (label, image) in [("churn", churn), ("spin", spin)] {
        let vm = match vm_with(image, 2) {
            Ok(v) => v,
            Err(e) => return t.errno("race-close-setup", Err(e), 0),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let runners: Vec<_> = (0..2)
            .map(|i| spawn_runner(vm.clone(), i, stop.clone(), false))
            .collect();
        // A thread harvesting and explaining in a loop until its descriptor is gone.
        let h = Arc::new(RunThread::default());
        let (hv, hs) = (vm.clone(), h.clone());
        thread::spawn(move || {
            hs.target.register();
            let mut bm = vec![0u64; (MEM / 4096 / 64) as usize];
            loop {
                hs.runs.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = hv
                    .dirty_log(true, &mut bm)
                    .and_then(|_| hv.explain(0x80_0000).map(|_| ()))
                {
                    hs.errno.store(e, Ordering::Release);
                    break;
                }
            }
            hs.target.finish();
        });
        wait_for(30, || {
            runners.iter().all(|r| r.runs.load(Ordering::Relaxed) > 0)
                && h.runs.load(Ordering::Relaxed) >= 50
        });
        let closed = vm.close();
        // RUN returns on a signal; its next call finds the descriptor closed.
        let mut targets: Vec<&Target> = runners.iter().map(|r| &r.target).collect();
        targets.push(&h.target);
        let finished = interrupt_until_done(&targets, 30);
        let errs: Vec<i32> = runners
            .iter()
            .chain([&h])
            .map(|r| r.errno.load(Ordering::Acquire))
            .collect();
        t.check(
            &format!("race-close-while-running-{label}"),
            closed.is_ok() && finished && errs.iter().all(|&e| e == EBADF),
            &format!(
                "2 RUN threads and a harvest thread ({} harvests) ended with {:?}",
                h.runs.load(Ordering::Relaxed),
                errs.iter().map(|&e| sys::errno_name(e)).collect::<Vec<_>>()
            ),
        );
        drop(vm);
        crate::expect_no_pages(t, &format!("race-close-while-running-{label}-pages-freed"));
    }
}

/// Many open/close cycles, bare and with a VM, from two threads at once; then a guest run per
/// cycle. Every page must come back.
pub fn open_close_cycles(t: &mut Tally, hello: &[u8]) {
    let hs: Vec<_> = (0..2)
        .map(|k| {
            thread::spawn(move || {
                let mut errs = Vec::new();
                for i in 0..1000 {
                    match Vm::open() {
                        Ok(vm) => {
                            if i % 10 == k {
                                if let Err(e) = vm.setup(4 << 20, 8, 0, 0) {
                                    errs.push(e);
                                }
                            }
                        }
                        Err(e) => errs.push(e),
                    }
                }
                errs
            })
        })
        .collect();
    let errs: Vec<i32> = hs
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_else(|_| vec![-1]))
        .collect();
    t.check(
        "open-close-2x1000-with-200-setups",
        errs.is_empty(),
        &format!("2 threads x 1000 opens (1 in 10 with an 8-vCPU SETUP), errors {errs:?}"),
    );
    crate::expect_no_pages(t, "open-close-pages-freed");
    let mut bad = Vec::new();
    for i in 0..20 {
        let r = Vm::open().and_then(|vm| {
            vm.setup(4 << 20, 1, 0, 0)?;
            vm.load(hello)?;
            vm.run_to_end(0, 4 << 20)
        });
        match r {
            Ok((resp, console))
                if resp.kind == exit_kind::EXIT && resp.code == 0 && console.contains("hello") => {}
            Ok((resp, _)) => bad.push(format!("{i}: {}", describe(&resp))),
            Err(e) => bad.push(format!("{i}: {}", sys::errno_name(e))),
        }
    }
    t.check(
        "open-run-close-20-times",
        bad.is_empty(),
        &format!("20 VMs ran hello to exit code 0; bad {bad:?}"),
    );
    crate::expect_no_pages(t, "open-run-close-pages-freed");
}
