//! One error type for the whole core. Every variant carries a message a person can act on; the
//! shims map them to errno / NTSTATUS.

/// Errors of the core. `Copy` and allocation-free so they can travel through any layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// An address or length is not a multiple of 4 KiB (or of the page size the operation needs).
    Misaligned,
    /// A length of zero, or a range that wraps around.
    EmptyOrWrappingRange,
    /// A guest-physical address at or beyond 2^48 (4-level EPT) or beyond the slot.
    GpaOutOfRange,
    /// A host-physical address beyond MAXPHYADDR.
    HpaOutOfRange,
    /// The range overlaps an existing mapping or slot.
    Overlap,
    /// The range is (partly) not mapped.
    NotMapped,
    /// W without R, or execute-only without the capability, or no permission at all (SDM 29.3.3.1).
    InvalidPermissions,
    /// The platform could not supply a page.
    OutOfMemory,
    /// The driver-wide cap on the pages all VMs hold is reached.
    HostPageCap,
    /// A dirty-log range or bitmap argument that breaks the KVM rules (64-page alignment, size).
    InvalidDirtyLogRange,
    /// The caller's bitmap is too small for the slot.
    BitmapTooSmall,
    /// The slot is larger than the dirty log can track (64 GiB).
    SlotTooLarge,
    /// The requested feature is not offered by this processor.
    Unsupported,
    /// Every memory slot is in use.
    NoFreeSlot,
    /// A vCPU of the VM has run: what shapes the VMCS (the dirty-tracking mode) is fixed.
    AlreadyRunning,
    /// User memory for a slot is not mapped or not writable in the process.
    UserMemory,
}

/// What a user reads when the driver-wide page cap stops a request or a vCPU.
pub const HOST_PAGE_CAP_MESSAGE: &str =
    "smudge's host page cap reached: all VMs together hold the most pages the driver allows (Linux: module parameter max_pages, default half of RAM)";

impl Error {
    /// A one-line description for logs and user space.
    pub const fn message(&self) -> &'static str {
        match self {
            Error::Misaligned => "address or length is not 4 KiB aligned",
            Error::EmptyOrWrappingRange => "empty range, or the range wraps around",
            Error::GpaOutOfRange => "guest-physical address out of range (>= 2^48 or outside the slot)",
            Error::HpaOutOfRange => "host-physical address beyond MAXPHYADDR",
            Error::Overlap => "range overlaps an existing mapping",
            Error::NotMapped => "range is not mapped",
            Error::InvalidPermissions => {
                "invalid EPT permissions (W requires R, X-only requires the capability; SDM 29.3.3.1)"
            }
            Error::OutOfMemory => "out of memory: the platform could not supply a page",
            Error::HostPageCap => HOST_PAGE_CAP_MESSAGE,
            Error::InvalidDirtyLogRange => {
                "dirty-log range must start and span multiples of 64 pages, unless it ends at the slot end"
            }
            Error::BitmapTooSmall => "bitmap too small for the slot",
            Error::SlotTooLarge => "slot larger than the dirty-log limit (64 GiB)",
            Error::Unsupported => "not supported by this processor",
            Error::NoFreeSlot => "every memory slot of the VM is in use",
            Error::AlreadyRunning => {
                "a vCPU has run: the dirty-tracking mode can only change before the first RUN"
            }
            Error::UserMemory => "the slot's user memory is not mapped, or not writable",
        }
    }
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.message())
    }
}
