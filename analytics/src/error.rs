//! The one error type of the analytics crate.

/// What can go wrong in the history sink or a query.
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    /// The `--data` location is malformed or not supported.
    #[error("data location {location:?}: {reason}")]
    Location {
        /// What was given.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing the object store failed.
    #[error("object store error while {action}: {source}")]
    Store {
        /// What the sink was doing.
        action: &'static str,
        /// The store's error.
        source: object_store::Error,
    },
    /// delta-rs failed (other than on a store error).
    #[error("delta table error while {action}: {source}")]
    Delta {
        /// What was being done.
        action: &'static str,
        /// delta-rs's error.
        source: Box<deltalake::DeltaTableError>,
    },
    /// The version or time asked for (`--as-of`) is not in a table's history.
    #[error("no version of {table} as of {as_of}: {reason}")]
    NoSuchVersion {
        /// The table.
        table: String,
        /// What was asked.
        as_of: String,
        /// Why.
        reason: String,
    },
    /// Another writer committed offsets this sink had read: its buffered rows were
    /// dropped and could not be read again.
    #[error("history sink fenced: {reason}")]
    Fenced {
        /// What happened.
        reason: String,
    },
    /// A crash injected by a test.
    #[error("injected failure at {0:?}")]
    Injected(crate::failpoint::FailPoint),
    /// Encoding a Parquet file failed.
    #[error("parquet error while {action}: {source}")]
    Parquet {
        /// What the sink was doing.
        action: &'static str,
        /// The Parquet error.
        source: parquet::errors::ParquetError,
    },
    /// Building Arrow data failed.
    #[error("arrow error while {action}: {source}")]
    Arrow {
        /// What was being built.
        action: &'static str,
        /// The Arrow error.
        source: arrow::error::ArrowError,
    },
    /// The statement is not a read-only query.
    #[error("only read-only queries are allowed: {reason}")]
    ReadOnly {
        /// What was refused.
        reason: String,
    },
    /// The query failed (syntax, planning, execution or a limit).
    #[error("query failed: {source}")]
    Query {
        /// DataFusion's error.
        source: datafusion::error::DataFusionError,
    },
    /// The query returns more rows than allowed.
    #[error("the result has more than {limit} rows; aggregate or add a LIMIT")]
    TooManyRows {
        /// The limit.
        limit: usize,
    },
    /// The query's result is larger than allowed.
    #[error(
        "the result is larger than {limit_mb} MiB (--sql-max-result-mb); select fewer or \
         smaller columns, aggregate, or add a LIMIT"
    )]
    ResultTooLarge {
        /// The limit in MiB.
        limit_mb: usize,
    },
    /// The query ran longer than the time limit.
    #[error("query exceeded the time limit of {limit:?}")]
    Timeout {
        /// The limit.
        limit: std::time::Duration,
    },
    /// The Kafka boundary failed.
    #[error("{source}")]
    Bus {
        /// The bus error.
        #[from]
        source: bus::BusError,
    },
    /// A background task failed.
    #[error("task failed: {reason}")]
    Task {
        /// What happened.
        reason: String,
    },
}

impl AnalyticsError {
    /// Whether the store failed (a full disk, a store that is down, a timeout), also
    /// under delta-rs or its kernel: worth trying again. A store that cannot do what is
    /// asked (no conditional put) is not.
    pub fn is_store(&self) -> bool {
        match self {
            Self::Store { source, .. } => transient(source),
            Self::Delta { source, .. } => store_failure(source.as_ref()),
            _ => false,
        }
    }

    /// Whether a query failed on one of its limits (memory, rows, time) rather than on
    /// what it asked.
    pub fn is_over_limit(&self) -> bool {
        match self {
            Self::TooManyRows { .. } | Self::ResultTooLarge { .. } | Self::Timeout { .. } => true,
            Self::Query { source } => {
                matches!(
                    source,
                    datafusion::error::DataFusionError::ResourcesExhausted(_)
                ) || source.to_string().contains("Resources exhausted")
            }
            _ => false,
        }
    }
}

/// Whether an object store error may pass: not a store that cannot do what is asked.
fn transient(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. }
    )
}

/// Whether a store failure is somewhere in `error` or its causes: an object store or I/O
/// error, also as the kernel carries them (in its own variants, or behind a backtrace).
fn store_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(store) = e.downcast_ref::<object_store::Error>() {
            return transient(store);
        }
        if e.is::<std::io::Error>() {
            return true;
        }
        if let Some(delta) = e.downcast_ref::<deltalake::DeltaTableError>() {
            match delta {
                deltalake::DeltaTableError::ObjectStore { source } => return transient(source),
                deltalake::DeltaTableError::Io { .. } => return true,
                deltalake::DeltaTableError::KernelError(kernel) => return kernel_failure(kernel),
                _ => {}
            }
        }
        if let Some(kernel) = e.downcast_ref::<delta_kernel::Error>()
            && kernel_failure(kernel)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A store failure as delta-rs' kernel carries it.
fn kernel_failure(error: &delta_kernel::Error) -> bool {
    match error {
        delta_kernel::Error::Backtraced { source, .. } => kernel_failure(source),
        delta_kernel::Error::ObjectStore(e) => transient(e),
        delta_kernel::Error::IOError(_)
        | delta_kernel::Error::Reqwest(_)
        | delta_kernel::Error::FileNotFound(_) => true,
        delta_kernel::Error::Parquet(e) => store_failure(e),
        other => std::error::Error::source(other).is_some_and(store_failure),
    }
}

/// The analytics result type.
pub type Result<T, E = AnalyticsError> = std::result::Result<T, E>;
