//! `runneld`: runs one Runnel node until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use runnel_server::Node;
use runnel_server::config::{Config, NodeEntry};

/// A Runnel node. Settings come from the TOML file, then environment variables, then flags.
#[derive(Debug, Parser)]
#[command(name = "runneld", version, about)]
struct Args {
    /// TOML configuration file (docs/CONFIG.md documents every key).
    #[arg(long, short, env = "RUNNEL_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id.
    #[arg(long, env = "RUNNEL_NODE_ID")]
    node_id: Option<u64>,
    /// Take the node id from the hostname's trailing ordinal plus one (`runnel-0` → 1), as in a
    /// Kubernetes StatefulSet.
    #[arg(long, env = "RUNNEL_NODE_ID_FROM_HOSTNAME")]
    node_id_from_hostname: bool,
    /// Data directory.
    #[arg(long, env = "RUNNEL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Client API bind address (ip:port).
    #[arg(long, env = "RUNNEL_LISTEN_CLIENT")]
    listen_client: Option<String>,
    /// Peer (Raft) bind address (ip:port).
    #[arg(long, env = "RUNNEL_LISTEN_PEER")]
    listen_peer: Option<String>,
    /// Advertised client address (host:port); default: this node's entry in the node list.
    #[arg(long, env = "RUNNEL_ADVERTISE_CLIENT")]
    advertise_client: Option<String>,
    /// Advertised peer address (host:port); default: this node's entry in the node list.
    #[arg(long, env = "RUNNEL_ADVERTISE_PEER")]
    advertise_peer: Option<String>,
    /// Every member: `id=peer_host:port/client_host:port`, comma-separated.
    #[arg(long, env = "RUNNEL_NODES")]
    nodes: Option<String>,
    /// Number of data groups.
    #[arg(long, env = "RUNNEL_DATA_GROUPS")]
    data_groups: Option<u32>,
    /// Join an existing cluster (a new node replacing a lost one) instead of bootstrapping.
    #[arg(long, env = "RUNNEL_JOIN")]
    join: bool,
    /// Log format: text or json.
    #[arg(long, env = "RUNNEL_LOG_FORMAT")]
    log_format: Option<String>,
    /// Log filter (`info`, `runnel_server=debug`, …); RUST_LOG wins when set.
    #[arg(long, env = "RUNNEL_LOG_LEVEL")]
    log_level: Option<String>,
    /// Validate the configuration, print it as TOML and exit.
    #[arg(long)]
    check: bool,
}

fn parse_nodes(s: &str) -> anyhow::Result<Vec<NodeEntry>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|item| {
            let (id, addrs) = item
                .trim()
                .split_once('=')
                .with_context(|| format!("{item:?}: expected id=peer/client"))?;
            let (peer, client) = addrs
                .split_once('/')
                .with_context(|| format!("{item:?}: expected id=peer/client"))?;
            Ok(NodeEntry {
                id: id.parse().with_context(|| format!("node id {id:?}"))?,
                peer: peer.to_string(),
                client: client.to_string(),
            })
        })
        .collect()
}

fn ordinal_from_hostname() -> anyhow::Result<u64> {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .context("no HOSTNAME")?;
    let host = host.trim();
    let ordinal = host
        .rsplit('-')
        .next()
        .and_then(|o| o.parse::<u64>().ok())
        .with_context(|| format!("hostname {host:?} has no trailing -<ordinal>"))?;
    Ok(ordinal + 1)
}

fn load(args: &Args) -> anyhow::Result<Config> {
    let mut cfg = match &args.config {
        Some(p) => Config::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        None => Config::default(),
    };
    if args.node_id_from_hostname {
        cfg.node_id = ordinal_from_hostname()?;
    }
    if let Some(v) = args.node_id {
        cfg.node_id = v;
    }
    if let Some(v) = &args.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = &args.listen_client {
        cfg.listen.client = v.clone();
    }
    if let Some(v) = &args.listen_peer {
        cfg.listen.peer = v.clone();
    }
    if let Some(v) = &args.advertise_client {
        cfg.advertise.client = v.clone();
    }
    if let Some(v) = &args.advertise_peer {
        cfg.advertise.peer = v.clone();
    }
    if let Some(v) = &args.nodes {
        cfg.cluster.nodes = parse_nodes(v)?;
    }
    if let Some(v) = args.data_groups {
        cfg.cluster.data_groups = v;
    }
    if args.join {
        cfg.cluster.join = true;
    }
    if let Some(v) = &args.log_format {
        cfg.log.format = v.clone();
    }
    if let Some(v) = &args.log_level {
        cfg.log.level = v.clone();
    }
    Ok(cfg)
}

fn init_logs(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{},openraft=warn", cfg.log.level))
    });
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    if cfg.log.format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = load(&args)?;
    if let Err(problems) = cfg.validate() {
        anyhow::bail!("invalid configuration:\n  - {}", problems.join("\n  - "));
    }
    if args.check {
        print!("{}", toml::to_string(&cfg)?);
        let fds = runnel_server::fdlimit::prepare(&cfg);
        println!("\n# {}", fds.describe());
        return Ok(());
    }
    init_logs(&cfg);
    let node = Node::start(cfg).await?;
    tokio::select! {
        sig = shutdown_signal() => {
            tracing::info!(signal = sig?, "shutting down");
            node.shutdown().await;
            Ok(())
        }
        why = node.fatal() => {
            // Fail-stop that something notices: exit non-zero so that systemd, Compose or
            // Kubernetes restarts the node and recovery runs from what is on disk.
            tracing::error!(reason = %why, "storage failure: stopping the node (exit code 74)");
            std::process::exit(74);
        }
    }
}
