//! The history of the pipeline and the SQL that analysts run over it.
//!
//! - [`sink`]: consumes topics and writes their records as Parquet files to an object
//!   store (`file://` here), partitioned Hive-style by table and ingest date. A record's
//!   offset is stored only once the file holding it is durable.
//! - [`sql`]: registers the history as tables in DataFusion and answers read-only SQL.
//! - [`store`]: where the history lives (the `--data` URL).
//!
//! This crate is the only one that imports datafusion, parquet and object_store. It never
//! imports the ingestion or processor crates: it meets them only through topics named in
//! `schemas`.

pub mod compact;
mod error;
pub mod flight;
pub mod log;
pub mod rows;
pub mod sink;
pub mod sql;
pub mod store;

pub use error::{AnalyticsError, Result};
