//! Drone scheduling: which drone takes which delivery, and when it gets there. Pure: no
//! I/O, the time is an argument.
//!
//! Each region owns a fleet. A request goes to the free drone that can carry it (weight
//! and size) and delivers it earliest, preferring drones that make the deadline; when no
//! drone is free the request waits, first come first served, and is assigned when a
//! drone is released. A request no drone of the region could ever carry is refused.
//!
//! It must not know topics, records or the changelog: the scheduling consumer (the
//! parent module) turns records into calls here and decisions into outputs.

use std::collections::{BTreeMap, HashSet, VecDeque};

use schemas::delivery::Location;
use schemas::{PackageSize, tracking::Assignment};
use serde::{Deserialize, Serialize};

use crate::geo::{distance_m, flight_ms};

/// One drone of a region's fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Drone {
    /// Its id, unique across the fleet.
    pub id: String,
    /// Its home base.
    pub home: Location,
    /// Where it is (its home, or where it finished its last delivery).
    pub position: Location,
    /// The heaviest package it carries, kilograms.
    pub max_weight_kg: f64,
    /// The largest package it carries.
    pub max_size: PackageSize,
    /// Cruise speed, metres per second.
    pub speed_mps: f64,
    /// The delivery it is flying, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_with: Option<String>,
}

impl Drone {
    /// Whether it could carry `job` at all (busy or not).
    pub fn can_carry(&self, job: &Job) -> bool {
        job.weight_kg <= self.max_weight_kg && job.size <= self.max_size
    }

    /// When it would reach the pickup (not before the pickup time) and the drop-off,
    /// starting now from where it is.
    pub fn etas(&self, job: &Job, now_ms: i64) -> (i64, i64) {
        let to_pickup = flight_ms(distance_m(self.position, job.pickup), self.speed_mps);
        let pickup = (now_ms + to_pickup).max(job.pickup_time_ms);
        let delivery = pickup + flight_ms(distance_m(job.pickup, job.drop_off), self.speed_mps);
        (pickup, delivery)
    }
}

/// A delivery to schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// The delivery's key, `tenant/deliveryId`.
    pub delivery_key: String,
    /// The delivery id.
    pub delivery_id: String,
    /// Pickup location.
    pub pickup: Location,
    /// Drop-off location.
    pub drop_off: Location,
    /// Package weight, kilograms.
    pub weight_kg: f64,
    /// Package size.
    pub size: PackageSize,
    /// When the package is ready, milliseconds since the Unix epoch.
    pub pickup_time_ms: i64,
    /// When it must be delivered by, milliseconds since the Unix epoch.
    pub deadline_ms: i64,
}

/// What became of a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A drone was assigned.
    Assigned(Assignment),
    /// No capable drone is free: the request waits.
    Waiting,
    /// It was seen before (waiting or assigned): nothing changes.
    Duplicate,
    /// No drone of the region could ever carry it.
    Unassignable(String),
}

/// A region's fleet and its waiting requests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Region {
    /// The region's name.
    pub name: String,
    /// Its drones by id.
    pub drones: BTreeMap<String, Drone>,
    /// Requests waiting for a drone, oldest first. Read it freely; change it only
    /// through [`Region::set_waiting`] and the scheduling methods, which keep the index.
    pub waiting: VecDeque<Job>,
    /// The delivery keys in `waiting`, for constant-time duplicate checks.
    #[serde(skip)]
    waiting_keys: HashSet<String>,
}

impl Region {
    /// A region with `drones`.
    pub fn new(name: &str, drones: Vec<Drone>) -> Self {
        Self {
            name: name.to_owned(),
            drones: drones.into_iter().map(|d| (d.id.clone(), d)).collect(),
            waiting: VecDeque::new(),
            waiting_keys: HashSet::new(),
        }
    }

    /// Replaces the waiting queue (restoring from a changelog).
    pub fn set_waiting(&mut self, jobs: VecDeque<Job>) {
        self.waiting_keys = jobs.iter().map(|j| j.delivery_key.clone()).collect();
        self.waiting = jobs;
    }

    /// Whether the delivery is waiting or being flown here.
    pub fn knows(&self, delivery_key: &str) -> bool {
        self.waiting_keys.contains(delivery_key)
            || self
                .drones
                .values()
                .any(|d| d.busy_with.as_deref() == Some(delivery_key))
    }

    /// The best free drone for `job`: it can carry it; then the earliest delivery among
    /// those that make the deadline, else the earliest delivery; ties by id.
    pub fn best_drone(&self, job: &Job, now_ms: i64) -> Option<&Drone> {
        self.drones
            .values()
            .filter(|d| d.busy_with.is_none() && d.can_carry(job))
            .min_by_key(|d| {
                let (_, delivery) = d.etas(job, now_ms);
                (delivery > job.deadline_ms, delivery)
            })
    }

    /// Schedules a new request.
    pub fn request(&mut self, job: Job, now_ms: i64) -> Decision {
        if self.knows(&job.delivery_key) {
            return Decision::Duplicate;
        }
        if !self.drones.values().any(|d| d.can_carry(&job)) {
            return Decision::Unassignable(format!(
                "no drone of region {} carries {} kg / {}",
                self.name,
                job.weight_kg,
                job.size.as_str()
            ));
        }
        match self.assign(&job, now_ms) {
            Some(assignment) => Decision::Assigned(assignment),
            None => {
                self.waiting_keys.insert(job.delivery_key.clone());
                self.waiting.push_back(job);
                Decision::Waiting
            }
        }
    }

    fn assign(&mut self, job: &Job, now_ms: i64) -> Option<Assignment> {
        let id = self.best_drone(job, now_ms)?.id.clone();
        let drone = self.drones.get_mut(&id)?;
        let (pickup_eta, delivery_eta) = drone.etas(job, now_ms);
        drone.busy_with = Some(job.delivery_key.clone());
        Some(Assignment {
            drone_id: drone.id.clone(),
            region: self.name.clone(),
            delivery_key: job.delivery_key.clone(),
            delivery_id: job.delivery_id.clone(),
            from: drone.position,
            pickup: job.pickup,
            drop_off: job.drop_off,
            speed_mps: drone.speed_mps,
            assigned_at: now_ms,
            pickup_eta,
            delivery_eta,
        })
    }

    /// A drone is free again at `position`: it takes the oldest waiting requests it (or
    /// any other free drone) can carry. A release for another delivery than the drone's
    /// own is a stale duplicate and changes nothing.
    pub fn release(
        &mut self,
        drone_id: &str,
        delivery_key: &str,
        position: Location,
        now_ms: i64,
    ) -> Vec<Assignment> {
        match self.drones.get_mut(drone_id) {
            Some(drone) if drone.busy_with.as_deref() == Some(delivery_key) => {
                drone.busy_with = None;
                drone.position = position;
            }
            _ => return Vec::new(),
        }
        // Oldest first, each to the best free drone that can carry it; the scan stops
        // as soon as no drone is free.
        let mut assigned = Vec::new();
        let mut still_waiting = VecDeque::with_capacity(self.waiting.len());
        while let Some(job) = self.waiting.pop_front() {
            if !self.drones.values().any(|d| d.busy_with.is_none()) {
                still_waiting.push_back(job);
                still_waiting.append(&mut self.waiting);
                break;
            }
            match self.assign(&job, now_ms) {
                Some(assignment) => {
                    self.waiting_keys.remove(&assignment.delivery_key);
                    assigned.push(assignment);
                }
                None => still_waiting.push_back(job),
            }
        }
        self.waiting = still_waiting;
        assigned
    }

    /// Drops a waiting request (cancelled). A request already assigned is left alone:
    /// its drone is released by the delivery consumer.
    pub fn cancel(&mut self, delivery_key: &str) -> bool {
        if !self.waiting_keys.remove(delivery_key) {
            return false;
        }
        self.waiting.retain(|j| j.delivery_key != delivery_key);
        true
    }
}

/// The default fleet of a region (`lat:lon`, its one-degree cell): eight drones based at
/// the cell's centre, from small fast ones to a heavy lifter.
pub fn default_fleet(region: &str) -> Vec<Drone> {
    let (lat, lon) = region
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<f64>().ok()?, b.parse::<f64>().ok()?)))
        .unwrap_or((0.0, 0.0));
    let home = Location {
        latitude: (lat + 0.5).clamp(-90.0, 90.0),
        longitude: (lon + 0.5).clamp(-180.0, 180.0),
    };
    let kinds: [(&str, f64, PackageSize, f64); 8] = [
        ("s1", 2.0, PackageSize::Small, 20.0),
        ("s2", 2.0, PackageSize::Small, 20.0),
        ("s3", 2.0, PackageSize::Small, 20.0),
        ("m1", 10.0, PackageSize::Medium, 16.0),
        ("m2", 10.0, PackageSize::Medium, 16.0),
        ("m3", 10.0, PackageSize::Medium, 16.0),
        ("l1", 25.0, PackageSize::Large, 12.0),
        ("l2", 25.0, PackageSize::Large, 12.0),
    ];
    kinds
        .iter()
        .map(|(suffix, weight, size, speed)| Drone {
            id: format!("{region}-{suffix}"),
            home,
            position: home,
            max_weight_kg: *weight,
            max_size: *size,
            speed_mps: *speed,
            busy_with: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000_000;

    fn loc(latitude: f64, longitude: f64) -> Location {
        Location {
            latitude,
            longitude,
        }
    }

    fn job(key: &str, weight_kg: f64, size: PackageSize) -> Job {
        Job {
            delivery_key: key.into(),
            delivery_id: key.into(),
            pickup: loc(47.51, -122.49),
            drop_off: loc(47.55, -122.45),
            weight_kg,
            size,
            pickup_time_ms: NOW,
            deadline_ms: NOW + 3_600_000,
        }
    }

    #[test]
    fn the_nearest_capable_drone_takes_the_job_then_others_wait_for_a_release() {
        let mut region = Region::new("47:-123", default_fleet("47:-123"));
        let Decision::Assigned(a) = region.request(job("t/a", 1.0, PackageSize::Small), NOW) else {
            panic!("assigned");
        };
        assert!(
            a.drone_id.ends_with("-s1"),
            "fastest small drone: {}",
            a.drone_id
        );
        assert!(a.pickup_eta >= NOW && a.delivery_eta > a.pickup_eta);
        assert_eq!(
            region.request(job("t/a", 1.0, PackageSize::Small), NOW),
            Decision::Duplicate
        );
        // Two large drones: the third large job waits.
        for key in ["t/l1", "t/l2"] {
            assert!(matches!(
                region.request(job(key, 20.0, PackageSize::Large), NOW),
                Decision::Assigned(_)
            ));
        }
        assert_eq!(
            region.request(job("t/l3", 20.0, PackageSize::Large), NOW),
            Decision::Waiting
        );
        assert!(matches!(
            region.request(job("t/huge", 500.0, PackageSize::Large), NOW),
            Decision::Unassignable(_)
        ));
        // A stale release changes nothing; the right one hands the drone to the waiter.
        let drop = loc(47.55, -122.45);
        assert!(
            region
                .release("47:-123-l1", "t/other", drop, NOW)
                .is_empty()
        );
        let next = region.release("47:-123-l1", "t/l1", drop, NOW + 1000);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].delivery_key, "t/l3");
        assert_eq!(next[0].from, drop);
        assert!(region.waiting.is_empty());
    }

    #[test]
    fn a_cancelled_waiting_job_is_never_assigned() {
        let mut region = Region::new("r", default_fleet("47:-123"));
        for key in ["t/1", "t/2", "t/3"] {
            region.request(job(key, 20.0, PackageSize::Large), NOW);
        }
        assert!(region.cancel("t/3"));
        assert!(!region.cancel("t/3"));
        let drone = region
            .drones
            .values()
            .find(|d| d.busy_with.as_deref() == Some("t/1"));
        let id = drone.unwrap().id.clone();
        assert!(
            region
                .release(&id, "t/1", loc(47.5, -122.5), NOW)
                .is_empty()
        );
    }

    fn arb_size() -> impl Strategy<Value = PackageSize> {
        prop_oneof![
            Just(PackageSize::Small),
            Just(PackageSize::Medium),
            Just(PackageSize::Large)
        ]
    }

    proptest! {
        /// Whatever arrives, an assignment never exceeds its drone's payload, and a drone
        /// never flies two deliveries at once.
        #[test]
        fn assignments_respect_payload_and_never_overlap(
            ops in proptest::collection::vec((0.1f64..30.0, arb_size(), any::<bool>()), 1..80),
        ) {
            let mut region = Region::new("47:-123", default_fleet("47:-123"));
            let mut flying: BTreeMap<String, String> = BTreeMap::new();
            let mut now = NOW;
            let check = |a: &Assignment, region: &Region, flying: &mut BTreeMap<String, String>, j: &Job| -> Result<(), TestCaseError> {
                let drone = &region.drones[&a.drone_id];
                prop_assert!(j.weight_kg <= drone.max_weight_kg);
                prop_assert!(j.size <= drone.max_size);
                prop_assert!(flying.insert(a.drone_id.clone(), a.delivery_key.clone()).is_none(), "overlap");
                Ok(())
            };
            let mut jobs = BTreeMap::new();
            for (i, (weight, size, release)) in ops.into_iter().enumerate() {
                now += 1000;
                if release && let Some((drone, key)) = flying.iter().next().map(|(d, k)| (d.clone(), k.clone())) {
                    flying.remove(&drone);
                    for a in region.release(&drone, &key, loc(47.5, -122.5), now) {
                        let j = jobs.get(&a.delivery_key).cloned().unwrap();
                        check(&a, &region, &mut flying, &j)?;
                    }
                    continue;
                }
                let j = job(&format!("t/{i}"), weight, size);
                jobs.insert(j.delivery_key.clone(), j.clone());
                if let Decision::Assigned(a) = region.request(j.clone(), now) {
                    check(&a, &region, &mut flying, &j)?;
                }
                // Nothing waits while a free drone could carry it, and the index holds.
                for w in &region.waiting {
                    prop_assert!(region.best_drone(w, now).is_none(), "{} waits needlessly", w.delivery_key);
                    prop_assert!(region.knows(&w.delivery_key));
                }
                prop_assert_eq!(region.waiting_keys.len(), region.waiting.len());
            }
        }

        /// A farther pickup never gives an earlier ETA.
        #[test]
        fn etas_are_monotone_in_distance(
            d1 in 0.0f64..0.5,
            d2 in 0.0f64..0.5,
            speed in 1.0f64..50.0,
        ) {
            let drone = Drone {
                id: "d".into(),
                home: loc(47.0, -122.0),
                position: loc(47.0, -122.0),
                max_weight_kg: 10.0,
                max_size: PackageSize::Large,
                speed_mps: speed,
                busy_with: None,
            };
            let mut near = job("t/n", 1.0, PackageSize::Small);
            near.pickup_time_ms = 0;
            near.pickup = loc(47.0 + d1.min(d2), -122.0);
            near.drop_off = near.pickup;
            let mut far = near.clone();
            far.pickup = loc(47.0 + d1.max(d2), -122.0);
            far.drop_off = far.pickup;
            let (p_near, _) = drone.etas(&near, NOW);
            let (p_far, _) = drone.etas(&far, NOW);
            prop_assert!(p_near <= p_far);
        }
    }
}
