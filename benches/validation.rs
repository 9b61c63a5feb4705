//! Micro-benchmark of the edge's per-record work: parsing and validating one delivery
//! request in place (the ingestion tier does this for every record it accepts).
//!
//! `cargo bench --bench validation`

#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const REQUEST: &[u8] = schemas::delivery::EXAMPLE_REQUEST.as_bytes();

fn validation(c: &mut Criterion) {
    let mut group = c.benchmark_group("validation");
    group.throughput(Throughput::Bytes(REQUEST.len() as u64));
    group.bench_function("parse_delivery_request", |b| {
        b.iter(|| schemas::parse_delivery_request(black_box(REQUEST)).unwrap());
    });
    let invalid = br#"{"ownerId":"fabrikam","pickupLocation":"95,0"}"#;
    group.bench_function("reject_invalid", |b| {
        b.iter(|| schemas::parse_delivery_request(black_box(invalid)).unwrap_err());
    });
    group.finish();
}

criterion_group!(benches, validation);
criterion_main!(benches);
