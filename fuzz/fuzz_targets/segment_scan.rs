//! Fuzz target: `runnel_storage::fuzzing::segment_scan`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| runnel_storage::fuzzing::segment_scan(data));
