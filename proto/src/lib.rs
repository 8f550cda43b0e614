//! Generated gRPC types and services for Muster (`proto/muster.proto`).
//!
//! The `.proto` file is the contract between the CLI, the schedulers and the
//! agents; conversion to the scheduler's domain model lives in
//! `muster-scheduler`'s `api` module and nowhere else.
/// Version 1 of the protocol.
#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("muster.v1");
}

pub use v1::*;

pub mod daemon;
pub mod fnv;
pub mod ticket;
pub mod tls;
pub mod units;

/// Request metadata with a meaning across the services.
pub mod headers {
    /// Sent by an agent's user socket: the local user it speaks for. A
    /// scheduler believes it only from an authenticated agent.
    pub const ON_BEHALF_OF: &str = "muster-on-behalf-of";
    /// With [`ON_BEHALF_OF`]: that user's uid on the agent's host.
    pub const PEER_UID: &str = "muster-peer-uid";
}
