//! The workflow processor: the repartition of delivery requests by region.
//!
//! For each record of `delivery-requests` it decides (in [`route`], pure and unit-tested)
//! what to produce: a valid request goes to `drone-scheduling` keyed by the region of its
//! pickup location, as the compact [`SchedulingRequest`](schemas::tracking::SchedulingRequest)
//! (the scheduler never parses the client's JSON); nothing else produces anything here.
//! The delivery consumer reads `delivery-requests` itself (a consumer group of its own on
//! the same topic: Kafka's fan-out), so requests, reschedules and cancels reach it on
//! their delivery's key, in order, with no copy; it also owns dead-lettering what is
//! not a valid record (a record the workflow skips, it dead-letters once).
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
use crate::output::{Output, OutputHealth, produce_batch};

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

/// What the workflow does with a record it produces nothing for (the delivery consumer,
/// which reads the same records, dead-letters the invalid ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// A reschedule or cancel: the delivery consumer's alone.
    NotARequest,
    /// Not a valid request (no key, no payload, invalid JSON): the delivery consumer
    /// dead-letters it with this reason.
    Invalid(String),
}

/// Decides what one `delivery-requests` record becomes: a valid request (keyed
/// `tenant/deliveryId`, as the delivery consumer requires), its
/// [`SchedulingRequest`](schemas::tracking::SchedulingRequest) on `drone-scheduling`
/// keyed by its pickup region, with its event time; anything else, nothing.
pub fn route(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: &[(&str, &[u8])],
) -> std::result::Result<Output, Skipped> {
    let header = |name: &str| headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    if header(h::EVENT_TYPE) != Some(h::event_type::DELIVERY_REQUESTED.as_bytes()) {
        return Err(Skipped::NotARequest);
    }
    let key = key
        .and_then(|k| std::str::from_utf8(k).ok())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Skipped::Invalid("record has no key (delivery id)".into()))?;
    let payload = payload.ok_or_else(|| Skipped::Invalid("record has no payload".into()))?;
    let request = schemas::parse_delivery_request(payload)
        .map_err(|e| Skipped::Invalid(format!("invalid delivery request: {e}")))?;
    // As the delivery consumer requires (it dead-letters the others): `tenant/deliveryId`.
    let (tenant, key_id) = schemas::split_delivery_key(key);
    if tenant.is_none_or(str::is_empty) || key_id.is_empty() {
        return Err(Skipped::Invalid("key is not tenant/deliveryId".into()));
    }
    let delivery_id = header(h::DELIVERY_ID)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or(key_id);
    let job = schemas::tracking::SchedulingRequest {
        // The record's key, as the delivery consumer keys the delivery's state by it.
        delivery_key: key.to_owned(),
        delivery_id: delivery_id.to_owned(),
        pickup: request.pickup_location,
        drop_off: request.drop_off_location,
        weight_kg: request.package_info.weight,
        size: request.package_info.size,
        pickup_time_ms: request.pickup_time.timestamp_millis(),
        deadline_ms: request.deadline.timestamp_millis(),
    };
    let mut out_headers = vec![(
        h::EVENT_TYPE.to_owned(),
        h::event_type::SCHEDULING_REQUESTED.as_bytes().to_vec(),
    )];
    if let Some(at) = header(h::EVENT_TIME).or_else(|| header(h::INGEST_TIME)) {
        out_headers.push((h::EVENT_TIME.to_owned(), at.to_vec()));
    }
    Ok(Output {
        topic: topics::DRONE_SCHEDULING.name,
        key: schemas::delivery::region_of(request.pickup_location).into_bytes(),
        payload: job.encode(),
        headers: out_headers,
    })
}

/// The outputs of one record, counted by outcome.
fn outputs_of(
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: &[(&str, &[u8])],
) -> Vec<Output> {
    match route(key, payload, headers) {
        Ok(output) => {
            metrics::counter!("workflow_records_total", "outcome" => "scheduled").increment(1);
            vec![output]
        }
        Err(Skipped::NotARequest) => {
            metrics::counter!("workflow_records_total", "outcome" => "not_a_request").increment(1);
            Vec::new()
        }
        Err(Skipped::Invalid(reason)) => {
            tracing::debug!(%reason, "workflow: invalid record skipped");
            metrics::counter!("workflow_records_total", "outcome" => "invalid").increment(1);
            Vec::new()
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
    health: OutputHealth,
) -> bool {
    let records = outputs.into_iter().map(|o| (o, None)).collect();
    produce_batch(&producer, records, &shutdown, NAME, &health).await
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
            run_at_least_once(
                config,
                settings,
                durability.shared,
                durability.outputs,
                shutdown,
            )
            .await
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
            let routed = outputs_of(record.key.as_deref(), record.payload.as_deref(), &headers);
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
    health: OutputHealth,
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
                let outputs = outputs_of(record.key(), record.payload(), &record.headers());
                let producer = producer.clone();
                let retries = retries.clone();
                let health = health.clone();
                in_flight.push_back(async move {
                    let ok = produce_all(producer, outputs, retries, health).await;
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

fn store(consumer: &Consumer, partition: i32, offset: i64) {
    if let Err(e) = consumer.store(topics::DELIVERY_REQUESTS.name, partition, offset) {
        // The partition was revoked: its new owner re-reads the record.
        tracing::debug!(partition, offset, error = %e, "workflow: offset not stored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::tracking::SchedulingRequest;

    const REQUEST: &[u8] = schemas::delivery::EXAMPLE_REQUEST.as_bytes();

    fn requested() -> Vec<(&'static str, &'static [u8])> {
        vec![
            (h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes()),
            (h::TENANT, b"o"),
            (h::INGEST_TIME, b"1790000000000"),
        ]
    }

    #[test]
    fn a_request_goes_to_its_region_in_the_compact_form_with_its_event_time() {
        let out = route(Some(b"o/d1"), Some(REQUEST), &requested()).unwrap();
        assert_eq!(out.topic, topics::DRONE_SCHEDULING.name);
        assert_eq!(out.key, b"47:-123");
        let job = SchedulingRequest::decode(&out.payload).unwrap();
        let request = schemas::parse_delivery_request(REQUEST).unwrap();
        assert_eq!(job.delivery_key, "o/d1");
        assert_eq!(job.delivery_id, "d1");
        assert_eq!(job.pickup, request.pickup_location);
        assert_eq!(job.drop_off, request.drop_off_location);
        assert_eq!(job.weight_kg, request.package_info.weight);
        assert_eq!(job.size, request.package_info.size);
        assert_eq!(job.pickup_time_ms, request.pickup_time.timestamp_millis());
        assert_eq!(job.deadline_ms, request.deadline.timestamp_millis());
        // Two short headers: what it is, and when.
        assert_eq!(
            out.headers,
            [
                (
                    h::EVENT_TYPE.to_owned(),
                    h::event_type::SCHEDULING_REQUESTED.as_bytes().to_vec()
                ),
                (h::EVENT_TIME.to_owned(), b"1790000000000".to_vec()),
            ]
        );
    }

    #[test]
    fn the_delivery_id_header_names_the_delivery_and_a_bare_key_is_skipped() {
        let mut headers = requested();
        headers.push((h::DELIVERY_ID, b"d9"));
        let out = route(Some(b"o/d9"), Some(REQUEST), &headers).unwrap();
        let job = SchedulingRequest::decode(&out.payload).unwrap();
        assert_eq!(
            (job.delivery_key.as_str(), job.delivery_id.as_str()),
            ("o/d9", "d9")
        );
        // A key without a tenant is the delivery consumer's to dead-letter: nothing here.
        assert_eq!(
            route(Some(b"d2"), Some(REQUEST), &requested()).unwrap_err(),
            Skipped::Invalid("key is not tenant/deliveryId".into())
        );
    }

    #[test]
    fn reschedules_and_cancels_are_the_delivery_consumers_alone() {
        for event in [
            h::event_type::DELIVERY_RESCHEDULED,
            h::event_type::DELIVERY_CANCELLED,
        ] {
            let headers = [(h::EVENT_TYPE, event.as_bytes())];
            assert_eq!(
                route(Some(b"o/d1"), Some(b"{}"), &headers).unwrap_err(),
                Skipped::NotARequest
            );
        }
    }

    #[test]
    fn bad_records_are_skipped_with_a_reason() {
        type Case<'a> = (
            Option<&'a [u8]>,
            Option<&'a [u8]>,
            Vec<(&'a str, &'a [u8])>,
            &'a str,
        );
        let cases: [Case<'_>; 4] = [
            (None, Some(REQUEST), requested(), "no key"),
            (Some(b"o/d"), None, requested(), "no payload"),
            (
                Some(b"o/d"),
                Some(b"{not json"),
                requested(),
                "invalid delivery request",
            ),
            (
                Some(b"o/d"),
                Some(REQUEST),
                vec![(h::EVENT_TYPE, b"Teleported")],
                "",
            ),
        ];
        for (key, payload, headers, reason) in cases {
            match route(key, payload, &headers) {
                Err(Skipped::Invalid(got)) => assert!(got.contains(reason), "{got}"),
                Err(Skipped::NotARequest) => assert!(reason.is_empty()),
                Ok(out) => panic!("routed {out:?}"),
            }
        }
    }
}
