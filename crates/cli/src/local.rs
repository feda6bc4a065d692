//! `runnel local`: a three-node development cluster in one process, on 127.0.0.1, with its
//! data under a local folder (kept between runs, so a restart resumes the same cluster).

use std::path::PathBuf;

use anyhow::Context;
use runnel_server::Node;
use runnel_server::config::{Config, NodeEntry};

/// Options of the local cluster.
#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// Where the nodes keep their data (node-1, node-2, node-3 below it).
    #[arg(long, default_value = "./runnel-data")]
    dir: PathBuf,
    /// Client port of node 1; node n uses base + 100·(n−1) for clients and that + 1 for peers.
    #[arg(long, default_value_t = 9092)]
    base_port: u16,
    /// Number of data groups.
    #[arg(long, default_value_t = 3)]
    data_groups: u32,
    /// Node log level (`info`, `debug`, …); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// The configuration of node `id` (1..=3) of the local cluster.
pub fn node_config(a: &LocalArgs, id: u64) -> Config {
    let port = |n: u64, off: u16| a.base_port + 100 * (n as u16 - 1) + off;
    let nodes: Vec<NodeEntry> = (1..=3)
        .map(|n| NodeEntry {
            id: n,
            peer: format!("127.0.0.1:{}", port(n, 1)),
            client: format!("127.0.0.1:{}", port(n, 0)),
        })
        .collect();
    let mut c = Config {
        node_id: id,
        data_dir: a.dir.join(format!("node-{id}")),
        // The three nodes share this process's open-files limit.
        nodes_in_process: 3,
        ..Config::default()
    };
    c.listen.client = format!("127.0.0.1:{}", port(id, 0));
    c.listen.peer = format!("127.0.0.1:{}", port(id, 1));
    c.cluster.nodes = nodes;
    c.cluster.data_groups = a.data_groups;
    c.log.level = a.log_level.clone();
    c
}

/// Runs the cluster until Ctrl-C (or SIGTERM), then stops every node cleanly.
pub async fn run(a: &LocalArgs) -> anyhow::Result<()> {
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for id in 1..=3 {
        let cfg = node_config(a, id);
        cfg.validate()
            .map_err(|p| anyhow::anyhow!("invalid configuration: {}", p.join("; ")))?;
        clients.push(cfg.listen.client.clone());
        let node = Node::start(cfg)
            .await
            .with_context(|| format!("starting node {id}"))?;
        eprintln!(
            "node {id}: client {} peer {} data {}",
            node.client_addr(),
            node.peer_addr(),
            a.dir.join(format!("node-{id}")).display()
        );
        nodes.push(node);
    }
    eprintln!();
    eprintln!(
        "Runnel local cluster is up. Bootstrap: {}",
        clients.join(",")
    );
    eprintln!(
        "  runnel -b {} topic create demo --partitions 3",
        clients[0]
    );
    eprintln!("  echo hello | runnel -b {} produce demo", clients[0]);
    eprintln!("  runnel -b {} consume demo --from earliest", clients[0]);
    eprintln!(
        "Ctrl-C stops the cluster; data stays in {}.",
        a.dir.display()
    );
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let fatal = futures::future::select_all(nodes.iter().map(|n| Box::pin(n.fatal())));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        (why, i, _) = fatal => {
            anyhow::bail!("node {}: storage failure, stopping the cluster: {why}", i + 1);
        }
    }
    eprintln!("stopping…");
    for n in nodes {
        n.shutdown().await;
    }
    eprintln!("stopped");
    Ok(())
}
