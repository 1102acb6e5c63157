//! `smudge explain`: the seed question on a live guest. For each page the guest wrote, what
//! each translation layer says about it: the guest's own PDE, the EPT leaf, and the host
//! page-table entry that maps the backing page in the host kernel's direct map.

use anyhow::anyhow;
use smudge_core::abi::ExplainResp;

use crate::device::Vmm;
use crate::gfns::{bitmap_words, guest_dirty_gfns, PAGE};
use crate::json::Json;
use crate::run::{RunConfig, Streams};

/// Guest paging-structure entry bits (SDM Vol. 3A 4.5, Table 4-17/4-18): A = 5, D = 6.
const GUEST_A: u64 = 1 << 5;
const GUEST_D: u64 = 1 << 6;
/// EPT entry bits (SDM 29.3.2): R/W/X = 0..2, A = 8, D = 9 (D on leaves only).
const EPT_R: u64 = 1 << 0;
const EPT_W: u64 = 1 << 1;
const EPT_X: u64 = 1 << 2;
const EPT_A: u64 = 1 << 8;
const EPT_D: u64 = 1 << 9;

fn bit(v: u64, b: u64) -> bool {
    v & b != 0
}

/// A page-size name for a paging level (1 = 4 KiB leaf, 2 = 2 MiB, 3 = 1 GiB; 0 = none).
pub fn level_name(level: u32) -> &'static str {
    match level {
        1 => "4K",
        2 => "2M",
        3 => "1G",
        0 => "none",
        _ => "?",
    }
}

fn ad(v: u64, a: u64, d: u64) -> String {
    format!("A={} D={}", u8::from(bit(v, a)), u8::from(bit(v, d)))
}

/// One line for humans.
pub fn human_line(gpa: u64, r: &ExplainResp) -> String {
    let guest = if r.guest_level == 0 {
        "guest -".to_string()
    } else {
        format!(
            "guest PDE {:#018x} {} {}",
            r.guest_pte,
            level_name(r.guest_level),
            ad(r.guest_pte, GUEST_A, GUEST_D)
        )
    };
    if r.ept_leaf == 0 {
        return format!("{gpa:#010x}  {guest}  EPT not mapped");
    }
    let rwx: String = [(EPT_R, 'R'), (EPT_W, 'W'), (EPT_X, 'X')]
        .iter()
        .map(|&(b, c)| if bit(r.ept_leaf, b) { c } else { '-' })
        .collect();
    format!(
        "{gpa:#010x}  {guest}  EPT {:#018x} {} {rwx} {}  HPA {:#x}  host VA {:#x}  host PTE {:#018x} {} {}",
        r.ept_leaf,
        level_name(r.ept_level),
        ad(r.ept_leaf, EPT_A, EPT_D),
        r.hpa,
        r.host_va,
        r.host_pte,
        level_name(r.host_level),
        ad(r.host_pte, GUEST_A, GUEST_D),
    ) + &if r.user_level != 0 {
        format!("  user PTE {:#018x} {} {}", r.user_pte, level_name(r.user_level), ad(r.user_pte, GUEST_A, GUEST_D))
    } else {
        String::new()
    }
}

/// One JSON object.
pub fn json_obj(at: &str, gpa: u64, r: &ExplainResp) -> Json {
    Json::object()
        .with("event", "explain")
        .with("at", at)
        .with("gpa", gpa)
        .with("gfn", gpa / PAGE)
        .with(
            "guest_pde",
            Json::object()
                .with("value", r.guest_pte)
                .with("level", r.guest_level)
                .with("a", bit(r.guest_pte, GUEST_A))
                .with("d", bit(r.guest_pte, GUEST_D)),
        )
        .with(
            "ept_leaf",
            Json::object()
                .with("value", r.ept_leaf)
                .with("level", r.ept_level)
                .with("r", bit(r.ept_leaf, EPT_R))
                .with("w", bit(r.ept_leaf, EPT_W))
                .with("x", bit(r.ept_leaf, EPT_X))
                .with("a", bit(r.ept_leaf, EPT_A))
                .with("d", bit(r.ept_leaf, EPT_D)),
        )
        .with("hpa", r.hpa)
        .with("host_va", r.host_va)
        .with(
            "host_pte",
            Json::object()
                .with("value", r.host_pte)
                .with("level", r.host_level)
                .with("a", bit(r.host_pte, GUEST_A))
                .with("d", bit(r.host_pte, GUEST_D)),
        )
        .with(
            "user_pte",
            Json::object()
                .with("value", r.user_pte)
                .with("level", r.user_level)
                .with("a", bit(r.user_pte, GUEST_A))
                .with("d", bit(r.user_pte, GUEST_D)),
        )
}

/// Explains every page the guest wrote since the last harvest (GET_DIRTY_LOG: the dirty state
/// stays for the harvest that follows).
pub fn explain_now(
    vmm: &mut dyn Vmm,
    cfg: &RunConfig,
    out: &mut Streams<'_>,
    at: &str,
    mode: &str,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let mut bm = vec![0u64; bitmap_words(cfg.mem_bytes)];
    vmm.dirty_log(0, false, &mut bm)
        .map_err(|e| anyhow!("cannot read the dirty log: {}", e.err))?;
    let gfns = guest_dirty_gfns(&bm, cfg.mem_bytes);
    let shown = limit.unwrap_or(usize::MAX).min(gfns.len());
    // A read-only mapping of guest RAM in this process: its user PTEs map the same backing pages.
    let user_base = vmm.map_guest(cfg.mem_bytes);
    out.note(
        cfg.json,
        &format!(
            "at {at} (mode {mode}): {} pages written, {shown} explained\n",
            gfns.len()
        ),
    )?;
    for &gfn in &gfns[..shown] {
        let gpa = gfn * PAGE;
        let r = vmm
            .explain(gpa, user_base.map_or(0, |b| b + gpa))
            .map_err(|e| anyhow!("cannot explain GPA {gpa:#x}: {}", e.err))?;
        let line = human_line(gpa, &r);
        if cfg.json {
            out.event(true, &json_obj(at, gpa, &r), &line)?;
        } else {
            out.note(false, &format!("  {line}\n"))?;
        }
    }
    Ok(())
}

/// The explanation printed after the pages.
pub fn note(mode: &str) -> String {
    let mut s = String::from(
        "\nThe CPU set D only in the guest's page-table entry and in the EPT leaf (EPTP bit 6 enables\n\
         EPT A/D). The host page-table entry that maps the backing page belongs to the host kernel's\n\
         direct map; x86 Linux creates those with A and D preset (__PAGE_KERNEL), so its D=1 is not the\n\
         guest's doing, and the guest's writes never touch it. The \"user PTE\" column is this tool's own\n\
         read-only mapping of guest RAM (mmap of the VM): it maps the same backing page and stays D=0\n\
         while the EPT leaf says D=1, because a guest write walks the guest tables and EPT, never the\n\
         host's. The host finds dirty pages by scanning EPT D bits or with PML.\n",
    );
    if mode == "wp" {
        s.push_str(
            "This VM uses write-protect mode: EPTP bit 6 is clear, so the EPT leaf has no A/D flags;\n\
             smudge learned of each write from the EPT violation its first write caused, and restored W.\n",
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::ModeArg;
    use crate::run::tests::{resp, run_captured, FakeVmm};
    use smudge_core::abi::{self, exit_kind};

    fn sample() -> ExplainResp {
        ExplainResp {
            // Guest 2 MiB PDE for 4 MiB: P|RW|A|D|PS (SDM 4.5 Table 4-18).
            guest_pte: 0x40_0000 | 0x1 | 0x2 | 0x20 | 0x40 | 0x80,
            guest_level: 2,
            // EPT 4 KiB leaf: RWX, WB (6 << 3), A and D (SDM 29.3.2).
            ept_leaf: 0x1234_5000 | 0x7 | (6 << 3) | (1 << 8) | (1 << 9),
            ept_level: 1,
            hpa: 0x1234_5000,
            host_va: 0xffff_8880_1234_5000,
            // Host direct-map 2 MiB PDE, __PAGE_KERNEL_LARGE: P|RW|A|D|PS|G|NX.
            host_pte: 0x8000_0000_1220_0000 | 0x1e3,
            host_level: 2,
            ..ExplainResp::default()
        }
    }

    #[test]
    fn human_line_decodes_each_layer() {
        let l = human_line(0x40_1000, &sample());
        assert!(
            l.starts_with("0x00401000  guest PDE 0x00000000004000e3 2M A=1 D=1"),
            "{l}"
        );
        assert!(l.contains("EPT 0x0000000012345337 4K RWX A=1 D=1"), "{l}");
        assert!(
            l.contains("HPA 0x12345000  host VA 0xffff888012345000"),
            "{l}"
        );
        assert!(l.ends_with("host PTE 0x80000000122001e3 2M A=1 D=1"), "{l}");
        let clean = ExplainResp {
            ept_leaf: 0x1234_5000 | 0x5 | (6 << 3),
            ..sample()
        };
        assert!(human_line(0x40_1000, &clean).contains("4K R-X A=0 D=0"));
        assert!(human_line(0, &ExplainResp::default()).contains("EPT not mapped"));
    }

    #[test]
    fn json_flags() {
        let j: serde_json::Value =
            serde_json::from_str(&json_obj("exit", 0x40_1000, &sample()).to_string()).unwrap();
        assert_eq!(j["gfn"], 0x401);
        assert_eq!(j["guest_pde"]["d"], true);
        assert_eq!(j["ept_leaf"]["a"], true);
        assert_eq!(j["ept_leaf"]["d"], true);
        assert_eq!(j["ept_leaf"]["level"], 1);
        assert_eq!(j["host_pte"]["d"], true);
        assert_eq!(j["host_pte"]["level"], 2);
    }

    #[test]
    fn explains_written_pages_without_clearing_them() {
        let mut vmm = FakeVmm {
            runs: [resp(exit_kind::CHECKPOINT, ""), resp(exit_kind::EXIT, "")].into(),
            // get at checkpoint 1, harvest at checkpoint 1, get at exit, harvest at exit.
            logs: [
                vec![0x400, 0x3f01],
                vec![0x400, 0x3f01],
                vec![0x500],
                vec![0x500],
            ]
            .into(),
            stats: abi::StatsResp {
                mode: 1,
                ..Default::default()
            },
            ..FakeVmm::default()
        };
        let cfg = RunConfig {
            mem_bytes: 64 << 20,
            mode: ModeArg::Ad,
            vcpus: 1,
            json: true,
            explain: Some(None),
            pause_at: None,
        };
        let (r, out, _) = run_captured(&mut vmm, &cfg, &|| false);
        assert_eq!(r.unwrap(), 0);
        assert_eq!(vmm.log_calls, vec![false, true, false, true]);
        assert_eq!(
            vmm.explained,
            vec![0x40_0000, 0x50_0000],
            "reserved pages are not explained"
        );
        let ev: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(kinds, vec!["explain", "checkpoint", "explain", "exit"]);
        assert_eq!(ev[0]["at"], "checkpoint 1");
    }
}
