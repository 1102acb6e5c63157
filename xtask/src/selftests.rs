//! KVM's own dirty-log selftests (`dirty_log_test`, `dirty_log_perf_test`), built unmodified
//! from Debian's linux-source-6.12 and cached outside the clone, keyed by their inputs; and
//! `cargo xtask selftests`, which runs them under Bochs against smudge.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

use crate::bochs::{boot, Artifacts, Machine};
use crate::deps::{cache_dir, run};
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
pub fn build() -> Result<PathBuf> {
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

/// `cargo xtask selftests`: builds the tests and runs them under Bochs (2 CPUs, 2 GiB: the
/// dirty-log test's guest touches a 1 GiB slot) with the stub `kvm` module loaded.
pub fn run_cli() -> Result<()> {
    let dir = build()?;
    let arts = Artifacts::build()?;
    let files: Vec<PathBuf> = TESTS.iter().map(|t| dir.join(t)).collect();
    let runs = [
        "./dirty_log_test -M dirty-log -i 3",
        "./dirty_log_test -M clear-log -i 3",
        "./dirty_log_test -M dirty-ring -i 3",
        "./dirty_log_perf_test -v 2 -b 16M -i 2",
    ];
    let mut script = String::from("set +e\nfail=0\n");
    for r in runs {
        script.push_str(&format!(
            "echo '== {r}'; {r}; rc=$?; echo \"== exit status $rc\"; [ $rc -eq 0 ] || fail=1\n"
        ));
    }
    script.push_str("exit $fail\n");
    let m = Machine {
        ram_mib: 2048,
        kvm: true,
        ..Machine::new("corei7_skylake_x", 2)
    };
    step("booting Bochs (corei7_skylake_x, 2 CPUs, 2 GiB) with the stub kvm module");
    let b = boot(&arts, &m, &files, &script, 1800, true)?;
    step(&format!(
        "selftests finished with status {} after {:.1} s",
        b.status, b.seconds
    ));
    if b.status != 0 {
        bail!("a KVM selftest failed");
    }
    Ok(())
}
