//! Executes VMXON. VMX instructions in VMX non-root operation always exit (SDM 26.1.2); smudge
//! stops the run with the exit reason vmx_instruction.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

fn main(_vcpu: u64) -> u64 {
    g::print("hostile_vmx: vmxon\n");
    let region: u64 = 0;
    // SAFETY: exits to the host; the operand is never used.
    unsafe { core::arch::asm!("vmxon qword ptr [{}]", in(reg) &region, options(nostack)) };
    g::print("hostile_vmx: vmxon returned\n");
    1
}
