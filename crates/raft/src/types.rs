//! The openraft type configuration and the values Runnel plugs into it.

use std::fmt;

use runnel_proto::raft as pb;

/// A replicated state-machine command (the Raft log's application data).
#[derive(Debug, Clone, PartialEq)]
pub struct Cmd(pub pb::Command);

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use pb::command::Kind;
        match &self.0.kind {
            Some(Kind::Produce(p)) => {
                write!(
                    f,
                    "produce(partition={}, {} bytes)",
                    p.partition_id,
                    p.batch.len()
                )
            }
            Some(Kind::CommitOffsets(c)) => write!(
                f,
                "commit_offsets(group={}, partition={}, next={})",
                c.consumer_group, c.partition_id, c.next_offset
            ),
            Some(Kind::CreatePartition(c)) => {
                write!(
                    f,
                    "create_partition({:?})",
                    c.spec.as_ref().map(|s| s.partition_id)
                )
            }
            Some(Kind::DeletePartition(d)) => write!(f, "delete_partition({})", d.partition_id),
            Some(Kind::Noop(_)) => write!(f, "noop"),
            Some(Kind::TrimLog(t)) => write!(
                f,
                "trim_log(partition={}, log_start={}, {})",
                t.partition_id, t.log_start, t.reason
            ),
            None => write!(f, "empty"),
        }
    }
}

/// Where peers and clients reach a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddr {
    /// `host:port` of the node's internal (peer) gRPC listener, as advertised.
    pub addr: String,
    /// `host:port` of the node's client gRPC listener, as advertised; empty when unknown.
    pub client_addr: String,
}

/// Why a command was refused; every replica refuses identically, so nothing is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyError {
    /// The partition does not exist in this group.
    UnknownPartition,
    /// The partition already exists.
    PartitionExists,
    /// An idempotent producer skipped a sequence number.
    OutOfOrderSequence,
    /// An idempotent producer's epoch is older than the current one.
    FencedProducer,
    /// A committed offset lies beyond the partition's high watermark.
    OffsetOutOfRange,
    /// A compare-and-set commit found a different previous offset.
    OffsetConflict,
    /// The batch is not a valid v2 batch.
    CorruptBatch,
    /// The command is malformed.
    InvalidRequest,
}

/// What applying one command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyResult {
    /// A batch was appended (or, for a retry, had been appended before).
    Produced {
        /// Offset of the first record.
        base_offset: u64,
        /// Offset of the last record.
        last_offset: u64,
        /// True when this was a retry of a batch already in the log.
        duplicate: bool,
    },
    /// A consumer group's offset was stored.
    OffsetCommitted,
    /// A partition was created or deleted, or a no-op applied.
    Done,
    /// Nothing was applied, for this reason.
    Refused(ApplyError, String),
}

openraft::declare_raft_types!(
    /// Runnel's openraft type configuration: u64 node ids, leader ids with a node (adv),
    /// Tokio runtime.
    pub TypeConfig:
        D = Cmd,
        R = ApplyResult,
        NodeId = u64,
        Node = NodeAddr,
);

pub(crate) type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub(crate) type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub(crate) type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub(crate) type LeaderId = openraft::type_config::alias::LeaderIdOf<TypeConfig>;
pub(crate) type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub(crate) type Membership = openraft::Membership<u64, NodeAddr>;
