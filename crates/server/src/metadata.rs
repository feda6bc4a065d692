//! The cluster's metadata: a log of [`pb::MetaRecord`]s in group 0, partition 0, replayed by
//! every node, in order, into the same [`MetaImage`] (topics, their partitions' ids and groups,
//! producer-id blocks). Replay is deterministic: ids come from counters in the image, and a
//! record that loses a race (a second create of one name) is ignored identically everywhere.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use runnel_proto::raft as pb;
use runnel_raft::RaftHost;
use runnel_record::{BatchBuilder, BatchOptions, RecordBatch};
use tokio::sync::watch;

/// The metadata group's id.
pub const META_GROUP: u64 = 0;
/// The metadata log's partition id inside group 0.
pub const META_PARTITION: u64 = 0;
/// Producer ids handed out per [`pb::ProducerIdBlock`].
pub const PRODUCER_ID_BLOCK: i64 = 1024;

/// A topic's settings as stored (explicit values; -1 = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSettings {
    /// Delete segments older than this; -1: never.
    pub retention_ms: i64,
    /// Keep at most this many bytes per partition; -1: unlimited.
    pub retention_bytes: i64,
    /// Segment file size (also the largest batch).
    pub segment_bytes: u64,
}

/// One partition of a topic: its cluster-unique id and the data group that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRef {
    /// Id of the partition inside its group (unique in the cluster, never reused).
    pub partition_id: u64,
    /// The data group replicating it.
    pub group: u64,
}

/// A topic in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    /// Its name.
    pub name: String,
    /// Cluster-unique id, never reused (a re-created name gets a new one).
    pub topic_id: u64,
    /// Offset of the record that created it.
    pub created_offset: u64,
    /// Its settings.
    pub settings: TopicSettings,
    /// Partition `i` of the topic is `partitions[i]`.
    pub partitions: Vec<PartitionRef>,
}

/// The replayed metadata: what every node agrees on up to `next_offset`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaImage {
    /// Topics by name.
    pub topics: BTreeMap<String, Topic>,
    /// The next metadata-log offset to replay.
    pub next_offset: u64,
    /// The next topic id to assign.
    pub next_topic_id: u64,
    /// The next partition id to assign; every id below it was assigned once.
    pub next_partition_id: u64,
    /// Producer-id blocks: metadata offset → node that reserved it.
    pub producer_blocks: BTreeMap<u64, u64>,
}

impl MetaImage {
    /// Applies the record at `offset` (records must come in offset order).
    pub fn apply(&mut self, offset: u64, rec: &pb::MetaRecord) {
        use pb::meta_record::Kind;
        match &rec.kind {
            Some(Kind::TopicCreated(t))
                if !self.topics.contains_key(&t.name) && t.partitions > 0 && t.data_groups > 0 =>
            {
                {
                    self.next_topic_id += 1;
                    let partitions = (0..t.partitions)
                        .map(|_| {
                            // Partition ids start at 1 (0 is the metadata log) and spread
                            // round-robin over the data groups 1..=data_groups.
                            self.next_partition_id = self.next_partition_id.max(1);
                            let id = self.next_partition_id;
                            self.next_partition_id += 1;
                            PartitionRef {
                                partition_id: id,
                                group: 1 + id % u64::from(t.data_groups),
                            }
                        })
                        .collect();
                    self.topics.insert(
                        t.name.clone(),
                        Topic {
                            name: t.name.clone(),
                            topic_id: self.next_topic_id,
                            created_offset: offset,
                            settings: TopicSettings {
                                retention_ms: t.retention_ms,
                                retention_bytes: t.retention_bytes,
                                segment_bytes: t.segment_bytes,
                            },
                            partitions,
                        },
                    );
                }
            }
            // A second create of one name (or an empty one) changes nothing.
            Some(Kind::TopicCreated(_)) => {}
            Some(Kind::TopicDeleted(t)) => {
                self.topics.remove(&t.name);
            }
            Some(Kind::ProducerIdBlock(b)) => {
                self.producer_blocks.insert(offset, b.node_id);
            }
            None => {}
        }
        self.next_offset = offset + 1;
    }

    /// Every partition the image assigns to `group`, with the topic settings it was made with.
    pub fn partitions_of_group(&self, group: u64) -> BTreeMap<u64, TopicSettings> {
        self.topics
            .values()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .filter(move |p| p.group == group)
                    .map(move |p| (p.partition_id, t.settings))
            })
            .collect()
    }
}

/// Encodes one metadata record as a single-record v2 batch for the metadata log.
pub fn encode_record(rec: &pb::MetaRecord, now_ms: i64) -> Bytes {
    let mut b = BatchBuilder::new(BatchOptions::default());
    b.append(now_ms, None, Some(&rec.encode_to_vec()), &[]);
    b.build()
}

/// First producer id of the block reserved by the record at `offset`.
pub fn producer_block_start(offset: u64) -> i64 {
    offset as i64 * PRODUCER_ID_BLOCK + 1
}

/// Replays the metadata log on this node into `tx`, forever: reads what group 0 has applied,
/// then waits for its high watermark to move. Stops when `stop` fires.
pub async fn follow(
    host: Arc<RaftHost>,
    tx: watch::Sender<Arc<MetaImage>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut image = MetaImage::default();
    loop {
        if *stop.borrow() {
            return;
        }
        let store = host.store(META_GROUP);
        let hw_rx = store
            .as_ref()
            .and_then(|s| s.watch_high_watermark(META_PARTITION));
        let (Some(store), Some(mut hw_rx)) = (store, hw_rx) else {
            // The metadata partition is not created yet (a new cluster): poll until it is.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                _ = stop.changed() => return,
            }
        };
        let hw = *hw_rx.borrow_and_update();
        let mut changed = false;
        while image.next_offset < hw {
            let slice = match store.read(META_PARTITION, image.next_offset, 1 << 20) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, offset = image.next_offset, "metadata log read");
                    break;
                }
            };
            if slice.bytes.is_empty() {
                break;
            }
            let before = image.next_offset;
            let batches = match RecordBatch::split_all(&slice.bytes) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "metadata log batch");
                    break;
                }
            };
            for b in batches {
                let Ok(records) = b.records() else { continue };
                for r in records.flatten() {
                    if r.offset < image.next_offset {
                        continue;
                    }
                    let rec = r
                        .value
                        .as_deref()
                        .and_then(|v| pb::MetaRecord::decode(v).ok())
                        .unwrap_or_default();
                    image.apply(r.offset, &rec);
                    changed = true;
                }
            }
            if image.next_offset == before {
                if slice.next_offset > before {
                    image.next_offset = slice.next_offset;
                } else {
                    break;
                }
            }
        }
        if changed {
            tx.send_replace(Arc::new(image.clone()));
        }
        tokio::select! {
            r = hw_rx.changed() => {
                if r.is_err() {
                    // A snapshot install replaced the partition: look it up again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(name: &str, partitions: u32, groups: u32) -> pb::MetaRecord {
        pb::MetaRecord {
            kind: Some(pb::meta_record::Kind::TopicCreated(pb::TopicCreated {
                name: name.into(),
                partitions,
                retention_ms: -1,
                retention_bytes: -1,
                segment_bytes: 1 << 20,
                data_groups: groups,
            })),
        }
    }

    #[test]
    fn replay_assigns_unique_ids_and_ignores_a_second_create() {
        let mut img = MetaImage::default();
        img.apply(0, &created("a", 3, 2));
        img.apply(1, &created("a", 5, 2));
        img.apply(2, &created("b", 2, 2));
        let a = &img.topics["a"];
        assert_eq!(a.created_offset, 0);
        assert_eq!(a.partitions.len(), 3);
        let ids: Vec<u64> = img
            .topics
            .values()
            .flat_map(|t| t.partitions.iter().map(|p| p.partition_id))
            .collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert!(
            img.topics
                .values()
                .flat_map(|t| &t.partitions)
                .all(|p| (1..=2).contains(&p.group))
        );
        assert_eq!(img.next_offset, 3);
        // Delete and re-create: new topic id, new partition ids.
        img.apply(
            3,
            &pb::MetaRecord {
                kind: Some(pb::meta_record::Kind::TopicDeleted(pb::TopicDeleted {
                    name: "a".into(),
                })),
            },
        );
        img.apply(4, &created("a", 1, 2));
        assert_eq!(img.topics["a"].topic_id, 3);
        assert_eq!(img.topics["a"].partitions[0].partition_id, 6);
    }

    #[test]
    fn same_records_same_image() {
        let recs = [created("x", 4, 3), created("y", 2, 3), created("x", 1, 3)];
        let (mut a, mut b) = (MetaImage::default(), MetaImage::default());
        for (i, r) in recs.iter().enumerate() {
            a.apply(i as u64, r);
            b.apply(i as u64, r);
        }
        assert_eq!(a, b);
    }
}
