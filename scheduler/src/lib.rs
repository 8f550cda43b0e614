//! Muster's scheduler: the replicated state, the pure gang planner, the Raft
//! driver on sled, and the gRPC services for clients and agents.
//!
//! Start at [`state`] (what is replicated and how it changes), then
//! [`planner`] (how jobs are placed), then [`raft`] (how changes are agreed
//! and made durable) and [`api`] (how the outside world reaches all this),
//! with [`auth`] (who is asking, what they may do, and the audit trail).
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod config;
pub mod leader;
pub mod model;
pub mod planner;
pub mod raft;
pub mod scheduling;
pub mod server;
pub mod state;

pub use config::SchedulerConfig;
