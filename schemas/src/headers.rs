//! Kafka header names and values shared by producers and consumers.
//!
//! Payloads are the client's own bytes; what the pipeline adds travels in headers.

/// The kind of event a record carries (see [`event_type`]).
pub const EVENT_TYPE: &str = "dd-event-type";
/// The tenant that posted the record.
pub const TENANT: &str = "dd-tenant";
/// The version of the payload's schema; a record without it is of version 1 (the
/// ingestion tier sends none while 1 is the only version).
pub const SCHEMA_VERSION: &str = "dd-schema-version";
/// The payload's media type; a record without it is JSON (the ingestion tier sends none
/// while every payload is).
pub const CONTENT_TYPE: &str = "content-type";
/// The client's `Idempotency-Key`, when it sent one.
pub const IDEMPOTENCY_KEY: &str = "dd-idempotency-key";
/// When the ingestion tier accepted the record, in milliseconds since the Unix epoch.
pub const INGEST_TIME: &str = "dd-ingest-time";
/// The id that ties a record to the HTTP request and log lines it came from.
pub const CORRELATION_ID: &str = "dd-correlation-id";
/// The drone id, on telemetry records.
pub const DRONE_ID: &str = "dd-drone-id";
/// The delivery id (without its tenant), on every record about one delivery.
pub const DELIVERY_ID: &str = "dd-delivery-id";
/// When the event a record tells of happened, in milliseconds since the Unix epoch (as
/// text). Processors set it on the records they derive (assignments, rejections, releases,
/// forwarded fixes) so that downstream stream time follows event time; records from the
/// ingestion tier carry [`INGEST_TIME`] instead.
pub const EVENT_TIME: &str = "dd-event-time";
/// On a dead letter: why the record could not be processed.
pub const DEAD_LETTER_REASON: &str = "dd-dead-letter-reason";
/// On a dead letter: where the record came from, `topic/partition/offset`.
pub const DEAD_LETTER_SOURCE: &str = "dd-dead-letter-source";
/// On a dead-lettered notification: the tenant's webhook endpoint it was for.
pub const WEBHOOK_ENDPOINT: &str = "dd-webhook-endpoint";
/// On a dead-lettered notification: its `webhook-id`.
pub const WEBHOOK_ID: &str = "dd-webhook-id";

/// The current schema version of delivery request payloads.
pub const SCHEMA_VERSION_V1: &str = "1";
/// The media type of JSON payloads.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Values of the [`EVENT_TYPE`] header.
pub mod event_type {
    /// A new delivery request.
    pub const DELIVERY_REQUESTED: &str = "DeliveryRequested";
    /// A change of a delivery's pickup time, deadline or drop-off location; the payload
    /// is a `DeliveryReschedule` as the client sent it (on `drone-scheduling`, from the
    /// delivery consumer: a `tracking::SchedulingRescheduled`).
    pub const DELIVERY_RESCHEDULED: &str = "DeliveryRescheduled";
    /// A delivery cancelled by its tenant; the payload is `{"deliveryId": ..}`.
    pub const DELIVERY_CANCELLED: &str = "DeliveryCancelled";
    /// The scheduler gave the delivery up: no drone of its region can ever carry it, its
    /// region's queue was full, or no drone was free before its deadline or the waiting
    /// bound (payload: `tracking::SchedulingRejected`, `{"reason": .., "code": ..}`; the
    /// delivery consumer turns it into `Cancelled` with that reason).
    pub const DELIVERY_REJECTED: &str = "DeliveryRejected";
    /// A request to schedule, on `drone-scheduling` from the workflow: the fields the
    /// scheduler needs, in the compact binary form of `tracking::SchedulingRequest`
    /// (the client's JSON is parsed once, by the workflow).
    pub const SCHEDULING_REQUESTED: &str = "SchedulingRequested";
    /// A drone assigned to a delivery (payload: `tracking::Assignment`).
    pub const DRONE_ASSIGNED: &str = "DroneAssigned";
    /// A drone free again (payload: `tracking::DroneReleased`).
    pub const DRONE_RELEASED: &str = "DroneReleased";
    /// A stage transition (payload: `tracking::DeliveryEvent`).
    pub const DELIVERY_STAGE_CHANGED: &str = "DeliveryStageChanged";
    /// A drone's position fix.
    pub const DRONE_POSITION_REPORTED: &str = "DronePositionReported";
}

/// Reads a time header's value (milliseconds since the Unix epoch, as text).
pub fn parse_millis(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_headers_are_decimal_milliseconds() {
        assert_eq!(parse_millis(b"1795478400000"), Some(1_795_478_400_000));
        assert_eq!(parse_millis(b" 12 "), Some(12));
        assert_eq!(parse_millis(b"soon"), None);
        assert_eq!(parse_millis(&[0xff]), None);
    }
}
