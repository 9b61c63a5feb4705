//! The Kafka boundary on the embedded broker, in this process: how records cross topics
//! through the bus helpers (`bus::Producer`, `bus::Consumer`): the workflow processor's
//! fan-out to `deliveries` and `drone-scheduling` with their keys and headers, poison
//! records to `dead-letters`, and a consumer group resuming after the last offset the
//! application stored. Needs nothing outside this process.
//!
//! The fan-out test is about the workflow processor too; it sits here, with the topics it
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

/// The workflow processor fans each request out to `deliveries` (keyed by delivery id)
/// and `drone-scheduling` (keyed by region), and a poison record to `dead-letters`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_fans_out_and_dead_letters_poison() -> Result<()> {
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

    let requested: [(&str, &[u8]); 1] = [(
        schemas::headers::EVENT_TYPE,
        schemas::headers::event_type::DELIVERY_REQUESTED.as_bytes(),
    )];
    let n = 20;
    for i in 0..n {
        let payload = valid_request(i).to_string();
        let key = format!("d-{i}");
        producer
            .send_and_wait(OutRecord {
                topic: topics::DELIVERY_REQUESTS.name,
                key: key.as_bytes(),
                payload: payload.as_bytes(),
                headers: &requested,
            })
            .await?;
    }
    producer
        .send_and_wait(OutRecord {
            topic: topics::DELIVERY_REQUESTS.name,
            key: b"poison",
            payload: b"{not json",
            headers: &requested,
        })
        .await?;

    let reader = Consumer::subscribe(
        &settings,
        "test-reader",
        &[
            topics::DELIVERIES.name,
            topics::DRONE_SCHEDULING.name,
            topics::DEAD_LETTERS.name,
        ],
    )?;
    let mut deliveries = BTreeSet::new();
    let mut scheduled = BTreeSet::new();
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while deliveries.len() < n || scheduled.len() < n || dead.is_empty() {
        let record = tokio::time::timeout_at(deadline, reader.recv())
            .await
            .context("fan-out did not arrive in time")??;
        let key = String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned();
        match record.topic() {
            t if t == topics::DELIVERIES.name => {
                assert!(deliveries.insert(key), "delivered once");
            }
            t if t == topics::DRONE_SCHEDULING.name => {
                assert!(key.contains(':'), "keyed by region, got {key}");
                let id = record
                    .header(schemas::headers::DELIVERY_ID)
                    .context("scheduling record without delivery id")?;
                assert!(scheduled.insert(String::from_utf8_lossy(id).into_owned()));
            }
            _ => {
                assert_eq!(record.payload(), Some(&b"{not json"[..]));
                let reason = record
                    .header(schemas::headers::DEAD_LETTER_REASON)
                    .context("dead letter without reason")?;
                assert!(String::from_utf8_lossy(reason).contains("invalid delivery request"));
                dead.push(key);
            }
        }
    }
    let expected: BTreeSet<String> = (0..n).map(|i| format!("d-{i}")).collect();
    assert_eq!(deliveries, expected);
    assert_eq!(scheduled, expected);
    assert_eq!(dead, ["poison"]);

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
