//! Replays the committed fuzz corpus and every past crash (`fuzz/corpus`, `fuzz/regressions`)
//! through the same harnesses `cargo fuzz` runs, and fuzzes each harness a little more with
//! proptest so every CI run explores new inputs.

use std::path::PathBuf;

use proptest::prelude::*;
use runnel_record::{BatchBuilder, BatchOptions};
use runnel_storage::fuzzing::{self, TARGETS};

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

#[test]
fn corpus_and_regressions_replay_cleanly() {
    let mut total = 0;
    for t in TARGETS {
        for kind in ["corpus", "regressions"] {
            let dir = fuzz_dir().join(kind).join(t);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries {
                let p = e.unwrap().path();
                if p.is_file() && p.file_name().is_some_and(|n| n != "README") {
                    fuzzing::run(t, &std::fs::read(&p).unwrap());
                    total += 1;
                }
            }
        }
    }
    assert!(
        total >= 20,
        "only {total} corpus files: is fuzz/corpus committed?"
    );
}

/// Writes seed inputs for every target into `fuzz/corpus`. Run by hand when formats change:
/// `cargo test -p runnel-storage --test fuzz_corpus -- --ignored write_seed_corpus`.
#[test]
#[ignore = "tool: regenerates the seed corpus"]
fn write_seed_corpus() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../record/tests/fixtures/kafka");
    let mut batches = Vec::new();
    for e in std::fs::read_dir(&fixtures).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "bin") {
            let b = std::fs::read(&p).unwrap();
            std::fs::write(
                fuzz_dir()
                    .join("corpus/batch_decoder")
                    .join(p.file_name().unwrap()),
                &b,
            )
            .unwrap();
            batches.push(b);
        }
    }
    // A segment: small batches back to back with consecutive offsets, then zeros.
    let mut seg = Vec::new();
    let mut next = 0u64;
    for i in 0..4 {
        let mut b = BatchBuilder::new(BatchOptions::default());
        for j in 0..=i {
            b.append(j as i64, Some(b"k"), Some(b"v"), &[(b"h", Some(b"x"))]);
        }
        let mut b = b.build().to_vec();
        runnel_record::set_base_offset(&mut b, next);
        next += i as u64 + 1;
        seg.extend_from_slice(&b);
    }
    seg.extend_from_slice(&[0u8; 64]);
    std::fs::write(fuzz_dir().join("corpus/segment_scan/four_batches"), &seg).unwrap();
    // A WAL body written by the real WAL.
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = runnel_storage::wal::Wal::open(dir.path(), Default::default()).unwrap();
        for i in 0..4u64 {
            let payload = bytes::Bytes::from(vec![i as u8; i as usize * 5]);
            wal.append_durable(&[runnel_storage::wal::Entry {
                index: i,
                term: 1,
                payload,
            }])
            .unwrap();
        }
    }
    let body = std::fs::read(dir.path().join("00000000000000000000.wal")).unwrap();
    // The harness expects records starting at index 7 from byte 0; re-encode the header-less body.
    let mut wal_seed = Vec::new();
    let mut pos = runnel_storage::wal::FILE_HEADER_LEN;
    let mut idx = 7u64;
    while pos < body.len() {
        let len = u32::from_be_bytes(body[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let mut rec = body[pos..pos + 24 + len].to_vec();
        rec[8..16].copy_from_slice(&idx.to_be_bytes());
        let crc = crc32c::crc32c(&rec[4..]);
        rec[..4].copy_from_slice(&crc.to_be_bytes());
        wal_seed.extend_from_slice(&rec);
        pos += 24 + len;
        idx += 1;
    }
    std::fs::write(fuzz_dir().join("corpus/wal_scan/four_records"), &wal_seed).unwrap();
    let m = runnel_storage::manifest::Manifest {
        id: "snap-1".into(),
        files: vec![runnel_storage::manifest::ManifestFile {
            path: "p/0.log".into(),
            len: 9,
            crc32c: 7,
        }],
        state: bytes::Bytes::from_static(b"state"),
    };
    std::fs::write(
        fuzz_dir().join("corpus/manifest_decode/one_file"),
        m.encode().unwrap(),
    )
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn harnesses_hold_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        for t in TARGETS {
            fuzzing::run(t, &data);
        }
    }

    #[test]
    fn harnesses_hold_on_mutated_valid_batches(
        n in 1usize..5, flips in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..4), cut in any::<u16>()
    ) {
        let mut b = BatchBuilder::new(BatchOptions::default());
        for i in 0..n {
            b.append(i as i64 * 3 - 2, Some(b"key"), Some(&vec![b'v'; i * 7]), &[(b"h", None)]);
        }
        let mut data = b.build().to_vec();
        for (at, x) in flips {
            let i = at as usize % data.len();
            data[i] ^= x;
        }
        data.truncate(cut as usize % (data.len() + 1));
        fuzzing::batch_decoder(&data);
        fuzzing::segment_scan(&data);
    }
}
