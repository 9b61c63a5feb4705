//! The history's Delta Lake tables, through delta-rs: where each one lives, how it is
//! opened or created, and how a roll's files join it exactly once.
//!
//! - Each table of [`schemas::history::TABLES`] is a Delta table at `<root>/<table>/`,
//!   partitioned by the string column `date` (the UTC ingest date, `YYYY-MM-DD`).
//! - **Exactly once.** Every commit of the sink carries one `txn` action per topic
//!   partition it read: app id `<scope><topic>-<partition>` ([`app_id`]), version = the
//!   last offset written. Before committing, [`Table::commit_roll`] reads the versions
//!   the table holds and refuses a roll that overlaps them ([`check`], pure): delta-rs
//!   does not refuse a repeated app id and version by itself. A concurrent commit that
//!   carries one of the roll's app ids makes delta-rs's conflict checker refuse the
//!   commit: the roll loses and commits nothing.
//! - **Put-if-absent commits** on every store: the local file system and memory use
//!   delta-rs's default log store; [`register_stores`] gives S3, Azure and GCS the same
//!   one over our `object_store` (conditional puts), so no lock table (DynamoDB) and no
//!   AWS SDK are needed.
//! - Checkpoints are written by delta-rs after a commit, every `delta.checkpointInterval`
//!   (100) versions.
//!
//! It must not read Kafka nor decide when files are written (the sink), and must not
//! compact or vacuum (compaction).

use std::collections::BTreeMap;
use std::sync::{Arc, Once};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use chrono::NaiveDate;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake::kernel::{Action, Add, StructType, Transaction};
use deltalake::logstore::{
    LogStore, LogStoreFactory, ObjectStoreRef, StorageConfig, default_logstore, logstore_factories,
};
use deltalake::protocol::{DeltaOperation, OutputMode, SaveMode};
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter};
use deltalake::{DeltaResult, DeltaTable, DeltaTableBuilder, DeltaTableError};
use schemas::history::{self, HistoryTable};
use url::Url;

use crate::error::{AnalyticsError, Result};
use crate::store::DataRoot;

/// The offsets of one topic partition a roll read: `from` (the first offset read) up
/// to, not including, `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetRange {
    /// The first offset read.
    pub from: i64,
    /// One past the last offset read.
    pub next: i64,
}

/// Why a roll's commit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// The table already holds some of the roll's offsets.
    #[error("partition {partition}: offsets from {from} are already in the table (up to {next})")]
    Offsets {
        /// The topic partition.
        partition: i32,
        /// Where the roll starts.
        from: i64,
        /// The offset the table holds up to.
        next: i64,
    },
    /// A commit that landed first carried one of the roll's app ids.
    #[error("a concurrent commit wrote the same partitions: {reason}")]
    Concurrent {
        /// delta-rs's words.
        reason: String,
    },
}

/// The `txn` app id of a topic partition: what the table's offsets of it are known by.
/// `scope` (empty for a Kafka cluster) keeps apart the offsets of buses that start
/// empty.
pub fn app_id(scope: &str, topic: &str, partition: i32) -> String {
    format!("{scope}{topic}-{partition}")
}

/// Whether a roll that read `read` may follow a table that holds, per partition, the
/// offsets up to `held` (one past the last offset written, from its `txn` versions).
/// A gap (transaction markers, records deleted by retention) is no conflict; an overlap
/// is. Pure.
pub fn check(
    read: &BTreeMap<i32, OffsetRange>,
    held: &BTreeMap<i32, i64>,
) -> std::result::Result<(), Conflict> {
    for (&partition, range) in read {
        if let Some(&next) = held.get(&partition)
            && range.from < next
        {
            return Err(Conflict::Offsets {
                partition,
                from: range.from,
                next,
            });
        }
    }
    Ok(())
}

/// The Delta schema of a history table, as Arrow: its file columns, then `date`.
pub fn delta_schema(table: &HistoryTable) -> SchemaRef {
    let files = (table.schema)();
    let mut fields: Vec<Field> = files.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(history::DATE_PARTITION, DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

/// The value of the `date` partition for a UTC date.
pub fn date_value(date: NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

/// `batch` (of a table's file schema) with its `date` column added.
fn with_date(batch: &RecordBatch, date: NaiveDate) -> Result<RecordBatch> {
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(history::DATE_PARTITION, DataType::Utf8, false));
    let mut columns = batch.columns().to_vec();
    let value = date_value(date);
    columns.push(Arc::new(arrow::array::StringArray::from_iter_values(
        std::iter::repeat_n(value.as_str(), batch.num_rows()),
    )));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|source| {
        AnalyticsError::Arrow {
            action: "adding the date column",
            source,
        }
    })
}

/// A log store over the given object store whose commits are put-if-absent: every
/// store object_store supports takes conditional puts.
#[derive(Debug, Default)]
struct PutIfAbsent;

impl LogStoreFactory for PutIfAbsent {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// Registers the put-if-absent log store for the cloud schemes `--data` accepts (once
/// per process). delta-rs knows only `file://` and `memory://` without its cloud crates.
pub fn register_stores() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let factories = logstore_factories();
        for scheme in ["s3", "gs", "az", "abfs", "abfss"] {
            if let Ok(url) = Url::parse(&format!("{scheme}://")) {
                factories.insert(url, Arc::new(PutIfAbsent));
            }
        }
    });
}

/// An error of delta-rs: a store error stays one (the sink retries those), anything else
/// is a Delta error.
pub(crate) fn delta_err(action: &'static str) -> impl FnOnce(DeltaTableError) -> AnalyticsError {
    move |source| match source {
        DeltaTableError::ObjectStore { source } => AnalyticsError::Store { action, source },
        DeltaTableError::Transaction {
            source: TransactionError::ObjectStore { source },
        } => AnalyticsError::Store { action, source },
        source => AnalyticsError::Delta {
            action,
            source: Box::new(source),
        },
    }
}

/// The URL of `table`'s folder under `root`.
fn table_url(root: &DataRoot, table: &str) -> Result<Url> {
    Url::parse(&root.table_url(table)).map_err(|e| AnalyticsError::Location {
        location: root.url.to_string(),
        reason: e.to_string(),
    })
}

/// A builder of `table` under `root` over `store` (the root's, or a read-only view of
/// it).
pub(crate) fn builder(
    root: &DataRoot,
    store: ObjectStoreRef,
    table: &str,
) -> Result<DeltaTableBuilder> {
    register_stores();
    let url = table_url(root, table)?;
    Ok(DeltaTableBuilder::from_url(url.clone())
        .map_err(delta_err("opening a table"))?
        .with_storage_backend(store, url))
}

/// Whether `table` exists under `root`: whether its `_delta_log/` holds anything.
pub(crate) async fn exists(root: &DataRoot, store: &ObjectStoreRef, table: &str) -> Result<bool> {
    let log = root.path(&format!("{table}/_delta_log"));
    match store.list_with_delimiter(Some(&log)).await {
        Ok(listed) => Ok(!listed.objects.is_empty()),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(source) => Err(AnalyticsError::Store {
            action: "looking for a table",
            source,
        }),
    }
}

/// The newest version of `table` under `root`, read through `store` (the root's, or a
/// read-only view of it), or `None` if it was never created.
pub(crate) async fn load_with(
    root: &DataRoot,
    store: ObjectStoreRef,
    table: &str,
) -> Result<Option<DeltaTable>> {
    if !exists(root, &store, table).await? {
        return Ok(None);
    }
    builder(root, store, table)?
        .load()
        .await
        .map(Some)
        .map_err(delta_err("loading a table"))
}

/// The newest version of `table`, or `None` if it was never created.
pub async fn load(root: &DataRoot, table: &str) -> Result<Option<DeltaTable>> {
    load_with(root, root.store.clone(), table).await
}

/// One history table, opened (and created if it was not there) by the sink.
pub struct Table {
    /// Which one.
    pub table: HistoryTable,
    /// The table, as of the last commit or refresh.
    pub delta: DeltaTable,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("table", &self.table.name)
            .field("version", &self.delta.version())
            .finish()
    }
}

impl Table {
    /// Opens `table` under `root`, creating it (schema, `date` partition) if it is not
    /// there. Two writers creating it at once both end up with the one that landed.
    pub async fn open_or_create(root: &DataRoot, table: HistoryTable) -> Result<Self> {
        if let Some(delta) = load(root, table.name).await? {
            return Ok(Self { table, delta });
        }
        let schema: StructType = delta_schema(&table)
            .as_ref()
            .try_into_kernel()
            .map_err(|e| AnalyticsError::Delta {
                action: "describing a table",
                source: Box::new(DeltaTableError::from(e)),
            })?;
        let blank = builder(root, root.store.clone(), table.name)?
            .build()
            .map_err(delta_err("creating a table"))?;
        let created = blank
            .create()
            .with_table_name(table.name)
            .with_comment(format!(
                "dronedelivery history: the records of the {} topic",
                table.topic.name
            ))
            .with_columns(schema.fields().cloned())
            .with_partition_columns([history::DATE_PARTITION])
            .with_save_mode(SaveMode::Ignore)
            .await;
        let delta = match created {
            Ok(delta) => delta,
            // Another writer created it first.
            Err(DeltaTableError::VersionAlreadyExists(_)) => load(root, table.name)
                .await?
                .ok_or_else(|| AnalyticsError::Delta {
                    action: "creating a table",
                    source: Box::new(DeltaTableError::NotATable(table.name.to_owned())),
                })?,
            Err(e) => return Err(delta_err("creating a table")(e)),
        };
        Ok(Self { table, delta })
    }

    /// Reads the table's newest version.
    pub async fn refresh(&mut self) -> Result<()> {
        self.delta
            .update_state()
            .await
            .map_err(delta_err("reading a table's log"))
    }

    /// The offset to read next in `partition` of the table's topic, as the loaded version
    /// holds it (`None`: none of it is in the table).
    pub async fn next_offset(&self, scope: &str, partition: i32) -> Result<Option<i64>> {
        let state = self
            .delta
            .snapshot()
            .map_err(delta_err("reading a table's offsets"))?;
        let log_store = self.delta.log_store();
        let version = state
            .transaction_version(
                log_store.as_ref(),
                app_id(scope, self.table.topic.name, partition),
            )
            .await
            .map_err(delta_err("reading a table's offsets"))?;
        Ok(version.map(|last| last + 1))
    }

    /// Writes `files` (one batch per date, of the table's file schema) as Parquet files
    /// of the table, returning their `add` actions. Nothing is committed: the files are
    /// read by nobody until [`Table::commit_roll`] names them.
    pub async fn write_files(
        &self,
        files: &[(NaiveDate, RecordBatch)],
        properties: parquet::file::properties::WriterProperties,
    ) -> Result<Vec<Add>> {
        let mut writer = RecordBatchWriter::for_table(&self.delta)
            .map_err(delta_err("writing Parquet files"))?
            .with_writer_properties(properties);
        for (date, batch) in files {
            writer
                .write(with_date(batch, *date)?)
                .await
                .map_err(delta_err("writing Parquet files"))?;
        }
        writer
            .flush()
            .await
            .map_err(delta_err("writing Parquet files"))
    }

    /// Commits `adds` with the offsets `read` (per partition of the table's topic) as one
    /// version, if the table holds none of them yet and no concurrent commit carried the
    /// same partitions. Returns the new version, or the conflict that refused it (nothing
    /// was committed then). A store error may come after the commit landed: the next
    /// attempt finds the offsets in the table, a conflict.
    pub async fn commit_roll(
        &mut self,
        scope: &str,
        read: &BTreeMap<i32, OffsetRange>,
        adds: Vec<Add>,
        epoch: i64,
    ) -> Result<std::result::Result<u64, Conflict>> {
        self.refresh().await?;
        let mut held = BTreeMap::new();
        for &partition in read.keys() {
            if let Some(next) = self.next_offset(scope, partition).await? {
                held.insert(partition, next);
            }
        }
        if let Err(conflict) = check(read, &held) {
            return Ok(Err(conflict));
        }
        let now = chrono::Utc::now().timestamp_millis();
        let mut actions: Vec<Action> = adds.into_iter().map(Action::Add).collect();
        actions.extend(read.iter().map(|(&partition, range)| {
            Action::Txn(Transaction::new_with_last_update(
                app_id(scope, self.table.topic.name, partition),
                range.next - 1,
                Some(now),
            ))
        }));
        let offsets: serde_json::Map<String, serde_json::Value> = read
            .iter()
            .map(|(p, r)| (p.to_string(), serde_json::json!([r.from, r.next])))
            .collect();
        let properties = CommitProperties::default().with_metadata([
            ("dronedelivery.writer".to_owned(), "sink".into()),
            (
                "dronedelivery.topic".to_owned(),
                format!("{scope}{}", self.table.topic.name).into(),
            ),
            (
                "dronedelivery.offsets".to_owned(),
                serde_json::Value::Object(offsets),
            ),
        ]);
        let operation = DeltaOperation::StreamingUpdate {
            output_mode: OutputMode::Append,
            query_id: format!("dronedelivery-history-{}", self.table.name),
            epoch_id: epoch,
        };
        let snapshot = self
            .delta
            .snapshot()
            .map_err(delta_err("committing to a table"))?;
        let prepared = CommitBuilder::from(properties)
            .with_actions(actions)
            .build(Some(snapshot), self.delta.log_store(), operation)
            .into_prepared_commit_future()
            .await
            .map_err(delta_err("committing to a table"))?;
        let landed = match prepared.await {
            Ok(landed) => landed,
            Err(DeltaTableError::Transaction {
                source: TransactionError::CommitConflict(e),
            }) => {
                return Ok(Err(Conflict::Concurrent {
                    reason: e.to_string(),
                }));
            }
            Err(e) => return Err(delta_err("committing to a table")(e)),
        };
        let version = landed.version;
        // The commit is in; a checkpoint that fails is retried at the next interval.
        if let Err(e) = landed.await {
            tracing::warn!(table = self.table.name, version, error = %e, "history: checkpoint after a commit failed");
        }
        if let Err(e) = self.refresh().await {
            tracing::debug!(table = self.table.name, error = %e, "history: table not re-read after its commit");
        }
        Ok(Ok(version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(from: i64, next: i64) -> OffsetRange {
        OffsetRange { from, next }
    }

    #[test]
    fn overlapping_offsets_are_refused_and_gaps_allowed() {
        let held = BTreeMap::from([(0, 10)]);
        assert_eq!(check(&BTreeMap::from([(0, range(10, 12))]), &held), Ok(()));
        assert_eq!(
            check(&BTreeMap::from([(0, range(9, 12))]), &held),
            Err(Conflict::Offsets {
                partition: 0,
                from: 9,
                next: 10
            })
        );
        // A gap (transaction markers, retention) is not a conflict, nor a partition the
        // table never saw.
        assert_eq!(check(&BTreeMap::from([(0, range(15, 16))]), &held), Ok(()));
        assert_eq!(check(&BTreeMap::from([(1, range(0, 1))]), &held), Ok(()));
    }

    #[test]
    fn app_ids_name_scope_topic_and_partition() {
        assert_eq!(app_id("", "delivery-requests", 3), "delivery-requests-3");
        assert_eq!(app_id("run-1/", "telemetry", 0), "run-1/telemetry-0");
    }

    #[test]
    fn delta_schemas_end_with_the_date_partition() {
        for table in history::TABLES {
            let schema = delta_schema(&table);
            let last = schema.fields().last().unwrap();
            assert_eq!(last.name(), history::DATE_PARTITION);
            assert_eq!(schema.fields().len(), (table.schema)().fields().len() + 1);
            let kernel: StructType = schema.as_ref().try_into_kernel().unwrap();
            assert_eq!(kernel.fields().count(), schema.fields().len());
        }
    }

    proptest::proptest! {
        /// Whatever order rolls from two writers arrive in, what the checks accept
        /// covers each offset at most once.
        #[test]
        fn accepted_rolls_never_overlap(
            ranges in proptest::collection::vec((0_i32..2, 0_i64..50, 1_i64..10), 1..40)
        ) {
            let mut held: BTreeMap<i32, i64> = BTreeMap::new();
            let mut covered: BTreeMap<(i32, i64), u32> = BTreeMap::new();
            for (partition, from, len) in ranges {
                let read = BTreeMap::from([(partition, range(from, from + len))]);
                if check(&read, &held).is_ok() {
                    for o in from..from + len {
                        *covered.entry((partition, o)).or_default() += 1;
                    }
                    held.insert(partition, from + len);
                }
            }
            proptest::prop_assert!(covered.values().all(|&n| n == 1));
        }
    }
}
