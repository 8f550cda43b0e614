//! GPU inventory: what GPUs this host has, and when one of them goes bad.
//!
//! The agent needs two things from the GPUs and nothing more. At start, and whenever it
//! registers with a scheduler, it needs the list of devices: the UUID that names a GPU
//! across the cluster, the minor number that names its `/dev/nvidiaN` node (the cgroup
//! device rules are written in minors), its memory, its PCI address and NUMA node (for
//! placement), and whether it still answers. While running, it needs to hear about
//! faults that should take a GPU out of service: critical XID errors, double-bit ECC
//! errors, and a GPU falling off the bus. Those two needs are the whole
//! [`GpuInventory`] trait; everything else NVML can do is deliberately left out, so a
//! fake stays small and honest.
//!
//! Two backends sit behind the trait, chosen by [`GpuBackendConfig`]:
//!
//! - **`nvml`** (`nvml.rs`) loads `libnvidia-ml.so` at run time through `nvml-wrapper`.
//!   The library path is configurable, which is the seam the tests use: the
//!   `muster-nvml-mock` crate builds a stand-in library driven by a JSON file, so this
//!   exact code path (`dlopen`, symbol lookup, struct layouts, error codes, event sets)
//!   runs in every test, without a GPU.
//! - **`simulated`** (`simulated.rs`) invents `count` identical GPUs with stable UUIDs.
//!   It is for development clusters and for running many agents on one machine; it
//!   never reports a fault.
//!
//! Health events arrive by blocking: [`GpuInventory::wait_health_event`] waits up to a
//! timeout, so the caller runs it on a dedicated thread and forwards what it gets. NVML
//! event sets are blocking and not thread-safe, which is why the trait does not pretend
//! to be async. An event is a fact, not a verdict: whether XID 13 (a user's bad kernel)
//! should drain a GPU is policy, and policy lives above this module.

#![forbid(unsafe_code)]

mod nvml;
mod simulated;

use std::path::PathBuf;
use std::time::Duration;

use nvml_wrapper::error::NvmlError;

pub use simulated::SimulatedInventory;

/// One GPU as the agent reports it to the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Gpu {
    /// NVML index on this host (enumeration order; not stable across reboots).
    pub index: u32,
    /// Cluster-wide name of the GPU, e.g. `GPU-5b9a3e8c-...`. Stable across reboots.
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub model: String,
    /// Total framebuffer memory.
    pub memory_bytes: u64,
    /// Device minor number: the GPU is `/dev/nvidia<minor>`, char device `195:<minor>`.
    pub minor: u32,
    /// PCI address as NVML prints it, e.g. `00000000:18:00.0`.
    pub pci_bus_id: String,
    /// NUMA node closest to the GPU's memory; -1 when unknown.
    pub numa_node: i32,
    /// False once the GPU stops answering (fell off the bus).
    pub healthy: bool,
    /// GPUs of this host with equal `link_group` share the closest
    /// interconnect NVML reports between them (the same board, PCIe switch
    /// or NVLink island: `nvmlDeviceGetTopologyCommonAncestor` at
    /// `INTERNAL`/`SINGLE`); the value is the lowest index in the group.
    /// Where NVML cannot say, GPUs are grouped by NUMA node.
    #[serde(default)]
    pub link_group: u32,
}

/// A fault reported by a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// A critical XID error; `xid` is NVIDIA's error number (999 when NVML does not know).
    Xid {
        /// The GPU that reported it.
        uuid: String,
        /// The XID, e.g. 79 ("GPU has fallen off the bus").
        xid: u64,
    },
    /// The GPU no longer answers: it fell off the bus or is otherwise inaccessible.
    Lost {
        /// The GPU that is gone.
        uuid: String,
    },
    /// An uncorrectable (double-bit) ECC memory error.
    DoubleBitEcc {
        /// The GPU that reported it.
        uuid: String,
    },
}

impl HealthEvent {
    /// The UUID of the GPU the event concerns.
    pub fn uuid(&self) -> &str {
        match self {
            HealthEvent::Xid { uuid, .. }
            | HealthEvent::Lost { uuid }
            | HealthEvent::DoubleBitEcc { uuid } => uuid,
        }
    }
}

/// The GPUs of this host, and their faults.
pub trait GpuInventory: Send + Sync + std::fmt::Debug {
    /// Which backend this is: `"nvml"` or `"simulated"`.
    fn backend(&self) -> &'static str;

    /// All GPUs, in index order. A GPU that has been lost stays in the list with
    /// `healthy: false`.
    fn gpus(&self) -> Result<Vec<Gpu>, GpuError>;

    /// Block up to `timeout` for the next health event (None on timeout). Called from a dedicated thread.
    ///
    /// An error means health events cannot be delivered (the driver does not support
    /// them, or the event thread stopped); it will not get better by asking again, so
    /// the caller should log it and stop polling.
    fn wait_health_event(&self, timeout: Duration) -> Result<Option<HealthEvent>, GpuError>;
}

/// What can go wrong reading GPUs. Every variant names the library or GPU involved.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The NVML library could not be loaded or initialised.
    #[error("cannot initialise NVML from {}: {source}", library.display())]
    Load {
        /// The library path tried (the system default when none was configured).
        library: PathBuf,
        /// What `nvml-wrapper` reported.
        #[source]
        source: NvmlError,
    },
    /// An NVML call about the whole host failed.
    #[error("NVML call {call} failed (library {}): {source}", library.display())]
    Nvml {
        /// The library in use.
        library: PathBuf,
        /// The NVML function, e.g. `nvmlDeviceGetCount`.
        call: &'static str,
        /// What NVML reported.
        #[source]
        source: NvmlError,
    },
    /// An NVML call about one GPU failed.
    #[error("NVML call {call} failed for GPU {index}{}: {source}", uuid_suffix(.uuid))]
    Device {
        /// NVML index of the GPU.
        index: u32,
        /// Its UUID, when it was known before the failure.
        uuid: Option<String>,
        /// The NVML function, e.g. `nvmlDeviceGetMemoryInfo`.
        call: &'static str,
        /// What NVML reported.
        #[source]
        source: NvmlError,
    },
    /// Health events cannot be delivered.
    #[error("GPU health events are unavailable from {}: {reason}", library.display())]
    HealthUnavailable {
        /// The library in use.
        library: PathBuf,
        /// Why.
        reason: String,
    },
    /// The simulated backend was configured with impossible values.
    #[error("invalid simulated GPU configuration: {reason}")]
    InvalidSimulated {
        /// What is wrong.
        reason: String,
    },
}

fn uuid_suffix(uuid: &Option<String>) -> String {
    uuid.as_ref().map(|u| format!(" ({u})")).unwrap_or_default()
}

/// Which GPU backend to use: the `[gpu]` table of the agent config.
///
/// ```toml
/// [gpu]
/// backend = "nvml"                          # library_path optional
/// # backend = "simulated"
/// # count = 8
/// # seed = "node-a"                         # distinct per agent on one host
/// ```
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum GpuBackendConfig {
    /// Real GPUs through NVML.
    Nvml {
        /// Path of `libnvidia-ml.so`; default: the system's `libnvidia-ml.so.1`.
        #[serde(default)]
        library_path: Option<PathBuf>,
    },
    /// Made-up GPUs that never fail.
    Simulated {
        /// How many GPUs.
        count: u32,
        /// Product name each reports.
        #[serde(default = "default_model")]
        model: String,
        /// Memory of each, in bytes.
        #[serde(default = "default_memory_bytes")]
        memory_bytes: u64,
        /// Minor number of GPU 0; GPU i gets `first_minor + i`.
        #[serde(default)]
        first_minor: u32,
        /// Mixed into the UUIDs, so agents sharing a host (use the node name) differ.
        #[serde(default)]
        seed: String,
    },
}

/// Default simulated model name.
pub const DEFAULT_SIMULATED_MODEL: &str = "NVIDIA H100 80GB HBM3";
/// Default simulated memory: 80 GiB.
pub const DEFAULT_SIMULATED_MEMORY_BYTES: u64 = 80 << 30;

fn default_model() -> String {
    DEFAULT_SIMULATED_MODEL.to_owned()
}

fn default_memory_bytes() -> u64 {
    DEFAULT_SIMULATED_MEMORY_BYTES
}

/// Opens the configured backend. For NVML this loads and initialises the library, reads
/// every GPU once (so a broken setup fails here, at start, not at first use) and starts
/// listening for health events.
pub fn open(backend: &GpuBackendConfig) -> Result<Box<dyn GpuInventory>, GpuError> {
    match backend {
        GpuBackendConfig::Nvml { library_path } => Ok(Box::new(nvml::NvmlInventory::open(
            library_path.as_deref(),
        )?)),
        GpuBackendConfig::Simulated {
            count,
            model,
            memory_bytes,
            first_minor,
            seed,
        } => Ok(Box::new(SimulatedInventory::new(
            *count,
            model,
            *memory_bytes,
            *first_minor,
            seed,
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_config_parses_with_defaults() {
        let nvml: GpuBackendConfig = toml::from_str(r#"backend = "nvml""#).expect("nvml");
        assert_eq!(nvml, GpuBackendConfig::Nvml { library_path: None });

        let sim: GpuBackendConfig =
            toml::from_str("backend = \"simulated\"\ncount = 2").expect("simulated");
        assert_eq!(
            sim,
            GpuBackendConfig::Simulated {
                count: 2,
                model: DEFAULT_SIMULATED_MODEL.into(),
                memory_bytes: 80 * 1024 * 1024 * 1024,
                first_minor: 0,
                seed: String::new(),
            }
        );
    }

    #[test]
    fn backend_config_rejects_unknown_keys() {
        let err =
            toml::from_str::<GpuBackendConfig>("backend = \"simulated\"\ncount = 1\ncuont = 2")
                .expect_err("typo must be refused");
        assert!(err.to_string().contains("cuont"), "{err}");
        assert!(toml::from_str::<GpuBackendConfig>(r#"backend = "cuda""#).is_err());
    }

    #[test]
    fn open_dispatches_on_backend() {
        let inventory = open(&GpuBackendConfig::Simulated {
            count: 3,
            model: "X".into(),
            memory_bytes: 1,
            first_minor: 0,
            seed: "n1".into(),
        })
        .expect("simulated opens");
        assert_eq!(inventory.backend(), "simulated");
        assert_eq!(inventory.gpus().expect("gpus").len(), 3);
    }

    #[test]
    fn errors_name_what_failed() {
        let err = GpuError::Device {
            index: 2,
            uuid: Some("GPU-x".into()),
            call: "nvmlDeviceGetName",
            source: NvmlError::GpuLost,
        };
        let text = err.to_string();
        assert!(
            text.contains("GPU 2 (GPU-x)") && text.contains("nvmlDeviceGetName"),
            "{text}"
        );
    }
}
