//! `Fetch`, `Subscribe` and `ListOffsets`: reads of one partition, from its leader or (when
//! allowed) a follower.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use runnel_proto::api::{self, ErrorCode};
use runnel_record::{self as batch, RecordBatch};
use tonic::{Request, Response, Status};

use super::errors::read_error;
use super::{Api, error};
use crate::metadata::PartitionRef;

/// The stream a Subscribe call returns.
pub(super) type FetchStream =
    Pin<Box<dyn Stream<Item = Result<api::FetchResponse, Status>> + Send>>;

/// Converts whole batches into records at or after `from`.
pub(super) fn to_records(bytes: &Bytes, from: u64) -> Result<Vec<api::Record>, api::Error> {
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

impl Api {
    /// One fetch: checks, optional long-poll on the high watermark, read, convert.
    pub(super) async fn fetch_once(&self, req: &api::FetchRequest) -> api::FetchResponse {
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
}

pub(super) async fn fetch(
    api: &Api,
    req: Request<api::FetchRequest>,
) -> Result<Response<api::FetchResponse>, Status> {
    Ok(Response::new(api.fetch_once(&req.into_inner()).await))
}

pub(super) async fn subscribe(
    api: &Api,
    req: Request<api::SubscribeRequest>,
) -> Result<Response<FetchStream>, Status> {
    let r = req.into_inner();
    let limits = &api.shared.cfg.limits;
    let (tx, rx) = crate::subscribe::channel(
        &api.shared.subscribe_budget,
        limits.subscribe_buffer,
        Duration::from_millis(limits.subscribe_stall_ms),
    );
    let me = api.clone();
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
        // The replica served, once known: when it disappears from a group this node still
        // hosts, its topic was deleted (partition ids are never reused).
        let mut served: Option<PartitionRef> = None;
        loop {
            let mut resp = me.fetch_once(&fetch).await;
            if resp.error.is_none() && served.is_none() {
                served = me
                    .shared
                    .resolve(&fetch.topic, fetch.partition)
                    .ok()
                    .map(|t| t.1);
            }
            if let (Some(e), Some(p)) = (resp.error.as_mut(), served)
                && e.code == ErrorCode::LeaderNotAvailable as i32
                && me.shared.partition_deleted(p).await
            {
                *e = error(
                    ErrorCode::UnknownTopicOrPartition,
                    format!("topic {} was deleted", fetch.topic),
                );
            }
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

pub(super) async fn list_offsets(
    api: &Api,
    req: Request<api::ListOffsetsRequest>,
) -> Result<Response<api::ListOffsetsResponse>, Status> {
    let r = req.into_inner();
    let s = &api.shared;
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
                    Some((o, found)) if o < hw => (o, found),
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

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_record::{BatchBuilder, BatchOptions};

    #[test]
    fn records_below_the_requested_offset_are_skipped() {
        let mut b = BatchBuilder::new(BatchOptions::default());
        for i in 0..5 {
            b.append(1000 + i as i64, None, Some(b"v"), &[]);
        }
        let recs = to_records(&b.build(), 3).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }
}
