//! Acknowledgements of records sent together, settled by librdkafka's delivery callback.
//!
//! A group of records shares one waiter: each record carries a ticket (its group and its
//! place in it) as librdkafka's per-message opaque, the delivery callback settles the
//! ticket, and the group's future is ready once every ticket is settled. Sending a batch
//! thus costs one ticket per record and one group, where a future per record cost a
//! channel, its sender and a task of a join set each.
//!
//! It owns [`AckContext`] (the producer's callback), [`Acks`], [`Settled`] and
//! [`Delivered`]. It must not send records (the producer does) nor decide what a failed
//! record means: callers read each record's result.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use rdkafka::ClientContext;
use rdkafka::message::Message as _;
use rdkafka::producer::{DeliveryResult, ProducerContext};

use crate::error::{BusError, Result};

/// Where an acknowledged record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

/// librdkafka's context for the pipeline's producers: every delivery report settles its
/// record's ticket.
#[derive(Debug, Default)]
pub(crate) struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<Ticket>;

    fn delivery(&self, report: &DeliveryResult<'_>, mut ticket: Box<Ticket>) {
        let result = match report {
            Ok(message) => Ok(Delivered {
                partition: message.partition(),
                offset: message.offset(),
            }),
            Err((source, message)) => Err(BusError::NotAcknowledged {
                topic: message.topic().to_owned(),
                source: source.clone(),
            }),
        };
        ticket.settle(result);
    }
}

/// One record's place in its group, handed to librdkafka with the record. Dropped
/// without a report (the producer went away first), it settles as cancelled.
#[derive(Debug)]
pub(crate) struct Ticket {
    group: Option<Arc<Group>>,
    index: usize,
}

impl Ticket {
    /// Records `result` as the record's fate.
    pub(crate) fn settle(&mut self, result: Result<Delivered>) {
        if let Some(group) = self.group.take() {
            if let Some(slot) = group.results.get(self.index) {
                let _ = slot.set(result);
            }
            group.release();
        }
    }

    /// Gives the ticket back without a fate: its record was never enqueued.
    pub(crate) fn withdraw(&mut self) {
        if let Some(group) = self.group.take() {
            group.release();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.settle(Err(BusError::Cancelled));
    }
}

#[derive(Debug)]
struct Group {
    /// Tickets not yet settled, plus one while the sender may still add records.
    pending: AtomicUsize,
    waker: AtomicWaker,
    results: Box<[OnceLock<Result<Delivered>>]>,
}

impl Group {
    fn release(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waker.wake();
        }
    }
}

/// The acknowledgements of up to a fixed number of records, waited for together.
#[derive(Debug)]
pub struct Acks {
    group: Arc<Group>,
    sent: usize,
    /// Whether the sender's own hold on `pending` is still taken.
    holding: bool,
}

impl Acks {
    /// A group for at most `capacity` records.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            group: Arc::new(Group {
                pending: AtomicUsize::new(1),
                waker: AtomicWaker::new(),
                results: (0..capacity).map(|_| OnceLock::new()).collect(),
            }),
            sent: 0,
            holding: true,
        }
    }

    /// Records enqueued in this group so far.
    pub fn len(&self) -> usize {
        self.sent
    }

    /// Whether no record was enqueued in this group.
    pub fn is_empty(&self) -> bool {
        self.sent == 0
    }

    /// A ticket for the next record, or `None` when the group is full.
    pub(crate) fn ticket(&mut self) -> Option<Box<Ticket>> {
        if self.sent >= self.group.results.len() {
            return None;
        }
        self.group.pending.fetch_add(1, Ordering::AcqRel);
        Some(Box::new(Ticket {
            group: Some(Arc::clone(&self.group)),
            index: self.sent,
        }))
    }

    /// Counts the record of the ticket just handed out as enqueued; returns its index.
    pub(crate) fn enqueued(&mut self) -> usize {
        self.sent += 1;
        self.sent - 1
    }

    /// Waits until every enqueued record was acknowledged or failed.
    pub fn settled(mut self) -> Settled {
        self.release_hold();
        Settled {
            group: Arc::clone(&self.group),
            sent: self.sent,
        }
    }

    fn release_hold(&mut self) {
        if std::mem::take(&mut self.holding) {
            self.group.release();
        }
    }
}

impl Drop for Acks {
    fn drop(&mut self) {
        self.release_hold();
    }
}

/// The future of a group's acknowledgements; its output gives each record's fate, in the
/// order they were enqueued.
#[derive(Debug)]
#[must_use = "a future does nothing unless awaited"]
pub struct Settled {
    group: Arc<Group>,
    sent: usize,
}

impl Future for Settled {
    type Output = Results;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Results> {
        if self.group.pending.load(Ordering::Acquire) != 0 {
            self.group.waker.register(cx.waker());
            if self.group.pending.load(Ordering::Acquire) != 0 {
                return Poll::Pending;
            }
        }
        Poll::Ready(Results {
            group: Arc::clone(&self.group),
            sent: self.sent,
        })
    }
}

/// Each enqueued record's fate, by its index in the group.
#[derive(Debug)]
pub struct Results {
    group: Arc<Group>,
    sent: usize,
}

impl Results {
    /// The fate of record `index` (in the order they were enqueued).
    pub fn get(&self, index: usize) -> Result<Delivered> {
        match self.group.results.get(index).and_then(OnceLock::get) {
            Some(Ok(delivered)) => Ok(*delivered),
            Some(Err(e)) => Err(e.clone()),
            None => Err(BusError::Cancelled),
        }
    }

    /// The records that failed, with their index, in order.
    pub fn failures(&self) -> impl Iterator<Item = (usize, &BusError)> + '_ {
        self.group.results[..self.sent]
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| match slot.get() {
                Some(Ok(_)) => None,
                Some(Err(e)) => Some((i, e)),
                None => Some((i, &CANCELLED)),
            })
    }
}

static CANCELLED: BusError = BusError::Cancelled;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;
    use crate::{ClientSettings, EmbeddedBroker, OutRecord, Producer, ProducerArgs};
    use schemas::topics;

    fn record<'a>(key: &'a str, payload: &'a [u8]) -> OutRecord<'a> {
        OutRecord {
            topic: topics::DELIVERIES.name,
            key: key.as_bytes(),
            payload,
            headers: &[("h", b"v")],
        }
    }

    /// Each record of a group is settled by its own report, in the order enqueued; a
    /// record refused at once leaves the group as it was, and the others still settle.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_settles_each_record_it_enqueued() {
        let broker = EmbeddedBroker::start(1, &topics::ALL).unwrap();
        let settings = ClientSettings::plain(broker.bootstrap_servers());
        let producer = Producer::new(&settings, &ProducerArgs::default()).unwrap();
        let mut acks = Acks::with_capacity(3);
        assert_eq!(
            producer
                .enqueue(&mut acks, record("a", b"1"), Some(0), false)
                .unwrap(),
            0
        );
        let huge = vec![b'x'; 2_000_000];
        let refused = producer.enqueue(&mut acks, record("b", &huge), Some(0), false);
        assert!(refused.unwrap_err().is_permanent_for_record());
        assert_eq!(
            producer
                .enqueue(&mut acks, record("c", b"3"), Some(0), false)
                .unwrap(),
            1
        );
        assert_eq!(acks.len(), 2);
        let results = tokio::time::timeout(Duration::from_secs(30), acks.settled())
            .await
            .unwrap();
        let (first, second) = (results.get(0).unwrap(), results.get(1).unwrap());
        assert_eq!((first.partition, second.partition), (0, 0));
        assert_eq!(second.offset, first.offset + 1);
        assert_eq!(results.failures().count(), 0);
        // Past its capacity a group refuses more records rather than growing.
        let mut full = Acks::with_capacity(1);
        producer
            .enqueue(&mut full, record("d", b"4"), None, false)
            .unwrap();
        assert!(
            producer
                .enqueue(&mut full, record("e", b"5"), None, false)
                .is_err()
        );
        assert!(full.settled().await.get(0).is_ok());
        // A single record's future is a group of one.
        let single = producer.send(record("f", b"6")).unwrap().await.unwrap();
        assert!(single.partition >= 0 && single.offset >= 0);
    }

    /// A group with nothing enqueued is settled at once; a ticket dropped without a
    /// report (its producer went away) settles its record as cancelled.
    #[tokio::test]
    async fn an_empty_group_is_settled_and_a_lost_ticket_is_cancelled() {
        let empty = Acks::with_capacity(4);
        let results = empty.settled().await;
        assert_eq!(results.failures().count(), 0);

        let mut acks = Acks::with_capacity(2);
        let ticket = acks.ticket().unwrap();
        assert_eq!(acks.enqueued(), 0);
        let settled = acks.settled();
        drop(ticket);
        let results = tokio::time::timeout(Duration::from_secs(5), settled)
            .await
            .unwrap();
        assert!(matches!(results.get(0), Err(BusError::Cancelled)));
        let failures: Vec<usize> = results.failures().map(|(i, _)| i).collect();
        assert_eq!(failures, vec![0]);
    }
}
