//! Fuzzes `ingest::fuzz::delivery_request`; the corpus in `fuzz/corpus/delivery_request` is replayed by the test suite.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingest::fuzz::delivery_request(data));
