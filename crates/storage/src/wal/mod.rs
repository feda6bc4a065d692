//! The group WAL: one per Raft group, the Raft log store's disk format.
//!
//! Appends return as soon as their bytes are written to the page cache; a flusher thread
//! fdatasyncs everything written so far and then completes every callback waiting on those
//! bytes (group commit: one fdatasync serves many appends). Plain file I/O, no maps, so every
//! failure is a `Result`, and an fdatasync failure poisons the WAL: every later write fails with
//! [`StorageError::Poisoned`].
//!
//! Files are named by the index of their first entry (`00000000000000000000.wal`), roll at
//! [`WalConfig::file_bytes`], and are removed whole by [`Wal::purge_upto`].
//!
//! ```text
//! file header (20 bytes)            record (24 + N bytes)
//!   0  4  magic "RNWL"                0  4  CRC-32C of bytes 4..24+N
//!   4  2  version (1)                 4  4  payload length N
//!   6  2  reserved (0)                8  8  index
//!   8  8  first index                16  8  term
//!  16  4  CRC-32C of bytes 0..16     24  N  payload (opaque to the WAL)
//! ```
//!
//! One file on purpose (over 600 lines; the vote/committed record is apart in `meta.rs`): the
//! writer, the flusher, recovery and purge share the file format and the durability rules.

mod meta;

pub use meta::{FILE_NAME as META_FILE, LogPosition, VOTE_BYTES_MAX, WalMeta};

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{IoContext, Result, StorageError};
use crate::fsutil::{self, file_stem, parse_stem};
use crate::persist::{PersistMode, Poison};
use meta::MetaFile;

/// Extension of WAL files.
pub const WAL_EXT: &str = "wal";
/// Bytes of a WAL file header.
pub const FILE_HEADER_LEN: usize = 20;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 24;
const FILE_MAGIC: &[u8; 4] = b"RNWL";
const VERSION: u16 = 1;

/// Sizes and durability of a WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalConfig {
    /// Roll to a new file once this many bytes are written. Default 64 MiB.
    pub file_bytes: u64,
    /// Largest payload accepted or read back; a longer length on disk is corruption.
    /// Default 65 MiB (the largest batch plus room for the command around it).
    pub entry_bytes_max: usize,
    /// When callbacks complete; see [`PersistMode`].
    pub persist: PersistMode,
    /// On damage to durable data, cut the log at the first damage instead of refusing to open
    /// (see [`WalRepair`]). Only safe when a replica can supply what was cut. Default false.
    pub repair: bool,
    /// Least time between two saves of a position given to [`Wal::record_committed`], so they
    /// take a small share of the disk's fdatasyncs. Default 10 ms.
    pub committed_save_interval: Duration,
    /// Open a WAL whose `wal.meta` is missing although it holds log files, recreating the meta
    /// empty. That forgets the vote (a node may then vote twice in one term, breaking Raft's
    /// safety), so it is refused unless the operator says so. Default false.
    pub accept_missing_meta: bool,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            file_bytes: 64 << 20,
            entry_bytes_max: runnel_record::BATCH_BYTES_MAX + (1 << 20),
            persist: PersistMode::Fsync,
            repair: false,
            committed_save_interval: Duration::from_millis(10),
            accept_missing_meta: false,
        }
    }
}

/// One Raft log entry as the WAL stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Raft log index.
    pub index: u64,
    /// Raft term.
    pub term: u64,
    /// Encoded entry (the Raft layer's format).
    pub payload: Bytes,
}

/// How the WAL makes written bytes durable; injectable so tests can count, delay or fail syncs.
pub trait Syncer: Send + Sync + 'static {
    /// Makes the file's written data durable (fdatasync).
    fn sync_data(&self, file: &File) -> io::Result<()>;
}

/// The real syncer: `fdatasync(2)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fdatasync;

impl Syncer for Fdatasync {
    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }
}

/// Called once the appended entries are durable (or with the error that prevents it).
pub type DurableCallback = Box<dyn FnOnce(Result<()>) + Send + 'static>;

/// What recovery found and did when the WAL was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalRecovery {
    /// WAL files after recovery.
    pub files: usize,
    /// Entries readable after recovery.
    pub entries: u64,
    /// Bytes cut from a torn tail.
    pub torn_bytes_cut: u64,
    /// File and byte position of the cut, if any.
    pub cut_at: Option<(PathBuf, u64)>,
    /// Files removed because a purge had covered them.
    pub files_purged: usize,
    /// Damage to durable data that was cut (only with [`WalConfig::repair`]).
    pub repaired: Option<WalRepair>,
}

/// Durable WAL data found damaged and cut at open.
///
/// The entries from `first_lost` on are gone from this replica although a quorum may have
/// acknowledged them with its help: the node must not vote until it has them back (see
/// [`Wal::catch_up_floor`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRepair {
    /// The file where the damage was found.
    pub path: PathBuf,
    /// Index of the first entry that is no longer readable.
    pub first_lost: u64,
    /// The committed index saved before the repair.
    pub committed_before: Option<u64>,
    /// What was wrong.
    pub reason: String,
    /// Where copies of the WAL files, as found before the cut, were kept.
    pub quarantine: PathBuf,
}

/// Copies every WAL file of `dir` into a new `damaged-<ms since epoch>` directory in it.
fn quarantine_files(dir: &Path) -> Result<PathBuf> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let q = dir.join(format!("damaged-{ms}"));
    std::fs::create_dir_all(&q).ctx("create directory", &q)?;
    for entry in std::fs::read_dir(dir).ctx("list", dir)? {
        let path = entry.ctx("list", dir)?.path();
        if path.is_file() {
            let to = q.join(path.file_name().expect("file name"));
            std::fs::copy(&path, &to).ctx("copy", &path)?;
        }
    }
    fsutil::fsync_dir(&q)?;
    fsutil::fsync_dir(dir)?;
    Ok(q)
}

struct WalFile {
    first_index: u64,
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    /// (byte position, term) of each entry, from `first_index` on.
    entries: Vec<(u64, u64)>,
}

impl WalFile {
    fn next_index(&self) -> u64 {
        self.first_index + self.entries.len() as u64
    }
}

struct State {
    files: Vec<WalFile>,
    meta: MetaFile,
    written_seq: u64,
    synced_seq: u64,
    waiters: VecDeque<(u64, DurableCallback)>,
    shutdown: bool,
    /// The newest committed position handed to [`Wal::record_committed`], not yet taken by
    /// the committer thread.
    pending_committed: Option<LogPosition>,
    /// Bumped when the log is reset, so a committed position taken before is never saved.
    commit_epoch: u64,
    committer_stop: bool,
}

impl State {
    fn active(&mut self) -> &mut WalFile {
        self.files
            .last_mut()
            .expect("a WAL always has an active file")
    }

    fn next_index(&self) -> u64 {
        self.files.last().expect("active file").next_index()
    }

    fn first_readable(&self) -> u64 {
        let first = self.files[0].first_index;
        self.meta
            .state()
            .purged
            .map_or(first, |p| first.max(p.index + 1))
    }

    fn last(&self) -> Option<LogPosition> {
        for f in self.files.iter().rev() {
            if let Some(&(_, term)) = f.entries.last() {
                return Some(LogPosition {
                    leader_node: 0,
                    index: f.next_index() - 1,
                    term,
                });
            }
        }
        self.meta.state().purged
    }
}

struct Shared {
    dir: PathBuf,
    config: WalConfig,
    syncer: Arc<dyn Syncer>,
    state: Mutex<State>,
    wake: Condvar,
    /// Wakes the committer thread.
    commit_wake: Condvar,
    /// Serializes saves of the meta file (taken before `state`), so the committed index's
    /// fdatasync runs without holding `state`.
    meta_io: Mutex<()>,
    poison: Poison,
}

/// A Raft group's write-ahead log.
pub struct Wal {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
    committer: Option<JoinHandle<()>>,
    recovery: WalRecovery,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

impl Wal {
    /// Opens (creating if needed) the WAL in `dir` with real fdatasync.
    pub fn open(dir: impl AsRef<Path>, config: WalConfig) -> Result<Self> {
        Self::open_with_syncer(dir, config, Arc::new(Fdatasync))
    }

    /// Opens the WAL with an injected [`Syncer`].
    ///
    /// # Errors
    /// [`StorageError::Corruption`] when a record that must be durable fails its checks.
    pub fn open_with_syncer(
        dir: impl AsRef<Path>,
        config: WalConfig,
        syncer: Arc<dyn Syncer>,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        check_meta_present(&dir, config.accept_missing_meta)?;
        let mut meta = MetaFile::open(&dir)?;
        let (files, recovery) = recover(&dir, &config, meta.state())?;
        // What recovery kept may sit only in the page cache (a process crash, or a write that
        // failed halfway on a full disk): make it durable before the Raft layer trusts it.
        if let Some(f) = files.last() {
            f.file.sync_data().ctx("fdatasync", &f.path)?;
        }
        if recovery.repaired.is_some() {
            // What this replica knew committed is no longer all here: forget it, so the Raft
            // layer learns the commit point from the leader again.
            let mut m = meta.state().clone();
            m.committed = None;
            meta.save(m)?;
        }
        let state = State {
            files,
            meta,
            written_seq: 0,
            synced_seq: 0,
            waiters: VecDeque::new(),
            shutdown: false,
            pending_committed: None,
            commit_epoch: 0,
            committer_stop: false,
        };
        let shared = Arc::new(Shared {
            dir,
            config,
            syncer,
            state: Mutex::new(state),
            wake: Condvar::new(),
            commit_wake: Condvar::new(),
            meta_io: Mutex::new(()),
            poison: Poison::default(),
        });
        let s = Arc::clone(&shared);
        let flusher = std::thread::Builder::new()
            .name("wal-flusher".into())
            .spawn(move || flusher_loop(&s))
            .map_err(|e| StorageError::io("spawn flusher", &shared.dir, e))?;
        let s = Arc::clone(&shared);
        let committer = std::thread::Builder::new()
            .name("wal-committer".into())
            .spawn(move || committer_loop(&s));
        let committer = match committer {
            Ok(h) => h,
            Err(e) => {
                let err = StorageError::io("spawn committer", &shared.dir, e);
                let mut wal = Wal {
                    shared,
                    flusher: Some(flusher),
                    committer: None,
                    recovery,
                };
                wal.stop();
                return Err(err);
            }
        };
        tracing::info!(dir = %shared.dir.display(), ?recovery, "WAL opened");
        Ok(Wal {
            shared,
            flusher: Some(flusher),
            committer: Some(committer),
            recovery,
        })
    }

    /// What recovery did at open.
    pub fn recovery(&self) -> &WalRecovery {
        &self.recovery
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("WAL lock")
    }

    /// Appends contiguous entries and returns once they are written (not yet durable).
    /// `on_durable` runs on the flusher thread once they are fdatasynced (in
    /// [`PersistMode::Buffered`], right away).
    ///
    /// # Errors
    /// [`StorageError::InvalidArgument`] for non-contiguous or oversized entries (nothing is
    /// written), [`StorageError::Poisoned`], I/O errors (nothing is kept).
    pub fn append(&self, entries: &[Entry], on_durable: Option<DurableCallback>) -> Result<()> {
        let sh = &*self.shared;
        sh.poison.check()?;
        let mut st = self.lock();
        sh.poison.check()?;
        // An empty log that never purged anything has no next index yet: it starts where the
        // first append does (Raft logs may begin anywhere, e.g. at 1).
        if let Some(first) = entries.first()
            && st.meta.state().purged.is_none()
            && st.files.iter().all(|f| f.entries.is_empty())
            && first.index != st.next_index()
        {
            let old: Vec<WalFile> = st.files.drain(..).collect();
            for f in &old {
                std::fs::remove_file(&f.path).ctx("unlink", &f.path)?;
            }
            st.files.push(create_file(&sh.dir, first.index)?);
        }
        let mut buf = Vec::with_capacity(
            entries
                .iter()
                .map(|e| RECORD_HEADER_LEN + e.payload.len())
                .sum(),
        );
        let mut offsets = Vec::with_capacity(entries.len());
        for (next, e) in (st.next_index()..).zip(entries) {
            if e.index != next {
                return Err(StorageError::InvalidArgument(format!(
                    "WAL entry index {} is not the next index {next}",
                    e.index
                )));
            }
            if e.payload.len() > sh.config.entry_bytes_max {
                return Err(StorageError::InvalidArgument(format!(
                    "WAL entry of {} bytes exceeds entry_bytes_max {}",
                    e.payload.len(),
                    sh.config.entry_bytes_max
                )));
            }
            offsets.push((buf.len() as u64, e.term));
            encode_record(&mut buf, e);
        }
        if entries.is_empty() {
            drop(st);
            if let Some(cb) = on_durable {
                cb(Ok(()));
            }
            return Ok(());
        }
        if st.active().len + buf.len() as u64 > sh.config.file_bytes
            && !st.active().entries.is_empty()
        {
            self.roll(&mut st)?;
        }
        let active = st.active();
        let at = active.len;
        if let Err(e) = active.file.write_all_at(&buf, at) {
            // Drop whatever part reached the file so it can never be mistaken for entries.
            let _ = active.file.set_len(at);
            return Err(StorageError::io("write", &active.path, e));
        }
        active.len += buf.len() as u64;
        active
            .entries
            .extend(offsets.into_iter().map(|(o, t)| (at + o, t)));
        st.written_seq += 1;
        let seq = st.written_seq;
        match sh.config.persist {
            PersistMode::Fsync => {
                if let Some(cb) = on_durable {
                    st.waiters.push_back((seq, cb));
                }
                drop(st);
                sh.wake.notify_one();
            }
            PersistMode::Buffered => {
                drop(st);
                if let Some(cb) = on_durable {
                    cb(Ok(()));
                }
            }
        }
        Ok(())
    }

    /// Appends and waits until the entries are durable.
    pub fn append_durable(&self, entries: &[Entry]) -> Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.append(entries, Some(Box::new(move |r| drop(tx.send(r)))))?;
        self.wait(rx)
    }

    /// Waits until everything written so far is durable (forces an fdatasync in any mode).
    pub fn flush(&self) -> Result<()> {
        flush(&self.shared)
    }

    fn wait(&self, rx: mpsc::Receiver<Result<()>>) -> Result<()> {
        wait(rx)
    }

    fn roll(&self, st: &mut State) -> Result<()> {
        let sh = &*self.shared;
        let old = st.active();
        if let Err(e) = sh.syncer.sync_data(&old.file) {
            let why = format!("fdatasync {}: {e}", old.path.display());
            sh.poison.set(why.clone());
            return Err(StorageError::Poisoned(why));
        }
        let next = st.next_index();
        let f = create_file(&sh.dir, next)?;
        st.files.push(f);
        Ok(())
    }

    /// Reads entries `[start, end)`, stopping once `max_bytes` of payload are read (always
    /// returning at least one entry when the range is not empty).
    ///
    /// # Errors
    /// [`StorageError::InvalidArgument`] for a range outside the log;
    /// [`StorageError::Corruption`] if a record fails its CRC on the way back.
    pub fn read(&self, start: u64, end: u64, max_bytes: usize) -> Result<Vec<Entry>> {
        let st = self.lock();
        let (first, next) = (st.first_readable(), st.next_index());
        if start < first || end > next || start > end {
            return Err(StorageError::InvalidArgument(format!(
                "read [{start}, {end}) outside the WAL's [{first}, {next})"
            )));
        }
        let mut out = Vec::with_capacity((end - start).min(1024) as usize);
        let mut bytes = 0usize;
        let mut fi = st.files.partition_point(|f| f.first_index <= start) - 1;
        for index in start..end {
            while index >= st.files[fi].next_index() {
                fi += 1;
            }
            let f = &st.files[fi];
            let (pos, _) = f.entries[(index - f.first_index) as usize];
            let e = read_record(f, pos, index, self.shared.config.entry_bytes_max)?;
            bytes += e.payload.len();
            out.push(e);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Removes every entry after `index` (durably) — Raft's conflict truncation.
    ///
    /// # Errors
    /// [`StorageError::InvalidArgument`] when `index` lies below the purged prefix.
    pub fn truncate_after(&self, index: u64) -> Result<()> {
        self.truncate_from(index + 1)
    }

    /// Removes every entry at or after `keep_next` (durably); `truncate_from(first_index())`
    /// empties the log.
    ///
    /// # Errors
    /// [`StorageError::InvalidArgument`] when `keep_next` lies inside the purged prefix.
    pub fn truncate_from(&self, keep_next: u64) -> Result<()> {
        let sh = &*self.shared;
        sh.poison.check()?;
        let mut st = self.lock();
        sh.poison.check()?;
        if keep_next < st.first_readable() {
            return Err(StorageError::InvalidArgument(format!(
                "cannot truncate from {keep_next}: entries up to {} are purged",
                st.first_readable() - 1
            )));
        }
        if keep_next >= st.next_index() {
            return Ok(());
        }
        let mut unlinked = false;
        while st.files.len() > 1 && st.files.last().expect("file").first_index >= keep_next {
            let f = st.files.pop().expect("file");
            std::fs::remove_file(&f.path).ctx("unlink", &f.path)?;
            unlinked = true;
        }
        let active = st.active();
        let keep = keep_next.saturating_sub(active.first_index) as usize;
        let cut = active.entries.get(keep).map_or(active.len, |&(pos, _)| pos);
        active.file.set_len(cut).ctx("truncate", &active.path)?;
        active.entries.truncate(keep);
        active.len = cut;
        let file = Arc::clone(&active.file);
        let path = active.path.clone();
        if let Err(e) = sh.syncer.sync_data(&file) {
            let why = format!("fdatasync {}: {e}", path.display());
            sh.poison.set(why.clone());
            return Err(StorageError::Poisoned(why));
        }
        if unlinked {
            fsutil::fsync_dir(&sh.dir)?;
        }
        Ok(())
    }

    /// Marks every entry up to `upto` purged (durably, in the meta file) and deletes whole files
    /// that hold nothing newer. Purging past the last entry empties the log, which then continues
    /// at `upto.index + 1` (after a snapshot is installed).
    pub fn purge_upto(&self, upto: LogPosition) -> Result<()> {
        let sh = &*self.shared;
        sh.poison.check()?;
        let _io = sh.meta_io.lock().expect("WAL meta lock");
        sh.poison.check()?;
        let mut st = self.lock();
        if st
            .meta
            .state()
            .purged
            .is_some_and(|p| p.index >= upto.index)
        {
            return Ok(());
        }
        let mut next_meta = st.meta.state().clone();
        next_meta.purged = Some(upto);
        st.meta.save(next_meta)?;
        let reset = st.next_index() <= upto.index + 1;
        let mut removed = Vec::new();
        if reset {
            removed.append(&mut st.files);
            st.files.push(create_file(&sh.dir, upto.index + 1)?);
        } else {
            while st.files.len() > 1 && st.files[0].next_index() <= upto.index + 1 {
                removed.push(st.files.remove(0));
            }
        }
        for f in &removed {
            std::fs::remove_file(&f.path).ctx("unlink", &f.path)?;
        }
        if !removed.is_empty() {
            fsutil::fsync_dir(&sh.dir)?;
        }
        Ok(())
    }

    /// Index of the first readable entry.
    pub fn first_index(&self) -> u64 {
        self.lock().first_readable()
    }

    /// Position of the last entry, or the purge point when no entry is left; `None` when empty.
    pub fn last(&self) -> Option<LogPosition> {
        self.lock().last()
    }

    /// The purge point.
    pub fn purged(&self) -> Option<LogPosition> {
        self.lock().meta.state().purged
    }

    /// Saves the vote (opaque bytes, at most [`VOTE_BYTES_MAX`]); durable when this returns.
    pub fn save_vote(&self, vote: &[u8]) -> Result<()> {
        self.save_meta(|m| m.vote = Some(Bytes::copy_from_slice(vote)))
    }

    /// The last saved vote.
    pub fn read_vote(&self) -> Option<Bytes> {
        self.lock().meta.state().vote.clone()
    }

    /// Saves the committed position; durable when this returns.
    ///
    /// Contract: the caller saves only positions whose entries this WAL already holds durably.
    /// Recovery relies on it: a bad record at or below the saved committed index is reported as
    /// corruption, never cut as a torn tail.
    pub fn save_committed(&self, committed: LogPosition) -> Result<()> {
        self.save_meta(|m| m.committed = Some(committed))
    }

    /// Records the committed position without waiting: the committer thread makes it durable
    /// soon after, once the entries up to it are durable here (it flushes first), so the same
    /// recovery contract as [`Wal::save_committed`] holds. Saves coalesce, at most one per
    /// [`WalConfig::committed_save_interval`]; an older position than one already recorded is
    /// ignored. [`Wal::close`] (and drop) save the last one at once.
    ///
    /// # Errors
    /// [`StorageError::Poisoned`] once an fdatasync (or an earlier recording) failed.
    pub fn record_committed(&self, committed: LogPosition) -> Result<()> {
        let sh = &*self.shared;
        sh.poison.check()?;
        let mut st = self.lock();
        let newer = |p: Option<LogPosition>| p.is_none_or(|p| p.index < committed.index);
        if newer(st.pending_committed) && newer(st.meta.state().committed) {
            st.pending_committed = Some(committed);
            drop(st);
            sh.commit_wake.notify_one();
        }
        Ok(())
    }

    /// The catch-up floor of a repaired replica: while set, the replica lacks entries a quorum
    /// may have counted on it for, and must not vote until it has re-replicated past this
    /// committed index (and the leader's commit point). `None` for a healthy replica.
    pub fn catch_up_floor(&self) -> Result<Option<u64>> {
        read_catch_up_floor(&self.shared.dir)
    }

    /// Sets (durably) or clears the catch-up floor.
    pub fn set_catch_up_floor(&self, floor: Option<u64>) -> Result<()> {
        let _st = self.lock();
        self.shared.poison.check()?;
        write_catch_up_floor(&self.shared.dir, floor)
    }

    /// Drops every entry and the purge and committed positions, keeping only the vote: for a
    /// replica whose state machine was lost and must be rebuilt from a leader's snapshot.
    /// Sets the catch-up floor to at least `floor` first.
    pub fn reset_keeping_vote(&self, floor: u64) -> Result<()> {
        let sh = &*self.shared;
        sh.poison.check()?;
        let _io = sh.meta_io.lock().expect("WAL meta lock");
        sh.poison.check()?;
        let mut st = self.lock();
        // A committed position recorded before the reset names entries that are gone.
        st.pending_committed = None;
        st.commit_epoch += 1;
        let floor = read_catch_up_floor(&sh.dir)?.unwrap_or(0).max(floor);
        write_catch_up_floor(&sh.dir, Some(floor))?;
        // Files first, then the meta: a crash in between leaves no files and the old purge
        // point, which recovery turns into an empty log again.
        for f in st.files.drain(..) {
            std::fs::remove_file(&f.path).ctx("unlink", &f.path)?;
        }
        fsutil::fsync_dir(&sh.dir)?;
        let mut m = st.meta.state().clone();
        m.committed = None;
        m.purged = None;
        st.meta.save(m)?;
        st.files.push(create_file(&sh.dir, 0)?);
        fsutil::fsync_dir(&sh.dir)?;
        Ok(())
    }

    /// The last saved committed position.
    pub fn read_committed(&self) -> Option<LogPosition> {
        self.lock().meta.state().committed
    }

    fn save_meta(&self, change: impl FnOnce(&mut WalMeta)) -> Result<()> {
        save_meta(&self.shared, |_, m| {
            change(m);
            true
        })
    }

    /// True once an fdatasync failed.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poison.is_poisoned()
    }

    /// Stops this handle for good, though others may still hold it: every later append,
    /// truncate, purge or meta save fails with [`StorageError::Poisoned`] carrying `why`, and
    /// any such write in flight has finished when this returns. For reopening the same
    /// directory in this process (a group restarted after a transient failure or to repair it).
    pub fn retire(&self, why: &str) {
        let sh = &*self.shared;
        sh.poison.retire(format!("retired: {why}"));
        let _io = sh.meta_io.lock().expect("WAL meta lock");
        let _st = self.lock();
    }

    /// Flushes and stops the flusher thread.
    pub fn close(mut self) -> Result<()> {
        let r = self.flush();
        self.stop();
        r
    }

    fn stop(&mut self) {
        // The committer first (it saves the last recorded position, which may need the flusher).
        self.lock().committer_stop = true;
        self.shared.commit_wake.notify_all();
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
        self.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.flusher.take() {
            let _ = h.join();
        }
    }
}

/// Refuses a WAL directory that holds log files but no meta file (unless `accept`): the meta
/// holds the node's vote, and a node that forgot its vote may vote twice in one term. The meta
/// is always created before the first log file, so only deletion explains its absence.
fn check_meta_present(dir: &Path, accept: bool) -> Result<()> {
    let meta = dir.join(meta::FILE_NAME);
    if meta.exists() {
        return Ok(());
    }
    let mut logs = 0;
    for entry in std::fs::read_dir(dir).ctx("list", dir)? {
        let name = entry.ctx("list", dir)?.file_name();
        if parse_stem(&name.to_string_lossy(), WAL_EXT).is_some() {
            logs += 1;
        }
    }
    if logs == 0 {
        return Ok(());
    }
    if accept {
        tracing::error!(dir = %dir.display(), files = logs,
            "wal.meta is missing: recreating it empty as the operator allowed; this node forgot \
             its vote and may vote twice in one term");
        return Ok(());
    }
    Err(StorageError::Corruption {
        path: meta,
        position: 0,
        reason: format!(
            "missing, but the WAL holds {logs} log file(s): this node forgot its vote, committed \
             index and purge point, and could vote twice in one term. Recover by wiping the data \
             directory and rejoining under a new node id (`runneld --join`, then `runnel cluster \
             replace-node`; docs/DEPLOY.md), or, knowing the risk, restart with \
             `raft.unsafe_accept_lost_vote = true`"
        ),
    })
}

/// Waits until everything written to `sh` so far is durable.
fn flush(sh: &Shared) -> Result<()> {
    sh.poison.check()?;
    let (tx, rx) = mpsc::sync_channel(1);
    {
        let mut st = sh.state.lock().expect("WAL lock");
        if st.written_seq == st.synced_seq {
            return Ok(());
        }
        let seq = st.written_seq;
        st.waiters
            .push_back((seq, Box::new(move |r| drop(tx.send(r)))));
    }
    sh.wake.notify_one();
    wait(rx)
}

fn wait(rx: mpsc::Receiver<Result<()>>) -> Result<()> {
    rx.recv()
        .unwrap_or_else(|_| Err(StorageError::Poisoned("WAL flusher stopped".into())))
}

/// Saves the meta file as `change` edits it (skipped when `change` returns false), with the
/// slot's fdatasync outside the state lock; a failed fdatasync poisons the WAL.
fn save_meta(sh: &Shared, change: impl FnOnce(&State, &mut WalMeta) -> bool) -> Result<()> {
    sh.poison.check()?;
    let _io = sh.meta_io.lock().expect("WAL meta lock");
    sh.poison.check()?; // a retire may have come while this waited
    let w = {
        let st = sh.state.lock().expect("WAL lock");
        let mut m = st.meta.state().clone();
        if !change(&st, &mut m) {
            return Ok(());
        }
        st.meta.prepare(m)?
    };
    w.write().inspect_err(|e| {
        if matches!(
            e,
            StorageError::Io {
                op: "fdatasync",
                ..
            }
        ) {
            sh.poison.set(e.to_string());
        }
    })?;
    sh.state.lock().expect("WAL lock").meta.finish(w);
    Ok(())
}

/// Makes positions handed to [`Wal::record_committed`] durable, newest first, until stopped
/// (saving the last one before it returns).
fn committer_loop(sh: &Shared) {
    let mut next_save = Instant::now();
    loop {
        let (pos, epoch) = {
            let mut st = sh.state.lock().expect("WAL lock");
            loop {
                // Between saves, positions only coalesce (a stop saves the last one at once).
                let now = Instant::now();
                if now < next_save && !st.committer_stop {
                    st = sh
                        .commit_wake
                        .wait_timeout(st, next_save - now)
                        .expect("WAL lock")
                        .0;
                    continue;
                }
                if let Some(p) = st.pending_committed.take() {
                    break (p, st.commit_epoch);
                }
                if st.committer_stop {
                    return;
                }
                st = sh.commit_wake.wait(st).expect("WAL lock");
            }
        };
        next_save = Instant::now() + sh.config.committed_save_interval;
        // The contract of a saved committed position: its entries are durable here (a follower
        // may learn of a commit before its own append is flushed).
        let r = flush(sh).and_then(|()| {
            save_meta(sh, |st, m| {
                let newer = m.committed.is_none_or(|c| c.index < pos.index);
                if st.commit_epoch != epoch || !newer {
                    return false;
                }
                m.committed = Some(pos);
                true
            })
        });
        if let Err(e) = r {
            sh.poison
                .set(format!("recording committed index {}: {e}", pos.index));
            return;
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.stop();
    }
}

fn flusher_loop(sh: &Shared) {
    loop {
        let (target, file) = {
            let mut st = sh.state.lock().expect("WAL lock");
            loop {
                let due = st.written_seq > st.synced_seq
                    && (sh.config.persist == PersistMode::Fsync || !st.waiters.is_empty());
                if due || st.shutdown {
                    break;
                }
                st = sh.wake.wait(st).expect("WAL lock");
            }
            if st.written_seq == st.synced_seq && st.shutdown {
                return;
            }
            if sh.poison.is_poisoned() {
                // Nothing more will be synced; fail whoever still waits and stop.
                let waiters: Vec<_> = st.waiters.drain(..).collect();
                drop(st);
                for (_, cb) in waiters {
                    cb(sh.poison.check());
                }
                return;
            }
            (st.written_seq, Arc::clone(&st.active().file))
        };
        let res = sh.syncer.sync_data(&file);
        let mut st = sh.state.lock().expect("WAL lock");
        let done: Vec<(u64, DurableCallback)> = match res {
            Ok(()) => {
                st.synced_seq = st.synced_seq.max(target);
                let n = st.waiters.iter().take_while(|(s, _)| *s <= target).count();
                st.waiters.drain(..n).collect()
            }
            Err(e) => {
                sh.poison
                    .set(format!("fdatasync {}: {e}", sh.dir.display()));
                st.waiters.drain(..).collect()
            }
        };
        drop(st);
        let result = sh.poison.check();
        for (_, cb) in done {
            cb(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(StorageError::Poisoned(e.to_string())),
            });
        }
    }
}

fn encode_record(buf: &mut Vec<u8>, e: &Entry) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&(e.payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(&e.index.to_be_bytes());
    buf.extend_from_slice(&e.term.to_be_bytes());
    buf.extend_from_slice(&e.payload);
    let crc = crc32c::crc32c(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Why a record does not parse: the data ran out, or it is wrong.
#[derive(Debug, PartialEq, Eq)]
enum RecordError {
    Incomplete,
    Zero,
    Bad(&'static str),
}

/// What [`scan_records`] found in a WAL file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordScan {
    /// (byte position, term) of every valid record, in order.
    pub entries: Vec<(u64, u64)>,
    /// Where valid records end.
    pub valid_len: usize,
    /// Why the scan stopped with non-zero bytes left; `None` when it reached the end of the
    /// buffer or only zeros follow.
    pub stop: Option<String>,
}

/// Scans WAL records in `buf` from `start`, expecting indexes `first_index, first_index + 1, …`.
/// Pure and panic-free on any input: the recovery scanner and a fuzz target.
pub fn scan_records(
    buf: &[u8],
    start: usize,
    first_index: u64,
    entry_bytes_max: usize,
) -> RecordScan {
    let mut entries = Vec::new();
    let mut pos = start.min(buf.len());
    let mut stop = None;
    while pos < buf.len() {
        let index = first_index.wrapping_add(entries.len() as u64);
        match parse_record(&buf[pos..], index, entry_bytes_max) {
            Ok((term, range)) => {
                entries.push((pos as u64, term));
                pos += range.end;
            }
            Err(RecordError::Zero) if crate::scan::data_end(&buf[pos..]) == 0 => break,
            Err(why) => {
                stop = Some(format!("{why:?}"));
                break;
            }
        }
    }
    RecordScan {
        entries,
        valid_len: pos,
        stop,
    }
}

/// Parses the record at the start of `buf`, expecting `index`. Returns (term, payload range).
fn parse_record(
    buf: &[u8],
    index: u64,
    max: usize,
) -> Result<(u64, std::ops::Range<usize>), RecordError> {
    if buf.len() < RECORD_HEADER_LEN {
        return Err(if buf.iter().all(|&b| b == 0) {
            RecordError::Zero
        } else {
            RecordError::Incomplete
        });
    }
    if buf[..RECORD_HEADER_LEN].iter().all(|&b| b == 0) {
        return Err(RecordError::Zero);
    }
    let len = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(RecordError::Bad("payload length above entry_bytes_max"));
    }
    if buf.len() < RECORD_HEADER_LEN + len {
        return Err(RecordError::Incomplete);
    }
    let stored = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[4..RECORD_HEADER_LEN + len]) != stored {
        return Err(RecordError::Bad("CRC-32C mismatch"));
    }
    let found = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
    if found != index {
        return Err(RecordError::Bad("index is not the next index"));
    }
    let term = u64::from_be_bytes(buf[16..24].try_into().expect("8 bytes"));
    Ok((term, RECORD_HEADER_LEN..RECORD_HEADER_LEN + len))
}

fn read_record(f: &WalFile, pos: u64, index: u64, max: usize) -> Result<Entry> {
    let mut header = [0u8; RECORD_HEADER_LEN];
    f.file
        .read_exact_at(&mut header, pos)
        .ctx("read", &f.path)?;
    let len = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    let corrupt = |reason: &str| StorageError::Corruption {
        path: f.path.clone(),
        position: pos,
        reason: reason.to_string(),
    };
    if len > max {
        return Err(corrupt("payload length above entry_bytes_max"));
    }
    let mut rec = vec![0u8; RECORD_HEADER_LEN + len];
    f.file.read_exact_at(&mut rec, pos).ctx("read", &f.path)?;
    let (term, range) = parse_record(&rec, index, max).map_err(|e| corrupt(&format!("{e:?}")))?;
    let payload = Bytes::from(rec).slice(range);
    Ok(Entry {
        index,
        term,
        payload,
    })
}

fn file_header(first_index: u64) -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[..4].copy_from_slice(FILE_MAGIC);
    h[4..6].copy_from_slice(&VERSION.to_be_bytes());
    h[8..16].copy_from_slice(&first_index.to_be_bytes());
    let crc = crc32c::crc32c(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_be_bytes());
    h
}

fn wal_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{}.{WAL_EXT}", file_stem(first_index)))
}

/// Creates a WAL file (temp name, header, fsync, rename, directory fsync).
fn create_file(dir: &Path, first_index: u64) -> Result<WalFile> {
    let path = wal_path(dir, first_index);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .ctx("create", &tmp)?;
    file.write_all_at(&file_header(first_index), 0)
        .ctx("write", &tmp)?;
    file.sync_all().ctx("fsync", &tmp)?;
    std::fs::rename(&tmp, &path).ctx("rename", &path)?;
    fsutil::fsync_dir(dir)?;
    Ok(WalFile {
        first_index,
        path,
        file: Arc::new(file),
        len: FILE_HEADER_LEN as u64,
        entries: Vec::new(),
    })
}

/// File in the WAL directory holding the catch-up floor while a repaired replica catches up.
const CATCH_UP_FILE: &str = "CATCH_UP";

fn read_catch_up_floor(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(CATCH_UP_FILE);
    match std::fs::read_to_string(&path) {
        // Unreadable content still means "catching up"; 0 asks only for the leader's commit.
        Ok(s) => Ok(Some(s.trim().parse().unwrap_or(0))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io("read", &path, e)),
    }
}

fn write_catch_up_floor(dir: &Path, floor: Option<u64>) -> Result<()> {
    let path = dir.join(CATCH_UP_FILE);
    match floor {
        Some(f) => fsutil::write_atomic(&path, format!("{f}\n").as_bytes()),
        None => match std::fs::remove_file(&path) {
            Ok(()) => fsutil::fsync_dir(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("unlink", &path, e)),
        },
    }
}

/// Scans every WAL file, cutting a torn tail of the last one and refusing anything else bad
/// (or, with [`WalConfig::repair`], cutting the log at the first damage).
fn recover(dir: &Path, config: &WalConfig, meta: &WalMeta) -> Result<(Vec<WalFile>, WalRecovery)> {
    let mut report = WalRecovery::default();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).ctx("list", dir)? {
        let entry = entry.ctx("list", dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            std::fs::remove_file(entry.path()).ctx("unlink", &entry.path())?;
        } else if let Some(first) = parse_stem(&name, WAL_EXT) {
            names.push(first);
        }
    }
    names.sort_unstable();
    let committed = meta.committed.map(|c| c.index);
    // Damage to durable data: refused, or with `repair` cut after a durable note of the floor.
    let damage = |report: &mut WalRecovery,
                  path: &Path,
                  pos: usize,
                  first_lost: u64,
                  reason: String| {
        if !config.repair {
            return Err(StorageError::Corruption {
                path: path.to_path_buf(),
                position: pos as u64,
                reason,
            });
        }
        // Keep every file as found, so the cut can be examined (or undone by hand).
        let quarantine = match &report.repaired {
            Some(r) => r.quarantine.clone(),
            None => quarantine_files(dir)?,
        };
        let floor = read_catch_up_floor(dir)?
            .unwrap_or(0)
            .max(committed.unwrap_or(0));
        write_catch_up_floor(dir, Some(floor))?;
        tracing::error!(path = %path.display(), position = pos, first_lost, ?committed, %reason,
            quarantine = %quarantine.display(),
            "durable WAL data is damaged: cutting the log there; the entries must come back from a replica");
        report.repaired = Some(WalRepair {
            path: path.to_path_buf(),
            first_lost,
            committed_before: committed,
            reason,
            quarantine,
        });
        Ok(())
    };
    let mut files: Vec<WalFile> = Vec::with_capacity(names.len());
    let mut cut_rest = false;
    for (i, &first) in names.iter().enumerate() {
        let path = wal_path(dir, first);
        if cut_rest {
            std::fs::remove_file(&path).ctx("unlink", &path)?;
            continue;
        }
        let is_last = i + 1 == names.len();
        let bytes = std::fs::read(&path).ctx("read", &path)?;
        // Files get their header under a temp name, so a real name always has a whole one.
        let whole_problem =
            if bytes.len() < FILE_HEADER_LEN || bytes[..FILE_HEADER_LEN] != file_header(first) {
                Some("bad WAL file header".to_string())
            } else {
                files
                    .last()
                    .filter(|prev| prev.next_index() != first)
                    .map(|prev| {
                        format!(
                            "file starts at {first}, previous ends at {}",
                            prev.next_index()
                        )
                    })
            };
        if let Some(reason) = whole_problem {
            let first_lost = files.last().map_or(first, |f| f.next_index());
            damage(&mut report, &path, 0, first_lost, reason)?;
            std::fs::remove_file(&path).ctx("unlink", &path)?;
            cut_rest = true;
            continue;
        }
        let scan = scan_records(&bytes, FILE_HEADER_LEN, first, config.entry_bytes_max);
        let pos = scan.valid_len;
        let entries = scan.entries;
        if let Some(why) = scan.stop {
            let index = first + entries.len() as u64;
            let durable = committed.is_some_and(|c| index <= c);
            if !is_last || durable {
                let reason = format!(
                    "record {index}: {why} (committed index {committed:?}, last file: {is_last})"
                );
                damage(&mut report, &path, pos, index, reason)?;
                cut_rest = true;
            } else {
                report.torn_bytes_cut += (bytes.len() - pos) as u64;
                report.cut_at = Some((path.clone(), pos as u64));
                tracing::warn!(path = %path.display(), position = pos, bytes = bytes.len() - pos,
                    %why, "cutting torn WAL tail");
            }
        }
        if pos < bytes.len() {
            // A torn tail, or zeros after the last record (size grew, data did not): drop it.
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .ctx("open", &path)?;
            f.set_len(pos as u64).ctx("truncate", &path)?;
            f.sync_all().ctx("fsync", &path)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ctx("open", &path)?;
        files.push(WalFile {
            first_index: first,
            path,
            file: Arc::new(file),
            len: pos as u64,
            entries,
        });
    }
    if cut_rest {
        fsutil::fsync_dir(dir)?;
    }
    // Drop files a purge covered but did not get to delete before a crash.
    if let Some(p) = meta.purged {
        while !files.is_empty() && files[0].next_index() <= p.index + 1 {
            let f = files.remove(0);
            std::fs::remove_file(&f.path).ctx("unlink", &f.path)?;
            report.files_purged += 1;
        }
        if let Some(f) = files.first()
            && f.first_index > p.index + 1
        {
            let path = f.path.clone();
            let reason = format!("entries after the purge point {} are missing", p.index);
            damage(&mut report, &path, 0, p.index + 1, reason)?;
            for f in files.drain(..) {
                std::fs::remove_file(&f.path).ctx("unlink", &f.path)?;
            }
            fsutil::fsync_dir(dir)?;
        }
    }
    if files.is_empty() {
        files.push(create_file(dir, meta.purged.map_or(0, |p| p.index + 1))?);
    } else if report.files_purged > 0 {
        fsutil::fsync_dir(dir)?;
    }
    // Every committed entry must still be here (or purged behind a snapshot).
    let next = files.last().expect("file").next_index();
    if let Some(c) = meta.committed
        && c.index >= next
        && meta.purged.is_none_or(|p| p.index < c.index)
        && report.repaired.is_none()
    {
        let reason = format!(
            "entries up to the committed index {} are missing (log ends before {next})",
            c.index
        );
        damage(&mut report, dir, 0, next, reason)?;
    }
    report.files = files.len();
    let first_readable = meta.purged.map_or(files[0].first_index, |p| {
        files[0].first_index.max(p.index + 1)
    });
    report.entries = files.last().expect("file").next_index() - first_readable;
    Ok((files, report))
}
