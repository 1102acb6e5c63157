//! smudge.sys: build with lld-link (no WDK), test-sign with osslsigncode, and verify the result.
//!
//! Outputs in `target/windows/`: `smudge.sys` (signed), `smudge.pdb`, `smudge.inf`, `smudge.cer`
//! (the test certificate, PEM). The signing key stays outside the repository, under
//! `<cache>/windows-cert/` (`SMUDGE_CACHE`, default /var/cache/smudge).

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::deps::{cache_dir, debian_cargo, run};
use crate::{root, step};

const TARGET: &str = "x86_64-pc-windows-msvc";
/// The PKCS#12 password of the local test key. Not a secret: the key file next to it is plain PEM.
const PFX_PASSWORD: &str = "smudge-test";
/// Import libraries the driver may use (the .def files in windows-driver/).
const IMPORT_DEFS: &[&str] = &["ntoskrnl.def"];

/// Where everything lives.
struct Paths {
    driver_dir: PathBuf,
    target_dir: PathBuf,
    built: PathBuf,
    map: PathBuf,
    out: PathBuf,
}

impl Paths {
    fn new() -> Paths {
        let target_dir = root().join("target/windows-driver");
        Paths {
            driver_dir: root().join("windows-driver"),
            built: target_dir.join(TARGET).join("release/smudge.exe"),
            map: target_dir.join("smudge.map"),
            target_dir,
            out: root().join("target/windows"),
        }
    }
    fn sys(&self) -> PathBuf {
        self.out.join("smudge.sys")
    }
    fn cer(&self) -> PathBuf {
        self.out.join("smudge.cer")
    }
}

/// Builds, signs and verifies smudge.sys.
pub fn build_and_verify() -> Result<()> {
    let p = Paths::new();
    // Its OS-free half is core's (`abi::windows`), tested with the workspace.
    build_signed(&p)?;
    verify(&p)
}

fn ensure_tools() -> Result<()> {
    let needed = [
        "/usr/bin/cargo",
        "/usr/lib/rustlib/src/rust/library/core/Cargo.toml",
        "/usr/bin/lld-link-19",
        "/usr/bin/llvm-dlltool-19",
        "/usr/bin/osslsigncode",
        "/usr/bin/openssl",
    ];
    if needed.iter().any(|f| !Path::new(f).exists()) {
        crate::deps::ensure_all()?;
    }
    Ok(())
}

fn build_signed(p: &Paths) -> Result<()> {
    ensure_tools()?;
    step("windows driver: cargo build (Debian rustc, -Zbuild-std, lld-link-19)");
    run(debian_cargo()
        .current_dir(&p.driver_dir)
        .args(["build", "--release", "--bin", "smudge", "--target", TARGET])
        .args([
            "-Zbuild-std=core,compiler_builtins",
            "-Zbuild-std-features=compiler-builtins-mem",
        ])
        .env("CARGO_TARGET_DIR", &p.target_dir)
        .env("CARGO_TARGET_X86_64_PC_WINDOWS_MSVC_LINKER", "lld-link-19")
        .env("SMUDGE_WINDOWS_MAP", &p.map))?;

    std::fs::create_dir_all(&p.out)?;
    let cert = cert::ensure(&cache_dir().join("windows-cert"))?;
    step("windows driver: signing with osslsigncode (SHA-256, page hashes)");
    let sys = p.sys();
    let _ = std::fs::remove_file(&sys);
    run(Command::new("osslsigncode")
        .args(["sign", "-pkcs12"])
        .arg(&cert.pfx)
        .args([
            "-pass",
            PFX_PASSWORD,
            "-h",
            "sha256",
            "-ph",
            "-n",
            "smudge hypervisor (test-signed)",
            "-in",
        ])
        .arg(&p.built)
        .arg("-out")
        .arg(&sys)
        .stdout(std::process::Stdio::null()))?;
    // osslsigncode rewrites the PE checksum for the grown file; `verify` checks it.
    std::fs::copy(&cert.crt, p.cer())?;
    let pdb = p.built.with_extension("pdb");
    if pdb.exists() {
        std::fs::copy(&pdb, p.out.join("smudge.pdb"))?;
    }
    std::fs::write(p.out.join("smudge.inf"), inf_text())?;
    step(&format!(
        "windows driver: wrote {}/{{smudge.sys, smudge.pdb, smudge.inf, smudge.cer}}",
        p.out.display()
    ));
    Ok(())
}

/// A non-PnP install INF (for right-click "Install" or `pnputil`), used by nothing here: the
/// documented test load is `sc create` + `sc start`, which needs neither INF nor catalog.
fn inf_text() -> String {
    let version = env!("CARGO_PKG_VERSION");
    format!(
        "; smudge.inf: installs smudge.sys as a demand-start kernel service (test-signed, no catalog).\r
[Version]\r
Signature   = \"$WINDOWS NT$\"\r
Class       = System\r
ClassGuid   = {{4d36e97d-e325-11ce-bfc1-08002be10318}}\r
Provider    = %Provider%\r
DriverVer   = 11/25/2026,{version}.0\r
PnpLockdown = 1\r
\r
[DestinationDirs]\r
DefaultDestDir = 12\r
\r
[SourceDisksNames]\r
1 = %DiskName%\r
\r
[SourceDisksFiles]\r
smudge.sys = 1\r
\r
[DefaultInstall.NTamd64]\r
CopyFiles = Smudge.Files\r
\r
[DefaultInstall.NTamd64.Services]\r
AddService = smudge, , Smudge.Service\r
\r
[DefaultUninstall.NTamd64]\r
DelFiles = Smudge.Files\r
\r
[DefaultUninstall.NTamd64.Services]\r
DelService = smudge, 0x200\r
\r
[Smudge.Files]\r
smudge.sys\r
\r
[Smudge.Service]\r
DisplayName   = %ServiceName%\r
ServiceType   = 1 ; SERVICE_KERNEL_DRIVER\r
StartType     = 3 ; SERVICE_DEMAND_START\r
ErrorControl  = 1 ; SERVICE_ERROR_NORMAL\r
ServiceBinary = %12%\\smudge.sys\r
\r
[Strings]\r
Provider    = \"smudge\"\r
DiskName    = \"smudge\"\r
ServiceName = \"smudge hypervisor (test-signed)\"\r
"
    )
}

fn verify(p: &Paths) -> Result<()> {
    let mut allowed = BTreeSet::new();
    for def in IMPORT_DEFS {
        let text = std::fs::read_to_string(p.driver_dir.join(def))
            .with_context(|| format!("reading {def}"))?;
        let (library, names) = pe::parse_def(&text).with_context(|| format!("parsing {def}"))?;
        for n in names {
            allowed.insert((library.to_ascii_lowercase(), n));
        }
    }
    let map =
        std::fs::read_to_string(&p.map).with_context(|| format!("reading {}", p.map.display()))?;
    let entry = pe::map_symbol(&map, "DriverEntry")?;
    let copy = pe::map_symbol(&map, "smudge_copy_user")?;

    step("windows driver: verifying the unsigned image (lld-link output)");
    let unsigned = std::fs::read(&p.built)?;
    let props = pe::verify_image(&unsigned, &allowed, &entry).context("unsigned smudge.exe")?;
    report(&props);
    step("windows driver: verifying the signed image");
    let signed = std::fs::read(p.sys())?;
    let mut props = pe::verify_image(&signed, &allowed, &entry).context("signed smudge.sys")?;
    props.push(pe::check_seh(&signed, &copy)?);
    props.push(pe::verify_signed_layout(&signed, &unsigned)?);
    report(&props);

    let sys = p.sys();
    let cer = p.cer();
    let ok = osslsigncode_verify(&sys, &cer)?;
    ensure!(
        ok.0,
        "osslsigncode verify failed on {}:\n{}",
        sys.display(),
        ok.1
    );
    ensure!(
        ok.1.contains("Calculated page hash"),
        "the signature carries no page hashes (-ph):\n{}",
        ok.1
    );
    report(&[
        "Authenticode signature (SHA-256, with page hashes) verifies against smudge.cer".into(),
    ]);

    let tampered = p.target_dir.join("smudge.tampered.sys");
    let mut bytes = signed.clone();
    let at = pe::text_byte_offset(&bytes)?;
    bytes[at] ^= 0x01;
    // Keep the PE checksum valid, so the content is the only thing wrong with the copy.
    let field = pe::checksum_offset(&bytes)?;
    let sum = pe::checksum(&bytes, field);
    bytes[field..field + 4].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&tampered, &bytes)?;
    let bad = osslsigncode_verify(&tampered, &cer)?;
    ensure!(
        !bad.0,
        "osslsigncode verify ACCEPTED a copy with .text byte {at:#x} flipped:\n{}",
        bad.1
    );
    ensure!(
        bad.1.contains("MISMATCH"),
        "the tampered copy failed, but not on its digest:\n{}",
        bad.1
    );
    report(&[format!(
        "a copy with one .text byte flipped (file offset {at:#x}, checksum fixed up) fails: digest MISMATCH"
    )]);
    let mut bytes = signed.clone();
    let flags = pe::unwind_info_offset(&bytes, &copy)?;
    bytes[flags] &= 0x07;
    let why = pe::check_seh(&bytes, &copy)
        .err()
        .context("the exception check ACCEPTED a copy whose user copy has no exception handler")?;
    report(&[format!(
        "a copy with UNW_FLAG_EHANDLER cleared fails: {why}"
    )]);
    step("windows driver: all checks passed");
    Ok(())
}

fn report(props: &[String]) {
    for p in props {
        eprintln!("    ok  {p}");
    }
}

/// Runs `osslsigncode verify`; returns (succeeded, output).
fn osslsigncode_verify(file: &Path, ca: &Path) -> Result<(bool, String)> {
    let out = Command::new("osslsigncode")
        .args(["verify", "-CAfile"])
        .arg(ca)
        .arg("-in")
        .arg(file)
        .output()
        .context("cannot run osslsigncode")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        out.status.success() && text.contains("Signature verification: ok"),
        text,
    ))
}

/// The local test-signing certificate (never committed; regenerated when missing or expiring).
mod cert {
    use super::*;

    pub struct TestCert {
        pub crt: PathBuf,
        pub pfx: PathBuf,
    }

    pub fn ensure(dir: &Path) -> Result<TestCert> {
        let key = dir.join("smudge-test.key");
        let crt = dir.join("smudge-test.crt");
        let pfx = dir.join("smudge-test.pfx");
        let fresh = [&key, &crt, &pfx].iter().all(|f| f.exists())
            && Command::new("openssl")
                .args(["x509", "-noout", "-checkend", "2592000", "-in"])
                .arg(&crt)
                .stdout(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
        if fresh {
            step(&format!(
                "windows driver: reusing the test certificate in {}",
                dir.display()
            ));
            return Ok(TestCert { crt, pfx });
        }
        step(&format!(
            "windows driver: creating a self-signed code-signing certificate in {}",
            dir.display()
        ));
        std::fs::create_dir_all(dir)?;
        set_mode(dir, 0o700)?;
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:3072", "-sha256", "-days", "3650", "-nodes",
                "-keyout",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .args(["-subj", "/CN=smudge local test signing (untrusted)"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "keyUsage=critical,digitalSignature"])
            .args(["-addext", "extendedKeyUsage=codeSigning"])
            .stderr(std::process::Stdio::null()))?;
        set_mode(&key, 0o600)?;
        run(Command::new("openssl")
            .args(["pkcs12", "-export", "-inkey"])
            .arg(&key)
            .arg("-in")
            .arg(&crt)
            .arg("-out")
            .arg(&pfx)
            .args(["-passout", &format!("pass:{PFX_PASSWORD}")]))?;
        set_mode(&pfx, 0o600)?;
        Ok(TestCert { crt, pfx })
    }

    fn set_mode(path: &Path, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {mode:o} {}", path.display()))
    }
}

/// PE checks for a Windows kernel driver, on the bytes of the image.
mod pe {
    use super::*;
    use object::pe as ipe;
    use object::read::pe::{ImageNtHeaders, ImageOptionalHeader, PeFile64};
    use object::{LittleEndian as LE, Object};

    /// Offset of the 4-byte CheckSum field: e_lfanew + 4 (signature) + 20 (file header) + 64.
    pub fn checksum_offset(data: &[u8]) -> Result<usize> {
        let lfanew = data
            .get(0x3c..0x40)
            .context("file shorter than a DOS header")?;
        let lfanew = u32::from_le_bytes(lfanew.try_into()?) as usize;
        let off = lfanew + 4 + 20 + 64;
        ensure!(
            off + 4 <= data.len(),
            "CheckSum field beyond the end of the file"
        );
        Ok(off)
    }

    /// The PE image checksum (PE/COFF spec, "Optional Header Windows-Specific Fields": the
    /// algorithm of imagehlp's CheckSumMappedFile): the file summed as little-endian 16-bit words
    /// with end-around carry, the CheckSum field itself counted as zero, then the file length added.
    pub fn checksum(data: &[u8], field: usize) -> u32 {
        let mut sum: u32 = 0;
        for (i, pair) in data.chunks(2).enumerate() {
            let off = i * 2;
            if off >= field && off < field + 4 {
                continue;
            }
            let word = u32::from(pair[0]) | u32::from(*pair.get(1).unwrap_or(&0)) << 8;
            sum += word;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum.wrapping_add(data.len() as u32)
    }

    /// `LIBRARY x` / `EXPORTS` / one name per line (`;` comments) -> (library, names).
    pub fn parse_def(text: &str) -> Result<(String, BTreeSet<String>)> {
        let mut library = None;
        let mut names = BTreeSet::new();
        let mut in_exports = false;
        for line in text.lines() {
            let line = line.split(';').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if let Some(lib) = line.strip_prefix("LIBRARY") {
                library = Some(lib.trim().to_string());
            } else if line == "EXPORTS" {
                in_exports = true;
            } else if in_exports {
                ensure!(
                    !line.contains(char::is_whitespace),
                    "unsupported .def line {line:?}"
                );
                ensure!(names.insert(line.to_string()), "{line} listed twice");
            } else {
                bail!("unexpected .def line {line:?}");
            }
        }
        Ok((library.context("no LIBRARY line")?, names))
    }

    /// A symbol's address from an lld-link `/MAP` file, with the map's timestamp.
    #[derive(Debug, PartialEq, Eq)]
    pub struct MapSymbol {
        pub rva: u32,
        pub timestamp: u32,
    }

    pub fn map_symbol(map: &str, name: &str) -> Result<MapSymbol> {
        let mut base = None;
        let mut timestamp = None;
        let mut va = Vec::new();
        for line in map.lines() {
            let t: Vec<&str> = line.split_whitespace().collect();
            if let Some(v) = line.trim().strip_prefix("Preferred load address is ") {
                base = Some(u64::from_str_radix(v.trim(), 16)?);
            } else if let Some(v) = line.trim().strip_prefix("Timestamp is ") {
                let hex = v.split_whitespace().next().unwrap_or("");
                timestamp = Some(u32::from_str_radix(hex, 16)?);
            } else if t.len() >= 3 && t[1] == name {
                va.push(u64::from_str_radix(t[2], 16)?);
            }
        }
        let base = base.context("map file has no 'Preferred load address'")?;
        ensure!(
            va.len() == 1,
            "map file lists {name} {} times, expected once",
            va.len()
        );
        let rva = va[0]
            .checked_sub(base)
            .context("symbol below the image base")?;
        Ok(MapSymbol {
            rva: u32::try_from(rva)?,
            timestamp: timestamp.context("map file has no timestamp")?,
        })
    }

    type Pe<'a> = PeFile64<'a>;

    /// Machine, PE32+ and an executable (not DLL) image.
    pub fn check_format(pe: &Pe) -> Result<String> {
        let fh = pe.nt_headers().file_header();
        ensure!(
            fh.machine.get(LE) == ipe::IMAGE_FILE_MACHINE_AMD64,
            "machine is not AMD64"
        );
        let c = fh.characteristics.get(LE);
        ensure!(
            c & ipe::IMAGE_FILE_EXECUTABLE_IMAGE != 0,
            "not marked executable"
        );
        ensure!(c & ipe::IMAGE_FILE_DLL == 0, "marked as a DLL");
        // PeFile64::parse already insisted on the PE32+ optional-header magic (0x20b).
        ensure!(
            pe.nt_headers().optional_header().magic() == ipe::IMAGE_NT_OPTIONAL_HDR64_MAGIC,
            "not PE32+"
        );
        Ok("PE32+ (magic 0x20b), machine AMD64, executable image, not a DLL".into())
    }

    pub fn check_subsystem(pe: &Pe) -> Result<String> {
        let oh = pe.nt_headers().optional_header();
        let s = oh.subsystem();
        ensure!(
            s == ipe::IMAGE_SUBSYSTEM_NATIVE,
            "subsystem is {s}, expected 1 (NATIVE)"
        );
        Ok(format!(
            "subsystem NATIVE (1), version {}.{}",
            oh.major_subsystem_version(),
            oh.minor_subsystem_version()
        ))
    }

    pub fn check_entry(pe: &Pe, entry: &MapSymbol) -> Result<String> {
        let fh = pe.nt_headers().file_header();
        ensure!(
            fh.time_date_stamp.get(LE) == entry.timestamp,
            "the map file belongs to another link (timestamp {:#x}, image {:#x})",
            entry.timestamp,
            fh.time_date_stamp.get(LE)
        );
        let e = pe.nt_headers().optional_header().address_of_entry_point();
        ensure!(
            e == entry.rva,
            "entry point RVA {e:#x} is not DriverEntry ({:#x} in the map file)",
            entry.rva
        );
        Ok(format!(
            "entry point = DriverEntry (RVA {e:#x}, from the linker map)"
        ))
    }

    pub fn check_checksum(data: &[u8]) -> Result<String> {
        let field = checksum_offset(data)?;
        let stored = u32::from_le_bytes(data[field..field + 4].try_into()?);
        let computed = checksum(data, field);
        ensure!(stored != 0, "PE checksum is 0 (link with /RELEASE)");
        ensure!(
            stored == computed,
            "PE checksum {stored:#x} in the header, {computed:#x} computed"
        );
        Ok(format!("PE checksum {stored:#x} matches the computed one"))
    }

    pub fn check_dll_characteristics(pe: &Pe) -> Result<String> {
        let d = pe.nt_headers().optional_header().dll_characteristics();
        ensure!(
            d & ipe::IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE != 0,
            "DYNAMIC_BASE not set"
        );
        ensure!(
            d & ipe::IMAGE_DLLCHARACTERISTICS_NX_COMPAT != 0,
            "NX_COMPAT not set"
        );
        Ok(format!(
            "DllCharacteristics {d:#06x}: DYNAMIC_BASE, NX_COMPAT"
        ))
    }

    /// A `.reloc` section whose DIR64 entries each hold an address inside the image.
    pub fn check_relocations(pe: &Pe, data: &[u8]) -> Result<String> {
        let sections = pe.section_table();
        ensure!(
            sections.iter().any(|s| &s.name == b".reloc\0\0"),
            "no .reloc section"
        );
        let oh = pe.nt_headers().optional_header();
        let (base, size) = (oh.image_base(), u64::from(oh.size_of_image()));
        let mut blocks = pe
            .data_directories()
            .relocation_blocks(data, &sections)?
            .context("no base relocation directory")?;
        let mut dir64 = 0;
        while let Some(block) = blocks.next()? {
            for r in block {
                match r.typ {
                    ipe::IMAGE_REL_BASED_ABSOLUTE => {} // padding
                    ipe::IMAGE_REL_BASED_DIR64 => {
                        let bytes = sections
                            .pe_data_at(data, r.virtual_address)
                            .and_then(|d| d.get(..8))
                            .with_context(|| {
                                format!(
                                    "relocation at RVA {:#x} outside the file",
                                    r.virtual_address
                                )
                            })?;
                        let target = u64::from_le_bytes(bytes.try_into()?);
                        ensure!(
                            (base..base + size).contains(&target),
                            "relocated pointer at RVA {:#x} = {target:#x} is outside the image",
                            r.virtual_address
                        );
                        dir64 += 1;
                    }
                    t => bail!(
                        "unexpected base relocation type {t} at RVA {:#x}",
                        r.virtual_address
                    ),
                }
            }
        }
        ensure!(dir64 > 0, "the base relocation directory is empty");
        Ok(format!(
            ".reloc present: {dir64} DIR64 relocation(s), each pointing inside the image"
        ))
    }

    pub fn check_wx(pe: &Pe) -> Result<String> {
        let mut names = Vec::new();
        for s in pe.section_table().iter() {
            let c = s.characteristics.get(LE);
            let name = String::from_utf8_lossy(&s.name)
                .trim_end_matches('\0')
                .to_string();
            ensure!(
                !(c & ipe::IMAGE_SCN_MEM_WRITE != 0 && c & ipe::IMAGE_SCN_MEM_EXECUTE != 0),
                "section {name} is both writable and executable"
            );
            names.push(name);
        }
        Ok(format!(
            "no section is both writable and executable ({})",
            names.join(" ")
        ))
    }

    /// Imports exactly the (library, name) pairs of the .def files, case-insensitive library names.
    pub fn check_imports(pe: &Pe, allowed: &BTreeSet<(String, String)>) -> Result<String> {
        let mut seen = BTreeSet::new();
        for i in pe.imports()? {
            let lib = String::from_utf8_lossy(i.library()).to_ascii_lowercase();
            let name = String::from_utf8_lossy(i.name()).to_string();
            ensure!(
                allowed.contains(&(lib.clone(), name.clone())),
                "imports {lib}!{name}, which no .def file lists"
            );
            seen.insert((lib, name));
        }
        let unused: Vec<_> = allowed
            .difference(&seen)
            .map(|(l, n)| format!("{l}!{n}"))
            .collect();
        ensure!(
            unused.is_empty(),
            "listed in a .def file but not imported: {}",
            unused.join(", ")
        );
        let libs: BTreeSet<_> = seen.iter().map(|(l, _)| l.as_str()).collect();
        ensure!(pe.exports()?.is_empty(), "the image exports symbols");
        Ok(format!(
            "imports exactly the {} names of the .def files, from {} only; no exports",
            seen.len(),
            libs.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }

    /// The user copy's exception data (`usermem.rs`), which turns a fault on a user address into
    /// STATUS_ACCESS_VIOLATION instead of a bug check: a .pdata entry (RUNTIME_FUNCTION) that
    /// starts at `smudge_copy_user`; its UNWIND_INFO of version 1 with UNW_FLAG_EHANDLER, no
    /// prologue, unwind codes or frame register; as handler `__C_specific_handler`, a jump
    /// through the IAT slot that the import table names ntoskrnl.exe!__C_specific_handler; and
    /// its scope table: one scope [begin, end) inside the routine, filter 1
    /// (EXCEPTION_EXECUTE_HANDLER), target inside the routine and outside the scope.
    pub fn check_seh(data: &[u8], copy: &MapSymbol) -> Result<String> {
        let pe = Pe::parse(data).context("not a PE32+ image")?;
        let sections = pe.section_table();
        let at = |rva: u32, len: usize| -> Result<&[u8]> {
            sections
                .pe_data_at(data, rva)
                .and_then(|d| d.get(..len))
                .with_context(|| format!("RVA {rva:#x} (+{len}) is outside the file"))
        };
        let u32_at = |rva: u32| -> Result<u32> { Ok(u32::from_le_bytes(at(rva, 4)?.try_into()?)) };
        let (begin, end, unwind) =
            runtime_function(&pe, data, copy.rva).context("smudge_copy_user")?;
        let info = at(unwind, 4)?;
        let (version, flags) = (info[0] & 7, info[0] >> 3);
        ensure!(version == 1, "UNWIND_INFO version {version}, expected 1");
        ensure!(
            flags == 1,
            "UNWIND_INFO flags {flags:#x}, expected UNW_FLAG_EHANDLER (1) alone"
        );
        ensure!(
            info[1..] == [0, 0, 0],
            "the routine has a prologue, unwind codes or a frame register: {:02x?}",
            &info[1..]
        );
        let handler = u32_at(unwind + 4)?;
        let jmp = at(handler, 6)?;
        ensure!(
            jmp[..2] == [0xff, 0x25],
            "the handler at RVA {handler:#x} is not a jump through an IAT slot"
        );
        let slot = handler
            .wrapping_add(6)
            .wrapping_add(u32::from_le_bytes(jmp[2..6].try_into()?));
        let table = pe.import_table()?.context("no import table")?;
        let mut named = None;
        let mut descriptors = table.descriptors()?;
        while let Some(d) = descriptors.next()? {
            let mut thunks = table.thunks(d.original_first_thunk.get(LE))?;
            let mut i = 0;
            while let Some(t) = thunks.next::<object::pe::ImageNtHeaders64>()? {
                if d.first_thunk.get(LE) + 8 * i == slot {
                    let lib = table.name(d.name.get(LE))?;
                    if let object::read::pe::Import::Name(_, name) =
                        table.import::<object::pe::ImageNtHeaders64>(t)?
                    {
                        named = Some(format!(
                            "{}!{}",
                            String::from_utf8_lossy(lib),
                            String::from_utf8_lossy(name)
                        ));
                    }
                }
                i += 1;
            }
        }
        ensure!(
            named.as_deref() == Some("ntoskrnl.exe!__C_specific_handler"),
            "the handler jumps through IAT slot {slot:#x}, which imports {}",
            named.as_deref().unwrap_or("nothing by name")
        );
        ensure!(
            u32_at(unwind + 8)? == 1,
            "the scope table holds {} scopes, expected 1",
            u32_at(unwind + 8)?
        );
        let scope = unwind + 12;
        let (s_begin, s_end, filter, target) = (
            u32_at(scope)?,
            u32_at(scope + 4)?,
            u32_at(scope + 8)?,
            u32_at(scope + 12)?,
        );
        ensure!(
            begin <= s_begin && s_begin < s_end && s_end <= end,
            "the scope [{s_begin:#x}, {s_end:#x}) is not inside the routine [{begin:#x}, {end:#x})"
        );
        ensure!(
            filter == 1,
            "scope filter {filter:#x}, expected 1 (EXCEPTION_EXECUTE_HANDLER)"
        );
        // The user accesses themselves: `mov al, [rdx]` (8A 02) and `mov [rcx], al` (88 01).
        let guarded = at(s_begin, (s_end - s_begin) as usize)?;
        for (what, bytes) in [("load", [0x8a, 0x02]), ("store", [0x88, 0x01])] {
            ensure!(
                guarded.windows(2).any(|w| w == bytes),
                "the copy's {what} ({bytes:02x?}) is not inside the scope"
            );
        }
        ensure!(
            (begin..end).contains(&target) && !(s_begin..s_end).contains(&target),
            "the scope's target {target:#x} is not a recovery point of the routine"
        );
        Ok(format!(
            "smudge_copy_user's faults are caught: its load and store in scope [{s_begin:#x}, {s_end:#x}) of \
             [{begin:#x}, {end:#x}), filter EXECUTE_HANDLER, target {target:#x}, handler \
             ntoskrnl.exe!__C_specific_handler"
        ))
    }

    /// The .pdata entry (RUNTIME_FUNCTION: begin, end, UNWIND_INFO, all RVAs) of the routine
    /// that starts at RVA `rva`.
    fn runtime_function(pe: &Pe, data: &[u8], rva: u32) -> Result<(u32, u32, u32)> {
        let dir = pe
            .data_directory(ipe::IMAGE_DIRECTORY_ENTRY_EXCEPTION)
            .context("no exception directory (.pdata)")?;
        let pdata = pe
            .section_table()
            .pe_data_at(data, dir.virtual_address.get(LE))
            .context("the .pdata is outside the file")?;
        let words: Vec<u32> = pdata
            .chunks_exact(4)
            .take(dir.size.get(LE) as usize / 4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        words
            .chunks_exact(3)
            .find(|e| e[0] == rva)
            .map(|e| (e[0], e[1], e[2]))
            .with_context(|| format!("no .pdata entry starts at RVA {rva:#x}"))
    }

    /// The file offset of the UNWIND_INFO of the routine that starts at `f`.
    pub fn unwind_info_offset(data: &[u8], f: &MapSymbol) -> Result<usize> {
        let pe = Pe::parse(data).context("not a PE32+ image")?;
        let (_, _, unwind) = runtime_function(&pe, data, f.rva)?;
        let (offset, _) = pe
            .section_table()
            .pe_file_range_at(unwind)
            .context("the UNWIND_INFO is outside the file")?;
        Ok(offset as usize)
    }

    /// Every property above, in order; the first failure is the error.
    pub fn verify_image(
        data: &[u8],
        allowed: &BTreeSet<(String, String)>,
        entry: &MapSymbol,
    ) -> Result<Vec<String>> {
        let pe = Pe::parse(data).context("not a PE32+ image")?;
        Ok(vec![
            check_format(&pe)?,
            check_subsystem(&pe)?,
            check_entry(&pe, entry)?,
            check_checksum(data)?,
            check_dll_characteristics(&pe)?,
            check_relocations(&pe, data)?,
            check_wx(&pe)?,
            check_imports(&pe, allowed)?,
        ])
    }

    /// The signed file is the unsigned one plus a certificate table at its end (WIN_CERTIFICATE,
    /// revision 2.0, type PKCS#7 signed data).
    pub fn verify_signed_layout(signed: &[u8], unsigned: &[u8]) -> Result<String> {
        let pe = Pe::parse(signed)?;
        let dir = pe
            .data_directories()
            .get(ipe::IMAGE_DIRECTORY_ENTRY_SECURITY)
            .context("no security directory")?;
        // For this directory the "address" is a file offset.
        let (off, len) = (
            dir.virtual_address.get(LE) as usize,
            dir.size.get(LE) as usize,
        );
        ensure!(
            len > 8 && off + len == signed.len(),
            "certificate table is not at the end of the file"
        );
        let cert = &signed[off..off + len];
        let revision = u16::from_le_bytes([cert[4], cert[5]]);
        let typ = u16::from_le_bytes([cert[6], cert[7]]);
        ensure!(
            revision == 0x0200 && typ == 0x0002,
            "WIN_CERTIFICATE revision {revision:#x} type {typ:#x}"
        );
        ensure!(
            off >= unsigned.len() && off - unsigned.len() < 8,
            "signing moved more than the alignment padding"
        );
        Ok(format!(
            "certificate table (WIN_CERTIFICATE 2.0, PKCS#7) of {len} bytes at the end of the file"
        ))
    }

    /// A file offset in the middle of the `.text` section's raw data.
    pub fn text_byte_offset(data: &[u8]) -> Result<usize> {
        let pe = Pe::parse(data)?;
        let text = pe
            .section_table()
            .iter()
            .find(|s| &s.name == b".text\0\0\0")
            .context("no .text")?;
        let (start, size) = text.pe_file_range();
        ensure!(size > 0, ".text is empty");
        Ok((start + size / 2) as usize)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn checksum_by_hand() {
            // Words (LE) 0xffff, 0xffff, [field skipped x2], 0x0001 (odd byte padded with zero).
            // 0xffff + 0xffff = 0x1fffe -> fold 0xffff; + 1 = 0x10000 -> fold 0x0001; + length 9.
            let data = [0xff, 0xff, 0xff, 0xff, 0xcc, 0xcc, 0xcc, 0xcc, 0x01];
            assert_eq!(checksum(&data, 4), 10);
            // The field's content does not matter; every other byte does.
            let mut other = data;
            other[5] = 0;
            assert_eq!(checksum(&other, 4), 10);
            other[8] = 2;
            assert_eq!(checksum(&other, 4), 11);
        }

        /// A COFF object with one .text section holding `xor eax,eax; ret`, filler bytes and an
        /// 8-byte absolute pointer to its own `entry` symbol (an ADDR64 relocation).
        fn tiny_object() -> Vec<u8> {
            let mut code = vec![0x31, 0xc0, 0xc3];
            code.extend((0..509u32).map(|i| (i * 37 + 11) as u8));
            code[16..24].fill(0); // the ADDR64 slot
            let nsyms = 1u32;
            let reloc_at = 20 + 40 + code.len() as u32;
            let symtab_at = reloc_at + 10;
            let mut o = Vec::new();
            // IMAGE_FILE_HEADER
            o.extend(0x8664u16.to_le_bytes());
            o.extend(1u16.to_le_bytes());
            o.extend(0u32.to_le_bytes());
            o.extend(symtab_at.to_le_bytes());
            o.extend(nsyms.to_le_bytes());
            o.extend(0u16.to_le_bytes());
            o.extend(0u16.to_le_bytes());
            // IMAGE_SECTION_HEADER .text: CODE | ALIGN_16BYTES | EXECUTE | READ
            o.extend(b".text\0\0\0");
            o.extend(0u32.to_le_bytes());
            o.extend(0u32.to_le_bytes());
            o.extend((code.len() as u32).to_le_bytes());
            o.extend(60u32.to_le_bytes());
            o.extend(reloc_at.to_le_bytes());
            o.extend(0u32.to_le_bytes());
            o.extend(1u16.to_le_bytes());
            o.extend(0u16.to_le_bytes());
            o.extend(0x6050_0020u32.to_le_bytes());
            o.extend(&code);
            // IMAGE_RELOCATION: offset 16, symbol 0, IMAGE_REL_AMD64_ADDR64 (1)
            o.extend(16u32.to_le_bytes());
            o.extend(0u32.to_le_bytes());
            o.extend(1u16.to_le_bytes());
            // IMAGE_SYMBOL "entry": value 0, section 1, type 0x20 (function), EXTERNAL, no aux
            o.extend(b"entry\0\0\0");
            o.extend(0u32.to_le_bytes());
            o.extend(1i16.to_le_bytes());
            o.extend(0x20u16.to_le_bytes());
            o.push(2);
            o.push(0);
            // empty string table
            o.extend(4u32.to_le_bytes());
            o
        }

        /// Links the tiny object into a native image with lld-link-19 /RELEASE (lld computes the
        /// checksum: the independent oracle) and returns (image, map file text).
        fn lld_image(name: &str) -> (Vec<u8>, String) {
            let dir =
                std::env::temp_dir().join(format!("smudge-xtask-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("t.obj"), tiny_object()).unwrap();
            let status = Command::new("lld-link-19")
                .current_dir(&dir)
                .args([
                    "/out:t.sys",
                    "/entry:entry",
                    "/subsystem:native",
                    "/driver",
                    "/nodefaultlib",
                    "/machine:x64",
                    "/base:0x140000000",
                    "/release",
                    "/dynamicbase",
                    "/nxcompat",
                    "/map:t.map",
                    "t.obj",
                ])
                .status()
                .expect("lld-link-19 missing: run `cargo xtask deps` (Debian package lld-19)");
            assert!(status.success());
            let image = std::fs::read(dir.join("t.sys")).unwrap();
            let map = std::fs::read_to_string(dir.join("t.map")).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            (image, map)
        }

        #[test]
        fn checksum_agrees_with_lld_release() {
            let (image, _) = lld_image("checksum");
            let field = checksum_offset(&image).unwrap();
            let lld = u32::from_le_bytes(image[field..field + 4].try_into().unwrap());
            assert_ne!(lld, 0);
            assert_eq!(checksum(&image, field), lld);
            // A changed byte must change the sum.
            let mut bad = image.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x40;
            assert!(check_checksum(&bad).is_err());
            // Restoring the byte restores agreement.
            bad[last] ^= 0x40;
            assert!(check_checksum(&bad).is_ok());
        }

        #[test]
        fn checks_pass_on_a_good_image_and_name_what_is_wrong_on_bad_ones() {
            let (image, map) = lld_image("checks");
            let entry = map_symbol(&map, "entry").unwrap();
            let props = verify_image(&image, &BTreeSet::new(), &entry).unwrap();
            assert_eq!(props.len(), 8);
            let pe = Pe::parse(&image).unwrap();
            assert!(check_relocations(&pe, &image).unwrap().contains("1 DIR64"));

            // An import the .def lists but the image lacks is an error ("exactly").
            let mut extra = BTreeSet::new();
            extra.insert(("ntoskrnl.exe".to_string(), "IoCreateDevice".to_string()));
            assert!(check_imports(&pe, &extra)
                .unwrap_err()
                .to_string()
                .contains("not imported"));

            // Entry point moved by one byte.
            let wrong = MapSymbol {
                rva: entry.rva + 1,
                timestamp: entry.timestamp,
            };
            assert!(check_entry(&pe, &wrong).is_err());

            // Subsystem WINDOWS_GUI (2) instead of NATIVE: optional header offset 68.
            let lfanew = u32::from_le_bytes(image[0x3c..0x40].try_into().unwrap()) as usize;
            let mut gui = image.clone();
            gui[lfanew + 24 + 68] = 2;
            assert!(check_subsystem(&Pe::parse(&gui).unwrap()).is_err());

            // First section made writable too.
            let size_of_opt =
                u16::from_le_bytes(image[lfanew + 20..lfanew + 22].try_into().unwrap()) as usize;
            let flags = lfanew + 24 + size_of_opt + 36;
            let mut wx = image.clone();
            wx[flags + 3] |= 0x80; // IMAGE_SCN_MEM_WRITE
            assert!(check_wx(&Pe::parse(&wx).unwrap())
                .unwrap_err()
                .to_string()
                .contains("writable and executable"));
        }

        #[test]
        fn def_files_parse_and_the_driver_def_is_well_formed() {
            let (lib, names) =
                parse_def("; c\nLIBRARY ntoskrnl.exe\nEXPORTS\n  A ; x\nB\n").unwrap();
            assert_eq!(lib, "ntoskrnl.exe");
            assert_eq!(names.into_iter().collect::<Vec<_>>(), ["A", "B"]);
            assert!(parse_def("LIBRARY x\nEXPORTS\nA\nA\n").is_err());
            assert!(parse_def("EXPORTS\nA\n").is_err());
            let text = std::fs::read_to_string(root().join("windows-driver/ntoskrnl.def")).unwrap();
            let (lib, names) = parse_def(&text).unwrap();
            assert_eq!(lib, "ntoskrnl.exe");
            assert!(names.contains("DbgPrintEx") && names.contains("IoCreateDevice"));
        }

        #[test]
        fn map_symbol_reads_lld_link_maps() {
            let map = " smudge\n\n Timestamp is 6b070340 (Wed Nov 25 15:48:16 2026)\n\n Preferred load address is 0000000140000000\n\n  Address         Publics by Value              Rva+Base               Lib:Object\n\n 0001:000000e0       DriverEntry                00000001400010e0     smudge.o\n";
            assert_eq!(
                map_symbol(map, "DriverEntry").unwrap(),
                MapSymbol {
                    rva: 0x10e0,
                    timestamp: 0x6b070340
                }
            );
            assert!(map_symbol(map, "Missing").is_err());
        }
    }
}
