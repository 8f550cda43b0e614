//! Made-up GPUs for development clusters and for many agents on one machine.
//!
//! Everything is derived from the configuration, so the same config yields the same GPUs
//! on every start: the scheduler, which remembers GPUs by UUID, sees the node come back
//! with the GPUs it had. The UUIDs are a fixed hash (FNV-1a, not `DefaultHasher`, whose
//! output may change between Rust releases) of the seed and the index.

use std::time::Duration;

use super::{Gpu, GpuError, GpuInventory, HealthEvent};

/// GPUs invented from a count and a seed. They never fail.
#[derive(Debug, Clone)]
pub struct SimulatedInventory {
    gpus: Vec<Gpu>,
}

impl SimulatedInventory {
    /// `count` GPUs of `model` with `memory_bytes` each, minors from `first_minor`, UUIDs
    /// derived from `seed` (use the node name so agents sharing a host differ).
    ///
    /// The first half of the GPUs sits on NUMA node 0 and the rest on node 1, like a
    /// two-socket server; a single GPU is on node 0.
    pub fn new(
        count: u32,
        model: &str,
        memory_bytes: u64,
        first_minor: u32,
        seed: &str,
    ) -> Result<Self, GpuError> {
        if first_minor.checked_add(count).is_none() {
            return Err(GpuError::InvalidSimulated {
                reason: format!("first_minor {first_minor} + count {count} overflows"),
            });
        }
        let gpus = (0..count)
            .map(|index| Gpu {
                index,
                uuid: simulated_uuid(seed, index),
                model: model.to_owned(),
                memory_bytes,
                minor: first_minor + index,
                pci_bus_id: format!("{:08X}:{:02X}:00.0", index / 256, index % 256),
                numa_node: numa_node(index, count),
                healthy: true,
                // Two simulated NVLink islands, one per NUMA node.
                link_group: if numa_node(index, count) == 0 {
                    0
                } else {
                    count.div_ceil(2)
                },
            })
            .collect();
        Ok(Self { gpus })
    }
}

fn numa_node(index: u32, count: u32) -> i32 {
    // `index < count`, so this is 0 or 1.
    i32::from(u64::from(index) * 2 >= u64::from(count) && count > 1)
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, the shape NVML prints, from 128 hash bits.
pub(super) fn simulated_uuid(seed: &str, index: u32) -> String {
    let key = format!("muster-simulated-gpu\0{seed}\0{index}");
    let high = fnv1a(key.as_bytes(), 0xcbf2_9ce4_8422_2325);
    // A second, differently seeded pass for the low half.
    let low = fnv1a(key.as_bytes(), high ^ 0x9e37_79b9_7f4a_7c15);
    let bits = (u128::from(high) << 64) | u128::from(low);
    let hex = format!("{bits:032x}");
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn fnv1a(bytes: &[u8], offset_basis: u64) -> u64 {
    muster_proto::fnv::extend(offset_basis, bytes.iter().copied())
}

impl GpuInventory for SimulatedInventory {
    fn backend(&self) -> &'static str {
        "simulated"
    }

    fn gpus(&self) -> Result<Vec<Gpu>, GpuError> {
        Ok(self.gpus.clone())
    }

    fn wait_health_event(&self, timeout: Duration) -> Result<Option<HealthEvent>, GpuError> {
        std::thread::sleep(timeout);
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Instant;

    use super::*;

    fn inventory(count: u32, first_minor: u32, seed: &str) -> SimulatedInventory {
        SimulatedInventory::new(count, "NVIDIA H100 80GB HBM3", 80 << 30, first_minor, seed)
            .expect("valid config")
    }

    #[test]
    fn gpus_follow_the_config() {
        let gpus = inventory(4, 2, "node-a").gpus().expect("gpus");
        assert_eq!(gpus.len(), 4);
        for (i, gpu) in (0u32..).zip(&gpus) {
            assert_eq!(gpu.index, i);
            assert_eq!(gpu.minor, 2 + i);
            assert_eq!(gpu.model, "NVIDIA H100 80GB HBM3");
            assert_eq!(gpu.memory_bytes, 80 << 30);
            assert!(gpu.healthy);
        }
        let numa: Vec<i32> = gpus.iter().map(|g| g.numa_node).collect();
        assert_eq!(numa, vec![0, 0, 1, 1]);
        assert_eq!(gpus[3].pci_bus_id, "00000000:03:00.0");
        assert_eq!(inventory(1, 0, "x").gpus().expect("gpus")[0].numa_node, 0);
        assert!(inventory(0, 0, "x").gpus().expect("gpus").is_empty());
    }

    #[test]
    fn uuids_are_stable_distinct_and_well_formed() {
        // Pinned: a change here renames every simulated GPU in existing clusters.
        assert_eq!(
            simulated_uuid("node-a", 0),
            "GPU-0b0f8f8a-5ad9-0163-a789-632f29f585d6"
        );
        let a = inventory(8, 0, "node-a").gpus().expect("gpus");
        let b = inventory(8, 0, "node-b").gpus().expect("gpus");
        let all: HashSet<&str> = a.iter().chain(&b).map(|g| g.uuid.as_str()).collect();
        assert_eq!(all.len(), 16, "UUIDs must differ across indices and seeds");
        for uuid in all {
            let groups: Vec<usize> = uuid
                .trim_start_matches("GPU-")
                .split('-')
                .map(str::len)
                .collect();
            assert!(uuid.starts_with("GPU-"), "{uuid}");
            assert_eq!(groups, vec![8, 4, 4, 4, 12], "{uuid}");
            assert!(
                uuid[4..].chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
                "{uuid}"
            );
        }
    }

    #[test]
    fn uuid_hash_is_pinned() {
        assert_eq!(fnv1a(b"", 0xcbf2_9ce4_8422_2325), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a", 0xcbf2_9ce4_8422_2325), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn minor_overflow_is_refused() {
        let err = SimulatedInventory::new(2, "X", 1, u32::MAX, "").expect_err("overflow");
        assert!(err.to_string().contains("overflows"), "{err}");
    }

    #[test]
    fn never_reports_health_events() {
        let inventory = inventory(2, 0, "");
        let start = Instant::now();
        let event = inventory
            .wait_health_event(Duration::from_millis(30))
            .expect("no error");
        assert_eq!(event, None);
        assert!(
            start.elapsed() >= Duration::from_millis(30),
            "waits out the timeout"
        );
        assert_eq!(inventory.backend(), "simulated");
    }
}
