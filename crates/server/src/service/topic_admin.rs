//! Topic administration: `CreateTopic` and `DeleteTopic` (written to the metadata log by its
//! leader), `ListTopics` and `DescribeTopic`.

use std::time::Duration;

use runnel_proto::api::{self, ErrorCode};
use runnel_proto::raft as pb;
use runnel_proto::topic;
use tonic::{Request, Response, Status};

use super::forward::{bounded, forward_failed, forwarded, mark_forwarded};
use super::shared::ADMIN_WAIT;
use super::{Api, error};
use crate::config::{SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN};
use crate::metadata::META_GROUP;

impl Api {
    pub(super) async fn create_topic_here(
        &self,
        r: api::CreateTopicRequest,
    ) -> api::CreateTopicResponse {
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

pub(super) async fn create_topic(
    api: &Api,
    req: Request<api::CreateTopicRequest>,
) -> Result<Response<api::CreateTopicResponse>, Status> {
    let fwd = forwarded(&req);
    let r = req.into_inner();
    match api.shared.forward_target(META_GROUP, fwd) {
        Err(e) => Ok(Response::new(api::CreateTopicResponse {
            error: Some(e),
            topic: None,
        })),
        Ok(Some(ch)) => Ok(Response::new(
            match bounded(api::admin_client::AdminClient::new(ch).create_topic(mark_forwarded(r)))
                .await
            {
                Ok(r) => r.into_inner(),
                Err(st) => api::CreateTopicResponse {
                    error: Some(forward_failed(st)),
                    topic: None,
                },
            },
        )),
        Ok(None) => Ok(Response::new(api.create_topic_here(r).await)),
    }
}

pub(super) async fn delete_topic(
    api: &Api,
    req: Request<api::DeleteTopicRequest>,
) -> Result<Response<api::DeleteTopicResponse>, Status> {
    let fwd = forwarded(&req);
    let r = req.into_inner();
    let s = &api.shared;
    s.await_topic(&r.name).await;
    if let Err(e) = s.topic(&r.name) {
        return Ok(Response::new(api::DeleteTopicResponse { error: Some(e) }));
    }
    match s.forward_target(META_GROUP, fwd) {
        Err(e) => Ok(Response::new(api::DeleteTopicResponse { error: Some(e) })),
        Ok(Some(ch)) => Ok(Response::new(
            match bounded(api::admin_client::AdminClient::new(ch).delete_topic(mark_forwarded(r)))
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

pub(super) async fn list_topics(
    api: &Api,
    _req: Request<api::ListTopicsRequest>,
) -> Result<Response<api::ListTopicsResponse>, Status> {
    let s = &api.shared;
    Ok(Response::new(api::ListTopicsResponse {
        topics: s
            .image()
            .topics
            .values()
            .map(|t| s.topic_metadata(t))
            .collect(),
    }))
}

pub(super) async fn describe_topic(
    api: &Api,
    req: Request<api::DescribeTopicRequest>,
) -> Result<Response<api::DescribeTopicResponse>, Status> {
    let r = req.into_inner();
    let s = &api.shared;
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
