//! Faults through the harness in `tests/fault`: every link of three real `runneld` processes
//! runs through a proxy the test controls.

use std::time::{Duration, Instant};

use runnel_client::{Client, ClientConfig, ProducerConfig, ProducerRecord, StartFrom, TopicSpec};
use runnel_fault::cluster::FaultCluster;

async fn produce(client: &Client, topic: &str, values: impl Iterator<Item = String>) {
    let producer = client.producer(ProducerConfig {
        request_timeout: Duration::from_secs(2),
        delivery_timeout: Duration::from_secs(60),
        ..Default::default()
    });
    let mut futs = Vec::new();
    for v in values {
        futs.push(producer.send(topic, ProducerRecord::new(v)).await.unwrap());
    }
    for f in futs {
        f.await.expect("acknowledged");
    }
    producer.close().await;
}

/// Scenario 8 in miniature: the leader is cut off from its peers while clients still reach
/// it. The other two elect a leader and take writes; after the heal every acknowledged record
/// is there exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_its_peers_is_replaced_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = FaultCluster::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_runneld")),
        dir.path(),
        1,
        7,
    );
    let cfg = ClientConfig {
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        match Client::connect_with(cluster.bootstrap(), cfg.clone()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "no node answered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    client
        .admin()
        .create_topic("cut", TopicSpec::partitions(1))
        .await
        .unwrap();
    produce(&client, "cut", (0..100).map(|i| format!("before-{i:03}"))).await;
    let leader = client.metadata(&["cut".into()]).await.unwrap().topics[0].partitions[0].leader_id;

    cluster.isolate_from_peers(leader);
    let t = Instant::now();
    produce(&client, "cut", (0..100).map(|i| format!("during-{i:03}"))).await;
    let failover = t.elapsed();
    cluster.heal_all();
    produce(&client, "cut", (0..100).map(|i| format!("after-{i:03}"))).await;

    let mut c = client.consumer(Default::default());
    c.assign("cut", Some(vec![0]), StartFrom::Earliest)
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < 300 {
        for r in c.poll().await.unwrap() {
            got.push((
                r.offset,
                String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
            ));
        }
        assert!(Instant::now() < deadline, "read stalled at {}", got.len());
    }
    let offsets: Vec<i64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (0..300).collect::<Vec<_>>(), "gaps or duplicates");
    let values: Vec<&str> = got.iter().map(|(_, v)| v.as_str()).collect();
    let want: Vec<String> = ["before", "during", "after"]
        .iter()
        .flat_map(|p| (0..100).map(move |i| format!("{p}-{i:03}")))
        .collect();
    assert_eq!(values, want, "every acknowledged record once, in order");
    assert!(
        failover < Duration::from_secs(30),
        "writes took {failover:?} to resume\n{}",
        cluster.log_tails(20)
    );
    eprintln!("failover after cutting node {leader} off: {failover:?}");
}
