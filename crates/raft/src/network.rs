//! The client half of the Raft transport: one tonic channel per peer shared by every group
//! (openraft-multi's `GroupRouter`), and a second one per peer for snapshots so a large transfer
//! never queues heartbeats behind it.

use std::collections::HashMap;
use std::future::Future;
use std::io::Read;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft_multi::{GroupNetworkAdapter, GroupRouter};
use runnel_proto::raft as pb;
use runnel_proto::raft::raft_transport_client::RaftTransportClient;
use tonic::transport::{Channel, Endpoint};

use crate::codec;
use crate::state_machine::Checkpoint;
use crate::types::{NodeAddr, TypeConfig};

/// Largest gRPC message between nodes: the biggest batch (64 MiB) plus entry framing, raised
/// deliberately from tonic's 4 MiB default.
pub const RPC_BYTES_MAX: usize = 96 << 20;
/// Bytes of file data per snapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

#[derive(Clone)]
struct Peer {
    addr: String,
    rpc: RaftTransportClient<Channel>,
    snapshots: RaftTransportClient<Channel>,
}

/// Connections to every peer, shared by all groups of a node.
#[derive(Clone, Default)]
pub struct Router {
    peers: Arc<RwLock<HashMap<u64, Peer>>>,
    /// Addresses this node was configured with; they win over the ones in Raft membership
    /// (each node may reach a peer by its own route: NAT, a proxy).
    pinned: Arc<RwLock<HashMap<u64, String>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

fn client(addr: &str) -> Result<RaftTransportClient<Channel>, Msg> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Msg(format!("bad peer address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10));
    Ok(RaftTransportClient::new(ep.connect_lazy())
        .max_decoding_message_size(RPC_BYTES_MAX)
        .max_encoding_message_size(RPC_BYTES_MAX))
}

impl Router {
    /// Dials `node` at `addr` from now on, whatever Raft membership says.
    pub fn pin_peer(&self, node: u64, addr: &str) {
        self.pinned
            .write()
            .expect("pinned lock")
            .insert(node, addr.to_string());
        self.connect(node, addr);
    }

    /// Records (or updates) where `node` listens, unless its address is pinned.
    pub fn set_peer(&self, node: u64, addr: &str) {
        let pinned = self.pinned.read().expect("pinned lock").get(&node).cloned();
        self.connect(node, pinned.as_deref().unwrap_or(addr));
    }

    fn connect(&self, node: u64, addr: &str) {
        if self
            .peers
            .read()
            .expect("peers lock")
            .get(&node)
            .is_some_and(|p| p.addr == addr)
        {
            return;
        }
        match (client(addr), client(addr)) {
            (Ok(rpc), Ok(snapshots)) => {
                let peer = Peer {
                    addr: addr.to_string(),
                    rpc,
                    snapshots,
                };
                self.peers.write().expect("peers lock").insert(node, peer);
            }
            (Err(e), _) | (_, Err(e)) => tracing::warn!(node, error = %e, "cannot reach peer"),
        }
    }

    fn peer(&self, node: u64) -> Result<Peer, Unreachable<TypeConfig>> {
        self.peers
            .read()
            .expect("peers lock")
            .get(&node)
            .cloned()
            .ok_or_else(|| Unreachable::new(&Msg(format!("no address for node {node}"))))
    }
}

fn status_err(s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Cancelled
        | tonic::Code::Unknown => RPCError::Unreachable(Unreachable::new(&s)),
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

fn decode_err(e: codec::DecodeError) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&e))
}

fn with_timeout<T>(mut req: tonic::Request<T>, option: &RPCOption) -> tonic::Request<T> {
    req.set_timeout(option.hard_ttl());
    req
}

impl GroupRouter<TypeConfig, u64> for Router {
    type SnapshotData = Checkpoint;

    async fn append_entries(
        &self,
        target: u64,
        group_id: u64,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut peer = self.peer(target).map_err(RPCError::Unreachable)?;
        let req = pb::AppendEntriesRequest {
            group_id,
            vote: Some(codec::vote_to(&rpc.vote)),
            prev_log_id: codec::opt_log_id_to(&rpc.prev_log_id),
            entries: rpc.entries.iter().map(codec::entry_to).collect(),
            leader_commit: codec::opt_log_id_to(&rpc.leader_commit),
        };
        let resp = peer
            .rpc
            .append_entries(with_timeout(tonic::Request::new(req), &option))
            .await
            .map_err(status_err)?;
        use pb::append_entries_response::Result as R;
        Ok(match resp.into_inner().result {
            Some(R::Success(_)) => AppendEntriesResponse::Success,
            Some(R::PartialSuccess(p)) => AppendEntriesResponse::PartialSuccess(
                codec::opt_log_id_from(&p.matching).map_err(decode_err)?,
            ),
            Some(R::Conflict(_)) => AppendEntriesResponse::Conflict,
            Some(R::HigherVote(v)) => {
                AppendEntriesResponse::HigherVote(codec::vote_from(&v).map_err(decode_err)?)
            }
            None => {
                return Err(RPCError::Network(NetworkError::new(&Msg(
                    "empty AppendEntries response".into(),
                ))));
            }
        })
    }

    async fn vote(
        &self,
        target: u64,
        group_id: u64,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.send_vote(target, group_id, rpc, option, false).await
    }

    async fn pre_vote(
        &self,
        target: u64,
        group_id: u64,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.send_vote(target, group_id, rpc, option, true).await
    }

    async fn full_snapshot(
        &self,
        target: u64,
        group_id: u64,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, Checkpoint>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut peer = self.peer(target)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::SnapshotChunk>(4);
        let start = pb::SnapshotStart {
            group_id,
            vote: Some(codec::vote_to(&vote)),
            last_log_id: codec::opt_log_id_to(&snapshot.meta.last_log_id),
            last_membership: Some(codec::stored_membership_to(&snapshot.meta.last_membership)),
            snapshot_id: snapshot.snapshot.manifest.id.clone(),
            manifest: snapshot
                .snapshot
                .manifest
                .encode()
                .map_err(|e| Unreachable::new(&e))?
                .into(),
        };
        let ck = snapshot.snapshot.clone();
        // Files are read on a blocking thread and handed over through a bounded channel, so a
        // slow receiver pushes back instead of buffering the checkpoint in memory.
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if tx
                .blocking_send(pb::SnapshotChunk {
                    kind: Some(pb::snapshot_chunk::Kind::Start(start)),
                })
                .is_err()
            {
                return Ok(());
            }
            for (i, f) in ck.manifest.files.iter().enumerate() {
                let mut file = std::fs::File::open(ck.dir.join(&f.path))?.take(f.len);
                let mut offset = 0u64;
                let mut crc = 0u32;
                loop {
                    let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    buf.truncate(n);
                    crc = crc32c::crc32c_append(crc, &buf);
                    if offset + n as u64 == f.len && crc != f.crc32c {
                        // The file changed on disk since the checkpoint vouched for it: ship
                        // nothing damaged, and have this replica repaired.
                        let why = format!(
                            "corruption in {} at byte 0: checkpoint file no longer matches the \
                             CRC its manifest recorded",
                            ck.dir.join(&f.path).display()
                        );
                        if let Some(d) = &ck.damage {
                            d.report(why.clone());
                        }
                        return Err(std::io::Error::other(why));
                    }
                    let data = pb::SnapshotData {
                        file_index: i as u32,
                        offset,
                        data: buf.into(),
                    };
                    offset += n as u64;
                    if tx
                        .blocking_send(pb::SnapshotChunk {
                            kind: Some(pb::snapshot_chunk::Kind::Data(data)),
                        })
                        .is_err()
                    {
                        return Ok(());
                    }
                }
            }
            Ok(())
        });
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.set_timeout(option.hard_ttl());
        let call = peer.snapshots.install_snapshot(req);
        let resp = tokio::select! {
            r = call => r,
            closed = cancel => {
                reader.abort();
                return Err(StreamingError::Closed(closed));
            }
        };
        let resp = resp.map_err(|s| match status_err(s) {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Unreachable(Unreachable::new(&other)),
        })?;
        let v = resp
            .into_inner()
            .vote
            .ok_or_else(|| Unreachable::new(&Msg("snapshot response without vote".into())))?;
        Ok(SnapshotResponse::new(
            codec::vote_from(&v).map_err(|e| Unreachable::new(&e))?,
        ))
    }

    async fn transfer_leader(
        &self,
        target: u64,
        group_id: u64,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut peer = self.peer(target).map_err(RPCError::Unreachable)?;
        let r = pb::TransferLeaderRequest {
            group_id,
            from_leader: Some(codec::vote_to(req.from_leader())),
            to_node_id: *req.to_node_id(),
            last_log_id: req.last_log_id().map(codec::log_id_to),
        };
        peer.rpc
            .transfer_leader(with_timeout(tonic::Request::new(r), &option))
            .await
            .map_err(status_err)?;
        Ok(Ok(()))
    }
}

impl Router {
    /// Tells `target` (the group's leader) that `node`'s log of `group_id` went back.
    pub(crate) async fn announce_reverted(
        &self,
        target: u64,
        group_id: u64,
        node: u64,
    ) -> Result<(), String> {
        let mut peer = self.peer(target).map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(pb::RevertedRequest {
            group_id,
            node_id: node,
        });
        req.set_timeout(Duration::from_secs(2));
        peer.rpc
            .reverted(req)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    async fn send_vote(
        &self,
        target: u64,
        group_id: u64,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
        pre_vote: bool,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut peer = self.peer(target).map_err(RPCError::Unreachable)?;
        let req = pb::VoteRequest {
            group_id,
            vote: Some(codec::vote_to(&rpc.vote)),
            last_log_id: codec::opt_log_id_to(&rpc.last_log_id),
            pre_vote,
            leadership_transfer: rpc.leadership_transfer,
        };
        let r = peer
            .rpc
            .vote(with_timeout(tonic::Request::new(req), &option))
            .await
            .map_err(status_err)?
            .into_inner();
        let vote = r
            .vote
            .as_ref()
            .ok_or_else(|| decode_err_msg("vote response without vote"))?;
        Ok(VoteResponse {
            vote: codec::vote_from(vote).map_err(decode_err)?,
            vote_granted: r.vote_granted,
            last_log_id: codec::opt_log_id_from(&r.last_log_id).map_err(decode_err)?,
        })
    }
}

fn decode_err_msg(m: &str) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&Msg(m.to_string())))
}

/// openraft's network factory for one group: learns peers' addresses from membership and hands
/// out adapters bound to (peer, group) over the shared [`Router`].
#[derive(Clone)]
pub struct GroupNetwork {
    router: Router,
    group_id: u64,
}

impl GroupNetwork {
    /// A factory for `group_id` over `router`.
    pub fn new(router: Router, group_id: u64) -> Self {
        GroupNetwork { router, group_id }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = GroupNetworkAdapter<TypeConfig, u64, Router>;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> Self::Network {
        self.router.set_peer(target, &node.addr);
        GroupNetworkAdapter::new(self.router.clone(), target, self.group_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr_of(r: &Router, node: u64) -> Option<String> {
        r.peer(node).ok().map(|p| p.addr)
    }

    #[tokio::test]
    async fn a_pinned_address_wins_over_membership() {
        let r = Router::default();
        r.set_peer(2, "127.0.0.1:1000");
        assert_eq!(addr_of(&r, 2).as_deref(), Some("127.0.0.1:1000"));
        r.pin_peer(2, "127.0.0.1:2000");
        r.set_peer(2, "127.0.0.1:1000"); // what membership says
        assert_eq!(addr_of(&r, 2).as_deref(), Some("127.0.0.1:2000"));
        r.set_peer(3, "127.0.0.1:3000"); // not pinned: membership decides
        assert_eq!(addr_of(&r, 3).as_deref(), Some("127.0.0.1:3000"));
    }
}
