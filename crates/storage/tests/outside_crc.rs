//! Damage the batch CRC does not cover (`baseOffset`, `batchLength`, `partitionLeaderEpoch`,
//! `magic`) is never served: in sealed segments trusted through their index files, in the
//! active segment, and in what a checkpoint vouches for. Also: a log start moved by a
//! replicated decision, and a WAL whose vote record is gone.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use runnel_record::{BatchBuilder, BatchOptions};
use runnel_storage::wal::{Entry, META_FILE, Wal, WalConfig};
use runnel_storage::{LogConfig, PartitionLog, PersistMode, Recovery, StorageError};

fn batch(id: u64, n: usize) -> Bytes {
    let mut b = BatchBuilder::new(BatchOptions::default());
    for i in 0..n {
        let v = format!("batch-{id}-rec-{i}-{}", "x".repeat(40));
        b.append(1000 + id as i64, None, Some(v.as_bytes()), &[]);
    }
    b.build()
}

fn cfg() -> LogConfig {
    LogConfig {
        segment_bytes: 8 * 1024,
        index_interval_bytes: 1024,
        persist: PersistMode::Buffered,
        retention_ms: None,
        ..LogConfig::default()
    }
}

/// A log of several sealed segments (index files written, so they are trusted at open),
/// epochs 1 then 2 from batch 40 on; returns the positions of the batches of the first segment.
fn build(dir: &Path) -> Vec<u64> {
    let log = PartitionLog::open(dir, cfg(), Recovery::Recorded).unwrap();
    let mut first_segment = Vec::new();
    for id in 0..80u64 {
        let info = log
            .append(&batch(id, 3), if id < 40 { 1 } else { 2 })
            .unwrap();
        if info.segment_base == 0 {
            first_segment.push(info.position);
        }
    }
    assert!(log.segment_count() >= 3);
    log.close().unwrap();
    first_segment
}

fn first_segment(dir: &Path) -> PathBuf {
    dir.join(format!("{:020}.log", 0))
}

fn flip(path: &Path, at: u64, mask: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, at).unwrap();
}

/// Reads every offset from 0 to the end; the first error, if any.
fn read_everything(log: &PartitionLog) -> Result<u64, StorageError> {
    let (mut at, end) = (log.log_start(), log.log_end());
    let mut batches = 0;
    while at < end {
        let r = log.read(at, 1, end)?;
        assert!(!r.bytes.is_empty(), "no progress at {at}");
        at = r.next_offset;
        batches += 1;
    }
    Ok(batches)
}

/// Every offset read on its own, so a lookup starting at any index entry meets the damage.
fn read_each_offset(log: &PartitionLog) -> Result<(), StorageError> {
    let end = log.log_end();
    for o in log.log_start()..end {
        let r = log.read(o, 1, end)?;
        assert!(r.first_offset <= o && o < r.next_offset);
    }
    Ok(())
}

#[test]
fn the_intact_log_reads_back_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let log = PartitionLog::open(dir.path(), cfg(), Recovery::Recorded).unwrap();
    assert_eq!(
        log.recovery_report().indexes_rebuilt,
        0,
        "index files trusted"
    );
    assert_eq!(read_everything(&log).unwrap(), 80);
    read_each_offset(&log).unwrap();
    for seg in log.segment_handles() {
        seg.verified_crc32c().unwrap();
    }
}

/// (field, byte offset inside the batch, mask): each outside the batch CRC.
const FIELDS: [(&str, u64, u8); 5] = [
    ("baseOffset (low byte)", 7, 0x01),
    ("baseOffset (high byte)", 0, 0x40),
    ("batchLength", 11, 0x04),
    ("partitionLeaderEpoch", 15, 0x02),
    ("magic", 16, 0x01),
];

#[test]
fn a_flip_outside_the_batch_crc_in_a_trusted_sealed_segment_is_never_served() {
    for (field, at, mask) in FIELDS {
        for which in [1usize, 3] {
            let dir = tempfile::tempdir().unwrap();
            let positions = build(dir.path());
            // A batch in the middle of the first, sealed segment.
            flip(&first_segment(dir.path()), positions[which] + at, mask);
            let log = PartitionLog::open(dir.path(), cfg(), Recovery::Recorded).unwrap();
            assert_eq!(
                log.recovery_report().indexes_rebuilt,
                0,
                "{field}: the segment must be trusted at open for this test to mean anything"
            );
            let e = read_everything(&log).expect_err(field);
            assert!(e.is_corruption(), "{field}: {e}");
            let e = read_each_offset(&log).expect_err(field);
            assert!(e.is_corruption(), "{field}: {e}");
            let e = log.segment_handles()[0]
                .verified_crc32c()
                .expect_err("a checkpoint must not vouch for the damaged file");
            assert!(e.is_corruption(), "{field}: {e}");
            // The other segments still verify: the damage is reported where it is.
            for seg in &log.segment_handles()[1..] {
                seg.verified_crc32c().unwrap();
            }
        }
    }
}

#[test]
fn a_flip_of_the_epoch_in_the_active_segment_is_caught_too() {
    let dir = tempfile::tempdir().unwrap();
    let log = PartitionLog::open(dir.path(), cfg(), Recovery::Recorded).unwrap();
    let mut infos = Vec::new();
    for id in 0..5u64 {
        infos.push(log.append(&batch(id, 2), 7).unwrap());
    }
    let seg = dir
        .path()
        .join(format!("{:020}.log", infos[2].segment_base));
    flip(&seg, infos[2].position + 15, 0x08);
    let e = read_everything(&log).unwrap_err();
    assert!(e.to_string().contains("partitionLeaderEpoch"), "{e}");
}

#[test]
fn a_version_one_index_is_rebuilt_with_epoch_runs() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let idx = dir.path().join(format!("{:020}.index", 0));
    let mut b = std::fs::read(&idx).unwrap();
    b[5] = 1; // version 1: no epoch runs (its CRC no longer matches either way)
    std::fs::write(&idx, &b).unwrap();
    let log = PartitionLog::open(dir.path(), cfg(), Recovery::Recorded).unwrap();
    assert_eq!(log.recovery_report().indexes_rebuilt, 1);
    assert_eq!(read_everything(&log).unwrap(), 80);
}

#[test]
fn a_replicated_log_start_may_fall_inside_a_segment_and_survives_only_as_given() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let log = PartitionLog::open(dir.path(), cfg(), Recovery::Recorded).unwrap();
    let bases: Vec<u64> = log
        .segment_files()
        .iter()
        .map(|(p, _)| p.file_stem().unwrap().to_str().unwrap().parse().unwrap())
        .collect();
    // A start inside the second segment (a batch boundary: batches hold 3 records).
    let start = bases[1] + 3;
    let rep = log.advance_start(start, "test").unwrap();
    assert_eq!(rep.log_start, start);
    assert_eq!(
        rep.segments_deleted, 1,
        "only the wholly covered segment goes"
    );
    assert_eq!(log.log_start(), start);
    assert!(matches!(
        log.read(start - 1, 1 << 20, log.log_end()),
        Err(StorageError::OffsetOutOfRange { log_start, .. }) if log_start == start
    ));
    let r = log.read(start, 1, log.log_end()).unwrap();
    assert_eq!(r.first_offset, start);
    // Never backwards, never past the end.
    assert_eq!(log.advance_start(0, "test").unwrap().log_start, start);
    let end = log.log_end();
    assert_eq!(log.advance_start(u64::MAX, "test").unwrap().log_start, end);
}

#[test]
fn retention_point_decides_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path());
    let c = LogConfig {
        retention_ms: Some(10),
        ..cfg()
    };
    let log = PartitionLog::open(dir.path(), c, Recovery::Recorded).unwrap();
    let segments = log.segment_count();
    let (point, why) = log.retention_point(i64::MAX / 2).unwrap();
    assert_eq!(why.as_str(), "age");
    assert_eq!(
        point,
        log.segment_files().last().map_or(0, |(p, _)| {
            p.file_stem().unwrap().to_str().unwrap().parse().unwrap()
        })
    );
    assert_eq!(log.log_start(), 0, "a decision deletes nothing");
    assert_eq!(log.segment_count(), segments);
    assert_eq!(log.retention_point(1000), None, "records are not old yet");
}

#[test]
fn a_wal_whose_meta_is_gone_is_refused_unless_the_operator_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
    wal.append_durable(&[Entry {
        index: 1,
        term: 1,
        payload: Bytes::from_static(b"entry"),
    }])
    .unwrap();
    wal.save_vote(b"vote for 2 in term 1").unwrap();
    wal.close().unwrap();
    std::fs::remove_file(dir.path().join(META_FILE)).unwrap();
    let e = Wal::open(dir.path(), WalConfig::default()).unwrap_err();
    assert!(e.is_corruption(), "{e}");
    assert!(e.to_string().contains("forgot its vote"), "{e}");
    assert!(e.to_string().contains("unsafe_accept_lost_vote"), "{e}");
    assert!(!dir.path().join(META_FILE).exists(), "nothing recreated");
    let wal = Wal::open(
        dir.path(),
        WalConfig {
            accept_missing_meta: true,
            ..WalConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        wal.read_vote(),
        None,
        "the vote is gone: the override says so"
    );
}

#[test]
fn a_new_wal_directory_needs_no_meta() {
    let dir = tempfile::tempdir().unwrap();
    Wal::open(dir.path().join("fresh"), WalConfig::default()).unwrap();
}
