//! What a processor produces and how it is produced: one owned record ([`Output`]), the
//! batch send that waits for every acknowledgement and retries in order
//! (`produce_batch`), and whether a member's outputs are being written ([`OutputHealth`]).
//!
//! The workflow and the stateful engine produce through it; the machines only return
//! [`Output`]s. It must not decide what to produce, nor store or commit offsets: the
//! caller does that once a batch is acknowledged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::{OutRecord, Producer};
use tokio_util::sync::CancellationToken;

/// Whether a member's outputs are being written: the batches its processors retry after
/// a transient failure (at-least-once), transactions aborted twice or more in a row
/// (exactly-once; a single abort, such as one a rebalance causes, is not a stall) within
/// the last [`ABORTS_SHOWN`], and the last failure. The member's readiness fails
/// meanwhile, and `processor_produce_retries_total` counts every retry and abort, so a
/// cluster that refuses writes is seen, not only logged.
#[derive(Debug, Clone, Default)]
pub struct OutputHealth(Arc<OutputState>);

#[derive(Debug, Default)]
struct OutputState {
    failing: AtomicUsize,
    /// When a transaction was last aborted for the second time or more in a row.
    aborting: Mutex<Option<std::time::Instant>>,
    last: Mutex<String>,
}

/// How long transactions aborted in a row keep the outputs shown as stalled after the
/// last abort (a processor with nothing more to write never commits to clear it): longer
/// than one transaction's try while the cluster refuses writes (its acknowledgements wait
/// up to 50 s, its calls 30 s), so that a lasting outage shows without a break.
pub const ABORTS_SHOWN: Duration = Duration::from_secs(120);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl OutputHealth {
    /// Why outputs are not being written, while any processor retries after a failure.
    pub fn stalled(&self) -> Option<String> {
        let failing = self.0.failing.load(Ordering::SeqCst);
        let aborting = lock(&self.0.aborting).is_some_and(|at| at.elapsed() < ABORTS_SHOWN);
        (failing > 0 || aborting).then(|| {
            format!(
                "processors cannot write their outputs and retry: {}",
                lock(&self.0.last)
            )
        })
    }

    /// Notes that processor `name`'s transaction was aborted, the `in_a_row`th time in a
    /// row (its batch is read and sent again).
    pub(crate) fn aborted(&self, name: &'static str, in_a_row: u32) {
        metrics::counter!("processor_produce_retries_total", "processor" => name).increment(1);
        if in_a_row >= 2 {
            *lock(&self.0.last) = format!("{name}: {in_a_row} transactions aborted in a row");
            *lock(&self.0.aborting) = Some(std::time::Instant::now());
        }
    }

    /// Notes that processor `name` failed to write (`error`) and retries: it counts as
    /// failing until the returned guard is dropped (once it wrote, or stopped).
    pub(crate) fn failing(
        &self,
        name: &'static str,
        error: &dyn std::fmt::Display,
        held: &mut Option<Failing>,
    ) {
        metrics::counter!("processor_produce_retries_total", "processor" => name).increment(1);
        *lock(&self.0.last) = format!("{name}: {error}");
        if held.is_none() {
            self.0.failing.fetch_add(1, Ordering::SeqCst);
            *held = Some(Failing(self.clone()));
        }
    }
}

/// A processor retrying after a failure to write; dropped once it wrote.
#[derive(Debug)]
pub(crate) struct Failing(OutputHealth);

impl Drop for Failing {
    fn drop(&mut self) {
        self.0.0.failing.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The most bytes of a refused record's key and payload a dead letter keeps: enough to
/// find it, never near the broker's limit itself.
const DEAD_LETTER_KEEP: usize = 16 * 1024;

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

impl Output {
    /// What is written instead of this record when it can never be written (`error`):
    /// a dead letter with the reason, its topic, and the head of its key and payload.
    pub(crate) fn refused(&self, error: &bus::BusError) -> Output {
        metrics::counter!("processor_refused_outputs_total", "topic" => self.topic).increment(1);
        let keep = |bytes: &[u8]| bytes[..bytes.len().min(DEAD_LETTER_KEEP)].to_vec();
        Output {
            topic: schemas::topics::DEAD_LETTERS.name,
            key: keep(&self.key),
            payload: keep(&self.payload),
            headers: vec![
                (
                    schemas::headers::DEAD_LETTER_REASON.to_owned(),
                    format!(
                        "the {} record of {} bytes cannot be written: {error}",
                        self.topic,
                        self.payload.len()
                    )
                    .into_bytes(),
                ),
                (
                    schemas::headers::DEAD_LETTER_SOURCE.to_owned(),
                    format!("output to {}", self.topic).into_bytes(),
                ),
            ],
        }
    }
}

/// Produces every record (to its partition when given) and waits for all
/// acknowledgements. A full producer queue is waited out. When some records fail, every
/// record from the first failed one on is sent again, in order (later ones may then be
/// written twice, never out of order: the last value of a key stays the last), with
/// backoff, until all are acknowledged or `shutdown` is cancelled (then `false`). A
/// record that can never be written (too large, invalid) is replaced by its dead letter
/// ([`Output::refused`]) rather than retried.
pub(crate) async fn produce_batch(
    producer: &Producer,
    records: Vec<(Output, Option<i32>)>,
    shutdown: &CancellationToken,
    name: &'static str,
    health: &OutputHealth,
) -> bool {
    let mut failing = None;
    let mut pending = records;
    let mut backoff = Duration::from_millis(100);
    while !pending.is_empty() {
        // Record `i` of `pending` is record `i` of `acks`: sending stops at the first
        // record that cannot be enqueued.
        let mut acks = bus::Acks::with_capacity(pending.len());
        let mut first_failed: Option<(usize, bus::BusError)> = None;
        let mut headers: Vec<(&str, &[u8])> = Vec::new();
        for (i, (output, partition)) in pending.iter().enumerate() {
            headers.clear();
            headers.extend(
                output
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_slice())),
            );
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
                match producer.enqueue(&mut acks, record, *partition, tombstone) {
                    Ok(_) => break,
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

        let results = acks.settled().await;
        if let Some((i, e)) = results.failures().next()
            && first_failed.as_ref().is_none_or(|(f, _)| i < *f)
        {
            first_failed = Some((i, e.clone()));
        }
        let Some((from, e)) = first_failed else {
            return true;
        };
        // A record refused for what it is goes to dead-letters instead; any other failure
        // is transient, and shows until the batch is written.
        if e.is_permanent_for_record()
            && pending[from].0.topic != schemas::topics::DEAD_LETTERS.name
        {
            tracing::warn!(processor = name, topic = pending[from].0.topic, error = %e, "an output can never be written; sending it to dead-letters");
            pending[from] = (pending[from].0.refused(&e), None);
        } else {
            health.failing(name, &e, &mut failing);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use bus::{ClientSettings, EmbeddedBroker, ProducerArgs};
    use schemas::topics;

    fn output(topic: &'static str, key: &str, payload: Vec<u8>) -> (Output, Option<i32>) {
        (
            Output {
                topic,
                key: key.as_bytes().to_vec(),
                payload,
                headers: Vec::new(),
            },
            Some(0),
        )
    }

    /// While the cluster refuses writes, the batch is retried and the member's outputs
    /// show as stalled (its readiness fails, with the failure); once written, they do not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outputs_retried_after_a_transient_failure_show_as_stalled_until_written() {
        let broker = EmbeddedBroker::start(1, &topics::ALL).unwrap();
        let settings = ClientSettings::plain(broker.bootstrap_servers());
        let tuning = ProducerArgs {
            ack_timeout_ms: 500,
            ..ProducerArgs::default()
        };
        let producer = Producer::new(&settings, &tuning).unwrap();
        let health = OutputHealth::default();
        assert_eq!(health.stalled(), None);
        broker.broker_down(1).unwrap();
        let shutdown = CancellationToken::new();
        let batch = {
            let (producer, health, shutdown) = (producer.clone(), health.clone(), shutdown.clone());
            tokio::spawn(async move {
                let records = vec![output(topics::DELIVERIES.name, "k", b"{}".to_vec())];
                produce_batch(&producer, records, &shutdown, "test", &health).await
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while health.stalled().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "never seen as stalled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(health.stalled().unwrap().contains("test"));
        broker.broker_up(1).unwrap();
        let written = tokio::time::timeout(Duration::from_secs(60), batch)
            .await
            .expect("the batch was not written once the broker was back")
            .unwrap();
        assert!(written);
        assert_eq!(health.stalled(), None);
    }

    /// One aborted transaction (a rebalance causes those) is not a stall; two in a row
    /// are, for a while after the last.
    #[test]
    fn transactions_aborted_in_a_row_show_as_stalled() {
        let health = OutputHealth::default();
        health.aborted("scheduling", 1);
        assert_eq!(health.stalled(), None);
        health.aborted("scheduling", 2);
        let why = health.stalled().expect("stalled");
        assert!(
            why.contains("scheduling") && why.contains("2 transactions"),
            "{why}"
        );
    }

    /// A record larger than the broker takes is never retried for ever (which stopped
    /// the partition for good): its dead letter goes instead, with the head of its bytes,
    /// and the records around it are written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_that_can_never_be_written_becomes_a_dead_letter() {
        let broker = EmbeddedBroker::start(1, &topics::ALL).unwrap();
        let settings = ClientSettings::plain(broker.bootstrap_servers());
        let producer = Producer::new(&settings, &ProducerArgs::default()).unwrap();
        let huge = vec![b'x'; 2_000_000];
        let records = vec![
            output(topics::DELIVERIES.name, "before", b"{}".to_vec()),
            output(topics::DELIVERIES.name, "huge", huge),
            output(topics::DELIVERIES.name, "after", b"{}".to_vec()),
        ];
        let shutdown = CancellationToken::new();
        let produced = tokio::time::timeout(
            Duration::from_secs(60),
            produce_batch(
                &producer,
                records,
                &shutdown,
                "test",
                &OutputHealth::default(),
            ),
        )
        .await
        .expect("the batch was retried without end");
        assert!(produced);
        let read = |topic: &'static str| {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || {
                let mut all = Vec::new();
                for partition in 0..topics::ALL
                    .iter()
                    .find(|t| t.name == topic)
                    .unwrap()
                    .partitions
                {
                    all.extend(
                        bus::read_partition(&settings, topic, partition, Duration::from_secs(10))
                            .unwrap(),
                    );
                }
                all
            })
        };
        let written = read(topics::DELIVERIES.name).await.unwrap();
        let keys: Vec<&[u8]> = written.iter().map(|r| r.key.as_slice()).collect();
        assert_eq!(keys, [b"before".as_slice(), b"after".as_slice()]);
        let letters = read(topics::DEAD_LETTERS.name).await.unwrap();
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(letters[0].key, b"huge");
        assert_eq!(letters[0].payload.len(), DEAD_LETTER_KEEP);
    }
}
