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
//!
//! A drone's assignment is forgotten once it is over: when the partition's stream time
//! ([`crate::clock`]) is the drone retention past both its delivery ETA and the drone's
//! last record; past [`DRONES_PER_PARTITION`], the one that has been over the longest
//! goes first. Its changelog entry is deleted with a tombstone; a later fix of it counts as one
//! without an assignment.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use schemas::headers as h;
use schemas::topics;
use schemas::tracking::Assignment;

use crate::clock::{StreamClock, event_ms, event_time_header, millis};
use crate::output::Output;
use crate::stateful::{Effects, Machine, Record, Spec};

/// What the tracker reads and writes.
pub const SPEC: Spec = Spec {
    name: "tracking",
    group: topics::groups::TRACKING,
    inputs: &[topics::DRONE_ASSIGNMENTS.name, topics::DRONE_TELEMETRY.name],
    changelog: topics::TRACKING_STATE.name,
    coalesce: true,
};

/// Fixes remembered per drone, for an assignment that comes after them.
const RECENT_FIXES_PER_DRONE: usize = 16;
/// Drones whose recent fixes are remembered, per partition; past it, or past
/// [`RECENT_BYTES_PER_PARTITION`], the memory of a partition starts anew (unknown drone
/// ids and large fixes cannot grow it without bound).
const RECENT_DRONES_PER_PARTITION: usize = 20_000;
/// Bytes of remembered fixes per partition.
const RECENT_BYTES_PER_PARTITION: usize = 8 * 1024 * 1024;

/// How long an assignment is remembered once over and the drone is silent, by default.
pub const DRONE_RETENTION: Duration = Duration::from_secs(3_600);
/// Drones with a remembered assignment per partition; past it, the one over the longest
/// is forgotten. Above a partition's share of the largest default fleet (eight
/// drones in each of the 64,800 one-degree regions, over 12 partitions).
pub const DRONES_PER_PARTITION: usize = 100_000;

/// A drone's latest fixes: when each was taken (milliseconds) and its bytes.
type RecentFixes = VecDeque<(i64, Vec<u8>)>;

/// A drone's latest assignment and until when it is needed.
#[derive(Debug, Clone)]
struct Tracked {
    assignment: Assignment,
    /// The later of its delivery ETA and the stream time of the drone's last record: its
    /// key in [`Partition::by_due`].
    due_ms: i64,
}

/// One partition's drones.
#[derive(Debug, Default)]
struct Partition {
    drones: HashMap<String, Tracked>,
    /// Drones by until when they are needed.
    by_due: BTreeSet<(i64, String)>,
    clock: StreamClock,
}

impl Partition {
    /// Remembers `assignment`, its drone last heard of at `seen_ms`.
    fn put(&mut self, assignment: Assignment, seen_ms: i64) {
        let id = assignment.drone_id.clone();
        if let Some(old) = self.drones.remove(&id) {
            self.by_due.remove(&(old.due_ms, id.clone()));
        }
        let due_ms = seen_ms.max(assignment.delivery_eta);
        self.by_due.insert((due_ms, id.clone()));
        self.drones.insert(id, Tracked { assignment, due_ms });
    }

    /// The drone was heard of at `at`.
    fn seen(&mut self, drone: &str, at: i64) {
        if let Some(t) = self.drones.get_mut(drone)
            && at > t.due_ms
        {
            self.by_due.remove(&(t.due_ms, drone.to_owned()));
            t.due_ms = at;
            self.by_due.insert((at, drone.to_owned()));
        }
    }

    fn remove(&mut self, drone: &str, effects: &mut Effects) {
        if let Some(t) = self.drones.remove(drone) {
            self.by_due.remove(&(t.due_ms, drone.to_owned()));
            effects
                .changes
                .push((drone.as_bytes().to_vec(), Vec::new()));
            metrics::counter!("tracking_drones_forgotten_total").increment(1);
        }
    }
}

/// Each drone's latest assignment, and its latest fixes, by partition.
#[derive(Debug)]
pub struct Tracker {
    retention_ms: i64,
    max_drones: usize,
    partitions: HashMap<i32, Partition>,
    recent: HashMap<i32, HashMap<String, RecentFixes>>,
    recent_bytes: HashMap<i32, usize>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new(DRONE_RETENTION)
    }
}

impl Tracker {
    /// A tracker that forgets an assignment `drone_retention` (event time) after it is
    /// over and its drone fell silent.
    pub fn new(drone_retention: Duration) -> Self {
        Self {
            retention_ms: millis(drone_retention),
            max_drones: DRONES_PER_PARTITION,
            partitions: HashMap::new(),
            recent: HashMap::new(),
            recent_bytes: HashMap::new(),
        }
    }
}

/// When a fix was taken, in milliseconds (None when the payload is not a valid fix).
fn fix_millis(payload: &[u8]) -> Option<i64> {
    schemas::telemetry::parse_position_fix(payload)
        .ok()
        .map(|f| f.timestamp.timestamp_millis())
}

fn forward(a: &Assignment, event_type: &str, payload: Vec<u8>, at: i64) -> Output {
    let (tenant, _) = schemas::split_delivery_key(&a.delivery_key);
    let mut headers = vec![
        (h::EVENT_TYPE.to_owned(), event_type.as_bytes().to_vec()),
        (h::DRONE_ID.to_owned(), a.drone_id.as_bytes().to_vec()),
        (h::DELIVERY_ID.to_owned(), a.delivery_id.as_bytes().to_vec()),
        event_time_header(at),
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
        self.partitions.remove(&partition);
        self.recent.remove(&partition);
        self.recent_bytes.remove(&partition);
    }

    fn restore(&mut self, partition: i32, entries: HashMap<Vec<u8>, Vec<u8>>) {
        let mut restored = Partition::default();
        for a in entries
            .into_values()
            .filter_map(|v| serde_json::from_slice::<Assignment>(&v).ok())
        {
            restored.clock.raise(a.assigned_at);
            let seen = a.assigned_at;
            restored.put(a, seen);
        }
        self.partitions.insert(partition, restored);
    }

    fn handle(&mut self, record: &Record, now_ms: i64, effects: &mut Effects) {
        let p = self.partitions.entry(record.partition).or_default();
        let recent = self.recent.entry(record.partition).or_default();
        let payload = record.payload.as_deref().unwrap_or_default();
        if record.topic == topics::DRONE_ASSIGNMENTS.name {
            let Ok(a) = serde_json::from_slice::<Assignment>(payload) else {
                effects
                    .outputs
                    .push(record.dead_letter("invalid drone assignment"));
                return;
            };
            let at = event_ms(record).unwrap_or(a.assigned_at);
            p.clock.observe(Some(at));
            effects
                .changes
                .push((a.drone_id.as_bytes().to_vec(), payload.to_vec()));
            effects.outputs.push(forward(
                &a,
                h::event_type::DRONE_ASSIGNED,
                payload.to_vec(),
                at,
            ));
            // Fixes of this flight that came before its assignment.
            if let Some(fixes) = recent.get(&a.drone_id) {
                for (_, fix) in fixes.iter().filter(|(taken, _)| *taken >= a.assigned_at) {
                    effects.outputs.push(forward(
                        &a,
                        h::event_type::DRONE_POSITION_REPORTED,
                        fix.clone(),
                        at,
                    ));
                }
            }
            let seen_ms = p.clock.now().unwrap_or(at);
            p.put(a, seen_ms);
            // Past the count bound, the drone needed the least long goes.
            while p.drones.len() > self.max_drones {
                let Some((_, oldest)) = p.by_due.first().cloned() else {
                    break;
                };
                p.remove(&oldest, effects);
            }
            return;
        }
        let drone = record.key_text();
        let at = event_ms(record);
        p.clock.observe(at);
        if let Some(taken) = fix_millis(payload) {
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
            fixes.push_back((taken, payload.to_vec()));
            *bytes += payload.len();
        }
        let at = at.or(p.clock.now()).unwrap_or(now_ms);
        p.seen(drone, at);
        match p.drones.get(drone) {
            Some(t) => effects.outputs.push(forward(
                &t.assignment,
                h::event_type::DRONE_POSITION_REPORTED,
                payload.to_vec(),
                at,
            )),
            None => metrics::counter!("tracking_fixes_without_assignment_total").increment(1),
        }
    }

    fn tick(&mut self, partition: i32, now_ms: i64, effects: &mut Effects) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        let Some(stream) = p.clock.tick(now_ms) else {
            return;
        };
        while let Some((due, id)) = p.by_due.first().cloned() {
            if due.saturating_add(self.retention_ms) > stream {
                break;
            }
            p.remove(&id, effects);
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

    #[test]
    fn a_drone_is_forgotten_once_its_delivery_is_over_and_it_is_silent() {
        let here = Location {
            latitude: 47.0,
            longitude: -122.0,
        };
        let t0 = 1_800_000_000_000;
        let assignment = |drone: &str| Assignment {
            drone_id: drone.into(),
            region: "47:-123".into(),
            delivery_key: format!("fabrikam/{drone}"),
            delivery_id: drone.into(),
            from: here,
            pickup: here,
            drop_off: here,
            speed_mps: 10.0,
            assigned_at: t0,
            pickup_eta: t0 + 60_000,
            delivery_eta: t0 + 120_000,
        };
        let record = |drone: &str, topic: &str, payload: Vec<u8>, at: i64| Record {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            key: Some(drone.as_bytes().to_vec()),
            payload: Some(payload),
            headers: vec![(h::INGEST_TIME.into(), at.to_string().into_bytes())],
        };
        let fix = br#"{"latitude":47,"longitude":-122,"timestamp":"2026-11-24T10:00:00Z"}"#;
        let retention = Duration::from_secs(600);
        let mut tracker = Tracker::new(retention);
        let mut fx = Effects::default();
        let a = serde_json::to_vec(&assignment("r1")).unwrap();
        tracker.handle(
            &record("r1", topics::DRONE_ASSIGNMENTS.name, a, t0),
            0,
            &mut fx,
        );
        // Still reporting after its ETA: kept.
        tracker.handle(
            &record(
                "r1",
                topics::DRONE_TELEMETRY.name,
                fix.to_vec(),
                t0 + 300_000,
            ),
            0,
            &mut fx,
        );
        let mut fx = Effects::default();
        tracker.tick(0, t0 + 898_999, &mut fx);
        tracker.tick(0, t0 + 899_999, &mut fx);
        assert!(fx.changes.is_empty());
        tracker.tick(0, t0 + 900_000, &mut fx);
        assert_eq!(fx.changes, vec![(b"r1".to_vec(), Vec::new())]);
        // A later fix has no delivery to go to.
        let mut fx = Effects::default();
        tracker.handle(
            &record(
                "r1",
                topics::DRONE_TELEMETRY.name,
                fix.to_vec(),
                t0 + 900_001,
            ),
            0,
            &mut fx,
        );
        assert!(fx.outputs.is_empty());
        // The count bound: the one over the longest goes first.
        tracker.max_drones = 2;
        for (i, drone) in ["a", "b", "c"].into_iter().enumerate() {
            let mut a = assignment(drone);
            a.delivery_eta = t0 + 1_000_000 + i as i64;
            let payload = serde_json::to_vec(&a).unwrap();
            let mut fx = Effects::default();
            tracker.handle(
                &record(drone, topics::DRONE_ASSIGNMENTS.name, payload, t0),
                0,
                &mut fx,
            );
            if drone == "c" {
                assert!(fx.changes.contains(&(b"a".to_vec(), Vec::new())));
            }
        }
        assert_eq!(tracker.partitions[&0].drones.len(), 2);
        assert!(!tracker.partitions[&0].drones.contains_key("a"));
    }
}
