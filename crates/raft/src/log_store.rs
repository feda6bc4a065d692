//! openraft's log store over the storage crate's group WAL.
//!
//! Appends go to the WAL's page cache and return; the WAL's flusher fdatasyncs and completes
//! openraft's `IOFlushed` callbacks (group commit). Recently appended entries stay in an
//! in-memory cache so replication to followers seldom reads the WAL back.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::vote::RaftLeaderId;
use runnel_storage::wal::{Entry as WalEntry, LogPosition, Wal};

use crate::codec;
use crate::types::{Entry, LogId, TypeConfig, Vote};

/// Bytes of recent entries kept in memory for replication.
pub const ENTRY_CACHE_BYTES_MAX: usize = 64 << 20;
/// Most payload bytes one `limited_get_log_entries` call returns (at least one entry).
pub const READ_BYTES_MAX: usize = 8 << 20;

fn io_err(e: runnel_storage::StorageError) -> io::Error {
    io::Error::other(e)
}

#[derive(Default)]
struct Cache {
    entries: BTreeMap<u64, (Entry, usize)>,
    bytes: usize,
}

impl Cache {
    fn insert(&mut self, e: Entry, size: usize) {
        self.bytes += size;
        if let Some((_, old)) = self.entries.insert(e.log_id.index, (e, size)) {
            self.bytes -= old;
        }
        while self.bytes > ENTRY_CACHE_BYTES_MAX {
            let Some((_, (_, s))) = self.entries.pop_first() else {
                break;
            };
            self.bytes -= s;
        }
    }

    fn remove_from(&mut self, index: u64) {
        for (_, (_, s)) in self.entries.split_off(&index) {
            self.bytes -= s;
        }
    }

    fn remove_upto(&mut self, index: u64) {
        let keep = self.entries.split_off(&(index + 1));
        for (_, (_, s)) in std::mem::replace(&mut self.entries, keep) {
            self.bytes -= s;
        }
    }
}

struct Inner {
    wal: Wal,
    cache: Mutex<Cache>,
}

/// A Raft group's log: openraft's `RaftLogStorage` over a [`Wal`].
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl LogStore {
    /// Wraps an opened WAL.
    pub fn new(wal: Wal) -> Self {
        LogStore {
            inner: Arc::new(Inner {
                wal,
                cache: Mutex::default(),
            }),
        }
    }

    /// The underlying WAL.
    pub fn wal(&self) -> &Wal {
        &self.inner.wal
    }

    fn range(&self, range: impl RangeBounds<u64>) -> (u64, u64) {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let next = self
            .inner
            .wal
            .last()
            .map_or(self.inner.wal.first_index(), |l| l.index + 1);
        let end = match range.end_bound() {
            Bound::Included(&e) => e + 1,
            Bound::Excluded(&e) => e,
            Bound::Unbounded => next,
        };
        (start.max(self.inner.wal.first_index()), end.min(next))
    }

    fn read(&self, start: u64, end: u64, max_bytes: usize) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut at = start;
        let mut bytes = 0;
        while at < end && (bytes < max_bytes || out.is_empty()) {
            let cached = {
                let c = self.inner.cache.lock().expect("cache lock");
                c.entries.get(&at).map(|(e, s)| (e.clone(), *s))
            };
            if let Some((e, s)) = cached {
                bytes += s;
                out.push(e);
                at += 1;
                continue;
            }
            // Not cached: read a run from the WAL up to the next cached entry.
            let run_end = {
                let c = self.inner.cache.lock().expect("cache lock");
                c.entries.range(at..end).next().map_or(end, |(i, _)| *i)
            };
            let got = self
                .inner
                .wal
                .read(at, run_end, max_bytes.saturating_sub(bytes).max(1))
                .map_err(io_err)?;
            if got.is_empty() {
                break;
            }
            for w in got {
                bytes += w.payload.len();
                let e = codec::decode_entry(&w.payload)?;
                if e.log_id.index != w.index {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WAL index disagrees with its entry",
                    ));
                }
                out.push(e);
                at += 1;
            }
        }
        Ok(out)
    }

    fn log_id_of(&self, index: u64) -> io::Result<Option<LogId>> {
        Ok(self.read(index, index + 1, 1)?.pop().map(|e| e.log_id))
    }
}

fn position(l: &LogId) -> LogPosition {
    LogPosition {
        term: l.leader_id.term,
        leader_node: l.leader_id.node_id,
        index: l.index,
    }
}

fn log_id(p: &LogPosition) -> LogId {
    LogId::new(crate::types::LeaderId::new(p.term, p.leader_node), p.index)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = self.range(range);
        if start >= end {
            return Ok(Vec::new());
        }
        self.read(start, end, usize::MAX)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self.inner.wal.read_vote() {
            Some(b) => Ok(Some(codec::decode_vote(&b)?)),
            None => Ok(None),
        }
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = self.range(start..end);
        if start >= end {
            return Ok(Vec::new());
        }
        self.read(start, end, READ_BYTES_MAX)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let wal = &self.inner.wal;
        let purged = wal.purged().map(|p| log_id(&p));
        let last = match wal.last() {
            Some(p) if Some(p.index) != purged.map(|l| l.index) => self.log_id_of(p.index)?,
            _ => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let s = self.clone();
        let b = codec::encode_vote(vote);
        blocking(move || s.inner.wal.save_vote(&b).map_err(io_err)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Recorded off openraft's path: its core would otherwise wait for an fdatasync before
        // every apply. The WAL's committer makes it durable a moment later (after the entries it
        // covers). Nothing depends on it being durable at once: a leader serves reads only after
        // committing an entry of its own term, and a restart re-learns the rest from the leader.
        let Some(c) = committed else { return Ok(()) };
        self.inner
            .wal
            .record_committed(position(&c))
            .map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.inner.wal.read_committed().map(|p| log_id(&p)))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut wal_entries = Vec::new();
        let mut cached = Vec::new();
        for e in entries {
            let payload = codec::encode_entry(&e);
            wal_entries.push(WalEntry {
                index: e.log_id.index,
                term: e.log_id.leader_id.term,
                payload: payload.clone(),
            });
            cached.push((e, payload.len()));
        }
        let cb =
            Box::new(move |r: runnel_storage::Result<()>| callback.io_completed(r.map_err(io_err)));
        self.inner
            .wal
            .append(&wal_entries, Some(cb))
            .map_err(io_err)?;
        let mut c = self.inner.cache.lock().expect("cache lock");
        for (e, s) in cached {
            c.insert(e, s);
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let s = self.clone();
        let from = match last_log_id {
            Some(l) => l.index + 1,
            None => s.inner.wal.first_index(),
        };
        s.inner.cache.lock().expect("cache lock").remove_from(from);
        blocking(move || s.inner.wal.truncate_from(from).map_err(io_err)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let s = self.clone();
        s.inner
            .cache
            .lock()
            .expect("cache lock")
            .remove_upto(log_id.index);
        blocking(move || s.inner.wal.purge_upto(position(&log_id)).map_err(io_err)).await
    }
}
