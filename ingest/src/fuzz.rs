//! The entry points of the fuzz targets in `fuzz/` (cargo fuzz, libFuzzer) and of the
//! replay of their corpus in the test suite (`ingest/tests/fuzz_corpus.rs`): each takes
//! arbitrary bytes, runs one parser of untrusted input the way the tier runs it, and
//! checks what must hold of its answer. None of them may panic, hang or allocate past the
//! bound it is given; an `Err` is a fine answer, a panic is a finding.
//!
//! Pure: no I/O, no clock beyond what the parsers read. It must not loosen a bound to
//! make a target pass: the bounds here are the tier's defaults.

use std::io::Write;

use bytes::Bytes;

use crate::batch::{self, Encoding, Framing};
use crate::keyfile;
use crate::tenants::{Limits, Origin, Tenants};

/// The decoded-size bound a batch is fuzzed with (the tier's default is 16 MiB; a smaller
/// one reaches the refusal path sooner and keeps each run fast).
const DECODED_LIMIT: usize = 1024 * 1024;
/// The most records a batch is fuzzed with.
const MAX_RECORDS: usize = 1_000;
/// The tier's default `--max-record-bytes`.
const MAX_RECORD_BYTES: usize = 64 * 1024;

/// A batch body: the first byte picks the encoding, the framing and whether the rest is
/// taken as already compressed (fuzzing the decoders' handling of corrupt streams) or
/// compressed here first (so that the splitter sees what a client's compressed batch
/// holds). Then it is decoded within its bound, split, and every record checked for size
/// and parsed as a delivery request and as a position fix, as the two batch routes do.
pub fn batch_body(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let encoding = match mode & 0b11 {
        0 | 3 => Encoding::Identity,
        1 => Encoding::Gzip,
        _ => Encoding::Zstd,
    };
    let framing = match (mode >> 2) & 0b11 {
        0 | 3 => None,
        1 => Some(Framing::JsonArray),
        _ => Some(Framing::Ndjson),
    };
    let precompressed = mode & 0b1_0000 != 0;
    let wire = if precompressed || encoding == Encoding::Identity {
        Bytes::copy_from_slice(body)
    } else {
        Bytes::from(compress(body, encoding))
    };
    let decoded = match batch::decode(wire, encoding, DECODED_LIMIT) {
        Ok(decoded) => decoded,
        Err(_) => {
            assert!(
                precompressed || body.len() > DECODED_LIMIT,
                "a body compressed whole and within the limit decodes"
            );
            return;
        }
    };
    // (An identity body is bounded by its read, not by decoding.)
    if encoding != Encoding::Identity {
        assert!(
            decoded.len() <= DECODED_LIMIT,
            "decoding stays within its limit"
        );
    }
    if !precompressed {
        assert_eq!(
            &decoded[..],
            body,
            "decoding gives back what was compressed"
        );
    }
    let Ok(records) = batch::split(&decoded, framing, MAX_RECORDS) else {
        return;
    };
    assert!(
        records.len() <= MAX_RECORDS,
        "a batch holds at most its limit"
    );
    let start = decoded.as_ptr() as usize;
    for record in records {
        let at = record.as_ptr() as usize;
        assert!(
            at >= start && at + record.len() <= start + decoded.len(),
            "a record is a slice of the body, not a copy"
        );
        if batch::check_record_size(record, MAX_RECORD_BYTES).is_ok() {
            delivery_request(record);
            position_fix(record);
        }
    }
}

fn compress(body: &[u8], encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Identity => body.to_vec(),
        Encoding::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder
                .write_all(body)
                .and_then(|()| encoder.finish())
                .unwrap_or_default()
        }
        Encoding::Zstd => zstd::bulk::compress(body, 1).unwrap_or_default(),
    }
}

/// One delivery request (`POST /api/deliveryrequests`, each record of a batch). A valid
/// one keeps its id within the key rules and yields a key that splits back into tenant
/// and id.
pub fn delivery_request(data: &[u8]) {
    let Ok(request) = schemas::parse_delivery_request(data) else {
        return;
    };
    assert!(
        request.deadline > request.pickup_time,
        "a deadline is after pickup"
    );
    if let Some(id) = request.delivery_id.as_deref() {
        assert!(schemas::delivery::check_delivery_id(id).is_ok());
        let key = schemas::delivery_key("fuzz", id);
        assert_eq!(schemas::split_delivery_key(&key), (Some("fuzz"), id));
    }
    schemas::delivery::region_of(request.pickup_location);
    schemas::delivery::region_of(request.drop_off_location);
}

/// One drone position fix (`POST /api/telemetry`, each record of a batch).
pub fn position_fix(data: &[u8]) {
    let _ = schemas::telemetry::parse_position_fix(data);
}

/// A reschedule (the body of `PATCH /api/deliveryrequests/{id}`): a valid one changes
/// something.
pub fn reschedule(data: &[u8]) {
    if let Ok(change) = schemas::parse_reschedule(data) {
        assert!(change.pickup_time.is_some() || change.deadline.is_some());
    }
}

/// An API key file (`--api-keys`), within the size the tier reads: every key of a file
/// that parses authenticates as its own tenant, and the input taken whole as an
/// `Authorization` header value is answered, whatever it holds.
pub fn api_key_file(data: &[u8]) {
    if data.len() as u64 > keyfile::MAX_KEY_FILE_BYTES {
        return;
    }
    let text = String::from_utf8_lossy(data);
    let limits = Limits {
        telemetry_tenants: vec!["fleet".to_owned()],
        ..Limits::default()
    };
    let origin = Origin {
        peer: std::net::SocketAddr::from(([192, 0, 2, 1], 443)),
        forwarded: false,
    };
    let Ok(lines) = keyfile::parse_api_keys(&text) else {
        return;
    };
    let tenants = Tenants::from_lines(&lines, &limits);
    for line in &lines {
        assert!(schemas::delivery::check_tenant(line.tenant).is_ok());
        let header = format!("Bearer {}", line.key);
        let tenant = tenants
            .authenticate(Some(header.as_bytes()), origin)
            .map(|t| t.name.clone());
        assert_eq!(
            tenant.as_deref().ok(),
            Some(line.tenant),
            "a listed key authenticates"
        );
    }
    let _ = tenants.authenticate(Some(data), origin);
}
