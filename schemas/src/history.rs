//! The Arrow schemas of the history tables and where their files live.
//!
//! Each table is a folder under the history root, partitioned Hive-style by the UTC date a
//! record was ingested: `delivery_requests/date=2026-11-23/<file>.parquet`. The `date`
//! column comes from the folder name, not from the file.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::topics::{self, Topic};

/// The name of the partition column every history table has.
pub const DATE_PARTITION: &str = "date";

/// Key of the Parquet key-value metadata entry that records which Kafka offsets a file
/// covers (JSON: `{"topic": .., "partitions": {"<partition>": [first, last]}}`).
pub const OFFSETS_METADATA_KEY: &str = "dronedelivery.kafka.offsets";

/// One table of the history.
#[derive(Debug, Clone, Copy)]
pub struct HistoryTable {
    /// The SQL name of the table, also the folder its files live in.
    pub name: &'static str,
    /// The topic the table is filled from.
    pub topic: Topic,
    /// The Arrow schema of its files (without the `date` partition column).
    pub schema: fn() -> SchemaRef,
}

/// One row per accepted delivery request.
pub const DELIVERY_REQUESTS: HistoryTable = HistoryTable {
    name: "delivery_requests",
    topic: topics::DELIVERY_REQUESTS,
    schema: delivery_requests_schema,
};

/// Every history table.
pub const TABLES: [HistoryTable; 1] = [DELIVERY_REQUESTS];

fn utc(unit: TimeUnit) -> DataType {
    DataType::Timestamp(unit, Some("UTC".into()))
}

/// The schema of `delivery_requests` files.
pub fn delivery_requests_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("delivery_id", DataType::Utf8, false),
        Field::new("owner_id", DataType::Utf8, false),
        Field::new("pickup_latitude", DataType::Float64, false),
        Field::new("pickup_longitude", DataType::Float64, false),
        Field::new("dropoff_latitude", DataType::Float64, false),
        Field::new("dropoff_longitude", DataType::Float64, false),
        Field::new("pickup_time", utc(TimeUnit::Microsecond), false),
        Field::new("deadline", utc(TimeUnit::Microsecond), false),
        Field::new("expedited", DataType::Boolean, false),
        Field::new("confirmation_required", DataType::Utf8, false),
        Field::new("package_id", DataType::Utf8, false),
        Field::new("package_size", DataType::Utf8, false),
        Field::new("package_weight", DataType::Float64, false),
        Field::new("package_tag", DataType::Utf8, true),
        Field::new("ingest_time", utc(TimeUnit::Millisecond), false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]))
}

/// The folder of one day's files of a table, relative to the history root.
pub fn partition_dir(table: &str, date: chrono::NaiveDate) -> String {
    format!("{table}/{DATE_PARTITION}={}", date.format("%Y-%m-%d"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_dir_is_hive_style() {
        let d = chrono::NaiveDate::from_ymd_opt(2026, 11, 3).unwrap();
        assert_eq!(
            partition_dir("delivery_requests", d),
            "delivery_requests/date=2026-11-03"
        );
    }

    #[test]
    fn schemas_have_no_partition_column() {
        for t in TABLES {
            assert!((t.schema)().field_with_name(DATE_PARTITION).is_err());
        }
    }
}
