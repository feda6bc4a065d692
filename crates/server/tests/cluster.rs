//! Three real `runneld` processes: produce 100 000 records, consume them in order, commit and
//! resume, replay from an offset and a timestamp; SIGKILL a leader under an idempotent
//! producer; SIGTERM shuts down cleanly.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::{Cluster, wait_for};
use runnel_client::{
    Client, ConsumerConfig, Delivery, ProducerConfig, ProducerRecord, StartFrom, TopicSpec, api,
};

const TOPIC_SEGMENT: u64 = 8 << 20;

/// Creates `name` with `partitions` partitions and small segments.
async fn create_topic(client: &Client, name: &str, partitions: u32) {
    client
        .admin()
        .create_topic(
            name,
            TopicSpec {
                partitions,
                segment_bytes: TOPIC_SEGMENT,
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

/// Now, in ms since the epoch: records stamped now are safe from retention (7 days by default)
/// while a test reads them back.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn produce_all(
    client: &Client,
    topic: &str,
    n: usize,
    ts_base: i64,
) -> Vec<(String, Delivery)> {
    let producer = client.producer(ProducerConfig::default());
    let mut futs = Vec::with_capacity(n);
    for i in 0..n {
        let v = format!("v{i:06}");
        let rec = ProducerRecord::new(v.clone())
            .key(format!("k{i}"))
            .timestamp(ts_base + i as i64);
        futs.push((v, producer.send(topic, rec).await.unwrap()));
    }
    let mut out = Vec::with_capacity(n);
    for (v, f) in futs {
        out.push((v, f.await.expect("acknowledged")));
    }
    producer.close().await;
    out
}

/// Reads a partition from `from` to its high watermark with the consumer API.
async fn read_partition(
    client: &Client,
    topic: &str,
    partition: u32,
    from: StartFrom,
    upto: i64,
) -> Vec<runnel_client::ConsumerRecord> {
    let mut c = client.consumer(ConsumerConfig::default());
    c.assign(topic, Some(vec![partition]), from).await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while c.position(topic, partition).unwrap() < upto {
        out.extend(c.poll().await.unwrap());
        assert!(tokio::time::Instant::now() < deadline, "read stalled");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn produce_consume_commit_resume_and_replay() {
    let cluster = Cluster::start(3);
    let client = cluster.client().await;
    let admin = client.admin();
    let t = admin
        .create_topic(
            "events",
            TopicSpec {
                partitions: 4,
                segment_bytes: TOPIC_SEGMENT,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(t.partitions.len(), 4);
    assert!(
        t.partitions.iter().all(|p| p.replicas == vec![1, 2, 3]),
        "{t:?}"
    );
    // A second create of the same name is refused in-band.
    let e = admin
        .create_topic("events", TopicSpec::partitions(1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(api::ErrorCode::TopicAlreadyExists));

    const N: usize = 100_000;
    let ts_base = 1_700_000_000_000i64;
    let acked = produce_all(&client, "events", N, ts_base).await;
    // Per partition: offsets 0..n, each exactly once.
    let mut by_part: BTreeMap<u32, BTreeMap<i64, (String, i64)>> = BTreeMap::new();
    for (i, (v, d)) in acked.iter().enumerate() {
        let prev = by_part
            .entry(d.partition)
            .or_default()
            .insert(d.offset, (v.clone(), ts_base + i as i64));
        assert!(prev.is_none(), "offset {} acknowledged twice", d.offset);
    }
    assert!(by_part.len() > 1, "keys spread over partitions");
    for (p, offs) in &by_part {
        let keys: Vec<i64> = offs.keys().copied().collect();
        assert_eq!(
            keys,
            (0..offs.len() as i64).collect::<Vec<_>>(),
            "partition {p}"
        );
    }

    // Consume everything, in order per partition, with a consumer group.
    let mut consumer = client.consumer(ConsumerConfig::group("auditors"));
    consumer
        .assign("events", None, StartFrom::Committed)
        .await
        .unwrap();
    let mut seen: BTreeMap<u32, Vec<(i64, String)>> = BTreeMap::new();
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while total < N / 2 {
        for r in consumer.poll().await.unwrap() {
            let v = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
            seen.entry(r.partition).or_default().push((r.offset, v));
            total += 1;
        }
        assert!(tokio::time::Instant::now() < deadline, "consume stalled");
    }
    // Commit the position, drop the consumer, and resume from the commit in a new one.
    consumer.commit().await.unwrap();
    let positions = consumer.positions().clone();
    drop(consumer);
    let mut resumed = client.consumer(ConsumerConfig::group("auditors"));
    resumed
        .assign("events", None, StartFrom::Committed)
        .await
        .unwrap();
    assert_eq!(resumed.positions(), &positions, "resume at the commit");
    while total < N {
        for r in resumed.poll().await.unwrap() {
            let v = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
            seen.entry(r.partition).or_default().push((r.offset, v));
            total += 1;
        }
        assert!(tokio::time::Instant::now() < deadline, "consume stalled");
    }
    assert_eq!(total, N, "no record seen twice");
    for (p, recs) in &seen {
        let want = &by_part[p];
        assert_eq!(recs.len(), want.len(), "partition {p}");
        for (i, (o, v)) in recs.iter().enumerate() {
            assert_eq!(*o, i as i64, "partition {p} in order, no gaps");
            assert_eq!(v, &want[o].0, "partition {p} offset {o}");
        }
    }

    // Replay partition 0 from an offset.
    let p0 = &by_part[&0];
    let hw0 = p0.len() as i64;
    let from = hw0 / 2;
    let replay = read_partition(&client, "events", 0, StartFrom::Offset(from), hw0).await;
    assert_eq!(replay.len() as i64, hw0 - from);
    assert_eq!(replay[0].offset, from);
    assert_eq!(
        String::from_utf8_lossy(replay[0].value.as_deref().unwrap()),
        p0[&from].0
    );

    // Replay from a timestamp: the first offset whose timestamp is >= the target.
    for (p, offs) in &by_part {
        let target = ts_base + (N as i64) / 3;
        let want = offs
            .iter()
            .find(|(_, (_, ts))| *ts >= target)
            .map(|(o, _)| *o)
            .unwrap();
        let hw = offs.len() as i64;
        let r = read_partition(&client, "events", *p, StartFrom::Timestamp(target), hw).await;
        assert_eq!(r[0].offset, want, "partition {p}");
        assert!(r[0].timestamp_ms >= target);
    }

    // Every node serves the same records from its own replica.
    for n in &cluster.nodes {
        let one = Client::connect([n.client.clone()]).await.unwrap();
        let mut c = one.consumer(ConsumerConfig {
            allow_follower: true,
            ..Default::default()
        });
        c.assign("events", Some(vec![1]), StartFrom::Offset(0))
            .await
            .unwrap();
        let want = &by_part[&1];
        let mut got = 0usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while got < want.len() {
            for r in c.poll().await.unwrap() {
                assert_eq!(
                    String::from_utf8_lossy(r.value.as_deref().unwrap()),
                    want[&r.offset].0
                );
                got += 1;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} stalled",
                n.id
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_leader_loses_and_duplicates_nothing() {
    let mut cluster = Cluster::start(2);
    let client = cluster.client().await;
    create_topic(&client, "payments", 2).await;

    // An idempotent producer writes unique values to partition 0 in the background.
    let producer = std::sync::Arc::new(client.producer(ProducerConfig {
        linger: Duration::from_millis(2),
        batch_max_records: 50,
        ..Default::default()
    }));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let producer = std::sync::Arc::clone(&producer);
        tokio::spawn(async move {
            let mut futs = Vec::new();
            let mut i = 0u64;
            while !*stop_rx.borrow() {
                let v = format!("pay-{i}");
                let f = producer
                    .send("payments", ProducerRecord::new(v.clone()).partition(0))
                    .await
                    .unwrap();
                futs.push((v, f));
                i += 1;
                if i % 200 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let mut acked = Vec::new();
            for (v, f) in futs {
                acked.push((v, f.await));
            }
            acked
        })
    };
    // A consumer reads partition 0 from the leader throughout the kill: its offsets must stay
    // contiguous (a leader change neither skips nor repeats below its position).
    let (target_tx, mut target_rx) = tokio::sync::watch::channel(i64::MAX);
    let reader = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut c = client.consumer(ConsumerConfig {
                retry_deadline: Duration::from_secs(60),
                ..Default::default()
            });
            c.assign("payments", Some(vec![0]), StartFrom::Offset(0))
                .await
                .unwrap();
            let mut values = Vec::new();
            while (values.len() as i64) < *target_rx.borrow_and_update() {
                for r in c.poll().await.unwrap() {
                    assert_eq!(r.offset, values.len() as i64, "contiguous across the kill");
                    values.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
                }
            }
            values
        })
    };
    // Let some writes land, then SIGKILL the leader.
    let c2 = client.clone();
    wait_for(Duration::from_secs(30), "first writes", || {
        let c2 = c2.clone();
        async move {
            let d = c2.admin().describe_topic("payments").await.ok()?;
            (d.partitions[0].high_watermark > 500).then_some(())
        }
    })
    .await;
    // SIGKILL whichever node leads partition 0 now.
    let meta = client.metadata(&["payments".into()]).await.unwrap();
    let victim = meta.topics[0].partitions[0].leader_id;
    assert_ne!(victim, 0);
    cluster.kill(victim);
    // Writes continue on a new leader.
    let survivor = cluster
        .nodes
        .iter()
        .find(|n| n.id != victim)
        .unwrap()
        .client
        .clone();
    let before = {
        let one = Client::connect([survivor.clone()]).await.unwrap();
        let d = one.admin().describe_topic("payments").await.unwrap();
        d.partitions[0].high_watermark
    };
    let one = Client::connect([survivor.clone()]).await.unwrap();
    wait_for(Duration::from_secs(30), "writes after the kill", || {
        let one = one.clone();
        async move {
            let d = one.admin().describe_topic("payments").await.ok()?;
            (d.partitions[0].high_watermark > before + 500).then_some(())
        }
    })
    .await;
    cluster.restart(victim);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    let acked = writer.await.unwrap();
    let ok: Vec<(String, Delivery)> = acked
        .iter()
        .filter_map(|(v, r)| r.as_ref().ok().map(|d| (v.clone(), *d)))
        .collect();
    assert_eq!(ok.len(), acked.len(), "no send failed for good");

    // Read the partition back from the leader.
    let hw = wait_for(Duration::from_secs(30), "leader high watermark", || {
        let client = client.clone();
        async move {
            let c = client.consumer(ConsumerConfig::default());
            c.list_offset("payments", 0, -1).await.ok()
        }
    })
    .await;
    target_tx.send(hw).unwrap();
    let during = tokio::time::timeout(Duration::from_secs(90), reader)
        .await
        .expect("the concurrent reader caught up")
        .unwrap();
    let recs = read_partition(&client, "payments", 0, StartFrom::Earliest, hw).await;
    let offsets: Vec<i64> = recs.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (0..hw).collect::<Vec<_>>(), "contiguous offsets");
    let values: Vec<String> = recs
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect();
    let unique: HashSet<&String> = values.iter().collect();
    assert_eq!(unique.len(), values.len(), "no duplicates");
    for (v, d) in &ok {
        assert_eq!(
            &values[d.offset as usize], v,
            "acknowledged record at its acknowledged offset"
        );
    }
    assert_eq!(values.len(), ok.len(), "nothing that was not acknowledged");
    assert_eq!(
        during, values,
        "the reader during the kill saw the same log"
    );

    // The restarted node catches up: its own replica reaches the same high watermark.
    let victim_addr = cluster.nodes[victim as usize - 1].client.clone();
    wait_for(Duration::from_secs(60), "restarted node catches up", || {
        let a = victim_addr.clone();
        async move {
            let one = Client::connect([a]).await.ok()?;
            let d = one.admin().describe_topic("payments").await.ok()?;
            (d.partitions[0].high_watermark == hw).then_some(())
        }
    })
    .await;
    let one = Client::connect([victim_addr]).await.unwrap();
    let mut c = one.consumer(ConsumerConfig {
        allow_follower: true,
        ..Default::default()
    });
    c.assign("payments", Some(vec![0]), StartFrom::Offset(0))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < hw as usize {
        got.extend(c.poll().await.unwrap());
    }
    let replica: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(
        replica, values,
        "the restarted replica holds the same records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_node_cleanly_and_it_restarts() {
    let mut cluster = Cluster::start(1);
    let client = cluster.client().await;
    create_topic(&client, "t", 1).await;
    let acked = produce_all(&client, "t", 100, 1).await;
    let status = cluster.terminate(2);
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        cluster.logs()
    );
    let log = std::fs::read_to_string(&cluster.nodes[1].log).unwrap();
    assert!(log.contains("runneld stopped"), "{log}");
    cluster.restart(2);
    let addr = cluster.nodes[1].client.clone();
    let want = acked.len() as i64;
    wait_for(Duration::from_secs(60), "node 2 back with the data", || {
        let a = addr.clone();
        async move {
            let one = Client::connect([a]).await.ok()?;
            let d = one.admin().describe_topic("t").await.ok()?;
            (d.partitions[0].high_watermark == want).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_streams_existing_then_new_records_in_order() {
    let mut cluster = Cluster::start(1);
    let client = cluster.client().await;
    cluster.wait_balanced().await;
    create_topic(&client, "stream", 1).await;
    produce_all(&client, "stream", 50, 1).await;
    let leader = client.metadata(&["stream".into()]).await.unwrap().topics[0].partitions[0]
        .leader_address
        .clone();
    let mut b = common::broker(&leader).await;
    let mut stream = b
        .subscribe(api::SubscribeRequest {
            topic: "stream".into(),
            partition: 0,
            offset: 10,
            max_bytes: 1024,
            raw: false,
            allow_follower: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = 10i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // The 40 existing records, then 50 produced while subscribed.
    let mut produced_more = false;
    while next < 100 {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("stream stalled")
            .unwrap()
            .expect("stream ended");
        assert!(msg.error.is_none(), "{:?}", msg.error);
        for r in msg.records {
            assert_eq!(r.offset, next, "in order, no gaps, no repeats");
            next += 1;
        }
        if next == 50 && !produced_more {
            produced_more = true;
            produce_all(&client, "stream", 50, 2).await;
        }
    }
    // SIGTERM with the stream open: the node ends it with an in-band error and exits cleanly.
    let leader_id = cluster
        .nodes
        .iter()
        .find(|n| n.client == leader)
        .unwrap()
        .id;
    let status = cluster.terminate(leader_id);
    assert!(status.success(), "{status:?}\n{}", cluster.logs());
    let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("stream answered")
        .expect("stream ended in-band")
        .expect("a last message");
    assert_eq!(
        m.error.map(|e| e.code),
        Some(api::ErrorCode::LeaderNotAvailable as i32)
    );
    assert_eq!(m.next_offset, 100, "resume point");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_on_every_node() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = Cluster::start(1);
    let _ = cluster.client().await;
    for n in &cluster.nodes {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", n.client))
            .unwrap()
            .connect()
            .await
            .unwrap();
        for svc in ["runnel.v1.Broker", "runnel.v1.Admin"] {
            let r = HealthClient::new(ch.clone())
                .check(HealthCheckRequest {
                    service: svc.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                r.status,
                ServingStatus::Serving as i32,
                "{svc} on node {}",
                n.id
            );
        }
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
            panic!("unexpected reflection answer {resp:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for svc in ["runnel.v1.Broker", "runnel.v1.Admin"] {
            assert!(
                names.iter().any(|n| n == svc),
                "{svc} missing from {names:?}"
            );
        }
    }
}

/// Admin writes and producer ids are forwarded to the metadata leader over the peer listener,
/// so they work on every node even when the advertised client addresses are unreachable from
/// the nodes (published container ports, NAT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_works_when_advertised_client_addresses_do_not() {
    // Port 1 on loopback refuses: nothing may depend on reaching an advertised client address.
    let cluster = Cluster::start_advertising(1, |_| "127.0.0.1:1".to_string());
    for n in &cluster.nodes {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", n.client))
            .unwrap()
            .connect_timeout(Duration::from_secs(2));
        let ch = wait_for(Duration::from_secs(30), "the node to listen", || {
            let ch = ch.clone();
            async move { ch.connect().await.ok() }
        })
        .await;
        let admin = api::admin_client::AdminClient::new(ch.clone());
        let mut broker = api::broker_client::BrokerClient::new(ch);
        let topic = format!("behind-nat-{}", n.id);
        // Retry only while the cluster elects its first leaders.
        let r = wait_for(Duration::from_secs(30), "create_topic to succeed", || {
            let (admin, topic) = (admin.clone(), topic.clone());
            async move {
                let mut admin = admin;
                let r = admin
                    .create_topic(api::CreateTopicRequest {
                        name: topic,
                        partitions: 1,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                match r.error.as_ref().map(|e| e.code()) {
                    Some(api::ErrorCode::LeaderNotAvailable | api::ErrorCode::NotLeader) => None,
                    _ => Some(r),
                }
            }
        })
        .await;
        assert!(r.error.is_none(), "node {}: {:?}", n.id, r.error);
        let r = broker
            .init_producer_id(api::InitProducerIdRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(r.error.is_none(), "node {}: {:?}", n.id, r.error);
        assert!(r.producer_id > 0);
        wait_for(
            Duration::from_secs(10),
            "the node to list the topic",
            || {
                let (admin, topic) = (admin.clone(), topic.clone());
                async move {
                    let mut admin = admin;
                    let listed = admin.list_topics(api::ListTopicsRequest {}).await.ok()?;
                    listed
                        .into_inner()
                        .topics
                        .iter()
                        .any(|t| t.name == topic)
                        .then_some(())
                }
            },
        )
        .await;
    }
}

/// Read-your-writes for topics: a node that missed a topic's creation (stopped meanwhile)
/// answers for it as soon as it resumes, without waiting for the leader to bring it up to
/// date (it asks the metadata leader when it does not know a name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_topic_is_known_at_once_on_every_node() {
    let cluster = Cluster::start(1);
    cluster.wait_balanced().await; // node 1 leads the metadata group
    let client = cluster.client().await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.nodes[2].client))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut lagging = api::broker_client::BrokerClient::new(ch);
    for round in 0..3 {
        let name = format!("ryw-{round}");
        cluster.signal(3, "STOP");
        client
            .admin()
            .create_topic(&name, TopicSpec::partitions(1))
            .await
            .unwrap();
        cluster.signal(3, "CONT");
        let m = lagging
            .metadata(api::MetadataRequest {
                topics: vec![name.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            m.topics.len() == 1 && m.topics[0].error.is_none(),
            "node 3 does not know {name} right after resuming: {:?}",
            m.topics
        );
    }
}

/// A node whose disk is lost rejoins under a new id: started empty with `--join`, it is added
/// to every group by `ReplaceNode`, catches up, and counts toward the quorum: with the first
/// node down too, the replacement and the last original node still accept and serve writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_lost_disk_is_replaced_under_a_new_id() {
    let mut cluster = Cluster::start(2);
    let client = cluster.client().await;
    create_topic(&client, "replace", 4).await;
    let mut acked = produce_all(&client, "replace", 2000, now_ms()).await;

    cluster.kill(3);
    std::fs::remove_dir_all(&cluster.nodes[2].data).unwrap();
    let new = cluster.start_joining_node(&[1, 2]);
    let (peer, addr) = (
        cluster.nodes[3].peer.clone(),
        cluster.nodes[3].client.clone(),
    );
    let admin = client.admin();
    let groups = admin.replace_node(3, new, &peer, &addr).await.unwrap();
    assert_eq!(groups, vec![0, 1, 2]);
    // Done is done: a second call changes nothing and succeeds.
    assert_eq!(
        admin.replace_node(3, new, &peer, &addr).await.unwrap(),
        vec![0, 1, 2]
    );
    // Bad requests change nothing.
    let e = admin.replace_node(2, 2, &peer, &addr).await.unwrap_err();
    assert_eq!(e.code(), Some(api::ErrorCode::InvalidRequest), "{e}");
    let e = admin
        .replace_node(3, 5, "no-port", &addr)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(api::ErrorCode::InvalidRequest), "{e}");

    // The new node sees itself a voter of every group, in place of node 3, and has applied
    // everything the group's leader has committed.
    wait_for(Duration::from_secs(60), "node 4 to catch up", || {
        let (admin, addr, leader_view) = (&admin, &addr, &cluster.nodes[0].client);
        async move {
            let mine = admin.cluster_status_at(addr).await.ok()?;
            let theirs = admin.cluster_status_at(leader_view).await.ok()?;
            for g in &mine.groups {
                if g.voters != vec![1, 2, 4] {
                    return None;
                }
                let other = theirs.groups.iter().find(|x| x.group_id == g.group_id)?;
                if g.applied_index < other.committed_index {
                    return None;
                }
            }
            (mine.groups.len() == 3).then_some(())
        }
    })
    .await;
    let meta = client.metadata(&[]).await.unwrap();
    let ids: Vec<u64> = meta.nodes.iter().map(|n| n.node_id).collect();
    assert_eq!(ids, vec![1, 2, 4]);
    // The new replica holds every partition whole, from offset 0, like the others (followers
    // learn the last commit with the next heartbeat, hence the bounded wait).
    let replicas = [
        cluster.nodes[0].client.clone(),
        cluster.nodes[1].client.clone(),
        addr.clone(),
    ];
    for p in 0..4u32 {
        let ranges = |p: u32| {
            let replicas = replicas.clone();
            async move {
                let mut out = Vec::new();
                for a in &replicas {
                    let mut range = Vec::new();
                    for ts in [-2, -1] {
                        let r = common::broker(a)
                            .await
                            .list_offsets(api::ListOffsetsRequest {
                                topic: "replace".into(),
                                partition: p,
                                timestamp_ms: ts,
                                allow_follower: true,
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        assert!(r.error.is_none(), "{:?}", r.error);
                        range.push(r.offset);
                    }
                    out.push((range[0], range[1]));
                }
                out
            }
        };
        let last = std::sync::Mutex::new(Vec::new());
        let converged = tokio::time::timeout(
            Duration::from_secs(10),
            // The outer timeout fires first, so the failure shows the last ranges seen.
            wait_for(Duration::from_secs(20), "replicas to agree", || async {
                let r = ranges(p).await;
                let same = r.iter().all(|x| *x == r[0]) && r[0].0 == 0;
                *last.lock().unwrap() = r;
                same.then_some(())
            }),
        )
        .await;
        assert!(
            converged.is_ok(),
            "partition {p}: [log start, high watermark) on nodes 1, 2, 4: {:?}",
            last.lock().unwrap()
        );
    }
    // Node 1 goes too: {2, 4} is a majority of every group.
    cluster.kill(1);
    let survivors = Client::connect([cluster.nodes[1].client.clone(), addr.clone()])
        .await
        .unwrap();
    let producer = survivors.producer(ProducerConfig::default());
    for i in 0..500 {
        let v = format!("after-{i:04}");
        let d = producer
            .send(
                "replace",
                ProducerRecord::new(v.clone()).key(format!("k{i}")),
            )
            .await
            .unwrap()
            .await
            .expect("acknowledged by nodes 2 and 4");
        acked.push((v, d));
    }
    producer.close().await;
    // Every acknowledged record, at its acknowledged offset.
    let mut want: BTreeMap<u32, BTreeMap<i64, String>> = BTreeMap::new();
    for (v, d) in &acked {
        want.entry(d.partition)
            .or_default()
            .insert(d.offset, v.clone());
    }
    for (p, offs) in &want {
        let upto = *offs.keys().last().unwrap() + 1;
        let got: BTreeMap<i64, String> =
            read_partition(&survivors, "replace", *p, StartFrom::Earliest, upto)
                .await
                .into_iter()
                .map(|r| {
                    (
                        r.offset,
                        String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
                    )
                })
                .collect();
        assert_eq!(&got, offs, "partition {p}");
    }
}

/// A node that stops answering without closing its sockets (SIGSTOP; a container cut off
/// behind a port proxy looks the same) holds no client call forever: producer id, produce,
/// consume and admin calls time out on it and go to the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_node_holds_no_client_call_forever() {
    let cluster = Cluster::start(1);
    cluster.wait_balanced().await; // node 1 leads the metadata group, node 2 group 1
    let client = cluster.client().await;
    create_topic(&client, "stall", 1).await;
    produce_all(&client, "stall", 10, now_ms()).await;

    // Node 1 is first in every node list and leads the metadata group.
    cluster.signal(1, "STOP");
    let cfg = runnel_client::ClientConfig {
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let work = async {
        let c = Client::connect_with(cluster.bootstrap(), cfg)
            .await
            .unwrap();
        let producer = c.producer(ProducerConfig {
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        });
        for i in 0..10 {
            producer
                .send("stall", ProducerRecord::new(format!("late-{i}")))
                .await
                .unwrap()
                .await
                .expect("acknowledged without node 1");
        }
        producer.close().await;
        let got = read_partition(&c, "stall", 0, StartFrom::Earliest, 20).await;
        assert_eq!(got.len(), 20);
        c.admin()
            .create_topic("stall-2", TopicSpec::partitions(1))
            .await
            .expect("created without node 1");
    };
    // With 2 s call timeouts this takes about 9 s (a client that waits on the silent node
    // instead takes 30 s and more).
    let r = tokio::time::timeout(Duration::from_secs(25), work).await;
    cluster.signal(1, "CONT");
    assert!(
        r.is_ok(),
        "a call hung on the stopped node\n{}",
        cluster.logs()
    );
}

/// An idempotent producer with five small batches in flight on one partition: every record
/// lands at the offset of its send order, exactly once, though the server runs each request as
/// its own task (which alone would let batches overtake each other).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_batches_land_in_send_order() {
    let cluster = Cluster::start(3);
    let client = cluster.client().await;
    create_topic(&client, "pipelined", 1).await;
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        batch_max_records: 8,
        max_in_flight_per_partition: 5,
        ..ProducerConfig::default()
    });
    const N: usize = 20_000;
    let mut futs = Vec::with_capacity(N);
    for i in 0..N {
        let rec = ProducerRecord::new(format!("p{i:06}")).partition(0);
        futs.push(producer.send("pipelined", rec).await.unwrap());
    }
    for (i, f) in futs.into_iter().enumerate() {
        let d = f.await.expect("acknowledged");
        assert_eq!(d.offset, i as i64, "record {i} out of send order");
        assert!(!d.duplicate, "record {i}");
    }
    producer.close().await;
    let read = read_partition(&client, "pipelined", 0, StartFrom::Earliest, N as i64).await;
    let values: Vec<String> = read
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect();
    let sent: Vec<String> = (0..N).map(|i| format!("p{i:06}")).collect();
    assert_eq!(values, sent);
}
