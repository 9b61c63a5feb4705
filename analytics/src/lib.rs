//! The history of the pipeline and the SQL that analysts run over it.
//!
//! - [`sink`]: consumes every event topic and writes its records as Parquet files to an
//!   object store (local, S3, Azure, GCS), partitioned Hive-style by table and ingest
//!   date, exactly once through the [`log`].
//! - [`log`]: the table log, which files make up the history and which Kafka offsets
//!   they hold.
//! - [`compact`]: merging small files and deleting replaced ones.
//! - [`sql`]: read-only DataFusion SQL over one log version, with limits and formats.
//! - [`flight`]: the same SQL over Arrow Flight SQL.
//! - [`store`]: where the history lives (the `--data` URL).
//!
//! This crate is the only one that imports datafusion, parquet, object_store and
//! arrow-flight. It never imports the ingestion or processor crates: it meets them only
//! through topics named in `schemas` (and the binary wires its SQL into the HTTP tier).

pub mod compact;
mod error;
pub mod flight;
pub mod log;
pub mod rows;
pub mod sink;
pub mod sql;
pub mod store;

pub use error::{AnalyticsError, Result};
