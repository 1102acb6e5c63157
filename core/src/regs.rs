//! The control-register and EFER bits smudge names, in one place (SDM Vol. 3A 2.5 "Control
//! Registers", 2.2.1 "Extended Feature Enable Register").

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.MP: monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.ET: extension type (always 1).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE: native x87 error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.WP: supervisor writes obey read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.NW: not write-through.
pub const CR0_NW: u64 = 1 << 29;
/// CR0.CD: cache disable.
pub const CR0_CD: u64 = 1 << 30;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;

/// CR4.PAE: physical-address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.OSFXSR: FXSAVE/FXRSTOR and SSE enabled.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: unmasked SIMD floating-point exceptions.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.VMXE: set while a VMM has VMX enabled on the CPU (SDM 24.7).
pub const CR4_VMXE: u64 = 1 << 13;
/// CR4.SMXE: safer-mode extensions.
pub const CR4_SMXE: u64 = 1 << 14;
/// CR4.PCIDE: process-context identifiers.
pub const CR4_PCIDE: u64 = 1 << 17;
/// CR4.OSXSAVE: XGETBV/XSETBV and extended state enabled.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.SMAP: supervisor-mode access prevention.
pub const CR4_SMAP: u64 = 1 << 21;
/// CR4.PKE: protection keys for user pages.
pub const CR4_PKE: u64 = 1 << 22;
/// CR4.CET: control-flow enforcement.
pub const CR4_CET: u64 = 1 << 23;
/// CR4.LAM_SUP: linear-address masking for supervisor pointers.
pub const CR4_LAM_SUP: u64 = 1 << 28;

/// IA32_EFER.SCE: SYSCALL/SYSRET.
pub const EFER_SCE: u64 = 1 << 0;
/// IA32_EFER.LME: IA-32e mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// IA32_EFER.LMA: IA-32e mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// IA32_EFER.NXE: execute-disable.
pub const EFER_NXE: u64 = 1 << 11;
