//! Partition log behaviour: round trips across segments, bounded reads, lookups by offset and
//! time, rolling, retention, reopen, and recovery from torn tails and corruption.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use proptest::prelude::*;
use runnel_record::{BatchBuilder, BatchOptions, RecordBatch};
use runnel_storage::{LogConfig, PartitionLog, PersistMode, Recovery, StorageError};

/// A batch of `n` records with timestamps `ts, ts+1, …` whose values name the batch and record.
fn batch(id: u64, n: usize, ts: i64, value_len: usize) -> Bytes {
    let mut b = BatchBuilder::new(BatchOptions::default());
    for i in 0..n {
        let mut v = format!("batch-{id}-rec-{i}-").into_bytes();
        v.resize(value_len.max(v.len()), b'x');
        b.append(
            ts + i as i64,
            Some(format!("k{i}").as_bytes()),
            Some(&v),
            &[],
        );
    }
    b.build()
}

fn small(segment_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes,
        index_interval_bytes: 256,
        persist: PersistMode::Buffered,
        ..LogConfig::default()
    }
}

/// Reads the whole log from `from` and returns every record's (offset, timestamp, value).
fn read_all(log: &PartitionLog, from: u64) -> Vec<(u64, i64, Bytes)> {
    let mut out = Vec::new();
    let mut at = from;
    let end = log.log_end();
    for _ in 0..1_000_000 {
        if at >= end {
            break;
        }
        let r = log.read(at, 10_000, end).unwrap();
        assert!(!r.bytes.is_empty(), "no progress at {at}");
        assert!(r.first_offset <= at && at < r.next_offset);
        for b in RecordBatch::split_all(&r.bytes).unwrap() {
            for rec in b.records().unwrap() {
                let rec = rec.unwrap();
                if rec.offset >= at {
                    out.push((rec.offset, rec.timestamp, rec.value.unwrap()));
                }
            }
        }
        at = r.next_offset;
    }
    out
}

fn active_segment(dir: &Path) -> PathBuf {
    segment_files(dir).pop().unwrap()
}

#[test]
fn round_trip_across_many_segments_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(16 * 1024);
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    let mut expected = Vec::new();
    for id in 0..300u64 {
        let n = 1 + (id % 7) as usize;
        let info = log
            .append(
                &batch(id, n, 1000 + id as i64 * 10, 20 + (id % 50) as usize * 10),
                3,
            )
            .unwrap();
        assert_eq!(info.base_offset, expected.len() as u64);
        assert_eq!(info.last_offset, info.base_offset + n as u64 - 1);
        for i in 0..n {
            expected.push(format!("batch-{id}-rec-{i}-"));
        }
    }
    assert!(
        log.segment_count() > 5,
        "only {} segments",
        log.segment_count()
    );
    let check = |log: &PartitionLog| {
        let got = read_all(log, 0);
        assert_eq!(got.len(), expected.len());
        for (o, (off, _, v)) in got.iter().enumerate() {
            assert_eq!(*off, o as u64);
            assert!(v.starts_with(expected[o].as_bytes()), "offset {o}");
        }
    };
    check(&log);
    let segments = log.segment_count();
    log.close().unwrap();
    let log = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap();
    assert_eq!(log.log_end(), expected.len() as u64);
    assert_eq!(log.segment_count(), segments);
    let rep = log.recovery_report();
    assert_eq!(rep.torn_bytes_cut, 0);
    assert_eq!(
        rep.indexes_rebuilt, 0,
        "sealed indexes should have been reused"
    );
    check(&log);
    // Appends continue at the recovered end, stamped with the recovered epoch bytes intact.
    let info = log.append(&batch(999, 2, 5000, 10), 4).unwrap();
    assert_eq!(info.base_offset, expected.len() as u64);
    let r = log.read(info.base_offset, 1, u64::MAX).unwrap();
    let b = RecordBatch::parse(&r.bytes).unwrap();
    assert_eq!(b.header().partition_leader_epoch, 4);
    assert_eq!(b.header().base_offset, info.base_offset);
}

#[test]
fn reads_respect_the_upper_bound_and_max_bytes_but_return_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), small(1 << 20), Recovery::Recorded).unwrap();
    for id in 0..10 {
        log.append(&batch(id, 10, 0, 100), 0).unwrap();
    }
    // Upper bound 35: batches [0,10) [10,20) [20,30) fit, [30,40) reaches past it.
    let r = log.read(0, usize::MAX, 35).unwrap();
    assert_eq!((r.first_offset, r.next_offset), (0, 30));
    let r = log.read(30, usize::MAX, 35).unwrap();
    assert!(r.bytes.is_empty() && r.next_offset == 30);
    // max_bytes 1 still returns the whole first batch.
    let r = log.read(15, 1, 100).unwrap();
    assert_eq!((r.first_offset, r.next_offset), (10, 20));
    let one = r.bytes.len();
    let r = log.read(0, one * 2, 100).unwrap();
    assert_eq!(r.next_offset, 20);
    // At the end: empty. Past the end or below the start: out of range.
    assert!(log.read(100, 100, u64::MAX).unwrap().bytes.is_empty());
    assert!(matches!(
        log.read(101, 100, u64::MAX),
        Err(StorageError::OffsetOutOfRange { log_end: 100, .. })
    ));
}

#[test]
fn lookup_by_offset_at_every_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), small(8 * 1024), Recovery::Recorded).unwrap();
    let mut bounds = Vec::new();
    for id in 0..120u64 {
        let n = 1 + (id % 5) as usize;
        let i = log.append(&batch(id, n, 0, 60), 0).unwrap();
        bounds.push((i.base_offset, i.last_offset + 1));
    }
    assert!(log.segment_count() > 3);
    for &(base, next) in &bounds {
        for o in base..next {
            let r = log.read(o, 1, u64::MAX).unwrap();
            assert_eq!((r.first_offset, r.next_offset), (base, next), "offset {o}");
        }
    }
}

#[test]
fn lookup_by_time_at_every_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), small(8 * 1024), Recovery::Recorded).unwrap();
    // Record timestamps 100, 110, 120, … with 3 records per batch.
    for id in 0..100u64 {
        let mut b = BatchBuilder::new(BatchOptions::default());
        for i in 0..3 {
            b.append(100 + (id as i64 * 3 + i) * 10, None, Some(b"v"), &[]);
        }
        log.append(&b.build(), 0).unwrap();
    }
    assert!(log.segment_count() > 1);
    for o in 0..300u64 {
        let ts = 100 + o as i64 * 10;
        assert_eq!(log.offset_for_timestamp(ts).unwrap(), Some(o), "exact {ts}");
        assert_eq!(
            log.offset_for_timestamp(ts - 5).unwrap(),
            Some(o),
            "between, before {ts}"
        );
    }
    assert_eq!(log.offset_for_timestamp(i64::MIN).unwrap(), Some(0));
    assert_eq!(log.offset_for_timestamp(100 + 2990 + 1).unwrap(), None);
}

#[test]
fn rolls_by_record_age() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        segment_ms: Some(1000),
        ..small(1 << 20)
    };
    let log = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap();
    log.append(&batch(0, 1, 10_000, 10), 0).unwrap();
    log.append(&batch(1, 1, 10_999, 10), 0).unwrap();
    assert_eq!(log.segment_count(), 1);
    log.append(&batch(2, 1, 11_000, 10), 0).unwrap();
    assert_eq!(log.segment_count(), 2);
    log.append(&batch(3, 1, 11_500, 10), 0).unwrap();
    assert_eq!(log.segment_count(), 2);
}

#[test]
fn retention_by_age_and_size_advances_log_start_first() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention_ms: Some(10_000),
        retention_bytes: None,
        ..small(4096)
    };
    let log = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap();
    for id in 0..40u64 {
        log.append(&batch(id, 2, id as i64 * 1000, 200), 0).unwrap();
    }
    let segs = log.segment_count();
    assert!(segs > 4);
    // A reader holding bytes of the first segment keeps them after deletion.
    let held = log.read(0, 1, u64::MAX).unwrap();
    // now = 25s: segments whose newest record is older than 15s go.
    let rep = log.apply_retention(25_000).unwrap();
    assert!(rep.segments_deleted > 0);
    assert_eq!(log.log_start(), rep.log_start);
    assert!(matches!(
        log.read(0, 1, u64::MAX),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    // Record o has timestamp (o / 2) * 1000 + o % 2. Only segments entirely older than 15 s
    // went; the oldest survivor is not eligible, so a second pass deletes nothing.
    let ts_of = |o: u64| (o / 2) as i64 * 1000 + (o % 2) as i64;
    assert!(ts_of(log.log_start() - 1) < 15_000);
    assert_eq!(log.apply_retention(25_000).unwrap().segments_deleted, 0);
    let survivors = read_all(&log, log.log_start());
    assert!(survivors.iter().any(|(_, ts, _)| *ts >= 15_000));
    assert_eq!(
        RecordBatch::parse(&held.bytes)
            .unwrap()
            .header()
            .base_offset,
        0
    );
    // Retention never removes the active segment, even when everything is old.
    log.apply_retention(i64::MAX / 2).unwrap();
    assert_eq!(log.segment_count(), 1);
    assert!(log.read(log.log_start(), 1, u64::MAX).is_ok());

    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention_ms: None,
        retention_bytes: Some(10_000),
        ..small(4096)
    };
    let log = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap();
    for id in 0..60u64 {
        log.append(&batch(id, 2, 0, 200), 0).unwrap();
    }
    log.apply_retention(0).unwrap();
    assert!(
        log.size_bytes() <= 10_000 + 4096,
        "size {}",
        log.size_bytes()
    );
    assert!(log.size_bytes() > 10_000 - 4096);
    let start = log.log_start();
    log.close().unwrap();
    let log = PartitionLog::open(dir.path(), small(4096), Recovery::Recorded).unwrap();
    assert_eq!(log.log_start(), start, "log start survives reopen");
}

#[test]
fn index_missing_or_short_is_rebuilt_and_a_short_sealed_log_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(8 * 1024);
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    for id in 0..120u64 {
        log.append(&batch(id, 3, id as i64, 100), 0).unwrap();
    }
    let want = read_all(&log, 0);
    log.close().unwrap();
    let mut idx: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "index"))
        .collect();
    idx.sort();
    assert!(idx.len() >= 3);
    std::fs::remove_file(&idx[0]).unwrap(); // missing
    let len = std::fs::metadata(&idx[1]).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&idx[1])
        .unwrap()
        .set_len(len - 3)
        .unwrap(); // short
    // Past EOF: a valid-looking index for a .log file that lost its last bytes is refused
    // (and the scan then finds the short segment, which is corruption of sealed data).
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    assert_eq!(log.recovery_report().indexes_rebuilt, 2);
    assert_eq!(read_all(&log, 0), want);
    drop(log);
    let seg = idx[2].with_extension("log");
    let len = std::fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let err = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap_err();
    assert!(err.is_corruption(), "{err}");
}

#[test]
fn bit_flip_in_durable_data_is_corruption_never_cut() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(1 << 20);
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    for id in 0..20u64 {
        log.append(&batch(id, 2, 0, 50), 0).unwrap();
    }
    let mid = log.read(20, 1, u64::MAX).unwrap();
    log.flush().unwrap();
    drop(log);
    let seg = active_segment(dir.path());
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let pos = 1000;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, pos).unwrap();
    f.write_all_at(&[b[0] ^ 0x04], pos).unwrap();
    let err = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    // The file still holds every byte: nothing was cut.
    f.write_all_at(&b, pos).unwrap();
    let log = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap();
    assert_eq!(log.log_end(), 40);
    assert_eq!(log.read(20, 1, u64::MAX).unwrap(), mid);
}

#[test]
fn bit_flip_in_a_sealed_segment_is_caught_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(4096);
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    for id in 0..30u64 {
        log.append(&batch(id, 2, 0, 100), 0).unwrap();
    }
    log.close().unwrap();
    let first = dir.path().join("00000000000000000000.log");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&first)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 100).unwrap();
    f.write_all_at(&[b[0] ^ 0x80], 100).unwrap();
    // Sealed segments with a valid index are not rescanned at open, so the flip shows on read.
    let log = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap();
    let err = log.read(0, 1, u64::MAX).unwrap_err();
    assert!(err.is_corruption(), "{err}");
}

#[test]
fn zero_filled_tail_is_end_of_log() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(1 << 20);
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    let mut ends = vec![0u64];
    for id in 0..5u64 {
        let i = log.append(&batch(id, 2, 0, 50), 0).unwrap();
        ends.push(i.position + batch(id, 2, 0, 50).len() as u64);
    }
    drop(log); // no flush: the recovery point stays at 0
    let seg = active_segment(dir.path());
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    // The last two batches' pages were never written back: zeros from the third batch's end.
    f.write_all_at(&vec![0u8; 4096], ends[3]).unwrap();
    let log = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap();
    assert_eq!(log.log_end(), 6);
    assert_eq!(
        log.recovery_report().torn_bytes_cut,
        0,
        "zeros are not torn bytes"
    );
}

#[test]
fn truncate_to_a_checkpoint_discards_everything_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(4096);
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    let mut bases = Vec::new();
    for id in 0..40u64 {
        bases.push(log.append(&batch(id, 2, 0, 100), 0).unwrap().base_offset);
    }
    let want = read_all(&log, 0);
    let segs = log.segment_count();
    log.close().unwrap();
    let cut = bases[7]; // inside an early, sealed segment
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::TruncateTo(cut)).unwrap();
    assert_eq!(log.log_end(), cut);
    assert!(log.segment_count() < segs);
    assert!(log.recovery_report().segments_discarded > 0);
    assert_eq!(read_all(&log, 0), want[..cut as usize]);
    // The log continues at the checkpoint, and the result survives another reopen.
    assert_eq!(
        log.append(&batch(100, 2, 0, 100), 0).unwrap().base_offset,
        cut
    );
    log.close().unwrap();
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    assert_eq!(log.log_end(), cut + 2);
    // A checkpoint past what the log holds means durable data is missing.
    drop(log);
    let err =
        PartitionLog::open(dir.path(), cfg.clone(), Recovery::TruncateTo(cut + 50)).unwrap_err();
    assert!(err.is_corruption());
    // A checkpoint inside a batch is refused.
    let err = PartitionLog::open(dir.path(), cfg, Recovery::TruncateTo(cut + 1)).unwrap_err();
    assert!(err.is_corruption());
}

#[test]
fn bad_batches_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), small(8192), Recovery::Recorded).unwrap();
    let good = batch(0, 3, 0, 10);
    let mut bad = good.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        log.append(&bad, 0),
        Err(StorageError::InvalidBatch(_))
    ));
    let mut trailing = good.to_vec();
    trailing.push(0);
    assert!(matches!(
        log.append(&trailing, 0),
        Err(StorageError::InvalidArgument(_))
    ));
    assert!(log.append(&good[..good.len() - 1], 0).is_err());
    assert!(log.append(&[0u8; 100], 0).is_err());
    let huge = batch(1, 1, 0, 9000);
    assert!(matches!(
        log.append(&huge, 0),
        Err(StorageError::InvalidArgument(_))
    ));
    assert_eq!(log.log_end(), 0);
    assert_eq!(log.append(&good, 0).unwrap().base_offset, 0);
}

#[test]
fn fsync_failure_poisons_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let f2 = Arc::clone(&fail);
    let hook: runnel_storage::SyncHook = Arc::new(move |_: &Path| {
        if f2.load(Ordering::SeqCst) {
            Err(std::io::Error::other("injected EIO"))
        } else {
            Ok(())
        }
    });
    let cfg = LogConfig {
        persist: PersistMode::Fsync,
        ..small(1 << 20)
    };
    let log = PartitionLog::open_with_sync_hook(dir.path(), cfg, Recovery::Recorded, hook).unwrap();
    log.append(&batch(0, 1, 0, 10), 0).unwrap();
    fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        log.append(&batch(1, 1, 0, 10), 0),
        Err(StorageError::Poisoned(_))
    ));
    fail.store(false, Ordering::SeqCst);
    // Even with the fault gone, the log refuses: a retried fsync proves nothing.
    assert!(log.is_poisoned());
    assert!(matches!(
        log.append(&batch(2, 1, 0, 10), 0),
        Err(StorageError::Poisoned(_))
    ));
    assert!(matches!(log.flush(), Err(StorageError::Poisoned(_))));
}

#[test]
fn concurrent_readers_only_ever_see_whole_valid_batches() {
    let dir = tempfile::tempdir().unwrap();
    let log =
        Arc::new(PartitionLog::open(dir.path(), small(64 * 1024), Recovery::Recorded).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (log, done) = (Arc::clone(&log), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut at = 0;
                let mut reads = 0u64;
                while !(done.load(Ordering::Acquire) && at == log.log_end()) && reads < 10_000_000 {
                    reads += 1;
                    let r = log.read(at, 4096, log.log_end()).unwrap();
                    for b in RecordBatch::split_all(&r.bytes).unwrap() {
                        assert_eq!(b.header().base_offset, at);
                        at = b.header().next_offset();
                    }
                }
                at
            })
        })
        .collect();
    for id in 0..2000u64 {
        log.append(&batch(id, 1 + (id % 4) as usize, 0, 40), 0)
            .unwrap();
    }
    done.store(true, Ordering::Release);
    for r in readers {
        assert_eq!(r.join().unwrap(), log.log_end());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Cut the active segment at every byte of its last batch (as a crash leaves it: the tail
    /// after the cut is zeros or stale garbage) and check exactly the whole batches before it
    /// survive, and that the number of bytes cut is reported.
    #[test]
    fn torn_last_batch_leaves_exactly_the_valid_prefix(
        batches in 1usize..6, value_len in 1usize..300, garbage in any::<bool>(), seed in any::<u64>()
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small(64 * 1024);
        let mut ends = Vec::new();
        {
            let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
            for id in 0..batches as u64 {
                let b = batch(id, 2, 0, value_len);
                let i = log.append(&b, 0).unwrap();
                ends.push(i.position as usize + b.len());
            }
        } // dropped without flush: the recovery point says 0
        let seg = active_segment(dir.path());
        let pristine = std::fs::read(&seg).unwrap();
        let last_start = if batches > 1 { ends[batches - 2] } else { 0 };
        let last_end = ends[batches - 1];
        let mut rng = seed;
        for cut in last_start..last_end {
            let mut bytes = pristine.clone();
            for (i, b) in bytes[cut..last_end].iter_mut().enumerate() {
                *b = if garbage {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407 + i as u64);
                    (rng >> 33) as u8
                } else {
                    0
                };
            }
            std::fs::write(&seg, &bytes).unwrap();
            let _ = std::fs::remove_file(dir.path().join(runnel_storage::RECOVERY_POINT_FILE));
            let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
            // Overwriting bytes with what they already were (a trailing zero) tears nothing.
            let intact = bytes[cut..last_end] == pristine[cut..last_end];
            let survivors = if intact { batches } else { batches - 1 };
            prop_assert_eq!(log.log_end(), 2 * survivors as u64, "cut at {}", cut);
            if intact {
                continue;
            }
            let nonzero = bytes[last_start..].iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            prop_assert_eq!(log.recovery_report().torn_bytes_cut, nonzero as u64);
            let after = std::fs::read(&seg).unwrap();
            prop_assert!(after[last_start..].iter().all(|&b| b == 0), "torn bytes must be zeroed");
            prop_assert_eq!(&after[..last_start], &pristine[..last_start]);
            drop(log);
        }
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

/// Writes 80 small batches (several segments), flushed or not, then cuts the last 50 bytes of
/// the second segment, as if their page never reached the disk. Returns the segment files.
fn sealed_log_with_short_second_segment(dir: &Path, cfg: &LogConfig, flush: bool) -> Vec<PathBuf> {
    {
        let log = PartitionLog::open(dir, cfg.clone(), Recovery::Recorded).unwrap();
        for id in 0..80u64 {
            log.append(&batch(id, 2, 0, 100), 0).unwrap();
        }
        assert!(log.segment_count() >= 4);
        if flush {
            log.flush().unwrap();
        } // unflushed: the recovery point is still 0
    }
    let segs = segment_files(dir);
    let data = std::fs::read(&segs[1]).unwrap();
    std::fs::write(&segs[1], &data[..data.len() - 50]).unwrap();
    segs
}

#[test]
fn buffered_log_torn_inside_an_unflushed_sealed_segment_is_cut_there() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(4096);
    let segs = sealed_log_with_short_second_segment(dir.path(), &cfg, false);
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    let rep = log.recovery_report().clone();
    assert_eq!(rep.segments_discarded, segs.len() - 2, "{rep:?}");
    assert_eq!(log.segment_count(), 2);
    assert!(log.log_end() > 0);
    let got = read_all(&log, 0);
    assert_eq!(got.len() as u64, log.log_end());
    // The log goes on from the cut.
    let end = log.log_end();
    assert_eq!(
        log.append(&batch(99, 1, 0, 10), 0).unwrap().base_offset,
        end
    );
}

#[test]
fn flushed_sealed_segment_damage_is_corruption_not_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(4096);
    let segs = sealed_log_with_short_second_segment(dir.path(), &cfg, true);
    let err = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    assert_eq!(
        segment_files(dir.path()).len(),
        segs.len(),
        "nothing may be deleted"
    );
}

#[test]
fn buffered_flush_syncs_every_sealed_segment_before_moving_the_recovery_point() {
    let dir = tempfile::tempdir().unwrap();
    let synced: Arc<std::sync::Mutex<Vec<PathBuf>>> = Arc::default();
    let s2 = Arc::clone(&synced);
    let hook: runnel_storage::SyncHook = Arc::new(move |p: &Path| {
        s2.lock().unwrap().push(p.to_path_buf());
        Ok(())
    });
    let log = PartitionLog::open_with_sync_hook(dir.path(), small(4096), Recovery::Recorded, hook)
        .unwrap();
    for id in 0..40u64 {
        log.append(&batch(id, 2, 0, 100), 0).unwrap();
    }
    assert!(
        synced.lock().unwrap().is_empty(),
        "Buffered appends and rolls must not sync data"
    );
    log.flush().unwrap();
    let mut got = synced.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        segment_files(dir.path()),
        "every segment synced by flush"
    );
}

#[test]
fn index_with_a_valid_crc_pointing_past_eof_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(4096);
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    for id in 0..40u64 {
        log.append(&batch(id, 2, 0, 100), 0).unwrap();
    }
    let want = read_all(&log, 0);
    log.close().unwrap();
    // Rewrite the first index's segment length (bytes 24..32) far past the file, with a fresh
    // CRC, so only the bounds check can catch it.
    let idx = dir.path().join("00000000000000000000.index");
    let mut b = std::fs::read(&idx).unwrap();
    b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    let n = b.len();
    let crc = crc32c::crc32c(&b[..n - 4]);
    b[n - 4..].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&idx, &b).unwrap();
    let log = PartitionLog::open(dir.path(), cfg, Recovery::Recorded).unwrap();
    assert_eq!(log.recovery_report().indexes_rebuilt, 1);
    assert_eq!(read_all(&log, 0), want);
    drop(log);
    let rebuilt = std::fs::read(&idx).unwrap();
    assert_ne!(rebuilt, b, "the bad index file was rewritten");
}

#[test]
fn appends_proceed_while_a_flush_is_syncing() {
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let (entered_tx, entered_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let gate = Arc::new(std::sync::Mutex::new((entered_tx, release_rx)));
    let g2 = Arc::clone(&gate);
    let hook: runnel_storage::SyncHook = Arc::new(move |_: &Path| {
        let g = g2.lock().unwrap();
        g.0.send(()).unwrap();
        g.1.recv().unwrap(); // hold the sync until the test releases it
        Ok(())
    });
    let log = Arc::new(
        PartitionLog::open_with_sync_hook(dir.path(), small(1 << 20), Recovery::Recorded, hook)
            .unwrap(),
    );
    log.append(&batch(0, 1, 0, 10), 0).unwrap();
    let l2 = Arc::clone(&log);
    let flusher = std::thread::spawn(move || l2.flush().unwrap());
    entered_rx.recv().unwrap(); // the flush is now inside its sync
    // The append must not wait for the flush; a deadline only turns a hang into a failure.
    let (done_tx, done_rx) = mpsc::channel();
    let l3 = Arc::clone(&log);
    std::thread::spawn(move || {
        done_tx
            .send(l3.append(&batch(1, 1, 0, 10), 0).map(|i| i.base_offset))
            .unwrap()
    });
    let appended = done_rx.recv_timeout(std::time::Duration::from_secs(30));
    release_tx.send(()).unwrap();
    assert_eq!(appended.expect("append blocked behind a flush").unwrap(), 1);
    assert_eq!(
        flusher.join().unwrap(),
        1,
        "the flush covers what was appended before it began"
    );
}

#[test]
fn truncate_to_past_an_empty_active_segment_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(4096);
    let log = PartitionLog::open(dir.path(), cfg.clone(), Recovery::Recorded).unwrap();
    for id in 0..30u64 {
        log.append(&batch(id, 2, 0, 100), 0).unwrap();
    }
    log.close().unwrap();
    // The newest segment lost every byte (an empty file), but the checkpoint says offset 60.
    let newest = segment_files(dir.path()).pop().unwrap();
    std::fs::write(&newest, b"").unwrap();
    let err = PartitionLog::open(dir.path(), cfg, Recovery::TruncateTo(60)).unwrap_err();
    assert!(err.is_corruption(), "{err}");
}

#[test]
fn every_segment_gone_below_the_recovery_point_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), small(4096), Recovery::Recorded).unwrap();
    log.append(&batch(0, 2, 0, 10), 0).unwrap();
    log.close().unwrap();
    for f in segment_files(dir.path()) {
        std::fs::remove_file(f).unwrap();
    }
    let err = PartitionLog::open(dir.path(), small(4096), Recovery::Recorded).unwrap_err();
    assert!(err.is_corruption(), "{err}");
}

/// Disk a directory's files hold (allocated blocks, not lengths).
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

/// A partition reserves its segment in steps as it fills, not a whole segment at creation
/// nor at reopen: 100 empty partitions with 64 MiB segments hold about 25 MiB, not 6.4 GB.
#[test]
fn partitions_reserve_disk_in_steps_not_whole_segments() {
    let root = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 64 << 20,
        ..LogConfig::default()
    };
    let mut total = 0;
    for p in 0..100 {
        let dir = root.path().join(format!("p{p}"));
        let log = PartitionLog::open(&dir, config.clone(), Recovery::Recorded).unwrap();
        log.close().unwrap();
        let log = PartitionLog::open(&dir, config.clone(), Recovery::Recorded).unwrap();
        log.close().unwrap();
        total += allocated(&dir);
    }
    assert!(
        total <= 100 * (300 << 10),
        "100 empty partitions hold {total} bytes"
    );
    // One that fills 5 MiB holds about 5 MiB (at most a doubling step more), and reads back.
    let dir = root.path().join("busy");
    let log = PartitionLog::open(&dir, config.clone(), Recovery::Recorded).unwrap();
    let mut n = 0;
    while log.size_bytes() < 5 << 20 {
        log.append(&batch(n, 10, 1000, 1000), 1).unwrap();
        n += 1;
    }
    let size = log.size_bytes();
    let held = allocated(&dir);
    assert!(
        held >= size && held <= 2 * size + (1 << 20),
        "{size} bytes hold {held}"
    );
    log.close().unwrap();
    let log = PartitionLog::open(&dir, config, Recovery::Recorded).unwrap();
    assert_eq!(read_all(&log, 0).len(), n as usize * 10);
    assert!(allocated(&dir) <= held, "reopen extended the segment");
}
