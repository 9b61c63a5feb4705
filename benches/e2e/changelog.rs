//! The restore time of each state changelog (`delivery-state`, `scheduling-state`,
//! `tracking-state`) after the soak's load: every partition read from its start to its
//! end with `bus::read_partition`, the very call a stateful processor restores a
//! partition with, one partition after another (as a processor restores the partitions
//! it is given, one at a time), and folded as the restore folds it (a tombstone deletes
//! its key, marker keys are offsets, not state) to count what would be in memory.
//!
//! It reads the broker it is given and starts nothing; the fold is pure.

use std::time::{Duration, Instant};

use bus::{ClientSettings, StoredRecord};
use schemas::topics::{self, Topic};
use serde::{Deserialize, Serialize};

/// The state changelogs, in the order of the processors that write them.
pub(crate) const CHANGELOGS: [Topic; 3] = [
    topics::DELIVERY_STATE,
    topics::SCHEDULING_STATE,
    topics::TRACKING_STATE,
];

/// Longest read of one partition (the engine's default restore timeout is 60 s).
const PARTITION_TIMEOUT: Duration = Duration::from_secs(120);

/// One changelog read end to end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Restore {
    pub(crate) topic: String,
    pub(crate) partitions: i32,
    /// Records read (state, tombstones and offset markers).
    pub(crate) records: u64,
    /// Keys holding state once folded (what a restore keeps in memory).
    pub(crate) live_keys: u64,
    /// Bytes of the keys and payloads read.
    pub(crate) bytes: u64,
    /// Seconds to read and fold every partition, one after another.
    pub(crate) secs: f64,
    /// Seconds of the slowest partition.
    pub(crate) slowest_partition_secs: f64,
    /// Partitions that could not be read to their end (with the error), if any.
    pub(crate) failed: Vec<String>,
}

/// What a restore keeps of a partition's records: the live keys, after tombstones
/// (empty payloads) deleted theirs; offset marker keys are not state.
pub(crate) fn live_keys(records: &[StoredRecord]) -> u64 {
    let mut keys = std::collections::HashSet::new();
    for record in records {
        if record.key.first() == Some(&topics::CHANGELOG_MARKER) {
            continue;
        }
        if record.payload.is_empty() {
            keys.remove(record.key.as_slice());
        } else {
            keys.insert(record.key.as_slice());
        }
    }
    keys.len() as u64
}

/// Reads every partition of each changelog on `bootstrap`, one after another.
pub(crate) async fn restore_times(bootstrap: &str) -> Vec<Restore> {
    let settings = ClientSettings::plain(bootstrap);
    let mut out = Vec::new();
    for topic in CHANGELOGS {
        let mut restore = Restore {
            topic: topic.name.to_owned(),
            partitions: topic.partitions,
            records: 0,
            live_keys: 0,
            bytes: 0,
            secs: 0.0,
            slowest_partition_secs: 0.0,
            failed: Vec::new(),
        };
        for partition in 0..topic.partitions {
            let settings = settings.clone();
            let name = topic.name;
            let (result, secs) = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let result = bus::read_partition(&settings, name, partition, PARTITION_TIMEOUT)
                    .map(|records| {
                        let bytes: usize =
                            records.iter().map(|r| r.key.len() + r.payload.len()).sum();
                        (records.len() as u64, live_keys(&records), bytes as u64)
                    });
                (result, started.elapsed().as_secs_f64())
            })
            .await
            .unwrap();
            restore.secs += secs;
            restore.slowest_partition_secs = restore.slowest_partition_secs.max(secs);
            match result {
                Ok((records, keys, bytes)) => {
                    restore.records += records;
                    restore.live_keys += keys;
                    restore.bytes += bytes;
                }
                Err(e) => restore.failed.push(format!("partition {partition}: {e}")),
            }
        }
        println!(
            "restore of {}: {} records ({:.1} MB), {} live keys, {:.2} s over {} partitions (slowest {:.2} s){}",
            restore.topic,
            restore.records,
            restore.bytes as f64 / 1e6,
            restore.live_keys,
            restore.secs,
            restore.partitions,
            restore.slowest_partition_secs,
            if restore.failed.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", restore.failed.join(", "))
            }
        );
        out.push(restore);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The checks of this module, for the bench's own runner (`main.rs`).
    pub(crate) const TESTS: &[(&str, fn())] = &[
        (
            "changelog::tombstones_and_markers_are_not_state",
            tombstones_and_markers_are_not_state,
        ),
        (
            "changelog::the_changelogs_are_the_state_topics",
            the_changelogs_are_the_state_topics,
        ),
    ];

    fn record(offset: i64, key: &[u8], payload: &[u8]) -> StoredRecord {
        StoredRecord {
            offset,
            key: key.to_vec(),
            payload: payload.to_vec(),
        }
    }

    fn tombstones_and_markers_are_not_state() {
        let marker = topics::changelog_marker_key("deliveries");
        let records = [
            record(0, b"a", b"1"),
            record(1, b"b", b"1"),
            record(2, b"a", b"2"),
            record(3, &marker, b"41"),
            record(4, b"b", b""),
            record(5, b"c", b"1"),
            record(6, b"d", b""),
        ];
        assert_eq!(live_keys(&records), 2);
        assert_eq!(live_keys(&[]), 0);
    }

    fn the_changelogs_are_the_state_topics() {
        let names: Vec<&str> = CHANGELOGS.iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            ["delivery-state", "scheduling-state", "tracking-state"]
        );
        assert!(CHANGELOGS.iter().all(|t| t.compacted));
    }
}
