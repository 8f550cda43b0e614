//! The mock's one piece of global state, and the logic of every NVML call in safe Rust.
//!
//! NVML is a process-wide library with reference-counted init, so the mock keeps a single
//! `Option<Lib>` behind a mutex: `None` until `nvmlInit`, `None` again after the last
//! `nvmlShutdown`. The FFI layer (`ffi.rs`) only translates pointers; everything it
//! answers comes from here as `Result<T, nvmlReturn_t>`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nvml_wrapper_sys::bindings::{
    nvmlEventTypeDoubleBitEccError, nvmlEventTypeXidCriticalError,
    nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST as GPU_IS_LOST,
    nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT as INVALID_ARGUMENT,
    nvmlReturn_enum_NVML_ERROR_LIBRARY_NOT_FOUND as LIBRARY_NOT_FOUND,
    nvmlReturn_enum_NVML_ERROR_NOT_FOUND as NOT_FOUND,
    nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED as NOT_SUPPORTED,
    nvmlReturn_enum_NVML_ERROR_TIMEOUT as TIMEOUT,
    nvmlReturn_enum_NVML_ERROR_UNINITIALIZED as UNINITIALIZED,
    nvmlReturn_enum_NVML_ERROR_UNKNOWN as UNKNOWN, nvmlReturn_t,
};

use crate::config::{read_config, read_faults, Fault, MockConfig, MockGpu, CONFIG_ENV, FAULTS_ENV};

/// An NVML return code other than success.
pub(crate) type Code = nvmlReturn_t;

/// The event types the mock can raise, hence the ones it reports as supported.
pub(crate) const SUPPORTED_EVENTS: u64 =
    (nvmlEventTypeXidCriticalError | nvmlEventTypeDoubleBitEccError) as u64;

/// How often a waiting `nvmlEventSetWait` looks at the fault file again.
const FAULT_POLL: Duration = Duration::from_millis(10);

/// The initialised library.
pub(crate) struct Lib {
    /// `nvmlInit` calls not yet matched by `nvmlShutdown`.
    refcount: u32,
    /// The machine, read once at the first `nvmlInit`.
    config: MockConfig,
    /// Where faults come from, if anywhere.
    faults_path: Option<PathBuf>,
    /// Live event sets by id.
    sets: HashMap<usize, EventSet>,
    /// Last complaint about the fault file, so it is printed once, not every 10 ms.
    last_fault_error: Option<String>,
}

/// One `nvmlEventSet_t`.
#[derive(Default)]
struct EventSet {
    /// GPU index to the event types registered for it.
    registered: BTreeMap<usize, u64>,
    /// How many copies of each fault this set has already seen (delivered or dropped).
    seen: HashMap<Fault, usize>,
}

/// What `nvmlEventSetWait` hands back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// An event on the GPU with this index.
    Event {
        /// Index of the GPU.
        index: usize,
        /// One `nvmlEventType*` bit.
        event_type: u64,
        /// The XID for XID events, 0 otherwise.
        data: u64,
    },
    /// A registered GPU fell off the bus: the wait fails with `NVML_ERROR_GPU_IS_LOST`.
    Lost,
}

static LIB: Mutex<Option<Lib>> = Mutex::new(None);

/// Event set ids are never reused, even across init cycles, so a stale handle is refused.
static NEXT_SET_ID: AtomicUsize = AtomicUsize::new(1);

fn lock() -> MutexGuard<'static, Option<Lib>> {
    // A panic while holding the lock was already turned into an error code; the state
    // itself is never left half-updated, so poisoning carries no information here.
    LIB.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `nvmlInit`: the first call reads the config named by [`CONFIG_ENV`].
pub(crate) fn init() -> Result<(), Code> {
    let mut guard = lock();
    if let Some(lib) = guard.as_mut() {
        lib.refcount += 1;
        return Ok(());
    }
    let Some(config_path) = std::env::var_os(CONFIG_ENV) else {
        eprintln!("muster-nvml-mock: {CONFIG_ENV} is not set; no GPUs to pretend");
        return Err(LIBRARY_NOT_FOUND);
    };
    let config = read_config(config_path.as_ref()).map_err(|e| {
        eprintln!("muster-nvml-mock: {e}");
        match e {
            crate::config::MockFileError::Io { .. } => LIBRARY_NOT_FOUND,
            _ => UNKNOWN,
        }
    })?;
    *guard = Some(Lib {
        refcount: 1,
        config,
        faults_path: std::env::var_os(FAULTS_ENV).map(PathBuf::from),
        sets: HashMap::new(),
        last_fault_error: None,
    });
    Ok(())
}

/// `nvmlShutdown`: the last call forgets the config and every event set.
pub(crate) fn shutdown() -> Result<(), Code> {
    let mut guard = lock();
    let lib = guard.as_mut().ok_or(UNINITIALIZED)?;
    lib.refcount -= 1;
    if lib.refcount == 0 {
        *guard = None;
    }
    Ok(())
}

/// Runs `f` on the initialised library, or fails with `NVML_ERROR_UNINITIALIZED`.
pub(crate) fn with_lib<T>(f: impl FnOnce(&mut Lib) -> Result<T, Code>) -> Result<T, Code> {
    lock().as_mut().map_or(Err(UNINITIALIZED), f)
}

impl Lib {
    /// `nvmlSystemGetDriverVersion`.
    pub(crate) fn driver_version(&self) -> &str {
        &self.config.driver_version
    }

    /// `nvmlDeviceGetCount`.
    pub(crate) fn device_count(&self) -> usize {
        self.config.gpus.len()
    }

    /// The GPU at `index`, unless it does not exist or has been lost.
    pub(crate) fn gpu(&mut self, index: usize) -> Result<&MockGpu, Code> {
        let uuid = self
            .config
            .gpus
            .get(index)
            .ok_or(INVALID_ARGUMENT)?
            .uuid
            .clone();
        if self.is_lost(&uuid) {
            return Err(GPU_IS_LOST);
        }
        self.config.gpus.get(index).ok_or(INVALID_ARGUMENT)
    }

    /// The index of the GPU with this UUID (`nvmlDeviceGetHandleByUUID`).
    pub(crate) fn index_by_uuid(&mut self, uuid: &str) -> Result<usize, Code> {
        let index = self.config.index_of(uuid).ok_or(NOT_FOUND)?;
        self.gpu(index).map(|_| index)
    }

    fn is_lost(&mut self, uuid: &str) -> bool {
        self.faults()
            .iter()
            .any(|fault| matches!(fault, Fault::Lost { uuid: lost } if lost == uuid))
    }

    /// The current fault list. An unreadable file counts as empty and is reported once.
    fn faults(&mut self) -> Vec<Fault> {
        let Some(path) = &self.faults_path else {
            return Vec::new();
        };
        match read_faults(path) {
            Ok(faults) => {
                self.last_fault_error = None;
                faults
            }
            Err(e) => {
                let message = e.to_string();
                if self.last_fault_error.as_ref() != Some(&message) {
                    eprintln!("muster-nvml-mock: ignoring fault file: {message}");
                    self.last_fault_error = Some(message);
                }
                Vec::new()
            }
        }
    }

    /// `nvmlEventSetCreate`. Faults already listed count as seen by the new set.
    pub(crate) fn create_set(&mut self) -> usize {
        let id = NEXT_SET_ID.fetch_add(1, Ordering::Relaxed);
        let mut set = EventSet::default();
        for fault in self.faults() {
            *set.seen.entry(fault).or_default() += 1;
        }
        self.sets.insert(id, set);
        id
    }

    /// `nvmlEventSetFree`.
    pub(crate) fn free_set(&mut self, id: usize) -> Result<(), Code> {
        self.sets.remove(&id).map(drop).ok_or(INVALID_ARGUMENT)
    }

    /// `nvmlDeviceRegisterEvents`.
    pub(crate) fn register(&mut self, set: usize, index: usize, types: u64) -> Result<(), Code> {
        self.gpu(index)?;
        if types & !SUPPORTED_EVENTS != 0 {
            return Err(NOT_SUPPORTED);
        }
        let set = self.sets.get_mut(&set).ok_or(INVALID_ARGUMENT)?;
        *set.registered.entry(index).or_default() |= types;
        Ok(())
    }

    /// The next fault this set has not seen and is registered for, if any.
    ///
    /// Unseen faults the set is not registered for are marked seen and dropped, as NVML
    /// drops events nobody registered for.
    fn next_delivery(&mut self, set_id: usize) -> Result<Option<Delivery>, Code> {
        let faults = self.faults();
        let set = self.sets.get_mut(&set_id).ok_or(INVALID_ARGUMENT)?;
        // Forget copies that left the file, so a fault removed and added again is new.
        let mut listed: HashMap<&Fault, usize> = HashMap::new();
        for fault in &faults {
            *listed.entry(fault).or_default() += 1;
        }
        set.seen.retain(|fault, seen| {
            *seen = (*seen).min(listed.get(fault).copied().unwrap_or(0));
            *seen > 0
        });

        let mut counted: HashMap<&Fault, usize> = HashMap::new();
        for fault in &faults {
            let nth = counted.entry(fault).or_default();
            *nth += 1;
            let seen = set.seen.entry(fault.clone()).or_default();
            if *nth <= *seen {
                continue;
            }
            *seen += 1;
            let Some(index) = self.config.index_of(fault.uuid()) else {
                eprintln!("muster-nvml-mock: fault for unknown GPU {}", fault.uuid());
                continue;
            };
            let Some(&mask) = set.registered.get(&index) else {
                continue;
            };
            let delivery = match fault {
                Fault::Lost { .. } => Some(Delivery::Lost),
                Fault::Xid { xid, .. } => event(index, mask, nvmlEventTypeXidCriticalError, *xid),
                Fault::DoubleBitEcc { .. } => event(index, mask, nvmlEventTypeDoubleBitEccError, 0),
            };
            if delivery.is_some() {
                return Ok(delivery);
            }
        }
        Ok(None)
    }
}

fn event(index: usize, mask: u64, event_type: u32, data: u64) -> Option<Delivery> {
    let event_type = u64::from(event_type);
    (mask & event_type != 0).then_some(Delivery::Event {
        index,
        event_type,
        data,
    })
}

/// `nvmlEventSetWait`: polls the fault file until something arrives or `timeout` passes.
/// The lock is not held while sleeping, so other calls go on meanwhile.
pub(crate) fn wait_event(set: usize, timeout: Duration) -> Result<Delivery, Code> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(delivery) = with_lib(|lib| lib.next_delivery(set))? {
            return Ok(delivery);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TIMEOUT);
        }
        std::thread::sleep(left.min(FAULT_POLL));
    }
}
