#![no_main]
//! Fuzzes the `JobRequest` decoders (envelope and body).
libfuzzer_sys::fuzz_target!(|data: &[u8]| pixmarket_fuzz::check::<pixmarket_protocol::JobRequest>(data));
