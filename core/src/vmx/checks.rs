//! Software VM-entry checker: the SDM's checks on VMX controls, host state and guest state,
//! run over a VMCS before VMLAUNCH/VMRESUME (or after a failed entry) so that "VM-instruction
//! error 7" or "exit reason 33" becomes the name of the rule that was broken.
//!
//! Sections are those of SDM Vol. 3C chapter 27 "VM Entries" in recent editions (chapter 26 in
//! editions up to 2021): 27.2.1.1-27.2.1.3 controls, 27.2.2-27.2.4 host state, 27.3.1.1-27.3.1.6
//! guest state. Every check is one entry of [`CHECKS`], with a stable id, its section and a
//! human rule; `docs/entry-checks.md` lists them, and those not implemented.
//!
//! Assumptions, all true for smudge: VM entry is executed in 64-bit mode (IA32_EFER.LMA = 1) and
//! outside SMM, on a processor that supports Intel 64. What the processor supports is taken
//! only from [`VmxCaps`]: physical-address width from `max_phys_bits`; linear-address width
//! 57 if IA32_VMX_CR4_FIXED1 allows CR4.LA57, else 48; LAM if it allows CR4.LAM_SUP.
//! Checks that need guest memory (virtual-APIC page TPR, VMCS link pointer revision, MSR-load
//! area contents, PDPTEs in memory when EPT is off) or CPUID bits not in `VmxCaps` are not run.
//! Where a rule depends on such a feature, the checker accepts both settings: a stricter checker
//! would reject states the processor accepts.

use super::caps::{Ctls, VmxCaps};
use super::fields::Field;
use super::vmcs::{
    activity, beyond_phys, ctl, interruptibility as intr, interruption_type as ity, is_canonical,
    AccessRights, InterruptionInfo, Selector, VmcsAccess, VmcsError,
};

/// Where a check belongs, and so how the processor reports its failure (SDM 27.2, 27.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// 27.2.1: VMfailValid with VM-instruction error 7 (invalid control fields).
    Controls,
    /// 27.2.2-27.2.4: VMfailValid with VM-instruction error 8 (invalid host-state fields).
    HostState,
    /// 27.3.1: VM exit with exit reason 33 | bit 31 (invalid guest state) and this exit
    /// qualification (0 default, 2 PDPTE loading, 4 invalid VMCS link pointer; SDM 27.8).
    GuestState {
        /// Exit qualification the processor reports.
        exit_qualification: u8,
    },
}

impl Stage {
    /// How the processor reports a failure of this stage.
    pub const fn outcome(self) -> &'static str {
        match self {
            Stage::Controls => "VMfailValid, VM-instruction error 7 (invalid control field)",
            Stage::HostState => "VMfailValid, VM-instruction error 8 (invalid host-state field)",
            Stage::GuestState { .. } => "VM-entry failure, exit reason 33 (invalid guest state)",
        }
    }
}

type Bad = (Field, u64);
type ReadError = (Field, VmcsError);
type Eval = Result<Option<Bad>, ReadError>;
type R<T> = Result<T, ReadError>;

/// One SDM VM-entry check.
#[derive(Debug)]
pub struct Check {
    /// Stable identifier, e.g. `guest.cr0.pg_requires_pe`.
    pub id: &'static str,
    /// SDM Vol. 3C section (recent numbering), e.g. `27.3.1.1`.
    pub section: &'static str,
    /// How a failure is reported.
    pub stage: Stage,
    /// The rule, naming the fields.
    pub rule: &'static str,
    eval: fn(&Ctx<'_>) -> Eval,
}

impl PartialEq for Check {
    fn eq(&self, other: &Check) -> bool {
        self.id == other.id
    }
}
impl Eq for Check {}

/// A broken rule, or a field the checker could not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// `field` holds `value`, which breaks `check`.
    Rule {
        /// The check.
        check: &'static Check,
        /// The field whose value is at fault.
        field: Field,
        /// Its value.
        value: u64,
    },
    /// `field`, which `check` needs, could not be read.
    Unreadable {
        /// The check.
        check: &'static Check,
        /// The field.
        field: Field,
        /// The read error.
        error: VmcsError,
    },
}

impl Violation {
    /// The check that failed.
    pub const fn check(&self) -> &'static Check {
        match self {
            Violation::Rule { check, .. } | Violation::Unreadable { check, .. } => check,
        }
    }
    /// The check's stable id.
    pub const fn id(&self) -> &'static str {
        self.check().id
    }
    /// The field at fault.
    pub const fn field(&self) -> Field {
        match self {
            Violation::Rule { field, .. } | Violation::Unreadable { field, .. } => *field,
        }
    }
}

impl core::fmt::Display for Violation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let c = self.check();
        match self {
            Violation::Rule { field, value, .. } => write!(
                f,
                "[{}] {} (SDM {}); found {} = {:#x}; the CPU reports {}",
                c.id,
                c.rule,
                c.section,
                field.name(),
                value,
                c.stage.outcome()
            ),
            Violation::Unreadable { field, error, .. } => {
                write!(f, "[{}] cannot read {}: {}", c.id, field.name(), error)
            }
        }
    }
}

/// Runs every check in SDM order and returns the first violation.
pub fn check_entry(vmcs: &dyn VmcsAccess, caps: &VmxCaps) -> Result<(), Violation> {
    let ctx = Ctx { v: vmcs, caps };
    for check in CHECKS {
        if let Some(violation) = run(&ctx, check) {
            return Err(violation);
        }
    }
    Ok(())
}

/// Runs every check; stores the violations in `out` in SDM order (as many as fit) and returns
/// how many there are in total (which may exceed `out.len()`).
pub fn all_violations(
    vmcs: &dyn VmcsAccess,
    caps: &VmxCaps,
    out: &mut [Option<Violation>],
) -> usize {
    let ctx = Ctx { v: vmcs, caps };
    let mut n = 0;
    for check in CHECKS {
        if let Some(violation) = run(&ctx, check) {
            if let Some(slot) = out.get_mut(n) {
                *slot = Some(violation);
            }
            n += 1;
        }
    }
    n
}

/// The check with this id.
pub fn find(id: &str) -> Option<&'static Check> {
    CHECKS.iter().find(|c| c.id == id)
}

fn run(ctx: &Ctx<'_>, check: &'static Check) -> Option<Violation> {
    match (check.eval)(ctx) {
        Ok(None) => None,
        Ok(Some((field, value))) => Some(Violation::Rule {
            check,
            field,
            value,
        }),
        Err((field, error)) => Some(Violation::Unreadable {
            check,
            field,
            error,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation context
// ---------------------------------------------------------------------------------------------

use crate::regs::{
    CR0_CD, CR0_NW, CR0_PE, CR0_PG, CR0_WP, CR4_CET, CR4_LA57, CR4_LAM_SUP, CR4_PAE, CR4_PCIDE,
    EFER_LMA, EFER_LME, EFER_NXE, EFER_SCE,
};
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_VM: u64 = 1 << 17;
const DEBUGCTL_BTF: u64 = 1 << 1;
const PENDING_DBG_BS: u64 = 1 << 14;
const PENDING_DBG_RTM: u64 = 1 << 16;

struct Ctx<'a> {
    v: &'a dyn VmcsAccess,
    caps: &'a VmxCaps,
}

impl Ctx<'_> {
    fn rd(&self, f: Field) -> R<u64> {
        self.v.read(f).map_err(|e| (f, e))
    }
    fn rd32(&self, f: Field) -> R<u32> {
        Ok(self.rd(f)? as u32)
    }
    fn pin(&self) -> R<u32> {
        self.rd32(Field::PinBasedControls)
    }
    fn proc(&self) -> R<u32> {
        self.rd32(Field::PrimaryProcessorBasedControls)
    }
    /// Secondary controls, 0 when "activate secondary controls" is 0 (SDM 25.6.2).
    fn proc2(&self) -> R<u32> {
        if self.proc()? & ctl::proc::ACTIVATE_SECONDARY_CONTROLS != 0 {
            self.rd32(Field::SecondaryProcessorBasedControls)
        } else {
            Ok(0)
        }
    }
    fn exit(&self) -> R<u32> {
        self.rd32(Field::VmExitControls)
    }
    fn entry(&self) -> R<u32> {
        self.rd32(Field::VmEntryControls)
    }
    fn ia32e(&self) -> R<bool> {
        Ok(self.entry()? & ctl::entry::IA32E_MODE_GUEST != 0)
    }
    fn host_64(&self) -> R<bool> {
        Ok(self.exit()? & ctl::exit::HOST_ADDRESS_SPACE_SIZE != 0)
    }
    fn unrestricted(&self) -> R<bool> {
        Ok(self.proc2()? & ctl::proc2::UNRESTRICTED_GUEST != 0)
    }
    fn ept(&self) -> R<bool> {
        Ok(self.proc2()? & ctl::proc2::ENABLE_EPT != 0)
    }
    fn cr0(&self) -> R<u64> {
        self.rd(Field::GuestCr0)
    }
    fn pe(&self) -> R<bool> {
        Ok(self.cr0()? & CR0_PE != 0)
    }
    fn rflags(&self) -> R<u64> {
        self.rd(Field::GuestRflags)
    }
    fn v8086(&self) -> R<bool> {
        Ok(self.rflags()? & RFLAGS_VM != 0)
    }
    fn event(&self) -> R<InterruptionInfo> {
        Ok(InterruptionInfo(
            self.rd32(Field::VmEntryInterruptionInformation)?,
        ))
    }
    fn ar(&self, s: Seg) -> R<AccessRights> {
        Ok(AccessRights(self.rd32(s.ar())?))
    }
    fn sel(&self, s: Seg) -> R<Selector> {
        Ok(Selector(self.rd(s.sel())? as u16))
    }
    fn phys_bits(&self) -> u32 {
        match self.caps.max_phys_bits {
            0 => 36,
            b => b as u32,
        }
    }
    fn linear_bits(&self) -> u32 {
        if self.caps.cr4_fixed1 & CR4_LA57 != 0 {
            57
        } else {
            48
        }
    }
    fn canonical(&self, a: u64) -> bool {
        is_canonical(a, self.linear_bits())
    }
    /// CR3 bits that must be 0 (SDM 27.2.2 / 27.3.1.1): 63:MAXPHYADDR, except bits 62:61
    /// when the processor supports LAM (they are LAM_U57/LAM_U48).
    fn cr3_reserved(&self, cr3: u64) -> u64 {
        let mut mask = if self.phys_bits() >= 64 {
            0
        } else {
            !0u64 << self.phys_bits()
        };
        if self.caps.cr4_fixed1 & CR4_LAM_SUP != 0 {
            mask &= !(3u64 << 61);
        }
        cr3 & mask
    }
}

fn ok() -> Eval {
    Ok(None)
}

fn fail_if(cond: bool, f: Field, v: u64) -> Eval {
    Ok(if cond { Some((f, v)) } else { None })
}

fn ctls_ok(c: &Ctls, v: u32) -> bool {
    v & c.must_be_1 == c.must_be_1 && v & !c.may_be_1 == 0
}

/// A 4 KiB-aligned physical address within MAXPHYADDR, checked only when `enabled`.
fn page_addr(c: &Ctx<'_>, enabled: bool, f: Field) -> Eval {
    if !enabled {
        return ok();
    }
    let a = c.rd(f)?;
    fail_if(a & 0xFFF != 0 || beyond_phys(a, c.phys_bits()), f, a)
}

fn canonical_field(c: &Ctx<'_>, enabled: bool, f: Field) -> Eval {
    if !enabled {
        return ok();
    }
    let a = c.rd(f)?;
    fail_if(!c.canonical(a), f, a)
}

/// CR0/CR4 against IA32_VMX_CRn_FIXED0/1 (SDM A.7, A.8): bits set in FIXED0 must be 1, bits
/// clear in FIXED1 must be 0. `ignore` bits are not checked.
fn fixed_ok(v: u64, fixed0: u64, fixed1: u64, ignore: u64) -> bool {
    let f0 = fixed0 & !ignore;
    v & f0 == f0 && v & !fixed1 & !ignore == 0
}

/// PAT: each byte 0 (UC), 1 (WC), 4 (WT), 5 (WP), 6 (WB) or 7 (UC-) (SDM 27.2.2, 27.3.1.1).
fn pat_ok(pat: u64) -> bool {
    pat.to_le_bytes()
        .iter()
        .all(|b| matches!(b, 0 | 1 | 4 | 5 | 6 | 7))
}

/// MSR-load/store area: address bits 3:0 zero, address and last byte within the physical width
/// (32 bits when IA32_VMX_BASIC[48]); SDM 27.2.1.2, 27.2.1.3.
fn msr_area(c: &Ctx<'_>, count: Field, addr: Field) -> Eval {
    let n = c.rd(count)?;
    if n == 0 {
        return ok();
    }
    let a = c.rd(addr)?;
    let mut width = c.phys_bits();
    if c.caps.basic & (1 << 48) != 0 && width > 32 {
        width = 32;
    }
    // "The arithmetic used for the computation uses more bits than the physical-address width."
    let last = a as u128 + (n as u128) * 16 - 1;
    let last_beyond = width < 128 && last >> width != 0;
    fail_if(
        a & 0xF != 0 || beyond_phys(a, width) || last_beyond,
        addr,
        a,
    )
}

// ---------------------------------------------------------------------------------------------
// Segment helpers (27.3.1.2)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Seg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    Tr,
    Ldtr,
}

impl Seg {
    const fn sel(self) -> Field {
        match self {
            Seg::Es => Field::GuestEsSelector,
            Seg::Cs => Field::GuestCsSelector,
            Seg::Ss => Field::GuestSsSelector,
            Seg::Ds => Field::GuestDsSelector,
            Seg::Fs => Field::GuestFsSelector,
            Seg::Gs => Field::GuestGsSelector,
            Seg::Tr => Field::GuestTrSelector,
            Seg::Ldtr => Field::GuestLdtrSelector,
        }
    }
    const fn base(self) -> Field {
        match self {
            Seg::Es => Field::GuestEsBase,
            Seg::Cs => Field::GuestCsBase,
            Seg::Ss => Field::GuestSsBase,
            Seg::Ds => Field::GuestDsBase,
            Seg::Fs => Field::GuestFsBase,
            Seg::Gs => Field::GuestGsBase,
            Seg::Tr => Field::GuestTrBase,
            Seg::Ldtr => Field::GuestLdtrBase,
        }
    }
    const fn limit(self) -> Field {
        match self {
            Seg::Es => Field::GuestEsLimit,
            Seg::Cs => Field::GuestCsLimit,
            Seg::Ss => Field::GuestSsLimit,
            Seg::Ds => Field::GuestDsLimit,
            Seg::Fs => Field::GuestFsLimit,
            Seg::Gs => Field::GuestGsLimit,
            Seg::Tr => Field::GuestTrLimit,
            Seg::Ldtr => Field::GuestLdtrLimit,
        }
    }
    const fn ar(self) -> Field {
        match self {
            Seg::Es => Field::GuestEsAccessRights,
            Seg::Cs => Field::GuestCsAccessRights,
            Seg::Ss => Field::GuestSsAccessRights,
            Seg::Ds => Field::GuestDsAccessRights,
            Seg::Fs => Field::GuestFsAccessRights,
            Seg::Gs => Field::GuestGsAccessRights,
            Seg::Tr => Field::GuestTrAccessRights,
            Seg::Ldtr => Field::GuestLdtrAccessRights,
        }
    }
}

const CODE_DATA_SEGS: [Seg; 6] = [Seg::Cs, Seg::Ss, Seg::Ds, Seg::Es, Seg::Fs, Seg::Gs];

/// The access-rights checks on CS, SS, DS, ES, FS, GS apply outside virtual-8086 mode, to CS
/// always and to the others when usable. Returns the access rights if they apply.
fn checked_ar(c: &Ctx<'_>, s: Seg) -> R<Option<AccessRights>> {
    if c.v8086()? {
        return Ok(None);
    }
    let ar = c.ar(s)?;
    Ok(if s == Seg::Cs || !ar.unusable() {
        Some(ar)
    } else {
        None
    })
}

/// Usable-register access rights for TR (always) and LDTR (when usable).
fn system_ar(c: &Ctx<'_>, s: Seg) -> R<Option<AccessRights>> {
    let ar = c.ar(s)?;
    Ok(if s == Seg::Tr || !ar.unusable() {
        Some(ar)
    } else {
        None
    })
}

fn seg_s(c: &Ctx<'_>, s: Seg) -> Eval {
    match checked_ar(c, s)? {
        Some(ar) => fail_if(!ar.s(), s.ar(), ar.0 as u64),
        None => ok(),
    }
}

fn seg_p(c: &Ctx<'_>, s: Seg) -> Eval {
    match checked_ar(c, s)? {
        Some(ar) => fail_if(!ar.p(), s.ar(), ar.0 as u64),
        None => ok(),
    }
}

fn seg_reserved(c: &Ctx<'_>, s: Seg) -> Eval {
    match checked_ar(c, s)? {
        Some(ar) => fail_if(ar.reserved_bits_set(), s.ar(), ar.0 as u64),
        None => ok(),
    }
}

/// G must be 0 if any of limit bits 11:0 is 0, and 1 if any of limit bits 31:20 is 1.
fn granularity_bad(limit: u64, ar: AccessRights) -> bool {
    (limit & 0xFFF != 0xFFF && ar.g()) || (limit & 0xFFF0_0000 != 0 && !ar.g())
}

fn seg_granularity(c: &Ctx<'_>, s: Seg) -> Eval {
    match checked_ar(c, s)? {
        Some(ar) => {
            let limit = c.rd(s.limit())?;
            fail_if(granularity_bad(limit, ar), s.ar(), ar.0 as u64)
        }
        None => ok(),
    }
}

fn data_type(c: &Ctx<'_>, s: Seg) -> Eval {
    match checked_ar(c, s)? {
        Some(ar) => {
            let t = ar.seg_type();
            let accessed = t & 1 != 0;
            let code_readable = t & 8 == 0 || t & 2 != 0;
            fail_if(!accessed || !code_readable, s.ar(), ar.0 as u64)
        }
        None => ok(),
    }
}

fn data_dpl(c: &Ctx<'_>, s: Seg) -> Eval {
    if c.unrestricted()? {
        return ok();
    }
    match checked_ar(c, s)? {
        Some(ar) if ar.seg_type() <= 11 => {
            let rpl = c.sel(s)?.rpl();
            fail_if(ar.dpl() < rpl, s.ar(), ar.0 as u64)
        }
        _ => ok(),
    }
}

fn base_high(c: &Ctx<'_>, s: Seg) -> Eval {
    let ar = c.ar(s)?;
    if s != Seg::Cs && ar.unusable() {
        return ok();
    }
    let b = c.rd(s.base())?;
    fail_if(b >> 32 != 0, s.base(), b)
}

fn base_canonical(c: &Ctx<'_>, s: Seg) -> Eval {
    if s == Seg::Ldtr && c.ar(s)?.unusable() {
        return ok();
    }
    let b = c.rd(s.base())?;
    fail_if(!c.canonical(b), s.base(), b)
}

fn system_type(c: &Ctx<'_>, s: Seg) -> Eval {
    let Some(ar) = system_ar(c, s)? else {
        return ok();
    };
    let t = ar.seg_type();
    let good = match s {
        Seg::Ldtr => t == 2,
        _ if c.ia32e()? => t == 11,
        _ => t == 3 || t == 11,
    };
    fail_if(!good, s.ar(), ar.0 as u64)
}

fn system_s(c: &Ctx<'_>, s: Seg) -> Eval {
    match system_ar(c, s)? {
        Some(ar) => fail_if(ar.s(), s.ar(), ar.0 as u64),
        None => ok(),
    }
}

fn system_p(c: &Ctx<'_>, s: Seg) -> Eval {
    match system_ar(c, s)? {
        Some(ar) => fail_if(!ar.p(), s.ar(), ar.0 as u64),
        None => ok(),
    }
}

fn system_reserved(c: &Ctx<'_>, s: Seg) -> Eval {
    match system_ar(c, s)? {
        Some(ar) => fail_if(ar.reserved_bits_set(), s.ar(), ar.0 as u64),
        None => ok(),
    }
}

fn system_granularity(c: &Ctx<'_>, s: Seg) -> Eval {
    match system_ar(c, s)? {
        Some(ar) => {
            let limit = c.rd(s.limit())?;
            fail_if(granularity_bad(limit, ar), s.ar(), ar.0 as u64)
        }
        None => ok(),
    }
}

fn host_selector(c: &Ctx<'_>, f: Field) -> Eval {
    let s = c.rd(f)?;
    fail_if(s & 7 != 0, f, s)
}

// ---------------------------------------------------------------------------------------------
// Checks with more than a line of logic
// ---------------------------------------------------------------------------------------------

fn eptp(c: &Ctx<'_>) -> R<Option<u64>> {
    if c.ept()? {
        Ok(Some(c.rd(Field::EptPointer)?))
    } else {
        Ok(None)
    }
}

fn cap(c: &Ctx<'_>, bit: u32) -> bool {
    c.caps.ept_vpid_cap & (1u64 << bit) != 0
}

fn eptp_memory_type(c: &Ctx<'_>) -> Eval {
    let Some(e) = eptp(c)? else { return ok() };
    // IA32_VMX_EPT_VPID_CAP bit 8: UC supported, bit 14: WB supported (SDM A.10).
    let good = match e & 7 {
        0 => cap(c, 8),
        6 => cap(c, 14),
        _ => false,
    };
    fail_if(!good, Field::EptPointer, e)
}

fn eptp_walk_length(c: &Ctx<'_>) -> Eval {
    let Some(e) = eptp(c)? else { return ok() };
    // Bit 6: 4-level walk supported, bit 7: 5-level walk supported (SDM A.10).
    let good = match (e >> 3) & 7 {
        3 => cap(c, 6),
        4 => cap(c, 7),
        _ => false,
    };
    fail_if(!good, Field::EptPointer, e)
}

fn event_error_code(c: &Ctx<'_>) -> Eval {
    let e = c.event()?;
    if !e.valid() {
        return ok();
    }
    let f = Field::VmEntryInterruptionInformation;
    let protected = !c.unrestricted()? || c.pe()?;
    if !protected || e.ty() != ity::HARDWARE_EXCEPTION {
        return fail_if(e.deliver_error_code(), f, e.0 as u64);
    }
    // IA32_VMX_BASIC[56]: hardware exceptions may be injected with or without an error code.
    if c.caps.basic & (1 << 56) != 0 {
        return ok();
    }
    let expected = match e.vector() {
        8 | 10..=14 | 17 => true,
        // #CP delivers an error code on processors with CET, which VmxCaps cannot tell.
        21 => return ok(),
        _ => false,
    };
    fail_if(e.deliver_error_code() != expected, f, e.0 as u64)
}

fn event_instruction_length(c: &Ctx<'_>) -> Eval {
    let e = c.event()?;
    let soft = matches!(
        e.ty(),
        ity::SOFTWARE_INTERRUPT | ity::PRIVILEGED_SOFTWARE_EXCEPTION | ity::SOFTWARE_EXCEPTION
    );
    if !e.valid() || !soft {
        return ok();
    }
    let len = c.rd(Field::VmEntryInstructionLength)?;
    // IA32_VMX_MISC[30]: a length of 0 is allowed (SDM A.6).
    let min = if c.caps.misc & (1 << 30) != 0 { 0 } else { 1 };
    fail_if(len < min || len > 15, Field::VmEntryInstructionLength, len)
}

fn guest_cr0_fixed(c: &Ctx<'_>) -> Eval {
    let v = c.cr0()?;
    // PE and PG are not checked with "unrestricted guest"; NW and CD never are (VM entry does
    // not change them, SDM 27.3.2.1).
    let mut ignore = CR0_NW | CR0_CD;
    if c.unrestricted()? {
        ignore |= CR0_PE | CR0_PG;
    }
    fail_if(
        !fixed_ok(v, c.caps.cr0_fixed0, c.caps.cr0_fixed1, ignore),
        Field::GuestCr0,
        v,
    )
}

fn guest_efer(c: &Ctx<'_>) -> R<Option<u64>> {
    if c.entry()? & ctl::entry::LOAD_IA32_EFER != 0 {
        Ok(Some(c.rd(Field::GuestIa32Efer)?))
    } else {
        Ok(None)
    }
}

fn host_efer(c: &Ctx<'_>) -> R<Option<u64>> {
    if c.exit()? & ctl::exit::LOAD_IA32_EFER != 0 {
        Ok(Some(c.rd(Field::HostIa32Efer)?))
    } else {
        Ok(None)
    }
}

/// IA32_EFER bits Intel defines: SCE, LME, LMA, NXE. All others are reserved.
const EFER_DEFINED: u64 = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;

fn cs_type(c: &Ctx<'_>) -> Eval {
    let Some(ar) = checked_ar(c, Seg::Cs)? else {
        return ok();
    };
    let t = ar.seg_type();
    let good = matches!(t, 9 | 11 | 13 | 15) || (t == 3 && c.unrestricted()?);
    fail_if(!good, Seg::Cs.ar(), ar.0 as u64)
}

fn ss_type(c: &Ctx<'_>) -> Eval {
    let Some(ar) = checked_ar(c, Seg::Ss)? else {
        return ok();
    };
    fail_if(!matches!(ar.seg_type(), 3 | 7), Seg::Ss.ar(), ar.0 as u64)
}

fn cs_dpl(c: &Ctx<'_>) -> Eval {
    let Some(ar) = checked_ar(c, Seg::Cs)? else {
        return ok();
    };
    let ss_dpl = c.ar(Seg::Ss)?.dpl();
    let bad = match ar.seg_type() {
        3 => ar.dpl() != 0,
        9 | 11 => ar.dpl() != ss_dpl,
        13 | 15 => ar.dpl() > ss_dpl,
        _ => false, // a bad type is guest.cs.type
    };
    fail_if(bad, Seg::Cs.ar(), ar.0 as u64)
}

fn ss_dpl_eq_rpl(c: &Ctx<'_>) -> Eval {
    if c.v8086()? || c.unrestricted()? {
        return ok();
    }
    let ar = c.ar(Seg::Ss)?;
    fail_if(ar.dpl() != c.sel(Seg::Ss)?.rpl(), Seg::Ss.ar(), ar.0 as u64)
}

fn ss_dpl_zero(c: &Ctx<'_>) -> Eval {
    if c.v8086()? {
        return ok();
    }
    let cs_type_3 = c.ar(Seg::Cs)?.seg_type() == 3;
    let ar = c.ar(Seg::Ss)?;
    fail_if(
        (cs_type_3 || !c.pe()?) && ar.dpl() != 0,
        Seg::Ss.ar(),
        ar.0 as u64,
    )
}

fn v8086_base(c: &Ctx<'_>) -> Eval {
    if !c.v8086()? {
        return ok();
    }
    for s in CODE_DATA_SEGS {
        let b = c.rd(s.base())?;
        if b != (c.rd(s.sel())? & 0xFFFF) << 4 {
            return fail_if(true, s.base(), b);
        }
    }
    ok()
}

fn v8086_limit(c: &Ctx<'_>) -> Eval {
    if !c.v8086()? {
        return ok();
    }
    for s in CODE_DATA_SEGS {
        let l = c.rd(s.limit())?;
        if l != 0xFFFF {
            return fail_if(true, s.limit(), l);
        }
    }
    ok()
}

fn v8086_ar(c: &Ctx<'_>) -> Eval {
    if !c.v8086()? {
        return ok();
    }
    for s in CODE_DATA_SEGS {
        let a = c.rd(s.ar())?;
        if a != 0xF3 {
            return fail_if(true, s.ar(), a);
        }
    }
    ok()
}

fn activity_supported(c: &Ctx<'_>) -> Eval {
    let s = c.rd(Field::GuestActivityState)?;
    // IA32_VMX_MISC bits 6, 7, 8: HLT, shutdown, wait-for-SIPI supported (SDM A.6).
    let good = match s {
        activity::ACTIVE => true,
        activity::HLT => c.caps.misc & (1 << 6) != 0,
        activity::SHUTDOWN => c.caps.misc & (1 << 7) != 0,
        activity::WAIT_FOR_SIPI => c.caps.misc & (1 << 8) != 0,
        _ => false,
    };
    fail_if(!good, Field::GuestActivityState, s)
}

fn activity_event(c: &Ctx<'_>) -> Eval {
    let e = c.event()?;
    if !e.valid() {
        return ok();
    }
    let s = c.rd(Field::GuestActivityState)?;
    let (t, v) = (e.ty(), e.vector());
    let allowed = match s {
        activity::HLT => {
            matches!(t, ity::EXTERNAL_INTERRUPT | ity::NMI)
                || (t == ity::HARDWARE_EXCEPTION && matches!(v, 1 | 18))
                || (t == ity::OTHER_EVENT && v == 0)
        }
        activity::SHUTDOWN => t == ity::NMI || (t == ity::HARDWARE_EXCEPTION && v == 18),
        activity::WAIT_FOR_SIPI => false,
        _ => true,
    };
    fail_if(!allowed, Field::VmEntryInterruptionInformation, e.0 as u64)
}

/// The BS checks apply with STI or MOV-SS blocking, or in the HLT state (SDM 27.3.1.5).
fn bs_applies(c: &Ctx<'_>) -> R<bool> {
    let i = c.rd(Field::GuestInterruptibilityState)?;
    Ok(i & (intr::STI | intr::MOV_SS) != 0 || c.rd(Field::GuestActivityState)? == activity::HLT)
}

fn pending_dbg_bs(c: &Ctx<'_>, must_be_set: bool) -> Eval {
    if !bs_applies(c)? {
        return ok();
    }
    let tf = c.rflags()? & RFLAGS_TF != 0;
    let btf = c.rd(Field::GuestIa32Debugctl)? & DEBUGCTL_BTF != 0;
    let p = c.rd(Field::GuestPendingDebugExceptions)?;
    let bs = p & PENDING_DBG_BS != 0;
    let single_step = tf && !btf;
    if must_be_set {
        fail_if(single_step && !bs, Field::GuestPendingDebugExceptions, p)
    } else {
        fail_if(!single_step && bs, Field::GuestPendingDebugExceptions, p)
    }
}

fn pending_dbg_rtm(c: &Ctx<'_>) -> Eval {
    let p = c.rd(Field::GuestPendingDebugExceptions)?;
    if p & PENDING_DBG_RTM == 0 {
        return ok();
    }
    let mov_ss = c.rd(Field::GuestInterruptibilityState)? & intr::MOV_SS != 0;
    // Bits 11:0 and 15:13 must be 0 (11:4, 13, 15 are reserved anyway), no MOV-SS blocking.
    fail_if(
        p & (0xF | PENDING_DBG_BS) != 0 || mov_ss,
        Field::GuestPendingDebugExceptions,
        p,
    )
}

fn pdpte(c: &Ctx<'_>) -> Eval {
    // With EPT, a VM entry to a PAE-paging guest checks the PDPTE fields (SDM 27.3.1.6).
    let cr0 = c.cr0()?;
    let pae = c.rd(Field::GuestCr4)? & CR4_PAE != 0;
    if !c.ept()? || cr0 & CR0_PG == 0 || !pae || c.ia32e()? {
        return ok();
    }
    for f in [
        Field::GuestPdpte0,
        Field::GuestPdpte1,
        Field::GuestPdpte2,
        Field::GuestPdpte3,
    ] {
        let p = c.rd(f)?;
        // PAE PDPTE: bits 2:1, 8:5 and 63:MAXPHYADDR are reserved (SDM Vol. 3A 4.4.1).
        if p & 1 != 0 && (p & 0x1E6 != 0 || beyond_phys(p, c.phys_bits())) {
            return fail_if(true, f, p);
        }
    }
    ok()
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

const CTL: Stage = Stage::Controls;
const HOST: Stage = Stage::HostState;
const GUEST: Stage = Stage::GuestState {
    exit_qualification: 0,
};

macro_rules! check {
    ($id:literal, $sec:literal, $stage:expr, $rule:literal, $eval:expr) => {
        Check {
            id: $id,
            section: $sec,
            stage: $stage,
            rule: $rule,
            eval: $eval,
        }
    };
}

/// Every check, in the order of the SDM text. Ids are stable.
pub static CHECKS: &[Check] = &[
    // ---- 27.2.1.1 VM-execution control fields ----
    check!("ctrl.pin.reserved", "27.2.1.1", CTL,
        "pin-based VM-execution controls must respect IA32_VMX_(TRUE_)PINBASED_CTLS (allowed 0- and 1-settings)",
        |c| { let v = c.pin()?; fail_if(!ctls_ok(&c.caps.pinbased, v), Field::PinBasedControls, v as u64) }),
    check!("ctrl.proc.reserved", "27.2.1.1", CTL,
        "primary processor-based VM-execution controls must respect IA32_VMX_(TRUE_)PROCBASED_CTLS",
        |c| { let v = c.proc()?; fail_if(!ctls_ok(&c.caps.procbased, v), Field::PrimaryProcessorBasedControls, v as u64) }),
    check!("ctrl.proc2.reserved", "27.2.1.1", CTL,
        "with \"activate secondary controls\", secondary processor-based controls must respect IA32_VMX_PROCBASED_CTLS2",
        |c| { let v = c.proc2()?; fail_if(!ctls_ok(&c.caps.procbased2, v), Field::SecondaryProcessorBasedControls, v as u64) }),
    check!("ctrl.cr3_target_count", "27.2.1.1", CTL,
        "CR3-target count must not exceed the number of CR3-target values in IA32_VMX_MISC[24:16]",
        |c| { let n = c.rd(Field::Cr3TargetCount)?; fail_if(n > (c.caps.misc >> 16) & 0x1FF, Field::Cr3TargetCount, n) }),
    check!("ctrl.io_bitmap_a.addr", "27.2.1.1", CTL,
        "with \"use I/O bitmaps\", I/O bitmap A address must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc()? & ctl::proc::USE_IO_BITMAPS != 0, Field::IoBitmapAAddress)),
    check!("ctrl.io_bitmap_b.addr", "27.2.1.1", CTL,
        "with \"use I/O bitmaps\", I/O bitmap B address must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc()? & ctl::proc::USE_IO_BITMAPS != 0, Field::IoBitmapBAddress)),
    check!("ctrl.msr_bitmap.addr", "27.2.1.1", CTL,
        "with \"use MSR bitmaps\", the MSR-bitmap address must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc()? & ctl::proc::USE_MSR_BITMAPS != 0, Field::MsrBitmapAddress)),
    check!("ctrl.virtual_apic.addr", "27.2.1.1", CTL,
        "with \"use TPR shadow\", the virtual-APIC address must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc()? & ctl::proc::USE_TPR_SHADOW != 0, Field::VirtualApicAddress)),
    check!("ctrl.tpr_threshold.reserved", "27.2.1.1", CTL,
        "with \"use TPR shadow\" and without \"virtual-interrupt delivery\", TPR threshold bits 31:4 must be 0",
        |c| {
            let on = c.proc()? & ctl::proc::USE_TPR_SHADOW != 0
                && c.proc2()? & ctl::proc2::VIRTUAL_INTERRUPT_DELIVERY == 0;
            if !on { return ok(); }
            let t = c.rd(Field::TprThreshold)?;
            fail_if(t & !0xF != 0, Field::TprThreshold, t)
        }),
    check!("ctrl.x2apic_mode_requires_tpr_shadow", "27.2.1.1", CTL,
        "\"virtualize x2APIC mode\" requires \"use TPR shadow\"",
        |c| { let p2 = c.proc2()?; fail_if(c.proc()? & ctl::proc::USE_TPR_SHADOW == 0 && p2 & ctl::proc2::VIRTUALIZE_X2APIC_MODE != 0, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.apic_register_virt_requires_tpr_shadow", "27.2.1.1", CTL,
        "\"APIC-register virtualization\" requires \"use TPR shadow\"",
        |c| { let p2 = c.proc2()?; fail_if(c.proc()? & ctl::proc::USE_TPR_SHADOW == 0 && p2 & ctl::proc2::APIC_REGISTER_VIRTUALIZATION != 0, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.vid_requires_tpr_shadow", "27.2.1.1", CTL,
        "\"virtual-interrupt delivery\" requires \"use TPR shadow\"",
        |c| { let p2 = c.proc2()?; fail_if(c.proc()? & ctl::proc::USE_TPR_SHADOW == 0 && p2 & ctl::proc2::VIRTUAL_INTERRUPT_DELIVERY != 0, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.virtual_nmis_requires_nmi_exiting", "27.2.1.1", CTL,
        "\"virtual NMIs\" requires \"NMI exiting\"",
        |c| { let p = c.pin()?; fail_if(p & ctl::pin::NMI_EXITING == 0 && p & ctl::pin::VIRTUAL_NMIS != 0, Field::PinBasedControls, p as u64) }),
    check!("ctrl.nmi_window_requires_virtual_nmis", "27.2.1.1", CTL,
        "\"NMI-window exiting\" requires \"virtual NMIs\"",
        |c| { let p = c.proc()?; fail_if(c.pin()? & ctl::pin::VIRTUAL_NMIS == 0 && p & ctl::proc::NMI_WINDOW_EXITING != 0, Field::PrimaryProcessorBasedControls, p as u64) }),
    check!("ctrl.apic_access.addr", "27.2.1.1", CTL,
        "with \"virtualize APIC accesses\", the APIC-access address must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc2()? & ctl::proc2::VIRTUALIZE_APIC_ACCESSES != 0, Field::ApicAccessAddress)),
    check!("ctrl.x2apic_mode_excludes_apic_access", "27.2.1.1", CTL,
        "\"virtualize x2APIC mode\" requires \"virtualize APIC accesses\" = 0",
        |c| { let p2 = c.proc2()?; let both = ctl::proc2::VIRTUALIZE_X2APIC_MODE | ctl::proc2::VIRTUALIZE_APIC_ACCESSES; fail_if(p2 & both == both, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.vid_requires_ext_int_exiting", "27.2.1.1", CTL,
        "\"virtual-interrupt delivery\" requires \"external-interrupt exiting\"",
        |c| { let p = c.pin()?; fail_if(c.proc2()? & ctl::proc2::VIRTUAL_INTERRUPT_DELIVERY != 0 && p & ctl::pin::EXTERNAL_INTERRUPT_EXITING == 0, Field::PinBasedControls, p as u64) }),
    check!("ctrl.posted_int.requires_vid", "27.2.1.1", CTL,
        "\"process posted interrupts\" requires \"virtual-interrupt delivery\"",
        |c| { let p2 = c.proc2()?; fail_if(c.pin()? & ctl::pin::PROCESS_POSTED_INTERRUPTS != 0 && p2 & ctl::proc2::VIRTUAL_INTERRUPT_DELIVERY == 0, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.posted_int.requires_ack_on_exit", "27.2.1.1", CTL,
        "\"process posted interrupts\" requires the \"acknowledge interrupt on exit\" VM-exit control",
        |c| { let x = c.exit()?; fail_if(c.pin()? & ctl::pin::PROCESS_POSTED_INTERRUPTS != 0 && x & ctl::exit::ACK_INTERRUPT_ON_EXIT == 0, Field::VmExitControls, x as u64) }),
    check!("ctrl.posted_int.vector", "27.2.1.1", CTL,
        "with \"process posted interrupts\", the posted-interrupt notification vector must be 0-255 (bits 15:8 = 0)",
        |c| {
            if c.pin()? & ctl::pin::PROCESS_POSTED_INTERRUPTS == 0 { return ok(); }
            let v = c.rd(Field::PostedInterruptNotificationVector)?;
            fail_if(v & 0xFF00 != 0, Field::PostedInterruptNotificationVector, v)
        }),
    check!("ctrl.posted_int.desc_addr", "27.2.1.1", CTL,
        "with \"process posted interrupts\", the posted-interrupt descriptor address must be 64-byte aligned and within MAXPHYADDR",
        |c| {
            if c.pin()? & ctl::pin::PROCESS_POSTED_INTERRUPTS == 0 { return ok(); }
            let a = c.rd(Field::PostedInterruptDescriptorAddress)?;
            fail_if(a & 0x3F != 0 || beyond_phys(a, c.phys_bits()), Field::PostedInterruptDescriptorAddress, a)
        }),
    check!("ctrl.vpid_nonzero", "27.2.1.1", CTL,
        "with \"enable VPID\", the VPID must not be 0000H",
        |c| {
            if c.proc2()? & ctl::proc2::ENABLE_VPID == 0 { return ok(); }
            let v = c.rd(Field::VirtualProcessorId)?;
            fail_if(v == 0, Field::VirtualProcessorId, v)
        }),
    check!("ctrl.eptp.memory_type", "27.2.1.1", CTL,
        "with \"enable EPT\", EPTP bits 2:0 must be a memory type IA32_VMX_EPT_VPID_CAP supports (0 = UC if bit 8, 6 = WB if bit 14)",
        eptp_memory_type),
    check!("ctrl.eptp.walk_length", "27.2.1.1", CTL,
        "with \"enable EPT\", EPTP bits 5:3 must be 3 (4-level walk, IA32_VMX_EPT_VPID_CAP bit 6) or 4 (5-level, bit 7)",
        eptp_walk_length),
    check!("ctrl.eptp.accessed_dirty", "27.2.1.1", CTL,
        "EPTP bit 6 (EPT accessed/dirty flags) must be 0 unless IA32_VMX_EPT_VPID_CAP bit 21 is 1",
        |c| { let Some(e) = eptp(c)? else { return ok() }; fail_if(e & (1 << 6) != 0 && !cap(c, 21), Field::EptPointer, e) }),
    check!("ctrl.eptp.reserved", "27.2.1.1", CTL,
        "EPTP reserved bits 11:8 and 63:MAXPHYADDR must be 0",
        |c| { let Some(e) = eptp(c)? else { return ok() }; fail_if(e & 0xF00 != 0 || beyond_phys(e, c.phys_bits()), Field::EptPointer, e) }),
    check!("ctrl.pml_requires_ept", "27.2.1.1", CTL,
        "\"enable PML\" requires \"enable EPT\"",
        |c| { let p2 = c.proc2()?; fail_if(p2 & ctl::proc2::ENABLE_PML != 0 && p2 & ctl::proc2::ENABLE_EPT == 0, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.pml.addr", "27.2.1.1", CTL,
        "with \"enable PML\", the PML address must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc2()? & ctl::proc2::ENABLE_PML != 0, Field::PmlAddress)),
    check!("ctrl.unrestricted_guest_requires_ept", "27.2.1.1", CTL,
        "\"unrestricted guest\" requires \"enable EPT\"",
        |c| { let p2 = c.proc2()?; fail_if(p2 & ctl::proc2::UNRESTRICTED_GUEST != 0 && p2 & ctl::proc2::ENABLE_EPT == 0, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.mbec_requires_ept", "27.2.1.1", CTL,
        "\"mode-based execute control for EPT\" requires \"enable EPT\"",
        |c| { let p2 = c.proc2()?; fail_if(p2 & ctl::proc2::MODE_BASED_EXECUTE_CONTROL != 0 && p2 & ctl::proc2::ENABLE_EPT == 0, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.spp_requires_ept", "27.2.1.1", CTL,
        "\"sub-page write permissions for EPT\" requires \"enable EPT\"",
        |c| { let p2 = c.proc2()?; fail_if(p2 & ctl::proc2::SUB_PAGE_WRITE_PERMISSIONS != 0 && p2 & ctl::proc2::ENABLE_EPT == 0, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.spptp.addr", "27.2.1.1", CTL,
        "with \"sub-page write permissions\", the SPPTP must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc2()? & ctl::proc2::SUB_PAGE_WRITE_PERMISSIONS != 0, Field::SubPagePermissionTablePointer)),
    check!("ctrl.pt_gpa_requires_ept", "27.2.1.1", CTL,
        "\"Intel PT uses guest physical addresses\" requires \"enable EPT\"",
        |c| { let p2 = c.proc2()?; fail_if(p2 & ctl::proc2::PT_USES_GUEST_PHYSICAL_ADDRESSES != 0 && p2 & ctl::proc2::ENABLE_EPT == 0, Field::SecondaryProcessorBasedControls, p2 as u64) }),
    check!("ctrl.pt_gpa_requires_rtit_ctl_controls", "27.2.1.1", CTL,
        "\"Intel PT uses guest physical addresses\" requires \"load IA32_RTIT_CTL\" (entry) and \"clear IA32_RTIT_CTL\" (exit)",
        |c| {
            if c.proc2()? & ctl::proc2::PT_USES_GUEST_PHYSICAL_ADDRESSES == 0 { return ok(); }
            let en = c.entry()?;
            if en & ctl::entry::LOAD_IA32_RTIT_CTL == 0 { return fail_if(true, Field::VmEntryControls, en as u64); }
            let x = c.exit()?;
            fail_if(x & ctl::exit::CLEAR_IA32_RTIT_CTL == 0, Field::VmExitControls, x as u64)
        }),
    check!("ctrl.vmfunc.reserved", "27.2.1.1", CTL,
        "with \"enable VM functions\", VM-function controls may set only bits IA32_VMX_VMFUNC allows",
        |c| {
            if c.proc2()? & ctl::proc2::ENABLE_VM_FUNCTIONS == 0 { return ok(); }
            let f = c.rd(Field::VmFunctionControls)?;
            fail_if(f & !c.caps.vmfunc != 0, Field::VmFunctionControls, f)
        }),
    check!("ctrl.vmfunc.eptp_switching_requires_ept", "27.2.1.1", CTL,
        "the \"EPTP switching\" VM function requires \"enable EPT\"",
        |c| {
            let p2 = c.proc2()?;
            if p2 & ctl::proc2::ENABLE_VM_FUNCTIONS == 0 { return ok(); }
            let f = c.rd(Field::VmFunctionControls)?;
            fail_if(f & 1 != 0 && p2 & ctl::proc2::ENABLE_EPT == 0, Field::VmFunctionControls, f)
        }),
    check!("ctrl.eptp_list.addr", "27.2.1.1", CTL,
        "with \"EPTP switching\", the EPTP-list address must be 4 KiB aligned and within MAXPHYADDR",
        |c| {
            let on = c.proc2()? & ctl::proc2::ENABLE_VM_FUNCTIONS != 0 && c.rd(Field::VmFunctionControls)? & 1 != 0;
            page_addr(c, on, Field::EptpListAddress)
        }),
    check!("ctrl.vmread_bitmap.addr", "27.2.1.1", CTL,
        "with \"VMCS shadowing\", the VMREAD-bitmap address must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc2()? & ctl::proc2::VMCS_SHADOWING != 0, Field::VmreadBitmapAddress)),
    check!("ctrl.vmwrite_bitmap.addr", "27.2.1.1", CTL,
        "with \"VMCS shadowing\", the VMWRITE-bitmap address must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc2()? & ctl::proc2::VMCS_SHADOWING != 0, Field::VmwriteBitmapAddress)),
    check!("ctrl.ve_info.addr", "27.2.1.1", CTL,
        "with \"EPT-violation #VE\", the virtualization-exception information address must be 4 KiB aligned and within MAXPHYADDR",
        |c| page_addr(c, c.proc2()? & ctl::proc2::EPT_VIOLATION_VE != 0, Field::VirtualizationExceptionInformationAddress)),
    // ---- 27.2.1.2 VM-exit control fields ----
    check!("ctrl.exit.reserved", "27.2.1.2", CTL,
        "VM-exit controls must respect IA32_VMX_(TRUE_)EXIT_CTLS",
        |c| { let v = c.exit()?; fail_if(!ctls_ok(&c.caps.exit, v), Field::VmExitControls, v as u64) }),
    check!("ctrl.exit.save_timer_requires_timer", "27.2.1.2", CTL,
        "\"save VMX-preemption timer value\" (exit) requires \"activate VMX-preemption timer\" (pin-based)",
        |c| { let x = c.exit()?; fail_if(c.pin()? & ctl::pin::ACTIVATE_PREEMPTION_TIMER == 0 && x & ctl::exit::SAVE_PREEMPTION_TIMER != 0, Field::VmExitControls, x as u64) }),
    check!("ctrl.exit.msr_store.addr", "27.2.1.2", CTL,
        "with a non-zero VM-exit MSR-store count, the MSR-store address must be 16-byte aligned and the whole area within MAXPHYADDR",
        |c| msr_area(c, Field::VmExitMsrStoreCount, Field::VmExitMsrStoreAddress)),
    check!("ctrl.exit.msr_load.addr", "27.2.1.2", CTL,
        "with a non-zero VM-exit MSR-load count, the MSR-load address must be 16-byte aligned and the whole area within MAXPHYADDR",
        |c| msr_area(c, Field::VmExitMsrLoadCount, Field::VmExitMsrLoadAddress)),
    // ---- 27.2.1.3 VM-entry control fields ----
    check!("ctrl.entry.reserved", "27.2.1.3", CTL,
        "VM-entry controls must respect IA32_VMX_(TRUE_)ENTRY_CTLS",
        |c| { let v = c.entry()?; fail_if(!ctls_ok(&c.caps.entry, v), Field::VmEntryControls, v as u64) }),
    check!("ctrl.entry.event.type", "27.2.1.3", CTL,
        "injected event type (bits 10:8) must not be 1, nor 7 (other event) without monitor-trap-flag support",
        |c| {
            let e = c.event()?;
            let mtf = c.caps.procbased.may_be_1 & ctl::proc::MONITOR_TRAP_FLAG != 0;
            fail_if(e.valid() && (e.ty() == ity::RESERVED || (e.ty() == ity::OTHER_EVENT && !mtf)), Field::VmEntryInterruptionInformation, e.0 as u64)
        }),
    check!("ctrl.entry.event.nmi_vector", "27.2.1.3", CTL,
        "an injected NMI must have vector 2",
        |c| { let e = c.event()?; fail_if(e.valid() && e.ty() == ity::NMI && e.vector() != 2, Field::VmEntryInterruptionInformation, e.0 as u64) }),
    check!("ctrl.entry.event.exception_vector", "27.2.1.3", CTL,
        "an injected hardware exception must have a vector of at most 31",
        |c| { let e = c.event()?; fail_if(e.valid() && e.ty() == ity::HARDWARE_EXCEPTION && e.vector() > 31, Field::VmEntryInterruptionInformation, e.0 as u64) }),
    check!("ctrl.entry.event.other_vector", "27.2.1.3", CTL,
        "an injected \"other event\" must have vector 0 (pending MTF VM exit)",
        |c| { let e = c.event()?; fail_if(e.valid() && e.ty() == ity::OTHER_EVENT && e.vector() != 0, Field::VmEntryInterruptionInformation, e.0 as u64) }),
    check!("ctrl.entry.event.error_code", "27.2.1.3", CTL,
        "deliver-error-code (bit 11) must be 1 exactly for hardware exceptions 8, 10-14, 17 in protected mode (any hardware exception if IA32_VMX_BASIC[56]), else 0",
        event_error_code),
    check!("ctrl.entry.event.reserved", "27.2.1.3", CTL,
        "VM-entry interruption-information bits 30:12 must be 0",
        |c| { let e = c.event()?; fail_if(e.valid() && e.reserved_bits() != 0, Field::VmEntryInterruptionInformation, e.0 as u64) }),
    check!("ctrl.entry.event.error_code_reserved", "27.2.1.3", CTL,
        "with deliver-error-code, VM-entry exception error code bits 31:16 must be 0",
        |c| {
            let e = c.event()?;
            if !e.valid() || !e.deliver_error_code() { return ok(); }
            let v = c.rd(Field::VmEntryExceptionErrorCode)?;
            fail_if(v & 0xFFFF_0000 != 0, Field::VmEntryExceptionErrorCode, v)
        }),
    check!("ctrl.entry.event.instruction_length", "27.2.1.3", CTL,
        "for injected software interrupts/exceptions, VM-entry instruction length must be 1-15 (0-15 if IA32_VMX_MISC[30])",
        event_instruction_length),
    check!("ctrl.entry.msr_load.addr", "27.2.1.3", CTL,
        "with a non-zero VM-entry MSR-load count, the MSR-load address must be 16-byte aligned and the whole area within MAXPHYADDR",
        |c| msr_area(c, Field::VmEntryMsrLoadCount, Field::VmEntryMsrLoadAddress)),
    check!("ctrl.entry.smm", "27.2.1.3", CTL,
        "outside SMM, the \"entry to SMM\" VM-entry control must be 0",
        |c| { let v = c.entry()?; fail_if(v & ctl::entry::ENTRY_TO_SMM != 0, Field::VmEntryControls, v as u64) }),
    check!("ctrl.entry.dual_monitor", "27.2.1.3", CTL,
        "outside SMM, the \"deactivate dual-monitor treatment\" VM-entry control must be 0",
        |c| { let v = c.entry()?; fail_if(v & ctl::entry::DEACTIVATE_DUAL_MONITOR != 0, Field::VmEntryControls, v as u64) }),
    // ---- 27.2.2 Host control registers, MSRs ----
    check!("host.cr0.fixed", "27.2.2", HOST,
        "host CR0 must respect IA32_VMX_CR0_FIXED0 (bits that must be 1) and IA32_VMX_CR0_FIXED1 (bits that may be 1)",
        |c| { let v = c.rd(Field::HostCr0)?; fail_if(!fixed_ok(v, c.caps.cr0_fixed0, c.caps.cr0_fixed1, 0), Field::HostCr0, v) }),
    check!("host.cr4.fixed", "27.2.2", HOST,
        "host CR4 must respect IA32_VMX_CR4_FIXED0 and IA32_VMX_CR4_FIXED1 (CR4.VMXE=1)",
        |c| { let v = c.rd(Field::HostCr4)?; fail_if(!fixed_ok(v, c.caps.cr4_fixed0, c.caps.cr4_fixed1, 0), Field::HostCr4, v) }),
    check!("host.cr3.reserved", "27.2.2", HOST,
        "host CR3 bits 63:MAXPHYADDR must be 0 (bits 62:61 allowed with LAM)",
        |c| { let v = c.rd(Field::HostCr3)?; fail_if(c.cr3_reserved(v) != 0, Field::HostCr3, v) }),
    check!("host.sysenter_esp.canonical", "27.2.2", HOST,
        "host IA32_SYSENTER_ESP must be canonical",
        |c| canonical_field(c, true, Field::HostIa32SysenterEsp)),
    check!("host.sysenter_eip.canonical", "27.2.2", HOST,
        "host IA32_SYSENTER_EIP must be canonical",
        |c| canonical_field(c, true, Field::HostIa32SysenterEip)),
    check!("host.cet.ssp_table.canonical", "27.2.2", HOST,
        "with \"load CET state\" (exit), host IA32_INTERRUPT_SSP_TABLE_ADDR must be canonical",
        |c| canonical_field(c, c.exit()? & ctl::exit::LOAD_CET_STATE != 0, Field::HostIa32InterruptSspTableAddr)),
    check!("host.pat", "27.2.2", HOST,
        "with \"load IA32_PAT\" (exit), every byte of host IA32_PAT must be 0, 1, 4, 5, 6 or 7",
        |c| {
            if c.exit()? & ctl::exit::LOAD_IA32_PAT == 0 { return ok(); }
            let v = c.rd(Field::HostIa32Pat)?;
            fail_if(!pat_ok(v), Field::HostIa32Pat, v)
        }),
    check!("host.efer.reserved", "27.2.2", HOST,
        "with \"load IA32_EFER\" (exit), host IA32_EFER may set only SCE, LME, LMA, NXE",
        |c| { let Some(v) = host_efer(c)? else { return ok() }; fail_if(v & !EFER_DEFINED != 0, Field::HostIa32Efer, v) }),
    check!("host.efer.lma", "27.2.2", HOST,
        "with \"load IA32_EFER\" (exit), host IA32_EFER.LMA must equal \"host address-space size\"",
        |c| { let Some(v) = host_efer(c)? else { return ok() }; fail_if((v & EFER_LMA != 0) != c.host_64()?, Field::HostIa32Efer, v) }),
    check!("host.efer.lme", "27.2.2", HOST,
        "with \"load IA32_EFER\" (exit), host IA32_EFER.LME must equal \"host address-space size\"",
        |c| { let Some(v) = host_efer(c)? else { return ok() }; fail_if((v & EFER_LME != 0) != c.host_64()?, Field::HostIa32Efer, v) }),
    check!("host.pkrs.reserved", "27.2.2", HOST,
        "with \"load PKRS\" (exit), host IA32_PKRS bits 63:32 must be 0",
        |c| {
            if c.exit()? & ctl::exit::LOAD_PKRS == 0 { return ok(); }
            let v = c.rd(Field::HostIa32Pkrs)?;
            fail_if(v >> 32 != 0, Field::HostIa32Pkrs, v)
        }),
    // ---- 27.2.3 Host segment and descriptor-table registers ----
    check!("host.es.selector", "27.2.3", HOST, "host ES selector RPL and TI must be 0", |c| host_selector(c, Field::HostEsSelector)),
    check!("host.cs.selector", "27.2.3", HOST, "host CS selector RPL and TI must be 0", |c| host_selector(c, Field::HostCsSelector)),
    check!("host.ss.selector", "27.2.3", HOST, "host SS selector RPL and TI must be 0", |c| host_selector(c, Field::HostSsSelector)),
    check!("host.ds.selector", "27.2.3", HOST, "host DS selector RPL and TI must be 0", |c| host_selector(c, Field::HostDsSelector)),
    check!("host.fs.selector", "27.2.3", HOST, "host FS selector RPL and TI must be 0", |c| host_selector(c, Field::HostFsSelector)),
    check!("host.gs.selector", "27.2.3", HOST, "host GS selector RPL and TI must be 0", |c| host_selector(c, Field::HostGsSelector)),
    check!("host.tr.selector", "27.2.3", HOST, "host TR selector RPL and TI must be 0", |c| host_selector(c, Field::HostTrSelector)),
    check!("host.cs.null", "27.2.3", HOST, "host CS selector must not be 0000H",
        |c| { let s = c.rd(Field::HostCsSelector)?; fail_if(s == 0, Field::HostCsSelector, s) }),
    check!("host.tr.null", "27.2.3", HOST, "host TR selector must not be 0000H",
        |c| { let s = c.rd(Field::HostTrSelector)?; fail_if(s == 0, Field::HostTrSelector, s) }),
    check!("host.ss.null", "27.2.3", HOST, "host SS selector must not be 0000H when \"host address-space size\" is 0",
        |c| { let s = c.rd(Field::HostSsSelector)?; fail_if(s == 0 && !c.host_64()?, Field::HostSsSelector, s) }),
    check!("host.fs.base_canonical", "27.2.3", HOST, "host FS base must be canonical", |c| canonical_field(c, true, Field::HostFsBase)),
    check!("host.gs.base_canonical", "27.2.3", HOST, "host GS base must be canonical", |c| canonical_field(c, true, Field::HostGsBase)),
    check!("host.gdtr.base_canonical", "27.2.3", HOST, "host GDTR base must be canonical", |c| canonical_field(c, true, Field::HostGdtrBase)),
    check!("host.idtr.base_canonical", "27.2.3", HOST, "host IDTR base must be canonical", |c| canonical_field(c, true, Field::HostIdtrBase)),
    check!("host.tr.base_canonical", "27.2.3", HOST, "host TR base must be canonical", |c| canonical_field(c, true, Field::HostTrBase)),
    // ---- 27.2.4 Address-space size ----
    check!("host.address_space_size", "27.2.4", HOST,
        "VM entry from IA-32e mode requires the \"host address-space size\" VM-exit control",
        |c| { let x = c.exit()?; fail_if(x & ctl::exit::HOST_ADDRESS_SPACE_SIZE == 0, Field::VmExitControls, x as u64) }),
    check!("host.cr4.pae", "27.2.4", HOST,
        "with \"host address-space size\", host CR4.PAE must be 1",
        |c| { let v = c.rd(Field::HostCr4)?; fail_if(c.host_64()? && v & CR4_PAE == 0, Field::HostCr4, v) }),
    check!("host.rip.canonical", "27.2.4", HOST,
        "with \"host address-space size\", host RIP must be canonical",
        |c| canonical_field(c, c.host_64()?, Field::HostRip)),
    // ---- 27.3.1.1 Guest control registers, debug registers, MSRs ----
    check!("guest.cr0.fixed", "27.3.1.1", GUEST,
        "guest CR0 must respect IA32_VMX_CR0_FIXED0/FIXED1 (PE and PG exempt with \"unrestricted guest\"; NW, CD never checked)",
        guest_cr0_fixed),
    check!("guest.cr0.pg_requires_pe", "27.3.1.1", GUEST,
        "guest CR0.PG=1 requires CR0.PE=1",
        |c| { let v = c.cr0()?; fail_if(v & CR0_PG != 0 && v & CR0_PE == 0, Field::GuestCr0, v) }),
    check!("guest.cr4.fixed", "27.3.1.1", GUEST,
        "guest CR4 must respect IA32_VMX_CR4_FIXED0 and IA32_VMX_CR4_FIXED1 (CR4.VMXE=1)",
        |c| { let v = c.rd(Field::GuestCr4)?; fail_if(!fixed_ok(v, c.caps.cr4_fixed0, c.caps.cr4_fixed1, 0), Field::GuestCr4, v) }),
    check!("guest.cr4.cet_requires_wp", "27.3.1.1", GUEST,
        "guest CR4.CET=1 requires CR0.WP=1",
        |c| { let v = c.rd(Field::GuestCr4)?; fail_if(v & CR4_CET != 0 && c.cr0()? & CR0_WP == 0, Field::GuestCr4, v) }),
    check!("guest.debugctl.reserved", "27.3.1.1", GUEST,
        "with \"load debug controls\", guest IA32_DEBUGCTL reserved bits 63:16 must be 0",
        |c| {
            if c.entry()? & ctl::entry::LOAD_DEBUG_CONTROLS == 0 { return ok(); }
            let v = c.rd(Field::GuestIa32Debugctl)?;
            fail_if(v >> 16 != 0, Field::GuestIa32Debugctl, v)
        }),
    check!("guest.ia32e.cr0_pg", "27.3.1.1", GUEST,
        "the \"IA-32e mode guest\" VM-entry control requires guest CR0.PG=1",
        |c| { let v = c.cr0()?; fail_if(c.ia32e()? && v & CR0_PG == 0, Field::GuestCr0, v) }),
    check!("guest.ia32e.cr4_pae", "27.3.1.1", GUEST,
        "the \"IA-32e mode guest\" VM-entry control requires guest CR4.PAE=1",
        |c| { let v = c.rd(Field::GuestCr4)?; fail_if(c.ia32e()? && v & CR4_PAE == 0, Field::GuestCr4, v) }),
    check!("guest.cr4.pcide_requires_ia32e", "27.3.1.1", GUEST,
        "guest CR4.PCIDE=1 requires the \"IA-32e mode guest\" VM-entry control",
        |c| { let v = c.rd(Field::GuestCr4)?; fail_if(!c.ia32e()? && v & CR4_PCIDE != 0, Field::GuestCr4, v) }),
    check!("guest.cr3.reserved", "27.3.1.1", GUEST,
        "guest CR3 bits 63:MAXPHYADDR must be 0 (bits 62:61 allowed with LAM)",
        |c| { let v = c.rd(Field::GuestCr3)?; fail_if(c.cr3_reserved(v) != 0, Field::GuestCr3, v) }),
    check!("guest.dr7.high", "27.3.1.1", GUEST,
        "with \"load debug controls\", guest DR7 bits 63:32 must be 0",
        |c| {
            if c.entry()? & ctl::entry::LOAD_DEBUG_CONTROLS == 0 { return ok(); }
            let v = c.rd(Field::GuestDr7)?;
            fail_if(v >> 32 != 0, Field::GuestDr7, v)
        }),
    check!("guest.sysenter_esp.canonical", "27.3.1.1", GUEST,
        "guest IA32_SYSENTER_ESP must be canonical",
        |c| canonical_field(c, true, Field::GuestIa32SysenterEsp)),
    check!("guest.sysenter_eip.canonical", "27.3.1.1", GUEST,
        "guest IA32_SYSENTER_EIP must be canonical",
        |c| canonical_field(c, true, Field::GuestIa32SysenterEip)),
    check!("guest.cet.ssp_table.canonical", "27.3.1.1", GUEST,
        "with \"load CET state\" (entry), guest IA32_INTERRUPT_SSP_TABLE_ADDR must be canonical",
        |c| canonical_field(c, c.entry()? & ctl::entry::LOAD_CET_STATE != 0, Field::GuestIa32InterruptSspTableAddr)),
    check!("guest.pat", "27.3.1.1", GUEST,
        "with \"load IA32_PAT\" (entry), every byte of guest IA32_PAT must be 0, 1, 4, 5, 6 or 7",
        |c| {
            if c.entry()? & ctl::entry::LOAD_IA32_PAT == 0 { return ok(); }
            let v = c.rd(Field::GuestIa32Pat)?;
            fail_if(!pat_ok(v), Field::GuestIa32Pat, v)
        }),
    check!("guest.efer.reserved", "27.3.1.1", GUEST,
        "with \"load IA32_EFER\" (entry), guest IA32_EFER may set only SCE, LME, LMA, NXE",
        |c| { let Some(v) = guest_efer(c)? else { return ok() }; fail_if(v & !EFER_DEFINED != 0, Field::GuestIa32Efer, v) }),
    check!("guest.efer.lma", "27.3.1.1", GUEST,
        "with \"load IA32_EFER\" (entry), guest IA32_EFER.LMA must equal the \"IA-32e mode guest\" VM-entry control",
        |c| { let Some(v) = guest_efer(c)? else { return ok() }; fail_if((v & EFER_LMA != 0) != c.ia32e()?, Field::GuestIa32Efer, v) }),
    check!("guest.efer.lme", "27.3.1.1", GUEST,
        "with \"load IA32_EFER\" (entry) and guest CR0.PG=1, guest IA32_EFER.LME must equal IA32_EFER.LMA",
        |c| {
            let Some(v) = guest_efer(c)? else { return ok() };
            fail_if(c.cr0()? & CR0_PG != 0 && (v & EFER_LME != 0) != (v & EFER_LMA != 0), Field::GuestIa32Efer, v)
        }),
    check!("guest.bndcfgs.reserved", "27.3.1.1", GUEST,
        "with \"load IA32_BNDCFGS\" (entry), guest IA32_BNDCFGS bits 11:2 must be 0",
        |c| {
            if c.entry()? & ctl::entry::LOAD_IA32_BNDCFGS == 0 { return ok(); }
            let v = c.rd(Field::GuestIa32Bndcfgs)?;
            fail_if(v & 0xFFC != 0, Field::GuestIa32Bndcfgs, v)
        }),
    check!("guest.bndcfgs.canonical", "27.3.1.1", GUEST,
        "with \"load IA32_BNDCFGS\" (entry), the base in guest IA32_BNDCFGS bits 63:12 must be canonical",
        |c| {
            if c.entry()? & ctl::entry::LOAD_IA32_BNDCFGS == 0 { return ok(); }
            let v = c.rd(Field::GuestIa32Bndcfgs)?;
            fail_if(!c.canonical(v & !0xFFF), Field::GuestIa32Bndcfgs, v)
        }),
    check!("guest.pkrs.reserved", "27.3.1.1", GUEST,
        "with \"load PKRS\" (entry), guest IA32_PKRS bits 63:32 must be 0",
        |c| {
            if c.entry()? & ctl::entry::LOAD_PKRS == 0 { return ok(); }
            let v = c.rd(Field::GuestIa32Pkrs)?;
            fail_if(v >> 32 != 0, Field::GuestIa32Pkrs, v)
        }),
    // ---- 27.3.1.2 Guest segment registers: selectors ----
    check!("guest.tr.selector_ti", "27.3.1.2", GUEST, "guest TR selector TI (bit 2) must be 0",
        |c| { let s = c.rd(Field::GuestTrSelector)?; fail_if(s & 4 != 0, Field::GuestTrSelector, s) }),
    check!("guest.ldtr.selector_ti", "27.3.1.2", GUEST, "a usable guest LDTR selector must have TI (bit 2) = 0",
        |c| { let s = c.rd(Field::GuestLdtrSelector)?; fail_if(!c.ar(Seg::Ldtr)?.unusable() && s & 4 != 0, Field::GuestLdtrSelector, s) }),
    check!("guest.ss.rpl_eq_cs_rpl", "27.3.1.2", GUEST,
        "outside virtual-8086 mode and without \"unrestricted guest\", guest SS selector RPL must equal CS selector RPL",
        |c| {
            if c.v8086()? || c.unrestricted()? { return ok(); }
            let ss = c.sel(Seg::Ss)?;
            fail_if(ss.rpl() != c.sel(Seg::Cs)?.rpl(), Field::GuestSsSelector, ss.0 as u64)
        }),
    // bases
    check!("guest.v8086.base", "27.3.1.2", GUEST, "in virtual-8086 mode, each CS/SS/DS/ES/FS/GS base must be its selector << 4", v8086_base),
    check!("guest.tr.base_canonical", "27.3.1.2", GUEST, "guest TR base must be canonical", |c| base_canonical(c, Seg::Tr)),
    check!("guest.fs.base_canonical", "27.3.1.2", GUEST, "guest FS base must be canonical", |c| base_canonical(c, Seg::Fs)),
    check!("guest.gs.base_canonical", "27.3.1.2", GUEST, "guest GS base must be canonical", |c| base_canonical(c, Seg::Gs)),
    check!("guest.ldtr.base_canonical", "27.3.1.2", GUEST, "a usable guest LDTR base must be canonical", |c| base_canonical(c, Seg::Ldtr)),
    check!("guest.cs.base_high", "27.3.1.2", GUEST, "guest CS base bits 63:32 must be 0", |c| base_high(c, Seg::Cs)),
    check!("guest.ss.base_high", "27.3.1.2", GUEST, "a usable guest SS base must have bits 63:32 = 0", |c| base_high(c, Seg::Ss)),
    check!("guest.ds.base_high", "27.3.1.2", GUEST, "a usable guest DS base must have bits 63:32 = 0", |c| base_high(c, Seg::Ds)),
    check!("guest.es.base_high", "27.3.1.2", GUEST, "a usable guest ES base must have bits 63:32 = 0", |c| base_high(c, Seg::Es)),
    // limits
    check!("guest.v8086.limit", "27.3.1.2", GUEST, "in virtual-8086 mode, each CS/SS/DS/ES/FS/GS limit must be 0000FFFFH", v8086_limit),
    // access rights
    check!("guest.v8086.access_rights", "27.3.1.2", GUEST, "in virtual-8086 mode, each CS/SS/DS/ES/FS/GS access-rights field must be 000000F3H", v8086_ar),
    check!("guest.cs.type", "27.3.1.2", GUEST,
        "guest CS type must be 9, 11, 13 or 15 (accessed code), or 3 with \"unrestricted guest\"", cs_type),
    check!("guest.ss.type", "27.3.1.2", GUEST, "a usable guest SS must have type 3 or 7 (read/write accessed data)", ss_type),
    check!("guest.ds.type", "27.3.1.2", GUEST, "a usable guest DS type must be accessed, and readable if code", |c| data_type(c, Seg::Ds)),
    check!("guest.es.type", "27.3.1.2", GUEST, "a usable guest ES type must be accessed, and readable if code", |c| data_type(c, Seg::Es)),
    check!("guest.fs.type", "27.3.1.2", GUEST, "a usable guest FS type must be accessed, and readable if code", |c| data_type(c, Seg::Fs)),
    check!("guest.gs.type", "27.3.1.2", GUEST, "a usable guest GS type must be accessed, and readable if code", |c| data_type(c, Seg::Gs)),
    check!("guest.cs.s", "27.3.1.2", GUEST, "guest CS access rights S (bit 4) must be 1", |c| seg_s(c, Seg::Cs)),
    check!("guest.ss.s", "27.3.1.2", GUEST, "a usable guest SS must have S (bit 4) = 1", |c| seg_s(c, Seg::Ss)),
    check!("guest.ds.s", "27.3.1.2", GUEST, "a usable guest DS must have S (bit 4) = 1", |c| seg_s(c, Seg::Ds)),
    check!("guest.es.s", "27.3.1.2", GUEST, "a usable guest ES must have S (bit 4) = 1", |c| seg_s(c, Seg::Es)),
    check!("guest.fs.s", "27.3.1.2", GUEST, "a usable guest FS must have S (bit 4) = 1", |c| seg_s(c, Seg::Fs)),
    check!("guest.gs.s", "27.3.1.2", GUEST, "a usable guest GS must have S (bit 4) = 1", |c| seg_s(c, Seg::Gs)),
    check!("guest.cs.dpl", "27.3.1.2", GUEST,
        "guest CS DPL: 0 for type 3; equal to SS DPL for non-conforming code (9, 11); at most SS DPL for conforming code (13, 15)", cs_dpl),
    check!("guest.ss.dpl_eq_rpl", "27.3.1.2", GUEST,
        "without \"unrestricted guest\", guest SS DPL must equal the SS selector RPL", ss_dpl_eq_rpl),
    check!("guest.ss.dpl_zero", "27.3.1.2", GUEST,
        "guest SS DPL must be 0 when CS type is 3 or CR0.PE is 0", ss_dpl_zero),
    check!("guest.ds.dpl", "27.3.1.2", GUEST, "without \"unrestricted guest\", a usable data/non-conforming DS must have DPL >= selector RPL", |c| data_dpl(c, Seg::Ds)),
    check!("guest.es.dpl", "27.3.1.2", GUEST, "without \"unrestricted guest\", a usable data/non-conforming ES must have DPL >= selector RPL", |c| data_dpl(c, Seg::Es)),
    check!("guest.fs.dpl", "27.3.1.2", GUEST, "without \"unrestricted guest\", a usable data/non-conforming FS must have DPL >= selector RPL", |c| data_dpl(c, Seg::Fs)),
    check!("guest.gs.dpl", "27.3.1.2", GUEST, "without \"unrestricted guest\", a usable data/non-conforming GS must have DPL >= selector RPL", |c| data_dpl(c, Seg::Gs)),
    check!("guest.cs.p", "27.3.1.2", GUEST, "guest CS must be present (P=1)", |c| seg_p(c, Seg::Cs)),
    check!("guest.ss.p", "27.3.1.2", GUEST, "a usable guest SS must be present (P=1)", |c| seg_p(c, Seg::Ss)),
    check!("guest.ds.p", "27.3.1.2", GUEST, "a usable guest DS must be present (P=1)", |c| seg_p(c, Seg::Ds)),
    check!("guest.es.p", "27.3.1.2", GUEST, "a usable guest ES must be present (P=1)", |c| seg_p(c, Seg::Es)),
    check!("guest.fs.p", "27.3.1.2", GUEST, "a usable guest FS must be present (P=1)", |c| seg_p(c, Seg::Fs)),
    check!("guest.gs.p", "27.3.1.2", GUEST, "a usable guest GS must be present (P=1)", |c| seg_p(c, Seg::Gs)),
    check!("guest.cs.ar_reserved", "27.3.1.2", GUEST, "guest CS access-rights bits 11:8 and 31:17 must be 0", |c| seg_reserved(c, Seg::Cs)),
    check!("guest.ss.ar_reserved", "27.3.1.2", GUEST, "usable guest SS access-rights bits 11:8 and 31:17 must be 0", |c| seg_reserved(c, Seg::Ss)),
    check!("guest.ds.ar_reserved", "27.3.1.2", GUEST, "usable guest DS access-rights bits 11:8 and 31:17 must be 0", |c| seg_reserved(c, Seg::Ds)),
    check!("guest.es.ar_reserved", "27.3.1.2", GUEST, "usable guest ES access-rights bits 11:8 and 31:17 must be 0", |c| seg_reserved(c, Seg::Es)),
    check!("guest.fs.ar_reserved", "27.3.1.2", GUEST, "usable guest FS access-rights bits 11:8 and 31:17 must be 0", |c| seg_reserved(c, Seg::Fs)),
    check!("guest.gs.ar_reserved", "27.3.1.2", GUEST, "usable guest GS access-rights bits 11:8 and 31:17 must be 0", |c| seg_reserved(c, Seg::Gs)),
    check!("guest.cs.l_and_d", "27.3.1.2", GUEST,
        "for an IA-32e mode guest, guest CS with L=1 must have D/B=0",
        |c| { let ar = c.ar(Seg::Cs)?; fail_if(!c.v8086()? && c.ia32e()? && ar.l() && ar.db(), Seg::Cs.ar(), ar.0 as u64) }),
    check!("guest.cs.granularity", "27.3.1.2", GUEST, "guest CS G must be 0 if limit bits 11:0 are not all 1, and 1 if any limit bit 31:20 is 1", |c| seg_granularity(c, Seg::Cs)),
    check!("guest.ss.granularity", "27.3.1.2", GUEST, "usable guest SS G must be 0 if limit bits 11:0 are not all 1, and 1 if any limit bit 31:20 is 1", |c| seg_granularity(c, Seg::Ss)),
    check!("guest.ds.granularity", "27.3.1.2", GUEST, "usable guest DS G must be 0 if limit bits 11:0 are not all 1, and 1 if any limit bit 31:20 is 1", |c| seg_granularity(c, Seg::Ds)),
    check!("guest.es.granularity", "27.3.1.2", GUEST, "usable guest ES G must be 0 if limit bits 11:0 are not all 1, and 1 if any limit bit 31:20 is 1", |c| seg_granularity(c, Seg::Es)),
    check!("guest.fs.granularity", "27.3.1.2", GUEST, "usable guest FS G must be 0 if limit bits 11:0 are not all 1, and 1 if any limit bit 31:20 is 1", |c| seg_granularity(c, Seg::Fs)),
    check!("guest.gs.granularity", "27.3.1.2", GUEST, "usable guest GS G must be 0 if limit bits 11:0 are not all 1, and 1 if any limit bit 31:20 is 1", |c| seg_granularity(c, Seg::Gs)),
    check!("guest.tr.type", "27.3.1.2", GUEST,
        "guest TR type must be 11 (busy 64-bit TSS) for an IA-32e mode guest, else 3 or 11", |c| system_type(c, Seg::Tr)),
    check!("guest.tr.s", "27.3.1.2", GUEST, "guest TR S (bit 4) must be 0", |c| system_s(c, Seg::Tr)),
    check!("guest.tr.p", "27.3.1.2", GUEST, "guest TR must be present (P=1)", |c| system_p(c, Seg::Tr)),
    check!("guest.tr.ar_reserved", "27.3.1.2", GUEST, "guest TR access-rights bits 11:8 and 31:17 must be 0", |c| system_reserved(c, Seg::Tr)),
    check!("guest.tr.granularity", "27.3.1.2", GUEST, "guest TR G must be 0 if limit bits 11:0 are not all 1, and 1 if any limit bit 31:20 is 1", |c| system_granularity(c, Seg::Tr)),
    check!("guest.tr.unusable", "27.3.1.2", GUEST, "guest TR must be usable (access-rights bit 16 = 0)",
        |c| { let ar = c.ar(Seg::Tr)?; fail_if(ar.unusable(), Seg::Tr.ar(), ar.0 as u64) }),
    check!("guest.ldtr.type", "27.3.1.2", GUEST, "a usable guest LDTR must have type 2 (LDT)", |c| system_type(c, Seg::Ldtr)),
    check!("guest.ldtr.s", "27.3.1.2", GUEST, "a usable guest LDTR must have S (bit 4) = 0", |c| system_s(c, Seg::Ldtr)),
    check!("guest.ldtr.p", "27.3.1.2", GUEST, "a usable guest LDTR must be present (P=1)", |c| system_p(c, Seg::Ldtr)),
    check!("guest.ldtr.ar_reserved", "27.3.1.2", GUEST, "usable guest LDTR access-rights bits 11:8 and 31:17 must be 0", |c| system_reserved(c, Seg::Ldtr)),
    check!("guest.ldtr.granularity", "27.3.1.2", GUEST, "usable guest LDTR G must be 0 if limit bits 11:0 are not all 1, and 1 if any limit bit 31:20 is 1", |c| system_granularity(c, Seg::Ldtr)),
    // ---- 27.3.1.3 Descriptor-table registers ----
    check!("guest.gdtr.base_canonical", "27.3.1.3", GUEST, "guest GDTR base must be canonical", |c| canonical_field(c, true, Field::GuestGdtrBase)),
    check!("guest.idtr.base_canonical", "27.3.1.3", GUEST, "guest IDTR base must be canonical", |c| canonical_field(c, true, Field::GuestIdtrBase)),
    check!("guest.gdtr.limit", "27.3.1.3", GUEST, "guest GDTR limit bits 31:16 must be 0",
        |c| { let v = c.rd(Field::GuestGdtrLimit)?; fail_if(v >> 16 != 0, Field::GuestGdtrLimit, v) }),
    check!("guest.idtr.limit", "27.3.1.3", GUEST, "guest IDTR limit bits 31:16 must be 0",
        |c| { let v = c.rd(Field::GuestIdtrLimit)?; fail_if(v >> 16 != 0, Field::GuestIdtrLimit, v) }),
    // ---- 27.3.1.4 RIP and RFLAGS ----
    check!("guest.rip.high", "27.3.1.4", GUEST,
        "guest RIP bits 63:32 must be 0 unless \"IA-32e mode guest\" and CS.L are both 1",
        |c| {
            let v = c.rd(Field::GuestRip)?;
            let long = c.ia32e()? && c.ar(Seg::Cs)?.l();
            fail_if(!long && v >> 32 != 0, Field::GuestRip, v)
        }),
    check!("guest.rip.canonical", "27.3.1.4", GUEST,
        "in 64-bit mode (\"IA-32e mode guest\" and CS.L=1), guest RIP must be canonical",
        |c| {
            let v = c.rd(Field::GuestRip)?;
            let long = c.ia32e()? && c.ar(Seg::Cs)?.l();
            fail_if(long && !c.canonical(v), Field::GuestRip, v)
        }),
    check!("guest.rflags.reserved", "27.3.1.4", GUEST,
        "guest RFLAGS bits 63:22, 15, 5, 3 must be 0 and bit 1 must be 1",
        |c| {
            let v = c.rflags()?;
            let reserved = !0u64 << 22 | 1 << 15 | 1 << 5 | 1 << 3;
            fail_if(v & reserved != 0 || v & 2 == 0, Field::GuestRflags, v)
        }),
    check!("guest.rflags.vm", "27.3.1.4", GUEST,
        "guest RFLAGS.VM must be 0 for an IA-32e mode guest or when CR0.PE=0",
        |c| { let v = c.rflags()?; fail_if(v & RFLAGS_VM != 0 && (c.ia32e()? || !c.pe()?), Field::GuestRflags, v) }),
    check!("guest.rflags.if_for_ext_int", "27.3.1.4", GUEST,
        "injecting an external interrupt requires guest RFLAGS.IF=1",
        |c| {
            let e = c.event()?;
            let v = c.rflags()?;
            fail_if(e.valid() && e.ty() == ity::EXTERNAL_INTERRUPT && v & RFLAGS_IF == 0, Field::GuestRflags, v)
        }),
    // ---- 27.3.1.5 Non-register state ----
    check!("guest.activity.supported", "27.3.1.5", GUEST,
        "guest activity state must be 0 (active) or a state IA32_VMX_MISC bits 8:6 report (1 HLT, 2 shutdown, 3 wait-for-SIPI)",
        activity_supported),
    check!("guest.activity.hlt_ss_dpl", "27.3.1.5", GUEST,
        "the HLT activity state requires guest SS DPL = 0",
        |c| {
            let s = c.rd(Field::GuestActivityState)?;
            fail_if(s == activity::HLT && c.ar(Seg::Ss)?.dpl() != 0, Field::GuestActivityState, s)
        }),
    check!("guest.activity.blocking_requires_active", "27.3.1.5", GUEST,
        "blocking by STI or MOV SS requires the active activity state",
        |c| {
            let s = c.rd(Field::GuestActivityState)?;
            let i = c.rd(Field::GuestInterruptibilityState)?;
            fail_if(s != activity::ACTIVE && i & (intr::STI | intr::MOV_SS) != 0, Field::GuestActivityState, s)
        }),
    check!("guest.activity.event_injection", "27.3.1.5", GUEST,
        "the injected event must be deliverable in the activity state (HLT: ext. int, NMI, #DB, #MC, MTF; shutdown: NMI, #MC; wait-for-SIPI: none)",
        activity_event),
    check!("guest.interruptibility.reserved", "27.3.1.5", GUEST,
        "guest interruptibility-state bits 31:5 must be 0",
        |c| { let i = c.rd(Field::GuestInterruptibilityState)?; fail_if(i & !0x1F != 0, Field::GuestInterruptibilityState, i) }),
    check!("guest.interruptibility.sti_and_mov_ss", "27.3.1.5", GUEST,
        "guest interruptibility state cannot show blocking by both STI and MOV SS",
        |c| { let i = c.rd(Field::GuestInterruptibilityState)?; fail_if(i & 3 == 3, Field::GuestInterruptibilityState, i) }),
    check!("guest.interruptibility.sti_requires_if", "27.3.1.5", GUEST,
        "blocking by STI requires guest RFLAGS.IF=1",
        |c| { let i = c.rd(Field::GuestInterruptibilityState)?; fail_if(i & intr::STI != 0 && c.rflags()? & RFLAGS_IF == 0, Field::GuestInterruptibilityState, i) }),
    check!("guest.interruptibility.ext_int_blocking", "27.3.1.5", GUEST,
        "injecting an external interrupt requires no blocking by STI or MOV SS",
        |c| {
            let e = c.event()?;
            let i = c.rd(Field::GuestInterruptibilityState)?;
            fail_if(e.valid() && e.ty() == ity::EXTERNAL_INTERRUPT && i & (intr::STI | intr::MOV_SS) != 0, Field::GuestInterruptibilityState, i)
        }),
    check!("guest.interruptibility.nmi_mov_ss", "27.3.1.5", GUEST,
        "injecting an NMI requires no blocking by MOV SS",
        |c| {
            let e = c.event()?;
            let i = c.rd(Field::GuestInterruptibilityState)?;
            fail_if(e.valid() && e.ty() == ity::NMI && i & intr::MOV_SS != 0, Field::GuestInterruptibilityState, i)
        }),
    check!("guest.interruptibility.smi", "27.3.1.5", GUEST,
        "outside SMM, guest interruptibility bit 2 (blocking by SMI) must be 0",
        |c| { let i = c.rd(Field::GuestInterruptibilityState)?; fail_if(i & intr::SMI != 0, Field::GuestInterruptibilityState, i) }),
    check!("guest.interruptibility.virtual_nmi_blocking", "27.3.1.5", GUEST,
        "with \"virtual NMIs\", injecting an NMI requires no blocking by NMI",
        |c| {
            let e = c.event()?;
            let i = c.rd(Field::GuestInterruptibilityState)?;
            fail_if(c.pin()? & ctl::pin::VIRTUAL_NMIS != 0 && e.valid() && e.ty() == ity::NMI && i & intr::NMI != 0, Field::GuestInterruptibilityState, i)
        }),
    check!("guest.interruptibility.enclave_mov_ss", "27.3.1.5", GUEST,
        "enclave interruption (bit 4) requires no blocking by MOV SS",
        |c| { let i = c.rd(Field::GuestInterruptibilityState)?; fail_if(i & intr::ENCLAVE_INTERRUPTION != 0 && i & intr::MOV_SS != 0, Field::GuestInterruptibilityState, i) }),
    check!("guest.pending_dbg.reserved", "27.3.1.5", GUEST,
        "guest pending debug exceptions bits 11:4, 13, 15 and 63:17 must be 0",
        |c| {
            let p = c.rd(Field::GuestPendingDebugExceptions)?;
            fail_if(p & (0xFF0 | 1 << 13 | 1 << 15 | !0u64 << 17) != 0, Field::GuestPendingDebugExceptions, p)
        }),
    check!("guest.pending_dbg.bs_set", "27.3.1.5", GUEST,
        "with STI/MOV-SS blocking or HLT, RFLAGS.TF=1 and IA32_DEBUGCTL.BTF=0 require pending-debug BS (bit 14) = 1",
        |c| pending_dbg_bs(c, true)),
    check!("guest.pending_dbg.bs_clear", "27.3.1.5", GUEST,
        "with STI/MOV-SS blocking or HLT, RFLAGS.TF=0 or IA32_DEBUGCTL.BTF=1 require pending-debug BS (bit 14) = 0",
        |c| pending_dbg_bs(c, false)),
    check!("guest.pending_dbg.rtm", "27.3.1.5", GUEST,
        "pending-debug RTM (bit 16) requires bits 11:0 and 15:13 = 0 and no blocking by MOV SS",
        pending_dbg_rtm),
    check!("guest.link_pointer.addr", "27.3.1.5", Stage::GuestState { exit_qualification: 4 },
        "a VMCS link pointer other than FFFFFFFF_FFFFFFFFH must be 4 KiB aligned and within MAXPHYADDR",
        |c| {
            let v = c.rd(Field::VmcsLinkPointer)?;
            fail_if(v != u64::MAX && (v & 0xFFF != 0 || beyond_phys(v, c.phys_bits())), Field::VmcsLinkPointer, v)
        }),
    // ---- 27.3.1.6 PDPTEs ----
    check!("guest.pdpte.reserved", "27.3.1.6", Stage::GuestState { exit_qualification: 2 },
        "with EPT and PAE paging (CR0.PG, CR4.PAE, not IA-32e), present guest PDPTE fields must have bits 2:1, 8:5, 63:MAXPHYADDR = 0",
        pdpte),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_well_formed() {
        for (i, a) in CHECKS.iter().enumerate() {
            assert!(
                a.id.starts_with("ctrl.")
                    || a.id.starts_with("host.")
                    || a.id.starts_with("guest."),
                "{}",
                a.id
            );
            assert!(a.section.starts_with("27."), "{}", a.id);
            for b in CHECKS.iter().skip(i + 1) {
                assert_ne!(a.id, b.id);
            }
        }
    }
}
