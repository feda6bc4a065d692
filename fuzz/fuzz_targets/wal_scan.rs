//! Fuzz target: `runnel_storage::fuzzing::wal_scan`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| runnel_storage::fuzzing::wal_scan(data));
