//! One open of the device is one VM session: its state, the sharing protocol between its
//! requests ([`share`]), the dispatch of every decoded request to its answer, the vCPU
//! lifecycle and the run loop. Written once, over one OS seam ([`Os`]); the Linux module and the
//! Windows driver only adapt their OS to it.
//!
//! Locks: the VM (with the controls) and each vCPU sit behind spin locks that the protocol keeps
//! uncontended: a RUN holds its vCPU's lock, and takes the VM's around exit handling, only while
//! it counts in the run loop; a kicking VM-level request takes them only once no vCPU is in the
//! loop; GET_REGS/SET_REGS take the lock of a vCPU whose RUN claim they hold. The lock order is
//! vCPU, then VM.

pub mod kvm;
pub mod load;
pub mod os;
pub mod share;

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use spin::Mutex;

use crate::abi::{self, Op, Request, Wire};
use crate::answer;
use crate::arch::RawBox;
use crate::dirty::Mode;
use crate::ept::Invept;
use crate::vcpu::VcpuPages;
use crate::vm::{LoadError, RunExit, Vm};
use crate::vmx::caps::{Controls, VmxCaps};
use crate::vmx::fields::Field;
use crate::vmx::hw::{self, HwExit, HwVcpu, RunEnv, SharedVm};

pub use os::{Buffer, Fail, HostMapping, Os, RunPolicy};
use share::{Busy, Share};

const MAX_VCPUS: usize = abi::MAX_VCPUS as usize;

/// What the driver found at load, the same for every session.
#[derive(Clone, Copy, Debug)]
pub struct Driver {
    /// The processor's VMX capabilities.
    pub caps: VmxCaps,
    /// The best dirty-tracking mode they allow (`auto`).
    pub mode: Mode,
    /// The speculation duties around every entry (`spec`).
    pub duties: crate::spec::Duties,
    /// Test-only: compare the host's debug state before each run with the state after every
    /// exit (`abi::Isolation::host_changed`).
    pub probe: bool,
}

/// The VM and the VM-execution controls of its vCPUs (set by SETUP and SET_MODE).
struct VmState {
    vm: Option<Vm>,
    ctls: Option<Controls>,
    /// KVM's view of the VM, for a session of the KVM personality.
    kvm: kvm::KvmVm,
}

/// A vCPU: one RUN (or GET_REGS/SET_REGS) of it at a time.
struct Slot<B> {
    busy: Busy,
    hw: Mutex<Option<B>>,
}

/// A vCPU in OS memory; the session keeps it until the vCPU is freed.
type VcpuBox<O> = RawBox<HwVcpu, <O as Os>::Alloc>;

/// One VM session.
pub struct Session<O: Os> {
    share: Share,
    /// SETUP finished: the VM exists until release.
    ready: AtomicBool,
    vm: Mutex<VmState>,
    slots: [Slot<VcpuBox<O>>; MAX_VCPUS],
    /// vCPUs created; slot `i` is published before this counts it.
    nr_vcpus: AtomicU32,
}

impl<O: Os> Default for Session<O> {
    fn default() -> Self {
        Self::new()
    }
}

/// The answer's bytes, or Invalid when `buf` cannot hold them.
fn enc(r: Result<usize, abi::AbiError>) -> Result<usize, Fail> {
    r.map_err(|_| Fail::Invalid)
}

/// A waiter's pause for the protocol, through the OS.
fn waiter<O: Os>(os: &O) -> impl FnMut() + '_ {
    let start = os.now_ns();
    move || os.pause(os.now_ns().saturating_sub(start))
}

/// Pays what an EPT change of `vm` owes: INVEPT all-context on every CPU in VMX operation, so
/// none keeps a cleared flag, a removed right or a removed entry once a vCPU runs again, then the
/// EPT frees the tables that waited for it. Only while no vCPU is in the run loop (a VM-level
/// request's claim).
fn pay<O: Os>(os: &O, vm: &mut Vm, owed: Invept) {
    let invept = || {
        os.invept_everywhere();
        Ok::<(), core::convert::Infallible>(())
    };
    let Ok(()) = vm.ept_mut().pay(os, owed, invept);
    os.after_free();
}

/// After a VM-level request failed: it may have changed entries before its error, and returned
/// only the error; what the EPT still owes is paid before any vCPU runs again. (A request that
/// succeeded paid what its changes returned.)
fn pay_after_failure<O: Os, T>(os: &O, vm: Option<&mut Vm>, r: &Result<T, Fail>) {
    if let (Some(vm), Err(_)) = (vm, r) {
        let owed = vm.ept().owed();
        pay(os, vm, owed);
    }
}

/// The VM as the run loop sees it: behind its lock, taken only around exit handling.
struct RunVm<'a>(&'a Mutex<VmState>);

impl SharedVm for RunVm<'_> {
    fn with<R, F: FnOnce(&mut Vm) -> R>(&self, f: F) -> Option<R> {
        self.0.lock().vm.as_mut().map(f)
    }
}

/// The run loop's view of the OS and of the protocol for one stay in guest mode.
struct Env<'a, O: Os> {
    os: &'a O,
    drv: &'a Driver,
    share: &'a Share,
    stay_start: u64,
}

impl<O: Os> RunEnv for Env<'_, O> {
    fn irq_save(&self) -> usize {
        self.os.processors().irq_save()
    }
    fn irq_restore(&self, flags: usize) {
        self.os.processors().irq_restore(flags)
    }
    fn should_return(&self) -> bool {
        self.share.kicked()
            || self.os.signal_pending()
            || self.os.resched_pending()
            || O::POLICY
                .stay_ns
                .is_some_and(|s| self.os.now_ns().saturating_sub(self.stay_start) >= s)
    }
    fn vmclear_on(&self, cpu: u32, pages: &VcpuPages) {
        self.os.vmclear_on(cpu, pages)
    }
    fn duties(&self) -> crate::spec::Duties {
        self.drv.duties
    }
    fn probe(&self) -> bool {
        self.drv.probe
    }
}

/// The test hook's VMCS override: guest CR0 with PE cleared (SDM 27.3.1.1 refuses it), checked
/// before VMLAUNCH (1) or left to the processor (2).
fn bad_vmcs_override(hook: u32, caps: &VmxCaps) -> Option<(Field, u64, bool)> {
    let cr0 = crate::vmx::setup::fix_cr(crate::guest::CR0, caps.cr0_fixed0, caps.cr0_fixed1);
    match hook {
        1 | 2 => Some((Field::GuestCr0, cr0 & !1, hook == 2)),
        _ => None,
    }
}

/// A session in OS memory: what one open of the device holds.
pub type SessionBox<O> = RawBox<Session<O>, <O as Os>::Alloc>;

/// An open of the device: a new session (Io while no driver is loaded).
pub fn open<O: Os>() -> Result<SessionBox<O>, Fail> {
    if load::driver().is_none() {
        return Err(Fail::Io);
    }
    SessionBox::<O>::new(Session::new()).map_err(|_| Fail::NoMemory)
}

/// The last close of an open: the session and everything it holds go.
pub fn close<O: Os>(os: &O, mut session: SessionBox<O>) {
    session.release(os);
}

impl<O: Os> Session<O> {
    /// A session without a VM (before SETUP).
    pub fn new() -> Session<O> {
        Session {
            share: Share::new(),
            ready: AtomicBool::new(false),
            vm: Mutex::new(VmState {
                vm: None,
                ctls: None,
                kvm: kvm::KvmVm::default(),
            }),
            slots: core::array::from_fn(|_| Slot {
                busy: Busy::new(),
                hw: Mutex::new(None),
            }),
            nr_vcpus: AtomicU32::new(0),
        }
    }

    /// vCPU `index`, once created.
    fn slot(&self, index: u32) -> Result<&Slot<VcpuBox<O>>, Fail> {
        if index >= self.nr_vcpus.load(Ordering::Acquire) {
            return Err(Fail::Invalid);
        }
        self.slots.get(index as usize).ok_or(Fail::Invalid)
    }

    /// The vCPUs created so far.
    fn created(&self) -> impl Iterator<Item = &Slot<VcpuBox<O>>> {
        let n = self.nr_vcpus.load(Ordering::Acquire) as usize;
        self.slots.iter().take(n)
    }

    /// Serves the request at user address `uaddr` in place (Linux's ioctls: the ioctl number
    /// encodes the sizes): copies `op.request_size()` bytes in, the answer back out; returns the
    /// answer's length.
    pub fn user_request(&self, os: &O, drv: &Driver, op: Op, uaddr: u64) -> Result<usize, Fail> {
        let mut buf = [0u8; abi::MAX_BUFFER];
        let buf = buf.get_mut(..op.buffer_size()).ok_or(Fail::Invalid)?;
        os.copy_from_user(
            buf.get_mut(..op.request_size()).ok_or(Fail::Invalid)?,
            uaddr,
        )?;
        let len = self.request(os, drv, op, buf)?;
        os.copy_to_user(uaddr, buf.get(..len).ok_or(Fail::Invalid)?)?;
        Ok(len)
    }

    /// Serves one request. `buf` holds the request's bytes (at least `op.request_size()`) and
    /// receives the answer; returns the answer's length.
    pub fn request(&self, os: &O, drv: &Driver, op: Op, buf: &mut [u8]) -> Result<usize, Fail> {
        let bytes = buf.get(..op.request_size()).ok_or(Fail::Invalid)?;
        let req = abi::decode(op, bytes).map_err(Fail::Abi)?;
        match req {
            Request::Run { vcpu } => {
                let resp = self.run(os, drv, vcpu)?;
                enc(resp.to_bytes(buf))
            }
            // Only the processor's MSRs: no VM state, no claim.
            Request::Caps => {
                enc(answer::caps_resp(&drv.caps, drv.mode, &mut |m| os.rdmsr(m)).to_bytes(buf))
            }
            // They touch one idle vCPU (its RUN claim held), not the VM: other vCPUs keep
            // running.
            Request::GetRegs { vcpu } => {
                let _claim = self.share.vm_request(false, waiter(os)).ok_or(Fail::Busy)?;
                let regs = self.with_idle_vcpu(vcpu, |hw| hw.regs())?;
                enc(regs.to_bytes(buf))
            }
            Request::SetRegs { vcpu, regs } => {
                let _claim = self.share.vm_request(false, waiter(os)).ok_or(Fail::Busy)?;
                self.with_idle_vcpu(vcpu, |hw| hw.set_regs(&regs))?;
                Ok(0)
            }
            // No vCPU exists to kick before SETUP.
            Request::Setup {
                mode,
                mem_bytes,
                vcpus,
                page_limit,
            } => {
                let _claim = self.share.vm_request(false, waiter(os)).ok_or(Fail::Busy)?;
                self.setup(os, drv, mode, mem_bytes, vcpus, page_limit)
            }
            req => {
                let _claim = self.share.vm_request(true, waiter(os)).ok_or(Fail::Busy)?;
                let mut st = self.vm.lock();
                let r = self.handle(os, drv, &mut st, req, buf);
                // No INVEPT obligation may outlive the kick: vCPUs of other CPUs would run on
                // stale translations.
                pay_after_failure(os, st.vm.as_mut(), &r);
                r
            }
        }
    }

    /// Runs `op` on vCPU `index` between its runs; a RUN of it in progress gets Busy.
    fn with_idle_vcpu<R>(&self, index: u32, op: impl FnOnce(&mut HwVcpu) -> R) -> Result<R, Fail> {
        let slot = self.slot(index)?;
        let _claim = slot.busy.claim().ok_or(Fail::Busy)?;
        let mut hw = slot.hw.lock();
        hw.as_mut().map(|hw| op(hw)).ok_or(Fail::Invalid)
    }

    /// SETUP: the VM, its controls and its first vCPUs. The caller holds the VM-level claim.
    fn setup(
        &self,
        os: &O,
        drv: &Driver,
        mode: Option<Mode>,
        mem_bytes: u64,
        vcpus: u32,
        page_limit: u64,
    ) -> Result<usize, Fail> {
        if self.ready.load(Ordering::Acquire) || self.vm.lock().vm.is_some() {
            return Err(Fail::Busy);
        }
        let (mode, ctls) = answer::mode_controls(&drv.caps, drv.mode, mode)?;
        let mut vm = Vm::new(os, drv.caps.ept_features(), mode, page_limit)?;
        if let Err(e) = vm.add_ram(os, mem_bytes) {
            vm.destroy(os);
            return Err(e.into());
        }
        let mut st = self.vm.lock();
        for _ in 0..vcpus {
            if let Err(e) = self.add_vcpu(os, drv, &vm) {
                self.free_vcpus(os);
                vm.destroy(os);
                return Err(e);
            }
        }
        st.vm = Some(vm);
        st.ctls = Some(ctls);
        self.ready.store(true, Ordering::Release);
        Ok(0)
    }

    /// Creates the next vCPU of `vm` and publishes it; returns its index. Only VM-level requests
    /// call it (the claim held), so indices cannot race.
    fn add_vcpu(&self, os: &O, drv: &Driver, vm: &Vm) -> Result<u32, Fail> {
        let index = self.nr_vcpus.load(Ordering::Acquire);
        let slot = self.slots.get(index as usize).ok_or(Fail::NoSpace)?;
        let (rip, rsp) = answer::vcpu_entry(vm, index)?;
        let pages = VcpuPages::alloc(os, &drv.caps)?;
        let hw = RawBox::new(HwVcpu::new(index, pages, rip, rsp)).map_err(|mut hw| {
            hw.free_pages(os);
            Fail::NoMemory
        })?;
        *slot.hw.lock() = Some(hw);
        self.nr_vcpus.store(index + 1, Ordering::Release);
        Ok(index)
    }

    /// Frees the vCPUs: VMCLEAR where each VMCS is active, then its pages. No RUN is in
    /// progress (release, or a failed SETUP before `ready`).
    fn free_vcpus(&self, os: &O) {
        self.ready.store(false, Ordering::Release);
        self.nr_vcpus.store(0, Ordering::Release);
        for slot in &self.slots {
            if let Some(mut hw) = slot.hw.lock().take() {
                if let Some(cpu) = hw.cpu.take() {
                    os.vmclear_on(cpu, &hw.pages);
                }
                hw.free_pages(os);
            }
        }
    }

    /// Frees everything: the vCPUs, the controls and the VM (close of the session; `&mut`: no
    /// request of it can run).
    pub fn release(&mut self, os: &O) {
        self.free_vcpus(os);
        let st = self.vm.get_mut();
        st.ctls = None;
        if let Some(vm) = st.vm.take() {
            // Vm::destroy's precondition: INVEPT all-context after the last VM exit, on every
            // CPU that may cache this EPT.
            os.invept_everywhere();
            vm.destroy(os);
        }
        os.after_free();
    }

    /// A kicking VM-level request: every vCPU is out of the run loop, the VM is `st`'s.
    /// (Not inlined, like `run`: kernel stacks are small, and the Windows driver links no
    /// `__chkstk` for frames over 4 KiB.)
    #[inline(never)]
    fn handle(
        &self,
        os: &O,
        drv: &Driver,
        st: &mut VmState,
        req: Request,
        buf: &mut [u8],
    ) -> Result<usize, Fail> {
        let buffer = |len: u64| os.buffer(len as usize).ok_or(Fail::NoMemory);
        match req {
            Request::LoadElf { image, len } => {
                let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
                let mut bytes = buffer(len)?;
                os.copy_from_user(bytes.bytes_mut(), image)?;
                let entry = match vm.load_elf(os, bytes.bytes()) {
                    Ok(e) => e,
                    // No log line: any user could flood the kernel log with bad images. The
                    // tool checks the image with the same loader first and says why.
                    Err(LoadError::Elf(_)) => return Err(Fail::NoExec),
                    Err(LoadError::Vm(e)) => return Err(e.into()),
                };
                for slot in self.created() {
                    if let Some(hw) = slot.hw.lock().as_mut() {
                        hw.load_entry(entry);
                    }
                }
                enc(abi::LoadElfResp { entry }.to_bytes(buf))
            }
            Request::AddSlot { gpa, size } => {
                let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
                let slot = vm.add_slot(os, gpa, size)?;
                enc(abi::AddSlotResp {
                    slot: slot as u32,
                    reserved: 0,
                }
                .to_bytes(buf))
            }
            Request::CreateVcpu => {
                let vm = st.vm.as_ref().ok_or(Fail::Invalid)?;
                let vcpu = self.add_vcpu(os, drv, vm)?;
                enc(abi::CreateVcpuResp { vcpu, reserved: 0 }.to_bytes(buf))
            }
            Request::SetMode { mode } => {
                let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
                let (mode, ctls) = answer::mode_controls(&drv.caps, drv.mode, mode)?;
                let owed = vm.set_mode(os, mode)?;
                pay(os, vm, owed);
                st.ctls = Some(ctls);
                Ok(0)
            }
            Request::DirtyLog {
                slot,
                bitmap,
                bitmap_len,
                harvest,
            } => {
                let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
                let pages = vm
                    .slots()
                    .find(|(i, _)| *i == slot as usize)
                    .map(|(_, s)| s.pages)
                    .ok_or(Fail::Invalid)?;
                let words = pages.div_ceil(64);
                if bitmap_len < words * 8 {
                    return Err(Fail::Invalid);
                }
                let mut bits = buffer(words * 8)?;
                if harvest {
                    let owed = vm.harvest(os, slot as usize, bits.words_mut())?;
                    // The bitmap goes out only after the flush: a page the guest writes from
                    // now on sets D again (SDM 29.4.3.4).
                    pay(os, vm, owed);
                } else {
                    vm.get_dirty_log(os, slot as usize, bits.words_mut())?;
                }
                os.copy_to_user(bitmap, bits.bytes())?;
                Ok(0)
            }
            Request::ClearDirtyLog {
                slot,
                first_page,
                num_pages,
                mask,
            } => {
                let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
                let mut m = buffer(num_pages.div_ceil(64) * 8)?;
                os.copy_from_user(m.bytes_mut(), mask)?;
                let owed =
                    vm.clear_dirty_log(os, slot as usize, first_page, num_pages, m.words_mut())?;
                pay(os, vm, owed);
                Ok(0)
            }
            Request::Stats => {
                let mut s = abi::StatsResp {
                    vm_pages: st.vm.as_ref().map_or(0, |v| v.pages_held()),
                    driver_pages: os.driver_pages(),
                    mode: st.vm.as_ref().map_or(0, |v| v.mode() as u32),
                    vcpus: self.nr_vcpus.load(Ordering::Acquire),
                    ..Default::default()
                };
                for slot in self.created() {
                    if let Some(hw) = slot.hw.lock().as_ref() {
                        s.vm_pages += hw.pages_held();
                        for (a, b) in s.exits.iter_mut().zip(hw.state.exits.iter()) {
                            *a += *b;
                        }
                        let (t, v) = (&mut s.isolation, &hw.state.isolation);
                        t.entries += v.entries;
                        t.l1d_flushes += v.l1d_flushes;
                        t.verws += v.verws;
                        t.ibpbs += v.ibpbs;
                        t.probes += v.probes;
                        t.host_changed += v.host_changed;
                    }
                }
                enc(s.to_bytes(buf))
            }
            Request::Explain { gpa, user_va } => {
                let vm = st.vm.as_ref().ok_or(Fail::Invalid)?;
                let mut r = answer::explain_guest(vm, os, gpa)?;
                if r.ept_leaf != 0 {
                    if let Some(h) = os.host_mapping(r.hpa) {
                        r.host_va = h.va;
                        r.host_pte = h.pte;
                        r.host_level = h.level;
                    }
                    // Reported only if it maps this very backing page.
                    if let Some((pte, level)) = os.user_pte(user_va).filter(|_| user_va != 0) {
                        if level != 0 && pte & crate::hostpt::ADDR == r.hpa {
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
                let vm = st.vm.as_mut().ok_or(Fail::Invalid)?;
                let mut tmp = buffer(len)?;
                if write {
                    os.copy_from_user(tmp.bytes_mut(), ubuf)?;
                    vm.write_guest(os, gpa, tmp.bytes())?;
                } else {
                    vm.read_guest(os, gpa, tmp.bytes_mut())?;
                    os.copy_to_user(ubuf, tmp.bytes())?;
                }
                Ok(0)
            }
            // Served by `request` itself.
            Request::Setup { .. }
            | Request::Run { .. }
            | Request::GetRegs { .. }
            | Request::SetRegs { .. }
            | Request::Caps => Err(Fail::Invalid),
        }
    }

    /// RUN of vCPU `index` in smudge's ABI: the run loop, then the answer record.
    fn run(&self, os: &O, drv: &Driver, index: u32) -> Result<abi::RunResp, Fail> {
        self.run_loop(
            os,
            drv,
            index,
            |_| None,
            |hw, result| {
                let mut resp = abi::RunResp::default();
                answer::take_console(&mut resp, &mut hw.state);
                answer::fill_run(&mut resp, result, &mut hw.state);
                resp
            },
        )
    }

    /// The run loop of vCPU `index`: one RUN at a time per vCPU, several vCPUs at once.
    /// `prepare` sees the vCPU first and may answer without entering the guest; `finish` turns
    /// the exit into the answer. Everything that touches the vCPU or the VM happens while this
    /// thread counts in the run loop (`share.enter`), so a kicking VM-level request never
    /// overlaps it; between stays the thread waits outside the loop while a kick is on.
    #[inline(never)]
    fn run_loop<R>(
        &self,
        os: &O,
        drv: &Driver,
        index: u32,
        prepare: impl FnOnce(&mut HwVcpu) -> Option<R>,
        finish: impl FnOnce(&mut HwVcpu, Result<RunExit, hw::HwError>) -> R,
    ) -> Result<R, Fail> {
        if !self.ready.load(Ordering::Acquire) {
            return Err(Fail::Invalid);
        }
        let slot = self.slot(index)?;
        let _claim = slot.busy.claim().ok_or(Fail::Busy)?;
        // Where the OS keeps a RUN on one CPU (Os::pin), the VMCS leaves its old CPU before,
        // while cross-CPU calls are still allowed (SDM 25.11.1).
        let here = os.current_cpu();
        {
            let _inside = self.share.enter(waiter(os));
            let mut g = slot.hw.lock();
            if let Some(hw) = g.as_mut() {
                if let Some(early) = prepare(hw) {
                    return Ok(early);
                }
                let pages = hw.pages;
                hw.leave_cpu(here, |old| os.vmclear_on(old, &pages));
            }
        }
        let _pin = os.pin(here)?;
        let start = os.now_ns();
        loop {
            let inside = self.share.enter(waiter(os));
            let mut g = slot.hw.lock();
            let hw: &mut HwVcpu = g.as_mut().ok_or(Fail::Invalid)?;
            let ctls = self.vm.lock().ctls.ok_or(Fail::Invalid)?;
            if !hw.programmed {
                hw.debug_override = bad_vmcs_override(os.test_bad_vmcs(), &drv.caps);
            }
            // Where the OS may sleep: the exit handler backs guest memory from this cache only.
            hw.cache.refill(os);
            let env = Env {
                os,
                drv,
                share: &self.share,
                stay_start: os.now_ns(),
            };
            let r = os.with_guest_context(|cpu| {
                hw::run(&RunVm(&self.vm), hw, os, &drv.caps, &ctls, &env, cpu)
            });
            os.after_free();
            let done = match r? {
                // Refilled at the top of the loop.
                Ok(HwExit::NeedPages) => None,
                // The stay ended (a kick, the OS, its time): back to user space only for
                // console output, a signal or the end of the slice.
                Ok(HwExit::Exit(RunExit::Interrupted)) => {
                    let slice_over = O::POLICY
                        .slice_ns
                        .is_some_and(|s| os.now_ns().saturating_sub(start) >= s);
                    if hw.state.console_len > 0 {
                        Some(Ok(RunExit::Console))
                    } else if os.signal_pending() || slice_over {
                        Some(Ok(RunExit::Interrupted))
                    } else {
                        None
                    }
                }
                Ok(HwExit::Exit(x)) => Some(Ok(x)),
                Err(e) => Some(Err(e)),
            };
            if let Some(result) = done {
                // Answered while still in the loop: the vCPU state is this thread's.
                return Ok(finish(hw, result));
            }
            drop(g);
            drop(inside);
            os.resched();
        }
    }

    /// Lends the backing pages of guest RAM pages `first_gfn..first_gfn + count` to `map` (index
    /// within the range, page frame number), for a read-only user mapping (Linux mmap). Pages
    /// not backed yet are skipped. Every vCPU stays out of guest mode meanwhile, so the EPT
    /// cannot change underneath.
    pub fn map_guest(
        &self,
        os: &O,
        first_gfn: u64,
        count: u64,
        map: &mut dyn FnMut(u64, u64) -> Result<(), Fail>,
    ) -> Result<(), Fail> {
        if !self.ready.load(Ordering::Acquire) {
            return Err(Fail::Invalid);
        }
        let _claim = self.share.vm_request(true, waiter(os)).ok_or(Fail::Busy)?;
        let st = self.vm.lock();
        let vm = st.vm.as_ref().ok_or(Fail::Invalid)?;
        let mem = vm.layout().map_or(0, |l| l.mem_size);
        for i in 0..count {
            let gpa = first_gfn
                .checked_add(i)
                .and_then(|g| g.checked_mul(4096))
                .filter(|&g| g < mem)
                .ok_or(Fail::Invalid)?;
            if let Some(t) = vm.ept().translate(os, gpa) {
                map(i, t.hpa >> 12)?;
            }
        }
        Ok(())
    }
}
