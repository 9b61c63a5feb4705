//! The Kafka boundary on the embedded broker, in this process: how records cross topics
//! through the bus helpers (`bus::Producer`, `bus::Consumer`): the workflow processor's
//! repartition of requests to `drone-scheduling` with their keys and headers (and
//! nothing else: the delivery consumer reads `delivery-requests` itself and dead-letters
//! poison), and a consumer group resuming after the last offset the application stored.
//! Needs nothing outside this process.
//!
//! The repartition test is about the workflow processor too; it sits here, with the topics it
//! checks, rather than with the processors' own tests (`tests/processors.rs`), which run
//! the whole chain of processors.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use bus::{ClientSettings, Consumer, EmbeddedBroker, OutRecord, Producer, ProducerArgs};
use schemas::topics;
use tokio_util::sync::CancellationToken;

mod common;
use common::*;

/// The workflow processor sends each request to `drone-scheduling` (keyed by region) in
/// the compact form, and nothing anywhere else: not to `deliveries`, and a poison record
/// nowhere (the delivery consumer dead-letters it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_sends_requests_to_their_regions_and_skips_poison() -> Result<()> {
    let broker = EmbeddedBroker::start(1, &topics::ALL)?;
    let settings = ClientSettings::plain(broker.bootstrap_servers());
    let producer = Producer::new(&settings, &ProducerArgs::default())?;
    let stop = CancellationToken::new();
    let workflow = tokio::spawn(processors::workflow::run(
        processors::workflow::WorkflowArgs::default(),
        settings.clone(),
        processors::guarantee::Durability::at_least_once(settings.clone(), producer.clone()),
        stop.clone(),
    ));

    let requested: [(&str, &[u8]); 2] = [
        (
            schemas::headers::EVENT_TYPE,
            schemas::headers::event_type::DELIVERY_REQUESTED.as_bytes(),
        ),
        (schemas::headers::INGEST_TIME, b"1790000000000"),
    ];
    let n = 20;
    let send = |key: String, payload: Vec<u8>| {
        let producer = producer.clone();
        async move {
            producer
                .send_and_wait(OutRecord {
                    topic: topics::DELIVERY_REQUESTS.name,
                    key: key.as_bytes(),
                    payload: &payload,
                    headers: &requested,
                })
                .await
        }
    };
    for i in 0..n / 2 {
        send(
            format!("acme/d-{i}"),
            valid_request(i).to_string().into_bytes(),
        )
        .await?;
    }
    send("acme/poison".into(), b"{not json".to_vec()).await?;
    for i in n / 2..n {
        send(
            format!("acme/d-{i}"),
            valid_request(i).to_string().into_bytes(),
        )
        .await?;
    }

    let reader = Consumer::subscribe(
        &settings,
        "test-reader",
        &[
            topics::DELIVERIES.name,
            topics::DRONE_SCHEDULING.name,
            topics::DEAD_LETTERS.name,
        ],
    )?;
    let mut scheduled = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while scheduled.len() < n {
        let record = tokio::time::timeout_at(deadline, reader.recv())
            .await
            .context("the requests did not arrive in time")??;
        assert_eq!(
            record.topic(),
            topics::DRONE_SCHEDULING.name,
            "nothing else"
        );
        let key = String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned();
        assert!(key.contains(':'), "keyed by region, got {key}");
        assert_eq!(
            record.header(schemas::headers::EVENT_TYPE),
            Some(schemas::headers::event_type::SCHEDULING_REQUESTED.as_bytes())
        );
        assert_eq!(
            record.header(schemas::headers::EVENT_TIME),
            Some(&b"1790000000000"[..]),
            "the request's ingest time is its event time"
        );
        let job =
            schemas::tracking::SchedulingRequest::decode(record.payload().unwrap_or_default())
                .map_err(anyhow::Error::msg)?;
        assert_eq!(job.delivery_key, format!("acme/{}", job.delivery_id));
        assert!(scheduled.insert(job.delivery_id), "once");
    }
    let expected: BTreeSet<String> = (0..n).map(|i| format!("d-{i}")).collect();
    assert_eq!(scheduled, expected);
    // Nothing more arrives: the poison, after which half the requests came, gave nothing.
    let more = tokio::time::timeout(std::time::Duration::from_secs(2), reader.recv()).await;
    assert!(more.is_err(), "no other record");

    stop.cancel();
    tokio::time::timeout(SETTLE, workflow).await???;
    Ok(())
}

/// The consumer helper moves the group only past records the application stored: a new
/// member of the group starts right after the last stored record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_resumes_after_the_last_stored_offset() -> Result<()> {
    let topic = schemas::Topic {
        name: "offsets-test",
        keyed_by: schemas::topics::KeyedBy::OriginalKey,
        partitions: 1,
        compacted: false,
        min_compaction_lag_ms: 0,
    };
    let broker = EmbeddedBroker::start(1, &[topic])?;
    let settings = ClientSettings::plain(broker.bootstrap_servers());
    let producer = Producer::new(&settings, &ProducerArgs::default())?;
    for i in 0..10u8 {
        producer
            .send_and_wait(OutRecord {
                topic: topic.name,
                key: b"k",
                payload: &[i],
                headers: &[],
            })
            .await?;
    }
    let deadline = tokio::time::Instant::now() + SETTLE;
    {
        let first = Consumer::subscribe(&settings, "resume", &[topic.name])?;
        for i in 0..10u8 {
            let record = tokio::time::timeout_at(deadline, first.recv()).await??;
            assert_eq!(record.payload(), Some(&[i][..]));
            // Handled only the first five.
            if i < 5 {
                first.store(topic.name, record.partition(), record.offset())?;
            }
        }
        tokio::task::spawn_blocking(move || first.commit()).await??;
    }
    let second = Consumer::subscribe(&settings, "resume", &[topic.name])?;
    let record = tokio::time::timeout_at(deadline, second.recv()).await??;
    assert_eq!(
        record.payload(),
        Some(&[5u8][..]),
        "resumes at the first unstored record"
    );
    Ok(())
}
