//! The API does what `proto/runnel.proto` and `docs/API.md` say, on points a client written
//! from those documents alone found wrong: timestamps from `ListOffsets`, "nothing committed
//! yet" as a commit expectation, strings that are not UTF-8, and server reflection.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::{Cluster, broker, raw_call};
use runnel_client::api::{self, ErrorCode};
use runnel_client::{ProducerConfig, ProducerRecord, TopicSpec};
use runnel_record::{BatchBuilder, BatchOptions};

fn code(e: &Option<api::Error>) -> ErrorCode {
    e.as_ref()
        .map_or(ErrorCode::None, |e| ErrorCode::try_from(e.code).unwrap())
}

/// A one-partition topic and the address of its leader.
async fn topic(cluster: &Cluster, name: &str) -> (runnel_client::Client, String) {
    let client = cluster.client().await;
    cluster.wait_balanced().await;
    client
        .admin()
        .create_topic(name, TopicSpec::partitions(1))
        .await
        .unwrap();
    let leader = client.metadata(&[name.into()]).await.unwrap().topics[0].partitions[0]
        .leader_address
        .clone();
    (client, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_offsets_by_time_answers_the_timestamp_of_the_record_found() {
    let cluster = Cluster::start(1);
    let (client, leader) = topic(&cluster, "times").await;
    let producer = client.producer(ProducerConfig::default());
    for (i, ts) in [1_000i64, 2_000, 3_000].into_iter().enumerate() {
        producer
            .send("times", ProducerRecord::new(format!("r{i}")).timestamp(ts))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    producer.close().await;
    let mut b = broker(&leader).await;
    let ask = |ts: i64| api::ListOffsetsRequest {
        topic: "times".into(),
        partition: 0,
        timestamp_ms: ts,
        allow_follower: false,
    };
    for (asked, offset, found) in [(1_500, 1, 2_000), (2_000, 1, 2_000), (0, 0, 1_000)] {
        let r = b.list_offsets(ask(asked)).await.unwrap().into_inner();
        assert_eq!(code(&r.error), ErrorCode::None);
        assert_eq!((r.offset, r.timestamp_ms), (offset, found), "asked {asked}");
    }
    // Newer than every record: the high watermark, with no timestamp.
    let r = b.list_offsets(ask(3_001)).await.unwrap().into_inner();
    assert_eq!((r.offset, r.timestamp_ms), (3, -1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expecting_no_commit_conflicts_with_an_existing_commit() {
    let cluster = Cluster::start(1);
    let (client, leader) = topic(&cluster, "claims").await;
    let producer = client.producer(ProducerConfig::default());
    for i in 0..5 {
        producer
            .send("claims", ProducerRecord::new(format!("r{i}")))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    producer.close().await;
    let mut b = broker(&leader).await;
    let commit = |offset: i64, expected: Option<i64>| api::CommitOffsetsRequest {
        group: "claimers".into(),
        topic: "claims".into(),
        offsets: vec![api::PartitionOffset {
            partition: 0,
            offset,
            expected_previous: expected,
        }],
    };
    let first = b.commit_offsets(commit(2, Some(-1))).await.unwrap();
    assert_eq!(code(&first.into_inner().results[0].error), ErrorCode::None);
    // A second claimer that expects nothing committed lost the race: told so, nothing changes.
    let second = b.commit_offsets(commit(4, Some(-1))).await.unwrap();
    let r = &second.into_inner().results[0];
    assert_eq!(code(&r.error), ErrorCode::OffsetConflict, "{r:?}");
    let fetched = b
        .fetch_offsets(api::FetchOffsetsRequest {
            group: "claimers".into(),
            topic: "claims".into(),
            partitions: vec![0],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.offsets[0].offset, 2);
    // The owner moves on from what it committed; an unconditional commit still overwrites.
    let r = b.commit_offsets(commit(3, Some(2))).await.unwrap();
    assert_eq!(code(&r.into_inner().results[0].error), ErrorCode::None);
    let r = b.commit_offsets(commit(5, None)).await.unwrap();
    assert_eq!(code(&r.into_inner().results[0].error), ErrorCode::None);
}

/// Field `number` as a length-delimited field holding `value`.
fn field(number: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2, value.len() as u8];
    out.extend_from_slice(value);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strings_that_are_not_utf8_are_invalid_arguments() {
    let cluster = Cluster::start(1);
    let (_client, leader) = topic(&cluster, "text").await;
    let bad = b"or\xffders";
    // MetadataRequest.topics (1), CommitOffsetsRequest.group (1), ProduceRequest.topic (1),
    // and a record's header key: ProduceRequest.records (4) → Record.headers (3) → Header.key
    // (1).
    let header = field(1, bad);
    let record = field(3, &header);
    let mut produce = field(1, b"text");
    produce.extend(field(4, &record));
    for (path, body) in [
        ("/runnel.v1.Broker/Metadata", field(1, bad)),
        ("/runnel.v1.Broker/CommitOffsets", field(1, bad)),
        ("/runnel.v1.Broker/Produce", field(1, bad)),
        ("/runnel.v1.Broker/Produce", produce),
        ("/runnel.v1.Admin/DescribeTopic", field(1, bad)),
    ] {
        let e = raw_call(&leader, path, Bytes::from(body))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{path}: {e:?}");
        assert!(e.message().contains("UTF-8"), "{path}: {}", e.message());
    }
    // A raw batch carries header keys as bytes: one that is not UTF-8 could not be served in
    // record mode as written, so the batch is refused in band and nothing is appended.
    let mut bb = BatchBuilder::new(BatchOptions::default());
    bb.append(1, None, Some(b"v"), &[(&bad[..], Some(&b"x"[..]))]);
    let mut b = broker(&leader).await;
    let r = b
        .produce(api::ProduceRequest {
            topic: "text".into(),
            partition: Some(0),
            batch: bb.build(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r.error), ErrorCode::InvalidRequest, "{r:?}");
    let hw = b
        .list_offsets(api::ListOffsetsRequest {
            topic: "text".into(),
            partition: 0,
            timestamp_ms: -1,
            allow_follower: false,
        })
        .await
        .unwrap()
        .into_inner()
        .offset;
    assert_eq!(hw, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_exactly_the_client_port_services_in_v1_and_v1alpha() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::{v1, v1alpha};
    let cluster = Cluster::start(1);
    let _up = cluster.client().await; // a node answers
    let addr = cluster.bootstrap()[0].clone();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let want: BTreeSet<String> = [
        "runnel.v1.Broker",
        "runnel.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .map(String::from)
    .into();
    // v1
    let mut c = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let got: BTreeSet<String> = l.service.into_iter().map(|s| s.name).collect();
    assert_eq!(got, want, "v1");
    // v1alpha, and a symbol it can describe.
    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let reqs = [
        v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "runnel.v1.Broker".into(),
        ),
    ]
    .map(|m| v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut resp = c
        .server_reflection_info(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list")
    };
    let got: BTreeSet<String> = l.service.into_iter().map(|s| s.name).collect();
    assert_eq!(got, want, "v1alpha");
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(f)) =
        resp.next().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor for runnel.v1.Broker")
    };
    assert!(!f.file_descriptor_proto.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscription_to_a_deleted_topic_ends_with_unknown_topic() {
    let cluster = Cluster::start(1);
    let (client, leader) = topic(&cluster, "doomed").await;
    let mut b = broker(&leader).await;
    let mut stream = b
        .subscribe(api::SubscribeRequest {
            topic: "doomed".into(),
            partition: 0,
            offset: 0,
            max_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let producer = client.producer(ProducerConfig::default());
    producer
        .send("doomed", ProducerRecord::new("one"))
        .await
        .unwrap()
        .await
        .unwrap();
    producer.close().await;
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a record within 10 s")
        .unwrap()
        .expect("the stream is open");
    assert_eq!(code(&first.error), ErrorCode::None);
    assert_eq!(first.records.len(), 1);
    client.admin().delete_topic("doomed").await.unwrap();
    let last = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let m = stream.message().await.unwrap().expect("ends with an error");
            if m.error.is_some() {
                return m;
            }
        }
    })
    .await
    .expect("the stream ends within 15 s of the deletion");
    assert_eq!(
        code(&last.error),
        ErrorCode::UnknownTopicOrPartition,
        "{last:?}"
    );
}
