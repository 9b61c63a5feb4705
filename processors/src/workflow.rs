//! The workflow processor: fan-out of delivery requests.
//!
//! For each record of `delivery-requests` it decides (in [`route`], pure and unit-tested)
//! what to produce: a request to `deliveries` on its delivery key (`tenant/deliveryId`)
//! and to `drone-scheduling` keyed by the region of its pickup location; a reschedule or
//! cancel to `deliveries` on the same key (ordered after the request); or a dead letter
//! with the reason when the record cannot be processed. Produced records carry the original
//! payload bytes and headers.
//!
//! Under exactly-once, records are handled in batches, each one transaction with its
//! input offsets; an aborted one is read again from the committed offsets.
//!
//! Under at-least-once, many records are in flight at once, but offsets are stored in the
//! order records were received, and only once every record a record produced was
//! acknowledged. A record whose outputs cannot be produced is retried with backoff until
//! it succeeds or the processor stops; it is never skipped.

use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::Arc;

use bus::{ClientSettings, Consumer, Producer};
use futures_util::stream::{FuturesOrdered, StreamExt};
use schemas::headers as h;
use schemas::topics;
use tokio_util::sync::CancellationToken;

use crate::batch::Batch;
use crate::commit::{Committed, Committer};
use crate::error::{ProcessorError, Result};
use crate::guarantee::{Durability, Guarantee};
use crate::output::{Output, produce_batch};

const NAME: &str = "workflow";
/// The workflow's consumer group.
pub const GROUP: &str = topics::groups::WORKFLOW;
/// The topics it reads.
pub const INPUTS: &[&str] = &[topics::DELIVERY_REQUESTS.name];

const MAX_IN_FLIGHT: usize = 10_000;

/// Settings of the workflow processor.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkflowArgs {
    /// Most records whose outputs are awaiting acknowledgement at once (under
    /// exactly-once: most records in one transaction).
    #[arg(
        long,
        env = "DRONEDELIVERY_WORKFLOW_MAX_IN_FLIGHT",
        default_value_t = MAX_IN_FLIGHT
    )]
    pub workflow_max_in_flight: usize,
}

impl Default for WorkflowArgs {
    fn default() -> Self {
        Self {
            workflow_max_in_flight: MAX_IN_FLIGHT,
        }
    }
}

/// Decides what one `delivery-requests` record becomes.
///
/// `source` is `topic/partition/offset`, recorded on dead letters.
pub fn route(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: &[(&str, &[u8])],
    source: &str,
) -> Vec<Output> {
    let copy_headers = |extra: &[(&str, &[u8])]| -> Vec<(String, Vec<u8>)> {
        headers
            .iter()
            .chain(extra)
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect()
    };
    let dead = |reason: &str| {
        vec![Output {
            topic: topics::DEAD_LETTERS.name,
            key: key.unwrap_or_default().to_vec(),
            payload: payload.unwrap_or_default().to_vec(),
            headers: copy_headers(&[
                (h::DEAD_LETTER_REASON, reason.as_bytes()),
                (h::DEAD_LETTER_SOURCE, source.as_bytes()),
            ]),
        }]
    };
    let Some(id) = key.filter(|k| !k.is_empty()) else {
        return dead("record has no key (delivery id)");
    };
    let Some(payload) = payload else {
        return dead("record has no payload");
    };
    let event_type = headers
        .iter()
        .find(|(k, _)| *k == h::EVENT_TYPE)
        .map(|(_, v)| *v);
    let forward = |topic: &'static str, key: &[u8], extra: &[(&str, &[u8])]| Output {
        topic,
        key: key.to_vec(),
        payload: payload.to_vec(),
        headers: copy_headers(extra),
    };
    match event_type {
        Some(t) if t == h::event_type::DELIVERY_REQUESTED.as_bytes() => {
            let request = match schemas::parse_delivery_request(payload) {
                Ok(request) => request,
                Err(e) => return dead(&format!("invalid delivery request: {e}")),
            };
            let region = schemas::delivery::region_of(request.pickup_location);
            // Scheduling records are keyed by region, so they name their delivery in a
            // header (the ingestion tier sets it; older records only had the key).
            let has_id = headers.iter().any(|(k, _)| *k == h::DELIVERY_ID);
            let key_text = std::str::from_utf8(id).unwrap_or_default();
            let (_, bare_id) = schemas::split_delivery_key(key_text);
            let extra: &[(&str, &[u8])] = if has_id {
                &[]
            } else {
                &[(h::DELIVERY_ID, bare_id.as_bytes())]
            };
            vec![
                forward(topics::DELIVERIES.name, id, &[]),
                forward(topics::DRONE_SCHEDULING.name, region.as_bytes(), extra),
            ]
        }
        // Reschedules and cancels go to the delivery's owner of state, on the delivery's
        // key, so they stay ordered after its request; it tells scheduling what changed.
        Some(t) if t == h::event_type::DELIVERY_RESCHEDULED.as_bytes() => {
            match schemas::parse_reschedule(payload) {
                Ok(_) => vec![forward(topics::DELIVERIES.name, id, &[])],
                Err(e) => dead(&format!("invalid reschedule: {e}")),
            }
        }
        Some(t) if t == h::event_type::DELIVERY_CANCELLED.as_bytes() => {
            vec![forward(topics::DELIVERIES.name, id, &[])]
        }
        other => {
            let shown = other.map_or("none".into(), String::from_utf8_lossy);
            dead(&format!("unknown event type {shown}"))
        }
    }
}

/// Produces every output at once and waits for all acknowledgements, resending from
/// the first failure on (in order) with backoff until all are acknowledged or `shutdown`
/// is cancelled (then `false`).
async fn produce_all(
    producer: Producer,
    outputs: Vec<Output>,
    shutdown: CancellationToken,
) -> bool {
    let records = outputs.into_iter().map(|o| (o, None)).collect();
    produce_batch(&producer, records, &shutdown, NAME).await
}

/// Runs the workflow processor until `shutdown` is cancelled (or, under exactly-once,
/// until its producer is fenced: an error).
pub async fn run(
    config: WorkflowArgs,
    settings: ClientSettings,
    durability: Durability,
    shutdown: CancellationToken,
) -> Result<()> {
    match durability.guarantee {
        Guarantee::AtLeastOnce => {
            run_at_least_once(config, settings, durability.shared, shutdown).await
        }
        Guarantee::ExactlyOnce => run_exactly_once(config, settings, &durability, shutdown).await,
    }
}

/// How long a transaction's batch waits for more records after its first.
const BATCH_WAIT: Duration = Duration::from_millis(100);

/// One transaction per batch: its outputs and its input offsets.
async fn run_exactly_once(
    config: WorkflowArgs,
    settings: ClientSettings,
    durability: &Durability,
    shutdown: CancellationToken,
) -> Result<()> {
    let Some(mut committer) = Committer::open(NAME, durability, &shutdown).await? else {
        return Ok(());
    };
    let consumer = Arc::new(
        committer
            .subscribe(&settings, GROUP, INPUTS, false)
            .map_err(|source| ProcessorError::Bus {
                processor: NAME,
                source: Box::new(source),
            })?,
    );
    let _lag = consumer
        .lag_probe()
        .report(GROUP, Duration::from_secs(10), shutdown.clone());
    let max = config.workflow_max_in_flight.max(1);
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => break,
            received = consumer.recv() => {
                Batch::collect(&consumer, received, max, BATCH_WAIT, NAME).await
            }
        };
        if batch.records.is_empty() {
            continue;
        }
        let mut outputs = Vec::new();
        let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for record in &batch.records {
            let headers: Vec<(&str, &[u8])> = record
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            let routed = route(
                record.key.as_deref(),
                record.payload.as_deref(),
                &headers,
                &record.source(),
            );
            metrics::counter!("workflow_records_total", "outcome" => outcome(&routed)).increment(1);
            outputs.extend(routed.into_iter().map(|o| (o, None)));
            last.insert((record.topic.clone(), record.partition), record.offset);
        }
        match committer
            .commit(&consumer, vec![outputs], &last, &shutdown)
            .await?
        {
            Committed::Done => {}
            Committed::Stopped => break,
            Committed::Aborted => {
                let read: Vec<(String, i32)> = last.into_keys().collect();
                let c = Arc::clone(&consumer);
                let rewound =
                    tokio::task::spawn_blocking(move || c.rewind(&read, Duration::from_secs(10)))
                        .await
                        .map_err(|e| ProcessorError::Task {
                            processor: NAME,
                            reason: e.to_string(),
                        })?;
                if let Err(source) = rewound {
                    // Going on would skip the aborted records: stop, and let the group
                    // give the partitions to a member that starts from the committed
                    // offsets.
                    return Err(ProcessorError::Bus {
                        processor: NAME,
                        source: Box::new(source),
                    });
                }
            }
        }
    }
    tracing::info!("workflow: stopped");
    Ok(())
}

/// Many records in flight; offsets stored in order once acknowledged, committed in the
/// background and once more at the end (after waiting for what is in flight).
async fn run_at_least_once(
    config: WorkflowArgs,
    settings: ClientSettings,
    producer: Producer,
    shutdown: CancellationToken,
) -> Result<()> {
    let bus_err = |source| ProcessorError::Bus {
        processor: NAME,
        source: Box::new(source),
    };
    let consumer = Consumer::subscribe(&settings, GROUP, INPUTS).map_err(bus_err)?;
    let _lag =
        consumer
            .lag_probe()
            .report(GROUP, std::time::Duration::from_secs(10), shutdown.clone());
    // Cancelled only after the loop stops, so that in-flight retries get their chance.
    let retries = CancellationToken::new();
    let mut in_flight = FuturesOrdered::new();
    let max_in_flight = config.workflow_max_in_flight.max(1);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some((partition, offset, ok)) = in_flight.next(), if !in_flight.is_empty() => {
                if ok {
                    store(&consumer, partition, offset);
                }
            }
            received = consumer.recv(), if in_flight.len() < max_in_flight => {
                let record = match received {
                    Ok(record) => record,
                    Err(e) => {
                        tracing::warn!(error = %e, "workflow: receive failed");
                        continue;
                    }
                };
                let (partition, offset) = (record.partition(), record.offset());
                let source = format!("{}/{partition}/{offset}", record.topic());
                let outputs = route(record.key(), record.payload(), &record.headers(), &source);
                metrics::counter!("workflow_records_total", "outcome" => outcome(&outputs)).increment(1);
                let producer = producer.clone();
                let retries = retries.clone();
                in_flight.push_back(async move {
                    let ok = produce_all(producer, outputs, retries).await;
                    (partition, offset, ok)
                });
            }
        }
    }
    // Let what is in flight finish (bounded), storing offsets in order; stop storing at
    // the first record that did not complete so that nothing after it is skipped.
    let drain = async {
        while let Some((partition, offset, ok)) = in_flight.next().await {
            if !ok {
                break;
            }
            store(&consumer, partition, offset);
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .is_err()
    {
        tracing::warn!("workflow: records still in flight at shutdown will be re-read");
    }
    retries.cancel();
    let committed = tokio::task::spawn_blocking(move || consumer.commit())
        .await
        .map_err(|e| ProcessorError::Task {
            processor: NAME,
            reason: e.to_string(),
        })?;
    if let Err(e) = committed {
        tracing::warn!(error = %e, "workflow: final commit failed; records since the last commit will be re-read");
    }
    tracing::info!("workflow: stopped");
    Ok(())
}

fn outcome(outputs: &[Output]) -> &'static str {
    if outputs.iter().any(|o| o.topic == topics::DEAD_LETTERS.name) {
        "dead_letter"
    } else {
        "fanned_out"
    }
}

fn store(consumer: &Consumer, partition: i32, offset: i64) {
    if let Err(e) = consumer.store(topics::DELIVERY_REQUESTS.name, partition, offset) {
        // The partition was revoked: its new owner re-reads the record.
        tracing::debug!(partition, offset, error = %e, "workflow: offset not stored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST: &[u8] = schemas::delivery::EXAMPLE_REQUEST.as_bytes();

    fn requested() -> Vec<(&'static str, &'static [u8])> {
        vec![
            (h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes()),
            (h::TENANT, b"o"),
        ]
    }

    #[test]
    fn a_request_fans_out_to_deliveries_and_its_region() {
        let out = route(Some(b"d1"), Some(REQUEST), &requested(), "t/0/1");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].topic, topics::DELIVERIES.name);
        assert_eq!(out[0].key, b"d1");
        assert_eq!(out[0].payload, REQUEST);
        assert_eq!(out[1].topic, topics::DRONE_SCHEDULING.name);
        assert_eq!(out[1].key, b"47:-123");
        assert_eq!(out[1].payload, REQUEST);
        assert!(
            out[1]
                .headers
                .contains(&(h::DELIVERY_ID.to_owned(), b"d1".to_vec()))
        );
        assert!(
            out[0]
                .headers
                .contains(&(h::TENANT.to_owned(), b"o".to_vec()))
        );
    }

    #[test]
    fn a_tenant_scoped_key_keeps_its_delivery_id_header() {
        let mut headers = requested();
        headers.push((h::DELIVERY_ID, b"d1"));
        let out = route(Some(b"o/d1"), Some(REQUEST), &headers, "t/0/1");
        assert_eq!(out[0].key, b"o/d1");
        let ids: Vec<_> = out[1]
            .headers
            .iter()
            .filter(|(k, _)| k == h::DELIVERY_ID)
            .collect();
        assert_eq!(ids, [&(h::DELIVERY_ID.to_owned(), b"d1".to_vec())], "once");
        // Without the header, the id part of the key.
        let out = route(Some(b"o/d2"), Some(REQUEST), &requested(), "t/0/1");
        assert!(
            out[1]
                .headers
                .contains(&(h::DELIVERY_ID.to_owned(), b"d2".to_vec()))
        );
    }

    #[test]
    fn reschedules_and_cancels_go_to_deliveries_on_the_same_key() {
        let reschedule: &[u8] = br#"{"pickupTime":"2026-11-24T10:00:00Z"}"#;
        let headers = [(
            h::EVENT_TYPE,
            h::event_type::DELIVERY_RESCHEDULED.as_bytes(),
        )];
        let out = route(Some(b"o/d1"), Some(reschedule), &headers, "t/0/1");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, topics::DELIVERIES.name);
        assert_eq!(out[0].key, b"o/d1");
        assert_eq!(out[0].payload, reschedule);
        let out = route(Some(b"o/d1"), Some(b"{}"), &headers, "t/0/1");
        assert_eq!(
            out[0].topic,
            topics::DEAD_LETTERS.name,
            "invalid reschedule"
        );
        let headers = [(h::EVENT_TYPE, h::event_type::DELIVERY_CANCELLED.as_bytes())];
        let out = route(
            Some(b"o/d1"),
            Some(b"{\"deliveryId\":\"d1\"}"),
            &headers,
            "t/0/1",
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, topics::DELIVERIES.name);
        assert_eq!(out[0].key, b"o/d1");
    }

    #[test]
    fn bad_records_become_dead_letters_with_a_reason() {
        type Case<'a> = (
            Option<&'a [u8]>,
            Option<&'a [u8]>,
            Vec<(&'a str, &'a [u8])>,
            &'a str,
        );
        let cases: [Case<'_>; 4] = [
            (None, Some(REQUEST), requested(), "no key"),
            (Some(b"d"), None, requested(), "no payload"),
            (
                Some(b"d"),
                Some(b"{not json"),
                requested(),
                "invalid delivery request",
            ),
            (
                Some(b"d"),
                Some(REQUEST),
                vec![(h::EVENT_TYPE, b"Teleported")],
                "unknown event type Teleported",
            ),
        ];
        for (key, payload, headers, reason) in cases {
            let out = route(key, payload, &headers, "delivery-requests/3/9");
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].topic, topics::DEAD_LETTERS.name);
            assert_eq!(out[0].payload, payload.unwrap_or_default());
            let got = |name: &str| {
                out[0]
                    .headers
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            assert!(
                got(h::DEAD_LETTER_REASON).contains(reason),
                "{}",
                got(h::DEAD_LETTER_REASON)
            );
            assert_eq!(got(h::DEAD_LETTER_SOURCE), "delivery-requests/3/9");
        }
    }
}
