//! How a batch's effects and its input offsets become durable, under the guarantee in
//! force ([`crate::guarantee`]).
//!
//! - At-least-once: each stage of records (outputs, then state, then offset markers) is
//!   produced and acknowledged before the next, retried in order until it is; then the
//!   input offsets are stored for the consumer's background commit.
//! - Exactly-once: one transaction holds every record of every stage and the input
//!   offsets (sent with the group's metadata, so a member that lost its partitions in a
//!   rebalance cannot commit). A call that failed with a retriable error (a commit whose
//!   outcome is not known yet) is retried, never aborted, until it succeeds. Any other
//!   failure aborts it: nothing of it is ever read, and the caller restores its state
//!   and reads the batch again. A fenced producer is an error: this member must stop. A
//!   producer that failed for good without being fenced (the broker refusing a call in
//!   a state it did not expect, after an outage) is replaced by a new registration of
//!   the same id, which aborts what it left open, and the batch counts as aborted.
//!   A transactional call still blocked [`CALL_OVERRUN`] past its own time limit (librdkafka
//!   can wait for ever for a group coordinator that left, whatever timeout it was
//!   given) is given up the same way: its producer is left to the blocked thread, a new
//!   registration fences it, and the batch counts as aborted. A registration blocked
//!   past its limit stops the member instead: it could still complete and fence the
//!   next one.
//!   Once stopping, a transaction gets [`STOP_GRACE`] to finish; after that the member
//!   stops without waiting for it, and the broker decides it, all or nothing: committed
//!   if the commit already reached it, else aborted when it times out (or when this
//!   instance registers again).
//!
//! It must not decide what to produce, nor handle records.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus::{BusError, ClientSettings, Consumer, OutRecord, Producer, TransactionFailure};
use tokio_util::sync::CancellationToken;

use crate::error::{ProcessorError, Result};
use crate::guarantee::{Durability, Guarantee, transactional_id};
use crate::output::{Output, is_changelog, produce_batch};

/// How long one transactional call (register, add offsets, commit, abort) may block.
const TRANSACTION_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long past [`TRANSACTION_CALL_TIMEOUT`] a transactional call may still block before
/// its producer is given up. librdkafka 2.12 does not bound `send_offsets_to_transaction`
/// when the group coordinator it cached left the cluster (confluentinc/librdkafka#5456 and
/// #5511): after brokers were killed, the call waited with no end and the member stopped
/// processing.
const CALL_OVERRUN: Duration = Duration::from_secs(15);
/// Longest wait between two attempts of a transactional call that failed with a
/// retriable error.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(2);
/// How long a transaction open when the processor is told to stop may still take.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);

/// Records to produce (to a given partition when set), stage by stage.
pub(crate) type Stages = Vec<Vec<(Output, Option<i32>)>>;

/// What became of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Committed {
    /// Durable: its effects and offsets are in.
    Done,
    /// The processor is stopping; nothing of the batch is committed (at-least-once: some
    /// of its outputs may be, and are written again after a restart).
    Stopped,
    /// Exactly-once: the transaction was aborted. The caller restores the state of the
    /// batch's partitions and rewinds its input to the committed offsets.
    Aborted,
}

/// Writes a processor's batches under the guarantee in force.
#[derive(Debug)]
pub(crate) struct Committer {
    name: &'static str,
    guarantee: Guarantee,
    producer: Producer,
    transactional_id: String,
    /// What a new transactional producer is built from.
    durability: Durability,
    /// The producer failed for good without being fenced: a new one takes its place
    /// before the next transaction.
    broken: AtomicBool,
    /// Transactions aborted in a row since the last one committed.
    aborts: u32,
}

impl Committer {
    /// The committer of processor `name`. Under exactly-once, registers its
    /// transactional producer (fencing a predecessor with the same id), retrying with
    /// backoff while the cluster is unreachable; `None` when `shutdown` came first.
    pub(crate) async fn open(
        name: &'static str,
        durability: &Durability,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>> {
        let id = transactional_id(name, &durability.instance_id);
        let producer = match durability.guarantee {
            Guarantee::AtLeastOnce => durability.shared.clone(),
            Guarantee::ExactlyOnce => match register(name, durability, &id, shutdown).await? {
                Some(producer) => producer,
                None => return Ok(None),
            },
        };
        Ok(Some(Self {
            name,
            guarantee: durability.guarantee,
            producer,
            transactional_id: id,
            durability: durability.clone(),
            broken: AtomicBool::new(false),
            aborts: 0,
        }))
    }

    /// The guarantee this committer writes with.
    pub(crate) fn guarantee(&self) -> Guarantee {
        self.guarantee
    }

    /// Joins `group` as a consumer of `inputs` whose offsets this committer moves.
    pub(crate) fn subscribe(
        &self,
        settings: &ClientSettings,
        group: &str,
        inputs: &[&str],
        copartitioned: bool,
    ) -> bus::Result<Consumer> {
        match (self.guarantee, copartitioned) {
            (Guarantee::ExactlyOnce, _) => {
                Consumer::subscribe_transactional(settings, group, inputs, copartitioned)
            }
            (Guarantee::AtLeastOnce, true) => {
                Consumer::subscribe_copartitioned(settings, group, inputs)
            }
            (Guarantee::AtLeastOnce, false) => Consumer::subscribe(settings, group, inputs),
        }
    }

    /// Makes a batch durable: `stages` in order, then the input offsets (`last`: per
    /// topic and partition, the last offset the batch read).
    pub(crate) async fn commit(
        &mut self,
        consumer: &Arc<Consumer>,
        stages: Stages,
        last: &BTreeMap<(String, i32), i64>,
        shutdown: &CancellationToken,
    ) -> Result<Committed> {
        match self.guarantee {
            Guarantee::AtLeastOnce => {
                for stage in stages {
                    if !stage.is_empty()
                        && !produce_batch(
                            &self.producer,
                            stage,
                            shutdown,
                            self.name,
                            &self.durability.outputs,
                        )
                        .await
                    {
                        return Ok(Committed::Stopped);
                    }
                }
                for ((topic, partition), offset) in last {
                    if let Err(e) = consumer.store(topic, *partition, *offset) {
                        tracing::debug!(processor = self.name, %topic, partition, error = %e, "offset not stored (revoked?)");
                    }
                }
                Ok(Committed::Done)
            }
            Guarantee::ExactlyOnce => {
                let mut stages = stages;
                // Sent again, whole, when the broker refused one output for what it is
                // (that output then a dead letter): each time one output fewer can fail.
                let committed = loop {
                    let transaction = self.transaction(consumer, &mut stages, last, shutdown);
                    let grace = async {
                        shutdown.cancelled().await;
                        tokio::time::sleep(STOP_GRACE).await;
                    };
                    let outcome = tokio::select! {
                        outcome = transaction => outcome?,
                        () = grace => {
                            tracing::warn!(processor = self.name, grace = ?STOP_GRACE, "stopping: the open transaction did not finish in time and is left to the broker");
                            Some(Committed::Stopped)
                        }
                    };
                    if let Some(committed) = outcome {
                        break committed;
                    }
                    // The refused transaction was aborted: the batch is sent again from a
                    // new registration of the same id, which waits for the coordinator to
                    // finish that abort. (Sent again on the same producer, right after
                    // the epoch bump of the abort, the batch's records were purged, and
                    // the batch, restored, was refused again, for ever.)
                    if shutdown.is_cancelled() {
                        return Ok(Committed::Stopped);
                    }
                    match register(
                        self.name,
                        &self.durability,
                        &self.transactional_id,
                        shutdown,
                    )
                    .await?
                    {
                        Some(producer) => {
                            self.producer = producer;
                            // The new registration fenced whatever the old producer left.
                            self.broken.store(false, Ordering::SeqCst);
                        }
                        None => return Ok(Committed::Stopped),
                    }
                };
                if self.broken.load(Ordering::SeqCst) {
                    if shutdown.is_cancelled() {
                        // Stopping: the next instance's registration decides what the old
                        // producer left open.
                        return Ok(Committed::Stopped);
                    }
                    // Registering the same id again aborts what the old producer left open
                    // (or lets a commit that already reached the coordinator complete).
                    match register(
                        self.name,
                        &self.durability,
                        &self.transactional_id,
                        shutdown,
                    )
                    .await?
                    {
                        Some(producer) => {
                            self.producer = producer;
                            self.broken.store(false, Ordering::SeqCst);
                        }
                        None => return Ok(Committed::Stopped),
                    }
                }
                match committed {
                    Committed::Done => self.aborts = 0,
                    Committed::Aborted => {
                        self.aborts = self.aborts.saturating_add(1);
                        self.durability.outputs.aborted(self.name, self.aborts);
                    }
                    Committed::Stopped => {}
                }
                Ok(committed)
            }
        }
    }

    /// One transaction of `stages` and the input offsets `last`: `None` when the broker
    /// refused an output for what it is on acknowledgement (too large for the topic,
    /// invalid): the transaction is aborted and that output replaced by its dead letter
    /// in `stages`, to be sent again. An output refused when it is sent is replaced at
    /// once, in the same transaction.
    async fn transaction(
        &self,
        consumer: &Arc<Consumer>,
        stages: &mut Stages,
        last: &BTreeMap<(String, i32), i64>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Committed>> {
        let started = std::time::Instant::now();
        if let Err(e) = self.producer.begin_transaction() {
            return self.failed(e, "begin").await.map(Some);
        }
        let mut acks = bus::Acks::with_capacity(stages.iter().map(Vec::len).sum());
        let mut sent_as = Vec::new();
        for (at, (output, partition)) in stages.iter_mut().flatten().enumerate() {
            let mut refusals = 0;
            loop {
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
                let tombstone = output.payload.is_empty() && is_changelog(output.topic);
                let sent = self
                    .producer
                    .enqueue(&mut acks, record, *partition, tombstone);
                match sent {
                    Ok(_) => {
                        sent_as.push(at);
                        break;
                    }
                    // Refused for what it is (too large, invalid): its dead letter goes
                    // in its place, and the partition moves on. (A dead letter is small:
                    // refused a second time, it is a failure like any other.)
                    Err(e) if e.is_permanent_for_record() && refusals == 0 => {
                        tracing::warn!(processor = self.name, topic = output.topic, error = %e, "an output can never be written; sending it to dead-letters");
                        refusals += 1;
                        *output = output.refused(&e);
                        *partition = None;
                    }
                    Err(BusError::QueueFull) => {
                        if shutdown.is_cancelled() {
                            self.abort().await?;
                            return Ok(Some(Committed::Stopped));
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => return self.failed(e, "produce").await.map(Some),
                }
            }
        }
        let records = acks.len();
        // Records purged by librdkafka (once the transaction became abortable) say
        // nothing of why: the failure worth reporting is another record's.
        let mut failure: Option<BusError> = None;
        let mut refused: Option<(usize, BusError)> = None;
        let results = acks.settled().await;
        for (sent, e) in results.failures() {
            let (Some(&at), e) = (sent_as.get(sent), e.clone()) else {
                continue;
            };
            let replaceable = e.is_permanent_for_record()
                && refused.is_none()
                && stages
                    .iter()
                    .flatten()
                    .nth(at)
                    .is_some_and(|(o, _)| o.topic != schemas::topics::DEAD_LETTERS.name);
            if replaceable {
                refused = Some((at, e));
            } else if failure
                .as_ref()
                .is_none_or(|f| f.is_purged() && !e.is_purged())
            {
                failure = Some(e);
            }
        }
        if let Some((at, e)) = refused
            && let Some((output, partition)) = stages.iter_mut().flatten().nth(at)
        {
            tracing::warn!(processor = self.name, topic = output.topic, error = %e, "the broker refused an output for what it is; sending the batch again with its dead letter in its place");
            *output = output.refused(&e);
            *partition = None;
            self.abort().await?;
            return Ok(None);
        }
        if let Some(e) = failure {
            return self.failed(e, "acknowledge").await.map(Some);
        }
        let offsets: Vec<(String, i32, i64)> = last
            .iter()
            .map(|((topic, partition), offset)| (topic.clone(), *partition, offset + 1))
            .collect();
        if !offsets.is_empty() {
            let (producer, consumer) = (self.producer.clone(), Arc::clone(consumer));
            let sent = self
                .blocking(move || {
                    producer.send_offsets(&consumer, &offsets, TRANSACTION_CALL_TIMEOUT)
                })
                .await?;
            if let Err(e) = sent {
                return self.failed(e, "send offsets").await.map(Some);
            }
        }
        let producer = self.producer.clone();
        let committed = self
            .blocking(move || producer.commit_transaction(TRANSACTION_CALL_TIMEOUT))
            .await?;
        if let Err(e) = committed {
            return self.failed(e, "commit").await.map(Some);
        }
        metrics::counter!("processor_transactions_total", "processor" => self.name, "outcome" => "committed")
            .increment(1);
        metrics::histogram!("processor_transaction_seconds", "processor" => self.name)
            .record(started.elapsed().as_secs_f64());
        tracing::trace!(processor = self.name, records, "transaction committed");
        Ok(Some(Committed::Done))
    }

    /// Runs a blocking transactional call on a blocking thread, the same call again
    /// while it fails with a retriable error (librdkafka's rule: a retriable commit is
    /// retried, not aborted). Stopping does not end the retries: the caller's
    /// [`STOP_GRACE`] bounds them.
    async fn blocking<F>(&self, call: F) -> Result<bus::Result<()>>
    where
        F: Fn() -> bus::Result<()> + Send + Sync + 'static,
    {
        let call = Arc::new(call);
        let name = self.name;
        let broken = &self.broken;
        retry_retriable(
            (Duration::from_millis(100), MAX_RETRY_BACKOFF),
            || {
                let once = Arc::clone(&call);
                async move {
                    let limit = TRANSACTION_CALL_TIMEOUT + CALL_OVERRUN;
                    match within(limit, name, move || once()).await? {
                        Some(outcome) => Ok(outcome),
                        None => {
                            tracing::warn!(processor = name, ?limit, "a transactional call is still blocked past its time limit; giving up its producer, registering a new one and restoring from the changelog");
                            metrics::counter!("processor_transaction_calls_overrun_total", "processor" => name)
                                .increment(1);
                            broken.store(true, Ordering::SeqCst);
                            Ok(Err(BusError::Timeout {
                                action: "a transactional call past its time limit",
                            }))
                        }
                    }
                }
            },
            |e: &BusError| {
                matches!(
                    e,
                    BusError::Transaction {
                        failure: TransactionFailure::Retriable,
                        ..
                    }
                )
            },
            |e| tracing::warn!(processor = name, error = %e, "transactional call failed; retrying it"),
        )
        .await
    }

    /// A failed transaction: fenced is an error; a producer failed for good otherwise
    /// is replaced (the batch counts as aborted); anything else aborts.
    async fn failed(&self, error: BusError, step: &'static str) -> Result<Committed> {
        if self.broken.load(Ordering::SeqCst) {
            // Given up (a call blocked past its limit): its replacement aborts what it
            // left open.
            tracing::warn!(processor = self.name, step, error = %error, "transaction failed on a producer given up; restoring from the changelog");
            metrics::counter!("processor_transactions_total", "processor" => self.name, "outcome" => "aborted")
                .increment(1);
            return Ok(Committed::Aborted);
        }
        if error.is_fatal() {
            if self.producer.fenced() {
                metrics::counter!("processor_transactions_total", "processor" => self.name, "outcome" => "fenced")
                    .increment(1);
                return Err(self.fenced(error));
            }
            self.broke(&error, step);
            metrics::counter!("processor_transactions_total", "processor" => self.name, "outcome" => "aborted")
                .increment(1);
            return Ok(Committed::Aborted);
        }
        tracing::warn!(processor = self.name, step, error = %error, "transaction failed; aborting it and restoring from the changelog");
        self.abort().await?;
        metrics::counter!("processor_transactions_total", "processor" => self.name, "outcome" => "aborted")
            .increment(1);
        Ok(Committed::Aborted)
    }

    /// Aborts the open transaction (stopping, or after a failure).
    pub(crate) async fn abort(&self) -> Result<()> {
        if self.guarantee == Guarantee::AtLeastOnce || self.broken.load(Ordering::SeqCst) {
            // A producer given up is not called again: registering its replacement
            // aborts what it left open.
            return Ok(());
        }
        let producer = self.producer.clone();
        match self
            .blocking(move || producer.abort_transaction(TRANSACTION_CALL_TIMEOUT))
            .await?
        {
            Ok(()) => Ok(()),
            // The abort itself blocked past its limit: its producer is given up too.
            Err(_) if self.broken.load(Ordering::SeqCst) => Ok(()),
            Err(e) if e.is_fatal() && self.producer.fenced() => Err(self.fenced(e)),
            Err(e) if e.is_fatal() => {
                self.broke(&e, "abort");
                Ok(())
            }
            // Nothing open (or the broker is gone): the transaction times out on its own,
            // and a new one starts from a fresh registration only if this one is fenced.
            Err(e) => {
                tracing::warn!(processor = self.name, error = %e, "aborting the transaction failed");
                Err(ProcessorError::Bus {
                    processor: self.name,
                    source: Box::new(e),
                })
            }
        }
    }

    /// The producer failed for good, not fenced (e.g. the broker refused an operation in
    /// a state it did not expect after an outage): a new one is registered before the
    /// next transaction.
    fn broke(&self, error: &BusError, step: &'static str) {
        tracing::warn!(processor = self.name, step, error = %error, "the transactional producer failed for good (not fenced); registering a new one and restoring from the changelog");
        self.broken.store(true, Ordering::SeqCst);
    }

    fn fenced(&self, source: BusError) -> ProcessorError {
        ProcessorError::Fenced {
            processor: self.name,
            transactional_id: self.transactional_id.clone(),
            source: Box::new(source),
        }
    }
}

/// Registers the transactional producer `id` (fencing a predecessor with the same id),
/// retrying with backoff while the cluster is unreachable; `None` when `shutdown` came
/// first.
async fn register(
    name: &'static str,
    durability: &Durability,
    id: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Producer>> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (settings, tuning, tid): (ClientSettings, _, String) = (
            durability.settings.clone(),
            durability.tuning.clone(),
            id.to_owned(),
        );
        let limit = TRANSACTION_CALL_TIMEOUT + CALL_OVERRUN;
        let registration = within(limit, name, move || {
            Producer::transactional(&settings, &tuning, &tid, TRANSACTION_CALL_TIMEOUT)
        });
        let created = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            created = registration => created?,
        };
        let Some(created) = created else {
            // A registration still blocked could complete later and fence the next one:
            // this member stops rather than run with a producer that may be fenced.
            return Err(ProcessorError::Bus {
                processor: name,
                source: Box::new(BusError::Timeout {
                    action: "registering a transactional producer (blocked past its time limit)",
                }),
            });
        };
        match created {
            Ok(producer) => {
                tracing::info!(processor = name, transactional_id = %id, "transactional producer registered");
                return Ok(Some(producer));
            }
            Err(e) if e.is_fatal() || matches!(e, BusError::Config { .. }) => {
                return Err(ProcessorError::Bus {
                    processor: name,
                    source: Box::new(e),
                });
            }
            Err(e) => {
                tracing::warn!(processor = name, error = %e, ?backoff, "registering the transactional producer failed; retrying");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Runs `call` on a blocking thread and waits for it up to `limit`: its outcome, or `None`
/// when it is still running then (the thread is left to finish on its own, and whatever
/// `call` holds stays alive until it does).
async fn within<T, F>(limit: Duration, processor: &'static str, call: F) -> Result<Option<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(call)).await {
        Ok(joined) => joined.map(Some).map_err(|e| task_failed(processor, &e)),
        Err(_) => Ok(None),
    }
}

fn task_failed(processor: &'static str, e: &tokio::task::JoinError) -> ProcessorError {
    ProcessorError::Task {
        processor,
        reason: e.to_string(),
    }
}

/// Runs `call` until its outcome is not a `retriable` error, with a backoff between
/// attempts (from `backoff`, doubling up to `max_backoff`). Each retriable failure is
/// passed to `report`. It never gives up by itself: a stopping caller bounds it.
async fn retry_retriable<T, E, C, F>(
    (mut backoff, max_backoff): (Duration, Duration),
    mut call: C,
    retriable: impl Fn(&E) -> bool,
    report: impl Fn(&E),
) -> Result<std::result::Result<T, E>>
where
    C: FnMut() -> F,
    F: std::future::Future<Output = Result<std::result::Result<T, E>>>,
{
    loop {
        match call().await? {
            Err(e) if retriable(&e) => report(&e),
            outcome => return Ok(outcome),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const QUICK: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(2));

    #[tokio::test]
    async fn a_blocking_call_past_its_limit_is_given_up_and_one_within_it_answers() {
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let stuck = within(Duration::from_millis(50), "test", move || {
            // Blocks until the test ends (the sender is dropped then).
            let _ = blocked.recv_timeout(Duration::from_secs(5));
            1
        })
        .await
        .unwrap();
        assert_eq!(stuck, None);
        let answered = within(Duration::from_secs(5), "test", || 2).await.unwrap();
        assert_eq!(answered, Some(2));
        drop(release);
    }

    #[tokio::test]
    async fn a_retriable_failure_is_retried_until_the_call_succeeds_however_long() {
        let attempts = AtomicU32::new(0);
        let outcome = retry_retriable(
            QUICK,
            || {
                let n = attempts.fetch_add(1, Ordering::SeqCst);
                async move { Ok(if n < 20 { Err("retriable") } else { Ok(n) }) }
            },
            |e: &&str| *e == "retriable",
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(outcome, Ok(20));
    }

    #[tokio::test]
    async fn another_failure_is_returned_at_once() {
        let attempts = AtomicU32::new(0);
        let outcome = retry_retriable(
            QUICK,
            || {
                let n = attempts.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok::<std::result::Result<(), _>, _>(Err(if n == 0 {
                        "retriable"
                    } else {
                        "abortable"
                    }))
                }
            },
            |e: &&str| *e == "retriable",
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(outcome, Err("abortable"));
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
    }
}
