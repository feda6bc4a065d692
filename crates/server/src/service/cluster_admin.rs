//! Cluster administration: `ClusterStatus`, `TransferLeader` and `ReplaceNode`.

use std::collections::BTreeMap;

use runnel_proto::api::{self, ErrorCode};
use tonic::{Request, Response, Status};

use super::forward::{bounded, forward_failed, forwarded, mark_forwarded};
use super::shared::ADMIN_WAIT;
use super::{Api, Shared, error, now_ms};
use crate::metadata::META_GROUP;

impl Shared {
    /// Replaces `old_node_id` by `new_node_id` among the voters of `group`, on its leader
    /// (forwarded there once): learner first, caught up, then one membership change.
    pub(super) async fn replace_in_group(
        &self,
        group: u64,
        r: &api::ReplaceNodeRequest,
        forwarded: bool,
    ) -> Result<(), api::Error> {
        let (old, new) = (r.old_node_id, r.new_node_id);
        let m = self
            .host
            .metrics(group)
            .ok_or_else(|| error(ErrorCode::InvalidRequest, format!("no group {group}")))?;
        if m.voters.contains(&new) && !m.voters.contains(&old) {
            return Ok(());
        }
        match self.forward_target(group, forwarded)? {
            Some(ch) => {
                let req = api::ReplaceNodeRequest {
                    groups: vec![group],
                    ..r.clone()
                };
                let resp = api::admin_client::AdminClient::new(ch)
                    .replace_node(mark_forwarded(req))
                    .await
                    .map_err(forward_failed)?
                    .into_inner();
                resp.error.map_or(Ok(()), Err)
            }
            None => {
                if !m.voters.contains(&old) {
                    return Err(error(
                        ErrorCode::InvalidRequest,
                        format!("node {old} is not a voter (voters: {:?})", m.voters),
                    ));
                }
                let failed = |what: &str, e: runnel_raft::HostError| {
                    error(ErrorCode::RequestTimedOut, format!("{what}: {e}"))
                };
                if !m.voters.contains(&new) {
                    let node = runnel_raft::NodeAddr {
                        addr: r.new_peer_address.clone(),
                        client_addr: r.new_client_address.clone(),
                    };
                    tracing::info!(
                        group,
                        node = new,
                        "adding learner; waiting for it to catch up"
                    );
                    self.host
                        .add_learner_with(group, new, node)
                        .await
                        .map_err(|e| failed("adding the learner", e))?;
                }
                let mut voters = self
                    .host
                    .metrics(group)
                    .map(|m| m.voters)
                    .unwrap_or_default();
                voters.remove(&old);
                voters.insert(new);
                tracing::info!(group, ?voters, "changing voters");
                self.host
                    .change_voters(group, voters)
                    .await
                    .map_err(|e| failed("changing the voters", e))
            }
        }
    }
}

/// Checks a `ReplaceNode` request on its own (ids, addresses).
pub(super) fn check_replacement(r: &api::ReplaceNodeRequest) -> Result<(), String> {
    if r.old_node_id == 0 || r.new_node_id == 0 {
        return Err("node ids are > 0".into());
    }
    if r.old_node_id == r.new_node_id {
        return Err("a replacement needs a new node id (a wiped node forgot its votes)".into());
    }
    for (what, a) in [
        ("new_peer_address", &r.new_peer_address),
        ("new_client_address", &r.new_client_address),
    ] {
        match a.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(format!("{what} {a:?} is not host:port")),
        }
    }
    Ok(())
}

pub(super) async fn cluster_status(
    api: &Api,
    _req: Request<api::ClusterStatusRequest>,
) -> Result<Response<api::ClusterStatusResponse>, Status> {
    let s = &api.shared;
    let img = s.image();
    let mut per_group: BTreeMap<u64, u32> = BTreeMap::new();
    for t in img.topics.values() {
        for p in &t.partitions {
            *per_group.entry(p.group).or_default() += 1;
        }
    }
    let groups = s
        .host
        .groups()
        .into_iter()
        .filter_map(|g| s.host.metrics(g))
        .map(|m| {
            let last = m.last_log.map_or(-1, |l| l as i64);
            api::GroupStatus {
                group_id: m.group_id,
                leader_id: m.leader.unwrap_or(0),
                term: m.term,
                last_log_index: last,
                committed_index: m.committed.map_or(-1, |l| l as i64),
                applied_index: m.applied.map_or(-1, |l| l as i64),
                voters: m.voters.iter().copied().collect(),
                partitions: if m.group_id == META_GROUP {
                    1
                } else {
                    per_group.get(&m.group_id).copied().unwrap_or(0)
                },
                replicas: m
                    .replication
                    .iter()
                    .map(|(id, matched)| {
                        let mi = matched.map_or(-1, |x| x as i64);
                        api::ReplicaProgress {
                            node_id: *id,
                            matched_index: mi,
                            lag: if mi < 0 { -1 } else { (last - mi).max(0) },
                        }
                    })
                    .collect(),
                preferred_leader: crate::placement::preferred_leader(
                    m.group_id,
                    &m.voters.iter().copied().collect::<Vec<_>>(),
                )
                .unwrap_or(0),
                stopped: m.stopped.unwrap_or_default(),
            }
        })
        .collect();
    let st = s.storage.status();
    Ok(Response::new(api::ClusterStatusResponse {
        nodes: s.nodes(),
        groups,
        answered_by: s.node_id(),
        wall_clock_ms: now_ms(),
        storage: Some(api::StorageStatus {
            serving: st.problems.is_empty(),
            problems: st.problems,
            free_bytes: st.free_bytes,
            min_free_bytes: s.cfg.storage.min_free_bytes,
            damaged_reads: st.damaged_reads,
            group_restarts: st.group_restarts,
        }),
    }))
}

pub(super) async fn transfer_leader(
    api: &Api,
    req: Request<api::TransferLeaderRequest>,
) -> Result<Response<api::TransferLeaderResponse>, Status> {
    let fwd = forwarded(&req);
    let r = req.into_inner();
    let s = &api.shared;
    let Some(m) = s.host.metrics(r.group_id) else {
        return Ok(Response::new(api::TransferLeaderResponse {
            error: Some(error(
                ErrorCode::InvalidRequest,
                format!("no group {}", r.group_id),
            )),
        }));
    };
    if !m.voters.contains(&r.to_node) {
        return Ok(Response::new(api::TransferLeaderResponse {
            error: Some(error(
                ErrorCode::InvalidRequest,
                format!("node {} is not a voter of group {}", r.to_node, r.group_id),
            )),
        }));
    }
    if m.leader == Some(r.to_node) {
        return Ok(Response::new(api::TransferLeaderResponse { error: None }));
    }
    match s.forward_target(r.group_id, fwd) {
        Err(e) => Ok(Response::new(api::TransferLeaderResponse {
            error: Some(e),
        })),
        Ok(Some(ch)) => Ok(Response::new(
            match bounded(
                api::admin_client::AdminClient::new(ch).transfer_leader(mark_forwarded(r)),
            )
            .await
            {
                Ok(r) => r.into_inner(),
                Err(st) => api::TransferLeaderResponse {
                    error: Some(forward_failed(st)),
                },
            },
        )),
        Ok(None) => {
            let res = s.host.transfer_leader(r.group_id, r.to_node).await;
            let res = match res {
                Ok(()) => s
                    .host
                    .wait_until(r.group_id, ADMIN_WAIT, "leader transfer", |m| {
                        m.leader == Some(r.to_node)
                    })
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            Ok(Response::new(api::TransferLeaderResponse {
                error: res
                    .err()
                    .map(|e| error(ErrorCode::RequestTimedOut, e.to_string())),
            }))
        }
    }
}

pub(super) async fn replace_node(
    api: &Api,
    req: Request<api::ReplaceNodeRequest>,
) -> Result<Response<api::ReplaceNodeResponse>, Status> {
    let fwd = forwarded(&req);
    let r = req.into_inner();
    let s = &api.shared;
    let fail = |e, groups_done| {
        Ok(Response::new(api::ReplaceNodeResponse {
            error: Some(e),
            groups_done,
        }))
    };
    if let Err(m) = check_replacement(&r) {
        return fail(error(ErrorCode::InvalidRequest, m), Vec::new());
    }
    let every: Vec<u64> = (0..=u64::from(s.cfg.cluster.data_groups)).collect();
    let groups = if r.groups.is_empty() {
        every
    } else {
        if let Some(g) = r.groups.iter().find(|g| !every.contains(g)) {
            return fail(
                error(ErrorCode::InvalidRequest, format!("no group {g}")),
                Vec::new(),
            );
        }
        r.groups.clone()
    };
    let mut done = Vec::new();
    for g in groups {
        if let Err(e) = s.replace_in_group(g, &r, fwd).await {
            let e = api::Error {
                message: format!("group {g}: {}", e.message),
                ..e
            };
            return fail(e, done);
        }
        done.push(g);
    }
    Ok(Response::new(api::ReplaceNodeResponse {
        error: None,
        groups_done: done,
    }))
}
