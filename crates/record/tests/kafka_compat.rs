//! Byte compatibility with Kafka's RecordBatch v2, proven against batches written by kafka-python
//! (`tests/fixtures/kafka/gen_fixtures.py`), an implementation nobody here wrote.

use std::path::PathBuf;

use bytes::Bytes;
use runnel_record::{BatchBuilder, BatchOptions, RecordBatch};
use serde_json::Value;

fn fixtures() -> Vec<(String, Bytes, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kafka");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "bin") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let bin = Bytes::from(std::fs::read(&path).unwrap());
            let json: Value =
                serde_json::from_slice(&std::fs::read(path.with_extension("json")).unwrap())
                    .unwrap();
            out.push((name, bin, json));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 7, "fixtures missing: found {}", out.len());
    out
}

fn hex(v: &Value) -> Option<Vec<u8>> {
    v.as_str().map(|s| {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    })
}

#[test]
fn decodes_every_kafka_python_batch_exactly() {
    for (name, bin, json) in fixtures() {
        let batch = RecordBatch::parse(&bin).unwrap_or_else(|e| panic!("{name}: {e}"));
        let h = batch.header();
        assert_eq!(h.total_len(), bin.len(), "{name}");
        assert_eq!(
            h.producer_id,
            json["producer_id"].as_i64().unwrap(),
            "{name}"
        );
        assert_eq!(
            h.producer_epoch as i64,
            json["producer_epoch"].as_i64().unwrap(),
            "{name}"
        );
        assert_eq!(
            h.base_sequence as i64,
            json["base_sequence"].as_i64().unwrap(),
            "{name}"
        );
        assert_eq!(
            h.compression() as i64,
            json["compression"].as_i64().unwrap(),
            "{name}"
        );
        assert_eq!(
            h.attributes & 0x10 != 0,
            json["transactional"].as_bool().unwrap(),
            "{name}"
        );
        let want = json["records"].as_array().unwrap();
        assert_eq!(h.records_count as usize, want.len(), "{name}");
        let max_ts = want
            .iter()
            .map(|r| r["timestamp"].as_i64().unwrap())
            .max()
            .unwrap();
        assert_eq!(h.max_timestamp, max_ts, "{name}");
        if h.compression() != 0 {
            // Compressed batches pass through the log untouched; Runnel does not decode them.
            assert!(batch.records().is_err(), "{name}");
            continue;
        }
        let got: Vec<_> = batch.records().unwrap().collect::<Result<_, _>>().unwrap();
        for (i, (r, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(r.offset, i as u64, "{name}[{i}]");
            assert_eq!(r.timestamp, w["timestamp"].as_i64().unwrap(), "{name}[{i}]");
            assert_eq!(
                r.key.as_deref().map(<[u8]>::to_vec),
                hex(&w["key"]),
                "{name}[{i}] key"
            );
            assert_eq!(
                r.value.as_deref().map(<[u8]>::to_vec),
                hex(&w["value"]),
                "{name}[{i}] value"
            );
            let hs = w["headers"].as_array().unwrap();
            assert_eq!(r.headers.len(), hs.len(), "{name}[{i}]");
            for (hd, hw) in r.headers.iter().zip(hs) {
                assert_eq!(
                    &hd.key[..],
                    hw[0].as_str().unwrap().as_bytes(),
                    "{name}[{i}]"
                );
                assert_eq!(
                    hd.value.as_deref().map(<[u8]>::to_vec),
                    hex(&hw[1]),
                    "{name}[{i}]"
                );
            }
        }
    }
}

#[test]
fn encodes_the_same_records_to_identical_bytes() {
    for (name, bin, json) in fixtures() {
        if json["compression"].as_i64().unwrap() != 0 {
            continue;
        }
        let opts = BatchOptions {
            producer_id: json["producer_id"].as_i64().unwrap(),
            producer_epoch: json["producer_epoch"].as_i64().unwrap() as i16,
            base_sequence: json["base_sequence"].as_i64().unwrap() as i32,
            transactional: json["transactional"].as_bool().unwrap(),
            partition_leader_epoch: 0, // what kafka-python writes
        };
        let mut b = BatchBuilder::new(opts);
        for r in json["records"].as_array().unwrap() {
            let headers: Vec<(Vec<u8>, Option<Vec<u8>>)> = r["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| (h[0].as_str().unwrap().as_bytes().to_vec(), hex(&h[1])))
                .collect();
            let hrefs: Vec<(&[u8], Option<&[u8]>)> = headers
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_deref()))
                .collect();
            let (k, v) = (hex(&r["key"]), hex(&r["value"]));
            b.append(
                r["timestamp"].as_i64().unwrap(),
                k.as_deref(),
                v.as_deref(),
                &hrefs,
            );
        }
        let ours = b.build();
        assert_eq!(ours.len(), bin.len(), "{name}: length");
        if let Some(i) = ours.iter().zip(bin.iter()).position(|(a, b)| a != b) {
            panic!("{name}: first differing byte at {i}");
        }
    }
}
