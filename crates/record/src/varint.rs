//! Kafka's zig-zag varints (protobuf base-128 over zig-zag encoded signed integers).
//!
//! `varint` carries an `i32` in at most 5 bytes, `varlong` an `i64` in at most 10.

use super::BatchError;

/// Most bytes a varint (`i32`) may take on the wire.
pub const VARINT_BYTES_MAX: usize = 5;
/// Most bytes a varlong (`i64`) may take on the wire.
pub const VARLONG_BYTES_MAX: usize = 10;

/// Appends `v` as a zig-zag varint.
pub fn put_varint(out: &mut Vec<u8>, v: i32) {
    put_unsigned(out, ((v << 1) ^ (v >> 31)) as u32 as u64);
}

/// Appends `v` as a zig-zag varlong.
pub fn put_varlong(out: &mut Vec<u8>, v: i64) {
    put_unsigned(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// How many bytes `put_varint(v)` writes.
pub fn varint_len(v: i32) -> usize {
    unsigned_len(((v << 1) ^ (v >> 31)) as u32 as u64)
}

/// How many bytes `put_varlong(v)` writes.
pub fn varlong_len(v: i64) -> usize {
    unsigned_len(((v << 1) ^ (v >> 63)) as u64)
}

fn put_unsigned(out: &mut Vec<u8>, mut u: u64) {
    while u >= 0x80 {
        out.push((u as u8) | 0x80);
        u >>= 7;
    }
    out.push(u as u8);
}

fn unsigned_len(u: u64) -> usize {
    let bits = 64 - u.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// Reads a zig-zag varint from `buf[*pos..]`, advancing `pos`.
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<i32, BatchError> {
    let mut p = *pos;
    let u = get_unsigned(buf, &mut p, VARINT_BYTES_MAX)?;
    if u > u32::MAX as u64 {
        return Err(BatchError::Malformed("varint overflows 32 bits"));
    }
    *pos = p;
    let u = u as u32;
    Ok(((u >> 1) as i32) ^ -((u & 1) as i32))
}

/// Reads a zig-zag varlong from `buf[*pos..]`, advancing `pos`.
pub fn get_varlong(buf: &[u8], pos: &mut usize) -> Result<i64, BatchError> {
    let u = get_unsigned(buf, pos, VARLONG_BYTES_MAX)?;
    Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
}

fn get_unsigned(buf: &[u8], pos: &mut usize, max_bytes: usize) -> Result<u64, BatchError> {
    let mut result: u64 = 0;
    for i in 0..max_bytes {
        let Some(&b) = buf.get(*pos + i) else {
            return Err(BatchError::Malformed(
                "varint runs past the end of the record",
            ));
        };
        let shift = 7 * i as u32;
        // The tenth byte of a varlong may only carry the top bit of 64.
        if shift == 63 && b > 1 {
            return Err(BatchError::Malformed("varlong overflows 64 bits"));
        }
        result |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            *pos += i + 1;
            return Ok(result);
        }
    }
    Err(BatchError::Malformed(
        "varint longer than its maximum width",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings_match_kafka() {
        // Values from Kafka's ByteUtilsTest (zig-zag): 0 -> 00, -1 -> 01, 1 -> 02, -64 -> 7f, 64 -> 80 01.
        for (v, bytes) in [
            (0, vec![0x00]),
            (-1, vec![0x01]),
            (1, vec![0x02]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 0x01]),
            (i32::MAX, vec![0xfe, 0xff, 0xff, 0xff, 0x0f]),
            (i32::MIN, vec![0xff, 0xff, 0xff, 0xff, 0x0f]),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out, bytes, "encoding {v}");
            assert_eq!(varint_len(v), bytes.len());
            let mut pos = 0;
            assert_eq!(get_varint(&out, &mut pos).unwrap(), v);
            assert_eq!(pos, bytes.len());
        }
    }

    #[test]
    fn overlong_and_truncated_are_rejected() {
        let mut pos = 0;
        assert!(get_varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], &mut pos).is_err());
        assert!(get_varint(&[0xff, 0xff, 0xff, 0xff, 0x7f], &mut pos).is_err());
        assert!(get_varint(&[0x80], &mut pos).is_err());
        assert!(get_varlong(&[0xff; 10], &mut pos).is_err());
        assert_eq!(pos, 0, "a failed read must not advance");
    }

    proptest! {
        #[test]
        fn varint_round_trip(v: i32) {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            prop_assert_eq!(out.len(), varint_len(v));
            let mut pos = 0;
            prop_assert_eq!(get_varint(&out, &mut pos).unwrap(), v);
            prop_assert_eq!(pos, out.len());
        }

        #[test]
        fn varlong_round_trip(v: i64) {
            let mut out = Vec::new();
            put_varlong(&mut out, v);
            prop_assert_eq!(out.len(), varlong_len(v));
            let mut pos = 0;
            prop_assert_eq!(get_varlong(&out, &mut pos).unwrap(), v);
            prop_assert_eq!(pos, out.len());
        }
    }
}
