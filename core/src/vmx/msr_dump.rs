//! A parser of capability-MSR dumps, the text format of `shared-tests/fixtures/vmx-msrs`:
//!
//! ```text
//! # comment (also after a value: `0x3a 0x5 # locked`)
//! 0x480 0x00d810000000002b        <msr> <value>      the read returned the value
//! 0x492 absent                    <msr> absent       the read raised #GP
//! cpuid 0x1 0x0 eax=0x000306d4 ebx=0x00010800 ecx=0x7ffaf3bf edx=0xbfebfbff
//! ```
//!
//! Numbers are hexadecimal with a `0x` prefix (MSR numbers up to 32 bits, values up to 64,
//! CPUID registers up to 32). An MSR the dump does not list is [`MsrValue::Unknown`], which is
//! not the same as `absent`. The four CPUID registers may come in any order, each exactly once.
//!
//! Duplicates are errors, even with equal values: a dump that lists one MSR (or one CPUID
//! leaf/subleaf) twice was stitched together from different sources, and no rule picks the
//! right line.
//!
//! No allocation: the result is a fixed-capacity [`MsrDump`] of [`MAX_MSRS`] MSRs and
//! [`MAX_CPUID`] CPUID entries (about 3.6 KiB; keep it off small kernel stacks). More lines are
//! a [`ParseErrorKind::TooManyMsrs`] / [`ParseErrorKind::TooManyCpuid`] error.

use core::fmt;

use super::caps::{CpuidRegs, MsrValue, VmxCaps};

/// Most MSR lines a dump may hold.
pub const MAX_MSRS: usize = 128;
/// Most CPUID lines a dump may hold.
pub const MAX_CPUID: usize = 64;

/// One CPUID line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    /// EAX input.
    pub leaf: u32,
    /// ECX input.
    pub subleaf: u32,
    /// Output registers.
    pub regs: CpuidRegs,
}

/// A parsed dump.
#[derive(Clone, Debug)]
pub struct MsrDump {
    msrs: [(u32, MsrValue); MAX_MSRS],
    n_msrs: usize,
    cpuid: [CpuidEntry; MAX_CPUID],
    n_cpuid: usize,
}

impl Default for MsrDump {
    fn default() -> MsrDump {
        MsrDump::new()
    }
}

/// What is wrong with a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// The first word is neither a `0x` MSR number nor `cpuid`.
    BadMsrNumber,
    /// An MSR line without a value.
    MissingValue,
    /// The value is neither a `0x` 64-bit number nor `absent`.
    BadValue,
    /// Words after the value.
    TrailingText,
    /// `cpuid` without a valid `0x` leaf or subleaf.
    BadCpuidInput,
    /// A CPUID register word that is not `eax=`, `ebx=`, `ecx=` or `edx=` with a `0x` 32-bit value.
    BadCpuidRegister,
    /// A CPUID register given twice on one line.
    DuplicateCpuidRegister,
    /// A CPUID line that lacks one of the four registers.
    MissingCpuidRegister,
    /// The MSR was already listed.
    DuplicateMsr {
        /// The MSR.
        msr: u32,
    },
    /// The CPUID leaf/subleaf was already listed.
    DuplicateCpuid {
        /// Leaf.
        leaf: u32,
        /// Subleaf.
        subleaf: u32,
    },
    /// More than [`MAX_MSRS`] MSR lines.
    TooManyMsrs,
    /// More than [`MAX_CPUID`] CPUID lines.
    TooManyCpuid,
}

/// A bad line, with its 1-based number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub kind: ParseErrorKind,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: ", self.line)?;
        match self.kind {
            ParseErrorKind::BadMsrNumber => {
                f.write_str("expected a 0x-prefixed 32-bit MSR number or 'cpuid'")
            }
            ParseErrorKind::MissingValue => {
                f.write_str("MSR without a value (expected 0x<64-bit hex> or 'absent')")
            }
            ParseErrorKind::BadValue => {
                f.write_str("bad MSR value (expected 0x<64-bit hex> or 'absent')")
            }
            ParseErrorKind::TrailingText => f.write_str("unexpected text after the value"),
            ParseErrorKind::BadCpuidInput => {
                f.write_str("cpuid needs a 0x-prefixed leaf and subleaf")
            }
            ParseErrorKind::BadCpuidRegister => {
                f.write_str("expected eax=/ebx=/ecx=/edx= with a 0x-prefixed 32-bit value")
            }
            ParseErrorKind::DuplicateCpuidRegister => {
                f.write_str("a CPUID register is given twice")
            }
            ParseErrorKind::MissingCpuidRegister => {
                f.write_str("a CPUID line needs eax, ebx, ecx and edx")
            }
            ParseErrorKind::DuplicateMsr { msr } => write!(f, "MSR {:#x} listed twice", msr),
            ParseErrorKind::DuplicateCpuid { leaf, subleaf } => {
                write!(
                    f,
                    "CPUID leaf {:#x} subleaf {:#x} listed twice",
                    leaf, subleaf
                )
            }
            ParseErrorKind::TooManyMsrs => write!(f, "more than {} MSR lines", MAX_MSRS),
            ParseErrorKind::TooManyCpuid => write!(f, "more than {} CPUID lines", MAX_CPUID),
        }
    }
}

/// Parses `0x` + 1..=digits hex digits. `from_str_radix` alone would accept a sign.
fn hex(word: &str) -> Option<u64> {
    let digits = word
        .strip_prefix("0x")
        .or_else(|| word.strip_prefix("0X"))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

fn hex32(word: &str) -> Option<u32> {
    hex(word).and_then(|v| u32::try_from(v).ok())
}

impl MsrDump {
    /// An empty dump.
    pub const fn new() -> MsrDump {
        MsrDump {
            msrs: [(0, MsrValue::Unknown); MAX_MSRS],
            n_msrs: 0,
            cpuid: [CpuidEntry {
                leaf: 0,
                subleaf: 0,
                regs: CpuidRegs {
                    eax: 0,
                    ebx: 0,
                    ecx: 0,
                    edx: 0,
                },
            }; MAX_CPUID],
            n_cpuid: 0,
        }
    }

    /// Parses a dump (see the module documentation for the format).
    pub fn parse(text: &str) -> Result<MsrDump, ParseError> {
        let mut dump = MsrDump::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |kind| ParseError { line, kind };
            let content = raw.split('#').next().unwrap_or("");
            let mut words = content.split_ascii_whitespace();
            let Some(first) = words.next() else { continue };
            if first == "cpuid" {
                let leaf = words
                    .next()
                    .and_then(hex32)
                    .ok_or(err(ParseErrorKind::BadCpuidInput))?;
                let subleaf = words
                    .next()
                    .and_then(hex32)
                    .ok_or(err(ParseErrorKind::BadCpuidInput))?;
                let mut regs: [Option<u32>; 4] = [None; 4];
                for w in words {
                    let (name, value) = w
                        .split_once('=')
                        .ok_or(err(ParseErrorKind::BadCpuidRegister))?;
                    let slot = match name {
                        "eax" => &mut regs[0],
                        "ebx" => &mut regs[1],
                        "ecx" => &mut regs[2],
                        "edx" => &mut regs[3],
                        _ => return Err(err(ParseErrorKind::BadCpuidRegister)),
                    };
                    if slot.is_some() {
                        return Err(err(ParseErrorKind::DuplicateCpuidRegister));
                    }
                    *slot = Some(hex32(value).ok_or(err(ParseErrorKind::BadCpuidRegister))?);
                }
                let [Some(eax), Some(ebx), Some(ecx), Some(edx)] = regs else {
                    return Err(err(ParseErrorKind::MissingCpuidRegister));
                };
                dump.insert_cpuid(CpuidEntry {
                    leaf,
                    subleaf,
                    regs: CpuidRegs { eax, ebx, ecx, edx },
                })
                .map_err(err)?;
            } else {
                let msr = hex32(first).ok_or(err(ParseErrorKind::BadMsrNumber))?;
                let word = words.next().ok_or(err(ParseErrorKind::MissingValue))?;
                let value = if word == "absent" {
                    MsrValue::Absent
                } else {
                    MsrValue::Value(hex(word).ok_or(err(ParseErrorKind::BadValue))?)
                };
                if words.next().is_some() {
                    return Err(err(ParseErrorKind::TrailingText));
                }
                dump.insert_msr(msr, value).map_err(err)?;
            }
        }
        Ok(dump)
    }

    /// Adds an MSR (`Value` or `Absent`; `Unknown` is what "not listed" means and is ignored).
    pub fn insert_msr(&mut self, msr: u32, value: MsrValue) -> Result<(), ParseErrorKind> {
        if value == MsrValue::Unknown {
            return Ok(());
        }
        if self.msr(msr) != MsrValue::Unknown {
            return Err(ParseErrorKind::DuplicateMsr { msr });
        }
        let slot = self
            .msrs
            .get_mut(self.n_msrs)
            .ok_or(ParseErrorKind::TooManyMsrs)?;
        *slot = (msr, value);
        self.n_msrs += 1;
        Ok(())
    }

    /// Adds a CPUID entry.
    pub fn insert_cpuid(&mut self, e: CpuidEntry) -> Result<(), ParseErrorKind> {
        if self.cpuid(e.leaf, e.subleaf).is_some() {
            return Err(ParseErrorKind::DuplicateCpuid {
                leaf: e.leaf,
                subleaf: e.subleaf,
            });
        }
        let slot = self
            .cpuid
            .get_mut(self.n_cpuid)
            .ok_or(ParseErrorKind::TooManyCpuid)?;
        *slot = e;
        self.n_cpuid += 1;
        Ok(())
    }

    /// The MSR as the dump records it: a value, absent (#GP), or unknown (not listed).
    pub fn msr(&self, msr: u32) -> MsrValue {
        self.msrs()
            .find(|&(m, _)| m == msr)
            .map_or(MsrValue::Unknown, |(_, v)| v)
    }

    /// The CPUID output for `leaf`/`subleaf`, if listed.
    pub fn cpuid(&self, leaf: u32, subleaf: u32) -> Option<CpuidRegs> {
        self.cpuid_entries()
            .find(|e| e.leaf == leaf && e.subleaf == subleaf)
            .map(|e| e.regs)
    }

    /// Every listed MSR, in file order.
    pub fn msrs(&self) -> impl Iterator<Item = (u32, MsrValue)> + '_ {
        self.msrs.iter().take(self.n_msrs).copied()
    }

    /// Every listed CPUID entry, in file order.
    pub fn cpuid_entries(&self) -> impl Iterator<Item = CpuidEntry> + '_ {
        self.cpuid.iter().take(self.n_cpuid).copied()
    }

    /// The capabilities the dump describes ([`VmxCaps::from_reader`] over the dump).
    pub fn caps(&self) -> VmxCaps {
        VmxCaps::from_reader(|m| self.msr(m), |l, s| self.cpuid(l, s))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    extern crate std;
    use super::*;

    fn kind(text: &str) -> (usize, ParseErrorKind) {
        match MsrDump::parse(text) {
            Ok(_) => (0, ParseErrorKind::TrailingText),
            Err(e) => (e.line, e.kind),
        }
    }

    #[test]
    fn three_states_and_comments() {
        let d = MsrDump::parse(
            "# head\n\n  0x480 0x00d810000000002b  # trailing comment\r\n0x492 absent\n\
             cpuid 0x1 0x0 edx=0x4 eax=0x1 ecx=0x3 ebx=0x2\n",
        )
        .unwrap();
        assert_eq!(d.msr(0x480), MsrValue::Value(0x00d8_1000_0000_002b));
        assert_eq!(d.msr(0x492), MsrValue::Absent);
        assert_eq!(d.msr(0x48c), MsrValue::Unknown);
        assert_eq!(
            d.cpuid(1, 0),
            Some(CpuidRegs {
                eax: 1,
                ebx: 2,
                ecx: 3,
                edx: 4
            })
        );
        assert_eq!(d.cpuid(1, 1), None);
        assert_eq!(d.msrs().count(), 2);
    }

    #[test]
    fn bad_lines_name_their_line() {
        assert_eq!(
            kind("0x480 0x1\ngarbage here\n"),
            (2, ParseErrorKind::BadMsrNumber)
        );
        assert_eq!(kind("480 0x1"), (1, ParseErrorKind::BadMsrNumber));
        assert_eq!(kind("0x100000000 0x1"), (1, ParseErrorKind::BadMsrNumber));
        assert_eq!(kind("0x480"), (1, ParseErrorKind::MissingValue));
        assert_eq!(kind("0x480 12"), (1, ParseErrorKind::BadValue));
        assert_eq!(kind("0x480 0x+1"), (1, ParseErrorKind::BadValue));
        assert_eq!(kind("0x480 0x"), (1, ParseErrorKind::BadValue));
        assert_eq!(
            kind("0x480 0x10000000000000000"),
            (1, ParseErrorKind::BadValue)
        );
        assert_eq!(kind("0x480 Absent"), (1, ParseErrorKind::BadValue));
        assert_eq!(kind("\n\n0x480 0x1 0x2"), (3, ParseErrorKind::TrailingText));
        assert_eq!(
            kind("cpuid 1 0 eax=0x0 ebx=0x0 ecx=0x0 edx=0x0"),
            (1, ParseErrorKind::BadCpuidInput)
        );
        assert_eq!(kind("cpuid 0x1"), (1, ParseErrorKind::BadCpuidInput));
        assert_eq!(
            kind("cpuid 0x1 0x0 eax=0x0 ebx=0x0 ecx=0x0"),
            (1, ParseErrorKind::MissingCpuidRegister)
        );
        assert_eq!(
            kind("cpuid 0x1 0x0 eax=0x0 ebx=0x0 ecx=0x0 esi=0x0"),
            (1, ParseErrorKind::BadCpuidRegister)
        );
        assert_eq!(
            kind("cpuid 0x1 0x0 eax=0x100000000 ebx=0x0 ecx=0x0 edx=0x0"),
            (1, ParseErrorKind::BadCpuidRegister)
        );
        assert_eq!(
            kind("cpuid 0x1 0x0 eax 0x0"),
            (1, ParseErrorKind::BadCpuidRegister)
        );
        assert_eq!(
            kind("cpuid 0x1 0x0 eax=0x0 eax=0x0 ecx=0x0 edx=0x0"),
            (1, ParseErrorKind::DuplicateCpuidRegister)
        );
    }

    #[test]
    fn duplicates_are_errors() {
        assert_eq!(
            kind("0x480 0x1\n0x480 0x1"),
            (2, ParseErrorKind::DuplicateMsr { msr: 0x480 })
        );
        assert_eq!(
            kind("0x480 absent\n0x480 0x1"),
            (2, ParseErrorKind::DuplicateMsr { msr: 0x480 })
        );
        let c = "cpuid 0x7 0x0 eax=0x0 ebx=0x0 ecx=0x0 edx=0x0\n";
        let mut two = std::string::String::from(c);
        two.push_str(c);
        assert_eq!(
            kind(&two),
            (
                2,
                ParseErrorKind::DuplicateCpuid {
                    leaf: 7,
                    subleaf: 0
                }
            )
        );
        // Same leaf, another subleaf: fine.
        two.truncate(c.len());
        two.push_str("cpuid 0x7 0x1 eax=0x0 ebx=0x0 ecx=0x0 edx=0x0\n");
        assert!(MsrDump::parse(&two).is_ok());
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        use std::fmt::Write;
        let mut t = std::string::String::new();
        for i in 0..MAX_MSRS {
            writeln!(t, "{:#x} 0x0", i).unwrap();
        }
        let full = MsrDump::parse(&t).unwrap();
        assert_eq!(full.msrs().count(), MAX_MSRS);
        writeln!(t, "{:#x} 0x0", MAX_MSRS).unwrap();
        assert_eq!(kind(&t), (MAX_MSRS + 1, ParseErrorKind::TooManyMsrs));

        let mut c = std::string::String::new();
        for i in 0..=MAX_CPUID {
            writeln!(c, "cpuid {:#x} 0x0 eax=0x0 ebx=0x0 ecx=0x0 edx=0x0", i).unwrap();
        }
        assert_eq!(kind(&c), (MAX_CPUID + 1, ParseErrorKind::TooManyCpuid));
    }

    #[test]
    fn error_message_names_the_line() {
        let e = MsrDump::parse("0x3a 0x5\n0x480 nonsense").unwrap_err();
        let s = std::format!("{}", e);
        assert!(s.starts_with("line 2: "), "{}", s);
    }
}
