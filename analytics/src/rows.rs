//! Turning Kafka records into rows of the history tables. Pure: no I/O.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder, TimestampMillisecondBuilder,
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
    ingest_time: TimestampMillisecondBuilder,
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
            ingest_time: TimestampMillisecondBuilder::new().with_timezone("UTC"),
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
        self.ingest_time.append_value(from.ingest_millis);
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
