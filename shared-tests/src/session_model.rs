//! The session layer on the host: a mock OS ([`MockOs`]) whose CPUs are the SDM model of the
//! processor ([`crate::model::Cpu`]) behind a model of VMX operation ([`ModelCpu`]), so that
//! `core::session` and `vmx::hw::run` run unchanged, on real threads.
//!
//! The model of VMX is the part of SDM chapters 25-28 the run loop relies on:
//! * a VMCS is active on at most one CPU; VMPTRLD of a VMCS active on another CPU, VMCLEAR of it
//!   from another CPU, and VM entry on a VMCS that another CPU is running are SDM violations
//!   (SDM 25.11.1), recorded in [`ModelMachine::violations`];
//! * VMLAUNCH needs the launch state "clear", VMRESUME "launched" (VM-instruction errors 4, 5);
//! * the guest's accesses go through the model's EPT walk, TLB and PML with the EPTP, PML
//!   address and PML index of the VMCS; the index is written back at every exit;
//! * a guest runs a script ([`Step`]) and leaves at an EPT violation, a PML-full exit, a VMCALL,
//!   HLT, or after a quantum of steps as at the VMX-preemption timer.
//!
//! Every guest write that completes is recorded with a global sequence number, the oracle of the
//! dirty-log tests ([`ModelMachine::writes`]).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use smudge_core::arch::{FxArea, GuestGprs, HostState, RawAlloc, VmFail, RAW_ALIGN};
use smudge_core::ept::EptFeatures;
use smudge_core::platform::{AllocError, PageMut, PageWords, PinError, Platform};
use smudge_core::session::{Fail, HostMapping, Os, RunPolicy};
use smudge_core::spec::Duties;
use smudge_core::vcpu::VcpuPages;
use smudge_core::vm::reason;
use smudge_core::vmx::active::{self, Held};
use smudge_core::vmx::caps::VmxCaps;
use smudge_core::vmx::fields::Field;
use smudge_core::vmx::hw::Processor;
use smudge_core::vmx::root::{ControlRegs, Processors};
use smudge_core::vmx::vmcs::{ctl, VmcsAccess, VmcsError, VmcsImage};

use crate::model::{self, Exit};
use crate::platform::MockPlatform;

/// One step of a scripted guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A data write of one byte at this guest-physical address.
    Write(u64),
    /// The same write again and again: the script never moves past it (not recorded in
    /// [`ModelMachine::writes`]).
    WriteForever(u64),
    /// VMCALL with RAX = 1 (checkpoint).
    Checkpoint,
    /// VMCALL with RAX = 0 and RDI = the code (exit).
    Exit(u64),
    /// `in` of `size` bytes from `port` with RDI = `rdi` (KVM's selftests' ucall: the host reads
    /// RDI with KVM_GET_REGS).
    PortIn {
        /// Port.
        port: u16,
        /// Bytes.
        size: u8,
        /// RDI during the access.
        rdi: u64,
    },
    /// `out` of `size` bytes of `value` to `port`.
    PortOut {
        /// Port.
        port: u16,
        /// Bytes.
        size: u8,
        /// RAX.
        value: u64,
    },
    /// Records RAX (what the guest holds now: the data of a completed `in`) in
    /// [`ModelMachine::recorded`].
    RecordRax,
    /// HLT.
    Hlt,
}

/// A completed guest write: its place in the global order, the vCPU, the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    /// Global sequence number (see [`ModelMachine::tick`]).
    pub seq: u64,
    /// vCPU index.
    pub vcpu: u32,
    /// Guest-physical page number.
    pub gfn: u64,
}

#[derive(Default)]
struct VmcsState {
    image: VmcsImage,
    active_on: Option<u32>,
    /// The CPU that left VMX operation while this VMCS was active there, without a VMCLEAR:
    /// its data is gone.
    lost_on: Option<u32>,
    launched: bool,
    running_on: Option<u32>,
    /// The CPU of the last VM entry.
    last_cpu: Option<u32>,
}

struct CpuState {
    cpu: model::Cpu,
    current: Option<u64>,
    /// The VMCS whose guest ran here last.
    last_entered: Option<u64>,
    /// Barriers since the last entry here.
    flushed: bool,
    verw: bool,
    ibpb: bool,
}

#[derive(Default)]
struct Program {
    steps: Vec<Step>,
    pc: usize,
}

/// The model machine: CPUs, VMCS regions, guest programs, the write record.
pub struct ModelMachine {
    caps: VmxCaps,
    cpus: Vec<Mutex<CpuState>>,
    /// A stay in guest mode holds its CPU (as preemption off does).
    occupied: Vec<AtomicBool>,
    vmcs: Mutex<HashMap<u64, VmcsState>>,
    /// Per CPU, the core's own list of the VMCSs active there (`vmx::active`), kept by the model
    /// CPU as the real one keeps the driver's: the model's VMCS states judge it.
    lists: Vec<active::List>,
    programs: Mutex<HashMap<u32, Program>>,
    seq: AtomicU64,
    writes: Mutex<Vec<Write>>,
    violations: Mutex<Vec<String>>,
    /// Steps a guest runs before a preemption-timer exit.
    pub quantum: usize,
    /// The speculation barriers every entry needs (`spec`): an entry without one is recorded
    /// as a violation. Set before the first run.
    pub required: Duties,
    /// L1D flushes, VERWs and IBPBs done.
    barriers: [AtomicU64; 3],
    entries: AtomicU64,
    migrations: AtomicU64,
    recorded: Mutex<Vec<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ModelMachine {
    fn new(caps: VmxCaps, ncpus: usize) -> ModelMachine {
        ModelMachine {
            caps,
            cpus: (0..ncpus)
                .map(|_| {
                    Mutex::new(CpuState {
                        cpu: model::Cpu::new(EptFeatures::ALL),
                        current: None,
                        last_entered: None,
                        flushed: false,
                        verw: false,
                        ibpb: false,
                    })
                })
                .collect(),
            occupied: (0..ncpus).map(|_| AtomicBool::new(false)).collect(),
            vmcs: Mutex::new(HashMap::new()),
            lists: (0..ncpus)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            programs: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            writes: Mutex::new(Vec::new()),
            violations: Mutex::new(Vec::new()),
            quantum: 16,
            required: Duties::NONE,
            barriers: Default::default(),
            entries: AtomicU64::new(0),
            migrations: AtomicU64::new(0),
            recorded: Mutex::new(Vec::new()),
        }
    }

    /// The next global sequence number (guest writes and test events share one order).
    pub fn tick(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    /// Gives vCPU `index` a script (replacing what is left of an earlier one).
    pub fn program(&self, index: u32, steps: Vec<Step>) {
        lock(&self.programs).insert(index, Program { steps, pc: 0 });
    }

    /// Steps of vCPU `index`'s script not run yet.
    pub fn remaining(&self, index: u32) -> usize {
        lock(&self.programs)
            .get(&index)
            .map_or(0, |p| p.steps.len() - p.pc)
    }

    /// Every guest write so far.
    pub fn writes(&self) -> Vec<Write> {
        lock(&self.writes).clone()
    }

    /// SDM rules the code under test broke (empty when it follows them).
    pub fn violations(&self) -> Vec<String> {
        lock(&self.violations).clone()
    }

    /// The values [`Step::RecordRax`] recorded, in order.
    pub fn recorded(&self) -> Vec<u64> {
        lock(&self.recorded).clone()
    }

    /// L1D flushes, VERWs and IBPBs the loop did.
    pub fn barriers(&self) -> [u64; 3] {
        let b = &self.barriers;
        [0, 1, 2].map(|i| b[i].load(Ordering::SeqCst))
    }

    /// VM entries so far, and how many of them found their VMCS last active on another CPU.
    pub fn entries(&self) -> (u64, u64) {
        (
            self.entries.load(Ordering::SeqCst),
            self.migrations.load(Ordering::SeqCst),
        )
    }

    fn violation(&self, what: String) {
        lock(&self.violations).push(what);
    }

    /// CPU `cpu` leaves VMX operation as the driver does (`VmxRoot::vmxoff_here`): VMCLEAR of
    /// every VMCS its list holds (`active::clear_all`). Returns how many there were; a VMCS the
    /// list missed stays active in the model, and its next VMPTRLD elsewhere is a violation.
    pub fn leave_vmx(&self, cpu: u32) -> usize {
        let mut n = 0;
        active::clear_all(&self.lists[cpu as usize], &mut |pa| {
            self.vmclear(cpu, pa);
            n += 1;
        });
        n
    }

    /// CPU `cpu` loses VMX operation without the driver (no VMCLEAR): the VMCSs active there
    /// are lost, and the driver marks its list so (`active::mark_lost`, as `vmxon_one` does
    /// for a stale flag). Returns how many there were.
    pub fn lose_vmx(&self, cpu: u32) -> usize {
        active::mark_lost(&self.lists[cpu as usize]);
        let mut n = 0;
        for st in lock(&self.vmcs).values_mut() {
            if st.active_on == Some(cpu) {
                (st.active_on, st.lost_on, st.launched) = (None, Some(cpu), false);
                n += 1;
            }
        }
        if let Some(c) = self.cpus.get(cpu as usize) {
            lock(c).current = None;
        }
        n
    }

    /// VMCLEAR on `cpu` (SDM 25.11.3).
    fn vmclear(&self, cpu: u32, pa: u64) {
        let mut all = lock(&self.vmcs);
        let st = all.entry(pa).or_default();
        if let Some(other) = st.active_on.filter(|&c| c != cpu) {
            self.violation(format!(
                "VMCLEAR of VMCS {pa:#x} on CPU {cpu} while it is active on CPU {other}"
            ));
        }
        if st.running_on.is_some() {
            self.violation(format!("VMCLEAR of VMCS {pa:#x} while a guest runs on it"));
        }
        // A lost VMCS stays lost: VMCLEAR initializes the launch state, not the data.
        st.active_on = None;
        st.launched = false;
        // Lock order: a CPU's state, then the VMCS table (as a stay takes them).
        drop(all);
        // As `VmxCpu::vmclear` after the instruction.
        if let Some(list) = self.lists.get(cpu as usize) {
            active::delist(list, pa);
        }
        if let Some(c) = self.cpus.get(cpu as usize) {
            let mut c = lock(c);
            if c.current == Some(pa) {
                c.current = None;
            }
        }
    }

    /// INVEPT all-context on every model CPU.
    fn invept_all(&self) {
        for c in &self.cpus {
            lock(c).cpu.invept();
        }
    }
}

/// The current VMCS of a model CPU.
pub struct ModelVmcs<'a> {
    m: &'a ModelMachine,
    pa: u64,
}

impl VmcsAccess for ModelVmcs<'_> {
    fn read(&self, field: Field) -> Result<u64, VmcsError> {
        lock(&self.m.vmcs)
            .get(&self.pa)
            .ok_or(VmcsError::NoCurrentVmcs)?
            .image
            .read(field)
    }
    fn write(&mut self, field: Field, value: u64) -> Result<(), VmcsError> {
        lock(&self.m.vmcs)
            .get_mut(&self.pa)
            .ok_or(VmcsError::NoCurrentVmcs)?
            .image
            .write(field, value)
    }
}

/// One model CPU during a stay in guest mode.
pub struct ModelCpu<'a> {
    m: &'a ModelMachine,
    p: &'a MockPlatform,
    cpu: u32,
}

impl ModelCpu<'_> {
    fn state(&self) -> MutexGuard<'_, CpuState> {
        // `cpu` is a valid index: MockOs picks it from 0..ncpus.
        lock(&self.m.cpus[self.cpu as usize])
    }

    /// Runs the guest of the current VMCS until an exit; returns (reason, qualification, gpa,
    /// instruction length).
    fn run_guest(&self, pa: u64, gprs: &mut GuestGprs) -> (u32, u64, u64, u64) {
        let (index, eptp, pml) = {
            let all = lock(&self.m.vmcs);
            let img = all.get(&pa).map(|s| s.image.clone()).unwrap_or_default();
            let r = |f| img.read(f).unwrap_or(0);
            let pml_on =
                r(Field::SecondaryProcessorBasedControls) as u32 & ctl::proc2::ENABLE_PML != 0;
            let pml = pml_on.then(|| (r(Field::PmlAddress), r(Field::GuestPmlIndex) as u16));
            (
                (r(Field::VirtualProcessorId) as u32).wrapping_sub(1),
                r(Field::EptPointer),
                pml,
            )
        };
        let mut st = self.state();
        match pml {
            Some((buffer, idx)) => {
                st.cpu.enable_pml(buffer);
                st.cpu.set_pml_index(idx);
            }
            None => st.cpu.pml = None,
        }
        let mut exit = (reason::PREEMPTION_TIMER, 0, 0, 0);
        for _ in 0..self.m.quantum {
            let step = {
                let progs = lock(&self.m.programs);
                progs.get(&index).and_then(|p| p.steps.get(p.pc).copied())
            };
            let advance = || {
                if let Some(p) = lock(&self.m.programs).get_mut(&index) {
                    p.pc += 1;
                }
            };
            match step {
                None => {
                    exit = (reason::HLT, 0, 0, 1);
                    break;
                }
                // The write takes its place in the global order before it happens: a harvest
                // that starts later waits (its kick) until this stay, and the write, are over.
                Some(Step::Write(gpa) | Step::WriteForever(gpa)) => {
                    match (self.m.tick(), st.cpu.access(self.p, eptp, gpa, true)) {
                        // An endless write is not recorded: its record would grow without
                        // bound (in a release build, by gigabytes in a minute).
                        (seq, Ok(_)) => {
                            if matches!(step, Some(Step::Write(_))) {
                                lock(&self.m.writes).push(Write {
                                    seq,
                                    vcpu: index,
                                    gfn: gpa >> 12,
                                });
                                advance();
                            }
                        }
                        (_, Err(Exit::EptViolation { gpa, qualification })) => {
                            exit = (reason::EPT_VIOLATION, qualification, gpa, 0);
                            break;
                        }
                        (_, Err(Exit::PmlFull { gpa })) => {
                            exit = (reason::PML_FULL, 0, gpa, 0);
                            break;
                        }
                        (_, Err(e)) => {
                            self.m.violation(format!("guest write of {gpa:#x}: {e:?}"));
                            exit = (reason::EPT_MISCONFIG, 0, gpa, 0);
                            break;
                        }
                    }
                }
                Some(Step::Checkpoint) => {
                    gprs.rax = 1;
                    advance();
                    exit = (reason::VMCALL, 0, 0, 3);
                    break;
                }
                Some(Step::Exit(code)) => {
                    gprs.rax = 0;
                    gprs.rdi = code;
                    advance();
                    exit = (reason::VMCALL, 0, 0, 3);
                    break;
                }
                // SDM 28.2.1 Table 28-5: size-1 in 2:0, IN in bit 3, port in 31:16; `in al,
                // dx` and `out dx, al` are one byte long.
                Some(Step::PortIn { port, size, rdi }) => {
                    gprs.rdi = rdi;
                    advance();
                    let q = u64::from(size - 1) | 1 << 3 | u64::from(port) << 16;
                    exit = (reason::IO, q, 0, 1);
                    break;
                }
                Some(Step::PortOut { port, size, value }) => {
                    gprs.rax = value;
                    advance();
                    exit = (
                        reason::IO,
                        u64::from(size - 1) | u64::from(port) << 16,
                        0,
                        1,
                    );
                    break;
                }
                Some(Step::RecordRax) => {
                    lock(&self.m.recorded).push(gprs.rax);
                    advance();
                }
                Some(Step::Hlt) => {
                    advance();
                    exit = (reason::HLT, 0, 0, 1);
                    break;
                }
            }
        }
        if let (Some(_), Some(state)) = (pml, st.cpu.pml) {
            if let Some(s) = lock(&self.m.vmcs).get_mut(&pa) {
                let _ = s.image.write(Field::GuestPmlIndex, state.index.into());
            }
        }
        exit
    }
}

impl<'a> Processor for ModelCpu<'a> {
    type Vmcs = ModelVmcs<'a>;
    fn cpu(&self) -> u32 {
        self.cpu
    }
    fn vmclear(&mut self, pages: &VcpuPages) -> Result<(), VmFail> {
        self.m.vmclear(self.cpu, pages.vmcs);
        Ok(())
    }
    fn held(&self, cpu: u32, vmcs: u64) -> Held {
        self.m
            .lists
            .get(cpu as usize)
            .map_or(Held::Clear, |list| active::held(list, vmcs))
    }
    fn load(&mut self, pages: &VcpuPages) -> Result<(ModelVmcs<'a>, bool), VmFail> {
        let pa = pages.vmcs;
        let mut all = lock(&self.m.vmcs);
        let st = all.entry(pa).or_default();
        if let Some(other) = st.active_on.filter(|&c| c != self.cpu) {
            self.m.violation(format!(
                "VMPTRLD of VMCS {pa:#x} on CPU {} while it is active on CPU {other} (SDM 25.11.1)",
                self.cpu
            ));
        }
        if let Some(other) = st.lost_on {
            self.m.violation(format!(
                "VMPTRLD of VMCS {pa:#x}, lost when CPU {other} left VMX operation without a VMCLEAR"
            ));
        }
        st.active_on = Some(self.cpu);
        drop(all);
        // As `Hardware::load`: listed, a full list making room with a VMCLEAR here first.
        let cpu = self.cpu;
        if !active::enlist(&self.m.lists[cpu as usize], pa, &mut |v| {
            self.m.vmclear(cpu, v)
        }) {
            self.m.vmclear(cpu, pa);
            return Err(VmFail::Invalid);
        }
        let switched = self.state().current.replace(pa) != Some(pa);
        Ok((ModelVmcs { m: self.m, pa }, switched))
    }
    fn host_state(&self) -> HostState {
        crate::fixtures::linux_host(&self.m.caps)
    }
    fn enter(
        &mut self,
        vmcs: &mut ModelVmcs<'a>,
        gprs: &mut GuestGprs,
        launched: bool,
        _host: &HostState,
    ) -> Result<(), VmFail> {
        let pa = vmcs.pa;
        if self.state().current != Some(pa) {
            return Err(VmFail::Invalid);
        }
        let need = self.m.required;
        let missing = {
            let mut st = self.state();
            let switch = st.last_entered.is_some_and(|l| l != pa);
            let missing = [
                (need.l1d_flush && !st.flushed, "an L1D flush"),
                (need.verw && !st.verw, "a VERW"),
                (
                    need.ibpb && switch && !st.ibpb,
                    "an IBPB after another VMCS's guest",
                ),
            ];
            (st.flushed, st.verw, st.ibpb) = (false, false, false);
            st.last_entered = Some(pa);
            missing
        };
        for (_, what) in missing.iter().filter(|m| m.0) {
            self.m.violation(format!(
                "VM entry of VMCS {pa:#x} on CPU {} without {what} (spec)",
                self.cpu
            ));
        }
        {
            let mut all = lock(&self.m.vmcs);
            let st = all.entry(pa).or_default();
            // SDM 31.3 VMLAUNCH/VMRESUME: errors 4 and 5.
            if st.launched != launched {
                return Err(VmFail::Valid(if launched { 5 } else { 4 }));
            }
            if let Some(other) = st.running_on {
                self.m.violation(format!(
                    "VM entry on VMCS {pa:#x} on CPU {} while CPU {other} runs it",
                    self.cpu
                ));
            }
            st.running_on = Some(self.cpu);
            st.launched = true;
            if st.last_cpu.is_some_and(|c| c != self.cpu) {
                self.m.migrations.fetch_add(1, Ordering::SeqCst);
            }
            st.last_cpu = Some(self.cpu);
        }
        self.m.entries.fetch_add(1, Ordering::SeqCst);
        let (r, q, gpa, len) = self.run_guest(pa, gprs);
        let mut all = lock(&self.m.vmcs);
        if let Some(st) = all.get_mut(&pa) {
            st.running_on = None;
            for (f, v) in [
                (Field::ExitReason, u64::from(r)),
                (Field::ExitQualification, q),
                (Field::GuestPhysicalAddress, gpa),
                (Field::VmExitInstructionLength, len),
            ] {
                let _ = st.image.write(f, v);
            }
        }
        Ok(())
    }
    fn guest_state_in(&mut self, _fx: &FxArea, kernel_gs_base: u64) -> u64 {
        kernel_gs_base
    }
    fn guest_state_out(&mut self, _fx: &mut FxArea, host_kernel_gs_base: u64) -> u64 {
        host_kernel_gs_base
    }
    fn raise_nmi(&mut self) {}
    fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
        [leaf, 0, 0, 0]
    }
    fn flush_l1d(&mut self) {
        self.state().flushed = true;
        self.m.barriers[0].fetch_add(1, Ordering::SeqCst);
    }
    fn clear_cpu_buffers(&mut self, _selector: u16) {
        self.state().verw = true;
        self.m.barriers[1].fetch_add(1, Ordering::SeqCst);
    }
    fn ibpb(&mut self) {
        self.state().ibpb = true;
        self.m.barriers[2].fetch_add(1, Ordering::SeqCst);
    }
    fn host_debug(&self) -> (smudge_core::arch::DebugState, u64) {
        // The model's guests cannot reach the host's debug state.
        (smudge_core::arch::DebugState::default(), 0)
    }
}

thread_local! {
    /// The CPU this thread runs on, and its pin (None: free to move).
    static HERE: Cell<(u32, Option<u32>, u64)> = const { Cell::new((0, None, 0)) };
}

/// Keeps a thread on its CPU (Windows' policy) until dropped.
pub struct MockPin;

impl Drop for MockPin {
    fn drop(&mut self) {
        HERE.with(|h| {
            let (cpu, _, n) = h.get();
            h.set((cpu, None, n));
        });
    }
}

/// The mock OS: the mock platform for pages, the model machine for CPUs, real threads.
/// `WINDOWS` picks Windows' run policy (1 ms stays, 50 ms slices, pinned RUNs) over Linux's.
pub struct MockOs<const WINDOWS: bool> {
    /// Pages.
    pub p: MockPlatform,
    /// The CPUs.
    pub m: Arc<ModelMachine>,
    /// Makes `signal_pending` true for every thread (to end Linux-policy RUNs).
    pub signal: AtomicBool,
    start: Instant,
    /// KVM_SET_SIGNAL_MASK's masks in force (`Os::signal_mask_enter`), by thread.
    masks: Mutex<HashMap<std::thread::ThreadId, u64>>,
    /// Guest stays entered while the calling thread's mask was in force.
    masked_stays: AtomicUsize,
}

/// The driver of a Bochs corei7_skylake_x (VMX, EPT A/D, PML) with every barrier on and the
/// host probe, and a mock OS of `ncpus` model CPUs that requires the barriers.
pub fn skylake<const W: bool>(ncpus: usize) -> (smudge_core::session::Driver, MockOs<W>) {
    let caps: VmxCaps = crate::fixtures::all_caps()
        .into_iter()
        .find(|(n, _)| n.contains("skylake_x"))
        .map(|(_, c)| c)
        .expect("the Bochs skylake_x dump");
    let d = smudge_core::session::Driver {
        caps,
        mode: caps.choose_mode(false).expect("mode"),
        duties: ALL_DUTIES,
        probe: true,
    };
    (d, MockOs::new(caps, ncpus, ALL_DUTIES))
}

/// Every barrier on: the session tests require them all of the loop.
pub const ALL_DUTIES: Duties = Duties {
    l1d_flush: true,
    verw: true,
    ibpb: true,
    l1tf_unmitigated: false,
};

impl<const W: bool> MockOs<W> {
    /// A machine of `ncpus` model CPUs with the capabilities `caps`, whose every VM entry
    /// needs the barriers of `required`.
    pub fn new(caps: VmxCaps, ncpus: usize, required: Duties) -> MockOs<W> {
        let mut m = ModelMachine::new(caps, ncpus);
        m.required = required;
        MockOs {
            p: MockPlatform::new(),
            m: Arc::new(m),
            signal: AtomicBool::new(false),
            start: Instant::now(),
            masks: Mutex::new(HashMap::new()),
            masked_stays: AtomicUsize::new(0),
        }
    }

    /// The KVM signal mask in force on this thread (between `signal_mask_enter` and
    /// `signal_mask_leave`), if any.
    pub fn thread_mask(&self) -> Option<u64> {
        let me = std::thread::current().id();
        self.masks.lock().unwrap().get(&me).copied()
    }

    /// Guest stays entered with a KVM signal mask in force so far.
    pub fn masked_stays(&self) -> usize {
        self.masked_stays.load(Ordering::SeqCst)
    }

    /// Moves this thread to CPU `cpu` (as the OS's scheduler may, between stays).
    pub fn migrate_to(&self, cpu: u32) {
        HERE.with(|h| {
            let (_, pin, n) = h.get();
            h.set((cpu % self.m.cpus.len() as u32, pin, n));
        });
    }
}

impl<const W: bool> Platform for MockOs<W> {
    fn alloc_page(&self) -> Result<u64, AllocError> {
        self.p.alloc_page()
    }
    fn free_page(&self, hpa: u64) {
        self.p.free_page(hpa)
    }
    fn page(&self, hpa: u64) -> &PageWords {
        self.p.page(hpa)
    }
    fn with_page_mut(&self, hpa: u64, f: &mut dyn FnMut(PageMut<'_>)) {
        self.p.with_page_mut(hpa, f)
    }
    fn pin_user_pages(&self, uaddr: u64, hpas: &mut [u64]) -> Result<usize, PinError> {
        self.p.pin_user_pages(uaddr, hpas)
    }
    fn unpin_user_page(&self, hpa: u64) {
        self.p.unpin_user_page(hpa)
    }
}

thread_local! {
    /// Allocations of [`StdAlloc`] on this thread that still succeed, then those that fail
    /// ([`fail_allocs`], [`fail_alloc_after`]).
    static FAIL_ALLOCS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Makes the next `n` allocations of the core's objects on this thread fail (request buffers,
/// vCPUs, sessions, KVM handles), as an OS short of memory would.
pub fn fail_allocs(n: usize) {
    FAIL_ALLOCS.with(|f| f.set((0, n)));
}

/// Makes the allocation after the next `skip` on this thread fail.
pub fn fail_alloc_after(skip: usize) {
    FAIL_ALLOCS.with(|f| f.set((skip, 1)));
}

/// Whether the next allocation fails (and counts it).
fn next_alloc_fails() -> bool {
    FAIL_ALLOCS.with(|f| match f.get() {
        (0, 0) => false,
        (0, n) => {
            f.set((0, n - 1));
            true
        }
        (skip, n) => {
            f.set((skip - 1, n));
            false
        }
    })
}

/// std's allocator for the core's objects (the shims use kvzalloc or the nonpaged pool).
pub struct StdAlloc;

// SAFETY: std::alloc::alloc_zeroed with the size asked and RAW_ALIGN, freed with that layout.
unsafe impl RawAlloc for StdAlloc {
    fn alloc_zeroed(bytes: usize) -> *mut u8 {
        let failing = next_alloc_fails();
        match std::alloc::Layout::from_size_align(bytes, RAW_ALIGN) {
            // SAFETY: a nonzero size (the trait's contract).
            Ok(l) if !failing => unsafe { std::alloc::alloc_zeroed(l) },
            _ => std::ptr::null_mut(),
        }
    }
    unsafe fn free(p: *mut u8, bytes: usize) {
        if let Ok(l) = std::alloc::Layout::from_size_align(bytes, RAW_ALIGN) {
            // SAFETY: allocated above with this layout (the caller's contract).
            unsafe { std::alloc::dealloc(p, l) }
        }
    }
}

impl<const W: bool> Os for MockOs<W> {
    type Alloc = StdAlloc;
    type Pin = MockPin;
    type Cpu<'a> = ModelCpu<'a>;
    const POLICY: RunPolicy = if W {
        RunPolicy {
            stay_ns: Some(1_000_000),
            slice_ns: Some(50_000_000),
        }
    } else {
        RunPolicy {
            stay_ns: None,
            slice_ns: None,
        }
    };

    /// User memory is this process's memory: `src` is an address the test owns (0..4096 is the
    /// "bad pointer" and faults).
    fn copy_from_user(&self, dst: &mut [u8], src: u64) -> Result<(), Fail> {
        if dst.is_empty() {
            return Ok(());
        }
        if src < 4096 {
            return Err(Fail::Fault);
        }
        // SAFETY: the tests pass addresses of live buffers of at least `dst.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn copy_to_user(&self, dst: u64, src: &[u8]) -> Result<(), Fail> {
        if src.is_empty() {
            return Ok(());
        }
        if dst < 4096 {
            return Err(Fail::Fault);
        }
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }
    fn current_cpu(&self) -> u32 {
        HERE.with(|h| h.get().0)
    }
    /// No real VMX here: the model's VMCLEAR and INVEPT come through the overrides below.
    fn processors(&self) -> &dyn Processors {
        &NoVmx
    }
    fn invept_everywhere(&self) {
        self.m.invept_all();
    }
    fn vmclear_on(&self, cpu: u32, pages: &VcpuPages) {
        self.m.vmclear(cpu, pages.vmcs);
    }
    fn pin(&self, cpu: u32) -> Result<MockPin, Fail> {
        if W {
            HERE.with(|h| {
                let (_, _, n) = h.get();
                h.set((cpu, Some(cpu), n));
            });
        }
        Ok(MockPin)
    }
    fn with_guest_context<R>(&self, f: impl FnOnce(&mut ModelCpu<'_>) -> R) -> Result<R, Fail> {
        if self.thread_mask().is_some() {
            self.masked_stays.fetch_add(1, Ordering::SeqCst);
        }
        let n = self.m.cpus.len() as u32;
        // Between stays the scheduler moves an unpinned thread now and then (every third
        // stay), so VMCSs change CPUs as they do on Linux.
        let (want, pin) = HERE.with(|h| {
            let (cpu, pin, k) = h.get();
            let cpu = pin.unwrap_or(if k % 3 == 2 { (cpu + 1) % n } else { cpu });
            h.set((cpu, pin, k + 1));
            (cpu, pin)
        });
        // Preemption off: nothing else runs on this CPU meanwhile. A pinned thread waits
        // for its CPU; an unpinned one goes wherever the scheduler finds a CPU free (a
        // thread staying in the guest on one CPU does not hold up the others).
        let mut cpu = want;
        while self.m.occupied[cpu as usize]
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            if pin.is_none() {
                cpu = (cpu + 1) % n;
            }
            if cpu == want {
                std::thread::yield_now();
            }
        }
        HERE.with(|h| {
            let (_, pin, k) = h.get();
            h.set((cpu, pin, k));
        });
        let flag = &self.m.occupied[cpu as usize];
        let mut c = ModelCpu {
            m: &self.m,
            p: &self.p,
            cpu,
        };
        let r = f(&mut c);
        flag.store(false, Ordering::Release);
        Ok(r)
    }
    fn signal_pending(&self) -> bool {
        self.signal.load(Ordering::SeqCst)
    }
    fn signal_mask_enter(&self, mask: u64) {
        let me = std::thread::current().id();
        if self.masks.lock().unwrap().insert(me, mask).is_some() {
            self.m
                .violation("signal_mask_enter with a KVM mask already in force".into());
        }
    }
    fn signal_mask_leave(&self) {
        let me = std::thread::current().id();
        if self.masks.lock().unwrap().remove(&me).is_none() {
            self.m
                .violation("signal_mask_leave without a KVM mask in force".into());
        }
    }
    fn resched_pending(&self) -> bool {
        false
    }
    fn resched(&self) {
        std::thread::yield_now()
    }
    fn pause(&self, _waited_ns: u64) {
        std::thread::yield_now()
    }
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn host_mapping(&self, _hpa: u64) -> Option<HostMapping> {
        None
    }
    fn user_pte(&self, _va: u64) -> Option<(u64, u32)> {
        None
    }
    fn rdmsr(&self, _msr: u32) -> Option<u64> {
        None
    }
    fn driver_pages(&self) -> u64 {
        self.p.live_pages()
    }
}

/// Processors VMX operation does not reach: none in VMX operation, none to run on (the model
/// OS's VMCLEAR and INVEPT are its own).
pub struct NoVmx;

impl ControlRegs for NoVmx {
    fn cr0(&self) -> u64 {
        0
    }
    fn cr4(&self) -> u64 {
        0
    }
    fn set_vmxe(&self, _on: bool) {}
}

// SAFETY: there is no processor to run anything on, and `on` says so.
unsafe impl Processors for NoVmx {
    fn bound(&self) -> u32 {
        0
    }
    fn present(&self, _i: u32) -> bool {
        false
    }
    fn current(&self) -> u32 {
        0
    }
    fn on(&self, _i: u32, _f: &mut (dyn FnMut() + Send)) -> bool {
        false
    }
    fn cr(&self) -> &(dyn ControlRegs + Sync) {
        self
    }
    fn irq_save(&self) -> usize {
        0
    }
    fn irq_restore(&self, _flags: usize) {}
    fn alloc_region(&self) -> Option<u64> {
        None
    }
    fn free_region(&self, _pa: u64) {}
}
