//! From an accepted record to the broker's acknowledgement: who the caller is and what
//! every record carries in its Kafka headers, enqueueing, waiting (bounded) for
//! acknowledgements and settling the fate of every record of a batch.
//!
//! It owns [`Caller`], [`Headers`], [`Outcome`] and the mapping of producer failures to
//! the client's answer (503 when transient). It must not parse or validate requests nor
//! build HTTP responses, and it must not import the routes, the handlers or the server.

use std::time::Duration;

use bus::{Acks, OutRecord, Producer};
use schemas::headers as h;

use crate::error::{IngestError, RETRY_AFTER, Result};
use crate::outcome::Outcome;
use crate::state::App;
use crate::tenants::Tenant;

/// Who sent a request and what every record it produces carries in its headers.
#[derive(Debug)]
pub(crate) struct Caller<'a> {
    pub(crate) tenant: &'a Tenant,
    correlation: &'a str,
    ingest_time: String,
}

impl<'a> Caller<'a> {
    /// The authenticated `tenant`, with the request's correlation id; its records are
    /// stamped with the time now.
    pub(crate) fn new(tenant: &'a Tenant, correlation: &'a str) -> Self {
        Self {
            tenant,
            correlation,
            ingest_time: now_millis().to_string(),
        }
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The Kafka headers of one record, without allocating.
#[derive(Debug)]
pub(crate) struct Headers<'a> {
    items: [(&'a str, &'a [u8]); 10],
    len: usize,
}

impl<'a> Headers<'a> {
    /// The headers every record gets: event type, tenant, ingest time and correlation id.
    /// (No schema version or content type: each costs an allocation per record on both
    /// sides of librdkafka, and every payload is JSON of schema version 1, which a record
    /// without `dd-schema-version` means.)
    pub(crate) fn of(caller: &'a Caller<'_>, event_type: &'static str) -> Self {
        let mut headers = Self {
            items: [("", &[]); 10],
            len: 0,
        };
        headers.push(h::EVENT_TYPE, event_type.as_bytes());
        headers.push(h::TENANT, caller.tenant.name.as_bytes());
        headers.push(h::INGEST_TIME, caller.ingest_time.as_bytes());
        headers.push(h::CORRELATION_ID, caller.correlation.as_bytes());
        headers
    }

    pub(crate) fn push(&mut self, name: &'a str, value: &'a [u8]) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = (name, value);
            self.len += 1;
        }
    }

    pub(crate) fn as_slice(&self) -> &[(&'a str, &'a [u8])] {
        &self.items[..self.len]
    }
}

/// Maps a producer failure to the client's answer: transient ones are 503 + Retry-After.
pub(crate) fn unavailable(e: bus::BusError) -> IngestError {
    if e.is_transient() {
        IngestError::Unavailable {
            reason: e.to_string(),
            retry_after: RETRY_AFTER,
        }
    } else {
        IngestError::Internal {
            reason: e.to_string(),
        }
    }
}

pub(crate) fn not_acknowledged() -> IngestError {
    IngestError::Unavailable {
        reason: "the broker did not acknowledge in time".into(),
        retry_after: RETRY_AFTER,
    }
}

/// Enqueues one record; returns the future of the broker's acknowledgement.
pub(crate) fn enqueue(
    producer: &Producer,
    record: OutRecord<'_>,
) -> Result<impl Future<Output = bus::Result<bus::Delivered>> + use<>> {
    producer.send(record).map_err(unavailable)
}

/// Enqueues an event about one delivery (`payload` as the client sent it) on
/// `delivery-requests`, keyed by `tenant/deliveryId` so that every event of a delivery
/// stays in order; with the request's `Idempotency-Key` in its headers when it has one.
/// Its acknowledgement is waited for with the rest of `acks`.
pub(crate) fn enqueue_delivery_event(
    app: &App,
    caller: &Caller<'_>,
    event_type: &'static str,
    delivery_id: &str,
    payload: &[u8],
    idempotency_key: Option<&str>,
    acks: &mut Acks,
) -> Result<()> {
    let key = schemas::delivery_key(&caller.tenant.name, delivery_id);
    let mut headers = Headers::of(caller, event_type);
    headers.push(h::DELIVERY_ID, delivery_id.as_bytes());
    if let Some(idempotency_key) = idempotency_key {
        headers.push(h::IDEMPOTENCY_KEY, idempotency_key.as_bytes());
    }
    app.producer()?
        .enqueue(
            acks,
            OutRecord {
                topic: schemas::topics::DELIVERY_REQUESTS.name,
                key: key.as_bytes(),
                payload,
                headers: headers.as_slice(),
            },
            None,
            false,
        )
        .map(|_| ())
        .map_err(unavailable)
}

/// How long to wait for acknowledgements. librdkafka fails a record after
/// `message.timeout.ms`; the extra second only guards against an acknowledgement that
/// never comes back at all.
pub(crate) fn ack_wait(app: &App) -> Duration {
    app.writer().map_or(Duration::ZERO, Producer::ack_timeout) + Duration::from_secs(1)
}

/// Waits (bounded) for one acknowledgement.
pub(crate) async fn acknowledged(
    app: &App,
    ack: impl Future<Output = bus::Result<bus::Delivered>>,
) -> Result<bus::Delivered> {
    tokio::time::timeout(ack_wait(app), ack)
        .await
        .map_err(|_| not_acknowledged())?
        .map_err(unavailable)
}

/// Waits (bounded) for the one record enqueued in `acks`.
pub(crate) async fn acknowledged_one(app: &App, acks: Acks) -> Result<bus::Delivered> {
    tokio::time::timeout(ack_wait(app), acks.settled())
        .await
        .map_err(|_| not_acknowledged())?
        .get(0)
        .map_err(unavailable)
}

/// Waits (bounded) for the acknowledgement of every record enqueued in `acks` (record
/// `i` of the group being `outcomes[indexes[i]]`) and marks those that were not
/// acknowledged as failed.
pub(crate) async fn settle(app: &App, outcomes: &mut [Outcome], acks: Acks, indexes: &[usize]) {
    match tokio::time::timeout(ack_wait(app), acks.settled()).await {
        Ok(results) => {
            for (at, e) in results.failures() {
                if let Some(outcome) = indexes.get(at).and_then(|i| outcomes.get_mut(*i)) {
                    *outcome = Outcome::failed(unavailable(e.clone()));
                }
            }
        }
        Err(_) => {
            for index in indexes {
                if let Some(outcome) = outcomes.get_mut(*index) {
                    *outcome = Outcome::failed(not_acknowledged());
                }
            }
        }
    }
}
