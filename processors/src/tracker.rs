//! The drone tracker: brings each drone's assignment and telemetry to the delivery it is
//! flying.
//!
//! `drone-assignments` and `drone-telemetry` are both keyed by drone id with equal
//! partition counts, and this consumer's group uses the range assignor, so a drone's
//! assignments and fixes meet in one member. It remembers each drone's latest assignment
//! (`tracking-state`) and forwards the assignment and every later fix to `deliveries`
//! under the delivery's key, where the delivery consumer owns the state. Fixes of drones
//! with no assignment are counted and dropped.

use std::collections::HashMap;

use schemas::headers as h;
use schemas::topics;
use schemas::tracking::Assignment;

use crate::stateful::{Effects, Machine, Record, Spec};
use crate::workflow::Output;

/// What the tracker reads and writes.
pub const SPEC: Spec = Spec {
    name: "tracking",
    group: topics::groups::TRACKING,
    inputs: &[topics::DRONE_ASSIGNMENTS.name, topics::DRONE_TELEMETRY.name],
    changelog: topics::TRACKING_STATE.name,
};

/// Each drone's latest assignment, by partition.
#[derive(Debug, Default)]
pub struct Tracker {
    drones: HashMap<i32, HashMap<String, Assignment>>,
}

fn forward(a: &Assignment, event_type: &str, payload: Vec<u8>) -> Output {
    let (tenant, _) = schemas::split_delivery_key(&a.delivery_key);
    let mut headers = vec![
        (h::EVENT_TYPE.to_owned(), event_type.as_bytes().to_vec()),
        (h::DRONE_ID.to_owned(), a.drone_id.as_bytes().to_vec()),
        (h::DELIVERY_ID.to_owned(), a.delivery_id.as_bytes().to_vec()),
    ];
    if let Some(tenant) = tenant {
        headers.push((h::TENANT.to_owned(), tenant.as_bytes().to_vec()));
    }
    Output {
        topic: topics::DELIVERIES.name,
        key: a.delivery_key.as_bytes().to_vec(),
        payload,
        headers,
    }
}

impl Machine for Tracker {
    fn forget(&mut self, partition: i32) {
        self.drones.remove(&partition);
    }

    fn restore(&mut self, partition: i32, entries: HashMap<Vec<u8>, Vec<u8>>) {
        let drones = entries
            .into_values()
            .filter_map(|v| serde_json::from_slice::<Assignment>(&v).ok())
            .map(|a| (a.drone_id.clone(), a))
            .collect();
        self.drones.insert(partition, drones);
    }

    fn handle(&mut self, record: &Record, _now_ms: i64, effects: &mut Effects) {
        let drones = self.drones.entry(record.partition).or_default();
        let payload = record.payload.as_deref().unwrap_or_default();
        if record.topic == topics::DRONE_ASSIGNMENTS.name {
            let Ok(a) = serde_json::from_slice::<Assignment>(payload) else {
                effects
                    .outputs
                    .push(record.dead_letter("invalid drone assignment"));
                return;
            };
            effects
                .changes
                .push((a.drone_id.as_bytes().to_vec(), payload.to_vec()));
            effects
                .outputs
                .push(forward(&a, h::event_type::DRONE_ASSIGNED, payload.to_vec()));
            drones.insert(a.drone_id.clone(), a);
            return;
        }
        match drones.get(record.key_text()) {
            Some(a) => effects.outputs.push(forward(
                a,
                h::event_type::DRONE_POSITION_REPORTED,
                payload.to_vec(),
            )),
            None => metrics::counter!("tracking_fixes_without_assignment_total").increment(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::delivery::Location;

    #[test]
    fn fixes_follow_the_drones_latest_assignment() {
        let here = Location {
            latitude: 47.0,
            longitude: -122.0,
        };
        let a = Assignment {
            drone_id: "r1".into(),
            region: "47:-123".into(),
            delivery_key: "fabrikam/d1".into(),
            delivery_id: "d1".into(),
            from: here,
            pickup: here,
            drop_off: here,
            speed_mps: 10.0,
            assigned_at: 0,
            pickup_eta: 0,
            delivery_eta: 0,
        };
        let record = |topic: &str, payload: Vec<u8>| Record {
            topic: topic.into(),
            partition: 3,
            offset: 0,
            key: Some(b"r1".to_vec()),
            payload: Some(payload),
            headers: Vec::new(),
        };
        let fix = br#"{"latitude":47,"longitude":-122,"timestamp":"2026-11-24T10:00:00Z"}"#;
        let mut tracker = Tracker::default();
        let mut fx = Effects::default();
        tracker.handle(
            &record(topics::DRONE_TELEMETRY.name, fix.to_vec()),
            0,
            &mut fx,
        );
        assert!(fx.outputs.is_empty(), "no assignment yet");
        tracker.handle(
            &record(
                topics::DRONE_ASSIGNMENTS.name,
                serde_json::to_vec(&a).unwrap(),
            ),
            0,
            &mut fx,
        );
        tracker.handle(
            &record(topics::DRONE_TELEMETRY.name, fix.to_vec()),
            0,
            &mut fx,
        );
        assert_eq!(fx.outputs.len(), 2);
        assert!(fx.outputs.iter().all(|o| o.key == b"fabrikam/d1"));
        assert_eq!(fx.outputs[1].payload, fix);
        // Restored from its changelog, it still knows the drone.
        let log = fx.changes.into_iter().collect();
        let mut restored = Tracker::default();
        restored.restore(3, log);
        let mut fx = Effects::default();
        restored.handle(
            &record(topics::DRONE_TELEMETRY.name, fix.to_vec()),
            0,
            &mut fx,
        );
        assert_eq!(fx.outputs.len(), 1);
    }
}
