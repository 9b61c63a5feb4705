//! Read-only SQL over the history with DataFusion.
//!
//! Every history table is registered as a listing table over its folder, with the
//! Hive-style `date` partition column (so `WHERE date = '2026-11-23'` reads one folder).
//! Statements other than queries (DDL, DML, `COPY`, `SET`) are refused; each query runs
//! under a memory limit and a time limit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};

use crate::error::{AnalyticsError, Result};
use crate::store::DataRoot;

/// Output formats of the `sql` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Json,
}

const MEMORY_MB: usize = 1024;
const TIMEOUT_SECS: u64 = 60;

/// Limits of one query.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryLimits {
    /// Memory a query may use for sorting, joining and aggregating, in MiB; past it the
    /// query fails with a clear error.
    #[arg(long, env = "DRONEDELIVERY_SQL_MEMORY_MB", default_value_t = MEMORY_MB)]
    pub sql_memory_mb: usize,

    /// Longest time a query may run, in seconds.
    #[arg(long, env = "DRONEDELIVERY_SQL_TIMEOUT_SECS", default_value_t = TIMEOUT_SECS)]
    pub sql_timeout_secs: u64,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            sql_memory_mb: MEMORY_MB,
            sql_timeout_secs: TIMEOUT_SECS,
        }
    }
}

/// Arguments of the `sql` command.
#[derive(Debug, Clone, clap::Args)]
pub struct SqlArgs {
    /// Where the history lives: `file:///path`, `file://./relative/path` or a path.
    #[arg(long, env = "DRONEDELIVERY_DATA", default_value = "file://./data")]
    pub data: String,

    /// How to print the result.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,

    #[command(flatten)]
    pub limits: QueryLimits,

    /// The query, such as `SELECT count(*) FROM delivery_requests`.
    pub query: String,
}

/// A SQL session over the history, with every table registered.
#[derive(Clone)]
pub struct History {
    ctx: SessionContext,
    timeout: Duration,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl History {
    /// Opens the history at `data` with `limits`.
    pub async fn open(data: &str, limits: &QueryLimits) -> Result<Self> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        let root = DataRoot::open(data, &cwd)?;
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.sql_memory_mb.max(1) * 1024 * 1024, 1.0)
            .build_arc()
            .map_err(|source| AnalyticsError::Query { source })?;
        let config = SessionConfig::new().with_information_schema(true);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        for table in schemas::history::TABLES {
            let options = ListingOptions::new(Arc::new(ParquetFormat::default()))
                .with_file_extension(".parquet")
                .with_table_partition_cols(vec![(
                    schemas::history::DATE_PARTITION.to_owned(),
                    DataType::Utf8,
                )]);
            ctx.register_listing_table(
                table.name,
                root.table_url(table.name),
                options,
                Some((table.schema)()),
                None,
            )
            .await
            .map_err(|source| AnalyticsError::Query { source })?;
        }
        Ok(Self {
            ctx,
            timeout: Duration::from_secs(limits.sql_timeout_secs.max(1)),
        })
    }

    /// Runs one read-only query and collects its result.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let run = async {
            let frame = self
                .ctx
                .sql_with_options(sql, options)
                .await
                .map_err(read_only_or_query)?;
            frame
                .collect()
                .await
                .map_err(|source| AnalyticsError::Query { source })
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| AnalyticsError::Timeout {
                limit: self.timeout,
            })?
    }
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

/// Renders batches in `format`.
pub fn render(batches: &[RecordBatch], format: OutputFormat) -> Result<String> {
    let arrow_err = |source| AnalyticsError::Arrow {
        action: "rendering the result",
        source,
    };
    match format {
        OutputFormat::Table => arrow::util::pretty::pretty_format_batches(batches)
            .map(|t| format!("{t}\n"))
            .map_err(arrow_err),
        OutputFormat::Csv => {
            let mut out = Vec::new();
            {
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                for batch in batches {
                    writer.write(batch).map_err(arrow_err)?;
                }
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
            for batch in batches {
                writer.write(batch).map_err(arrow_err)?;
            }
            writer.finish().map_err(arrow_err)?;
            Ok(String::from_utf8_lossy(&writer.into_inner()).into_owned())
        }
    }
}
