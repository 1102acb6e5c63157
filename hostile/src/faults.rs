//! Faults: the host page allocator failing at every point of SETUP, LOAD_ELF, WRITE_GUEST and
//! RUN (the module parameter `fail_alloc_after`), the per-VM page limit, and a vCPU run before
//! any image was loaded. Each must end with a clean error and give every page back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use smudge_core::abi::exit_kind;

use crate::sys::{self, FaultInjection, Mem, Target};
use crate::tally::Tally;
use crate::vm::{describe, message, Vm};

use libc::ENOMEM;

/// Allocation points tried at most per sweep.
const MAX_POINTS: i64 = 400;

/// Faults injected and survived (each a request or run that failed cleanly).
pub struct Survived(pub u32);

fn pages_ok() -> Result<(), String> {
    match sys::pages_held() {
        Some(0) => Ok(()),
        Some(n) => Err(format!("{n} pages held after close")),
        None => Err("pages_held unreadable".into()),
    }
}

/// SETUP with the n-th page allocation failing, for n = 0, 1, ... until SETUP succeeds.
fn sweep_setup(t: &mut Tally, s: &mut Survived, vcpus: u32) {
    let name = format!("fault-sweep-setup-{vcpus}-vcpus");
    let mut bad = Vec::new();
    let mut points = 0;
    for n in 0..MAX_POINTS {
        let vm = match Vm::open() {
            Ok(v) => v,
            Err(e) => return t.errno(&name, Err(e), 0),
        };
        let r = match FaultInjection::after(n) {
            Ok(_f) => vm.setup(8 << 20, vcpus, 0, 0),
            Err(e) => return t.fail(&name, &e),
        };
        drop(vm);
        if let Err(e) = pages_ok() {
            bad.push(format!("n={n}: {e}"));
        }
        match r {
            Ok(()) => {
                points = n;
                break;
            }
            Err(ENOMEM) => s.0 += 1,
            Err(e) => bad.push(format!("n={n}: {}", sys::errno_name(e))),
        }
    }
    t.check(&name, bad.is_empty() && points > 0, &format!("SETUP failed with ENOMEM at each of its {points} page allocations, then succeeded; pages back to 0 every time; bad {bad:?}"));
}

/// LOAD_ELF and WRITE_GUEST with the n-th allocation failing.
fn sweep_load(t: &mut Tally, s: &mut Survived, image: &[u8]) {
    let name = "fault-sweep-load-elf";
    let mut bad = Vec::new();
    let mut points = 0;
    for n in 0..MAX_POINTS {
        let vm = match Vm::open() {
            Ok(v) => v,
            Err(e) => return t.errno(name, Err(e), 0),
        };
        if let Err(e) = vm.setup(8 << 20, 1, 0, 0) {
            return t.errno(name, Err(e), 0);
        }
        let r = match FaultInjection::after(n) {
            Ok(_f) => vm.load(image),
            Err(e) => return t.fail(name, &e),
        };
        // The VM is still usable after a failed load: a load without injection works.
        let again = vm.load(image);
        drop(vm);
        if let Err(e) = pages_ok() {
            bad.push(format!("n={n}: {e}"));
        }
        if again.is_err() {
            bad.push(format!("n={n}: reload failed"));
        }
        match r {
            Ok(_) => {
                points = n;
                break;
            }
            Err(ENOMEM) => s.0 += 1,
            Err(e) => bad.push(format!("n={n}: {}", sys::errno_name(e))),
        }
    }
    t.check(name, bad.is_empty() && points > 0, &format!("LOAD_ELF failed with ENOMEM at each of its {points} page allocations, the VM stayed usable; bad {bad:?}"));

    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("fault-write-guest", Err(e), 0),
    };
    let buf = Mem::new(1);
    let r = vm
        .setup(8 << 20, 1, 0, 0)
        .and_then(|_| match FaultInjection::after(0) {
            Ok(_f) => vm.mem(true, 0x40_0000, buf.addr(), 64),
            Err(_) => Err(-1),
        });
    if r == Err(ENOMEM) {
        s.0 += 1;
    }
    t.errno("fault-write-guest-unbacked-page", r, ENOMEM);
}

/// RUN with the n-th allocation failing, for a guest that needs pages while it runs.
fn sweep_run(t: &mut Tally, s: &mut Survived, image: &[u8], label: &str, mode: u32) {
    let name = format!("fault-sweep-run-{label}");
    let mut bad = Vec::new();
    let mut points = 0;
    let mut seen = Vec::new();
    for n in 0..MAX_POINTS {
        let vm = match Vm::open() {
            Ok(v) => v,
            Err(e) => return t.errno(&name, Err(e), 0),
        };
        if let Err(e) = vm
            .setup(8 << 20, 1, mode, 0)
            .and_then(|_| vm.load(image).map(|_| ()))
        {
            return t.errno(&name, Err(e), 0);
        }
        let r = match FaultInjection::after(n) {
            Ok(_f) => vm.run_to_end(0, 8 << 20),
            Err(e) => return t.fail(&name, &e),
        };
        drop(vm);
        if let Err(e) = pages_ok() {
            bad.push(format!("n={n}: {e}"));
        }
        match r {
            Ok((resp, _)) if resp.kind == exit_kind::EXIT && resp.code == 0 => {
                points = n;
                break;
            }
            Ok((resp, _))
                if resp.kind == exit_kind::ERROR && message(&resp).contains("out of memory") =>
            {
                s.0 += 1;
                if seen.len() < 2 {
                    seen.push(describe(&resp));
                }
            }
            Ok((resp, _)) => bad.push(format!("n={n}: {}", describe(&resp))),
            // Refilling a vCPU's page cache before the entry may fail as a request error.
            Err(ENOMEM) => {
                s.0 += 1;
                if seen.len() < 2 {
                    seen.push("RUN failed with ENOMEM".into());
                }
            }
            Err(e) => bad.push(format!("n={n}: {}", sys::errno_name(e))),
        }
    }
    t.check(
        &name,
        bad.is_empty() && points > 0,
        &format!("the run stopped with an out-of-memory error or ENOMEM at each of its {points} page allocations, then exited 0; e.g. {seen:?}; bad {bad:?}"),
    );
}

/// The per-VM page limit stops a guest that touches all its RAM.
fn page_limit(t: &mut Tally, s: &mut Survived, hog: &[u8]) {
    const LIMIT: u32 = 600;
    let vm = match Vm::open() {
        Ok(v) => v,
        Err(e) => return t.errno("page-limit", Err(e), 0),
    };
    let r = vm
        .setup(64 << 20, 1, 0, LIMIT)
        .and_then(|_| vm.load(hog))
        .and_then(|_| vm.run_to_end(0, 64 << 20));
    let stats = vm.stats();
    match r {
        Ok((resp, console)) => {
            let held = stats.map(|s| s.vm_pages).unwrap_or(u64::MAX);
            let ok = resp.kind == exit_kind::ERROR
                && message(&resp).contains("page limit")
                && resp.reason == 48;
            if ok {
                s.0 += 1;
            }
            let progress = console
                .lines()
                .rfind(|l| l.contains(" pages"))
                .unwrap_or("")
                .to_string();
            t.check(
                "page-limit-600-stops-hog",
                ok,
                &format!("{} ({progress}; VM holds {held} pages)", describe(&resp)),
            );
        }
        Err(e) => t.errno("page-limit-600-stops-hog", Err(e), 0),
    }
    drop(vm);
    crate::expect_no_pages(t, "page-limit-pages-freed");
}

/// RUN before LOAD_ELF: the vCPU starts at RIP 0 in zeroed RAM. Whatever it executes, the run
/// must end (or be interruptible) without harm.
fn run_before_load(t: &mut Tally, s: &mut Survived) {
    let vm = match Vm::open() {
        Ok(v) => Arc::new(v),
        Err(e) => return t.errno("run-before-load-elf", Err(e), 0),
    };
    if let Err(e) = vm.setup(4 << 20, 1, 0, 0) {
        return t.errno("run-before-load-elf", Err(e), 0);
    }
    let target = Arc::new(Target::default());
    let done = Arc::new(AtomicBool::new(false));
    let (v, tg, d) = (vm.clone(), target.clone(), done.clone());
    let h = std::thread::spawn(move || {
        tg.register();
        let r = v.run_to_end(0, 4 << 20);
        d.store(true, Ordering::Release);
        tg.finish();
        r
    });
    // A watchdog: after 20 s, interrupt until it returns (run_to_end retries INTERRUPTED, so
    // mark the VM closed first: the next RUN then fails with EBADF).
    sys::wait_for(20, || done.load(Ordering::Acquire));
    if !done.load(Ordering::Acquire) {
        let _ = vm.close();
        sys::interrupt_until_done(&[&target], 30);
    }
    match h.join() {
        Ok(Ok((resp, _))) => {
            s.0 += 1;
            t.pass(
                "run-before-load-elf",
                &format!(
                    "guest ran zeroed RAM from RIP 0 and ended: {}",
                    describe(&resp)
                ),
            );
        }
        Ok(Err(e)) => t.pass(
            "run-before-load-elf",
            &format!("interrupted after 20 s, then {}", sys::errno_name(e)),
        ),
        Err(_) => t.fail("run-before-load-elf", "thread panicked"),
    }
    drop(vm);
    crate::expect_no_pages(t, "run-before-load-elf-pages-freed");
}

/// Every fault case.
pub fn all(t: &mut Tally, hello: &[u8], hog: &[u8]) -> Survived {
    let mut s = Survived(0);
    if sys::set_param("fail_alloc_after", "-1").is_err() {
        t.fail(
            "fault-injection",
            "cannot write /sys/module/smudge/parameters/fail_alloc_after (not root?)",
        );
        return s;
    }
    for vcpus in [1, 8] {
        sweep_setup(t, &mut s, vcpus);
    }
    sweep_load(t, &mut s, hello);
    for (label, mode) in [
        ("hello-auto", 0),
        ("hello-ad", 1),
        ("hello-pml", 2),
        ("hello-wp", 3),
    ] {
        sweep_run(t, &mut s, hello, label, mode);
    }
    page_limit(t, &mut s, hog);
    run_before_load(t, &mut s);
    let restored = sys::param("fail_alloc_after");
    t.check(
        "fault-injection-off-again",
        restored.as_deref() == Some("-1"),
        &format!("fail_alloc_after = {restored:?}"),
    );
    s
}
