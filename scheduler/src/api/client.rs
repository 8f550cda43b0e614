//! The `Muster` client API.

use super::{convert, now_ms, tenants, Ctx};
use crate::auth::roles;
use crate::model::{JobId, JobState};
use crate::planner;
use crate::state::{ApplyResult, Command, Principal};
use muster_proto as pb;
use muster_proto::muster_server::Muster;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The client service.
pub struct ClientApi {
    ctx: Arc<Ctx>,
}

impl ClientApi {
    /// A service over the shared context.
    pub fn new(ctx: Arc<Ctx>) -> ClientApi {
        ClientApi { ctx }
    }

    fn job_info(
        &self,
        who: &Principal,
        id: JobId,
        view: &super::leader_view::LeaderView,
    ) -> Result<pb::JobInfo, Status> {
        let state = self.ctx.raft.state();
        let job = state
            .jobs
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
        let policy = self.ctx.cfg.scheduling.policy();
        let position = if job.state == JobState::Pending {
            planner::queue_order(&state, &policy)
                .iter()
                .position(|j| *j == id)
                .map_or(0, |p| p as u32 + 1)
        } else {
            0
        };
        let reason = view.reason(id);
        Ok(self.present(&state, who, job, reason.as_deref(), position))
    }

    /// A job as `who` may see it, with what depends on this scheduler's
    /// config: the class name, the effective stop signal and grace, and the
    /// checkpoint directory the tasks are given. Another user's job is
    /// redacted.
    fn present(
        &self,
        state: &crate::state::State,
        who: &Principal,
        job: &crate::model::Job,
        reason: Option<&str>,
        position: u32,
    ) -> pb::JobInfo {
        let mut info = convert::job_to_pb(state, job, reason, position);
        let sched = &self.ctx.cfg.scheduling;
        info.priority = sched.policy().class_name(&info.priority).to_string();
        let (sig, grace) = sched.stop_of(&job.spec.lifecycle);
        info.stop_signal = sig;
        info.grace_secs = grace.as_secs();
        if let Some(spec) = info.spec.as_mut() {
            spec.checkpoint_dir =
                super::agent::checkpoint_dir_of(job, &self.ctx.cfg.checkpoint_root);
        }
        if !roles::can_see_job(state, who, job) {
            convert::redact(&mut info);
        }
        info
    }
}

impl ClientApi {
    /// `who` may have at most `[limits] max_jobs_per_user` unfinished jobs
    /// (array elements count one each): one user cannot flood the queue and
    /// the leader's memory for everyone. Checked here, before the write is
    /// proposed; concurrent submissions may pass it together by a few.
    fn check_job_cap(&self, who: &Principal, count: u32) -> Result<(), Status> {
        if who.cluster_admin {
            return Ok(());
        }
        let cap = u64::from(self.ctx.cfg.limits.max_jobs_per_user);
        let state = self.ctx.raft.state();
        // Every unfinished job is pending or holds resources. While the
        // whole cluster has fewer than the cap, no user can pass it: the
        // common case costs nothing on the submission path.
        let unfinished = (state.pending.len() + state.active.len()) as u64;
        if unfinished.saturating_add(u64::from(count)) <= cap {
            return Ok(());
        }
        let have = state
            .pending
            .iter()
            .chain(&state.active)
            .filter_map(|id| state.jobs.get(id))
            .filter(|j| j.user == who.name && !j.state.is_terminal())
            .count() as u64;
        job_cap(&who.name, have, u64::from(count), cap)
    }

    fn tenant_info(&self, name: &str) -> Result<pb::TenantInfo, Status> {
        let state = self.ctx.raft.state();
        let t = state
            .tenants
            .get(name)
            .ok_or_else(|| Status::not_found(format!("tenant {name} not found")))?;
        Ok(tenants::tenant_info(&state, t))
    }
}

#[tonic::async_trait]
impl Muster for ClientApi {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let who = self.ctx.authenticate(&req, "submit")?;
        let req = req.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        let spec = convert::spec_from_pb(spec)?;
        self.ctx
            .cfg
            .scheduling
            .check_class(&spec.priority)
            .map_err(Status::invalid_argument)?;
        let max_time = self.ctx.cfg.limits.max_time_limit.as_secs();
        crate::model::check_time_limit(&spec, max_time).map_err(Status::invalid_argument)?;
        if req.request_id.len() > 128 {
            return Err(Status::invalid_argument(
                "request_id: longer than 128 characters",
            ));
        }
        let request_id = Some(req.request_id).filter(|k| !k.is_empty());
        let count = req.array.max(1);
        if count > 1 {
            // Refused before it costs a log entry (apply checks it again).
            crate::state::validate_array(&spec, count).map_err(Status::invalid_argument)?;
        }
        self.check_job_cap(&who, count)?;
        // The job runs as whoever was authenticated, whatever `req.user` says.
        let user = who.name.clone();
        let cmd = if count > 1 {
            Command::SubmitArray {
                spec,
                user,
                at_ms: now_ms(),
                request_id,
                count,
            }
        } else {
            Command::Submit {
                spec,
                user,
                at_ms: now_ms(),
                request_id,
            }
        };
        // `authorized` takes the rate limit's token, as for every write.
        match self.ctx.authorized(&who, cmd).await? {
            ApplyResult::Submitted(id) => Ok(Response::new(pb::SubmitResponse { id: id.0, count })),
            other => Err(Status::internal(format!(
                "unexpected apply result {other:?}"
            ))),
        }
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let who = self.ctx.authenticate(&req, "cancel")?;
        let id = JobId(req.into_inner().id);
        let cancel = Command::Cancel {
            job: id,
            at_ms: now_ms(),
        };
        self.ctx.authorized(&who, cancel).await?;
        let state = self
            .ctx
            .raft
            .state()
            .jobs
            .get(&id)
            .map(|j| j.state)
            .unwrap_or(JobState::Cancelled);
        Ok(Response::new(pb::CancelResponse {
            state: convert::job_state_to_pb(state) as i32,
        }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let who = self.ctx.authenticate(&req, "get-job")?;
        self.ctx.linearize(&req).await?;
        let id = JobId(req.into_inner().id);
        let view = super::leader_view::get(&self.ctx, &[id]).await;
        self.job_info(&who, id, &view).map(Response::new)
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let who = self.ctx.authenticate(&req, "list-jobs")?;
        self.ctx.linearize(&req).await?;
        let req = req.into_inner();
        // Every pending job's verdict, from the leader's memory.
        let view = super::leader_view::get(&self.ctx, &[]).await;
        let state = self.ctx.raft.state();
        let policy = self.ctx.cfg.scheduling.policy();
        let pending = planner::queue_order(&state, &policy);
        let others = state
            .jobs
            .values()
            .filter(|j| j.state != JobState::Pending && (req.all || !j.state.is_terminal()))
            .map(|j| j.id);
        let listing: Vec<(JobId, u32)> = pending
            .iter()
            .enumerate()
            .map(|(pos, id)| (*id, pos as u32 + 1))
            .chain(others.map(|id| (id, 0)))
            .collect();
        let (from, to) = page(listing.len(), req.offset, req.limit);
        let jobs = listing[from..to]
            .iter()
            .filter_map(|(id, pos)| {
                let j = state.jobs.get(id)?;
                let reason = (*pos > 0).then(|| view.reason(*id)).flatten();
                Some(self.present(&state, &who, j, reason.as_deref(), *pos))
            })
            .collect();
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_offset: to as u64,
            total: listing.len() as u64,
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.ctx.authenticate(&req, "list-nodes")?;
        self.ctx.linearize(&req).await?;
        // When each agent was last heard from: the leader's memory.
        let view = super::leader_view::get(&self.ctx, &[]).await;
        let state = self.ctx.raft.state();
        let nodes = state
            .nodes
            .values()
            .map(|n| {
                let seen = view.last_seen_ms.get(&n.name).copied().unwrap_or(0);
                convert::node_to_pb(&state, n, seen)
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::TenantInfo>, Status> {
        let who = self.ctx.authenticate(&req, "tenant-create")?;
        let req = req.into_inner();
        tenants::check_request_names(&req.name, [&req.members, &req.default_for, &req.admins])?;
        self.ctx
            .authorized(&who, tenants::create_command(&req))
            .await?;
        if !req.admins.is_empty() {
            let admins = tenants::admins_command(&req.name, &req.admins, &[]);
            self.ctx.authorized_again(&who, admins).await?;
        }
        self.tenant_info(&req.name).map(Response::new)
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        self.ctx.authenticate(&req, "list-tenants")?;
        self.ctx.linearize(&req).await?;
        let state = self.ctx.raft.state();
        let tenants = state
            .tenants
            .values()
            .map(|t| tenants::tenant_info(&state, t))
            .collect();
        Ok(Response::new(pb::ListTenantsResponse { tenants }))
    }

    async fn update_tenant(
        &self,
        req: Request<pb::UpdateTenantRequest>,
    ) -> Result<Response<pb::TenantInfo>, Status> {
        let who = self.ctx.authenticate(&req, "tenant-update")?;
        let req = req.into_inner();
        tenants::check_request_names(
            &req.name,
            [&req.add_members, &req.remove_members, &req.default_for],
        )?;
        tenants::check_request_names(&req.name, [&req.add_admins, &req.remove_admins, &vec![]])?;
        let update = tenants::update_command(&req);
        let admins_only = matches!(&update, Command::UpdateTenant { patch, .. }
            if **patch == crate::state::TenantPatch::default())
            && !(req.add_admins.is_empty() && req.remove_admins.is_empty());
        if !admins_only {
            self.ctx.authorized(&who, update).await?;
        }
        if !(req.add_admins.is_empty() && req.remove_admins.is_empty()) {
            let admins = tenants::admins_command(&req.name, &req.add_admins, &req.remove_admins);
            if admins_only {
                self.ctx.authorized(&who, admins).await?;
            } else {
                self.ctx.authorized_again(&who, admins).await?;
            }
        }
        self.tenant_info(&req.name).map(Response::new)
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let who = self.ctx.authenticate(&req, "tenant-delete")?;
        let name = req.into_inner().name;
        super::limits::line("name", &name, super::limits::MAX_NAME)?;
        self.ctx
            .authorized(&who, Command::DeleteTenant { name })
            .await?;
        Ok(Response::new(pb::DeleteTenantResponse {}))
    }

    async fn drain_node(
        &self,
        req: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let who = self.ctx.authenticate(&req, "node-drain")?;
        let req = req.into_inner();
        let reason = match (req.drain, req.reason.trim()) {
            (false, _) => None,
            (true, "") => Some("drained by an administrator".to_string()),
            (true, r) if r.len() > 256 => {
                return Err(Status::invalid_argument(
                    "reason: must be at most 256 characters",
                ))
            }
            (true, r) => {
                super::limits::line("reason", r, 256)?;
                Some(r.to_string())
            }
        };
        super::limits::line("name", &req.name, 253)?;
        let cmd = Command::DrainNode {
            name: req.name.clone(),
            reason,
        };
        self.ctx.authorized(&who, cmd).await?;
        let state = self.ctx.raft.state();
        let node = state
            .nodes
            .get(&req.name)
            .ok_or_else(|| Status::not_found(format!("node {} not found", req.name)))?;
        Ok(Response::new(convert::node_to_pb(&state, node, 0)))
    }

    async fn log_access(
        &self,
        req: Request<pb::LogAccessRequest>,
    ) -> Result<Response<pb::LogAccessResponse>, Status> {
        let who = self.ctx.authenticate(&req, "log-access")?;
        self.ctx.linearize(&req).await?;
        let state = self.ctx.raft.state();
        super::logs::access(&state, &who, req.get_ref(), now_ms()).map(Response::new)
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.ctx.authenticate(&req, "status")?;
        let st = self.ctx.raft.status().borrow().clone();
        let state = self.ctx.raft.state();
        let running = state
            .jobs
            .values()
            .filter(|j| matches!(j.state, JobState::Placed | JobState::Running))
            .count();
        Ok(Response::new(pb::StatusResponse {
            node_id: st.id,
            leader_id: st.leader,
            term: st.term,
            commit_index: st.commit,
            applied_index: st.applied,
            nodes: state.nodes.len() as u32,
            jobs_pending: state.pending.len() as u32,
            jobs_running: running as u32,
        }))
    }
}

/// The refusal when `user`, with `have` unfinished jobs, asks for `more`.
fn job_cap(user: &str, have: u64, more: u64, cap: u64) -> Result<(), Status> {
    if have.saturating_add(more) <= cap {
        return Ok(());
    }
    Err(Status::resource_exhausted(format!(
        "{user} has {have} unfinished jobs; {more} more would pass the limit of {cap} per user ([limits] max_jobs_per_user): wait for some to finish or cancel some"
    )))
}

/// The most jobs one `ListJobs` page holds: a page of summaries stays far
/// below the 4 MiB message limit however many jobs are queued.
pub const MAX_PAGE: usize = 1000;

/// The bounds `[from, to)` of the page at `offset` of `limit` jobs (0 or
/// over [`MAX_PAGE`]: [`MAX_PAGE`]) in a listing of `len`.
fn page(len: usize, offset: u64, limit: u32) -> (usize, usize) {
    let limit = match limit as usize {
        0 => MAX_PAGE,
        n => n.min(MAX_PAGE),
    };
    let from = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
    (from, from.saturating_add(limit).min(len))
}

#[cfg(test)]
mod page_tests {
    use super::*;

    #[test]
    fn a_user_may_not_queue_past_the_cap() {
        assert!(job_cap("eve", 10, 90, 100).is_ok());
        let e = job_cap("eve", 10, 91, 100).expect_err("over");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("max_jobs_per_user"), "{}", e.message());
        assert!(job_cap("eve", 0, u64::MAX, 100).is_err(), "no overflow");
    }

    #[test]
    fn pages_are_bounded_and_cover_the_listing() {
        assert_eq!(page(10, 0, 0), (0, 10));
        assert_eq!(page(2500, 0, 0), (0, MAX_PAGE));
        assert_eq!(page(2500, 2000, 0), (2000, 2500));
        assert_eq!(page(2500, 0, 5000), (0, MAX_PAGE), "no page over the max");
        assert_eq!(page(10, 4, 3), (4, 7));
        assert_eq!(page(10, 99, 3), (10, 10), "past the end: empty");
        assert_eq!(page(10, u64::MAX, 3), (10, 10));
    }
}
