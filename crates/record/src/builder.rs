//! Writing v2 batches exactly as Kafka clients do.

use bytes::Bytes;

use super::varint::{put_varint, put_varlong, varint_len, varlong_len};
use super::*;

/// Producer and transaction fields of a batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Idempotent producer id, -1 when not idempotent.
    pub producer_id: i64,
    /// Producer epoch, -1 when not idempotent.
    pub producer_epoch: i16,
    /// Sequence of the first record, -1 when not idempotent.
    pub base_sequence: i32,
    /// Sets the transactional attribute bit.
    pub transactional: bool,
    /// Written as `partitionLeaderEpoch` (Kafka clients write -1, kafka-python writes 0).
    pub partition_leader_epoch: i32,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            transactional: false,
            partition_leader_epoch: -1,
        }
    }
}

/// Builds one uncompressed v2 batch with base offset 0; the log stamps the real offset.
#[derive(Debug)]
pub struct BatchBuilder {
    opts: BatchOptions,
    buf: Vec<u8>,
    count: u32,
    base_timestamp: i64,
    max_timestamp: i64,
}

impl BatchBuilder {
    /// Starts an empty batch.
    pub fn new(opts: BatchOptions) -> Self {
        Self::with_capacity(opts, 0)
    }

    /// Starts an empty batch with room for `bytes` of records.
    pub fn with_capacity(opts: BatchOptions, bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + bytes);
        buf.resize(HEADER_LEN, 0);
        Self {
            opts,
            buf,
            count: 0,
            base_timestamp: 0,
            max_timestamp: i64::MIN,
        }
    }

    /// Records appended so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True before the first append.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size the batch would have if built now.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Appends one record with the next offset delta.
    pub fn append(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&[u8], Option<&[u8]>)],
    ) {
        if self.count == 0 {
            self.base_timestamp = timestamp;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp);
        let ts_delta = timestamp.wrapping_sub(self.base_timestamp);
        let offset_delta = self.count as i32;
        let body_len = 1
            + varlong_len(ts_delta)
            + varint_len(offset_delta)
            + nullable_len(key)
            + nullable_len(value)
            + varint_len(headers.len() as i32)
            + headers
                .iter()
                .map(|(k, v)| nullable_len(Some(k)) + nullable_len(*v))
                .sum::<usize>();
        let out = &mut self.buf;
        out.reserve(body_len + 5);
        put_varint(out, body_len as i32);
        out.push(0); // record attributes
        put_varlong(out, ts_delta);
        put_varint(out, offset_delta);
        put_nullable(out, key);
        put_nullable(out, value);
        put_varint(out, headers.len() as i32);
        for (k, v) in headers {
            put_nullable(out, Some(k));
            put_nullable(out, *v);
        }
        self.count += 1;
    }

    /// Finishes the header and CRC and returns the batch.
    ///
    /// # Panics
    /// If no record was appended: an empty batch is not a valid v2 batch.
    pub fn build(self) -> Bytes {
        assert!(self.count > 0, "a v2 batch needs at least one record");
        let mut b = self.buf;
        let total = b.len();
        let mut attributes: i16 = 0;
        if self.opts.transactional {
            attributes |= ATTR_TRANSACTIONAL;
        }
        b[OFF_BASE_OFFSET..OFF_BASE_OFFSET + 8].copy_from_slice(&0u64.to_be_bytes());
        b[OFF_BATCH_LENGTH..OFF_BATCH_LENGTH + 4]
            .copy_from_slice(&((total - LOG_OVERHEAD) as u32).to_be_bytes());
        b[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4]
            .copy_from_slice(&self.opts.partition_leader_epoch.to_be_bytes());
        b[OFF_MAGIC] = MAGIC_V2;
        b[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
        b[OFF_LAST_OFFSET_DELTA..OFF_LAST_OFFSET_DELTA + 4]
            .copy_from_slice(&(self.count as i32 - 1).to_be_bytes());
        b[OFF_BASE_TIMESTAMP..OFF_BASE_TIMESTAMP + 8]
            .copy_from_slice(&self.base_timestamp.to_be_bytes());
        b[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8]
            .copy_from_slice(&self.max_timestamp.to_be_bytes());
        b[OFF_PRODUCER_ID..OFF_PRODUCER_ID + 8]
            .copy_from_slice(&self.opts.producer_id.to_be_bytes());
        b[OFF_PRODUCER_EPOCH..OFF_PRODUCER_EPOCH + 2]
            .copy_from_slice(&self.opts.producer_epoch.to_be_bytes());
        b[OFF_BASE_SEQUENCE..OFF_BASE_SEQUENCE + 4]
            .copy_from_slice(&self.opts.base_sequence.to_be_bytes());
        b[OFF_RECORDS_COUNT..OFF_RECORDS_COUNT + 4]
            .copy_from_slice(&(self.count as i32).to_be_bytes());
        let crc = crc32c::crc32c(&b[OFF_ATTRIBUTES..]);
        b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(b)
    }
}

fn nullable_len(v: Option<&[u8]>) -> usize {
    match v {
        None => varint_len(-1),
        Some(b) => varint_len(b.len() as i32) + b.len(),
    }
}

fn put_nullable(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, b.len() as i32);
            out.extend_from_slice(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Rec = (
        i64,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Vec<(Vec<u8>, Option<Vec<u8>>)>,
    );

    fn record_strategy() -> impl Strategy<Value = Rec> {
        (
            -1_000_000i64..4_000_000_000_000,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
            proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 0..10),
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..10)),
                ),
                0..3,
            ),
        )
    }

    proptest! {
        #[test]
        fn build_then_decode_round_trips(recs in proptest::collection::vec(record_strategy(), 1..20),
                                         pid in -1i64..1000, seq in -1i32..1000) {
            let opts = BatchOptions { producer_id: pid, producer_epoch: 3, base_sequence: seq, ..Default::default() };
            let mut b = BatchBuilder::new(opts);
            for (ts, k, v, hs) in &recs {
                let hs: Vec<(&[u8], Option<&[u8]>)> = hs.iter().map(|(k, v)| (k.as_slice(), v.as_deref())).collect();
                b.append(*ts, k.as_deref(), v.as_deref(), &hs);
            }
            let size = b.size_bytes();
            let bytes = b.build();
            prop_assert_eq!(bytes.len(), size);
            let batch = RecordBatch::parse(&bytes).unwrap();
            let h = *batch.header();
            prop_assert_eq!(h.records_count as usize, recs.len());
            prop_assert_eq!(h.producer_id, pid);
            prop_assert_eq!(h.base_sequence, seq);
            prop_assert_eq!(h.max_timestamp, recs.iter().map(|r| r.0).max().unwrap());
            let decoded: Vec<Record> = batch.records().unwrap().collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(decoded.len(), recs.len());
            for (i, (r, (ts, k, v, hs))) in decoded.iter().zip(&recs).enumerate() {
                prop_assert_eq!(r.offset, i as u64);
                prop_assert_eq!(r.timestamp, *ts);
                prop_assert_eq!(r.key.as_deref(), k.as_deref());
                prop_assert_eq!(r.value.as_deref(), v.as_deref());
                prop_assert_eq!(r.headers.len(), hs.len());
                for (dh, (hk, hv)) in r.headers.iter().zip(hs) {
                    prop_assert_eq!(&dh.key[..], &hk[..]);
                    prop_assert_eq!(dh.value.as_deref(), hv.as_deref());
                }
            }
        }
    }

    #[test]
    fn compressed_batches_validate_but_do_not_decode() {
        let mut b = BatchBuilder::new(BatchOptions::default());
        b.append(5, None, Some(b"x"), &[]);
        let mut raw = b.build().to_vec();
        raw[OFF_ATTRIBUTES + 1] |= 1; // gzip
        let crc = crc32c::crc32c(&raw[OFF_ATTRIBUTES..]);
        raw[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        let batch = RecordBatch::parse(&Bytes::from(raw)).unwrap();
        assert_eq!(
            batch.records().unwrap_err(),
            BatchError::UnsupportedCompression(1)
        );
    }
}
