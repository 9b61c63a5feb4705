//! What a processor produces and how it is produced: one owned record ([`Output`]) and
//! the batch send that waits for every acknowledgement and retries in order
//! (`produce_batch`).
//!
//! The workflow and the stateful engine produce through it; the machines only return
//! [`Output`]s. It must not decide what to produce, nor store or commit offsets: the
//! caller does that once a batch is acknowledged.

use std::time::Duration;

use bus::{OutRecord, Producer};
use tokio_util::sync::CancellationToken;

/// One record to produce, owned so that it can be retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The topic.
    pub topic: &'static str,
    /// The key.
    pub key: Vec<u8>,
    /// The payload.
    pub payload: Vec<u8>,
    /// The headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Produces every record (to its partition when given) and waits for all
/// acknowledgements. A full producer queue is waited out. When some records fail, every
/// record from the first failed one on is sent again, in order (later ones may then be
/// written twice, never out of order: the last value of a key stays the last), with
/// backoff, until all are acknowledged or `shutdown` is cancelled (then `false`).
pub(crate) async fn produce_batch(
    producer: &Producer,
    records: Vec<(Output, Option<i32>)>,
    shutdown: &CancellationToken,
    name: &'static str,
) -> bool {
    let mut pending = records;
    let mut backoff = Duration::from_millis(100);
    while !pending.is_empty() {
        let mut acks = Vec::with_capacity(pending.len());
        let mut first_failed: Option<(usize, bus::BusError)> = None;
        for (i, (output, partition)) in pending.iter().enumerate() {
            let headers: Vec<(&str, &[u8])> = output
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            let record = OutRecord {
                topic: output.topic,
                key: &output.key,
                payload: &output.payload,
                headers: &headers,
            };
            // An empty value on a changelog deletes the key: a tombstone, so that
            // compaction drops it.
            let tombstone = output.payload.is_empty() && is_changelog(output.topic);
            loop {
                match producer.send_record(record, *partition, tombstone) {
                    Ok(ack) => {
                        acks.push((i, ack));
                        break;
                    }
                    Err(bus::BusError::QueueFull) => {
                        tokio::select! {
                            () = shutdown.cancelled() => return false,
                            () = tokio::time::sleep(Duration::from_millis(5)) => {}
                        }
                    }
                    Err(e) => {
                        first_failed = Some((i, e));
                        break;
                    }
                }
            }
            if first_failed.is_some() {
                break;
            }
        }
        let (indexes, futures): (Vec<usize>, Vec<_>) = acks.into_iter().unzip();
        for (i, result) in indexes
            .into_iter()
            .zip(futures_util::future::join_all(futures).await)
        {
            if let Err(e) = result
                && first_failed.as_ref().is_none_or(|(f, _)| i < *f)
            {
                first_failed = Some((i, e));
            }
        }
        let Some((from, e)) = first_failed else {
            return true;
        };
        tracing::warn!(processor = name, from, of = pending.len(), error = %e, ?backoff, "produce failed; sending again from the first failure");
        pending.drain(..from);
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    true
}

/// Whether `topic` is a state changelog (a compacted topic), where an empty value deletes
/// its key.
pub(crate) fn is_changelog(topic: &str) -> bool {
    schemas::topics::ALL
        .iter()
        .any(|t| t.compacted && t.name == topic)
}
