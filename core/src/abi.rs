//! The user/kernel ABI, shared by the Linux ioctls and the Windows DeviceIoControl codes.
//!
//! One open of the device is one VM. Every request is a fixed-size `repr(C)` struct whose first
//! field is the ABI version; the shim copies it in as bytes and [`decode`] validates every field
//! into a typed [`Request`] (or a precise [`AbiError`]). Responses are `repr(C)` structs the shim
//! copies out. Pointers inside requests (guest images, bitmaps) are user addresses that only the
//! shim dereferences, through the OS's user-copy routines.

use crate::dirty::Mode;

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
}

impl Op {
    /// All requests.
    pub const ALL: [Op; 11] = [
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
    ];

    /// Bytes of the request struct.
    pub const fn request_size(self) -> usize {
        match self {
            Op::Setup => core::mem::size_of::<SetupReq>(),
            Op::LoadElf => core::mem::size_of::<LoadElfReq>(),
            Op::Run => core::mem::size_of::<RunReq>(),
            Op::GetDirtyLog | Op::HarvestDirtyLog => core::mem::size_of::<DirtyLogReq>(),
            Op::ClearDirtyLog => core::mem::size_of::<ClearDirtyLogReq>(),
            Op::Explain => core::mem::size_of::<ExplainReq>(),
            Op::WriteGuest | Op::ReadGuest => core::mem::size_of::<MemReq>(),
            Op::Stats | Op::Caps => core::mem::size_of::<u32>(),
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
        (0x22 << 16) | (2 << 14) | ((0x800 + self as u32) << 2)
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

/// Runs a vCPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunReq {
    /// [`VERSION`].
    pub version: u32,
    /// vCPU index.
    pub vcpu: u32,
}

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

/// The exit record of a run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunResp {
    /// One of [`exit_kind`].
    pub kind: u32,
    /// Basic VM-exit reason that ended the run.
    pub reason: u32,
    /// Exit code (EXIT) or VM-instruction error (ERROR).
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
}

impl Default for StatsResp {
    fn default() -> Self {
        StatsResp {
            vm_pages: 0,
            driver_pages: 0,
            mode: 0,
            vcpus: 0,
            exits: [0; 70],
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsResp {
    /// (MSR, value) pairs; `present` bit i says pair i was readable.
    pub msrs: [[u64; 2]; 24],
    /// Bitmask of readable pairs.
    pub present: u32,
    /// The mode the driver would choose (1 ad, 2 pml, 3 wp, 0 none).
    pub mode: u32,
}

impl Default for CapsResp {
    fn default() -> Self {
        CapsResp {
            msrs: [[0; 2]; 24],
            present: 0,
            mode: 0,
        }
    }
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
            let mode = match r.mode {
                0 => None,
                1 => Some(Mode::AdScan),
                2 => Some(Mode::Pml),
                3 => Some(Mode::WriteProtect),
                _ => return Err(AbiError::BadMode),
            };
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
            let r = RunReq::from_bytes(buf)?;
            if r.vcpu >= MAX_VCPUS {
                return Err(AbiError::BadVcpu);
            }
            Request::Run { vcpu: r.vcpu }
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
wire!(RunReq {
    version: u32,
    vcpu: u32
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
wire!(StatsResp { vm_pages: u64, driver_pages: u64, mode: u32, vcpus: u32, exits: u64s<70> });
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
