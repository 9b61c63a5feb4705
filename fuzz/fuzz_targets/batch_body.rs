//! Fuzzes `ingest::fuzz::batch_body`; the corpus in `fuzz/corpus/batch_body` is replayed by the test suite.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingest::fuzz::batch_body(data));
