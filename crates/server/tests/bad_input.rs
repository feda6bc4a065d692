//! Bad input against a real three-node cluster: every request gets its exact error code, the
//! node stays up, and the high watermark does not move.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Cluster, broker, wait_for};
use runnel_client::api::{self, ErrorCode};
use runnel_client::{ConsumerConfig, ProducerConfig, ProducerRecord, TopicSpec};
use runnel_record::{BatchBuilder, BatchOptions};

fn code(e: &Option<api::Error>) -> ErrorCode {
    e.as_ref()
        .map_or(ErrorCode::None, |e| ErrorCode::try_from(e.code).unwrap())
}

fn batch(n: usize, value_len: usize, opts: BatchOptions) -> Bytes {
    let mut b = BatchBuilder::new(opts);
    let v = vec![b'x'; value_len];
    for _ in 0..n {
        b.append(1, None, Some(&v), &[]);
    }
    b.build()
}

async fn produce(
    b: &mut api::broker_client::BrokerClient<tonic::transport::Channel>,
    req: api::ProduceRequest,
) -> api::ProduceResponse {
    b.produce(req).await.unwrap().into_inner()
}

fn produce_raw(topic: &str, partition: u32, batch: Bytes) -> api::ProduceRequest {
    api::ProduceRequest {
        topic: topic.into(),
        partition: Some(partition),
        batch,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_exact_codes_and_changes_nothing() {
    let mut cluster = Cluster::start(1);
    let client = cluster.client().await;
    cluster.wait_balanced().await;
    let admin = client.admin();
    admin
        .create_topic(
            "good",
            TopicSpec {
                partitions: 1,
                segment_bytes: 1 << 20,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Seed some records.
    let producer = client.producer(ProducerConfig::default());
    for i in 0..10 {
        producer
            .send("good", ProducerRecord::new(format!("r{i}")))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    producer.close().await;
    let leader = client.metadata(&["good".into()]).await.unwrap().topics[0].partitions[0]
        .leader_address
        .clone();
    let mut b = broker(&leader).await;
    let hw = |b: &mut api::broker_client::BrokerClient<tonic::transport::Channel>| {
        let mut b = b.clone();
        async move {
            b.list_offsets(api::ListOffsetsRequest {
                topic: "good".into(),
                partition: 0,
                timestamp_ms: -1,
                allow_follower: false,
            })
            .await
            .unwrap()
            .into_inner()
            .offset
        }
    };
    let hw0 = hw(&mut b).await;
    assert_eq!(hw0, 10);

    // Invalid topic names: create and produce.
    let long = "x".repeat(250);
    for name in ["", ".", "..", "a/b", "bad name", long.as_str()] {
        let e = admin
            .create_topic(name, TopicSpec::partitions(1))
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Some(ErrorCode::InvalidTopic),
            "create {name:?}: {e}"
        );
        let r = b
            .produce(api::ProduceRequest {
                topic: name.into(),
                records: vec![api::Record {
                    value: Some("v".into()),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&r.error), ErrorCode::InvalidTopic, "produce {name:?}");
    }
    // Unknown topic, unknown partition.
    let r = produce(
        &mut b,
        produce_raw("nope", 0, batch(1, 1, BatchOptions::default())),
    )
    .await;
    assert_eq!(code(&r.error), ErrorCode::UnknownTopicOrPartition);
    let r = produce(
        &mut b,
        produce_raw("good", 7, batch(1, 1, BatchOptions::default())),
    )
    .await;
    assert_eq!(code(&r.error), ErrorCode::UnknownTopicOrPartition);
    let f = |offset: i64, partition: u32| api::FetchRequest {
        topic: "good".into(),
        partition,
        offset,
        max_bytes: 1 << 20,
        ..Default::default()
    };
    let r = b.fetch(f(0, 9)).await.unwrap().into_inner();
    assert_eq!(code(&r.error), ErrorCode::UnknownTopicOrPartition);
    // Negative and huge offsets.
    for o in [-1, -2, i64::MIN, 11, i64::MAX] {
        let r = b.fetch(f(o, 0)).await.unwrap().into_inner();
        assert_eq!(code(&r.error), ErrorCode::OffsetOutOfRange, "offset {o}");
        assert!(r.records.is_empty() && r.raw_batches.is_empty());
    }
    // A fetch at the high watermark is not an error: it waits, then returns nothing.
    let r = b.fetch(f(hw0, 0)).await.unwrap().into_inner();
    assert_eq!(code(&r.error), ErrorCode::None);
    assert!(r.records.is_empty());
    assert_eq!(r.high_watermark, hw0);

    // Oversized batches: above the node's limit, and above the topic's segment size.
    let r = b
        .produce(produce_raw(
            "good",
            0,
            batch(17, 1 << 20, BatchOptions::default()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r.error), ErrorCode::BatchTooLarge);
    let r = b
        .produce(produce_raw(
            "good",
            0,
            batch(2, 700 << 10, BatchOptions::default()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r.error), ErrorCode::BatchTooLarge);
    // A gRPC message above max_request_bytes is refused by the transport.
    let s = b
        .produce(produce_raw("good", 0, Bytes::from(vec![0u8; 40 << 20])))
        .await
        .unwrap_err();
    assert!(
        matches!(
            s.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{s:?}"
    );

    // Wrong CRC.
    let mut bad = batch(3, 10, BatchOptions::default()).to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    let r = produce(&mut b, produce_raw("good", 0, Bytes::from(bad))).await;
    assert_eq!(code(&r.error), ErrorCode::CorruptBatch);
    // A record count that does not match, with a valid CRC over the lie.
    for lie in [2u32, 4] {
        let mut bad = batch(3, 10, BatchOptions::default()).to_vec();
        bad[57..61].copy_from_slice(&lie.to_be_bytes());
        let crc = crc32c::crc32c(&bad[21..]);
        bad[17..21].copy_from_slice(&crc.to_be_bytes());
        let r = b
            .produce(produce_raw("good", 0, Bytes::from(bad)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&r.error), ErrorCode::CorruptBatch, "count {lie}");
    }
    // Garbage that is not a batch at all.
    let r = produce(
        &mut b,
        produce_raw("good", 0, Bytes::from_static(b"not a batch")),
    )
    .await;
    assert_eq!(code(&r.error), ErrorCode::CorruptBatch);

    // Idempotence: a new producer must start at sequence 0; an older epoch is fenced.
    let pid = b
        .init_producer_id(api::InitProducerIdRequest {})
        .await
        .unwrap()
        .into_inner()
        .producer_id;
    let idem = |epoch: i16, seq: i32| BatchOptions {
        producer_id: pid,
        producer_epoch: epoch,
        base_sequence: seq,
        ..Default::default()
    };
    let r = produce(&mut b, produce_raw("good", 0, batch(1, 1, idem(0, 5)))).await;
    assert_eq!(code(&r.error), ErrorCode::OutOfOrderSequence);
    let r = produce(&mut b, produce_raw("good", 0, batch(1, 1, idem(1, 0)))).await;
    assert_eq!(code(&r.error), ErrorCode::None);
    let hw1 = hw0 + 1;
    let r = produce(&mut b, produce_raw("good", 0, batch(1, 1, idem(0, 1)))).await;
    assert_eq!(code(&r.error), ErrorCode::FencedProducer);
    // A retry of the accepted batch is answered with its original offset, not written again.
    let r = produce(&mut b, produce_raw("good", 0, batch(1, 1, idem(1, 0)))).await;
    assert_eq!(code(&r.error), ErrorCode::None);
    assert!(r.duplicate);
    assert_eq!(r.base_offset, hw0);

    // Commit above the high watermark; negative commit; empty group (malformed).
    let commit = |offset: i64| api::CommitOffsetsRequest {
        group: "g".into(),
        topic: "good".into(),
        offsets: vec![api::PartitionOffset {
            partition: 0,
            offset,
            expected_previous: None,
        }],
    };
    let r = b
        .commit_offsets(commit(hw1 + 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r.results[0].error), ErrorCode::OffsetOutOfRange);
    let r = b.commit_offsets(commit(-5)).await.unwrap().into_inner();
    assert_eq!(code(&r.results[0].error), ErrorCode::OffsetOutOfRange);
    let mut empty_group = commit(1);
    empty_group.group.clear();
    let s = b.commit_offsets(empty_group).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    // Compare-and-set with the wrong previous offset.
    let mut cas = commit(1);
    cas.offsets[0].expected_previous = Some(7);
    let r = b.commit_offsets(cas).await.unwrap().into_inner();
    assert_eq!(code(&r.results[0].error), ErrorCode::OffsetConflict);
    let c = client.consumer(ConsumerConfig::group("g"));
    assert_eq!(c.committed("good", &[0]).await.unwrap()[&0], -1);

    // Malformed produce: neither records nor batch, and both.
    let s = b
        .produce(api::ProduceRequest {
            topic: "good".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    let s = b
        .produce(api::ProduceRequest {
            topic: "good".into(),
            records: vec![api::Record::default()],
            batch: batch(1, 1, BatchOptions::default()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    // Structured records with half the producer fields.
    let r = b
        .produce(api::ProduceRequest {
            topic: "good".into(),
            partition: Some(0),
            records: vec![api::Record::default()],
            producer_id: Some(pid),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r.error), ErrorCode::InvalidRequest);
    // Invalid topic settings and partition counts.
    let e = admin
        .create_topic("too-many", TopicSpec::partitions(100_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidPartitions));
    let e = admin
        .create_topic(
            "tiny-segments",
            TopicSpec {
                partitions: 1,
                segment_bytes: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InvalidConfig));

    // Nothing above moved the high watermark (beyond the one accepted idempotent batch), and
    // every node is up.
    assert_eq!(hw(&mut b).await, hw1);
    for id in 1..=3 {
        assert!(cluster.alive(id), "node {id} died\n{}", cluster.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fetch_below_log_start_is_out_of_range() {
    let cluster = Cluster::start(1);
    let client = cluster.client().await;
    cluster.wait_balanced().await;
    client
        .admin()
        .create_topic(
            "short",
            TopicSpec {
                partitions: 1,
                segment_bytes: 1 << 20,
                retention_bytes: 1 << 20,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let producer = client.producer(ProducerConfig {
        batch_max_bytes: 128 << 10,
        ..Default::default()
    });
    let value = Bytes::from(vec![b'r'; 32 << 10]);
    let mut futs = Vec::new();
    for _ in 0..160 {
        futs.push(
            producer
                .send("short", ProducerRecord::new(value.clone()))
                .await
                .unwrap(),
        );
    }
    for f in futs {
        f.await.unwrap();
    }
    producer.close().await;
    let consumer = client.consumer(ConsumerConfig::default());
    // Retention (every 300 ms in these tests) deletes the oldest segments on the leader.
    let start = wait_for(
        Duration::from_secs(30),
        "retention to move log start",
        || {
            let c = &consumer;
            async move {
                let s = c.list_offset("short", 0, -2).await.ok()?;
                (s > 0).then_some(s)
            }
        },
    )
    .await;
    let leader = client.metadata(&["short".into()]).await.unwrap().topics[0].partitions[0]
        .leader_address
        .clone();
    let mut b = broker(&leader).await;
    let r = b
        .fetch(api::FetchRequest {
            topic: "short".into(),
            partition: 0,
            offset: start - 1,
            max_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r.error), ErrorCode::OffsetOutOfRange);
    // Retention may still be deleting (one segment per pass): fetch at the log start as it is
    // now, and look again only when it moved meanwhile.
    let mut start = start;
    for _ in 0..50 {
        let r = b
            .fetch(api::FetchRequest {
                topic: "short".into(),
                partition: 0,
                offset: start,
                max_bytes: 1 << 20,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let now = consumer.list_offset("short", 0, -2).await.unwrap();
        if code(&r.error) == ErrorCode::OffsetOutOfRange && now > start {
            start = now;
            continue;
        }
        assert_eq!(code(&r.error), ErrorCode::None);
        assert_eq!(r.records[0].offset, start);
        return;
    }
    panic!("the log start kept moving for 50 fetches");
}
