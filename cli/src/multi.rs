//! `smudge run --vcpus N` (N > 1): one thread per vCPU issues RUN on its own handle of the VM;
//! this thread prints their console lines, harvests at every checkpoint (the driver kicks the
//! other vCPUs out of guest mode first, so no write is lost or counted twice) and ends the run
//! when every vCPU has halted, or at the first exit hypercall or error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::anyhow;
use smudge_core::abi::{exit_kind, RunResp};

use crate::device::{ReqResult, Vmm};
use crate::os::{Device, ThreadHandle};
use crate::run::{
    checkpoint_event, exit_counts, exit_event, harvest_gfns, message_text, End, RunConfig, Streams,
};

/// One RUN result of one vCPU.
struct Msg {
    vcpu: u32,
    resp: ReqResult<RunResp>,
}

/// Runs vCPUs 0..cfg.vcpus of the set-up, loaded VM behind `dev`; returns the exit status.
pub fn run_vcpus(
    dev: &mut Device,
    cfg: &RunConfig,
    mode: &'static str,
    out: &mut Streams<'_>,
    timed_out: &dyn Fn() -> bool,
) -> anyhow::Result<i32> {
    crate::os::install_interrupt_handler()
        .map_err(|e| anyhow!("cannot install the SIGALRM handler: {e}"))?;
    let mut handles = Vec::new();
    for _ in 0..cfg.vcpus {
        handles.push(dev.try_clone()?);
    }
    let stop = AtomicBool::new(false);
    let threads: Mutex<Vec<ThreadHandle>> = Mutex::new(Vec::new());
    let (tx, rx) = mpsc::channel::<Msg>();
    // One "go on" channel per vCPU: after a checkpoint the vCPU waits until the harvest is done.
    let mut acks = Vec::new();
    let mut ack_rx = Vec::new();
    for _ in 0..cfg.vcpus {
        let (a, b) = mpsc::channel::<()>();
        acks.push(a);
        ack_rx.push(b);
    }
    let mut seq = 0u64;
    let mut lines: HashMap<u32, Vec<u8>> = HashMap::new();
    let end = std::thread::scope(|s| -> anyhow::Result<End> {
        for (i, (mut h, go)) in handles.drain(..).zip(ack_rx.drain(..)).enumerate() {
            let (tx, stop, threads) = (tx.clone(), &stop, &threads);
            s.spawn(move || {
                if let Ok(mut t) = threads.lock() {
                    t.push(ThreadHandle::current());
                }
                while !stop.load(Ordering::Acquire) {
                    let resp = h.run(i as u32);
                    let kind = resp.as_ref().map(|r| r.kind).ok();
                    if tx
                        .send(Msg {
                            vcpu: i as u32,
                            resp,
                        })
                        .is_err()
                    {
                        break;
                    }
                    match kind {
                        Some(exit_kind::CONSOLE | exit_kind::INTERRUPTED) => {}
                        Some(exit_kind::CHECKPOINT) => {
                            if go.recv().is_err() {
                                break;
                            }
                        }
                        _ => break,
                    }
                }
            });
        }
        drop(tx);
        let mut halted = 0u32;
        let result = loop {
            if timed_out() {
                break Ok(End::Timeout);
            }
            let msg = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(End::Hlt),
            };
            let resp = match msg.resp {
                Ok(r) => r,
                Err(e) => break Err(anyhow!("cannot run vCPU {}: {}", msg.vcpu, e.err)),
            };
            let n = (resp.console_len as usize).min(resp.console.len());
            // Console lines of different vCPUs are printed whole, never interleaved mid-line.
            let buf = lines.entry(msg.vcpu).or_default();
            buf.extend_from_slice(&resp.console[..n]);
            if let Some(pos) = buf.iter().rposition(|&b| b == b'\n') {
                let whole: Vec<u8> = buf.drain(..=pos).collect();
                out.console(cfg.json, &whole)?;
            }
            match resp.kind {
                exit_kind::CONSOLE | exit_kind::INTERRUPTED => {}
                exit_kind::CHECKPOINT => {
                    seq += 1;
                    let gfns = harvest_gfns(dev, cfg.mem_bytes, true)?;
                    let stats = dev
                        .stats()
                        .map_err(|e| anyhow!("cannot read the VM statistics: {}", e.err))?;
                    let (json, human) =
                        checkpoint_event(seq, mode, &exit_counts(&stats.exits), &gfns);
                    out.event(cfg.json, &json, &human)?;
                    if let Some(a) = acks.get(msg.vcpu as usize) {
                        let _ = a.send(());
                    }
                }
                exit_kind::HLT => {
                    halted += 1;
                    if halted == cfg.vcpus {
                        break Ok(End::Hlt);
                    }
                }
                exit_kind::EXIT => break Ok(End::Exit(resp.code)),
                exit_kind::MMIO => {
                    break Ok(End::Mmio {
                        gpa: resp.gpa,
                        write: resp.write != 0,
                    })
                }
                exit_kind::TRIPLE_FAULT => break Ok(End::TripleFault),
                _ => {
                    break Ok(End::Error {
                        reason: resp.reason,
                        code: resp.code,
                        message: format!("vCPU {}: {}", msg.vcpu, message_text(&resp)),
                    })
                }
            }
        };
        // Stop the other vCPUs: a signal makes each pending RUN return.
        stop.store(true, Ordering::Release);
        drop(acks);
        loop {
            if let Ok(t) = threads.lock() {
                t.iter().for_each(|h| h.interrupt());
            }
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(m) => {
                    if let Ok(r) = m.resp {
                        let n = (r.console_len as usize).min(r.console.len());
                        lines
                            .entry(m.vcpu)
                            .or_default()
                            .extend_from_slice(&r.console[..n]);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        result
    })?;
    let mut rest: Vec<_> = lines.into_iter().filter(|(_, b)| !b.is_empty()).collect();
    rest.sort_by_key(|(v, _)| *v);
    for (_, mut b) in rest {
        b.push(b'\n');
        out.console(cfg.json, &b)?;
    }
    let gfns = harvest_gfns(dev, cfg.mem_bytes, true)?;
    let stats = dev
        .stats()
        .map_err(|e| anyhow!("cannot read the VM statistics: {}", e.err))?;
    let (json, human) = exit_event(&end, mode, seq, &stats, &gfns);
    out.event(cfg.json, &json, &human)?;
    Ok(end.status())
}
