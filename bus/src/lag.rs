//! How far consumer groups are behind, seen from outside the groups: each group's
//! committed offsets against the partitions' high watermarks. For backpressure: a
//! front end that stops taking writes while a consumer is too far behind keeps a broker
//! with a small retention window (such as the embedded one) from dropping records
//! before they were read.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::{BusError, Result};
use crate::settings::ClientSettings;

/// How far one group is behind on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Records between the group's committed offset (or, without one, the oldest
    /// retained record) and the high watermark.
    pub lag: i64,
    /// Whether the group has committed an offset for this partition.
    pub committed: bool,
}

/// Watches a set of consumer groups, each with the topics it reads.
pub struct LagWatch {
    groups: Vec<(String, Vec<String>, BaseConsumer)>,
}

impl std::fmt::Debug for LagWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LagWatch")
            .field(
                "groups",
                &self
                    .groups
                    .iter()
                    .map(|(g, t, _)| (g, t))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl LagWatch {
    /// A watch over `groups` (group id, topics it reads). Connects lazily.
    pub fn new(settings: &ClientSettings, groups: &[(&str, &[&str])]) -> Result<Self> {
        let mut watched = Vec::with_capacity(groups.len());
        for (group, topics) in groups {
            let client: BaseConsumer = settings
                .watcher_config(group)
                .create()
                .map_err(BusError::client("creating a lag watcher"))?;
            watched.push((
                (*group).to_owned(),
                topics.iter().map(|t| (*t).to_owned()).collect(),
                client,
            ));
        }
        Ok(Self { groups: watched })
    }

    /// The partition furthest behind among those the watched groups have committed, or
    /// `None` when none is behind. A group that has not committed a partition yet is not
    /// counted there (it may not be deployed at all). Blocks the calling thread (see
    /// [`lags`](Self::lags)).
    pub fn worst(&self, timeout: Duration) -> Result<Option<PartitionLag>> {
        Ok(self
            .lags(timeout)?
            .into_iter()
            .filter(|l| l.committed && l.lag > 0)
            .max_by_key(|l| l.lag))
    }

    /// Every partition of every watched group with its lag. A partition the group never
    /// committed counts from the oldest retained record. Blocks the calling thread (one
    /// metadata request per topic, one offsets request per group and one watermark request
    /// per partition, each up to `timeout`).
    pub fn lags(&self, timeout: Duration) -> Result<Vec<PartitionLag>> {
        let mut watermarks: HashMap<(String, i32), (i64, i64)> = HashMap::new();
        let mut lags = Vec::new();
        for (group, topics, client) in &self.groups {
            let mut wanted = TopicPartitionList::new();
            for topic in topics {
                let metadata = client
                    .fetch_metadata(Some(topic), timeout)
                    .map_err(BusError::client("fetching metadata"))?;
                for t in metadata.topics() {
                    for p in t.partitions() {
                        wanted.add_partition(t.name(), p.id());
                    }
                }
            }
            let committed = client
                .committed_offsets(wanted, timeout)
                .map_err(BusError::client("reading committed offsets"))?;
            for elem in committed.elements() {
                let key = (elem.topic().to_owned(), elem.partition());
                let (low, high) = match watermarks.get(&key) {
                    Some(w) => *w,
                    None => {
                        let w = client
                            .fetch_watermarks(elem.topic(), elem.partition(), timeout)
                            .map_err(BusError::client("fetching watermarks"))?;
                        watermarks.insert(key, w);
                        w
                    }
                };
                let (at, committed) = match elem.offset() {
                    Offset::Offset(at) => (at.max(low), true),
                    _ => (low, false),
                };
                lags.push(PartitionLag {
                    group: group.clone(),
                    topic: elem.topic().to_owned(),
                    partition: elem.partition(),
                    lag: (high - at).max(0),
                    committed,
                });
            }
        }
        Ok(lags)
    }
}
