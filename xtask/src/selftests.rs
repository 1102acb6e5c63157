//! KVM's own dirty-log selftests (`dirty_log_test`, `dirty_log_perf_test`), built unmodified
//! from Debian's linux-source-6.12 and cached outside the clone, keyed by their inputs; and
//! `cargo xtask selftests`, which runs them under Bochs against smudge.

use anyhow::{bail, Context, Result};
use std::process::Command;

use crate::bochs::{Artifacts, Machine};
use crate::deps::{cache_dir, run};
use crate::e2e::{case, run_boots, Boot};
use crate::step;

/// The tests, by their binary names in tools/testing/selftests/kvm.
pub const TESTS: [&str; 2] = ["dirty_log_test", "dirty_log_perf_test"];

/// The make command inside tools/testing/selftests/kvm (`{out}` is the output dir):
/// static binaries, so the test image needs no libraries.
const MAKE_ARGS: [&str; 3] = [
    "EXTRA_CFLAGS=-static",
    "LDFLAGS=-static -pthread",
    "OUTPUT={out}",
];

/// The cache key: the source package version, the compiler and the make command.
fn key() -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{{ dpkg-query -W -f '${{Version}}\\n' linux-source-6.12; gcc --version | head -1; echo '{}'; }} | sha256sum | cut -c1-16",
            MAKE_ARGS.join(" ")
        ))
        .output()
        .context("selftests cache key")?;
    if !out.status.success() {
        bail!(
            "selftests cache key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The directory holding the built tests, building them when missing (about 30 s: extract the
/// source, `make headers`, then the two tests).
pub fn build() -> Result<std::path::PathBuf> {
    let dir = cache_dir().join(format!("kvm-selftests-{}", key()?));
    if TESTS.iter().all(|t| dir.join(t).exists()) {
        return Ok(dir);
    }
    step(&format!(
        "building KVM's dirty-log selftests from linux-source-6.12 into {}",
        dir.display()
    ));
    let work = cache_dir().join("kvm-selftests-build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    run(Command::new("tar")
        .arg("xf")
        .arg("/usr/src/linux-source-6.12.tar.xz")
        .arg("-C")
        .arg(&work))?;
    let src = work.join("linux-source-6.12");
    run(Command::new("make")
        .current_dir(&src)
        .args(["ARCH=x86", "headers"]))?;
    let out = work.join("out");
    let mut make = Command::new("make");
    make.current_dir(src.join("tools/testing/selftests/kvm"));
    for a in MAKE_ARGS {
        make.arg(a.replace("{out}", &out.display().to_string()));
    }
    for t in TESTS {
        make.arg(out.join(t));
    }
    run(&mut make)?;
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    for t in TESTS {
        run(Command::new("strip")
            .arg("-o")
            .arg(tmp.join(t))
            .arg(out.join(t)))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    std::fs::remove_dir_all(&work)?;
    Ok(dir)
}

/// smudge's dirty modes as `kvm_mode` numbers.
const MODES: [(&str, u32); 3] = [("ad", 1), ("pml", 2), ("wp", 3)];

/// The boot that runs KVM's selftests against smudge: 2 CPUs and 2 GiB (the dirty-log test's
/// guest touches a 1 GiB slot), smudge.ko with `kvm=1`, reloaded with each `kvm_mode`, and the
/// stub `kvm` module. Each run's exit status and output are checked; the tests' own figures
/// are kept.
pub fn boot() -> Result<Boot> {
    let dir = build()?;
    let mut b = Boot::on(
        "KVM's dirty-log selftests (linux-source-6.12, unmodified) on Bochs corei7_skylake_x with 2 CPUs",
        Machine {
            ram_mib: 2048,
            kvm: true,
            ..Machine::new("corei7_skylake_x", 2)
        },
    );
    b.files = TESTS.iter().map(|t| dir.join(t)).collect();
    b.timeout = 1500;
    let reload = |n: u32| format!("rmmod smudge && insmod /smudge.ko kvm=1 kvm_mode={n}");
    for (m, n) in MODES {
        for log in ["dirty-log", "clear-log"] {
            b.case(
                format!("{log}-{m}"),
                format!("{} && ./dirty_log_test -M {log} -i 3", reload(n)),
            );
        }
    }
    // The ring needs a mode with an event per page: PML or write-protect.
    for (m, n) in [MODES[1], MODES[2]] {
        b.case(
            format!("dirty-ring-{m}"),
            format!("{} && ./dirty_log_test -M dirty-ring -i 3", reload(n)),
        );
    }
    for (m, n) in [MODES[0], MODES[1]] {
        b.case(
            format!("perf-{m}"),
            format!("{} && ./dirty_log_perf_test -v 2 -b 16M -i 3", reload(n)),
        );
    }
    b.case(
        "kernel-log",
        "dmesg | grep -E 'BUG|WARNING|Oops|general protection' || echo clean",
    );
    let logs: Vec<(&str, &str)> = MODES
        .iter()
        .flat_map(|(m, _)| [("dirty-log", *m), ("clear-log", *m)])
        .chain([("dirty-ring", "pml"), ("dirty-ring", "wp")])
        .collect();
    for (log, m) in logs {
        {
            let name = format!("{log}-{m}");
            b.check(
                format!("dirty_log_test -M {log} -i 3, smudge mode {m}"),
                move |res, figures| {
                    let c = case(res, &name)?;
                    let dirtied = c.out.lines().find(|l| l.starts_with("Dirtied "));
                    let bits = c.out.lines().find(|l| l.starts_with("Total bits checked"));
                    match (c.rc, dirtied, bits) {
                        (0, Some(d), Some(t)) if !c.out.contains("Assertion Failure") => {
                            figures.push(format!("dirty_log_test -M {log} -i 3 ({m}): {d}; {t}"));
                            Ok(format!("exit 0: {d}; {t}"))
                        }
                        _ => bail!("exit {}:\n{}", c.rc, c.out),
                    }
                },
            );
        }
    }
    for (m, _) in [MODES[0], MODES[1]] {
        let name = format!("perf-{m}");
        b.check(
            format!("dirty_log_perf_test -v 2 -b 16M -i 3, smudge mode {m}"),
            move |res, figures| {
                let c = case(res, &name)?;
                let get = c.out.lines().find(|l| l.starts_with("Get dirty log over"));
                let clear = c
                    .out
                    .lines()
                    .find(|l| l.starts_with("Clear dirty log over"));
                match (c.rc, get, clear) {
                    (0, Some(g), Some(cl)) => {
                        figures.push(format!(
                            "dirty_log_perf_test -v 2 -b 16M -i 3 ({m}): {g} {cl}"
                        ));
                        Ok(format!("exit 0: {g} {cl}"))
                    }
                    _ => bail!("exit {}:\n{}", c.rc, c.out),
                }
            },
        );
    }
    b.check("kernel log after the selftests", |res, _| {
        let c = case(res, "kernel-log")?;
        if c.out.trim() != "clean" {
            bail!("{}", c.out);
        }
        Ok("no BUG, WARNING, Oops or general protection fault".into())
    });
    Ok(b)
}

/// `cargo xtask selftests`.
pub fn run_cli() -> Result<()> {
    let b = boot()?;
    run_boots(&Artifacts::build()?, vec![b])
}
