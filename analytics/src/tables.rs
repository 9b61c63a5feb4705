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
    /// A commit that landed first carried one of the same app ids, or others kept taking
    /// the version it tried. Nothing of it is in the table, unless the store took it and
    /// its answer was lost (then the table holds its offsets and files).
    #[error("concurrent commits refused it: {reason}")]
    Concurrent {
        /// delta-rs's words.
        reason: String,
    },
    /// Its files took so long that vacuum may have deleted them as orphans.
    #[error("its files were written too long ago to commit safely")]
    TooSlow,
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

/// The last part of a file's path in a table (its name, unique per file).
pub fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The store path of a file of `table` from its (URL-encoded) path in an `add` action.
pub fn file_path(root: &DataRoot, table: &str, add_path: &str) -> Result<object_store::path::Path> {
    let relative = object_store::path::Path::from_url_path(add_path).map_err(|e| {
        AnalyticsError::Location {
            location: add_path.to_owned(),
            reason: e.to_string(),
        }
    })?;
    Ok(relative
        .parts()
        .fold(root.path(table), |path, part| path.join(part)))
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
            // Version 0 or nothing: a creator that lost the race must not commit its
            // metadata again on top of the winner's.
            .with_commit_properties(CommitProperties::default().with_max_retries(0))
            .await;
        let delta = match created {
            Ok(delta) => delta,
            // Another writer created it first.
            Err(
                DeltaTableError::VersionAlreadyExists(_)
                | DeltaTableError::Transaction {
                    source: TransactionError::MaxCommitAttempts(_),
                },
            ) => load(root, table.name)
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

    /// The file names (the last part of each path, unique) of the loaded version's files.
    pub fn file_names(&self) -> Result<std::collections::BTreeSet<String>> {
        Ok(self
            .delta
            .snapshot()
            .map_err(delta_err("listing a table's files"))?
            .log_data()
            .iter()
            .map(|f| file_name(&f.path()).to_owned())
            .collect())
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

    /// A writer of new Parquet files of the table (delta-rs's, which puts each file's
    /// statistics in its `add` action), with `properties`.
    pub fn writer(
        &self,
        properties: parquet::file::properties::WriterProperties,
    ) -> Result<RecordBatchWriter> {
        Ok(RecordBatchWriter::for_table(&self.delta)
            .map_err(delta_err("writing Parquet files"))?
            .with_writer_properties(properties))
    }

    /// Writes `files` (one batch per date, of the table's file schema) as Parquet files
    /// of the table, returning their `add` actions. Nothing is committed: the files are
    /// read by nobody until [`Table::commit_roll`] names them.
    pub async fn write_files(
        &self,
        files: &[(NaiveDate, RecordBatch)],
        properties: parquet::file::properties::WriterProperties,
    ) -> Result<Vec<Add>> {
        let mut writer = self.writer(properties)?;
        for (date, batch) in files {
            write_batch(&mut writer, batch, *date).await?;
        }
        writer
            .flush()
            .await
            .map_err(delta_err("writing Parquet files"))
    }

    /// Commits `adds` with the offsets `read` (per partition of the table's topic) as one
    /// version, if the table holds none of them yet, no concurrent commit carried the
    /// same partitions, and `deadline` (after which vacuum may have deleted the files as
    /// orphans) has not passed. Returns the new version, or why it was refused. Refused
    /// for offsets the table holds or for the deadline, nothing of this attempt is in the
    /// table; refused by concurrent commits, the store may still have taken it (its
    /// answer lost), so its files are not deleted. A store error may also come after the
    /// commit landed: the next attempt then finds the offsets in the table.
    pub async fn commit_roll(
        &mut self,
        scope: &str,
        read: &BTreeMap<i32, OffsetRange>,
        adds: Vec<Add>,
        epoch: i64,
        deadline: std::time::Instant,
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
        if std::time::Instant::now() > deadline {
            return Ok(Err(Conflict::TooSlow));
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
        let metadata = [
            ("dronedelivery.writer".to_owned(), "sink".into()),
            (
                "dronedelivery.topic".to_owned(),
                format!("{scope}{}", self.table.topic.name).into(),
            ),
            (
                "dronedelivery.offsets".to_owned(),
                serde_json::Value::Object(offsets),
            ),
        ];
        let operation = DeltaOperation::StreamingUpdate {
            output_mode: OutputMode::Append,
            query_id: format!("dronedelivery-history-{}", self.table.name),
            epoch_id: epoch,
        };
        self.commit(actions, operation, metadata).await
    }

    /// Commits a compaction of the loaded version: `adds` (the merged files) and
    /// `removes` (the files they replace), both with `dataChange=false`, and a `txn` of
    /// the table's compaction app id, so that of two compactions racing on the table one
    /// commits and the other is refused (delta-rs lets two commits remove the same files
    /// with `dataChange=false`, which would keep both merged copies).
    /// Refused past `deadline` (vacuum may have deleted the merged files as orphans). The
    /// removes are dated now: the retention of the replaced files counts from the commit.
    pub async fn commit_compaction(
        &mut self,
        adds: Vec<Add>,
        removes: Vec<deltalake::kernel::Remove>,
        target_size: i64,
        deadline: std::time::Instant,
    ) -> Result<std::result::Result<u64, Conflict>> {
        if std::time::Instant::now() > deadline {
            return Ok(Err(Conflict::TooSlow));
        }
        let now = chrono::Utc::now().timestamp_millis();
        let removes = removes.into_iter().map(|mut remove| {
            remove.deletion_timestamp = Some(now);
            remove.data_change = false;
            remove
        });
        let read_version = self.delta.version().unwrap_or(0);
        let mut actions: Vec<Action> = adds
            .into_iter()
            .map(|mut add| {
                add.data_change = false;
                Action::Add(add)
            })
            .collect();
        actions.extend(removes.map(Action::Remove));
        actions.push(Action::Txn(Transaction::new_with_last_update(
            compaction_app_id(self.table.name),
            i64::try_from(read_version).unwrap_or(i64::MAX),
            Some(now),
        )));
        let metadata = [("dronedelivery.writer".to_owned(), "compaction".into())];
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size,
        };
        self.commit(actions, operation, metadata).await
    }

    /// Commits `actions` on the loaded version (delta-rs resolves races with commits that
    /// landed since, refusing on a conflict), then writes a checkpoint when one is due.
    async fn commit<const N: usize>(
        &mut self,
        actions: Vec<Action>,
        operation: DeltaOperation,
        metadata: [(String, serde_json::Value); N],
    ) -> Result<std::result::Result<u64, Conflict>> {
        let snapshot = self
            .delta
            .snapshot()
            .map_err(delta_err("committing to a table"))?;
        let prepared = CommitBuilder::from(CommitProperties::default().with_metadata(metadata))
            .with_actions(actions)
            .build(Some(snapshot), self.delta.log_store(), operation)
            .into_prepared_commit_future()
            .await
            .map_err(delta_err("committing to a table"))?;
        let landed = match prepared.await {
            Ok(landed) => landed,
            // A commit that landed since carries one of the same app ids; or every version
            // it tried was taken (the last of them may be this very commit, its answer
            // lost: the table tells).
            Err(DeltaTableError::Transaction {
                source:
                    e @ (TransactionError::CommitConflict(_) | TransactionError::MaxCommitAttempts(_)),
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

/// The `txn` app id every compaction of `table` carries.
pub fn compaction_app_id(table: &str) -> String {
    format!("dronedelivery-compaction-{table}")
}

/// Writes `batch` (of a table's file schema) into `writer` as rows of `date`.
pub async fn write_batch(
    writer: &mut RecordBatchWriter,
    batch: &RecordBatch,
    date: NaiveDate,
) -> Result<()> {
    writer
        .write(with_date(batch, date)?)
        .await
        .map_err(delta_err("writing Parquet files"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A commit deadline that does not pass during a test.
    fn far() -> std::time::Instant {
        std::time::Instant::now() + std::time::Duration::from_secs(3600)
    }

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

    /// Rolls commit their offsets as txn versions; delta-rs writes a checkpoint within
    /// 100 versions (its default interval), from which a fresh reader gets the same
    /// offsets; a roll overlapping them is refused and commits nothing.
    #[tokio::test]
    async fn rolls_commit_offsets_and_checkpoints_keep_them() {
        let dir = tempfile::tempdir().unwrap();
        let root =
            DataRoot::open(&dir.path().display().to_string(), std::path::Path::new("/")).unwrap();
        let mut table = Table::open_or_create(&root, history::TELEMETRY)
            .await
            .unwrap();
        assert_eq!(table.next_offset("", 0).await.unwrap(), None);
        for i in 0..100_i64 {
            let read = BTreeMap::from([(0, range(i * 10, i * 10 + 10)), (1, range(i, i + 1))]);
            let version = table
                .commit_roll("", &read, Vec::new(), i, far())
                .await
                .unwrap();
            assert_eq!(version, Ok(u64::try_from(i).unwrap() + 1));
        }
        let log = dir.path().join("telemetry/_delta_log");
        assert!(log.join("_last_checkpoint").exists());
        let checkpoints = std::fs::read_dir(&log)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .ends_with(".checkpoint.parquet")
            })
            .count();
        assert_eq!(checkpoints, 1);
        let fresh = Table {
            table: history::TELEMETRY,
            delta: load(&root, "telemetry").await.unwrap().unwrap(),
        };
        assert_eq!(fresh.delta.version(), Some(100));
        assert_eq!(fresh.next_offset("", 0).await.unwrap(), Some(1000));
        assert_eq!(fresh.next_offset("", 1).await.unwrap(), Some(100));
        assert_eq!(fresh.next_offset("other-scope/", 1).await.unwrap(), None);
        let overlap = BTreeMap::from([(1, range(99, 101))]);
        let refused = table
            .commit_roll("", &overlap, Vec::new(), 100, far())
            .await
            .unwrap();
        assert!(
            matches!(refused, Err(Conflict::Offsets { next: 100, .. })),
            "{refused:?}"
        );
        assert_eq!(table.delta.version(), Some(100));
        // A second creator finds the table there.
        let again = Table::open_or_create(&root, history::TELEMETRY)
            .await
            .unwrap();
        assert_eq!(again.delta.version(), Some(100));
    }

    /// A store whose first put-if-absent under `_delta_log/` lands but answers "already
    /// exists", as a client's retry of a put whose first answer was lost does.
    #[derive(Debug)]
    struct LostAnswer {
        inner: object_store::local::LocalFileSystem,
        tripped: std::sync::atomic::AtomicBool,
    }

    impl std::fmt::Display for LostAnswer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("lost-answer")
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for LostAnswer {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let create = matches!(opts.mode, object_store::PutMode::Create)
                && location.as_ref().contains("_delta_log/");
            let result = self.inner.put_opts(location, payload, opts).await;
            if create
                && result.is_ok()
                && !self.tripped.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(object_store::Error::AlreadyExists {
                    path: location.to_string(),
                    source: "the retry found the first attempt's object".into(),
                });
            }
            result
        }

        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures_util::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A commit whose answer was lost (the store took it; a retry found it there) is
    /// refused as a conflict, and the table shows it was ours: its files are live and its
    /// offsets held, so the sink deletes nothing and reads on after them.
    #[tokio::test]
    async fn a_commit_whose_answer_was_lost_is_found_in_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut root =
            DataRoot::open(&dir.path().display().to_string(), std::path::Path::new("/")).unwrap();
        let table = Table::open_or_create(&root, history::DEAD_LETTERS).await;
        drop(table);
        root.store = Arc::new(LostAnswer {
            inner: object_store::local::LocalFileSystem::new(),
            tripped: std::sync::atomic::AtomicBool::new(false),
        });
        let mut table = Table::open_or_create(&root, history::DEAD_LETTERS)
            .await
            .unwrap();
        let mut rows = crate::rows::TableRows::new("dead_letters").unwrap();
        rows.append(&crate::rows::RecordView {
            key: Some(b"k"),
            payload: b"p",
            event_type: None,
            drone_id: None,
            dead_letter_reason: Some(b"why"),
            dead_letter_source: Some(b"where"),
            from: crate::rows::Provenance {
                key: Some(b"k"),
                partition: 0,
                offset: 7,
                ingest_millis: 1_795_435_200_000,
            },
        })
        .unwrap();
        let date = NaiveDate::from_ymd_opt(2026, 11, 23).unwrap();
        let adds = table
            .write_files(
                &[(date, rows.finish().unwrap())],
                crate::parquet_files::properties(),
            )
            .await
            .unwrap();
        assert_eq!(adds.len(), 1);
        let read = BTreeMap::from([(0, range(7, 8))]);
        let refused = table
            .commit_roll("", &read, adds.clone(), 1, far())
            .await
            .unwrap();
        assert!(
            matches!(refused, Err(Conflict::Concurrent { .. })),
            "{refused:?}"
        );
        table.refresh().await.unwrap();
        assert!(
            table
                .file_names()
                .unwrap()
                .contains(file_name(&adds[0].path))
        );
        assert_eq!(table.next_offset("", 0).await.unwrap(), Some(8));
        let path = file_path(&root, "dead_letters", &adds[0].path).unwrap();
        assert!(
            std::path::Path::new("/").join(path.as_ref()).exists(),
            "{path}"
        );
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
