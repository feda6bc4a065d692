//! A three-node cluster of real `runneld` processes on 127.0.0.1 with ephemeral ports, data
//! under a temp dir; every process is killed when the cluster is dropped.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use runnel_client::{Client, api};
use runnel_fault::ports::{PortLock, free_port};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// One node process.
pub struct Proc {
    pub id: u64,
    pub client: String,
    pub peer: String,
    pub data: PathBuf,
    pub log: PathBuf,
    /// `--nodes` for this node when it differs from the cluster's (a joining node).
    nodes_arg: Option<String>,
    join: bool,
    child: Option<Child>,
}

/// Three `runneld` processes.
pub struct Cluster {
    pub nodes: Vec<Proc>,
    ports: Vec<PortLock>,
    nodes_arg: String,
    data_groups: u32,
    /// `(soft, hard)` open-files limit the nodes start with.
    nofile: Option<(u64, u64)>,
    pub dir: tempfile::TempDir,
}

/// How to start a cluster beyond the defaults.
#[derive(Default)]
pub struct Options {
    /// Keys added to the `[background]` table of the nodes' config file.
    pub background: String,
    /// TOML tables appended to the nodes' config file.
    pub config: String,
    /// `(soft, hard)` open-files limit the nodes start with (set by `prlimit`).
    pub nofile: Option<(u64, u64)>,
}

impl Cluster {
    /// Starts three nodes with `data_groups` data groups.
    pub fn start(data_groups: u32) -> Cluster {
        Self::start_advertising(data_groups, |n| n.client.clone())
    }

    /// Starts three nodes whose bootstrap list advertises `advertised(node)` as each node's
    /// client address (it need not be where the node listens, as behind NAT).
    pub fn start_advertising(data_groups: u32, advertised: impl Fn(&Proc) -> String) -> Cluster {
        Self::start_full(data_groups, advertised, Options::default())
    }

    /// Starts three nodes with `data_groups` data groups and `opts`.
    pub fn start_with(data_groups: u32, opts: Options) -> Cluster {
        Self::start_full(data_groups, |n| n.client.clone(), opts)
    }

    fn start_full(
        data_groups: u32,
        advertised: impl Fn(&Proc) -> String,
        opts: Options,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        for id in 1..=3u64 {
            let (client, peer) = (free_port(), free_port());
            nodes.push(Proc {
                id,
                client: format!("127.0.0.1:{}", client.port),
                peer: format!("127.0.0.1:{}", peer.port),
                data: dir.path().join(format!("node-{id}")),
                log: dir.path().join(format!("node-{id}.log")),
                nodes_arg: None,
                join: false,
                child: None,
            });
            ports.extend([client, peer]);
        }
        // Settings no flag covers come from a config file; flags override it per node.
        let config = dir.path().join("runneld.toml");
        std::fs::write(
            &config,
            format!(
                "[background]\nretention_check_ms = 300\nleader_balance_ms = 2000\n{}\n{}",
                opts.background, opts.config
            ),
        )
        .unwrap();
        let nodes_arg = nodes
            .iter()
            .map(|n| format!("{}={}/{}", n.id, n.peer, advertised(n)))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            nodes,
            ports,
            nodes_arg,
            data_groups,
            nofile: opts.nofile,
            dir,
        };
        for id in 1..=3 {
            c.spawn(id);
        }
        c
    }

    fn spawn(&mut self, id: u64) {
        let groups = self.data_groups;
        let n = &mut self.nodes[id as usize - 1];
        let nodes_arg = n
            .nodes_arg
            .clone()
            .unwrap_or_else(|| self.nodes_arg.clone());
        assert!(n.child.is_none(), "node {id} already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .unwrap();
        let mut cmd = match self.nofile {
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_runneld"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_runneld")),
        };
        let child = cmd
            .arg("--config")
            .arg(self.dir.path().join("runneld.toml"))
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&n.data)
            .arg("--listen-client")
            .arg(&n.client)
            .arg("--listen-peer")
            .arg(&n.peer)
            .arg("--nodes")
            .arg(&nodes_arg)
            .arg("--data-groups")
            .arg(groups.to_string())
            .args(n.join.then_some("--join"))
            .env("RUST_LOG", "info,openraft=error")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn runneld");
        n.child = Some(child);
    }

    /// Every client address.
    pub fn bootstrap(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    /// A client, once some node answers (bounded wait).
    pub async fn client(&self) -> Client {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(self.bootstrap()).await {
                Ok(c) => return c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no node answered within 30 s: {e}\n{}", self.logs()),
            }
        }
    }

    /// Waits (bounded) until every group is led by its preferred leader, so the background
    /// balancer will not move a leader under a test that talks to one node directly.
    pub async fn wait_balanced(&self) {
        let client = self.client().await;
        let admin = client.admin();
        let addrs = self.bootstrap();
        wait_for(
            Duration::from_secs(60),
            "every group at its preferred leader",
            || {
                let (admin, addrs) = (&admin, &addrs);
                async move {
                    let mut groups = 0;
                    for (i, addr) in addrs.iter().enumerate() {
                        let id = i as u64 + 1;
                        let st = admin.cluster_status_at(addr).await.ok()?;
                        groups = groups.max(st.groups.len());
                        for g in &st.groups {
                            if g.preferred_leader == id && g.leader_id != id {
                                return None;
                            }
                        }
                    }
                    // Every group has a preferred leader among the three, and each reported it leads.
                    (groups > 0).then_some(())
                }
            },
        )
        .await;
    }

    /// SIGKILLs node `id`.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.nodes[id as usize - 1].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs node `id` and waits for it to exit (bounded); returns its exit status.
    pub fn terminate(&mut self, id: u64) -> std::process::ExitStatus {
        let mut c = self.nodes[id as usize - 1].child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {id} ignored SIGTERM for 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a new, empty node with the next id that joins the cluster (`--join`) instead of
    /// bootstrapping, listing `members` and itself; returns its id.
    pub fn start_joining_node(&mut self, members: &[u64]) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let (client, peer) = (free_port(), free_port());
        let p = Proc {
            id,
            client: format!("127.0.0.1:{}", client.port),
            peer: format!("127.0.0.1:{}", peer.port),
            data: self.dir.path().join(format!("node-{id}")),
            log: self.dir.path().join(format!("node-{id}.log")),
            nodes_arg: None,
            join: true,
            child: None,
        };
        let list = self
            .nodes
            .iter()
            .filter(|n| members.contains(&n.id))
            .chain(std::iter::once(&p))
            .map(|n| format!("{}={}/{}", n.id, n.peer, n.client))
            .collect::<Vec<_>>()
            .join(",");
        self.nodes.push(Proc {
            nodes_arg: Some(list),
            ..p
        });
        self.ports.extend([client, peer]);
        self.spawn(id);
        id
    }

    /// Sends `sig` (`STOP`, `CONT`, …) to node `id`'s process.
    pub fn signal(&self, id: u64, sig: &str) {
        let c = self.nodes[id as usize - 1].child.as_ref().expect("running");
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(c.id().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} node {id}");
    }

    /// Starts node `id` again on its data.
    pub fn restart(&mut self, id: u64) {
        self.spawn(id);
    }

    /// Node `id`'s process id.
    pub fn pid(&self, id: u64) -> u32 {
        self.nodes[id as usize - 1]
            .child
            .as_ref()
            .expect("node runs")
            .id()
    }

    /// The config file the nodes start with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("runneld.toml")
    }

    /// Whether node `id`'s process is still running.
    pub fn alive(&mut self, id: u64) -> bool {
        match self.nodes[id as usize - 1].child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// The tail of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            s += &format!("--- node {} log (last 30 lines) ---\n", n.id);
            for l in tail.into_iter().rev() {
                s += l;
                s += "\n";
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A raw Broker client for one node.
pub async fn broker(addr: &str) -> api::broker_client::BrokerClient<tonic::transport::Channel> {
    api::broker_client::BrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(128 << 20)
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A codec that sends bytes as they are: requests no well-behaved client could encode.
#[derive(Debug, Clone, Default)]
pub struct Raw;

impl Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining())))
    }
}

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// Sends `body` as the request of the gRPC method `path` at `addr`.
pub async fn raw_call(addr: &str, path: &'static str, body: Bytes) -> Result<Bytes, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut g = tonic::client::Grpc::new(ch).max_encoding_message_size(200 << 20);
    g.ready().await.unwrap();
    g.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(|r| r.into_inner())
}
