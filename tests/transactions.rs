//! Kafka transactions at the bus boundary, on a real Apache Kafka cluster (three KRaft
//! nodes from `deploy/tools/kafka` on 127.0.0.1): what exactly-once processing rests on.
//!
//! - Readers (a changelog restore, a tail, a group member) read `read_committed`: records
//!   of aborted and still open transactions are never seen, and a restore ends although
//!   the partition ends with a transaction marker rather than a record.
//! - A producer registered with a transactional id fences the earlier one with the same
//!   id: the earlier one's open transaction is aborted and its commit is refused as fatal.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use bus::{ClientSettings, OutRecord, Producer, ProducerArgs, read_partition};
use schemas::topics;

mod common;
use common::kafka::{KafkaCluster, exclusive};

const CALL: Duration = Duration::from_secs(30);

/// A one-partition compacted topic of this test's own.
async fn own_changelog(settings: &ClientSettings, prefix: &str) -> Result<&'static str> {
    let name: &'static str =
        Box::leak(format!("{prefix}-{}-state", uuid::Uuid::new_v4().simple()).into_boxed_str());
    let topic = schemas::Topic {
        name,
        partitions: 1,
        ..topics::TRACKING_STATE
    };
    bus::ensure_topics(settings, &[topic]).await?;
    Ok(name)
}

fn record<'a>(topic: &'a str, key: &'a str) -> OutRecord<'a> {
    OutRecord {
        topic,
        key: key.as_bytes(),
        payload: key.as_bytes(),
        headers: &[],
    }
}

async fn transactional(settings: &ClientSettings, id: &str) -> Result<Producer> {
    let (settings, id) = (settings.clone(), id.to_owned());
    Ok(tokio::task::spawn_blocking(move || {
        Producer::transactional(&settings, &ProducerArgs::default(), &id, CALL)
    })
    .await??)
}

async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> bus::Result<T> + Send + 'static,
) -> Result<bus::Result<T>> {
    Ok(tokio::task::spawn_blocking(call).await?)
}

fn keys(settings: &ClientSettings, topic: &str) -> Result<Vec<String>> {
    Ok(read_partition(settings, topic, 0, Duration::from_secs(20))?
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.key).into_owned())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_records_are_never_restored_and_a_restore_ends_at_a_marker() -> Result<()> {
    let _turn = exclusive().await;
    let settings = KafkaCluster::shared().settings();
    let topic = own_changelog(&settings, "txn-restore").await?;
    let producer = transactional(&settings, &format!("{topic}-writer")).await?;
    for (key, commit) in [("k1", true), ("k2", false), ("k3", true)] {
        producer.begin_transaction()?;
        producer.send_to(record(topic, key), Some(0))?.await?;
        let p = producer.clone();
        if commit {
            blocking(move || p.commit_transaction(CALL)).await??;
        } else {
            blocking(move || p.abort_transaction(CALL)).await??;
        }
    }
    // The partition ends with a commit marker: the restore still ends, at once.
    let started = std::time::Instant::now();
    let s = settings.clone();
    let restored = tokio::task::spawn_blocking(move || keys(&s, topic)).await??;
    assert_eq!(restored, ["k1", "k3"], "aborted k2 is never read");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the restore waited for a record after the marker: {:?}",
        started.elapsed()
    );

    // An open transaction is not read either (its records are past the last stable
    // offset) until it commits.
    producer.begin_transaction()?;
    producer.send_to(record(topic, "k4"), Some(0))?.await?;
    let s = settings.clone();
    let while_open = tokio::task::spawn_blocking(move || keys(&s, topic)).await??;
    assert_eq!(while_open, ["k1", "k3"]);
    let p = producer.clone();
    blocking(move || p.commit_transaction(CALL)).await??;
    let s = settings.clone();
    let after = tokio::task::spawn_blocking(move || keys(&s, topic)).await??;
    assert_eq!(after, ["k1", "k3", "k4"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_with_the_same_transactional_id_fences_the_earlier_one() -> Result<()> {
    let _turn = exclusive().await;
    let settings = KafkaCluster::shared().settings();
    let topic = own_changelog(&settings, "txn-fence").await?;
    let id = format!("{topic}-member");
    let zombie = transactional(&settings, &id).await?;
    zombie.begin_transaction()?;
    zombie.send_to(record(topic, "zombie"), Some(0))?.await?;

    // The replacement registers: the zombie's open transaction is aborted.
    let replacement = transactional(&settings, &id).await?;
    replacement.begin_transaction()?;
    replacement
        .send_to(record(topic, "replacement"), Some(0))?
        .await?;
    let r = replacement.clone();
    blocking(move || r.commit_transaction(CALL)).await??;

    // The zombie's writes are refused for good.
    let z = zombie.clone();
    let refused = blocking(move || {
        let _unacknowledged = z.send_to(record(topic, "zombie-2"), Some(0))?;
        z.commit_transaction(CALL)
    })
    .await?;
    let error = refused.expect_err("a fenced producer committed");
    assert!(error.is_fatal(), "not fatal: {error}");
    let s = settings.clone();
    let read = tokio::task::spawn_blocking(move || keys(&s, topic)).await??;
    assert_eq!(read, ["replacement"]);
    Ok(())
}
