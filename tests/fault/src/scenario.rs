//! One run: start a proxied cluster, run the workload while a nemesis injects one scenario's
//! faults on a seeded schedule, heal everything, read every partition from its leader and from
//! each node, and check the history.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runnel_client::{Client, ClientConfig, ConsumerConfig, StartFrom, TopicSpec, api};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::checker::{Report, check};
use crate::cluster::{FaultCluster, Options};
use crate::history::{Fault, FinalRead, History, Recorder};
use crate::workload::{self, TOPIC};

/// The fault scenarios (issue 5's list, in its order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Scenario {
    /// 1. No faults.
    NoFaults,
    /// 2. SIGKILL a group's leader every few seconds, restart it shortly after.
    KillLeader,
    /// 3. SIGKILL random nodes at random times, restart them.
    KillRandom,
    /// 4. SIGKILL all three at once, restart; several times.
    KillAll,
    /// 5. Rolling restart with SIGTERM.
    RollingTerm,
    /// 6. SIGSTOP the leader far longer than the election timeout, then SIGCONT.
    PauseLeader,
    /// 7. SIGSTOP a follower, then resume it.
    PauseFollower,
    /// 8. Cut the leader off from its peers while clients still reach it.
    IsolateLeader,
    /// 9. Majority/minority partitions, and a bridge.
    Partitions,
    /// 10. Cut clients off from the leader while producers retry.
    CutClients,
    /// 11. Random delay and dropped connections on every link.
    Flaky,
    /// 12. Cut the tail of a stopped follower's newest file, restart it.
    Surgery,
    /// 13. SIGKILL consumers between fetching and committing.
    KillConsumers,
    /// 14. Flip bits in one node's committed batches (any field) or, stopped, its manifests.
    BitFlip,
    /// 15. Fill one node's (small, tmpfs) disk, then free it.
    DiskFull,
    /// 16. Step one node's wall clock eight days forward (libfaketime), then back.
    ClockStep,
    /// 17. Delete a stopped node's vote record (`wal.meta`): it must refuse to start.
    LostVote,
    /// The soak: one cycle of a random other scenario after another.
    Rotating,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 17] = [
        Scenario::NoFaults,
        Scenario::KillLeader,
        Scenario::KillRandom,
        Scenario::KillAll,
        Scenario::RollingTerm,
        Scenario::PauseLeader,
        Scenario::PauseFollower,
        Scenario::IsolateLeader,
        Scenario::Partitions,
        Scenario::CutClients,
        Scenario::Flaky,
        Scenario::Surgery,
        Scenario::KillConsumers,
        Scenario::BitFlip,
        Scenario::DiskFull,
        Scenario::ClockStep,
        Scenario::LostVote,
    ];

    /// What the cluster must run with for this scenario's faults.
    pub fn options(self) -> Options {
        match self {
            Scenario::BitFlip => Options {
                checkpoint_interval_ms: Some(3000),
                ..Options::default()
            },
            Scenario::DiskFull => Options {
                disk_mib: Some(256),
                min_free_bytes: Some(24 << 20),
                ..Options::default()
            },
            Scenario::ClockStep => Options {
                fake_clock: true,
                retention_check_ms: 300,
                ..Options::default()
            },
            _ => Options::default(),
        }
    }

    /// Segment size of the workload's topic: small where the faults need sealed segments or
    /// segment rolls on a small disk (the server's minimum, 1 MiB); 0: the cluster default.
    pub fn segment_bytes(self) -> u64 {
        match self {
            Scenario::BitFlip | Scenario::DiskFull | Scenario::ClockStep => 1 << 20,
            _ => 0,
        }
    }

    /// Bytes of padding per record: volume enough to roll 1 MiB segments within a run.
    pub fn record_padding(self) -> usize {
        if self.segment_bytes() > 0 { 2048 } else { 0 }
    }

    /// Whether the rotating soak may pick it: scenarios needing special cluster options run
    /// only on their own.
    fn rotates(self) -> bool {
        self.options().disk_mib.is_none() && !self.options().fake_clock
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The scenario.
    pub scenario: Scenario,
    /// Fixes the fault schedule, the proxies' randomness and the surgery.
    pub seed: u64,
    /// How long the workload and the faults run.
    pub duration: Duration,
    /// The `runneld` binary.
    pub runneld: PathBuf,
    /// Where nodes keep data and logs (and the history, on failure).
    pub dir: PathBuf,
    /// Producers.
    pub producers: u32,
    /// Consumers (each its own group).
    pub consumers: u32,
    /// Partitions of the topic.
    pub partitions: u32,
    /// Data groups.
    pub data_groups: u32,
}

impl RunConfig {
    /// The CI tier's settings for `scenario` with `seed`.
    pub fn new(scenario: Scenario, seed: u64, runneld: &Path, dir: &Path) -> Self {
        RunConfig {
            scenario,
            seed,
            duration: Duration::from_secs(25),
            runneld: runneld.to_path_buf(),
            dir: dir.to_path_buf(),
            producers: 3,
            consumers: 2,
            partitions: 4,
            data_groups: 2,
        }
    }
}

/// A finished run.
#[derive(Debug)]
pub struct Outcome {
    /// The checker's report.
    pub report: Report,
    /// The history.
    pub history: History,
}

struct Nemesis<'a> {
    cluster: &'a mut FaultCluster,
    client: &'a Client,
    rec: &'a Recorder,
    rng: StdRng,
    down: BTreeSet<u64>,
    /// Partitions the node [`Nemesis::leader`] last returned leads.
    led: Vec<u32>,
    /// The one node whose data the bit-flip scenario damages (one faulty replica at a time).
    victim: Option<u64>,
    /// Cycles of the clock-step scenario so far (every other one restarts the stepped node).
    cycles: u32,
}

impl Nemesis<'_> {
    fn note(&self, kind: &str, target: String, faulty: u32, leader_kill: bool) {
        let partitions = if leader_kill {
            self.led.clone()
        } else {
            Vec::new()
        };
        let f = Fault {
            time: self.rec.now(),
            kind: kind.to_string(),
            target,
            faulty_nodes: faulty,
            leader_kill,
            partitions,
        };
        tracing::info!(kind, target = %f.target, "fault");
        self.rec.with(|h| h.faults.push(f));
    }

    async fn sleep_ms(&mut self, lo: u64, hi: u64) {
        let ms = self.rng.random_range(lo..=hi);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// The node leading the most partitions of the topic, as metadata says (None: unknown).
    async fn leader(&mut self) -> Option<u64> {
        let m = tokio::time::timeout(
            Duration::from_secs(3),
            self.client.metadata(&[TOPIC.to_string()]),
        )
        .await
        .ok()?
        .ok()?;
        let mut count: BTreeMap<u64, usize> = BTreeMap::new();
        for p in &m.topics.first()?.partitions {
            if p.leader_id != 0 && self.cluster.is_up(p.leader_id) {
                *count.entry(p.leader_id).or_default() += 1;
            }
        }
        let max = count.values().copied().max()?;
        let best: Vec<u64> = count
            .into_iter()
            .filter(|(_, c)| *c == max)
            .map(|(n, _)| n)
            .collect();
        let l = best[self.rng.random_range(0..best.len())];
        self.led = m.topics[0]
            .partitions
            .iter()
            .filter(|p| p.leader_id == l)
            .map(|p| p.partition)
            .collect();
        Some(l)
    }

    /// Waits until no replica is catching up after a repair; panics (keeping the run) if one
    /// is still at it after `limit` on a cluster with every node up.
    async fn wait_caught_up(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.cluster.catching_up();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicas still catching up after {limit:?}: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn other(&mut self, not: u64) -> u64 {
        let others: Vec<u64> = (1..=3).filter(|n| *n != not).collect();
        others[self.rng.random_range(0..others.len())]
    }

    fn note_flip(&self, node: u64, flip: Option<crate::cluster::Flip>, how: &str) {
        match flip {
            Some(f) => self.note(
                "bit-flip",
                format!(
                    "node {node} ({how}): {} byte {} ({})",
                    f.file.display(),
                    f.position,
                    f.field
                ),
                1,
                false,
            ),
            None => self.note("bit-flip", format!("node {node}: no file yet"), 0, false),
        }
    }

    fn kill(&mut self, id: u64, leader: bool) {
        self.cluster.kill(id);
        self.down.insert(id);
        self.note("kill", format!("node {id}"), self.down.len() as u32, leader);
    }

    fn restart(&mut self, id: u64) {
        self.cluster.restart(id);
        self.down.remove(&id);
        self.note(
            "restart",
            format!("node {id}"),
            self.down.len() as u32,
            false,
        );
    }

    async fn run(&mut self, scenario: Scenario, until: Instant, consumers: &mut Consumers) {
        while Instant::now() < until {
            let s = if scenario == Scenario::Rotating {
                // Every fault scenario (ALL[0] is the fault-free one) the soak's cluster runs.
                let pick: Vec<Scenario> = Scenario::ALL[1..]
                    .iter()
                    .copied()
                    .filter(|s| s.rotates())
                    .collect();
                pick[self.rng.random_range(0..pick.len())]
            } else {
                scenario
            };
            self.step(s, consumers).await;
        }
    }

    /// Restarts nodes whose process exited by itself, as systemd or Kubernetes would, and
    /// records each exit (a node should never stop on its own in these scenarios).
    fn supervise(&mut self) {
        for id in self.cluster.exited() {
            self.note("exited", format!("node {id}"), 1, false);
            self.cluster.restart(id);
        }
    }

    /// Whether node `id` says its storage serves (`ClusterStatus` asked of the node itself).
    async fn storage_serving(&self, id: u64) -> Option<bool> {
        let addr = format!("http://{}", self.cluster.nodes[id as usize - 1].client);
        let call = async {
            let mut a = api::admin_client::AdminClient::connect(addr).await.ok()?;
            let r = a
                .cluster_status(api::ClusterStatusRequest {})
                .await
                .ok()?
                .into_inner();
            r.storage.map(|s| s.serving)
        };
        tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .ok()
            .flatten()
    }

    /// One cycle of scenario `s`'s faults: inject, wait, heal.
    async fn step(&mut self, s: Scenario, consumers: &mut Consumers) {
        self.supervise();
        {
            match s {
                Scenario::Rotating => unreachable!("a rotation picks a concrete scenario"),
                Scenario::NoFaults => tokio::time::sleep(Duration::from_millis(500)).await,
                Scenario::KillLeader => {
                    self.sleep_ms(2500, 4000).await;
                    let Some(l) = self.leader().await else { return };
                    self.kill(l, true);
                    self.sleep_ms(1000, 2500).await;
                    self.restart(l);
                }
                Scenario::KillRandom => {
                    self.sleep_ms(1500, 4000).await;
                    let n = self.rng.random_range(1..=3);
                    self.kill(n, false);
                    self.sleep_ms(500, 3000).await;
                    self.restart(n);
                }
                Scenario::KillAll => {
                    self.sleep_ms(3000, 5000).await;
                    for n in 1..=3 {
                        self.kill(n, false);
                    }
                    self.sleep_ms(300, 1500).await;
                    for n in 1..=3 {
                        self.restart(n);
                    }
                }
                Scenario::RollingTerm => {
                    for n in 1..=3 {
                        self.sleep_ms(2000, 3500).await;
                        self.note("term", format!("node {n}"), 1, false);
                        let clean = self.cluster.terminate(n, Duration::from_secs(20));
                        assert!(clean, "node {n} ignored SIGTERM for 20 s");
                        self.restart(n);
                    }
                }
                Scenario::PauseLeader => {
                    self.sleep_ms(2000, 3000).await;
                    let Some(l) = self.leader().await else { return };
                    self.cluster.pause(l);
                    self.note("pause", format!("leader {l}"), 1, true);
                    self.sleep_ms(5000, 7000).await;
                    self.cluster.resume(l);
                    self.note("resume", format!("node {l}"), 0, false);
                }
                Scenario::PauseFollower => {
                    self.sleep_ms(2000, 3000).await;
                    let l = self.leader().await.unwrap_or(1);
                    let f = self.other(l);
                    self.cluster.pause(f);
                    self.note("pause", format!("follower {f}"), 1, false);
                    self.sleep_ms(3000, 5000).await;
                    self.cluster.resume(f);
                    self.note("resume", format!("node {f}"), 0, false);
                }
                Scenario::IsolateLeader => {
                    self.sleep_ms(2000, 3000).await;
                    let Some(l) = self.leader().await else { return };
                    self.cluster.isolate_from_peers(l);
                    self.note("cut", format!("leader {l} from its peers"), 1, true);
                    self.sleep_ms(4000, 6000).await;
                    self.cluster.heal_all();
                    self.note("heal", "every link".into(), 0, false);
                }
                Scenario::Partitions => {
                    self.sleep_ms(2000, 3000).await;
                    let a = self.rng.random_range(1..=3);
                    if self.rng.random_bool(0.5) {
                        self.cluster.isolate_from_peers(a);
                        self.note("cut", format!("node {a} | the other two"), 1, false);
                    } else {
                        let b = self.other(a);
                        self.cluster.cut_between(a, b);
                        self.note(
                            "cut",
                            format!("bridge: {a} x {b}, both see the third"),
                            1,
                            false,
                        );
                    }
                    self.sleep_ms(4000, 6000).await;
                    self.cluster.heal_all();
                    self.note("heal", "every link".into(), 0, false);
                }
                Scenario::CutClients => {
                    self.sleep_ms(2000, 3000).await;
                    let Some(l) = self.leader().await else { return };
                    self.cluster.client_link(l).cut();
                    self.note("cut", format!("clients from leader {l}"), 1, false);
                    self.sleep_ms(3000, 5000).await;
                    self.cluster.heal_all();
                    self.note("heal", "every link".into(), 0, false);
                }
                Scenario::Flaky => {
                    self.sleep_ms(1500, 2500).await;
                    let states: Vec<crate::proxy::LinkState> = self
                        .cluster
                        .links()
                        .map(|_| crate::proxy::LinkState {
                            cut: false,
                            delay: Duration::from_millis(self.rng.random_range(0..=40)),
                            reset_per_mille: self.rng.random_range(0..=20),
                        })
                        .collect();
                    for (l, s) in self.cluster.links().zip(states) {
                        l.set(s);
                    }
                    self.note("flaky", "every link".into(), 3, false);
                    self.sleep_ms(4000, 6000).await;
                    self.cluster.heal_all();
                    self.note("heal", "every link".into(), 0, false);
                }
                Scenario::Surgery => {
                    self.sleep_ms(2500, 4000).await;
                    // A repaired replica is faulty until it has re-replicated what it lost:
                    // damaging a second one first is two faults at once, beyond what three
                    // replicas survive (the group would wait, rightly, for an operator).
                    self.wait_caught_up(Duration::from_secs(30)).await;
                    let l = self.leader().await.unwrap_or(1);
                    let f = self.other(l);
                    self.kill(f, false);
                    match self.cluster.cut_newest_file(f, &mut self.rng) {
                        Some(s) => self.note(
                            "surgery",
                            format!(
                                "{}: {} of {} bytes cut",
                                s.file.display(),
                                s.cut,
                                s.len_before
                            ),
                            1,
                            false,
                        ),
                        None => self.note("surgery", format!("node {f}: no file"), 1, false),
                    }
                    self.restart(f);
                }
                Scenario::KillConsumers => {
                    self.sleep_ms(1500, 3000).await;
                    let c = self.rng.random_range(0..consumers.tasks.len());
                    consumers.kill_and_restart(c);
                    self.note("consumer-kill", format!("consumer {c}"), 0, false);
                }
                Scenario::BitFlip => {
                    self.sleep_ms(2000, 3500).await;
                    // One damaged replica at a time: damage to two copies of the same bytes
                    // before either is repaired is a double fault.
                    self.wait_caught_up(Duration::from_secs(30)).await;
                    let v = match self.victim {
                        Some(v) => v,
                        None => *self.victim.insert(self.rng.random_range(1..=3)),
                    };
                    if self.rng.random_bool(0.75) {
                        let flip = self.cluster.flip_batch_bit(v, &mut self.rng);
                        self.note_flip(v, flip, "running");
                    } else {
                        self.kill(v, false);
                        let flip = self.cluster.flip_manifest_bit(v, &mut self.rng);
                        self.note_flip(v, flip, "stopped");
                        self.restart(v);
                    }
                }
                Scenario::DiskFull => {
                    self.sleep_ms(2000, 3000).await;
                    let n = self.rng.random_range(1..=3);
                    let bytes = self.cluster.fill_disk(n);
                    self.note(
                        "disk-full",
                        format!("node {n}: {bytes} bytes of filler"),
                        1,
                        false,
                    );
                    let said = poll_until(Duration::from_secs(10), || async {
                        (self.storage_serving(n).await == Some(false)).then_some(())
                    })
                    .await;
                    if said.is_none() {
                        self.note(
                            "storage-unreported",
                            format!("node {n} kept reporting SERVING on a full disk"),
                            1,
                            false,
                        );
                    }
                    self.sleep_ms(3000, 5000).await;
                    self.cluster.free_disk(n);
                    self.note("heal", format!("node {n}: disk freed"), 0, false);
                    let back = poll_until(Duration::from_secs(30), || async {
                        (self.storage_serving(n).await == Some(true)).then_some(())
                    })
                    .await;
                    if back.is_none() {
                        self.note(
                            "storage-unreported",
                            format!("node {n} did not serve again within 30 s of its disk freed"),
                            1,
                            false,
                        );
                    }
                }
                Scenario::ClockStep => {
                    self.sleep_ms(2000, 3000).await;
                    // The node that decides retention (a leader) or any other.
                    let n = match self.leader().await {
                        Some(l) if self.rng.random_bool(0.7) => l,
                        _ => self.rng.random_range(1..=3),
                    };
                    self.cluster.step_clock(n, "+8d");
                    self.note("clock-step", format!("node {n}: +8 days"), 0, false);
                    self.cycles += 1;
                    if self.cycles % 2 == 1 {
                        // Restarted under the wrong clock, the node takes it as its baseline
                        // (its own step guard sees nothing): only the other clocks stop it.
                        // Make it lead every group while retention runs.
                        self.kill(n, false);
                        self.restart(n);
                        poll_until(Duration::from_secs(20), || async {
                            (self.storage_serving(n).await == Some(true)).then_some(())
                        })
                        .await;
                        for g in 0..=u64::from(self.cluster.data_groups()) {
                            let admin = self.client.admin();
                            let moved = admin.transfer_leader(g, n);
                            let _ = tokio::time::timeout(Duration::from_secs(5), moved).await;
                        }
                        self.note("transfer", format!("every group to node {n}"), 0, false);
                    }
                    self.sleep_ms(4000, 6000).await;
                    self.cluster.step_clock(n, "+0");
                    self.note("clock-step", format!("node {n}: back"), 0, false);
                }
                Scenario::LostVote => {
                    self.sleep_ms(2000, 3000).await;
                    self.wait_caught_up(Duration::from_secs(30)).await;
                    let l = self.leader().await.unwrap_or(1);
                    let f = self.other(l);
                    self.kill(f, false);
                    let Some(meta) = self.cluster.delete_wal_meta(f, &mut self.rng) else {
                        self.restart(f);
                        return;
                    };
                    self.note("lost-vote", meta.display().to_string(), 1, false);
                    self.cluster.restart(f);
                    let exit = self.cluster.wait_exit(f, Duration::from_secs(30));
                    let log = std::fs::read_to_string(&self.cluster.nodes[f as usize - 1].log)
                        .unwrap_or_default();
                    match exit {
                        Some(st) if !st.success() && log.contains("forgot its vote") => {
                            self.note("refused", format!("node {f}: {st}"), 1, false);
                        }
                        other => {
                            self.note(
                                "lost-vote-accepted",
                                format!("node {f} ({other:?})"),
                                1,
                                false,
                            );
                            self.cluster.kill(f);
                        }
                    }
                    self.cluster.restore_wal_meta(&meta);
                    self.restart(f);
                }
            }
        }
    }
}

struct Consumers {
    client: Client,
    rec: Recorder,
    stop: watch::Receiver<bool>,
    partitions: u32,
    tasks: Vec<(u32, JoinHandle<()>)>,
}

impl Consumers {
    fn spawn(&mut self, index: u32, incarnation: u32) -> JoinHandle<()> {
        tokio::spawn(workload::consume(
            self.client.clone(),
            index,
            incarnation,
            self.partitions,
            self.rec.clone(),
            self.stop.clone(),
        ))
    }

    /// Aborts consumer `c` wherever it is (between a fetch and its commit, or anywhere else)
    /// and starts its next incarnation, which resumes at the group's committed offsets.
    fn kill_and_restart(&mut self, c: usize) {
        let (inc, h) = &self.tasks[c];
        h.abort();
        let next = inc + 1;
        let h = self.spawn(c as u32, next);
        self.tasks[c] = (next, h);
    }
}

async fn connect(cluster: &FaultCluster) -> Client {
    let cfg = ClientConfig {
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect_with(cluster.bootstrap(), cfg.clone()).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "no node answered in 60 s: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `limit`.
async fn poll_until<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads `[from, to)` of a partition from one node's own replica.
async fn read_replica(
    addr: &str,
    partition: u32,
    from: i64,
    to: i64,
) -> Option<Vec<(i64, String)>> {
    let mut b = api::broker_client::BrokerClient::connect(format!("http://{addr}"))
        .await
        .ok()?
        .max_decoding_message_size(64 << 20);
    let mut out = Vec::new();
    let mut next = from;
    while next < to {
        let r = b
            .fetch(api::FetchRequest {
                topic: TOPIC.into(),
                partition,
                offset: next,
                max_bytes: 4 << 20,
                max_wait_ms: 0,
                raw: false,
                allow_follower: true,
            })
            .await
            .ok()?
            .into_inner();
        if r.error.is_some() || r.records.is_empty() {
            return None;
        }
        for rec in r.records {
            if rec.offset >= to {
                break;
            }
            next = rec.offset + 1;
            let v = rec.value.map(|v| String::from_utf8_lossy(&v).into_owned());
            out.push((rec.offset, v.unwrap_or_default()));
        }
    }
    Some(out)
}

async fn list_offset(addr: &str, partition: u32, ts: i64, follower: bool) -> Option<i64> {
    let mut b = api::broker_client::BrokerClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    let r = b
        .list_offsets(api::ListOffsetsRequest {
            topic: TOPIC.into(),
            partition,
            timestamp_ms: ts,
            allow_follower: follower,
        })
        .await
        .ok()?
        .into_inner();
    r.error.is_none().then_some(r.offset)
}

/// Runs `cfg` to the end and checks it. Panics only on harness failures (a node that cannot
/// start, a cluster that never recovers after everything healed).
pub async fn run(cfg: &RunConfig) -> Outcome {
    let mut cluster = FaultCluster::start_with(
        &cfg.runneld,
        &cfg.dir,
        cfg.data_groups,
        cfg.seed,
        cfg.scenario.options(),
    );
    let client = connect(&cluster).await;
    let spec = TopicSpec {
        segment_bytes: cfg.scenario.segment_bytes(),
        ..TopicSpec::partitions(cfg.partitions)
    };
    poll_until(Duration::from_secs(60), || async {
        match client.admin().create_topic(TOPIC, spec).await {
            Ok(_) => Some(()),
            Err(e) if e.code() == Some(api::ErrorCode::TopicAlreadyExists) => Some(()),
            Err(_) => None,
        }
    })
    .await
    .expect("topic created");

    let rec = Recorder::default();
    let (stop_tx, stop) = watch::channel(false);
    let producers: Vec<JoinHandle<()>> = (0..cfg.producers)
        .map(|i| {
            tokio::spawn(workload::produce(
                client.clone(),
                i,
                cfg.scenario.record_padding(),
                rec.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut consumers = Consumers {
        client: client.clone(),
        rec: rec.clone(),
        stop: stop.clone(),
        partitions: cfg.partitions,
        tasks: Vec::new(),
    };
    for i in 0..cfg.consumers {
        let h = consumers.spawn(i, 0);
        consumers.tasks.push((0, h));
    }

    let until = Instant::now() + cfg.duration;
    {
        let mut nemesis = Nemesis {
            cluster: &mut cluster,
            client: &client,
            rec: &rec,
            rng: StdRng::seed_from_u64(cfg.seed),
            down: BTreeSet::new(),
            led: Vec::new(),
            victim: None,
            cycles: 0,
        };
        nemesis.run(cfg.scenario, until, &mut consumers).await;
    }

    // Heal everything, let the workload see a healthy cluster for a moment, then stop it.
    cluster.heal_all();
    for id in cluster.exited() {
        rec.with(|h| {
            h.faults.push(Fault {
                time: rec.now(),
                kind: "exited".into(),
                target: format!("node {id}"),
                faulty_nodes: 1,
                leader_kill: false,
                partitions: Vec::new(),
            })
        });
    }
    if cfg.scenario.options().fake_clock {
        for id in 1..=3 {
            cluster.step_clock(id, "+0");
        }
    }
    if cfg.scenario.options().disk_mib.is_some() {
        for id in 1..=3 {
            cluster.free_disk(id);
        }
    }
    for id in 1..=3 {
        if cluster.is_paused(id) {
            cluster.resume(id);
        }
        cluster.restart(id);
    }
    rec.with(|h| {
        h.faults.push(Fault {
            time: rec.now(),
            kind: "heal".into(),
            target: "everything".into(),
            faulty_nodes: 0,
            leader_kill: false,
            partitions: Vec::new(),
        })
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let _ = stop_tx.send(true);
    for p in producers {
        let _ = tokio::time::timeout(Duration::from_secs(30), p).await;
    }
    for (_, c) in consumers.tasks.drain(..) {
        if tokio::time::timeout(Duration::from_secs(10), &mut Box::pin(c))
            .await
            .is_err()
        {
            tracing::warn!("a consumer did not stop");
        }
    }

    // Final reads: every partition from its leader, then from each node's own replica once it
    // has caught up with the leader.
    let mut finals = Vec::new();
    let leader_reader = connect(&cluster).await;
    for p in 0..cfg.partitions {
        let hw = poll_until(Duration::from_secs(60), || async {
            let mut c = leader_reader.consumer(ConsumerConfig::default());
            c.assign(TOPIC, Some(vec![p]), StartFrom::Latest)
                .await
                .ok()?;
            c.position(TOPIC, p)
        })
        .await
        .expect("a leader answers after the heal");
        let mut c = leader_reader.consumer(ConsumerConfig {
            max_wait: Duration::from_millis(200),
            ..Default::default()
        });
        c.assign(TOPIC, Some(vec![p]), StartFrom::Earliest)
            .await
            .expect("assign after the heal");
        let start = c.position(TOPIC, p).unwrap_or(0);
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while c.position(TOPIC, p).unwrap_or(0) < hw {
            assert!(
                Instant::now() < deadline,
                "final read of partition {p} stalled"
            );
            if let Ok(rs) = c.poll().await {
                for r in rs {
                    let v = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default());
                    records.push((r.offset, v.into_owned()));
                }
            }
        }
        finals.push(FinalRead {
            source: "leader".into(),
            partition: p,
            log_start: start,
            high_watermark: hw,
            records,
        });
        for n in &cluster.nodes {
            let addr = n.client.to_string();
            let caught_up = poll_until(Duration::from_secs(60), || {
                let addr = addr.clone();
                async move { (list_offset(&addr, p, -1, true).await? >= hw).then_some(()) }
            })
            .await;
            let nhw = list_offset(&addr, p, -1, true).await.unwrap_or(-1);
            let nstart = list_offset(&addr, p, -2, true).await.unwrap_or(0);
            // A replica that finds damage while serving this read repairs itself and then
            // serves it: keep asking (bounded).
            let records = if caught_up.is_some() {
                poll_until(Duration::from_secs(60), || {
                    let addr = addr.clone();
                    async move { read_replica(&addr, p, nstart, nhw).await }
                })
                .await
                .unwrap_or_default()
            } else {
                Vec::new()
            };
            finals.push(FinalRead {
                source: format!("node-{}", n.id),
                partition: p,
                log_start: nstart,
                high_watermark: nhw,
                records,
            });
        }
    }
    let mut final_commits = Vec::new();
    for i in 0..cfg.consumers {
        let c = leader_reader.consumer(ConsumerConfig::group(format!("consumer-{i}")));
        let parts: Vec<u32> = (0..cfg.partitions).collect();
        if let Ok(m) = c.committed(TOPIC, &parts).await {
            for (p, o) in m {
                final_commits.push((i, p, o));
            }
        }
    }
    rec.with(|h| {
        h.finals = finals;
        h.final_commits = final_commits;
    });
    let history = rec.snapshot();
    let report = check(&history);
    Outcome { report, history }
}
