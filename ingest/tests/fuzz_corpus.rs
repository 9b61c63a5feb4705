//! Replays the fuzz corpus (`fuzz/corpus/TARGET/*`, grown and minimized by `fuzz/run
//! --grow`) through the same entry points the fuzz targets call, so that every input the
//! fuzzer ever kept, including each one that once found a bug, runs in the normal suite.

use std::path::PathBuf;

fn replay(target: &str, entry: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no inputs", dir.display());
    for input in &inputs {
        let data = std::fs::read(input).expect("a corpus input");
        let outcome = std::panic::catch_unwind(|| entry(&data));
        assert!(outcome.is_ok(), "{target} panics on {}", input.display());
    }
}

#[test]
fn batch_bodies() {
    replay("batch_body", ingest::fuzz::batch_body);
}

#[test]
fn delivery_requests() {
    replay("delivery_request", ingest::fuzz::delivery_request);
}

#[test]
fn position_fixes() {
    replay("position_fix", ingest::fuzz::position_fix);
}

#[test]
fn reschedules() {
    replay("reschedule", ingest::fuzz::reschedule);
}

#[test]
fn api_key_files() {
    replay("api_key_file", ingest::fuzz::api_key_file);
}
