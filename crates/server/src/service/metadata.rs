//! `Metadata`: topics, partitions, their leaders and replicas, and the cluster's nodes.

use runnel_proto::api::{self, ErrorCode};
use tonic::{Request, Response, Status};

use super::forward::forwarded;
use super::resolve::TOPIC_CATCH_UP_NAMES_MAX;
use super::{Api, Shared, error};
use crate::metadata::{META_GROUP, PartitionRef, Topic};

impl Shared {
    pub(super) fn partition_metadata(
        &self,
        index: usize,
        p: PartitionRef,
    ) -> api::PartitionMetadata {
        let m = self.host.metrics(p.group);
        let leader = m.as_ref().and_then(|m| m.leader).unwrap_or(0);
        api::PartitionMetadata {
            partition: index as u32,
            group_id: p.group,
            leader_id: leader,
            leader_address: if leader == 0 {
                String::new()
            } else {
                self.client_addr(p.group, leader)
            },
            leader_epoch: m.as_ref().map_or(0, |m| m.term),
            replicas: m
                .as_ref()
                .map(|m| m.voters.iter().copied().collect())
                .unwrap_or_default(),
            error: if leader == 0 {
                Some(error(ErrorCode::LeaderNotAvailable, "no leader known"))
            } else {
                None
            },
        }
    }

    pub(super) fn topic_metadata(&self, t: &Topic) -> api::TopicMetadata {
        api::TopicMetadata {
            name: t.name.clone(),
            topic_id: t.topic_id,
            config: Some(api::TopicConfig {
                retention_ms: t.settings.retention_ms,
                retention_bytes: t.settings.retention_bytes,
                segment_bytes: t.settings.segment_bytes,
            }),
            partitions: t
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| self.partition_metadata(i, *p))
                .collect(),
            error: None,
        }
    }

    pub(super) fn nodes(&self) -> Vec<api::NodeInfo> {
        let members = self.host.members(META_GROUP).unwrap_or_default();
        if members.is_empty() {
            return self
                .cfg
                .cluster
                .nodes
                .iter()
                .map(|n| api::NodeInfo {
                    node_id: n.id,
                    address: n.client.clone(),
                    peer_address: n.peer.clone(),
                })
                .collect();
        }
        members
            .iter()
            .map(|(id, n)| api::NodeInfo {
                node_id: *id,
                address: self.client_addr(META_GROUP, *id),
                peer_address: n.addr.clone(),
            })
            .collect()
    }
}

pub(super) async fn metadata(
    api: &Api,
    req: Request<api::MetadataRequest>,
) -> Result<Response<api::MetadataResponse>, Status> {
    let fwd = forwarded(&req);
    let r = req.into_inner();
    let s = &api.shared;
    if !fwd && r.topics.len() <= TOPIC_CATCH_UP_NAMES_MAX {
        futures::future::join_all(r.topics.iter().map(|t| s.await_topic(t))).await;
    }
    let img = s.image();
    let topics = if r.topics.is_empty() {
        img.topics.values().map(|t| s.topic_metadata(t)).collect()
    } else {
        r.topics
            .iter()
            .map(|name| match s.topic(name) {
                Ok(t) => s.topic_metadata(&t),
                Err(e) => api::TopicMetadata {
                    name: name.clone(),
                    error: Some(e),
                    ..Default::default()
                },
            })
            .collect()
    };
    Ok(Response::new(api::MetadataResponse {
        nodes: s.nodes(),
        topics,
        controller_id: s
            .host
            .metrics(META_GROUP)
            .and_then(|m| m.leader)
            .unwrap_or(0),
        answered_by: s.node_id(),
    }))
}
