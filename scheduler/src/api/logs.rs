//! `Muster.LogAccess`: who may read a task's output.
//!
//! Output lives on the agents, which serve it only against a ticket signed
//! with the key the agent sent at registration (`muster_proto::ticket`). The
//! scheduler issues one to a caller who may see the job in full: its owner,
//! admins of the job's tenant (or an ancestor) and cluster admins, the same
//! rule that decides whether `muster show` redacts the job.

use crate::auth::roles;
use crate::model::JobId;
use crate::state::{Principal, State};
use muster_proto as pb;
use tonic::Status;

/// A ticket for `who` to read task `req.task_index` of job `req.job_id`, or
/// the reason there is none.
pub fn access(
    state: &State,
    who: &Principal,
    req: &pb::LogAccessRequest,
    now_ms: i64,
) -> Result<pb::LogAccessResponse, Status> {
    let id = JobId(req.job_id);
    let job = state
        .jobs
        .get(&id)
        .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
    if !roles::can_see_job(state, who, job) {
        return Err(Status::permission_denied(format!(
            "job {id} belongs to another user ({}); only its owner, admins of tenant {} and cluster admins may read its logs",
            job.user, job.spec.tenant
        )));
    }
    let index = req.task_index;
    if index >= job.spec.tasks {
        let n = job.spec.tasks;
        return Err(Status::invalid_argument(format!(
            "job {id} has {n} task{}; task must be below {n}",
            if n == 1 { "" } else { "s" }
        )));
    }
    let task = job
        .alloc
        .as_ref()
        .and_then(|a| a.tasks.get(index as usize))
        .filter(|t| !t.placement.node.is_empty());
    let Some(task) = task else {
        let why = if job.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", job.reason)
        };
        return Err(Status::failed_precondition(format!(
            "task {index} of job {id} has not been placed on a node, so it has no logs (job is {}{why})",
            job.state.as_str()
        )));
    };
    let node_name = &task.placement.node;
    let node = state.nodes.get(node_name).ok_or_else(|| {
        Status::not_found(format!(
            "node {node_name} of task {index} of job {id} is no longer registered"
        ))
    })?;
    let ticket = pb::ticket::issue(&node.log_key, node_name, id.0, index, &who.name, now_ms)
        .map_err(|e| {
            Status::failed_precondition(format!(
                "the agent of node {node_name} cannot serve logs securely ({e}); upgrade it"
            ))
        })?;
    Ok(pb::LogAccessResponse {
        agent_address: node.address.clone(),
        ticket: Some(ticket),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::World;
    use tonic::Code;

    fn who(name: &str, admin: bool) -> Principal {
        Principal {
            name: name.into(),
            cluster_admin: admin,
            via: "test".into(),
            from: "127.0.0.1:1".into(),
        }
    }

    fn ask(
        w: &World,
        p: &Principal,
        job: JobId,
        task: u32,
    ) -> Result<pb::LogAccessResponse, Status> {
        let req = pb::LogAccessRequest {
            job_id: job.0,
            task_index: task,
        };
        access(&w.s, p, &req, 1_000)
    }

    #[test]
    fn the_owner_gets_a_ticket_the_agent_accepts() {
        let mut w = World::new(&[("n1", 8)]);
        let id = w.submit(1, 2);
        w.schedule();
        let r = ask(&w, &who("alice", false), id, 0).expect("owner may read");
        assert_eq!(r.agent_address, "n1:7471");
        let key = &w.s.nodes["n1"].log_key;
        let verdict = pb::ticket::verify(key, r.ticket.as_ref(), "n1", id.0, 0, 1_500);
        assert_eq!(verdict, Ok(()));
        // The ticket opens nothing else.
        let other = pb::ticket::verify(key, r.ticket.as_ref(), "n1", id.0 + 1, 0, 1_500);
        assert!(other.is_err());
    }

    #[test]
    fn another_user_is_refused_and_told_why() {
        let mut w = World::new(&[("n1", 8)]);
        let id = w.submit(1, 2);
        w.schedule();
        let err = ask(&w, &who("mallory", false), id, 0).expect_err("not hers");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("belongs to another user"), "{err}");
        // Not the misleading "has not been placed" of a redacted view.
        assert!(!err.message().contains("placed"), "{err}");
        assert!(ask(&w, &who("root", true), id, 0).is_ok(), "cluster admin");
    }

    #[test]
    fn unplaced_and_out_of_range_tasks_say_so() {
        let mut w = World::new(&[("n1", 8)]);
        let id = w.submit(2, 4); // never scheduled here: stays pending
        let err = ask(&w, &who("alice", false), id, 1).expect_err("pending");
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("has not been placed"), "{err}");
        let err = ask(&w, &who("alice", false), id, 2).expect_err("range");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("task must be below 2"), "{err}");
        let err = ask(&w, &who("alice", false), JobId(999), 0).expect_err("missing");
        assert_eq!(err.code(), Code::NotFound);
    }
}
