//! Fuzzes `ingest::fuzz::reschedule`; the corpus in `fuzz/corpus/reschedule` is replayed by the test suite.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ingest::fuzz::reschedule(data));
