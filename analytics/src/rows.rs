//! Turning Kafka records into rows of the history tables. Pure: no I/O.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::record_batch::RecordBatch;
use schemas::ValidationError;

use crate::error::{AnalyticsError, Result};

/// Where a record came from and when it was ingested.
#[derive(Debug, Clone, Copy)]
pub struct Provenance<'a> {
    /// The record key (`tenant/deliveryId`, or a bare delivery id).
    pub key: Option<&'a [u8]>,
    /// The Kafka partition.
    pub partition: i32,
    /// The Kafka offset.
    pub offset: i64,
    /// The ingest time in milliseconds since the Unix epoch.
    pub ingest_millis: i64,
}

impl Provenance<'_> {
    /// The ingest time in microseconds, as the tables hold it.
    fn ingest_micros(&self) -> i64 {
        self.ingest_millis.saturating_mul(1000)
    }
}

/// Column builders for `delivery_requests` rows.
#[derive(Debug)]
pub struct DeliveryRequestRows {
    delivery_id: StringBuilder,
    owner_id: StringBuilder,
    pickup_latitude: Float64Builder,
    pickup_longitude: Float64Builder,
    dropoff_latitude: Float64Builder,
    dropoff_longitude: Float64Builder,
    pickup_time: TimestampMicrosecondBuilder,
    deadline: TimestampMicrosecondBuilder,
    expedited: BooleanBuilder,
    confirmation_required: StringBuilder,
    package_id: StringBuilder,
    package_size: StringBuilder,
    package_weight: Float64Builder,
    package_tag: StringBuilder,
    ingest_time: TimestampMicrosecondBuilder,
    kafka_partition: Int32Builder,
    kafka_offset: Int64Builder,
    len: usize,
}

impl Default for DeliveryRequestRows {
    fn default() -> Self {
        Self {
            delivery_id: StringBuilder::new(),
            owner_id: StringBuilder::new(),
            pickup_latitude: Float64Builder::new(),
            pickup_longitude: Float64Builder::new(),
            dropoff_latitude: Float64Builder::new(),
            dropoff_longitude: Float64Builder::new(),
            pickup_time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            deadline: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            expedited: BooleanBuilder::new(),
            confirmation_required: StringBuilder::new(),
            package_id: StringBuilder::new(),
            package_size: StringBuilder::new(),
            package_weight: Float64Builder::new(),
            package_tag: StringBuilder::new(),
            ingest_time: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            kafka_partition: Int32Builder::new(),
            kafka_offset: Int64Builder::new(),
            len: 0,
        }
    }
}

impl DeliveryRequestRows {
    /// Rows appended since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no row was appended since the last finish.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the row of one `delivery-requests` record. The delivery id is the
    /// payload's `deliveryId` when the client chose one, the record key otherwise. A
    /// record that is not a valid request appends nothing and says why.
    pub fn append(&mut self, payload: &[u8], from: Provenance<'_>) -> Result<(), ValidationError> {
        let request = schemas::parse_delivery_request(payload)?;
        let delivery_id = match (&request.delivery_id, from.key) {
            (Some(id), _) => id.as_ref(),
            (None, Some(key)) => {
                let key = std::str::from_utf8(key).map_err(|_| ValidationError {
                    field: "key".into(),
                    reason: "the record key is not UTF-8".into(),
                })?;
                schemas::split_delivery_key(key).1
            }
            (None, None) => {
                return Err(ValidationError {
                    field: "key".into(),
                    reason: "the record has no key and the request no deliveryId".into(),
                });
            }
        };
        self.delivery_id.append_value(delivery_id);
        self.owner_id.append_value(&request.owner_id);
        self.pickup_latitude
            .append_value(request.pickup_location.latitude);
        self.pickup_longitude
            .append_value(request.pickup_location.longitude);
        self.dropoff_latitude
            .append_value(request.drop_off_location.latitude);
        self.dropoff_longitude
            .append_value(request.drop_off_location.longitude);
        self.pickup_time
            .append_value(request.pickup_time.timestamp_micros());
        self.deadline
            .append_value(request.deadline.timestamp_micros());
        self.expedited.append_value(request.expedited);
        self.confirmation_required
            .append_value(request.confirmation_required.as_str());
        self.package_id
            .append_value(&request.package_info.package_id);
        self.package_size
            .append_value(request.package_info.size.as_str());
        self.package_weight
            .append_value(request.package_info.weight);
        self.package_tag
            .append_option(request.package_info.tag.as_deref());
        self.ingest_time.append_value(from.ingest_micros());
        self.kafka_partition.append_value(from.partition);
        self.kafka_offset.append_value(from.offset);
        self.len += 1;
        Ok(())
    }

    /// Takes the appended rows as one record batch and starts empty again.
    pub fn finish(&mut self) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.delivery_id.finish()),
            Arc::new(self.owner_id.finish()),
            Arc::new(self.pickup_latitude.finish()),
            Arc::new(self.pickup_longitude.finish()),
            Arc::new(self.dropoff_latitude.finish()),
            Arc::new(self.dropoff_longitude.finish()),
            Arc::new(self.pickup_time.finish()),
            Arc::new(self.deadline.finish()),
            Arc::new(self.expedited.finish()),
            Arc::new(self.confirmation_required.finish()),
            Arc::new(self.package_id.finish()),
            Arc::new(self.package_size.finish()),
            Arc::new(self.package_weight.finish()),
            Arc::new(self.package_tag.finish()),
            Arc::new(self.ingest_time.finish()),
            Arc::new(self.kafka_partition.finish()),
            Arc::new(self.kafka_offset.finish()),
        ];
        self.len = 0;
        RecordBatch::try_new(schemas::history::delivery_requests_schema(), columns).map_err(
            |source| AnalyticsError::Arrow {
                action: "building delivery_requests rows",
                source,
            },
        )
    }
}

/// One Kafka record as the sink sees it, with the headers the tables use.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// The record key.
    pub key: Option<&'a [u8]>,
    /// The record value.
    pub payload: &'a [u8],
    /// `dd-event-type`.
    pub event_type: Option<&'a [u8]>,
    /// `dd-drone-id`.
    pub drone_id: Option<&'a [u8]>,
    /// `dd-dead-letter-reason`.
    pub dead_letter_reason: Option<&'a [u8]>,
    /// `dd-dead-letter-source`.
    pub dead_letter_source: Option<&'a [u8]>,
    /// Where it came from.
    pub from: Provenance<'a>,
}

/// Why a record gave no row.
#[derive(Debug)]
pub enum Skip {
    /// The record is of an event type this table does not hold.
    OtherEvent,
    /// The record is not valid for its table.
    Invalid(ValidationError),
}

fn invalid(field: &str, reason: impl Into<String>) -> Skip {
    Skip::Invalid(ValidationError {
        field: field.to_owned(),
        reason: reason.into(),
    })
}

fn micros(field: &str, text: &str) -> Result<i64, Skip> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_micros())
        .map_err(|e| invalid(field, format!("not an RFC 3339 time: {e}")))
}

fn text(bytes: Option<&[u8]>) -> Option<String> {
    bytes.map(|b| String::from_utf8_lossy(b).into_owned())
}

/// The rows of one history table, built column by column (`delivery_requests`, the hot
/// path) or through arrow's JSON decoder from typed rows (the other tables).
#[derive(Debug)]
pub enum TableRows {
    /// `delivery_requests`.
    Requests(Box<DeliveryRequestRows>),
    /// `delivery_events`.
    Events(Vec<EventRow>),
    /// `drone_assignments`.
    Assignments(Vec<AssignmentRow>),
    /// `telemetry`.
    Telemetry(Vec<TelemetryRow>),
    /// `dead_letters`.
    DeadLetters(Vec<DeadLetterRow>),
}

/// A `delivery_events` row.
#[derive(Debug, serde::Serialize)]
pub struct EventRow {
    tenant: String,
    delivery_id: String,
    owner_id: String,
    stage: &'static str,
    seq: i64,
    at: i64,
    drone_id: Option<String>,
    latitude: f64,
    longitude: f64,
    pickup_eta: Option<i64>,
    delivery_eta: Option<i64>,
    ingest_time: i64,
    kafka_partition: i32,
    kafka_offset: i64,
}

/// A `drone_assignments` row.
#[derive(Debug, serde::Serialize)]
pub struct AssignmentRow {
    drone_id: String,
    region: String,
    tenant: String,
    delivery_id: String,
    from_latitude: f64,
    from_longitude: f64,
    pickup_latitude: f64,
    pickup_longitude: f64,
    dropoff_latitude: f64,
    dropoff_longitude: f64,
    speed_mps: f64,
    assigned_at: i64,
    pickup_eta: i64,
    delivery_eta: i64,
    ingest_time: i64,
    kafka_partition: i32,
    kafka_offset: i64,
}

/// A `telemetry` row.
#[derive(Debug, serde::Serialize)]
pub struct TelemetryRow {
    drone_id: String,
    latitude: f64,
    longitude: f64,
    fix_time: i64,
    altitude: Option<f64>,
    speed: Option<f64>,
    heading: Option<f64>,
    battery: Option<f64>,
    ingest_time: i64,
    kafka_partition: i32,
    kafka_offset: i64,
}

/// A `dead_letters` row.
#[derive(Debug, serde::Serialize)]
pub struct DeadLetterRow {
    reason: String,
    source: String,
    record_key: Option<String>,
    payload: String,
    payload_bytes: i64,
    ingest_time: i64,
    kafka_partition: i32,
    kafka_offset: i64,
}

impl TableRows {
    /// Empty rows for `table`.
    pub fn new(table: &str) -> Option<Self> {
        use schemas::history as h;
        Some(match table {
            t if t == h::DELIVERY_REQUESTS.name => Self::Requests(Box::default()),
            t if t == h::DELIVERY_EVENTS.name => Self::Events(Vec::new()),
            t if t == h::DRONE_ASSIGNMENTS.name => Self::Assignments(Vec::new()),
            t if t == h::TELEMETRY.name => Self::Telemetry(Vec::new()),
            t if t == h::DEAD_LETTERS.name => Self::DeadLetters(Vec::new()),
            _ => return None,
        })
    }

    /// The table these rows belong to.
    pub fn table(&self) -> schemas::history::HistoryTable {
        use schemas::history as h;
        match self {
            Self::Requests(_) => h::DELIVERY_REQUESTS,
            Self::Events(_) => h::DELIVERY_EVENTS,
            Self::Assignments(_) => h::DRONE_ASSIGNMENTS,
            Self::Telemetry(_) => h::TELEMETRY,
            Self::DeadLetters(_) => h::DEAD_LETTERS,
        }
    }

    /// Rows appended and not yet finished.
    pub fn len(&self) -> usize {
        match self {
            Self::Requests(r) => r.len(),
            Self::Events(r) => r.len(),
            Self::Assignments(r) => r.len(),
            Self::Telemetry(r) => r.len(),
            Self::DeadLetters(r) => r.len(),
        }
    }

    /// Whether no row is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the row of `record`, or says why it gives none.
    pub fn append(&mut self, record: &RecordView<'_>) -> Result<(), Skip> {
        let from = record.from;
        match self {
            Self::Requests(rows) => {
                let requested = schemas::headers::event_type::DELIVERY_REQUESTED.as_bytes();
                if record.event_type.is_some_and(|t| t != requested) {
                    return Err(Skip::OtherEvent);
                }
                rows.append(record.payload, from).map_err(Skip::Invalid)
            }
            Self::Events(rows) => {
                // `delivery-state`: every change of a delivery; its stage changes are the
                // events. Offset markers and waiting records (keys starting with byte 0
                // or 1), tombstones and position changes give no row.
                if record
                    .key
                    .is_none_or(|k| matches!(k.first(), None | Some(0 | 1)))
                    || record.payload.is_empty()
                {
                    return Err(Skip::OtherEvent);
                }
                let state: schemas::tracking::DeliveryState =
                    serde_json::from_slice(record.payload)
                        .map_err(|e| invalid("payload", e.to_string()))?;
                if state.change != Some(schemas::tracking::EventKind::Stage) {
                    return Err(Skip::OtherEvent);
                }
                let event = schemas::tracking::DeliveryEvent::of(&state);
                let key = record.key.map(String::from_utf8_lossy).unwrap_or_default();
                let tenant = schemas::split_delivery_key(&key)
                    .0
                    .unwrap_or(schemas::DEFAULT_TENANT)
                    .to_owned();
                rows.push(EventRow {
                    tenant,
                    at: micros("at", &event.at)?,
                    pickup_eta: event
                        .pickup_eta
                        .as_deref()
                        .map(|t| micros("pickupETA", t))
                        .transpose()?,
                    delivery_eta: event
                        .delivery_eta
                        .as_deref()
                        .map(|t| micros("deliveryETA", t))
                        .transpose()?,
                    delivery_id: event.delivery_id,
                    owner_id: event.owner_id,
                    stage: event.stage.as_str(),
                    seq: i64::from(event.seq),
                    drone_id: event.drone_id,
                    latitude: event.last_known_location.latitude,
                    longitude: event.last_known_location.longitude,
                    ingest_time: from.ingest_micros(),
                    kafka_partition: from.partition,
                    kafka_offset: from.offset,
                });
                Ok(())
            }
            Self::Assignments(rows) => {
                let a: schemas::tracking::Assignment = serde_json::from_slice(record.payload)
                    .map_err(|e| invalid("payload", e.to_string()))?;
                let tenant = schemas::split_delivery_key(&a.delivery_key)
                    .0
                    .unwrap_or(schemas::DEFAULT_TENANT)
                    .to_owned();
                rows.push(AssignmentRow {
                    tenant,
                    from_latitude: a.from.latitude,
                    from_longitude: a.from.longitude,
                    pickup_latitude: a.pickup.latitude,
                    pickup_longitude: a.pickup.longitude,
                    dropoff_latitude: a.drop_off.latitude,
                    dropoff_longitude: a.drop_off.longitude,
                    speed_mps: a.speed_mps,
                    assigned_at: a.assigned_at.saturating_mul(1000),
                    pickup_eta: a.pickup_eta.saturating_mul(1000),
                    delivery_eta: a.delivery_eta.saturating_mul(1000),
                    drone_id: a.drone_id,
                    region: a.region,
                    delivery_id: a.delivery_id,
                    ingest_time: from.ingest_micros(),
                    kafka_partition: from.partition,
                    kafka_offset: from.offset,
                });
                Ok(())
            }
            Self::Telemetry(rows) => {
                let fix = schemas::telemetry::parse_position_fix(record.payload)
                    .map_err(Skip::Invalid)?;
                let drone_id = text(record.drone_id.or(record.key))
                    .ok_or_else(|| invalid("key", "the record names no drone"))?;
                rows.push(TelemetryRow {
                    drone_id,
                    latitude: fix.latitude,
                    longitude: fix.longitude,
                    fix_time: fix.timestamp.timestamp_micros(),
                    altitude: fix.altitude,
                    speed: fix.speed,
                    heading: fix.heading,
                    battery: fix.battery,
                    ingest_time: from.ingest_micros(),
                    kafka_partition: from.partition,
                    kafka_offset: from.offset,
                });
                Ok(())
            }
            Self::DeadLetters(rows) => {
                rows.push(DeadLetterRow {
                    reason: text(record.dead_letter_reason).unwrap_or_default(),
                    source: text(record.dead_letter_source).unwrap_or_default(),
                    record_key: text(record.key),
                    payload: String::from_utf8_lossy(record.payload).into_owned(),
                    payload_bytes: i64::try_from(record.payload.len()).unwrap_or(i64::MAX),
                    ingest_time: from.ingest_micros(),
                    kafka_partition: from.partition,
                    kafka_offset: from.offset,
                });
                Ok(())
            }
        }
    }

    /// Takes the waiting rows as one record batch of the table's schema.
    pub fn finish(&mut self) -> Result<RecordBatch> {
        let schema = (self.table().schema)();
        match self {
            Self::Requests(rows) => rows.finish(),
            Self::Events(rows) => decode(schema, std::mem::take(rows)),
            Self::Assignments(rows) => decode(schema, std::mem::take(rows)),
            Self::Telemetry(rows) => decode(schema, std::mem::take(rows)),
            Self::DeadLetters(rows) => decode(schema, std::mem::take(rows)),
        }
    }
}

/// Typed rows to one batch through arrow's JSON decoder (timestamps as integers in the
/// column's unit).
fn decode<R: serde::Serialize>(
    schema: arrow::datatypes::SchemaRef,
    rows: Vec<R>,
) -> Result<RecordBatch> {
    let arrow_err = |source| AnalyticsError::Arrow {
        action: "decoding rows",
        source,
    };
    let mut decoder = arrow::json::ReaderBuilder::new(std::sync::Arc::clone(&schema))
        .with_batch_size(rows.len().max(1))
        .build_decoder()
        .map_err(arrow_err)?;
    decoder.serialize(&rows).map_err(arrow_err)?;
    Ok(decoder
        .flush()
        .map_err(arrow_err)?
        .unwrap_or_else(|| RecordBatch::new_empty(schema)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, StringArray};

    const REQUEST: &[u8] = schemas::delivery::EXAMPLE_REQUEST.as_bytes();

    fn from(key: &[u8], offset: i64) -> Provenance<'_> {
        Provenance {
            key: Some(key),
            partition: 2,
            offset,
            ingest_millis: 1_763_892_000_000,
        }
    }

    #[test]
    fn rows_match_the_history_schema() {
        let mut rows = DeliveryRequestRows::default();
        rows.append(REQUEST, from(b"d1", 7)).unwrap();
        rows.append(REQUEST, from(b"d2", 8)).unwrap();
        assert!(rows.append(b"{}", from(b"d3", 9)).is_err());
        assert_eq!(rows.len(), 2);
        let batch = rows.finish().unwrap();
        assert!(rows.is_empty());
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.schema(), schemas::history::delivery_requests_schema());
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(ids.value(0), "d1");
        assert_eq!(ids.value(1), "d2");
        let tags = batch
            .column(13)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(tags.value(0), "fragile");
    }

    #[test]
    fn a_tenant_scoped_key_gives_its_delivery_id() {
        let mut rows = DeliveryRequestRows::default();
        rows.append(
            schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
            from(b"fabrikam/d9", 1),
        )
        .unwrap();
        let batch = rows.finish().unwrap();
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(ids.value(0), "d9");
    }

    #[test]
    fn the_clients_delivery_id_wins_over_the_key() {
        let mut rows = DeliveryRequestRows::default();
        let body =
            br#"{"deliveryId":"mine","ownerId":"o","pickupLocation":"1,1","dropOffLocation":"1,2",
            "pickupTime":"2026-11-23T10:00:00Z","deadline":"2026-11-23T11:00:00Z",
            "packageInfo":{"packageId":"p","size":"Large","weight":3}}"#;
        rows.append(body, from(b"mine", 1)).unwrap();
        let batch = rows.finish().unwrap();
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(ids.value(0), "mine");
        assert!(batch.column(13).is_null(0), "no tag is a null tag");
    }
}
