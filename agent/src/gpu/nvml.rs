//! The NVML backend: real GPUs through `libnvidia-ml.so`, loaded at run time.
//!
//! Inventory is read fresh on every [`GpuInventory::gpus`] call (NVML answers from the
//! driver's memory; it is cheap) and once at open, which both fails early on a broken
//! install and remembers each GPU, so one that later falls off the bus can still be
//! listed, as unhealthy, under its UUID.
//!
//! Health events need an NVML event set, which borrows the `Nvml` handle and must not be
//! shared between threads. Rather than build a self-referential struct, the inventory
//! keeps the handle in an `Arc` and gives a clone to one worker thread, which creates the
//! set, registers every GPU for the fault types it supports, and then waits on it in
//! short slices (so it notices when the inventory is dropped), forwarding what it sees
//! through a channel. `wait_health_event` just receives from that channel.
//!
//! NVML reports a GPU that fell off the bus not as an event but as the error
//! `GPU_IS_LOST` from the wait, without saying which GPU. The worker then asks each GPU
//! for its UUID; those that answer `GPU_IS_LOST` are reported once each as
//! [`HealthEvent::Lost`].

use std::collections::{BTreeSet, HashSet};
use std::ffi::c_ulong;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::event::EventData;
use nvml_wrapper::{Device, EventSet, Nvml};
use tracing::{debug, info, warn};

use super::{Gpu, GpuError, GpuInventory, HealthEvent};

/// What `nvml-wrapper` loads when no path is configured.
const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// Longest single wait on the event set: how quickly the worker notices shutdown.
const EVENT_SLICE_MS: u32 = 200;

/// The fault types the agent listens for, where a GPU supports them.
const HEALTH_EVENTS: EventTypes =
    EventTypes::CRITICAL_XID_ERROR.union(EventTypes::DOUBLE_BIT_ECC_ERROR);

/// `NVML_AFFINITY_SCOPE_NODE` from `nvml.h` (not re-exported by `nvml-wrapper`).
const AFFINITY_SCOPE_NODE: u32 = 0;

/// Words of NUMA bitmask to ask for: 4 × 64 = 256 nodes.
const AFFINITY_WORDS: usize = 4;

/// XID NVML reports when it does not know the number.
const UNKNOWN_XID: u64 = 999;

type EventResult = Result<HealthEvent, GpuError>;

/// GPUs read through NVML.
pub(super) struct NvmlInventory {
    nvml: Arc<Nvml>,
    library: PathBuf,
    /// Every GPU that answered at open, in index order.
    known: Vec<Gpu>,
    /// Health events from the worker thread (a `Receiver` is not `Sync`, hence the lock).
    events: Mutex<Receiver<EventResult>>,
    /// Set when health events could not be set up at all.
    health_unavailable: Option<String>,
    /// Tells the worker to finish.
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NvmlInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlInventory")
            .field("library", &self.library)
            .field("gpus", &self.known.len())
            .field("health_unavailable", &self.health_unavailable)
            .finish_non_exhaustive()
    }
}

impl NvmlInventory {
    /// Loads and initialises NVML from `library_path` (default: the system library),
    /// reads every GPU, and starts the health event thread.
    pub(super) fn open(library_path: Option<&Path>) -> Result<Self, GpuError> {
        let library =
            library_path.map_or_else(|| PathBuf::from(DEFAULT_LIBRARY), Path::to_path_buf);
        let nvml = Nvml::builder()
            .lib_path(library.as_os_str())
            .init()
            .map_err(|source| GpuError::Load {
                library: library.clone(),
                source,
            })?;
        let nvml = Arc::new(nvml);
        let known = read_all(&nvml, &library, &[])?;
        match nvml.sys_driver_version() {
            Ok(driver) => {
                info!(library = %library.display(), %driver, gpus = known.len(), "NVML initialised")
            }
            Err(e) => {
                warn!(library = %library.display(), error = %e, "NVML initialised; driver version unknown")
            }
        }

        let (events_tx, events_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (worker, health_unavailable) = start_worker(Watcher {
            nvml: Arc::clone(&nvml),
            library: library.clone(),
            gpus: known
                .iter()
                .map(|gpu| (gpu.index, gpu.uuid.clone()))
                .collect(),
            stop: Arc::clone(&stop),
            events: events_tx,
        });
        if let Some(reason) = &health_unavailable {
            warn!(library = %library.display(), %reason, "GPU health events unavailable");
        }
        Ok(Self {
            nvml,
            library,
            known,
            events: Mutex::new(events_rx),
            health_unavailable,
            stop,
            worker,
        })
    }

    fn unavailable(&self, reason: impl Into<String>) -> GpuError {
        GpuError::HealthUnavailable {
            library: self.library.clone(),
            reason: reason.into(),
        }
    }
}

impl GpuInventory for NvmlInventory {
    fn backend(&self) -> &'static str {
        "nvml"
    }

    fn gpus(&self) -> Result<Vec<Gpu>, GpuError> {
        read_all(&self.nvml, &self.library, &self.known)
    }

    fn wait_health_event(&self, timeout: Duration) -> Result<Option<HealthEvent>, GpuError> {
        if let Some(reason) = &self.health_unavailable {
            return Err(self.unavailable(reason.clone()));
        }
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        match events.recv_timeout(timeout) {
            Ok(Ok(event)) => Ok(Some(event)),
            Ok(Err(error)) => Err(error),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.unavailable("the NVML event thread has stopped"))
            }
        }
    }
}

impl Drop for NvmlInventory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take() {
            // Returns within one event slice; joining makes NVML shut down here, not later.
            if worker.join().is_err() {
                warn!(library = %self.library.display(), "NVML event thread panicked");
            }
        }
    }
}

/// Why reading one GPU failed.
struct ReadError {
    call: &'static str,
    uuid: Option<String>,
    source: NvmlError,
}

/// Reads every GPU. One that is lost is taken from `known` (marked unhealthy) or, if
/// it was never seen, left out with a warning; any other failure is an error.
fn read_all(nvml: &Nvml, library: &Path, known: &[Gpu]) -> Result<Vec<Gpu>, GpuError> {
    let count = nvml.device_count().map_err(|source| GpuError::Nvml {
        library: library.to_owned(),
        call: "nvmlDeviceGetCount",
        source,
    })?;
    let mut gpus = Vec::new();
    for index in 0..count {
        let remembered = known.iter().find(|gpu| gpu.index == index);
        match read_gpu(nvml, index) {
            Ok(gpu) => gpus.push(gpu),
            Err(ReadError {
                source: NvmlError::GpuLost,
                ..
            }) => match remembered {
                Some(gpu) => gpus.push(Gpu {
                    healthy: false,
                    ..gpu.clone()
                }),
                None => warn!(
                    index,
                    "GPU is lost and was never identified; leaving it out"
                ),
            },
            Err(ReadError { call, uuid, source }) => {
                let uuid = uuid.or_else(|| remembered.map(|gpu| gpu.uuid.clone()));
                return Err(GpuError::Device {
                    index,
                    uuid,
                    call,
                    source,
                });
            }
        }
    }
    assign_link_groups(nvml, &mut gpus);
    Ok(gpus)
}

/// Group GPUs that share a board, PCIe switch or NVLink island (common
/// ancestor `INTERNAL` or `SINGLE`); each group is named by its lowest
/// index. A pair NVML cannot judge falls back to "same NUMA node".
fn assign_link_groups(nvml: &Nvml, gpus: &mut [Gpu]) {
    use nvml_wrapper::enum_wrappers::device::TopologyLevel;
    let n = gpus.len();
    let mut group: Vec<usize> = (0..n).collect();
    fn root(g: &mut [usize], mut i: usize) -> usize {
        while g[i] != i {
            g[i] = g[g[i]];
            i = g[i];
        }
        i
    }
    for i in 0..n {
        for j in i + 1..n {
            let close = match (
                nvml.device_by_index(gpus[i].index),
                nvml.device_by_index(gpus[j].index),
            ) {
                (Ok(a), Ok(b)) => match a.topology_common_ancestor(b) {
                    Ok(level) => matches!(level, TopologyLevel::Internal | TopologyLevel::Single),
                    Err(_) => gpus[i].numa_node == gpus[j].numa_node,
                },
                _ => false,
            };
            if close {
                let (a, b) = (root(&mut group, i), root(&mut group, j));
                group[a.max(b)] = a.min(b);
            }
        }
    }
    for i in 0..n {
        let r = root(&mut group, i);
        gpus[i].link_group = gpus[r].index;
    }
}

fn read_gpu(nvml: &Nvml, index: u32) -> Result<Gpu, ReadError> {
    let device = nvml
        .device_by_index(index)
        .map_err(failed("nvmlDeviceGetHandleByIndex", None))?;
    let uuid = device.uuid().map_err(failed("nvmlDeviceGetUUID", None))?;
    let known = Some(uuid.as_str());
    Ok(Gpu {
        index,
        model: device.name().map_err(failed("nvmlDeviceGetName", known))?,
        memory_bytes: device
            .memory_info()
            .map_err(failed("nvmlDeviceGetMemoryInfo", known))?
            .total,
        minor: device
            .minor_number()
            .map_err(failed("nvmlDeviceGetMinorNumber", known))?,
        pci_bus_id: device
            .pci_info()
            .map_err(failed("nvmlDeviceGetPciInfo", known))?
            .bus_id,
        numa_node: numa_node(&device).map_err(failed("nvmlDeviceGetMemoryAffinity", known))?,
        healthy: true,
        link_group: index,
        uuid,
    })
}

fn failed(call: &'static str, uuid: Option<&str>) -> impl FnOnce(NvmlError) -> ReadError {
    let uuid = uuid.map(str::to_owned);
    move |source| ReadError { call, uuid, source }
}

/// The lowest NUMA node in the GPU's memory affinity, or -1 where NVML cannot say.
/// Only `GPU_IS_LOST` is an error: a missing NUMA node should not hide a working GPU.
fn numa_node(device: &Device<'_>) -> Result<i32, NvmlError> {
    match device.memory_affinity(AFFINITY_WORDS, AFFINITY_SCOPE_NODE) {
        Ok(words) => Ok(lowest_bit(&words).unwrap_or(-1)),
        Err(NvmlError::GpuLost) => Err(NvmlError::GpuLost),
        Err(e) => {
            debug!(error = %e, "NUMA affinity unavailable");
            Ok(-1)
        }
    }
}

fn lowest_bit(words: &[c_ulong]) -> Option<i32> {
    let bits = c_ulong::BITS as usize;
    let (word, value) = words.iter().enumerate().find(|(_, value)| **value != 0)?;
    i32::try_from(word * bits + value.trailing_zeros() as usize).ok()
}

/// What the health worker thread owns.
struct Watcher {
    nvml: Arc<Nvml>,
    library: PathBuf,
    /// (index, UUID) of every GPU to watch.
    gpus: Vec<(u32, String)>,
    stop: Arc<AtomicBool>,
    events: Sender<EventResult>,
}

/// Starts the worker and waits until it has registered for events (so no fault after
/// `open` returns is missed). Returns the thread, or why there are no health events.
fn start_worker(watcher: Watcher) -> (Option<JoinHandle<()>>, Option<String>) {
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("nvml-health".into())
        .spawn(move || watcher.run(ready_tx));
    let worker = match spawned {
        Ok(worker) => worker,
        Err(e) => return (None, Some(format!("cannot start the event thread: {e}"))),
    };
    let unavailable = match ready_rx.recv() {
        Ok(Ok(registered)) => {
            info!(gpus = registered, "watching GPU health events");
            None
        }
        Ok(Err(reason)) => Some(reason),
        Err(_) => Some("the event thread exited while starting".to_owned()),
    };
    (Some(worker), unavailable)
}

impl Watcher {
    fn run(self, ready: SyncSender<Result<usize, String>>) {
        let (set, registered) = match build_event_set(&self.nvml, &self.gpus) {
            Ok(built) => built,
            Err(e) => {
                // If `open` is gone there is nobody to tell; nothing else to do.
                let _ = ready.send(Err(format!("cannot create an NVML event set: {e}")));
                return;
            }
        };
        let _ = ready.send(Ok(registered));
        let mut lost = HashSet::new();
        while !self.stop.load(Ordering::Relaxed) {
            let found = match set.wait(EVENT_SLICE_MS) {
                Ok(data) => self.convert(&data).into_iter().collect(),
                Err(NvmlError::Timeout) => continue,
                Err(NvmlError::GpuLost) => {
                    let newly = self.newly_lost(&mut lost);
                    if newly.is_empty() {
                        // NVML may keep failing the wait; don't spin on it.
                        std::thread::sleep(Duration::from_millis(EVENT_SLICE_MS.into()));
                    }
                    newly
                }
                Err(e) => {
                    let reason = format!("waiting for NVML events failed: {e}");
                    let _ = self.events.send(Err(GpuError::HealthUnavailable {
                        library: self.library.clone(),
                        reason,
                    }));
                    return;
                }
            };
            for event in found {
                if self.events.send(Ok(event)).is_err() {
                    return; // The inventory is gone.
                }
            }
        }
    }

    /// Turns an NVML event into ours; `None` for types we did not ask for or GPUs we
    /// cannot name.
    fn convert(&self, data: &EventData<'_>) -> Option<HealthEvent> {
        let uuid = match data.device.uuid() {
            Ok(uuid) => uuid,
            // A GPU in trouble may no longer say its UUID; its index may still do.
            Err(e) => match data.device.index().ok().and_then(|i| self.uuid_of(i)) {
                Some(uuid) => uuid,
                None => {
                    warn!(error = %e, event = ?data.event_type, "NVML event from an unidentifiable GPU");
                    return None;
                }
            },
        };
        if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
            let xid = match data.event_data {
                Some(XidError::Value(xid)) => xid,
                Some(XidError::Unknown) | None => UNKNOWN_XID,
            };
            Some(HealthEvent::Xid { uuid, xid })
        } else if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
            Some(HealthEvent::DoubleBitEcc { uuid })
        } else {
            debug!(event = ?data.event_type, %uuid, "ignoring NVML event");
            None
        }
    }

    fn uuid_of(&self, index: u32) -> Option<String> {
        self.gpus
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, uuid)| uuid.clone())
    }

    /// Asks every GPU for its UUID; reports each newly silent one. A GPU that answers
    /// again is forgotten, so losing it a second time is reported again.
    fn newly_lost(&self, lost: &mut HashSet<String>) -> Vec<HealthEvent> {
        let mut newly = Vec::new();
        for (index, uuid) in &self.gpus {
            let answer = self
                .nvml
                .device_by_index(*index)
                .and_then(|device| device.uuid());
            if matches!(answer, Err(NvmlError::GpuLost)) {
                if lost.insert(uuid.clone()) {
                    warn!(index, %uuid, "GPU fell off the bus");
                    newly.push(HealthEvent::Lost { uuid: uuid.clone() });
                }
            } else {
                lost.remove(uuid);
            }
        }
        newly
    }
}

/// Creates an event set and registers each GPU for the health events it supports.
///
/// NVML frees the set when a registration fails, so on failure the set is rebuilt
/// without that GPU (which then goes unwatched, with a warning). Returns the set and
/// how many GPUs are registered on it.
fn build_event_set<'n>(
    nvml: &'n Nvml,
    gpus: &[(u32, String)],
) -> Result<(EventSet<'n>, usize), NvmlError> {
    let mut skipped = BTreeSet::new();
    loop {
        let mut set = Some(nvml.create_event_set()?);
        let mut registered = 0;
        for (index, uuid) in gpus.iter().filter(|(index, _)| !skipped.contains(index)) {
            let Some((device, types)) = health_events_of(nvml, *index, uuid) else {
                continue;
            };
            let Some(current) = set.take() else { break };
            match device.register_events(types, current) {
                Ok(current) => {
                    set = Some(current);
                    registered += 1;
                }
                Err(e) => {
                    warn!(index, %uuid, error = %e, "cannot watch GPU health events");
                    skipped.insert(*index);
                    break;
                }
            }
        }
        if let Some(set) = set {
            return Ok((set, registered));
        }
    }
}

/// The device and the health event types it supports, or `None` (logged) if none.
fn health_events_of<'n>(
    nvml: &'n Nvml,
    index: u32,
    uuid: &str,
) -> Option<(Device<'n>, EventTypes)> {
    let device = nvml
        .device_by_index(index)
        .map_err(|e| warn!(index, %uuid, error = %e, "cannot watch GPU health events"))
        .ok()?;
    match device.supported_event_types() {
        Ok(supported) if supported.intersects(HEALTH_EVENTS) => {
            Some((device, supported & HEALTH_EVENTS))
        }
        Ok(_) => {
            info!(index, %uuid, "GPU reports no XID or ECC events");
            None
        }
        Err(e) => {
            warn!(index, %uuid, error = %e, "cannot list GPU event types");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_bit_finds_the_first_numa_node() {
        assert_eq!(lowest_bit(&[0, 0]), None);
        assert_eq!(lowest_bit(&[0b100, 0]), Some(2));
        assert_eq!(lowest_bit(&[0, 1]), Some(c_ulong::BITS as i32));
    }

    #[test]
    fn missing_library_is_a_load_error_naming_the_path() {
        let path = Path::new("/nonexistent/libnvidia-ml.so.1");
        let err = NvmlInventory::open(Some(path)).expect_err("no such library");
        assert!(matches!(err, GpuError::Load { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent/libnvidia-ml.so.1"),
            "{err}"
        );
    }
}
