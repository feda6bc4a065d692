//! `runneld`'s configuration: a TOML file (every key documented in docs/CONFIG.md, an example
//! in deploy/runneld.toml), overridden by flags and environment variables in `main`, then
//! checked as a whole by [`Config::validate`].
//!
//! Longer than the other server files on purpose: one struct per TOML table with a doc line
//! and a default per key, and the validation that relates keys across tables, read best as one
//! list.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A whole node configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's id (> 0, unique in the cluster, never reused).
    pub node_id: u64,
    /// Where this node keeps its data.
    pub data_dir: PathBuf,
    /// Addresses this node binds.
    pub listen: Listen,
    /// Addresses others use to reach this node; default: its entry in `cluster.nodes`.
    pub advertise: Advertise,
    /// The cluster: its members and how data is grouped.
    pub cluster: Cluster,
    /// Raft timing.
    pub raft: RaftSettings,
    /// Defaults for topics created without explicit settings.
    pub topic_defaults: TopicDefaults,
    /// Limits on what a request may ask for.
    pub limits: Limits,
    /// Limits on connections and streams, per listener.
    pub connections: Connections,
    /// Background schedulers.
    pub background: Background,
    /// The data directory's disk: free-space floor and failure handling.
    pub storage: Storage,
    /// Logging.
    pub log: LogSettings,
    /// How many nodes run in this process (`runnel local` runs three): they share its
    /// descriptor limit. Not a file setting.
    #[serde(skip)]
    pub nodes_in_process: u32,
}

/// Bind addresses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// The client API (Broker, Admin, health, reflection).
    pub client: String,
    /// The peer (Raft transport) listener.
    pub peer: String,
}

/// Advertised addresses (as Kafka's advertised listeners); empty: taken from `cluster.nodes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Advertise {
    /// `host:port` clients use to reach this node.
    pub client: String,
    /// `host:port` peers use to reach this node.
    pub peer: String,
}

/// One member of the static bootstrap list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The member's node id.
    pub id: u64,
    /// Its advertised peer address.
    pub peer: String,
    /// Its advertised client address.
    pub client: String,
}

/// Cluster membership and layout; identical on every node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    /// Every member, this node included (static bootstrap).
    pub nodes: Vec<NodeEntry>,
    /// Number of data groups (Raft groups 1..=N) partitions are spread over.
    pub data_groups: u32,
    /// Join an existing cluster instead of bootstrapping: initialize nothing and wait to be
    /// added (`ReplaceNode`). For a new node replacing one whose disk was lost.
    pub join: bool,
}

/// Raft timing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSettings {
    /// Leader heartbeat period.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max_ms: u64,
    /// Checkpoint a group after this many applied entries.
    pub snapshot_every_entries: u64,
    /// Entries kept behind a checkpoint for slightly lagging followers.
    pub log_entries_kept: u64,
    /// On damaged durable data (a cut WAL, a broken checkpoint), cut at the damage and catch up
    /// from the other replicas without voting meanwhile, instead of refusing to start.
    pub repair_from_replicas: bool,
    /// Start although a group's vote record (`wal.meta`) is gone while its log or checkpoint is
    /// there, recreating it empty. Unsafe: a node that forgot its vote may vote twice in one
    /// term. The safe way back is a new node id (`--join`, `ReplaceNode`).
    pub unsafe_accept_lost_vote: bool,
}

/// Topic defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicDefaults {
    /// Partitions when a create request asks for 0.
    pub partitions: u32,
    /// Retention by age; -1: unlimited.
    pub retention_ms: i64,
    /// Retention by size per partition; -1: unlimited.
    pub retention_bytes: i64,
    /// Segment file size; also the largest batch a partition accepts.
    pub segment_bytes: u64,
}

/// Named limits on everything a request can ask for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest gRPC message accepted (RESOURCE_EXHAUSTED above it).
    pub max_request_bytes: usize,
    /// Largest produced batch, encoded (BATCH_TOO_LARGE above it).
    pub max_batch_bytes: usize,
    /// Most records in one produce request.
    pub max_records_per_produce: usize,
    /// Most bytes one fetch (or one subscribe message) returns (at least one batch regardless).
    pub max_fetch_bytes: usize,
    /// Longest long-poll wait of a fetch.
    pub max_wait_ms: u64,
    /// Most partitions in one topic.
    pub max_partitions_per_topic: u32,
    /// Most offsets in one commit / fetch-offsets request.
    pub max_offsets_per_request: usize,
    /// Longest consumer group name, in bytes.
    pub max_group_name_bytes: usize,
    /// Produce timeout when the request gives none.
    pub produce_timeout_ms: u64,
    /// Subscribe: messages buffered per stream before the server waits on the client.
    pub subscribe_buffer: usize,
    /// Most topics one metadata request may name.
    pub max_topics_per_request: u32,
    /// Most headers one record may carry (in a produce request's `records`).
    pub max_headers_per_record: u32,
    /// Bytes all Subscribe streams of this node may buffer together.
    pub subscribe_memory_bytes: usize,
    /// A Subscribe stream that cannot get budget, or whose client reads nothing, for this long
    /// is ended with RESOURCE_EXHAUSTED.
    pub subscribe_stall_ms: u64,
}

/// Limits on connections and HTTP/2 streams (both listeners; see docs/CONFIG.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Connections {
    /// Client connections open at once; more are closed as soon as they are accepted.
    pub max_client: usize,
    /// Peer connections (other nodes, forwarded calls) open at once.
    pub max_peer: usize,
    /// Time a new connection has to send the HTTP/2 preface.
    pub handshake_timeout_ms: u64,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout_ms: u64,
    /// HTTP/2 ping interval on a silent connection.
    pub keepalive_interval_ms: u64,
    /// Time a ping has to be answered before the connection is dropped.
    pub keepalive_timeout_ms: u64,
    /// Calls (HTTP/2 streams) open at once on one connection.
    pub max_streams_per_connection: u32,
    /// Longest a client call may take to produce its response (a Subscribe stream then goes on).
    pub request_timeout_ms: u64,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            max_client: 4096,
            max_peer: 1024,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 600_000,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 20_000,
            max_streams_per_connection: 1024,
            request_timeout_ms: 600_000,
        }
    }
}

impl Connections {
    /// The client listener's limits.
    pub fn client_limits(&self) -> runnel_raft::listener::ListenLimits {
        self.limits(self.max_client, self.request_timeout_ms)
    }

    /// The peer listener's limits; a call may take as long as a snapshot install.
    pub fn peer_limits(
        &self,
        install_snapshot_timeout_ms: u64,
    ) -> runnel_raft::listener::ListenLimits {
        let request = self
            .request_timeout_ms
            .max(install_snapshot_timeout_ms + 60_000);
        self.limits(self.max_peer, request)
    }

    fn limits(&self, max: usize, request_ms: u64) -> runnel_raft::listener::ListenLimits {
        use std::time::Duration;
        runnel_raft::listener::ListenLimits {
            max_connections: max,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            keepalive_interval: Duration::from_millis(self.keepalive_interval_ms),
            keepalive_timeout: Duration::from_millis(self.keepalive_timeout_ms),
            max_concurrent_streams: self.max_streams_per_connection,
            request_timeout: Duration::from_millis(request_ms),
        }
    }
}

/// Background schedulers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Background {
    /// How often retention runs on every local partition; 0: never.
    pub retention_check_ms: u64,
    /// How often every group is checkpointed (besides `raft.snapshot_every_entries`); 0: never.
    pub checkpoint_interval_ms: u64,
    /// How often a leader hands groups to their preferred leaders (each once it has stayed caught
    /// up for a whole interval); 0: never.
    pub leader_balance_ms: u64,
    /// A wall-clock step larger than this (against the monotonic clock) is logged as a warning;
    /// time-based retention never follows a forward step either way (see docs/CONFIG.md).
    pub retention_clock_jump_ms: u64,
}

/// The data directory's disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Below this many free bytes on the data directory's file system the node refuses new
    /// writes (`STORAGE_ERROR`), reports `NOT_SERVING` and hands its leaderships away, before a
    /// write could fail mid-way; 0: no floor.
    pub min_free_bytes: u64,
    /// How often free space and the groups' health are checked.
    pub check_ms: u64,
    /// Bytes read through segment maps after which the pages read are dropped from this
    /// process's resident set (they stay in the page cache); 0: never.
    pub mapped_resident_bytes: u64,
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: String,
    /// A `tracing` filter (`info`, `runnel=debug,openraft=warn`, …); RUST_LOG overrides it.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 0,
            data_dir: PathBuf::from("./runnel-data"),
            listen: Listen::default(),
            advertise: Advertise::default(),
            cluster: Cluster::default(),
            raft: RaftSettings::default(),
            topic_defaults: TopicDefaults::default(),
            limits: Limits::default(),
            connections: Connections::default(),
            background: Background::default(),
            storage: Storage::default(),
            log: LogSettings::default(),
            nodes_in_process: 1,
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            client: "127.0.0.1:9092".into(),
            peer: "127.0.0.1:9093".into(),
        }
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            nodes: Vec::new(),
            data_groups: 3,
            join: false,
        }
    }
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 100,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_every_entries: 20_000,
            log_entries_kept: 1000,
            repair_from_replicas: true,
            unsafe_accept_lost_vote: false,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            min_free_bytes: 256 << 20,
            check_ms: 250,
            mapped_resident_bytes: 256 << 20,
        }
    }
}

impl Default for TopicDefaults {
    fn default() -> Self {
        TopicDefaults {
            partitions: 3,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            segment_bytes: 64 << 20,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 32 << 20,
            max_batch_bytes: 16 << 20,
            max_records_per_produce: 100_000,
            max_fetch_bytes: 16 << 20,
            max_wait_ms: 30_000,
            max_partitions_per_topic: 1024,
            max_offsets_per_request: 10_000,
            max_group_name_bytes: 249,
            produce_timeout_ms: 30_000,
            subscribe_buffer: 4,
            max_topics_per_request: 10_000,
            max_headers_per_record: 1_000,
            subscribe_memory_bytes: 256 << 20,
            subscribe_stall_ms: 30_000,
        }
    }
}

impl Limits {
    /// Element limits of the requests' repeated fields, by full field name, for the codec that
    /// checks requests before decoding them (every other repeated field: 10 000).
    pub fn wire_limits(&self) -> Vec<(&'static str, u32)> {
        let clamp = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        vec![
            (
                "runnel.v1.ProduceRequest.records",
                clamp(self.max_records_per_produce),
            ),
            ("runnel.v1.Record.headers", self.max_headers_per_record),
            (
                "runnel.v1.CommitOffsetsRequest.offsets",
                clamp(self.max_offsets_per_request),
            ),
            (
                "runnel.v1.FetchOffsetsRequest.partitions",
                clamp(self.max_offsets_per_request),
            ),
            (
                "runnel.v1.MetadataRequest.topics",
                self.max_topics_per_request,
            ),
        ]
    }
}

impl Default for Background {
    fn default() -> Self {
        Background {
            retention_check_ms: 60_000,
            checkpoint_interval_ms: 300_000,
            leader_balance_ms: 5_000,
            retention_clock_jump_ms: 60_000,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// Smallest segment size a topic may use.
pub const SEGMENT_BYTES_MIN: u64 = 1 << 20;
/// Largest segment size a topic may use.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;
/// Most data groups.
pub const DATA_GROUPS_MAX: u32 = 256;

fn check_addr(problems: &mut Vec<String>, what: &str, v: &str, bind: bool) {
    if bind {
        if v.parse::<SocketAddr>().is_err() {
            problems.push(format!("{what} = {v:?} is not an ip:port to bind"));
        }
    } else {
        match v.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => problems.push(format!("{what} = {v:?} is not host:port")),
        }
    }
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// This node's entry in `cluster.nodes`.
    pub fn me(&self) -> Option<&NodeEntry> {
        self.cluster.nodes.iter().find(|n| n.id == self.node_id)
    }

    /// The advertised client address of this node.
    pub fn advertised_client(&self) -> String {
        if self.advertise.client.is_empty() {
            self.me().map(|n| n.client.clone()).unwrap_or_default()
        } else {
            self.advertise.client.clone()
        }
    }

    /// Checks every setting and every relation between settings; returns every problem found.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.node_id == 0 {
            p.push("node_id must be > 0".to_string());
        }
        if self.data_dir.as_os_str().is_empty() {
            p.push("data_dir is empty".into());
        }
        check_addr(&mut p, "listen.client", &self.listen.client, true);
        check_addr(&mut p, "listen.peer", &self.listen.peer, true);
        if self.listen.client == self.listen.peer {
            p.push("listen.client and listen.peer must differ".into());
        }
        if self.cluster.nodes.is_empty() {
            p.push("cluster.nodes is empty: list every member (this node included)".into());
        }
        let mut ids = BTreeSet::new();
        for n in &self.cluster.nodes {
            if n.id == 0 {
                p.push("cluster.nodes: node id 0 is not allowed".into());
            }
            if !ids.insert(n.id) {
                p.push(format!("cluster.nodes: node id {} appears twice", n.id));
            }
            check_addr(
                &mut p,
                &format!("cluster.nodes[{}].peer", n.id),
                &n.peer,
                false,
            );
            check_addr(
                &mut p,
                &format!("cluster.nodes[{}].client", n.id),
                &n.client,
                false,
            );
        }
        if !self.cluster.nodes.is_empty() && self.node_id != 0 {
            match self.me() {
                None => p.push(format!(
                    "node_id {} is not in cluster.nodes ({:?})",
                    self.node_id, ids
                )),
                Some(me) => {
                    if !self.advertise.peer.is_empty() && self.advertise.peer != me.peer {
                        p.push(format!(
                            "advertise.peer = {:?} but cluster.nodes[{}].peer = {:?}: peers would dial the wrong address",
                            self.advertise.peer, me.id, me.peer
                        ));
                    }
                    if !self.advertise.client.is_empty() && self.advertise.client != me.client {
                        p.push(format!(
                            "advertise.client = {:?} but cluster.nodes[{}].client = {:?}",
                            self.advertise.client, me.id, me.client
                        ));
                    }
                }
            }
        }
        if !(1..=DATA_GROUPS_MAX).contains(&self.cluster.data_groups) {
            p.push(format!(
                "cluster.data_groups = {} must be in 1..={DATA_GROUPS_MAX}",
                self.cluster.data_groups
            ));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 {
            p.push("raft.heartbeat_ms must be > 0".into());
        }
        if r.election_timeout_min_ms <= r.heartbeat_ms {
            p.push(format!(
                "raft.election_timeout_min_ms ({}) must exceed raft.heartbeat_ms ({})",
                r.election_timeout_min_ms, r.heartbeat_ms
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            p.push(format!(
                "raft.election_timeout_max_ms ({}) must exceed raft.election_timeout_min_ms ({})",
                r.election_timeout_max_ms, r.election_timeout_min_ms
            ));
        }
        if r.snapshot_every_entries == 0 {
            p.push("raft.snapshot_every_entries must be > 0".into());
        }
        let t = &self.topic_defaults;
        if t.partitions == 0 || t.partitions > self.limits.max_partitions_per_topic {
            p.push(format!(
                "topic_defaults.partitions = {} must be in 1..=limits.max_partitions_per_topic ({})",
                t.partitions, self.limits.max_partitions_per_topic
            ));
        }
        if t.retention_ms == 0 || t.retention_ms < -1 {
            p.push("topic_defaults.retention_ms must be > 0 or -1".into());
        }
        if t.retention_bytes == 0 || t.retention_bytes < -1 {
            p.push("topic_defaults.retention_bytes must be > 0 or -1".into());
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&t.segment_bytes) {
            p.push(format!(
                "topic_defaults.segment_bytes = {} must be in {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}",
                t.segment_bytes
            ));
        }
        let l = &self.limits;
        if l.max_batch_bytes == 0 || l.max_batch_bytes > runnel_record::BATCH_BYTES_MAX {
            p.push(format!(
                "limits.max_batch_bytes must be in 1..={}",
                runnel_record::BATCH_BYTES_MAX
            ));
        }
        if l.max_request_bytes < l.max_batch_bytes + 4096 {
            p.push(format!(
                "limits.max_request_bytes ({}) must exceed limits.max_batch_bytes ({}) by at least 4096",
                l.max_request_bytes, l.max_batch_bytes
            ));
        }
        if l.max_request_bytes > runnel_raft::network::RPC_BYTES_MAX / 2 {
            p.push(format!(
                "limits.max_request_bytes must be at most {} (half the peer message limit)",
                runnel_raft::network::RPC_BYTES_MAX / 2
            ));
        }
        if l.max_batch_bytes as u64 > t.segment_bytes {
            p.push(format!(
                "limits.max_batch_bytes ({}) exceeds topic_defaults.segment_bytes ({}): such batches could never be stored",
                l.max_batch_bytes, t.segment_bytes
            ));
        }
        for (name, v) in [
            ("limits.max_records_per_produce", l.max_records_per_produce),
            ("limits.max_fetch_bytes", l.max_fetch_bytes),
            ("limits.max_offsets_per_request", l.max_offsets_per_request),
            ("limits.max_group_name_bytes", l.max_group_name_bytes),
            ("limits.subscribe_buffer", l.subscribe_buffer),
            (
                "limits.max_topics_per_request",
                l.max_topics_per_request as usize,
            ),
            (
                "limits.max_headers_per_record",
                l.max_headers_per_record as usize,
            ),
            ("limits.subscribe_memory_bytes", l.subscribe_memory_bytes),
            ("limits.subscribe_stall_ms", l.subscribe_stall_ms as usize),
        ] {
            if v == 0 {
                p.push(format!("{name} must be > 0"));
            }
        }
        let c = &self.connections;
        for (name, v) in [
            ("connections.max_client", c.max_client as u64),
            ("connections.max_peer", c.max_peer as u64),
            ("connections.handshake_timeout_ms", c.handshake_timeout_ms),
            ("connections.idle_timeout_ms", c.idle_timeout_ms),
            ("connections.keepalive_interval_ms", c.keepalive_interval_ms),
            ("connections.keepalive_timeout_ms", c.keepalive_timeout_ms),
            (
                "connections.max_streams_per_connection",
                c.max_streams_per_connection as u64,
            ),
            ("connections.request_timeout_ms", c.request_timeout_ms),
        ] {
            if v == 0 {
                p.push(format!("{name} must be > 0"));
            }
        }
        let longest_call = l.max_wait_ms.max(l.produce_timeout_ms);
        if c.request_timeout_ms <= longest_call {
            p.push(format!(
                "connections.request_timeout_ms ({}) must exceed the longest fetch wait and produce timeout ({longest_call})",
                c.request_timeout_ms
            ));
        }
        if l.max_partitions_per_topic == 0 {
            p.push("limits.max_partitions_per_topic must be > 0".into());
        }
        if l.produce_timeout_ms == 0 {
            p.push("limits.produce_timeout_ms must be > 0".into());
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            p.push(format!(
                "log.format = {:?} must be \"text\" or \"json\"",
                self.log.format
            ));
        }
        if self.storage.check_ms == 0 {
            p.push("storage.check_ms must be > 0".into());
        }
        if self.background.retention_clock_jump_ms == 0 {
            p.push("background.retention_clock_jump_ms must be > 0".into());
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Config {
        Config::from_toml(
            r#"
            node_id = 2
            data_dir = "/tmp/x"
            [listen]
            client = "0.0.0.0:9092"
            peer = "0.0.0.0:9093"
            [cluster]
            data_groups = 3
            nodes = [
              { id = 1, peer = "n1:9093", client = "n1:9092" },
              { id = 2, peer = "n2:9093", client = "n2:9092" },
              { id = 3, peer = "n3:9093", client = "n3:9092" },
            ]
            "#,
        )
        .unwrap()
    }

    #[test]
    fn example_is_valid_and_advertises_from_nodes() {
        let c = three();
        c.validate().unwrap();
        assert_eq!(c.advertised_client(), "n2:9092");
    }

    #[test]
    fn the_shipped_example_config_parses_and_validates() {
        let text = include_str!("../../../deploy/runneld.toml");
        Config::from_toml(text).unwrap().validate().unwrap();
    }

    #[test]
    fn the_shipped_example_lists_every_key() {
        let example: toml::Table = include_str!("../../../deploy/runneld.toml")
            .parse()
            .unwrap();
        let defaults: toml::Table = toml::to_string(&Config::default())
            .unwrap()
            .parse()
            .unwrap();
        for (k, v) in &defaults {
            match v {
                toml::Value::Table(t) => {
                    for key in t.keys() {
                        assert!(
                            example
                                .get(k)
                                .and_then(|e| e.as_table())
                                .is_some_and(|e| e.contains_key(key)),
                            "deploy/runneld.toml lacks [{k}] {key}"
                        );
                    }
                }
                _ => assert!(example.contains_key(k), "deploy/runneld.toml lacks {k}"),
            }
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::from_toml("node_idd = 1").unwrap_err();
        assert!(e.contains("node_idd"), "{e}");
    }

    #[test]
    fn validate_reports_every_problem() {
        let mut c = three();
        c.node_id = 9;
        c.cluster.data_groups = 0;
        c.raft.election_timeout_min_ms = 50;
        c.listen.peer = "nope".into();
        c.log.format = "xml".into();
        let p = c.validate().unwrap_err();
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p.iter().any(|m| m.contains("node_id 9")));
        assert!(p.iter().any(|m| m.contains("data_groups")));
        assert!(p.iter().any(|m| m.contains("election_timeout_min_ms")));
        assert!(p.iter().any(|m| m.contains("listen.peer")));
        assert!(p.iter().any(|m| m.contains("log.format")));
    }

    #[test]
    fn advertise_must_agree_with_the_bootstrap_list() {
        let mut c = three();
        c.advertise.peer = "elsewhere:1".into();
        let p = c.validate().unwrap_err();
        assert!(p[0].contains("advertise.peer"), "{p:?}");
    }
}
