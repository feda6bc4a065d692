//! One running node: listeners, Raft groups, the metadata follower, the client API server and
//! the background schedulers (partition reconciler, leader balancer, retention, checkpoints).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runnel_proto::api;
use runnel_proto::raft as pb;
use runnel_raft::{HostConfig, NodeAddr, RaftHost};
use runnel_storage::LogConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::fdlimit;
use crate::late::Late;
use crate::metadata::{self, META_GROUP, META_PARTITION, MetaImage};
use crate::service::{Api, Shared, now_ms};
use crate::storage_health::{self, StorageHealth};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Config(Vec<String>),
    /// A listener could not be bound.
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Raft or storage failed at start.
    #[error("{0}")]
    Host(#[from] runnel_raft::HostError),
    /// Other I/O at start.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The node meant to lead `group` when every voter is healthy: voters (sorted) taken
/// round-robin by group id, so leaders spread evenly across nodes.
pub fn preferred_leader(group: u64, voters: &[u64]) -> Option<u64> {
    if voters.is_empty() {
        return None;
    }
    let mut v = voters.to_vec();
    v.sort_unstable();
    Some(v[(group as usize) % v.len()])
}

/// A running node.
pub struct Node {
    shared: Arc<Shared>,
    client_addr: SocketAddr,
    peer_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.shared.cfg.node_id)
            .field("client_addr", &self.client_addr)
            .field("peer_addr", &self.peer_addr)
            .finish()
    }
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

impl Node {
    /// Validates `cfg`, binds both listeners, opens (or bootstraps) every group and starts
    /// serving.
    pub async fn start(mut cfg: Config) -> Result<Node, StartError> {
        cfg.validate().map_err(StartError::Config)?;
        for (field, max) in cfg.limits.wire_limits() {
            runnel_proto::wire::set_field_limit(field, max);
        }
        runnel_storage::set_resident_budget(cfg.storage.mapped_resident_bytes);
        let fds = fdlimit::prepare(&cfg);
        tracing::info!(node = cfg.node_id, "{}", fds.describe());
        if fds.client_connections < cfg.connections.max_client
            || fds.peer_connections < cfg.connections.max_peer
        {
            tracing::warn!(
                configured_client = cfg.connections.max_client,
                configured_peer = cfg.connections.max_peer,
                client = fds.client_connections,
                peer = fds.peer_connections,
                "too few open files for the configured connection limits: lowered (raise `ulimit -n`)"
            );
            cfg.connections.max_client = fds.client_connections;
            cfg.connections.max_peer = fds.peer_connections;
        }
        let client_l = bind("listen.client", &cfg.listen.client).await?;
        let peer_l = bind("listen.peer", &cfg.listen.peer).await?;
        let client_addr = client_l.local_addr()?;
        let mut hcfg = HostConfig::new(cfg.node_id, &cfg.data_dir);
        hcfg.heartbeat_ms = cfg.raft.heartbeat_ms;
        hcfg.election_timeout_ms = (
            cfg.raft.election_timeout_min_ms,
            cfg.raft.election_timeout_max_ms,
        );
        hcfg.snapshot_every_entries = cfg.raft.snapshot_every_entries;
        hcfg.log_entries_kept = cfg.raft.log_entries_kept;
        hcfg.repair_from_replicas = cfg.raft.repair_from_replicas;
        hcfg.accept_lost_vote = cfg.raft.unsafe_accept_lost_vote;
        hcfg.listen = cfg
            .connections
            .peer_limits(hcfg.install_snapshot_timeout_ms);
        hcfg.partition_defaults = LogConfig {
            segment_bytes: cfg.topic_defaults.segment_bytes,
            ..LogConfig::default()
        };
        std::fs::create_dir_all(&cfg.data_dir)?;
        // The peer listener also answers the client API, for calls one node forwards to
        // another: advertised client addresses may only make sense outside (a host port, NAT).
        let (late_broker, late_admin) = (Late::default(), Late::default());
        let internal =
            tonic::service::Routes::new(late_broker.clone()).add_service(late_admin.clone());
        let host = Arc::new(RaftHost::start_with_routes(hcfg, peer_l, internal).await?);
        let peer_addr = host.local_addr();
        let members: BTreeMap<u64, NodeAddr> = cfg
            .cluster
            .nodes
            .iter()
            .map(|n| {
                (
                    n.id,
                    NodeAddr {
                        addr: n.peer.clone(),
                        client_addr: n.client.clone(),
                    },
                )
            })
            .collect();
        // This node's configuration says how it reaches each peer (its own route: NAT, a
        // proxy); that wins over the addresses Raft membership carries.
        host.pin_peers(&members);
        for g in 0..=u64::from(cfg.cluster.data_groups) {
            host.open_group(g).await?;
            if !cfg.cluster.join {
                host.initialize_group_with(g, &members).await?;
            }
        }
        let (meta_tx, meta_rx) = watch::channel(Arc::new(MetaImage::default()));
        let (stop, stop_rx) = watch::channel(false);
        let storage = Arc::new(StorageHealth::default());
        let shared = Arc::new(Shared::new(
            cfg.clone(),
            Arc::clone(&host),
            meta_rx,
            stop_rx.clone(),
            Arc::clone(&storage),
            fds,
        ));
        let hosted = shared.hosted_partitions();
        if hosted > fds.partitions {
            tracing::error!(
                hosted,
                budget = fds.partitions,
                "this node hosts more partitions than its open-files limit allows: raise `ulimit -n` (LimitNOFILE=, --ulimit nofile=) or groups will stop on EMFILE"
            );
        }
        let (health, health_svc) = tonic_health::server::health_reporter();
        set_serving(&health, true).await;
        let (broker, admin) = api_services(&shared);
        late_broker.set(broker);
        late_admin.set(admin);
        let mut tasks = vec![tokio::spawn(metadata::follow(
            Arc::clone(&host),
            meta_tx,
            stop_rx.clone(),
        ))];
        tasks.push(tokio::spawn(reconcile_loop(
            Arc::clone(&shared),
            stop_rx.clone(),
        )));
        if cfg.background.leader_balance_ms > 0 {
            tasks.push(tokio::spawn(balance_loop(
                Arc::clone(&shared),
                Duration::from_millis(cfg.background.leader_balance_ms),
                stop_rx.clone(),
            )));
        }
        if cfg.background.retention_check_ms > 0 {
            tasks.push(tokio::spawn(retention_loop(
                Arc::clone(&shared),
                Duration::from_millis(cfg.background.retention_check_ms),
                Duration::from_millis(cfg.background.retention_clock_jump_ms),
                stop_rx.clone(),
            )));
        }
        {
            let health = health.clone();
            let watch = storage_health::WatchConfig {
                groups: (0..=u64::from(cfg.cluster.data_groups)).collect(),
                data_dir: cfg.data_dir.clone(),
                min_free_bytes: cfg.storage.min_free_bytes,
                every: Duration::from_millis(cfg.storage.check_ms),
            };
            tasks.push(tokio::spawn(storage_health::watch_loop(
                Arc::clone(&host),
                watch,
                Arc::clone(&storage),
                move |serving| {
                    let health = health.clone();
                    tokio::spawn(async move { set_serving(&health, serving).await });
                },
                stop_rx.clone(),
            )));
        }
        if cfg.background.checkpoint_interval_ms > 0 {
            tasks.push(tokio::spawn(checkpoint_loop(
                Arc::clone(&host),
                Duration::from_millis(cfg.background.checkpoint_interval_ms),
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(serve(
            Arc::clone(&shared),
            client_l,
            health_svc,
            stop_rx.clone(),
        )));
        tracing::info!(
            node = cfg.node_id,
            client = %client_addr,
            peer = %peer_addr,
            advertised_client = %cfg.advertised_client(),
            groups = cfg.cluster.data_groups + 1,
            "runneld started"
        );
        Ok(Node {
            shared,
            client_addr,
            peer_addr,
            stop,
            tasks,
        })
    }

    /// The bound client address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The bound peer address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.shared.cfg.node_id
    }

    /// The node's Raft groups.
    pub fn host(&self) -> &Arc<RaftHost> {
        &self.shared.host
    }

    /// Resolves with the reason once a storage failure makes this node unfit to go on (an
    /// fsync failed, a group stopped for a cause that does not heal): the process should exit
    /// non-zero so that its supervisor restarts it and recovery runs from disk.
    pub async fn fatal(&self) -> String {
        let mut rx = self.shared.storage.watch();
        match rx.wait_for(|s| s.fatal.is_some()).await {
            Ok(s) => s.fatal.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops serving clients (in-flight calls finish), stops the schedulers, then every group
    /// and the peer transport.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.shared.host.shutdown().await;
        tracing::info!(node = self.shared.cfg.node_id, "runneld stopped");
    }
}

/// The Broker and Admin services of this node, with the configured message limits.
fn api_services(
    shared: &Arc<Shared>,
) -> (
    api::broker_server::BrokerServer<Api>,
    api::admin_server::AdminServer<Api>,
) {
    let limits = &shared.cfg.limits;
    let apis = Api::new(Arc::clone(shared));
    let broker = api::broker_server::BrokerServer::new(apis.clone())
        .max_decoding_message_size(limits.max_request_bytes)
        .max_encoding_message_size(limits.max_fetch_bytes.saturating_mul(2).max(64 << 20));
    let admin = api::admin_server::AdminServer::new(apis)
        .max_decoding_message_size(limits.max_request_bytes);
    (broker, admin)
}

/// Sets the health of the Broker and Admin services (the empty service name, "the process
/// answers", stays SERVING: liveness, not readiness).
async fn set_serving(health: &tonic_health::server::HealthReporter, serving: bool) {
    if serving {
        health
            .set_serving::<api::broker_server::BrokerServer<Api>>()
            .await;
        health
            .set_serving::<api::admin_server::AdminServer<Api>>()
            .await;
    } else {
        health
            .set_not_serving::<api::broker_server::BrokerServer<Api>>()
            .await;
        health
            .set_not_serving::<api::admin_server::AdminServer<Api>>()
            .await;
    }
}

async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    health_svc: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    mut stop: watch::Receiver<bool>,
) {
    let (broker, admin) = api_services(&shared);
    let reflection = match tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(runnel_proto::api::FILE_DESCRIPTOR_SET)
        .build_v1()
    {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "reflection disabled");
            None
        }
    };
    let limits = shared.cfg.connections.client_limits();
    let incoming = runnel_raft::listener::incoming(
        listener,
        &limits,
        "client",
        Arc::clone(&shared.client_listener),
    );
    let r = limits
        .server()
        .layer(runnel_raft::listener::TrackCalls)
        .add_service(health_svc)
        .add_optional_service(reflection)
        .add_service(broker)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "client API server stopped");
    }
}

async fn tick(every: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(every) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// On each group this node leads: create the partitions the metadata assigns to it and delete
/// the ones of deleted topics. Group 0's leader creates the metadata partition itself.
async fn reconcile_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let host = Arc::clone(&shared.host);
    let mut meta = shared.meta.clone();
    loop {
        for g in host.groups() {
            if !host.metrics(g).is_some_and(|m| m.ready) {
                continue;
            }
            let Some(store) = host.store(g) else { continue };
            let mut cmds = Vec::new();
            if g == META_GROUP {
                if store.offsets(META_PARTITION).is_none() {
                    cmds.push(create(META_PARTITION, -1, -1, 4 << 20));
                }
            } else {
                let img = Arc::clone(&meta.borrow());
                let want = img.partitions_of_group(g);
                let have = store.partitions();
                for (pid, s) in &want {
                    if !have.contains(pid) {
                        cmds.push(create(
                            *pid,
                            s.retention_ms,
                            s.retention_bytes,
                            s.segment_bytes,
                        ));
                    }
                }
                for pid in have {
                    // Ids below the counter were assigned once; absent now means deleted. An
                    // id at or above it belongs to a topic this node has not replayed yet.
                    if !want.contains_key(&pid) && pid < img.next_partition_id {
                        cmds.push(pb::Command {
                            kind: Some(pb::command::Kind::DeletePartition(pb::DeletePartition {
                                partition_id: pid,
                            })),
                        });
                    }
                }
            }
            for c in cmds {
                if let Err(e) = host.write(g, c).await {
                    tracing::debug!(group = g, error = %e, "reconcile write");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = meta.changed() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn create(partition_id: u64, retention_ms: i64, retention_bytes: i64, segment: u64) -> pb::Command {
    pb::Command {
        kind: Some(pb::command::Kind::CreatePartition(pb::CreatePartition {
            spec: Some(pb::PartitionSpec {
                partition_id,
                segment_bytes: segment,
                retention_ms,
                retention_bytes,
            }),
        })),
    }
}

/// Hysteresis for the leader balancer: a group's preferred replica must have been caught up at
/// every check for a whole interval before it is handed the group. A replica that has just come
/// back may be flapping, and a transfer to a node that dies meanwhile costs the group an election.
#[derive(Default)]
struct Settled(HashMap<u64, (u64, Instant)>);

impl Settled {
    /// Records one check of group `g`; true once `pref` has been caught up since `every` ago.
    fn observe(
        &mut self,
        g: u64,
        pref: u64,
        caught_up: bool,
        now: Instant,
        every: Duration,
    ) -> bool {
        if !caught_up {
            self.0.remove(&g);
            return false;
        }
        let since = self.0.entry(g).or_insert((pref, now));
        if since.0 != pref {
            *since = (pref, now);
        }
        now.duration_since(since.1) >= every
    }

    /// Forgets group `g` (this node no longer balances it).
    fn forget(&mut self, g: u64) {
        self.0.remove(&g);
    }
}

/// Hands each group this node leads to its preferred leader once that node has stayed caught up
/// for an interval, so leadership spreads evenly again after failures.
async fn balance_loop(shared: Arc<Shared>, every: Duration, mut stop: watch::Receiver<bool>) {
    let host = Arc::clone(&shared.host);
    let me = host.node_id();
    let mut last_try: HashMap<u64, Instant> = HashMap::new();
    let mut settled = Settled::default();
    while tick(every, &mut stop).await {
        for g in host.groups() {
            let Some(m) = host.metrics(g) else {
                settled.forget(g);
                continue;
            };
            if m.leader != Some(me) || !m.ready {
                settled.forget(g);
                continue;
            }
            let voters: Vec<u64> = m.voters.iter().copied().collect();
            let Some(pref) = preferred_leader(g, &voters) else {
                continue;
            };
            if pref == me {
                settled.forget(g);
                continue;
            }
            let caught_up = matches!(
                (m.replication.get(&pref), m.last_log),
                (Some(Some(matched)), Some(last)) if *matched + 16 >= last
            );
            if !settled.observe(g, pref, caught_up, Instant::now(), every)
                || last_try.get(&g).is_some_and(|t| t.elapsed() < every * 3)
            {
                continue;
            }
            last_try.insert(g, Instant::now());
            tracing::info!(
                group = g,
                to = pref,
                "handing leadership to the preferred leader"
            );
            if let Err(e) = host.transfer_leader(g, pref).await {
                tracing::debug!(group = g, error = %e, "leader transfer");
            }
        }
    }
}

/// The clock time-based retention is judged against: the earlier of the wall clock and the
/// wall clock at start plus the monotonic time since, so a forward step of this node's clock
/// never ages data (a backward one only delays retention). A step larger than `jump_max` is
/// logged.
struct RetentionClock {
    wall_at_start: i64,
    started: Instant,
    jump_max: Duration,
    warned: bool,
}

impl RetentionClock {
    fn new(jump_max: Duration) -> Self {
        RetentionClock {
            wall_at_start: now_ms(),
            started: Instant::now(),
            jump_max,
            warned: false,
        }
    }

    /// The time to judge retention by, given the wall clock `wall` and the monotonic `mono`.
    fn judge(&mut self, wall: i64, mono: Instant) -> i64 {
        let elapsed = mono.duration_since(self.started).as_millis() as i64;
        let guarded = self.wall_at_start.saturating_add(elapsed);
        let step = wall.saturating_sub(guarded);
        if step.unsigned_abs() > self.jump_max.as_millis() as u64 {
            if !self.warned {
                tracing::warn!(
                    step_ms = step,
                    wall,
                    guarded,
                    "the wall clock stepped against the monotonic clock: time-based retention \
                     follows the monotonic clock, not the step, until the node restarts"
                );
                self.warned = true;
            }
        } else {
            self.warned = false;
        }
        wall.min(guarded)
    }
}

/// The time a quorum of clocks agrees has at least passed: the lower median of this node's
/// (guarded) clock and the peers' that answered, and never later than this node's own; `None`
/// when fewer than a majority of the `cluster` nodes answered. One clock stepped forward, even
/// one that was wrong when its node started, cannot make data look old.
pub fn quorum_clock(own: i64, peers: &[i64], cluster: usize) -> Option<i64> {
    let mut all: Vec<i64> = std::iter::once(own).chain(peers.iter().copied()).collect();
    if all.len() < cluster / 2 + 1 {
        return None;
    }
    all.sort_unstable();
    Some(all[(all.len() - 1) / 2].min(own))
}

/// On each group this node leads and can serve: asks each partition's log what retention is
/// due and proposes it (`TrimLog`), so every replica deletes the same records. Age is judged
/// by [`quorum_clock`]; without a quorum of clocks only size-based retention runs.
async fn retention_loop(
    shared: Arc<Shared>,
    every: Duration,
    jump_max: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let host = Arc::clone(&shared.host);
    let mut clock = RetentionClock::new(jump_max);
    while tick(every, &mut stop).await {
        let own = clock.judge(now_ms(), Instant::now());
        let leads = host
            .groups()
            .into_iter()
            .any(|g| host.metrics(g).is_some_and(|m| m.ready));
        if !leads {
            continue;
        }
        let peers = shared.peer_clocks(Duration::from_secs(2)).await;
        let cluster = shared.cfg.cluster.nodes.len().max(peers.len() + 1);
        let now = quorum_clock(own, &peers, cluster).unwrap_or_else(|| {
            tracing::warn!(
                answered = peers.len(),
                cluster,
                "no quorum of clocks: time-based retention waits, size-based retention runs"
            );
            i64::MIN // nothing is old against the beginning of time
        });
        for g in host.groups() {
            if !host.metrics(g).is_some_and(|m| m.ready) {
                continue;
            }
            let Some(store) = host.store(g) else { continue };
            for t in store.retention_proposals(now) {
                let (p, start) = (t.partition_id, t.log_start);
                let cmd = pb::Command {
                    kind: Some(pb::command::Kind::TrimLog(t)),
                };
                match host.write(g, cmd).await {
                    Ok(_) => tracing::info!(
                        group = g,
                        partition = p,
                        log_start = start,
                        "retention moved the log start on every replica"
                    ),
                    Err(e) => {
                        tracing::debug!(group = g, partition = p, error = %e, "retention write");
                        break;
                    }
                }
            }
        }
    }
}

async fn checkpoint_loop(host: Arc<RaftHost>, every: Duration, mut stop: watch::Receiver<bool>) {
    while tick(every, &mut stop).await {
        for g in host.groups() {
            let Some(m) = host.metrics(g) else { continue };
            if m.applied > m.snapshot
                && let Err(e) = host.checkpoint(g).await
            {
                tracing::warn!(group = g, error = %e, "scheduled checkpoint");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancer_waits_until_the_preferred_replica_stayed_caught_up_an_interval() {
        let every = Duration::from_secs(5);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut s = Settled::default();
        assert!(!s.observe(1, 3, true, at(0), every), "just caught up");
        assert!(!s.observe(1, 3, true, at(4), every));
        assert!(
            s.observe(1, 3, true, at(5), every),
            "caught up a whole interval"
        );
        // Falling behind once starts the wait over.
        assert!(!s.observe(1, 3, false, at(6), every));
        assert!(!s.observe(1, 3, true, at(7), every));
        assert!(s.observe(1, 3, true, at(12), every));
        // Another preferred replica (membership changed) starts over too, per group.
        assert!(!s.observe(1, 2, true, at(13), every));
        assert!(!s.observe(2, 3, true, at(13), every));
        assert!(s.observe(1, 2, true, at(18), every));
        s.forget(1);
        assert!(!s.observe(1, 2, true, at(19), every));
    }

    #[test]
    fn one_clock_ahead_cannot_age_data_and_no_quorum_means_no_time() {
        const DAY: i64 = 24 * 3600 * 1000;
        let t = 1_700_000_000_000;
        // This node 8 days ahead (even from its start): the peers win.
        assert_eq!(quorum_clock(t + 8 * DAY, &[t, t + 5], 3), Some(t + 5));
        assert_eq!(quorum_clock(t + 8 * DAY, &[t], 3), Some(t), "one peer down");
        // A peer ahead: never later than our own clock.
        assert_eq!(quorum_clock(t, &[t + 8 * DAY, t + 1], 3), Some(t));
        // Behind only delays.
        assert_eq!(quorum_clock(t, &[t - DAY, t - DAY], 3), Some(t - DAY));
        // No majority of clocks: no time-based judgement.
        assert_eq!(quorum_clock(t, &[], 3), None);
        assert_eq!(quorum_clock(t, &[t], 5), None);
        assert_eq!(quorum_clock(t, &[], 1), Some(t));
    }

    #[test]
    fn preferred_leaders_spread_evenly() {
        let voters = [3, 1, 2];
        let mut count: BTreeMap<u64, usize> = BTreeMap::new();
        for g in 0..9 {
            *count
                .entry(preferred_leader(g, &voters).unwrap())
                .or_default() += 1;
        }
        assert_eq!(count.values().copied().collect::<Vec<_>>(), vec![3, 3, 3]);
        assert_eq!(preferred_leader(0, &[]), None);
    }
}
