//! Parquet files of the history: how a batch becomes a file and where the file goes.
//!
//! Owns the encoding (zstd, page statistics, the offsets a file covers in its key-value
//! metadata), the file naming (Hive-style `table/date=YYYY-MM-DD/part-...parquet`, one
//! new name per file) and the one atomic put of a file. The sink, compaction and the
//! SQL renderer use it.
//!
//! It must not commit to the [table log](crate::log) nor decide when files are written:
//! a file put here is read by nobody until its writer commits it.

use std::collections::BTreeMap;

use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use schemas::history;

use crate::error::{AnalyticsError, Result};
use crate::log::DataFile;
use crate::store::DataRoot;

/// Writes one batch as a Parquet file of `table` for `date`; the offsets it holds go in
/// its key-value metadata.
pub(crate) async fn write_file(
    root: &DataRoot,
    table: &str,
    date: NaiveDate,
    batch: RecordBatch,
    topic: &str,
    offsets: &BTreeMap<i32, (i64, i64)>,
) -> Result<DataFile> {
    let rows = batch.num_rows() as u64;
    let metadata = offsets_metadata(topic, offsets);
    // Encoding is CPU work: keep it off the async workers that serve HTTP.
    let bytes = tokio::task::spawn_blocking(move || encode(&[batch], Some(metadata)))
        .await
        .map_err(|e| AnalyticsError::Task {
            reason: e.to_string(),
        })??;
    put_new_file(root, table, date, bytes, rows, "writing a Parquet file").await
}

/// Puts an encoded Parquet file of `table` for `date` under a new name (one atomic put)
/// and describes it for the log.
pub(crate) async fn put_new_file(
    root: &DataRoot,
    table: &str,
    date: NaiveDate,
    bytes: Vec<u8>,
    rows: u64,
    action: &'static str,
) -> Result<DataFile> {
    let name = new_file_name(table, date);
    let size = bytes.len() as u64;
    root.store
        .put(&root.path(&name), PutPayload::from(bytes))
        .await
        .map_err(|source| AnalyticsError::Store { action, source })?;
    Ok(DataFile {
        table: table.to_owned(),
        date: date.format("%Y-%m-%d").to_string(),
        path: name,
        size,
        rows,
        added_ms: chrono::Utc::now().timestamp_millis(),
    })
}

/// A new, unique file name in `table`'s folder for `date`.
fn new_file_name(table: &str, date: NaiveDate) -> String {
    format!(
        "{}/part-{}-{}.parquet",
        history::partition_dir(table, date),
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        uuid::Uuid::new_v4().simple()
    )
}

/// The metadata value naming the offsets a file holds: its topic and, per partition, the
/// first and last offset.
fn offsets_metadata(topic: &str, offsets: &BTreeMap<i32, (i64, i64)>) -> String {
    let partitions: serde_json::Map<String, serde_json::Value> = offsets
        .iter()
        .map(|(p, (first, last))| (p.to_string(), serde_json::json!([first, last])))
        .collect();
    serde_json::json!({
        "topic": topic,
        "partitions": partitions,
    })
    .to_string()
}

/// How the history's Parquet files (and query results asked for as Parquet) are written:
/// zstd, page statistics and, if given, the offsets a file covers in its key-value
/// metadata.
pub(crate) fn properties(offsets_json: Option<String>) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_key_value_metadata(offsets_json.map(|json| {
            vec![KeyValue::new(
                history::OFFSETS_METADATA_KEY.to_owned(),
                json,
            )]
        }))
        .build()
}

/// Encodes batches (of one schema) as a zstd-compressed Parquet file with page
/// statistics and, if given, the offsets it covers in its key-value metadata.
pub(crate) fn encode(batches: &[RecordBatch], offsets_json: Option<String>) -> Result<Vec<u8>> {
    let parquet_err = |action| move |source| AnalyticsError::Parquet { action, source };
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let mut writer =
        ArrowWriter::try_new(Vec::new(), first.schema(), Some(properties(offsets_json)))
            .map_err(parquet_err("creating a writer"))?;
    for batch in batches {
        writer.write(batch).map_err(parquet_err("writing rows"))?;
    }
    writer.into_inner().map_err(parquet_err("closing a file"))
}
