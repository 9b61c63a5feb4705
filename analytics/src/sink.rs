//! The history sink: every event topic into Parquet files on the object store, exactly
//! once.
//!
//! Records are buffered per table and date (Hive-style `table/date=YYYY-MM-DD/`). When the
//! buffer holds `--roll-rows` rows or its oldest record is `--roll-interval-ms` old (and
//! on shutdown), the sink *rolls*:
//!
//! 1. each table and date becomes one zstd Parquet file with statistics, written with one
//!    atomic put (the offsets it covers are also in its key-value metadata);
//! 2. one commit to the [table log](crate::log) adds the files and the offsets read;
//! 3. only then are the offsets stored and committed to Kafka.
//!
//! On start, and for every record, the log decides: a record whose offset the log already
//! holds is skipped. So a crash after step 1 leaves a file nobody reads (the records are
//! read again and written again), and a crash after step 2 re-reads records that are then
//! skipped: no row is missing and none is there twice. A commit that overlaps offsets
//! another sink instance committed (a rebalance) is refused; the sink then drops its
//! buffer and seeks back to what the log holds.
//!
//! Records that give no row (reschedules and cancels on `delivery-requests`, invalid
//! records) are counted and logged, and their offsets still move on.
//!
//! This module owns reading the topics, buffering and rolling. It must not start
//! compaction (the `history` module runs it beside the sink) nor encode or name files
//! itself (that is `parquet_files`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use bus::{ClientSettings, Consumer};
use chrono::{DateTime, NaiveDate};
use object_store::ObjectStoreExt;
use schemas::history;
use tokio_util::sync::CancellationToken;

use crate::compact::CompactionArgs;
use crate::error::{AnalyticsError, Result};
use crate::failpoint::FailPoint;
use crate::log::{Commit, DataFile, Log, OffsetRange, Snapshot};
use crate::parquet_files::write_file;
use crate::rows::{Provenance, RecordView, Skip, TableRows};
use crate::store::DataRoot;

/// Settings of the history sink.
#[derive(Debug, Clone, clap::Args)]
pub struct SinkArgs {
    /// Rows buffered (all tables together) before files are written.
    #[arg(long, env = "DRONEDELIVERY_ROLL_ROWS", default_value_t = 200_000)]
    pub roll_rows: usize,

    /// Record bytes buffered (all tables together) before files are written.
    #[arg(long, env = "DRONEDELIVERY_ROLL_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub roll_bytes: usize,

    /// Longest time a record waits in the buffer before its file is written, in
    /// milliseconds: with the commit after it, the bound on how stale the history is.
    #[arg(long, env = "DRONEDELIVERY_ROLL_INTERVAL_MS", default_value_t = 2_000)]
    pub roll_interval_ms: u64,

    /// Compaction and vacuum, which run beside the sink (the sink only reads the orphan
    /// age from here).
    #[command(flatten)]
    pub compaction: CompactionArgs,
}

/// A record this far behind the log's offset makes the sink seek instead of skipping
/// record by record.
const SEEK_AHEAD: i64 = 10_000;

/// While draining: a stream this long without a record has paused (what was there is
/// read), so the sink checks whether it caught up.
const DRAIN_PAUSE: Duration = Duration::from_millis(100);

/// While draining: the longest time between two checks while records keep coming.
const DRAIN_CHECK_EVERY: Duration = Duration::from_millis(500);

/// While draining: the longest a check may wait for the broker's answers.
const DRAIN_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the sink does when it is told to stop.
#[derive(Debug, Clone, Copy)]
pub enum OnShutdown {
    /// Write what is buffered and stop.
    Stop,
    /// First read on until every assigned partition is caught up (for an in-memory bus,
    /// whose records are gone once the process exits), for at most this long.
    Drain(Duration),
}

/// The rows of one table and date waiting for their file.
struct Pending {
    rows: TableRows,
    /// Per topic partition: the first and last offset of these rows.
    offsets: BTreeMap<i32, (i64, i64)>,
}

/// What the sink read since its last roll.
#[derive(Default)]
struct Buffer {
    by_file: BTreeMap<(&'static str, NaiveDate), Pending>,
    /// Per topic and partition: the offsets read (rows or not).
    read: BTreeMap<(String, i32), OffsetRange>,
    rows: usize,
    bytes: usize,
    since: Option<Instant>,
}

impl Buffer {
    fn due(&self, config: &SinkArgs) -> bool {
        self.rows >= config.roll_rows.max(1)
            || self.bytes >= config.roll_bytes.max(1)
            || self
                .since
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(config.roll_interval_ms))
    }
}

/// Whether the sink can write the history now: stalled from a failed write of the store
/// (a full disk, a store that is down) until a write succeeds. The sink keeps its buffer
/// and tries again meanwhile; whoever serves writes refuses them (503) while it is
/// stalled, and readiness fails.
#[derive(Debug, Clone, Default)]
pub struct SinkHealth {
    stalled: Arc<std::sync::atomic::AtomicBool>,
    reason: Arc<std::sync::Mutex<String>>,
}

impl SinkHealth {
    /// Why the history cannot be written now, if it cannot.
    pub fn stalled(&self) -> Option<String> {
        if !self.stalled.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        Some(
            self.reason
                .lock()
                .map_or_else(|_| "the store fails".into(), |r| r.clone()),
        )
    }

    /// The flag set while the history cannot be written (for write backpressure).
    pub fn stalled_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.stalled)
    }

    fn set(&self, failure: Option<&AnalyticsError>) {
        if let (Some(e), Ok(mut reason)) = (failure, self.reason.lock()) {
            *reason = format!("the history cannot be written: {e}");
        }
        self.stalled
            .store(failure.is_some(), std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("history_sink_stalled").set(if failure.is_some() { 1.0 } else { 0.0 });
    }
}

/// A file of a roll, ready to write: table, date, rows, topic, and per partition the
/// first and last offset of its rows.
type RollFile = (
    &'static str,
    NaiveDate,
    RecordBatch,
    &'static str,
    BTreeMap<i32, (i64, i64)>,
);

/// First and longest wait between two attempts to write a roll the store refused.
const STORE_RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));

/// The sink's state between rolls.
pub(crate) struct Sink {
    config: SinkArgs,
    /// Prefixed to every topic name in the log's offsets: what they are scoped to (empty
    /// for a Kafka cluster, a fresh value for a bus that starts empty).
    offsets_scope: String,
    fail_at: Option<FailPoint>,
    log: Log,
    consumer: Arc<Consumer>,
    /// The log as of the last commit or refresh: what is durable.
    durable: Arc<Snapshot>,
    buffer: Buffer,
    rolls: u64,
    /// Jumps in offsets not yet checked against the broker (see [`Gap`]).
    gaps: Vec<Gap>,
    health: SinkHealth,
    /// Told to stop: a roll the store refuses is tried once more, then given up (its
    /// records stay unacknowledged in Kafka).
    shutdown: CancellationToken,
}

/// A jump in a partition's offsets between two records read. Under transactions most are
/// commit markers and aborted records (never returned to a `read_committed` reader);
/// another member's writes after a rebalance are jumps too. Only offsets the broker no
/// longer has (below its low watermark) were lost.
#[derive(Debug, Clone)]
struct Gap {
    topic: String,
    partition: i32,
    /// The offset expected next.
    from: i64,
    /// The offset read instead.
    to: i64,
}

/// Most jumps remembered between two checks; more are counted unchecked.
const MAX_GAPS: usize = 4096;

impl Sink {
    /// Reads what the log holds and subscribes to every event topic (reporting the
    /// group's lag until `shutdown`). Nothing is read from the topics yet.
    pub(crate) async fn open(
        root: DataRoot,
        config: SinkArgs,
        offsets_scope: String,
        fail_at: Option<FailPoint>,
        health: SinkHealth,
        settings: &ClientSettings,
        shutdown: &CancellationToken,
    ) -> Result<Self> {
        tracing::info!(data = %root.url, "history sink: writing Parquet");
        let log = Log::open(root).await?;
        let durable = log.snapshot().await?;
        let topics: Vec<&str> = history::TABLES.iter().map(|t| t.topic.name).collect();
        let consumer = Arc::new(Consumer::subscribe(
            settings,
            schemas::topics::groups::HISTORY,
            &topics,
        )?);
        let _lag = consumer.lag_probe().report(
            schemas::topics::groups::HISTORY,
            std::time::Duration::from_secs(10),
            shutdown.clone(),
        );
        Ok(Self {
            config,
            offsets_scope,
            fail_at,
            log,
            consumer,
            durable,
            buffer: Buffer::default(),
            rolls: 0,
            gaps: Vec::new(),
            health,
            shutdown: shutdown.clone(),
        })
    }

    /// Reads and writes until `shutdown` is cancelled, then (after draining, if asked)
    /// writes what is buffered and commits to Kafka one last time.
    pub(crate) async fn run(
        &mut self,
        shutdown: &CancellationToken,
        on_shutdown: OnShutdown,
    ) -> Result<()> {
        let tick = Duration::from_millis(self.config.roll_interval_ms.clamp(10, 1000) / 2 + 1);
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let consumer = Arc::clone(&self.consumer);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
                received = consumer.recv() => self.take(received).await?,
            }
            if self.buffer.due(&self.config) {
                self.roll().await?;
            }
        }
        if let OnShutdown::Drain(limit) = on_shutdown {
            self.drain(limit).await?;
        }
        self.roll().await?;
        let committed = tokio::task::spawn_blocking(move || consumer.commit())
            .await
            .map_err(|e| AnalyticsError::Task {
                reason: e.to_string(),
            })?;
        if let Err(e) = committed {
            tracing::warn!(error = %e, "history sink: final Kafka commit failed; the log still says what is written");
        }
        tracing::info!("history sink: stopped");
        Ok(())
    }

    /// Reads on until the consumer has caught up (every assigned partition read to its
    /// readable end; see [`Consumer::caught_up`]), or `limit` passes. It checks at once,
    /// then whenever the stream pauses and at least every [`DRAIN_CHECK_EVERY`] while
    /// records keep coming.
    async fn drain(&mut self, limit: Duration) -> Result<()> {
        let started = tokio::time::Instant::now();
        let deadline = started + limit;
        let consumer = Arc::clone(&self.consumer);
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                tracing::warn!(
                    ?limit,
                    "history sink: drain time passed before it caught up"
                );
                return Ok(());
            }
            let check = Arc::clone(&consumer);
            let wait = remaining.min(DRAIN_CHECK_TIMEOUT);
            let caught_up = tokio::task::spawn_blocking(move || check.caught_up(wait))
                .await
                .map_err(|e| AnalyticsError::Task {
                    reason: e.to_string(),
                })?;
            match caught_up {
                Ok(true) => {
                    tracing::info!(took = ?started.elapsed(), "history sink: caught up");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "history sink: cannot tell whether it caught up");
                }
            }
            // Read what is there until the stream pauses, then check again.
            let next_check = tokio::time::Instant::now() + DRAIN_CHECK_EVERY;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    () = tokio::time::sleep_until(next_check) => break,
                    () = tokio::time::sleep(DRAIN_PAUSE) => break,
                    received = consumer.recv() => {
                        self.take(received).await?;
                        if self.buffer.due(&self.config) {
                            self.roll().await?;
                        }
                    }
                }
            }
        }
    }

    /// Handles one received record: what is durable is re-read after a rebalance, the
    /// record is buffered (or skipped), and the consumer seeks ahead when it is far behind
    /// the log.
    async fn take(&mut self, received: bus::Result<bus::Received<'_>>) -> Result<()> {
        self.after_rebalance().await?;
        if let Some((topic, partition, offset)) = self.read_one(received) {
            self.skip_ahead(topic, partition, offset).await;
        }
        Ok(())
    }

    /// Takes one record into the buffer. Returns where to seek when the record is far
    /// behind what the log already holds (the group's committed offsets were lost or
    /// lag far behind), so that the sink does not read all of it only to skip it.
    fn read_one(
        &mut self,
        received: bus::Result<bus::Received<'_>>,
    ) -> Option<(&'static str, i32, i64)> {
        let record = match received {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(error = %e, "history sink: receive failed");
                return None;
            }
        };
        let (topic, partition, offset) = (record.topic(), record.partition(), record.offset());
        let table = history::table_of(topic)?;
        // Already durable (re-read after a crash or a rebalance), or already buffered
        // (re-delivered after a partition came back to this member).
        let read = self.buffer.read.get(&(topic.to_owned(), partition));
        let resume = self.durable.next_offset(&self.log_topic(topic), partition);
        if resume.is_some_and(|next| offset < next) || read.is_some_and(|r| offset < r.next) {
            metrics::counter!("history_records_skipped_total", "table" => table.name, "reason" => "already_written")
                .increment(1);
            return resume
                .filter(|next| next - offset > SEEK_AHEAD && read.is_none())
                .map(|next| (table.topic.name, partition, next));
        }
        // A jump in offsets: transaction markers, aborted records, another member's
        // writes, or records deleted (retention) before the history read them. Which
        // one is told at the next roll, by the broker's low watermark.
        let expected = read.map(|r| r.next).or(resume);
        if let Some(expected) = expected.filter(|&e| offset > e) {
            if self.gaps.len() < MAX_GAPS {
                self.gaps.push(Gap {
                    topic: topic.to_owned(),
                    partition,
                    from: expected,
                    to: offset,
                });
            } else {
                metrics::counter!("history_offset_jumps_unchecked_total").increment(1);
            }
        }
        self.buffer
            .read
            .entry((topic.to_owned(), partition))
            .and_modify(|r| r.next = offset + 1)
            .or_insert(OffsetRange {
                from: offset,
                next: offset + 1,
            });
        self.buffer.since.get_or_insert_with(Instant::now);
        let ingest_millis = record
            .header(schemas::headers::INGEST_TIME)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .or_else(|| record.timestamp_millis())
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
        let date = DateTime::from_timestamp_millis(ingest_millis)
            .unwrap_or_default()
            .date_naive();
        self.buffer.bytes +=
            record.payload().map_or(0, <[u8]>::len) + record.key().map_or(0, <[u8]>::len);
        let view = RecordView {
            key: record.key(),
            payload: record.payload().unwrap_or_default(),
            event_type: record.header(schemas::headers::EVENT_TYPE),
            drone_id: record.header(schemas::headers::DRONE_ID),
            dead_letter_reason: record.header(schemas::headers::DEAD_LETTER_REASON),
            dead_letter_source: record.header(schemas::headers::DEAD_LETTER_SOURCE),
            from: Provenance {
                key: record.key(),
                partition,
                offset,
                ingest_millis,
            },
        };
        let pending = match self.buffer.by_file.entry((table.name, date)) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let rows = TableRows::new(table.name)?;
                e.insert(Pending {
                    rows,
                    offsets: BTreeMap::new(),
                })
            }
        };
        match pending.rows.append(&view) {
            Ok(()) => {
                self.buffer.rows += 1;
                pending
                    .offsets
                    .entry(partition)
                    .and_modify(|(_, last)| *last = offset)
                    .or_insert((offset, offset));
            }
            Err(Skip::OtherEvent) => {
                metrics::counter!("history_records_skipped_total", "table" => table.name, "reason" => "other_event")
                    .increment(1);
            }
            Err(Skip::Invalid(e)) => {
                metrics::counter!("history_records_skipped_total", "table" => table.name, "reason" => "invalid")
                    .increment(1);
                tracing::warn!(topic, partition, offset, error = %e, "history sink: record skipped: no valid row");
            }
        }
        None
    }

    /// The name a topic's offsets have in the log.
    fn log_topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.offsets_scope)
    }

    /// After a rebalance, what is durable is read again: another instance may have
    /// written partitions this one now reads.
    async fn after_rebalance(&mut self) -> Result<()> {
        if !self.consumer.take_revoked().is_empty() {
            self.durable = self.log.snapshot().await?;
        }
        Ok(())
    }

    /// Moves past records the log already holds. Best effort: if the seek fails, the
    /// records are read and skipped one by one.
    async fn skip_ahead(&mut self, topic: &'static str, partition: i32, to: i64) {
        let consumer = Arc::clone(&self.consumer);
        let sought = tokio::task::spawn_blocking(move || {
            consumer.seek(topic, partition, to, Duration::from_secs(10))
        })
        .await;
        match sought {
            Ok(Ok(())) => tracing::info!(
                topic,
                partition,
                to,
                "history sink: skipped ahead to the offset the history holds"
            ),
            Ok(Err(e)) => {
                tracing::debug!(topic, partition, error = %e, "history sink: seek failed; skipping record by record")
            }
            Err(e) => tracing::debug!(error = %e, "history sink: seek task failed"),
        }
    }

    /// Tells the jumps in offsets read since the last check that were losses: offsets
    /// below the partition's low watermark were deleted before the history read them
    /// (retention too short for the sink's lag). One watermark request per partition;
    /// a partition whose watermarks cannot be read is left unchecked (counted).
    async fn check_gaps(&mut self) {
        if self.gaps.is_empty() {
            return;
        }
        let gaps = std::mem::take(&mut self.gaps);
        let consumer = Arc::clone(&self.consumer);
        let checked = tokio::task::spawn_blocking(move || {
            let mut low: BTreeMap<(String, i32), Option<i64>> = BTreeMap::new();
            gaps.into_iter()
                .map(|gap| {
                    let low = *low
                        .entry((gap.topic.clone(), gap.partition))
                        .or_insert_with(|| {
                            consumer
                                .watermarks(&gap.topic, gap.partition, Duration::from_secs(5))
                                .ok()
                                .map(|(low, _)| low)
                        });
                    (gap, low)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(checked) = checked else {
            return;
        };
        for (gap, low) in checked {
            let Some(low) = low else {
                metrics::counter!("history_offset_jumps_unchecked_total").increment(1);
                continue;
            };
            let lost = gap.to.min(low) - gap.from;
            if lost <= 0 {
                continue;
            }
            let table = history::table_of(&gap.topic).map_or("unknown", |t| t.name);
            metrics::counter!("history_records_lost_total", "table" => table)
                .increment(lost as u64);
            tracing::error!(
                topic = gap.topic,
                partition = gap.partition,
                from = gap.from,
                to = gap.to.min(low),
                "history sink: records were deleted from the broker before the history read them \
                 (retention too short for the sink's lag)"
            );
        }
    }

    /// Writes every buffered table and date as one file, commits them with the offsets
    /// read to the log, then stores the offsets in Kafka. A write or commit the store
    /// refuses is tried again with backoff, the rows kept, until it succeeds (or, once
    /// stopping, after one more attempt); meanwhile [`SinkHealth`] says it is stalled.
    async fn roll(&mut self) -> Result<()> {
        self.check_gaps().await;
        let buffer = std::mem::take(&mut self.buffer);
        if buffer.read.is_empty() {
            return Ok(());
        }
        let mut files = Vec::new();
        for ((table, date), mut pending) in buffer.by_file {
            if pending.rows.is_empty() {
                continue;
            }
            let batch = pending.rows.finish()?;
            let topic = pending.rows.table().topic.name;
            files.push((table, date, batch, topic, pending.offsets));
        }
        self.rolls += 1;
        let mut backoff = STORE_RETRY.0;
        loop {
            let stopping = self.shutdown.is_cancelled();
            match self.write_and_commit(&files, &buffer.read).await {
                Err(e @ AnalyticsError::Store { .. }) => {
                    self.health.set(Some(&e));
                    metrics::counter!("history_store_failures_total").increment(1);
                    if stopping {
                        tracing::error!(error = %e, "history sink: stopping while the store refuses writes; the records not written stay in Kafka, unacknowledged");
                        return Err(e);
                    }
                    tracing::warn!(error = %e, ?backoff, "history sink: the store refused a write; keeping the rows and trying again");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(STORE_RETRY.1);
                }
                other => {
                    if other.is_ok() {
                        self.health.set(None);
                    }
                    return other;
                }
            }
        }
    }

    /// One attempt at a roll: writes `files`, commits them with the offsets `read` to
    /// the log, stores the offsets in Kafka. A store error while writing deletes the
    /// files written (best effort); one while committing leaves them (the commit may have
    /// landed), and vacuum removes those no commit names.
    async fn write_and_commit(
        &mut self,
        files: &[RollFile],
        read: &BTreeMap<(String, i32), OffsetRange>,
    ) -> Result<()> {
        let started = Instant::now();
        let mut added = Vec::new();
        for (table, date, batch, topic, offsets) in files {
            match write_file(self.log.root(), table, *date, batch.clone(), topic, offsets).await {
                Ok(file) => added.push(file),
                Err(e) => {
                    self.delete_files(&added).await;
                    return Err(e);
                }
            }
        }
        // Vacuum deletes files no commit names once they are --vacuum-orphan-secs old: a
        // roll that took half of that gives up rather than commit files that may be gone.
        let orphan_age = Duration::from_secs(self.config.compaction.vacuum_orphan_secs);
        if started.elapsed() > orphan_age / 2 {
            tracing::warn!(took = ?started.elapsed(), "history sink: a roll took too long to commit safely; reading its records again");
            self.abandon(&added, read).await?;
            return Ok(());
        }
        if self.rolls == 1 && self.fail_at == Some(FailPoint::AfterFileWrite) {
            return Err(AnalyticsError::Injected(FailPoint::AfterFileWrite));
        }
        let mut offsets: BTreeMap<String, BTreeMap<i32, OffsetRange>> = BTreeMap::new();
        for ((topic, partition), range) in read {
            offsets
                .entry(self.log_topic(topic))
                .or_default()
                .insert(*partition, *range);
        }
        let rows: u64 = added.iter().map(|f: &DataFile| f.rows).sum();
        let files = added.len();
        let commit = Commit {
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            writer: "sink".into(),
            add: added.clone(),
            offsets,
            ..Commit::default()
        };
        // A failed commit may still have landed (the store took the put, then the answer
        // was lost): its files stay, for vacuum to remove if no commit names them. The
        // next attempt then either commits, or finds these offsets in the log (a
        // conflict: it drops its own new files and reads on from the log).
        let committed = self.log.commit(commit).await?;
        match committed {
            Ok(snapshot) => {
                self.durable = snapshot;
                metrics::gauge!("history_last_commit_timestamp_seconds")
                    .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
            }
            Err(conflict) => {
                tracing::warn!(%conflict, "history sink: another sink instance wrote some of these records; dropping this roll and reading on from the log");
                metrics::counter!("history_roll_conflicts_total").increment(1);
                self.abandon(&added, read).await?;
                return Ok(());
            }
        }
        for file in &added {
            metrics::counter!("history_rows_written_total", "table" => table_name(&file.table))
                .increment(file.rows);
            metrics::counter!("history_files_written_total", "table" => table_name(&file.table))
                .increment(1);
        }
        metrics::histogram!("history_roll_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            version = self.durable.version,
            files,
            rows,
            "history sink: committed"
        );
        if self.rolls == 1 && self.fail_at == Some(FailPoint::AfterLogCommit) {
            return Err(AnalyticsError::Injected(FailPoint::AfterLogCommit));
        }
        for ((topic, partition), range) in read {
            if let Err(e) = self.consumer.store(topic, *partition, range.next - 1) {
                tracing::debug!(topic, partition, error = %e, "history sink: offset not stored");
            }
        }
        // The log is the record of what is written; the Kafka commit is for lag figures
        // and a faster restart, so it need not wait.
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit() {
                tracing::debug!(error = %e, "history sink: Kafka commit failed; the next one carries it");
            }
        });
        Ok(())
    }

    /// After a refused commit: deletes the files nobody will read, refreshes what is
    /// durable and moves back to the first offset not in the log.
    async fn abandon(
        &mut self,
        files: &[DataFile],
        read: &BTreeMap<(String, i32), OffsetRange>,
    ) -> Result<()> {
        self.delete_files(files).await;
        self.durable = self.log.snapshot().await?;
        for ((topic, partition), range) in read {
            let to = self
                .durable
                .next_offset(&self.log_topic(topic), *partition)
                .map_or(range.from, |next| next.max(range.from));
            let consumer = Arc::clone(&self.consumer);
            let (topic, partition) = (topic.clone(), *partition);
            let sought = tokio::task::spawn_blocking(move || {
                consumer.seek(&topic, partition, to, Duration::from_secs(10))
            })
            .await
            .map_err(|e| AnalyticsError::Task {
                reason: e.to_string(),
            })?;
            if let Err(e) = sought {
                // Not ours any more (its new owner reads it), or a real failure: only
                // stopping (and restarting from the committed offsets) is safe then.
                return Err(AnalyticsError::Fenced {
                    reason: format!("cannot read again from offset {to}: {e}"),
                });
            }
        }
        Ok(())
    }
}

impl Sink {
    /// Deletes files no commit names (best effort: vacuum removes what is left).
    async fn delete_files(&self, files: &[DataFile]) {
        let root = self.log.root();
        for file in files {
            if let Err(e) = root.store.delete(&root.path(&file.path)).await {
                tracing::debug!(path = %file.path, error = %e, "history sink: abandoned file not deleted; vacuum removes it");
            }
        }
    }
}

fn table_name(name: &str) -> &'static str {
    history::TABLES
        .iter()
        .find(|t| t.name == name)
        .map_or("other", |t| t.name)
}
