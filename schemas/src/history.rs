//! The Arrow schemas of the history tables.
//!
//! Each table is a Delta Lake table under the history root (`delivery_requests/`),
//! partitioned by the UTC date a record was ingested: the string column `date`
//! (`2026-11-23`), whose files live in `date=2026-11-23/`. Its value is in the table's
//! log, not in the files. Every time is a UTC timestamp in microseconds (Delta's
//! `timestamp` type).

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::topics::{self, Topic};

/// The name of the partition column every history table has.
pub const DATE_PARTITION: &str = "date";

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

/// One row per stage change of a delivery: the `delivery-state` records (the delivery
/// consumer's changelog, every change in order) whose change is a stage.
pub const DELIVERY_EVENTS: HistoryTable = HistoryTable {
    name: "delivery_events",
    topic: topics::DELIVERY_STATE,
    schema: delivery_events_schema,
};

/// One row per drone assigned to a delivery (from the scheduling consumer).
pub const DRONE_ASSIGNMENTS: HistoryTable = HistoryTable {
    name: "drone_assignments",
    topic: topics::DRONE_ASSIGNMENTS,
    schema: drone_assignments_schema,
};

/// One row per position fix a drone reported.
pub const TELEMETRY: HistoryTable = HistoryTable {
    name: "telemetry",
    topic: topics::DRONE_TELEMETRY,
    schema: telemetry_schema,
};

/// One row per record a consumer could not process.
pub const DEAD_LETTERS: HistoryTable = HistoryTable {
    name: "dead_letters",
    topic: topics::DEAD_LETTERS,
    schema: dead_letters_schema,
};

/// Every history table, one per topic.
pub const TABLES: [HistoryTable; 5] = [
    DELIVERY_REQUESTS,
    DELIVERY_EVENTS,
    DRONE_ASSIGNMENTS,
    TELEMETRY,
    DEAD_LETTERS,
];

/// The table a topic's records go to.
pub fn table_of(topic: &str) -> Option<HistoryTable> {
    TABLES.into_iter().find(|t| t.topic.name == topic)
}

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
        Field::new("ingest_time", utc(TimeUnit::Microsecond), false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]))
}

/// Columns every table ends with: when the record entered Kafka (its UTC date is the
/// `date` partition) and where it is in its topic.
fn provenance() -> [Field; 3] {
    [
        Field::new("ingest_time", utc(TimeUnit::Microsecond), false),
        Field::new("kafka_partition", DataType::Int32, false),
        Field::new("kafka_offset", DataType::Int64, false),
    ]
}

fn with_provenance(mut fields: Vec<Field>) -> SchemaRef {
    fields.extend(provenance());
    Arc::new(Schema::new(fields))
}

/// The schema of `delivery_events` files.
pub fn delivery_events_schema() -> SchemaRef {
    with_provenance(vec![
        Field::new("tenant", DataType::Utf8, false),
        Field::new("delivery_id", DataType::Utf8, false),
        Field::new("owner_id", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("at", utc(TimeUnit::Microsecond), false),
        Field::new("drone_id", DataType::Utf8, true),
        Field::new("latitude", DataType::Float64, false),
        Field::new("longitude", DataType::Float64, false),
        Field::new("pickup_eta", utc(TimeUnit::Microsecond), true),
        Field::new("delivery_eta", utc(TimeUnit::Microsecond), true),
    ])
}

/// The schema of `drone_assignments` files.
pub fn drone_assignments_schema() -> SchemaRef {
    with_provenance(vec![
        Field::new("drone_id", DataType::Utf8, false),
        Field::new("region", DataType::Utf8, false),
        Field::new("tenant", DataType::Utf8, false),
        Field::new("delivery_id", DataType::Utf8, false),
        Field::new("from_latitude", DataType::Float64, false),
        Field::new("from_longitude", DataType::Float64, false),
        Field::new("pickup_latitude", DataType::Float64, false),
        Field::new("pickup_longitude", DataType::Float64, false),
        Field::new("dropoff_latitude", DataType::Float64, false),
        Field::new("dropoff_longitude", DataType::Float64, false),
        Field::new("speed_mps", DataType::Float64, false),
        Field::new("assigned_at", utc(TimeUnit::Microsecond), false),
        Field::new("pickup_eta", utc(TimeUnit::Microsecond), false),
        Field::new("delivery_eta", utc(TimeUnit::Microsecond), false),
    ])
}

/// The schema of `telemetry` files.
pub fn telemetry_schema() -> SchemaRef {
    with_provenance(vec![
        Field::new("drone_id", DataType::Utf8, false),
        Field::new("latitude", DataType::Float64, false),
        Field::new("longitude", DataType::Float64, false),
        Field::new("fix_time", utc(TimeUnit::Microsecond), false),
        Field::new("altitude", DataType::Float64, true),
        Field::new("speed", DataType::Float64, true),
        Field::new("heading", DataType::Float64, true),
        Field::new("battery", DataType::Float64, true),
    ])
}

/// The schema of `dead_letters` files. The payload is the original bytes as text
/// (invalid UTF-8 replaced).
pub fn dead_letters_schema() -> SchemaRef {
    with_provenance(vec![
        Field::new("reason", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("record_key", DataType::Utf8, true),
        Field::new("payload", DataType::Utf8, false),
        Field::new("payload_bytes", DataType::Int64, false),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_have_no_partition_column_and_end_with_provenance() {
        for t in TABLES {
            let schema = (t.schema)();
            assert!(schema.field_with_name(DATE_PARTITION).is_err());
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            assert_eq!(
                names[names.len() - 3..],
                ["ingest_time", "kafka_partition", "kafka_offset"],
                "{}",
                t.name
            );
        }
    }

    #[test]
    fn every_time_is_utc_microseconds() {
        for t in TABLES {
            for field in (t.schema)().fields() {
                if let DataType::Timestamp(unit, zone) = field.data_type() {
                    assert_eq!(*unit, TimeUnit::Microsecond, "{}.{}", t.name, field.name());
                    assert_eq!(zone.as_deref(), Some("UTC"));
                }
            }
        }
    }

    #[test]
    fn every_table_has_its_own_topic() {
        for t in TABLES {
            assert_eq!(table_of(t.topic.name).map(|x| x.name), Some(t.name));
        }
        // The changelog that is also the events stream feeds `delivery_events`; the
        // processors' work topics feed nothing.
        assert_eq!(
            table_of(topics::DELIVERY_STATE.name).map(|x| x.name),
            Some(DELIVERY_EVENTS.name)
        );
        assert!(table_of(topics::DRONE_SCHEDULING.name).is_none());
        assert!(table_of(topics::DELIVERIES.name).is_none());
    }
}
