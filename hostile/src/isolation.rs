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
//! - XMM0-XMM15 (YMM0-YMM15 where the CPU has AVX): loaded before the RUN system call and
//!   compared after it, in one asm block; the guest fills XMM0-XMM15 with its own pattern at
//!   every checkpoint.
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

/// Defines `$name(fd, cmd, arg, pattern, after)`: ioctl(fd, cmd, arg) between loads of 16
/// vector registers (`$r`0-15, `$w` bytes each, moved with `$mov`) from `pattern` and stores of
/// them into `after`, in one asm block; returns the system call's result.
macro_rules! ioctl_keeping {
    ($name:ident, $ty:ty, $w:literal, $mov:literal, $r:literal, $($reg:tt)*) => {
        fn $name(fd: i32, cmd: u32, arg: u64, pattern: &$ty, after: &mut $ty) -> i64 {
            let ret: i64;
            // SAFETY: an ioctl system call (RAX 16, RDI, RSI, RDX; it clobbers RCX and R11)
            // between loads and stores of the two arrays; `arg` points at the caller's request
            // buffer. YMM only where the CPU and the OS support AVX (the caller checks).
            unsafe {
                std::arch::asm!(
                    concat!($mov, " ", $r, "0, [{p}]"),
                    concat!($mov, " ", $r, "1, [{p} + ", $w, "*1]"),
                    concat!($mov, " ", $r, "2, [{p} + ", $w, "*2]"),
                    concat!($mov, " ", $r, "3, [{p} + ", $w, "*3]"),
                    concat!($mov, " ", $r, "4, [{p} + ", $w, "*4]"),
                    concat!($mov, " ", $r, "5, [{p} + ", $w, "*5]"),
                    concat!($mov, " ", $r, "6, [{p} + ", $w, "*6]"),
                    concat!($mov, " ", $r, "7, [{p} + ", $w, "*7]"),
                    concat!($mov, " ", $r, "8, [{p} + ", $w, "*8]"),
                    concat!($mov, " ", $r, "9, [{p} + ", $w, "*9]"),
                    concat!($mov, " ", $r, "10, [{p} + ", $w, "*10]"),
                    concat!($mov, " ", $r, "11, [{p} + ", $w, "*11]"),
                    concat!($mov, " ", $r, "12, [{p} + ", $w, "*12]"),
                    concat!($mov, " ", $r, "13, [{p} + ", $w, "*13]"),
                    concat!($mov, " ", $r, "14, [{p} + ", $w, "*14]"),
                    concat!($mov, " ", $r, "15, [{p} + ", $w, "*15]"),
                    "syscall",
                    concat!($mov, " [{a}], ", $r, "0"),
                    concat!($mov, " [{a} + ", $w, "*1], ", $r, "1"),
                    concat!($mov, " [{a} + ", $w, "*2], ", $r, "2"),
                    concat!($mov, " [{a} + ", $w, "*3], ", $r, "3"),
                    concat!($mov, " [{a} + ", $w, "*4], ", $r, "4"),
                    concat!($mov, " [{a} + ", $w, "*5], ", $r, "5"),
                    concat!($mov, " [{a} + ", $w, "*6], ", $r, "6"),
                    concat!($mov, " [{a} + ", $w, "*7], ", $r, "7"),
                    concat!($mov, " [{a} + ", $w, "*8], ", $r, "8"),
                    concat!($mov, " [{a} + ", $w, "*9], ", $r, "9"),
                    concat!($mov, " [{a} + ", $w, "*10], ", $r, "10"),
                    concat!($mov, " [{a} + ", $w, "*11], ", $r, "11"),
                    concat!($mov, " [{a} + ", $w, "*12], ", $r, "12"),
                    concat!($mov, " [{a} + ", $w, "*13], ", $r, "13"),
                    concat!($mov, " [{a} + ", $w, "*14], ", $r, "14"),
                    concat!($mov, " [{a} + ", $w, "*15], ", $r, "15"),
                    p = in(reg) pattern.as_ptr(),
                    a = in(reg) after.as_mut_ptr(),
                    inlateout("rax") libc::SYS_ioctl => ret,
                    in("rdi") fd,
                    in("rsi") u64::from(cmd),
                    in("rdx") arg,
                    out("rcx") _, out("r11") _,
                    $($reg)*
                )
            };
            ret
        }
    };
}

ioctl_keeping!(ioctl_keeping_xmm, [u64; 32], "16", "movdqu", "xmm",
    out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
    out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
    out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
    out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
);
ioctl_keeping!(ioctl_keeping_ymm_inner, [u64; 64], "32", "vmovdqu", "ymm",
    out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
    out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
    out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
    out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
);

/// `ioctl_keeping_xmm` for YMM0-YMM15 (the upper halves too).
///
/// # Safety
/// The CPU and the OS support AVX.
#[target_feature(enable = "avx")]
unsafe fn ioctl_keeping_ymm(
    fd: i32,
    cmd: u32,
    arg: u64,
    pattern: &[u64; 64],
    after: &mut [u64; 64],
) -> i64 {
    ioctl_keeping_ymm_inner(fd, cmd, arg, pattern, after)
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
    // YMM where the CPU has AVX (real hardware); XMM on the emulated CPUs here (no XSAVE).
    let avx = std::arch::is_x86_feature_detected!("avx");
    let regs = if avx { "YMM0-YMM15" } else { "XMM0-XMM15" };
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
        let (cmd, arg) = (Op::Run.linux_ioctl(), b.as_mut_ptr() as u64);
        let ret = if avx {
            let wide: [u64; 64] =
                std::array::from_fn(|i| pattern[i % 32] ^ ((i as u64 / 32) << 60));
            let mut back = [0u64; 64];
            // SAFETY: AVX is supported (checked above).
            let ret = unsafe { ioctl_keeping_ymm(vm.fd, cmd, arg, &wide, &mut back) };
            xmm_lost += u64::from(wide != back);
            ret
        } else {
            let ret = ioctl_keeping_xmm(vm.fd, cmd, arg, &pattern, &mut after);
            xmm_lost += u64::from(pattern != after);
            ret
        };
        runs += 1;
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
        &format!("{regs} of this task changed across {xmm_lost} of {runs} RUNs"),
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
