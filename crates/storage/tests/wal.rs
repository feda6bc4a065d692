//! Group WAL behaviour: round trips across files, the group-commit contract, poisoning,
//! truncation, purging, meta persistence, and recovery from torn tails and corruption.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use runnel_storage::StorageError;
use runnel_storage::wal::{
    Entry, FILE_HEADER_LEN, LogPosition, RECORD_HEADER_LEN, Syncer, Wal, WalConfig,
};

fn entry(index: u64, term: u64, len: usize) -> Entry {
    let mut p = format!("entry-{index}-term-{term}-").into_bytes();
    p.resize(len.max(p.len()), b'.');
    Entry {
        index,
        term,
        payload: Bytes::from(p),
    }
}

fn cfg(file_bytes: u64) -> WalConfig {
    WalConfig {
        file_bytes,
        ..WalConfig::default()
    }
}

fn wal_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

/// Polls `cond` until it holds or `secs` pass.
fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

#[test]
fn round_trip_across_files_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(4096)).unwrap();
    let all: Vec<Entry> = (0..500)
        .map(|i| entry(i, 1 + i / 100, (i % 97) as usize))
        .collect();
    for chunk in all.chunks(7) {
        wal.append_durable(chunk).unwrap();
    }
    assert!(wal_files(dir.path()).len() > 5);
    assert_eq!(wal.read(0, 500, usize::MAX).unwrap(), all);
    assert_eq!(
        wal.last(),
        Some(LogPosition {
            leader_node: 0,
            index: 499,
            term: 5
        })
    );
    wal.close().unwrap();
    let wal = Wal::open(dir.path(), cfg(4096)).unwrap();
    assert_eq!(wal.recovery().entries, 500);
    assert_eq!(wal.recovery().torn_bytes_cut, 0);
    assert_eq!(wal.read(0, 500, usize::MAX).unwrap(), all);
    assert_eq!(wal.read(123, 200, usize::MAX).unwrap(), all[123..200]);
    // Reads stop at max_bytes but always return one entry.
    assert_eq!(wal.read(10, 500, 1).unwrap().len(), 1);
    assert!(matches!(
        wal.read(0, 501, usize::MAX),
        Err(StorageError::InvalidArgument(_))
    ));
}

#[test]
fn non_contiguous_or_oversized_appends_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(
        dir.path(),
        WalConfig {
            entry_bytes_max: 100,
            ..cfg(1 << 20)
        },
    )
    .unwrap();
    wal.append_durable(&[entry(0, 1, 10)]).unwrap();
    assert!(matches!(
        wal.append(&[entry(2, 1, 10)], None),
        Err(StorageError::InvalidArgument(_))
    ));
    assert!(
        wal.append(&[entry(1, 1, 10), entry(3, 1, 10)], None)
            .is_err()
    );
    assert!(wal.append(&[entry(1, 1, 101)], None).is_err());
    assert_eq!(wal.last().unwrap().index, 0);
    wal.append_durable(&[entry(1, 1, 10)]).unwrap();
    assert_eq!(wal.read(0, 2, usize::MAX).unwrap().len(), 2);
}

/// A syncer that blocks while the gate is closed, records how many bytes of the file each
/// completed fdatasync covered, and can be told to fail.
#[derive(Default)]
struct GatedSyncer {
    open: Mutex<bool>,
    cv: Condvar,
    calls: AtomicU64,
    /// Largest file length covered by a *completed* sync.
    durable_len: AtomicU64,
    fail: AtomicBool,
}

impl GatedSyncer {
    fn set_open(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.cv.notify_all();
    }
}

impl Syncer for GatedSyncer {
    fn sync_data(&self, file: &File) -> std::io::Result<()> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        drop(open);
        let covered = file.metadata()?.len();
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected EIO"));
        }
        file.sync_data()?;
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.durable_len.fetch_max(covered, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn no_callback_completes_before_its_bytes_are_fdatasynced_and_syncs_are_shared() {
    let dir = tempfile::tempdir().unwrap();
    let syncer = Arc::new(GatedSyncer::default());
    let wal = Wal::open_with_syncer(dir.path(), cfg(1 << 30), syncer.clone()).unwrap();
    let n = 200u64;
    let fired: Arc<Mutex<Vec<u64>>> = Arc::default();
    let violations = Arc::new(AtomicU64::new(0));
    let mut end = FILE_HEADER_LEN as u64;
    for i in 0..n {
        let e = entry(i, 1, 100);
        end += (RECORD_HEADER_LEN + e.payload.len()) as u64;
        let (fired, violations, syncer, my_end) = (
            Arc::clone(&fired),
            Arc::clone(&violations),
            Arc::clone(&syncer),
            end,
        );
        wal.append(
            &[e],
            Some(Box::new(move |r| {
                r.unwrap();
                // The proof: a completed fdatasync already covered this entry's last byte.
                if syncer.durable_len.load(Ordering::SeqCst) < my_end {
                    violations.fetch_add(1, Ordering::SeqCst);
                }
                fired.lock().unwrap().push(i);
            })),
        )
        .unwrap();
    }
    // Gate closed: no sync has completed, so no callback may have run.
    assert_eq!(syncer.calls.load(Ordering::SeqCst), 0);
    assert!(fired.lock().unwrap().is_empty());
    syncer.set_open(true);
    assert!(wait_until(10, || fired.lock().unwrap().len() == n as usize));
    assert_eq!(violations.load(Ordering::SeqCst), 0);
    assert_eq!(
        *fired.lock().unwrap(),
        (0..n).collect::<Vec<_>>(),
        "callbacks fire in order"
    );
    let calls = syncer.calls.load(Ordering::SeqCst);
    assert!(
        calls <= 3,
        "{n} appends took {calls} fdatasyncs: no group commit"
    );
}

#[test]
fn fsync_failure_poisons_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let syncer = Arc::new(GatedSyncer::default());
    syncer.set_open(true);
    let wal = Wal::open_with_syncer(dir.path(), cfg(1 << 20), syncer.clone()).unwrap();
    wal.append_durable(&[entry(0, 1, 10)]).unwrap();
    syncer.fail.store(true, Ordering::SeqCst);
    let err = wal.append_durable(&[entry(1, 1, 10)]).unwrap_err();
    assert!(matches!(err, StorageError::Poisoned(_)), "{err}");
    syncer.fail.store(false, Ordering::SeqCst);
    assert!(wal.is_poisoned());
    assert!(matches!(
        wal.append(&[entry(2, 1, 10)], None),
        Err(StorageError::Poisoned(_))
    ));
    assert!(matches!(wal.flush(), Err(StorageError::Poisoned(_))));
    assert!(matches!(
        wal.truncate_after(0),
        Err(StorageError::Poisoned(_))
    ));
    drop(wal);
    // A restart recovers from disk; the entry whose sync failed may or may not be there.
    let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
    assert!(wal.last().unwrap().index <= 1);
}

#[test]
fn truncate_after_removes_the_suffix_durably() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    let v: Vec<Entry> = (0..100).map(|i| entry(i, 1, 40)).collect();
    for c in v.chunks(5) {
        wal.append_durable(c).unwrap();
    }
    let files = wal_files(dir.path()).len();
    wal.truncate_after(30).unwrap();
    assert!(wal_files(dir.path()).len() < files);
    assert_eq!(
        wal.last(),
        Some(LogPosition {
            leader_node: 0,
            index: 30,
            term: 1
        })
    );
    let new: Vec<Entry> = (31..40).map(|i| entry(i, 2, 40)).collect();
    wal.append_durable(&new).unwrap();
    wal.truncate_after(1000).unwrap(); // past the end: nothing to do
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    let got = wal.read(0, 40, usize::MAX).unwrap();
    assert_eq!(got[..31], v[..31]);
    assert_eq!(got[31..], new[..]);
}

#[test]
fn purge_removes_whole_files_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    let v: Vec<Entry> = (0..200).map(|i| entry(i, 3, 40)).collect();
    for c in v.chunks(5) {
        wal.append_durable(c).unwrap();
    }
    let before = wal_files(dir.path()).len();
    wal.purge_upto(LogPosition {
        leader_node: 0,
        index: 120,
        term: 3,
    })
    .unwrap();
    assert!(wal_files(dir.path()).len() < before);
    assert_eq!(wal.first_index(), 121);
    assert!(wal.read(120, 130, usize::MAX).is_err());
    assert_eq!(wal.read(121, 200, usize::MAX).unwrap(), v[121..]);
    assert!(matches!(
        wal.truncate_after(100),
        Err(StorageError::InvalidArgument(_))
    ));
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    assert_eq!(wal.first_index(), 121);
    assert_eq!(
        wal.purged(),
        Some(LogPosition {
            leader_node: 0,
            index: 120,
            term: 3
        })
    );
    // Purging past the end (a snapshot was installed) empties the log; it continues after it.
    wal.purge_upto(LogPosition {
        leader_node: 0,
        index: 500,
        term: 4,
    })
    .unwrap();
    assert_eq!(
        wal.last(),
        Some(LogPosition {
            leader_node: 0,
            index: 500,
            term: 4
        })
    );
    wal.append_durable(&[entry(501, 4, 10)]).unwrap();
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    assert_eq!(wal.first_index(), 501);
    assert_eq!(
        wal.read(501, 502, usize::MAX).unwrap(),
        vec![entry(501, 4, 10)]
    );
}

#[test]
fn vote_and_committed_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
    assert_eq!(wal.read_vote(), None);
    wal.save_vote(b"term=5,node=2").unwrap();
    wal.append_durable(&[entry(0, 5, 1), entry(1, 5, 1)])
        .unwrap();
    wal.save_committed(LogPosition {
        leader_node: 0,
        index: 1,
        term: 5,
    })
    .unwrap();
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
    assert_eq!(wal.read_vote().as_deref(), Some(&b"term=5,node=2"[..]));
    assert_eq!(
        wal.read_committed(),
        Some(LogPosition {
            leader_node: 0,
            index: 1,
            term: 5
        })
    );
    assert!(wal.save_vote(&[0u8; 300]).is_err());
}

fn flip(path: &Path, pos: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, pos).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], pos).unwrap();
}

#[test]
fn corruption_at_or_below_committed_or_in_an_old_file_is_reported_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    for i in 0..100 {
        wal.append_durable(&[entry(i, 1, 40)]).unwrap();
    }
    wal.save_committed(LogPosition {
        leader_node: 0,
        index: 99,
        term: 1,
    })
    .unwrap();
    drop(wal);
    let files = wal_files(dir.path());
    let last = files.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    flip(last, len - 3);
    let err = Wal::open(dir.path(), cfg(2048)).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    flip(last, len - 3);
    flip(&files[0], 60);
    let err = Wal::open(dir.path(), cfg(2048)).unwrap_err();
    assert!(err.is_corruption(), "{err}");
    flip(&files[0], 60);
    assert_eq!(
        Wal::open(dir.path(), cfg(2048))
            .unwrap()
            .last()
            .unwrap()
            .index,
        99
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    /// Cut the WAL at every byte of its last record (truncated file, or zeros / garbage after
    /// the cut) and check exactly the entries before it survive and the cut is reported.
    #[test]
    fn torn_last_record_leaves_exactly_the_valid_prefix(
        entries in 1u64..8, len in 0usize..200, mode in 0u8..3, seed in any::<u64>()
    ) {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
            let v: Vec<Entry> = (0..entries).map(|i| entry(i, 1, len)).collect();
            wal.append_durable(&v).unwrap();
        }
        let path = wal_files(dir.path()).pop().unwrap();
        let pristine = std::fs::read(&path).unwrap();
        let rec = RECORD_HEADER_LEN + entry(entries - 1, 1, len).payload.len();
        let last_start = pristine.len() - rec;
        let mut rng = seed | 1;
        for cut in last_start..pristine.len() {
            let mut bytes = pristine[..cut].to_vec();
            match mode {
                0 => {}                                             // file ends at the cut
                1 => bytes.resize(pristine.len(), 0),               // size grew, data did not
                _ => bytes.extend((cut..pristine.len()).map(|_| {   // stale garbage
                    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng as u8 })),
            }
            let intact = bytes == pristine;
            std::fs::write(&path, &bytes).unwrap();
            let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
            let want = if intact { entries } else { entries - 1 };
            prop_assert_eq!(wal.recovery().entries, want, "cut at {}", cut);
            if !intact {
                let tail = &bytes[last_start..];
                let torn = if tail.iter().all(|&b| b == 0) { 0 } else { tail.len() as u64 };
                prop_assert_eq!(wal.recovery().torn_bytes_cut, torn);
                prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), last_start as u64);
            }
            if want > 0 {
                let got = wal.read(0, want, usize::MAX).unwrap();
                prop_assert_eq!(got.len() as u64, want);
            }
            // The log continues right after the surviving prefix.
            wal.append_durable(&[entry(want, 2, 5)]).unwrap();
            drop(wal);
            std::fs::write(&path, &pristine).unwrap();
        }
    }
}

#[test]
fn truncate_from_the_first_index_empties_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    for c in (0..30)
        .map(|i| entry(i, 1, 40))
        .collect::<Vec<_>>()
        .chunks(4)
    {
        wal.append_durable(c).unwrap();
    }
    wal.truncate_from(wal.first_index()).unwrap();
    assert_eq!(wal.last(), None);
    wal.append_durable(&[entry(0, 2, 5)]).unwrap();
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    assert_eq!(wal.read(0, 1, usize::MAX).unwrap(), vec![entry(0, 2, 5)]);
}

#[test]
fn an_empty_log_starts_at_its_first_append() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(4096)).unwrap();
    wal.append_durable(&[entry(5, 1, 3), entry(6, 1, 3)])
        .unwrap();
    assert_eq!(wal.first_index(), 5);
    // Once it holds entries, gaps are refused.
    assert!(wal.append(&[entry(9, 1, 3)], None).is_err());
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(4096)).unwrap();
    assert_eq!(wal.read(5, 7, usize::MAX).unwrap().len(), 2);
    assert_eq!(wal_files(dir.path()).len(), 1);
}

#[test]
fn missing_committed_entries_are_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
    wal.append_durable(&(0..10).map(|i| entry(i, 1, 8)).collect::<Vec<_>>())
        .unwrap();
    wal.save_committed(LogPosition {
        leader_node: 1,
        index: 9,
        term: 1,
    })
    .unwrap();
    drop(wal);
    for f in wal_files(dir.path()) {
        std::fs::remove_file(f).unwrap();
    }
    let err = Wal::open(dir.path(), cfg(1 << 20)).unwrap_err();
    assert!(err.is_corruption(), "{err}");
}

fn repairing(file_bytes: u64) -> WalConfig {
    WalConfig {
        repair: true,
        ..cfg(file_bytes)
    }
}

/// 100 entries over several files, committed up to 99.
fn committed_wal(dir: &Path) {
    let wal = Wal::open(dir, cfg(2048)).unwrap();
    for i in 0..100 {
        wal.append_durable(&[entry(i, 1, 40)]).unwrap();
    }
    wal.save_vote(b"vote-7").unwrap();
    wal.save_committed(LogPosition {
        leader_node: 0,
        index: 99,
        term: 1,
    })
    .unwrap();
}

#[test]
fn repair_cuts_at_the_first_damage_and_keeps_a_floor_until_cleared() {
    let dir = tempfile::tempdir().unwrap();
    committed_wal(dir.path());
    let files = wal_files(dir.path());
    assert!(files.len() > 2, "{files:?}");
    flip(&files[1], 60);
    let third_before = std::fs::read(&files[2]).unwrap();
    let wal = Wal::open(dir.path(), repairing(2048)).unwrap();
    let r = wal.recovery().repaired.clone().expect("repaired");
    assert_eq!(r.path, files[1]);
    assert_eq!(r.committed_before, Some(99));
    // The first file survives whole; nothing from the damaged record on.
    let first_lost = r.first_lost;
    assert!(first_lost > 0 && first_lost < 100, "{r:?}");
    assert_eq!(wal.last().unwrap().index, first_lost - 1);
    assert_eq!(
        wal.read(0, first_lost, 1 << 20).unwrap().len() as u64,
        first_lost
    );
    assert_eq!(wal_files(dir.path()).len(), 2);
    // Every file was kept as found before the cut, the deleted third one included.
    assert_eq!(wal_files(&r.quarantine).len(), files.len());
    assert_eq!(
        std::fs::read(r.quarantine.join(files[2].file_name().unwrap())).unwrap(),
        third_before
    );
    // The vote stays; what was known committed is forgotten; the floor remembers it.
    assert_eq!(wal.read_vote().as_deref(), Some(&b"vote-7"[..]));
    assert_eq!(wal.read_committed(), None);
    assert_eq!(wal.catch_up_floor().unwrap(), Some(99));
    // The floor survives a restart (the cut log is no longer damaged).
    drop(wal);
    let wal = Wal::open(dir.path(), repairing(2048)).unwrap();
    assert_eq!(wal.recovery().repaired, None);
    assert_eq!(wal.catch_up_floor().unwrap(), Some(99));
    // Re-replicated entries append after the cut as usual.
    wal.append_durable(&[entry(first_lost, 2, 40)]).unwrap();
    wal.set_catch_up_floor(None).unwrap();
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    assert_eq!(wal.catch_up_floor().unwrap(), None);
    assert_eq!(wal.last().unwrap().index, first_lost);
}

#[test]
fn repair_of_a_tail_cut_below_committed() {
    let dir = tempfile::tempdir().unwrap();
    committed_wal(dir.path());
    let last = wal_files(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    let f = OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(len - 100).unwrap();
    drop(f);
    // Without repair: corruption, and the files are left as they are.
    assert!(
        Wal::open(dir.path(), cfg(2048))
            .unwrap_err()
            .is_corruption()
    );
    assert_eq!(std::fs::metadata(&last).unwrap().len(), len - 100);
    let wal = Wal::open(dir.path(), repairing(2048)).unwrap();
    let r = wal.recovery().repaired.clone().expect("repaired");
    assert_eq!(wal.last().unwrap().index, r.first_lost - 1);
    assert!(r.first_lost < 100);
    assert_eq!(wal.catch_up_floor().unwrap(), Some(99));
}

#[test]
fn repair_of_missing_files_and_a_reset_keep_the_vote() {
    let dir = tempfile::tempdir().unwrap();
    committed_wal(dir.path());
    for f in wal_files(dir.path()) {
        std::fs::remove_file(f).unwrap();
    }
    let wal = Wal::open(dir.path(), repairing(2048)).unwrap();
    assert!(wal.recovery().repaired.is_some());
    assert_eq!(wal.last(), None);
    assert_eq!(wal.read_vote().as_deref(), Some(&b"vote-7"[..]));
    wal.append_durable(&[entry(0, 3, 40), entry(1, 3, 40)])
        .unwrap();
    wal.purge_upto(LogPosition {
        leader_node: 0,
        index: 0,
        term: 3,
    })
    .unwrap();
    wal.reset_keeping_vote(120).unwrap();
    assert_eq!(wal.last(), None);
    assert_eq!(wal.purged(), None);
    assert_eq!(wal.catch_up_floor().unwrap(), Some(120));
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(2048)).unwrap();
    assert_eq!(wal.last(), None);
    assert_eq!(wal.read_vote().as_deref(), Some(&b"vote-7"[..]));
    wal.append_durable(&[entry(0, 4, 40)]).unwrap();
}

fn pos(index: u64) -> LogPosition {
    LogPosition {
        leader_node: 0,
        index,
        term: 1,
    }
}

/// A WAL behind a closed sync gate holding entries 0 and 1 (written, not durable) and a recorded
/// committed position 1.
fn gated_wal_with_a_recorded_commit(dir: &Path) -> (Wal, Arc<GatedSyncer>) {
    let syncer = Arc::new(GatedSyncer::default());
    let wal = Wal::open_with_syncer(dir, cfg(1 << 20), syncer.clone()).unwrap();
    wal.append(&[entry(0, 1, 10), entry(1, 1, 10)], None)
        .unwrap();
    wal.record_committed(pos(1)).unwrap();
    (wal, syncer)
}

#[test]
fn a_recorded_committed_index_is_saved_only_after_its_entries_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, syncer) = gated_wal_with_a_recorded_commit(dir.path());
    // record_committed returned at once; the committer waits for the entries' fdatasync. A
    // committer that did not would save within microseconds, so 200 ms is ample to see it.
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        assert_eq!(wal.read_committed(), None, "saved before its entries");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(syncer.calls.load(Ordering::SeqCst), 0);
    syncer.set_open(true);
    assert!(wait_until(10, || wal.read_committed() == Some(pos(1))));
    assert!(syncer.calls.load(Ordering::SeqCst) >= 1);
    // An older position never moves it back.
    wal.record_committed(pos(0)).unwrap();
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
    assert_eq!(wal.read_committed(), Some(pos(1)));
}

#[test]
fn close_saves_the_last_recorded_committed_index() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
    for i in 0..50 {
        wal.append_durable(&[entry(i, 1, 10)]).unwrap();
        wal.record_committed(pos(i)).unwrap();
    }
    wal.close().unwrap();
    let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
    assert_eq!(wal.read_committed(), Some(pos(49)));
}

#[test]
fn a_reset_forgets_a_committed_index_recorded_before_it() {
    let dir = tempfile::tempdir().unwrap();
    // The recorded position is held back by the closed gate, then overtaken by the reset.
    let (wal, syncer) = gated_wal_with_a_recorded_commit(dir.path());
    wal.reset_keeping_vote(5).unwrap();
    syncer.set_open(true);
    wal.close().unwrap();
    let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
    assert_eq!(wal.read_committed(), None, "a committed index past a reset");
    assert_eq!(wal.last(), None);
}

#[test]
fn a_failed_fdatasync_fails_the_next_recording() {
    let dir = tempfile::tempdir().unwrap();
    let syncer = Arc::new(GatedSyncer::default());
    syncer.fail.store(true, Ordering::SeqCst);
    syncer.set_open(true);
    let wal = Wal::open_with_syncer(dir.path(), cfg(1 << 20), syncer.clone()).unwrap();
    wal.append(&[entry(0, 1, 10)], None).unwrap();
    assert!(wait_until(10, || wal.is_poisoned()));
    assert!(matches!(
        wal.record_committed(pos(0)),
        Err(StorageError::Poisoned(_))
    ));
    drop(wal);
    let wal = Wal::open(dir.path(), cfg(1 << 20)).unwrap();
    assert_eq!(wal.read_committed(), None);
}

#[test]
fn committed_saves_are_spaced_by_the_interval_and_coalesce() {
    let dir = tempfile::tempdir().unwrap();
    let interval = Duration::from_millis(20);
    let wal = Wal::open(
        dir.path(),
        WalConfig {
            committed_save_interval: interval,
            ..cfg(1 << 20)
        },
    )
    .unwrap();
    let start = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..400u64 {
        wal.append_durable(&[entry(i, 1, 10)]).unwrap();
        wal.record_committed(pos(i)).unwrap();
        seen.insert(wal.read_committed());
    }
    let elapsed = start.elapsed();
    // Every save is at least `interval` after the one before, so at most this many were seen.
    let most = (elapsed.as_millis() / interval.as_millis()) as usize + 2;
    assert!(
        seen.len() <= most,
        "{} distinct saves in {elapsed:?} with a {interval:?} interval",
        seen.len()
    );
    // The last position is still saved, without waiting for another record.
    assert!(wait_until(10, || wal.read_committed() == Some(pos(399))));
}
