// SPDX-License-Identifier: GPL-2.0

//! smudge.ko: the thin Linux shim around smudge-core.
//!
//! It supplies pages and phys<->virt ([`LinuxPlatform`]), VMX operation on every CPU, the
//! `/dev/smudge` device (one open = one VM), user copies, and the host page-table lookup for
//! `explain`. Everything else (decoding and validating requests, EPT, dirty tracking, a vCPU's
//! pages and page cache, the VMCS, the exit handler, the RUN and CAPS answers) is smudge-core.

use core::cell::UnsafeCell;
use core::ffi::{c_long, c_void};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use kernel::prelude::*;
use smudge_core::abi::{self, Op, Request, Wire};
use smudge_core::answer;
use smudge_core::arch;
use smudge_core::dirty::Mode;
use smudge_core::hostmem::{self, PageBudget};
use smudge_core::platform::{AllocError, PageMut, PageWords, Platform};
use smudge_core::vcpu::{write_revision_id, VcpuPages};
use smudge_core::vm::{RunExit, Vm};
use smudge_core::vmx::caps::{Controls, CpuidRegs, MsrValue, VmxCaps};
use smudge_core::vmx::hw::{self, HwExit, HwVcpu, RunEnv};

module! {
    type: Smudge,
    name: "smudge",
    author: "smudge developers",
    description: "smudge: a type-2 hypervisor that reports the pages a guest dirties (EPT A/D, PML, write-protect)",
    license: "GPL",
}

extern "C" {
    fn smudge_fault_inject() -> i32;
    fn smudge_test_bad_vmcs() -> i32;
    /// The module parameter `pages_held` (an `unsigned long`, updated only atomically).
    static smudge_pages_held_count: AtomicU64;
    fn smudge_max_pages() -> u64;
    fn smudge_totalram_pages() -> u64;
    fn smudge_mem_available() -> u64;
    fn smudge_reserve_pages() -> u64;
    fn smudge_kvzalloc(n: usize) -> *mut c_void;
    fn smudge_kvfree(p: *mut c_void);
    fn smudge_misc_register() -> i32;
    fn smudge_misc_deregister();
    fn smudge_notifiers_register();
    fn smudge_notifiers_unregister();
    fn smudge_irq_save() -> usize;
    fn smudge_irq_restore(flags: usize);
    fn smudge_cr4_set_vmxe();
    fn smudge_cr4_clear_vmxe();
    fn smudge_cr4_read() -> u64;
    fn smudge_rdmsr_safe(msr: u32, val: *mut u64) -> i32;
    fn smudge_va(pa: u64) -> *mut c_void;
    fn smudge_pa(va: *const c_void) -> u64;
    fn smudge_get_zeroed_page() -> usize;
    fn smudge_free_page(va: usize);
    fn smudge_copy_from_user(dst: *mut c_void, src: usize, n: usize) -> i32;
    fn smudge_copy_to_user(dst: usize, src: *const c_void, n: usize) -> i32;
    fn smudge_fpu_begin();
    fn smudge_invalidate_tss_limit();
    fn smudge_fpu_end();
    fn smudge_cpu() -> i32;
    fn smudge_nr_cpu_ids() -> i32;
    fn smudge_should_return() -> i32;
    fn smudge_cond_resched();
    fn smudge_on_each_cpu(f: extern "C" fn(*mut c_void), info: *mut c_void);
    fn smudge_on_cpu(cpu: i32, f: extern "C" fn(*mut c_void), info: *mut c_void) -> i32;
    fn smudge_host_pte(va: usize, level: *mut u32) -> u64;
    fn smudge_user_pte(va: usize, level: *mut u32) -> u64;
}

const EINVAL: c_long = 22;
const EFAULT: c_long = 14;
const ENOMEM: c_long = 12;
const EBUSY: c_long = 16;
const ENOTTY: c_long = 25;
const ENODEV: c_long = 19;
const EIO: c_long = 5;
const EOPNOTSUPP: c_long = 95;
const ENOEXEC: c_long = 8;
const ENOENT: c_long = 2;
const ENOSPC: c_long = 28;
const EEXIST: c_long = 17;
const EDQUOT: c_long = 122;

/// The driver-wide page count (module parameter `pages_held`) under the cap `max_pages`.
fn budget() -> PageBudget<'static> {
    // SAFETY: the C variable lives as long as the module and is only accessed atomically
    // (AtomicU64 has the layout of the C `unsigned long` on x86-64); the others read values.
    unsafe {
        PageBudget {
            held: &*core::ptr::addr_of!(smudge_pages_held_count),
            cap: hostmem::cap_pages(smudge_max_pages(), smudge_totalram_pages()),
        }
    }
}

/// Pages from the kernel's page allocator (helpers.c: fail instead of OOM-killing, charged to
/// the memory cgroup), seen through the direct map and counted by [`budget`]. The run loop
/// never allocates from it while preemption is off: guest memory is backed from the vCPU's
/// page cache, refilled here before each entry.
struct LinuxPlatform;

impl LinuxPlatform {
    /// A zeroed page from the kernel, uncounted (VMXON regions belong to the driver); none when
    /// that would leave the host less than core's reserve.
    fn os_alloc() -> Option<u64> {
        // SAFETY: plain C calls; the page is zeroed by get_zeroed_page.
        unsafe {
            if smudge_fault_inject() != 0
                || !hostmem::above_reserve(
                    smudge_mem_available(),
                    smudge_reserve_pages(),
                    smudge_totalram_pages(),
                )
            {
                return None;
            }
            let va = smudge_get_zeroed_page();
            (va != 0).then(|| smudge_pa(va as *const c_void))
        }
    }
    fn os_free(hpa: u64) {
        // SAFETY: `hpa` came from os_alloc, so its direct-map address is a page we own.
        unsafe { smudge_free_page(smudge_va(hpa) as usize) }
    }
}

impl Platform for LinuxPlatform {
    fn alloc_page(&self) -> core::result::Result<u64, AllocError> {
        budget().alloc(Self::os_alloc)
    }
    fn free_page(&self, hpa: u64) {
        budget().free(|| Self::os_free(hpa))
    }
    fn page(&self, hpa: u64) -> &PageWords {
        // SAFETY: the core only passes addresses of pages it allocated (tables, bitmaps,
        // backing pages); the direct map covers them, and AtomicU64 has no invalid values.
        unsafe { &*(smudge_va(hpa) as *const PageWords) }
    }
    fn with_page_mut(&self, hpa: u64, f: &mut dyn FnMut(PageMut<'_>)) {
        // SAFETY: as in `page`, the direct map covers this 4 KiB-aligned page the core
        // allocated, and u64 has no invalid values. The core lends a page only while nothing else
        // reads or writes it (the trait's contract: every vCPU kicked out of VMX non-root
        // operation, so no processor sets A/D flags in it, SDM 29.3.5; the EPT borrowed
        // mutably), so this is the only reference in use until `f` returns.
        let words = unsafe { &mut *(smudge_va(hpa) as *mut [u64; 512]) };
        f(PageMut::Exclusive(words))
    }
}

/// A zeroed buffer for one request (copied-in images, bitmaps, masks), allocated like guest
/// pages (helpers.c: fails instead of OOM-killing, charged to the memory cgroup), freed on drop.
struct KernBuf {
    ptr: core::ptr::NonNull<u8>,
    len: usize,
}

impl KernBuf {
    fn zeroed(len: usize) -> core::result::Result<KernBuf, c_long> {
        // SAFETY: kvzalloc returns null or `len` zeroed bytes aligned to at least 8.
        let p = unsafe { smudge_kvzalloc(len.max(1)) } as *mut u8;
        core::ptr::NonNull::new(p)
            .map(|ptr| KernBuf { ptr, len })
            .ok_or(-ENOMEM)
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialised bytes owned by self.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed exclusively.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    /// The buffer as whole quadwords.
    fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: kvzalloc memory is 8-byte aligned; every bit pattern is a valid u64.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr() as *mut u64, self.len / 8) }
    }
}

impl Drop for KernBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by kvzalloc in `zeroed`, freed once.
        unsafe { smudge_kvfree(self.ptr.as_ptr() as *mut c_void) }
    }
}

fn rdmsr_safe(msr: u32) -> MsrValue {
    let mut v = 0u64;
    // SAFETY: rdmsrl_safe catches the #GP of an absent MSR.
    if unsafe { smudge_rdmsr_safe(msr, &mut v) } == 0 {
        MsrValue::Value(v)
    } else {
        MsrValue::Absent
    }
}

fn live_caps() -> VmxCaps {
    VmxCaps::from_reader(rdmsr_safe, |leaf, sub| {
        let r = arch::cpuid(leaf, sub);
        Some(CpuidRegs {
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
        })
    })
}

/// Driver-wide state set at load.
struct Global {
    caps: VmxCaps,
    mode: Mode,
    /// VMXON region per CPU (0 when none).
    vmxon: [u64; MAX_CPUS],
}

const MAX_CPUS: usize = 64;
static mut GLOBAL: Option<Global> = None;
static VMX_ON: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static VMXON_FAILED: AtomicU64 = AtomicU64::new(0);

fn global() -> Option<&'static Global> {
    // SAFETY: GLOBAL is written once in init before the device exists and cleared in Drop
    // after the device is gone; in between it is only read.
    unsafe { (*core::ptr::addr_of!(GLOBAL)).as_ref() }
}

extern "C" fn vmxon_this_cpu(_: *mut c_void) {
    // SAFETY: runs in on_each_cpu's IPI context with interrupts off.
    let cpu = unsafe { smudge_cpu() } as usize;
    let Some(g) = global() else { return };
    let Some(&region) = g.vmxon.get(cpu) else {
        return;
    };
    if region == 0 {
        return;
    }
    // SAFETY: CR4 through the kernel's helpers; VMXON with a region holding the revision id;
    // IA32_FEATURE_CONTROL was checked at load.
    unsafe {
        if smudge_cr4_read() & (1 << 13) != 0 {
            VMXON_FAILED.fetch_or(1 << cpu, Ordering::Relaxed);
            return;
        }
        smudge_cr4_set_vmxe();
        if arch::vmxon(region).is_err() {
            smudge_cr4_clear_vmxe();
            VMXON_FAILED.fetch_or(1 << cpu, Ordering::Relaxed);
            return;
        }
        let _ = arch::invept(arch::InveptType::AllContext, 0);
    }
    VMX_ON[cpu].store(true, Ordering::Release);
}

extern "C" fn vmxoff_this_cpu(_: *mut c_void) {
    // SAFETY: IPI context; VMXOFF only where this module did VMXON.
    unsafe {
        let cpu = smudge_cpu() as usize;
        if cpu < MAX_CPUS && VMX_ON[cpu].swap(false, Ordering::AcqRel) {
            let _ = arch::vmxoff();
            smudge_cr4_clear_vmxe();
        }
    }
}

/// Called by the reboot and panic notifiers.
#[no_mangle]
pub extern "C" fn smudge_rs_emergency_vmxoff() {
    vmxoff_this_cpu(core::ptr::null_mut());
}

/// A vCPU with its pages.
struct LinuxVcpu {
    hw: HwVcpu,
    /// CPU whose VMCS cache holds this VMCS (-1 = clear).
    cpu: i32,
}

/// A vCPU slot: RUN calls for different vCPUs run at once, one RUN per vCPU.
struct VcpuSlot {
    busy: AtomicBool,
    v: UnsafeCell<LinuxVcpu>,
}

/// A spin lock around the VM. vCPUs take it only around exit handling (preemption off, no
/// sleeping); VM-level requests take it while every vCPU is kicked out, so it is uncontended.
struct VmLock {
    locked: AtomicBool,
    vm: UnsafeCell<Option<Vm>>,
}

impl VmLock {
    fn with<R, F: FnOnce(&mut Option<Vm>) -> R>(&self, f: F) -> R {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the flag gives this thread exclusive access until it is released.
        let r = f(unsafe { &mut *self.vm.get() });
        self.locked.store(false, Ordering::Release);
        r
    }
}

/// The VM as a RUN sees it: the set-up VM of the file (which exists from Setup until release,
/// and release cannot run during a RUN), behind the file's lock.
struct LockedVm<'a> {
    locked: &'a AtomicBool,
    vm: core::ptr::NonNull<Vm>,
}

impl hw::SharedVm for LockedVm<'_> {
    fn with<R, F: FnOnce(&mut Vm) -> R>(&self, f: F) -> R {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the VM outlives the RUN (see the type), and the flag gives this thread
        // exclusive access until it is released; `hw::run` never nests `with`.
        let r = f(unsafe { &mut *self.vm.as_ptr() });
        self.locked.store(false, Ordering::Release);
        r
    }
}

/// One open of /dev/smudge: one VM.
struct VmFile {
    /// A VM-level request is in progress.
    busy: AtomicBool,
    /// Setup finished: the VM exists until release.
    ready: AtomicBool,
    /// vCPUs must leave guest mode and wait (harvest, clear, load, explain...).
    kick: AtomicBool,
    /// vCPUs inside the run loop.
    running: AtomicU32,
    vm: VmLock,
    /// Written by Setup and SET_MODE (VM-level, every vCPU kicked out), read by RUN inside the
    /// run loop's kick protocol.
    ctls: UnsafeCell<Option<Controls>>,
    /// vCPU `i` (from `KBox::into_raw`), published before `nr_vcpus` counts it; freed only when
    /// no RUN is in progress (release, a failed Setup).
    vcpus: [AtomicPtr<VcpuSlot>; abi::MAX_VCPUS as usize],
    nr_vcpus: AtomicU32,
}

// SAFETY: every field is either atomic or guarded by the protocol documented on each.
unsafe impl Sync for VmFile {}

extern "C" fn vmclear_on_cpu(info: *mut c_void) {
    // SAFETY: `info` is the VMCS physical address, passed by value; VMX is on in this CPU.
    let _ = unsafe { arch::vmclear(info as u64) };
}

extern "C" fn invept_on_cpu(info: *mut c_void) {
    // SAFETY: VMX is on where VMX_ON says so; INVEPT all-context has no memory operand effect.
    unsafe {
        let cpu = smudge_cpu() as usize;
        if cpu < MAX_CPUS && VMX_ON[cpu].load(Ordering::Acquire) {
            let _ = arch::invept(arch::InveptType::AllContext, info as u64);
        }
    }
}

impl VmFile {
    /// vCPU `index`, once created.
    fn vcpu(&self, index: u32) -> Option<&VcpuSlot> {
        if index >= self.nr_vcpus.load(Ordering::Acquire) {
            return None;
        }
        let ptr = self.vcpus.get(index as usize)?.load(Ordering::Acquire);
        // SAFETY: a published vCPU stays allocated until release (or a failed Setup), when no
        // request of this file runs.
        unsafe { ptr.as_ref() }
    }

    /// The vCPUs created so far.
    fn vcpus(&self) -> impl Iterator<Item = &VcpuSlot> {
        (0..self.nr_vcpus.load(Ordering::Acquire)).filter_map(|i| self.vcpu(i))
    }

    /// Kicks every vCPU out of guest mode and waits until none is in the run loop. vCPUs notice
    /// the kick at their next VM exit (the preemption timer bounds the wait).
    fn kick_all(&self) {
        self.kick.store(true, Ordering::SeqCst);
        while self.running.load(Ordering::SeqCst) != 0 {
            // SAFETY: process context, may sleep.
            unsafe { smudge_cond_resched() };
            core::hint::spin_loop();
        }
    }

    fn unkick(&self) {
        self.kick.store(false, Ordering::SeqCst);
    }

    /// Pages the vCPUs hold (their own and their caches). Every vCPU must be out of RUN or
    /// kicked out.
    fn vcpu_pages(&self) -> u64 {
        self.vcpus()
            // SAFETY: no vCPU runs (the caller's contract), so nobody writes its cache.
            .map(|slot| unsafe { &*slot.v.get() }.hw.pages_held())
            .sum::<u64>()
    }

    /// Frees everything; no RUN is in progress (release, or a failed Setup).
    fn free_all(&self) {
        let p = LinuxPlatform;
        free_vcpus(self, &p);
        // SAFETY: invalidate every cached translation before the tables and pages are freed.
        unsafe { smudge_on_each_cpu(invept_on_cpu, core::ptr::null_mut()) };
        if let Some(vm) = self.vm.with(|vm| vm.take()) {
            vm.destroy(&p);
        }
        self.ready.store(false, Ordering::Release);
    }
}

#[no_mangle]
pub extern "C" fn smudge_rs_open(out: *mut *mut c_void) -> c_long {
    if global().is_none() {
        return -ENODEV;
    }
    let f = VmFile {
        busy: AtomicBool::new(false),
        ready: AtomicBool::new(false),
        kick: AtomicBool::new(false),
        running: AtomicU32::new(0),
        vm: VmLock {
            locked: AtomicBool::new(false),
            vm: UnsafeCell::new(None),
        },
        ctls: UnsafeCell::new(None),
        vcpus: [const { AtomicPtr::new(core::ptr::null_mut()) }; abi::MAX_VCPUS as usize],
        nr_vcpus: AtomicU32::new(0),
    };
    match KBox::new(f, GFP_KERNEL_ACCOUNT | __GFP_NOWARN) {
        Ok(b) => {
            // SAFETY: `out` is the C caller's local.
            unsafe { *out = KBox::into_raw(b) as *mut c_void };
            0
        }
        Err(_) => -ENOMEM,
    }
}

#[no_mangle]
pub extern "C" fn smudge_rs_release(priv_: *mut c_void) {
    if priv_.is_null() {
        return;
    }
    // SAFETY: `priv_` came from KBox::into_raw in open; release is the last user.
    let f = unsafe { KBox::from_raw(priv_ as *mut VmFile) };
    f.free_all();
}

/// mmap of the VM: starts a read-only mapping of guest RAM. Returns 0, or -errno when another
/// VM-level request is in progress. Every vCPU stays out of guest mode until
/// [`smudge_rs_mmap_end`], so the EPT cannot change underneath.
#[no_mangle]
pub extern "C" fn smudge_rs_mmap_begin(priv_: *mut c_void) -> c_long {
    if priv_.is_null() {
        return -EINVAL;
    }
    // SAFETY: the file holds the VmFile until release, which cannot run during mmap.
    let f = unsafe { &*(priv_ as *const VmFile) };
    if !f.ready.load(Ordering::Acquire) {
        return -EINVAL;
    }
    if f.busy.swap(true, Ordering::Acquire) {
        return -EBUSY;
    }
    f.kick_all();
    0
}

/// The page frame backing guest page `gfn`, -ENOENT when it is not backed (yet), -EINVAL
/// beyond guest RAM. Only between mmap_begin and mmap_end.
#[no_mangle]
pub extern "C" fn smudge_rs_mmap_pfn(priv_: *mut c_void, gfn: usize) -> c_long {
    // SAFETY: as in mmap_begin; `busy` and the kick give this thread the VM.
    let f = unsafe { &*(priv_ as *const VmFile) };
    let p = LinuxPlatform;
    f.vm.with(|vm| {
        let Some(vm) = vm.as_ref() else {
            return -EINVAL;
        };
        let gpa = (gfn as u64) << 12;
        if vm.layout().is_none_or(|l| gpa >= l.mem_size) {
            return -EINVAL;
        }
        match vm.ept().translate(&p, gpa) {
            Some(t) => (t.hpa >> 12) as c_long,
            None => -ENOENT,
        }
    })
}

/// Ends an mmap started by [`smudge_rs_mmap_begin`].
#[no_mangle]
pub extern "C" fn smudge_rs_mmap_end(priv_: *mut c_void) {
    // SAFETY: as in mmap_begin.
    let f = unsafe { &*(priv_ as *const VmFile) };
    f.unkick();
    f.busy.store(false, Ordering::Release);
}

#[no_mangle]
pub extern "C" fn smudge_rs_ioctl(priv_: *mut c_void, cmd: u32, arg: usize) -> c_long {
    if priv_.is_null() {
        return -EINVAL;
    }
    // SAFETY: the file holds the VmFile until release, which cannot run during an ioctl.
    let f = unsafe { &*(priv_ as *const VmFile) };
    let Some(op) = Op::from_linux_ioctl(cmd) else {
        return -ENOTTY;
    };
    ioctl(f, op, arg)
}

fn copy_in(dst: &mut [u8], src: usize) -> core::result::Result<(), c_long> {
    // SAFETY: copy_from_user checks the user range.
    if unsafe { smudge_copy_from_user(dst.as_mut_ptr() as *mut c_void, src, dst.len()) } != 0 {
        return Err(-EFAULT);
    }
    Ok(())
}

fn copy_out(dst: usize, src: &[u8]) -> core::result::Result<(), c_long> {
    // SAFETY: copy_to_user checks the user range.
    if unsafe { smudge_copy_to_user(dst, src.as_ptr() as *const c_void, src.len()) } != 0 {
        return Err(-EFAULT);
    }
    Ok(())
}

fn core_err(e: smudge_core::Error) -> c_long {
    use smudge_core::Error as E;
    match e {
        E::OutOfMemory => -ENOMEM,
        E::HostPageCap => -EDQUOT,
        E::Unsupported => -EOPNOTSUPP,
        E::NoFreeSlot => -ENOSPC,
        E::AlreadyRunning => -EBUSY,
        E::Overlap => -EEXIST,
        _ => -EINVAL,
    }
}

fn ioctl(f: &VmFile, op: Op, arg: usize) -> c_long {
    let Some(g) = global() else { return -ENODEV };
    let mut buf = [0u8; 1024];
    let n = op.buffer_size();
    if n > buf.len() {
        return -EINVAL;
    }
    if let Err(e) = copy_in(&mut buf[..op.request_size()], arg) {
        return e;
    }
    let req = match abi::decode(op, &buf[..n]) {
        Ok(r) => r,
        Err(e) => return -(e.errno() as c_long),
    };
    let enc = |r: core::result::Result<usize, abi::AbiError>| r.map_err(|_| -EINVAL);
    let out = match req {
        Request::Run { vcpu } => {
            run_request(f, g, vcpu).and_then(|resp| enc(resp.to_bytes(&mut buf)))
        }
        // They hold the file's `busy` (no VM-level request touches vCPUs meanwhile) and their
        // vCPU (not running), and touch neither the VM nor the controls: other vCPUs keep
        // running.
        Request::GetRegs { vcpu } | Request::SetRegs { vcpu, .. } => {
            if f.busy.swap(true, Ordering::Acquire) {
                return -EBUSY;
            }
            let r = with_idle_vcpu(f, vcpu, |hw| match req {
                Request::SetRegs { regs, .. } => {
                    hw.set_regs(&regs);
                    Ok(0)
                }
                _ => enc(hw.regs().to_bytes(&mut buf)),
            })
            .and_then(|r| r);
            f.busy.store(false, Ordering::Release);
            r
        }
        _ => {
            if f.busy.swap(true, Ordering::Acquire) {
                return -EBUSY;
            }
            // Setup has no vCPU to kick yet (`ready` is false until it succeeds).
            let kick = !matches!(req, Request::Setup { .. });
            if kick {
                f.kick_all();
            }
            // SAFETY: `busy` excludes other VM-level requests, and the kick (or, for Setup, the
            // absence of vCPUs) excludes every vCPU, so this thread alone uses the VM and the
            // controls now.
            let (vm, ctls) = unsafe { (&mut *f.vm.vm.get(), &mut *f.ctls.get()) };
            let r = handle(f, g, vm, ctls, req, &mut buf);
            if kick {
                f.unkick();
            }
            f.busy.store(false, Ordering::Release);
            r
        }
    };
    match out {
        Ok(len) if len > 0 => copy_out(arg, &buf[..len]).map_or_else(|e| e, |_| 0),
        Ok(_) => 0,
        Err(e) => e,
    }
}

/// INVEPT on every CPU (SDM 29.4.3.4) when the EPT asks for it.
fn invept_vm(vm: &mut Vm, p: &LinuxPlatform) {
    if vm.ept().needs_invept() {
        // SAFETY: runs INVEPT in IPI context on each CPU.
        unsafe { smudge_on_each_cpu(invept_on_cpu, core::ptr::null_mut()) };
        vm.ept_mut().invept_done(p);
    }
}

/// Frees the vCPUs (no request of the file in progress but the caller's).
fn free_vcpus(f: &VmFile, p: &LinuxPlatform) {
    f.nr_vcpus.store(0, Ordering::Release);
    for ptr in f.vcpus.iter() {
        let raw = ptr.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if raw.is_null() {
            continue;
        }
        // SAFETY: published by add_vcpu from KBox::into_raw, taken back exactly once (the swap);
        // no RUN is in progress, so nobody else references the vCPU.
        let slot = unsafe { KBox::from_raw(raw) };
        // SAFETY: as above.
        let v = unsafe { &mut *slot.v.get() };
        if v.cpu >= 0 {
            // SAFETY: VMCLEAR on the CPU that has the VMCS active.
            unsafe { smudge_on_cpu(v.cpu, vmclear_on_cpu, v.hw.pages.vmcs as *mut c_void) };
            v.cpu = -1;
        }
        v.hw.free_pages(p);
    }
}

/// Runs `op` on vCPU `index` between its runs: a RUN of it in progress gets -EBUSY.
fn with_idle_vcpu<R>(
    f: &VmFile,
    index: u32,
    op: impl FnOnce(&mut HwVcpu) -> R,
) -> core::result::Result<R, c_long> {
    let slot = f.vcpu(index).ok_or(-EINVAL)?;
    if slot.busy.swap(true, Ordering::Acquire) {
        return Err(-EBUSY);
    }
    // SAFETY: `slot.busy` excludes its RUN, the file's `busy` every other request that touches
    // vCPU state.
    let r = op(&mut unsafe { &mut *slot.v.get() }.hw);
    slot.busy.store(false, Ordering::Release);
    Ok(r)
}

fn handle(
    f: &VmFile,
    g: &Global,
    vm_slot: &mut Option<Vm>,
    ctls_slot: &mut Option<Controls>,
    req: Request,
    buf: &mut [u8; 1024],
) -> core::result::Result<usize, c_long> {
    let p = LinuxPlatform;
    let enc = |r: core::result::Result<usize, abi::AbiError>| r.map_err(|_| -EINVAL);
    match req {
        Request::Setup {
            mode,
            mem_bytes,
            vcpus,
            page_limit,
        } => {
            if vm_slot.is_some() || f.ready.load(Ordering::Acquire) {
                return Err(-EBUSY);
            }
            let (mode, ctls) = answer::mode_controls(&g.caps, g.mode, mode).map_err(core_err)?;
            let mut vm = Vm::new(&p, g.caps.ept_features(), mode, page_limit).map_err(core_err)?;
            if let Err(e) = vm.add_ram(&p, mem_bytes) {
                vm.destroy(&p);
                return Err(core_err(e));
            }
            for _ in 0..vcpus {
                if let Err(e) = add_vcpu(f, &p, g, &vm) {
                    free_vcpus(f, &p);
                    vm.destroy(&p);
                    return Err(e);
                }
            }
            *vm_slot = Some(vm);
            *ctls_slot = Some(ctls);
            f.ready.store(true, Ordering::Release);
            Ok(0)
        }
        Request::LoadElf { image, len } => {
            let vm = vm_slot.as_mut().ok_or(-EINVAL)?;
            let mut bytes = KernBuf::zeroed(len as usize)?;
            copy_in(bytes.bytes_mut(), image as usize)?;
            let entry = match vm.load_elf(&p, bytes.bytes()) {
                Ok(e) => e,
                // No log line: any user could flood the kernel log with bad images. The tool
                // checks the image with the same loader first and prints the precise reason.
                Err(smudge_core::vm::LoadError::Elf(_)) => return Err(-ENOEXEC),
                Err(smudge_core::vm::LoadError::Vm(e)) => return Err(core_err(e)),
            };
            for slot in f.vcpus() {
                // SAFETY: every vCPU is kicked out; this thread alone uses them.
                let hw = unsafe { &mut (*slot.v.get()).hw };
                hw.load_entry(entry);
            }
            enc(abi::LoadElfResp { entry }.to_bytes(buf))
        }
        // Served by `ioctl` without the VM.
        Request::Run { .. } | Request::GetRegs { .. } | Request::SetRegs { .. } => Err(-EINVAL),
        Request::AddSlot { gpa, size } => {
            let vm = vm_slot.as_mut().ok_or(-EINVAL)?;
            let slot = vm.add_slot(&p, gpa, size).map_err(core_err)?;
            // A new slot only fills EPT entries that were not present; the INVEPT its clean-up
            // asks for is cheap and keeps the rule simple.
            invept_vm(vm, &p);
            enc(abi::AddSlotResp {
                slot: slot as u32,
                reserved: 0,
            }
            .to_bytes(buf))
        }
        Request::CreateVcpu => {
            let vm = vm_slot.as_ref().ok_or(-EINVAL)?;
            let index = f.nr_vcpus.load(Ordering::Acquire);
            if index >= abi::MAX_VCPUS {
                return Err(-ENOSPC);
            }
            add_vcpu(f, &p, g, vm)?;
            enc(abi::CreateVcpuResp {
                vcpu: index,
                reserved: 0,
            }
            .to_bytes(buf))
        }
        Request::SetMode { mode } => {
            let vm = vm_slot.as_mut().ok_or(-EINVAL)?;
            let (mode, ctls) = answer::mode_controls(&g.caps, g.mode, mode).map_err(core_err)?;
            vm.set_mode(&p, mode).map_err(core_err)?;
            invept_vm(vm, &p);
            *ctls_slot = Some(ctls);
            Ok(0)
        }
        Request::DirtyLog {
            slot,
            bitmap,
            bitmap_len,
            harvest,
        } => {
            let vm = vm_slot.as_mut().ok_or(-EINVAL)?;
            let pages = vm
                .slots()
                .find(|(i, _)| *i == slot as usize)
                .map(|(_, s)| s.pages)
                .ok_or(-EINVAL)?;
            let words = pages.div_ceil(64) as usize;
            if bitmap_len < words as u64 * 8 {
                return Err(-EINVAL);
            }
            let mut bits = KernBuf::zeroed(words * 8)?;
            if harvest {
                vm.harvest(&p, slot as usize, bits.words_mut())
                    .map_err(core_err)?;
            } else {
                vm.get_dirty_log(&p, slot as usize, bits.words_mut())
                    .map_err(core_err)?;
            }
            invept_vm(vm, &p);
            copy_out(bitmap as usize, bits.bytes())?;
            Ok(0)
        }
        Request::ClearDirtyLog {
            slot,
            first_page,
            num_pages,
            mask,
        } => {
            let vm = vm_slot.as_mut().ok_or(-EINVAL)?;
            let words = num_pages.div_ceil(64) as usize;
            let mut m = KernBuf::zeroed(words * 8)?;
            copy_in(m.bytes_mut(), mask as usize)?;
            vm.clear_dirty_log(&p, slot as usize, first_page, num_pages, m.words_mut())
                .map_err(core_err)?;
            invept_vm(vm, &p);
            Ok(0)
        }
        Request::Stats => {
            let mut s = abi::StatsResp::default();
            s.vm_pages = vm_slot.as_ref().map_or(0, |v| v.pages_held()) + f.vcpu_pages();
            s.driver_pages = budget().held();
            s.mode = vm_slot.as_ref().map_or(0, |v| v.mode() as u32);
            s.vcpus = f.nr_vcpus.load(Ordering::Acquire);
            for slot in f.vcpus() {
                // SAFETY: every vCPU is kicked out.
                let v = unsafe { &*slot.v.get() };
                for (a, b) in s.exits.iter_mut().zip(v.hw.state.exits.iter()) {
                    *a += *b;
                }
            }
            enc(s.to_bytes(buf))
        }
        Request::Caps => {
            let c = answer::caps_resp(&g.caps, g.mode, &mut |m| rdmsr_safe(m).value());
            enc(c.to_bytes(buf))
        }
        Request::Explain { gpa, user_va } => {
            let vm = vm_slot.as_ref().ok_or(-EINVAL)?;
            let mut r = smudge_core::answer::explain_guest(vm, &p, gpa).map_err(core_err)?;
            if r.ept_leaf != 0 {
                // SAFETY: the direct-map address of a page the VM owns; lookup_address only reads.
                unsafe {
                    r.host_va = smudge_va(r.hpa) as u64;
                    let mut level = 0u32;
                    r.host_pte = smudge_host_pte(r.host_va as usize, &mut level);
                    r.host_level = level;
                }
                if user_va != 0 {
                    let mut level = 0u32;
                    // SAFETY: walks the calling process's own page tables under its mmap lock.
                    let pte = unsafe { smudge_user_pte(user_va as usize, &mut level) };
                    // Report it only if it maps this very backing page.
                    if level != 0 && pte & 0x000f_ffff_ffff_f000 == r.hpa {
                        r.user_pte = pte;
                        r.user_level = level;
                    }
                }
            }
            enc(r.to_bytes(buf))
        }
        Request::Mem {
            gpa,
            buf: ubuf,
            len,
            write,
        } => {
            let vm = vm_slot.as_mut().ok_or(-EINVAL)?;
            let mut tmp = KernBuf::zeroed(len as usize)?;
            if write {
                copy_in(tmp.bytes_mut(), ubuf as usize)?;
                vm.write_guest(&p, gpa, tmp.bytes()).map_err(core_err)?;
            } else {
                vm.read_guest(&p, gpa, tmp.bytes_mut()).map_err(core_err)?;
                copy_out(ubuf as usize, tmp.bytes())?;
            }
            Ok(0)
        }
    }
}

/// Creates the next vCPU of `vm` and publishes it. Only VM-level requests call it (the
/// file's `busy` held), so indices cannot race.
fn add_vcpu(
    f: &VmFile,
    p: &LinuxPlatform,
    g: &Global,
    vm: &Vm,
) -> core::result::Result<(), c_long> {
    let index = f.nr_vcpus.load(Ordering::Acquire);
    let ptr = f.vcpus.get(index as usize).ok_or(-ENOSPC)?;
    let (rip, rsp) = answer::vcpu_entry(vm, index).map_err(core_err)?;
    let pages = VcpuPages::alloc(p, &g.caps).map_err(core_err)?;
    let v = LinuxVcpu {
        hw: HwVcpu::new(index, pages, rip, rsp),
        cpu: -1,
    };
    let b = match KBox::new(
        VcpuSlot {
            busy: AtomicBool::new(false),
            v: UnsafeCell::new(v),
        },
        GFP_KERNEL_ACCOUNT | __GFP_NOWARN,
    ) {
        Ok(b) => b,
        Err(_) => {
            let mut pages = pages;
            pages.free(p);
            return Err(-ENOMEM);
        }
    };
    ptr.store(KBox::into_raw(b), Ordering::Release);
    f.nr_vcpus.store(index + 1, Ordering::Release);
    Ok(())
}

/// The run loop's view of the OS.
struct LinuxEnv<'a> {
    kick: &'a AtomicBool,
}

impl RunEnv for LinuxEnv<'_> {
    fn irq_save(&self) -> usize {
        // SAFETY: local_irq_save.
        unsafe { smudge_irq_save() }
    }
    fn irq_restore(&self, flags: usize) {
        // SAFETY: restores what irq_save returned.
        unsafe { smudge_irq_restore(flags) }
    }
    fn should_return(&self) -> bool {
        // SAFETY: reads current's flags.
        self.kick.load(Ordering::SeqCst) || unsafe { smudge_should_return() != 0 }
    }
}

fn run_request(f: &VmFile, g: &Global, index: u32) -> core::result::Result<abi::RunResp, c_long> {
    if !f.ready.load(Ordering::Acquire) {
        return Err(-EINVAL);
    }
    let slot = f.vcpu(index).ok_or(-EINVAL)?;
    if slot.busy.swap(true, Ordering::Acquire) {
        return Err(-EBUSY);
    }
    let r = run(f, g, slot);
    slot.busy.store(false, Ordering::Release);
    r
}

/// Waits while a VM-level request has the vCPUs kicked out. Returns false on a signal.
fn wait_unkicked(f: &VmFile) -> bool {
    while f.kick.load(Ordering::SeqCst) {
        // SAFETY: process context, may sleep; reads current's flags.
        unsafe {
            smudge_cond_resched();
            if smudge_should_return() != 0 && f.kick.load(Ordering::SeqCst) {
                // A reschedule request alone is served by cond_resched; only leave on signals.
                smudge_cond_resched();
            }
        }
        core::hint::spin_loop();
    }
    true
}

fn run(f: &VmFile, g: &Global, slot: &VcpuSlot) -> core::result::Result<abi::RunResp, c_long> {
    let p = LinuxPlatform;
    // `ready` (checked by the caller) means Setup put the VM in place; only release removes it.
    let vm = LockedVm {
        locked: &f.vm.locked,
        vm: f
            .vm
            .with(|vm| vm.as_mut().map(core::ptr::NonNull::from))
            .ok_or(-EINVAL)?,
    };
    let mut resp = abi::RunResp::default();
    let env = LinuxEnv { kick: &f.kick };
    let vp = slot.v.get();
    // Every use of the vCPU below happens while this thread counts in `running` (between
    // `enter` and the matching decrement): VM-level requests that touch vCPUs (LOAD_ELF, STATS)
    // run only while `running` is 0.
    let result = loop {
        enter(f);
        // SAFETY: `slot.busy` makes this thread the vCPU's only RUN, and it counts in `running`.
        let v = unsafe { &mut *vp };
        if !v.hw.programmed {
            // SAFETY: reads a module parameter.
            let bad = unsafe { smudge_test_bad_vmcs() };
            let cr0 = smudge_core::vmx::setup::fix_cr(
                smudge_core::guest::CR0,
                g.caps.cr0_fixed0,
                g.caps.cr0_fixed1,
            );
            v.hw.debug_override = match bad {
                1 | 2 => Some((
                    smudge_core::vmx::fields::Field::GuestCr0,
                    cr0 & !1,
                    bad == 2,
                )),
                _ => None,
            };
        }
        // SAFETY: inside the kick protocol: Setup and SET_MODE write the controls only while
        // `running` is 0, and this vCPU counts in `running` until it leaves the loop body.
        let Some(ctls) = (unsafe { *f.ctls.get() }) else {
            f.running.fetch_sub(1, Ordering::SeqCst);
            return Err(-EINVAL);
        };
        // Preemption is still on: GFP_KERNEL may sleep. The exit handler backs guest memory
        // from this cache only (never with GFP_ATOMIC).
        v.hw.cache.refill(&p);
        // SAFETY: kernel_fpu_begin disables preemption and lets the guest own the FPU.
        unsafe { smudge_fpu_begin() };
        // SAFETY: preemption is off.
        let cpu = unsafe { smudge_cpu() };
        if cpu as usize >= MAX_CPUS || !VMX_ON[cpu as usize].load(Ordering::Acquire) {
            // SAFETY: pairs with fpu_begin.
            unsafe { smudge_fpu_end() };
            f.running.fetch_sub(1, Ordering::SeqCst);
            return Err(-EIO);
        }
        if v.cpu != cpu {
            if v.cpu >= 0 {
                // SAFETY: SDM 24.11.1: a VMCS moves between CPUs only through VMCLEAR on the
                // old one. smp_call_function_single may be called with preemption off.
                unsafe { smudge_on_cpu(v.cpu, vmclear_on_cpu, v.hw.pages.vmcs as *mut c_void) };
            } else {
                // SAFETY: a fresh VMCS must be cleared before its first VMPTRLD (SDM 25.11.3).
                let _ = unsafe { arch::vmclear(v.hw.pages.vmcs) };
            }
            v.hw.launched = false;
            v.cpu = cpu;
        }
        // SAFETY: VMX is on here, preemption is off, the FPU is ours, the VMCS is clear or
        // active on this CPU.
        let r = unsafe { hw::run(&vm, &mut v.hw, &p, &g.caps, &ctls, &env) };
        // SAFETY: still on the CPU of the VM exits, preemption off: mark its TSS limit stale so
        // Linux reloads TR before a task with an I/O bitmap runs (SDM 28.5.2 sets it to 0x67).
        unsafe { smudge_invalidate_tss_limit() };
        // SAFETY: pairs with fpu_begin.
        unsafe { smudge_fpu_end() };
        match r {
            // Refilled at the top of the loop.
            Ok(HwExit::NeedPages) => {}
            Ok(HwExit::Exit(RunExit::Interrupted)) => {
                if v.hw.state.console_len > 0 {
                    break Ok(RunExit::Console);
                }
                f.running.fetch_sub(1, Ordering::SeqCst);
                // SAFETY: may sleep: preemption is on again.
                unsafe { smudge_cond_resched() };
                // A pending signal returns to user space; a kick or a reschedule continues.
                // SAFETY: reads current's flags.
                if unsafe { smudge_should_return() } != 0 && !f.kick.load(Ordering::SeqCst) {
                    enter(f);
                    break Ok(RunExit::Interrupted);
                }
                continue;
            }
            Ok(HwExit::Exit(x)) => break Ok(x),
            Err(e) => break Err(e),
        }
        f.running.fetch_sub(1, Ordering::SeqCst);
    };
    // SAFETY: as above: still counted in `running`.
    let v = unsafe { &mut *vp };
    answer::take_console(&mut resp, &mut v.hw.state);
    answer::fill_run(&mut resp, result, &mut v.hw.state);
    f.running.fetch_sub(1, Ordering::SeqCst);
    Ok(resp)
}

/// Counts this thread in `running` once no VM-level request has the vCPUs kicked out. With
/// SeqCst on both sides, a VM-level request either sees this vCPU running and waits, or this
/// vCPU sees the kick, backs out and waits. The caller decrements `running` when it is done.
fn enter(f: &VmFile) {
    loop {
        f.running.fetch_add(1, Ordering::SeqCst);
        if !f.kick.load(Ordering::SeqCst) {
            return;
        }
        f.running.fetch_sub(1, Ordering::SeqCst);
        wait_unkicked(f);
    }
}

/// A small stack buffer for formatted messages.
struct MsgBuf {
    b: [u8; 480],
    n: usize,
}

impl MsgBuf {
    fn new() -> MsgBuf {
        MsgBuf { b: [0; 480], n: 0 }
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.b[..self.n]).unwrap_or("")
    }
}

impl core::fmt::Write for MsgBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.b.len() - self.n;
        let k = s.len().min(room);
        self.b[self.n..self.n + k].copy_from_slice(&s.as_bytes()[..k]);
        self.n += k;
        Ok(())
    }
}

struct Smudge;

impl kernel::Module for Smudge {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let caps = live_caps();
        // Refuse precisely: VMX absent, disabled and locked, EPT absent, another hypervisor.
        // SAFETY: reads CR4 through the kernel's shadow.
        if unsafe { smudge_cr4_read() } & (1 << 13) != 0 {
            pr_err!("CR4.VMXE is already set: another hypervisor is in VMX operation\n");
            return Err(EBUSY_ERR);
        }
        let mode = match caps.choose_mode(false) {
            Ok(m) => m,
            Err(u) => {
                let mut msg = MsgBuf::new();
                let _ = core::fmt::write(&mut msg, format_args!("{}", u));
                pr_err!("cannot load: {}\n", msg.as_str());
                return Err(ENODEV_ERR);
            }
        };
        // SAFETY: reads the CPU count.
        let ncpu = (unsafe { smudge_nr_cpu_ids() } as usize).min(MAX_CPUS);
        let p = LinuxPlatform;
        let mut vmxon = [0u64; MAX_CPUS];
        for slot in vmxon.iter_mut().take(ncpu) {
            match LinuxPlatform::os_alloc() {
                Some(pg) => {
                    // SDM 25.11.5: the VMXON region starts with the revision identifier.
                    write_revision_id(&p, pg, &caps);
                    *slot = pg;
                }
                None => {
                    for pg in vmxon.iter().filter(|&&x| x != 0) {
                        LinuxPlatform::os_free(*pg);
                    }
                    return Err(ENOMEM_ERR);
                }
            }
        }
        // SAFETY: single-threaded init: nobody reads GLOBAL yet.
        unsafe { *core::ptr::addr_of_mut!(GLOBAL) = Some(Global { caps, mode, vmxon }) };
        // SAFETY: VMXON on every CPU in IPI context.
        unsafe { smudge_on_each_cpu(vmxon_this_cpu, core::ptr::null_mut()) };
        let failed = VMXON_FAILED.load(Ordering::Relaxed);
        if failed != 0 {
            pr_err!(
                "VMXON failed on CPUs {:#x} (another hypervisor, or CR0/CR4 fixed bits)\n",
                failed
            );
            teardown();
            return Err(EBUSY_ERR);
        }
        // SAFETY: registers the notifiers and the misc device (C glue).
        unsafe { smudge_notifiers_register() };
        // SAFETY: C glue.
        if unsafe { smudge_misc_register() } != 0 {
            // SAFETY: C glue.
            unsafe { smudge_notifiers_unregister() };
            teardown();
            return Err(EBUSY_ERR);
        }
        pr_info!(
            "VMX on {} CPUs, EPT A/D {}, PML {}, dirty tracking mode: {}\n",
            ncpu,
            caps.ept_ad(),
            caps.pml(),
            mode.name()
        );
        Ok(Smudge)
    }
}

const EBUSY_ERR: kernel::error::Error = kernel::error::code::EBUSY;
const ENODEV_ERR: kernel::error::Error = kernel::error::code::ENODEV;
const ENOMEM_ERR: kernel::error::Error = kernel::error::code::ENOMEM;

fn teardown() {
    // SAFETY: VMXOFF where this module did VMXON.
    unsafe { smudge_on_each_cpu(vmxoff_this_cpu, core::ptr::null_mut()) };
    if let Some(g) = global() {
        for pg in g.vmxon.iter().filter(|&&x| x != 0) {
            LinuxPlatform::os_free(*pg);
        }
    }
    // SAFETY: no CPU uses GLOBAL any more (device gone, VMX off).
    unsafe { *core::ptr::addr_of_mut!(GLOBAL) = None };
}

impl Drop for Smudge {
    fn drop(&mut self) {
        // SAFETY: C glue; open files pin the module, so no VM exists here.
        unsafe {
            smudge_misc_deregister();
            smudge_notifiers_unregister();
        }
        teardown();
        pr_info!("unloaded, {} pages held\n", budget().held());
    }
}
