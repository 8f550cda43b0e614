//! GPU health: from NVML events to faults the scheduler acts on.
//!
//! A dedicated thread blocks on [`GpuInventory::wait_health_event`] and
//! judges each event. Critical XIDs, double-bit ECC errors and a GPU lost
//! from the bus are faults of the GPU: the agent reports them once per GPU,
//! and the scheduler marks the GPU unhealthy, requeues the job on it without
//! counting against its restarts, and drains the node if its policy says so.
//! Some XIDs are the application's own doing (an illegal memory access, a
//! bad kernel launch); those are listed in `ignored_xids` and only logged,
//! as NVIDIA's XID catalogue advises.

use crate::gpu::{GpuInventory, HealthEvent};
use crate::task::Event;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// XIDs caused by the application rather than the GPU: 13 (graphics engine
/// exception), 31 (GPU memory page fault), 43 (GPU stopped processing), 45
/// (preemptive cleanup), 68 (video processor exception), 109 (context
/// switch timeout).
pub const DEFAULT_IGNORED_XIDS: &[u64] = &[13, 31, 43, 45, 68, 109];

/// How long one wait lasts: how quickly the thread notices shutdown.
const WAIT: Duration = Duration::from_millis(500);

/// A short description of well-known XIDs.
pub fn describe_xid(xid: u64) -> &'static str {
    match xid {
        48 => "double-bit ECC error",
        61 | 62 => "internal micro-controller error",
        63 | 64 => "ECC page retirement or row remapping event",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        119 | 120 => "GSP error",
        _ => "critical XID error",
    }
}

/// Whether an event is a fault of the GPU, and its reason in words.
pub fn verdict(ev: &HealthEvent, ignored: &[u64]) -> Option<String> {
    match ev {
        HealthEvent::Xid { xid, .. } if ignored.contains(xid) => None,
        HealthEvent::Xid { xid, .. } => Some(format!("XID {xid}: {}", describe_xid(*xid))),
        HealthEvent::DoubleBitEcc { .. } => Some("double-bit ECC error".into()),
        HealthEvent::Lost { .. } => Some("GPU is lost (fell off the bus)".into()),
    }
}

/// Start the watcher thread. `gpus` maps UUIDs to node-local indices.
pub fn watch(
    inventory: Arc<dyn GpuInventory>,
    gpus: Vec<(String, u32)>,
    ignored: Vec<u64>,
    events: UnboundedSender<Event>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("gpu-health".into())
        .spawn(move || {
            let mut reported: BTreeSet<u32> = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let ev = match inventory.wait_health_event(WAIT) {
                    Ok(Some(ev)) => ev,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!("GPU health events stopped: {e}");
                        return;
                    }
                };
                let Some(&(_, index)) = gpus.iter().find(|(u, _)| u == ev.uuid()) else {
                    tracing::warn!(uuid = ev.uuid(), "health event from an unknown GPU");
                    continue;
                };
                let Some(reason) = verdict(&ev, &ignored) else {
                    tracing::info!(gpu = index, ?ev, "GPU event ignored (application error)");
                    continue;
                };
                if !reported.insert(index) {
                    continue; // one report per GPU: the scheduler already knows
                }
                tracing::error!(gpu = index, "GPU fault: {reason}");
                let fault = Event::GpuFault {
                    index,
                    uuid: ev.uuid().to_string(),
                    reason,
                };
                if events.send(fault).is_err() {
                    return;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_xids_are_ignored_and_gpu_faults_named() {
        let xid = |xid| HealthEvent::Xid {
            uuid: "GPU-1".into(),
            xid,
        };
        let ignored = DEFAULT_IGNORED_XIDS;
        assert_eq!(verdict(&xid(13), ignored), None);
        assert_eq!(verdict(&xid(31), ignored), None);
        assert_eq!(
            verdict(&xid(79), ignored).as_deref(),
            Some("XID 79: GPU has fallen off the bus")
        );
        assert_eq!(
            verdict(&xid(13), &[]).as_deref(),
            Some("XID 13: critical XID error")
        );
        let ecc = HealthEvent::DoubleBitEcc {
            uuid: "GPU-1".into(),
        };
        assert_eq!(
            verdict(&ecc, ignored).as_deref(),
            Some("double-bit ECC error")
        );
        let lost = HealthEvent::Lost {
            uuid: "GPU-1".into(),
        };
        assert!(verdict(&lost, ignored).unwrap().contains("lost"));
    }
}
