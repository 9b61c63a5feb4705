//! Fuzzes `ingest::fuzz::api_key_file`; the corpus in `fuzz/corpus/api_key_file` is replayed by the test suite.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingest::fuzz::api_key_file(data));
