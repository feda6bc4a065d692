//! One segment: a preallocated `.log` file mapped with [`SharedMap`], plus its sparse indexes.
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

use crate::batch::{self, BatchHeader, RecordBatch};
use crate::error::{IoContext, Result, StorageError};
use crate::fsutil::{self, file_stem};
use crate::index::{SegmentIndex, SegmentSummary};
use crate::mmap::{MapWriter, SharedMap};

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

    /// Reads whole batches starting with the one holding `offset`, at most `max_bytes` (but always
    /// one batch), none reaching `upper_bound` or beyond. CRCs are checked on the way out.
    pub(crate) fn read(
        &self,
        offset: u64,
        max_bytes: usize,
        upper_bound: u64,
    ) -> Result<ReadSlice> {
        let map = self.map();
        let published = map.published();
        let rel = offset.saturating_sub(self.base_offset).min(u32::MAX as u64) as u32;
        let mut pos = self.index.read().expect("index lock").position_for(rel);
        let empty = ReadSlice {
            bytes: Bytes::new(),
            first_offset: offset,
            next_offset: offset,
        };
        // Skip batches that end before `offset` by their headers alone.
        let start = loop {
            if pos >= published {
                return Ok(empty);
            }
            let h = self.header_at(&map, pos, published)?;
            if h.next_offset() > offset {
                break (pos, h.base_offset);
            }
            pos += h.total_len();
        };
        let mut next = start.1;
        while pos < published {
            let h = batch::validate(map.slice(pos, published))
                .map_err(|e| self.corrupt(pos, &e.to_string()))?;
            let taken = pos - start.0;
            if h.next_offset() > upper_bound || (taken > 0 && taken + h.total_len() > max_bytes) {
                break;
            }
            pos += h.total_len();
            next = h.next_offset();
        }
        if pos == start.0 {
            return Ok(empty);
        }
        Ok(ReadSlice {
            bytes: map.bytes(start.0, pos),
            first_offset: start.1,
            next_offset: next,
        })
    }

    /// First offset whose record timestamp is ≥ `ts`, if this segment holds one.
    pub(crate) fn offset_for_timestamp(&self, ts: i64) -> Result<Option<u64>> {
        if self.max_timestamp() < ts {
            return Ok(None);
        }
        let map = self.map();
        let published = map.published();
        let mut pos = {
            let idx = self.index.read().expect("index lock");
            idx.position_for(idx.offset_for_time(ts))
        };
        while pos < published {
            let h = self.header_at(&map, pos, published)?;
            if h.max_timestamp >= ts {
                let batch = RecordBatch::parse(&map.bytes(pos, pos + h.total_len()))
                    .map_err(|e| self.corrupt(pos, &e.to_string()))?;
                // Compressed batches are not decoded: the batch's base offset is the answer.
                let Ok(records) = batch.records() else {
                    return Ok(Some(h.base_offset));
                };
                for r in records {
                    let r = r.map_err(|e| self.corrupt(pos, &e.to_string()))?;
                    if r.timestamp >= ts {
                        return Ok(Some(r.offset));
                    }
                }
                return Ok(Some(h.base_offset));
            }
            pos += h.total_len();
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

/// Creates a new, empty, preallocated segment file and maps it for writing.
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
    fsutil::reserve_blocks(&file, &tmp, capacity)?;
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
