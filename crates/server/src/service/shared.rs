//! What every call of one node shares: its configuration, Raft host, metadata image, and the
//! writes through Raft that the calls build on.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use bytes::Bytes;
use runnel_proto::api::{self, ErrorCode};
use runnel_proto::raft as pb;
use runnel_raft::{ApplyError, ApplyResult, RaftHost};
use tokio::sync::{Mutex, watch};

use super::{error, now_ms};
use crate::config::Config;
use crate::metadata::{self, META_GROUP, META_PARTITION, MetaImage};
use crate::order::ProduceOrder;
use crate::storage_health::StorageHealth;

/// How long a topic admin call waits for its effects to become visible on this node.
pub(super) const ADMIN_WAIT: Duration = Duration::from_secs(10);

/// Everything the services share on one node.
pub struct Shared {
    /// The node's configuration.
    pub cfg: Config,
    /// Its Raft groups.
    pub host: Arc<RaftHost>,
    /// The replayed metadata.
    pub meta: watch::Receiver<Arc<MetaImage>>,
    pub(super) rr: AtomicU32,
    /// Producer ids left in this node's current block: (next, end exclusive).
    pub(super) pids: Mutex<(i64, i64)>,
    /// Channels to other nodes' peer listeners, for forwarding admin calls.
    pub(super) channels: std::sync::Mutex<HashMap<String, tonic::transport::Channel>>,
    /// Becomes true when the node shuts down: long-polls and streams end early.
    pub(super) stopping: watch::Receiver<bool>,
    /// Keeps pipelined batches of idempotent producers in sequence order.
    pub(super) order: ProduceOrder,
    /// The node's storage state: write refusals below the free-space floor, cluster status.
    pub storage: Arc<StorageHealth>,
    /// The descriptor limit and this node's partition budget.
    pub fds: crate::fdlimit::Descriptors,
    /// The memory Subscribe streams may buffer, node-wide.
    pub subscribe_budget: crate::subscribe::Budget,
    /// Counters of the client listener.
    pub client_listener: Arc<runnel_raft::listener::ListenStats>,
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

    pub(super) fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    pub(super) fn node_id(&self) -> u64 {
        self.host.node_id()
    }

    pub(super) fn image(&self) -> Arc<MetaImage> {
        Arc::clone(&self.meta.borrow())
    }

    /// Writes one record to the metadata log (this node must lead group 0) and returns its
    /// offset once applied here.
    pub(super) async fn write_meta(&self, rec: pb::MetaRecord) -> Result<u64, api::Error> {
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
    pub(super) async fn write(
        &self,
        group: u64,
        cmd: pb::Command,
        timeout: Duration,
    ) -> Result<ApplyResult, api::Error> {
        self.write_ordered(group, cmd, timeout, None).await
    }
}

pub(super) fn produce_command(
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
