//! The history of the pipeline and the SQL that analysts run over it.
//!
//! - [`history`]: the history service, the sink and periodic compaction side by side;
//!   what the binary runs.
//! - [`sink`]: consumes every event topic and writes its records to Delta Lake tables on
//!   an object store (local, S3, Azure, GCS), one per topic, partitioned by ingest date,
//!   exactly once.
//! - [`tables`]: the Delta tables through delta-rs: opening and creating them, and the
//!   exactly-once commit of a roll (`txn` actions per topic partition).
//! - [`compact`]: Delta `OPTIMIZE` and `VACUUM`.
//! - `parquet_files` (internal): how files are encoded, for the tables and the SQL
//!   renderer.
//! - [`rows`]: Kafka records into Arrow rows of the history tables.
//! - [`sql`]: read-only DataFusion SQL over one version of each table (or an earlier
//!   one: time travel), with limits and formats.
//! - [`flight`]: the same SQL over Arrow Flight SQL; `connections` (internal) bounds its
//!   connections.
//! - [`store`]: where the history lives (the `--data` URL).
//! - [`failpoint`]: where a test makes the sink crash.
//!
//! This crate is the only one that imports deltalake, datafusion, parquet, object_store
//! and arrow-flight. It never imports the ingestion or processor crates: it meets them only
//! through topics named in `schemas` (and the binary wires its SQL into the HTTP tier).

mod answer;
pub mod compact;
mod connections;
mod error;
pub mod failpoint;
pub mod flight;
pub mod history;
mod parquet_files;
pub mod rows;
pub mod sink;
pub mod sql;
pub mod store;
pub mod tables;

pub use connections::ConnectionLimits;
pub use error::{AnalyticsError, Result};
