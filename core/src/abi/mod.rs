//! The user/kernel ABI, shared by the Linux ioctls and the Windows DeviceIoControl codes.
//!
//! One open of the device is one VM. Every request is a fixed-size `repr(C)` struct whose first
//! field is the ABI version; the shim copies it in as bytes and [`decode`] validates every field
//! into a typed [`Request`] (or a precise [`AbiError`]). Responses are `repr(C)` structs the shim
//! copies out. Pointers inside requests (guest images, bitmaps) are user addresses that only the
//! shim dereferences, through the OS's user-copy routines.

use crate::dirty::Mode;

pub mod windows;

/// ABI version; a request with another version is refused.
pub const VERSION: u32 = 1;
/// Largest guest RAM (the guest page tables identity-map 4 GiB).
pub const MAX_MEM: u64 = 4 << 30;
/// Smallest guest RAM (image + the reserved top 1 MiB).
pub const MIN_MEM: u64 = 4 << 20;
/// Largest guest image.
pub const MAX_IMAGE: u64 = 64 << 20;
/// Largest single guest-memory read/write request.
pub const MAX_COPY: u64 = 1 << 20;

/// Request numbers (the `nr` of the Linux ioctl, the function of the Windows CTL_CODE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    /// [`SetupReq`] -> nothing: sizes RAM, picks the dirty mode, creates vCPUs.
    Setup = 1,
    /// [`LoadElfReq`] -> [`LoadElfResp`].
    LoadElf = 2,
    /// [`RunReq`] -> [`RunResp`].
    Run = 3,
    /// [`DirtyLogReq`] -> bitmap written to user memory.
    GetDirtyLog = 4,
    /// [`ClearDirtyLogReq`].
    ClearDirtyLog = 5,
    /// [`DirtyLogReq`]: get and clear in one pass.
    HarvestDirtyLog = 6,
    /// nothing -> [`StatsResp`].
    Stats = 7,
    /// [`ExplainReq`] -> [`ExplainResp`].
    Explain = 8,
    /// [`MemReq`]: write guest memory.
    WriteGuest = 9,
    /// [`MemReq`]: read guest memory.
    ReadGuest = 10,
    /// nothing -> [`CapsResp`].
    Caps = 11,
    /// [`AddSlotReq`] -> [`AddSlotResp`]: another guest-physical memory slot.
    AddSlot = 12,
    /// [`CreateVcpuReq`] -> [`CreateVcpuResp`]: one more vCPU.
    CreateVcpu = 13,
    /// [`SetModeReq`]: the dirty-tracking mode, before the first RUN.
    SetMode = 14,
    /// [`VcpuReq`] -> [`Regs`].
    GetRegs = 15,
    /// [`SetRegsReq`].
    SetRegs = 16,
}

/// The largest [`Op::buffer_size`]: what a request answered in place needs.
pub const MAX_BUFFER: usize = {
    let (mut max, mut i) = (0, 0);
    while i < Op::ALL.len() {
        if Op::ALL[i].buffer_size() > max {
            max = Op::ALL[i].buffer_size();
        }
        i += 1;
    }
    max
};

impl Op {
    /// All requests.
    pub const ALL: [Op; 16] = [
        Op::Setup,
        Op::LoadElf,
        Op::Run,
        Op::GetDirtyLog,
        Op::ClearDirtyLog,
        Op::HarvestDirtyLog,
        Op::Stats,
        Op::Explain,
        Op::WriteGuest,
        Op::ReadGuest,
        Op::Caps,
        Op::AddSlot,
        Op::CreateVcpu,
        Op::SetMode,
        Op::GetRegs,
        Op::SetRegs,
    ];

    /// Bytes of the request struct.
    pub const fn request_size(self) -> usize {
        match self {
            Op::Setup => core::mem::size_of::<SetupReq>(),
            Op::LoadElf => core::mem::size_of::<LoadElfReq>(),
            Op::Run | Op::GetRegs => core::mem::size_of::<VcpuReq>(),
            Op::GetDirtyLog | Op::HarvestDirtyLog => core::mem::size_of::<DirtyLogReq>(),
            Op::ClearDirtyLog => core::mem::size_of::<ClearDirtyLogReq>(),
            Op::Explain => core::mem::size_of::<ExplainReq>(),
            Op::WriteGuest | Op::ReadGuest => core::mem::size_of::<MemReq>(),
            Op::Stats | Op::Caps => core::mem::size_of::<u32>(),
            Op::AddSlot => core::mem::size_of::<AddSlotReq>(),
            Op::CreateVcpu => core::mem::size_of::<CreateVcpuReq>(),
            Op::SetMode => core::mem::size_of::<SetModeReq>(),
            Op::SetRegs => core::mem::size_of::<SetRegsReq>(),
        }
    }

    /// Bytes of the response struct (written back into the same buffer).
    pub const fn response_size(self) -> usize {
        match self {
            Op::LoadElf => core::mem::size_of::<LoadElfResp>(),
            Op::Run => core::mem::size_of::<RunResp>(),
            Op::Stats => core::mem::size_of::<StatsResp>(),
            Op::Explain => core::mem::size_of::<ExplainResp>(),
            Op::Caps => core::mem::size_of::<CapsResp>(),
            Op::AddSlot => core::mem::size_of::<AddSlotResp>(),
            Op::CreateVcpu => core::mem::size_of::<CreateVcpuResp>(),
            Op::GetRegs => core::mem::size_of::<Regs>(),
            _ => 0,
        }
    }

    /// The size of the ioctl buffer: the larger of request and response.
    pub const fn buffer_size(self) -> usize {
        let (a, b) = (self.request_size(), self.response_size());
        if a > b {
            a
        } else {
            b
        }
    }

    /// Linux ioctl number: `_IOWR('S', nr, buffer_size)` (include/uapi/asm-generic/ioctl.h).
    pub const fn linux_ioctl(self) -> u32 {
        (3 << 30) | ((self.buffer_size() as u32) << 16) | ((b'S' as u32) << 8) | self as u32
    }

    /// Windows IOCTL: `CTL_CODE(FILE_DEVICE_UNKNOWN, 0x800 + nr, METHOD_BUFFERED,
    /// FILE_WRITE_ACCESS)`: the I/O manager lets only handles opened for writing send them.
    pub const fn windows_ioctl(self) -> u32 {
        use windows::*;
        ctl_code(
            FILE_DEVICE_UNKNOWN,
            0x800 + self as u32,
            METHOD_BUFFERED,
            FILE_WRITE_ACCESS,
        )
    }

    /// The request of a Linux ioctl number, if it is one of ours.
    pub fn from_linux_ioctl(cmd: u32) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.linux_ioctl() == cmd)
    }

    /// The request of a Windows IOCTL code, if it is one of ours.
    pub fn from_windows_ioctl(code: u32) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.windows_ioctl() == code)
    }
}

/// Sizes RAM and picks the dirty-tracking mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetupReq {
    /// [`VERSION`].
    pub version: u32,
    /// 0 = the best the CPU has, 1 = A/D scan, 2 = PML, 3 = write-protect.
    pub mode: u32,
    /// Guest RAM bytes at GPA 0: a multiple of 2 MiB in [`MIN_MEM`, `MAX_MEM`].
    pub mem_bytes: u64,
    /// vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u32,
    /// Most backing pages the VM may hold (0 = mem_bytes / 4 KiB).
    pub page_limit: u32,
}

/// vCPUs per VM.
pub const MAX_VCPUS: u32 = 8;

/// Loads a static ELF64 guest image.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadElfReq {
    /// [`VERSION`].
    pub version: u32,
    /// Padding (0).
    pub reserved: u32,
    /// User address of the image.
    pub image: u64,
    /// Bytes (1..=[`MAX_IMAGE`]).
    pub len: u64,
}

/// The loaded image.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadElfResp {
    /// e_entry.
    pub entry: u64,
}

/// Names a vCPU: RUN and GET_REGS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuReq {
    /// [`VERSION`].
    pub version: u32,
    /// vCPU index.
    pub vcpu: u32,
}

/// Runs a vCPU.
pub type RunReq = VcpuReq;

/// Adds a guest-physical memory slot, backed lazily like RAM and dirty-logged in the VM's mode.
/// Guest accesses outside every slot are MMIO exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddSlotReq {
    /// [`VERSION`].
    pub version: u32,
    /// Padding (0).
    pub reserved: u32,
    /// First guest-physical address (4 KiB aligned).
    pub gpa: u64,
    /// Bytes (a multiple of 4 KiB, at most [`MAX_SLOT`]; `gpa + size` at most [`GPA_LIMIT`]).
    pub size: u64,
}

/// Largest slot: its dirty bitmap (one bit per 4 KiB page) fits the 2 MiB a dirty-log request
/// may name.
pub const MAX_SLOT: u64 = 64 << 30;
/// Guest-physical addresses end here (a 4-level EPT translates 48 bits, SDM 29.3.2).
pub const GPA_LIMIT: u64 = 1 << 48;

/// The new slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddSlotResp {
    /// Its index for the dirty-log requests (RAM is slot 0).
    pub slot: u32,
    /// Padding.
    pub reserved: u32,
}

/// Creates one more vCPU (index = the number of vCPUs so far).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreateVcpuReq {
    /// [`VERSION`].
    pub version: u32,
    /// Padding (0).
    pub reserved: u32,
}

/// The new vCPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreateVcpuResp {
    /// Its index.
    pub vcpu: u32,
    /// Padding.
    pub reserved: u32,
}

/// Changes the dirty-tracking mode. Allowed until the first RUN of any vCPU (the mode shapes
/// the VMCS: EPTP bit 6, the PML controls); the dirty logs start empty in the new mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetModeReq {
    /// [`VERSION`].
    pub version: u32,
    /// As [`SetupReq::mode`].
    pub mode: u32,
}

/// A vCPU's general-purpose registers, RIP and RFLAGS, in KVM's `struct kvm_regs` order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RSP.
    pub rsp: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
}

/// Sets a vCPU's registers (between runs). A stopped vCPU (HLT, an exit hypercall, a triple
/// fault, an MMIO exit, or an error) becomes runnable again and continues at the new RIP, with
/// no interrupt shadow or pending debug exception left from before.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetRegsReq {
    /// [`VERSION`].
    pub version: u32,
    /// vCPU index.
    pub vcpu: u32,
    /// The registers.
    pub regs: Regs,
}

/// RFLAGS bits that must be 0 on VM entry: 63:22, 15, 5, 3 (SDM 27.3.1.4), and VM (bit 17),
/// which must be 0 for an IA-32e mode guest (smudge's guests are).
pub const RFLAGS_MUST_BE_0: u64 = !0x3f_ffff | (1 << 15) | (1 << 5) | (1 << 3) | (1 << 17);
/// RFLAGS bit 1 must be 1 on VM entry (SDM 27.3.1.4).
pub const RFLAGS_MUST_BE_1: u64 = 1 << 1;

/// Kinds of [`RunResp`].
pub mod exit_kind {
    /// The vCPU executed HLT.
    pub const HLT: u32 = 1;
    /// Hypercall 0; `code` holds RDI.
    pub const EXIT: u32 = 2;
    /// Hypercall 1: harvest now, then run again (the guest sees RAX = 0).
    pub const CHECKPOINT: u32 = 3;
    /// Console bytes only; run again.
    pub const CONSOLE: u32 = 4;
    /// Access outside every slot at `gpa`.
    pub const MMIO: u32 = 5;
    /// Triple fault.
    pub const TRIPLE_FAULT: u32 = 6;
    /// Interrupted (signal or time slice); run again.
    pub const INTERRUPTED: u32 = 7;
    /// Stopped by an error; `reason` and `message` say why.
    pub const ERROR: u32 = 8;
}

/// Bytes of the message in [`RunResp`].
pub const MESSAGE_LEN: usize = 480;

/// [`RunResp::code`] of a VMX instruction that failed with VMfailInvalid, which has no
/// VM-instruction error number (no current VMCS, SDM 31.2).
pub const VMFAIL_INVALID: u64 = u64::MAX;

/// [`RunResp::reason`] of a run that ended without a VM exit (a VMX instruction of smudge's
/// own failed before or instead of one).
pub const NO_VM_EXIT: u32 = u32::MAX;

/// The exit record of a run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunResp {
    /// One of [`exit_kind`].
    pub kind: u32,
    /// Basic VM-exit reason that ended the run ([`NO_VM_EXIT`] when none did).
    pub reason: u32,
    /// Exit code (EXIT) or VM-instruction error (ERROR; [`VMFAIL_INVALID`] when the failure
    /// had none).
    pub code: u64,
    /// MMIO address.
    pub gpa: u64,
    /// Console bytes valid in `console`.
    pub console_len: u32,
    /// 1 when the MMIO access was a write.
    pub write: u32,
    /// Console output since the last run returned.
    pub console: [u8; 256],
    /// NUL-terminated message for ERROR (the entry checker's finding, or the stop cause).
    pub message: [u8; MESSAGE_LEN],
}

impl Default for RunResp {
    fn default() -> Self {
        RunResp {
            kind: 0,
            reason: 0,
            code: 0,
            gpa: 0,
            console_len: 0,
            write: 0,
            console: [0; 256],
            message: [0; MESSAGE_LEN],
        }
    }
}

impl RunResp {
    /// Copies `msg` into `message` (truncated, NUL-terminated).
    pub fn set_message(&mut self, msg: &str) {
        let n = msg.len().min(MESSAGE_LEN - 1);
        self.message[..n].copy_from_slice(&msg.as_bytes()[..n]);
        self.message[n] = 0;
    }
}

/// Get or harvest the dirty log of a slot into a user bitmap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyLogReq {
    /// [`VERSION`].
    pub version: u32,
    /// Slot index (0 = RAM).
    pub slot: u32,
    /// User address of the bitmap (one bit per 4 KiB page, u64 words).
    pub bitmap: u64,
    /// Bytes of the bitmap (at least pages/8 rounded up to 8).
    pub bitmap_len: u64,
}

/// `KVM_CLEAR_DIRTY_LOG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClearDirtyLogReq {
    /// [`VERSION`].
    pub version: u32,
    /// Slot index.
    pub slot: u32,
    /// First page (a multiple of 64).
    pub first_page: u64,
    /// Pages (a multiple of 64 unless the range ends at the slot end).
    pub num_pages: u64,
    /// User address of the mask bitmap (num_pages bits).
    pub mask: u64,
}

/// Page accounting and exit counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsResp {
    /// Pages this VM holds.
    pub vm_pages: u64,
    /// Pages every VM of the driver holds.
    pub driver_pages: u64,
    /// Dirty mode in use (1 ad, 2 pml, 3 wp).
    pub mode: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Exits per basic reason, summed over vCPUs.
    pub exits: [u64; 70],
    /// What the run loop did for the host around the entries, summed over vCPUs.
    pub isolation: Isolation,
}

/// What the run loop did for the host's isolation around VM entries (`spec`, and the
/// test-only read-out of the host's debug state).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Isolation {
    /// VM entries.
    pub entries: u64,
    /// L1D flushes before an entry.
    pub l1d_flushes: u64,
    /// VERWs before an entry.
    pub verws: u64,
    /// IBPBs on a VMCS switch.
    pub ibpbs: u64,
    /// Exits after which the host's DR0-DR3, DR7, XCR0 and IA32_DEBUGCTL were compared with
    /// their values before the run (only with the driver's test-only probe on).
    pub probes: u64,
    /// Of those, exits after which any differed.
    pub host_changed: u64,
}

impl Default for StatsResp {
    fn default() -> Self {
        StatsResp {
            vm_pages: 0,
            driver_pages: 0,
            mode: 0,
            vcpus: 0,
            exits: [0; 70],
            isolation: Isolation::default(),
        }
    }
}

/// The seed question for one GPA.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExplainReq {
    /// [`VERSION`].
    pub version: u32,
    /// Padding (0).
    pub reserved: u32,
    /// Guest-physical (= guest-virtual, identity-mapped) address.
    pub gpa: u64,
    /// 0, or the address of this page in the caller's read-only mapping of guest RAM (mmap of
    /// the VM's descriptor): the driver then also reports the user PTE that maps it.
    pub user_va: u64,
}

/// What each layer says about one guest page.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExplainResp {
    /// Guest PDE/PTE that maps the address (the guest's own page tables), 0 if none.
    pub guest_pte: u64,
    /// Level of that guest entry (1 = PTE, 2 = 2 MiB PDE).
    pub guest_level: u32,
    /// Level of the EPT leaf.
    pub ept_level: u32,
    /// The EPT leaf (A = bit 8, D = bit 9), 0 if not mapped.
    pub ept_leaf: u64,
    /// Host-physical address of the backing page.
    pub hpa: u64,
    /// Host kernel virtual address of the backing page (the direct map).
    pub host_va: u64,
    /// The host page-table entry that maps `host_va` (A = bit 5, D = bit 6).
    pub host_pte: u64,
    /// Level of the host entry (1 = 4 KiB PTE, 2 = 2 MiB, 3 = 1 GiB).
    pub host_level: u32,
    /// Level of the user entry (0 = no user mapping asked or found).
    pub user_level: u32,
    /// The caller's page-table entry for `user_va` (A = bit 5, D = bit 6).
    pub user_pte: u64,
}

/// Guest memory copy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemReq {
    /// [`VERSION`].
    pub version: u32,
    /// Padding (0).
    pub reserved: u32,
    /// Guest-physical address.
    pub gpa: u64,
    /// User buffer.
    pub buf: u64,
    /// Bytes (1..=[`MAX_COPY`]).
    pub len: u64,
}

/// The live VMX capability MSRs (for `smudge caps`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapsResp {
    /// (MSR, value) pairs; `present` bit i says pair i was readable.
    pub msrs: [[u64; 2]; 24],
    /// Bitmask of readable pairs.
    pub present: u32,
    /// The mode the driver would choose (1 ad, 2 pml, 3 wp, 0 none).
    pub mode: u32,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiError {
    /// Not one of our request numbers.
    UnknownRequest,
    /// The buffer is shorter than the request.
    Truncated,
    /// The version field is not [`VERSION`].
    BadVersion,
    /// A reserved field is not 0.
    ReservedNonZero,
    /// The mode number is not 0..=3.
    BadMode,
    /// RAM size not a multiple of 2 MiB or out of [`MIN_MEM`, `MAX_MEM`].
    BadMemSize,
    /// vCPU count or index out of range.
    BadVcpu,
    /// A length of 0 or above the limit.
    BadLength,
    /// A user pointer that is null or wraps.
    BadPointer,
    /// A slot that is misaligned, empty, too large or beyond the guest-physical limit.
    BadSlot,
    /// RFLAGS breaks the VM-entry rules.
    BadRflags,
    /// RIP is not canonical.
    BadRip,
}

impl AbiError {
    /// One line for the user.
    pub const fn message(&self) -> &'static str {
        match self {
            AbiError::UnknownRequest => "unknown request",
            AbiError::Truncated => "request buffer too short",
            AbiError::BadVersion => {
                "ABI version mismatch (rebuild the tool and the driver together)"
            }
            AbiError::ReservedNonZero => "reserved field is not zero",
            AbiError::BadMode => "dirty mode must be 0 (auto), 1 (ad), 2 (pml) or 3 (wp)",
            AbiError::BadMemSize => "guest RAM must be a multiple of 2 MiB between 4 MiB and 4 GiB",
            AbiError::BadVcpu => "vCPU count or index out of range",
            AbiError::BadLength => "length is zero or above the limit",
            AbiError::BadPointer => "null or wrapping user pointer",
            AbiError::BadSlot => {
                "slot must be 4 KiB aligned, 4 KiB to 64 GiB long, and end at or below 2^48"
            }
            AbiError::BadRflags => {
                "RFLAGS bits 63:22, 17 (VM), 15, 5 and 3 must be 0 and bit 1 must be 1 (SDM 27.3.1.4)"
            }
            AbiError::BadRip => "RIP must be canonical (bits 63:47 equal, SDM 27.3.1.4)",
        }
    }

    /// The Linux errno (positive) for this error.
    pub const fn errno(&self) -> i32 {
        match self {
            AbiError::UnknownRequest => 25, // ENOTTY
            AbiError::BadPointer => 14,     // EFAULT
            AbiError::BadLength => 22,      // EINVAL
            _ => 22,                        // EINVAL
        }
    }
}

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Setup.
    Setup {
        /// `None` = auto.
        mode: Option<Mode>,
        /// RAM bytes.
        mem_bytes: u64,
        /// vCPUs.
        vcpus: u32,
        /// Backing-page limit.
        page_limit: u64,
    },
    /// Load an ELF image from user memory.
    LoadElf {
        /// User address.
        image: u64,
        /// Bytes.
        len: u64,
    },
    /// Run a vCPU.
    Run {
        /// Index (checked against the VM by the caller).
        vcpu: u32,
    },
    /// Get (harvest = false) or get-and-clear the dirty log.
    DirtyLog {
        /// Slot.
        slot: u32,
        /// User bitmap.
        bitmap: u64,
        /// Bytes.
        bitmap_len: u64,
        /// Clear too.
        harvest: bool,
    },
    /// Clear part of the dirty log.
    ClearDirtyLog {
        /// Slot.
        slot: u32,
        /// First page.
        first_page: u64,
        /// Pages.
        num_pages: u64,
        /// User mask.
        mask: u64,
    },
    /// Statistics.
    Stats,
    /// Explain one GPA.
    Explain {
        /// Address.
        gpa: u64,
        /// The page in the caller's read-only mapping of guest RAM, or 0.
        user_va: u64,
    },
    /// Copy to (write = true) or from guest memory.
    Mem {
        /// Guest address.
        gpa: u64,
        /// User buffer.
        buf: u64,
        /// Bytes.
        len: u64,
        /// Direction.
        write: bool,
    },
    /// Capabilities.
    Caps,
    /// Add a memory slot.
    AddSlot {
        /// First GPA.
        gpa: u64,
        /// Bytes.
        size: u64,
    },
    /// Create one more vCPU.
    CreateVcpu,
    /// Change the dirty-tracking mode.
    SetMode {
        /// `None` = the best the CPU has.
        mode: Option<Mode>,
    },
    /// Read a vCPU's registers.
    GetRegs {
        /// Index (checked against the VM by the caller).
        vcpu: u32,
    },
    /// Write a vCPU's registers.
    SetRegs {
        /// Index (checked against the VM by the caller).
        vcpu: u32,
        /// Values (RFLAGS and RIP checked).
        regs: Regs,
    },
}

/// The dirty mode of its wire number (0 auto, 1 A/D, 2 PML, 3 write-protect).
pub fn mode_of(mode: u32) -> Result<Option<Mode>, AbiError> {
    Ok(match mode {
        0 => None,
        1 => Some(Mode::AdScan),
        2 => Some(Mode::Pml),
        3 => Some(Mode::WriteProtect),
        _ => return Err(AbiError::BadMode),
    })
}

fn vcpu_index(vcpu: u32) -> Result<u32, AbiError> {
    if vcpu >= MAX_VCPUS {
        return Err(AbiError::BadVcpu);
    }
    Ok(vcpu)
}

/// A canonical address: bits 63:47 all equal (48-bit linear addresses; SDM 27.3.1.4 checks
/// bits 63:N for the processor's N, and smudge's guests use 4-level paging).
pub const fn is_canonical(va: u64) -> bool {
    let top = va >> 47;
    top == 0 || top == (1 << 17) - 1
}

fn user_range(ptr: u64, len: u64, max: u64) -> Result<(), AbiError> {
    if len == 0 || len > max {
        return Err(AbiError::BadLength);
    }
    if ptr == 0 || ptr.checked_add(len).is_none() {
        return Err(AbiError::BadPointer);
    }
    Ok(())
}

/// Validates the request `op` in `buf` (the bytes the shim copied from user space).
pub fn decode(op: Op, buf: &[u8]) -> Result<Request, AbiError> {
    let version = Reader::new(buf).u32()?;
    if version != VERSION {
        return Err(AbiError::BadVersion);
    }
    Ok(match op {
        Op::Setup => {
            let r = SetupReq::from_bytes(buf)?;
            let mode = mode_of(r.mode)?;
            if r.mem_bytes % (2 << 20) != 0 || r.mem_bytes < MIN_MEM || r.mem_bytes > MAX_MEM {
                return Err(AbiError::BadMemSize);
            }
            if r.vcpus == 0 || r.vcpus > MAX_VCPUS {
                return Err(AbiError::BadVcpu);
            }
            let pages = r.mem_bytes / 4096;
            let page_limit = if r.page_limit == 0 {
                pages
            } else {
                u64::from(r.page_limit).min(pages)
            };
            Request::Setup {
                mode,
                mem_bytes: r.mem_bytes,
                vcpus: r.vcpus,
                page_limit,
            }
        }
        Op::LoadElf => {
            let r = LoadElfReq::from_bytes(buf)?;
            if r.reserved != 0 {
                return Err(AbiError::ReservedNonZero);
            }
            user_range(r.image, r.len, MAX_IMAGE)?;
            Request::LoadElf {
                image: r.image,
                len: r.len,
            }
        }
        Op::Run => {
            let r = VcpuReq::from_bytes(buf)?;
            Request::Run {
                vcpu: vcpu_index(r.vcpu)?,
            }
        }
        Op::GetRegs => {
            let r = VcpuReq::from_bytes(buf)?;
            Request::GetRegs {
                vcpu: vcpu_index(r.vcpu)?,
            }
        }
        Op::SetRegs => {
            let r = SetRegsReq::from_bytes(buf)?;
            let vcpu = vcpu_index(r.vcpu)?;
            let f = r.regs.rflags;
            if f & RFLAGS_MUST_BE_0 != 0 || f & RFLAGS_MUST_BE_1 == 0 {
                return Err(AbiError::BadRflags);
            }
            if !is_canonical(r.regs.rip) {
                return Err(AbiError::BadRip);
            }
            Request::SetRegs { vcpu, regs: r.regs }
        }
        Op::AddSlot => {
            let r = AddSlotReq::from_bytes(buf)?;
            if r.reserved != 0 {
                return Err(AbiError::ReservedNonZero);
            }
            let aligned = r.gpa % 4096 == 0 && r.size % 4096 == 0;
            let end = r.gpa.saturating_add(r.size);
            if !aligned || r.size == 0 || r.size > MAX_SLOT || end > GPA_LIMIT {
                return Err(AbiError::BadSlot);
            }
            Request::AddSlot {
                gpa: r.gpa,
                size: r.size,
            }
        }
        Op::CreateVcpu => {
            let r = CreateVcpuReq::from_bytes(buf)?;
            if r.reserved != 0 {
                return Err(AbiError::ReservedNonZero);
            }
            Request::CreateVcpu
        }
        Op::SetMode => {
            let r = SetModeReq::from_bytes(buf)?;
            Request::SetMode {
                mode: mode_of(r.mode)?,
            }
        }
        Op::GetDirtyLog | Op::HarvestDirtyLog => {
            let r = DirtyLogReq::from_bytes(buf)?;
            // A 64 GiB slot needs 2 MiB of bitmap.
            user_range(r.bitmap, r.bitmap_len, 2 << 20)?;
            Request::DirtyLog {
                slot: r.slot,
                bitmap: r.bitmap,
                bitmap_len: r.bitmap_len,
                harvest: op == Op::HarvestDirtyLog,
            }
        }
        Op::ClearDirtyLog => {
            let r = ClearDirtyLogReq::from_bytes(buf)?;
            user_range(r.mask, r.num_pages.div_ceil(64).saturating_mul(8), 2 << 20)?;
            Request::ClearDirtyLog {
                slot: r.slot,
                first_page: r.first_page,
                num_pages: r.num_pages,
                mask: r.mask,
            }
        }
        Op::Stats => Request::Stats,
        Op::Caps => Request::Caps,
        Op::Explain => {
            let r = ExplainReq::from_bytes(buf)?;
            if r.reserved != 0 {
                return Err(AbiError::ReservedNonZero);
            }
            Request::Explain {
                gpa: r.gpa,
                user_va: r.user_va,
            }
        }
        Op::WriteGuest | Op::ReadGuest => {
            let r = MemReq::from_bytes(buf)?;
            if r.reserved != 0 {
                return Err(AbiError::ReservedNonZero);
            }
            user_range(r.buf, r.len, MAX_COPY)?;
            Request::Mem {
                gpa: r.gpa,
                buf: r.buf,
                len: r.len,
                write: op == Op::WriteGuest,
            }
        }
    })
}

/// Little-endian reader over a request or response buffer.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N], AbiError> {
        let end = self.pos.checked_add(N).ok_or(AbiError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(AbiError::Truncated)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        self.pos = end;
        Ok(a)
    }
    /// Next u8.
    pub fn u8(&mut self) -> Result<u8, AbiError> {
        self.take::<1>().map(|b| b[0])
    }
    /// Next u16.
    pub fn u16(&mut self) -> Result<u16, AbiError> {
        self.take::<2>().map(u16::from_le_bytes)
    }
    /// Next u32.
    pub fn u32(&mut self) -> Result<u32, AbiError> {
        self.take::<4>().map(u32::from_le_bytes)
    }
    /// Next u64.
    pub fn u64(&mut self) -> Result<u64, AbiError> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    /// Next N bytes.
    pub fn bytes<const N: usize>(&mut self) -> Result<[u8; N], AbiError> {
        self.take::<N>()
    }
    /// Next N u64s.
    pub fn u64s<const N: usize>(&mut self) -> Result<[u64; N], AbiError> {
        let mut a = [0u64; N];
        for v in a.iter_mut() {
            *v = self.u64()?;
        }
        Ok(a)
    }
    /// Next nested struct ([`Regs`], [`Isolation`]).
    pub fn nested<T: Wire>(&mut self) -> Result<T, AbiError> {
        T::from_bytes(self.buf.get(self.pos..).ok_or(AbiError::Truncated)?).inspect(|_| {
            self.pos += core::mem::size_of::<T>();
        })
    }
    /// Next N (u64, u64) pairs.
    pub fn pairs<const N: usize>(&mut self) -> Result<[[u64; 2]; N], AbiError> {
        let mut a = [[0u64; 2]; N];
        for v in a.iter_mut() {
            *v = [self.u64()?, self.u64()?];
        }
        Ok(a)
    }
}

/// Little-endian writer into a response or request buffer.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// A writer at the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, pos: 0 }
    }
    fn put(&mut self, b: &[u8]) -> Result<(), AbiError> {
        let end = self.pos.checked_add(b.len()).ok_or(AbiError::Truncated)?;
        self.buf
            .get_mut(self.pos..end)
            .ok_or(AbiError::Truncated)?
            .copy_from_slice(b);
        self.pos = end;
        Ok(())
    }
    /// Writes a u8.
    pub fn u8(&mut self, v: &u8) -> Result<(), AbiError> {
        self.put(&[*v])
    }
    /// Writes a u16.
    pub fn u16(&mut self, v: &u16) -> Result<(), AbiError> {
        self.put(&v.to_le_bytes())
    }
    /// Writes a u32.
    pub fn u32(&mut self, v: &u32) -> Result<(), AbiError> {
        self.put(&v.to_le_bytes())
    }
    /// Writes a u64.
    pub fn u64(&mut self, v: &u64) -> Result<(), AbiError> {
        self.put(&v.to_le_bytes())
    }
    /// Writes bytes.
    pub fn bytes<const N: usize>(&mut self, v: &[u8; N]) -> Result<(), AbiError> {
        self.put(v)
    }
    /// Writes u64s.
    pub fn u64s<const N: usize>(&mut self, v: &[u64; N]) -> Result<(), AbiError> {
        v.iter().try_for_each(|x| self.u64(x))
    }
    /// Writes a nested struct ([`Regs`], [`Isolation`]).
    pub fn nested<T: Wire>(&mut self, v: &T) -> Result<(), AbiError> {
        let n = v.to_bytes(self.buf.get_mut(self.pos..).ok_or(AbiError::Truncated)?)?;
        self.pos += n;
        Ok(())
    }
    /// Writes pairs.
    pub fn pairs<const N: usize>(&mut self, v: &[[u64; 2]; N]) -> Result<(), AbiError> {
        v.iter()
            .try_for_each(|x| self.u64(&x[0]).and_then(|_| self.u64(&x[1])))
    }
    /// Bytes written.
    pub fn len(&self) -> usize {
        self.pos
    }
    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
}

/// A struct of the ABI, encoded exactly as its `repr(C)` layout (little-endian, explicit padding).
pub trait Wire: Sized {
    /// Encodes into `buf`; returns the bytes written.
    fn to_bytes(&self, buf: &mut [u8]) -> Result<usize, AbiError>;
    /// Decodes from `buf`.
    fn from_bytes(buf: &[u8]) -> Result<Self, AbiError>;
}

macro_rules! wire {
    ($t:ident { $($f:ident : $k:ident $(<$n:literal>)?),* $(,)? }) => {
        impl Wire for $t {
            fn to_bytes(&self, buf: &mut [u8]) -> Result<usize, AbiError> {
                let mut w = Writer::new(buf);
                $( w.$k $(::<$n>)? (&self.$f)?; )*
                Ok(w.len())
            }
            fn from_bytes(buf: &[u8]) -> Result<Self, AbiError> {
                let mut r = Reader::new(buf);
                Ok($t { $( $f: r.$k $(::<$n>)? ()?, )* })
            }
        }
    };
}

pub(crate) use wire;

wire!(SetupReq {
    version: u32,
    mode: u32,
    mem_bytes: u64,
    vcpus: u32,
    page_limit: u32
});
wire!(LoadElfReq {
    version: u32,
    reserved: u32,
    image: u64,
    len: u64
});
wire!(LoadElfResp { entry: u64 });
wire!(VcpuReq {
    version: u32,
    vcpu: u32
});
wire!(AddSlotReq {
    version: u32,
    reserved: u32,
    gpa: u64,
    size: u64
});
wire!(AddSlotResp {
    slot: u32,
    reserved: u32
});
wire!(CreateVcpuReq {
    version: u32,
    reserved: u32
});
wire!(CreateVcpuResp {
    vcpu: u32,
    reserved: u32
});
wire!(SetModeReq {
    version: u32,
    mode: u32
});
wire!(Regs {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rsp: u64,
    rbp: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    r11: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rip: u64,
    rflags: u64,
});
wire!(SetRegsReq {
    version: u32,
    vcpu: u32,
    regs: nested
});
wire!(RunResp {
    kind: u32, reason: u32, code: u64, gpa: u64, console_len: u32, write: u32,
    console: bytes<256>, message: bytes<480>,
});
wire!(DirtyLogReq {
    version: u32,
    slot: u32,
    bitmap: u64,
    bitmap_len: u64
});
wire!(ClearDirtyLogReq {
    version: u32,
    slot: u32,
    first_page: u64,
    num_pages: u64,
    mask: u64
});
wire!(StatsResp {
    vm_pages: u64,
    driver_pages: u64,
    mode: u32,
    vcpus: u32,
    exits: u64s<70>,
    isolation: nested
});
wire!(Isolation {
    entries: u64,
    l1d_flushes: u64,
    verws: u64,
    ibpbs: u64,
    probes: u64,
    host_changed: u64
});
wire!(ExplainReq {
    version: u32,
    reserved: u32,
    gpa: u64,
    user_va: u64
});
wire!(ExplainResp {
    guest_pte: u64,
    guest_level: u32,
    ept_level: u32,
    ept_leaf: u64,
    hpa: u64,
    host_va: u64,
    host_pte: u64,
    host_level: u32,
    user_level: u32,
    user_pte: u64,
});
wire!(MemReq {
    version: u32,
    reserved: u32,
    gpa: u64,
    buf: u64,
    len: u64
});
wire!(CapsResp { msrs: pairs<24>, present: u32, mode: u32 });
