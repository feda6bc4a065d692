//! The host API the server builds on: a node's Raft groups, its transport, and the calls a
//! broker needs (write, read, metrics, readiness, leadership, membership, shutdown).
//!
//! ```text
//!  <data dir>/groups/<group id>/wal/          the group's Raft log (WAL)
//!  <data dir>/groups/<group id>/partitions/   its partitions (state machine)
//!  <data dir>/groups/<group id>/checkpoints/  its snapshots
//! ```
//!
//! Longer than most files (over 600 lines): it is the whole API the server sees, one method per
//! capability.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ServerState, SnapshotPolicy};
use runnel_proto::raft as pb;
use runnel_proto::raft::raft_transport_server::RaftTransportServer;
use runnel_storage::LogConfig;
use runnel_storage::wal::{Wal, WalConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::log_store::LogStore;
use crate::network::{GroupNetwork, RPC_BYTES_MAX, Router};
use crate::state_machine::{GroupStore, StateMachine};
use crate::transport::{GroupEntry, Registry, TransportService};
use crate::types::{ApplyResult, Cmd, NodeAddr};

/// Longest the peer transport waits, at shutdown, for calls still in flight.
pub const TRANSPORT_STOP_GRACE: Duration = Duration::from_secs(5);

/// Longest a group may take at open to re-apply its committed log before serving.
pub const RECOVERY_WAIT: Duration = Duration::from_secs(300);

/// How a node runs its groups.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// This node's id; never reused by another node, even after a disk loss.
    pub node_id: u64,
    /// Where every group's data lives.
    pub data_dir: PathBuf,
    /// Leader heartbeat period. Default 100 ms.
    pub heartbeat_ms: u64,
    /// Election timeout range: a follower that hears nothing for a random time in it campaigns.
    /// Default 1000–2000 ms (a 2-core box under load stalls for hundreds of ms).
    pub election_timeout_ms: (u64, u64),
    /// Checkpoint after this many applied entries since the last one. Default 20 000.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a checkpoint, for followers slightly behind. Default 1000.
    pub log_entries_kept: u64,
    /// Time allowed to install a streamed snapshot. Default 10 minutes (large partitions).
    pub install_snapshot_timeout_ms: u64,
    /// Defaults for partitions (segment size, retention).
    pub partition_defaults: LogConfig,
    /// Group WAL settings.
    pub wal: WalConfig,
    /// Open a group whose durable data is damaged by cutting at the damage and catching up
    /// from the other replicas (not voting meanwhile), instead of refusing to start it.
    /// Default true. A group whose only voter is this node is never repaired.
    pub repair_from_replicas: bool,
    /// Open a group whose vote record (`wal/wal.meta`) is gone although it holds a log or a
    /// checkpoint, recreating it empty. A node that forgot its vote may vote twice in one term,
    /// so this is refused unless the operator says so. Default false.
    pub accept_lost_vote: bool,
    /// Limits of the peer listener (connections, handshake and idle timeouts, streams).
    pub listen: crate::listener::ListenLimits,
    /// Element limits of repeated request fields on the peer listener (this node's own).
    pub field_limits: runnel_proto::wire::FieldLimits,
}

impl HostConfig {
    /// Defaults for `node_id` storing under `data_dir`.
    pub fn new(node_id: u64, data_dir: impl Into<PathBuf>) -> Self {
        HostConfig {
            node_id,
            data_dir: data_dir.into(),
            heartbeat_ms: 100,
            election_timeout_ms: (1000, 2000),
            snapshot_every_entries: 20_000,
            log_entries_kept: 1000,
            install_snapshot_timeout_ms: 600_000,
            partition_defaults: LogConfig::default(),
            wal: WalConfig::default(),
            repair_from_replicas: true,
            accept_lost_vote: false,
            listen: crate::listener::ListenLimits {
                max_connections: 1024,
                // A snapshot install is one call: it must fit.
                request_timeout: Duration::from_millis(600_000 + 60_000),
                ..Default::default()
            },
            field_limits: runnel_proto::wire::FieldLimits::default(),
        }
    }

    fn raft_config(&self) -> Result<openraft::Config, HostError> {
        let c = openraft::Config {
            cluster_name: "runnel".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_ms.0,
            election_timeout_max: self.election_timeout_ms.1,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.log_entries_kept,
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        c.validate().map_err(|e| HostError::Config(e.to_string()))
    }
}

/// Opens a group's WAL and state, repairing damage when `wal.repair` is set: a damaged
/// checkpoint is dropped, and if the WAL can no longer rebuild the state from index 0 it is
/// emptied too (keeping the vote), so the state comes back from a leader's snapshot.
fn open_storage(
    dir: &std::path::Path,
    wal: WalConfig,
    defaults: LogConfig,
) -> Result<(Wal, Arc<GroupStore>), HostError> {
    let repair = wal.repair;
    let meta = dir.join("wal").join(runnel_storage::wal::META_FILE);
    let checkpoint = dir.join("checkpoints").join("CURRENT");
    if !meta.exists() && checkpoint.exists() && !wal.accept_missing_meta {
        return Err(HostError::Io(std::io::Error::other(format!(
            "{} is missing, but the group holds a checkpoint ({}): this node forgot its vote \
             and could vote twice in one term. Recover by wiping the data directory and \
             rejoining under a new node id (`runneld --join`, then `runnel cluster \
             replace-node`; docs/DEPLOY.md), or, knowing the risk, restart with \
             `raft.unsafe_accept_lost_vote = true`",
            meta.display(),
            checkpoint.display()
        ))));
    }
    let wal = Wal::open(dir.join("wal"), wal).map_err(std::io::Error::other)?;
    if !repair {
        return Ok((wal, GroupStore::open(dir, defaults)?));
    }
    let committed_before = wal
        .recovery()
        .repaired
        .as_ref()
        .and_then(|r| r.committed_before);
    let committed = wal.read_committed().map(|c| c.index);
    let (store, damage) = GroupStore::open_repairing(dir, defaults)?;
    if let Some(d) = damage
        && wal.purged().is_some()
    {
        let floor = [d.applied_index, committed_before, committed]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
        wal.reset_keeping_vote(floor)
            .map_err(std::io::Error::other)?;
    }
    Ok((wal, store))
}

/// A host-level failure.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The configuration is invalid.
    #[error("invalid raft configuration: {0}")]
    Config(String),
    /// This node does not host the group.
    #[error("unknown raft group {0}")]
    UnknownGroup(u64),
    /// Disk or startup failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Raft refused or failed.
    #[error("raft: {0}")]
    Raft(String),
    /// A wait ran out of time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

/// Why a write was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// This node is not the group's leader; retry at the leader when one is known.
    #[error("not the leader (leader: {leader_id:?} at {leader_addr:?})")]
    NotLeader {
        /// The leader's node id, if known.
        leader_id: Option<u64>,
        /// The leader's address, if known.
        leader_addr: Option<String>,
    },
    /// The entry may or may not have been committed (leadership changed under it): retry
    /// idempotently.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// This node does not host the group.
    #[error("unknown raft group {0}")]
    UnknownGroup(u64),
    /// The group is shutting down or failed.
    #[error("group unavailable: {0}")]
    Unavailable(String),
}

/// A write queued in a group's Raft log; resolves once it is committed and applied.
pub type Proposal =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Written, WriteError>> + Send>>;

fn client_write_error(e: ClientWriteError<crate::types::TypeConfig>) -> WriteError {
    match e {
        ClientWriteError::ForwardToLeader(f) => WriteError::NotLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.map(|n| n.addr),
        },
        ClientWriteError::LogEntryDiscarded(f) => {
            WriteError::Unknown(format!("leader changed to {:?}", f.leader_id))
        }
        e => WriteError::Unavailable(e.to_string()),
    }
}

/// A committed and applied write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Raft log index of the entry.
    pub index: u64,
    /// What the state machine did with it.
    pub result: ApplyResult,
}

/// A snapshot of one group's Raft state on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMetrics {
    /// The group.
    pub group_id: u64,
    /// This node.
    pub node_id: u64,
    /// The current leader, if known.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Last log index.
    pub last_log: Option<u64>,
    /// Committed index.
    pub committed: Option<u64>,
    /// Applied index.
    pub applied: Option<u64>,
    /// Term of the last applied entry.
    pub applied_term: Option<u64>,
    /// Index of the last checkpoint.
    pub snapshot: Option<u64>,
    /// Index up to which the log is purged.
    pub purged: Option<u64>,
    /// Voters of the current membership.
    pub voters: BTreeSet<u64>,
    /// Learners of the current membership.
    pub learners: BTreeSet<u64>,
    /// This node leads and has applied an entry of its own term: it may serve reads.
    pub ready: bool,
    /// High watermark of each partition of the group on this node.
    pub high_watermarks: BTreeMap<u64, u64>,
    /// On the leader: the last log index each replica is known to hold (None: not yet known).
    pub replication: BTreeMap<u64, Option<u64>>,
    /// This replica lost durable data and is re-replicating it: it neither votes nor campaigns.
    pub catching_up: bool,
    /// The group's Raft core stopped on this node, and why (a storage failure); it serves
    /// nothing and leads nothing until the group is restarted.
    pub stopped: Option<String>,
}

/// A node's Raft groups and transport.
pub struct RaftHost {
    cfg: HostConfig,
    raft_config: Arc<openraft::Config>,
    registry: Registry,
    router: Router,
    addr: std::net::SocketAddr,
    server: std::sync::Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
    listen_stats: Arc<crate::listener::ListenStats>,
}

impl std::fmt::Debug for RaftHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftHost")
            .field("node_id", &self.cfg.node_id)
            .field("addr", &self.addr)
            .finish()
    }
}

impl RaftHost {
    /// Starts the transport on `listener` (peers connect there) with no groups yet.
    pub async fn start(cfg: HostConfig, listener: TcpListener) -> Result<Self, HostError> {
        Self::start_with_routes(cfg, listener, tonic::service::Routes::default()).await
    }

    /// Starts the transport on `listener`, which also serves `extra` (the embedding server's
    /// node-to-node services), with no groups yet.
    pub async fn start_with_routes(
        cfg: HostConfig,
        listener: TcpListener,
        extra: tonic::service::Routes,
    ) -> Result<Self, HostError> {
        let raft_config = Arc::new(cfg.raft_config()?);
        std::fs::create_dir_all(cfg.data_dir.join("groups"))?;
        let registry = Registry::default();
        let addr = listener.local_addr()?;
        let svc = RaftTransportServer::new(TransportService {
            registry: registry.clone(),
        })
        .max_decoding_message_size(RPC_BYTES_MAX)
        .max_encoding_message_size(RPC_BYTES_MAX);
        let (tx, rx) = oneshot::channel::<()>();
        let listen_stats = Arc::new(crate::listener::ListenStats::default());
        let incoming =
            crate::listener::incoming(listener, &cfg.listen, "peer", Arc::clone(&listen_stats));
        let builder = cfg
            .listen
            .server()
            .layer(crate::listener::TrackCalls)
            .layer(crate::listener::ScopeLimits(cfg.field_limits.clone()));
        let server = tokio::spawn(async move {
            let mut builder = builder;
            let r = builder
                .add_routes(extra.add_service(svc))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "raft transport stopped");
            }
        });
        tracing::info!(node = cfg.node_id, %addr, "raft transport listening");
        Ok(RaftHost {
            cfg,
            raft_config,
            registry,
            router: Router::default(),
            addr,
            server: std::sync::Mutex::new(Some((tx, server))),
            listen_stats,
        })
    }

    /// Where the transport listens.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Counters of the peer listener (open, refused, timed-out connections).
    pub fn peer_listener_stats(&self) -> &crate::listener::ListenStats {
        &self.listen_stats
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    /// Opens (recovering from disk) and starts group `group_id` on this node.
    pub async fn open_group(&self, group_id: u64) -> Result<(), HostError> {
        if self.registry.get(group_id).is_some() {
            return Ok(());
        }
        let dir = self.cfg.data_dir.join("groups").join(group_id.to_string());
        let repair = self.cfg.repair_from_replicas;
        let wal_cfg = WalConfig {
            repair,
            accept_missing_meta: self.cfg.accept_lost_vote,
            ..self.cfg.wal.clone()
        };
        let (wal, store) = {
            let (dir, defaults) = (dir.clone(), self.cfg.partition_defaults.clone());
            tokio::task::spawn_blocking(move || open_storage(&dir, wal_cfg, defaults))
                .await
                .map_err(|e| HostError::Raft(e.to_string()))??
        };
        let floor = wal.catch_up_floor().map_err(std::io::Error::other)?;
        let sm = StateMachine::new(Arc::clone(&store));
        let network = GroupNetwork::new(self.router.clone(), group_id);
        let log = LogStore::new(wal);
        // A replica that lost entries must not resume a leadership its saved vote records.
        let config = match floor {
            None => Arc::clone(&self.raft_config),
            Some(_) => Arc::new(openraft::Config {
                enable_leader_restore: Some(false),
                ..(*self.raft_config).clone()
            }),
        };
        let raft = openraft::Raft::new(self.cfg.node_id, config, network, log.clone(), sm)
            .await
            .map_err(|e| HostError::Raft(e.to_string()))?;
        let catch_up = match floor {
            None => crate::repair::CatchUp::default(),
            Some(floor) => {
                let m = raft.metrics().borrow_watched().clone();
                let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
                if voters == [self.cfg.node_id] {
                    raft.shutdown().await.ok();
                    return Err(HostError::Io(std::io::Error::other(format!(
                        "group {group_id}: durable data was damaged and this node is the group's \
                         only voter, so no replica can restore it (see the error above)"
                    ))));
                }
                crate::repair::start(
                    group_id,
                    raft.clone(),
                    log.clone(),
                    self.router.clone(),
                    floor,
                )
            }
        };
        // Serve nothing until the state machine has re-applied everything this node knew to be
        // committed before it stopped: a restart must never show an older high watermark.
        if let Some(committed) = log.wal().read_committed().map(|p| p.index) {
            let mut rx = raft.metrics();
            let deadline = tokio::time::Instant::now() + RECOVERY_WAIT;
            loop {
                let applied = rx.borrow_watched().last_applied.map(|l| l.index);
                if applied >= Some(committed) {
                    break;
                }
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => {}
                    _ => {
                        return Err(HostError::Timeout(
                            RECOVERY_WAIT,
                            format!(
                                "group {group_id} to re-apply up to committed index {committed}"
                            ),
                        ));
                    }
                }
            }
        }
        self.registry.insert(
            group_id,
            GroupEntry {
                raft,
                store,
                log,
                catch_up,
            },
        );
        tracing::info!(node = self.cfg.node_id, group = group_id, "group started");
        Ok(())
    }

    /// Initializes a new group with `members` (node id → peer address) as its voters. Every
    /// member must be given the same set; calling it on an initialized group is a no-op.
    pub async fn initialize_group(
        &self,
        group_id: u64,
        members: &BTreeMap<u64, String>,
    ) -> Result<(), HostError> {
        let nodes = members
            .iter()
            .map(|(id, a)| {
                (
                    *id,
                    NodeAddr {
                        addr: a.clone(),
                        client_addr: String::new(),
                    },
                )
            })
            .collect();
        self.initialize_group_with(group_id, &nodes).await
    }

    /// Initializes a new group with `members` (node id → peer and client addresses) as its
    /// voters. Every member must be given the same set; on an initialized group it only
    /// registers the peers' addresses.
    pub async fn initialize_group_with(
        &self,
        group_id: u64,
        members: &BTreeMap<u64, NodeAddr>,
    ) -> Result<(), HostError> {
        let g = self.group(group_id)?;
        for (id, n) in members {
            self.router.set_peer(*id, &n.addr);
        }
        if g.raft
            .is_initialized()
            .await
            .map_err(|e| HostError::Raft(e.to_string()))?
        {
            return Ok(());
        }
        match g.raft.initialize(members.clone()).await {
            Ok(()) => Ok(()),
            // Another member initialized it first and its log already reached us.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(HostError::Raft(e.to_string())),
        }
    }

    /// Every node of the group's current membership (voters and learners) with its addresses.
    pub fn members(&self, group_id: u64) -> Option<BTreeMap<u64, NodeAddr>> {
        let g = self.registry.get(group_id)?;
        let m = g.raft.metrics().borrow_watched().clone();
        Some(
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.clone()))
                .collect(),
        )
    }

    fn group(&self, group_id: u64) -> Result<GroupEntry, HostError> {
        self.registry
            .get(group_id)
            .ok_or(HostError::UnknownGroup(group_id))
    }

    /// The group's state (partitions, offsets) for reads on this node.
    pub fn store(&self, group_id: u64) -> Option<Arc<GroupStore>> {
        self.registry.get(group_id).map(|g| g.store)
    }

    /// What the group's WAL recovery found when the group was opened on this node.
    pub fn wal_recovery(&self, group_id: u64) -> Option<runnel_storage::wal::WalRecovery> {
        self.registry
            .get(group_id)
            .map(|g| g.log.wal().recovery().clone())
    }

    /// Groups this node hosts.
    pub fn groups(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.registry.all().into_iter().map(|(id, _)| id).collect();
        v.sort_unstable();
        v
    }

    /// Proposes `cmd` to the group and waits until it is committed on a majority (each of which
    /// fdatasynced it) and applied here.
    pub async fn write(&self, group_id: u64, cmd: pb::Command) -> Result<Written, WriteError> {
        self.propose(group_id, cmd).await?.await
    }

    /// Queues `cmd` in the group's Raft log, returning once its place in the log order is fixed
    /// (behind every proposal queued before); the returned future resolves once it is applied,
    /// or with [`WriteError::Unknown`] if the group stops first.
    pub async fn propose(&self, group_id: u64, cmd: pb::Command) -> Result<Proposal, WriteError> {
        let g = self
            .registry
            .get(group_id)
            .ok_or(WriteError::UnknownGroup(group_id))?;
        let (responder, rx) = openraft::impls::ProgressResponder::complete_only();
        let mut metrics = g.raft.metrics();
        g.raft
            .write(Cmd(cmd))
            .responder(responder)
            .await
            .map_err(|e| WriteError::Unavailable(e.to_string()))?;
        // The answer normally comes through `rx`; a stopped core may never send or drop it, so
        // the wait also ends when the core has stopped (its metrics sender is gone).
        let stopped = async move {
            while metrics.borrow_watched().running_state.is_ok() {
                if metrics.changed().await.is_err() {
                    break;
                }
            }
        };
        Ok(Box::pin(async move {
            let stopped_first = || {
                WriteError::Unknown("the group stopped before the write's outcome was known".into())
            };
            tokio::select! {
                biased;
                r = rx => match r {
                    Ok(Ok(r)) => Ok(Written {
                        index: r.log_id.index,
                        result: r.data,
                    }),
                    Ok(Err(e)) => Err(client_write_error(e)),
                    Err(_) => Err(stopped_first()),
                },
                () = stopped => Err(stopped_first()),
            }
        }))
    }

    /// The group's current metrics on this node.
    pub fn metrics(&self, group_id: u64) -> Option<GroupMetrics> {
        let g = self.registry.get(group_id)?;
        let m = g.raft.metrics().borrow_watched().clone();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<u64> = mem.voter_ids().collect();
        let learners: BTreeSet<u64> = mem.learner_ids().collect();
        let applied_term = m.last_applied.map(|l| l.leader_id.term);
        let stopped = m.running_state.as_ref().err().map(|e| e.to_string());
        Some(GroupMetrics {
            group_id,
            node_id: self.cfg.node_id,
            // A stopped core's last metrics may still name this node: it leads nothing now.
            leader: m.current_leader.filter(|_| stopped.is_none()),
            term: m.current_term,
            last_log: m.last_log_index,
            committed: m.local_committed.map(|l| l.index),
            applied: m.last_applied.map(|l| l.index),
            applied_term,
            snapshot: m.snapshot.map(|l| l.index),
            purged: m.purged.map(|l| l.index),
            voters,
            learners,
            ready: m.state == ServerState::Leader
                && applied_term == Some(m.current_term)
                && stopped.is_none(),
            catching_up: g.catch_up.active(),
            stopped,
            high_watermarks: g
                .store
                .partitions()
                .into_iter()
                .filter_map(|p| g.store.offsets(p).map(|(hw, _)| (p, hw)))
                .collect(),
            replication: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, l)| (*id, l.as_ref().map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Waits until `pred` holds for the group's metrics, or `timeout` passes.
    pub async fn wait_until(
        &self,
        group_id: u64,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&GroupMetrics) -> bool,
    ) -> Result<GroupMetrics, HostError> {
        let g = self.group(group_id)?;
        let mut rx = g.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(m) = self.metrics(group_id)
                && pred(&m)
            {
                return Ok(m);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(HostError::Raft("group stopped".into())),
                Err(_) => return Err(HostError::Timeout(timeout, what.to_string())),
            }
        }
    }

    /// Asks the leader of a group (this node) to hand leadership to `to`.
    pub async fn transfer_leader(&self, group_id: u64, to: u64) -> Result<(), HostError> {
        let g = self.group(group_id)?;
        g.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| HostError::Raft(e.to_string()))
    }

    /// Writes a checkpoint of the group now (and purges the log behind it per policy).
    pub async fn checkpoint(&self, group_id: u64) -> Result<(), HostError> {
        let g = self.group(group_id)?;
        g.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| HostError::Raft(e.to_string()))
    }

    /// Adds `node_id` at `addr` as a learner of the group and waits until it has caught up.
    pub async fn add_learner(
        &self,
        group_id: u64,
        node_id: u64,
        addr: &str,
    ) -> Result<(), HostError> {
        let node = NodeAddr {
            addr: addr.to_string(),
            client_addr: String::new(),
        };
        self.add_learner_with(group_id, node_id, node).await
    }

    /// Adds `node_id` with its peer and client addresses as a learner of the group and waits
    /// until it has caught up.
    pub async fn add_learner_with(
        &self,
        group_id: u64,
        node_id: u64,
        node: NodeAddr,
    ) -> Result<(), HostError> {
        let g = self.group(group_id)?;
        self.router.set_peer(node_id, &node.addr);
        g.raft
            .add_learner(node_id, node, true)
            .await
            .map(|_| ())
            .map_err(|e| HostError::Raft(e.to_string()))
    }

    /// Dials each of `members` at the given peer address from now on, whatever addresses Raft
    /// membership records (the local configuration's view of the network wins).
    pub fn pin_peers(&self, members: &BTreeMap<u64, NodeAddr>) {
        for (id, n) in members {
            self.router.pin_peer(*id, &n.addr);
        }
    }

    /// Makes exactly `voters` the group's voters (learners among them are promoted, voters not
    /// listed are removed).
    pub async fn change_voters(
        &self,
        group_id: u64,
        voters: BTreeSet<u64>,
    ) -> Result<(), HostError> {
        let g = self.group(group_id)?;
        g.raft
            .change_membership(voters, false)
            .await
            .map(|_| ())
            .map_err(|e| HostError::Raft(e.to_string()))
    }

    /// Stops group `group_id` on this node and opens it again from disk: after a transient
    /// storage failure stopped it (a full disk, no file descriptors), or, with `verify`, to
    /// repair it after damage was found while serving (the next open checks every checkpoint
    /// file against its recorded CRC, and damaged state comes back from a replica).
    ///
    /// The old WAL handle is retired first, so nothing it still holds can write after the new
    /// one opened. While the group is closed this node answers for it as for a group it does
    /// not host. A failed open leaves it closed; call again to retry.
    pub async fn restart_group(
        &self,
        group_id: u64,
        verify: bool,
        why: &str,
    ) -> Result<(), HostError> {
        let dir = self.cfg.data_dir.join("groups").join(group_id.to_string());
        if let Some(g) = self.registry.remove(group_id) {
            tracing::warn!(group = group_id, reason = why, verify, "restarting group");
            if let Err(e) = g.raft.shutdown().await {
                tracing::debug!(group = group_id, error = %e, "shutdown of a stopped group");
            }
            g.store.retire();
            g.log.wal().retire(why);
        }
        if verify {
            runnel_storage::fsutil::write_atomic(
                &dir.join(crate::state_machine::VERIFY_MARKER),
                why.as_bytes(),
            )
            .map_err(std::io::Error::other)?;
        }
        self.open_group(group_id).await
    }

    /// Stops every group (joining their tasks) and the transport.
    pub async fn shutdown(&self) {
        for (id, g) in self.registry.all() {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(group = id, error = %e, "group shutdown");
            }
            self.registry.remove(id);
        }
        let server = self.server.lock().expect("server lock").take();
        if let Some((tx, mut task)) = server {
            let _ = tx.send(());
            // A peer may hold a call open (a snapshot stream whose sender stalled): the groups
            // are down already, so waiting longer than the grace for it only hangs the stop.
            if tokio::time::timeout(TRANSPORT_STOP_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(node = self.cfg.node_id, grace = ?TRANSPORT_STOP_GRACE,
                    "peer calls still open at shutdown: dropping them");
                task.abort();
            }
        }
    }
}

impl Drop for RaftHost {
    fn drop(&mut self) {
        if let Some((tx, task)) = self.server.get_mut().expect("server lock").take() {
            let _ = tx.send(());
            task.abort();
        }
    }
}
