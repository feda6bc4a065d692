//! Kafka RecordBatch v2, byte for byte.
//!
//! ```text
//! offset  size  field                 in CRC
//!      0     8  baseOffset            no   (stamped by the log at append)
//!      8     4  batchLength           no   (bytes after this field)
//!     12     4  partitionLeaderEpoch  no   (stamped by the log at append)
//!     16     1  magic (= 2)           no
//!     17     4  crc (CRC-32C)         no
//!     21     2  attributes            yes  (bits 0-2 compression, 3 timestamp type,
//!     23     4  lastOffsetDelta       yes   4 transactional, 5 control)
//!     27     8  baseTimestamp         yes
//!     35     8  maxTimestamp          yes
//!     43     8  producerId            yes
//!     51     2  producerEpoch         yes
//!     53     4  baseSequence          yes
//!     57     4  recordsCount          yes
//!     61     …  records               yes
//! ```
//! All integers are big-endian. Each record is
//! `length varint, attributes i8, timestampDelta varlong, offsetDelta varint,
//! keyLength varint, key, valueLength varint, value, headerCount varint,
//! [headerKeyLength varint, headerKey, headerValueLength varint, headerValue]*`,
//! with `-1` as the length of a null key or value.
//!
//! [`validate`] checks a batch's structure and CRC without touching its records,
//! [`RecordBatch`] decodes records zero-copy from a [`bytes::Bytes`], and
//! [`BatchBuilder`] writes the same bytes a Kafka client writes.

mod builder;
mod record;
pub mod varint;

pub use builder::{BatchBuilder, BatchOptions};
pub use record::{Header, Record, RecordBatch, Records};

/// Bytes before `batchLength` counts: `baseOffset` and `batchLength` itself.
pub const LOG_OVERHEAD: usize = 12;
/// Size of the fixed v2 batch header.
pub const HEADER_LEN: usize = 61;
/// The only magic byte Runnel reads and writes.
pub const MAGIC_V2: u8 = 2;
/// Largest batch (whole, header included) the codec accepts: Kafka's default `message.max.bytes` is
/// about 1 MiB; we allow more for large pre-encoded batches but bound it so a corrupt length can
/// never ask for a huge allocation or scan.
pub const BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Smallest legal `batchLength`: the header after `batchLength`.
pub const BATCH_LENGTH_MIN: usize = HEADER_LEN - LOG_OVERHEAD;

pub(crate) const OFF_BASE_OFFSET: usize = 0;
pub(crate) const OFF_BATCH_LENGTH: usize = 8;
pub(crate) const OFF_LEADER_EPOCH: usize = 12;
pub(crate) const OFF_MAGIC: usize = 16;
pub(crate) const OFF_CRC: usize = 17;
pub(crate) const OFF_ATTRIBUTES: usize = 21;
pub(crate) const OFF_LAST_OFFSET_DELTA: usize = 23;
pub(crate) const OFF_BASE_TIMESTAMP: usize = 27;
pub(crate) const OFF_MAX_TIMESTAMP: usize = 35;
pub(crate) const OFF_PRODUCER_ID: usize = 43;
pub(crate) const OFF_PRODUCER_EPOCH: usize = 51;
pub(crate) const OFF_BASE_SEQUENCE: usize = 53;
pub(crate) const OFF_RECORDS_COUNT: usize = 57;

/// Attribute bits naming the compression codec (0 = none).
pub const ATTR_COMPRESSION_MASK: i16 = 0x07;
/// Attribute bit: timestamps are log-append time rather than create time.
pub const ATTR_LOG_APPEND_TIME: i16 = 0x08;
/// Attribute bit: the batch belongs to a transaction.
pub const ATTR_TRANSACTIONAL: i16 = 0x10;
/// Attribute bit: the batch is a control batch (transaction markers).
pub const ATTR_CONTROL: i16 = 0x20;

/// Why bytes are not a valid v2 batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The buffer ends before the batch does; at a log's tail this is a torn write.
    #[error("incomplete batch: need {needed} bytes, have {available}")]
    Incomplete {
        /// Bytes the header says the batch occupies (or the header size).
        needed: usize,
        /// Bytes actually available.
        available: usize,
    },
    /// The stored CRC does not match the bytes.
    #[error("CRC-32C mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// CRC found in the header.
        stored: u32,
        /// CRC of attributes..end.
        computed: u32,
    },
    /// A header field is outside its legal range.
    #[error("invalid batch header: {0}")]
    InvalidHeader(&'static str),
    /// A record inside an otherwise valid batch does not parse.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
    /// The batch is compressed with a codec Runnel does not decode.
    #[error("compression codec {0} is not supported")]
    UnsupportedCompression(i16),
}

/// The fixed header of a v2 batch, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Bytes after the `batchLength` field.
    pub batch_length: u32,
    /// Leader epoch stamped at append.
    pub partition_leader_epoch: i32,
    /// CRC-32C over attributes..end.
    pub crc: u32,
    /// Attribute bits (compression, timestamp type, transactional, control).
    pub attributes: i16,
    /// Offset of the last record minus `base_offset`.
    pub last_offset_delta: u32,
    /// Timestamp of the first record (ms).
    pub base_timestamp: i64,
    /// Largest record timestamp in the batch (ms).
    pub max_timestamp: i64,
    /// Idempotent producer id, or -1.
    pub producer_id: i64,
    /// Producer epoch, or -1.
    pub producer_epoch: i16,
    /// Sequence number of the first record, or -1.
    pub base_sequence: i32,
    /// Number of records.
    pub records_count: u32,
}

impl BatchHeader {
    /// Whole size of the batch in bytes, header included.
    pub fn total_len(&self) -> usize {
        self.batch_length as usize + LOG_OVERHEAD
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.base_offset + self.last_offset_delta as u64
    }

    /// Offset right after the last record.
    pub fn next_offset(&self) -> u64 {
        self.last_offset() + 1
    }

    /// Compression codec id from the attributes (0 = none).
    pub fn compression(&self) -> i16 {
        self.attributes & ATTR_COMPRESSION_MASK
    }
}

pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// Reads the total length a batch at the start of `buf` claims, checked against the limits.
///
/// Needs only the first 12 bytes, so a scanner can tell a torn tail (claims more than is there)
/// from a bad length.
pub fn peek_total_len(buf: &[u8]) -> Result<usize, BatchError> {
    if buf.len() < LOG_OVERHEAD {
        return Err(BatchError::Incomplete {
            needed: LOG_OVERHEAD,
            available: buf.len(),
        });
    }
    let batch_length = be_u32(buf, OFF_BATCH_LENGTH) as usize;
    if batch_length < BATCH_LENGTH_MIN {
        return Err(BatchError::InvalidHeader(
            "batchLength smaller than the v2 header",
        ));
    }
    let total = batch_length + LOG_OVERHEAD;
    if total > BATCH_BYTES_MAX {
        return Err(BatchError::InvalidHeader(
            "batchLength above BATCH_BYTES_MAX",
        ));
    }
    Ok(total)
}

/// Parses the header of the batch at the start of `buf` without checking its CRC.
pub fn parse_header(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let total = peek_total_len(buf)?;
    if buf.len() < HEADER_LEN {
        return Err(BatchError::Incomplete {
            needed: HEADER_LEN.max(total),
            available: buf.len(),
        });
    }
    if buf[OFF_MAGIC] != MAGIC_V2 {
        return Err(BatchError::InvalidHeader("magic is not 2"));
    }
    let last_offset_delta = be_u32(buf, OFF_LAST_OFFSET_DELTA) as i32;
    let records_count = be_u32(buf, OFF_RECORDS_COUNT) as i32;
    if last_offset_delta < 0 {
        return Err(BatchError::InvalidHeader("negative lastOffsetDelta"));
    }
    if records_count <= 0 {
        return Err(BatchError::InvalidHeader("recordsCount is not positive"));
    }
    if last_offset_delta as i64 + 1 != records_count as i64 {
        return Err(BatchError::InvalidHeader(
            "lastOffsetDelta + 1 != recordsCount",
        ));
    }
    // Every record takes at least 7 bytes (length, attributes, 4 varints, header count).
    if (records_count as usize).saturating_mul(7) > total - HEADER_LEN {
        return Err(BatchError::InvalidHeader(
            "recordsCount larger than the batch can hold",
        ));
    }
    let base_offset = be_u64(buf, OFF_BASE_OFFSET) as i64;
    if base_offset < 0 {
        return Err(BatchError::InvalidHeader("negative baseOffset"));
    }
    Ok(BatchHeader {
        base_offset: base_offset as u64,
        batch_length: (total - LOG_OVERHEAD) as u32,
        partition_leader_epoch: be_u32(buf, OFF_LEADER_EPOCH) as i32,
        crc: be_u32(buf, OFF_CRC),
        attributes: be_i16(buf, OFF_ATTRIBUTES),
        last_offset_delta: last_offset_delta as u32,
        base_timestamp: be_u64(buf, OFF_BASE_TIMESTAMP) as i64,
        max_timestamp: be_u64(buf, OFF_MAX_TIMESTAMP) as i64,
        producer_id: be_u64(buf, OFF_PRODUCER_ID) as i64,
        producer_epoch: be_i16(buf, OFF_PRODUCER_EPOCH),
        base_sequence: be_u32(buf, OFF_BASE_SEQUENCE) as i32,
        records_count: records_count as u32,
    })
}

/// Validates the batch at the start of `buf`: lengths in bounds, magic, header relations and CRC.
///
/// Bytes after the batch are ignored. Records are not decoded (see [`RecordBatch::records`]).
pub fn validate(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = parse_header(buf)?;
    let total = header.total_len();
    if buf.len() < total {
        return Err(BatchError::Incomplete {
            needed: total,
            available: buf.len(),
        });
    }
    let computed = crc32c::crc32c(&buf[OFF_ATTRIBUTES..total]);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    Ok(header)
}

/// Writes `base_offset` into a batch; the field lies outside the CRC.
pub fn set_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[OFF_BASE_OFFSET..OFF_BASE_OFFSET + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Writes `partitionLeaderEpoch` into a batch; the field lies outside the CRC.
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4].copy_from_slice(&epoch.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_batch() -> Vec<u8> {
        let mut b = BatchBuilder::new(BatchOptions::default());
        b.append(1_000, Some(b"k"), Some(b"v"), &[]);
        b.build().to_vec()
    }

    #[test]
    fn all_zero_region_is_never_a_batch() {
        for len in [0, 12, 61, 100, 4096] {
            assert!(
                validate(&vec![0u8; len]).is_err(),
                "{len} zero bytes parsed as a batch"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let good = one_batch();
        validate(&good).unwrap();
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                // baseOffset and partitionLeaderEpoch lie outside the CRC by design.
                let outside_crc = byte < OFF_BATCH_LENGTH
                    || (OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4).contains(&byte);
                let res = validate(&bad);
                if outside_crc {
                    if byte < OFF_BATCH_LENGTH && bit == 7 && byte == 0 {
                        assert!(res.is_err(), "negative base offset accepted");
                    }
                } else {
                    assert!(
                        res.is_err(),
                        "flip of bit {bit} in byte {byte} went unnoticed"
                    );
                }
            }
        }
    }

    #[test]
    fn truncation_is_incomplete_not_invalid() {
        let good = one_batch();
        for cut in LOG_OVERHEAD..good.len() {
            match validate(&good[..cut]) {
                Err(BatchError::Incomplete { needed, .. }) => assert_eq!(needed, good.len()),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn stamping_keeps_crc_valid() {
        let mut b = one_batch();
        set_base_offset(&mut b, 42);
        set_partition_leader_epoch(&mut b, 7);
        let h = validate(&b).unwrap();
        assert_eq!(h.base_offset, 42);
        assert_eq!(h.partition_leader_epoch, 7);
        assert_eq!(h.next_offset(), 43);
    }
}
