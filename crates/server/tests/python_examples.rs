//! The Python examples (stubs generated from proto/ with grpcio-tools) against three real
//! nodes: produce, consume with a group and commit, resume with nothing left, replay from an
//! offset. Skipped with a message when grpcio is missing, except under CI (`CI=true`), where
//! `.ci/run` installs it and a missing module is a failure.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use common::Cluster;

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/python")
}

fn python_has_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success())
}

fn run(script: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .arg(examples_dir().join(script))
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_and_consumer() {
    if !python_has_grpc() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have grpcio and grpcio-tools (.ci/run installs them)"
        );
        eprintln!(
            "SKIPPED: python3 cannot import grpc / grpc_tools (pip install grpcio grpcio-tools)"
        );
        return;
    }
    let cluster = Cluster::start(2);
    let _client = cluster.client().await; // waits until the cluster answers
    let bootstrap = cluster.bootstrap().join(",");
    let b = bootstrap.as_str();

    let acks = run(
        "producer.py",
        &[
            "--bootstrap",
            b,
            "--topic",
            "py",
            "--count",
            "500",
            "--partitions",
            "3",
        ],
    );
    // Expected content per partition: offset -> value.
    let mut want: BTreeMap<(u64, i64), String> = BTreeMap::new();
    for a in &acks {
        let p = a["partition"].as_u64().unwrap();
        let base = a["base_offset"].as_i64().unwrap();
        for (i, v) in a["values"].as_array().unwrap().iter().enumerate() {
            want.insert((p, base + i as i64), v.as_str().unwrap().to_string());
        }
    }
    assert_eq!(want.len(), 500);

    let got = run(
        "consumer.py",
        &["--bootstrap", b, "--topic", "py", "--group", "billing"],
    );
    let got: BTreeMap<(u64, i64), String> = got
        .iter()
        .map(|r| {
            (
                (
                    r["partition"].as_u64().unwrap(),
                    r["offset"].as_i64().unwrap(),
                ),
                r["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, want, "every record once, at its acknowledged offset");

    // The group committed: a second run resumes at the commit and finds nothing new.
    let again = run(
        "consumer.py",
        &["--bootstrap", b, "--topic", "py", "--group", "billing"],
    );
    assert!(again.is_empty(), "{again:?}");

    // Replay partition 0 from offset 10.
    let replay = run(
        "consumer.py",
        &[
            "--bootstrap",
            b,
            "--topic",
            "py",
            "--partition",
            "0",
            "--replay-from",
            "10",
        ],
    );
    let p0: Vec<(&(u64, i64), &String)> = want
        .iter()
        .filter(|((p, o), _)| *p == 0 && *o >= 10)
        .collect();
    assert_eq!(replay.len(), p0.len());
    for (r, ((_, o), v)) in replay.iter().zip(p0) {
        assert_eq!(r["offset"].as_i64().unwrap(), *o);
        assert_eq!(r["value"].as_str().unwrap(), v);
    }
}
