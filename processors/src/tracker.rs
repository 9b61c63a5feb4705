//! The drone tracker: brings each drone's assignment and telemetry to the delivery it is
//! flying.
//!
//! `drone-assignments` and `drone-telemetry` are both keyed by drone id with equal
//! partition counts, and this consumer's group uses the range assignor, so a drone's
//! assignments and fixes meet in one member. It remembers each drone's latest assignment
//! (`tracking-state`) and forwards the assignment and every later fix to `deliveries`
//! under the delivery's key, where the delivery consumer owns the state.
//!
//! The two topics are read independently: after a pause (a rebalance, a restart, a slow
//! broker) a member can receive a drone's fixes before the assignment that was written
//! first, so fixes of a new flight would go to the drone's previous delivery, or nowhere.
//! The tracker therefore remembers each drone's latest few fixes (bounded per drone and
//! per partition) and, when an assignment comes, forwards after it those taken at or after
//! its `assigned_at`. Fixes of drones with no assignment are counted and kept that way
//! until an assignment claims them or newer fixes push them out.

use std::collections::{HashMap, VecDeque};

use schemas::headers as h;
use schemas::topics;
use schemas::tracking::Assignment;

use crate::output::Output;
use crate::stateful::{Effects, Machine, Record, Spec};

/// What the tracker reads and writes.
pub const SPEC: Spec = Spec {
    name: "tracking",
    group: topics::groups::TRACKING,
    inputs: &[topics::DRONE_ASSIGNMENTS.name, topics::DRONE_TELEMETRY.name],
    changelog: topics::TRACKING_STATE.name,
};

/// Fixes remembered per drone, for an assignment that comes after them.
const RECENT_FIXES_PER_DRONE: usize = 16;
/// Drones whose recent fixes are remembered, per partition; past it, or past
/// [`RECENT_BYTES_PER_PARTITION`], the memory of a partition starts anew (unknown drone
/// ids and large fixes cannot grow it without bound).
const RECENT_DRONES_PER_PARTITION: usize = 20_000;
/// Bytes of remembered fixes per partition.
const RECENT_BYTES_PER_PARTITION: usize = 8 * 1024 * 1024;

/// A drone's latest fixes: when each was taken (milliseconds) and its bytes.
type RecentFixes = VecDeque<(i64, Vec<u8>)>;

/// Each drone's latest assignment, and its latest fixes, by partition.
#[derive(Debug, Default)]
pub struct Tracker {
    drones: HashMap<i32, HashMap<String, Assignment>>,
    recent: HashMap<i32, HashMap<String, RecentFixes>>,
    recent_bytes: HashMap<i32, usize>,
}

/// When a fix was taken, in milliseconds (None when the payload is not a valid fix).
fn fix_millis(payload: &[u8]) -> Option<i64> {
    schemas::telemetry::parse_position_fix(payload)
        .ok()
        .map(|f| f.timestamp.timestamp_millis())
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
        self.recent.remove(&partition);
        self.recent_bytes.remove(&partition);
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
        let recent = self.recent.entry(record.partition).or_default();
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
            // Fixes of this flight that came before its assignment.
            if let Some(fixes) = recent.get(&a.drone_id) {
                for (_, fix) in fixes.iter().filter(|(at, _)| *at >= a.assigned_at) {
                    effects.outputs.push(forward(
                        &a,
                        h::event_type::DRONE_POSITION_REPORTED,
                        fix.clone(),
                    ));
                }
            }
            drones.insert(a.drone_id.clone(), a);
            return;
        }
        let drone = record.key_text();
        if let Some(at) = fix_millis(payload) {
            let bytes = self.recent_bytes.entry(record.partition).or_default();
            if (recent.len() >= RECENT_DRONES_PER_PARTITION && !recent.contains_key(drone))
                || *bytes + payload.len() > RECENT_BYTES_PER_PARTITION
            {
                recent.clear();
                *bytes = 0;
            }
            let fixes = recent.entry(drone.to_owned()).or_default();
            if fixes.len() == RECENT_FIXES_PER_DRONE
                && let Some((_, oldest)) = fixes.pop_front()
            {
                *bytes -= oldest.len();
            }
            fixes.push_back((at, payload.to_vec()));
            *bytes += payload.len();
        }
        match drones.get(drone) {
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
        // The assignment, the fix that came before it (taken after `assigned_at`), and
        // the fix after it.
        assert_eq!(fx.outputs.len(), 3);
        assert!(fx.outputs.iter().all(|o| o.key == b"fabrikam/d1"));
        assert_eq!(fx.outputs[1].payload, fix);
        assert_eq!(fx.outputs[2].payload, fix);
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

    #[test]
    fn fixes_of_a_new_flight_that_come_before_its_assignment_reach_its_delivery() {
        let here = Location {
            latitude: 47.0,
            longitude: -122.0,
        };
        let assignment = |delivery: &str, assigned_at: i64| Assignment {
            drone_id: "r1".into(),
            region: "47:-123".into(),
            delivery_key: format!("fabrikam/{delivery}"),
            delivery_id: delivery.into(),
            from: here,
            pickup: here,
            drop_off: here,
            speed_mps: 10.0,
            assigned_at,
            pickup_eta: 0,
            delivery_eta: 0,
        };
        let record = |topic: &str, payload: Vec<u8>| Record {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            key: Some(b"r1".to_vec()),
            payload: Some(payload),
            headers: Vec::new(),
        };
        let fix = |second: u32| {
            format!(
                r#"{{"latitude":47,"longitude":-122,"timestamp":"2026-11-24T10:00:{second:02}Z"}}"#
            )
            .into_bytes()
        };
        let ten_o_clock = 1_795_514_400_000; // 2026-11-24T10:00:00Z
        let mut tracker = Tracker::default();
        let mut fx = Effects::default();
        let first = serde_json::to_vec(&assignment("d1", ten_o_clock)).unwrap();
        tracker.handle(&record(topics::DRONE_ASSIGNMENTS.name, first), 0, &mut fx);
        tracker.handle(&record(topics::DRONE_TELEMETRY.name, fix(1)), 0, &mut fx);
        // The second flight's fixes arrive before its assignment: they go to d1 first...
        for second in 20..40 {
            tracker.handle(
                &record(topics::DRONE_TELEMETRY.name, fix(second)),
                0,
                &mut fx,
            );
        }
        assert!(fx.outputs.iter().all(|o| o.key == b"fabrikam/d1"));
        // ...and, once the assignment comes, the recent ones taken since it go to d2.
        let mut fx = Effects::default();
        let second = serde_json::to_vec(&assignment("d2", ten_o_clock + 30_000)).unwrap();
        tracker.handle(&record(topics::DRONE_ASSIGNMENTS.name, second), 0, &mut fx);
        let to_d2: Vec<_> = fx
            .outputs
            .iter()
            .filter(|o| o.key == b"fabrikam/d2")
            .map(|o| o.payload.clone())
            .collect();
        assert_eq!(
            to_d2.len(),
            1 + 10,
            "the assignment and the fixes from :30 on"
        );
        assert_eq!(to_d2[1], fix(30));
        assert_eq!(to_d2[10], fix(39));
        // Memory stays bounded per drone.
        assert!(tracker.recent[&0]["r1"].len() <= RECENT_FIXES_PER_DRONE);
    }
}
