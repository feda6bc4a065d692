//! The client API: `runnel.v1.Broker` and `runnel.v1.Admin` over this node's groups.
//!
//! Every domain outcome is an in-band [`api::Error`] (absent on success); only a request that
//! is malformed as a whole gets a gRPC status (`INVALID_ARGUMENT`). Every size, count and wait
//! from the wire is checked against a named limit in [`crate::config::Limits`] first.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::Stream;
use runnel_proto::api::{self, ErrorCode};
use runnel_proto::raft as pb;
use runnel_proto::{partitioner, topic};
use runnel_raft::{ApplyError, ApplyResult, GroupMetrics, RaftHost, ReadError, WriteError};
use runnel_storage::StorageError;

use crate::storage_health::StorageHealth;
use runnel_record::{self as batch, BatchBuilder, BatchOptions, RecordBatch};
use tokio::sync::{Mutex, watch};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::config::{Config, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN};
use crate::metadata::{self, META_GROUP, META_PARTITION, MetaImage, PartitionRef, Topic};
use crate::order::{OrderKey, ProduceOrder};

/// Metadata key marking a request one node forwarded to another (never forwarded again).
const FORWARDED: &str = "x-runnel-forwarded";
/// How long a topic admin call waits for its effects to become visible on this node.
const ADMIN_WAIT: Duration = Duration::from_secs(10);
/// How long a forwarded call may take (the leader itself may wait up to [`ADMIN_WAIT`]).
const FORWARD_WAIT: Duration = Duration::from_secs(15);
/// How long a node waits to learn a topic another node already knows.
const TOPIC_CATCH_UP_WAIT: Duration = Duration::from_secs(3);
/// Most unknown names one Metadata request waits to learn.
const TOPIC_CATCH_UP_NAMES_MAX: usize = 64;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// An in-band error.
pub fn error(code: ErrorCode, message: impl Into<String>) -> api::Error {
    api::Error {
        code: code as i32,
        message: message.into(),
        leader: None,
    }
}

/// Everything the services share on one node.
pub struct Shared {
    /// The node's configuration.
    pub cfg: Config,
    /// Its Raft groups.
    pub host: Arc<RaftHost>,
    /// The replayed metadata.
    pub meta: watch::Receiver<Arc<MetaImage>>,
    rr: AtomicU32,
    /// Producer ids left in this node's current block: (next, end exclusive).
    pids: Mutex<(i64, i64)>,
    /// Channels to other nodes' peer listeners, for forwarding admin calls.
    channels: std::sync::Mutex<HashMap<String, tonic::transport::Channel>>,
    /// Becomes true when the node shuts down: long-polls and streams end early.
    stopping: watch::Receiver<bool>,
    /// Keeps pipelined batches of idempotent producers in sequence order.
    order: ProduceOrder,
    /// The node's storage state: write refusals below the free-space floor, cluster status.
    pub storage: Arc<StorageHealth>,
    /// The descriptor limit and this node's partition budget.
    pub fds: crate::fdlimit::Descriptors,
    /// The memory Subscribe streams may buffer, node-wide.
    pub subscribe_budget: crate::subscribe::Budget,
    /// Counters of the client listener.
    pub client_listener: Arc<runnel_raft::listener::ListenStats>,
}

/// Where a batch of an idempotent producer belongs in its sequence.
#[derive(Debug, Clone, Copy)]
struct Ordered {
    key: OrderKey,
    epoch: i32,
    seq: i32,
    count: i32,
}

impl Shared {
    /// Shared state over `host` and the metadata image `meta`; `stopping` turns true at
    /// shutdown.
    pub fn new(
        cfg: Config,
        host: Arc<RaftHost>,
        meta: watch::Receiver<Arc<MetaImage>>,
        stopping: watch::Receiver<bool>,
        storage: Arc<StorageHealth>,
        fds: crate::fdlimit::Descriptors,
    ) -> Self {
        Shared {
            fds,
            storage,
            subscribe_budget: crate::subscribe::Budget::new(cfg.limits.subscribe_memory_bytes),
            cfg,
            host,
            meta,
            rr: AtomicU32::new(0),
            pids: Mutex::new((0, 0)),
            channels: std::sync::Mutex::default(),
            stopping,
            order: ProduceOrder::default(),
            client_listener: Arc::default(),
        }
    }

    /// Partitions of every topic whose group has a replica on this node (the metadata log
    /// excluded), by the replayed metadata.
    pub fn hosted_partitions(&self) -> u64 {
        let me = self.node_id();
        self.image()
            .topics
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter(|p| {
                self.host
                    .members(p.group)
                    .is_none_or(|m| m.contains_key(&me))
            })
            .count() as u64
    }

    fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    fn node_id(&self) -> u64 {
        self.host.node_id()
    }

    fn image(&self) -> Arc<MetaImage> {
        Arc::clone(&self.meta.borrow())
    }

    /// The peer (internal) address of `node`, where forwarded calls go: it answers the
    /// client API too, and unlike an advertised client address it is reachable between nodes.
    /// This node's configured route wins, as for Raft traffic; membership covers nodes added
    /// later.
    fn peer_addr(&self, group: u64, node: u64) -> String {
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
    fn client_addr(&self, group: u64, node: u64) -> String {
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
    fn not_leader(&self, group: u64, m: Option<&GroupMetrics>) -> api::Error {
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
    fn check_leader(&self, group: u64, ready: bool) -> Result<GroupMetrics, api::Error> {
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
    fn check_read(&self, group: u64, follower: bool) -> Result<(), api::Error> {
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

    fn resolve(&self, name: &str, partition: u32) -> Result<(Topic, PartitionRef), api::Error> {
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

    /// Replaces `old_node_id` by `new_node_id` among the voters of `group`, on its leader
    /// (forwarded there once): learner first, caught up, then one membership change.
    async fn replace_in_group(
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

    /// Read-your-writes for topic metadata: when this node does not know `name` yet, asks the
    /// metadata leader; if the leader knows it, waits (bounded) until this node's image has
    /// caught up. A topic created through one node is then usable through every other at once.
    async fn await_topic(&self, name: &str) {
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
    async fn resolve_fresh(
        &self,
        name: &str,
        partition: u32,
    ) -> Result<(Topic, PartitionRef), api::Error> {
        self.await_topic(name).await;
        self.resolve(name, partition)
    }

    fn topic(&self, name: &str) -> Result<Topic, api::Error> {
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
    fn local_store(&self, p: PartitionRef) -> Result<Arc<runnel_raft::GroupStore>, api::Error> {
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

    fn partition_metadata(&self, index: usize, p: PartitionRef) -> api::PartitionMetadata {
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

    fn topic_metadata(&self, t: &Topic) -> api::TopicMetadata {
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

    fn nodes(&self) -> Vec<api::NodeInfo> {
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

    /// Writes one record to the metadata log (this node must lead group 0) and returns its
    /// offset once applied here.
    async fn write_meta(&self, rec: pb::MetaRecord) -> Result<u64, api::Error> {
        let batch = metadata::encode_record(&rec, now_ms());
        let cmd = produce_command(META_PARTITION, batch, -1, -1, -1);
        let base = match self.write(META_GROUP, cmd, ADMIN_WAIT).await? {
            ApplyResult::Produced { base_offset, .. } => base_offset,
            // The metadata log is created by group 0's first leader right after bootstrap.
            ApplyResult::Refused(ApplyError::UnknownPartition, _) => {
                return Err(error(
                    ErrorCode::LeaderNotAvailable,
                    "the cluster's metadata log is being created: retry",
                ));
            }
            other => {
                return Err(error(
                    ErrorCode::UnknownServerError,
                    format!("metadata write: {other:?}"),
                ));
            }
        };
        // Wait until the replayed image covers it.
        let mut rx = self.meta.clone();
        let deadline = tokio::time::Instant::now() + ADMIN_WAIT;
        while rx.borrow_and_update().next_offset <= base {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(error(
                    ErrorCode::RequestTimedOut,
                    "metadata written but not yet replayed here",
                ));
            }
        }
        Ok(base)
    }

    /// Proposes `cmd` and maps every failure to its in-band code.
    async fn write(
        &self,
        group: u64,
        cmd: pb::Command,
        timeout: Duration,
    ) -> Result<ApplyResult, api::Error> {
        self.write_ordered(group, cmd, timeout, None).await
    }

    /// [`Shared::write`] for a batch of an idempotent producer: it enters the log after the
    /// producer's previous batch when that one is on its way (see [`crate::order`]).
    async fn write_ordered(
        &self,
        group: u64,
        cmd: pb::Command,
        timeout: Duration,
        order: Option<Ordered>,
    ) -> Result<ApplyResult, api::Error> {
        if let Some(why) = self.storage.refuse_writes() {
            return Err(error(
                ErrorCode::StorageError,
                format!("node {} refuses writes: {why}; retry", self.node_id()),
            ));
        }
        let write = async {
            let Some(o) = order else {
                return self.host.write(group, cmd).await;
            };
            self.order.wait_turn(o.key, o.epoch, o.seq).await;
            match self.host.propose(group, cmd).await {
                Ok(applied) => {
                    self.order.proposed(o.key, o.epoch, o.seq, o.count);
                    applied.await
                }
                Err(e) => {
                    self.order.wake();
                    Err(e)
                }
            }
        };
        match tokio::time::timeout(timeout, write).await {
            Err(_) => Err(error(
                ErrorCode::RequestTimedOut,
                format!(
                    "not committed within {} ms: outcome unknown, retry idempotently",
                    timeout.as_millis()
                ),
            )),
            Ok(Ok(w)) => Ok(w.result),
            Ok(Err(WriteError::NotLeader { .. })) => {
                Err(self.not_leader(group, self.host.metrics(group).as_ref()))
            }
            Ok(Err(WriteError::Unknown(m))) => Err(error(
                ErrorCode::RequestTimedOut,
                format!("outcome unknown ({m}): retry idempotently"),
            )),
            Ok(Err(WriteError::UnknownGroup(g))) => Err(error(
                ErrorCode::LeaderNotAvailable,
                format!("group {g} not hosted here"),
            )),
            Ok(Err(WriteError::Unavailable(m))) => Err(error(
                ErrorCode::LeaderNotAvailable,
                format!("group {group} unavailable: {m}"),
            )),
        }
    }

    fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, api::Error> {
        let mut ch = self.channels.lock().expect("channels lock");
        if let Some(c) = ch.get(addr) {
            return Ok(c.clone());
        }
        let c = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| error(ErrorCode::UnknownServerError, e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        ch.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// The wall clocks of the other nodes that answer within `wait` (each asked over its peer
    /// listener, in parallel), for judging time against a quorum rather than one clock.
    pub async fn peer_clocks(&self, wait: Duration) -> Vec<i64> {
        let me = self.node_id();
        let asks = self
            .nodes()
            .into_iter()
            .filter(|n| n.node_id != me)
            .map(|n| self.peer_addr(META_GROUP, n.node_id))
            .filter(|a| !a.is_empty())
            .filter_map(|a| self.channel(&a).ok())
            .map(|ch| async move {
                let mut a = api::admin_client::AdminClient::new(ch);
                let call = a.cluster_status(mark_forwarded(api::ClusterStatusRequest {}));
                match tokio::time::timeout(wait, call).await {
                    Ok(Ok(r)) => Some(r.into_inner().wall_clock_ms),
                    _ => None,
                }
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Where to send a call that must run on `group`'s leader: `None` when that is this node,
    /// else a channel to the leader (an error if it is unknown or the call was forwarded once).
    fn forward_target(
        &self,
        group: u64,
        forwarded: bool,
    ) -> Result<Option<tonic::transport::Channel>, api::Error> {
        let m = self.host.metrics(group);
        match m.as_ref().and_then(|m| m.leader) {
            Some(l) if l == self.node_id() => Ok(None),
            Some(l) if !forwarded => Ok(Some(self.channel(&self.peer_addr(group, l))?)),
            _ => Err(self.not_leader(group, m.as_ref())),
        }
    }

    async fn next_producer_id(&self) -> Result<i64, api::Error> {
        let mut pids = self.pids.lock().await;
        if pids.0 >= pids.1 {
            let offset = self
                .write_meta(pb::MetaRecord {
                    kind: Some(pb::meta_record::Kind::ProducerIdBlock(
                        pb::ProducerIdBlock {
                            node_id: self.node_id(),
                        },
                    )),
                })
                .await?;
            let start = metadata::producer_block_start(offset);
            *pids = (start, start + metadata::PRODUCER_ID_BLOCK);
        }
        let id = pids.0;
        pids.0 += 1;
        Ok(id)
    }
}

fn produce_command(
    partition_id: u64,
    batch: Bytes,
    producer_id: i64,
    producer_epoch: i32,
    base_sequence: i32,
) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::Produce(pb::Produce {
            partition_id,
            batch,
            producer_id,
            producer_epoch,
            base_sequence,
            timestamp_ms: now_ms(),
        })),
    }
}

fn refused(e: ApplyError, m: String) -> api::Error {
    let code = match e {
        ApplyError::UnknownPartition => ErrorCode::LeaderNotAvailable,
        ApplyError::PartitionExists => ErrorCode::InvalidRequest,
        ApplyError::OutOfOrderSequence => ErrorCode::OutOfOrderSequence,
        ApplyError::FencedProducer => ErrorCode::FencedProducer,
        ApplyError::OffsetOutOfRange => ErrorCode::OffsetOutOfRange,
        ApplyError::OffsetConflict => ErrorCode::OffsetConflict,
        ApplyError::CorruptBatch => ErrorCode::CorruptBatch,
        ApplyError::InvalidRequest => ErrorCode::InvalidRequest,
    };
    error(code, m)
}

fn read_error(e: ReadError) -> api::Error {
    match e {
        ReadError::UnknownPartition(p) => error(
            ErrorCode::LeaderNotAvailable,
            format!("partition {p} is not (yet) in this replica"),
        ),
        ReadError::Storage(StorageError::OffsetOutOfRange {
            offset,
            log_start,
            log_end,
        }) => error(
            ErrorCode::OffsetOutOfRange,
            format!("offset {offset} outside [{log_start}, {log_end}]"),
        ),
        ReadError::Storage(e) => error(ErrorCode::StorageError, e.to_string()),
    }
}

/// Checks a raw v2 batch: CRC, header, every record decodable and exactly `records_count` of
/// them, no compression, nothing after it.
fn check_raw_batch(b: &Bytes) -> Result<batch::BatchHeader, api::Error> {
    let corrupt = |m: String| error(ErrorCode::CorruptBatch, m);
    let h = batch::validate(b).map_err(|e| corrupt(e.to_string()))?;
    if h.total_len() != b.len() {
        return Err(corrupt(format!(
            "{} bytes after the batch (one batch per request)",
            b.len() - h.total_len()
        )));
    }
    if h.compression() != 0 {
        return Err(error(
            ErrorCode::InvalidRequest,
            "compressed batches are not supported",
        ));
    }
    if h.attributes & (batch::ATTR_TRANSACTIONAL | batch::ATTR_CONTROL) != 0 {
        return Err(error(
            ErrorCode::InvalidRequest,
            "transactional and control batches are not supported",
        ));
    }
    let rb = RecordBatch::parse(b).map_err(|e| corrupt(e.to_string()))?;
    let mut n = 0u32;
    for r in rb.records().map_err(|e| corrupt(e.to_string()))? {
        r.map_err(|e| corrupt(format!("record {n}: {e}")))?;
        n += 1;
    }
    if n != h.records_count || h.last_offset_delta + 1 != h.records_count {
        return Err(corrupt(format!(
            "header says {} records (last offset delta {}), found {n}",
            h.records_count, h.last_offset_delta
        )));
    }
    Ok(h)
}

/// Converts whole batches into records at or after `from`.
fn to_records(bytes: &Bytes, from: u64) -> Result<Vec<api::Record>, api::Error> {
    let corrupt = |e: batch::BatchError| error(ErrorCode::StorageError, e.to_string());
    let mut out = Vec::new();
    for b in RecordBatch::split_all(bytes).map_err(corrupt)? {
        for r in b.records().map_err(corrupt)? {
            let r = r.map_err(corrupt)?;
            if r.offset < from {
                continue;
            }
            out.push(api::Record {
                key: r.key,
                value: r.value,
                headers: r
                    .headers
                    .into_iter()
                    .map(|h| api::Header {
                        key: String::from_utf8_lossy(&h.key).into_owned(),
                        value: h.value.unwrap_or_default(),
                    })
                    .collect(),
                timestamp_ms: r.timestamp,
                offset: r.offset as i64,
            });
        }
    }
    Ok(out)
}

/// Checks a `ReplaceNode` request on its own (ids, addresses).
fn check_replacement(r: &api::ReplaceNodeRequest) -> Result<(), String> {
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

fn forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().get(FORWARDED).is_some()
}

fn mark_forwarded<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

/// A forwarded call, bounded: a leader that stopped (or vanished behind a black-holing network)
/// must not hold the caller forever.
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    tokio::time::timeout(FORWARD_WAIT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "no answer from the leader within {FORWARD_WAIT:?}"
            )))
        })
}

fn forward_failed(s: Status) -> api::Error {
    error(
        ErrorCode::LeaderNotAvailable,
        format!("forwarding to the leader failed: {}", s.message()),
    )
}

/// The Broker and Admin services of one node.
#[derive(Clone)]
pub struct Api {
    shared: Arc<Shared>,
}

impl Api {
    /// Services over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Api { shared }
    }

    async fn produce_inner(&self, r: api::ProduceRequest) -> Result<api::ProduceResponse, Status> {
        let s = &self.shared;
        let limits = &s.cfg.limits;
        if r.records.is_empty() == r.batch.is_empty() {
            return Err(Status::invalid_argument(
                "a produce request carries exactly one of `records` and `batch`",
            ));
        }
        let fail = |partition: u32, e: api::Error| api::ProduceResponse {
            error: Some(e),
            partition,
            base_offset: -1,
            last_offset: -1,
            ..Default::default()
        };
        s.await_topic(&r.topic).await;
        let t = match s.topic(&r.topic) {
            Ok(t) => t,
            Err(e) => return Ok(fail(r.partition.unwrap_or(0), e)),
        };
        let n = t.partitions.len() as u32;
        let partition = match r.partition {
            Some(p) => p,
            None => {
                let key = if r.partition_key.is_empty() {
                    r.records.first().and_then(|x| x.key.clone())
                } else {
                    Some(r.partition_key.clone())
                };
                match key {
                    Some(k) => partitioner::partition_for_key(&k, n),
                    None => s.rr.fetch_add(1, Ordering::Relaxed) % n,
                }
            }
        };
        let (_, p) = match s.resolve(&r.topic, partition) {
            Ok(x) => x,
            Err(e) => return Ok(fail(partition, e)),
        };
        if let Err(e) = s.check_leader(p.group, false) {
            return Ok(fail(partition, e));
        }
        if let Err(e) = s.local_store(p) {
            return Ok(fail(partition, e));
        }
        let max_batch = limits
            .max_batch_bytes
            .min(t.settings.segment_bytes as usize);
        let (batch, pid, epoch, seq, count) = if !r.batch.is_empty() {
            if r.batch.len() > max_batch {
                return Ok(fail(
                    partition,
                    error(
                        ErrorCode::BatchTooLarge,
                        format!("batch of {} bytes > limit {max_batch}", r.batch.len()),
                    ),
                ));
            }
            let h = match check_raw_batch(&r.batch) {
                Ok(h) => h,
                Err(e) => return Ok(fail(partition, e)),
            };
            let agree = r.producer_id.is_none_or(|v| v == h.producer_id)
                && r.producer_epoch
                    .is_none_or(|v| v == i32::from(h.producer_epoch))
                && r.base_sequence.is_none_or(|v| v == h.base_sequence);
            if !agree {
                return Ok(fail(
                    partition,
                    error(
                        ErrorCode::InvalidRequest,
                        "producer fields disagree with the batch header",
                    ),
                ));
            }
            if h.producer_id >= 0 && (h.producer_epoch < 0 || h.base_sequence < 0) {
                return Ok(fail(
                    partition,
                    error(
                        ErrorCode::InvalidRequest,
                        "an idempotent batch needs epoch >= 0 and base sequence >= 0",
                    ),
                ));
            }
            let (pid, epoch, seq) = if h.producer_id >= 0 {
                (h.producer_id, i32::from(h.producer_epoch), h.base_sequence)
            } else {
                (-1, i32::from(h.producer_epoch), h.base_sequence)
            };
            (r.batch.clone(), pid, epoch, seq, h.records_count as i32)
        } else {
            if r.records.len() > limits.max_records_per_produce {
                return Ok(fail(
                    partition,
                    error(
                        ErrorCode::BatchTooLarge,
                        format!(
                            "{} records > limit {}",
                            r.records.len(),
                            limits.max_records_per_produce
                        ),
                    ),
                ));
            }
            let (pid, epoch, seq) = match (r.producer_id, r.producer_epoch, r.base_sequence) {
                (None, None, None) => (-1i64, -1i32, -1i32),
                (Some(id), Some(ep), Some(sq))
                    if id >= 0 && (0..=i32::from(i16::MAX)).contains(&ep) && sq >= 0 =>
                {
                    (id, ep, sq)
                }
                _ => {
                    return Ok(fail(
                        partition,
                        error(
                            ErrorCode::InvalidRequest,
                            "producer_id, producer_epoch and base_sequence go together, each >= 0",
                        ),
                    ));
                }
            };
            let size: usize = r
                .records
                .iter()
                .map(|x| {
                    32 + x.key.as_ref().map_or(0, |k| k.len())
                        + x.value.as_ref().map_or(0, |v| v.len())
                        + x.headers
                            .iter()
                            .map(|h| 10 + h.key.len() + h.value.len())
                            .sum::<usize>()
                })
                .sum::<usize>()
                + batch::HEADER_LEN;
            if size > max_batch {
                return Ok(fail(
                    partition,
                    error(
                        ErrorCode::BatchTooLarge,
                        format!("records take about {size} bytes > limit {max_batch}"),
                    ),
                ));
            }
            let mut b = BatchBuilder::with_capacity(
                BatchOptions {
                    producer_id: pid,
                    producer_epoch: epoch as i16,
                    base_sequence: seq,
                    ..BatchOptions::default()
                },
                size,
            );
            let now = now_ms();
            for x in &r.records {
                let headers: Vec<(&[u8], Option<&[u8]>)> = x
                    .headers
                    .iter()
                    .map(|h| (h.key.as_bytes(), Some(&h.value[..])))
                    .collect();
                let ts = if x.timestamp_ms > 0 {
                    x.timestamp_ms
                } else {
                    now
                };
                b.append(ts, x.key.as_deref(), x.value.as_deref(), &headers);
            }
            let built = b.build();
            if built.len() > max_batch {
                return Ok(fail(
                    partition,
                    error(
                        ErrorCode::BatchTooLarge,
                        format!("batch of {} bytes > limit {max_batch}", built.len()),
                    ),
                ));
            }
            (built, pid, epoch, seq, r.records.len() as i32)
        };
        let timeout = Duration::from_millis(if r.timeout_ms == 0 {
            limits.produce_timeout_ms
        } else {
            u64::from(r.timeout_ms).min(limits.produce_timeout_ms)
        });
        let cmd = produce_command(p.partition_id, batch, pid, epoch, seq);
        let order = (pid >= 0).then_some(Ordered {
            key: OrderKey {
                partition_id: p.partition_id,
                producer_id: pid,
            },
            epoch,
            seq,
            count,
        });
        let span = tracing::debug_span!("produce", topic = %r.topic, partition, group = p.group);
        let written = s
            .write_ordered(p.group, cmd, timeout, order)
            .instrument(span)
            .await;
        Ok(match written {
            Ok(ApplyResult::Produced {
                base_offset,
                last_offset,
                duplicate,
            }) => api::ProduceResponse {
                error: None,
                partition,
                base_offset: base_offset as i64,
                last_offset: last_offset as i64,
                duplicate,
                log_append_time_ms: -1,
            },
            Ok(ApplyResult::Refused(e, m)) => fail(partition, refused(e, m)),
            Ok(other) => fail(
                partition,
                error(ErrorCode::UnknownServerError, format!("{other:?}")),
            ),
            Err(e) => fail(partition, e),
        })
    }

    /// One fetch: checks, optional long-poll on the high watermark, read, convert.
    async fn fetch_once(&self, req: &api::FetchRequest) -> api::FetchResponse {
        let s = &self.shared;
        let (topic, partition, offset) = (&req.topic, req.partition, req.offset);
        let (max_bytes, raw, follower) = (req.max_bytes, req.raw, req.allow_follower);
        let max_wait =
            Duration::from_millis(u64::from(req.max_wait_ms).min(s.cfg.limits.max_wait_ms));
        let mut resp = api::FetchResponse {
            high_watermark: -1,
            log_start_offset: -1,
            next_offset: offset,
            served_by: s.node_id(),
            ..Default::default()
        };
        let r = async {
            let (_, p) = s.resolve_fresh(topic, partition).await?;
            s.check_read(p.group, follower)?;
            let store = s.local_store(p)?;
            let (hw, start) = store
                .offsets(p.partition_id)
                .ok_or_else(|| error(ErrorCode::LeaderNotAvailable, "partition not here"))?;
            if offset < 0 || (offset as u64) < start || offset as u64 > hw {
                return Err(error(
                    ErrorCode::OffsetOutOfRange,
                    format!("offset {offset} outside [{start}, {hw}]"),
                ));
            }
            let offset = offset as u64;
            if offset == hw && !max_wait.is_zero() {
                if let Some(mut rx) = store.watch_high_watermark(p.partition_id) {
                    let deadline = tokio::time::Instant::now() + max_wait;
                    let mut stopping = s.stopping.clone();
                    while *rx.borrow_and_update() <= offset && !s.stopping() {
                        tokio::select! {
                            r = tokio::time::timeout_at(deadline, rx.changed()) => {
                                if !matches!(r, Ok(Ok(()))) {
                                    break;
                                }
                            }
                            // Shutdown ends the wait: the (empty) answer goes out at once.
                            _ = stopping.changed() => break,
                        }
                    }
                }
                // Leadership may have moved while we waited.
                s.check_read(p.group, follower)?;
            }
            let max = if max_bytes == 0 {
                s.cfg.limits.max_fetch_bytes
            } else {
                (max_bytes as usize).min(s.cfg.limits.max_fetch_bytes)
            };
            let slice = store
                .read(p.partition_id, offset, max)
                .map_err(read_error)?;
            let (hw, start) = store.offsets(p.partition_id).unwrap_or((hw, start));
            Ok::<_, api::Error>((slice, hw, start, offset))
        }
        .await;
        match r {
            Ok((slice, hw, start, offset)) => {
                resp.high_watermark = hw as i64;
                resp.log_start_offset = start as i64;
                resp.next_offset = slice.next_offset.max(offset) as i64;
                if raw {
                    resp.raw_batches = slice.bytes;
                } else {
                    match to_records(&slice.bytes, offset) {
                        Ok(recs) => resp.records = recs,
                        Err(e) => resp.error = Some(e),
                    }
                }
            }
            Err(e) => resp.error = Some(e),
        }
        resp
    }

    async fn create_topic_here(&self, r: api::CreateTopicRequest) -> api::CreateTopicResponse {
        let s = &self.shared;
        let fail = |e| api::CreateTopicResponse {
            error: Some(e),
            topic: None,
        };
        if let Err(m) = topic::validate_name(&r.name) {
            return fail(error(ErrorCode::InvalidTopic, m));
        }
        let d = &s.cfg.topic_defaults;
        let partitions = if r.partitions == 0 {
            d.partitions
        } else {
            r.partitions
        };
        if partitions > s.cfg.limits.max_partitions_per_topic {
            return fail(error(
                ErrorCode::InvalidPartitions,
                format!(
                    "{partitions} partitions > limit {}",
                    s.cfg.limits.max_partitions_per_topic
                ),
            ));
        }
        let hosted = s.hosted_partitions();
        if hosted + u64::from(partitions) > s.fds.partitions {
            return fail(error(
                ErrorCode::InvalidPartitions,
                format!(
                    "{partitions} more partitions would take node {} to {} partitions; its open-files limit ({}) allows {}: raise the limit (ulimit -n, LimitNOFILE=) and restart the node, or use fewer partitions",
                    s.node_id(),
                    hosted + u64::from(partitions),
                    s.fds.soft,
                    s.fds.partitions
                ),
            ));
        }
        let pick = |v: i64, default: i64| if v == 0 { default } else { v };
        let retention_ms = pick(r.retention_ms, d.retention_ms);
        let retention_bytes = pick(r.retention_bytes, d.retention_bytes);
        let segment_bytes = if r.segment_bytes == 0 {
            d.segment_bytes
        } else {
            r.segment_bytes
        };
        if retention_ms < -1 || retention_bytes < -1 {
            return fail(error(
                ErrorCode::InvalidConfig,
                "retention values are > 0, or -1 for unlimited",
            ));
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&segment_bytes) {
            return fail(error(
                ErrorCode::InvalidConfig,
                format!("segment_bytes must be in {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}"),
            ));
        }
        if s.image().topics.contains_key(&r.name) {
            return fail(error(
                ErrorCode::TopicAlreadyExists,
                format!("topic {:?} exists", r.name),
            ));
        }
        let rec = pb::MetaRecord {
            kind: Some(pb::meta_record::Kind::TopicCreated(pb::TopicCreated {
                name: r.name.clone(),
                partitions,
                retention_ms,
                retention_bytes,
                segment_bytes,
                data_groups: s.cfg.cluster.data_groups,
            })),
        };
        let offset = match s.write_meta(rec).await {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        let Some(t) = s.image().topics.get(&r.name).cloned() else {
            return fail(error(
                ErrorCode::UnknownServerError,
                "topic vanished right after its creation (deleted concurrently?)",
            ));
        };
        if t.created_offset != offset {
            return fail(error(
                ErrorCode::TopicAlreadyExists,
                format!("topic {:?} was created concurrently", r.name),
            ));
        }
        // Wait (bounded) until every partition exists in the replicas hosted here, so a produce
        // right after this call finds them.
        let deadline = tokio::time::Instant::now() + ADMIN_WAIT;
        for p in &t.partitions {
            while s
                .host
                .store(p.group)
                .is_some_and(|st| st.offsets(p.partition_id).is_none())
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        api::CreateTopicResponse {
            error: None,
            topic: Some(s.topic_metadata(&t)),
        }
    }
}

type FetchStream = Pin<Box<dyn Stream<Item = Result<api::FetchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl api::broker_server::Broker for Api {
    async fn produce(
        &self,
        req: Request<api::ProduceRequest>,
    ) -> Result<Response<api::ProduceResponse>, Status> {
        self.produce_inner(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn fetch(
        &self,
        req: Request<api::FetchRequest>,
    ) -> Result<Response<api::FetchResponse>, Status> {
        Ok(Response::new(self.fetch_once(&req.into_inner()).await))
    }

    type SubscribeStream = FetchStream;

    async fn subscribe(
        &self,
        req: Request<api::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = req.into_inner();
        let limits = &self.shared.cfg.limits;
        let (tx, rx) = crate::subscribe::channel(
            &self.shared.subscribe_budget,
            limits.subscribe_buffer,
            Duration::from_millis(limits.subscribe_stall_ms),
        );
        let me = self.clone();
        tokio::spawn(async move {
            let mut fetch = api::FetchRequest {
                topic: r.topic,
                partition: r.partition,
                offset: r.offset,
                max_bytes: r.max_bytes,
                max_wait_ms: 1000,
                raw: r.raw,
                allow_follower: r.allow_follower,
            };
            loop {
                let resp = me.fetch_once(&fetch).await;
                let failed = resp.error.is_some();
                let empty = resp.records.is_empty() && resp.raw_batches.is_empty();
                fetch.offset = resp.next_offset;
                if (!empty || failed) && tx.send(resp).await.is_err() {
                    return; // the client went away, or the stream was ended for stalling
                }
                if failed || tx.is_closed() {
                    return;
                }
                if me.shared.stopping() {
                    let bye = api::FetchResponse {
                        error: Some(error(
                            ErrorCode::LeaderNotAvailable,
                            "the node is shutting down: resubscribe at next_offset elsewhere",
                        )),
                        next_offset: fetch.offset,
                        served_by: me.shared.node_id(),
                        ..Default::default()
                    };
                    let _ = tx.send(bye).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(rx)))
    }

    async fn list_offsets(
        &self,
        req: Request<api::ListOffsetsRequest>,
    ) -> Result<Response<api::ListOffsetsResponse>, Status> {
        let r = req.into_inner();
        let s = &self.shared;
        s.await_topic(&r.topic).await;
        let res = (|| {
            let (_, p) = s.resolve(&r.topic, r.partition)?;
            s.check_read(p.group, r.allow_follower)?;
            let store = s.local_store(p)?;
            let (hw, start) = store
                .offsets(p.partition_id)
                .ok_or_else(|| error(ErrorCode::LeaderNotAvailable, "partition not here"))?;
            match r.timestamp_ms {
                -2 => Ok((start, -1)),
                -1 => Ok((hw, -1)),
                ts if ts >= 0 => {
                    let o = store
                        .offset_for_timestamp(p.partition_id, ts)
                        .map_err(read_error)?;
                    Ok(match o {
                        Some(o) if o < hw => (o, ts),
                        _ => (hw, -1),
                    })
                }
                ts => Err(error(
                    ErrorCode::InvalidRequest,
                    format!("timestamp {ts}: use -2 (earliest), -1 (latest) or >= 0"),
                )),
            }
        })();
        Ok(Response::new(match res {
            Ok((offset, ts)) => api::ListOffsetsResponse {
                error: None,
                offset: offset as i64,
                timestamp_ms: ts,
            },
            Err(e) => api::ListOffsetsResponse {
                error: Some(e),
                offset: -1,
                timestamp_ms: -1,
            },
        }))
    }

    async fn commit_offsets(
        &self,
        req: Request<api::CommitOffsetsRequest>,
    ) -> Result<Response<api::CommitOffsetsResponse>, Status> {
        let r = req.into_inner();
        let s = &self.shared;
        let limits = &s.cfg.limits;
        if r.group.is_empty() || r.group.len() > limits.max_group_name_bytes {
            return Err(Status::invalid_argument(format!(
                "consumer group name must be 1..={} bytes",
                limits.max_group_name_bytes
            )));
        }
        if r.offsets.len() > limits.max_offsets_per_request {
            return Err(Status::resource_exhausted(format!(
                "{} offsets > limit {}",
                r.offsets.len(),
                limits.max_offsets_per_request
            )));
        }
        let timeout = Duration::from_millis(limits.produce_timeout_ms);
        let commits = r.offsets.iter().map(|po| {
            let group = r.group.clone();
            let topic = r.topic.clone();
            async move {
                let res = async {
                    let (_, p) = s.resolve_fresh(&topic, po.partition).await?;
                    s.check_leader(p.group, false)?;
                    s.local_store(p)?;
                    if po.offset < 0 {
                        return Err(error(
                            ErrorCode::OffsetOutOfRange,
                            format!("offset {} is negative", po.offset),
                        ));
                    }
                    let expected_previous = match po.expected_previous {
                        None => None,
                        Some(-1) => None,
                        Some(v) if v >= 0 => Some(v as u64),
                        Some(v) => {
                            return Err(error(
                                ErrorCode::InvalidRequest,
                                format!("expected_previous {v}"),
                            ));
                        }
                    };
                    let cmd = pb::Command {
                        kind: Some(pb::command::Kind::CommitOffsets(pb::CommitOffsets {
                            consumer_group: group,
                            partition_id: p.partition_id,
                            next_offset: po.offset as u64,
                            expected_previous,
                        })),
                    };
                    match s.write(p.group, cmd, timeout).await? {
                        ApplyResult::OffsetCommitted => Ok(()),
                        ApplyResult::Refused(e, m) => Err(refused(e, m)),
                        other => Err(error(ErrorCode::UnknownServerError, format!("{other:?}"))),
                    }
                }
                .await;
                api::PartitionResult {
                    partition: po.partition,
                    error: res.err(),
                }
            }
        });
        let results = futures::future::join_all(commits).await;
        Ok(Response::new(api::CommitOffsetsResponse { results }))
    }

    async fn fetch_offsets(
        &self,
        req: Request<api::FetchOffsetsRequest>,
    ) -> Result<Response<api::FetchOffsetsResponse>, Status> {
        let r = req.into_inner();
        let s = &self.shared;
        if r.group.is_empty() || r.group.len() > s.cfg.limits.max_group_name_bytes {
            return Err(Status::invalid_argument(format!(
                "consumer group name must be 1..={} bytes",
                s.cfg.limits.max_group_name_bytes
            )));
        }
        if r.partitions.len() > s.cfg.limits.max_offsets_per_request {
            return Err(Status::resource_exhausted("too many partitions"));
        }
        s.await_topic(&r.topic).await;
        let partitions: Vec<u32> = if r.partitions.is_empty() {
            match s.topic(&r.topic) {
                Ok(t) => (0..t.partitions.len() as u32).collect(),
                Err(e) => {
                    return Ok(Response::new(api::FetchOffsetsResponse {
                        offsets: vec![api::CommittedOffset {
                            partition: 0,
                            offset: -1,
                            error: Some(e),
                        }],
                    }));
                }
            }
        } else {
            r.partitions.clone()
        };
        let offsets = partitions
            .into_iter()
            .map(|partition| {
                let res = (|| {
                    let (_, p) = s.resolve(&r.topic, partition)?;
                    s.check_leader(p.group, true)?;
                    let store = s.local_store(p)?;
                    Ok(store
                        .committed_offset(&r.group, p.partition_id)
                        .map_or(-1, |o| o as i64))
                })();
                match res {
                    Ok(offset) => api::CommittedOffset {
                        partition,
                        offset,
                        error: None,
                    },
                    Err(e) => api::CommittedOffset {
                        partition,
                        offset: -1,
                        error: Some(e),
                    },
                }
            })
            .collect();
        Ok(Response::new(api::FetchOffsetsResponse { offsets }))
    }

    async fn init_producer_id(
        &self,
        req: Request<api::InitProducerIdRequest>,
    ) -> Result<Response<api::InitProducerIdResponse>, Status> {
        let s = &self.shared;
        let fwd = forwarded(&req);
        let fail = |e| api::InitProducerIdResponse {
            error: Some(e),
            producer_id: -1,
            producer_epoch: -1,
        };
        // Ids come in blocks reserved through the metadata group; a node that does not lead
        // it asks the leader.
        let have_block = {
            let p = s.pids.lock().await;
            p.0 < p.1
        };
        if !have_block {
            match s.forward_target(META_GROUP, fwd) {
                Err(e) => return Ok(Response::new(fail(e))),
                Ok(Some(ch)) => {
                    let r = bounded(
                        api::broker_client::BrokerClient::new(ch)
                            .init_producer_id(mark_forwarded(api::InitProducerIdRequest {})),
                    )
                    .await;
                    return Ok(Response::new(match r {
                        Ok(r) => r.into_inner(),
                        Err(st) => fail(forward_failed(st)),
                    }));
                }
                Ok(None) => {}
            }
        }
        Ok(Response::new(match s.next_producer_id().await {
            Ok(id) => api::InitProducerIdResponse {
                error: None,
                producer_id: id,
                producer_epoch: 0,
            },
            Err(e) => fail(e),
        }))
    }

    async fn metadata(
        &self,
        req: Request<api::MetadataRequest>,
    ) -> Result<Response<api::MetadataResponse>, Status> {
        let fwd = forwarded(&req);
        let r = req.into_inner();
        let s = &self.shared;
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
}

#[tonic::async_trait]
impl api::admin_server::Admin for Api {
    async fn create_topic(
        &self,
        req: Request<api::CreateTopicRequest>,
    ) -> Result<Response<api::CreateTopicResponse>, Status> {
        let fwd = forwarded(&req);
        let r = req.into_inner();
        match self.shared.forward_target(META_GROUP, fwd) {
            Err(e) => Ok(Response::new(api::CreateTopicResponse {
                error: Some(e),
                topic: None,
            })),
            Ok(Some(ch)) => Ok(Response::new(
                match bounded(
                    api::admin_client::AdminClient::new(ch).create_topic(mark_forwarded(r)),
                )
                .await
                {
                    Ok(r) => r.into_inner(),
                    Err(st) => api::CreateTopicResponse {
                        error: Some(forward_failed(st)),
                        topic: None,
                    },
                },
            )),
            Ok(None) => Ok(Response::new(self.create_topic_here(r).await)),
        }
    }

    async fn delete_topic(
        &self,
        req: Request<api::DeleteTopicRequest>,
    ) -> Result<Response<api::DeleteTopicResponse>, Status> {
        let fwd = forwarded(&req);
        let r = req.into_inner();
        let s = &self.shared;
        s.await_topic(&r.name).await;
        if let Err(e) = s.topic(&r.name) {
            return Ok(Response::new(api::DeleteTopicResponse { error: Some(e) }));
        }
        match s.forward_target(META_GROUP, fwd) {
            Err(e) => Ok(Response::new(api::DeleteTopicResponse { error: Some(e) })),
            Ok(Some(ch)) => Ok(Response::new(
                match bounded(
                    api::admin_client::AdminClient::new(ch).delete_topic(mark_forwarded(r)),
                )
                .await
                {
                    Ok(r) => r.into_inner(),
                    Err(st) => api::DeleteTopicResponse {
                        error: Some(forward_failed(st)),
                    },
                },
            )),
            Ok(None) => {
                let rec = pb::MetaRecord {
                    kind: Some(pb::meta_record::Kind::TopicDeleted(pb::TopicDeleted {
                        name: r.name,
                    })),
                };
                Ok(Response::new(api::DeleteTopicResponse {
                    error: s.write_meta(rec).await.err(),
                }))
            }
        }
    }

    async fn list_topics(
        &self,
        _req: Request<api::ListTopicsRequest>,
    ) -> Result<Response<api::ListTopicsResponse>, Status> {
        let s = &self.shared;
        Ok(Response::new(api::ListTopicsResponse {
            topics: s
                .image()
                .topics
                .values()
                .map(|t| s.topic_metadata(t))
                .collect(),
        }))
    }

    async fn describe_topic(
        &self,
        req: Request<api::DescribeTopicRequest>,
    ) -> Result<Response<api::DescribeTopicResponse>, Status> {
        let r = req.into_inner();
        let s = &self.shared;
        s.await_topic(&r.name).await;
        let t = match s.topic(&r.name) {
            Ok(t) => t,
            Err(e) => {
                return Ok(Response::new(api::DescribeTopicResponse {
                    error: Some(e),
                    answered_by: s.node_id(),
                    ..Default::default()
                }));
            }
        };
        let partitions = t
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let store = s.host.store(p.group);
                let offs = store.as_ref().and_then(|st| st.offsets(p.partition_id));
                api::PartitionStatus {
                    partition: i as u32,
                    high_watermark: offs.map_or(-1, |o| o.0 as i64),
                    log_start_offset: offs.map_or(-1, |o| o.1 as i64),
                    size_bytes: store
                        .and_then(|st| st.size_bytes(p.partition_id))
                        .unwrap_or(0),
                }
            })
            .collect();
        Ok(Response::new(api::DescribeTopicResponse {
            error: None,
            topic: Some(s.topic_metadata(&t)),
            partitions,
            answered_by: s.node_id(),
        }))
    }

    async fn cluster_status(
        &self,
        _req: Request<api::ClusterStatusRequest>,
    ) -> Result<Response<api::ClusterStatusResponse>, Status> {
        let s = &self.shared;
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
                    preferred_leader: crate::node::preferred_leader(
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

    async fn transfer_leader(
        &self,
        req: Request<api::TransferLeaderRequest>,
    ) -> Result<Response<api::TransferLeaderResponse>, Status> {
        let fwd = forwarded(&req);
        let r = req.into_inner();
        let s = &self.shared;
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

    async fn replace_node(
        &self,
        req: Request<api::ReplaceNodeRequest>,
    ) -> Result<Response<api::ReplaceNodeResponse>, Status> {
        let fwd = forwarded(&req);
        let r = req.into_inner();
        let s = &self.shared;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_batch(n: usize) -> Bytes {
        let mut b = BatchBuilder::new(BatchOptions::default());
        for i in 0..n {
            b.append(1000 + i as i64, None, Some(b"v"), &[]);
        }
        b.build()
    }

    #[test]
    fn raw_batch_checks() {
        let good = one_batch(3);
        assert_eq!(check_raw_batch(&good).unwrap().records_count, 3);
        // Wrong CRC.
        let mut bad = good.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let e = check_raw_batch(&Bytes::from(bad)).unwrap_err();
        assert_eq!(e.code, ErrorCode::CorruptBatch as i32);
        // Bytes after the batch.
        let mut two = good.to_vec();
        two.extend_from_slice(&good);
        let e = check_raw_batch(&Bytes::from(two)).unwrap_err();
        assert_eq!(e.code, ErrorCode::CorruptBatch as i32);
    }

    #[test]
    fn records_below_the_requested_offset_are_skipped() {
        let b = one_batch(5);
        let recs = to_records(&b, 3).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }
}
