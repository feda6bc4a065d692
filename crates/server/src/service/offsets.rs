//! `CommitOffsets` and `FetchOffsets`: consumer offsets, stored in the partition's group.

use std::time::Duration;

use runnel_proto::api::{self, ErrorCode};
use runnel_proto::raft as pb;
use runnel_raft::ApplyResult;
use tonic::{Request, Response, Status};

use super::errors::refused;
use super::{Api, error};

pub(super) async fn commit_offsets(
    api: &Api,
    req: Request<api::CommitOffsetsRequest>,
) -> Result<Response<api::CommitOffsetsResponse>, Status> {
    let r = req.into_inner();
    let s = &api.shared;
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
                // -1: "nothing committed yet", checked like any other expectation.
                let expect_none = po.expected_previous == Some(-1);
                let expected_previous = match po.expected_previous {
                    None | Some(-1) => None,
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
                        expect_none,
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

pub(super) async fn fetch_offsets(
    api: &Api,
    req: Request<api::FetchOffsetsRequest>,
) -> Result<Response<api::FetchOffsetsResponse>, Status> {
    let r = req.into_inner();
    let s = &api.shared;
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
