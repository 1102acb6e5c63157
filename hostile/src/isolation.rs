//! `smudge-hostile isolation GUEST`: runs the isolation guest (guests/src/bin/isolation.rs)
//! while this process holds state of its own that no guest may touch, and checks after every
//! RUN that it is still there. Needs smudge.ko loaded with `probe_host=1` (the module then
//! compares the CPU's DR0-DR3, DR7, XCR0 and IA32_DEBUGCTL after every VM exit with their values
//! before the run, and STATS counts differences) and, to run every barrier, `force_barriers=1`.
//!
//! - A hardware breakpoint of this task (perf, a write watchpoint on `WATCHED`): the kernel arms
//!   DR0 and DR7 while the task runs, so every RUN enters the guest with the host's DR7 armed,
//!   and a VM exit disarms it (SDM 28.5.1 sets DR7 to 0x400) until smudge restores it. After
//!   every RUN a write to `WATCHED` must still count.
//! - XMM0-XMM15: loaded before the RUN system call and compared after it, in one asm block; the
//!   guest fills the same registers with its own pattern at every checkpoint.
//! - The guest's own view (its debug registers and XMMs kept across checkpoints), the WBINVD
//!   and MOV-DR exit counts, and the module's read-out (no difference after any exit).

use std::sync::atomic::{AtomicU64, Ordering};

use smudge_core::abi::{self, exit_kind, Op, Wire};

use crate::tally::Tally;
use crate::vm::{self, Vm};

/// Rounds and WBINVDs per round of the guest (guests/src/bin/isolation.rs).
const ROUNDS: u64 = 100;
const WBINVDS: u64 = 20;

/// The word the hardware breakpoint watches.
static WATCHED: AtomicU64 = AtomicU64::new(0);

/// A perf write watchpoint on `WATCHED` for this task: DR0-DR3 and DR7 armed while it runs.
struct Watchpoint(i32);

impl Watchpoint {
    fn arm() -> Result<Watchpoint, String> {
        // struct perf_event_attr (include/uapi/linux/perf_event.h), PERF_ATTR_SIZE_VER5: type
        // PERF_TYPE_BREAKPOINT (5), sample_period 1, flags exclude_kernel (bit 5) and
        // exclude_hv (bit 6), bp_type HW_BREAKPOINT_W (2), bp_addr, bp_len 8.
        let mut attr = [0u64; 14];
        attr[0] = 5 | (112u64 << 32);
        attr[2] = 1;
        attr[5] = (1 << 5) | (1 << 6);
        attr[6] = 2u64 << 32;
        attr[7] = WATCHED.as_ptr() as u64;
        attr[8] = 8;
        // SAFETY: perf_event_open reads the 112-byte attribute; pid 0 = this task, cpu -1 = any.
        let fd =
            unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0u64) };
        if fd < 0 {
            return Err(format!(
                "perf_event_open: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Watchpoint(fd as i32))
    }

    /// Writes hit so far.
    fn count(&self) -> u64 {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into `n`.
        let r = unsafe { libc::read(self.0, (&mut n as *mut u64).cast(), 8) };
        if r == 8 {
            n
        } else {
            u64::MAX
        }
    }

    /// One write to the watched word; true when the breakpoint counted it.
    fn fires(&self) -> bool {
        let before = self.count();
        WATCHED.fetch_add(1, Ordering::SeqCst);
        self.count() == before.wrapping_add(1)
    }
}

impl Drop for Watchpoint {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// ioctl(fd, cmd, arg) with XMM0-XMM15 loaded from `pattern` before the system call and stored
/// into `after` right after it; returns the system call's result.
fn ioctl_keeping_xmm(
    fd: i32,
    cmd: u32,
    arg: u64,
    pattern: &[u64; 32],
    after: &mut [u64; 32],
) -> i64 {
    let ret: i64;
    // SAFETY: an ioctl system call (RAX 16, RDI, RSI, RDX; it clobbers RCX and R11) between
    // loads and stores of the two 256-byte arrays; `arg` points at the caller's request buffer.
    unsafe {
        std::arch::asm!(
            "movdqu xmm0, [{p}]", "movdqu xmm1, [{p} + 16]", "movdqu xmm2, [{p} + 32]",
            "movdqu xmm3, [{p} + 48]", "movdqu xmm4, [{p} + 64]", "movdqu xmm5, [{p} + 80]",
            "movdqu xmm6, [{p} + 96]", "movdqu xmm7, [{p} + 112]", "movdqu xmm8, [{p} + 128]",
            "movdqu xmm9, [{p} + 144]", "movdqu xmm10, [{p} + 160]", "movdqu xmm11, [{p} + 176]",
            "movdqu xmm12, [{p} + 192]", "movdqu xmm13, [{p} + 208]", "movdqu xmm14, [{p} + 224]",
            "movdqu xmm15, [{p} + 240]",
            "syscall",
            "movdqu [{a}], xmm0", "movdqu [{a} + 16], xmm1", "movdqu [{a} + 32], xmm2",
            "movdqu [{a} + 48], xmm3", "movdqu [{a} + 64], xmm4", "movdqu [{a} + 80], xmm5",
            "movdqu [{a} + 96], xmm6", "movdqu [{a} + 112], xmm7", "movdqu [{a} + 128], xmm8",
            "movdqu [{a} + 144], xmm9", "movdqu [{a} + 160], xmm10", "movdqu [{a} + 176], xmm11",
            "movdqu [{a} + 192], xmm12", "movdqu [{a} + 208], xmm13", "movdqu [{a} + 224], xmm14",
            "movdqu [{a} + 240], xmm15",
            p = in(reg) pattern.as_ptr(),
            a = in(reg) after.as_mut_ptr(),
            inlateout("rax") libc::SYS_ioctl => ret,
            in("rdi") fd,
            in("rsi") u64::from(cmd),
            in("rdx") arg,
            out("rcx") _, out("r11") _,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
        )
    };
    ret
}

/// The whole check; prints a line per case, returns true when all passed.
pub fn main(guest: &str) -> bool {
    let mut t = Tally::default();
    let probing = crate::sys::param("probe_host").as_deref() == Some("Y");
    t.check(
        "probe-on",
        probing,
        "smudge.ko needs probe_host=1 for this check",
    );
    let image = match std::fs::read(guest) {
        Ok(i) => i,
        Err(e) => {
            t.fail("guest", &format!("cannot read {guest}: {e}"));
            return false;
        }
    };
    let wp = match Watchpoint::arm() {
        Ok(w) => w,
        Err(e) => {
            t.fail("watchpoint", &e);
            return false;
        }
    };
    t.check(
        "watchpoint-fires",
        wp.fires(),
        "a write to the watched word hits the task's hardware breakpoint",
    );
    let r = Vm::open().and_then(|vm| {
        vm.setup(64 << 20, 1, 0, 0)?;
        vm.load(&image)?;
        Ok(vm)
    });
    let vm = match r {
        Ok(vm) => vm,
        Err(e) => {
            t.errno("setup", Err(e), 0);
            return false;
        }
    };
    let (mut runs, mut xmm_lost, mut bp_lost, mut console) = (0u64, 0u64, 0u64, Vec::new());
    let mut after = [0u64; 32];
    let end = loop {
        let mut pattern = [0u64; 32];
        for (i, w) in pattern.iter_mut().enumerate() {
            *w = 0xa5a5_0000_0000_0000 ^ (runs << 24) ^ i as u64;
        }
        let mut b = vm::encode(
            Op::Run,
            &abi::RunReq {
                version: abi::VERSION,
                vcpu: 0,
            },
        );
        let ret = ioctl_keeping_xmm(
            vm.fd,
            Op::Run.linux_ioctl(),
            b.as_mut_ptr() as u64,
            &pattern,
            &mut after,
        );
        runs += 1;
        xmm_lost += u64::from(pattern != after);
        bp_lost += u64::from(!wp.fires());
        if ret < 0 {
            break Err(-ret as i32);
        }
        let Ok(r) = abi::RunResp::from_bytes(&b) else {
            break Err(libc::EPROTO);
        };
        let n = (r.console_len as usize).min(r.console.len());
        console.extend_from_slice(&r.console[..n]);
        match r.kind {
            exit_kind::CONSOLE | exit_kind::INTERRUPTED | exit_kind::CHECKPOINT => {}
            _ => break Ok(r),
        }
    };
    let console = String::from_utf8_lossy(&console).into_owned();
    match end {
        Ok(r) => t.check(
            "guest-kept-its-state",
            r.kind == exit_kind::EXIT && r.code == 0,
            &format!("{}: {}", vm::describe(&r), console.trim()),
        ),
        Err(e) => t.errno("guest-kept-its-state", Err(e), 0),
    }
    t.check(
        "tool-xmm-kept",
        xmm_lost == 0 && runs > ROUNDS,
        &format!("XMM0-XMM15 of this task changed across {xmm_lost} of {runs} RUNs"),
    );
    t.check(
        "tool-breakpoint-kept",
        bp_lost == 0,
        &format!("the task's hardware breakpoint missed a write after {bp_lost} of {runs} RUNs"),
    );
    match vm.stats() {
        Ok(s) => {
            let i = s.isolation;
            let (wbinvd, dr) = (s.exits[54], s.exits[29]);
            t.check(
                "wbinvd-exits",
                wbinvd == ROUNDS * WBINVDS,
                &format!("{wbinvd} WBINVD exits (basic reason 54), each skipped"),
            );
            t.check(
                "mov-dr-exits",
                dr == ROUNDS * 10,
                &format!("{dr} MOV-DR exits (basic reason 29)"),
            );
            t.check(
                "host-debug-state-kept",
                i.probes == i.entries && i.entries > 0 && i.host_changed == 0,
                &format!(
                    "DR0-DR3, DR7, XCR0, DEBUGCTL compared after {} of {} exits: {} differed",
                    i.probes, i.entries, i.host_changed
                ),
            );
            println!(
                "barriers: {} entries, {} L1D flushes, {} VERWs, {} IBPBs",
                i.entries, i.l1d_flushes, i.verws, i.ibpbs
            );
        }
        Err(e) => t.errno("stats", Err(e), 0),
    }
    drop(vm);
    crate::expect_no_pages(&mut t, "isolation-pages-freed");
    println!("{} passed, {} failed", t.passed, t.failed);
    t.failed == 0
}
