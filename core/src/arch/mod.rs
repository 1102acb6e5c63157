//! The only assembly in smudge: VMX instructions, the VM-entry/exit trampoline, and the few
//! privileged reads the host-state snapshot needs.
//!
//! Everything here is `unsafe` because it executes privileged instructions whose preconditions
//! (VMX operation, a current VMCS, ring 0) the type system cannot see. Host tests never call it;
//! Bochs and real processors do. Compiled for the host, the Linux kernel and windows-msvc (the
//! trampoline uses the SysV calling convention on every target).

use core::arch::{asm, global_asm};

mod alloc;
pub mod direct_map;
pub use alloc::{RawAlloc, RawBox, RawWords, Shared, RAW_ALIGN};
pub use direct_map::DirectMap;

/// How a VMX instruction failed (SDM 31.2 "Conventions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// CF=1: no current VMCS, or the operand was invalid.
    Invalid,
    /// ZF=1: the VM-instruction error field (0x4400) holds the error number.
    Valid(u32),
}

/// VMCS encoding of the VM-instruction error field (SDM B.3.2).
const VM_INSTRUCTION_ERROR: u64 = 0x4400;

/// Decodes RFLAGS after a VMX instruction.
fn decode(rflags: u64) -> Result<(), VmFail> {
    if rflags & 1 != 0 {
        Err(VmFail::Invalid)
    } else if rflags & (1 << 6) != 0 {
        // SAFETY: ZF=1 means a current VMCS exists, so VMREAD of the error field is valid.
        let err = unsafe { vmread_raw(VM_INSTRUCTION_ERROR) }.unwrap_or(0);
        Err(VmFail::Valid(err as u32))
    } else {
        Ok(())
    }
}

/// VMXON with the 4 KiB-aligned VMXON region at `pa` (SDM 31.3 VMXON).
///
/// # Safety
/// CR4.VMXE=1, IA32_FEATURE_CONTROL locked with VMX enabled, CR0/CR4 fixed bits satisfied,
/// ring 0, and `pa` a zeroed page whose first dword is the VMCS revision id.
pub unsafe fn vmxon(pa: u64) -> Result<(), VmFail> {
    let rflags: u64;
    // SAFETY: the caller guarantees the preconditions above; the operand is a memory u64.
    unsafe { asm!("vmxon [{pa}]", "pushfq", "pop {f}", pa = in(reg) &pa, f = lateout(reg) rflags) };
    decode(rflags)
}

/// VMXOFF (SDM 31.3).
///
/// # Safety
/// The processor is in VMX root operation and no guest runs on it.
pub unsafe fn vmxoff() -> Result<(), VmFail> {
    let rflags: u64;
    // SAFETY: caller guarantees VMX root operation.
    unsafe { asm!("vmxoff", "pushfq", "pop {f}", f = lateout(reg) rflags) };
    decode(rflags)
}

/// VMCLEAR of the VMCS at `pa`.
///
/// # Safety
/// VMX root operation; `pa` is a VMCS region.
pub unsafe fn vmclear(pa: u64) -> Result<(), VmFail> {
    let rflags: u64;
    // SAFETY: caller guarantees VMX root operation and a valid VMCS region.
    unsafe {
        asm!("vmclear [{pa}]", "pushfq", "pop {f}", pa = in(reg) &pa, f = lateout(reg) rflags)
    };
    decode(rflags)
}

/// VMPTRLD: makes the VMCS at `pa` current on this processor.
///
/// # Safety
/// VMX root operation; `pa` is a VMCS region with the right revision id.
pub unsafe fn vmptrld(pa: u64) -> Result<(), VmFail> {
    let rflags: u64;
    // SAFETY: caller guarantees VMX root operation and a valid VMCS region.
    unsafe {
        asm!("vmptrld [{pa}]", "pushfq", "pop {f}", pa = in(reg) &pa, f = lateout(reg) rflags)
    };
    decode(rflags)
}

/// VMREAD without decoding VMfailValid (used by `decode` itself).
unsafe fn vmread_raw(field: u64) -> Result<u64, ()> {
    let value: u64;
    let rflags: u64;
    // SAFETY: caller guarantees a current VMCS.
    unsafe {
        asm!("vmread {v}, {f}", "pushfq", "pop {r}", v = lateout(reg) value, f = in(reg) field, r = lateout(reg) rflags)
    };
    if rflags & 0x41 != 0 {
        Err(())
    } else {
        Ok(value)
    }
}

/// VMREAD of `field` from the current VMCS.
///
/// # Safety
/// VMX root operation with a current VMCS.
pub unsafe fn vmread(field: u32) -> Result<u64, VmFail> {
    let value: u64;
    let rflags: u64;
    // SAFETY: caller guarantees a current VMCS.
    unsafe {
        asm!("vmread {v}, {f}", "pushfq", "pop {r}", v = lateout(reg) value, f = in(reg) u64::from(field), r = lateout(reg) rflags)
    };
    decode(rflags).map(|_| value)
}

/// VMWRITE of `value` to `field` of the current VMCS.
///
/// # Safety
/// VMX root operation with a current VMCS; the value must not break host state the caller relies on.
pub unsafe fn vmwrite(field: u32, value: u64) -> Result<(), VmFail> {
    let rflags: u64;
    // SAFETY: caller guarantees a current VMCS.
    unsafe {
        asm!("vmwrite {f}, {v}", "pushfq", "pop {r}", f = in(reg) u64::from(field), v = in(reg) value, r = lateout(reg) rflags)
    };
    decode(rflags)
}

/// INVEPT types (SDM 31.3 INVEPT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum InveptType {
    /// Invalidate mappings tagged with one EPTP.
    SingleContext = 1,
    /// Invalidate all EPT-derived mappings.
    AllContext = 2,
}

/// INVEPT.
///
/// # Safety
/// VMX root operation, and the type supported (IA32_VMX_EPT_VPID_CAP bits 25/26).
pub unsafe fn invept(kind: InveptType, eptp: u64) -> Result<(), VmFail> {
    let desc: [u64; 2] = [eptp, 0];
    let rflags: u64;
    // SAFETY: caller guarantees VMX root operation; the descriptor is 16 bytes on the stack.
    unsafe {
        asm!("invept {t}, [{d}]", "pushfq", "pop {r}", t = in(reg) kind as u64, d = in(reg) &desc, r = lateout(reg) rflags)
    };
    decode(rflags)
}

/// INVVPID all-context (type 2).
///
/// # Safety
/// VMX root operation and INVVPID supported.
pub unsafe fn invvpid_all() -> Result<(), VmFail> {
    let desc: [u64; 2] = [0, 0];
    let rflags: u64;
    // SAFETY: caller guarantees VMX root operation; the descriptor is 16 bytes on the stack.
    unsafe {
        asm!("invvpid {t}, [{d}]", "pushfq", "pop {r}", t = in(reg) 2u64, d = in(reg) &desc, r = lateout(reg) rflags)
    };
    decode(rflags)
}

/// The guest's general-purpose registers, saved and restored by the trampoline (RSP and RIP
/// live in the VMCS). The layout is fixed: the assembly below uses these offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestGprs {
    /// RAX (offset 0).
    pub rax: u64,
    /// RBX (8).
    pub rbx: u64,
    /// RCX (16).
    pub rcx: u64,
    /// RDX (24).
    pub rdx: u64,
    /// RSI (32).
    pub rsi: u64,
    /// RDI (40).
    pub rdi: u64,
    /// RBP (48).
    pub rbp: u64,
    /// R8 (56).
    pub r8: u64,
    /// R9 (64).
    pub r9: u64,
    /// R10 (72).
    pub r10: u64,
    /// R11 (80).
    pub r11: u64,
    /// R12 (88).
    pub r12: u64,
    /// R13 (96).
    pub r13: u64,
    /// R14 (104).
    pub r14: u64,
    /// R15 (112).
    pub r15: u64,
    /// CR2 (120): no VMCS field holds it (SDM 25.4.1) and MOV to/from CR2 never exits, so the
    /// trampoline loads the guest's before VM entry and saves it at VM exit, as KVM does; in
    /// between, a host page fault may overwrite the processor's CR2.
    pub cr2: u64,
}

// The offsets the trampoline below uses.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(GuestGprs, rax) == 0);
    assert!(offset_of!(GuestGprs, rdi) == 40);
    assert!(offset_of!(GuestGprs, r15) == 112);
    assert!(offset_of!(GuestGprs, cr2) == 120);
};

// The VM-entry/exit trampoline. `smudge_vmx_run(gprs, launched)` writes HOST_RSP (0x6C14) and
// HOST_RIP (0x6C16), loads the guest CR2 (when it differs: MOV to CR2 is slow) and GPRs,
// executes VMLAUNCH (launched == 0) or VMRESUME, and returns 0 after a VM exit with the guest
// GPRs and CR2 saved, 1 on VMfailInvalid, 2 on VMfailValid. Interrupts are off throughout, so no
// host page fault can come between the CR2 load and the entry (an NMI handler that faults
// restores CR2 itself, as Linux's does).
// The host's callee-saved registers are kept on the stack; a VM exit restores only RSP/RIP and
// the VMCS host-state area (SDM 28.5), so everything else is restored here. After an exit the
// return stack buffer is refilled before the first RET (see below).
global_asm!(
    ".global smudge_vmx_run",
    "smudge_vmx_run:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "mov rax, 0x6C14",
    "vmwrite rax, rsp",
    "jbe 3f",
    "lea rbx, [rip + 2f]",
    "mov rax, 0x6C16",
    "vmwrite rax, rbx",
    "jbe 3f",
    "mov rax, [rdi + 120]",
    "mov rbx, cr2",
    "cmp rax, rbx",
    "je 5f",
    "mov cr2, rax",
    "5:",
    "test rsi, rsi",
    "mov rax, [rdi + 0]",
    "mov rbx, [rdi + 8]",
    "mov rcx, [rdi + 16]",
    "mov rdx, [rdi + 24]",
    "mov rsi, [rdi + 32]",
    "mov rbp, [rdi + 48]",
    "mov r8, [rdi + 56]",
    "mov r9, [rdi + 64]",
    "mov r10, [rdi + 72]",
    "mov r11, [rdi + 80]",
    "mov r12, [rdi + 88]",
    "mov r13, [rdi + 96]",
    "mov r14, [rdi + 104]",
    "mov r15, [rdi + 112]",
    "mov rdi, [rdi + 40]",
    "jnz 1f",
    "vmlaunch",
    "jmp 3f",
    "1:",
    "vmresume",
    // VMfail: CF=1 invalid, ZF=1 valid. `pop` and `mov` keep the flags.
    "3:",
    "pop rdi",
    "mov eax, 1",
    "jc 4f",
    "mov eax, 2",
    "4:",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    // VM exit: RSP = HOST_RSP, which points at the saved GPR pointer.
    "2:",
    "push rax",
    "mov rax, [rsp + 8]",
    "mov [rax + 8], rbx",
    "mov [rax + 16], rcx",
    "mov [rax + 24], rdx",
    "mov [rax + 32], rsi",
    "mov [rax + 40], rdi",
    "mov [rax + 48], rbp",
    "mov [rax + 56], r8",
    "mov [rax + 64], r9",
    "mov [rax + 72], r10",
    "mov [rax + 80], r11",
    "mov [rax + 88], r12",
    "mov [rax + 96], r13",
    "mov [rax + 104], r14",
    "mov [rax + 112], r15",
    "mov rbx, cr2",
    "mov [rax + 120], rbx",
    "pop rbx",
    "mov [rax + 0], rbx",
    "pop rdi",
    // Before the host's first RET: overwrite the return stack buffer, which now holds
    // guest-chosen entries, with 32 calls whose speculated returns land on INT3 (as Linux's
    // FILL_RETURN_BUFFER after a VM exit), then drop their return addresses.
    ".rept 32",
    "call 7f",
    "int3",
    "7:",
    ".endr",
    "add rsp, 256",
    "lfence",
    "xor eax, eax",
    "jmp 4b",
);

extern "sysv64" {
    fn smudge_vmx_run(gprs: *mut GuestGprs, launched: u64) -> u64;
}

/// Enters the guest of the current VMCS and returns after the next VM exit.
///
/// # Safety
/// VMX root operation with a current, fully initialised VMCS whose host-state area describes
/// this processor now; interrupts disabled; the caller restores what a VM exit does not
/// (GDTR/IDTR limits, segment registers not in the host area, FPU state).
pub unsafe fn vm_enter(gprs: &mut GuestGprs, launched: bool) -> Result<(), VmFail> {
    // SAFETY: forwarded preconditions; `gprs` is a valid exclusive pointer for the call.
    match unsafe { smudge_vmx_run(gprs, u64::from(launched)) } {
        0 => Ok(()),
        1 => Err(VmFail::Invalid),
        _ => {
            // SAFETY: VMfailValid means a current VMCS exists.
            let err = unsafe { vmread_raw(VM_INSTRUCTION_ERROR) }.unwrap_or(0);
            Err(VmFail::Valid(err as u32))
        }
    }
}

/// RDMSR.
///
/// # Safety
/// Ring 0 and an MSR that exists (otherwise #GP).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: caller guarantees ring 0 and a valid MSR.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// WRMSR.
///
/// # Safety
/// Ring 0, an MSR that exists, and a value the host can live with.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: caller guarantees ring 0, a valid MSR and a harmless value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack))
    };
}

/// CR0 of this processor.
///
/// # Safety
/// Ring 0.
pub unsafe fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: ring 0 (caller); reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// CR3 of this processor.
///
/// # Safety
/// Ring 0.
pub unsafe fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: ring 0 (caller); reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// CR4 of this processor.
///
/// # Safety
/// Ring 0.
pub unsafe fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: ring 0 (caller); reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Loads CR4.
///
/// # Safety
/// Ring 0, on an OS that keeps no shadow of CR4 (Linux does: it goes through the kernel), with
/// interrupts off (no handler rewrites CR4 meanwhile), and `value` is the current CR4 with only
/// VMXE changed, which affects nothing but VMXON.
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: the caller's contract. Not `nomem`: the write stays ordered with the memory
    // accesses around it.
    unsafe { asm!("mov cr4, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// CR8, the local APIC task priority (Windows x64 keeps its IRQL there).
///
/// # Safety
/// Ring 0.
pub unsafe fn read_cr8() -> u64 {
    let v: u64;
    // SAFETY: ring 0 (caller); reading CR8 has no side effects.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Loads CR8. Not `nomem`: a compiler barrier, as the IRQL changes of an OS are (what runs at
/// the new priority must not move across it).
///
/// # Safety
/// Ring 0, and a priority the OS expects here (an IRQL raise paired with its lowering).
pub unsafe fn write_cr8(value: u64) {
    // SAFETY: the caller's contract; CR8 only masks interrupts of lower priority.
    unsafe { asm!("mov cr8, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// PUSHFQ; CLI: interrupts off on this processor; returns the previous RFLAGS.
///
/// # Safety
/// Ring 0, paired with [`irq_restore`] on the same processor.
pub unsafe fn irq_save() -> u64 {
    let flags: u64;
    // SAFETY: ring 0 may clear IF (caller); the stack push and pop are balanced.
    // Not `nomem`: a compiler barrier, so no memory access moves out of the section.
    unsafe { asm!("pushfq", "pop {}", "cli", out(reg) flags) };
    flags
}

/// PUSH; POPFQ: the interrupt flag as [`irq_save`] found it.
///
/// # Safety
/// `flags` came from [`irq_save`] on this processor (only IF differs from now).
pub unsafe fn irq_restore(flags: u64) {
    // SAFETY: the caller's contract.
    unsafe { asm!("push {}", "popfq", in(reg) flags) };
}

/// The bytes of quadwords in memory order (x86 is little-endian).
pub fn bytes_of(words: &[u64]) -> &[u8] {
    // SAFETY: the same memory, viewed as bytes: u8 has alignment 1 and no invalid values.
    unsafe { core::slice::from_raw_parts(words.as_ptr().cast::<u8>(), words.len() * 8) }
}

/// [`bytes_of`], writable: every byte pattern is a valid u64.
pub fn bytes_of_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: as in `bytes_of`, borrowed exclusively.
    unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

/// IA32_KERNEL_GS_BASE: not switched by the VMCS, and the guest's SWAPGS (which no control
/// intercepts) exchanges it with GS.base, so the run loop saves and restores it.
pub const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;

/// Delivers an NMI to this CPU (INT 2), for an NMI that caused a VM exit (SDM 27.2.3:
/// with NMI exiting, the NMI is not delivered to the host by the exit itself).
///
/// # Safety
/// Ring 0 with the host's IDT loaded; called right after the exit, like KVM's NMI re-injection.
pub unsafe fn raise_nmi() {
    // SAFETY: invokes the host's NMI handler through its IDT gate.
    unsafe { asm!("int 2") };
}

/// CPUID.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// A descriptor-table register image (SGDT/SIDT layout).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DescriptorTablePointer {
    /// Limit.
    pub limit: u16,
    /// Linear base.
    pub base: u64,
}

/// The host state the VMCS host area needs (SDM 25.5), taken on the CPU that will run the guest.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostState {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CS, SS, DS, ES, FS, GS, TR selectors.
    pub cs: u16,
    /// SS.
    pub ss: u16,
    /// DS.
    pub ds: u16,
    /// ES.
    pub es: u16,
    /// FS.
    pub fs: u16,
    /// GS.
    pub gs: u16,
    /// TR.
    pub tr: u16,
    /// IA32_FS_BASE.
    pub fs_base: u64,
    /// IA32_GS_BASE.
    pub gs_base: u64,
    /// TR base (from the TSS descriptor in the GDT).
    pub tr_base: u64,
    /// GDTR.
    pub gdtr: DescriptorTablePointer,
    /// IDTR.
    pub idtr: DescriptorTablePointer,
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// DR7: a VM exit sets it to 0x400 (SDM 28.5.1), disarming the host's hardware
    /// breakpoints; `restore_after_exit` re-arms them.
    pub dr7: u64,
    /// IA32_DEBUGCTL: a VM exit clears it (SDM 28.5.1), switching off the host's LBR/BTF (perf);
    /// `restore_after_exit` loads it again. Read by the shim (`vmx::hw::Hardware::new`), which
    /// can read an MSR safely: the MSR is architectural on Intel 64, but Bochs 2.7 lacks it.
    pub debugctl: u64,
}

/// IA32_DEBUGCTL.
pub const IA32_DEBUGCTL: u32 = 0x1D9;
/// DR7's local and global breakpoint enables (L0-L3, G0-G3, SDM 18.2.4).
pub const DR7_ENABLES: u64 = 0xFF;

/// Reads the current processor's host state.
///
/// # Safety
/// Ring 0, 64-bit mode, with preemption disabled so the snapshot stays true for this CPU.
pub unsafe fn host_state() -> HostState {
    let mut s = HostState::default();
    // SAFETY: ring 0 reads of control registers, selectors and descriptor-table registers.
    unsafe {
        s.cr0 = read_cr0();
        s.cr3 = read_cr3();
        s.cr4 = read_cr4();
        asm!("mov {0:x}, cs", out(reg) s.cs, options(nomem, nostack));
        asm!("mov {0:x}, ss", out(reg) s.ss, options(nomem, nostack));
        asm!("mov {0:x}, ds", out(reg) s.ds, options(nomem, nostack));
        asm!("mov {0:x}, es", out(reg) s.es, options(nomem, nostack));
        asm!("mov {0:x}, fs", out(reg) s.fs, options(nomem, nostack));
        asm!("mov {0:x}, gs", out(reg) s.gs, options(nomem, nostack));
        asm!("str {0:x}", out(reg) s.tr, options(nomem, nostack));
        asm!("sgdt [{}]", in(reg) &mut s.gdtr, options(nostack));
        asm!("sidt [{}]", in(reg) &mut s.idtr, options(nostack));
        s.fs_base = rdmsr(0xC000_0100);
        s.gs_base = rdmsr(0xC000_0101);
        s.sysenter_cs = rdmsr(0x174);
        s.sysenter_esp = rdmsr(0x175);
        s.sysenter_eip = rdmsr(0x176);
        s.efer = rdmsr(0xC000_0080);
        s.pat = rdmsr(0x277);
        asm!("mov {}, dr7", out(reg) s.dr7, options(nomem, nostack));
        s.tr_base = tss_base(s.gdtr.base, s.tr);
    }
    s
}

/// Base of the 16-byte 64-bit TSS descriptor `sel` in the GDT at `gdt` (SDM 8.2.3).
unsafe fn tss_base(gdt: u64, sel: u16) -> u64 {
    let p = (gdt + u64::from(sel & !7)) as *const u64;
    // SAFETY: the GDT is mapped and TR selects a valid 16-byte TSS descriptor in it.
    let (lo, hi) = unsafe { (p.read_unaligned(), p.add(1).read_unaligned()) };
    ((lo >> 16) & 0xff_ffff) | (((lo >> 56) & 0xff) << 24) | ((hi & 0xffff_ffff) << 32)
}

/// Restores what a VM exit changes but the host-state area cannot express: GDTR and IDTR
/// limits (set to 0xFFFF on exit, SDM 28.5.2), DS/ES (loaded from the null host selectors), and
/// the host's debug state (SDM 28.5.1 sets DR7 to 0x400 and clears IA32_DEBUGCTL): DEBUGCTL
/// when the host had bits set (perf's LBR, BTF), DR7 when it had breakpoints armed, as KVM does
/// after every exit. (DR0-DR3 and DR6 stay the host's: MOV-DR exiting keeps the guest off them.)
///
/// # Safety
/// Called on the CPU whose `host` was snapshotted, right after a VM exit.
pub unsafe fn restore_after_exit(host: &HostState) {
    // SAFETY: reloading this CPU's own descriptor tables, data selectors, DEBUGCTL and DR7 with
    // the values read on it before the entry, in ring 0.
    unsafe {
        asm!("lgdt [{}]", in(reg) &host.gdtr, options(nostack));
        asm!("lidt [{}]", in(reg) &host.idtr, options(nostack));
        asm!("mov ds, {0:x}", in(reg) host.ds, options(nostack));
        asm!("mov es, {0:x}", in(reg) host.es, options(nostack));
        if host.debugctl != 0 {
            wrmsr(IA32_DEBUGCTL, host.debugctl);
        }
        if host.dr7 & DR7_ENABLES != 0 {
            asm!("mov dr7, {}", in(reg) host.dr7, options(nostack));
        }
    }
}

/// L1D flush before a VM entry (`spec`): IA32_FLUSH_CMD bit 0.
///
/// # Safety
/// Ring 0, on a processor that enumerates L1D_FLUSH (CPUID.(7,0):EDX[28]).
pub unsafe fn flush_l1d() {
    // SAFETY: the caller checked the enumeration; the write only flushes this CPU's L1D.
    unsafe { wrmsr(crate::spec::IA32_FLUSH_CMD, crate::spec::L1D_FLUSH) }
}

/// IBPB (`spec`): IA32_PRED_CMD bit 0.
///
/// # Safety
/// Ring 0, on a processor that enumerates IBPB (CPUID.(7,0):EDX[26]).
pub unsafe fn ibpb() {
    // SAFETY: the caller checked the enumeration; the write only drops branch predictions.
    unsafe { wrmsr(crate::spec::IA32_PRED_CMD, crate::spec::PRED_CMD_IBPB) }
}

/// VERW with a memory operand holding `selector` (`spec`): with the MD_CLEAR microcode it
/// overwrites the CPU's fill and store buffers (Intel, "Deep Dive: MDS"); it changes only
/// RFLAGS.ZF.
pub fn verw(selector: u16) {
    // SAFETY: VERW only tests the selector's access rights; it reads the 2-byte operand.
    unsafe { asm!("verw [{}]", in(reg) &selector, options(nostack, readonly)) };
}

/// The host debug state a guest must never change: DR0-DR3, DR7 and XCR0 (`xcr0` 0 when
/// CR4.OSXSAVE is clear); IA32_DEBUGCTL is read by the shim, which can read an MSR safely.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DebugState {
    /// DR0-DR3.
    pub dr: [u64; 4],
    /// DR7.
    pub dr7: u64,
    /// XCR0.
    pub xcr0: u64,
}

use crate::regs::CR4_OSXSAVE;

/// Reads this CPU's [`DebugState`].
///
/// # Safety
/// Ring 0.
pub unsafe fn debug_state() -> DebugState {
    let mut d = DebugState::default();
    let cr4: u64;
    // SAFETY: ring 0 reads of debug and control registers; XGETBV only with CR4.OSXSAVE set.
    unsafe {
        asm!("mov {}, dr0", out(reg) d.dr[0], options(nomem, nostack));
        asm!("mov {}, dr1", out(reg) d.dr[1], options(nomem, nostack));
        asm!("mov {}, dr2", out(reg) d.dr[2], options(nomem, nostack));
        asm!("mov {}, dr3", out(reg) d.dr[3], options(nomem, nostack));
        asm!("mov {}, dr7", out(reg) d.dr7, options(nomem, nostack));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        if cr4 & CR4_OSXSAVE != 0 {
            let (lo, hi): (u32, u32);
            asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
            d.xcr0 = (u64::from(hi) << 32) | u64::from(lo);
        }
    }
    d
}

/// FXSAVE64 into a 512-byte, 16-byte-aligned area.
///
/// # Safety
/// CR4.OSFXSR set; the area is valid and aligned.
pub unsafe fn fxsave(area: &mut FxArea) {
    // SAFETY: aligned 512-byte area owned by the caller.
    unsafe { asm!("fxsave64 [{}]", in(reg) area.0.as_mut_ptr(), options(nostack)) };
}

/// FXRSTOR64 from a 512-byte, 16-byte-aligned area.
///
/// # Safety
/// CR4.OSFXSR set; the area holds a valid image (reserved MXCSR bits clear).
pub unsafe fn fxrstor(area: &FxArea) {
    // SAFETY: aligned 512-byte area owned by the caller.
    unsafe { asm!("fxrstor64 [{}]", in(reg) area.0.as_ptr(), options(nostack)) };
}

/// The legacy FXSAVE area: x87 and SSE state (SDM Vol. 1 10.5.1).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// The reset state: FCW 0x37F, MXCSR 0x1F80 (SDM Vol. 3A 9.1.1).
    pub const fn reset() -> FxArea {
        let mut a = [0u8; 512];
        a[0] = 0x7f;
        a[1] = 0x03;
        a[24] = 0x80;
        a[25] = 0x1f;
        FxArea(a)
    }
}
