//! How far consumer groups are behind, seen from outside the groups: each group's
//! committed offsets against the partitions' high watermarks. For backpressure: a
//! front end that stops taking writes while a consumer is too far behind keeps a broker
//! with a small retention window (such as the embedded one) from dropping records
//! before they were read.
//!
//! - [`LagWatch`] measures (blocking Kafka requests).
//! - [`Backpressure`] decides, pure: refuse writes once the worst lag is above the
//!   maximum, take them again once it is at most half of it.
//! - [`spawn_lag_watch`] measures periodically and publishes the decision as a flag the
//!   front end reads.
//!
//! This module must not know which groups make up the pipeline (the caller names them)
//! nor refuse anything itself: it only raises and lowers the flag.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// What [`Backpressure::observe`] decided: writes switch from taken to refused or back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The worst lag went above the maximum: refuse writes from now on.
    Refuse,
    /// The worst lag came down to at most half the maximum: take writes again.
    Resume,
}

/// The backpressure decision, with hysteresis. Pure: no I/O, no clock.
///
/// Writes are refused once the worst lag is above `max`, and taken again only once it is
/// at most `max / 2` (rounded down), so that a lag hovering around `max` does not switch
/// them on and off with every measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backpressure {
    max: i64,
    refusing: bool,
}

impl Backpressure {
    /// Taking writes, refusing them above `max` records of lag.
    pub fn new(max: u64) -> Self {
        Self {
            max: i64::try_from(max).unwrap_or(i64::MAX),
            refusing: false,
        }
    }

    /// Whether writes are refused now.
    pub fn refusing(&self) -> bool {
        self.refusing
    }

    /// Takes one measurement of the worst lag; says whether writes switch.
    pub fn observe(&mut self, lag: i64) -> Option<Transition> {
        if !self.refusing && lag > self.max {
            self.refusing = true;
            Some(Transition::Refuse)
        } else if self.refusing && lag <= self.max / 2 {
            self.refusing = false;
            Some(Transition::Resume)
        } else {
            None
        }
    }
}

/// Measures the worst lag of `watch`'s groups every `every` until `shutdown`, reports it
/// as the gauge `pipeline_max_consumer_lag`, and keeps the returned flag set while
/// [`Backpressure`] with `max` says writes are refused. Each measurement runs on the
/// blocking pool; one that fails leaves the flag as it is.
pub fn spawn_lag_watch(
    watch: LagWatch,
    max: u64,
    every: Duration,
    shutdown: CancellationToken,
) -> (Arc<AtomicBool>, JoinHandle<()>) {
    let watch = Arc::new(watch);
    let behind = Arc::new(AtomicBool::new(false));
    let flag = behind.clone();
    let task = tokio::spawn(async move {
        let gauge = metrics::gauge!("pipeline_max_consumer_lag");
        let mut decision = Backpressure::new(max);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let probe = watch.clone();
            let worst = match tokio::task::spawn_blocking(move || {
                probe.worst(Duration::from_secs(2))
            })
            .await
            {
                Ok(Ok(worst)) => worst,
                Ok(Err(e)) => {
                    // While writes are refused, say why they stay refused.
                    if decision.refusing() {
                        tracing::warn!(error = %e, "consumer lag not measured; writes stay refused");
                    } else {
                        tracing::debug!(error = %e, "consumer lag not measured");
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the lag check failed");
                    continue;
                }
            };
            let lag = worst.as_ref().map_or(0, |w| w.lag);
            gauge.set(lag as f64);
            match decision.observe(lag) {
                Some(Transition::Refuse) => {
                    flag.store(true, Ordering::Relaxed);
                    if let Some(w) = &worst {
                        tracing::warn!(
                            group = %w.group, topic = %w.topic, partition = w.partition, lag, max,
                            "a consumer is behind: refusing writes (503) until it catches up"
                        );
                    }
                }
                Some(Transition::Resume) => {
                    flag.store(false, Ordering::Relaxed);
                    tracing::info!(lag, "the consumers caught up: taking writes again");
                }
                None => {}
            }
        }
    });
    (behind, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The transitions of a fresh decision over `lags`.
    fn run(max: u64, lags: &[i64]) -> Vec<Option<Transition>> {
        let mut decision = Backpressure::new(max);
        lags.iter().map(|&lag| decision.observe(lag)).collect()
    }

    #[test]
    fn refuses_only_above_the_maximum() {
        assert_eq!(run(100, &[0, 99, 100]), [None, None, None]);
        assert_eq!(run(100, &[101]), [Some(Transition::Refuse)]);
        let mut decision = Backpressure::new(100);
        decision.observe(100);
        assert!(!decision.refusing());
        decision.observe(101);
        assert!(decision.refusing());
    }

    #[test]
    fn while_refusing_only_half_the_maximum_resumes() {
        assert_eq!(
            run(100, &[101, 500, 100, 51, 50]),
            [
                Some(Transition::Refuse),
                None,
                None,
                None,
                Some(Transition::Resume)
            ]
        );
        // Taking writes again, the maximum is the bound again, not half of it.
        assert_eq!(
            run(100, &[101, 0, 60, 100, 101]),
            [
                Some(Transition::Refuse),
                Some(Transition::Resume),
                None,
                None,
                Some(Transition::Refuse)
            ]
        );
    }

    #[test]
    fn odd_maximums_round_the_half_down() {
        // 7 / 2 = 3: a lag of 4 keeps refusing, 3 resumes.
        assert_eq!(
            run(7, &[8, 4, 3]),
            [Some(Transition::Refuse), None, Some(Transition::Resume)]
        );
        // 1 / 2 = 0: refused above 1, resumed only at 0.
        assert_eq!(
            run(1, &[1, 2, 1, 0]),
            [
                None,
                Some(Transition::Refuse),
                None,
                Some(Transition::Resume)
            ]
        );
    }

    #[test]
    fn a_zero_maximum_refuses_any_lag_and_resumes_at_none() {
        assert_eq!(
            run(0, &[0, 1, 0, 0]),
            [
                None,
                Some(Transition::Refuse),
                Some(Transition::Resume),
                None
            ]
        );
    }

    proptest! {
        #[test]
        fn transitions_alternate_and_follow_the_thresholds(
            max in 0u64..1_000,
            lags in proptest::collection::vec(0i64..2_000, 0..64),
        ) {
            let mut decision = Backpressure::new(max);
            let max = max as i64;
            for lag in lags {
                let was = decision.refusing();
                let transition = decision.observe(lag);
                let now = decision.refusing();
                match transition {
                    Some(Transition::Refuse) => prop_assert!(!was && now && lag > max),
                    Some(Transition::Resume) => prop_assert!(was && !now && lag <= max / 2),
                    None => {
                        prop_assert_eq!(was, now);
                        if was {
                            prop_assert!(lag > max / 2);
                        } else {
                            prop_assert!(lag <= max);
                        }
                    }
                }
            }
        }
    }
}
