//! The guest's register state as the VMCS guest-state area holds it (SDM 25.4.1): control
//! registers, RSP/RIP/RFLAGS, the segment registers with their access rights, GDTR/IDTR and
//! the MSRs a VM entry loads. One value, made either for smudge's own guest ABI
//! ([`GuestState::smudge`]) or from KVM's `kvm_sregs`/`kvm_regs` (`kvm::state`), written to and
//! read back from a VMCS here, and judged by the software VM-entry checker (`vmx::checks`).

use crate::guest::{self as abi, Layout};
use crate::vmx::caps::VmxCaps;
use crate::vmx::fields::Field;
use crate::vmx::setup::{fix_cr, GUEST_PAT};
use crate::vmx::vmcs::{VmcsAccess, VmcsError};

/// Access rights bit 16: the segment is unusable (SDM 25.4.1, Table 25-2).
pub const AR_UNUSABLE: u32 = 1 << 16;
use crate::regs::EFER_LMA;

/// A segment register: selector, base, limit and access rights in the VMCS format (Table
/// 25-2: type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15, unusable 16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seg {
    /// Selector.
    pub selector: u16,
    /// Base.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u32,
    /// Access rights.
    pub ar: u32,
}

impl Seg {
    const fn new(selector: u16, base: u64, limit: u32, ar: u32) -> Seg {
        Seg {
            selector,
            base,
            limit,
            ar,
        }
    }
}

/// A descriptor-table register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dtr {
    /// Base.
    pub base: u64,
    /// Limit.
    pub limit: u32,
}

/// The guest's architectural state at a VM entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestState {
    /// CR0 as the processor runs it (the VMX fixed bits applied).
    pub cr0: u64,
    /// CR0 as the guest reads it (the read shadow; with a zero guest/host mask, unused).
    pub cr0_shadow: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 as the processor runs it (VMXE forced).
    pub cr4: u64,
    /// CR4 as the guest reads it: the host-owned bits (VMXE, OSXSAVE) read from here.
    pub cr4_shadow: u64,
    /// DR7.
    pub dr7: u64,
    /// RSP.
    pub rsp: u64,
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// ES.
    pub es: Seg,
    /// CS.
    pub cs: Seg,
    /// SS.
    pub ss: Seg,
    /// DS.
    pub ds: Seg,
    /// FS.
    pub fs: Seg,
    /// GS.
    pub gs: Seg,
    /// LDTR.
    pub ldtr: Seg,
    /// TR.
    pub tr: Seg,
    /// GDTR.
    pub gdtr: Dtr,
    /// IDTR.
    pub idtr: Dtr,
    /// IA32_EFER.
    pub efer: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
}

/// The VMCS fields of one segment register: selector, base, limit, access rights.
fn seg_fields(i: usize) -> [Field; 4] {
    use Field as F;
    match i {
        0 => [
            F::GuestEsSelector,
            F::GuestEsBase,
            F::GuestEsLimit,
            F::GuestEsAccessRights,
        ],
        1 => [
            F::GuestCsSelector,
            F::GuestCsBase,
            F::GuestCsLimit,
            F::GuestCsAccessRights,
        ],
        2 => [
            F::GuestSsSelector,
            F::GuestSsBase,
            F::GuestSsLimit,
            F::GuestSsAccessRights,
        ],
        3 => [
            F::GuestDsSelector,
            F::GuestDsBase,
            F::GuestDsLimit,
            F::GuestDsAccessRights,
        ],
        4 => [
            F::GuestFsSelector,
            F::GuestFsBase,
            F::GuestFsLimit,
            F::GuestFsAccessRights,
        ],
        5 => [
            F::GuestGsSelector,
            F::GuestGsBase,
            F::GuestGsLimit,
            F::GuestGsAccessRights,
        ],
        6 => [
            F::GuestLdtrSelector,
            F::GuestLdtrBase,
            F::GuestLdtrLimit,
            F::GuestLdtrAccessRights,
        ],
        _ => [
            F::GuestTrSelector,
            F::GuestTrBase,
            F::GuestTrLimit,
            F::GuestTrAccessRights,
        ],
    }
}

impl GuestState {
    /// smudge's guest ABI (core/src/guest.rs): 64-bit mode with the ABI's GDT, TSS and page
    /// tables in the reserved region, an empty IDT (any exception is a triple fault).
    pub fn smudge(layout: &Layout, caps: &VmxCaps, rip: u64, rsp: u64, rflags: u64) -> GuestState {
        // Read/write data, accessed, S, P, D/B, G.
        let data = Seg::new(abi::DS_SELECTOR, 0, 0xffff_ffff, 0xc093);
        GuestState {
            cr0: fix_cr(abi::CR0, caps.cr0_fixed0, caps.cr0_fixed1),
            cr0_shadow: abi::CR0,
            cr3: layout.cr3(),
            cr4: fix_cr(abi::CR4, caps.cr4_fixed0, caps.cr4_fixed1),
            cr4_shadow: abi::CR4,
            dr7: 0x400,
            rsp,
            rip,
            rflags,
            es: data,
            // 64-bit code: type 11, S, P, L, G.
            cs: Seg::new(abi::CS_SELECTOR, 0, 0xffff_ffff, 0xa09b),
            ss: data,
            ds: data,
            fs: data,
            gs: data,
            ldtr: Seg::new(0, 0, 0, AR_UNUSABLE),
            // Busy 64-bit TSS, P (SDM 27.3.1.2).
            tr: Seg::new(abi::TR_SELECTOR, layout.tss(), 0x67, 0x8b),
            gdtr: Dtr {
                base: layout.gdt(),
                limit: abi::GDT_LIMIT.into(),
            },
            idtr: Dtr::default(),
            efer: abi::EFER,
            pat: GUEST_PAT,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
        }
    }

    /// The processor's state after RESET (SDM Vol. 3A 10.1.1, Table 10-1): real mode at
    /// F000:FFF0, CR0 0x60000010, every data segment 0 with limit 0xFFFF. A VM entry refuses it
    /// without "unrestricted guest" (CR0.PE and PG are fixed to 1); KVM's user space replaces it
    /// with SET_SREGS first.
    pub fn reset() -> GuestState {
        // Present, read/write, accessed data (type 3); CS: execute/read, accessed (type 11).
        let data = Seg::new(0, 0, 0xffff, 0x93);
        GuestState {
            cr0: 0x6000_0010,
            cr0_shadow: 0x6000_0010,
            cr3: 0,
            cr4: 0,
            cr4_shadow: 0,
            dr7: 0x400,
            rsp: 0,
            rip: 0xfff0,
            rflags: 0x2,
            es: data,
            cs: Seg::new(0xf000, 0xffff_0000, 0xffff, 0x9b),
            ss: data,
            ds: data,
            fs: data,
            gs: data,
            // LDT (type 2), present; TR: busy 32-bit TSS (type 11), present.
            ldtr: Seg::new(0, 0, 0xffff, 0x82),
            tr: Seg::new(0, 0, 0xffff, 0x8b),
            gdtr: Dtr {
                base: 0,
                limit: 0xffff,
            },
            idtr: Dtr {
                base: 0,
                limit: 0xffff,
            },
            efer: 0,
            pat: GUEST_PAT,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
        }
    }

    /// The segment registers in the order ES, CS, SS, DS, FS, GS, LDTR, TR.
    pub fn segs(&self) -> [Seg; 8] {
        [
            self.es, self.cs, self.ss, self.ds, self.fs, self.gs, self.ldtr, self.tr,
        ]
    }

    fn segs_mut(&mut self) -> [&mut Seg; 8] {
        [
            &mut self.es,
            &mut self.cs,
            &mut self.ss,
            &mut self.ds,
            &mut self.fs,
            &mut self.gs,
            &mut self.ldtr,
            &mut self.tr,
        ]
    }

    /// IA-32e mode (EFER.LMA): the "IA-32e mode guest" VM-entry control must equal it (SDM
    /// 27.3.1.1).
    pub fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }

    /// Writes the state into `v`'s guest-state area (the read shadows too). `pat` only when the
    /// entry loads IA32_PAT.
    pub fn write(&self, v: &mut dyn VmcsAccess, load_pat: bool) -> Result<(), VmcsError> {
        use Field as F;
        v.write(F::GuestCr0, self.cr0)?;
        v.write(F::Cr0ReadShadow, self.cr0_shadow)?;
        v.write(F::GuestCr3, self.cr3)?;
        v.write(F::GuestCr4, self.cr4)?;
        v.write(F::Cr4ReadShadow, self.cr4_shadow)?;
        v.write(F::GuestDr7, self.dr7)?;
        v.write(F::GuestRsp, self.rsp)?;
        v.write(F::GuestRip, self.rip)?;
        v.write(F::GuestRflags, self.rflags)?;
        for (i, s) in self.segs().iter().enumerate() {
            let [sel, base, limit, ar] = seg_fields(i);
            v.write(sel, s.selector.into())?;
            v.write(base, s.base)?;
            v.write(limit, s.limit.into())?;
            v.write(ar, s.ar.into())?;
        }
        v.write(F::GuestGdtrBase, self.gdtr.base)?;
        v.write(F::GuestGdtrLimit, self.gdtr.limit.into())?;
        v.write(F::GuestIdtrBase, self.idtr.base)?;
        v.write(F::GuestIdtrLimit, self.idtr.limit.into())?;
        v.write(F::GuestIa32SysenterCs, self.sysenter_cs)?;
        v.write(F::GuestIa32SysenterEsp, self.sysenter_esp)?;
        v.write(F::GuestIa32SysenterEip, self.sysenter_eip)?;
        v.write(F::GuestIa32Efer, self.efer)?;
        if load_pat {
            v.write(F::GuestIa32Pat, self.pat)?;
        }
        Ok(())
    }

    /// Reads the state back from `v` (after VM exits, for KVM_GET_SREGS and GET_REGS). IA32_PAT
    /// only when the exit saves it.
    pub fn read(v: &dyn VmcsAccess, save_pat: bool) -> Result<GuestState, VmcsError> {
        use Field as F;
        let mut g = GuestState {
            cr0: v.read(F::GuestCr0)?,
            cr0_shadow: v.read(F::Cr0ReadShadow)?,
            cr3: v.read(F::GuestCr3)?,
            cr4: v.read(F::GuestCr4)?,
            cr4_shadow: v.read(F::Cr4ReadShadow)?,
            dr7: v.read(F::GuestDr7)?,
            rsp: v.read(F::GuestRsp)?,
            rip: v.read(F::GuestRip)?,
            rflags: v.read(F::GuestRflags)?,
            gdtr: Dtr {
                base: v.read(F::GuestGdtrBase)?,
                limit: v.read(F::GuestGdtrLimit)? as u32,
            },
            idtr: Dtr {
                base: v.read(F::GuestIdtrBase)?,
                limit: v.read(F::GuestIdtrLimit)? as u32,
            },
            efer: v.read(F::GuestIa32Efer)?,
            pat: GUEST_PAT,
            sysenter_cs: v.read(F::GuestIa32SysenterCs)?,
            sysenter_esp: v.read(F::GuestIa32SysenterEsp)?,
            sysenter_eip: v.read(F::GuestIa32SysenterEip)?,
            ..GuestState::default()
        };
        if save_pat {
            g.pat = v.read(F::GuestIa32Pat)?;
        }
        for (i, s) in g.segs_mut().into_iter().enumerate() {
            let [sel, base, limit, ar] = seg_fields(i);
            *s = Seg {
                selector: v.read(sel)? as u16,
                base: v.read(base)?,
                limit: v.read(limit)? as u32,
                ar: v.read(ar)? as u32,
            };
        }
        Ok(g)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::vmx::vmcs::VmcsImage;

    #[test]
    fn written_state_reads_back() {
        let caps = VmxCaps::default();
        let layout = Layout::new(64 << 20).unwrap();
        let g = GuestState::smudge(&layout, &caps, 0x1000, 0x2000, 0x202);
        let mut img = VmcsImage::default();
        g.write(&mut img, true).unwrap();
        assert_eq!(GuestState::read(&img, true).unwrap(), g);
        let r = GuestState::reset();
        r.write(&mut img, false).unwrap();
        let back = GuestState::read(&img, false).unwrap();
        assert_eq!(back, r);
        assert!(!r.long_mode() && g.long_mode());
    }
}
