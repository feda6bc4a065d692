//! Fuzz target: `runnel_storage::fuzzing::batch_decoder`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| runnel_storage::fuzzing::batch_decoder(data));
