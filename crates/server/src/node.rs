//! One running node: listeners, Raft groups, the metadata follower, the client API server and
//! the background schedulers (partition reconciler, leader balancer, retention, checkpoints).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use runnel_proto::api;
use runnel_raft::{HostConfig, NodeAddr, RaftHost};
use runnel_storage::LogConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::fdlimit;
use crate::late::Late;
use crate::metadata::{self, MetaImage};
use crate::schedulers::{balance_loop, checkpoint_loop, reconcile_loop, retention_loop};
use crate::service::{Api, Shared};
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
        // This node's request limits, in scope around every call both listeners serve.
        let field_limits = runnel_proto::wire::FieldLimits::new(cfg.limits.wire_limits());
        // Process-wide on purpose: it bounds this process's resident pages, which nodes
        // sharing a process (`runnel local`) share too; the last node started sets it.
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
        hcfg.field_limits = field_limits;
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

/// The services the client listener serves, as server reflection lists them.
pub const CLIENT_SERVICES: [&str; 5] = [
    "runnel.v1.Broker",
    "runnel.v1.Admin",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Server reflection over exactly [`CLIENT_SERVICES`] (not the Raft transport, whose types
/// share the descriptor set), in both versions clients ask for: `v1` and the older `v1alpha`
/// that many tools still use.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    let mut b = tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(runnel_proto::api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    for name in CLIENT_SERVICES {
        b = b.with_service_name(name);
    }
    b
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
    let reflection = match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => Some((v1, v1alpha)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "reflection disabled");
            None
        }
    };
    let (reflection_v1, reflection_v1alpha) = reflection.unzip();
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
        .layer(runnel_raft::listener::ScopeLimits(
            runnel_proto::wire::FieldLimits::new(shared.cfg.limits.wire_limits()),
        ))
        .add_service(health_svc)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
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
