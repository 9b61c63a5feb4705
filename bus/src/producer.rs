//! The durable producer: a record counts as sent only once the broker acknowledged it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _, ThreadedProducer};

use crate::acks::{AckContext, Acks, Delivered};
use crate::consumer::Consumer;
use crate::error::{BusError, Result};
use crate::settings::{ClientSettings, ProducerArgs};

/// A record to produce. Key and payload are borrowed: the caller's bytes are handed to
/// librdkafka as they are, never re-serialized.
#[derive(Debug, Clone, Copy)]
pub struct OutRecord<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The key, which decides the partition.
    pub key: &'a [u8],
    /// The payload.
    pub payload: &'a [u8],
    /// Headers, in order.
    pub headers: &'a [(&'a str, &'a [u8])],
}

type Inner = Arc<ThreadedProducer<AckContext>>;

/// A cheap-to-clone handle on one librdkafka producer (`acks=all`, idempotent). Its
/// delivery reports are served by a thread of its own and settle [`Acks`].
#[derive(Clone)]
pub struct Producer {
    inner: Inner,
    ack_timeout: Duration,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("in_flight", &self.inner.in_flight_count())
            .finish()
    }
}

impl Producer {
    /// Creates a producer. librdkafka connects lazily, so this succeeds without a broker.
    pub fn new(settings: &ClientSettings, tuning: &ProducerArgs) -> Result<Self> {
        let inner = settings
            .producer_config(tuning)
            .create_with_context(AckContext)
            .map_err(BusError::client("creating the producer"))?;
        Ok(Self {
            inner: Arc::new(inner),
            ack_timeout: tuning.ack_timeout(),
        })
    }

    /// Creates a transactional producer with the given stable `transactional_id`, and
    /// registers it with the cluster (`init_transactions`): an open transaction of an
    /// earlier producer with the same id is aborted, and that producer is fenced (its
    /// later writes are refused). Blocks the calling thread for up to `timeout`.
    pub fn transactional(
        settings: &ClientSettings,
        tuning: &ProducerArgs,
        transactional_id: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let inner: ThreadedProducer<AckContext> = settings
            .transactional_producer_config(tuning, transactional_id)
            .create_with_context(AckContext)
            .map_err(BusError::client("creating a transactional producer"))?;
        inner
            .init_transactions(timeout)
            .map_err(BusError::transaction("registering the transactional id"))?;
        Ok(Self {
            inner: Arc::new(inner),
            ack_timeout: tuning.ack_timeout(),
        })
    }

    /// Opens a transaction: every record sent until it is committed or aborted belongs
    /// to it. Does not block.
    pub fn begin_transaction(&self) -> Result<()> {
        self.inner
            .begin_transaction()
            .map_err(BusError::transaction("beginning a transaction"))
    }

    /// Adds `consumer`'s input offsets to the open transaction: per (topic, partition),
    /// the offset of the next record to read. They count as committed for the group
    /// only if the transaction commits, and the group coordinator refuses them (the
    /// transaction must then be aborted) when `consumer` is no longer the member that
    /// owns those partitions. Blocks the calling thread for up to `timeout`.
    pub fn send_offsets(
        &self,
        consumer: &Consumer,
        offsets: &[(String, i32, i64)],
        timeout: Duration,
    ) -> Result<()> {
        use rdkafka::{Offset, TopicPartitionList};
        if offsets.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for (topic, partition, next) in offsets {
            list.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(BusError::client("listing offsets"))?;
        }
        let metadata = consumer.group_metadata().ok_or(BusError::Config {
            key: "group.id".into(),
            reason: "the consumer has no group metadata".into(),
        })?;
        self.inner
            .send_offsets_to_transaction(&list, &metadata, timeout)
            .map_err(BusError::transaction(
                "adding input offsets to a transaction",
            ))
    }

    /// Commits the open transaction, after every record of it was acknowledged. Blocks
    /// the calling thread for up to `timeout`.
    pub fn commit_transaction(&self, timeout: Duration) -> Result<()> {
        self.inner
            .commit_transaction(timeout)
            .map_err(BusError::transaction("committing a transaction"))
    }

    /// Whether this producer failed for good because a newer producer with its
    /// transactional id (or a newer epoch of it) took over: fenced, as opposed to
    /// another fatal error, after which a new producer registered with the same id may
    /// go on.
    pub fn fenced(&self) -> bool {
        self.inner.client().fatal_error().is_some_and(|(code, _)| {
            matches!(
                code,
                RDKafkaErrorCode::Fenced
                    | RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
            )
        })
    }

    /// Aborts the open transaction: its records are purged or marked aborted, and its
    /// offsets are dropped. Blocks the calling thread for up to `timeout`.
    pub fn abort_transaction(&self, timeout: Duration) -> Result<()> {
        self.inner
            .abort_transaction(timeout)
            .map_err(BusError::transaction("aborting a transaction"))
    }

    /// Enqueues a record and returns a future that resolves when the broker acknowledged
    /// it (or refused it, or the acknowledgement timeout passed).
    ///
    /// Enqueuing never waits: when the local queue is full the call fails at once with
    /// [`BusError::QueueFull`], so the caller can push back on its own client.
    pub fn send(
        &self,
        record: OutRecord<'_>,
    ) -> Result<impl Future<Output = Result<Delivered>> + Send + use<>> {
        self.send_to(record, None)
    }

    /// [`send`](Self::send) to a given partition (for a state changelog that must share
    /// partition numbers with its input), or to the key's partition when `None`.
    pub fn send_to(
        &self,
        record: OutRecord<'_>,
        partition: Option<i32>,
    ) -> Result<impl Future<Output = Result<Delivered>> + Send + use<>> {
        self.send_record(record, partition, false)
    }

    /// [`send_to`](Self::send_to), or, when `tombstone`, a record with the key and a
    /// null payload (`record.payload` is ignored): on a compacted topic it deletes the key.
    pub fn send_record(
        &self,
        record: OutRecord<'_>,
        partition: Option<i32>,
        tombstone: bool,
    ) -> Result<impl Future<Output = Result<Delivered>> + Send + use<>> {
        let mut acks = Acks::with_capacity(1);
        self.enqueue(&mut acks, record, partition, tombstone)?;
        let settled = acks.settled();
        Ok(async move { settled.await.get(0) })
    }

    /// Enqueues a record as the next of `acks`, whose [`settled`](Acks::settled) future
    /// then waits for it with the others; returns its index in the group. Fails at once,
    /// leaving the group as it was, when the local queue is full ([`BusError::QueueFull`]),
    /// the group is full, or librdkafka refuses the record.
    pub fn enqueue(
        &self,
        acks: &mut Acks,
        record: OutRecord<'_>,
        partition: Option<i32>,
        tombstone: bool,
    ) -> Result<usize> {
        let ticket = acks.ticket().ok_or(BusError::Config {
            key: "acks".into(),
            reason: "more records than their group was made for".into(),
        })?;
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(*value),
            });
        }
        let mut base = BaseRecord::<[u8], [u8], Box<crate::acks::Ticket>>::with_opaque_to(
            record.topic,
            ticket,
        )
        .key(record.key)
        .headers(headers);
        if !tombstone {
            base = base.payload(record.payload);
        }
        if let Some(partition) = partition {
            base = base.partition(partition);
        }
        match self.inner.send(base) {
            Ok(()) => Ok(acks.enqueued()),
            Err((e, mut refused)) => {
                refused.delivery_opaque.withdraw();
                Err(match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        BusError::QueueFull
                    }
                    e => BusError::Client {
                        action: "enqueuing a record",
                        source: e,
                    },
                })
            }
        }
    }

    /// Sends a record and waits for its acknowledgement.
    pub async fn send_and_wait(&self, record: OutRecord<'_>) -> Result<Delivered> {
        self.send(record)?.await
    }

    /// How long a record may wait for its acknowledgement before it fails.
    pub fn ack_timeout(&self) -> Duration {
        self.ack_timeout
    }

    /// Records enqueued and not yet acknowledged or failed.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// Waits up to `timeout` for every enqueued record to be acknowledged or failed.
    /// Blocks the calling thread: call it from `spawn_blocking` in async code.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.inner
            .flush(timeout)
            .map_err(BusError::client("flushing the producer"))
    }

    /// Asks the cluster for metadata of `topic`: a cheap check that a broker answers.
    /// Blocks the calling thread.
    pub fn check_reachable(&self, topic: &str, timeout: Duration) -> Result<()> {
        self.inner
            .client()
            .fetch_metadata(Some(topic), timeout)
            .map(|_| ())
            .map_err(BusError::client("fetching metadata"))
    }
}
