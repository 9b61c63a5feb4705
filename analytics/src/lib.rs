//! The history of the pipeline and the SQL that analysts run over it.
//!
//! - [`history`]: the history service, the sink and periodic compaction side by side;
//!   what the binary runs.
//! - [`sink`]: consumes every event topic and writes its records as Parquet files to an
//!   object store (local, S3, Azure, GCS), partitioned Hive-style by table and ingest
//!   date, exactly once through the [`log`].
//! - [`log`]: the table log, which files make up the history and which Kafka offsets
//!   they hold.
//! - [`compact`]: merging small files and deleting replaced ones.
//! - `parquet_files` (internal): encoding, naming and putting Parquet files, for the
//!   sink, compaction and the SQL renderer.
//! - [`rows`]: Kafka records into Arrow rows of the history tables.
//! - [`sql`]: read-only DataFusion SQL over one log version, with limits and formats.
//! - [`flight`]: the same SQL over Arrow Flight SQL.
//! - [`store`]: where the history lives (the `--data` URL).
//! - [`failpoint`]: where a test makes the sink crash.
//!
//! This crate is the only one that imports datafusion, parquet, object_store and
//! arrow-flight. It never imports the ingestion or processor crates: it meets them only
//! through topics named in `schemas` (and the binary wires its SQL into the HTTP tier).

mod answer;
pub mod compact;
mod error;
pub mod failpoint;
pub mod flight;
pub mod history;
pub mod log;
mod parquet_files;
pub mod rows;
pub mod sink;
pub mod sql;
pub mod store;

pub use error::{AnalyticsError, Result};
