//! Zero-copy decoding of a validated batch and its records.

use bytes::Bytes;

use super::varint::{get_varint, get_varlong};
use super::{BatchError, BatchHeader, HEADER_LEN, validate};

/// A validated v2 batch backed by a shared buffer; records borrow from it without copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordBatch {
    header: BatchHeader,
    bytes: Bytes,
}

impl RecordBatch {
    /// Validates the batch at the start of `buf` and keeps exactly its bytes.
    pub fn parse(buf: &Bytes) -> Result<Self, BatchError> {
        let header = validate(buf)?;
        Ok(Self {
            header,
            bytes: buf.slice(..header.total_len()),
        })
    }

    /// The decoded fixed header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch's bytes, header included.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Iterates the records; fails on compressed batches.
    pub fn records(&self) -> Result<Records, BatchError> {
        let codec = self.header.compression();
        if codec != 0 {
            return Err(BatchError::UnsupportedCompression(codec));
        }
        Ok(Records {
            batch: self.clone(),
            pos: HEADER_LEN,
            left: self.header.records_count,
        })
    }

    /// Splits a buffer of back-to-back batches, validating each.
    pub fn split_all(buf: &Bytes) -> Result<Vec<RecordBatch>, BatchError> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let batch = RecordBatch::parse(&buf.slice(pos..))?;
            pos += batch.bytes.len();
            out.push(batch);
        }
        Ok(out)
    }
}

/// One record header: a key (UTF-8 by Kafka's contract, kept as bytes) and an optional value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header key.
    pub key: Bytes,
    /// Header value; `None` for a null value.
    pub value: Option<Bytes>,
}

/// One decoded record; key, value and headers are slices of the batch buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Absolute offset (`baseOffset + offsetDelta`).
    pub offset: u64,
    /// Absolute timestamp (`baseTimestamp + timestampDelta`), ms.
    pub timestamp: i64,
    /// Record key; `None` for a null key.
    pub key: Option<Bytes>,
    /// Record value; `None` for a null value (a tombstone).
    pub value: Option<Bytes>,
    /// Record headers in order.
    pub headers: Vec<Header>,
}

/// Iterator over the records of a [`RecordBatch`].
#[derive(Debug)]
pub struct Records {
    batch: RecordBatch,
    pos: usize,
    left: u32,
}

impl Records {
    fn next_record(&mut self) -> Result<Record, BatchError> {
        let buf = &self.batch.bytes[..];
        let mut pos = self.pos;
        let len = get_varint(buf, &mut pos)?;
        if len < 0 {
            return Err(BatchError::Malformed("negative record length"));
        }
        let end = pos
            .checked_add(len as usize)
            .filter(|&e| e <= buf.len())
            .ok_or(BatchError::Malformed("record length runs past the batch"))?;
        let body = &buf[..end];
        pos += 1; // record attributes, unused in v2
        if pos > end {
            return Err(BatchError::Malformed("record shorter than its attributes"));
        }
        let ts_delta = get_varlong(body, &mut pos)?;
        let offset_delta = get_varint(body, &mut pos)?;
        if offset_delta < 0 || offset_delta as u32 > self.batch.header.last_offset_delta {
            return Err(BatchError::Malformed("offsetDelta outside the batch"));
        }
        let key = self.nullable(body, &mut pos)?;
        let value = self.nullable(body, &mut pos)?;
        let count = get_varint(body, &mut pos)?;
        if count < 0 {
            return Err(BatchError::Malformed("negative header count"));
        }
        // Each header takes at least two bytes, so this bounds the allocation by the input.
        let mut headers = Vec::with_capacity((count as usize).min((end - pos) / 2));
        for _ in 0..count {
            let key = self
                .nullable(body, &mut pos)?
                .ok_or(BatchError::Malformed("null header key"))?;
            let value = self.nullable(body, &mut pos)?;
            headers.push(Header { key, value });
        }
        if pos != end {
            return Err(BatchError::Malformed(
                "record length disagrees with its fields",
            ));
        }
        self.pos = end;
        let h = &self.batch.header;
        Ok(Record {
            offset: h.base_offset + offset_delta as u64,
            timestamp: h.base_timestamp.wrapping_add(ts_delta),
            key,
            value,
            headers,
        })
    }

    fn nullable(&self, body: &[u8], pos: &mut usize) -> Result<Option<Bytes>, BatchError> {
        let len = get_varint(body, pos)?;
        if len == -1 {
            return Ok(None);
        }
        if len < -1 {
            return Err(BatchError::Malformed("length below -1"));
        }
        let start = *pos;
        let end = start
            .checked_add(len as usize)
            .filter(|&e| e <= body.len())
            .ok_or(BatchError::Malformed("field runs past the record"))?;
        *pos = end;
        Ok(Some(self.batch.bytes.slice(start..end)))
    }
}

impl Iterator for Records {
    type Item = Result<Record, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            if self.pos != self.batch.bytes.len() {
                self.pos = self.batch.bytes.len();
                return Some(Err(BatchError::Malformed(
                    "bytes left after the last record",
                )));
            }
            return None;
        }
        self.left -= 1;
        let r = self.next_record();
        if r.is_err() {
            // Stop after the first error: positions past it mean nothing.
            self.left = 0;
            self.pos = self.batch.bytes.len();
        }
        Some(r)
    }
}
