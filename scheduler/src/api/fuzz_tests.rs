//! The `fuzz/request` target's properties as bounded proptests, so
//! `cargo test` exercises them: arbitrary bytes through request decoding,
//! conversion and the command codec never panic, and every spec that
//! conversion accepts is within the limits.

use super::{convert, limits, tenants};
use crate::state::Command;
use muster_proto as pb;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use prost::Message as _;

fn arbitrary_bytes(data: &[u8]) {
    if let Ok(req) = pb::SubmitRequest::decode(data) {
        if let Some(spec) = req.spec {
            let _ = convert::spec_from_pb(spec);
        }
    }
    if let Ok(req) = pb::CreateTenantRequest::decode(data) {
        let _ =
            tenants::check_request_names(&req.name, [&req.members, &req.default_for, &req.admins]);
    }
    if let Ok(req) = pb::AgentMessage::decode(data) {
        if let Some(pb::agent_message::Kind::Register(reg)) = req.kind {
            let _ = convert::registration_from_pb(&reg);
        }
    }
    let _ = Command::decode(data);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..4096)) {
        arbitrary_bytes(&data);
    }

    #[test]
    fn a_valid_request_with_flipped_bytes_never_panics(
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut env = std::collections::HashMap::new();
        env.insert("A".to_string(), "b".to_string());
        let req = pb::SubmitRequest {
            spec: Some(pb::JobSpec {
                name: "train".into(),
                tenant: "ml/nlp".into(),
                tasks: 2,
                gpus_per_task: 4,
                cpu_millis_per_task: 1000,
                memory_bytes_per_task: 1 << 30,
                command: vec!["torchrun".into(), "train.py".into()],
                env,
                ..Default::default()
            }),
            user: "alice".into(),
            request_id: "r1".into(),
            array: 3,
        };
        let mut bytes = req.encode_to_vec();
        for (i, b) in flips {
            let at = i.index(bytes.len());
            bytes[at] ^= b;
        }
        arbitrary_bytes(&bytes);
    }

    #[test]
    fn accepted_specs_are_within_the_limits(
        name in ".{0,200}",
        tenant in "[a-z/]{0,150}",
        command in vec(".{0,40}", 0..6),
        env in btree_map(".{0,12}", ".{0,20}", 0..6),
        tasks in any::<u32>(),
        workdir in ".{0,64}",
    ) {
        let spec = pb::JobSpec {
            name,
            tenant,
            tasks,
            command,
            env: env.into_iter().collect(),
            workdir,
            ..Default::default()
        };
        match convert::spec_from_pb(spec) {
            Ok(s) => {
                prop_assert!(s.name.len() <= limits::MAX_NAME);
                prop_assert!(s.tenant.len() <= limits::MAX_NAME);
                prop_assert!(s.tasks <= limits::MAX_TASKS);
                prop_assert!(s.command.iter().all(|a| !a.contains('\0')));
                prop_assert!(s.env.keys().all(|k| !k.is_empty() && k.len() <= limits::MAX_ENV_KEY));
            }
            Err(status) => prop_assert_eq!(status.code(), tonic::Code::InvalidArgument),
        }
    }
}
