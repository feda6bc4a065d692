//! Sparse offset and time indexes of one segment, and their sealed-file format.
//!
//! The offset index maps a batch's relative base offset to its byte position, one entry about
//! every `index_interval_bytes`. The time index holds, at the same cadence, the largest timestamp
//! of every batch before an indexed batch, and that batch's relative base offset. Both live in memory for the active segment and are
//! written, with a CRC-32C and a summary of the segment, when the segment is sealed.
//!
//! It also keeps the segment's *epoch runs*: the relative offset at which each leader epoch
//! (`partitionLeaderEpoch`, stamped at append and not covered by the batch CRC) begins. Every
//! read checks each batch's epoch against them, and each `baseOffset` against the chain from an
//! index entry, so no byte outside the batch CRC is served unchecked.
//!
//! `.index` file (all big-endian):
//! ```text
//! 0   4  magic "RNIX"        16  8  next_offset (offset after the last batch)
//! 4   2  version (2)         24  8  segment_len (valid bytes of the .log)
//! 6   2  reserved (0)        32  8  max_timestamp
//! 8   8  base_offset         40  4  entry count N
//! 44  8N entries: relative_offset u32, position u32
//! 44+8N 4 epoch run count M (≥ 1)
//! 48+8N 8M runs: relative_offset u32 (first 0, increasing), leader epoch i32 (differs from the last)
//! 48+8N+8M 4 CRC-32C of every byte before it
//! ```
//! A version-1 file (no runs) is rebuilt by scanning.
//! `.timeindex` file: magic "RNTX", version, reserved, base_offset, count N, then `12N` bytes of
//! entries (timestamp i64, relative_offset u32), then the CRC-32C of every byte before it.

use runnel_record::BatchHeader;

const INDEX_MAGIC: &[u8; 4] = b"RNIX";
const TIME_MAGIC: &[u8; 4] = b"RNTX";
const VERSION: u16 = 1;
const INDEX_VERSION: u16 = 2;
const INDEX_HEADER: usize = 44;
const TIME_HEADER: usize = 20;

/// A summary of a sealed segment, stored in its `.index` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Offset after the last batch.
    pub next_offset: u64,
    /// Valid bytes in the `.log` file.
    pub segment_len: u64,
    /// Largest batch `maxTimestamp`, `i64::MIN` when empty.
    pub max_timestamp: i64,
}

/// In-memory sparse indexes of one segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentIndex {
    /// (relative base offset, byte position), ascending in both.
    pub offsets: Vec<(u32, u32)>,
    /// (max timestamp of every batch before it, relative base offset), ascending in both.
    pub times: Vec<(i64, u32)>,
    /// (relative offset where it begins, leader epoch), ascending in both; the first at 0.
    pub epochs: Vec<(u32, i32)>,
    last_indexed_pos: Option<usize>,
    max_timestamp: Option<i64>,
}

impl SegmentIndex {
    /// Records a batch appended at `position`; adds entries every `interval` bytes.
    pub fn on_append(&mut self, base: u64, position: usize, h: &BatchHeader, interval: usize) {
        let rel = (h.base_offset - base) as u32;
        if self
            .epochs
            .last()
            .is_none_or(|&(_, e)| e != h.partition_leader_epoch)
        {
            self.epochs.push((rel, h.partition_leader_epoch));
        }
        let due = self
            .last_indexed_pos
            .is_none_or(|last| position - last >= interval);
        if due {
            // Position 0 needs no entry: a lookup with nothing below it starts there anyway.
            if position > 0 {
                self.offsets.push((rel, position as u32));
                // Every batch before this one has a max timestamp of at most `before`.
                if let Some(before) = self.max_timestamp
                    && self.times.last().is_none_or(|&(t, _)| before > t)
                {
                    self.times.push((before, rel));
                }
            }
            self.last_indexed_pos = Some(position);
        }
        self.max_timestamp = Some(
            self.max_timestamp
                .map_or(h.max_timestamp, |m| m.max(h.max_timestamp)),
        );
    }

    /// Byte position to start scanning from to find relative offset `rel`.
    #[cfg(test)]
    pub fn position_for(&self, rel: u32) -> usize {
        self.entry_for(rel).1
    }

    /// The indexed batch to start scanning from to find relative offset `rel`: its relative
    /// base offset and byte position (`(0, 0)`, the segment's first batch, when none is lower).
    pub fn entry_for(&self, rel: u32) -> (u32, usize) {
        let i = self.offsets.partition_point(|&(r, _)| r <= rel);
        if i == 0 {
            (0, 0)
        } else {
            let (r, p) = self.offsets[i - 1];
            (r, p as usize)
        }
    }

    /// Relative offset to start scanning from to find the first batch with max timestamp ≥ `ts`.
    pub fn offset_for_time(&self, ts: i64) -> u32 {
        // An entry (t, r) with t < ts proves every batch before r is entirely below `ts`.
        let i = self.times.partition_point(|&(t, _)| t < ts);
        if i == 0 { 0 } else { self.times[i - 1].1 }
    }

    /// Encodes the `.index` file.
    pub fn encode_offsets(&self, base: u64, s: &SegmentSummary) -> Vec<u8> {
        let mut b = Vec::with_capacity(INDEX_HEADER + 8 * self.offsets.len() + 4);
        b.extend_from_slice(INDEX_MAGIC);
        b.extend_from_slice(&INDEX_VERSION.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&base.to_be_bytes());
        b.extend_from_slice(&s.next_offset.to_be_bytes());
        b.extend_from_slice(&s.segment_len.to_be_bytes());
        b.extend_from_slice(&s.max_timestamp.to_be_bytes());
        b.extend_from_slice(&(self.offsets.len() as u32).to_be_bytes());
        for &(r, p) in &self.offsets {
            b.extend_from_slice(&r.to_be_bytes());
            b.extend_from_slice(&p.to_be_bytes());
        }
        b.extend_from_slice(&(self.epochs.len() as u32).to_be_bytes());
        for &(r, e) in &self.epochs {
            b.extend_from_slice(&r.to_be_bytes());
            b.extend_from_slice(&e.to_be_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    /// Encodes the `.timeindex` file.
    pub fn encode_times(&self, base: u64) -> Vec<u8> {
        let mut b = Vec::with_capacity(TIME_HEADER + 12 * self.times.len() + 4);
        b.extend_from_slice(TIME_MAGIC);
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&base.to_be_bytes());
        b.extend_from_slice(&(self.times.len() as u32).to_be_bytes());
        for &(t, r) in &self.times {
            b.extend_from_slice(&t.to_be_bytes());
            b.extend_from_slice(&r.to_be_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes a sealed segment's two index files, checking CRCs, order and bounds against the
    /// `.log` file's size. `None` means "rebuild by scanning".
    pub fn decode(
        base: u64,
        index: &[u8],
        time: &[u8],
        log_file_len: u64,
    ) -> Option<(SegmentIndex, SegmentSummary)> {
        let body = check_crc(index, INDEX_MAGIC, INDEX_VERSION, INDEX_HEADER)?;
        if u64_at(body, 8) != base {
            return None;
        }
        let summary = SegmentSummary {
            next_offset: u64_at(body, 16),
            segment_len: u64_at(body, 24),
            max_timestamp: u64_at(body, 32) as i64,
        };
        let n = u32_at(body, 40) as usize;
        let runs_at = INDEX_HEADER.checked_add(n.checked_mul(8)?)?;
        if body.len() < runs_at + 4 {
            return None;
        }
        let m = u32_at(body, runs_at) as usize;
        if m == 0
            || body.len() != runs_at + 4 + 8 * m
            || summary.segment_len == 0
            || summary.segment_len > log_file_len
            || summary.segment_len > u32::MAX as u64
            || summary.next_offset <= base
            || summary.next_offset - base > u32::MAX as u64 + 1
        {
            return None;
        }
        let rel_end = summary.next_offset - base;
        let mut offsets = Vec::with_capacity(n);
        for i in 0..n {
            let at = INDEX_HEADER + 8 * i;
            let e = (u32_at(body, at), u32_at(body, at + 4));
            let ordered = offsets.last().is_none_or(|&(r, p)| e.0 > r && e.1 > p);
            if !ordered || e.1 as u64 >= summary.segment_len || e.0 as u64 >= rel_end {
                return None;
            }
            offsets.push(e);
        }
        let mut epochs = Vec::with_capacity(m);
        for i in 0..m {
            let at = runs_at + 4 + 8 * i;
            let e = (u32_at(body, at), u32_at(body, at + 4) as i32);
            let ordered = epochs
                .last()
                .map_or(e.0 == 0, |&(r, ep): &(u32, i32)| e.0 > r && e.1 != ep);
            if !ordered || e.0 as u64 >= rel_end {
                return None;
            }
            epochs.push(e);
        }
        let tbody = check_crc(time, TIME_MAGIC, VERSION, TIME_HEADER)?;
        let m = u32_at(tbody, 16) as usize;
        if u64_at(tbody, 8) != base || tbody.len() != TIME_HEADER + 12 * m {
            return None;
        }
        let mut times = Vec::with_capacity(m);
        for i in 0..m {
            let at = TIME_HEADER + 12 * i;
            let e = (u64_at(tbody, at) as i64, u32_at(tbody, at + 8));
            let ordered = times.last().is_none_or(|&(t, r)| e.0 > t && e.1 >= r);
            if !ordered || e.1 as u64 >= rel_end || e.0 > summary.max_timestamp {
                return None;
            }
            times.push(e);
        }
        let idx = SegmentIndex {
            offsets,
            times,
            epochs,
            last_indexed_pos: None,
            max_timestamp: Some(summary.max_timestamp),
        };
        Some((idx, summary))
    }
}

/// The leader epoch recorded in `runs` (see [`SegmentIndex::epochs`]) for a batch at relative
/// offset `rel`; `None` when no batch was recorded there.
pub fn epoch_at(runs: &[(u32, i32)], rel: u32) -> Option<i32> {
    let i = runs.partition_point(|&(r, _)| r <= rel);
    (i > 0).then(|| runs[i - 1].1)
}

fn check_crc<'a>(file: &'a [u8], magic: &[u8; 4], version: u16, header: usize) -> Option<&'a [u8]> {
    if file.len() < header + 4 || &file[..4] != magic || u16_at(file, 4) != version {
        return None;
    }
    let (body, crc) = file.split_at(file.len() - 4);
    (crc32c::crc32c(body) == u32_at(crc, 0)).then_some(body)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(base_offset: u64, count: u32, max_ts: i64) -> BatchHeader {
        BatchHeader {
            base_offset,
            batch_length: 100,
            partition_leader_epoch: 0,
            crc: 0,
            attributes: 0,
            last_offset_delta: count - 1,
            base_timestamp: max_ts,
            max_timestamp: max_ts,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            records_count: count,
        }
    }

    fn sample() -> (SegmentIndex, SegmentSummary) {
        let mut idx = SegmentIndex::default();
        // 100 batches of 10 records, 1000 bytes each, interval 4096: an entry every 5 batches.
        for i in 0..100u64 {
            idx.on_append(
                1000,
                (i * 1000) as usize,
                &header(1000 + i * 10, 10, 50 + i as i64),
                4096,
            );
        }
        let s = SegmentSummary {
            next_offset: 2000,
            segment_len: 100_000,
            max_timestamp: 149,
        };
        (idx, s)
    }

    #[test]
    fn entries_are_sparse_and_lookups_never_overshoot() {
        let (idx, _) = sample();
        assert_eq!(idx.offsets.len(), 19);
        for rel in 0..1000u32 {
            let pos = idx.position_for(rel);
            let batch_start = (rel / 10) as usize * 1000;
            assert!(
                pos <= batch_start,
                "rel {rel}: {pos} past its batch at {batch_start}"
            );
            assert!(
                batch_start - pos < 5000,
                "rel {rel}: scan of {} bytes",
                batch_start - pos
            );
        }
        assert!(idx.offset_for_time(i64::MIN) == 0);
        for ts in 50..150 {
            let rel = idx.offset_for_time(ts);
            let first = ((ts - 50) * 10) as u32;
            assert!(
                rel <= first,
                "time {ts}: start {rel} after first match {first}"
            );
        }
    }

    #[test]
    fn files_round_trip_and_any_damage_is_refused() {
        let (idx, s) = sample();
        let (ib, tb) = (idx.encode_offsets(1000, &s), idx.encode_times(1000));
        let (back, bs) = SegmentIndex::decode(1000, &ib, &tb, 100_000).unwrap();
        assert_eq!(back.offsets, idx.offsets);
        assert_eq!(back.times, idx.times);
        assert_eq!(bs, s);
        assert!(
            SegmentIndex::decode(1000, &ib, &tb, 99_999).is_none(),
            "points past EOF"
        );
        assert!(
            SegmentIndex::decode(999, &ib, &tb, 100_000).is_none(),
            "wrong base"
        );
        for cut in 0..ib.len() {
            assert!(
                SegmentIndex::decode(1000, &ib[..cut], &tb, 100_000).is_none(),
                "short {cut}"
            );
        }
        for i in 0..ib.len() {
            let mut bad = ib.clone();
            bad[i] ^= 0x10;
            assert!(
                SegmentIndex::decode(1000, &bad, &tb, 100_000).is_none(),
                "flip {i}"
            );
        }
        for i in 0..tb.len() {
            let mut bad = tb.clone();
            bad[i] ^= 0x10;
            assert!(
                SegmentIndex::decode(1000, &ib, &bad, 100_000).is_none(),
                "time flip {i}"
            );
        }
    }
}
