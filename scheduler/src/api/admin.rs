//! `Admin`: Raft membership and health (`muster admin status|peers`).

use super::Ctx;
use crate::raft::PeerChange;
use muster_proto as pb;
use muster_proto::admin_server::Admin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The admin service.
pub struct AdminService {
    ctx: Arc<Ctx>,
}

impl AdminService {
    /// A service over the shared context.
    pub fn new(ctx: Arc<Ctx>) -> AdminService {
        AdminService { ctx }
    }

    fn members(&self) -> Vec<pb::MemberInfo> {
        let st = self.ctx.raft.status().borrow().clone();
        let links = self.ctx.raft.links();
        st.members
            .iter()
            .map(|m| pb::MemberInfo {
                id: m.id,
                address: self.ctx.raft.address_of(m.id).unwrap_or_default(),
                voter: m.voter,
                matched: m.matched,
                lag: if st.is_leader {
                    st.last_index.saturating_sub(m.matched)
                } else {
                    0
                },
                link: if m.id == st.id {
                    "self".to_string()
                } else {
                    links.get(&m.id).cloned().unwrap_or_else(|| "idle".into())
                },
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        req: Request<pb::AdminStatusRequest>,
    ) -> Result<Response<pb::AdminStatusResponse>, Status> {
        // Members probe each other with this call: daemons are welcome too.
        if self
            .ctx
            .auth
            .daemon(&req, crate::auth::Daemon::Node)
            .is_err()
        {
            self.ctx.authenticate(&req, "admin-status")?;
        }
        let st = self.ctx.raft.status().borrow().clone();
        let digest = cluster_digest(self.ctx.raft.state().digest(), &st);
        Ok(Response::new(pb::AdminStatusResponse {
            node_id: st.id,
            // A member catching up since its data folder was begun does
            // not vote yet (raft/mod.rs): say so.
            role: if st.catching_up && !st.is_leader {
                format!("{} (catching up, not voting)", st.role)
            } else {
                st.role.to_string()
            },
            leader_id: st.leader,
            term: st.term,
            commit_index: st.commit,
            applied_index: st.applied,
            last_index: st.last_index,
            snapshot_index: st.snapshot_index,
            state_digest: digest,
            members: self.members(),
        }))
    }

    async fn change_peers(
        &self,
        req: Request<pb::ChangePeersRequest>,
    ) -> Result<Response<pb::ChangePeersResponse>, Status> {
        let who = self.ctx.authenticate(&req, "peers-change")?;
        let target = format!("node {}", req.get_ref().id);
        let audit = |outcome: String| {
            let e = crate::state::AuditEntry::by(
                &who,
                super::now_ms(),
                "peers-change",
                target.clone(),
                outcome,
            );
            self.ctx.auth.audit(e)
        };
        if let Err(d) = crate::auth::roles::cluster_admin(&who, "changing members") {
            audit(format!("denied: {d}"));
            return Err(Status::permission_denied(d));
        }
        let r = self.change(req.into_inner()).await;
        audit(match &r {
            Ok(_) => "applied".into(),
            Err(s) => format!("rejected: {}", s.message()),
        });
        r
    }
}

impl AdminService {
    async fn change(
        &self,
        req: pb::ChangePeersRequest,
    ) -> Result<Response<pb::ChangePeersResponse>, Status> {
        if req.id == 0 {
            return Err(Status::invalid_argument(
                "id: a member's Raft id is a number from 1",
            ));
        }
        let current: Vec<u64> = self
            .ctx
            .raft
            .status()
            .borrow()
            .members
            .iter()
            .map(|m| m.id)
            .collect();
        let change = match pb::change_peers_request::Op::try_from(req.op) {
            Ok(pb::change_peers_request::Op::Add) => {
                if current.contains(&req.id) {
                    return Err(Status::already_exists(format!(
                        "node {} is already a member",
                        req.id
                    )));
                }
                if !(req.address.starts_with("http://") || req.address.starts_with("https://")) {
                    return Err(Status::invalid_argument(format!(
                        "address: {:?} must start with http:// or https://",
                        req.address
                    )));
                }
                PeerChange::Add {
                    id: req.id,
                    address: req.address,
                }
            }
            Ok(pb::change_peers_request::Op::Remove) => {
                if !current.contains(&req.id) {
                    return Err(Status::not_found(format!(
                        "node {} is not a member",
                        req.id
                    )));
                }
                if current.len() == 1 {
                    return Err(Status::failed_precondition("cannot remove the last member"));
                }
                PeerChange::Remove { id: req.id }
            }
            _ => return Err(Status::invalid_argument("op: must be ADD or REMOVE")),
        };
        self.ctx
            .raft
            .change_peers(change)
            .await
            .map_err(|e| super::propose_status(&e))?;
        Ok(Response::new(pb::ChangePeersResponse {
            members: self.members(),
        }))
    }
}

/// The digest `muster admin status` reports: the state's, with the Raft
/// configuration this member has applied (voters, learners, the voters of
/// a configuration being left) mixed in, so that members that agree on the
/// state but not on who the members are do not look converged.
fn cluster_digest(state: u64, st: &crate::raft::RaftStatus) -> u64 {
    let mut conf: Vec<(u64, u8)> = st
        .members
        .iter()
        .map(|m| (m.id, u8::from(m.voter)))
        .chain(st.voters_outgoing.iter().map(|id| (*id, 2)))
        .collect();
    conf.sort_unstable();
    // FNV-1a, as State::digest: stable across processes and versions.
    let bytes = state.to_le_bytes().into_iter().chain(
        conf.iter()
            .flat_map(|(id, kind)| id.to_le_bytes().into_iter().chain([*kind])),
    );
    muster_proto::fnv::extend(muster_proto::fnv::OFFSET, bytes)
}

#[cfg(test)]
mod tests {
    use super::cluster_digest;
    use crate::raft::{Member, RaftStatus};

    fn status(voters: &[u64], learners: &[u64], outgoing: &[u64]) -> RaftStatus {
        let mut members: Vec<Member> = voters
            .iter()
            .chain(outgoing)
            .map(|id| Member {
                id: *id,
                voter: true,
                matched: 0,
            })
            .chain(learners.iter().map(|id| Member {
                id: *id,
                voter: false,
                matched: 0,
            }))
            .collect();
        members.sort_by_key(|m| m.id);
        members.dedup_by_key(|m| m.id);
        RaftStatus {
            members,
            voters_outgoing: outgoing.to_vec(),
            ..Default::default()
        }
    }

    /// Issue 11: two members with the same state but different
    /// configurations (a joiner that never learned the membership) must not
    /// report the same digest.
    #[test]
    fn the_digest_covers_the_raft_configuration() {
        let state = 42;
        let base = cluster_digest(state, &status(&[1, 2, 3], &[], &[]));
        assert_eq!(base, cluster_digest(state, &status(&[1, 2, 3], &[], &[])));
        let mut leader_view = status(&[1, 2, 3], &[], &[]);
        leader_view.leader = 2;
        leader_view.members[0].matched = 99;
        assert_eq!(
            base,
            cluster_digest(state, &leader_view),
            "views of progress do not count"
        );
        for other in [
            status(&[], &[], &[]),
            status(&[1, 2], &[], &[]),
            status(&[1, 2], &[3], &[]),
            status(&[1, 2, 3], &[], &[1, 2]),
            status(&[1, 2, 3, 4], &[], &[]),
        ] {
            assert_ne!(base, cluster_digest(state, &other), "{other:?}");
        }
        assert_ne!(
            base,
            cluster_digest(state + 1, &status(&[1, 2, 3], &[], &[]))
        );
    }
}
