//! The history sink: `delivery-requests` into Parquet files on the object store.
//!
//! Records are buffered per ingest date and written as one file per date when the buffer
//! holds `--roll-rows` rows or its oldest row is `--roll-interval-ms` old, and on
//! shutdown. A file is written with one atomic `put`; only after that are the offsets of
//! its records stored, so a crash re-reads rather than loses. Each file's Parquet
//! key-value metadata records the Kafka offsets it covers.
//!
//! A record that is not a valid request is logged, counted and skipped; it is never
//! silently dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{ClientSettings, Consumer};
use chrono::{DateTime, NaiveDate};
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use schemas::history;
use schemas::topics;
use tokio_util::sync::CancellationToken;

use crate::error::{AnalyticsError, Result};
use crate::rows::{DeliveryRequestRows, Provenance};
use crate::store::DataRoot;

/// Settings of the history sink.
#[derive(Debug, Clone, clap::Args)]
pub struct SinkConfig {
    /// Where the history lives: `file:///path`, `file://./relative/path` or a path.
    #[arg(long, env = "DRONEDELIVERY_DATA", default_value = "file://./data")]
    pub data: String,

    /// Rows buffered before a file is written.
    #[arg(long, env = "DRONEDELIVERY_ROLL_ROWS", default_value_t = 200_000)]
    pub roll_rows: usize,

    /// Longest time a record waits in the buffer before its file is written, in
    /// milliseconds: the bound on how stale the history is.
    #[arg(long, env = "DRONEDELIVERY_ROLL_INTERVAL_MS", default_value_t = 2_000)]
    pub roll_interval_ms: u64,
}

/// What the sink does when it is told to stop.
#[derive(Debug, Clone, Copy)]
pub enum OnShutdown {
    /// Write what is buffered and stop.
    Stop,
    /// First read on until every assigned partition is caught up (for an in-memory bus,
    /// whose records are gone once the process exits), for at most this long.
    Drain(Duration),
}

/// The rows of one ingest date waiting for their file, and the offsets they cover.
#[derive(Default)]
struct Pending {
    rows: DeliveryRequestRows,
    /// Per partition: the first and last offset of these rows.
    offsets: BTreeMap<i32, (i64, i64)>,
}

/// Buffered rows, per ingest date.
#[derive(Default)]
struct Buffer {
    by_date: BTreeMap<NaiveDate, Pending>,
    /// Per partition: the last offset read, including skipped records.
    last_read: BTreeMap<i32, i64>,
    rows: usize,
    since: Option<Instant>,
}

impl Buffer {
    fn due(&self, config: &SinkConfig) -> bool {
        self.rows >= config.roll_rows.max(1)
            || self
                .since
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(config.roll_interval_ms))
    }
}

/// Runs the sink until `shutdown` is cancelled.
pub async fn run(
    config: SinkConfig,
    settings: ClientSettings,
    shutdown: CancellationToken,
    on_shutdown: OnShutdown,
) -> Result<()> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let root = DataRoot::open(&config.data, &cwd)?;
    tracing::info!(data = %root.url, "history sink: writing Parquet");
    let consumer = Arc::new(Consumer::subscribe(
        &settings,
        topics::groups::HISTORY,
        &[topics::DELIVERY_REQUESTS.name],
    )?);
    let mut buffer = Buffer::default();
    let tick = Duration::from_millis(config.roll_interval_ms.clamp(10, 1000) / 2 + 1);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                if buffer.due(&config) {
                    roll(&root, &consumer, &mut buffer).await?;
                }
            }
            received = consumer.recv() => {
                read_one(received, &mut buffer);
                if buffer.due(&config) {
                    roll(&root, &consumer, &mut buffer).await?;
                }
            }
        }
    }
    if let OnShutdown::Drain(limit) = on_shutdown {
        drain(&config, &root, &consumer, &mut buffer, limit).await?;
    }
    roll(&root, &consumer, &mut buffer).await?;
    let consumer = Arc::clone(&consumer);
    let committed = tokio::task::spawn_blocking(move || consumer.commit())
        .await
        .map_err(|e| AnalyticsError::Task {
            reason: e.to_string(),
        })?;
    if let Err(e) = committed {
        tracing::warn!(error = %e, "history sink: final commit failed; records since the last commit will be re-read");
    }
    tracing::info!("history sink: stopped");
    Ok(())
}

/// Reads on until every assigned partition is at its high watermark, or `limit` passes.
async fn drain(
    config: &SinkConfig,
    root: &DataRoot,
    consumer: &Arc<Consumer>,
    buffer: &mut Buffer,
    limit: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let check = Arc::clone(consumer);
        let caught_up =
            tokio::task::spawn_blocking(move || check.caught_up(Duration::from_secs(5)))
                .await
                .map_err(|e| AnalyticsError::Task {
                    reason: e.to_string(),
                })?;
        match caught_up {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "history sink: cannot tell whether it caught up"),
        }
        // Read what is there until the stream pauses, then check again.
        loop {
            let wait = tokio::time::sleep(Duration::from_millis(200));
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(?limit, "history sink: drain time passed before it caught up");
                    return Ok(());
                }
                () = wait => break,
                received = consumer.recv() => {
                    read_one(received, buffer);
                    if buffer.due(config) {
                        roll(root, consumer, buffer).await?;
                    }
                }
            }
        }
    }
}

fn read_one(received: bus::Result<bus::Received<'_>>, buffer: &mut Buffer) {
    let record = match received {
        Ok(record) => record,
        Err(e) => {
            tracing::warn!(error = %e, "history sink: receive failed");
            return;
        }
    };
    let (partition, offset) = (record.partition(), record.offset());
    buffer.last_read.insert(partition, offset);
    let ingest_millis = record
        .header(schemas::headers::INGEST_TIME)
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .or_else(|| record.timestamp_millis())
        .unwrap_or(0);
    let date = DateTime::from_timestamp_millis(ingest_millis)
        .unwrap_or_default()
        .date_naive();
    // Reschedules and cancels share the topic; they belong to the delivery events, not
    // to this table.
    let event_type = record.header(schemas::headers::EVENT_TYPE);
    if event_type.is_some_and(|t| t != schemas::headers::event_type::DELIVERY_REQUESTED.as_bytes())
    {
        metrics::counter!("history_records_skipped_total", "table" => history::DELIVERY_REQUESTS.name, "reason" => "other_event")
            .increment(1);
        return;
    }
    let pending = buffer.by_date.entry(date).or_default();
    let appended = pending.rows.append(
        record.payload().unwrap_or_default(),
        Provenance {
            key: record.key(),
            partition,
            offset,
            ingest_millis,
        },
    );
    match appended {
        Ok(()) => {
            buffer.rows += 1;
            buffer.since.get_or_insert_with(Instant::now);
            pending
                .offsets
                .entry(partition)
                .and_modify(|(_, last)| *last = offset)
                .or_insert((offset, offset));
        }
        Err(e) => {
            metrics::counter!("history_records_skipped_total", "table" => history::DELIVERY_REQUESTS.name, "reason" => "invalid")
                .increment(1);
            tracing::warn!(partition, offset, error = %e, "history sink: record skipped: not a valid delivery request");
        }
    }
}

/// Writes every buffered date as one file, then stores the offsets they cover.
async fn roll(root: &DataRoot, consumer: &Consumer, buffer: &mut Buffer) -> Result<()> {
    for (date, mut pending) in std::mem::take(&mut buffer.by_date) {
        if pending.rows.is_empty() {
            continue;
        }
        let batch = pending.rows.finish()?;
        let count = batch.num_rows();
        let metadata = offsets_metadata(&pending.offsets);
        // Encoding is CPU work: keep it off the async workers that serve HTTP.
        let bytes = tokio::task::spawn_blocking(move || encode(&batch, &metadata))
            .await
            .map_err(|e| AnalyticsError::Task {
                reason: e.to_string(),
            })??;
        let name = format!(
            "{}/part-{}-{}.parquet",
            history::partition_dir(history::DELIVERY_REQUESTS.name, date),
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            uuid::Uuid::new_v4().simple()
        );
        let path = root.path(&name);
        let size = bytes.len();
        root.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|source| AnalyticsError::Store {
                action: "writing a Parquet file",
                source,
            })?;
        metrics::counter!("history_rows_written_total", "table" => history::DELIVERY_REQUESTS.name)
            .increment(count as u64);
        metrics::counter!("history_files_written_total", "table" => history::DELIVERY_REQUESTS.name)
            .increment(1);
        tracing::debug!(file = %path, rows = count, bytes = size, "history sink: file written");
    }
    for (partition, offset) in std::mem::take(&mut buffer.last_read) {
        if let Err(e) = consumer.store(topics::DELIVERY_REQUESTS.name, partition, offset) {
            tracing::debug!(partition, offset, error = %e, "history sink: offset not stored");
        }
    }
    buffer.rows = 0;
    buffer.since = None;
    Ok(())
}

fn offsets_metadata(offsets: &BTreeMap<i32, (i64, i64)>) -> String {
    let partitions: serde_json::Map<String, serde_json::Value> = offsets
        .iter()
        .map(|(p, (first, last))| (p.to_string(), serde_json::json!([first, last])))
        .collect();
    serde_json::json!({
        "topic": topics::DELIVERY_REQUESTS.name,
        "partitions": partitions,
    })
    .to_string()
}

/// Encodes a batch as a zstd-compressed Parquet file with statistics and the offsets it
/// covers in its key-value metadata.
fn encode(batch: &arrow::record_batch::RecordBatch, offsets_json: &str) -> Result<Vec<u8>> {
    let parquet_err = |action| move |source| AnalyticsError::Parquet { action, source };
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_key_value_metadata(Some(vec![KeyValue::new(
            history::OFFSETS_METADATA_KEY.to_owned(),
            offsets_json.to_owned(),
        )]))
        .build();
    let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props))
        .map_err(parquet_err("creating a writer"))?;
    writer.write(batch).map_err(parquet_err("writing rows"))?;
    writer.into_inner().map_err(parquet_err("closing a file"))
}
