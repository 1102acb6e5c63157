//! The emulated VT-x machine: Bochs 2.7 boots the cached kernel from an ISO whose initramfs
//! holds smudge.ko, the static `smudge` tool, the guests and the caller's files, runs one
//! command and powers off. The command's output comes back on COM2, kernel messages on COM1.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::deps::run;
use crate::{linux, root, step};

/// `cargo xtask bochs`.
#[derive(Args, Clone, Debug)]
pub struct BochsArgs {
    /// Bochs CPU model (with VMX: corei7_skylake_x, corei7_icelake_u, tigerlake, ...).
    #[arg(long, default_value = "corei7_skylake_x")]
    pub cpu: String,
    /// Number of CPUs.
    #[arg(long, default_value_t = 1)]
    pub smp: u32,
    /// RAM of the emulated machine in MiB.
    #[arg(long, default_value_t = 512)]
    pub ram: u32,
    /// Serve KVM's API (smudge.ko kvm=1) and load the test image's stub `kvm` module (KVM's
    /// selftests read its parameter `force_emulation_prefix` before main).
    #[arg(long)]
    pub kvm: bool,
    /// Files to put at /files/<basename>.
    #[arg(long = "file")]
    pub files: Vec<PathBuf>,
    /// Seconds before the run counts as hung.
    #[arg(long, default_value_t = 240)]
    pub timeout: u64,
    /// Crash the kernel after the command (`echo c > /proc/sysrq-trigger`) and print the kernel
    /// log up to the end of the panic.
    #[arg(long)]
    pub crash: bool,
    /// The command to run inside (after `--`).
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

/// What a boot produced.
pub struct Boot {
    /// The command's exit status.
    pub status: i32,
    /// The command's output (COM2).
    pub output: String,
    /// Wall time.
    pub seconds: f64,
}

/// The emulated machine of a boot.
#[derive(Clone, Copy, Debug)]
pub struct Machine<'a> {
    /// Bochs CPU model.
    pub cpu: &'a str,
    /// CPUs.
    pub smp: u32,
    /// RAM in MiB.
    pub ram_mib: u32,
    /// Load the stub `kvm` module too.
    pub kvm: bool,
    /// The boot ends by crashing the kernel (`echo c > /proc/sysrq-trigger`, once the command's
    /// output is sent): the boot ends at the panic, and the kernel log up to it becomes the output's last case, `kernel-log`.
    pub crash: bool,
}

impl<'a> Machine<'a> {
    /// `smp` CPUs of model `cpu` with 512 MiB and no stub.
    pub fn new(cpu: &'a str, smp: u32) -> Machine<'a> {
        Machine {
            cpu,
            smp,
            ram_mib: 512,
            kvm: false,
            crash: false,
        }
    }
}

/// Everything a boot needs, built once per xtask process.
pub struct Artifacts {
    kernel: PathBuf,
    module: PathBuf,
    kvm_stub: PathBuf,
    tool: PathBuf,
    guests: PathBuf,
}

impl Artifacts {
    /// Builds whatever is missing.
    pub fn build() -> Result<Artifacts> {
        let module = linux::module()?;
        let kvm_stub = linux::kvm_stub()?;
        let kernel = linux::kernel()?.join("arch/x86/boot/bzImage");
        let (tool, guests) = linux::tools()?;
        Ok(Artifacts {
            kernel,
            module,
            kvm_stub,
            tool,
            guests,
        })
    }
}

const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
exec 3>/dev/ttyS1
if ! insmod /smudge.ko $(cat /smudge.args 2>/dev/null) 2>&3; then echo "@@SMUDGE-INSMOD-FAILED" >&3; fi
if [ -e /kvm.ko ] && ! insmod /kvm.ko 2>&3; then echo "@@SMUDGE-INSMOD-FAILED" >&3; fi
cd /files
sh /cmd.sh >&3 2>&3
echo "@@SMUDGE-EXIT $?" >&3
sync
prev=""
while true; do
  cur=$(grep -E '^1:' /proc/tty/driver/serial)
  [ "$cur" = "$prev" ] && break
  prev=$cur
  i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done
done
# A crash boot panics only now, its output on ttyS1 sent: a panic stops the CPUs with bytes
# still in the tty buffer.
[ -e /crash ] && echo c > /proc/sysrq-trigger
for c in S h u t d o w n; do printf $c | dd of=/dev/port bs=1 seek=$((0x8900)) count=1 2>/dev/null; done
poweroff -f
"#;

/// Boots Bochs once as `m` and runs `cmd` (a shell command line).
pub fn boot(
    a: &Artifacts,
    m: &Machine,
    files: &[PathBuf],
    cmd: &str,
    timeout: u64,
    stream: bool,
) -> Result<Boot> {
    let work = tempdir("bochs")?;
    let stage = work.join("root");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "files", "guests", "etc",
    ] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    // An unprivileged user (uid 1000) for `su -s /bin/sh user -c CMD`: busybox's setpriv cannot
    // change uid, and root needs no password for su.
    std::fs::write(
        stage.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000:user:/files:/bin/sh\n",
    )?;
    std::fs::write(stage.join("etc/group"), "root:x:0:\nuser:x:1000:\n")?;
    std::fs::copy("/bin/busybox", stage.join("bin/busybox")).context("busybox-static")?;
    run(Command::new(stage.join("bin/busybox"))
        .arg("--install")
        .arg("-s")
        .arg(stage.join("bin"))
        .env("PATH", ""))
    .or_else(|_| -> Result<()> {
        for applet in [
            "sh", "mount", "insmod", "rmmod", "grep", "printf", "dd", "sync", "poweroff", "cat",
            "echo", "dmesg", "ls", "sleep", "lsmod",
        ] {
            let _ = std::os::unix::fs::symlink("busybox", stage.join("bin").join(applet));
        }
        Ok(())
    })?;
    // busybox --install writes absolute links into the host path; make them relative.
    for e in std::fs::read_dir(stage.join("bin"))? {
        let p = e?.path();
        if p.is_symlink() {
            std::fs::remove_file(&p)?;
            std::os::unix::fs::symlink("busybox", &p)?;
        }
    }
    write_exec(&stage.join("init"), INIT)?;
    write_exec(&stage.join("cmd.sh"), &format!("set -e\n{cmd}\n"))?;
    std::fs::copy(&a.module, stage.join("smudge.ko"))?;
    if m.crash {
        std::fs::write(stage.join("crash"), "")?;
    }
    if m.kvm {
        std::fs::copy(&a.kvm_stub, stage.join("kvm.ko"))?;
        std::fs::write(stage.join("smudge.args"), "kvm=1")?;
    }
    std::fs::copy(&a.tool, stage.join("bin/smudge"))?;
    // smudge-hostile (hostile/) is built next to the tool by linux::tools().
    std::fs::copy(
        a.tool.with_file_name("smudge-hostile"),
        stage.join("bin/smudge-hostile"),
    )
    .context("smudge-hostile")?;
    for e in std::fs::read_dir(&a.guests)? {
        let p = e?.path();
        if p.is_file() && p.extension().is_none() && is_elf(&p) {
            std::fs::copy(
                &p,
                stage.join("guests").join(p.file_name().unwrap_or_default()),
            )?;
        }
    }
    for f in files {
        let name = f.file_name().context("file without a name")?;
        std::fs::copy(f, stage.join("files").join(name))
            .with_context(|| format!("copy {}", f.display()))?;
    }
    // The console node must exist before devtmpfs is mounted, or init prints nothing.
    run(Command::new("mknod")
        .arg(stage.join("dev/console"))
        .args(["c", "5", "1"]))?;
    let cpio = work.join("initramfs.cpio");
    let list = Command::new("sh")
        .current_dir(&stage)
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet > {}",
            cpio.display()
        ))
        .status()?;
    if !list.success() {
        bail!("cpio failed");
    }
    let iso_root = work.join("iso");
    std::fs::create_dir_all(iso_root.join("isolinux"))?;
    std::fs::copy(
        "/usr/lib/ISOLINUX/isolinux.bin",
        iso_root.join("isolinux/isolinux.bin"),
    )?;
    std::fs::copy(
        "/usr/lib/syslinux/modules/bios/ldlinux.c32",
        iso_root.join("isolinux/ldlinux.c32"),
    )?;
    std::fs::copy(&a.kernel, iso_root.join("bzImage"))?;
    std::fs::copy(&cpio, iso_root.join("initrd.img"))?;
    std::fs::write(
        iso_root.join("isolinux/isolinux.cfg"),
        "DEFAULT smudge\nPROMPT 0\nTIMEOUT 0\nLABEL smudge\n  KERNEL /bzImage\n  APPEND initrd=/initrd.img console=ttyS0,115200 quiet clearcpuid=aperfmperf\n",
    )?;
    let iso = work.join("boot.iso");
    let out = Command::new("xorriso")
        .args([
            "-as",
            "mkisofs",
            "-quiet",
            "-b",
            "isolinux/isolinux.bin",
            "-c",
            "isolinux/boot.cat",
            "-no-emul-boot",
            "-boot-load-size",
            "4",
            "-boot-info-table",
            "-o",
        ])
        .arg(&iso)
        .arg(&iso_root)
        .output()?;
    if !out.status.success() {
        bail!("xorriso failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // ignore_bad_msrs=0 for fidelity; Linux reads MSR 0x1a0 unguarded early, so define it.
    std::fs::write(
        work.join("msrs.def"),
        "0x000001a0   0    0x00000000 0x00000001 0x00000000 0x00000000 0xffffffff 0xffffffff\n",
    )?;
    let com1 = work.join("com1.txt");
    let com2 = work.join("com2.txt");
    std::fs::write(
        work.join("bochsrc"),
        format!(
            "cpu: model={cpu}, count={smp}, ips=100000000, reset_on_triple_fault=0, ignore_bad_msrs=0, msrs=\"{msrs}\"\n\
             memory: guest={ram}, host={ram}\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest, options=fastboot\n\
             vgaromimage: file=/usr/share/vgabios/vgabios.bin\n\
             display_library: rfb, options=\"timeout=0\"\n\
             ata0-master: type=cdrom, path=\"{iso}\", status=inserted\n\
             boot: cdrom\n\
             com1: enabled=1, mode=file, dev=\"{c1}\"\n\
             com2: enabled=1, mode=file, dev=\"{c2}\"\n\
             clock: sync=none, time0=local\n\
             log: {log}\n\
             speaker: enabled=0\n\
             sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
             panic: action=fatal\n\
             error: action=report\n",
            cpu = m.cpu,
            smp = m.smp,
            ram = m.ram_mib,
            msrs = work.join("msrs.def").display(),
            iso = iso.display(),
            c1 = com1.display(),
            c2 = com2.display(),
            log = work.join("bochs.log").display(),
        ),
    )?;
    std::fs::write(work.join("cmds"), "c\n")?;
    let start = Instant::now();
    let mut child = Command::new("bochs-bin")
        .current_dir(&work)
        .args(["-q", "-f", "bochsrc", "-rc", "cmds"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bochs-bin")?;
    let mut shown = 0usize;
    let mut timed_out = false;
    loop {
        let done = child.try_wait()?.is_some();
        if stream {
            let text = std::fs::read_to_string(&com2).unwrap_or_default();
            if text.len() > shown {
                print!("{}", &text[shown..]);
                let _ = std::io::stdout().flush();
                shown = text.len();
            }
        }
        if done {
            break;
        }
        let klog = std::fs::read_to_string(&com1).unwrap_or_default();
        if m.crash && klog.contains("---[ end Kernel panic") {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        if klog.contains("Kernel panic") && !m.crash {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the emulated machine's kernel panicked:\n{}",
                tail(&klog, 40)
            );
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut output = std::fs::read_to_string(&com2).unwrap_or_default();
    let kernel_log = std::fs::read_to_string(&com1).unwrap_or_default();
    if m.crash && kernel_log.contains("---[ end Kernel panic") {
        output = format!("{output}\n@@CASE kernel-log\n{kernel_log}\n@@RC kernel-log 0\n");
    }
    let seconds = start.elapsed().as_secs_f64();
    if stream && output.len() > shown {
        print!("{}", &output[shown..]);
    }
    for bad in [
        "Oops",
        "BUG:",
        "general protection fault",
        "Kernel panic",
        "WARNING:",
    ] {
        if kernel_log.contains(bad) && !(m.crash && bad == "Kernel panic") {
            bail!(
                "kernel reported '{bad}' during the run:\n{}",
                tail(&kernel_log, 60)
            );
        }
    }
    if output.contains("@@SMUDGE-INSMOD-FAILED") {
        bail!(
            "insmod smudge.ko failed:\n{}\nkernel log:\n{}",
            output,
            tail(&kernel_log, 30)
        );
    }
    let status = output.lines().find_map(|l| {
        l.strip_prefix("@@SMUDGE-EXIT ")
            .and_then(|s| s.trim().parse::<i32>().ok())
    });
    let Some(status) = status else {
        if timed_out {
            bail!("the emulated machine hung (no exit after {timeout} s); output so far:\n{}\nkernel log:\n{}", tail(&output, 40), tail(&kernel_log, 40));
        }
        bail!("the emulated machine stopped without reporting the command's status; output:\n{}\nkernel log:\n{}\nbochs log:\n{}", tail(&output, 40), tail(&kernel_log, 40), tail(&std::fs::read_to_string(work.join("bochs.log")).unwrap_or_default(), 20));
    };
    // Verbatim, the terminal's CRs included (`e2e::run_cases` counts the bytes), without init's
    // own markers.
    let output: String = output
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("@@SMUDGE-"))
        .collect();
    let _ = std::fs::remove_dir_all(&work);
    Ok(Boot {
        status,
        output,
        seconds,
    })
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn is_elf(p: &Path) -> bool {
    std::fs::read(p)
        .map(|b| b.starts_with(b"\x7fELF"))
        .unwrap_or(false)
}

fn write_exec(p: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, text)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn tempdir(tag: &str) -> Result<PathBuf> {
    let d =
        root()
            .join("target/bochs-runs")
            .join(format!("{tag}-{}-{}", std::process::id(), unique()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `cargo xtask bochs`.
pub fn run_cli(a: BochsArgs) -> Result<()> {
    let arts = Artifacts::build()?;
    step(&format!(
        "booting Bochs ({}, {} CPU(s), {} MiB)",
        a.cpu, a.smp, a.ram
    ));
    let m = Machine {
        cpu: &a.cpu,
        smp: a.smp,
        ram_mib: a.ram,
        kvm: a.kvm,
        crash: a.crash,
    };
    let b = boot(&arts, &m, &a.files, &a.cmd.join(" "), a.timeout, true)?;
    step(&format!(
        "command exited with {} after {:.1} s",
        b.status, b.seconds
    ));
    std::process::exit(b.status);
}

/// `cargo xtask demo`.
pub fn demo() -> Result<()> {
    let arts = Artifacts::build()?;
    step("booting Bochs (corei7_skylake_x): smudge explain, then a dirty-log run");
    let b = boot(
        &arts,
        &Machine::new("corei7_skylake_x", 1),
        &[],
        "smudge explain /guests/pagewriter; smudge run /guests/pagewriter",
        300,
        true,
    )?;
    step(&format!(
        "demo finished in {:.1} s with status {}",
        b.seconds, b.status
    ));
    if b.status != 0 {
        bail!("the demo command failed");
    }
    Ok(())
}
