//! `Produce`: records or a raw batch, checked, ordered per idempotent producer, written
//! through the partition's group.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use runnel_proto::api::{self, ErrorCode};
use runnel_proto::partitioner;
use runnel_proto::raft as pb;
use runnel_raft::{ApplyResult, WriteError};
use runnel_record::{self as batch, BatchBuilder, BatchOptions, RecordBatch};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::errors::refused;
use super::shared::produce_command;
use super::{Api, Shared, error, now_ms};
use crate::order::OrderKey;

/// Where a batch of an idempotent producer belongs in its sequence.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ordered {
    pub(super) key: OrderKey,
    pub(super) epoch: i32,
    pub(super) seq: i32,
    pub(super) count: i32,
}

impl Shared {
    /// [`Shared::write`] for a batch of an idempotent producer: it enters the log after the
    /// producer's previous batch when that one is on its way (see [`crate::order`]).
    pub(super) async fn write_ordered(
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
}

/// Checks a raw v2 batch: CRC, header, every record decodable and exactly `records_count` of
/// them, no compression, nothing after it.
pub(super) fn check_raw_batch(b: &Bytes) -> Result<batch::BatchHeader, api::Error> {
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
        let r = r.map_err(|e| corrupt(format!("record {n}: {e}")))?;
        // Header keys are strings in Kafka's record format and in the API's record mode: one
        // that is not UTF-8 could not be served as written.
        if let Some(i) = r
            .headers
            .iter()
            .position(|h| std::str::from_utf8(&h.key).is_err())
        {
            return Err(error(
                ErrorCode::InvalidRequest,
                format!("record {n}: header {i}'s key is not valid UTF-8"),
            ));
        }
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

/// A produce request's batch, ready to write, and where it falls in its producer's sequence.
struct Prepared {
    batch: Bytes,
    producer_id: i64,
    epoch: i32,
    seq: i32,
    count: i32,
}

/// The partition a request without one goes to: murmur2 of `partition_key`, else of the first
/// record's key, else round-robin.
fn pick_partition(s: &Shared, r: &api::ProduceRequest, partitions: u32) -> u32 {
    if let Some(p) = r.partition {
        return p;
    }
    let key = if r.partition_key.is_empty() {
        r.records.first().and_then(|x| x.key.clone())
    } else {
        Some(r.partition_key.clone())
    };
    match key {
        Some(k) => partitioner::partition_for_key(&k, partitions),
        None => s.rr.fetch_add(1, Ordering::Relaxed) % partitions,
    }
}

/// A raw batch, checked: its size, its structure and CRC, and its producer fields against the
/// request's.
fn prepare_raw(r: &api::ProduceRequest, max_batch: usize) -> Result<Prepared, api::Error> {
    if r.batch.len() > max_batch {
        return Err(error(
            ErrorCode::BatchTooLarge,
            format!("batch of {} bytes > limit {max_batch}", r.batch.len()),
        ));
    }
    let h = check_raw_batch(&r.batch)?;
    let agree = r.producer_id.is_none_or(|v| v == h.producer_id)
        && r.producer_epoch
            .is_none_or(|v| v == i32::from(h.producer_epoch))
        && r.base_sequence.is_none_or(|v| v == h.base_sequence);
    if !agree {
        return Err(error(
            ErrorCode::InvalidRequest,
            "producer fields disagree with the batch header",
        ));
    }
    if h.producer_id >= 0 && (h.producer_epoch < 0 || h.base_sequence < 0) {
        return Err(error(
            ErrorCode::InvalidRequest,
            "an idempotent batch needs epoch >= 0 and base sequence >= 0",
        ));
    }
    Ok(Prepared {
        batch: r.batch.clone(),
        producer_id: h.producer_id.max(-1),
        epoch: i32::from(h.producer_epoch),
        seq: h.base_sequence,
        count: h.records_count as i32,
    })
}

/// Records encoded as one batch (timestamps 0 or negative take the leader's clock), within
/// the request's limits.
fn prepare_records(
    r: &api::ProduceRequest,
    max_records: usize,
    max_batch: usize,
) -> Result<Prepared, api::Error> {
    if r.records.len() > max_records {
        return Err(error(
            ErrorCode::BatchTooLarge,
            format!("{} records > limit {max_records}", r.records.len()),
        ));
    }
    let (producer_id, epoch, seq) = match (r.producer_id, r.producer_epoch, r.base_sequence) {
        (None, None, None) => (-1i64, -1i32, -1i32),
        (Some(id), Some(ep), Some(sq))
            if id >= 0 && (0..=i32::from(i16::MAX)).contains(&ep) && sq >= 0 =>
        {
            (id, ep, sq)
        }
        _ => {
            return Err(error(
                ErrorCode::InvalidRequest,
                "producer_id, producer_epoch and base_sequence go together, each >= 0",
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
        return Err(error(
            ErrorCode::BatchTooLarge,
            format!("records take about {size} bytes > limit {max_batch}"),
        ));
    }
    let mut b = BatchBuilder::with_capacity(
        BatchOptions {
            producer_id,
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
        return Err(error(
            ErrorCode::BatchTooLarge,
            format!("batch of {} bytes > limit {max_batch}", built.len()),
        ));
    }
    Ok(Prepared {
        batch: built,
        producer_id,
        epoch,
        seq,
        count: r.records.len() as i32,
    })
}

impl Api {
    pub(super) async fn produce_inner(
        &self,
        r: api::ProduceRequest,
    ) -> Result<api::ProduceResponse, Status> {
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
        let partition = pick_partition(s, &r, t.partitions.len() as u32);
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
        let prepared = if r.batch.is_empty() {
            prepare_records(&r, limits.max_records_per_produce, max_batch)
        } else {
            prepare_raw(&r, max_batch)
        };
        let w = match prepared {
            Ok(w) => w,
            Err(e) => return Ok(fail(partition, e)),
        };
        let timeout = Duration::from_millis(if r.timeout_ms == 0 {
            limits.produce_timeout_ms
        } else {
            u64::from(r.timeout_ms).min(limits.produce_timeout_ms)
        });
        let cmd = produce_command(p.partition_id, w.batch, w.producer_id, w.epoch, w.seq);
        let order = (w.producer_id >= 0).then_some(Ordered {
            key: OrderKey {
                partition_id: p.partition_id,
                producer_id: w.producer_id,
            },
            epoch: w.epoch,
            seq: w.seq,
            count: w.count,
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
}

pub(super) async fn produce(
    api: &Api,
    req: Request<api::ProduceRequest>,
) -> Result<Response<api::ProduceResponse>, Status> {
    api.produce_inner(req.into_inner()).await.map(Response::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_record::{BatchBuilder, BatchOptions};

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
}
