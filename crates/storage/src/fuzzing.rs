//! Fuzz harnesses for every decoder that sees untrusted bytes.
//!
//! Each function takes arbitrary bytes, must never panic, and asserts the invariants its
//! decoder promises. They are shared by the `cargo fuzz` targets under `fuzz/` and by the
//! ordinary test that replays the committed corpus and every past crash in CI.

use bytes::Bytes;

use crate::manifest::Manifest;
use crate::scan::{self, ScanStop};
use crate::wal;
use runnel_record::{self as batch, RecordBatch};

/// The names of the harnesses, as used for corpus directories.
pub const TARGETS: &[&str] = &[
    "batch_decoder",
    "segment_scan",
    "wal_scan",
    "manifest_decode",
];

/// Runs the harness called `target` on `data`.
///
/// # Panics
/// On an unknown target name, or when an invariant breaks (that is the finding).
pub fn run(target: &str, data: &[u8]) {
    match target {
        "batch_decoder" => batch_decoder(data),
        "segment_scan" => segment_scan(data),
        "wal_scan" => wal_scan(data),
        "manifest_decode" => manifest_decode(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// Decodes a batch and all its records; checks that every slice lies inside the batch.
pub fn batch_decoder(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    let Ok(b) = RecordBatch::parse(&bytes) else {
        return;
    };
    let h = *b.header();
    assert_eq!(b.bytes().len(), h.total_len());
    assert!(h.total_len() <= data.len());
    assert_eq!(
        batch::validate(data).ok(),
        Some(h),
        "parse and validate disagree"
    );
    let Ok(records) = b.records() else { return };
    let mut n = 0u32;
    for r in records {
        let Ok(r) = r else { break };
        assert!(r.offset >= h.base_offset && r.offset <= h.last_offset());
        let lens = r.key.as_ref().map_or(0, |k| k.len()) + r.value.as_ref().map_or(0, |v| v.len());
        assert!(lens <= h.total_len());
        n += 1;
        assert!(n <= h.records_count, "more records than the header counts");
    }
}

/// Scans a buffer as a segment; checks the scan is consistent with itself.
pub fn segment_scan(data: &[u8]) {
    let base = if data.len() >= 8 {
        u64::from_be_bytes(data[..8].try_into().expect("8 bytes")) & (i64::MAX as u64)
    } else {
        0
    };
    let mut last_end = 0;
    let o = scan::scan(data, base, |pos, h| {
        assert_eq!(pos, last_end, "batches must be back to back");
        last_end = pos + h.total_len();
    });
    assert_eq!(o.valid_len, last_end);
    assert!(o.valid_len <= data.len());
    // Scanning exactly the valid prefix finds the same batches and ends cleanly.
    let again = scan::scan(&data[..o.valid_len], base, |_, _| {});
    assert_eq!(again.stop, ScanStop::End);
    assert_eq!(
        (again.valid_len, again.batches, again.next_offset),
        (o.valid_len, o.batches, o.next_offset)
    );
}

/// Scans a buffer as a WAL file body; checks positions and the prefix property.
pub fn wal_scan(data: &[u8]) {
    let max = 1 << 20;
    let s = wal::scan_records(data, 0, 7, max);
    assert!(s.valid_len <= data.len());
    assert!(
        s.entries.windows(2).all(|w| w[0].0 < w[1].0),
        "positions must increase"
    );
    let again = wal::scan_records(&data[..s.valid_len], 0, 7, max);
    assert_eq!(again.stop, None);
    assert_eq!(again.entries, s.entries);
}

/// Decodes a manifest; anything accepted must re-encode to exactly the same bytes.
pub fn manifest_decode(data: &[u8]) {
    if let Ok(m) = Manifest::decode(data) {
        let enc = m.encode().expect("a decoded manifest encodes");
        assert_eq!(enc, data, "decode/encode is not the identity");
    }
}
