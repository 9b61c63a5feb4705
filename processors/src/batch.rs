//! A batch of input records: received until it is full or a short wait after the first
//! passes, owned, and never holding a record of a partition this member gave away.
//!
//! Rebalance callbacks run inside a receive. A partition revoked in one is dropped from
//! the batch being collected, and the batch is checked once more after its last receive
//! (including one that timed out with nothing), so a batch handled after a revocation has
//! none of that partition's records: its new owner handles them. Nothing here decides
//! what a record means or writes anything.

use std::collections::HashSet;
use std::time::Duration;

use bus::Consumer;

use crate::output::Output;

/// A record as received, owned.
#[derive(Debug, Clone)]
pub struct Record {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// The key, if any.
    pub key: Option<Vec<u8>>,
    /// The payload, if any.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The key as text (empty when none or not UTF-8).
    pub fn key_text(&self) -> &str {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or_default()
    }

    /// `topic/partition/offset`, for dead letters and logs.
    pub fn source(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }

    /// A dead letter of this record: its key, payload and headers, with the reason.
    pub fn dead_letter(&self, reason: &str) -> Output {
        let mut headers = self.headers.clone();
        headers.push((
            schemas::headers::DEAD_LETTER_REASON.to_owned(),
            reason.as_bytes().to_vec(),
        ));
        headers.push((
            schemas::headers::DEAD_LETTER_SOURCE.to_owned(),
            self.source().into_bytes(),
        ));
        metrics::counter!("processor_dead_letters_total", "topic" => self.topic.clone())
            .increment(1);
        Output {
            topic: schemas::topics::DEAD_LETTERS.name,
            key: self.key.clone().unwrap_or_default(),
            payload: self.payload.clone().unwrap_or_default(),
            headers,
        }
    }
}

/// A batch: the records, and the partitions revoked while it was collected.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// The records, in the order received.
    pub(crate) records: Vec<Record>,
    /// Partition numbers revoked from this member while collecting (any topic).
    pub(crate) revoked: HashSet<i32>,
}

impl Batch {
    /// Starts a batch from `first` (a receive's outcome, possibly an error), then
    /// receives until `max` records, taking what is already received at once, and
    /// waiting for more at most until `wait` after the first: under a backlog a batch
    /// fills, and at a steady rate below the processor's it closes after `wait` (its
    /// records' extra latency), however close together they come.
    pub(crate) async fn collect(
        consumer: &Consumer,
        first: bus::Result<bus::Received<'_>>,
        max: usize,
        wait: Duration,
        name: &'static str,
    ) -> Self {
        let mut batch = Self::default();
        if !batch.take(consumer, first, name) {
            batch.drop_revoked(consumer, name);
            return batch;
        }
        let deadline = tokio::time::Instant::now() + wait;
        while batch.records.len() < max.max(1) {
            // A record already waiting is taken without a timer (and its clock reads);
            // the wait starts only when none is.
            if let Some(received) = futures_util::FutureExt::now_or_never(consumer.recv()) {
                if !batch.take(consumer, received, name) {
                    break;
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(received) => {
                    if !batch.take(consumer, received, name) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        // The last receive may have served a rebalance and returned nothing.
        batch.drop_revoked(consumer, name);
        batch
    }

    /// Only the revocations served since the last receive, as an empty batch (a tick).
    pub(crate) fn revocations(consumer: &Consumer, name: &'static str) -> Self {
        let mut batch = Self::default();
        batch.drop_revoked(consumer, name);
        batch
    }

    fn take(
        &mut self,
        consumer: &Consumer,
        received: bus::Result<bus::Received<'_>>,
        name: &'static str,
    ) -> bool {
        // Revoked during this receive: records received before it are dropped; the
        // record it returned is from the new assignment.
        self.drop_revoked(consumer, name);
        match received {
            Ok(record) => {
                self.records.push(own(&record));
                true
            }
            Err(e) => {
                tracing::warn!(processor = name, error = %e, "receive failed");
                false
            }
        }
    }

    fn drop_revoked(&mut self, consumer: &Consumer, name: &'static str) {
        let revoked = consumer.take_revoked();
        if revoked.is_empty() {
            return;
        }
        let gone: HashSet<i32> = revoked.iter().map(|(_, p)| *p).collect();
        let before = self.records.len();
        self.records.retain(|r| !gone.contains(&r.partition));
        tracing::info!(processor = name, partitions = ?gone, dropped = before - self.records.len(), "partitions revoked");
        self.revoked.extend(gone);
    }
}

fn own(record: &bus::Received<'_>) -> Record {
    Record {
        topic: record.topic().to_owned(),
        partition: record.partition(),
        offset: record.offset(),
        key: record.key().map(<[u8]>::to_vec),
        payload: record.payload().map(<[u8]>::to_vec),
        headers: record
            .headers()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_vec()))
            .collect(),
    }
}
