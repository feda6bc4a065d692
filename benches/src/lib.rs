//! Shared helpers for Runnel's benchmarks: deterministic record batches and scratch directories.

use bytes::Bytes;
use runnel_record::{BatchBuilder, BatchOptions};

/// Size of one benchmark record's value.
pub const RECORD_BYTES: usize = 1024;

/// A batch of `records` records with 1 KiB values and 8-byte keys, built the way a producer would.
pub fn batch_of(records: usize, seed: u64) -> Bytes {
    batch_with(records, RECORD_BYTES, seed)
}

/// A batch of `records` records with `value_bytes`-byte values and 8-byte keys.
pub fn batch_with(records: usize, value_bytes: usize, seed: u64) -> Bytes {
    let mut b = BatchBuilder::with_capacity(BatchOptions::default(), records * (value_bytes + 32));
    let mut value = vec![0u8; value_bytes];
    for i in 0..records {
        let k = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        // Cheap non-constant content so nothing downstream can shortcut on zeros.
        for (j, v) in value.iter_mut().enumerate().step_by(64) {
            *v = (k as usize + j) as u8;
        }
        b.append(
            1_700_000_000_000 + i as i64,
            Some(&k.to_be_bytes()),
            Some(&value),
            &[],
        );
    }
    b.build()
}

/// A scratch directory on the same file system as the project's data (`$RUNNEL_BENCH_DIR`, or
/// `target/bench-tmp`), removed when dropped. `/tmp` may be a RAM disk, which would make every
/// fsync number meaningless.
pub fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("RUNNEL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-tmp")
        });
    std::fs::create_dir_all(&base).expect("create bench dir");
    tempfile::tempdir_in(base).expect("scratch dir")
}
