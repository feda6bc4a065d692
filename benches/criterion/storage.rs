//! Storage micro-benchmarks: partition-log append against a raw write+fdatasync baseline of the
//! same bytes, reads from the map, recovery scans, and WAL group commit.
//!
//! Run: `cargo bench -p runnel-benches --bench storage`, then `python3 benches/report.py` for
//! the ratio table recorded in `docs/BENCHMARKS.md`.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use runnel_benches::{batch_of, scratch_dir};
use runnel_storage::wal::{Entry, Wal, WalConfig};
use runnel_storage::{LogConfig, PartitionLog, PersistMode, Recovery};

fn log_config(persist: PersistMode) -> LogConfig {
    LogConfig {
        segment_bytes: 256 << 20,
        persist,
        ..LogConfig::default()
    }
}

/// Appends of 100- and 1000-record batches (1 KiB records), with and without a sync per append,
/// next to the same bytes written with plain `write` (+ `fdatasync`).
fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("append");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    for records in [100usize, 1000] {
        let batch = batch_of(records, 1);
        g.throughput(Throughput::Bytes(batch.len() as u64));
        for (name, persist) in [
            ("runnel_fsync", PersistMode::Fsync),
            ("runnel_buffered", PersistMode::Buffered),
        ] {
            g.bench_with_input(BenchmarkId::new(name, records), &batch, |b, batch| {
                b.iter_custom(|iters| {
                    let dir = scratch_dir();
                    let log =
                        PartitionLog::open(dir.path(), log_config(persist), Recovery::Recorded)
                            .unwrap();
                    let t = Instant::now();
                    for _ in 0..iters {
                        log.append(batch, 0).unwrap();
                    }
                    t.elapsed()
                })
            });
        }
        g.bench_with_input(
            BenchmarkId::new("raw_pwrite_preallocated", records),
            &batch,
            |b, batch| {
                b.iter_custom(|iters| {
                    use std::os::unix::fs::FileExt;
                    let dir = scratch_dir();
                    let f = OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(true)
                        .open(dir.path().join("raw"))
                        .unwrap();
                    let bytes = iters * batch.len() as u64;
                    runnel_storage::fsutil::reserve_blocks(&f, &dir.path().join("raw"), bytes)
                        .unwrap();
                    let t = Instant::now();
                    for i in 0..iters {
                        f.write_all_at(batch, i * batch.len() as u64).unwrap();
                    }
                    t.elapsed()
                })
            },
        );
        for (name, sync) in [("raw_write_fdatasync", true), ("raw_write", false)] {
            g.bench_with_input(BenchmarkId::new(name, records), &batch, |b, batch| {
                b.iter_custom(|iters| {
                    let dir = scratch_dir();
                    let mut f = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.path().join("raw"))
                        .unwrap();
                    let t = Instant::now();
                    for _ in 0..iters {
                        f.write_all(batch).unwrap();
                        if sync {
                            f.sync_data().unwrap();
                        }
                    }
                    t.elapsed()
                })
            });
        }
    }
    g.finish();
}

/// A buffered log in `dir` holding at least `bytes` of 100-record batches.
fn filled_log(dir: &std::path::Path, bytes: u64, seed: u64) -> PartitionLog {
    let log =
        PartitionLog::open(dir, log_config(PersistMode::Buffered), Recovery::Recorded).unwrap();
    let batch = batch_of(100, seed);
    while log.size_bytes() < bytes {
        log.append(&batch, 0).unwrap();
    }
    log
}

/// Sequential reads of a 256 MiB log from the map (page cache), 1 MiB per read, CRC-checked.
fn read(c: &mut Criterion) {
    let dir = scratch_dir();
    let log = filled_log(dir.path(), 256 << 20, 2);
    let end = log.log_end();
    let mut g = c.benchmark_group("read");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(log.size_bytes()));
    g.bench_function("sequential_1MiB_reads_256MiB", |b| {
        b.iter(|| {
            let mut at = 0;
            let mut bytes = 0usize;
            while at < end {
                let r = log.read(at, 1 << 20, end).unwrap();
                bytes += r.bytes.len();
                at = r.next_offset;
            }
            bytes
        })
    });
    g.finish();
}

/// Recovery: the pure scanner over 256 MiB in memory, and a full open that scans a 256 MiB
/// active segment past its recovery point.
fn recovery(c: &mut Criterion) {
    let dir = scratch_dir();
    {
        let log = filled_log(dir.path(), 250 << 20, 3);
        log.flush().unwrap();
    }
    let seg = dir.path().join("00000000000000000000.log");
    let data = std::fs::read(&seg).unwrap();
    let valid = runnel_storage::scan::scan(&data, 0, |_, _| {}).valid_len;
    let mut g = c.benchmark_group("recovery");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(valid as u64));
    g.bench_function("scan_in_memory_250MiB", |b| {
        b.iter(|| runnel_storage::scan::scan(&data, 0, |_, _| {}).batches)
    });
    g.bench_function("open_scanning_active_segment_250MiB", |b| {
        b.iter(|| {
            // Without a recovery point the whole active segment is scanned.
            std::fs::remove_file(dir.path().join(runnel_storage::RECOVERY_POINT_FILE)).unwrap();
            let log = PartitionLog::open(
                dir.path(),
                log_config(PersistMode::Buffered),
                Recovery::Recorded,
            )
            .unwrap();
            assert_eq!(log.recovery_report().scanned_bytes, valid as u64);
            log.log_end()
        })
    });
    g.finish();
}

/// WAL: 1 KiB entries acknowledged after fdatasync, one at a time versus 64 in flight
/// (group commit lets one fdatasync complete many appends).
fn wal(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal");
    g.sample_size(10).measurement_time(Duration::from_secs(6));
    g.throughput(Throughput::Elements(1));
    let payload = Bytes::from(vec![7u8; 1024]);
    g.bench_function("append_durable_one_at_a_time", |b| {
        b.iter_custom(|iters| {
            let dir = scratch_dir();
            let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
            let t = Instant::now();
            for i in 0..iters {
                wal.append_durable(&[Entry {
                    index: i,
                    term: 1,
                    payload: payload.clone(),
                }])
                .unwrap();
            }
            t.elapsed()
        })
    });
    g.bench_function("append_64_in_flight", |b| {
        b.iter_custom(|iters| {
            let dir = scratch_dir();
            let wal = Wal::open(dir.path(), WalConfig::default()).unwrap();
            let done = Arc::new(AtomicU64::new(0));
            let t = Instant::now();
            for i in 0..iters {
                // Bounded window: wait (spinning briefly) while 64 are outstanding.
                while i - done.load(Ordering::Acquire) >= 64 {
                    std::thread::yield_now();
                }
                let d = Arc::clone(&done);
                let cb = Box::new(move |r: runnel_storage::Result<()>| {
                    r.unwrap();
                    d.fetch_add(1, Ordering::AcqRel);
                });
                wal.append(
                    &[Entry {
                        index: i,
                        term: 1,
                        payload: payload.clone(),
                    }],
                    Some(cb),
                )
                .unwrap();
            }
            wal.flush().unwrap();
            while done.load(Ordering::Acquire) < iters {
                std::thread::yield_now();
            }
            t.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, append, read, recovery, wal);
criterion_main!(benches);
