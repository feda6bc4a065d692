//! A partition log: an ordered list of segments with one writer, concurrent zero-copy readers,
//! rolling, retention and crash recovery.
//!
//! ```text
//!  dir/
//!    00000000000000000000.log  .index  .timeindex   sealed: read-only map, trimmed
//!    00000000000000052110.log  .index  .timeindex   sealed
//!    00000000000000104388.log                       active: writable map, preallocated in steps
//!    recovery-point                                 everything below this offset is on disk
//! ```
//! Offsets are dense: a batch's `baseOffset` is the log end offset when it is appended.
//! Invariant: `log_start ≤ (caller's high watermark) ≤ log_end`, and every offset in
//! `[log_start, log_end)` lives in exactly one segment.
//!
//! One file on purpose (over 600 lines): append, read, roll, retention and recovery all rest on
//! the segment list's invariants, which read best in one place.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{IoContext, Result, StorageError};
use crate::fsutil::{self, parse_stem};
use crate::index::{SegmentIndex, SegmentSummary};
use crate::mmap::{MapWriter, SharedMap};
use crate::persist::{PersistMode, Poison};
use crate::scan::{self, ScanStop};
use crate::segment::{self, INDEX_EXT, LOG_EXT, ReadSlice, Segment, TIME_INDEX_EXT, segment_path};
use runnel_record::{self as batch, BatchHeader};

/// Name of the file holding the offset below which the log is known to be on disk.
pub const RECOVERY_POINT_FILE: &str = "recovery-point";
/// Smallest allowed `segment_bytes`: room for a few real batches.
pub const SEGMENT_BYTES_MIN: u64 = 4096;
/// Largest allowed `segment_bytes`: index positions are `u32`.
pub const SEGMENT_BYTES_MAX: u64 = u32::MAX as u64;

/// How a partition log sizes, rolls, indexes, retains and persists its segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Size a segment grows to (its file is preallocated in steps); a batch that does not fit
    /// rolls the segment.
    /// Also the largest batch the log accepts. Default 64 MiB.
    pub segment_bytes: u64,
    /// Roll when an incoming batch's max timestamp is this many ms past the segment's first
    /// batch. Based on record timestamps, not the wall clock, so replicas roll identically.
    /// Default 7 days.
    pub segment_ms: Option<i64>,
    /// Bytes between sparse index entries. Default 4 KiB.
    pub index_interval_bytes: usize,
    /// Delete sealed segments whose newest record is older than this. Default 7 days.
    pub retention_ms: Option<i64>,
    /// Delete the oldest sealed segments while the log is larger than this. Default unlimited.
    pub retention_bytes: Option<u64>,
    /// When an append is done; see [`PersistMode`].
    pub persist: PersistMode,
}

impl Default for LogConfig {
    fn default() -> Self {
        const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;
        LogConfig {
            segment_bytes: 64 << 20,
            segment_ms: Some(WEEK_MS),
            index_interval_bytes: 4096,
            retention_ms: Some(WEEK_MS),
            retention_bytes: None,
            persist: PersistMode::Fsync,
        }
    }
}

impl LogConfig {
    /// Reports every broken rule at once.
    pub fn validate(&self) -> Result<()> {
        let mut errs = Vec::new();
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            errs.push(format!(
                "segment_bytes {} outside [{SEGMENT_BYTES_MIN}, {SEGMENT_BYTES_MAX}]",
                self.segment_bytes
            ));
        }
        if self.index_interval_bytes == 0 {
            errs.push("index_interval_bytes must be positive".into());
        }
        if self.segment_ms.is_some_and(|ms| ms <= 0) {
            errs.push("segment_ms must be positive".into());
        }
        if self.retention_ms.is_some_and(|ms| ms <= 0) {
            errs.push("retention_ms must be positive".into());
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(StorageError::InvalidArgument(errs.join("; ")))
        }
    }
}

/// Where recovery may cut the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Trust the log's own `recovery-point` file: below it a bad batch is corruption, above it
    /// a bad batch is a torn tail and is cut.
    Recorded,
    /// Open as of a checkpoint: everything below this offset must be intact, everything from it
    /// on is discarded (the Raft log will apply it again).
    TruncateTo(u64),
}

/// What recovery found and did when the log was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments in the log after recovery.
    pub segments: usize,
    /// Bytes read by scans (sealed segments with a valid index are not scanned).
    pub scanned_bytes: u64,
    /// Non-zero bytes discarded past the cut point of the active segment.
    pub torn_bytes_cut: u64,
    /// (segment base offset, byte position) where the log was cut, if it was.
    pub cut_at: Option<(u64, u64)>,
    /// Sealed segments whose index files were missing or bad and were rebuilt.
    pub indexes_rebuilt: usize,
    /// Whole segments removed by [`Recovery::TruncateTo`].
    pub segments_discarded: usize,
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset assigned to the first record.
    pub base_offset: u64,
    /// Offset of the last record.
    pub last_offset: u64,
    /// Largest record timestamp in the batch.
    pub max_timestamp: i64,
    /// Base offset of the segment that holds it.
    pub segment_base: u64,
    /// Byte position inside that segment.
    pub position: u64,
}

/// What retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segments deleted.
    pub segments_deleted: usize,
    /// Bytes of valid data deleted.
    pub bytes_deleted: u64,
    /// Log start offset afterwards.
    pub log_start: u64,
}

/// Why retention moves a log's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionReason {
    /// Records older than `retention_ms`.
    Age,
    /// The log is larger than `retention_bytes`.
    Size,
}

impl RetentionReason {
    /// A short name for logs and commands.
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionReason::Age => "age",
            RetentionReason::Size => "size",
        }
    }
}

/// One segment's `.log` file as of a moment, for a checkpoint.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    /// The `.log` file.
    pub path: PathBuf,
    /// Its valid length at that moment.
    pub len: u64,
    seg: Arc<Segment>,
}

impl SegmentFile {
    /// Checks every batch in the first `len` bytes (CRC, offset chain, epochs, lengths) and
    /// returns the CRC-32C of those bytes.
    ///
    /// # Errors
    /// [`StorageError::Corruption`] at the first batch that fails.
    pub fn verified_crc32c(&self) -> Result<u32> {
        self.seg.verified_crc32c(self.len as usize)
    }
}

/// Called before every data sync of a partition log; an error is treated exactly like a failed
/// msync. For fault-injection tests.
pub type SyncHook = Arc<dyn Fn(&Path) -> std::io::Result<()> + Send + Sync>;

struct Active {
    seg: Arc<Segment>,
    writer: MapWriter,
    /// Max timestamp of the segment's first batch: the reference for rolling by age.
    roll_reference: Option<i64>,
    /// Bytes of the active segment known to be on disk.
    synced: usize,
    /// Sealed segments not yet fsynced (`Buffered` mode), synced by the next `flush`.
    unsynced: Vec<(PathBuf, File)>,
}

/// A partition's log of record batches.
pub struct PartitionLog {
    dir: PathBuf,
    config: LogConfig,
    segments: RwLock<Vec<Arc<Segment>>>,
    writer: Mutex<Active>,
    log_start: AtomicU64,
    log_end: AtomicU64,
    poison: Poison,
    report: RecoveryReport,
    sync_hook: Option<SyncHook>,
    /// The recovery point last written; it only ever moves forward.
    recovery_point: Mutex<u64>,
}

impl std::fmt::Debug for PartitionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLog")
            .field("dir", &self.dir)
            .field("log_start", &self.log_start())
            .field("log_end", &self.log_end())
            .finish()
    }
}

impl PartitionLog {
    /// Opens (creating if needed) the log in `dir`, recovering as `recovery` says.
    ///
    /// # Errors
    /// [`StorageError::Corruption`] when data below the durable point fails its checks; I/O errors.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig, recovery: Recovery) -> Result<Self> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        let mut report = RecoveryReport::default();
        let mut bases = list_segments(&dir)?;
        let durable = match recovery {
            Recovery::Recorded => read_recovery_point(&dir)?,
            Recovery::TruncateTo(o) => {
                report.segments_discarded = discard_from(&dir, &mut bases, o)?;
                o
            }
        };
        let truncate_to = match recovery {
            Recovery::TruncateTo(o) => Some(o),
            Recovery::Recorded => None,
        };
        if bases.is_empty() {
            if truncate_to.is_none() && durable > 0 {
                return Err(StorageError::Corruption {
                    path: dir.join(RECOVERY_POINT_FILE),
                    position: 0,
                    reason: format!("no segment left, but offset {durable} was durable"),
                });
            }
            let (seg, writer) =
                segment::create(&dir, truncate_to.unwrap_or(0), config.segment_bytes)?;
            bases.push(seg.base_offset);
            return Self::assemble(dir, config, vec![], (seg, writer, None), report);
        }
        let mut sealed = Vec::with_capacity(bases.len() - 1);
        let mut expected = bases[0];
        let mut i = 0;
        loop {
            let base = bases[i];
            if base != expected {
                return Err(StorageError::Corruption {
                    path: segment_path(&dir, base, LOG_EXT),
                    position: 0,
                    reason: format!("segment starts at offset {base}, previous ends at {expected}"),
                });
            }
            if i + 1 < bases.len() {
                match open_sealed(&dir, base, bases[i + 1], durable, &config, &mut report)? {
                    Sealed::Ok(seg) => {
                        expected = seg.next_offset();
                        sealed.push(Arc::new(seg));
                        i += 1;
                        continue;
                    }
                    Sealed::Torn => {
                        // Everything after a torn point is suspect: cut here, drop the rest.
                        let later = bases.split_off(i + 1);
                        report.segments_discarded += later.len();
                        remove_segments(&dir, &later)?;
                        report.cut_at = Some((base, 0));
                        tracing::warn!(dir = %dir.display(), base, discarded = later.len(),
                            "torn sealed segment past the recovery point: cutting the log there");
                    }
                }
            }
            let active = open_active(&dir, base, &config, durable, truncate_to, &mut report)?;
            // Whatever the file looked like (even empty), the log must reach the durable point,
            // and end exactly at a checkpoint's offset: anything else shifts every later offset.
            let end = active.0.next_offset();
            if end < durable || truncate_to.is_some_and(|t| end != t) {
                return Err(StorageError::Corruption {
                    path: segment_path(&dir, base, LOG_EXT),
                    position: active.0.len() as u64,
                    reason: format!("log ends at offset {end}, but offset {durable} was durable"),
                });
            }
            return Self::assemble(dir, config, sealed, active, report);
        }
    }

    fn assemble(
        dir: PathBuf,
        config: LogConfig,
        mut segments: Vec<Arc<Segment>>,
        (seg, writer, roll_reference): (Segment, MapWriter, Option<i64>),
        mut report: RecoveryReport,
    ) -> Result<Self> {
        let seg = Arc::new(seg);
        segments.push(Arc::clone(&seg));
        let log_start = segments[0].base_offset;
        let log_end = seg.next_offset();
        report.segments = segments.len();
        let synced = writer.shared().published();
        // Everything recovered is now on disk (open_active synced it): record that.
        write_recovery_point(&dir, log_end)?;
        tracing::info!(dir = %dir.display(), log_start, log_end, ?report, "partition log opened");
        Ok(PartitionLog {
            dir,
            config,
            segments: RwLock::new(segments),
            writer: Mutex::new(Active {
                seg,
                writer,
                roll_reference,
                synced,
                unsynced: Vec::new(),
            }),
            log_start: AtomicU64::new(log_start),
            log_end: AtomicU64::new(log_end),
            poison: Poison::default(),
            report,
            sync_hook: None,
            recovery_point: Mutex::new(log_end),
        })
    }

    /// Like [`PartitionLog::open`], with a hook run before every data sync (fault injection).
    pub fn open_with_sync_hook(
        dir: impl AsRef<Path>,
        config: LogConfig,
        recovery: Recovery,
        hook: SyncHook,
    ) -> Result<Self> {
        let mut log = Self::open(dir, config, recovery)?;
        log.sync_hook = Some(hook);
        Ok(log)
    }

    /// The directory holding this log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the log was opened with.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// What recovery did at open.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// First readable offset.
    pub fn log_start(&self) -> u64 {
        self.log_start.load(Ordering::Acquire)
    }

    /// Offset the next appended record gets.
    pub fn log_end(&self) -> u64 {
        self.log_end.load(Ordering::Acquire)
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.segments.read().expect("segments lock").len()
    }

    /// Valid bytes across all segments.
    pub fn size_bytes(&self) -> u64 {
        self.snapshot().iter().map(|s| s.len() as u64).sum()
    }

    /// True once an fsync failed; every later write fails.
    pub fn is_poisoned(&self) -> bool {
        self.poison.is_poisoned()
    }

    fn snapshot(&self) -> Vec<Arc<Segment>> {
        self.segments.read().expect("segments lock").clone()
    }

    /// Appends one v2 batch, assigning `baseOffset = log_end` and stamping `leader_epoch`.
    ///
    /// The batch's CRC and structure are checked first; a bad batch changes nothing. In
    /// [`PersistMode::Fsync`] the batch is on disk when this returns.
    ///
    /// # Errors
    /// [`StorageError::InvalidBatch`], [`StorageError::InvalidArgument`] for a batch with trailing
    /// bytes or larger than a segment, [`StorageError::Poisoned`], I/O errors from rolling.
    pub fn append(&self, batch: &[u8], leader_epoch: i32) -> Result<AppendInfo> {
        self.poison.check()?;
        let h = batch::validate(batch)?;
        if h.total_len() != batch.len() {
            return Err(StorageError::InvalidArgument(format!(
                "{} bytes after the batch",
                batch.len() - h.total_len()
            )));
        }
        if batch.len() as u64 > self.config.segment_bytes {
            return Err(StorageError::InvalidArgument(format!(
                "batch of {} bytes exceeds segment_bytes {}",
                batch.len(),
                self.config.segment_bytes
            )));
        }
        let mut a = self.writer.lock().expect("writer lock");
        self.poison.check()?;
        let base = self.log_end.load(Ordering::Relaxed);
        if self.needs_roll(&a, &h, base) {
            self.roll(&mut a, base)?;
        }
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&batch[..16]);
        batch::set_base_offset(&mut prefix, base);
        batch::set_partition_leader_epoch(&mut prefix, leader_epoch);
        let path = a.seg.path(LOG_EXT);
        // A failed write publishes nothing; stray bytes past the published length are
        // overwritten by the next append or cut as a torn tail by recovery.
        let position = a
            .writer
            .append(&[&prefix, &batch[16..]])
            .ctx("write", &path)?;
        let stamped = BatchHeader {
            base_offset: base,
            partition_leader_epoch: leader_epoch,
            ..h
        };
        a.seg
            .on_append(position, &stamped, self.config.index_interval_bytes);
        a.roll_reference.get_or_insert(h.max_timestamp);
        self.log_end.store(stamped.next_offset(), Ordering::Release);
        if self.config.persist == PersistMode::Fsync {
            self.sync_active(&mut a)?;
        }
        Ok(AppendInfo {
            base_offset: base,
            last_offset: stamped.last_offset(),
            max_timestamp: h.max_timestamp,
            segment_base: a.seg.base_offset,
            position: position as u64,
        })
    }

    fn needs_roll(&self, a: &Active, h: &BatchHeader, base: u64) -> bool {
        if a.seg.next_offset() == a.seg.base_offset {
            return false; // never roll an empty segment
        }
        let full = a.writer.remaining() < h.total_len();
        let rel_overflow = base + h.last_offset_delta as u64 - a.seg.base_offset > u32::MAX as u64;
        let aged = match (self.config.segment_ms, a.roll_reference) {
            (Some(ms), Some(first)) => h.max_timestamp.saturating_sub(first) >= ms,
            _ => false,
        };
        full || rel_overflow || aged
    }

    /// Seals the active segment and starts a new one at `base`.
    ///
    /// In `Fsync` mode the old segment is already on disk, so the recovery point moves to `base`.
    /// In `Buffered` mode its data is synced by the next [`PartitionLog::flush`], not here: a
    /// roll must not stall appends for a whole segment's writeback.
    fn roll(&self, a: &mut Active, base: u64) -> Result<()> {
        let old = Arc::clone(&a.seg);
        match self.config.persist {
            PersistMode::Fsync => self.sync_active(a)?,
            PersistMode::Buffered => {
                let path = old.path(LOG_EXT);
                let f = File::open(&path).ctx("open", &path)?;
                a.unsynced.push((path, f));
            }
        }
        old.write_index_files()?;
        if self.config.persist == PersistMode::Fsync {
            self.advance_recovery_point(base)?;
        }
        let (seg, writer) = segment::create(&self.dir, base, self.config.segment_bytes)?;
        let seg = Arc::new(seg);
        self.segments
            .write()
            .expect("segments lock")
            .push(Arc::clone(&seg));
        drop(std::mem::replace(&mut a.writer, writer));
        a.seg = seg;
        a.roll_reference = None;
        a.synced = 0;
        if let Err(e) = old.seal() {
            // The old writable map keeps serving reads; the next open maps it read-only.
            tracing::warn!(error = %e, base = old.base_offset, "could not remap sealed segment");
        }
        tracing::debug!(dir = %self.dir.display(), sealed = old.base_offset, base, "rolled segment");
        Ok(())
    }

    fn sync_file(&self, path: &Path, f: &File) -> Result<()> {
        let hooked = self.sync_hook.as_ref().map_or(Ok(()), |h| h(path));
        if let Err(e) = hooked.and_then(|()| f.sync_data()) {
            let why = format!("fdatasync of {}: {e}", path.display());
            self.poison.set(why.clone());
            return Err(StorageError::Poisoned(why));
        }
        Ok(())
    }

    fn sync_active(&self, a: &mut Active) -> Result<()> {
        let published = a.writer.shared().published();
        if published > a.synced {
            let path = a.seg.path(LOG_EXT);
            let hooked = self.sync_hook.as_ref().map_or(Ok(()), |h| h(&path));
            if let Err(e) = hooked.and_then(|()| a.writer.sync_range(a.synced, published)) {
                let why = format!("msync of {}: {e}", path.display());
                self.poison.set(why.clone());
                return Err(StorageError::Poisoned(why));
            }
            a.synced = published;
        }
        Ok(())
    }

    /// Makes every appended batch durable and records the recovery point; returns it.
    pub fn flush(&self) -> Result<u64> {
        self.poison.check()?;
        // Decide what to sync under the writer lock, sync without it: appends go on while
        // hundreds of MB are written back. A sync covers every byte written before it began.
        let (end, sealed, active) = {
            let mut a = self.writer.lock().expect("writer lock");
            let active = a
                .writer
                .file()
                .try_clone()
                .ctx("dup", &a.seg.path(LOG_EXT))?;
            let published = a.writer.shared().published();
            (
                self.log_end(),
                std::mem::take(&mut a.unsynced),
                (a.seg.path(LOG_EXT), active, published),
            )
        };
        for (path, f) in &sealed {
            self.sync_file(path, f)?;
        }
        let (path, file, published) = active;
        self.sync_file(&path, &file)?;
        {
            let mut a = self.writer.lock().expect("writer lock");
            if a.seg.path(LOG_EXT) == path {
                a.synced = a.synced.max(published);
            }
        }
        self.advance_recovery_point(end)?;
        Ok(end)
    }

    /// Writes the recovery point if `offset` is beyond the one on disk (never backwards).
    fn advance_recovery_point(&self, offset: u64) -> Result<()> {
        let mut rp = self.recovery_point.lock().expect("recovery point lock");
        if offset > *rp {
            write_recovery_point(&self.dir, offset)?;
            *rp = offset;
        }
        Ok(())
    }

    /// Reads whole batches from `offset`: at most `max_bytes` (but at least one batch if any is
    /// readable), from one segment, never a batch reaching `upper_bound` (exclusive) or the log
    /// end. The bytes share the segment's map: no copy.
    ///
    /// # Errors
    /// [`StorageError::OffsetOutOfRange`] outside `[log_start, log_end]`;
    /// [`StorageError::Corruption`] when a batch fails its CRC.
    pub fn read(&self, offset: u64, max_bytes: usize, upper_bound: u64) -> Result<ReadSlice> {
        let (start, end) = (self.log_start(), self.log_end());
        if offset < start || offset > end {
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start: start,
                log_end: end,
            });
        }
        let bound = upper_bound.min(end);
        let segs = self.snapshot();
        let i = segs.partition_point(|s| s.base_offset <= offset);
        if i == 0 {
            // Retention moved the start past `offset` since we looked.
            let log_start = self.log_start();
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start,
                log_end: end,
            });
        }
        for seg in &segs[i - 1..] {
            if offset >= bound {
                break;
            }
            let r = seg.read(offset, max_bytes, bound)?;
            if !r.bytes.is_empty() {
                return Ok(r);
            }
            if seg.next_offset() > offset {
                break; // the batch holding `offset` reaches past the bound
            }
        }
        Ok(ReadSlice {
            bytes: bytes::Bytes::new(),
            first_offset: offset,
            next_offset: offset,
        })
    }

    /// The first offset whose record timestamp is ≥ `ts`; `None` when every record is older.
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<u64>> {
        Ok(self.record_for_timestamp(ts)?.map(|(o, _)| o))
    }

    /// The first record at or after the log start whose timestamp is ≥ `ts`, as (offset, its
    /// timestamp); `None` when every record is older. A compressed batch is not decoded: its
    /// first offset and newest timestamp stand for it.
    pub fn record_for_timestamp(&self, ts: i64) -> Result<Option<(u64, i64)>> {
        let from = self.log_start();
        for seg in self.snapshot() {
            if let Some(found) = seg.record_for_timestamp(ts, from)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Where retention would move the log start as of `now_ms`, and why: past every sealed
    /// segment whose newest record is older than `retention_ms`, then past the oldest sealed
    /// segments while the log is larger than `retention_bytes`. `None` when nothing is due.
    ///
    /// A pure decision: nothing changes. A replicated log has its leader decide and every
    /// replica apply the same [`PartitionLog::advance_start`], so one replica's clock never
    /// deletes what the others keep.
    pub fn retention_point(&self, now_ms: i64) -> Option<(u64, RetentionReason)> {
        let segs = self.snapshot();
        let start = self.log_start();
        let mut total: u64 = segs.iter().map(|s| s.len() as u64).sum();
        let mut point = None;
        for seg in &segs[..segs.len() - 1] {
            let expired = self
                .config
                .retention_ms
                .is_some_and(|ms| now_ms.saturating_sub(seg.max_timestamp()) > ms);
            let oversize = self.config.retention_bytes.is_some_and(|max| total > max);
            if !(expired || oversize) {
                break;
            }
            total -= seg.len() as u64;
            let why = if expired {
                RetentionReason::Age
            } else {
                RetentionReason::Size
            };
            point = Some((seg.next_offset(), why));
        }
        point.filter(|&(o, _)| o > start)
    }

    /// Moves the log start up to `offset` (never back, never past the log end), then deletes
    /// every sealed segment wholly below it, logging each. Readers holding a map keep it.
    ///
    /// `offset` need not be a segment boundary here (replicas may roll at different places);
    /// it is a batch boundary, as every replica holds the same batches at the same offsets.
    pub fn advance_start(&self, offset: u64, reason: &str) -> Result<RetentionReport> {
        let target = offset.min(self.log_end());
        self.log_start.fetch_max(target, Ordering::AcqRel);
        let start = self.log_start();
        let segs = self.snapshot();
        let doomed: Vec<Arc<Segment>> = segs[..segs.len() - 1]
            .iter()
            .take_while(|s| s.next_offset() <= start)
            .cloned()
            .collect();
        let mut report = RetentionReport {
            log_start: start,
            ..Default::default()
        };
        if doomed.is_empty() {
            return Ok(report);
        }
        self.segments
            .write()
            .expect("segments lock")
            .retain(|s| s.next_offset() > start || Arc::ptr_eq(s, segs.last().expect("active")));
        for seg in &doomed {
            report.bytes_deleted += seg.len() as u64;
            tracing::info!(dir = %self.dir.display(), from = seg.base_offset,
                to = seg.next_offset(), bytes = seg.len(), reason, log_start = start,
                "retention deleted a segment");
            seg.delete_files()?;
        }
        fsutil::fsync_dir(&self.dir)?;
        report.segments_deleted = doomed.len();
        Ok(report)
    }

    /// Applies retention on this log alone, judged against `now_ms`
    /// ([`PartitionLog::retention_point`] then [`PartitionLog::advance_start`]). For an
    /// unreplicated log; a replicated one has its leader decide.
    pub fn apply_retention(&self, now_ms: i64) -> Result<RetentionReport> {
        match self.retention_point(now_ms) {
            Some((o, why)) => self.advance_start(o, why.as_str()),
            None => Ok(RetentionReport {
                log_start: self.log_start(),
                ..Default::default()
            }),
        }
    }

    /// Every segment's `.log` path and valid length, oldest first: what a checkpoint hard-links.
    /// Call [`PartitionLog::flush`] first so the bytes are on disk.
    pub fn segment_files(&self) -> Vec<(PathBuf, u64)> {
        self.snapshot()
            .iter()
            .map(|s| (s.path(LOG_EXT), s.len() as u64))
            .collect()
    }

    /// Like [`PartitionLog::segment_files`], with a handle that checks each file's batches
    /// before vouching for them with a CRC (usable after the log moved on).
    pub fn segment_handles(&self) -> Vec<SegmentFile> {
        self.snapshot()
            .into_iter()
            .map(|seg| SegmentFile {
                path: seg.path(LOG_EXT),
                len: seg.len() as u64,
                seg,
            })
            .collect()
    }

    /// Flushes and closes the log.
    pub fn close(self) -> Result<()> {
        self.flush().map(|_| ())
    }
}

fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = BTreeSet::new();
    for entry in std::fs::read_dir(dir).ctx("list", dir)? {
        let entry = entry.ctx("list", dir)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".tmp") {
            // An interrupted create or atomic write: never under a real name, safe to drop.
            std::fs::remove_file(entry.path()).ctx("unlink", &entry.path())?;
        } else if let Some(base) = parse_stem(&name, LOG_EXT) {
            bases.insert(base);
        }
    }
    Ok(bases.into_iter().collect())
}

/// Removes every segment starting at or after `offset` but the first, for `TruncateTo`.
fn discard_from(dir: &Path, bases: &mut Vec<u64>, offset: u64) -> Result<usize> {
    if let Some(&first) = bases.first()
        && first > offset
    {
        return Err(StorageError::Corruption {
            path: dir.to_path_buf(),
            position: 0,
            reason: format!("checkpoint at offset {offset} but the log starts at {first}"),
        });
    }
    let keep = bases
        .partition_point(|&b| b < offset)
        .max(1.min(bases.len()));
    let gone: Vec<u64> = bases.drain(keep..).collect();
    remove_segments(dir, &gone)?;
    Ok(gone.len())
}

/// Unlinks the files of the segments starting at `bases`, then fsyncs the directory.
fn remove_segments(dir: &Path, bases: &[u64]) -> Result<()> {
    for &b in bases {
        for ext in [LOG_EXT, INDEX_EXT, TIME_INDEX_EXT] {
            let p = segment_path(dir, b, ext);
            if p.exists() {
                std::fs::remove_file(&p).ctx("unlink", &p)?;
            }
        }
    }
    if !bases.is_empty() {
        fsutil::fsync_dir(dir)?;
    }
    Ok(())
}

/// What opening a sealed segment found.
enum Sealed {
    Ok(Segment),
    /// The segment is short or bad past the durable point: the log must be cut here.
    Torn,
}

/// Opens a segment that has a successor starting at `successor`.
///
/// Below the durable point its index files are trusted when valid (reads still check CRCs);
/// anything else is scanned. A failure below the durable point is corruption; past it (a
/// `Buffered` log whose last segments were not yet flushed) it is a torn point.
fn open_sealed(
    dir: &Path,
    base: u64,
    successor: u64,
    durable: u64,
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> Result<Sealed> {
    let path = segment_path(dir, base, LOG_EXT);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .ctx("open", &path)?;
    let file_len = file.metadata().ctx("stat", &path)?.len();
    let from_files = (|| {
        let idx = std::fs::read(segment_path(dir, base, INDEX_EXT)).ok()?;
        let time = std::fs::read(segment_path(dir, base, TIME_INDEX_EXT)).ok()?;
        SegmentIndex::decode(base, &idx, &time, file_len)
    })()
    .filter(|(_, s)| s.next_offset <= durable);
    let (index, summary) = match from_files {
        Some(found) => found,
        None => {
            let (index, summary, stop) = scan_segment(&file, &path, base, file_len, config)?;
            report.scanned_bytes += summary.segment_len;
            let complete = stop == ScanStop::End && summary.next_offset == successor;
            if !complete {
                if summary.next_offset < durable {
                    return Err(corruption(
                        &path,
                        summary.segment_len as usize,
                        format!(
                            "sealed segment below the durable offset {durable} ends at offset {} \
                         (next segment starts at {successor}): {stop:?}",
                            summary.next_offset
                        ),
                    ));
                }
                return Ok(Sealed::Torn);
            }
            report.indexes_rebuilt += 1;
            segment::write_index_files(dir, base, &index, &summary)?;
            (index, summary)
        }
    };
    if summary.segment_len == 0 || summary.next_offset != successor {
        return Err(corruption(
            &path,
            0,
            format!(
                "sealed segment ends at offset {}, next segment starts at {successor}",
                summary.next_offset
            ),
        ));
    }
    if file_len > summary.segment_len {
        // Trim the preallocated tail a live reader kept us from trimming at seal time.
        file.set_len(summary.segment_len).ctx("trim", &path)?;
    }
    let map = SharedMap::read_only(&file, summary.segment_len as usize).ctx("mmap", &path)?;
    Ok(Sealed::Ok(Segment::new(dir, base, map, index, summary)))
}

fn corruption(path: &Path, position: usize, reason: String) -> StorageError {
    StorageError::Corruption {
        path: path.to_path_buf(),
        position: position as u64,
        reason,
    }
}

/// Scans a whole segment file, returning its index, summary and why the scan stopped.
fn scan_segment(
    file: &File,
    path: &Path,
    base: u64,
    file_len: u64,
    config: &LogConfig,
) -> Result<(SegmentIndex, SegmentSummary, ScanStop)> {
    let mut index = SegmentIndex::default();
    let mut summary = SegmentSummary {
        next_offset: base,
        segment_len: 0,
        max_timestamp: i64::MIN,
    };
    if file_len == 0 {
        return Ok((index, summary, ScanStop::End));
    }
    let map = SharedMap::read_only(file, file_len as usize).ctx("mmap", path)?;
    let interval = config.index_interval_bytes;
    let o = scan::scan(map.slice(0, file_len as usize), base, |pos, h| {
        index.on_append(base, pos, h, interval)
    });
    summary.next_offset = o.next_offset;
    summary.segment_len = o.valid_len as u64;
    summary.max_timestamp = o.max_timestamp;
    Ok((index, summary, o.stop))
}

fn open_active(
    dir: &Path,
    base: u64,
    config: &LogConfig,
    durable: u64,
    truncate_to: Option<u64>,
    report: &mut RecoveryReport,
) -> Result<(Segment, MapWriter, Option<i64>)> {
    let path = segment_path(dir, base, LOG_EXT);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .ctx("open", &path)?;
    let file_len = file.metadata().ctx("stat", &path)?.len();
    // The cut point: where a torn tail starts, or where the checkpoint ends.
    let mut cut_offset_pos: Option<usize> = None;
    let mut boundaries_hit = false;
    let (index, summary) = {
        let mut index = SegmentIndex::default();
        let mut summary = SegmentSummary {
            next_offset: base,
            segment_len: 0,
            max_timestamp: i64::MIN,
        };
        if file_len > 0 {
            let map = SharedMap::read_only(&file, file_len as usize).ctx("mmap", &path)?;
            let buf = map.slice(0, file_len as usize);
            let out = scan::scan(buf, base, |pos, h| {
                if truncate_to == Some(h.base_offset) {
                    cut_offset_pos = Some(pos);
                    boundaries_hit = true;
                }
            });
            report.scanned_bytes += out.valid_len as u64;
            if out.stop != ScanStop::End && out.next_offset < durable {
                return Err(corruption(
                    &path,
                    out.valid_len,
                    format!(
                        "bad batch below the durable offset {durable}: {:?}",
                        out.stop
                    ),
                ));
            }
            let mut cut = out.valid_len;
            if let Some(t) = truncate_to {
                if t == out.next_offset {
                    boundaries_hit = true;
                } else if let Some(p) = cut_offset_pos {
                    cut = p;
                }
                if !boundaries_hit {
                    return Err(corruption(
                        &path,
                        out.valid_len,
                        format!("checkpoint offset {t} is not a batch boundary of this segment"),
                    ));
                }
            }
            let tail = &buf[cut..];
            let torn = scan::data_end(tail);
            if torn > 0 {
                report.torn_bytes_cut += torn as u64;
                report.cut_at = Some((base, cut as u64));
                tracing::warn!(path = %path.display(), position = cut, bytes = torn,
                    stop = ?out.stop, "cutting torn tail");
            }
            drop(map);
            if torn > 0 {
                fsutil::zero_range(&file, &path, cut as u64, (cut + torn) as u64)?;
            }
            // Re-index only what stays.
            let map = SharedMap::read_only(&file, file_len as usize).ctx("mmap", &path)?;
            let o = scan::scan(map.slice(0, cut), base, |pos, h| {
                index.on_append(base, pos, h, config.index_interval_bytes)
            });
            summary = SegmentSummary {
                next_offset: o.next_offset,
                segment_len: cut as u64,
                max_timestamp: o.max_timestamp,
            };
        }
        (index, summary)
    };
    // The map spans the whole segment; the file keeps its length and grows as appends need.
    let capacity = file_len.max(config.segment_bytes);
    // Whatever survived may still sit only in the page cache (after a process crash): make it
    // durable before the recovery point says so.
    file.sync_all().ctx("fsync", &path)?;
    for ext in [INDEX_EXT, TIME_INDEX_EXT] {
        // Index files of a segment that is active again (after TruncateTo) are stale.
        let p = segment_path(dir, base, ext);
        if p.exists() {
            std::fs::remove_file(&p).ctx("unlink", &p)?;
        }
    }
    let len = summary.segment_len as usize;
    let writer = SharedMap::writable(&file, capacity as usize, len).ctx("mmap", &path)?;
    let roll_reference = if len > 0 {
        batch::parse_header(writer.shared().slice(0, len))
            .ok()
            .map(|h| h.max_timestamp)
    } else {
        None
    };
    let seg = Segment::new(dir, base, Arc::clone(writer.shared()), index, summary);
    Ok((seg, writer, roll_reference))
}

const RP_MAGIC: &[u8; 4] = b"RNRP";
const RP_VERSION: u16 = 1;

/// `recovery-point` file: magic "RNRP", version u16, reserved u16, offset u64, CRC-32C u32.
fn write_recovery_point(dir: &Path, offset: u64) -> Result<()> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(RP_MAGIC);
    b.extend_from_slice(&RP_VERSION.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    fsutil::write_atomic(&dir.join(RECOVERY_POINT_FILE), &b)
}

fn read_recovery_point(dir: &Path) -> Result<u64> {
    let path = dir.join(RECOVERY_POINT_FILE);
    let b = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StorageError::io("read", path, e)),
    };
    let ok = b.len() == 20
        && &b[..4] == RP_MAGIC
        && b[4..6] == RP_VERSION.to_be_bytes()
        && crc32c::crc32c(&b[..16]).to_be_bytes() == b[16..20];
    if !ok {
        // Written atomically, so a bad one is damage, not a crash: refuse to guess.
        return Err(corruption(&path, 0, "bad recovery-point file".into()));
    }
    Ok(u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")))
}
