//! gRPC request handling on arbitrary bytes: decoding of the client
//! requests, proto → model conversion with its limits, and the Raft
//! command codec must answer with a value or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use muster_proto as pb;
use muster_scheduler::api::convert;
use muster_scheduler::state::Command;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = pb::SubmitRequest::decode(data) {
        if let Some(spec) = req.spec {
            let _ = convert::spec_from_pb(spec);
        }
    }
    if let Ok(req) = pb::CreateTenantRequest::decode(data) {
        let _ = muster_scheduler::api::tenants::check_request_names(
            &req.name,
            [&req.members, &req.default_for, &req.admins],
        );
    }
    if let Ok(req) = pb::AgentMessage::decode(data) {
        if let Some(pb::agent_message::Kind::Register(reg)) = req.kind {
            let _ = convert::registration_from_pb(&reg);
        }
    }
    let _ = Command::decode(data);
});
