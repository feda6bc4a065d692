//! The server half of the Raft transport: the `RaftTransport` gRPC service, routing every
//! request to its group's Raft by group id.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use openraft::async_runtime::WatchReceiver;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, TransferLeaderRequest, VoteRequest,
};
use openraft::storage::{Snapshot, SnapshotMeta};
use runnel_proto::raft as pb;
use runnel_proto::raft::raft_transport_server::RaftTransport;
use runnel_storage::manifest::Manifest;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::codec;
use crate::state_machine::{Checkpoint, GroupStore, Raft};
use crate::types::TypeConfig;

/// One group as the transport sees it.
#[derive(Clone)]
pub(crate) struct GroupEntry {
    pub(crate) raft: Raft,
    pub(crate) store: Arc<GroupStore>,
    pub(crate) log: crate::log_store::LogStore,
    /// Set while the replica catches up after a repair: it must not vote.
    pub(crate) catch_up: crate::repair::CatchUp,
}

/// The groups this node hosts, by id.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    groups: Arc<RwLock<HashMap<u64, GroupEntry>>>,
}

impl Registry {
    pub(crate) fn insert(&self, id: u64, g: GroupEntry) {
        self.groups.write().expect("registry lock").insert(id, g);
    }

    pub(crate) fn get(&self, id: u64) -> Option<GroupEntry> {
        self.groups.read().expect("registry lock").get(&id).cloned()
    }

    pub(crate) fn remove(&self, id: u64) -> Option<GroupEntry> {
        self.groups.write().expect("registry lock").remove(&id)
    }

    pub(crate) fn all(&self) -> Vec<(u64, GroupEntry)> {
        self.groups
            .read()
            .expect("registry lock")
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }

    fn group(&self, id: u64) -> Result<GroupEntry, Status> {
        self.get(id)
            .ok_or_else(|| Status::not_found(format!("unknown raft group {id}")))
    }
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// How far above this replica's own term a peer's term may be. Pre-vote keeps real terms
/// close together; a term this far ahead is a forged or broken message, and accepting it would
/// be saved with the vote for good.
pub const TERM_MARGIN: u64 = 1 << 20;

/// Refuses (and logs, at most once a second) a message whose term is implausibly far ahead.
fn check_term(
    g: &GroupEntry,
    group: u64,
    rpc: &str,
    vote: &crate::types::Vote,
) -> Result<(), Status> {
    let own = g.raft.metrics().borrow_watched().current_term;
    let theirs = vote.leader_id().term;
    if theirs > own.saturating_add(TERM_MARGIN) {
        static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
        let mut last = LAST.lock().expect("log limiter");
        if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
            *last = Some(std::time::Instant::now());
            tracing::warn!(
                group,
                rpc,
                own_term = own,
                their_term = theirs,
                from = vote.leader_id().node_id,
                "refused a peer message with a term far above this replica's"
            );
        }
        return Err(Status::invalid_argument(format!(
            "term {theirs} is more than {TERM_MARGIN} above this replica's term {own}"
        )));
    }
    Ok(())
}

/// Checks that an AppendEntries' entries follow `prev` one index at a time, with terms that
/// never decrease and never pass the sender's.
fn check_entries(
    vote: &crate::types::Vote,
    prev: Option<&crate::types::LogId>,
    entries: &[crate::types::Entry],
) -> Result<(), Status> {
    use openraft::entry::RaftEntry;
    let term = vote.leader_id().term;
    let first = prev.map_or(0, |p| p.index + 1);
    let mut last_term = prev.map_or(0, |p| p.leader_id.term);
    if last_term > term {
        return Err(bad("prev_log_id's term is above the sender's term"));
    }
    for (next, e) in (first..).zip(entries) {
        let id = e.log_id();
        if id.index != next {
            return Err(bad(format!(
                "entry index {} where {next} was expected",
                id.index
            )));
        }
        if id.leader_id.term < last_term || id.leader_id.term > term {
            return Err(bad(format!(
                "entry {} has term {}, outside {last_term}..={term}",
                id.index, id.leader_id.term
            )));
        }
        last_term = id.leader_id.term;
    }
    Ok(())
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft group stopped: {e}"))
}

/// The `RaftTransport` service.
#[derive(Clone)]
pub(crate) struct TransportService {
    pub(crate) registry: Registry,
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn vote(
        &self,
        req: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let r = req.into_inner();
        let g = self.registry.group(r.group_id)?;
        let vote =
            codec::vote_from(r.vote.as_ref().ok_or_else(|| bad("vote missing"))?).map_err(bad)?;
        check_term(&g, r.group_id, "vote", &vote)?;
        let last_log_id = codec::opt_log_id_from(&r.last_log_id).map_err(bad)?;
        if last_log_id.is_some_and(|l| l.leader_id.term > vote.leader_id().term) {
            return Err(bad("a candidate's last log term is above its vote's term"));
        }
        if g.catch_up.active() {
            // Lost entries are not back yet: refuse without touching the local vote.
            return Ok(Response::new(pb::VoteResponse {
                vote: Some(codec::vote_to(&vote)),
                vote_granted: false,
                last_log_id: None,
            }));
        }
        let rpc = VoteRequest {
            vote,
            last_log_id,
            leadership_transfer: r.leadership_transfer,
        };
        let resp = if r.pre_vote {
            g.raft.pre_vote(rpc).await
        } else {
            g.raft.vote(rpc).await
        }
        .map_err(fatal)?;
        Ok(Response::new(pb::VoteResponse {
            vote: Some(codec::vote_to(&resp.vote)),
            vote_granted: resp.vote_granted,
            last_log_id: codec::opt_log_id_to(&resp.last_log_id),
        }))
    }

    async fn append_entries(
        &self,
        req: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let r = req.into_inner();
        let g = self.registry.group(r.group_id)?;
        g.catch_up.check_announced(r.vote.as_ref())?;
        let rpc: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
            vote: codec::vote_from(r.vote.as_ref().ok_or_else(|| bad("vote missing"))?)
                .map_err(bad)?,
            prev_log_id: codec::opt_log_id_from(&r.prev_log_id).map_err(bad)?,
            entries: r
                .entries
                .iter()
                .map(codec::entry_from)
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            leader_commit: codec::opt_log_id_from(&r.leader_commit).map_err(bad)?,
        };
        check_term(&g, r.group_id, "append_entries", &rpc.vote)?;
        check_entries(&rpc.vote, rpc.prev_log_id.as_ref(), &rpc.entries)?;
        let sender_term = rpc.vote.leader_id().term;
        if rpc
            .leader_commit
            .as_ref()
            .is_some_and(|c: &crate::types::LogId| c.leader_id.term > sender_term)
        {
            return Err(bad("leader_commit's term is above the sender's term"));
        }
        use pb::append_entries_response::Result as R;
        let result = match g.raft.append_entries(rpc).await.map_err(fatal)? {
            AppendEntriesResponse::Success => R::Success(pb::Blank {}),
            AppendEntriesResponse::PartialSuccess(m) => R::PartialSuccess(pb::PartialSuccess {
                matching: codec::opt_log_id_to(&m),
            }),
            AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(codec::vote_to(&v)),
        };
        Ok(Response::new(pb::AppendEntriesResponse {
            result: Some(result),
        }))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| bad("empty snapshot stream"))??;
        let Some(pb::snapshot_chunk::Kind::Start(start)) = first.kind else {
            return Err(bad("a snapshot stream must begin with its start chunk"));
        };
        let g = self.registry.group(start.group_id)?;
        g.catch_up.check_announced(start.vote.as_ref())?;
        let manifest = Manifest::decode(&start.manifest).map_err(bad)?;
        let dir = g.store.incoming_dir(&manifest.id).map_err(fatal)?;
        let result = receive_files(&dir, &manifest, &mut stream).await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        let vote = codec::vote_from(start.vote.as_ref().ok_or_else(|| bad("vote missing"))?)
            .map_err(bad)?;
        check_term(&g, start.group_id, "install_snapshot", &vote)?;
        let meta = SnapshotMeta {
            last_log_id: codec::opt_log_id_from(&start.last_log_id).map_err(bad)?,
            last_membership: codec::stored_membership_from(
                start
                    .last_membership
                    .as_ref()
                    .ok_or_else(|| bad("membership missing"))?,
            )
            .map_err(bad)?,
        };
        let snapshot = Snapshot {
            meta,
            snapshot: Checkpoint {
                dir,
                manifest,
                damage: None,
            },
        };
        let resp = g
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(fatal)?;
        Ok(Response::new(pb::SnapshotResponse {
            vote: Some(codec::vote_to(&resp.vote)),
        }))
    }

    async fn reverted(
        &self,
        req: Request<pb::RevertedRequest>,
    ) -> Result<Response<pb::RevertedResponse>, Status> {
        self.reverted_impl(req.into_inner()).await?;
        Ok(Response::new(pb::RevertedResponse {}))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let r = req.into_inner();
        let g = self.registry.group(r.group_id)?;
        let from = codec::vote_from(
            r.from_leader
                .as_ref()
                .ok_or_else(|| bad("from_leader missing"))?,
        )
        .map_err(bad)?;
        check_term(&g, r.group_id, "transfer_leader", &from)?;
        // No catch-up check here: openraft starts the transfer's election only once this
        // replica holds the leader's whole log (`last_log_id`), so it has every committed
        // entry; refusing would leave the old leader stopped until an election timeout.
        let rpc = TransferLeaderRequest::new(
            from,
            r.to_node_id,
            codec::opt_log_id_from(&r.last_log_id).map_err(bad)?,
        );
        match g.raft.handle_transfer_leader(rpc).await.map_err(fatal)? {
            Ok(()) => Ok(Response::new(pb::TransferLeaderResponse {})),
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }
}

impl TransportService {
    async fn reverted_impl(&self, r: pb::RevertedRequest) -> Result<(), Status> {
        let g = self.registry.group(r.group_id)?;
        match g.raft.trigger().allow_next_revert(&r.node_id, true).await {
            Ok(Ok(())) => {
                tracing::warn!(
                    group = r.group_id,
                    node = r.node_id,
                    "replica reports a repaired (shorter) log: replicating to it from scratch"
                );
                Ok(())
            }
            Ok(Err(e)) => Err(Status::failed_precondition(e.to_string())),
            Err(e) => Err(fatal(e)),
        }
    }
}

type Receiving = Option<(usize, tokio::fs::File, u64, u32)>;

/// Closes the file being received, checking its length and CRC against the manifest.
async fn finish(manifest: &Manifest, cur: Receiving, done: &mut [bool]) -> Result<(), Status> {
    if let Some((i, mut f, len, crc)) = cur {
        let want = &manifest.files[i];
        if len != want.len || crc != want.crc32c {
            return Err(bad(format!(
                "file {} arrived with {len} bytes / CRC {crc:#010x}",
                want.path
            )));
        }
        f.flush().await.map_err(fatal)?;
        f.sync_all().await.map_err(fatal)?;
        done[i] = true;
    }
    Ok(())
}

/// Writes the streamed files of `manifest` under `dir`, checking order, sizes and CRCs.
async fn receive_files(
    dir: &std::path::Path,
    manifest: &Manifest,
    stream: &mut (impl tokio_stream::Stream<Item = Result<pb::SnapshotChunk, Status>> + Unpin),
) -> Result<(), Status> {
    let mut current: Receiving = None;
    let mut done = vec![false; manifest.files.len()];
    while let Some(chunk) = stream.next().await {
        let Some(pb::snapshot_chunk::Kind::Data(d)) = chunk?.kind else {
            return Err(bad("a second start chunk"));
        };
        let i = d.file_index as usize;
        if i >= manifest.files.len() {
            return Err(bad("file index outside the manifest"));
        }
        if current.as_ref().map(|c| c.0) != Some(i) {
            finish(manifest, current.take(), &mut done).await?;
            if done[i] {
                return Err(bad("a file was sent twice"));
            }
            let path: PathBuf = dir.join(&manifest.files[i].path);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(fatal)?;
            }
            let f = tokio::fs::File::create(&path).await.map_err(fatal)?;
            current = Some((i, f, 0, 0));
        }
        let cur = current.as_mut().expect("current file");
        if d.offset != cur.2 || cur.2 + d.data.len() as u64 > manifest.files[i].len {
            return Err(bad("snapshot chunk out of order or past the file's length"));
        }
        cur.1.write_all(&d.data).await.map_err(fatal)?;
        cur.2 += d.data.len() as u64;
        cur.3 = crc32c::crc32c_append(cur.3, &d.data);
    }
    finish(manifest, current.take(), &mut done).await?;
    // Empty files send no chunk: create them.
    for (i, f) in manifest.files.iter().enumerate() {
        if !done[i] {
            if f.len != 0 {
                return Err(bad(format!("file {} never arrived", f.path)));
            }
            let path = dir.join(&f.path);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(fatal)?;
            }
            tokio::fs::File::create(&path).await.map_err(fatal)?;
        }
    }
    // Every directory that received files is fsynced before the checkpoint is renamed into place.
    let mut dirs: Vec<PathBuf> = manifest
        .files
        .iter()
        .filter_map(|f| dir.join(&f.path).parent().map(PathBuf::from))
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        runnel_storage::fsutil::fsync_dir(d).map_err(fatal)?;
    }
    manifest.write(&dir.join("MANIFEST")).map_err(fatal)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use runnel_storage::manifest::ManifestFile;

    use super::*;

    fn chunk(file_index: u32, offset: u64, data: &[u8]) -> Result<pb::SnapshotChunk, Status> {
        Ok(pb::SnapshotChunk {
            kind: Some(pb::snapshot_chunk::Kind::Data(pb::SnapshotData {
                file_index,
                offset,
                data: data.to_vec().into(),
            })),
        })
    }

    /// A snapshot file damaged on its way (one bit of one chunk) is refused, whichever chunk
    /// it hit; the intact stream is accepted.
    #[tokio::test]
    async fn a_snapshot_file_damaged_on_its_way_is_refused() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let manifest = Manifest {
            id: "t".into(),
            files: vec![ManifestFile {
                path: "p1/00000000000000000000.log".into(),
                len: data.len() as u64,
                crc32c: crc32c::crc32c(&data),
            }],
            state: Default::default(),
        };
        let chunks: Vec<&[u8]> = data.chunks(4096).collect();
        let dir = tempfile::tempdir().unwrap();
        let good: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| chunk(0, (i * 4096) as u64, c))
            .collect();
        let mut s = tokio_stream::iter(good);
        receive_files(dir.path(), &manifest, &mut s).await.unwrap();
        for hit in 0..chunks.len() {
            let dir = tempfile::tempdir().unwrap();
            let bad: Vec<_> = chunks
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut c = c.to_vec();
                    if i == hit {
                        let mid = c.len() / 2;
                        c[mid] ^= 0x10;
                    }
                    chunk(0, (i * 4096) as u64, &c)
                })
                .collect();
            let mut s = tokio_stream::iter(bad);
            let e = receive_files(dir.path(), &manifest, &mut s)
                .await
                .expect_err("a damaged file must be refused");
            assert!(e.message().contains("CRC"), "{e}");
        }
    }
}
