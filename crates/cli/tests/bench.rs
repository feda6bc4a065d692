//! `runnel bench` against a real three-node cluster (in this process, on 127.0.0.1): each mode
//! runs a few seconds and must complete with sane figures. The CI smoke test of the bench tool.

use std::process::Command;
use std::time::Duration;

use runnel_server::Node;
use runnel_server::config::{Config, NodeEntry};

struct Cluster {
    nodes: Vec<Node>,
    bootstrap: String,
    _ports: Vec<runnel_fault::ports::PortLock>,
    _dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<_> = (0..6).map(|_| runnel_fault::ports::free_port()).collect();
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i].port);
    let entries: Vec<NodeEntry> = (1..=3u64)
        .map(|n| NodeEntry {
            id: n,
            client: addr(2 * (n as usize - 1)),
            peer: addr(2 * (n as usize - 1) + 1),
        })
        .collect();
    let mut nodes = Vec::new();
    for e in &entries {
        let mut c = Config {
            node_id: e.id,
            data_dir: dir.path().join(format!("node-{}", e.id)),
            ..Config::default()
        };
        c.listen.client = e.client.clone();
        c.listen.peer = e.peer.clone();
        c.cluster.nodes = entries.clone();
        c.cluster.data_groups = 2;
        nodes.push(Node::start(c).await.unwrap());
    }
    let bootstrap = entries
        .iter()
        .map(|e| e.client.clone())
        .collect::<Vec<_>>()
        .join(",");
    Cluster {
        nodes,
        bootstrap,
        _ports: ports,
        _dir: dir,
    }
}

/// Runs `runnel -b <bootstrap> bench <args> --json --quiet` and returns its JSON summary.
async fn bench(bootstrap: &str, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runnel"));
    cmd.args(["-b", bootstrap, "bench"])
        .args(args)
        .args(["--json", "--quiet"]);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "runnel bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn f(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} missing in {v}"))
}

/// Records, rate and a latency distribution that is ordered and positive.
fn assert_sane(v: &serde_json::Value, mode: &str) {
    assert_eq!(v["mode"], mode, "{v}");
    assert_eq!(f(v, &["errors"]), 0.0, "{v}");
    let records = f(v, &["records"]);
    assert!(records > 0.0, "{v}");
    let rate = f(v, &["records_per_s"]);
    let elapsed = f(v, &["elapsed_s"]);
    assert!(rate > 0.0 && elapsed > 0.0, "{v}");
    assert!(
        (rate * elapsed - records).abs() <= records * 0.01 + 1.0,
        "{v}"
    );
    assert!(f(v, &["mb_per_s"]) > 0.0, "{v}");
    let cpu = f(v, &["client_cpu_cores"]);
    assert!((0.0..=64.0).contains(&cpu), "{v}");
}

fn assert_latency_ordered(v: &serde_json::Value) {
    let q: Vec<f64> = ["p50", "p90", "p99", "p99_9", "max"]
        .iter()
        .map(|k| f(v, &["latency_ms", k]))
        .collect();
    assert!(q[0] > 0.0, "{v}");
    assert!(q.windows(2).all(|w| w[0] <= w[1]), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bench_produces_consumes_and_measures_end_to_end() {
    let c = cluster().await;
    let b = c.bootstrap.as_str();
    // Produce an exact count, with keys, a window and two producers.
    let p = bench(
        b,
        &[
            "produce",
            "--topic",
            "smoke",
            "--partitions",
            "3",
            "--records",
            "3000",
            "--duration",
            "60s",
            "--producers",
            "2",
            "--window",
            "64",
            "--keys",
            "random",
            "--record-size",
            "512",
        ],
    )
    .await;
    assert_sane(&p, "produce");
    assert_latency_ordered(&p);
    assert_eq!(f(&p, &["records"]), 3000.0, "{p}");
    assert_eq!(f(&p, &["bytes"]), 3000.0 * 512.0, "{p}");
    assert!(f(&p, &["send_time_ms", "p50"]) >= 0.0, "{p}");
    // Consume reads exactly that backlog, from the start to the end as it was.
    let r = bench(
        b,
        &[
            "consume",
            "--topic",
            "smoke",
            "--consumers",
            "2",
            "--duration",
            "60s",
        ],
    )
    .await;
    assert_sane(&r, "consume");
    assert_eq!(f(&r, &["records"]), 3000.0, "{r}");
    assert_eq!(f(&r, &["bytes"]), 3000.0 * 512.0, "{r}");
    // End to end for two seconds at a target rate: every acknowledged record is read.
    let e = bench(
        b,
        &[
            "end-to-end",
            "--topic",
            "smoke",
            "--duration",
            "2s",
            "--rate",
            "500",
        ],
    )
    .await;
    assert_sane(&e, "end-to-end");
    assert_latency_ordered(&e);
    // 500/s for 2 s; the schedule keeps it from running ahead.
    assert!(f(&e, &["records"]) <= 1001.0, "{e}");
    // Bad options are refused with a message, not a panic.
    let out = Command::new(env!("CARGO_BIN_EXE_runnel"))
        .args([
            "-b",
            b,
            "bench",
            "produce",
            "--window",
            "0",
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--window"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in c.nodes {
        tokio::time::timeout(Duration::from_secs(30), n.shutdown())
            .await
            .unwrap();
    }
}
