//! The files that drive the mock: the GPU description and the fault list.
//!
//! Both are JSON so that shell scripts and Rust tests can write them alike. Tests in Rust
//! use [`write_config`] and [`write_faults`]; the latter replaces the file atomically so
//! that a mock polling it never reads half a list.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable holding the path of the [`MockConfig`] JSON file. Read by `nvmlInit`.
pub const CONFIG_ENV: &str = "MUSTER_NVML_MOCK_CONFIG";

/// Environment variable holding the path of the fault list (a JSON array of [`Fault`]).
/// Optional; read by `nvmlInit`. The file itself is re-read on every call and event wait.
pub const FAULTS_ENV: &str = "MUSTER_NVML_MOCK_FAULTS";

/// Longest name or UUID NVML hands out (its `*_V2_BUFFER_SIZE`, less the NUL).
const MAX_DEVICE_STRING: usize = 95;
/// Longest driver version (`NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE`, less the NUL).
const MAX_DRIVER_VERSION: usize = 79;
/// Longest PCI bus id (`NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE`, less the NUL).
const MAX_BUS_ID: usize = 31;
/// The most GPUs one mock host may have; keeps device handles in a small fixed range.
pub const MAX_GPUS: usize = 1024;

/// The machine the mock pretends to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// What `nvmlSystemGetDriverVersion` answers, e.g. `"550.54.15"`.
    pub driver_version: String,
    /// The GPUs, in NVML index order.
    pub gpus: Vec<MockGpu>,
}

/// One simulated GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockGpu {
    /// `nvmlDeviceGetUUID`, e.g. `"GPU-12345678-..."`. Must be unique on the host.
    pub uuid: String,
    /// `nvmlDeviceGetName`, e.g. `"NVIDIA H100 80GB HBM3"`.
    pub name: String,
    /// Total framebuffer memory in bytes (`nvmlDeviceGetMemoryInfo`).
    pub memory_bytes: u64,
    /// `nvmlDeviceGetMinorNumber`: the `N` of `/dev/nvidiaN`.
    pub minor: u32,
    /// `busId` of `nvmlDeviceGetPciInfo`, `domain:bus:device.function` in hex,
    /// e.g. `"00000000:18:00.0"`. Returned exactly as written here.
    pub pci_bus_id: String,
    /// NUMA node the GPU hangs off; negative means "unknown" (NVML then says not supported).
    #[serde(default = "no_numa_node")]
    pub numa_node: i32,
    /// GPUs sharing a group are NVLink peers: `nvmlDeviceGetTopologyCommonAncestor`
    /// answers `NVML_TOPOLOGY_SINGLE` between them and `NVML_TOPOLOGY_SYSTEM` otherwise.
    #[serde(default)]
    pub nvlink_group: Option<u32>,
}

fn no_numa_node() -> i32 {
    -1
}

/// A fault to inject, one element of the JSON array in the [`FAULTS_ENV`] file.
///
/// Each fault is delivered once, as one event, to each event set that existed when the
/// fault appeared in the file (faults already listed when a set is created are not
/// replayed to it). Listing the same fault twice delivers it twice. A `lost` fault also
/// makes every call on that GPU fail with `NVML_ERROR_GPU_IS_LOST` for as long as it is
/// listed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// A critical XID error: an `nvmlEventTypeXidCriticalError` event with `eventData = xid`.
    Xid {
        /// The GPU that reports it.
        uuid: String,
        /// The XID number, e.g. 79 ("GPU has fallen off the bus") or 48 (double-bit ECC).
        xid: u64,
    },
    /// A double-bit ECC error: an `nvmlEventTypeDoubleBitEccError` event.
    DoubleBitEcc {
        /// The GPU that reports it.
        uuid: String,
    },
    /// The GPU fell off the bus: `nvmlEventSetWait` fails once with
    /// `NVML_ERROR_GPU_IS_LOST`, and calls on the GPU fail with it while listed.
    Lost {
        /// The GPU that is gone.
        uuid: String,
    },
}

impl Fault {
    /// The UUID of the GPU this fault concerns.
    pub fn uuid(&self) -> &str {
        match self {
            Fault::Xid { uuid, .. } | Fault::DoubleBitEcc { uuid } | Fault::Lost { uuid } => uuid,
        }
    }
}

/// Why a config or fault file could not be used.
#[derive(Debug)]
pub enum MockFileError {
    /// The file could not be read.
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file is not the JSON we expect.
    Parse {
        /// The file involved.
        path: PathBuf,
        /// What serde said.
        source: serde_json::Error,
    },
    /// The JSON parsed but describes an impossible machine.
    Invalid {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl fmt::Display for MockFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MockFileError::Io { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            MockFileError::Parse { path, source } => {
                write!(f, "cannot parse {}: {source}", path.display())
            }
            MockFileError::Invalid { path, reason } => {
                write!(f, "invalid {}: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for MockFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MockFileError::Io { source, .. } => Some(source),
            MockFileError::Parse { source, .. } => Some(source),
            MockFileError::Invalid { .. } => None,
        }
    }
}

impl MockConfig {
    /// Checks what NVML could not represent: duplicate UUIDs, strings longer than NVML's
    /// buffers or holding NUL bytes, malformed PCI bus ids, too many GPUs.
    pub fn validate(&self) -> Result<(), String> {
        check_c_string("driver_version", &self.driver_version, MAX_DRIVER_VERSION)?;
        if self.gpus.len() > MAX_GPUS {
            return Err(format!(
                "{} GPUs; the mock supports at most {MAX_GPUS}",
                self.gpus.len()
            ));
        }
        let mut uuids = HashSet::new();
        for (index, gpu) in self.gpus.iter().enumerate() {
            let at = |field: &str| format!("gpus[{index}].{field}");
            check_c_string(&at("uuid"), &gpu.uuid, MAX_DEVICE_STRING)?;
            check_c_string(&at("name"), &gpu.name, MAX_DEVICE_STRING)?;
            check_c_string(&at("pci_bus_id"), &gpu.pci_bus_id, MAX_BUS_ID)?;
            parse_bus_id(&gpu.pci_bus_id).map_err(|e| format!("{}: {e}", at("pci_bus_id")))?;
            if !uuids.insert(gpu.uuid.as_str()) {
                return Err(format!("{}: duplicate UUID {}", at("uuid"), gpu.uuid));
            }
        }
        Ok(())
    }

    /// The index of the GPU with this UUID.
    pub fn index_of(&self, uuid: &str) -> Option<usize> {
        self.gpus.iter().position(|gpu| gpu.uuid == uuid)
    }
}

fn check_c_string(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes; NVML allows {max}",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err(format!("{field} contains a NUL byte"));
    }
    Ok(())
}

/// The numeric parts of a PCI bus id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u32,
    /// Device number on the bus.
    pub device: u32,
    /// Function number.
    pub function: u32,
}

/// Parses `domain:bus:device.function` (hex; the domain may have 4 or 8 digits).
pub fn parse_bus_id(bus_id: &str) -> Result<PciAddress, String> {
    let bad = || format!("{bus_id:?} is not domain:bus:device.function in hex");
    let mut parts = bus_id.split(':');
    let (Some(domain), Some(bus), Some(rest), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let (device, function) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |s: &str| u32::from_str_radix(s, 16).map_err(|_| bad());
    Ok(PciAddress {
        domain: hex(domain)?,
        bus: hex(bus)?,
        device: hex(device)?,
        function: hex(function)?,
    })
}

/// Writes `config` as JSON to `path`, for a test to point [`CONFIG_ENV`] at.
pub fn write_config(path: impl AsRef<Path>, config: &MockConfig) -> io::Result<()> {
    write_json_atomically(path.as_ref(), config)
}

/// Replaces the fault list at `path` (atomically: write a sibling, then rename).
pub fn write_faults(path: impl AsRef<Path>, faults: &[Fault]) -> io::Result<()> {
    write_json_atomically(path.as_ref(), faults)
}

fn write_json_atomically<T: Serialize + ?Sized>(path: &Path, value: &T) -> io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, json)?;
    fs::rename(&tmp, path)
}

/// Reads and validates a [`MockConfig`].
pub fn read_config(path: &Path) -> Result<MockConfig, MockFileError> {
    let config: MockConfig = read_json(path)?;
    config.validate().map_err(|reason| MockFileError::Invalid {
        path: path.to_owned(),
        reason,
    })?;
    Ok(config)
}

/// Reads a fault list; a missing file is an empty list (faults are added later).
pub fn read_faults(path: &Path) -> Result<Vec<Fault>, MockFileError> {
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        _ => read_json(path),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, MockFileError> {
    let bytes = fs::read(path).map_err(|source| MockFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| MockFileError::Parse {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(uuid: &str) -> MockGpu {
        MockGpu {
            uuid: uuid.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 80 << 30,
            minor: 0,
            pci_bus_id: "00000000:18:00.0".into(),
            numa_node: 0,
            nvlink_group: Some(0),
        }
    }

    #[test]
    fn fault_json_matches_the_documented_shape() {
        let faults: Vec<Fault> = serde_json::from_str(
            r#"[{"uuid":"GPU-a","kind":"xid","xid":79},{"uuid":"GPU-b","kind":"lost"},
                {"uuid":"GPU-c","kind":"double_bit_ecc"}]"#,
        )
        .expect("valid fault list");
        assert_eq!(
            faults,
            vec![
                Fault::Xid {
                    uuid: "GPU-a".into(),
                    xid: 79
                },
                Fault::Lost {
                    uuid: "GPU-b".into()
                },
                Fault::DoubleBitEcc {
                    uuid: "GPU-c".into()
                },
            ]
        );
        assert_eq!(faults[1].uuid(), "GPU-b");
    }

    #[test]
    fn config_defaults_and_validation() {
        let config: MockConfig = serde_json::from_str(
            r#"{"driver_version":"550.54.15","gpus":[{"uuid":"GPU-a","name":"X",
                "memory_bytes":1,"minor":3,"pci_bus_id":"0000:3b:00.0"}]}"#,
        )
        .expect("valid config");
        assert_eq!(config.gpus[0].numa_node, -1);
        assert_eq!(config.gpus[0].nvlink_group, None);
        assert_eq!(config.validate(), Ok(()));

        let dup = MockConfig {
            driver_version: "1".into(),
            gpus: vec![gpu("GPU-a"), gpu("GPU-a")],
        };
        assert!(dup.validate().unwrap_err().contains("duplicate UUID"));
        let mut bad_bus = gpu("GPU-a");
        bad_bus.pci_bus_id = "18:00".into();
        let bad = MockConfig {
            driver_version: "1".into(),
            gpus: vec![bad_bus],
        };
        assert!(bad.validate().unwrap_err().contains("pci_bus_id"));
    }

    #[test]
    fn bus_ids_parse() {
        assert_eq!(
            parse_bus_id("00000001:AB:1f.3"),
            Ok(PciAddress {
                domain: 1,
                bus: 0xab,
                device: 0x1f,
                function: 3
            })
        );
        assert!(parse_bus_id("0000:18:00").is_err());
        assert!(parse_bus_id("0000:18:00.0:1").is_err());
    }

    #[test]
    fn files_round_trip() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path();
        let config = MockConfig {
            driver_version: "550.54.15".into(),
            gpus: vec![gpu("GPU-a")],
        };
        write_config(dir.join("gpus.json"), &config).expect("write config");
        assert_eq!(
            read_config(&dir.join("gpus.json")).expect("read config"),
            config
        );

        assert_eq!(
            read_faults(&dir.join("absent.json")).expect("missing is empty"),
            vec![]
        );
        let faults = vec![Fault::Lost {
            uuid: "GPU-a".into(),
        }];
        write_faults(dir.join("faults.json"), &faults).expect("write faults");
        assert_eq!(
            read_faults(&dir.join("faults.json")).expect("read faults"),
            faults
        );
    }
}
