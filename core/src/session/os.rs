//! The seam between a session and an operating system: what an OS must supply, and nothing it
//! may decide. Each shim implements [`Os`] once (SimpleVisor's `ShvOs*` idea); the policy where
//! the OSes differ is a value ([`RunPolicy`]), not a loop the shim writes.

use crate::abi::AbiError;
use crate::arch::{RawAlloc, RawWords};
use crate::platform::Platform;
use crate::vcpu::VcpuPages;
use crate::vmx::hw::Processor;
use crate::vmx::root::{self, Processors};

/// Why a request failed, decided once for both OSes; each shim maps it to its error codes
/// ([`Fail::errno`] on Linux, an NTSTATUS table on Windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fail {
    /// The request does not fit the session's state or names what does not exist (EINVAL).
    Invalid,
    /// A user pointer could not be read or written (EFAULT).
    Fault,
    /// Another request has the VM or the vCPU (EBUSY).
    Busy,
    /// The OS had no memory for the request (ENOMEM).
    NoMemory,
    /// The driver-wide page cap is reached (EDQUOT).
    HostPageCap,
    /// The processor lacks what the request needs (EOPNOTSUPP).
    NotSupported,
    /// Every slot, or every vCPU, is in use (ENOSPC).
    NoSpace,
    /// The range overlaps a slot (EEXIST).
    Exists,
    /// The image is not a static ELF64 the loader accepts (ENOEXEC).
    NoExec,
    /// VMX is not on in this CPU, or the OS could not give the guest the CPU (EIO).
    Io,
    /// No such object: a KVM slot without a dirty log (ENOENT).
    NoEntry,
    /// The request does not apply to how the VM logs dirty pages: a bitmap request of a
    /// dirty-ring VM (ENXIO).
    NoDevice,
    /// The caller's array is too small, or too large (E2BIG).
    TooBig,
    /// A signal (or KVM's immediate_exit) ended KVM_RUN before the guest exited (EINTR).
    Interrupted,
    /// The request number names no request of this descriptor (ENOTTY).
    NoSuchRequest,

    /// The request's bytes were refused by the ABI decoder.
    Abi(AbiError),
}

impl Fail {
    /// A Linux file operation's return value: the answer, or -errno.
    pub const fn ret(r: Result<u64, Fail>) -> i64 {
        match r {
            Ok(v) => v as i64,
            Err(e) => -(e.errno() as i64),
        }
    }

    /// The Linux errno (positive).
    pub const fn errno(self) -> i32 {
        match self {
            Fail::Invalid => 22,
            Fail::Fault => 14,
            Fail::Busy => 16,
            Fail::NoMemory => 12,
            Fail::HostPageCap => 122,
            Fail::NotSupported => 95,
            Fail::NoSpace => 28,
            Fail::Exists => 17,
            Fail::NoExec => 8,
            Fail::Io => 5,
            Fail::NoEntry => 2,
            Fail::NoDevice => 6,
            Fail::TooBig => 7,
            Fail::Interrupted => 4,
            Fail::NoSuchRequest => 25,

            Fail::Abi(e) => e.errno(),
        }
    }
}

impl From<crate::Error> for Fail {
    fn from(e: crate::Error) -> Fail {
        use crate::Error as E;
        match e {
            E::OutOfMemory => Fail::NoMemory,
            E::HostPageCap => Fail::HostPageCap,
            E::Unsupported => Fail::NotSupported,
            E::NoFreeSlot => Fail::NoSpace,
            E::AlreadyRunning => Fail::Busy,
            E::Overlap => Fail::Exists,
            E::UserMemory => Fail::Fault,
            _ => Fail::Invalid,
        }
    }
}

/// When a RUN gives the CPU back, where the OSes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunPolicy {
    /// The longest stay in guest mode with preemption off, in ns (None: until the OS asks,
    /// [`Os::resched_pending`]).
    pub stay_ns: Option<u64>,
    /// The longest RUN before it returns "interrupted" to user space, in ns (None: only for a
    /// pending signal or a real exit).
    pub slice_ns: Option<u64>,
}

/// A zeroed buffer of `len` bytes for one request (copied-in images, bitmaps, masks, guest
/// memory copies), in quadwords of the OS's allocator, freed on drop.
pub struct Buffer<A: RawAlloc> {
    words: RawWords<A>,
    len: usize,
}

impl<A: RawAlloc> Buffer<A> {
    /// Its `len` bytes.
    pub fn bytes(&self) -> &[u8] {
        crate::arch::bytes_of(&self.words)
            .get(..self.len)
            .unwrap_or(&[])
    }
    /// Its `len` bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        crate::arch::bytes_of_mut(&mut self.words)
            .get_mut(..len)
            .unwrap_or(&mut [])
    }
    /// Its whole quadwords (`len / 8`).
    pub fn words_mut(&mut self) -> &mut [u64] {
        let n = self.len / 8;
        self.words.get_mut(..n).unwrap_or(&mut [])
    }
}

/// How the host maps the backing page of a guest page (EXPLAIN).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostMapping {
    /// The kernel virtual address of the page.
    pub va: u64,
    /// The host page-table entry that maps it.
    pub pte: u64,
    /// Its level (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB; 0 = not found).
    pub level: u32,
}

/// What an operating system supplies to a session. Pages come through the [`Platform`]
/// supertrait (allocated under core's `hostmem` policy).
pub trait Os: Platform + Sync {
    /// The OS's allocator of the core's own objects: request buffers, vCPUs, sessions.
    type Alloc: RawAlloc;
    /// What [`Os::pin`] returns: the thread stays on its CPU until it is dropped.
    type Pin;
    /// The processor a guest stays on (`vmx::hw::Hardware`; the host tests' SDM model).
    type Cpu<'a>: Processor;
    /// How RUN gives the CPU back.
    const POLICY: RunPolicy;

    /// `len` zeroed bytes, or None when memory is short.
    fn buffer(&self, len: usize) -> Option<Buffer<Self::Alloc>> {
        let words = RawWords::zeroed(len.div_ceil(8))?;
        Some(Buffer { words, len })
    }
    /// Copies user memory at `src` into `dst`.
    fn copy_from_user(&self, dst: &mut [u8], src: u64) -> Result<(), Fail>;
    /// Copies `src` to user memory at `dst`.
    fn copy_to_user(&self, dst: u64, src: &[u8]) -> Result<(), Fail>;

    /// The machine's processors, as VMX operation reaches them (`vmx::root`).
    fn processors(&self) -> &dyn Processors;
    /// The current CPU's number (only a hint unless preemption is off).
    fn current_cpu(&self) -> u32 {
        self.processors().current()
    }
    /// INVEPT all-context on every CPU in VMX operation (SDM 29.4.3.4). (The host tests' model
    /// OS flushes its model CPUs instead.)
    fn invept_everywhere(&self) {
        root::on_each_cpu(self.processors(), &|c| {
            if let Some(c) = c {
                let _ = c.invept_all();
            }
        });
    }
    /// VMCLEAR of `pages`' VMCS on CPU `cpu`, where it was last active (SDM 25.11.1).
    fn vmclear_on(&self, cpu: u32, pages: &VcpuPages) {
        root::on_cpu(self.processors(), cpu, &|c| {
            if let Some(c) = c {
                let _ = c.vmclear(pages);
            }
        });
    }
    /// Keeps the thread on CPU `cpu` for a whole RUN where the OS needs that (Windows, whose
    /// cross-processor calls cannot be made at DISPATCH_LEVEL); elsewhere a no-op.
    fn pin(&self, cpu: u32) -> Result<Self::Pin, Fail>;
    /// Calls `f` with this CPU where a guest may run: preemption off, the host's FPU state
    /// saved (for the real processor: `vmx::hw::Hardware` over the proof of it,
    /// `vmx::hw::GuestContext`); `Err(Fail::Io)` when VMX is not on in this CPU. The state is
    /// restored before this returns.
    fn with_guest_context<R>(&self, f: impl FnOnce(&mut Self::Cpu<'_>) -> R) -> Result<R, Fail>;

    /// A signal (or the OS's equivalent) asks the thread back to user space. The default: an
    /// OS without signals for a thread in a driver (Windows), whose [`RunPolicy::slice_ns`]
    /// brings the thread back instead.
    fn signal_pending(&self) -> bool {
        false
    }
    /// The OS wants this CPU back (Linux need_resched); the loop then leaves guest mode. The
    /// default: an OS that bounds each stay instead ([`RunPolicy::stay_ns`]).
    fn resched_pending(&self) -> bool {
        false
    }
    /// Lets the OS reschedule (Linux cond_resched), between stays. The default: nothing.
    fn resched(&self) {}
    /// One pause of a thread that waits for the other half of the sharing protocol, after
    /// `waited_ns` of waiting (spin, yield or sleep).
    fn pause(&self, waited_ns: u64);
    /// Monotonic time in ns.
    fn now_ns(&self) -> u64;

    /// How the host maps the page at host-physical `hpa` in its own address space.
    fn host_mapping(&self, hpa: u64) -> Option<HostMapping>;
    /// The calling process's page-table entry for `va` and its level, if it maps a page (the
    /// tool's read-only mapping of guest RAM). The default: no such mapping.
    fn user_pte(&self, _va: u64) -> Option<(u64, u32)> {
        None
    }
    /// A capability MSR for CAPS (None: absent).
    fn rdmsr(&self, msr: u32) -> Option<u64>;
    /// Pages all VMs of the driver hold (STATS).
    fn driver_pages(&self) -> u64;
    /// Called after pages may have been freed where the OS could not free them at once (Windows
    /// frees pages freed at DISPATCH_LEVEL here).
    fn after_free(&self) {}
    /// Test hook (Linux module parameter `test_bad_vmcs`): 1/2 corrupt the guest CR0 of new
    /// VMCSs, with and without the pre-launch check.
    fn test_bad_vmcs(&self) -> u32 {
        0
    }
    /// The TSC frequency in kHz (KVM_GET_TSC_KHZ), 0 when unknown.
    fn tsc_khz(&self) -> u64 {
        0
    }
    /// KVM_SET_SIGNAL_MASK's mask for the rest of this KVM_RUN (KVM's kvm_sigset_activate):
    /// the calling thread's blocked signals become `mask` (bit n-1: signal n) until
    /// [`Os::signal_mask_leave`]. The thread's own mask must stay where the OS's signal code
    /// looks for it: a signal it blocks arriving now, with no handler and a fatal default
    /// action, must not kill the process but end the KVM_RUN and stay pending for user space
    /// (Linux: `current->real_blocked`, which `complete_signal()` consults). The default has no
    /// signals to mask.
    fn signal_mask_enter(&self, _mask: u64) {}
    /// Gives the calling thread back the mask [`Os::signal_mask_enter`] replaced.
    fn signal_mask_leave(&self) {}
    /// One line for the kernel log (the caller limits how often: a guest or a user must not
    /// flood it).
    fn log(&self, _line: &str) {}
}
