//! `runnel`: the command-line tool for Runnel clusters.
//!
//! Longer than most files (over 600 lines): the clap command tree and one short function per
//! command.

mod bench;
mod local;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use runnel_client::{Client, ConsumerConfig, ProducerConfig, ProducerRecord, StartFrom, TopicSpec};

/// Runnel's command-line tool.
#[derive(Debug, Parser)]
#[command(name = "runnel", version, about)]
struct Cli {
    /// Client addresses of one or more nodes (comma-separated).
    #[arg(
        long,
        short,
        global = true,
        env = "RUNNEL_BOOTSTRAP",
        default_value = "127.0.0.1:9092"
    )]
    bootstrap: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create, list, describe and delete topics.
    Topic {
        #[command(subcommand)]
        cmd: TopicCmd,
    },
    /// Produce lines from stdin or a file, one record per line.
    Produce(ProduceArgs),
    /// Consume records and print them.
    Consume(ConsumeArgs),
    /// Show, commit and reset a consumer group's offsets.
    Offsets {
        #[command(subcommand)]
        cmd: OffsetsCmd,
    },
    /// Cluster state.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Check a node with the gRPC health service; exit status 0 when it serves.
    Health {
        /// The node's client address (default: the first bootstrap address).
        #[arg(long)]
        addr: Option<String>,
        /// Give up after this many ms.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Run a local three-node cluster in this process (for development); Ctrl-C stops it.
    Local(local::LocalArgs),
    /// Load a cluster: produce, consume or end-to-end throughput and latency.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum TopicCmd {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Partitions (0: the cluster's default).
        #[arg(long, short, default_value_t = 0)]
        partitions: u32,
        /// Retention by age in ms (0: default, -1: unlimited).
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        retention_ms: i64,
        /// Retention by size per partition (0: default, -1: unlimited).
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        retention_bytes: i64,
        /// Segment size in bytes (0: default).
        #[arg(long, default_value_t = 0)]
        segment_bytes: u64,
    },
    /// List topics.
    List,
    /// Describe a topic: partitions, leaders, replicas, offsets.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and its data.
    Delete {
        /// Topic name.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
struct ProduceArgs {
    /// Topic.
    topic: String,
    /// Read lines from this file instead of stdin.
    #[arg(long, short)]
    file: Option<PathBuf>,
    /// Key for every record.
    #[arg(long, short)]
    key: Option<String>,
    /// Split each line at the first occurrence of this separator into key and value.
    #[arg(long)]
    key_separator: Option<String>,
    /// A header `k=v` for every record (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Partition (default: by key, else spread).
    #[arg(long, short)]
    partition: Option<u32>,
    /// Disable idempotence.
    #[arg(long)]
    no_idempotence: bool,
    /// Fail when the topic does not exist instead of creating it with the cluster's defaults.
    #[arg(long)]
    no_create: bool,
    /// Print each record's partition and offset.
    #[arg(long)]
    verbose: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Plain,
    Json,
}

#[derive(Debug, clap::Args)]
struct ConsumeArgs {
    /// Topic.
    topic: String,
    /// Where to start: earliest, latest, committed, an offset, or a time (RFC 3339, or
    /// `@<ms since epoch>`). Default: committed with --group, else earliest.
    #[arg(long, allow_hyphen_values = true)]
    from: Option<String>,
    /// Only this partition (default: all).
    #[arg(long, short)]
    partition: Option<u32>,
    /// Consumer group (for --from committed and --commit).
    #[arg(long, short)]
    group: Option<String>,
    /// Commit positions after each printed poll.
    #[arg(long)]
    commit: bool,
    /// Stop after this many records.
    #[arg(long, short = 'n')]
    count: Option<u64>,
    /// Stop when every partition is caught up instead of waiting for more.
    #[arg(long)]
    exit_at_end: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "plain")]
    format: Format,
    /// Read from the replica reached instead of the leader.
    #[arg(long)]
    allow_follower: bool,
}

#[derive(Debug, Subcommand)]
enum OffsetsCmd {
    /// A group's committed offsets, with high watermarks and lag.
    Show {
        /// Topic.
        topic: String,
        /// Consumer group.
        #[arg(long, short)]
        group: String,
    },
    /// Commit an offset (the next one to consume) for one partition.
    Commit {
        /// Topic.
        topic: String,
        /// Consumer group.
        #[arg(long, short)]
        group: String,
        /// Partition.
        #[arg(long, short)]
        partition: u32,
        /// Offset.
        #[arg(long, short)]
        offset: i64,
    },
    /// Move a group's offsets of every partition to earliest, latest, an offset or a time.
    Reset {
        /// Topic.
        topic: String,
        /// Consumer group.
        #[arg(long, short)]
        group: String,
        /// earliest, latest, an offset, or a time (RFC 3339 or @ms).
        #[arg(long, allow_hyphen_values = true)]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Nodes, groups, leaders and replica lag, from every node's point of view.
    Status {
        /// Print every reachable node's own view as one JSON document (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Replace a node that is gone for good (lost disk) by a new node started with `--join`.
    ReplaceNode {
        /// Id of the node being replaced.
        #[arg(long)]
        old: u64,
        /// Id of the new node (never a reused id).
        #[arg(long)]
        new: u64,
        /// The new node's peer address (host:port), as the other nodes reach it.
        #[arg(long)]
        peer: String,
        /// The new node's advertised client address (host:port).
        #[arg(long)]
        client: String,
    },
}

fn parse_from(s: &str) -> anyhow::Result<StartFrom> {
    Ok(match s {
        "earliest" => StartFrom::Earliest,
        "latest" => StartFrom::Latest,
        "committed" => StartFrom::Committed,
        s if s.starts_with('@') => StartFrom::Timestamp(s[1..].parse().context("@<ms>")?),
        s => match s.parse::<i64>() {
            Ok(o) if o >= 0 => StartFrom::Offset(o),
            Ok(o) => bail!("offset {o} is negative"),
            Err(_) => {
                let t = humantime::parse_rfc3339_weak(s).with_context(|| {
                    format!("{s:?}: expected earliest, latest, committed, an offset, @ms or an RFC 3339 time")
                })?;
                let ms = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("time before 1970")?
                    .as_millis() as i64;
                StartFrom::Timestamp(ms)
            }
        },
    })
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let addrs: Vec<String> = cli
        .bootstrap
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    Client::connect(addrs.clone())
        .await
        .with_context(|| format!("connecting to {}", addrs.join(",")))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The local cluster logs its nodes at --log-level (peers unreachable during start-up are
    // normal there, so openraft is quiet); other commands only warn.
    let default_filter = match &cli.cmd {
        Cmd::Local(a) => format!("{},openraft=error", a.log_level),
        _ => "warn".to_string(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    match &cli.cmd {
        Cmd::Local(a) => local::run(a).await,
        Cmd::Bench(a) => bench::run(&connect(&cli).await?, a.clone()).await,
        Cmd::Health { addr, timeout_ms } => {
            let addr = addr
                .clone()
                .unwrap_or_else(|| cli.bootstrap.split(',').next().unwrap_or("").to_string());
            health(&addr, Duration::from_millis(*timeout_ms)).await
        }
        Cmd::Topic { cmd } => topic(&connect(&cli).await?, cmd).await,
        Cmd::Produce(a) => produce(&connect(&cli).await?, a).await,
        Cmd::Consume(a) => consume(&connect(&cli).await?, a).await,
        Cmd::Offsets { cmd } => offsets(&connect(&cli).await?, cmd).await,
        Cmd::Cluster {
            cmd: ClusterCmd::Status { json: false },
        } => status(&connect(&cli).await?).await,
        Cmd::Cluster {
            cmd: ClusterCmd::Status { json: true },
        } => status_json(&connect(&cli).await?).await,
        Cmd::Cluster {
            cmd:
                ClusterCmd::ReplaceNode {
                    old,
                    new,
                    peer,
                    client,
                },
        } => {
            let c = connect(&cli).await?;
            let groups = c.admin().replace_node(*old, *new, peer, client).await?;
            println!("node {new} replaced node {old} in groups {groups:?}");
            Ok(())
        }
    }
}

async fn health(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let r = tokio::time::timeout(timeout, async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: "runnel.v1.Broker".into(),
            })
            .await?;
        anyhow::Ok(r.into_inner().status)
    })
    .await
    .map_err(|_| anyhow::anyhow!("{addr}: no answer within {timeout:?}"))??;
    if r == ServingStatus::Serving as i32 {
        println!("{addr}: SERVING");
        Ok(())
    } else {
        bail!("{addr}: not serving (status {r})")
    }
}

async fn topic(c: &Client, cmd: &TopicCmd) -> anyhow::Result<()> {
    let admin = c.admin();
    match cmd {
        TopicCmd::Create {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            segment_bytes,
        } => {
            let t = admin
                .create_topic(
                    name,
                    TopicSpec {
                        partitions: *partitions,
                        retention_ms: *retention_ms,
                        retention_bytes: *retention_bytes,
                        segment_bytes: *segment_bytes,
                    },
                )
                .await?;
            println!(
                "created topic {} with {} partitions",
                t.name,
                t.partitions.len()
            );
        }
        TopicCmd::List => {
            for t in admin.list_topics().await? {
                println!("{}\t{} partitions", t.name, t.partitions.len());
            }
        }
        TopicCmd::Describe { name } => {
            let d = admin.describe_topic(name).await?;
            let t = d.topic.unwrap_or_default();
            let cfg = t.config.unwrap_or_default();
            println!(
                "topic {} (id {}): retention_ms={} retention_bytes={} segment_bytes={}",
                t.name, t.topic_id, cfg.retention_ms, cfg.retention_bytes, cfg.segment_bytes
            );
            println!("partition\tgroup\tleader\tepoch\treplicas\thigh_watermark\tlog_start\tbytes");
            for p in &t.partitions {
                let st = d.partitions.iter().find(|s| s.partition == p.partition);
                println!(
                    "{}\t{}\t{}\t{}\t{:?}\t{}\t{}\t{}",
                    p.partition,
                    p.group_id,
                    p.leader_id,
                    p.leader_epoch,
                    p.replicas,
                    st.map_or(-1, |s| s.high_watermark),
                    st.map_or(-1, |s| s.log_start_offset),
                    st.map_or(0, |s| s.size_bytes),
                );
            }
            println!("(offsets as seen by node {})", d.answered_by);
        }
        TopicCmd::Delete { name } => {
            admin.delete_topic(name).await?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

async fn produce(c: &Client, a: &ProduceArgs) -> anyhow::Result<()> {
    if !a.no_create {
        let exists = c
            .metadata(std::slice::from_ref(&a.topic))
            .await?
            .topics
            .iter()
            .any(|t| t.name == a.topic && t.error.is_none());
        if !exists {
            let t = c.admin().create_topic(&a.topic, TopicSpec::default()).await;
            match t {
                Ok(t) => eprintln!(
                    "created topic {} with {} partitions",
                    t.name,
                    t.partitions.len()
                ),
                Err(e) if e.code() == Some(runnel_client::ErrorCode::TopicAlreadyExists) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let producer = c.producer(ProducerConfig {
        idempotent: !a.no_idempotence,
        ..Default::default()
    });
    let headers: Vec<(String, Bytes)> = a
        .headers
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.to_string(), Bytes::from(v.to_string())))
                .with_context(|| format!("header {h:?}: expected k=v"))
        })
        .collect::<anyhow::Result<_>>()?;
    let input: Box<dyn BufRead + Send> = match &a.file {
        Some(f) => Box::new(std::io::BufReader::new(
            std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    // Lines are read on a blocking thread and handed over a bounded channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(10_000);
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        for line in input.lines() {
            if tx.blocking_send(line?).is_err() {
                break;
            }
        }
        Ok(())
    });
    let mut sent = 0u64;
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
    let verbose = a.verbose;
    let printer = tokio::spawn(async move {
        let mut n = 0u64;
        let mut first_err = None;
        while let Some(fut) = ack_rx.recv().await {
            let fut: runnel_client::DeliveryFuture = fut;
            match fut.await {
                Ok(d) => {
                    n += 1;
                    if verbose {
                        println!("{}@{}", d.partition, d.offset);
                    }
                }
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        (n, first_err)
    });
    while let Some(line) = rx.recv().await {
        let (key, value) = match (&a.key_separator, &a.key) {
            (Some(sep), _) => match line.split_once(sep.as_str()) {
                Some((k, v)) => (Some(k.to_string()), v.to_string()),
                None => (a.key.clone(), line),
            },
            (None, k) => (k.clone(), line),
        };
        let mut rec = ProducerRecord::new(value);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        rec.headers = headers.clone();
        rec.partition = a.partition;
        let fut = producer.send(&a.topic, rec).await?;
        sent += 1;
        if ack_tx.send(fut).is_err() {
            break;
        }
    }
    drop(ack_tx);
    reader.await??;
    producer.flush().await;
    let (acked, err) = printer.await?;
    producer.close().await;
    eprintln!("{acked} of {sent} records acknowledged");
    if let Some(e) = err {
        bail!("some records failed: {e}");
    }
    Ok(())
}

async fn consume(c: &Client, a: &ConsumeArgs) -> anyhow::Result<()> {
    if a.commit && a.group.is_none() {
        bail!("--commit needs --group");
    }
    let from = match &a.from {
        Some(f) => parse_from(f)?,
        None if a.group.is_some() => StartFrom::Committed,
        None => StartFrom::Earliest,
    };
    let mut consumer = c.consumer(ConsumerConfig {
        group: a.group.clone(),
        allow_follower: a.allow_follower,
        ..Default::default()
    });
    consumer
        .assign(&a.topic, a.partition.map(|p| vec![p]), from)
        .await?;
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    loop {
        let recs = consumer.poll().await?;
        if recs.is_empty() && a.exit_at_end {
            break;
        }
        let mut out = stdout.lock();
        let mut printed = 0usize;
        for r in &recs {
            if a.count.is_some_and(|n| seen >= n) {
                break;
            }
            match a.format {
                Format::Plain => {
                    writeln!(
                        out,
                        "{}",
                        String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
                    )?;
                }
                Format::Json => {
                    let headers: std::collections::BTreeMap<_, _> = r
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                        .collect();
                    let v = serde_json::json!({
                        "partition": r.partition,
                        "offset": r.offset,
                        "timestamp_ms": r.timestamp_ms,
                        "key": r.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
                        "value": r.value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()),
                        "headers": headers,
                    });
                    writeln!(out, "{v}")?;
                }
            }
            seen += 1;
            printed += 1;
        }
        out.flush()?;
        drop(out);
        let stop = a.count.is_some_and(|n| seen >= n);
        if printed < recs.len() {
            // Rewind every partition to its first record not printed, so positions (and a
            // commit) cover exactly what was printed.
            for r in recs[printed..].iter().rev() {
                consumer.seek(&r.topic, r.partition, r.offset);
            }
        }
        if a.commit && (!recs.is_empty() || stop) {
            consumer.commit().await?;
        }
        if stop {
            break;
        }
    }
    Ok(())
}

async fn offsets(c: &Client, cmd: &OffsetsCmd) -> anyhow::Result<()> {
    match cmd {
        OffsetsCmd::Show { topic, group } => {
            let consumer = c.consumer(ConsumerConfig::group(group));
            let n = c.partition_count(topic).await?;
            let parts: Vec<u32> = (0..n).collect();
            let committed = consumer.committed(topic, &parts).await?;
            println!("partition\tcommitted\thigh_watermark\tlag");
            for p in parts {
                let hw = consumer.list_offset(topic, p, -1).await?;
                let co = committed.get(&p).copied().unwrap_or(-1);
                let lag = if co < 0 { hw } else { hw - co };
                println!("{p}\t{co}\t{hw}\t{lag}");
            }
        }
        OffsetsCmd::Commit {
            topic,
            group,
            partition,
            offset,
        } => {
            c.consumer(ConsumerConfig::group(group))
                .commit_offsets(topic, &[(*partition, *offset)])
                .await?;
            println!("committed {topic}/{partition} = {offset} for {group}");
        }
        OffsetsCmd::Reset { topic, group, to } => {
            let from = parse_from(to)?;
            if from == StartFrom::Committed {
                bail!("--to committed changes nothing");
            }
            let mut consumer = c.consumer(ConsumerConfig::group(group));
            consumer.assign(topic, None, from).await?;
            consumer.commit().await?;
            for ((t, p), o) in consumer.positions() {
                println!("{t}/{p} = {o}");
            }
        }
    }
    Ok(())
}

/// `cluster status --json`: `{controller, nodes: [{id, address, peer, up}], views: [{answered_by,
/// storage: {serving, problems, free_bytes, min_free_bytes, damaged_reads, group_restarts}, groups: [{group, leader, preferred, term, last_log_index, committed_index, applied_index,
/// voters, partitions, replicas: [{node, matched_index, lag}]}]}]}`; indexes are -1 when unknown.
async fn status_json(c: &Client) -> anyhow::Result<()> {
    use serde_json::json;
    let admin = c.admin();
    let meta = c.metadata(&[]).await?;
    let mut nodes = Vec::new();
    let mut views = Vec::new();
    for n in &meta.nodes {
        let st = admin.cluster_status_at(&n.address).await.ok();
        nodes.push(json!({
            "id": n.node_id,
            "address": n.address,
            "peer": n.peer_address,
            "up": st.is_some(),
        }));
        let Some(st) = st else { continue };
        let groups: Vec<_> = st
            .groups
            .iter()
            .map(|g| {
                let replicas: Vec<_> = g
                    .replicas
                    .iter()
                    .map(|r| json!({"node": r.node_id, "matched_index": r.matched_index, "lag": r.lag}))
                    .collect();
                json!({
                    "group": g.group_id,
                    "leader": g.leader_id,
                    "preferred": g.preferred_leader,
                    "term": g.term,
                    "last_log_index": g.last_log_index,
                    "committed_index": g.committed_index,
                    "applied_index": g.applied_index,
                    "voters": g.voters,
                    "partitions": g.partitions,
                    "replicas": replicas,
                })
            })
            .collect();
        let storage = st.storage.as_ref().map(|s| {
            json!({
                "serving": s.serving,
                "problems": s.problems,
                "free_bytes": s.free_bytes,
                "min_free_bytes": s.min_free_bytes,
                "damaged_reads": s.damaged_reads,
                "group_restarts": s.group_restarts,
            })
        });
        views.push(json!({"answered_by": st.answered_by, "storage": storage, "groups": groups}));
    }
    let doc = json!({"controller": meta.controller_id, "nodes": nodes, "views": views});
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

async fn status(c: &Client) -> anyhow::Result<()> {
    let admin = c.admin();
    let meta = c.metadata(&[]).await?;
    println!("nodes:");
    for n in &meta.nodes {
        let reach = match admin.cluster_status_at(&n.address).await {
            Ok(s) => match s.storage {
                Some(st) if !st.serving => format!("up, NOT SERVING: {}", st.problems.join("; ")),
                _ => "up".to_string(),
            },
            Err(_) => "unreachable".to_string(),
        };
        println!(
            "  {}\tclient {}\tpeer {}\t{reach}",
            n.node_id, n.address, n.peer_address
        );
    }
    println!("metadata leader (controller): {}", meta.controller_id);
    println!("group\tleader\tpreferred\tterm\tcommitted\tpartitions\treplica lag (node:entries)");
    // Each group as its leader sees it (replica progress is known on the leader only).
    let mut views = Vec::new();
    for n in &meta.nodes {
        if let Ok(s) = admin.cluster_status_at(&n.address).await {
            views.push(s);
        }
    }
    let Some(first) = views.first() else {
        bail!("no node answered");
    };
    for g in &first.groups {
        let best = views
            .iter()
            .flat_map(|v| v.groups.iter())
            .filter(|x| x.group_id == g.group_id)
            .find(|x| !x.replicas.is_empty())
            .unwrap_or(g);
        let lag: Vec<String> = best
            .replicas
            .iter()
            .map(|r| format!("{}:{}", r.node_id, r.lag))
            .collect();
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            best.group_id,
            best.leader_id,
            best.preferred_leader,
            best.term,
            best.committed_index,
            best.partitions,
            lag.join(" ")
        );
    }
    Ok(())
}
