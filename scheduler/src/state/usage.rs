//! Per-node bookkeeping of what live allocations hold. Derived from the jobs
//! (never serialized) and kept up to date incrementally by `apply`.

use crate::model::{JobId, TaskPlacement};
use serde::Serialize;
use std::collections::BTreeMap;

/// What one node has handed out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeUsage {
    /// GPU index → job holding it.
    pub gpus: BTreeMap<u32, JobId>,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
}

impl NodeUsage {
    /// Book a task's resources.
    pub fn add(&mut self, job: JobId, p: &TaskPlacement) {
        for g in &p.gpus {
            self.gpus.insert(*g, job);
        }
        self.cpu_millis = self.cpu_millis.saturating_add(p.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(p.memory_bytes);
    }

    /// Release a task's resources.
    pub fn remove(&mut self, job: JobId, p: &TaskPlacement) {
        for g in &p.gpus {
            if self.gpus.get(g) == Some(&job) {
                self.gpus.remove(g);
            }
        }
        self.cpu_millis = self.cpu_millis.saturating_sub(p.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_sub(p.memory_bytes);
    }
}
