//! Fuzzes `ingest::fuzz::position_fix`; the corpus in `fuzz/corpus/position_fix` is replayed by the test suite.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingest::fuzz::position_fix(data));
