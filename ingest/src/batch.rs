//! Batch bodies: how a body is encoded, how it is framed (a JSON array or NDJSON), and
//! how it is cut into records without copying them. Pure: no I/O.
//!
//! Each record is a slice of the (decoded) body: the JSON array is walked with
//! `serde_json`'s `RawValue`, which borrows, and NDJSON is split at newlines. Nothing is
//! re-serialized, so the bytes produced to Kafka are the bytes the client sent.

use std::cell::Cell;
use std::fmt;
use std::io::Read;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::{IngestError, Result};

/// Refuses a record of more than `max` bytes (`--max-record-bytes`), with the reason the
/// batch report gives for it.
pub fn check_record_size(
    record: &[u8],
    max: usize,
) -> std::result::Result<(), schemas::ValidationError> {
    if record.len() > max {
        return Err(schemas::ValidationError {
            field: String::new(),
            reason: format!(
                "the record is {} bytes, more than the {max} allowed (--max-record-bytes)",
                record.len()
            ),
        });
    }
    Ok(())
}

/// How the records of a batch are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `[ {..}, {..} ]` (`application/json`).
    JsonArray,
    /// One JSON object per line (`application/x-ndjson`, `application/jsonl`).
    Ndjson,
}

/// How the body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Not compressed.
    Identity,
    /// `Content-Encoding: gzip`.
    Gzip,
    /// `Content-Encoding: zstd`.
    Zstd,
}

/// The framing named by a `Content-Type`; without one, the body's first byte decides.
pub fn framing(content_type: Option<&str>) -> Result<Option<Framing>> {
    let Some(text) = content_type else {
        return Ok(None);
    };
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Some(Framing::JsonArray)),
        "application/x-ndjson"
        | "application/ndjson"
        | "application/jsonl"
        | "application/x-jsonlines"
        | "application/jsonlines" => Ok(Some(Framing::Ndjson)),
        _ => Err(IngestError::UnsupportedMediaType {
            content_type: text.chars().take(100).collect(),
        }),
    }
}

/// The encoding named by a `Content-Encoding` header.
pub fn encoding(content_encoding: Option<&str>) -> Result<Encoding> {
    match content_encoding
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("" | "identity") => Ok(Encoding::Identity),
        Some("gzip" | "x-gzip") => Ok(Encoding::Gzip),
        Some("zstd") => Ok(Encoding::Zstd),
        Some(other) => Err(IngestError::UnsupportedEncoding {
            encoding: other.chars().take(50).collect(),
            accepted: "gzip, zstd or identity",
        }),
    }
}

/// Decompresses `body`, refusing more than `limit` decoded bytes (413) and reporting a
/// truncated or corrupt stream as a bad request (400).
pub fn decode(body: Bytes, encoding: Encoding, limit: usize) -> Result<Bytes> {
    fn read_bounded(mut reader: impl Read, limit: usize) -> Result<Bytes> {
        let mut out = Vec::new();
        let read = reader.by_ref().take(limit as u64 + 1).read_to_end(&mut out);
        match read {
            Ok(_) if out.len() > limit => Err(IngestError::PayloadTooLarge { limit }),
            Ok(_) => Ok(Bytes::from(out)),
            Err(e) => Err(IngestError::BodyRead {
                reason: format!("cannot decompress the body: {e}"),
            }),
        }
    }
    match encoding {
        Encoding::Identity => Ok(body),
        Encoding::Gzip => read_bounded(flate2::read::GzDecoder::new(&body[..]), limit),
        Encoding::Zstd => {
            let decoder =
                zstd::stream::read::Decoder::new(&body[..]).map_err(|e| IngestError::BodyRead {
                    reason: format!("cannot decompress the body: {e}"),
                })?;
            read_bounded(decoder, limit)
        }
    }
}

/// Cuts a batch into record slices of `body`, at most `max_records` of them (413 past
/// that). A body that is not a JSON array of values (or, for NDJSON, that has a line
/// that is not one JSON value) is a bad request as a whole; whether each record is a
/// valid delivery request is decided later, record by record. A batch of no records (an
/// empty body, `[]`, blank lines) is a bad request too: the body is required.
pub fn split(body: &[u8], framing: Option<Framing>, max_records: usize) -> Result<Vec<&[u8]>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let framing = framing.unwrap_or(if first == Some(b'[') {
        Framing::JsonArray
    } else {
        Framing::Ndjson
    });
    let records = match framing {
        Framing::JsonArray => split_array(body, max_records)?,
        Framing::Ndjson => split_lines(body, max_records)?,
    };
    if records.is_empty() {
        return Err(IngestError::MalformedBatch {
            reason: "the batch holds no records".into(),
        });
    }
    Ok(records)
}

fn too_many(max_records: usize) -> IngestError {
    IngestError::TooManyRecords { limit: max_records }
}

fn split_array(body: &[u8], max_records: usize) -> Result<Vec<&[u8]>> {
    let over = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let records = RecordSlices {
        max: max_records,
        over: &over,
    }
    .deserialize(&mut de)
    .and_then(|records| de.end().map(|()| records));
    match records {
        Ok(records) => Ok(records
            .into_iter()
            .map(|raw| raw.get().as_bytes())
            .collect()),
        Err(_) if over.get() => Err(too_many(max_records)),
        Err(e) => Err(IngestError::MalformedBatch {
            reason: format!("not a JSON array of records: {e}"),
        }),
    }
}

fn split_lines(body: &[u8], max_records: usize) -> Result<Vec<&[u8]>> {
    let mut records = Vec::new();
    for (number, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if records.len() == max_records {
            return Err(too_many(max_records));
        }
        if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_err() {
            return Err(IngestError::MalformedBatch {
                reason: format!("line {} is not one JSON value", number + 1),
            });
        }
        records.push(line);
    }
    Ok(records)
}

/// Deserializes a JSON array into borrowed raw elements, stopping past `max`.
struct RecordSlices<'c> {
    max: usize,
    over: &'c Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for RecordSlices<'_> {
    type Value = Vec<&'de RawValue>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RecordSlices<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of delivery requests")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            if out.len() == self.max {
                self.over.set(true);
                return Err(de::Error::custom("too many records"));
            }
            out.push(raw);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_past_the_cap_are_refused_with_their_size() {
        assert!(check_record_size(&[b'x'; 10], 10).is_ok());
        let e = check_record_size(&[b'x'; 11], 10).unwrap_err();
        assert_eq!(e.field, "");
        assert!(
            e.reason.contains("11 bytes") && e.reason.contains("10"),
            "{e}"
        );
    }
    use std::io::Write;

    fn within(body: &[u8], slice: &[u8]) -> bool {
        let range = body.as_ptr_range();
        range.contains(&slice.as_ptr()) && slice.len() <= body.len()
    }

    #[test]
    fn array_records_are_slices_of_the_body() {
        let body = br#" [ {"a": 1}, {"b": "x\"y"} ,{"c":[1,2]} ] "#;
        let records = split(body, Some(Framing::JsonArray), 10).unwrap();
        assert_eq!(
            records,
            [&br#"{"a": 1}"#[..], br#"{"b": "x\"y"}"#, br#"{"c":[1,2]}"#]
        );
        assert!(records.iter().all(|r| within(body, r)));
    }

    #[test]
    fn ndjson_records_are_slices_of_the_body() {
        let body = b"{\"a\":1}\r\n\n  {\"b\":2}\n{\"c\":3}";
        let records = split(body, Some(Framing::Ndjson), 10).unwrap();
        assert_eq!(records, [&b"{\"a\":1}"[..], b"{\"b\":2}", b"{\"c\":3}"]);
        assert!(records.iter().all(|r| within(body, r)));
    }

    #[test]
    fn framing_is_sniffed_without_a_content_type() {
        assert_eq!(split(b"[{}]", None, 10).unwrap().len(), 1);
        assert_eq!(split(b"{}\n{}\n", None, 10).unwrap().len(), 2);
    }

    #[test]
    fn record_count_is_bounded() {
        let body = b"[{},{},{}]";
        assert!(matches!(
            split(body, Some(Framing::JsonArray), 2),
            Err(IngestError::TooManyRecords { limit: 2 })
        ));
        assert_eq!(split(body, Some(Framing::JsonArray), 3).unwrap().len(), 3);
        assert!(matches!(
            split(b"{}\n{}\n{}", Some(Framing::Ndjson), 2),
            Err(IngestError::TooManyRecords { .. })
        ));
    }

    #[test]
    fn malformed_batches_are_rejected_whole() {
        for (body, framing) in [
            (&b"[{},"[..], Framing::JsonArray),
            (b"[{}] x", Framing::JsonArray),
            (b"{}", Framing::JsonArray),
            (b"{}\n{oops\n", Framing::Ndjson),
            (b"[]", Framing::JsonArray),
            (b" [ ] ", Framing::JsonArray),
            (b"", Framing::Ndjson),
            (b"\n  \n", Framing::Ndjson),
        ] {
            assert!(
                matches!(
                    split(body, Some(framing), 10),
                    Err(IngestError::MalformedBatch { .. })
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn content_types_and_encodings() {
        assert_eq!(
            framing(Some("application/json; charset=utf-8")).unwrap(),
            Some(Framing::JsonArray)
        );
        assert_eq!(
            framing(Some("application/x-ndjson")).unwrap(),
            Some(Framing::Ndjson)
        );
        assert!(framing(Some("text/csv")).is_err());
        assert_eq!(encoding(Some("GZIP")).unwrap(), Encoding::Gzip);
        assert_eq!(encoding(Some("zstd")).unwrap(), Encoding::Zstd);
        assert!(matches!(
            encoding(Some("br")),
            Err(IngestError::UnsupportedEncoding { .. })
        ));
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn compressed_bodies_decode_within_the_limit() {
        let data = b"[{\"a\":1}]".repeat(100);
        let gz = gzip(&data);
        assert_eq!(
            decode(Bytes::from(gz.clone()), Encoding::Gzip, data.len()).unwrap(),
            data
        );
        assert!(matches!(
            decode(Bytes::from(gz.clone()), Encoding::Gzip, data.len() - 1),
            Err(IngestError::PayloadTooLarge { .. })
        ));
        let truncated = Bytes::from(gz[..gz.len() / 2].to_vec());
        assert!(matches!(
            decode(truncated, Encoding::Gzip, data.len()),
            Err(IngestError::BodyRead { .. })
        ));
        let zst = zstd::stream::encode_all(&data[..], 1).unwrap();
        assert_eq!(
            decode(Bytes::from(zst.clone()), Encoding::Zstd, data.len()).unwrap(),
            data
        );
        assert!(matches!(
            decode(
                Bytes::from(zst[..zst.len() - 3].to_vec()),
                Encoding::Zstd,
                data.len()
            ),
            Err(IngestError::BodyRead { .. })
        ));
    }
}
