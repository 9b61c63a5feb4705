//! The history sink: every event topic into its Delta table on the object store,
//! exactly once.
//!
//! Records are buffered per table and date. When the buffer holds `--roll-rows` rows or
//! `--roll-bytes` bytes, or its oldest record is `--roll-interval-ms` old (and on
//! shutdown), the sink *rolls*, table by table:
//!
//! 1. each date becomes one zstd Parquet file of the table (delta-rs's writer, with
//!    per-file statistics in the `add` action);
//! 2. one Delta commit adds the files with a `txn` action per topic partition read
//!    ([`tables`](crate::tables)): version = the last offset written;
//! 3. once every table is committed, the offsets are stored and committed to Kafka.
//!
//! For every record, the table's `txn` versions decide: a record whose offset the table
//! already holds is skipped. So a crash after step 1 leaves files no commit names (the
//! records are read again and written again; vacuum deletes the files), and a crash after
//! step 2 re-reads records that are then skipped: no row is missing and none is there
//! twice. A commit that overlaps offsets another sink instance committed (a rebalance),
//! or that races one with the same partitions, is refused; the sink then drops that
//! table's rows and seeks back to what the table holds.
//!
//! Records that give no row (reschedules and cancels on `delivery-requests`, invalid
//! records) are counted and logged, and their offsets still move on.
//!
//! This module owns reading the topics, buffering and rolling. It must not start
//! compaction (the `history` module runs it beside the sink) nor speak Delta itself
//! (that is `tables`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use bus::{ClientSettings, Consumer};
use chrono::{DateTime, NaiveDate};
use object_store::ObjectStoreExt as _;
use schemas::history;
use tokio_util::sync::CancellationToken;

use crate::compact::CompactionArgs;
use crate::error::{AnalyticsError, Result};
use crate::failpoint::FailPoint;
use crate::rows::{Provenance, RecordView, Skip, TableRows};
use crate::store::DataRoot;
use crate::tables::{Conflict, OffsetRange, Table};

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

/// What the sink read since its last roll.
#[derive(Default)]
struct Buffer {
    /// The rows of each table and date waiting for their file.
    by_file: BTreeMap<(&'static str, NaiveDate), TableRows>,
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

/// What one roll writes to one table: a batch per date, and the offsets read per
/// partition of the table's topic (rows or not).
struct TableRoll {
    table: history::HistoryTable,
    files: Vec<(NaiveDate, RecordBatch)>,
    read: BTreeMap<i32, OffsetRange>,
}

/// First and longest wait between two attempts to write a roll the store refused.
const STORE_RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));

/// The sink's state between rolls.
pub(crate) struct Sink {
    config: SinkArgs,
    /// Prefixed to every topic name in the tables' app ids: what the offsets are scoped
    /// to (empty for a Kafka cluster, a fresh value for a bus that starts empty).
    offsets_scope: String,
    fail_at: Option<FailPoint>,
    root: DataRoot,
    /// The tables opened so far (each is created at its first roll if it is not there).
    tables: BTreeMap<&'static str, Table>,
    consumer: Arc<Consumer>,
    /// Per topic and partition, the offset to read next as the tables hold it (`None`:
    /// none of it is written), as of the last commit or refresh: what is durable.
    durable: BTreeMap<(String, i32), Option<i64>>,
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
    /// Subscribes to every event topic (reporting the group's lag until `shutdown`).
    /// Nothing is read from the topics or the tables yet.
    pub(crate) async fn open(
        root: DataRoot,
        config: SinkArgs,
        offsets_scope: String,
        fail_at: Option<FailPoint>,
        health: SinkHealth,
        settings: &ClientSettings,
        shutdown: &CancellationToken,
    ) -> Result<Self> {
        tracing::info!(data = %root.url, "history sink: writing Delta tables");
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
            root,
            tables: BTreeMap::new(),
            consumer,
            durable: BTreeMap::new(),
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
            tracing::warn!(error = %e, "history sink: final Kafka commit failed; the tables still say what is written");
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

    /// Handles one received record: what is durable is re-read after a rebalance (and
    /// read for a partition first seen), the record is buffered (or skipped), and the
    /// consumer seeks ahead when it is far behind its table.
    async fn take(&mut self, received: bus::Result<bus::Received<'_>>) -> Result<()> {
        self.after_rebalance().await?;
        if let Ok(record) = &received
            && let Some(table) = history::table_of(record.topic())
            && !self
                .durable
                .contains_key(&(record.topic().to_owned(), record.partition()))
        {
            let next = self.durable_next(table, record.partition()).await?;
            self.durable
                .insert((record.topic().to_owned(), record.partition()), next);
        }
        if let Some((topic, partition, offset)) = self.read_one(received) {
            self.skip_ahead(topic, partition, offset).await;
        }
        Ok(())
    }

    /// Takes one record into the buffer. Returns where to seek when the record is far
    /// behind what its table already holds (the group's committed offsets were lost or
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
        let resume = self
            .durable
            .get(&(topic.to_owned(), partition))
            .copied()
            .flatten();
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
        let rows = match self.buffer.by_file.entry((table.name, date)) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(TableRows::new(table.name)?),
        };
        match rows.append(&view) {
            Ok(()) => {
                self.buffer.rows += 1;
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

    /// The table `table`, opened (and created) at its first use.
    async fn table(&mut self, table: history::HistoryTable) -> Result<&mut Table> {
        match self.tables.entry(table.name) {
            std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::btree_map::Entry::Vacant(e) => {
                Ok(e.insert(Table::open_or_create(&self.root, table).await?))
            }
        }
    }

    /// The offset to read next in `partition` of `table`'s topic, as the table holds it.
    /// A store that fails is asked again with backoff (the sink is stalled meanwhile),
    /// until it answers or the sink is told to stop.
    async fn durable_next(
        &mut self,
        table: history::HistoryTable,
        partition: i32,
    ) -> Result<Option<i64>> {
        let mut backoff = STORE_RETRY.0;
        loop {
            let scope = self.offsets_scope.clone();
            let found = match self.table(table).await {
                Ok(t) => t.next_offset(&scope, partition).await,
                Err(e) => Err(e),
            };
            match found {
                Ok(next) => return Ok(next),
                Err(e) if e.is_store() && !self.shutdown.is_cancelled() => {
                    self.health.set(Some(&e));
                    tracing::warn!(error = %e, ?backoff, "history sink: cannot read what the table holds; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(STORE_RETRY.1);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// After a rebalance, what is durable is read again: another instance may have
    /// written partitions this one now reads.
    async fn after_rebalance(&mut self) -> Result<()> {
        if !self.consumer.take_revoked().is_empty() {
            // Each table is opened again (its newest version) when next needed.
            self.durable.clear();
            self.tables.clear();
        }
        Ok(())
    }

    /// Moves past records the table already holds. Best effort: if the seek fails, the
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

    /// Writes every buffered table and date as one file and commits each table's files
    /// with the offsets read, then stores the offsets in Kafka. A write or commit the
    /// store refuses is tried again with backoff, the rows kept (tables already committed
    /// are not written again), until it succeeds (or, once stopping, after one more
    /// attempt); meanwhile [`SinkHealth`] says it is stalled.
    async fn roll(&mut self) -> Result<()> {
        self.check_gaps().await;
        let buffer = std::mem::take(&mut self.buffer);
        if buffer.read.is_empty() {
            return Ok(());
        }
        let mut rolls: BTreeMap<&'static str, TableRoll> = BTreeMap::new();
        for ((topic, partition), range) in &buffer.read {
            let Some(table) = history::table_of(topic) else {
                continue;
            };
            rolls
                .entry(table.name)
                .or_insert_with(|| TableRoll {
                    table,
                    files: Vec::new(),
                    read: BTreeMap::new(),
                })
                .read
                .insert(*partition, *range);
        }
        for ((table, date), mut rows) in buffer.by_file {
            if rows.is_empty() {
                continue;
            }
            let batch = rows.finish()?;
            if let Some(roll) = rolls.get_mut(table) {
                roll.files.push((date, batch));
            }
        }
        self.rolls += 1;
        let mut done = BTreeSet::new();
        let mut backoff = STORE_RETRY.0;
        loop {
            let stopping = self.shutdown.is_cancelled();
            match self.write_and_commit(&rolls, &mut done).await {
                Err(e) if e.is_store() => {
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

    /// One attempt at a roll: for each table not `done`, writes its files and commits
    /// them with its offsets; then stores the offsets of the committed tables in Kafka. A
    /// store error while writing leaves files no commit names, as does one while
    /// committing (the commit may have landed: the next attempt then finds its offsets in
    /// the table); vacuum deletes such files once they are older than its retention.
    async fn write_and_commit(
        &mut self,
        rolls: &BTreeMap<&'static str, TableRoll>,
        done: &mut BTreeSet<&'static str>,
    ) -> Result<()> {
        let started = Instant::now();
        let scope = self.offsets_scope.clone();
        let epoch = i64::try_from(self.rolls).unwrap_or(i64::MAX);
        // Vacuum deletes files no commit names once they are --vacuum-orphan-secs old (in
        // any process: each keeps them at least MIN_ORPHAN_SECS): a table whose files are
        // half of that old before its commit gives up rather than commit files that may
        // be gone.
        let safe_for = Duration::from_secs(
            self.config
                .compaction
                .vacuum_orphan_secs
                .min(crate::compact::MIN_ORPHAN_SECS),
        ) / 2;
        for (name, roll) in rolls {
            if done.contains(name) {
                continue;
            }
            let deadline = Instant::now() + safe_for;
            let adds = if roll.files.is_empty() {
                Vec::new()
            } else {
                self.table(roll.table)
                    .await?
                    .write_files(&roll.files, crate::parquet_files::properties())
                    .await?
            };
            if self.rolls == 1 && self.fail_at == Some(FailPoint::AfterFileWrite) {
                return Err(AnalyticsError::Injected(FailPoint::AfterFileWrite));
            }
            let rows: i64 = adds
                .iter()
                .filter_map(|a| a.get_stats().ok().flatten())
                .map(|s| s.num_records)
                .sum();
            let files = adds.len();
            let committed = self
                .table(roll.table)
                .await?
                .commit_roll(&scope, &roll.read, adds.clone(), epoch, deadline)
                .await?;
            match committed {
                Ok(version) => {
                    done.insert(name);
                    metrics::counter!("history_rows_written_total", "table" => roll.table.name)
                        .increment(u64::try_from(rows).unwrap_or(0));
                    metrics::counter!("history_files_written_total", "table" => roll.table.name)
                        .increment(files as u64);
                    metrics::gauge!("history_last_commit_timestamp_seconds")
                        .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
                    tracing::debug!(
                        table = name,
                        version,
                        files,
                        rows,
                        "history sink: committed"
                    );
                    for (&partition, range) in &roll.read {
                        self.durable.insert(
                            (roll.table.topic.name.to_owned(), partition),
                            Some(range.next),
                        );
                    }
                }
                Err(conflict) => {
                    tracing::warn!(table = name, %conflict, "history sink: commit refused (another sink instance, an earlier attempt whose answer was lost, or files too old); dropping these rows and reading on from the table");
                    metrics::counter!("history_roll_conflicts_total").increment(1);
                    // Refused by concurrent commits, the store may have taken this very
                    // commit (its answer lost): its files are left to vacuum, which
                    // deletes them only if no commit names them.
                    let unused: &[deltalake::kernel::Add] =
                        if matches!(conflict, Conflict::Concurrent { .. }) {
                            &[]
                        } else {
                            &adds
                        };
                    self.abandon(roll, unused).await?;
                    done.insert(name);
                }
            }
        }
        metrics::histogram!("history_roll_seconds").record(started.elapsed().as_secs_f64());
        if self.rolls == 1 && self.fail_at == Some(FailPoint::AfterLogCommit) {
            return Err(AnalyticsError::Injected(FailPoint::AfterLogCommit));
        }
        for roll in rolls.values() {
            for (&partition, range) in &roll.read {
                // Abandoned partitions were sought back: only what is written is stored.
                let key = (roll.table.topic.name.to_owned(), partition);
                if self.durable.get(&key).copied().flatten() != Some(range.next) {
                    continue;
                }
                if let Err(e) =
                    self.consumer
                        .store(roll.table.topic.name, partition, range.next - 1)
                {
                    tracing::debug!(topic = roll.table.topic.name, partition, error = %e, "history sink: offset not stored");
                }
            }
        }
        // The tables are the record of what is written; the Kafka commit is for lag
        // figures and a faster restart, so it need not wait.
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit() {
                tracing::debug!(error = %e, "history sink: Kafka commit failed; the next one carries it");
            }
        });
        Ok(())
    }

    /// After a refused commit: deletes `unused` (files no commit names), reads what the
    /// table holds and moves back to the first offset not in it, in the partitions this
    /// member still reads (the others' new owner reads them).
    async fn abandon(&mut self, roll: &TableRoll, unused: &[deltalake::kernel::Add]) -> Result<()> {
        for add in unused {
            let path = match crate::tables::file_path(&self.root, roll.table.name, &add.path) {
                Ok(path) => path,
                Err(e) => {
                    tracing::debug!(path = add.path, error = %e, "history sink: abandoned file not deleted; vacuum removes it");
                    continue;
                }
            };
            if let Err(e) = self.root.store.delete(&path).await {
                tracing::debug!(path = %path, error = %e, "history sink: abandoned file not deleted; vacuum removes it");
            }
        }
        let scope = self.offsets_scope.clone();
        let mut holds = Vec::new();
        {
            let table = self.table(roll.table).await?;
            table.refresh().await?;
            for &partition in roll.read.keys() {
                holds.push((partition, table.next_offset(&scope, partition).await?));
            }
        }
        let assigned = {
            let consumer = Arc::clone(&self.consumer);
            tokio::task::spawn_blocking(move || consumer.assigned())
                .await
                .map_err(|e| AnalyticsError::Task {
                    reason: e.to_string(),
                })?
                .map_err(|e| AnalyticsError::Fenced {
                    reason: format!("cannot read the assignment: {e}"),
                })?
        };
        for (partition, held) in holds {
            let range = roll.read[&partition];
            let to = held.map_or(range.from, |next| next.max(range.from));
            self.durable
                .insert((roll.table.topic.name.to_owned(), partition), held);
            if !assigned
                .iter()
                .any(|(t, p)| t == roll.table.topic.name && *p == partition)
            {
                tracing::info!(
                    topic = roll.table.topic.name,
                    partition,
                    "history sink: a refused partition is no longer this member's; its new owner reads it"
                );
                continue;
            }
            let consumer = Arc::clone(&self.consumer);
            let topic = roll.table.topic.name;
            let sought = tokio::task::spawn_blocking(move || {
                consumer.seek(topic, partition, to, Duration::from_secs(10))
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
