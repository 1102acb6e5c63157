//! Executes VMREAD. In VMX non-root operation without VMCS shadowing, VMREAD always exits
//! (SDM 26.1.3, basic exit reason 23); smudge stops the run with a precise reason.
#![no_std]
#![no_main]

use smudge_guests as g;

g::entry!(main);

fn main(_vcpu: u64) -> u64 {
    g::print("hostile_vmread: vmread\n");
    // SAFETY: exits to the host; no guest state is involved.
    unsafe {
        core::arch::asm!("vmread rax, rcx", out("rax") _, in("rcx") 0x6800u64, options(nostack))
    };
    g::print("hostile_vmread: vmread returned\n");
    1
}
