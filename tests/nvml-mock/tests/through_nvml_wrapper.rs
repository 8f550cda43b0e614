//! Drives the built mock library through `nvml-wrapper`, the way the agent does, and
//! checks every exported function. One test only: the mock reads process-wide
//! environment variables, and NVML state is process-wide too.

use std::ffi::OsStr;

use muster_nvml_mock::{find_cdylib, write_config, write_faults, Fault, MockConfig, MockGpu};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TopologyLevel;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

fn gpu(i: u32, group: u32) -> MockGpu {
    MockGpu {
        uuid: format!("GPU-00000000-0000-0000-0000-00000000000{i}"),
        name: "NVIDIA H100 80GB HBM3".into(),
        memory_bytes: 80 << 30,
        minor: i + 4,
        pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + i),
        numa_node: i32::try_from(group).expect("small"),
        nvlink_group: Some(group),
    }
}

#[test]
fn every_exported_function_answers_from_the_config() {
    let library =
        find_cdylib().expect("the muster-nvml-mock cdylib was not built next to this test");
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("gpus.json");
    let faults_path = dir.path().join("faults.json");

    // No config yet: init must fail with an error code, not crash.
    std::env::remove_var(muster_nvml_mock::CONFIG_ENV);
    let err = Nvml::builder()
        .lib_path(library.as_os_str())
        .init()
        .expect_err("no config");
    assert!(matches!(err, NvmlError::LibraryNotFound), "{err:?}");
    std::fs::write(&config_path, "{ not json").expect("write");
    std::env::set_var(muster_nvml_mock::CONFIG_ENV, &config_path);
    let err = Nvml::builder()
        .lib_path(library.as_os_str())
        .init()
        .expect_err("bad config");
    assert!(matches!(err, NvmlError::Unknown), "{err:?}");

    let config = MockConfig {
        driver_version: "550.54.15".into(),
        gpus: vec![gpu(0, 0), gpu(1, 0), gpu(2, 1)],
    };
    write_config(&config_path, &config).expect("write config");
    std::env::set_var(muster_nvml_mock::FAULTS_ENV, &faults_path);
    let nvml = Nvml::builder()
        .lib_path(OsStr::new(&library))
        .init()
        .expect("init");

    assert_eq!(nvml.sys_driver_version().expect("driver"), "550.54.15");
    assert_eq!(nvml.device_count().expect("count"), 3);
    let devices: Vec<_> = (0..3)
        .map(|i| nvml.device_by_index(i).expect("handle"))
        .collect();
    for (i, (device, want)) in devices.iter().zip(&config.gpus).enumerate() {
        assert_eq!(
            device.index().expect("index"),
            u32::try_from(i).expect("small")
        );
        assert_eq!(device.uuid().expect("uuid"), want.uuid);
        assert_eq!(device.name().expect("name"), want.name);
        assert_eq!(device.minor_number().expect("minor"), want.minor);
        let memory = device.memory_info().expect("memory");
        assert_eq!((memory.total, memory.used), (want.memory_bytes, 0));
        let pci = device.pci_info().expect("pci");
        assert_eq!(pci.bus_id, want.pci_bus_id);
        assert_eq!((pci.domain, pci.bus, pci.device), (0, 0x18 + i as u32, 0));
        let affinity = device.memory_affinity(1, 0).expect("affinity");
        assert_eq!(affinity, vec![1 << want.numa_node]);
        assert!(device
            .supported_event_types()
            .expect("events")
            .contains(EventTypes::CRITICAL_XID_ERROR));
    }
    assert!(nvml.device_by_index(3).is_err());
    let by_uuid = nvml
        .device_by_uuid(config.gpus[2].uuid.as_str())
        .expect("by uuid");
    assert_eq!(by_uuid.index().expect("index"), 2);

    let level = |a: usize, b: usize| {
        let other = nvml
            .device_by_index(u32::try_from(b).expect("small"))
            .expect("handle");
        devices[a]
            .topology_common_ancestor(other)
            .expect("topology")
    };
    assert_eq!(level(0, 0), TopologyLevel::Internal);
    assert_eq!(level(0, 1), TopologyLevel::Single);
    assert_eq!(level(1, 2), TopologyLevel::System);

    // Faults listed before the set exists are not replayed to it.
    let stale = Fault::Xid {
        uuid: config.gpus[0].uuid.clone(),
        xid: 31,
    };
    write_faults(&faults_path, std::slice::from_ref(&stale)).expect("faults");
    let set = nvml.create_event_set().expect("set");
    let set = devices[0]
        .register_events(
            EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR,
            set,
        )
        .expect("register 0");
    let set = devices[1]
        .register_events(EventTypes::CRITICAL_XID_ERROR, set)
        .expect("register 1");
    assert!(matches!(set.wait(50), Err(NvmlError::Timeout)));

    let faults = vec![
        stale.clone(),
        Fault::Xid {
            uuid: config.gpus[1].uuid.clone(),
            xid: 79,
        },
        Fault::DoubleBitEcc {
            uuid: config.gpus[1].uuid.clone(),
        }, // not registered: dropped
        Fault::Xid {
            uuid: config.gpus[2].uuid.clone(),
            xid: 48,
        }, // not registered: dropped
        Fault::DoubleBitEcc {
            uuid: config.gpus[0].uuid.clone(),
        },
    ];
    write_faults(&faults_path, &faults).expect("faults");
    let event = set.wait(1000).expect("xid event");
    assert_eq!(event.device.uuid().expect("uuid"), config.gpus[1].uuid);
    assert_eq!(event.event_type, EventTypes::CRITICAL_XID_ERROR);
    assert!(matches!(event.event_data, Some(XidError::Value(79))));
    let event = set.wait(1000).expect("ecc event");
    assert_eq!(event.device.uuid().expect("uuid"), config.gpus[0].uuid);
    assert_eq!(event.event_type, EventTypes::DOUBLE_BIT_ECC_ERROR);
    assert!(
        matches!(set.wait(50), Err(NvmlError::Timeout)),
        "each fault is delivered once"
    );

    // A GPU falls off the bus: one failed wait, then every call on it fails.
    let mut faults = faults;
    faults.push(Fault::Lost {
        uuid: config.gpus[1].uuid.clone(),
    });
    write_faults(&faults_path, &faults).expect("faults");
    assert!(matches!(set.wait(1000), Err(NvmlError::GpuLost)));
    assert!(matches!(set.wait(50), Err(NvmlError::Timeout)));
    assert!(matches!(devices[1].uuid(), Err(NvmlError::GpuLost)));
    assert!(matches!(nvml.device_by_index(1), Err(NvmlError::GpuLost)));
    assert_eq!(
        devices[0].uuid().expect("others still answer"),
        config.gpus[0].uuid
    );

    // Removing the fault brings the GPU back.
    write_faults(&faults_path, &[]).expect("faults");
    assert_eq!(devices[1].uuid().expect("back"), config.gpus[1].uuid);
    set.release_events().expect("free set");
    nvml.shutdown().expect("shutdown");
}
