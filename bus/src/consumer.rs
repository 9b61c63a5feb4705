//! A group consumer whose offsets move only when the application says a record is done.
//!
//! `enable.auto.offset.store` is off: the application calls [`Consumer::store`] once
//! everything a record produced was acknowledged (or, for the history sink, once the file
//! holding it is durable); librdkafka commits stored offsets in the background, and
//! [`Consumer::commit`] commits them at once (on shutdown, before leaving the group).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::Message as _;
use rdkafka::Offset;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Headers as _};

use crate::error::{BusError, Result};
use crate::settings::ClientSettings;

/// Remembers the partitions taken away from this member in rebalances, so that the
/// application can drop records of them it received but has not handled yet, and
/// whether the group has given this member its assignment (for [`Consumer::caught_up`]).
#[derive(Default)]
pub(crate) struct BusContext {
    revoked: std::sync::Mutex<Vec<(String, i32)>>,
    membership: crate::progress::Membership,
}

impl ClientContext for BusContext {}

impl ConsumerContext for BusContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            self.membership.revoking();
        }
        if let Rebalance::Revoke(list) = rebalance
            && let Ok(mut revoked) = self.revoked.lock()
        {
            // Bounded for members that never ask (they need not know).
            if revoked.len() > 10_000 {
                revoked.clear();
            }
            for elem in list.elements() {
                revoked.push((elem.topic().to_owned(), elem.partition()));
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.membership.assigned();
        }
    }
}

type Inner = StreamConsumer<BusContext>;

/// How long dropping a consumer waits for librdkafka to close it (hand back its
/// partitions, leave the group). librdkafka 2.12 can wait for ever closing a consumer in
/// the middle of a cooperative rebalance (confluentinc/librdkafka#4884, #4527): past this
/// wait, the close goes on in a thread of its own and the caller goes on without it.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// A consumer that is closed, when the last handle goes, on a thread of its own, waited
/// for up to [`CLOSE_WAIT`].
struct Closing(Option<Inner>);

impl std::ops::Deref for Closing {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        self.0
            .as_ref()
            .expect("the consumer is taken only when dropped")
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else {
            return;
        };
        let (done, closed) = std::sync::mpsc::sync_channel::<()>(1);
        // Should no thread be had, the closure is dropped here, and the consumer with it.
        let spawned = std::thread::Builder::new()
            .name("consumer-close".into())
            .spawn(move || {
                drop(consumer);
                let _ = done.send(());
            });
        if spawned.is_ok() && closed.recv_timeout(CLOSE_WAIT).is_err() {
            tracing::warn!(wait = ?CLOSE_WAIT, "closing a Kafka consumer takes longer than it should (librdkafka stuck in a rebalance); going on without it");
        }
    }
}

/// A consumer subscribed to some topics as a member of one group.
pub struct Consumer {
    inner: Arc<Closing>,
    group: String,
}

/// A handle that measures a consumer's lag from another thread.
#[derive(Clone)]
pub struct LagProbe {
    inner: Arc<Closing>,
}

impl std::fmt::Debug for LagProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagProbe").finish()
    }
}

impl LagProbe {
    /// Per assigned partition: records between the consumer's position (or the group's
    /// committed offset before it read anything) and the readable end (the last stable
    /// offset under `read_committed`). Blocks the calling thread for up to `timeout` per
    /// request (each asks for every partition at once).
    pub fn lag(&self, timeout: Duration) -> Result<Vec<(String, i32, i64)>> {
        crate::progress::lags(&**self.inner, timeout)
    }

    /// Reports the lag of each partition assigned to this member as the gauge
    /// `kafka_consumer_lag{group, topic, partition}` every `every`, until `shutdown` is
    /// cancelled. A partition no longer assigned here is reported as 0 (its new owner
    /// reports it), so summing over members counts each partition once; during a
    /// rebalance two members may both report one, hence `max by (group, topic,
    /// partition)` before summing.
    pub fn report(
        self,
        group: &'static str,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            let mut reported: std::collections::HashSet<(String, i32)> =
                std::collections::HashSet::new();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let probe = self.clone();
                let measured =
                    tokio::task::spawn_blocking(move || probe.lag(Duration::from_secs(2))).await;
                match measured {
                    Ok(Ok(lags)) => {
                        let gauge = |topic: &str, partition: i32| {
                            metrics::gauge!(
                                "kafka_consumer_lag",
                                "group" => group,
                                "topic" => topic.to_owned(),
                                "partition" => partition.to_string()
                            )
                        };
                        let now: std::collections::HashSet<(String, i32)> =
                            lags.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
                        for (topic, partition) in reported.difference(&now) {
                            gauge(topic, *partition).set(0.0);
                        }
                        for (topic, partition, lag) in &lags {
                            gauge(topic, *partition).set(*lag as f64);
                        }
                        reported = now;
                    }
                    Ok(Err(e)) => tracing::debug!(group, error = %e, "lag not measured"),
                    Err(e) => tracing::debug!(group, error = %e, "lag task failed"),
                }
            }
        })
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("group", &self.group)
            .finish()
    }
}

/// A record as received, borrowed from the consumer's buffer.
pub struct Received<'a> {
    message: BorrowedMessage<'a>,
}

impl std::fmt::Debug for Received<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("topic", &self.topic())
            .field("partition", &self.partition())
            .field("offset", &self.offset())
            .finish()
    }
}

impl Received<'_> {
    /// The topic.
    pub fn topic(&self) -> &str {
        self.message.topic()
    }

    /// The partition.
    pub fn partition(&self) -> i32 {
        self.message.partition()
    }

    /// The offset within the partition.
    pub fn offset(&self) -> i64 {
        self.message.offset()
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&[u8]> {
        self.message.key()
    }

    /// The payload, if any.
    pub fn payload(&self) -> Option<&[u8]> {
        self.message.payload()
    }

    /// The record's timestamp in milliseconds since the Unix epoch, if it has one.
    pub fn timestamp_millis(&self) -> Option<i64> {
        self.message.timestamp().to_millis()
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.message
            .headers()?
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
    }

    /// Every header, in order.
    pub fn headers(&self) -> Vec<(&str, &[u8])> {
        self.message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key, h.value.unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Consumer {
    /// Joins `group` and subscribes to `topics`. Partitions are assigned asynchronously
    /// once the group is formed.
    pub fn subscribe(settings: &ClientSettings, group: &str, topics: &[&str]) -> Result<Self> {
        let inner: Inner = settings
            .consumer_config(group)
            .create_with_context(BusContext::default())
            .map_err(BusError::client("creating a consumer"))?;
        inner
            .subscribe(topics)
            .map_err(BusError::client("subscribing"))?;
        Ok(Self {
            inner: Arc::new(Closing(Some(inner))),
            group: group.to_owned(),
        })
    }

    /// Joins `group` and subscribes to `topics` so that each member gets the same
    /// partition numbers of every topic (for topics keyed alike, with equal partition
    /// counts: a key's records of all of them meet in one member).
    pub fn subscribe_copartitioned(
        settings: &ClientSettings,
        group: &str,
        topics: &[&str],
    ) -> Result<Self> {
        let inner: Inner = settings
            .copartitioned_config(group)
            .create_with_context(BusContext::default())
            .map_err(BusError::client("creating a consumer"))?;
        inner
            .subscribe(topics)
            .map_err(BusError::client("subscribing"))?;
        Ok(Self {
            inner: Arc::new(Closing(Some(inner))),
            group: group.to_owned(),
        })
    }

    /// Joins `group` and subscribes to `topics` for exactly-once processing: the
    /// consumer never commits by itself; a transactional producer commits its offsets
    /// with the group's metadata ([`Producer::send_offsets`](crate::Producer::send_offsets)),
    /// so a member that lost its partitions in a rebalance cannot commit them. With
    /// `copartitioned`, members get the same partition numbers of every topic (see
    /// [`subscribe_copartitioned`](Self::subscribe_copartitioned)).
    pub fn subscribe_transactional(
        settings: &ClientSettings,
        group: &str,
        topics: &[&str],
        copartitioned: bool,
    ) -> Result<Self> {
        let inner: Inner = settings
            .transactional_consumer_config(group, copartitioned)
            .create_with_context(BusContext::default())
            .map_err(BusError::client("creating a consumer"))?;
        inner
            .subscribe(topics)
            .map_err(BusError::client("subscribing"))?;
        Ok(Self {
            inner: Arc::new(Closing(Some(inner))),
            group: group.to_owned(),
        })
    }

    /// The group's metadata as this member knows it (generation, member id), for a
    /// transactional offset commit.
    pub(crate) fn group_metadata(&self) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
        self.inner.group_metadata()
    }

    /// Moves this member's position in each of `partitions` back to the group's
    /// committed offset (after an aborted transaction: its records are read again).
    /// Partitions this member no longer owns are left alone (their new owner starts
    /// from the committed offsets anyway). Blocks the calling thread for up to
    /// `timeout` per request.
    pub fn rewind(&self, partitions: &[(String, i32)], timeout: Duration) -> Result<()> {
        use rdkafka::TopicPartitionList;
        if partitions.is_empty() {
            return Ok(());
        }
        let assigned = self
            .inner
            .assignment()
            .map_err(BusError::client("reading the assignment"))?;
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            if assigned.find_partition(topic, *partition).is_some() {
                list.add_partition(topic, *partition);
            }
        }
        if list.count() == 0 {
            return Ok(());
        }
        let committed = self
            .inner
            .committed_offsets(list, timeout)
            .map_err(BusError::client("reading committed offsets"))?;
        for elem in committed.elements() {
            // Nothing committed yet: where a new member starts (`auto.offset.reset`).
            let to = match elem.offset() {
                Offset::Offset(at) => Offset::Offset(at),
                _ => Offset::Beginning,
            };
            self.inner
                .seek(elem.topic(), elem.partition(), to, timeout)
                .map_err(BusError::client("seeking back to the committed offset"))?;
        }
        Ok(())
    }

    /// The partitions assigned to this member now (as of the last rebalance served by a
    /// receive).
    pub fn assigned(&self) -> Result<Vec<(String, i32)>> {
        let assigned = self
            .inner
            .assignment()
            .map_err(BusError::client("reading the assignment"))?;
        Ok(assigned
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect())
    }

    /// Where this member starts reading each of `partitions` that it owns: the group's
    /// committed offset, or where a new member starts (`auto.offset.reset` = earliest:
    /// the low watermark) when nothing is committed. Under `read_committed`, the broker
    /// answers only once no transaction that commits offsets of them is pending, so
    /// state read after this call includes every committed effect of those offsets.
    /// Blocks the calling thread for up to `timeout` per request.
    pub fn starting_offsets(
        &self,
        partitions: &[(String, i32)],
        timeout: Duration,
    ) -> Result<Vec<(String, i32, i64)>> {
        use rdkafka::TopicPartitionList;
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            list.add_partition(topic, *partition);
        }
        if list.count() == 0 {
            return Ok(Vec::new());
        }
        let committed = self
            .inner
            .committed_offsets(list, timeout)
            .map_err(BusError::client("reading committed offsets"))?;
        let mut offsets = Vec::with_capacity(committed.count());
        for elem in committed.elements() {
            let at = match elem.offset() {
                Offset::Offset(at) => at,
                _ => self.watermarks(elem.topic(), elem.partition(), timeout)?.0,
            };
            offsets.push((elem.topic().to_owned(), elem.partition(), at));
        }
        Ok(offsets)
    }

    /// The low and high watermarks of `topic`/`partition`: the first offset the broker
    /// still has, and the offset the next record gets. Blocks the calling thread for up
    /// to `timeout`.
    pub fn watermarks(&self, topic: &str, partition: i32, timeout: Duration) -> Result<(i64, i64)> {
        self.inner
            .fetch_watermarks(topic, partition, timeout)
            .map_err(BusError::client("fetching watermarks"))
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The partitions (topic, partition) revoked from this member since the last call:
    /// records of them received and not yet handled belong to their new owner now.
    pub fn take_revoked(&self) -> Vec<(String, i32)> {
        self.inner
            .context()
            .revoked
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// A handle for measuring this consumer's lag from another thread.
    pub fn lag_probe(&self) -> LagProbe {
        LagProbe {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Waits for the next record.
    pub async fn recv(&self) -> Result<Received<'_>> {
        let message = self
            .inner
            .recv()
            .await
            .map_err(BusError::client("receiving"))?;
        Ok(Received { message })
    }

    /// Marks the record at `offset` of `topic`/`partition` (and every record before it)
    /// as done: the next commit moves the group past it.
    ///
    /// Storing for a partition this member no longer owns (it was revoked in a
    /// rebalance) fails; the new owner re-reads the record, which is why handlers are
    /// idempotent.
    pub fn store(&self, topic: &str, partition: i32, offset: i64) -> Result<()> {
        self.inner
            .store_offset(topic, partition, offset)
            .map_err(BusError::client("storing an offset"))
    }

    /// Moves this member's position in `topic`/`partition` to `offset`: its next records
    /// start there. Fails for a partition this member does not own. Blocks the calling
    /// thread for up to `timeout`.
    pub fn seek(&self, topic: &str, partition: i32, offset: i64, timeout: Duration) -> Result<()> {
        self.inner
            .seek(topic, partition, rdkafka::Offset::Offset(offset), timeout)
            .map_err(BusError::client("seeking"))
    }

    /// Commits the stored offsets now and waits for the broker's answer. Blocks the
    /// calling thread.
    pub fn commit(&self) -> Result<()> {
        match self.inner.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => Ok(()),
            // Nothing stored since the last commit.
            Err(e)
                if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::NoOffset) =>
            {
                Ok(())
            }
            Err(e) => Err(BusError::Client {
                action: "committing offsets",
                source: e,
            }),
        }
    }

    /// Whether this member has read everything readable in its partitions: no assigned
    /// partition has records between its position and its readable end (the last stable
    /// offset under `read_committed`, so transaction markers and open transactions do not
    /// count). Empty partitions are caught up, and so is a member the group gave no
    /// partition. Before the group has given this member its assignment, every partition
    /// of its topics counts, from the group's committed offsets. Blocks the calling
    /// thread for up to `timeout` per request (a few, each for all partitions at once).
    pub fn caught_up(&self, timeout: Duration) -> Result<bool> {
        let lags = if self.inner.context().membership.is_settled() {
            crate::progress::lags(&**self.inner, timeout)?
        } else {
            crate::progress::subscription_lags(&**self.inner, timeout)?
        };
        Ok(crate::progress::caught_up(&lags))
    }
}

/// A record read back from a partition: key, payload and offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// The offset.
    pub offset: i64,
    /// The key (empty when none).
    pub key: Vec<u8>,
    /// The payload (empty when none).
    pub payload: Vec<u8>,
}

/// Reads every committed record of `topic`/`partition` from its start up to its end at
/// the time of the call (a state changelog being restored): the high watermark, or,
/// with transactions in the partition, the last stable offset (records of aborted or
/// still open transactions are never returned, and the transaction markers that often
/// end a partition are not records: the end is known from librdkafka's end-of-partition
/// event). Blocks the calling thread: call it from `spawn_blocking`. Fails when the
/// partition cannot be read to the end within `timeout`.
pub fn read_partition(
    settings: &ClientSettings,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<Vec<StoredRecord>> {
    use rdkafka::TopicPartitionList;
    let mut config = settings.reader_config();
    config.set("enable.partition.eof", "true");
    let consumer: BaseConsumer = config
        .create()
        .map_err(BusError::client("creating a reader"))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, timeout)
        .map_err(BusError::client("fetching watermarks"))?;
    let mut out = Vec::new();
    if high <= low {
        return Ok(out);
    }
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, Offset::Beginning)
        .map_err(BusError::client("assigning a partition"))?;
    consumer
        .assign(&list)
        .map_err(BusError::client("assigning a partition"))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut lost_connection = None;
    while std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match message {
            Ok(message) => message,
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => return Ok(out),
            // Connections lost and found again: librdkafka reconnects by itself, and the
            // deadline bounds the wait.
            Err(
                e @ rdkafka::error::KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure
                    | rdkafka::types::RDKafkaErrorCode::AllBrokersDown,
                ),
            ) => {
                lost_connection = Some(e);
                continue;
            }
            Err(e) => return Err(BusError::client("reading a partition")(e)),
        };
        out.push(StoredRecord {
            offset: message.offset(),
            key: message.key().unwrap_or_default().to_vec(),
            payload: message.payload().unwrap_or_default().to_vec(),
        });
        if message.offset() >= high - 1 {
            return Ok(out);
        }
    }
    // Out of time: the lost connection, when there was one, says why.
    Err(lost_connection.map_or(
        BusError::Timeout {
            action: "reading a partition to its end",
        },
        BusError::client("reading a partition"),
    ))
}

impl Consumer {
    /// A consumer outside any group that reads every partition of `topic` from its start
    /// and goes on with what arrives (a read-side view of a state changelog). Offsets
    /// are never committed. Blocks the calling thread for the metadata request.
    pub fn tail(settings: &ClientSettings, topic: &str, timeout: Duration) -> Result<Self> {
        use rdkafka::TopicPartitionList;
        let inner: Inner = settings
            .reader_config()
            .create_with_context(BusContext::default())
            .map_err(BusError::client("creating a reader"))?;
        let metadata = inner
            .fetch_metadata(Some(topic), timeout)
            .map_err(BusError::client("fetching metadata"))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(BusError::Timeout {
                action: "finding the partitions of a topic to tail",
            });
        }
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            list.add_partition_offset(topic, partition, Offset::Beginning)
                .map_err(BusError::client("assigning a partition"))?;
        }
        inner
            .assign(&list)
            .map_err(BusError::client("assigning partitions"))?;
        Ok(Self {
            inner: Arc::new(Closing(Some(inner))),
            group: String::new(),
        })
    }
}
