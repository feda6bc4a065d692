//! The recovery scanner: walks back-to-back batches and says exactly where valid data ends.
//!
//! Used when a segment is opened past its durable point, when an index is rebuilt, and by the
//! fuzz targets. It never panics on any input.

use runnel_record::{self as batch, BatchError, BatchHeader, LOG_OVERHEAD};

/// Why a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// The buffer ended, or the next header is all zeros (preallocated, never written).
    End,
    /// The bytes at `position` are not the next valid batch.
    Invalid {
        /// Byte position of the bad batch.
        position: usize,
        /// What failed.
        error: BatchError,
    },
    /// A valid batch whose `baseOffset` is not the expected next offset.
    OffsetMismatch {
        /// Byte position of the batch.
        position: usize,
        /// The offset that should come next.
        expected: u64,
        /// The `baseOffset` found.
        found: u64,
    },
}

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutcome {
    /// Bytes of valid batches from the start of the buffer.
    pub valid_len: usize,
    /// Offset after the last valid batch (the start offset when none was valid).
    pub next_offset: u64,
    /// Number of valid batches.
    pub batches: u64,
    /// Largest `maxTimestamp` among valid batches, `i64::MIN` when none.
    pub max_timestamp: i64,
    /// Why the scan stopped.
    pub stop: ScanStop,
}

/// Scans `buf` from its start, expecting the first batch at `base_offset`, calling `visit` with
/// the position and header of every valid batch in order.
pub fn scan(
    buf: &[u8],
    base_offset: u64,
    mut visit: impl FnMut(usize, &BatchHeader),
) -> ScanOutcome {
    let mut out = ScanOutcome {
        valid_len: 0,
        next_offset: base_offset,
        batches: 0,
        max_timestamp: i64::MIN,
        stop: ScanStop::End,
    };
    let mut pos = 0;
    while pos < buf.len() {
        let rest = &buf[pos..];
        if is_zero_header(rest) {
            break;
        }
        let header = match batch::validate(rest) {
            Ok(h) => h,
            Err(error) => {
                out.stop = ScanStop::Invalid {
                    position: pos,
                    error,
                };
                break;
            }
        };
        if header.base_offset != out.next_offset {
            out.stop = ScanStop::OffsetMismatch {
                position: pos,
                expected: out.next_offset,
                found: header.base_offset,
            };
            break;
        }
        visit(pos, &header);
        pos += header.total_len();
        out.valid_len = pos;
        out.next_offset = header.next_offset();
        out.batches += 1;
        out.max_timestamp = out.max_timestamp.max(header.max_timestamp);
    }
    out
}

/// Length of `buf` without its trailing zero bytes.
///
/// Preallocated files are mostly zeros past their data; this compares whole blocks against a
/// zero block (`memcmp`), so even an unoptimized build scans a 64 MiB tail in milliseconds
/// instead of most of a second byte by byte.
pub fn data_end(buf: &[u8]) -> usize {
    const BLOCK: usize = 4096;
    static ZERO: [u8; BLOCK] = [0; BLOCK];
    let mut end = buf.len();
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let block = &buf[start..end];
        if block != &ZERO[..block.len()] {
            return start + block.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        }
        end = start;
    }
    0
}

/// True when the next batch header (or what is left of the buffer, if shorter) is all zeros.
///
/// An offset-0 batch starts with eight zero bytes, so the check covers `batchLength` and magic
/// too: a real batch always has a non-zero length and magic 2.
fn is_zero_header(rest: &[u8]) -> bool {
    let n = rest.len().min(LOG_OVERHEAD + 5);
    rest[..n].iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_end_finds_the_last_non_zero_byte() {
        for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 17] {
            let zeros = vec![0u8; len];
            assert_eq!(super::data_end(&zeros), 0);
            for at in [0, len / 2, len.saturating_sub(1)] {
                if at < len {
                    let mut b = zeros.clone();
                    b[at] = 7;
                    assert_eq!(super::data_end(&b), at + 1, "len {len} at {at}");
                }
            }
        }
    }

    use super::*;
    use runnel_record::{BatchBuilder, BatchOptions, set_base_offset};

    fn log_of(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for i in 0..n {
            let mut b = BatchBuilder::new(BatchOptions::default());
            b.append(i as i64, None, Some(format!("value-{i}").as_bytes()), &[]);
            b.append(i as i64 + 1, Some(b"k"), None, &[]);
            let mut bytes = b.build().to_vec();
            set_base_offset(&mut bytes, 2 * i as u64);
            out.extend_from_slice(&bytes);
            ends.push(out.len());
        }
        (out, ends)
    }

    #[test]
    fn clean_log_then_zeros_is_end() {
        let (mut log, ends) = log_of(5);
        log.extend_from_slice(&[0u8; 300]);
        let o = scan(&log, 0, |_, _| {});
        assert_eq!(o.stop, ScanStop::End);
        assert_eq!(o.valid_len, *ends.last().unwrap());
        assert_eq!(o.next_offset, 10);
        assert_eq!(o.batches, 5);
    }

    #[test]
    fn every_cut_keeps_exactly_the_whole_batches_before_it() {
        let (log, ends) = log_of(4);
        for cut in 0..=log.len() {
            let o = scan(&log[..cut], 0, |_, _| {});
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(o.batches as usize, whole, "cut at {cut}");
            assert_eq!(o.valid_len, if whole == 0 { 0 } else { ends[whole - 1] });
            let start = o.valid_len;
            // A tail that wrote only zero bytes so far is indistinguishable from unwritten space.
            let tail_zero = log[start..cut].iter().all(|&b| b == 0);
            assert_eq!(
                o.stop == ScanStop::End,
                tail_zero,
                "cut at {cut}: {:?}",
                o.stop
            );
        }
    }

    #[test]
    fn offset_gap_stops_the_scan() {
        let (log, ends) = log_of(3);
        let o = scan(&log, 5, |_, _| {});
        assert_eq!(
            o.stop,
            ScanStop::OffsetMismatch {
                position: 0,
                expected: 5,
                found: 0
            }
        );
        assert_eq!(o.valid_len, 0);
        let mut gap = log.clone();
        set_base_offset(&mut gap[ends[0]..], 9);
        let o = scan(&gap, 0, |_, _| {});
        assert_eq!(o.batches, 1);
        assert!(matches!(
            o.stop,
            ScanStop::OffsetMismatch {
                found: 9,
                expected: 2,
                ..
            }
        ));
    }
}
