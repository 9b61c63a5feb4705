//! How the history's Parquet files (and query results asked for as Parquet) are encoded:
//! zstd with page statistics. The sink and compaction hand these properties to delta-rs's
//! writers; the SQL renderer uses them for Parquet answers.
//!
//! It must not write files or name them: delta-rs does, for the tables.

use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

/// zstd and page statistics.
pub(crate) fn properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .build()
}
