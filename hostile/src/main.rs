//! smudge-hostile: hostile input against /dev/smudge, run inside the emulated VT-x machine.
//!
//! Malformed requests (numbers, pointers, fields, ranges, order, images, closed descriptors),
//! races (RUN against close, harvest, explain, load, SETUP; one vCPU from two threads; many
//! open/close cycles) and faults (the page allocator failing at every point, the page limit, a
//! vCPU run without an image). Each case prints `ok <name>: <errno or detail>` or `FAIL <name>:
//! ...`; the last lines give the totals. A valid guest run at the end proves the driver still
//! works. Exit status 0 only when every case passed.
//!
//! Usage: smudge-hostile [GUESTS_DIR] (default /guests: hello, hostile_spin, hostile_churn,
//! hostile_hog, regwriter). `smudge-hostile lostpage-check FILE` checks the output of a lost-page run
//! (lostpage.rs) instead; `smudge-hostile isolation [GUEST]` checks what a guest leaves of the
//! host's state (isolation.rs).

mod api;
mod elf;
mod faults;
mod isolation;
mod lostpage;
mod races;
mod requests;
mod sys;
mod tally;
mod vm;

use std::process::ExitCode;
use std::sync::atomic::Ordering;

use smudge_core::abi::exit_kind;

use tally::Tally;

/// Checks that no VM holds a page (after every VM of a case was closed).
pub fn expect_no_pages(t: &mut Tally, name: &str) {
    match sys::pages_held() {
        Some(n) => t.check(name, n == 0, &format!("pages_held = {n}")),
        None => t.fail(name, "cannot read /sys/module/smudge/parameters/pages_held"),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("isolation") {
        return if isolation::main(args.get(2).map_or("/guests/isolation", String::as_str)) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if args.get(1).map(String::as_str) == Some("lostpage-check") {
        let ok = lostpage::main(args.get(2).map_or("", String::as_str));
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let dir = args.get(1).cloned().unwrap_or_else(|| "/guests".into());
    let read = |n: &str| {
        std::fs::read(format!("{dir}/{n}")).unwrap_or_else(|e| panic!("cannot read {dir}/{n}: {e}"))
    };
    let (hello, spin, churn, hog, regwriter) = (
        read("hello"),
        read("hostile_spin"),
        read("hostile_churn"),
        read("hostile_hog"),
        read("regwriter"),
    );
    let image = elf::Image::new(hello.clone());
    sys::install_sigalrm();
    let mut t = Tally::default();
    let scratch = sys::Mem::new(4);

    requests::numbers(&mut t, &scratch);
    requests::arg_pointers(&mut t);
    requests::fields(&mut t);
    requests::before_setup(&mut t, &hello);
    requests::after_setup(&mut t, &image);
    requests::other_fops(&mut t);
    requests::mmap(&mut t);
    requests::closed_fd(&mut t);
    expect_no_pages(&mut t, "malformed-requests-pages-freed");

    api::all(&mut t, &regwriter);

    races::requests_while_running(&mut t, &churn);
    races::same_vcpu_twice(&mut t, &spin);
    races::concurrent_setup(&mut t);
    races::close_while_running(&mut t, &churn, &spin);
    races::open_close_cycles(&mut t, &hello);
    expect_no_pages(&mut t, "races-pages-freed");

    let survived = faults::all(&mut t, &hello, &hog);
    expect_no_pages(&mut t, "faults-pages-freed");

    // The next valid run works.
    let r = vm::Vm::open().and_then(|vm| {
        vm.setup(64 << 20, 1, 0, 0)?;
        vm.load(&hello)?;
        vm.run_to_end(0, 64 << 20)
    });
    match r {
        Ok((resp, console)) => t.check(
            "valid-run-after-everything",
            resp.kind == exit_kind::EXIT
                && resp.code == 0
                && console.contains("hello from the smudge guest"),
            &format!("{}: {}", vm::describe(&resp), console.trim()),
        ),
        Err(e) => t.errno("valid-run-after-everything", Err(e), 0),
    }
    expect_no_pages(&mut t, "final-pages-freed");

    println!(
        "smudge-hostile: {} ioctls sent, {} faults injected or provoked and survived",
        sys::IOCTLS.load(Ordering::Relaxed),
        survived.0
    );
    println!("{} passed, {} failed", t.passed, t.failed);
    if t.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
