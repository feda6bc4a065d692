//! From a topic name and partition index to the group that holds it, its leader, and this
//! node's replica: the checks every data call makes first.

use std::sync::Arc;
use std::time::Duration;

use runnel_proto::api::{self, ErrorCode};
use runnel_proto::topic;
use runnel_raft::GroupMetrics;

use super::forward::mark_forwarded;
use super::{Shared, error};
use crate::metadata::{META_GROUP, PartitionRef, Topic};

/// How long a node waits to learn a topic another node already knows.
pub(super) const TOPIC_CATCH_UP_WAIT: Duration = Duration::from_secs(3);

/// Most unknown names one Metadata request waits to learn.
pub(super) const TOPIC_CATCH_UP_NAMES_MAX: usize = 64;

impl Shared {
    /// The peer (internal) address of `node`, where forwarded calls go: it answers the
    /// client API too, and unlike an advertised client address it is reachable between nodes.
    /// This node's configured route wins, as for Raft traffic; membership covers nodes added
    /// later.
    pub(super) fn peer_addr(&self, group: u64, node: u64) -> String {
        self.cfg
            .cluster
            .nodes
            .iter()
            .find(|n| n.id == node)
            .map(|n| n.peer.clone())
            .or_else(|| {
                self.host
                    .members(group)
                    .and_then(|m| m.get(&node).map(|n| n.addr.clone()))
            })
            .filter(|a| !a.is_empty())
            .unwrap_or_default()
    }

    /// The client address of `node` per the group's membership (falling back to the config).
    pub(super) fn client_addr(&self, group: u64, node: u64) -> String {
        self.host
            .members(group)
            .and_then(|m| m.get(&node).map(|n| n.client_addr.clone()))
            .filter(|a| !a.is_empty())
            .or_else(|| {
                self.cfg
                    .cluster
                    .nodes
                    .iter()
                    .find(|n| n.id == node)
                    .map(|n| n.client.clone())
            })
            .unwrap_or_default()
    }

    /// `NOT_LEADER` with a hint, or `LEADER_NOT_AVAILABLE` when no leader is known.
    pub(super) fn not_leader(&self, group: u64, m: Option<&GroupMetrics>) -> api::Error {
        match m.and_then(|m| m.leader.map(|l| (l, m.term))) {
            Some((leader, term)) if leader != self.node_id() => api::Error {
                code: ErrorCode::NotLeader as i32,
                message: format!("node {} does not lead group {group}", self.node_id()),
                leader: Some(api::LeaderHint {
                    node_id: leader,
                    address: self.client_addr(group, leader),
                    epoch: term,
                }),
            },
            _ => error(
                ErrorCode::LeaderNotAvailable,
                format!("group {group} has no leader right now"),
            ),
        }
    }

    /// Ok when this node leads `group` (and, with `ready`, has applied an entry of its term).
    pub(super) fn check_leader(&self, group: u64, ready: bool) -> Result<GroupMetrics, api::Error> {
        let Some(m) = self.host.metrics(group) else {
            return Err(error(
                ErrorCode::LeaderNotAvailable,
                format!("group {group} is not hosted on node {}", self.node_id()),
            ));
        };
        if m.leader != Some(self.node_id()) {
            return Err(self.not_leader(group, Some(&m)));
        }
        if ready && !m.ready {
            return Err(error(
                ErrorCode::NotReady,
                format!("leader of group {group} has not applied an entry of its term yet"),
            ));
        }
        Ok(m)
    }

    /// Ok when this node may serve reads of `group`: it leads and is ready, or `follower` reads
    /// are allowed and it hosts a replica.
    pub(super) fn check_read(&self, group: u64, follower: bool) -> Result<(), api::Error> {
        if follower {
            if self.host.store(group).is_some() {
                return Ok(());
            }
            return Err(error(
                ErrorCode::LeaderNotAvailable,
                format!("group {group} is not hosted on node {}", self.node_id()),
            ));
        }
        self.check_leader(group, true).map(|_| ())
    }

    pub(super) fn resolve(
        &self,
        name: &str,
        partition: u32,
    ) -> Result<(Topic, PartitionRef), api::Error> {
        let t = self.topic(name)?;
        let p = t
            .partitions
            .get(partition as usize)
            .copied()
            .ok_or_else(|| {
                error(
                    ErrorCode::UnknownTopicOrPartition,
                    format!(
                        "topic {name:?} has {} partitions; {partition} does not exist",
                        t.partitions.len()
                    ),
                )
            })?;
        Ok((t, p))
    }

    /// Read-your-writes for topic metadata: when this node does not know `name` yet, asks the
    /// metadata leader; if the leader knows it, waits (bounded) until this node's image has
    /// caught up. A topic created through one node is then usable through every other at once.
    pub(super) async fn await_topic(&self, name: &str) {
        if self.image().topics.contains_key(name) || topic::validate_name(name).is_err() {
            return;
        }
        let Ok(Some(ch)) = self.forward_target(META_GROUP, false) else {
            return; // this node leads the metadata group (its image is current), or no leader
        };
        let req = mark_forwarded(api::MetadataRequest {
            topics: vec![name.to_string()],
        });
        let asked = tokio::time::timeout(
            TOPIC_CATCH_UP_WAIT,
            api::broker_client::BrokerClient::new(ch).metadata(req),
        )
        .await;
        let known = matches!(&asked, Ok(Ok(r)) if r.get_ref().topics.iter()
            .any(|t| t.name == name && t.error.is_none()));
        if !known {
            return;
        }
        let mut meta = self.meta.clone();
        let _ = tokio::time::timeout(
            TOPIC_CATCH_UP_WAIT,
            meta.wait_for(|img| img.topics.contains_key(name)),
        )
        .await;
    }

    /// [`Shared::resolve`] after [`Shared::await_topic`].
    pub(super) async fn resolve_fresh(
        &self,
        name: &str,
        partition: u32,
    ) -> Result<(Topic, PartitionRef), api::Error> {
        self.await_topic(name).await;
        self.resolve(name, partition)
    }

    pub(super) fn topic(&self, name: &str) -> Result<Topic, api::Error> {
        topic::validate_name(name).map_err(|m| error(ErrorCode::InvalidTopic, m))?;
        self.image().topics.get(name).cloned().ok_or_else(|| {
            error(
                ErrorCode::UnknownTopicOrPartition,
                format!("unknown topic {name:?}"),
            )
        })
    }

    /// The partition must exist in this node's replica of its group (it is created right after
    /// the topic, by the group's leader).
    /// Whether replica `p` was deleted with its topic: the partition is gone from its group on
    /// this node and, within [`TOPIC_CATCH_UP_WAIT`] (this node's metadata may trail the
    /// group's own log), the metadata maps no topic partition to it any more.
    pub(super) async fn partition_deleted(&self, p: PartitionRef) -> bool {
        let gone_here = self
            .host
            .store(p.group)
            .is_some_and(|st| st.offsets(p.partition_id).is_none());
        if !gone_here {
            return false;
        }
        let mut rx = self.meta.clone();
        let deadline = tokio::time::Instant::now() + TOPIC_CATCH_UP_WAIT;
        loop {
            let mapped = rx.borrow_and_update().topics.values().any(|t| {
                t.partitions
                    .iter()
                    .any(|q| q.partition_id == p.partition_id)
            });
            if !mapped {
                return true;
            }
            if !matches!(
                tokio::time::timeout_at(deadline, rx.changed()).await,
                Ok(Ok(()))
            ) {
                return false;
            }
        }
    }

    pub(super) fn local_store(
        &self,
        p: PartitionRef,
    ) -> Result<Arc<runnel_raft::GroupStore>, api::Error> {
        let store = self.host.store(p.group).ok_or_else(|| {
            error(
                ErrorCode::LeaderNotAvailable,
                format!("group {} is not hosted on node {}", p.group, self.node_id()),
            )
        })?;
        if store.offsets(p.partition_id).is_none() {
            return Err(error(
                ErrorCode::LeaderNotAvailable,
                format!(
                    "partition {} is being created in group {}",
                    p.partition_id, p.group
                ),
            ));
        }
        Ok(store)
    }
}
