//! Faults through the harness in `tests/fault`: every link of three real `runneld` processes
//! runs through a proxy the test controls.

use std::time::{Duration, Instant};

use runnel_client::{Client, ClientConfig, ProducerConfig, ProducerRecord, StartFrom, TopicSpec};
use runnel_fault::cluster::FaultCluster;

/// Fault tests run one at a time and alone: their timing checks (writes resume within 5 s of a
/// heal) fail when other clusters load the cores. nextest runs each in its own process under a
/// test group that takes every thread (`.config/nextest.toml`); under `cargo test`, which runs
/// the tests of this file as threads of one process, this lock does the same.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// A client of `cluster`, once a node answers (bounded).
async fn connect(cluster: &FaultCluster) -> Client {
    let cfg = ClientConfig {
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect_with(cluster.bootstrap(), cfg.clone()).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(Instant::now() < deadline, "no node answered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The first `n` records (offset, value) of partition 0 of `topic`, read from the start
/// (bounded).
async fn read_from_start(client: &Client, topic: &str, n: usize) -> Vec<(i64, String)> {
    let mut c = client.consumer(Default::default());
    c.assign(topic, Some(vec![0]), StartFrom::Earliest)
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < n {
        for r in c.poll().await.unwrap() {
            got.push((
                r.offset,
                String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
            ));
        }
        assert!(Instant::now() < deadline, "read stalled at {}", got.len());
    }
    got
}

/// Scenario 8 in miniature: the leader is cut off from its peers while clients still reach
/// it. The other two elect a leader and take writes; after the heal every acknowledged record
/// is there exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_its_peers_is_replaced_and_nothing_is_lost() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = FaultCluster::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_runneld")),
        dir.path(),
        1,
        7,
    );
    let client = connect(&cluster).await;
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

    let got = read_from_start(&client, "cut", 300).await;
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

mod scenarios {
    use std::path::Path;
    use std::time::Duration;

    use runnel_fault::scenario::{RunConfig, Scenario, run};

    /// A number from the environment; a value that does not parse is an error, never ignored.
    fn env_number(name: &str) -> Option<u64> {
        let v = std::env::var(name).ok()?;
        Some(
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        )
    }

    /// The seed for a scenario: `RUNNEL_FAULT_SEED` when set (to replay a failure), else a
    /// fixed one per scenario.
    fn seed(s: Scenario) -> u64 {
        env_number("RUNNEL_FAULT_SEED").unwrap_or(0x5EED_0000 + s as u64)
    }

    /// Runs `s` once with its seed (the CI tier): 25 s, or `RUNNEL_FAULT_SECS`.
    pub async fn once(s: Scenario) {
        let secs = env_number("RUNNEL_FAULT_SECS").unwrap_or(25);
        run_seed(s, seed(s), Duration::from_secs(secs)).await;
    }

    /// The long tier: `s` with `seeds` seeds (from its own), `duration` each.
    pub async fn many(s: Scenario, seeds: u64, duration: Duration) {
        for i in 0..seeds {
            run_seed(s, seed(s).wrapping_add(i * 1_000_003), duration).await;
        }
    }

    /// Runs `s` with `seed` for `duration`; on any violation keeps the run's directory (node
    /// data, logs, `history.json`) and fails with the seed and the report.
    pub async fn run_seed(s: Scenario, seed: u64, duration: Duration) {
        let _alone = super::ALONE.lock().await;
        // Kept unless the run passes, so a panic inside the harness leaves the logs too.
        let dir = tempfile::Builder::new()
            .prefix(&format!("runnel-fault-{s:?}-"))
            .tempdir()
            .unwrap()
            .keep();
        eprintln!("{s:?} seed {seed}: running in {}", dir.display());
        let mut cfg = RunConfig::new(s, seed, Path::new(env!("CARGO_BIN_EXE_runneld")), &dir);
        cfg.duration = duration;
        let out = run(&cfg).await;
        let r = &out.report;
        eprintln!(
            "{s:?} seed {seed}: sends {:?} (attempted/ok/failed/unknown), commits {:?}, polled {}, faults {:?}, failover {:?}, longest stall {:.0} ms, slowest recovery {:.0} ms, violations {:?}",
            r.sends,
            r.commits,
            r.polled,
            r.faults,
            r.failover_ms,
            r.longest_stall_ms,
            r.slowest_recovery_ms,
            r.violations
        );
        if !r.ok() {
            let kept = dir;
            let json = serde_json::to_string_pretty(&out.history).unwrap();
            std::fs::write(kept.join("history.json"), json).unwrap();
            panic!(
                "{s:?} failed with seed {seed} (replay: RUNNEL_FAULT_SEED={seed}); run kept in {}\n{:#?}",
                kept.display(),
                r.examples
            );
        }
        assert!(r.sends[1] > 0, "no write was acknowledged at all");
        if std::env::var_os("RUNNEL_FAULT_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_01_no_faults() {
    scenarios::once(runnel_fault::scenario::Scenario::NoFaults).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_02_kill_leader() {
    scenarios::once(runnel_fault::scenario::Scenario::KillLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_03_kill_random() {
    scenarios::once(runnel_fault::scenario::Scenario::KillRandom).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_04_kill_all() {
    scenarios::once(runnel_fault::scenario::Scenario::KillAll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_05_rolling_sigterm() {
    scenarios::once(runnel_fault::scenario::Scenario::RollingTerm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_06_pause_leader() {
    scenarios::once(runnel_fault::scenario::Scenario::PauseLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_07_pause_follower() {
    scenarios::once(runnel_fault::scenario::Scenario::PauseFollower).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_08_isolate_leader() {
    scenarios::once(runnel_fault::scenario::Scenario::IsolateLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_09_partitions() {
    scenarios::once(runnel_fault::scenario::Scenario::Partitions).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_10_cut_clients() {
    scenarios::once(runnel_fault::scenario::Scenario::CutClients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_11_flaky_network() {
    scenarios::once(runnel_fault::scenario::Scenario::Flaky).await;
}

/// Regression for bug 3 (docs/RELIABILITY.md): a follower whose newest WAL file or segment is
/// cut below what it acknowledged repairs from the others instead of refusing to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_12_file_surgery() {
    scenarios::once(runnel_fault::scenario::Scenario::Surgery).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_13_kill_consumers() {
    scenarios::once(runnel_fault::scenario::Scenario::KillConsumers).await;
}

/// Issue 14, item 1 and 2: bit flips anywhere in one node's committed batches (header fields
/// outside the batch CRC included) and in its checkpoint manifests are never served; the node
/// finds them, reports them and repairs from a healthy replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_14_bit_flips() {
    scenarios::once(runnel_fault::scenario::Scenario::BitFlip).await;
}

/// Whether this machine can run a scenario needing `what`: when it cannot, prints SKIPPED and
/// says no, except under `CI=true`, where it fails (CI provides everything).
fn can_run(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is missing under CI=true (.ci/run provides it)"
    );
    eprintln!("SKIPPED: {what} is missing on this machine");
    false
}

/// Whether a small tmpfs can be mounted here (root or CAP_SYS_ADMIN).
fn can_mount_tmpfs() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        let _ = std::process::Command::new("umount")
            .arg(dir.path())
            .status();
    }
    mounted
}

/// Issue 14, item 3: a node whose (tmpfs) disk fills says so and gives way, then serves again
/// by itself once the space is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_15_disk_full() {
    if can_run(can_mount_tmpfs(), "permission to mount a tmpfs (root)") {
        scenarios::once(runnel_fault::scenario::Scenario::DiskFull).await;
    }
}

/// Issue 14, item 3: a storage failure that does not heal (every WAL write refused with
/// `EPERM`) is fatal: the node exits non-zero, saying why, so that its supervisor restarts
/// it, instead of staying up as a zombie; restarted on a healthy disk it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_writes_fail_for_good_exits_for_its_supervisor() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = FaultCluster::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_runneld")),
        dir.path(),
        1,
        11,
    );
    let client = connect(&cluster).await;
    client
        .admin()
        .create_topic("eperm", TopicSpec::partitions(1))
        .await
        .unwrap();
    produce(&client, "eperm", (0..50).map(|i| format!("a-{i:03}"))).await;
    let victim = 2;
    if !can_run(
        cluster.set_wal_immutable(victim, true),
        "chattr +i on the data directory's file system",
    ) {
        return;
    }
    produce(&client, "eperm", (0..100).map(|i| format!("b-{i:03}"))).await;
    let st = cluster.wait_exit(victim, Duration::from_secs(30));
    assert!(cluster.set_wal_immutable(victim, false), "chattr -i");
    let st = st.unwrap_or_else(|| panic!("node {victim} stayed up\n{}", cluster.log_tails(20)));
    assert_eq!(st.code(), Some(74), "{st}");
    let log = std::fs::read_to_string(&cluster.nodes[victim as usize - 1].log).unwrap();
    assert!(log.contains("storage failure: stopping the node"), "{log}");
    cluster.restart(victim);
    produce(&client, "eperm", (0..50).map(|i| format!("c-{i:03}"))).await;
    let got: Vec<String> = read_from_start(&client, "eperm", 200)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let want: Vec<String> = [("a", 50), ("b", 100), ("c", 50)]
        .iter()
        .flat_map(|(p, n)| (0..*n).map(move |i| format!("{p}-{i:03}")))
        .collect();
    assert_eq!(got, want);
}

/// Issue 14, item 4: one node's wall clock eight days ahead deletes nothing, and every replica
/// keeps the same log start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_16_clock_step() {
    let present = std::path::Path::new(runnel_fault::cluster::LIBFAKETIME).exists();
    if can_run(present, "libfaketime (apt-get install faketime)") {
        scenarios::once(runnel_fault::scenario::Scenario::ClockStep).await;
    }
}

/// Issue 14, item 5: a node whose vote record is gone refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_17_lost_vote() {
    scenarios::once(runnel_fault::scenario::Scenario::LostVote).await;
}

// The long tier (README): `cargo nextest run -p runnel-server --test faults --run-ignored only`.
// Every scenario with three seeds of 60 s, then a 30-minute soak rotating through all faults.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long tier: cargo nextest run -p runnel-server --test faults --run-ignored only"]
async fn long_every_scenario_three_seeds() {
    for s in runnel_fault::scenario::Scenario::ALL {
        scenarios::many(s, 3, Duration::from_secs(60)).await;
    }
}

/// Seeds that once failed, at the length that found them (docs/RELIABILITY.md, bug 4: a
/// restart overlapping the next kill stalled writes for 8.5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long tier: cargo nextest run -p runnel-server --test faults --run-ignored only"]
async fn long_regression_seeds() {
    use runnel_fault::scenario::Scenario;
    for (s, seed, secs) in [(Scenario::KillRandom, 1_592_590_349, 300)] {
        scenarios::run_seed(s, seed, Duration::from_secs(secs)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long tier: cargo nextest run -p runnel-server --test faults --run-ignored only"]
async fn long_soak_rotating_faults_30_minutes() {
    scenarios::many(
        runnel_fault::scenario::Scenario::Rotating,
        1,
        Duration::from_secs(30 * 60),
    )
    .await;
}
