//! Multi-group replication over real gRPC on 127.0.0.1: three hosts in one process, several
//! groups, writes, failover, restart, idempotent retries, offsets, snapshots and learners.
//! Every wait is on observable state (metrics) with a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use runnel_proto::raft as pb;
use runnel_raft::{ApplyError, ApplyResult, HostConfig, RaftHost, WriteError};
use runnel_record::{BatchBuilder, BatchOptions, RecordBatch};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Node {
    id: u64,
    dir: PathBuf,
    addr: String,
}

/// Running hosts by node id, shared with writer tasks.
type Live = Arc<Mutex<BTreeMap<u64, Arc<RaftHost>>>>;

struct Cluster {
    tmp: tempfile::TempDir,
    nodes: Vec<Node>,
    live: Live,
    groups: Vec<u64>,
    /// Next sequence number per partition for [`Cluster::plain`]'s producer. Per cluster, not
    /// per process: `cargo test` runs every test of this file in one process.
    sequences: Mutex<BTreeMap<u64, i32>>,
}

fn config(id: u64, dir: &std::path::Path) -> HostConfig {
    let mut c = HostConfig::new(id, dir);
    c.heartbeat_ms = 50;
    c.election_timeout_ms = (400, 800);
    c
}

async fn start_host(
    id: u64,
    dir: &std::path::Path,
    addr: &str,
    groups: &[u64],
    cfg: &dyn Fn(u64, &std::path::Path) -> HostConfig,
) -> Arc<RaftHost> {
    let l = TcpListener::bind(addr).await.unwrap();
    let host = RaftHost::start(cfg(id, dir), l).await.unwrap();
    for g in groups {
        host.open_group(*g).await.unwrap();
    }
    Arc::new(host)
}

/// Waits until a running node leads `group` and is ready (applied an entry of its term).
async fn ready_leader(live: &Live, group: u64) -> Arc<RaftHost> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let hosts: Vec<Arc<RaftHost>> = live.lock().unwrap().values().cloned().collect();
        if let Some(h) = hosts
            .into_iter()
            .find(|h| h.metrics(group).is_some_and(|m| m.ready))
        {
            return h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ready leader for group {group}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proposes through whoever leads, retrying until applied or the deadline. Only idempotent
/// commands may be retried after an unknown outcome without risking a duplicate.
async fn write_via(live: &Live, group: u64, cmd: pb::Command) -> ApplyResult {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let leader = ready_leader(live, group).await;
        match leader.write(group, cmd.clone()).await {
            Ok(w) => return w.result,
            Err(
                WriteError::NotLeader { .. }
                | WriteError::Unknown(_)
                | WriteError::Unavailable(_)
                | WriteError::UnknownGroup(_),
            ) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "write to group {group} never succeeded"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Cluster {
    async fn start(groups: &[u64]) -> Cluster {
        Self::start_with(groups, &config).await
    }

    async fn start_with(
        groups: &[u64],
        cfg: &dyn Fn(u64, &std::path::Path) -> HostConfig,
    ) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        let live: Live = Arc::default();
        for id in 1..=3u64 {
            let dir = tmp.path().join(format!("n{id}"));
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            drop(l);
            let host = start_host(id, &dir, &addr, groups, cfg).await;
            live.lock().unwrap().insert(id, host);
            nodes.push(Node { id, dir, addr });
        }
        let c = Cluster {
            tmp,
            nodes,
            live,
            groups: groups.to_vec(),
            sequences: Mutex::default(),
        };
        let members = c.members();
        for g in groups {
            for h in c.running() {
                h.initialize_group(*g, &members).await.unwrap();
            }
        }
        for g in groups {
            c.leader(*g).await;
        }
        c
    }

    fn members(&self) -> BTreeMap<u64, String> {
        self.nodes.iter().map(|n| (n.id, n.addr.clone())).collect()
    }

    fn host(&self, id: u64) -> Arc<RaftHost> {
        self.live
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .expect("running node")
    }

    fn running(&self) -> Vec<Arc<RaftHost>> {
        self.live.lock().unwrap().values().cloned().collect()
    }

    async fn leader(&self, group: u64) -> u64 {
        ready_leader(&self.live, group).await.node_id()
    }

    async fn write(&self, group: u64, cmd: pb::Command) -> ApplyResult {
        write_via(&self.live, group, cmd).await
    }

    /// Waits until every running node has applied everything any of them has applied. The
    /// target comes from the state machines themselves (exact when a write returns), not from
    /// openraft's metrics, which are published a little later.
    async fn converge(&self, group: u64) {
        ready_leader(&self.live, group).await;
        let target = self
            .running()
            .iter()
            .filter_map(|h| {
                h.store(group)
                    .and_then(|s| s.last_applied())
                    .map(|(i, _)| i)
            })
            .max();
        for h in self.running() {
            h.wait_until(group, WAIT, "replica catches up", |m| m.applied >= target)
                .await
                .unwrap();
        }
    }

    async fn stop(&self, id: u64) {
        let h = self.live.lock().unwrap().remove(&id).expect("running");
        h.shutdown().await;
    }

    async fn restart(&self, id: u64) {
        self.restart_with(id, &config).await;
    }

    async fn restart_with(&self, id: u64, cfg: &dyn Fn(u64, &std::path::Path) -> HostConfig) {
        let n = self.nodes.iter().find(|n| n.id == id).unwrap().clone();
        let h = start_host(id, &n.dir, &n.addr, &self.groups, cfg).await;
        // As runneld does with its configured peers.
        let peers = self
            .nodes
            .iter()
            .filter(|p| p.id != id)
            .map(|p| {
                let a = runnel_raft::NodeAddr {
                    addr: p.addr.clone(),
                    client_addr: String::new(),
                };
                (p.id, a)
            })
            .collect();
        h.pin_peers(&peers);
        self.live.lock().unwrap().insert(id, h);
    }

    /// A node other than `not`.
    fn other_than(&self, not: &[u64]) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.id)
            .find(|id| !not.contains(id))
            .unwrap()
    }

    /// Where node `id` keeps group `group`.
    fn group_dir(&self, id: u64, group: u64) -> PathBuf {
        let n = self.nodes.iter().find(|n| n.id == id).unwrap();
        n.dir.join(format!("groups/{group}"))
    }

    /// Waits (bounded) until node `id` no longer catches up after a repair of `group`.
    async fn wait_caught_up(&self, id: u64, group: u64) {
        let h = self.host(id);
        let deadline = tokio::time::Instant::now() + WAIT;
        while h.metrics(group).unwrap().catching_up {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never caught up: {:?}",
                h.metrics(group)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every running replica holds the same bytes of `partition`.
    fn assert_identical(&self, group: u64, partition: u64) {
        let digests: BTreeSet<_> = self
            .running()
            .iter()
            .map(|h| h.store(group).unwrap().digest(partition).unwrap())
            .collect();
        assert_eq!(digests.len(), 1, "{digests:?}");
    }

    /// A produce of `n` records tagged `tag` from this test's idempotent producer (id 1000), so that
    /// `write_via` may retry it after an unknown outcome without ever writing it twice.
    fn plain(&self, partition: u64, tag: &str, n: usize) -> pb::Command {
        let seq = {
            let mut m = self.sequences.lock().unwrap();
            let next = m.entry(partition).or_insert(0);
            let seq = *next;
            *next += n as i32;
            seq
        };
        let o = BatchOptions {
            producer_id: 1000,
            producer_epoch: 0,
            base_sequence: seq,
            ..Default::default()
        };
        produce(partition, batch(tag, n, o), o)
    }

    /// Writes [`Cluster::plain`]'s records and checks that they were appended, not refused.
    async fn produce(&self, group: u64, partition: u64, tag: &str, n: usize) -> (u64, u64, bool) {
        produced(self.write(group, self.plain(partition, tag, n)).await)
    }

    async fn shutdown(self) {
        for h in self.running() {
            h.shutdown().await;
        }
    }
}

fn create(partition: u64) -> pb::Command {
    let spec = pb::PartitionSpec {
        partition_id: partition,
        segment_bytes: 64 * 1024,
        ..Default::default()
    };
    pb::Command {
        kind: Some(pb::command::Kind::CreatePartition(pb::CreatePartition {
            spec: Some(spec),
        })),
    }
}

fn batch(tag: &str, n: usize, opts: BatchOptions) -> Bytes {
    let mut b = BatchBuilder::new(opts);
    for i in 0..n {
        b.append(
            1_700_000_000_000 + i as i64,
            None,
            Some(format!("{tag}/{i}").as_bytes()),
            &[],
        );
    }
    b.build()
}

fn produce(partition: u64, batch: Bytes, opts: BatchOptions) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::Produce(pb::Produce {
            partition_id: partition,
            batch,
            producer_id: opts.producer_id,
            producer_epoch: opts.producer_epoch as i32,
            base_sequence: opts.base_sequence,
            timestamp_ms: 0,
        })),
    }
}

fn produced(r: ApplyResult) -> (u64, u64, bool) {
    match r {
        ApplyResult::Produced {
            base_offset,
            last_offset,
            duplicate,
        } => (base_offset, last_offset, duplicate),
        other => panic!("not produced: {other:?}"),
    }
}

/// Reads every record value of a partition on one node, with its offset.
fn values(h: &RaftHost, group: u64, partition: u64) -> Vec<(u64, String)> {
    let store = h.store(group).unwrap();
    let (hw, start) = store.offsets(partition).unwrap();
    let mut out = Vec::new();
    let mut at = start;
    while at < hw {
        let r = store.read(partition, at, 1 << 20).unwrap();
        for b in RecordBatch::split_all(&r.bytes).unwrap() {
            for rec in b.records().unwrap() {
                let rec = rec.unwrap();
                out.push((
                    rec.offset,
                    String::from_utf8(rec.value.unwrap().to_vec()).unwrap(),
                ));
            }
        }
        at = r.next_offset;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_replicate_to_identical_partitions_across_groups() {
    let c = Cluster::start(&[1, 2]).await;
    for (g, p) in [(1, 10), (1, 11), (2, 20)] {
        assert_eq!(c.write(g, create(p)).await, ApplyResult::Done);
    }
    let mut next = BTreeMap::new();
    for i in 0..60 {
        for (g, p) in [(1u64, 10u64), (1, 11), (2, 20)] {
            // `duplicate` may be true if a retry after a lost acknowledgement hit the dedup table.
            let (base, last, _) = produced(c.write(g, c.plain(p, &format!("{p}-{i}"), 3)).await);
            let want = next.entry(p).or_insert(0u64);
            assert_eq!(
                (base, last),
                (*want, *want + 2),
                "offsets are dense and in order"
            );
            *want += 3;
        }
    }
    for g in [1, 2] {
        c.converge(g).await;
    }
    for (g, p) in [(1, 10), (1, 11), (2, 20)] {
        let digests: BTreeSet<_> = c
            .running()
            .iter()
            .map(|h| h.store(g).unwrap().digest(p).unwrap())
            .collect();
        assert_eq!(
            digests.len(),
            1,
            "replicas of partition {p} differ: {digests:?}"
        );
        assert_eq!(values(&c.host(1), g, p).len(), 180);
        for h in c.running() {
            assert_eq!(h.metrics(g).unwrap().high_watermarks.get(&p), Some(&180));
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_leader_loss_and_restart_exactly_once() {
    let c = Cluster::start(&[1]).await;
    c.write(1, create(7)).await;
    let mut acked: Vec<(u64, String)> = Vec::new();
    for i in 0..30 {
        let tag = format!("a{i}");
        let (base, _, _) = produced(c.write(1, c.plain(7, &tag, 1)).await);
        acked.push((base, format!("{tag}/0")));
    }
    let old = c.leader(1).await;
    c.stop(old).await;
    let new = c.leader(1).await;
    assert_ne!(new, old);
    for i in 30..60 {
        let tag = format!("a{i}");
        let (base, _, _) = produced(c.write(1, c.plain(7, &tag, 1)).await);
        acked.push((base, format!("{tag}/0")));
    }
    // The old leader comes back from its data directory and catches up from WAL and peers.
    c.restart(old).await;
    c.converge(1).await;
    for h in c.running() {
        let got = values(&h, 1, 7);
        assert_eq!(
            got,
            acked,
            "node {} disagrees with the acknowledgements",
            h.node_id()
        );
        let hw = h.store(1).unwrap().offsets(7).unwrap().0;
        assert_eq!(hw, 60);
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_retries_fencing_and_offsets_survive_leader_change_and_restart() {
    let c = Cluster::start(&[1]).await;
    c.write(1, create(3)).await;
    let opts = |epoch: i16, seq: i32| BatchOptions {
        producer_id: 42,
        producer_epoch: epoch,
        base_sequence: seq,
        ..Default::default()
    };
    // Producer 42's batch of `n` records tagged `tag`, with the given epoch and first sequence.
    let idem = |tag: &str, n: usize, epoch: i16, seq: i32| {
        produce(3, batch(tag, n, opts(epoch, seq)), opts(epoch, seq))
    };
    let first = c.write(1, idem("p0", 2, 0, 0)).await;
    assert_eq!(produced(first.clone()), (0, 1, false));
    // A retry of the same batch returns the original offsets, flagged as a duplicate.
    let retry = c.write(1, idem("p0", 2, 0, 0)).await;
    assert_eq!(produced(retry), (0, 1, true));
    // A gap in the sequence is refused, and nothing is written.
    let gap = c.write(1, idem("p2", 1, 0, 5)).await;
    assert!(
        matches!(gap, ApplyResult::Refused(ApplyError::OutOfOrderSequence, _)),
        "{gap:?}"
    );
    assert_eq!(
        produced(c.write(1, idem("p1", 1, 0, 2)).await),
        (2, 2, false)
    );
    // Leadership moves; the retry is still recognised.
    let old = c.leader(1).await;
    let to = c.other_than(&[old]);
    c.host(old).transfer_leader(1, to).await.unwrap();
    c.host(to)
        .wait_until(1, WAIT, "transfer", |m| m.ready)
        .await
        .unwrap();
    let retry = c.write(1, idem("p1", 1, 0, 2)).await;
    assert_eq!(produced(retry), (2, 2, true));
    // A new epoch fences the old one.
    assert_eq!(
        produced(c.write(1, idem("e1", 1, 1, 0)).await),
        (3, 3, false)
    );
    let fenced = c.write(1, idem("late", 1, 0, 3)).await;
    assert!(
        matches!(fenced, ApplyResult::Refused(ApplyError::FencedProducer, _)),
        "{fenced:?}"
    );
    // Consumer offsets: stored, compare-and-set, bounded by the high watermark.
    let commit = |next: u64, expected: Option<u64>| pb::Command {
        kind: Some(pb::command::Kind::CommitOffsets(pb::CommitOffsets {
            consumer_group: "billing".into(),
            partition_id: 3,
            next_offset: next,
            expected_previous: expected,
            ..Default::default()
        })),
    };
    assert_eq!(
        c.write(1, commit(2, None)).await,
        ApplyResult::OffsetCommitted
    );
    assert!(matches!(
        c.write(1, commit(3, Some(1))).await,
        ApplyResult::Refused(ApplyError::OffsetConflict, _)
    ));
    assert_eq!(
        c.write(1, commit(4, Some(2))).await,
        ApplyResult::OffsetCommitted
    );
    assert!(matches!(
        c.write(1, commit(99, None)).await,
        ApplyResult::Refused(ApplyError::OffsetOutOfRange, _)
    ));
    // Checkpoint, then restart every node: tables, offsets and the high watermark come back.
    let leader = c.leader(1).await;
    c.host(leader).checkpoint(1).await.unwrap();
    c.host(leader)
        .wait_until(1, WAIT, "checkpoint", |m| m.snapshot.is_some())
        .await
        .unwrap();
    c.converge(1).await;
    let hw_before: BTreeMap<u64, u64> = c
        .running()
        .iter()
        .map(|h| (h.node_id(), h.store(1).unwrap().offsets(3).unwrap().0))
        .collect();
    for id in [1, 2, 3] {
        c.stop(id).await;
    }
    for id in [1, 2, 3] {
        c.restart(id).await;
        // Straight after open, before every peer is back: never an older high watermark.
        let hw = c.host(id).store(1).unwrap().offsets(3).unwrap().0;
        assert!(
            hw >= hw_before[&id],
            "node {id}: high watermark {hw} < {} before restart",
            hw_before[&id]
        );
    }
    c.leader(1).await;
    c.converge(1).await;
    for h in c.running() {
        let s = h.store(1).unwrap();
        assert_eq!(
            s.committed_offset("billing", 3),
            Some(4),
            "node {}",
            h.node_id()
        );
        assert_eq!(s.offsets(3).unwrap().0, 4, "high watermark after restart");
    }
    let retry = c.write(1, idem("e1", 1, 1, 0)).await;
    assert_eq!(
        produced(retry),
        (3, 3, true),
        "dedup table survives restart"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_mid_stream_loses_and_duplicates_nothing() {
    let c = Cluster::start(&[1]).await;
    c.write(1, create(5)).await;
    let live = Arc::clone(&c.live);
    // An idempotent producer writing without pause; it retries every failure with the same
    // sequence number, so an unknown outcome can never turn into a duplicate.
    let writer = tokio::spawn(async move {
        let mut acked = Vec::new();
        for seq in 0..150i32 {
            let o = BatchOptions {
                producer_id: 9,
                producer_epoch: 0,
                base_sequence: seq,
                ..Default::default()
            };
            let (base, _, _) =
                produced(write_via(&live, 1, produce(5, batch(&format!("m{seq}"), 1, o), o)).await);
            acked.push((base, format!("m{seq}/0")));
        }
        acked
    });
    let leader = c.leader(1).await;
    c.host(leader)
        .wait_until(1, WAIT, "writes in flight", |m| {
            m.applied.unwrap_or(0) >= 40
        })
        .await
        .unwrap();
    c.stop(leader).await;
    let acked = writer.await.unwrap();
    assert_eq!(acked.len(), 150);
    assert_ne!(c.leader(1).await, leader, "a new leader took over");
    c.restart(leader).await;
    c.converge(1).await;
    for h in c.running() {
        assert_eq!(
            values(&h, 1, 5),
            acked,
            "node {}: every acked write once, at its offset",
            h.node_id()
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_that_cannot_commit_ends_when_its_leader_stops() {
    let c = Cluster::start(&[1]).await;
    c.write(1, create(7)).await;
    let leader = c.leader(1).await;
    let host = c.host(leader);
    for id in [1, 2, 3] {
        if id != leader {
            c.stop(id).await;
        }
    }
    // No quorum: the write is queued in the leader's log and can never commit.
    let pending = host.propose(1, c.plain(7, "stranded", 1)).await.unwrap();
    let pending = tokio::spawn(pending);
    c.stop(leader).await;
    let r = tokio::time::timeout(WAIT, pending)
        .await
        .expect("the write ended once its group stopped")
        .unwrap();
    assert!(matches!(r, Err(WriteError::Unknown(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torn_wal_tail_is_cut_and_the_node_catches_up() {
    let c = Cluster::start(&[1]).await;
    c.write(1, create(6)).await;
    for i in 0..20 {
        c.produce(1, 6, &format!("t{i}"), 2).await;
    }
    let leader = c.leader(1).await;
    let victim = c.other_than(&[leader]);
    c.converge(1).await;
    c.stop(victim).await;
    // A crash mid-append: half a record after the last whole one.
    let wal_dir = c
        .nodes
        .iter()
        .find(|n| n.id == victim)
        .unwrap()
        .dir
        .join("groups/1/wal");
    let mut wals: Vec<_> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    wals.sort();
    let newest = wals.pop().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&newest)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0x5a; 37]).unwrap();
    drop(f);
    for i in 20..40 {
        c.produce(1, 6, &format!("t{i}"), 2).await;
    }
    c.restart(victim).await;
    let rec = c.host(victim).wal_recovery(1).unwrap();
    assert_eq!(rec.torn_bytes_cut, 37, "{rec:?}");
    c.converge(1).await;
    let digests: BTreeSet<_> = c
        .running()
        .iter()
        .map(|h| h.store(1).unwrap().digest(6).unwrap())
        .collect();
    assert_eq!(digests.len(), 1);
    assert_eq!(values(&c.host(victim), 1, 6).len(), 80);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wiped_follower_rejoins_under_a_new_id_by_snapshot_then_votes() {
    let cfg = |id: u64, dir: &std::path::Path| {
        let mut c = config(id, dir);
        c.snapshot_every_entries = 40;
        c.log_entries_kept = 0;
        c
    };
    let c = Cluster::start_with(&[1], &cfg).await;
    c.write(1, create(8)).await;
    for i in 0..100 {
        c.produce(1, 8, &format!("s{i}"), 3).await;
    }
    let leader = c.leader(1).await;
    let lh = c.host(leader);
    lh.checkpoint(1).await.unwrap();
    lh.wait_until(1, WAIT, "log purged behind a checkpoint", |m| {
        m.purged.is_some_and(|p| p > 50)
    })
    .await
    .unwrap();
    // Node `victim` loses its disk; it comes back as node 4 (ids are never reused).
    let victim = c.other_than(&[leader]);
    c.stop(victim).await;
    std::fs::remove_dir_all(&c.nodes.iter().find(|n| n.id == victim).unwrap().dir).unwrap();
    let dir4 = c.tmp.path().join("n4");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr4 = l.local_addr().unwrap().to_string();
    drop(l);
    let h4 = start_host(4, &dir4, &addr4, &[1], &cfg).await;
    c.live.lock().unwrap().insert(4, Arc::clone(&h4));
    lh.add_learner(1, 4, &addr4).await.unwrap();
    let m4 = h4
        .wait_until(1, WAIT, "learner caught up", |m| {
            m.applied >= lh.metrics(1).unwrap().applied
        })
        .await
        .unwrap();
    assert!(
        m4.snapshot.is_some(),
        "the learner must have installed a snapshot: {m4:?}"
    );
    let voters: BTreeSet<u64> = c
        .nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != victim)
        .chain([4])
        .collect();
    lh.change_voters(1, voters.clone()).await.unwrap();
    h4.wait_until(1, WAIT, "voter", |m| m.voters == voters)
        .await
        .unwrap();
    for i in 100..110 {
        c.produce(1, 8, &format!("s{i}"), 3).await;
    }
    c.converge(1).await;
    let digests: BTreeSet<_> = c
        .running()
        .iter()
        .map(|h| h.store(1).unwrap().digest(8).unwrap())
        .collect();
    assert_eq!(digests.len(), 1, "{digests:?}");
    assert_eq!(values(&h4, 1, 8).len(), 330);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_group_and_malformed_requests_get_typed_errors() {
    let c = Cluster::start(&[1]).await;
    let addr = c.nodes[0].addr.clone();
    let mut client =
        pb::raft_transport_client::RaftTransportClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
    let vote = pb::Vote {
        leader_id: Some(pb::LeaderId {
            term: 1,
            node_id: 2,
        }),
        committed: false,
    };
    let req = pb::VoteRequest {
        group_id: 99,
        vote: Some(vote),
        ..Default::default()
    };
    let err = client.vote(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("unknown raft group 99"),
        "{}",
        err.message()
    );
    // A vote without its leader id is refused as invalid, not a panic.
    let err = client
        .vote(pb::VoteRequest {
            group_id: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let bad_entry = pb::AppendEntriesRequest {
        group_id: 1,
        vote: Some(pb::Vote {
            leader_id: Some(pb::LeaderId {
                term: 0,
                node_id: 1,
            }),
            committed: true,
        }),
        entries: vec![pb::Entry {
            log_id: None,
            payload: None,
        }],
        ..Default::default()
    };
    let err = client.append_entries(bad_entry).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // The group is unharmed.
    c.write(1, create(1)).await;
    c.shutdown().await;
}

/// Cuts the newest file with extension `ext` under `dir` to half of its data (files may be
/// preallocated: trailing zeros are not data). Returns the file.
fn cut_newest_in_half(dir: &std::path::Path, ext: &str) -> PathBuf {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    let newest = files.pop().unwrap();
    let bytes = std::fs::read(&newest).unwrap();
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
    assert!(
        end > 64,
        "{} holds too little data ({end} bytes)",
        newest.display()
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    f.set_len(end as u64 / 2).unwrap();
    f.sync_all().unwrap();
    newest
}

/// A follower whose WAL (and, with `cut_segment`, its newest partition segment, which its
/// checkpoint shares) lost committed data opens, refuses to vote while it lacks entries a
/// quorum may have counted on it for, then re-replicates and ends identical to the others.
async fn damaged_follower_repairs_from_the_others(cut_segment: bool) {
    let cfg = |id: u64, dir: &std::path::Path| {
        let mut c = config(id, dir);
        c.snapshot_every_entries = 30;
        c.log_entries_kept = 5;
        c
    };
    let c = Cluster::start_with(&[1], &cfg).await;
    c.write(1, create(6)).await;
    for i in 0..60 {
        c.produce(1, 6, &format!("r{i}"), 2).await;
    }
    let leader = c.leader(1).await;
    let victim = c.other_than(&[leader]);
    let other = c.other_than(&[leader, victim]);
    c.converge(1).await;
    let vdir = c.group_dir(victim, 1);
    for id in [victim, leader, other] {
        c.stop(id).await;
    }
    cut_newest_in_half(&vdir.join("wal"), "wal");
    if cut_segment {
        cut_newest_in_half(&vdir.join("partitions/p6"), "log");
    }
    // Without repair the damage is refused.
    let l = TcpListener::bind(&c.nodes.iter().find(|n| n.id == victim).unwrap().addr)
        .await
        .unwrap();
    let mut strict = cfg(
        victim,
        &c.nodes.iter().find(|n| n.id == victim).unwrap().dir,
    );
    strict.repair_from_replicas = false;
    let h = RaftHost::start(strict, l).await.unwrap();
    let err = h.open_group(1).await.unwrap_err().to_string();
    assert!(
        err.contains("corrupt") || err.contains("damaged") || err.contains("missing"),
        "{err}"
    );
    h.shutdown().await;
    drop(h);
    // The repaired node and one healthy node: the healthy one cannot win the repaired one's
    // vote, so no leader for many election timeouts (400–800 ms each).
    c.restart_with(victim, &cfg).await;
    let vh = c.host(victim);
    let rec = vh.wal_recovery(1).unwrap();
    assert_eq!(
        rec.repaired
            .as_ref()
            .and_then(|r| r.committed_before)
            .map(|i| i > 50),
        Some(true),
        "{rec:?}"
    );
    let damage = vh.store(1).unwrap().damage_at_open().cloned();
    assert_eq!(damage.is_some(), cut_segment, "{damage:?}");
    // What was cut or dropped is kept aside, not deleted.
    let kept = |d: &std::path::Path, prefix: &str| {
        std::fs::read_dir(d)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(prefix))
    };
    assert!(kept(&vdir.join("wal"), "damaged-"));
    assert_eq!(kept(&vdir, "damaged-checkpoints-"), cut_segment);
    c.restart_with(other, &cfg).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < deadline {
        for h in c.running() {
            let m = h.metrics(1).unwrap();
            assert!(
                m.leader.is_none() || m.term == 0 || !m.ready,
                "elected without the repaired node's lost entries: {m:?}"
            );
        }
        assert!(c.host(victim).metrics(1).unwrap().catching_up);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The third node returns: a leader with every entry, the repaired node catches up.
    c.restart_with(leader, &cfg).await;
    for i in 60..70 {
        c.produce(1, 6, &format!("r{i}"), 2).await;
    }
    c.converge(1).await;
    c.wait_caught_up(victim, 1).await;
    c.assert_identical(1, 6);
    assert_eq!(values(&vh, 1, 6).len(), 140);
    // Caught up, it votes again: with the old leader gone, it and the other elect a leader.
    let old = c.leader(1).await;
    c.stop(old).await;
    for i in 70..75 {
        c.produce(1, 6, &format!("r{i}"), 2).await;
    }
    c.converge(1).await;
    assert_eq!(values(&c.host(victim), 1, 6).len(), 150);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_with_a_wal_cut_below_committed_repairs_from_the_others() {
    damaged_follower_repairs_from_the_others(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_with_a_cut_wal_and_segment_repairs_from_the_others() {
    damaged_follower_repairs_from_the_others(true).await;
}

/// The scenario-12 shape: the leader stays up while a follower's WAL and newest segment are
/// cut below what it acknowledged. The leader must not take the shorter log for a bug (it
/// would stop): the repaired follower tells it first, then re-replicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_leader_re_replicates_to_a_follower_that_lost_acknowledged_entries() {
    let c = Cluster::start(&[1]).await;
    c.write(1, create(6)).await;
    for i in 0..40 {
        c.produce(1, 6, &format!("l{i}"), 2).await;
    }
    let leader = c.leader(1).await;
    let victim = c.other_than(&[leader]);
    c.converge(1).await;
    c.stop(victim).await;
    let vdir = c.group_dir(victim, 1);
    cut_newest_in_half(&vdir.join("wal"), "wal");
    c.restart(victim).await;
    assert!(c.host(victim).wal_recovery(1).unwrap().repaired.is_some());
    for i in 40..50 {
        c.produce(1, 6, &format!("l{i}"), 2).await;
    }
    c.converge(1).await;
    let vh = c.host(victim);
    c.wait_caught_up(victim, 1).await;
    // The same leader served throughout: it never stopped over the shorter log.
    assert_eq!(c.leader(1).await, leader);
    c.assert_identical(1, 6);
    assert_eq!(values(&vh, 1, 6).len(), 100);
    c.shutdown().await;
}

/// A leader whose WAL loses acknowledged entries while it is down must not resume leading
/// from its saved vote when it comes back (before the others time out): it would hand out
/// indexes the others already hold with other entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_that_lost_acknowledged_entries_does_not_resume_leading() {
    let slow = |id: u64, dir: &std::path::Path| {
        let mut c = config(id, dir);
        c.election_timeout_ms = (3000, 4000); // room to restart before the others campaign
        c
    };
    let c = Cluster::start_with(&[1], &slow).await;
    c.write(1, create(6)).await;
    for i in 0..40 {
        c.produce(1, 6, &format!("v{i}"), 2).await;
    }
    c.converge(1).await;
    let leader = c.leader(1).await;
    let term = c.host(leader).metrics(1).unwrap().term;
    c.stop(leader).await;
    let ldir = c.group_dir(leader, 1);
    cut_newest_in_half(&ldir.join("wal"), "wal");
    c.restart_with(leader, &slow).await;
    let m = c.host(leader).metrics(1).unwrap();
    assert!(m.catching_up, "{m:?}");
    assert!(
        !(m.leader == Some(leader) && m.term == term),
        "resumed leading: {m:?}"
    );
    for i in 40..50 {
        c.produce(1, 6, &format!("v{i}"), 2).await;
    }
    assert_ne!(c.leader(1).await, leader);
    c.converge(1).await;
    c.wait_caught_up(leader, 1).await;
    c.assert_identical(1, 6);
    for h in c.running() {
        assert_eq!(values(&h, 1, 6).len(), 100);
    }
    c.shutdown().await;
}

/// Flips one bit at `at` in `path`.
fn flip_bit(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
}

/// Byte position of the `n`th batch (from 0) of a segment file.
fn batch_position(segment: &std::path::Path, n: usize) -> u64 {
    let bytes = std::fs::read(segment).unwrap();
    let mut pos = 0usize;
    for _ in 0..n {
        let len = u32::from_be_bytes(bytes[pos + 8..pos + 12].try_into().unwrap()) as usize;
        pos += 12 + len;
        assert!(pos < bytes.len(), "{} has fewer batches", segment.display());
    }
    pos as u64
}

/// A three-node group with partition 6 spread over several sealed segments, checkpointed on
/// every node with its log purged behind the checkpoint.
async fn checkpointed_cluster() -> Cluster {
    let cfg = |id: u64, dir: &std::path::Path| {
        let mut c = config(id, dir);
        c.snapshot_every_entries = 30;
        c.log_entries_kept = 5;
        c
    };
    let c = Cluster::start_with(&[1], &cfg).await;
    c.write(1, create(6)).await;
    for i in 0..60 {
        c.produce(1, 6, &format!("r{i}"), 100).await;
    }
    c.converge(1).await;
    for h in c.running() {
        h.checkpoint(1).await.unwrap();
    }
    c
}

/// Damage outside the batch CRC in a sealed, checkpointed segment, found by a read on a
/// follower: reported (logged, counted, signalled), and reopening the group with verification
/// drops the damaged checkpoint and rebuilds the replica from the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn damage_found_while_serving_is_reported_and_repaired_by_reopening() {
    let c = checkpointed_cluster().await;
    let leader = c.leader(1).await;
    let victim = c.other_than(&[leader]);
    let vh = c.host(victim);
    let seg = c
        .group_dir(victim, 1)
        .join("partitions/p6")
        .join(format!("{:020}.log", 0));
    flip_bit(&seg, batch_position(&seg, 2) + 7); // baseOffset's low byte
    let store = vh.store(1).unwrap();
    let (hw, _) = store.offsets(6).unwrap();
    let mut at = 0;
    let err = loop {
        match store.read(6, at, 1 << 20) {
            Ok(r) => {
                assert!(r.next_offset > at && at < hw, "damage served as data");
                at = r.next_offset;
            }
            Err(e) => break e,
        }
    };
    assert!(err.to_string().contains("baseOffset"), "{err}");
    assert!(store.damage_found().borrow().is_some());
    assert_eq!(store.damage_count(), 1);
    vh.restart_group(1, true, "test: damage found")
        .await
        .unwrap();
    assert_eq!(vh.store(1).unwrap().damage_count(), 0, "a new store");
    for i in 60..70 {
        c.produce(1, 6, &format!("r{i}"), 100).await;
    }
    c.converge(1).await;
    c.wait_caught_up(victim, 1).await;
    c.assert_identical(1, 6);
    assert_eq!(values(&c.host(victim), 1, 6).len(), 7000);
    c.shutdown().await;
}

/// A leader whose checkpoint file changed on disk after the checkpoint vouched for it never
/// ships it: a new replica that needs the snapshot gets nothing damaged, the leader reports
/// the damage, and once it is reopened a healthy replica brings everyone to identical data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_sender_never_ships_a_file_that_no_longer_matches_its_crc() {
    let c = checkpointed_cluster().await;
    let leader = c.leader(1).await;
    let lh = c.host(leader);
    lh.wait_until(1, WAIT, "log purged behind a checkpoint", |m| {
        m.purged.is_some_and(|p| p > 40)
    })
    .await
    .unwrap();
    let ck_root = c.group_dir(leader, 1).join("checkpoints");
    let id = std::fs::read_to_string(ck_root.join("CURRENT")).unwrap();
    let seg = ck_root
        .join(id.trim())
        .join("p6")
        .join(format!("{:020}.log", 0));
    flip_bit(&seg, batch_position(&seg, 1) + 80); // inside the records
    let mut found = lh.store(1).unwrap().damage_found();
    // A new replica (node 4) can only catch up by snapshot.
    let dir4 = c.tmp.path().join("n4");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr4 = l.local_addr().unwrap().to_string();
    drop(l);
    let h4 = start_host(4, &dir4, &addr4, &[1], &config).await;
    c.live.lock().unwrap().insert(4, Arc::clone(&h4));
    let adding = {
        let (lh, addr4) = (Arc::clone(&lh), addr4.clone());
        tokio::spawn(async move { lh.add_learner(1, 4, &addr4).await })
    };
    tokio::time::timeout(WAIT, found.wait_for(|d| d.is_some()))
        .await
        .expect("the sender reports the damage")
        .unwrap();
    assert!(
        h4.store(1).unwrap().offsets(6).is_none(),
        "a damaged snapshot was installed"
    );
    // Reopened, the damaged leader gives way; a healthy replica serves everyone.
    tokio::time::timeout(WAIT, lh.restart_group(1, true, "test: damage found"))
        .await
        .expect("the group reopens")
        .unwrap();
    adding.abort();
    let new_leader = ready_leader(&c.live, 1).await;
    assert_ne!(new_leader.node_id(), leader);
    tokio::time::timeout(WAIT, new_leader.add_learner(1, 4, &addr4))
        .await
        .unwrap_or_else(|_| panic!("learner never caught up: {:?}", h4.metrics(1)))
        .unwrap();
    c.produce(1, 6, "after", 100).await;
    c.converge(1).await;
    c.wait_caught_up(leader, 1).await;
    c.assert_identical(1, 6);
    assert_eq!(values(&h4, 1, 6).len(), 6100);
    c.shutdown().await;
}

/// Retention is a replicated decision: a replica's own clock finds records due, but only a
/// `TrimLog` through Raft moves the log start, and then on every replica alike, even inside a
/// segment; a restart from the checkpoint keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_moves_the_log_start_on_every_replica_alike() {
    let c = checkpointed_cluster().await;
    let leader = c.leader(1).await;
    let follower = c.other_than(&[leader]);
    let fstore = c.host(follower).store(1).unwrap();
    // Eight days ahead on one replica: it would delete, but deciding changes nothing.
    let ahead = 1_700_000_000_000 + 8 * 24 * 3600 * 1000;
    let proposals = fstore.retention_proposals(ahead);
    assert_eq!(proposals.len(), 1, "{proposals:?}");
    assert!(
        c.running()
            .iter()
            .all(|h| { h.store(1).unwrap().offsets(6).unwrap().1 == 0 })
    );
    // Inside a segment (a batch boundary: every batch holds 100 records).
    let start = proposals[0].log_start + 300;
    let trim = pb::Command {
        kind: Some(pb::command::Kind::TrimLog(pb::TrimLog {
            partition_id: 6,
            log_start: start,
            reason: "test".into(),
        })),
    };
    c.write(1, trim).await;
    c.converge(1).await;
    for h in c.running() {
        assert_eq!(
            h.store(1).unwrap().offsets(6).unwrap().1,
            start,
            "node {}",
            h.node_id()
        );
    }
    c.assert_identical(1, 6);
    for h in c.running() {
        h.checkpoint(1).await.unwrap();
    }
    c.stop(follower).await;
    c.restart(follower).await;
    c.converge(1).await;
    assert_eq!(
        c.host(follower).store(1).unwrap().offsets(6).unwrap().1,
        start
    );
    assert_eq!(values(&c.host(follower), 1, 6).len() as u64, 6000 - start);
    c.shutdown().await;
}
