// SPDX-License-Identifier: GPL-2.0

//! smudge.ko: the Linux shim around smudge-core.
//!
//! Module init and exit (VMX operation on every CPU), the `/dev/smudge` file operations (one
//! open = one `smudge_core::session::Session`), and the one implementation of the core's OS
//! seam ([`LinuxOs`]). What a request does is decided in the core's session layer.

use core::ffi::{c_long, c_void};
use core::sync::atomic::AtomicU64;

use kernel::bindings;
use kernel::prelude::*;
use kernel::uaccess::UserSlice;
use smudge_core::abi::{self, Op};
use smudge_core::arch::{self, direct_map, DirectMap, RawAlloc, RawBox};
use smudge_core::hostmem::{self, PageBudget};
use smudge_core::platform::{AllocError, PageMut, PageWords, PinError, Platform};
use smudge_core::regs::CR4_VMXE;
use smudge_core::session;
use smudge_core::session::load::{self, driver};
use smudge_core::session::{Fail, HostMapping, Os, RunPolicy, Session, SessionBox};
use smudge_core::spec::{Duties, KernelChoices};
use smudge_core::vmx::admission;
use smudge_core::vmx::caps::MsrValue;
use smudge_core::vmx::hw::{self, Hardware};
use smudge_core::vmx::root::{ControlRegs, Processors, ThisCpu, ROOT};

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
    fn smudge_force_barriers() -> bool;
    fn smudge_probe_host() -> bool;
    fn smudge_kernel_choices(k: *mut KernelChoices);
    /// The module parameter `pages_held` (an `unsigned long`, updated only atomically).
    static smudge_pages_held_count: AtomicU64;
    fn smudge_max_pages() -> u64;
    fn smudge_reserve_pages() -> u64;
    fn smudge_totalram_pages() -> u64;
    fn smudge_hotplug_register() -> i32;
    fn smudge_hotplug_unregister();
    fn smudge_notifiers_register();
    fn smudge_register() -> i32;
    fn smudge_devices_unregister();
    fn smudge_notifiers_unregister();
    fn smudge_irq_save() -> usize;
    fn smudge_irq_restore(flags: usize);
    fn smudge_rdmsr_safe(msr: u32, val: *mut u64) -> i32;
    fn smudge_va(pa: u64) -> *mut c_void;
    fn smudge_pa(va: *const c_void) -> u64;
    fn smudge_get_zeroed_page() -> usize;
    fn smudge_kvzalloc(n: usize) -> *mut c_void;
    fn smudge_fpu_begin();
    fn smudge_invalidate_tss_limit();
    fn smudge_fpu_end();
    fn smudge_cpu() -> i32;
    fn smudge_cpu_online(cpu: i32) -> bool;
    fn smudge_need_resched() -> i32;
    fn smudge_cond_resched();
    fn smudge_host_pte(va: usize, level: *mut u32) -> u64;
    fn smudge_user_pte(va: usize, level: *mut u32) -> u64;
    fn smudge_remap_page(vma: *mut c_void, index: usize, pfn: usize) -> i32;
    fn smudge_kvm_param() -> bool;
    fn smudge_kvm_mode() -> i32;
    fn smudge_sigmask_enter(mask: u64);
    fn smudge_sigmask_leave();
    fn smudge_pin_user_pages(uaddr: usize, n: usize, hpas: *mut u64) -> isize;
    fn smudge_unpin_user_page(hpa: u64);
}

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

/// A zeroed page from the kernel (helpers.c: fails instead of OOM-killing, charged to the
/// memory cgroup), uncounted; none when that would leave the host less than core's reserve.
fn os_alloc() -> Option<u64> {
    // SAFETY: plain C calls; the page is zeroed by get_zeroed_page.
    unsafe {
        let room = hostmem::above_reserve(
            bindings::si_mem_available() as u64,
            smudge_reserve_pages(),
            smudge_totalram_pages(),
        );
        if smudge_fault_inject() != 0 || !room {
            return None;
        }
        let va = smudge_get_zeroed_page();
        (va != 0).then(|| smudge_pa(va as *const c_void))
    }
}

fn os_free(hpa: u64) {
    // SAFETY: `hpa` came from os_alloc, so its direct-map address is a page we own.
    unsafe { bindings::free_pages(smudge_va(hpa) as usize, 0) }
}

/// Linux for the core: pages through the direct map (counted by [`budget`]), the rest of the
/// session's OS seam. The run loop never allocates while preemption is off: guest memory is
/// backed from the vCPU's page cache, refilled before each entry.
struct LinuxOs;

impl Platform for LinuxOs {
    fn alloc_page(&self) -> Result<u64, AllocError> {
        budget().alloc(os_alloc)
    }
    fn free_page(&self, hpa: u64) {
        budget().free(|| os_free(hpa))
    }
    fn page(&self, hpa: u64) -> &PageWords {
        // SAFETY: the core passes only pages of alloc_page it still holds (the trait's contract).
        unsafe { direct_map::page(self, hpa) }
    }
    fn with_page_mut(&self, hpa: u64, f: &mut dyn FnMut(PageMut<'_>)) {
        // SAFETY: as in `page`, lent only while nothing else uses it (the trait's contract).
        unsafe { direct_map::with_page_mut(self, hpa, f) }
    }
    fn pin_user_pages(&self, uaddr: u64, hpas: &mut [u64]) -> Result<usize, PinError> {
        // SAFETY: pins pages of the calling process's own memory; `hpas` holds that many.
        match unsafe { smudge_pin_user_pages(uaddr as usize, hpas.len(), hpas.as_mut_ptr()) } {
            n if n > 0 => Ok(n as usize),
            -12 => Err(PinError::OutOfMemory),
            // -EFAULT (or a page that cannot be pinned for writing).
            _ => Err(PinError::Fault),
        }
    }
    fn unpin_user_page(&self, hpa: u64) {
        // SAFETY: a page pin_user_pages pinned for this VM.
        unsafe { smudge_unpin_user_page(hpa) }
    }
}

// SAFETY: the core's pages come from get_zeroed_page, which the direct map covers.
unsafe impl DirectMap for LinuxOs {
    fn va(&self, hpa: u64) -> *mut u8 {
        // SAFETY: __va only computes the address.
        unsafe { smudge_va(hpa).cast() }
    }
}

/// kvzalloc for the core's objects (helpers.c: under the flags of guest pages, which fail
/// instead of waking the OOM killer; the 6.12 Rust allocator flags lack __GFP_RETRY_MAYFAIL).
struct Kv;

// SAFETY: kvzalloc returns null or zeroed memory; kmalloc aligns a size to its largest
// power-of-two divisor (slab.h), at least 16 here, and vmalloc to a page. kvfree frees it in
// process context, where every value holding it is dropped.
unsafe impl RawAlloc for Kv {
    fn alloc_zeroed(bytes: usize) -> *mut u8 {
        // SAFETY: a plain allocation.
        unsafe { smudge_kvzalloc(bytes).cast() }
    }
    unsafe fn free(p: *mut u8, _bytes: usize) {
        // SAFETY: from kvzalloc, freed once (the caller's contract).
        unsafe { bindings::kvfree(p.cast()) }
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

impl Os for LinuxOs {
    type Alloc = Kv;
    type Pin = ();
    type Cpu<'a> = Hardware<'a>;
    /// Back to user space only for a signal or a real exit; a reschedule is served in place.
    const POLICY: RunPolicy = RunPolicy {
        stay_ns: None,
        slice_ns: None,
    };

    fn copy_from_user(&self, dst: &mut [u8], src: u64) -> Result<(), Fail> {
        let mut r = UserSlice::new(src as usize, dst.len()).reader();
        r.read_slice(dst).map_err(|_| Fail::Fault)
    }
    fn copy_to_user(&self, dst: u64, src: &[u8]) -> Result<(), Fail> {
        let mut w = UserSlice::new(dst as usize, src.len()).writer();
        w.write_slice(src).map_err(|_| Fail::Fault)
    }
    fn processors(&self) -> &dyn Processors {
        &LinuxCpus
    }
    fn pin(&self, _cpu: u32) -> Result<(), Fail> {
        Ok(())
    }
    fn with_guest_context<R>(&self, f: impl FnOnce(&mut Hardware<'_>) -> R) -> Result<R, Fail> {
        let debugctl = || rdmsr_safe(arch::IA32_DEBUGCTL).value();
        // SAFETY: kernel_fpu_begin disables preemption and saves the task's FPU state until
        // kernel_fpu_end; the TSS limit is marked stale while still on the CPU of the VM exits,
        // so Linux reloads TR before a task with an I/O bitmap runs (SDM 28.5.2 sets it to 0x67).
        unsafe {
            smudge_fpu_begin();
            let r = hw::on_guest_cpu(smudge_cpu() as u32, debugctl, f);
            smudge_invalidate_tss_limit();
            smudge_fpu_end();
            r.ok_or(Fail::Io)
        }
    }
    fn signal_pending(&self) -> bool {
        kernel::current!().signal_pending()
    }
    fn resched_pending(&self) -> bool {
        // SAFETY: reads current's flags.
        unsafe { smudge_need_resched() != 0 }
    }
    fn resched(&self) {
        // SAFETY: process context, preemption on.
        unsafe { smudge_cond_resched() }
    }
    fn pause(&self, _waited_ns: u64) {
        // SAFETY: process context, may sleep.
        unsafe { smudge_cond_resched() };
        core::hint::spin_loop();
    }
    fn now_ns(&self) -> u64 {
        kernel::time::Ktime::ktime_get().to_ns() as u64
    }
    fn host_mapping(&self, hpa: u64) -> Option<HostMapping> {
        let (va, mut level) = (self.va(hpa) as u64, 0u32);
        // SAFETY: the direct-map address of a page the VM owns; lookup_address only reads.
        let pte = unsafe { smudge_host_pte(va as usize, &mut level) };
        Some(HostMapping { va, pte, level })
    }
    fn user_pte(&self, va: u64) -> Option<(u64, u32)> {
        let mut level = 0u32;
        // SAFETY: walks the calling process's own page tables under its mmap lock.
        let pte = unsafe { smudge_user_pte(va as usize, &mut level) };
        (level != 0).then_some((pte, level))
    }
    fn rdmsr(&self, msr: u32) -> Option<u64> {
        rdmsr_safe(msr).value()
    }
    fn driver_pages(&self) -> u64 {
        budget().held()
    }
    fn test_bad_vmcs(&self) -> u32 {
        // SAFETY: reads a module parameter.
        unsafe { smudge_test_bad_vmcs() as u32 }
    }
    fn tsc_khz(&self) -> u64 {
        // SAFETY: reads the kernel's tsc_khz.
        u64::from(unsafe { bindings::tsc_khz })
    }
    fn signal_mask_enter(&self, mask: u64) {
        // SAFETY: sigprocmask of the calling thread, its own mask kept in real_blocked.
        unsafe { smudge_sigmask_enter(mask) }
    }
    fn signal_mask_leave(&self) {
        // SAFETY: sigprocmask of the calling thread back to its real_blocked.
        unsafe { smudge_sigmask_leave() }
    }
    fn log(&self, line: &str) {
        pr_info!("{}\n", line);
    }
}

/// A file's `private_data`: its session, from smudge_rs_open until release.
type LinuxSession = Session<LinuxOs>;

/// open of `/dev/smudge`: a new session for the file's `private_data` (`out`), or -errno.
#[no_mangle]
pub extern "C" fn smudge_rs_open(out: *mut *mut c_void) -> c_long {
    Fail::ret(session::open::<LinuxOs>().map(|b| {
        // SAFETY: `out` is the C caller's local.
        unsafe { *out = RawBox::into_raw(b).cast() };
        0
    }))
}

/// Release of a `/dev/smudge` file: its session and everything it holds go.
#[no_mangle]
pub extern "C" fn smudge_rs_release(priv_: *mut c_void) {
    // SAFETY: from RawBox::into_raw in open (or null); release is its last user.
    if let Some(b) = unsafe { SessionBox::<LinuxOs>::from_raw(priv_.cast()) } {
        session::close(&LinuxOs, b);
    }
}

/// mmap of `/dev/smudge` (`kvm` false; `obj` its session: the backed pages of guest RAM from
/// page `pgoff`, read-only) or of a vCPU descriptor (`obj` its handle: the `kvm_run` page at
/// offset 0, the dirty ring further on) into `vma`; helpers.c checked the flags. 0 or -errno.
#[no_mangle]
pub extern "C" fn smudge_rs_mmap(
    obj: *mut c_void,
    vma: *mut c_void,
    pgoff: usize,
    pages: usize,
    kvm: bool,
) -> c_long {
    let (pgoff, pages) = (pgoff as u64, pages as u64);
    let mut remap = |i: u64, pfn: u64| {
        // SAFETY: `vma` is the mapping being set up, page `i` within it (core checks `pages`).
        match unsafe { smudge_remap_page(vma, i as usize, pfn as usize) } {
            0 => Ok(()),
            _ => Err(Fail::NoMemory),
        }
    };
    // SAFETY: the file holds its session or handle until release, which cannot run during mmap.
    let (session, handle) = unsafe {
        if kvm {
            (None, (obj as *const KvmHandle).as_ref())
        } else {
            ((obj as *const LinuxSession).as_ref(), None)
        }
    };
    let r = match (session, handle) {
        (Some(s), _) => s.map_guest(&LinuxOs, pgoff, pages, &mut remap),
        (_, Some(h)) => session::kvm::kvm_mmap(&LinuxOs, h, pgoff, pages, &mut remap),
        _ => Err(Fail::Invalid),
    };
    Fail::ret(r.map(|()| 0))
}

/// An ioctl of `/dev/smudge`: the request at `arg`, answered in place. 0 or -errno.
#[no_mangle]
pub extern "C" fn smudge_rs_ioctl(priv_: *mut c_void, cmd: u32, arg: usize) -> c_long {
    // SAFETY: the file holds the session until release, which cannot run during an ioctl.
    let s = unsafe { (priv_ as *const LinuxSession).as_ref() };
    let (Some(s), Some(drv)) = (s, driver()) else {
        return Fail::ret(Err(Fail::Invalid));
    };
    let Some(op) = Op::from_linux_ioctl(cmd) else {
        return Fail::ret(Err(Fail::NoSuchRequest));
    };
    Fail::ret(s.user_request(&LinuxOs, &drv, op, arg as u64).map(|_| 0))
}

type KvmHandle = session::kvm::KvmHandle<LinuxOs>;

/// A request on `/dev/kvm` (`obj` null) or on a VM or vCPU descriptor (`obj` its private data),
/// answered by the core (`session::kvm::kvm_ioctl`). A new VM or vCPU goes back through `made`
/// for its descriptor, with `made_vm` saying which.
#[no_mangle]
pub extern "C" fn smudge_rs_kvm_ioctl(
    obj: *mut c_void,
    cmd: u32,
    arg: usize,
    made: *mut *mut c_void,
    made_vm: *mut bool,
) -> c_long {
    let Some(drv) = driver() else {
        return Fail::ret(Err(Fail::Io));
    };
    // SAFETY: null, or a descriptor's handle from `made`, which it holds until release (which
    // cannot run during an ioctl); reads a module parameter.
    let (handle, mode) = unsafe { ((obj as *const KvmHandle).as_ref(), smudge_kvm_mode()) };
    let r = session::kvm::kvm_ioctl(&LinuxOs, &drv, handle, cmd, arg as u64, mode as u32);
    Fail::ret(r.map(|(v, new)| {
        if let Some(b) = new {
            // SAFETY: the C caller's locals.
            unsafe { (*made_vm, *made) = (b.is_vm(), RawBox::into_raw(b).cast()) };
        }
        v
    }))
}

/// Release of a KVM descriptor (`made`), or of a handle that got none.
#[no_mangle]
pub extern "C" fn smudge_rs_kvm_put(obj: *mut c_void, made: bool) {
    // SAFETY: from `made` in smudge_rs_kvm_ioctl; release is its last user.
    if let Some(b) = unsafe { RawBox::<KvmHandle, Kv>::from_raw(obj.cast()) } {
        session::kvm::kvm_put(&LinuxOs, b, made);
    }
}

/// CR0 and CR4 through the kernel (a raw write to CR4 would be undone by the next update of the
/// kernel's CR4 shadow).
struct LinuxCr;

impl ControlRegs for LinuxCr {
    fn set_vmxe(&self, on: bool) {
        let (set, clear) = if on { (CR4_VMXE, 0) } else { (0, CR4_VMXE) };
        // SAFETY: with interrupts off (IPI context or the callers'), as cr4_set_bits calls it.
        unsafe { bindings::cr4_update_irqsoff(set as usize, clear as usize) }
    }
}

/// The online CPUs, reached by smp_call_function_single.
struct LinuxCpus;

/// IPI trampoline of [`Processors::on`]: `info` points at the `&mut dyn FnMut` to call.
extern "C" fn call_fn_mut(info: *mut c_void) {
    // SAFETY: `info` is the address of a `&mut dyn FnMut` whose caller waits for this call, so
    // nothing else uses it meanwhile.
    let f = unsafe { &mut *(info as *mut &mut (dyn FnMut() + Send)) };
    f();
}

/// IPI trampoline of [`Processors::on_all`]: `info` points at the `&dyn Fn(cpu)` to call.
extern "C" fn call_fn_here(info: *mut c_void) {
    // SAFETY: `info` is the address of a `&dyn Fn + Sync` whose caller waits for every CPU.
    let f = unsafe { *(info as *const &(dyn Fn(u32) + Sync)) };
    // SAFETY: reads the CPU number (IPI context: interrupts off).
    f(unsafe { smudge_cpu() } as u32);
}

// SAFETY: smp_call_function_single (`on`) and on_each_cpu (`on_all`) run `f` with interrupts
// off on the CPU asked for, and wait for it.
unsafe impl Processors for LinuxCpus {
    fn bound(&self) -> u32 {
        // SAFETY: reads the CPU count.
        unsafe { bindings::nr_cpu_ids }
    }
    fn present(&self, i: u32) -> bool {
        // SAFETY: reads the online mask.
        unsafe { smudge_cpu_online(i as i32) }
    }
    fn current(&self) -> u32 {
        // SAFETY: reads the CPU number.
        unsafe { smudge_cpu() as u32 }
    }
    fn on(&self, i: u32, mut f: &mut (dyn FnMut() + Send)) -> bool {
        let info = &mut f as *mut &mut (dyn FnMut() + Send) as *mut c_void;
        // SAFETY: smp_call_function_single waits for `call_fn_mut` (interrupts off there, also
        // when `i` is this CPU), so `info` outlives it.
        unsafe { bindings::smp_call_function_single(i as i32, Some(call_fn_mut), info, 1) == 0 }
    }
    fn on_all(&self, f: &(dyn Fn(u32) + Sync)) {
        let info = &f as *const &(dyn Fn(u32) + Sync) as *mut c_void;
        let online = &raw const bindings::__cpu_online_mask;
        // SAFETY: on_each_cpu runs `call_fn_here` on every online CPU with interrupts off and
        // waits for all, so `info` outlives them; `f` is Sync.
        unsafe { bindings::on_each_cpu_cond_mask(None, Some(call_fn_here), info, true, online) };
    }
    fn cr(&self) -> &(dyn ControlRegs + Sync) {
        &LinuxCr
    }
    fn irq_save(&self) -> usize {
        // SAFETY: local_irq_save.
        unsafe { smudge_irq_save() }
    }
    fn irq_restore(&self, flags: usize) {
        // SAFETY: restores what irq_save returned.
        unsafe { smudge_irq_restore(flags) }
    }
    fn alloc_region(&self) -> Option<u64> {
        // VMXON regions belong to the driver, not to a VM: outside `pages_held` and its cap.
        os_alloc()
    }
    fn free_region(&self, pa: u64) {
        os_free(pa)
    }
}

/// Called by the reboot and panic notifiers and the kernel's emergency virtualization callback,
/// on the CPU they run on.
#[no_mangle]
pub extern "C" fn smudge_rs_emergency_vmxoff() {
    // SAFETY: a notifier or an NMI/IPI handler on this CPU, with interrupts off (helpers.c turns
    // them off around the reboot notifier's call).
    ROOT.emergency_here(unsafe { smudge_cpu() } as u32, &LinuxCr);
}

/// `cpu` came online (CPU hotplug), or woke from a system sleep (the boot CPU, interrupts off):
/// run on it. 1 when it entered VMX operation, 0 when there was nothing to do, or -errno (the
/// CPU then does not come online).
#[no_mangle]
pub extern "C" fn smudge_rs_cpu_online(cpu: u32) -> i32 {
    // SAFETY: the C callers run on `cpu` (the hotplug thread bound to it, or the sleep path with
    // interrupts off there).
    let here = unsafe { ThisCpu::new(&LinuxCpus, cpu) };
    match load::cpu_online(&here, &LinuxOs, cpu, &check_this_cpu) {
        Ok(entered) => i32::from(entered),
        Err(f) => {
            pr_err!("{}\n", f.message().as_str());
            -f.errno()
        }
    }
}

/// `cpu` goes offline (CPU hotplug), or the system goes to sleep (the boot CPU, the last one
/// online, interrupts off): run on it. True if it left VMX operation.
#[no_mangle]
pub extern "C" fn smudge_rs_cpu_offline(cpu: u32) -> bool {
    // SAFETY: as in smudge_rs_cpu_online.
    load::cpu_offline(&unsafe { ThisCpu::new(&LinuxCpus, cpu) }, cpu)
}

/// Called by the reboot and panic notifiers after [`smudge_rs_emergency_vmxoff`]: one line per
/// CPU that left VMX operation on the way down.
#[no_mangle]
pub extern "C" fn smudge_rs_emergency_report() {
    for line in (0..LinuxCpus.bound()).filter_map(|cpu| ROOT.left_in_emergency(cpu)) {
        pr_emerg!("{}\n", line.as_str());
    }
}

struct Smudge;

impl kernel::Module for Smudge {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        // SAFETY: reads module parameters.
        let kvm_mode = unsafe { smudge_kvm_param().then(|| smudge_kvm_mode()) };
        if let Some(m) = kvm_mode.filter(|&m| abi::mode_of(m as u32).is_err()) {
            pr_err!("kvm_mode={m}: 0 (best), 1 (A/D), 2 (PML) or 3 (write-protect)\n");
            return Err(EINVAL);
        }
        // SAFETY: reads module parameters and the kernel's CPU bug and feature bits.
        let (duties, probe) = unsafe {
            let duties = if smudge_force_barriers() {
                Duties::all_on_this_cpu()
            } else {
                let mut k = KernelChoices::default();
                smudge_kernel_choices(&mut k);
                Duties::from_kernel(k)
            };
            (duties, smudge_probe_host())
        };
        // SAFETY: C glue: the reboot and panic notifiers and the emergency callback, first, so
        // that no CPU stays in VMX operation through a reboot or crash from here on.
        unsafe { smudge_notifiers_register() };
        // SAFETY: the CPU-hotplug lock, held from the load to the hotplug registration (or, when
        // that fails, to the unload), so no CPU comes or goes in between; then released.
        let (loaded, hotplug) = unsafe {
            bindings::cpus_read_lock();
            let r = load::load(&LinuxCpus, &LinuxOs, &check_this_cpu, duties, probe);
            let hotplug = r.as_ref().map_or(0, |_| smudge_hotplug_register());
            if hotplug < 0 {
                load::unload(&LinuxCpus);
            }
            bindings::cpus_read_unlock();
            (r, hotplug)
        };
        let r = match (&loaded, hotplug) {
            (Err(f), _) => {
                pr_err!("{}\n", f.message().as_str());
                -f.errno()
            }
            (Ok(_), h) if h < 0 => {
                pr_err!("cannot follow CPU hotplug ({})\n", h);
                h
            }
            // SAFETY: C glue (helpers.c): on failure it leaves no device registered.
            (Ok(_), _) => unsafe { smudge_register() },
        };
        if r < 0 {
            teardown();
            return Err(Error::from_errno(r));
        }
        for line in loaded.iter().flat_map(|l| l.report()) {
            pr_info!("{}\n", line.as_str());
        }
        Ok(Smudge)
    }
}

/// Undoes the load: under the CPU-hotplug lock, so no CPU goes offline (in VMX operation)
/// between the end of the hotplug callbacks and the unload; then, with VMX operation ended, the
/// reboot and panic notifiers go.
fn teardown() {
    // SAFETY: C glue: the lock, the removal of the hotplug state (nothing when not registered)
    // under it, the release, and the notifiers' removal.
    unsafe {
        bindings::cpus_read_lock();
        smudge_hotplug_unregister();
        load::unload(&LinuxCpus);
        bindings::cpus_read_unlock();
        smudge_notifiers_unregister();
    }
}

/// The admission check on the CPU that runs it (at load, on every CPU; on a CPU coming online).
fn check_this_cpu() -> Result<admission::Admission, admission::Refusal> {
    admission::check_here(&LinuxCr, &|m| rdmsr_safe(m).value().unwrap_or(0))
}

impl Drop for Smudge {
    fn drop(&mut self) {
        // SAFETY: C glue; open files pin the module, so no VM exists here.
        unsafe { smudge_devices_unregister() };
        teardown();
        pr_info!("unloaded, {} pages held\n", budget().held());
    }
}
