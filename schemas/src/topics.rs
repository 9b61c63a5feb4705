//! The table of topics: names, what each record is keyed by, and partition counts.
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
}

/// Delivery requests, reschedules and cancels as accepted by the ingestion tier.
pub const DELIVERY_REQUESTS: Topic = Topic {
    name: "delivery-requests",
    keyed_by: KeyedBy::DeliveryId,
    partitions: 12,
};

/// Work for the delivery consumer (state, status and ETA tracking).
pub const DELIVERIES: Topic = Topic {
    name: "deliveries",
    keyed_by: KeyedBy::DeliveryId,
    partitions: 12,
};

/// Work for the scheduling consumer (drone assignment), keyed by region.
pub const DRONE_SCHEDULING: Topic = Topic {
    name: "drone-scheduling",
    keyed_by: KeyedBy::Region,
    partitions: 12,
};

/// Drone assignments with pickup and delivery ETAs.
pub const DRONE_ASSIGNMENTS: Topic = Topic {
    name: "drone-assignments",
    keyed_by: KeyedBy::DeliveryId,
    partitions: 12,
};

/// Position fixes posted by drones.
pub const DRONE_TELEMETRY: Topic = Topic {
    name: "drone-telemetry",
    keyed_by: KeyedBy::DroneId,
    partitions: 12,
};

/// Every stage transition of every delivery.
pub const DELIVERY_EVENTS: Topic = Topic {
    name: "delivery-events",
    keyed_by: KeyedBy::DeliveryId,
    partitions: 12,
};

/// Records that could not be processed, with the reason and the original bytes.
pub const DEAD_LETTERS: Topic = Topic {
    name: "dead-letters",
    keyed_by: KeyedBy::OriginalKey,
    partitions: 3,
};

/// Every topic of the pipeline, in the order of the data flow.
pub const ALL: [Topic; 7] = [
    DELIVERY_REQUESTS,
    DELIVERIES,
    DRONE_SCHEDULING,
    DRONE_ASSIGNMENTS,
    DRONE_TELEMETRY,
    DELIVERY_EVENTS,
    DEAD_LETTERS,
];

/// Consumer group names, one per role, so that scaled-out replicas share the work.
pub mod groups {
    /// The workflow processor (fan-out of delivery requests).
    pub const WORKFLOW: &str = "dronedelivery-workflow";
    /// The history sink (every topic to Parquet).
    pub const HISTORY: &str = "dronedelivery-history";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_valid_kafka_names() {
        let mut names: Vec<_> = ALL.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for t in ALL {
            assert!(t.partitions > 0);
            assert!(t.name.len() <= 249);
            assert!(
                t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            );
        }
    }
}
