//! One segment: a `.log` file, preallocated in steps as it grows, mapped with [`SharedMap`],
//! plus its sparse indexes.
//!
//! Files are named by the 20-digit base offset: `00000000000000000000.log`, `.index`,
//! `.timeindex`. A new segment is created under a temp name with its blocks reserved, fsynced,
//! renamed and its directory fsynced before it is mapped, so a crash never leaves a half-created
//! segment under a real name.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::error::{IoContext, Result, StorageError};
use crate::fsutil::{self, file_stem};
use crate::index::{SegmentIndex, SegmentSummary};
use crate::mmap::{MapWriter, SharedMap};
use runnel_record::{self as batch, BatchHeader, RecordBatch};

/// Extension of segment data files.
pub const LOG_EXT: &str = "log";
/// Extension of sealed offset-index files.
pub const INDEX_EXT: &str = "index";
/// Extension of sealed time-index files.
pub const TIME_INDEX_EXT: &str = "timeindex";

/// A segment shared between the writer and readers.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: u64,
    pub(crate) dir: PathBuf,
    map: RwLock<Arc<SharedMap>>,
    index: RwLock<SegmentIndex>,
    next_offset: AtomicU64,
    max_timestamp: AtomicI64,
}

/// A walk over a segment's batches: the next byte position, the offset the batch there must
/// start at, and the epoch runs its epoch must match.
struct Walk {
    expected: u64,
    pos: usize,
    epochs: Vec<(u32, i32)>,
}

impl Walk {
    fn advance(&mut self, h: &BatchHeader) {
        self.pos += h.total_len();
        self.expected = h.next_offset();
    }
}

/// Batches read from one segment: whole batches, back to back, sharing the segment's map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSlice {
    /// The batches' bytes (empty when nothing was readable).
    pub bytes: Bytes,
    /// Base offset of the first batch.
    pub first_offset: u64,
    /// Offset after the last batch; where the next read continues.
    pub next_offset: u64,
}

impl Segment {
    pub(crate) fn path(&self, ext: &str) -> PathBuf {
        segment_path(&self.dir, self.base_offset, ext)
    }

    pub(crate) fn new(
        dir: &Path,
        base_offset: u64,
        map: Arc<SharedMap>,
        index: SegmentIndex,
        summary: SegmentSummary,
    ) -> Self {
        Segment {
            base_offset,
            dir: dir.to_path_buf(),
            map: RwLock::new(map),
            index: RwLock::new(index),
            next_offset: AtomicU64::new(summary.next_offset),
            max_timestamp: AtomicI64::new(summary.max_timestamp),
        }
    }

    /// Offset after the last published batch.
    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    pub(crate) fn max_timestamp(&self) -> i64 {
        self.max_timestamp.load(Ordering::Acquire)
    }

    pub(crate) fn map(&self) -> Arc<SharedMap> {
        Arc::clone(&self.map.read().expect("map lock"))
    }

    /// Valid bytes in the segment.
    pub(crate) fn len(&self) -> usize {
        self.map().published()
    }

    pub(crate) fn summary(&self) -> SegmentSummary {
        SegmentSummary {
            next_offset: self.next_offset(),
            segment_len: self.len() as u64,
            max_timestamp: self.max_timestamp(),
        }
    }

    /// Called by the writer after it published a batch at `position`.
    pub(crate) fn on_append(&self, position: usize, h: &BatchHeader, interval: usize) {
        self.index
            .write()
            .expect("index lock")
            .on_append(self.base_offset, position, h, interval);
        self.max_timestamp
            .fetch_max(h.max_timestamp, Ordering::AcqRel);
        self.next_offset.store(h.next_offset(), Ordering::Release);
    }

    /// Where to start walking for relative offset `rel`, and the epoch runs to check against.
    ///
    /// Reads `next_offset` before the index: every batch below it is already indexed (the
    /// writer updates the index, then publishes `next_offset`), so no batch is checked against
    /// epoch runs that do not know it yet.
    fn walk_from(&self, rel: u32) -> (Walk, u64) {
        let known_end = self.next_offset();
        let idx = self.index.read().expect("index lock");
        let (r, pos) = idx.entry_for(rel);
        let walk = Walk {
            expected: self.base_offset + r as u64,
            pos,
            epochs: idx.epochs.clone(),
        };
        (walk, known_end)
    }

    /// Reads whole batches starting with the one holding `offset`, at most `max_bytes` (but always
    /// one batch), none reaching `upper_bound` or beyond.
    ///
    /// Every batch served passes its CRC, and the fields the CRC does not cover are checked
    /// too: each `baseOffset` continues the chain from an index entry, each
    /// `partitionLeaderEpoch` matches the epoch runs recorded at append, `magic` and
    /// `batchLength` are bounded (a wrong length moves the CRC's range, which then fails).
    pub(crate) fn read(
        &self,
        offset: u64,
        max_bytes: usize,
        upper_bound: u64,
    ) -> Result<ReadSlice> {
        let rel = offset.saturating_sub(self.base_offset).min(u32::MAX as u64) as u32;
        let (mut w, known_end) = self.walk_from(rel);
        let map = self.map();
        let published = map.published();
        let bound = upper_bound.min(known_end);
        let empty = ReadSlice {
            bytes: Bytes::new(),
            first_offset: offset,
            next_offset: offset,
        };
        // Skip batches that end before `offset` by their headers alone.
        let start = loop {
            if w.pos >= published || w.expected >= bound {
                return Ok(empty);
            }
            let h = self.header_at(&map, w.pos, published)?;
            self.check_place(&h, &w)?;
            if h.next_offset() > offset {
                break (w.pos, h.base_offset);
            }
            w.advance(&h);
        };
        let mut next = start.1;
        while w.pos < published && w.expected < bound {
            let h = batch::validate(map.slice(w.pos, published))
                .map_err(|e| self.corrupt(w.pos, &e.to_string()))?;
            self.check_place(&h, &w)?;
            let taken = w.pos - start.0;
            if h.next_offset() > upper_bound || (taken > 0 && taken + h.total_len() > max_bytes) {
                break;
            }
            w.advance(&h);
            next = h.next_offset();
        }
        if w.pos == start.0 {
            return Ok(empty);
        }
        Ok(ReadSlice {
            bytes: map.bytes(start.0, w.pos),
            first_offset: start.1,
            next_offset: next,
        })
    }

    /// Checks every batch of the first `len` bytes (CRC, offset chain, epochs, lengths) and
    /// returns the CRC-32C of those bytes: a checkpoint vouches only for bytes it checked.
    pub(crate) fn verified_crc32c(&self, len: usize) -> Result<u32> {
        let (mut w, known_end) = self.walk_from(0);
        let map = self.map();
        let published = map.published();
        if len > published {
            return Err(self.corrupt(published, &format!("{len} bytes asked, {published} valid")));
        }
        while w.pos < len {
            if w.expected >= known_end {
                return Err(self.corrupt(w.pos, "bytes past the last indexed batch"));
            }
            let h = batch::validate(map.slice(w.pos, len))
                .map_err(|e| self.corrupt(w.pos, &e.to_string()))?;
            self.check_place(&h, &w)?;
            w.advance(&h);
        }
        if w.pos != len {
            return Err(self.corrupt(w.pos, &format!("last batch runs past byte {len}")));
        }
        Ok(crc32c::crc32c(map.slice(0, len)))
    }

    /// The first record at or after offset `from` whose timestamp is ≥ `ts`, as (offset,
    /// timestamp), if this segment holds one.
    pub(crate) fn record_for_timestamp(&self, ts: i64, from: u64) -> Result<Option<(u64, i64)>> {
        if self.max_timestamp() < ts {
            return Ok(None);
        }
        let rel = self.index.read().expect("index lock").offset_for_time(ts);
        let (mut w, known_end) = self.walk_from(rel);
        let map = self.map();
        let published = map.published();
        while w.pos < published && w.expected < known_end {
            let h = self.header_at(&map, w.pos, published)?;
            self.check_place(&h, &w)?;
            if h.max_timestamp >= ts && h.last_offset() >= from {
                let pos = w.pos;
                let batch = RecordBatch::parse(&map.bytes(pos, pos + h.total_len()))
                    .map_err(|e| self.corrupt(pos, &e.to_string()))?;
                // Compressed batches are not decoded: the batch's first offset (at or after
                // `from`) and its newest timestamp are the answer.
                let whole = (h.base_offset.max(from), h.max_timestamp);
                let Ok(records) = batch.records() else {
                    return Ok(Some(whole));
                };
                for r in records {
                    let r = r.map_err(|e| self.corrupt(pos, &e.to_string()))?;
                    if r.offset >= from && r.timestamp >= ts {
                        return Ok(Some((r.offset, r.timestamp)));
                    }
                }
                // Timestamps that do not add up (the header's newest above every record's):
                // the batch is still where `ts` falls.
                return Ok(Some(whole));
            }
            w.advance(&h);
        }
        Ok(None)
    }

    fn header_at(&self, map: &SharedMap, pos: usize, published: usize) -> Result<BatchHeader> {
        let h = batch::parse_header(map.slice(pos, published))
            .map_err(|e| self.corrupt(pos, &e.to_string()))?;
        if h.total_len() > published - pos {
            return Err(self.corrupt(pos, "batch runs past the published length"));
        }
        Ok(h)
    }

    /// Checks the fields of a batch header that its CRC does not cover against where the
    /// batch sits: its `baseOffset` must continue the chain, its epoch match the epoch runs.
    fn check_place(&self, h: &BatchHeader, w: &Walk) -> Result<()> {
        if h.base_offset != w.expected {
            return Err(self.corrupt(
                w.pos,
                &format!(
                    "baseOffset {} where offset {} belongs (damage outside the batch CRC)",
                    h.base_offset, w.expected
                ),
            ));
        }
        let rel = (h.base_offset - self.base_offset).min(u32::MAX as u64) as u32;
        let recorded = crate::index::epoch_at(&w.epochs, rel);
        if recorded != Some(h.partition_leader_epoch) {
            return Err(self.corrupt(
                w.pos,
                &format!(
                    "partitionLeaderEpoch {} at offset {}, recorded {recorded:?} (damage outside \
                     the batch CRC)",
                    h.partition_leader_epoch, h.base_offset
                ),
            ));
        }
        Ok(())
    }

    fn corrupt(&self, position: usize, reason: &str) -> StorageError {
        StorageError::Corruption {
            path: self.path(LOG_EXT),
            position: position as u64,
            reason: reason.to_string(),
        }
    }

    /// Writes the `.index` and `.timeindex` files of a sealed segment (atomically, fsynced).
    pub(crate) fn write_index_files(&self) -> Result<()> {
        let idx = self.index.read().expect("index lock").clone();
        write_index_files(&self.dir, self.base_offset, &idx, &self.summary())
    }

    /// Swaps in a map of exactly the valid bytes; trims the preallocated tail when no reader
    /// still holds the old map (otherwise the next open trims it).
    pub(crate) fn seal(&self) -> Result<()> {
        let path = self.path(LOG_EXT);
        let len = self.len();
        let file = File::open(&path).ctx("open", &path)?;
        let ro = SharedMap::read_only(&file, len).ctx("mmap", &path)?;
        let old = std::mem::replace(&mut *self.map.write().expect("map lock"), ro);
        if Arc::strong_count(&old) == 1 {
            drop(old);
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .ctx("open", &path)?;
            // Not fsynced: if the trim is lost in a crash, the next open trims again.
            f.set_len(len as u64).ctx("trim", &path)?;
        }
        Ok(())
    }

    /// Removes the segment's files (live maps keep working).
    pub(crate) fn delete_files(&self) -> Result<()> {
        for ext in [LOG_EXT, INDEX_EXT, TIME_INDEX_EXT] {
            let p = self.path(ext);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("unlink", p, e)),
            }
        }
        Ok(())
    }
}

/// Writes a sealed segment's `.index` and `.timeindex` files (atomically, fsynced).
pub(crate) fn write_index_files(
    dir: &Path,
    base: u64,
    idx: &SegmentIndex,
    summary: &SegmentSummary,
) -> Result<()> {
    fsutil::write_atomic(
        &segment_path(dir, base, INDEX_EXT),
        &idx.encode_offsets(base, summary),
    )?;
    fsutil::write_atomic(
        &segment_path(dir, base, TIME_INDEX_EXT),
        &idx.encode_times(base),
    )
}

/// Path of a segment file.
pub(crate) fn segment_path(dir: &Path, base: u64, ext: &str) -> PathBuf {
    dir.join(format!("{}.{ext}", file_stem(base)))
}

/// Creates a new, empty segment file with its first blocks reserved and maps it for writing.
pub(crate) fn create(dir: &Path, base: u64, capacity: u64) -> Result<(Segment, MapWriter)> {
    let path = segment_path(dir, base, LOG_EXT);
    let tmp = dir.join(format!("{}.{LOG_EXT}.tmp", file_stem(base)));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ctx("create", &tmp)?;
    // The first step only: the writer reserves more as it appends.
    fsutil::reserve_blocks(&file, &tmp, capacity.min(crate::mmap::PREALLOC_MIN))?;
    file.sync_all().ctx("fsync", &tmp)?;
    std::fs::rename(&tmp, &path).ctx("rename", &path)?;
    fsutil::fsync_dir(dir)?;
    let writer = SharedMap::writable(&file, capacity as usize, 0).ctx("mmap", &path)?;
    let summary = SegmentSummary {
        next_offset: base,
        segment_len: 0,
        max_timestamp: i64::MIN,
    };
    let seg = Segment::new(
        dir,
        base,
        Arc::clone(writer.shared()),
        SegmentIndex::default(),
        summary,
    );
    Ok((seg, writer))
}
