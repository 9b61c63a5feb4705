//! The table of topics: names, what each record is keyed by, and partition counts; and
//! the key under which a state changelog holds its offset markers.
//!
//! The key decides ordering and ownership: everything about one delivery is keyed by its
//! delivery id (so a request, its reschedules and its cancel stay in order), scheduling is
//! keyed by region (one owner decides for a region's fleet), telemetry by drone id.

/// What the records of a topic are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyedBy {
    /// The delivery id: ordering per delivery.
    DeliveryId,
    /// The scheduling region of the pickup location: one owner per region's fleet.
    Region,
    /// The drone id.
    DroneId,
    /// The key of the original record, kept as it was.
    OriginalKey,
    /// A tenant's webhook endpoint: `tenant/endpointId`.
    Endpoint,
}

/// One topic of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topic {
    /// The topic's name on the broker.
    pub name: &'static str,
    /// What its records are keyed by.
    pub keyed_by: KeyedBy,
    /// Partitions created when the topic does not exist yet. Partitions bound how many
    /// consumers of one group can share the work.
    pub partitions: i32,
    /// Whether the broker keeps only the latest record per key (a state changelog).
    pub compacted: bool,
    /// On a compacted topic, how long every record stays before compaction may drop it
    /// (`min.compaction.lag.ms`, set when the topic is created); 0 for the broker's
    /// default.
    pub min_compaction_lag_ms: i64,
}

/// Delivery requests, reschedules and cancels as accepted by the ingestion tier, the
/// client's bytes: the record of truth. The workflow and the delivery consumer each read
/// it in a group of their own.
pub const DELIVERY_REQUESTS: Topic = Topic {
    name: "delivery-requests",
    keyed_by: KeyedBy::DeliveryId,
    partitions: 12,
    compacted: false,
    min_compaction_lag_ms: 0,
};

/// What the drones' side tells the delivery consumer: assignments and positions (from
/// the tracker) and rejections (from the scheduler), keyed like `delivery-requests` and
/// read beside it.
pub const DELIVERIES: Topic = Topic {
    name: "deliveries",
    keyed_by: KeyedBy::DeliveryId,
    partitions: 12,
    compacted: false,
    min_compaction_lag_ms: 0,
};

/// Work for the scheduling consumer (drone assignment), keyed by region.
pub const DRONE_SCHEDULING: Topic = Topic {
    name: "drone-scheduling",
    keyed_by: KeyedBy::Region,
    partitions: 12,
    compacted: false,
    min_compaction_lag_ms: 0,
};

/// Drone assignments with pickup and delivery ETAs, keyed by drone id so that they
/// share partitions with the drone's telemetry.
pub const DRONE_ASSIGNMENTS: Topic = Topic {
    name: "drone-assignments",
    keyed_by: KeyedBy::DroneId,
    partitions: 12,
    compacted: false,
    min_compaction_lag_ms: 0,
};

/// Position fixes posted by drones.
pub const DRONE_TELEMETRY: Topic = Topic {
    name: "drone-telemetry",
    keyed_by: KeyedBy::DroneId,
    partitions: 12,
    compacted: false,
    min_compaction_lag_ms: 0,
};

/// Records that could not be processed, with the reason and the original bytes.
pub const DEAD_LETTERS: Topic = Topic {
    name: "dead-letters",
    keyed_by: KeyedBy::OriginalKey,
    partitions: 3,
    compacted: false,
    min_compaction_lag_ms: 0,
};

/// Changelog of the delivery consumer's state: every change of each delivery (its
/// latest state once compacted), in the partition of `delivery-requests` it belongs to;
/// also the delivery's events: the status view, the live events, the notifier and the
/// history's `delivery_events` table read it.
pub const DELIVERY_STATE: Topic = Topic {
    name: "delivery-state",
    keyed_by: KeyedBy::DeliveryId,
    partitions: 12,
    compacted: true,
    // Every change of a delivery is also a notification and, for a stage, a row of the
    // history: the notifier, which may hold its offsets back while an endpoint is
    // retried (an hour by default), re-reads them after a restart, and the history sink
    // must read each before compaction may drop it. Compaction leaves them this long.
    min_compaction_lag_ms: 6 * 3_600 * 1_000,
};

/// Changelog of the scheduling consumer's state (drones and waiting requests), in the
/// partition of `drone-scheduling` it belongs to.
pub const SCHEDULING_STATE: Topic = Topic {
    name: "scheduling-state",
    keyed_by: KeyedBy::Region,
    partitions: 12,
    compacted: true,
    min_compaction_lag_ms: 0,
};

/// Changelog of the drone tracker's state (each drone's current delivery), in the
/// partition of `drone-telemetry` it belongs to.
pub const TRACKING_STATE: Topic = Topic {
    name: "tracking-state",
    keyed_by: KeyedBy::DroneId,
    partitions: 12,
    compacted: true,
    min_compaction_lag_ms: 0,
};

/// Webhook endpoints registered by tenants (`PUT /api/webhooks/{id}`): each endpoint's
/// latest registration, a tombstone once deleted. Every tier replica and every notifier
/// reads all of it.
pub const WEBHOOKS: Topic = Topic {
    name: "webhooks",
    keyed_by: KeyedBy::Endpoint,
    partitions: 3,
    compacted: true,
    min_compaction_lag_ms: 0,
};

/// Every topic of the pipeline, in the order of the data flow.
pub const ALL: [Topic; 10] = [
    DELIVERY_REQUESTS,
    DELIVERIES,
    DRONE_SCHEDULING,
    DRONE_ASSIGNMENTS,
    DRONE_TELEMETRY,
    DEAD_LETTERS,
    DELIVERY_STATE,
    SCHEDULING_STATE,
    TRACKING_STATE,
    WEBHOOKS,
];

/// The first byte of a changelog key that holds an offset marker, not state.
///
/// A stateful processor writes, per input partition, the offset of the last input record
/// whose effects its state holds under the key [`changelog_marker_key`] (this byte, then
/// the input topic's name), with the offset as decimal text for value. No state key
/// starts with this byte (state keys are delivery ids, regions, drone ids), so readers of
/// a changelog (the status view) skip marker keys by it.
pub const CHANGELOG_MARKER: u8 = 0;

/// The changelog key of the offset marker for the input topic `topic`.
pub fn changelog_marker_key(topic: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(topic.len() + 1);
    key.push(CHANGELOG_MARKER);
    key.extend_from_slice(topic.as_bytes());
    key
}

/// Consumer group names, one per role, so that scaled-out replicas share the work.
pub mod groups {
    /// The workflow processor (delivery requests to their regions' schedulers).
    pub const WORKFLOW: &str = "dronedelivery-workflow";
    /// The history sink (every topic to Parquet).
    pub const HISTORY: &str = "dronedelivery-history";
    /// The scheduling consumer (drone assignment per region).
    pub const SCHEDULING: &str = "dronedelivery-scheduling";
    /// The drone tracker (telemetry and assignments to each drone's delivery).
    pub const TRACKING: &str = "dronedelivery-tracking";
    /// The delivery consumer (state, stages and ETAs).
    pub const DELIVERIES: &str = "dronedelivery-deliveries";
    /// The notifier (webhooks of delivery changes).
    pub const NOTIFIER: &str = "dronedelivery-notifier";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_keys_are_the_marker_byte_then_the_topic() {
        assert_eq!(changelog_marker_key("deliveries"), b"\0deliveries".to_vec());
        assert_eq!(changelog_marker_key("")[..], [CHANGELOG_MARKER]);
    }

    #[test]
    fn names_are_unique_and_valid_kafka_names() {
        let mut names: Vec<_> = ALL.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for t in ALL {
            assert!(t.partitions > 0);
            // Compacted: the state changelogs, and the registrations of webhooks.
            let latest_per_key = t.name.ends_with("-state") || t.name == WEBHOOKS.name;
            assert_eq!(t.compacted, latest_per_key, "{}", t.name);
            assert!(t.name.len() <= 249);
            assert!(
                t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            );
        }
    }
}
