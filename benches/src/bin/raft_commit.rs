//! Replication load generator: three Runnel Raft hosts on 127.0.0.1 in one process, N partition
//! groups, W concurrent writers per group, each proposing one Kafka v2 batch per write and
//! waiting for its acknowledgement (committed on a majority, each of which fdatasynced it).
//!
//! `cargo run --release -p runnel-benches --bin raft_commit -- --groups 4 --seconds 10`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use runnel_proto::raft as pb;
use runnel_raft::{ApplyResult, HostConfig, RaftHost, WriteError};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(about = "Commit throughput and latency of Runnel's replication on three local nodes")]
struct Args {
    /// Partition groups (one Raft group each, one partition each).
    #[arg(long, default_value_t = 1)]
    groups: u64,
    /// Concurrent writers per group, each with one write in flight.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Records per batch (one batch per write).
    #[arg(long, default_value_t = 16)]
    batch_records: usize,
    /// Bytes per record value.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Segment size of each partition (a roll creates the next segment).
    #[arg(long, default_value_t = 256 << 20)]
    segment_bytes: u64,
    /// Checkpoint after this many entries.
    #[arg(long, default_value_t = 20_000)]
    snapshot_every: u64,
    /// Raft heartbeat period.
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// Measured seconds (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let tmp = runnel_benches::scratch_dir();
    let mut hosts = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        members.insert(id, l.local_addr().expect("addr").to_string());
        let mut cfg = HostConfig::new(id, tmp.path().join(format!("n{id}")));
        if let Some(ms) = std::env::var("EXPERIMENT_HEARTBEAT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            cfg.heartbeat_ms = ms;
        }
        let h = RaftHost::start(cfg, l).await.expect("start");
        hosts.push(Arc::new(h));
    }
    let groups: Vec<u64> = (1..=args.groups).collect();
    for g in &groups {
        for h in &hosts {
            h.open_group(*g).await.expect("open");
        }
        for h in &hosts {
            h.initialize_group(*g, &members).await.expect("init");
        }
    }
    let mut leaders = BTreeMap::new();
    for g in &groups {
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            if let Some(h) = hosts
                .iter()
                .find(|h| h.metrics(*g).is_some_and(|m| m.ready))
            {
                break Arc::clone(h);
            }
            assert!(Instant::now() < deadline, "no leader for group {g}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let spec = pb::PartitionSpec {
            partition_id: *g,
            segment_bytes: args.segment_bytes,
            ..Default::default()
        };
        let create = pb::Command {
            kind: Some(pb::command::Kind::CreatePartition(pb::CreatePartition {
                spec: Some(spec),
            })),
        };
        leader.write(*g, create).await.expect("create partition");
        leaders.insert(*g, leader);
    }
    let leader_nodes: Vec<u64> = leaders.values().map(|h| h.node_id()).collect();
    let batch = runnel_benches::batch_with(args.batch_records, args.record_bytes, 7);
    let batch_bytes = batch.len();
    let start = Instant::now();
    let warm = start + Duration::from_secs(1);
    let end = warm + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for (g, leader) in &leaders {
        for _ in 0..args.writers {
            let (leader, g, batch) = (Arc::clone(leader), *g, batch.clone());
            tasks.push(tokio::spawn(async move {
                let mut hist =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
                let mut writes = 0u64;
                while Instant::now() < end {
                    let cmd = pb::Command {
                        kind: Some(pb::command::Kind::Produce(pb::Produce {
                            partition_id: g,
                            batch: batch.clone(),
                            producer_id: -1,
                            producer_epoch: -1,
                            base_sequence: -1,
                            timestamp_ms: 0,
                        })),
                    };
                    let t = Instant::now();
                    match leader.write(g, cmd).await {
                        Ok(w) => assert!(
                            matches!(w.result, ApplyResult::Produced { .. }),
                            "{:?}",
                            w.result
                        ),
                        Err(WriteError::NotLeader { .. }) => {
                            panic!("leadership moved during the benchmark")
                        }
                        Err(e) => panic!("{e}"),
                    }
                    if t >= warm {
                        hist.record(t.elapsed().as_micros().max(1) as u64)
                            .expect("record");
                        writes += 1;
                    }
                }
                (hist, writes)
            }));
        }
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let mut writes = 0;
    for t in tasks {
        let (h, w) = t.await.expect("writer");
        hist.add(h).expect("merge");
        writes += w;
    }
    let secs = args.seconds as f64;
    let records = writes * args.batch_records as u64;
    println!(
        "groups={} leaders_on_nodes={:?} writers/group={} batch={}x{}B ({} B) | {:.0} writes/s, {:.0} records/s, {:.1} MB/s | commit latency p50={:.2} ms p99={:.2} ms p99.9={:.2} ms max={:.2} ms",
        args.groups,
        leader_nodes,
        args.writers,
        args.batch_records,
        args.record_bytes,
        batch_bytes,
        writes as f64 / secs,
        records as f64 / secs,
        (writes as f64 * batch_bytes as f64) / secs / 1e6,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.value_at_quantile(0.999) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
    );
    for h in &hosts {
        h.shutdown().await;
    }
}
