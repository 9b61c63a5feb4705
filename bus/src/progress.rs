//! How far a group member has read: per assigned partition, the records between its
//! position and the partition's readable end, and whether it has caught up.
//!
//! The readable end is what a `ListOffsets` for the latest offset answers with the
//! consumer's own isolation level: the last stable offset under `read_committed` (the
//! default), so records of open transactions are not counted and transaction markers,
//! which a consumer never returns, are not either. librdkafka moves a partition's
//! position past a marker once the application polls, so a member that has read and
//! polled everything readable is at the end. Ends, committed offsets and earliest offsets
//! are asked for every partition at once (one request per broker), never one partition
//! at a time.
//!
//! [`Membership`] remembers whether the member's last rebalance ended with an
//! assignment: a member the group gave no partition has nothing to read, while one that
//! has not joined yet (or is between a revocation and its next assignment) is judged
//! by every partition of its topics against the group's committed offsets, so it is
//! caught up only when nothing was left there for it.
//!
//! This module measures and decides; it must not read records, move positions or
//! commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::{BusError, Result};

/// Whether a member's group membership has settled: its last rebalance ended with an
/// assignment (possibly empty), and no revocation came after it. Updated from the
/// consumer's rebalance callbacks.
#[derive(Debug, Default)]
pub(crate) struct Membership {
    settled: AtomicBool,
}

impl Membership {
    /// Before partitions are revoked: unsettled until the next assignment.
    pub(crate) fn revoking(&self) {
        self.settled.store(false, Ordering::Release);
    }

    /// After an assignment (even an empty one: librdkafka calls back once per completed
    /// rebalance): settled.
    pub(crate) fn assigned(&self) {
        self.settled.store(true, Ordering::Release);
    }

    /// Whether the member has an assignment from the group, possibly empty.
    pub(crate) fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
}

/// Where a partition's reading stands, as far as the client knows without reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Standing {
    /// The next offset the application will receive, once it received anything.
    pub(crate) position: Option<i64>,
    /// The group's committed offset, if any (where reading starts without a position).
    pub(crate) committed: Option<i64>,
    /// The oldest offset the partition holds (where reading starts without either).
    pub(crate) earliest: i64,
    /// The readable end: the last stable offset under `read_committed`.
    pub(crate) end: i64,
}

impl Standing {
    /// Records between where the member reads next and the readable end, never below 0.
    pub(crate) fn lag(&self) -> i64 {
        let at = self
            .position
            .or(self.committed)
            .unwrap_or(self.earliest)
            .max(self.earliest);
        (self.end - at).max(0)
    }
}

/// Whether nothing is left to read: no partition lags (an empty one does not).
pub(crate) fn caught_up(lags: &[(String, i32, i64)]) -> bool {
    lags.iter().all(|(_, _, lag)| *lag <= 0)
}

/// Per partition assigned to `consumer`: (topic, partition, records between its position,
/// or the group's committed offset before it read anything, or the earliest offset
/// without either, and the readable end). Blocks the calling thread for up to `timeout`
/// per request.
pub(crate) fn lags<X, C>(consumer: &C, timeout: Duration) -> Result<Vec<(String, i32, i64)>>
where
    X: ConsumerContext,
    C: Consumer<X>,
{
    let assignment = consumer
        .assignment()
        .map_err(BusError::client("reading the assignment"))?;
    let position = consumer
        .position()
        .map_err(BusError::client("reading the position"))?;
    partition_lags(consumer, &assignment, Some(&position), timeout)
}

/// Per partition of every topic `consumer` subscribed to, for a member that has no
/// assignment from the group yet: records between the group's committed offset (or the
/// earliest offset without one) and the readable end. Blocks the calling thread for up to
/// `timeout` per request (metadata, then as [`lags`]).
pub(crate) fn subscription_lags<X, C>(
    consumer: &C,
    timeout: Duration,
) -> Result<Vec<(String, i32, i64)>>
where
    X: ConsumerContext,
    C: Consumer<X>,
{
    let subscription = consumer
        .subscription()
        .map_err(BusError::client("reading the subscription"))?;
    if subscription.count() == 0 {
        return Ok(Vec::new());
    }
    let metadata = consumer
        .fetch_metadata(None, timeout)
        .map_err(BusError::client("fetching metadata"))?;
    let mut partitions = TopicPartitionList::new();
    for topic in metadata.topics() {
        let subscribed = subscription
            .elements()
            .iter()
            .any(|e| e.topic() == topic.name());
        if subscribed {
            for partition in topic.partitions() {
                partitions.add_partition(topic.name(), partition.id());
            }
        }
    }
    partition_lags(consumer, &partitions, None, timeout)
}

/// The lag of each of `partitions`: the readable ends first (one request per broker);
/// then, only for partitions that have records and no position, the group's committed
/// offsets, and the earliest offsets of those without one.
///
/// The ends are asked on the consumer's own connections, so an answer may wait behind a
/// fetch that waits for records (`fetch.wait.max.ms`, 500 ms by default).
fn partition_lags<X, C>(
    consumer: &C,
    partitions: &TopicPartitionList,
    position: Option<&TopicPartitionList>,
    timeout: Duration,
) -> Result<Vec<(String, i32, i64)>>
where
    X: ConsumerContext,
    C: Consumer<X>,
{
    if partitions.count() == 0 {
        return Ok(Vec::new());
    }
    let ends = list_offsets(consumer, partitions, Offset::End, timeout)?;
    let mut standings = Vec::with_capacity(partitions.count());
    let mut unplaced = TopicPartitionList::new();
    for elem in partitions.elements() {
        let (topic, partition) = (elem.topic(), elem.partition());
        let Some(end) = offset_of(&ends, topic, partition) else {
            return Err(BusError::Timeout {
                action: "finding the readable end of a partition",
            });
        };
        let position = position.and_then(|p| offset_of(p, topic, partition));
        if position.is_none() && end > 0 {
            unplaced.add_partition(topic, partition);
        }
        standings.push((
            topic.to_owned(),
            partition,
            Standing {
                position,
                committed: None,
                earliest: 0,
                end,
            },
        ));
    }
    if unplaced.count() > 0 {
        let committed = consumer
            .committed_offsets(unplaced.clone(), timeout)
            .map_err(BusError::client("reading committed offsets"))?;
        let mut fresh = TopicPartitionList::new();
        for (topic, partition, standing) in &mut standings {
            standing.committed = offset_of(&committed, topic, *partition);
            if standing.position.is_none() && standing.committed.is_none() && standing.end > 0 {
                fresh.add_partition(topic, *partition);
            }
        }
        if fresh.count() > 0 {
            let earliest = list_offsets(consumer, &fresh, Offset::Beginning, timeout)?;
            for (topic, partition, standing) in &mut standings {
                if let Some(at) = offset_of(&earliest, topic, *partition) {
                    standing.earliest = at;
                }
            }
        }
    }
    Ok(standings
        .into_iter()
        .map(|(topic, partition, standing)| (topic, partition, standing.lag()))
        .collect())
}

/// `ListOffsets` for every partition of `partitions` at once: `Offset::End` answers the
/// readable end (with the consumer's isolation level), `Offset::Beginning` the earliest.
fn list_offsets<X, C>(
    consumer: &C,
    partitions: &TopicPartitionList,
    which: Offset,
    timeout: Duration,
) -> Result<TopicPartitionList>
where
    X: ConsumerContext,
    C: Consumer<X>,
{
    let mut asked = partitions.clone();
    asked
        .set_all_offsets(which)
        .map_err(BusError::client("listing offsets"))?;
    let answered = consumer
        .offsets_for_times(asked, timeout)
        .map_err(BusError::client("listing offsets"))?;
    if let Some(Err(e)) = answered
        .elements()
        .iter()
        .map(|e| e.error())
        .find(|e| e.is_err())
    {
        return Err(BusError::client("listing offsets")(e));
    }
    Ok(answered)
}

/// The offset `list` holds for `topic`/`partition`, when it is a real one.
fn offset_of(list: &TopicPartitionList, topic: &str, partition: i32) -> Option<i64> {
    match list.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(at)) if at >= 0 => Some(at),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(position: Option<i64>, committed: Option<i64>, earliest: i64, end: i64) -> i64 {
        Standing {
            position,
            committed,
            earliest,
            end,
        }
        .lag()
    }

    #[test]
    fn lag_counts_from_the_position_then_the_committed_offset_then_the_earliest() {
        assert_eq!(standing(Some(7), Some(2), 0, 10), 3);
        assert_eq!(standing(None, Some(2), 0, 10), 8);
        assert_eq!(standing(None, None, 4, 10), 6);
        // Records deleted before they were read are not there to read.
        assert_eq!(standing(None, Some(1), 4, 10), 6);
    }

    #[test]
    fn empty_partitions_and_positions_past_a_marker_are_caught_up() {
        assert_eq!(standing(None, None, 0, 0), 0);
        assert_eq!(standing(None, None, 12, 12), 0);
        // A trailing commit marker at 9: the end (last stable offset) is 10 and the
        // position moves past the marker.
        assert_eq!(standing(Some(10), None, 0, 10), 0);
        // An open transaction holds the end back; nothing past it is readable.
        assert_eq!(standing(Some(10), None, 0, 8), 0);
    }

    #[test]
    fn caught_up_when_no_partition_lags() {
        assert!(caught_up(&[]));
        let lags = vec![("t".to_owned(), 0, 0), ("t".to_owned(), 1, 2)];
        assert!(!caught_up(&lags));
        assert!(caught_up(&lags[..1]));
    }

    #[test]
    fn membership_settles_on_assignment_and_unsettles_on_revocation() {
        let membership = Membership::default();
        assert!(!membership.is_settled());
        membership.assigned();
        assert!(membership.is_settled());
        membership.revoking();
        assert!(!membership.is_settled());
        membership.assigned();
        assert!(membership.is_settled());
    }
}
