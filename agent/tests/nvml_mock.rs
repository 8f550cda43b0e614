//! The agent's real NVML backend against the `muster-nvml-mock` stand-in library.
//!
//! The mock is a `cdylib` that Cargo builds into `target/<profile>/deps/` because it is a
//! dev-dependency of this crate; `muster_nvml_mock::find_cdylib` finds it from this test
//! binary's own path. The mock reads its config path from the environment at `nvmlInit`,
//! and the environment is process-wide, so every test that sets it holds `ENV_LOCK`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use muster_agent::gpu::{self, Gpu, GpuBackendConfig, GpuError, GpuInventory, HealthEvent};
use muster_nvml_mock::{
    write_config, write_faults, Fault, MockConfig, MockGpu, CONFIG_ENV, FAULTS_ENV,
};

static ENV_LOCK: Mutex<()> = Mutex::new(());

/// Long enough for a slow CI machine; events normally arrive within ~200 ms.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

fn mock_library() -> PathBuf {
    muster_nvml_mock::find_cdylib().unwrap_or_else(|| {
        panic!(
            "{} not found in any deps/ folder above {:?}; it is built as a dev-dependency \
             of muster-agent, so run this test through `cargo test -p muster-agent`",
            muster_nvml_mock::cdylib_file_name(),
            std::env::current_exe().ok()
        )
    })
}

/// Four GPUs as on half of an HGX board: two NVLink pairs on two NUMA nodes.
fn four_gpus() -> MockConfig {
    let bus = [0x18, 0x2a, 0x9a, 0xab];
    MockConfig {
        driver_version: "550.54.15".into(),
        gpus: (0..4u32)
            .map(|i| MockGpu {
                uuid: format!("GPU-0000000{i}-aaaa-bbbb-cccc-0123456789ab"),
                name: if i < 3 {
                    "NVIDIA H100 80GB HBM3"
                } else {
                    "NVIDIA H100 NVL"
                }
                .into(),
                memory_bytes: (80 + u64::from(i)) << 30,
                minor: 3 - i,
                pci_bus_id: format!("00000000:{:02X}:00.0", bus[i as usize]),
                numa_node: i32::from(i >= 2),
                nvlink_group: Some(i / 2),
            })
            .collect(),
    }
}

/// A mock machine in a temp dir, with the environment pointing at it.
struct MockHost {
    _env: MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
    config: MockConfig,
}

impl MockHost {
    fn new(config: MockConfig) -> Self {
        let env = ENV_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("temp dir");
        write_config(dir.path().join("gpus.json"), &config).expect("write mock config");
        std::env::set_var(CONFIG_ENV, dir.path().join("gpus.json"));
        std::env::set_var(FAULTS_ENV, dir.path().join("faults.json"));
        Self {
            _env: env,
            dir,
            config,
        }
    }

    fn faults_path(&self) -> PathBuf {
        self.dir.path().join("faults.json")
    }

    fn inject(&self, faults: &[Fault]) {
        write_faults(self.faults_path(), faults).expect("write faults");
    }

    fn uuid(&self, index: usize) -> String {
        self.config.gpus[index].uuid.clone()
    }

    fn open(&self) -> Box<dyn GpuInventory> {
        let backend = GpuBackendConfig::Nvml {
            library_path: Some(mock_library()),
        };
        gpu::open(&backend).expect("the nvml backend opens the mock library")
    }
}

fn next_event(inventory: &dyn GpuInventory) -> HealthEvent {
    inventory
        .wait_health_event(EVENT_TIMEOUT)
        .expect("health events work")
        .expect("an event before the timeout")
}

/// The link group the agent should derive from the mock's NVLink groups:
/// the lowest index sharing the GPU's group (itself when it has none).
fn gpus_link_group(gpus: &[MockGpu], index: u32) -> u32 {
    let mine = gpus[index as usize].nvlink_group;
    (0u32..)
        .zip(gpus)
        .find(|(i, g)| *i == index || (mine.is_some() && g.nvlink_group == mine))
        .map_or(index, |(i, _)| i)
}

fn assert_quiet(inventory: &dyn GpuInventory) {
    let event = inventory
        .wait_health_event(Duration::from_millis(300))
        .expect("no error");
    assert_eq!(event, None, "no further events expected");
}

#[test]
fn inventory_matches_the_mock_config() {
    let host = MockHost::new(four_gpus());
    let inventory = host.open();
    assert_eq!(inventory.backend(), "nvml");
    let expected: Vec<Gpu> = (0u32..)
        .zip(&host.config.gpus)
        .map(|(index, mock)| Gpu {
            index,
            uuid: mock.uuid.clone(),
            model: mock.name.clone(),
            memory_bytes: mock.memory_bytes,
            minor: mock.minor,
            pci_bus_id: mock.pci_bus_id.clone(),
            numa_node: mock.numa_node,
            healthy: true,
            link_group: gpus_link_group(&host.config.gpus, index),
        })
        .collect();
    let gpus = inventory.gpus().expect("gpus");
    assert_eq!(gpus, expected);
    // Spot-check a few literal values, so a bug shared by mock and agent cannot hide.
    assert_eq!(gpus[1].pci_bus_id, "00000000:2A:00.0");
    assert_eq!(gpus[3].model, "NVIDIA H100 NVL");
    assert_eq!((gpus[0].minor, gpus[3].minor), (3, 0));
    assert_eq!(gpus[2].memory_bytes, 82 << 30);
    // NVLink pairs (0,1) and (2,3) in the mock become two link groups.
    assert_eq!(
        gpus.iter().map(|g| g.link_group).collect::<Vec<_>>(),
        vec![0, 0, 2, 2]
    );
    assert_eq!(
        gpus.iter().map(|g| g.numa_node).collect::<Vec<_>>(),
        vec![0, 0, 1, 1]
    );
    assert_quiet(inventory.as_ref());
}

#[test]
fn unknown_numa_node_is_minus_one() {
    let mut config = four_gpus();
    config.gpus.truncate(1);
    config.gpus[0].numa_node = -1;
    let host = MockHost::new(config);
    let gpus = host.open().gpus().expect("gpus");
    assert_eq!(gpus[0].numa_node, -1);
}

#[test]
fn xid_and_ecc_faults_become_health_events() {
    let host = MockHost::new(four_gpus());
    let inventory = host.open();
    host.inject(&[Fault::Xid {
        uuid: host.uuid(2),
        xid: 79,
    }]);
    assert_eq!(
        next_event(inventory.as_ref()),
        HealthEvent::Xid {
            uuid: host.uuid(2),
            xid: 79
        }
    );
    assert_quiet(inventory.as_ref());

    host.inject(&[
        Fault::Xid {
            uuid: host.uuid(2),
            xid: 79,
        },
        Fault::DoubleBitEcc { uuid: host.uuid(0) },
    ]);
    let event = next_event(inventory.as_ref());
    assert_eq!(event, HealthEvent::DoubleBitEcc { uuid: host.uuid(0) });
    assert_eq!(event.uuid(), host.uuid(0));
    assert_quiet(inventory.as_ref());
    // An XID is a fact, not a verdict: the GPU still answers, so it is still healthy.
    assert!(inventory.gpus().expect("gpus").iter().all(|g| g.healthy));
}

#[test]
fn lost_gpu_is_reported_once_and_listed_unhealthy() {
    let host = MockHost::new(four_gpus());
    let inventory = host.open();
    host.inject(&[Fault::Lost { uuid: host.uuid(1) }]);
    assert_eq!(
        next_event(inventory.as_ref()),
        HealthEvent::Lost { uuid: host.uuid(1) }
    );
    assert_quiet(inventory.as_ref());

    let gpus = inventory
        .gpus()
        .expect("a lost GPU does not fail the inventory");
    let healthy: Vec<bool> = gpus.iter().map(|g| g.healthy).collect();
    assert_eq!(healthy, vec![true, false, true, true]);
    assert_eq!(
        gpus[1].uuid,
        host.uuid(1),
        "the lost GPU keeps its identity"
    );
    assert_eq!(gpus[1].minor, host.config.gpus[1].minor);

    host.inject(&[]);
    assert!(
        inventory.gpus().expect("gpus").iter().all(|g| g.healthy),
        "back on the bus"
    );
}

#[test]
fn faults_present_before_open_are_not_replayed() {
    let host = MockHost::new(four_gpus());
    host.inject(&[Fault::Xid {
        uuid: host.uuid(3),
        xid: 48,
    }]);
    let inventory = host.open();
    assert_quiet(inventory.as_ref());
}

#[test]
fn missing_mock_config_fails_to_open_with_the_library_path() {
    let host = MockHost::new(four_gpus());
    std::env::set_var(CONFIG_ENV, host.dir.path().join("absent.json"));
    let library = mock_library();
    let err = gpu::open(&GpuBackendConfig::Nvml {
        library_path: Some(library.clone()),
    })
    .expect_err("no config, no NVML");
    assert!(matches!(err, GpuError::Load { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&library.display().to_string()),
        "{err}"
    );
}

#[test]
fn bad_library_path_is_an_error_naming_the_path() {
    let path = Path::new("/nonexistent/muster/libnvidia-ml.so.1");
    let err = gpu::open(&GpuBackendConfig::Nvml {
        library_path: Some(path.to_owned()),
    })
    .expect_err("there is no library there");
    match &err {
        GpuError::Load { library, .. } => assert_eq!(library, path),
        other => panic!("expected a load error, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("/nonexistent/muster/libnvidia-ml.so.1"),
        "{err}"
    );
}
