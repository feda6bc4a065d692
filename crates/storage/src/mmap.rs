//! The only `unsafe` in Runnel's storage: a file map with one writer and many readers.
//!
//! A [`SharedMap`] is a read-only shared mapping of a file of fixed size. Its `published` length
//! splits it in two: bytes below are immutable and may be read by anyone, as `&[u8]` or as
//! [`Bytes`] that keep the map alive; bytes at and above belong to the single [`MapWriter`]. The
//! writer writes new bytes past `published` (through the file: the page cache is shared with the
//! mapping) and then advances it with `Release`; readers load it with `Acquire`, so a reader
//! that sees a length also sees the bytes below it.
//!
//! A writable map spans the whole segment (`capacity`) from the start, but the file behind it
//! grows in steps ([`PREALLOC_MIN`] doubling to [`PREALLOC_MAX_STEP`]): the writer reserves real
//! blocks ahead of what it writes, so appends still never hit a hole or a full disk mid-batch,
//! but an idle partition holds 256 KiB of disk, not a whole segment. Pages of the map past the
//! end of the file are never touched (that would raise `SIGBUS`): `published` never passes the
//! file's length.
//!
//! Pages a reader touches through a map count as the process's resident memory (cgroups and
//! the OOM killer see them) although the kernel could drop them at any time. So reads are
//! counted, and once more than the resident budget ([`set_resident_budget`]) was read since
//! the last trim, every map read since then is told `MADV_DONTNEED`: for a shared file mapping
//! that only drops the process's page-table entries (the page cache keeps the data, the next
//! read faults it back in), so it is safe while other threads read the same bytes.
//!
//! Soundness rests on four rules kept by this module alone:
//! 1. only one `MapWriter` exists per map (it is created with the map and is not `Clone`);
//! 2. the writer never writes below `published`, and never past the map; it extends the file
//!    before it writes past its end, so `published` ≤ the file's length;
//! 3. readers never form a slice reaching past `published`;
//! 4. the owner of the file never truncates or rewrites it while a map lives (recovery zeroes
//!    torn tails *before* mapping; retention only unlinks, which leaves live maps valid).

use std::fs::File;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Weak};

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};

/// A mapped file whose bytes below `published` are immutable and shareable.
pub struct SharedMap {
    /// Keeps the (read-only) mapping alive; reads go through `ptr`.
    map: Mmap,
    ptr: *const u8,
    capacity: usize,
    published: AtomicUsize,
    /// Read since the last trim.
    touched: AtomicBool,
}

// SAFETY: the raw pointer targets a read-only mapping that lives as long as `_map`; all
// mutation goes through the single `MapWriter` above `published` (rules 1-3 in the module docs),
// and reads below `published` are synchronised by the Release/Acquire pair on `published`.
unsafe impl Send for SharedMap {}
// SAFETY: as above; `&SharedMap` only ever yields reads below `published`.
unsafe impl Sync for SharedMap {}

impl std::fmt::Debug for SharedMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedMap")
            .field("capacity", &self.capacity)
            .field("published", &self.published())
            .finish()
    }
}

/// The first reservation of a new segment file, and the smallest growth step.
pub const PREALLOC_MIN: u64 = 256 << 10;
/// The largest growth step: each step doubles the reservation up to this.
pub const PREALLOC_MAX_STEP: u64 = 16 << 20;

/// Bytes read through maps since the last trim.
static READ_SINCE_TRIM: AtomicU64 = AtomicU64::new(0);
/// Reads between trims; 0: never trim.
static RESIDENT_BUDGET: AtomicU64 = AtomicU64::new(DEFAULT_RESIDENT_BUDGET);
/// Default of [`set_resident_budget`].
pub const DEFAULT_RESIDENT_BUDGET: u64 = 256 << 20;
/// Trims done, for tests and metrics.
static TRIMS: AtomicU64 = AtomicU64::new(0);

fn registry() -> &'static Mutex<Vec<Weak<SharedMap>>> {
    static MAPS: Mutex<Vec<Weak<SharedMap>>> = Mutex::new(Vec::new());
    &MAPS
}

fn register(map: Arc<SharedMap>) -> Arc<SharedMap> {
    let mut maps = registry().lock().expect("map registry");
    if maps.len() >= 64 && maps.len().is_power_of_two() {
        maps.retain(|w| w.strong_count() > 0);
    }
    maps.push(Arc::downgrade(&map));
    map
}

/// Bounds the pages that reads through segment maps keep resident in this process: after
/// `bytes` were read, every map read since the last trim drops its pages (0: never).
pub fn set_resident_budget(bytes: u64) {
    RESIDENT_BUDGET.store(bytes, Ordering::Relaxed);
}

/// How many times maps were trimmed.
pub fn trims() -> u64 {
    TRIMS.load(Ordering::Relaxed)
}

/// Drops the resident pages of every map read since the last trim. One thread trims at a time;
/// others go on reading.
fn trim() {
    let Ok(mut maps) = registry().try_lock() else {
        return;
    };
    READ_SINCE_TRIM.store(0, Ordering::Relaxed);
    TRIMS.fetch_add(1, Ordering::Relaxed);
    maps.retain(|w| match w.upgrade() {
        Some(m) => {
            if m.touched.swap(false, Ordering::Relaxed) {
                m.drop_resident();
            }
            true
        }
        None => false,
    });
}

/// The single writer of a [`SharedMap`].
///
/// It writes with `pwritev(2)` into the file rather than storing through the map: Linux's page
/// cache is unified, so the bytes appear in every shared mapping of the file, and the writer
/// avoids a page fault plus the file system's `page_mkwrite` work for every fresh page
/// (measured: see docs/BENCHMARKS.md). Readers still read through the map, without copies.
#[derive(Debug)]
pub struct MapWriter {
    map: Arc<SharedMap>,
    file: File,
    /// Bytes of the file with blocks reserved (its length).
    reserved: u64,
}

impl SharedMap {
    /// Maps `capacity` bytes of `file` for writing, with `published` bytes already valid.
    ///
    /// The file must hold at least `published` bytes; the writer grows it as it appends.
    pub fn writable(file: &File, capacity: usize, published: usize) -> io::Result<MapWriter> {
        assert!(published <= capacity, "published length beyond the map");
        check_len(file, published)?;
        let reserved = file.metadata()?.len();
        // SAFETY: rule 4: bytes below `published` never change while mapped; the writer only
        // writes at or above it, through the file, which readers never look at.
        let map = unsafe { MmapOptions::new().len(capacity).map(file)? };
        let ptr = map.as_ptr();
        let map = SharedMap {
            map,
            ptr,
            capacity,
            published: AtomicUsize::new(published),
            touched: AtomicBool::new(false),
        };
        Ok(MapWriter {
            map: register(Arc::new(map)),
            file: file.try_clone()?,
            reserved,
        })
    }

    /// Maps the first `len` bytes of `file` read-only; all of them are published.
    pub fn read_only(file: &File, len: usize) -> io::Result<Arc<SharedMap>> {
        assert!(len > 0, "cannot map an empty range");
        check_len(file, len)?;
        // SAFETY: rule 4: the file is sealed and nobody writes or truncates it while mapped.
        let map = unsafe { MmapOptions::new().len(len).map(file)? };
        let ptr = map.as_ptr();
        Ok(register(Arc::new(SharedMap {
            map,
            ptr,
            capacity: len,
            published: AtomicUsize::new(len),
            touched: AtomicBool::new(false),
        })))
    }

    /// Bytes readable now.
    pub fn published(&self) -> usize {
        self.published.load(Ordering::Acquire)
    }

    /// The published bytes `[start, end)`.
    ///
    /// # Panics
    /// If the range is not below the published length.
    pub fn slice(&self, start: usize, end: usize) -> &[u8] {
        assert!(
            start <= end && end <= self.published(),
            "read past the published length"
        );
        self.note_read(end - start);
        // SAFETY: rule 3: [start, end) lies below `published`, so no writer touches it and the
        // Acquire load above made the writer's bytes visible.
        unsafe { std::slice::from_raw_parts(self.ptr.add(start), end - start) }
    }

    /// Counts a read of `len` bytes, trimming every map read since the last trim once more
    /// than the budget was read.
    fn note_read(&self, len: usize) {
        if !self.touched.load(Ordering::Relaxed) {
            self.touched.store(true, Ordering::Relaxed);
        }
        let budget = RESIDENT_BUDGET.load(Ordering::Relaxed);
        if budget == 0 {
            return;
        }
        let read = READ_SINCE_TRIM.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        if read > budget {
            trim();
        }
    }

    /// Drops this map's pages from the process's resident set (they stay in the page cache).
    fn drop_resident(&self) {
        let len = self.published().min(self.capacity);
        if len == 0 {
            return;
        }
        // SAFETY: the mapping is shared and read-only (MAP_SHARED, PROT_READ): MADV_DONTNEED
        // only drops page-table entries, and the next access reads the same bytes back from
        // the page cache. No data changes, so slices other threads hold stay valid. The range
        // stays below `published`, which is inside the file (no page past EOF is touched).
        let r = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, len)
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "madvise(DONTNEED) failed");
        }
    }

    /// The published bytes `[start, end)` as a `Bytes` that keeps this map alive.
    pub fn bytes(self: &Arc<Self>, start: usize, end: usize) -> Bytes {
        let _ = self.slice(start, end); // bounds check
        Bytes::from_owner(MapSlice {
            map: Arc::clone(self),
            start,
            len: end - start,
        })
    }
}

impl MapWriter {
    /// The shared, readable side of this map.
    pub fn shared(&self) -> &Arc<SharedMap> {
        &self.map
    }

    /// The file this writer writes (for syncing it from another thread).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes still free above the published length.
    pub fn remaining(&self) -> usize {
        self.map.capacity - self.map.published.load(Ordering::Relaxed)
    }

    /// Bytes of the file with blocks reserved.
    #[cfg(test)]
    fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Reserves blocks up to at least `need` bytes: one step (the reservation so far, between
    /// [`PREALLOC_MIN`] and [`PREALLOC_MAX_STEP`]) or more, never past the map.
    fn grow(&mut self, need: u64) -> io::Result<()> {
        let cap = self.map.capacity as u64;
        let step = self.reserved.clamp(PREALLOC_MIN, PREALLOC_MAX_STEP);
        let target = need.max(self.reserved.saturating_add(step)).min(cap);
        reserve(&self.file, self.reserved, target)?;
        self.reserved = target;
        Ok(())
    }

    /// Writes `parts` back to back at the published length, then publishes them all at once.
    /// Nothing is published if the write fails.
    ///
    /// # Panics
    /// If they do not fit; callers check [`MapWriter::remaining`] first.
    pub fn append(&mut self, parts: &[&[u8]]) -> io::Result<usize> {
        let start = self.map.published.load(Ordering::Relaxed);
        let total: usize = parts.iter().map(|p| p.len()).sum();
        assert!(
            total <= self.map.capacity - start,
            "append past the end of the map"
        );
        let end = (start + total) as u64;
        if end > self.reserved {
            self.grow(end)?;
        }
        // Rules 1-2: we are the only writer and [start, start + total) lies at or above
        // `published`, inside the map and inside the file, so no reader can be looking at
        // those bytes.
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        let mut at = start as u64;
        while !bufs.is_empty() {
            let n = rustix::io::pwritev(&self.file, bufs, at)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwritev wrote nothing",
                ));
            }
            at += n as u64;
            IoSlice::advance_slices(&mut bufs, n);
        }
        self.map.published.store(start + total, Ordering::Release);
        Ok(start)
    }

    /// fdatasyncs the file so bytes up to `to` reach the disk.
    pub fn sync_range(&self, from: usize, to: usize) -> io::Result<()> {
        if to <= from {
            return Ok(());
        }
        self.file.sync_data()
    }
}
/// Extends `file` from `from` to `to` bytes with real blocks (zeros where the file system has
/// no `fallocate`).
pub fn reserve(file: &File, from: u64, to: u64) -> io::Result<()> {
    if to <= from {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), from, to - from) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            use std::os::unix::fs::FileExt;
            let zeros = vec![0u8; 1 << 20];
            let mut at = from;
            while at < to {
                let n = ((to - at) as usize).min(zeros.len());
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn check_len(file: &File, len: usize) -> io::Result<()> {
    let file_len = file.metadata()?.len();
    if (file_len as u128) < len as u128 {
        // Never map past EOF: touching such pages raises SIGBUS.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("map of {len} bytes over a file of {file_len}"),
        ));
    }
    Ok(())
}

struct MapSlice {
    map: Arc<SharedMap>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        self.map.slice(self.start, self.start + self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_only_published_bytes_and_keep_the_map_alive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(4096).unwrap();
        let mut w = SharedMap::writable(&f, 4096, 0).unwrap();
        assert_eq!(w.append(&[b"hello ", b"world"]).unwrap(), 0);
        let shared = Arc::clone(w.shared());
        assert_eq!(shared.published(), 11);
        let b = shared.bytes(0, 11);
        drop(w);
        drop(shared);
        std::fs::remove_file(&p).unwrap();
        assert_eq!(
            &b[..],
            b"hello world",
            "unlinked file stays readable through a live map"
        );
    }

    #[test]
    #[should_panic(expected = "published")]
    fn reading_past_published_panics() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(4096).unwrap();
        let w = SharedMap::writable(&f, 4096, 10).unwrap();
        let _ = w.shared().slice(0, 11);
    }

    #[test]
    fn the_file_grows_in_steps_as_appends_need_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        reserve(&f, 0, PREALLOC_MIN).unwrap();
        let cap = 64 << 20;
        let mut w = SharedMap::writable(&f, cap, 0).unwrap();
        assert_eq!(w.reserved(), PREALLOC_MIN);
        let chunk: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut sizes = vec![];
        let mut written = 0;
        while written + chunk.len() <= 40 << 20 {
            w.append(&[&chunk]).unwrap();
            written += chunk.len();
            let len = f.metadata().unwrap().len();
            assert!(len >= written as u64, "published past the file's end");
            if sizes.last() != Some(&len) {
                sizes.push(len);
            }
        }
        // Doubling from 256 KiB, then 16 MiB steps: a handful of fallocates per segment.
        assert!(sizes.len() <= 10, "{sizes:?}");
        let m = f.metadata().unwrap();
        assert!(m.len() < (written + (16 << 20) + 1) as u64, "{}", m.len());
        assert!(m.blocks() * 512 >= written as u64, "growth is not sparse");
        let shared = Arc::clone(w.shared());
        let back = shared.slice(0, written);
        assert!(back.chunks(chunk.len()).all(|c| c == &chunk[..]));
    }

    /// Resident pages of this process that map files (`RssFile`), in bytes.
    fn rss_file() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    #[test]
    fn reads_keep_at_most_about_the_budget_resident() {
        let dir = tempfile::tempdir().unwrap();
        let mut maps = Vec::new();
        for i in 0..8 {
            let p = dir.path().join(format!("m{i}"));
            std::fs::write(&p, vec![i as u8 + 1; 16 << 20]).unwrap();
            let f = File::open(&p).unwrap();
            maps.push(SharedMap::read_only(&f, 16 << 20).unwrap());
        }
        set_resident_budget(16 << 20);
        let before = rss_file();
        let mut sum = 0u64;
        for m in &maps {
            for at in (0..(16 << 20)).step_by(1 << 20) {
                sum += m
                    .slice(at, at + (1 << 20))
                    .iter()
                    .map(|b| u64::from(*b))
                    .sum::<u64>();
            }
        }
        let after = rss_file();
        set_resident_budget(DEFAULT_RESIDENT_BUDGET);
        assert_eq!(sum, (1..=8u64).map(|v| v * (16 << 20)).sum::<u64>());
        // 128 MiB read; at most the budget plus the read in progress stays resident (other
        // tests in this process read too, so leave room).
        assert!(
            after.saturating_sub(before) <= 48 << 20,
            "{} MiB of mapped pages resident after reading 128 MiB",
            after.saturating_sub(before) >> 20
        );
        assert!(trims() > 0);
    }

    #[test]
    fn mapping_past_eof_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(100).unwrap();
        assert!(
            SharedMap::writable(&f, 4096, 101).is_err(),
            "published past EOF"
        );
        assert!(
            SharedMap::writable(&f, 4096, 100).is_ok(),
            "the writer grows the file"
        );
        assert!(SharedMap::read_only(&f, 101).is_err());
    }
}
