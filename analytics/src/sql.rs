//! Read-only SQL over the history with DataFusion.
//!
//! Each query runs in its own session over one version of each Delta table, read through
//! delta-rs's DataFusion table provider: the files of that version and no others (never a
//! file written and not committed, nor both the inputs and the output of a compaction),
//! with the `date` partition column (so `WHERE date = '2026-11-23'` reads one folder) and
//! file skipping by statistics. By default that is each table's newest version; with
//! [`AsOf`] (time travel) the version of a number or a time.
//!
//! Statements other than queries (DDL, DML, `COPY`, `SET`) are refused, and the only
//! store a query can reach is the history's own, read-only ([`ReadOnlyStore`]). Each
//! query runs under a memory limit, a time limit and a bound on the rows it returns.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::execution::cache::cache_manager::{
    CacheManagerConfig, FileMetadataCache, FileStatisticsCache,
};
use datafusion::execution::cache::default_cache::DefaultCache;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::object_store::ObjectStoreRegistry;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use url::Url;

use crate::answer::StreamLimits;
pub use crate::answer::{OutputFormat, Renderer, ResultStream};
use crate::error::{AnalyticsError, Result};
use crate::store::DataRoot;
use crate::tables;
use deltalake::DeltaTableError;
use object_store::ObjectStoreExt as _;

const MEMORY_MB: usize = 1024;
const TIMEOUT_SECS: u64 = 60;
const MAX_ROWS: usize = 1_000_000;
const MAX_CONCURRENT: usize = 4;
const MAX_RESULT_MB: usize = 64;

/// Limits of one query.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryLimitsArgs {
    /// Memory a query may use for sorting, joining and aggregating, in MiB; past it the
    /// query fails with a clear error.
    #[arg(long, env = "DRONEDELIVERY_SQL_MEMORY_MB", default_value_t = MEMORY_MB)]
    pub sql_memory_mb: usize,

    /// Longest time a query may run, in seconds.
    #[arg(long, env = "DRONEDELIVERY_SQL_TIMEOUT_SECS", default_value_t = TIMEOUT_SECS)]
    pub sql_timeout_secs: u64,

    /// Most rows a query may return (aggregate, or add a LIMIT, for more).
    #[arg(long, env = "DRONEDELIVERY_SQL_MAX_ROWS", default_value_t = MAX_ROWS)]
    pub sql_max_rows: usize,

    /// Largest result a query may return, in MiB of Arrow memory, counted as it streams
    /// (HTTP and Flight SQL answers are written batch by batch, never held whole): past
    /// it the query fails with a clear error, mid-answer if need be.
    #[arg(long, env = "DRONEDELIVERY_SQL_MAX_RESULT_MB", default_value_t = MAX_RESULT_MB)]
    pub sql_max_result_mb: usize,

    /// Most queries running at once, over HTTP and Flight SQL together; others wait
    /// (their wait counts toward --sql-timeout-secs). With --sql-memory-mb this bounds
    /// the memory of queries.
    #[arg(long, env = "DRONEDELIVERY_SQL_MAX_CONCURRENT", default_value_t = MAX_CONCURRENT)]
    pub sql_max_concurrent: usize,
}

impl Default for QueryLimitsArgs {
    fn default() -> Self {
        Self {
            sql_memory_mb: MEMORY_MB,
            sql_timeout_secs: TIMEOUT_SECS,
            sql_max_rows: MAX_ROWS,
            sql_max_result_mb: MAX_RESULT_MB,
            sql_max_concurrent: MAX_CONCURRENT,
        }
    }
}

/// Arguments of the `sql` command.
#[derive(Debug, Clone, clap::Args)]
pub struct SqlArgs {
    #[command(flatten)]
    pub data: crate::store::DataArgs,

    /// How to write the result (`parquet` and `arrow` need `--output`).
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,

    /// Write the result to this file instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,

    #[command(flatten)]
    pub limits: QueryLimitsArgs,

    /// Time travel: read each table as of this version number (a table with fewer
    /// versions is read at its newest) or this time (RFC 3339, such as
    /// `2026-11-23T12:00:00Z`: each table's newest version committed by then).
    #[arg(long, value_parser = AsOf::parse)]
    pub as_of: Option<AsOf>,

    /// The query, such as `SELECT count(*) FROM delivery_requests`.
    pub query: String,
}

/// Which version of the tables a query reads (time travel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Each table as of this version number: the version itself, or the table's newest
    /// if it has fewer.
    Version(i64),
    /// Each table's newest version committed at or before this time (a table created
    /// later is empty).
    Time(DateTime<Utc>),
}

impl AsOf {
    /// Parses a version number (`12`) or an RFC 3339 time (`2026-11-23T12:00:00Z`).
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        if let Ok(version) = text.parse::<i64>() {
            return if version >= 0 {
                Ok(Self::Version(version))
            } else {
                Err(format!("a version is 0 or more, not {version}"))
            };
        }
        DateTime::parse_from_rfc3339(text)
            .map(|t| Self::Time(t.with_timezone(&Utc)))
            .map_err(|e| {
                format!(
                    "{text:?} is neither a version number nor an RFC 3339 time such as \
                     2026-11-23T12:00:00Z: {e}"
                )
            })
    }
}

impl fmt::Display for AsOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Version(v) => write!(f, "version {v}"),
            Self::Time(t) => write!(
                f,
                "{}",
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            ),
        }
    }
}

/// One query's result.
#[derive(Debug, Clone)]
pub struct QueryResult {
    /// The columns.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
}

impl QueryResult {
    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// The views registered over the tables.
///
/// `deliveries` joins a request (whose tenant is its `ownerId`: an authenticated tenant
/// may only post its own) with its events (whose tenant is the one that posted it). A
/// tier without API keys posts every request as the tenant `default`, whatever its
/// `ownerId`, so events of `default` join on the delivery id alone.
pub const VIEWS: [(&str, &str); 1] = [(
    "deliveries",
    "SELECT r.tenant, r.delivery_id, r.requested_at, r.pickup_time, r.deadline,
        e.assigned_at, e.picked_up_at, e.completed_at, e.cancelled_at,
        coalesce(e.stage, 'Created') AS stage, e.drone_id, coalesce(e.events, 0) AS events,
        date_part('epoch', e.assigned_at) - date_part('epoch', r.requested_at)
            AS seconds_to_assign,
        date_part('epoch', e.completed_at) - date_part('epoch', e.assigned_at)
            AS seconds_in_flight,
        date_part('epoch', e.completed_at) - date_part('epoch', r.requested_at)
            AS seconds_to_complete,
        e.completed_at <= r.deadline AS on_time
    FROM (
        SELECT owner_id AS tenant, delivery_id, min(ingest_time) AS requested_at,
            min(pickup_time) AS pickup_time, min(deadline) AS deadline
        FROM delivery_requests GROUP BY owner_id, delivery_id
    ) r
    LEFT JOIN (
        SELECT tenant, delivery_id, count(*) AS events,
            last_value(stage ORDER BY seq) AS stage,
            last_value(drone_id ORDER BY seq) AS drone_id,
            min(CASE WHEN stage = 'HeadedToPickup' THEN at END) AS assigned_at,
            min(CASE WHEN stage = 'HeadedToDropoff' THEN at END) AS picked_up_at,
            min(CASE WHEN stage = 'Completed' THEN at END) AS completed_at,
            min(CASE WHEN stage = 'Cancelled' THEN at END) AS cancelled_at
        FROM delivery_events GROUP BY tenant, delivery_id
    ) e ON r.delivery_id = e.delivery_id
        AND (r.tenant = e.tenant OR e.tenant = 'default')",
)];

/// SQL over the history: opens a session over one version of each table per query.
#[derive(Clone)]
pub struct History {
    root: DataRoot,
    /// The history's store as queries see it.
    store: Arc<ReadOnlyStore>,
    /// Each table's newest version read so far (updated before each query).
    newest: Arc<tokio::sync::Mutex<BTreeMap<&'static str, deltalake::DeltaTable>>>,
    limits: QueryLimitsArgs,
    /// Parquet footers and per-file statistics, shared by every query's session: files
    /// are never rewritten (every file has a new name), so an entry never goes stale.
    footers: Arc<FileMetadataCache>,
    statistics: Arc<FileStatisticsCache>,
    /// Places for running queries (`--sql-max-concurrent`).
    running: Arc<tokio::sync::Semaphore>,
}

/// Memory for cached Parquet footers, shared by all queries.
const FOOTER_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Memory for cached per-file statistics, shared by all queries.
const STATISTICS_CACHE_BYTES: usize = 16 * 1024 * 1024;

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History")
            .field("root", &self.root.url.as_str())
            .field("limits", &self.limits)
            .finish()
    }
}

impl History {
    /// Opens the history at `data` with `limits`.
    pub async fn open(data: &str, limits: &QueryLimitsArgs) -> Result<Self> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let root = DataRoot::open(data, &cwd)?;
        let store = Arc::new(ReadOnlyStore { root: root.clone() });
        Ok(Self {
            root,
            store,
            newest: Arc::default(),
            limits: limits.clone(),
            footers: Arc::new(DefaultCache::new(FOOTER_CACHE_BYTES).with_name("history footers")),
            statistics: Arc::new(
                DefaultCache::new(STATISTICS_CACHE_BYTES).with_name("history statistics"),
            ),
            running: Arc::new(tokio::sync::Semaphore::new(
                limits.sql_max_concurrent.max(1),
            )),
        })
    }

    /// Lists the history's root: whether the store answers (for readiness).
    pub async fn check(&self) -> Result<()> {
        self.root
            .store
            .list_with_delimiter(Some(&self.root.prefix))
            .await
            .map(|_| ())
            .map_err(|source| AnalyticsError::Store {
                action: "listing the history",
                source,
            })
    }

    /// The limits queries run under.
    pub fn limits(&self) -> &QueryLimitsArgs {
        &self.limits
    }

    /// The newest version of every table that exists, read incrementally from the
    /// versions read before.
    async fn newest(&self) -> Result<BTreeMap<&'static str, deltalake::DeltaTable>> {
        let mut newest = self.newest.lock().await;
        for table in schemas::history::TABLES {
            match newest.get_mut(table.name) {
                Some(delta) => delta
                    .update_state()
                    .await
                    .map_err(tables::delta_err("reading a table's log"))?,
                None => {
                    let store: Arc<dyn ObjectStore> = Arc::clone(&self.store) as _;
                    if let Some(delta) = tables::load_with(&self.root, store, table.name).await? {
                        newest.insert(table.name, delta);
                    }
                }
            }
        }
        Ok(newest.clone())
    }

    /// `table` as of `as_of`, given its newest version (`None`: empty then).
    async fn as_of(
        &self,
        table: &str,
        newest: deltalake::DeltaTable,
        as_of: AsOf,
    ) -> Result<Option<deltalake::DeltaTable>> {
        let no_such = |reason: String| AnalyticsError::NoSuchVersion {
            table: table.to_owned(),
            as_of: as_of.to_string(),
            reason,
        };
        let store: Arc<dyn ObjectStore> = Arc::clone(&self.store) as _;
        let builder = tables::builder(&self.root, store, table)?;
        match as_of {
            AsOf::Version(v) => {
                if newest
                    .version()
                    .is_none_or(|n| n <= u64::try_from(v).unwrap_or(0))
                {
                    return Ok(Some(newest));
                }
                let version = u64::try_from(v).unwrap_or(0);
                builder
                    .with_version(version)
                    .load()
                    .await
                    .map(Some)
                    .map_err(|e| match e {
                        DeltaTableError::ObjectStore { source } => AnalyticsError::Store {
                            action: "loading a table version",
                            source,
                        },
                        e => no_such(e.to_string()),
                    })
            }
            AsOf::Time(at) => {
                let delta = match builder.with_timestamp(at).load().await {
                    Ok(delta) => delta,
                    Err(DeltaTableError::ObjectStore { source }) => {
                        return Err(AnalyticsError::Store {
                            action: "loading a table version",
                            source,
                        });
                    }
                    Err(e) => return Err(no_such(e.to_string())),
                };
                // delta-rs settles on the oldest version it still has when the time is
                // older: that version must be from then, or the table must have begun
                // after it (then it was empty).
                let version = delta.version().unwrap_or(0);
                let commit = self
                    .root
                    .path(&format!("{table}/_delta_log/{version:020}.json"));
                let committed = match self.root.store.head(&commit).await {
                    Ok(meta) => meta.last_modified,
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(no_such(format!("version {version}'s commit is gone")));
                    }
                    Err(source) => {
                        return Err(AnalyticsError::Store {
                            action: "reading a commit's time",
                            source,
                        });
                    }
                };
                if committed <= at {
                    Ok(Some(delta))
                } else if version == 0 {
                    Ok(None)
                } else {
                    Err(no_such(format!(
                        "the oldest version kept ({version}) was committed later, at {committed}"
                    )))
                }
            }
        }
    }

    /// A session over one version of each table (the newest, or as of `as_of`), with
    /// every table and view.
    async fn session(&self, as_of: Option<AsOf>) -> Result<SessionContext> {
        let newest = self.newest().await?;
        let store_url =
            Url::parse(&self.root.store_url()).map_err(|e| AnalyticsError::Location {
                location: self.root.url.to_string(),
                reason: e.to_string(),
            })?;
        let registry = Arc::new(OnlyHistory {
            url: store_url,
            store: Arc::clone(&self.store),
        });
        let caches = CacheManagerConfig::default()
            .with_list_files_cache_limit(0)
            .with_file_metadata_cache(Some(Arc::clone(&self.footers)))
            .with_metadata_cache_limit(FOOTER_CACHE_BYTES)
            .with_file_statistics_cache(Some(Arc::clone(&self.statistics)))
            .with_file_statistics_cache_limit(STATISTICS_CACHE_BYTES);
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(caches)
            .with_object_store_registry(registry)
            .with_memory_limit(self.limits.sql_memory_mb.max(1) * 1024 * 1024, 1.0)
            // No spilling: a query over its memory fails cleanly instead of filling the
            // server's disk.
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()
            .map_err(query_err)?;
        // Strings as Utf8, as the tables declare them (not the view types DataFusion
        // would read Parquet strings as), so that answers keep their schemas.
        let config = SessionConfig::new().with_information_schema(true).set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        );
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        for table in schemas::history::TABLES {
            let delta = match (newest.get(table.name), as_of) {
                (None, _) => None,
                (Some(delta), None) => Some(delta.clone()),
                (Some(delta), Some(as_of)) => self.as_of(table.name, delta.clone(), as_of).await?,
            };
            let provider: Arc<dyn TableProvider> = match delta {
                // The session's settings (no view types) apply to the scan.
                Some(delta) => delta
                    .table_provider()
                    .with_session(Arc::new(ctx.state()))
                    .await
                    .map_err(query_err)?,
                None => Arc::new(
                    MemTable::try_new(tables::delta_schema(&table), vec![vec![]])
                        .map_err(query_err)?,
                ),
            };
            ctx.register_table(table.name, provider)
                .map_err(query_err)?;
        }
        for (name, body) in VIEWS {
            ctx.sql(&format!("CREATE VIEW {name} AS {body}"))
                .await
                .map_err(query_err)?;
        }
        Ok(ctx)
    }

    /// Plans one read-only query.
    async fn plan(
        &self,
        sql: &str,
        as_of: Option<AsOf>,
    ) -> Result<datafusion::dataframe::DataFrame> {
        let ctx = self.session(as_of).await?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        ctx.sql_with_options(sql, options)
            .await
            .map_err(read_only_or_query)
    }

    /// The columns a read-only query would return, without running it.
    pub async fn schema(&self, sql: &str) -> Result<SchemaRef> {
        let timeout = Duration::from_secs(self.limits.sql_timeout_secs.max(1));
        let frame = tokio::time::timeout(timeout, self.plan(sql, None))
            .await
            .map_err(|_| AnalyticsError::Timeout { limit: timeout })??;
        Ok(Arc::new(frame.schema().as_arrow().clone()))
    }

    /// Starts one read-only query: its result streams batch by batch within the
    /// query's limits (see [`ResultStream`]). Planning and the wait for a place count
    /// toward the time limit.
    pub async fn query_stream(&self, sql: &str) -> Result<ResultStream> {
        self.query_stream_as_of(sql, None).await
    }

    /// [`History::query_stream`] over the tables as of `as_of` (time travel), or their
    /// newest versions.
    pub async fn query_stream_as_of(&self, sql: &str, as_of: Option<AsOf>) -> Result<ResultStream> {
        let timeout = Duration::from_secs(self.limits.sql_timeout_secs.max(1));
        let limits = StreamLimits {
            max_rows: self.limits.sql_max_rows,
            max_mb: self.limits.sql_max_result_mb.max(1),
            timeout,
        };
        let started = std::time::Instant::now();
        let start = async {
            let place = Arc::clone(&self.running)
                .acquire_owned()
                .await
                .map_err(|_| AnalyticsError::Timeout { limit: timeout })?;
            let frame = self.plan(sql, as_of).await?;
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let batches = frame.execute_stream().await.map_err(query_err)?;
            Ok(ResultStream::new(schema, batches, limits, started, place))
        };
        let stream = tokio::time::timeout(timeout, start)
            .await
            .map_err(|_| AnalyticsError::Timeout { limit: timeout })
            .and_then(|started| started);
        if stream.is_err() {
            metrics::counter!("sql_queries_total", "outcome" => "error").increment(1);
        }
        stream
    }

    /// Runs one read-only query and collects its result (within the same limits).
    pub async fn query(&self, sql: &str) -> Result<QueryResult> {
        self.query_as_of(sql, None).await
    }

    /// [`History::query`] over the tables as of `as_of`.
    pub async fn query_as_of(&self, sql: &str, as_of: Option<AsOf>) -> Result<QueryResult> {
        let mut stream = self.query_stream_as_of(sql, as_of).await?;
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            batches.push(batch?);
        }
        Ok(QueryResult {
            schema: stream.schema(),
            batches,
        })
    }
}

fn query_err(source: datafusion::error::DataFusionError) -> AnalyticsError {
    AnalyticsError::Query { source }
}

/// DataFusion reports refused statement kinds as plan errors saying "not supported";
/// those become [`AnalyticsError::ReadOnly`].
fn read_only_or_query(source: datafusion::error::DataFusionError) -> AnalyticsError {
    let text = source.to_string();
    let refused = [
        "DDL not supported",
        "DML not supported",
        "Statement not supported",
    ];
    if refused.iter().any(|r| text.contains(r)) {
        AnalyticsError::ReadOnly {
            reason: text
                .trim_start_matches("Error during planning: ")
                .to_owned(),
        }
    } else {
        AnalyticsError::Query { source }
    }
}

/// Renders a collected result in `format`, an aligned table's text within `max_mb` MiB
/// (see [`Renderer::bounded`]).
pub fn render(result: &QueryResult, format: OutputFormat, max_mb: usize) -> Result<Vec<u8>> {
    let mut renderer = Renderer::new(Arc::clone(&result.schema), format)?.bounded(max_mb);
    let mut out = Vec::new();
    for batch in &result.batches {
        out.extend_from_slice(&renderer.write(batch)?);
    }
    out.extend_from_slice(&renderer.finish()?);
    Ok(out)
}

/// The object store registry of a query session: the history's store and nothing else,
/// so a query cannot read other files or stores.
#[derive(Debug)]
struct OnlyHistory {
    url: Url,
    store: Arc<ReadOnlyStore>,
}

impl ObjectStoreRegistry for OnlyHistory {
    fn register_store(
        &self,
        _url: &Url,
        _store: Arc<dyn ObjectStore>,
    ) -> Option<Arc<dyn ObjectStore>> {
        None
    }

    fn get_store(&self, url: &Url) -> datafusion::error::Result<Arc<dyn ObjectStore>> {
        // Host and port, without user info: delta-rs names an Azure store
        // `abfss://account.dfs.core.windows.net` for the root
        // `abfss://container@account.dfs.core.windows.net/...`. The store itself refuses
        // paths outside the root.
        let place = |u: &Url| {
            (
                u.scheme().to_owned(),
                u.host_str().map(str::to_owned),
                u.port(),
            )
        };
        if place(url) == place(&self.url) {
            let store: Arc<dyn ObjectStore> = Arc::clone(&self.store) as _;
            Ok(store)
        } else {
            Err(datafusion::error::DataFusionError::Plan(format!(
                "only the history can be read, not {url}"
            )))
        }
    }
}

/// The history's store as queries see it: reads and listings under the history root
/// only; writes, copies and deletes refused.
#[derive(Debug)]
pub struct ReadOnlyStore {
    root: DataRoot,
}

impl fmt::Display for ReadOnlyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "history({}, read-only)", self.root.url)
    }
}

fn refused(what: &str) -> object_store::Error {
    object_store::Error::NotSupported {
        source: format!("the history is read-only here: {what} refused").into(),
    }
}

impl ReadOnlyStore {
    fn readable(&self, location: &Path) -> object_store::Result<()> {
        if self.root.relative(location).is_some() {
            Ok(())
        } else {
            Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: "outside the history".into(),
            })
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for ReadOnlyStore {
    async fn put_opts(
        &self,
        _location: &Path,
        _payload: PutPayload,
        _opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        Err(refused("put"))
    }

    async fn put_multipart_opts(
        &self,
        _location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(refused("put"))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.readable(location)?;
        self.root.store.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.readable(location)?;
        self.root.store.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        locations.map(|_| Err(refused("delete"))).boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let prefix = prefix.cloned().unwrap_or_default();
        if let Err(e) = self.readable(&prefix) {
            return futures_util::stream::once(async move { Err(e) }).boxed();
        }
        self.root.store.list(Some(&prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let prefix = prefix.cloned().unwrap_or_default();
        if let Err(e) = self.readable(&prefix) {
            return futures_util::stream::once(async move { Err(e) }).boxed();
        }
        self.root.store.list_with_offset(Some(&prefix), offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let prefix = prefix.cloned().unwrap_or_default();
        self.readable(&prefix)?;
        self.root.store.list_with_delimiter(Some(&prefix)).await
    }

    async fn copy_opts(
        &self,
        _from: &Path,
        _to: &Path,
        _options: CopyOptions,
    ) -> object_store::Result<()> {
        Err(refused("copy"))
    }
}
