//! The KVM user API subset smudge's KVM personality serves (Linux 6.12,
//! `include/uapi/linux/kvm.h` and `arch/x86/include/uapi/asm/kvm.h`): ioctl numbers, struct
//! layouts and constants, as KVM's dirty-log selftests use them. Layouts are checked against
//! what the C compiler makes of the 6.12 headers (`shared-tests/fixtures/kvm-uapi`).

use crate::abi::{wire, AbiError, Reader, Wire, Writer};

/// The ioctl type of every KVM request (`KVMIO`).
pub const KVMIO: u32 = 0xAE;
/// `KVM_GET_API_VERSION`'s answer.
pub const API_VERSION: u32 = 12;

/// `_IOC(dir, KVMIO, nr, size)` (include/uapi/asm-generic/ioctl.h): direction in bits 31:30
/// (1 write, 2 read, 3 both), size in 29:16, type in 15:8, number in 7:0.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (KVMIO << 8) | nr
}
const fn io(nr: u32) -> u32 {
    ioc(0, nr, 0)
}
const fn iow(nr: u32, size: usize) -> u32 {
    ioc(1, nr, size)
}
const fn ior(nr: u32, size: usize) -> u32 {
    ioc(2, nr, size)
}
const fn iowr(nr: u32, size: usize) -> u32 {
    ioc(3, nr, size)
}

/// Which file descriptor a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `/dev/kvm` itself.
    System,
    /// A VM (from KVM_CREATE_VM).
    Vm,
    /// A vCPU (from KVM_CREATE_VCPU).
    Vcpu,
}

macro_rules! ioctls {
    ($($(#[$doc:meta])* $name:ident = $num:expr, $scope:ident;)*) => {
        /// The KVM requests smudge serves.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Ioctl {
            $($(#[$doc])* $name,)*
        }

        impl Ioctl {
            /// Every request.
            pub const ALL: &'static [Ioctl] = &[$(Ioctl::$name,)*];

            /// Its ioctl number.
            pub const fn number(self) -> u32 {
                match self {
                    $(Ioctl::$name => $num,)*
                }
            }

            /// The descriptor it is sent to. (KVM_CHECK_EXTENSION goes to both `/dev/kvm` and a
            /// VM: listed as System, accepted on a VM too.)
            pub const fn scope(self) -> Scope {
                match self {
                    $(Ioctl::$name => Scope::$scope,)*
                }
            }
        }
    };
}

ioctls! {
    /// `KVM_GET_API_VERSION`.
    GetApiVersion = io(0x00), System;
    /// `KVM_CREATE_VM` (argument: machine type, 0).
    CreateVm = io(0x01), System;
    /// `KVM_CHECK_EXTENSION` (argument: a capability number).
    CheckExtension = io(0x03), System;
    /// `KVM_GET_VCPU_MMAP_SIZE`.
    GetVcpuMmapSize = io(0x04), System;
    /// `KVM_GET_SUPPORTED_CPUID` (`struct kvm_cpuid2`).
    GetSupportedCpuid = iowr(0x05, 8), System;
    /// `KVM_CREATE_VCPU` (argument: the vCPU id).
    CreateVcpu = io(0x41), Vm;
    /// `KVM_GET_DIRTY_LOG` (`struct kvm_dirty_log`).
    GetDirtyLog = iow(0x42, 16), Vm;
    /// `KVM_SET_USER_MEMORY_REGION2` (`struct kvm_userspace_memory_region2`).
    SetUserMemoryRegion2 = iow(0x49, 160), Vm;
    /// `KVM_CREATE_IRQCHIP`.
    CreateIrqchip = io(0x60), Vm;
    /// `KVM_GET_TSC_KHZ`.
    GetTscKhz = io(0xa3), Vm;
    /// `KVM_ENABLE_CAP` (`struct kvm_enable_cap`).
    EnableCap = iow(0xa3, 104), Vm;
    /// `KVM_CLEAR_DIRTY_LOG` (`struct kvm_clear_dirty_log`).
    ClearDirtyLog = iowr(0xc0, 24), Vm;
    /// `KVM_RESET_DIRTY_RINGS`.
    ResetDirtyRings = io(0xc7), Vm;
    /// `KVM_RUN`.
    Run = io(0x80), Vcpu;
    /// `KVM_GET_REGS` (`struct kvm_regs`).
    GetRegs = ior(0x81, 144), Vcpu;
    /// `KVM_SET_REGS`.
    SetRegs = iow(0x82, 144), Vcpu;
    /// `KVM_GET_SREGS` (`struct kvm_sregs`).
    GetSregs = ior(0x83, 312), Vcpu;
    /// `KVM_SET_SREGS`.
    SetSregs = iow(0x84, 312), Vcpu;
    /// `KVM_SET_SIGNAL_MASK` (`struct kvm_signal_mask`).
    SetSignalMask = iow(0x8b, 4), Vcpu;
    /// `KVM_SET_CPUID2` (`struct kvm_cpuid2`).
    SetCpuid2 = iow(0x90, 8), Vcpu;
    /// `KVM_GET_CPUID2`.
    GetCpuid2 = iowr(0x91, 8), Vcpu;
    /// `KVM_GET_MP_STATE` (`struct kvm_mp_state`).
    GetMpState = ior(0x98, 4), Vcpu;
    /// `KVM_SET_MP_STATE`.
    SetMpState = iow(0x99, 4), Vcpu;
}

impl Ioctl {
    /// The request with number `cmd` sent to a descriptor of `scope`, if smudge serves it
    /// there.
    pub fn decode(cmd: u32, scope: Scope) -> Option<Ioctl> {
        Ioctl::ALL.iter().copied().find(|i| {
            i.number() == cmd
                && (i.scope() == scope || (*i == Ioctl::CheckExtension && scope == Scope::Vm))
        })
    }
}

/// Capability numbers (`KVM_CAP_*`) the selftests ask about.
pub mod cap {
    /// Most vCPUs a VM can have.
    pub const NR_VCPUS: u32 = 9;
    /// Memory slots a VM can have.
    pub const NR_MEMSLOTS: u32 = 10;
    /// The hard limit of vCPUs.
    pub const MAX_VCPUS: u32 = 66;
    /// `KVM_SET_USER_MEMORY_REGION`.
    pub const USER_MEMORY: u32 = 3;
    /// `kvm_run.immediate_exit`.
    pub const IMMEDIATE_EXIT: u32 = 136;
    /// `KVM_GET_TSC_KHZ`.
    pub const GET_TSC_KHZ: u32 = 61;
    /// `KVM_CLEAR_DIRTY_LOG` with manual protection.
    pub const MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
    /// The dirty ring.
    pub const DIRTY_LOG_RING: u32 = 192;
    /// The dirty ring with acquire/release ordering.
    pub const DIRTY_LOG_RING_ACQ_REL: u32 = 223;
    /// `KVM_SET_USER_MEMORY_REGION2`.
    pub const USER_MEMORY2: u32 = 231;
}

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: GET_DIRTY_LOG no longer clears; CLEAR_DIRTY_LOG does.
pub const MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `KVM_DIRTY_LOG_INITIALLY_SET` (not offered: every page would start dirty).
pub const INITIALLY_SET: u64 = 1 << 1;

/// `KVM_MEM_LOG_DIRTY_PAGES`.
pub const MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// `KVM_MEM_READONLY`.
pub const MEM_READONLY: u32 = 1 << 1;
/// `KVM_MEM_GUEST_MEMFD`.
pub const MEM_GUEST_MEMFD: u32 = 1 << 2;

/// The dirty ring's page offset in a vCPU descriptor's mmap (`KVM_DIRTY_LOG_PAGE_OFFSET`).
pub const DIRTY_LOG_PAGE_OFFSET: u64 = 64;
/// `kvm_dirty_gfn.flags`: the entry holds a dirty page for user space.
pub const DIRTY_GFN_F_DIRTY: u32 = 1 << 0;
/// `kvm_dirty_gfn.flags`: user space collected it; KVM_RESET_DIRTY_RINGS may re-arm it.
pub const DIRTY_GFN_F_RESET: u32 = 1 << 1;

/// `kvm_mp_state.mp_state` values.
pub mod mp_state {
    /// Runs.
    pub const RUNNABLE: u32 = 0;
    /// Waits for INIT/SIPI.
    pub const UNINITIALIZED: u32 = 1;
    /// Halted.
    pub const HALTED: u32 = 3;
}

/// `kvm_run.exit_reason` values.
pub mod exit {
    /// Something smudge does not describe further.
    pub const UNKNOWN: u32 = 0;
    /// Port I/O (`kvm_run.io`).
    pub const IO: u32 = 2;
    /// HLT.
    pub const HLT: u32 = 5;
    /// An access outside every slot (`kvm_run.mmio`).
    pub const MMIO: u32 = 6;
    /// Triple fault.
    pub const SHUTDOWN: u32 = 8;
    /// The VM entry failed (`kvm_run.fail_entry`).
    pub const FAIL_ENTRY: u32 = 9;
    /// A signal (KVM_RUN returns -EINTR).
    pub const INTR: u32 = 10;
    /// smudge could not go on (`kvm_run.internal`).
    pub const INTERNAL_ERROR: u32 = 17;
    /// The dirty ring reached its soft limit.
    pub const DIRTY_RING_FULL: u32 = 31;
}

/// `kvm_run.io.direction`.
pub const EXIT_IO_IN: u8 = 0;
/// `kvm_run.io.direction`.
pub const EXIT_IO_OUT: u8 = 1;

/// `struct kvm_userspace_memory_region2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryRegion2 {
    /// Slot id (address space in bits 31:16).
    pub slot: u32,
    /// `KVM_MEM_*`.
    pub flags: u32,
    /// Guest-physical base.
    pub guest_phys_addr: u64,
    /// Bytes; 0 deletes the slot.
    pub memory_size: u64,
    /// The caller's virtual address of the memory.
    pub userspace_addr: u64,
    /// guest_memfd offset (unsupported).
    pub guest_memfd_offset: u64,
    /// guest_memfd descriptor (unsupported).
    pub guest_memfd: u32,
    /// Must be 0.
    pub pad1: u32,
    /// Must be 0.
    pub pad2: [u64; 14],
}

wire!(MemoryRegion2 {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
    guest_memfd_offset: u64,
    guest_memfd: u32,
    pad1: u32,
    pad2: u64s<14>
});

/// `struct kvm_dirty_log`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyLog {
    /// Slot id.
    pub slot: u32,
    /// Padding.
    pub padding: u32,
    /// User address of the bitmap (one bit per page of the slot, 64-bit words).
    pub dirty_bitmap: u64,
}

wire!(DirtyLog {
    slot: u32,
    padding: u32,
    dirty_bitmap: u64
});

/// `struct kvm_clear_dirty_log`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClearDirtyLog {
    /// Slot id.
    pub slot: u32,
    /// Pages covered by the bitmap.
    pub num_pages: u32,
    /// First page of the slot the bitmap's bit 0 stands for.
    pub first_page: u64,
    /// User address of the bitmap.
    pub dirty_bitmap: u64,
}

wire!(ClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    dirty_bitmap: u64
});

/// `struct kvm_regs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmRegs {
    /// RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP, R8-R15 in this order.
    pub gprs: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
}

wire!(KvmRegs {
    gprs: u64s<16>,
    rip: u64,
    rflags: u64
});

/// `struct kvm_segment`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base.
    pub base: u64,
    /// Limit (bytes, already scaled by G).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type (SDM 3.4.5.1).
    pub type_: u8,
    /// P.
    pub present: u8,
    /// DPL.
    pub dpl: u8,
    /// D/B.
    pub db: u8,
    /// S (code/data rather than system).
    pub s: u8,
    /// L (64-bit code).
    pub l: u8,
    /// G.
    pub g: u8,
    /// AVL.
    pub avl: u8,
    /// Unusable (VMX's "segment unusable", SDM 25.4.1).
    pub unusable: u8,
    /// Padding.
    pub padding: u8,
}

wire!(Segment {
    base: u64,
    limit: u32,
    selector: u16,
    type_: u8,
    present: u8,
    dpl: u8,
    db: u8,
    s: u8,
    l: u8,
    g: u8,
    avl: u8,
    unusable: u8,
    padding: u8
});

/// `struct kvm_dtable`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dtable {
    /// Base.
    pub base: u64,
    /// Limit.
    pub limit: u16,
    /// Padding.
    pub padding: [u8; 6],
}

wire!(Dtable {
    base: u64,
    limit: u16,
    padding: bytes<6>
});

/// `struct kvm_sregs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sregs {
    /// CS.
    pub cs: Segment,
    /// DS.
    pub ds: Segment,
    /// ES.
    pub es: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// SS.
    pub ss: Segment,
    /// TR.
    pub tr: Segment,
    /// LDTR.
    pub ldt: Segment,
    /// GDTR.
    pub gdt: Dtable,
    /// IDTR.
    pub idt: Dtable,
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8.
    pub cr8: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// A pending external interrupt (one bit set at most).
    pub interrupt_bitmap: [u64; 4],
}

wire!(Sregs {
    cs: nested,
    ds: nested,
    es: nested,
    fs: nested,
    gs: nested,
    ss: nested,
    tr: nested,
    ldt: nested,
    gdt: nested,
    idt: nested,
    cr0: u64,
    cr2: u64,
    cr3: u64,
    cr4: u64,
    cr8: u64,
    efer: u64,
    apic_base: u64,
    interrupt_bitmap: u64s<4>
});

/// `struct kvm_cpuid_entry2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry2 {
    /// Leaf (EAX).
    pub function: u32,
    /// Subleaf (ECX).
    pub index: u32,
    /// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` (bit 0): the subleaf matters.
    pub flags: u32,
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
    /// Padding.
    pub padding: [u32; 3],
}

/// The padding as three u32s.
impl CpuidEntry2 {
    /// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` (sic, the header's spelling).
    pub const SIGNIFICANT_INDEX: u32 = 1;
}

wire!(CpuidEntry2 {
    function: u32,
    index: u32,
    flags: u32,
    eax: u32,
    ebx: u32,
    ecx: u32,
    edx: u32,
    padding: u32s<3>
});

/// The header of `struct kvm_cpuid2`; `nent` entries follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpuid2 {
    /// Entries.
    pub nent: u32,
    /// Padding.
    pub padding: u32,
}

wire!(Cpuid2 {
    nent: u32,
    padding: u32
});

/// `struct kvm_enable_cap`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnableCap {
    /// Capability number.
    pub cap: u32,
    /// Must be 0.
    pub flags: u32,
    /// Arguments.
    pub args: [u64; 4],
    /// Padding.
    pub pad: [u8; 64],
}

impl Default for EnableCap {
    fn default() -> Self {
        EnableCap {
            cap: 0,
            flags: 0,
            args: [0; 4],
            pad: [0; 64],
        }
    }
}

wire!(EnableCap {
    cap: u32,
    flags: u32,
    args: u64s<4>,
    pad: bytes<64>
});

/// `struct kvm_mp_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MpState {
    /// One of [`mp_state`].
    pub mp_state: u32,
}

wire!(MpState { mp_state: u32 });

/// `struct kvm_dirty_gfn`: one dirty-ring entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyGfn {
    /// [`DIRTY_GFN_F_DIRTY`], [`DIRTY_GFN_F_RESET`].
    pub flags: u32,
    /// Slot id.
    pub slot: u32,
    /// Page offset inside the slot.
    pub offset: u64,
}

wire!(DirtyGfn {
    flags: u32,
    slot: u32,
    offset: u64
});

/// `struct kvm_run` as far as smudge uses it: the fixed head, and the exit union at
/// [`run::EXIT`] (256 bytes).
pub mod run {
    /// `request_interrupt_window` (u8).
    pub const REQUEST_INTERRUPT_WINDOW: usize = 0;
    /// `immediate_exit` (u8).
    pub const IMMEDIATE_EXIT: usize = 1;
    /// `exit_reason` (u32).
    pub const EXIT_REASON: usize = 8;
    /// `ready_for_interrupt_injection` (u8).
    pub const READY_FOR_INTERRUPT_INJECTION: usize = 12;
    /// `if_flag` (u8).
    pub const IF_FLAG: usize = 13;
    /// `flags` (u16).
    pub const FLAGS: usize = 14;
    /// `cr8` (u64).
    pub const CR8: usize = 16;
    /// `apic_base` (u64).
    pub const APIC_BASE: usize = 24;
    /// The exit union.
    pub const EXIT: usize = 32;
    /// `io.direction` (u8).
    pub const IO_DIRECTION: usize = 32;
    /// `io.size` (u8).
    pub const IO_SIZE: usize = 33;
    /// `io.port` (u16).
    pub const IO_PORT: usize = 34;
    /// `io.count` (u32).
    pub const IO_COUNT: usize = 36;
    /// `io.data_offset` (u64): where in the mapping the data is.
    pub const IO_DATA_OFFSET: usize = 40;
    /// `fail_entry.hardware_entry_failure_reason` (u64).
    pub const FAIL_ENTRY_REASON: usize = 32;
    /// `fail_entry.cpu` (u32).
    pub const FAIL_ENTRY_CPU: usize = 40;
    /// `mmio.phys_addr` (u64).
    pub const MMIO_PHYS_ADDR: usize = 32;
    /// `mmio.data` (8 bytes).
    pub const MMIO_DATA: usize = 40;
    /// `mmio.len` (u32).
    pub const MMIO_LEN: usize = 48;
    /// `mmio.is_write` (u8).
    pub const MMIO_IS_WRITE: usize = 52;
    /// `kvm_valid_regs` (u64).
    pub const VALID_REGS: usize = 288;
    /// `kvm_dirty_regs` (u64).
    pub const DIRTY_REGS: usize = 296;
    /// The synced-register union `s`.
    pub const S: usize = 304;
    /// `sizeof(struct kvm_run)`.
    pub const SIZE: usize = 2352;
}

/// Reads a `u32s<N>` field.
impl Reader<'_> {
    /// Next N u32s.
    pub fn u32s<const N: usize>(&mut self) -> Result<[u32; N], AbiError> {
        let mut a = [0u32; N];
        for v in a.iter_mut() {
            *v = self.u32()?;
        }
        Ok(a)
    }
}

/// Writes a `u32s<N>` field.
impl Writer<'_> {
    /// Writes u32s.
    pub fn u32s<const N: usize>(&mut self, v: &[u32; N]) -> Result<(), AbiError> {
        v.iter().try_for_each(|x| self.u32(x))
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_struct_round_trips_byte_exact() {
        fn rt<T: Wire + PartialEq + core::fmt::Debug>(v: T) {
            let mut b = [0u8; 512];
            let n = v.to_bytes(&mut b).expect("fits");
            assert_eq!(n, core::mem::size_of::<T>());
            assert_eq!(T::from_bytes(&b[..n]).expect("decodes"), v);
            assert_eq!(T::from_bytes(&b[..n - 1]), Err(AbiError::Truncated));
        }
        let seg = Segment {
            base: 1,
            limit: 0xfffff,
            selector: 8,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        rt(seg);
        rt(Sregs {
            cs: seg,
            cr0: 0x8000_0021,
            efer: 0xd01,
            interrupt_bitmap: [1, 2, 3, 4],
            ..Default::default()
        });
        rt(MemoryRegion2 {
            slot: 1,
            flags: MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0xffc0000000,
            memory_size: 1 << 30,
            userspace_addr: 0x7f00_0000_0000,
            ..Default::default()
        });
        rt(KvmRegs {
            gprs: core::array::from_fn(|i| i as u64),
            rip: 0x1000,
            rflags: 2,
        });
        rt(CpuidEntry2 {
            function: 7,
            flags: 1,
            edx: 5,
            ..Default::default()
        });
        rt(EnableCap {
            cap: cap::DIRTY_LOG_RING_ACQ_REL,
            args: [1 << 20, 0, 0, 0],
            ..Default::default()
        });
        rt(ClearDirtyLog {
            slot: 1,
            num_pages: 64,
            first_page: 128,
            dirty_bitmap: 0x1000,
        });
        rt(DirtyGfn {
            flags: DIRTY_GFN_F_DIRTY,
            slot: 1,
            offset: 77,
        });
    }

    #[test]
    fn requests_decode_only_on_their_descriptor() {
        assert_eq!(Ioctl::decode(0xAE80, Scope::Vcpu), Some(Ioctl::Run));
        assert_eq!(Ioctl::decode(0xAE80, Scope::Vm), None);
        assert_eq!(
            Ioctl::decode(Ioctl::CheckExtension.number(), Scope::Vm),
            Some(Ioctl::CheckExtension)
        );
        assert_eq!(Ioctl::decode(Ioctl::CreateVm.number(), Scope::Vm), None);
        // GET_TSC_KHZ and ENABLE_CAP share number 0xa3 and differ in direction and size.
        assert_ne!(Ioctl::GetTscKhz.number(), Ioctl::EnableCap.number());
        let mut seen = [0u32; 32];
        for (i, r) in Ioctl::ALL.iter().enumerate() {
            assert!(!seen[..i].contains(&r.number()), "{r:?} twice");
            seen[i] = r.number();
        }
    }
}
