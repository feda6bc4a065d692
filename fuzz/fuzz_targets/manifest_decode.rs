//! Fuzz target: `runnel_storage::fuzzing::manifest_decode`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| runnel_storage::fuzzing::manifest_decode(data));
