//! Drone scheduling: which drone takes which delivery, and when it gets there. Pure: no
//! I/O, the time is an argument.
//!
//! Each region owns a fleet. A request goes to the free drone that can carry it (weight
//! and size) and delivers it earliest, preferring drones that make the deadline; when no
//! drone is free the request waits, first come first served, and is assigned when a
//! drone is released. A request no drone of the region could ever carry is refused.
//!
//! The waiting queue is bounded ([`QueueLimits`]): a request arriving at a full queue is
//! refused, and one still waiting at its deadline (or after the longest wait) expires.
//! Cancels, expiries and releases cost O(log n) in the waiting requests: the queue is
//! indexed by delivery key, by expiry and, for each kind of drone of the region (its
//! payload and size), by the requests it can carry. Nothing waits while a free drone
//! could carry it, so a released drone takes the oldest request that it can carry, and
//! no other drone takes anything.
//!
//! It must not know topics, records or the changelog: the scheduling consumer (the
//! parent module) turns records into calls here and decisions into outputs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use schemas::delivery::Location;
use schemas::tracking::CancelReason;
use schemas::{PackageSize, tracking::Assignment};
use serde::{Deserialize, Serialize};

use crate::clock::millis;
use crate::geo::{distance_m, flight_ms};

/// Requests waiting per region, by default.
pub const MAX_WAITING: usize = 1_000;
/// The longest wait for a drone, by default.
pub const MAX_WAITING_TIME: Duration = Duration::from_secs(3_600);

/// The bounds of a region's waiting queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most requests waiting; one more is refused ([`Decision::QueueFull`]).
    pub max_waiting: usize,
    /// Longest wait, from arrival (event time); a request also never waits past its
    /// deadline, unless that had passed when it arrived.
    pub max_waiting_time: Duration,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_waiting: MAX_WAITING,
            max_waiting_time: MAX_WAITING_TIME,
        }
    }
}

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

    /// Its kind: what it can carry.
    fn class(&self) -> Class {
        (self.max_weight_kg.to_bits(), self.max_size)
    }

    /// How long it takes to fly home from where it is.
    pub fn time_home_ms(&self) -> i64 {
        flight_ms(distance_m(self.position, self.home), self.speed_mps)
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

/// A delivery to schedule: the request's fields the scheduler needs, as the workflow
/// sends them.
pub type Job = schemas::tracking::SchedulingRequest;

/// What a drone can carry: its payload (as the bits of a positive `f64`, which order like
/// the numbers) and its largest size.
type Class = (u64, PackageSize);

fn carries(class: Class, job: &Job) -> bool {
    job.weight_kg <= f64::from_bits(class.0) && job.size <= class.1
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
    /// No drone is free and the waiting queue is full: refused.
    QueueFull(String),
}

/// A waiting request.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// Its place in the queue (smaller is older).
    pub seq: i64,
    /// The request.
    pub job: Job,
    /// When it arrived (event time), milliseconds since the Unix epoch.
    pub arrived_ms: i64,
    /// When it gives up if no drone took it.
    pub expires_ms: i64,
    /// Why, then.
    pub expiry: CancelReason,
}

/// The waiting requests and their indexes.
#[derive(Debug, Clone, Default, PartialEq)]
struct Queue {
    next_seq: i64,
    jobs: BTreeMap<i64, Queued>,
    by_key: HashMap<String, i64>,
    by_expiry: BTreeSet<(i64, i64)>,
    /// For each kind of drone of the region, the requests it can carry.
    by_class: BTreeMap<Class, BTreeSet<i64>>,
}

impl Queue {
    fn with_classes(classes: impl IntoIterator<Item = Class>) -> Self {
        Self {
            by_class: classes.into_iter().map(|c| (c, BTreeSet::new())).collect(),
            ..Self::default()
        }
    }

    fn len(&self) -> usize {
        self.jobs.len()
    }

    fn push(&mut self, queued: Queued) {
        let seq = queued.seq;
        self.next_seq = self.next_seq.max(seq + 1);
        self.by_key.insert(queued.job.delivery_key.clone(), seq);
        self.by_expiry.insert((queued.expires_ms, seq));
        for (class, set) in &mut self.by_class {
            if carries(*class, &queued.job) {
                set.insert(seq);
            }
        }
        self.jobs.insert(seq, queued);
    }

    fn remove(&mut self, seq: i64) -> Option<Queued> {
        let queued = self.jobs.remove(&seq)?;
        self.by_key.remove(&queued.job.delivery_key);
        self.by_expiry.remove(&(queued.expires_ms, seq));
        for (class, set) in &mut self.by_class {
            if carries(*class, &queued.job) {
                set.remove(&seq);
            }
        }
        Some(queued)
    }

    /// The oldest request a drone of `class` can carry.
    fn oldest_for(&self, class: Class) -> Option<i64> {
        match self.by_class.get(&class) {
            Some(set) => set.first().copied(),
            // A kind of drone the index does not know (drones changed under it): look.
            None => self
                .jobs
                .iter()
                .find(|(_, q)| carries(class, &q.job))
                .map(|(seq, _)| *seq),
        }
    }
}

/// When a request arriving at `arrived_ms` gives up, and why.
pub fn expiry_of(job: &Job, arrived_ms: i64, limits: &QueueLimits) -> (i64, CancelReason) {
    let bound = arrived_ms.saturating_add(millis(limits.max_waiting_time));
    if job.deadline_ms > arrived_ms && job.deadline_ms <= bound {
        (job.deadline_ms, CancelReason::DeadlinePassed)
    } else {
        (bound, CancelReason::WaitedTooLong)
    }
}

/// A region's fleet and its waiting requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Region {
    /// The region's name.
    pub name: String,
    /// Its drones by id. Read it freely; the waiting queue's index follows the kinds of
    /// drones the region was made with.
    pub drones: BTreeMap<String, Drone>,
    limits: QueueLimits,
    queue: Queue,
}

impl Region {
    /// A region with `drones` and the default [`QueueLimits`].
    pub fn new(name: &str, drones: Vec<Drone>) -> Self {
        let drones: BTreeMap<String, Drone> =
            drones.into_iter().map(|d| (d.id.clone(), d)).collect();
        Self {
            name: name.to_owned(),
            queue: Queue::with_classes(drones.values().map(Drone::class)),
            drones,
            limits: QueueLimits::default(),
        }
    }

    /// The same with `limits`.
    pub fn with_limits(mut self, limits: QueueLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Puts waiting requests back (restoring from a changelog): `(seq, job, arrived_ms)`
    /// in any order; the expiries follow the current limits.
    pub fn restore_waiting(&mut self, list: impl IntoIterator<Item = (i64, Job, i64)>) {
        self.queue = Queue::with_classes(self.drones.values().map(Drone::class));
        for (seq, job, arrived_ms) in list {
            let (expires_ms, expiry) = expiry_of(&job, arrived_ms, &self.limits);
            self.queue.push(Queued {
                seq,
                job,
                arrived_ms,
                expires_ms,
                expiry,
            });
        }
    }

    /// How many requests wait.
    pub fn waiting_len(&self) -> usize {
        self.queue.len()
    }

    /// The waiting requests, oldest first.
    pub fn waiting(&self) -> impl Iterator<Item = &Queued> {
        self.queue.jobs.values()
    }

    /// The waiting request of a delivery, if it waits.
    pub fn queued(&self, delivery_key: &str) -> Option<&Queued> {
        self.queue
            .by_key
            .get(delivery_key)
            .and_then(|seq| self.queue.jobs.get(seq))
    }

    /// Whether no drone is busy and nothing waits.
    pub fn is_idle(&self) -> bool {
        self.queue.len() == 0 && self.drones.values().all(|d| d.busy_with.is_none())
    }

    /// Whether the delivery is waiting or being flown here.
    pub fn knows(&self, delivery_key: &str) -> bool {
        self.queue.by_key.contains_key(delivery_key)
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

    /// Schedules a new request that arrived at `now_ms`.
    pub fn request(&mut self, job: Job, now_ms: i64) -> Decision {
        self.request_at(job, now_ms, now_ms)
    }

    /// Schedules a new request at processing time `now_ms` (for the ETAs) that arrived
    /// at event time `arrived_ms` (for its expiry).
    pub fn request_at(&mut self, job: Job, now_ms: i64, arrived_ms: i64) -> Decision {
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
        if let Some(assignment) = self.assign(&job, now_ms) {
            return Decision::Assigned(assignment);
        }
        if self.queue.len() >= self.limits.max_waiting {
            return Decision::QueueFull(format!(
                "region {} already has {} requests waiting for a drone",
                self.name,
                self.queue.len()
            ));
        }
        let (expires_ms, expiry) = expiry_of(&job, arrived_ms, &self.limits);
        let seq = self.queue.next_seq;
        self.queue.push(Queued {
            seq,
            job,
            arrived_ms,
            expires_ms,
            expiry,
        });
        Decision::Waiting
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

    /// A drone is free again at `position`: it takes the oldest waiting request it can
    /// carry (no other free drone can carry any, so nothing else changes). A release for
    /// another delivery than the drone's own is a stale duplicate and changes nothing.
    /// O(log n) in the waiting requests.
    pub fn release(
        &mut self,
        drone_id: &str,
        delivery_key: &str,
        position: Location,
        now_ms: i64,
    ) -> Vec<Assignment> {
        let class = match self.drones.get_mut(drone_id) {
            Some(drone) if drone.busy_with.as_deref() == Some(delivery_key) => {
                drone.busy_with = None;
                drone.position = position;
                drone.class()
            }
            _ => return Vec::new(),
        };
        let Some(seq) = self.queue.oldest_for(class) else {
            return Vec::new();
        };
        let Some(queued) = self.queue.remove(seq) else {
            return Vec::new();
        };
        match self.assign(&queued.job, now_ms) {
            Some(assignment) => vec![assignment],
            None => {
                self.queue.push(queued);
                Vec::new()
            }
        }
    }

    /// Assigns every waiting request some free drone can carry, oldest first, each to its
    /// best free drone: after a restore whose drones changed (a new fleet file), when the
    /// queue may hold requests a free drone can carry. O(n) in the waiting requests.
    pub fn settle(&mut self, now_ms: i64) -> Vec<Assignment> {
        let mut assigned = Vec::new();
        let seqs: Vec<i64> = self.queue.jobs.keys().copied().collect();
        for seq in seqs {
            if self.drones.values().all(|d| d.busy_with.is_some()) {
                break;
            }
            let Some(job) = self.queue.jobs.get(&seq).map(|q| q.job.clone()) else {
                continue;
            };
            if let Some(a) = self.assign(&job, now_ms) {
                self.queue.remove(seq);
                assigned.push(a);
            }
        }
        assigned
    }

    /// Drops a waiting request (cancelled). A request already assigned is left alone:
    /// its drone is released by the delivery consumer. O(log n).
    pub fn cancel(&mut self, delivery_key: &str) -> bool {
        match self.queue.by_key.get(delivery_key).copied() {
            Some(seq) => self.queue.remove(seq).is_some(),
            None => false,
        }
    }

    /// Gives a waiting request new times (rescheduled by its tenant): its place stays,
    /// its expiry follows the new deadline. A request not waiting (assigned, or unknown)
    /// is left alone. O(log n).
    pub fn reschedule(
        &mut self,
        delivery_key: &str,
        pickup_time_ms: i64,
        deadline_ms: i64,
    ) -> bool {
        let Some(seq) = self.queue.by_key.get(delivery_key).copied() else {
            return false;
        };
        let Some(mut queued) = self.queue.remove(seq) else {
            return false;
        };
        queued.job.pickup_time_ms = pickup_time_ms;
        queued.job.deadline_ms = deadline_ms;
        (queued.expires_ms, queued.expiry) =
            expiry_of(&queued.job, queued.arrived_ms, &self.limits);
        self.queue.push(queued);
        true
    }

    /// Drops the waiting requests that expire at or before `stream_ms`, soonest first,
    /// and returns them. O(log n) each.
    pub fn expire(&mut self, stream_ms: i64) -> Vec<Queued> {
        let mut gone = Vec::new();
        while let Some(&(at, seq)) = self.queue.by_expiry.first() {
            if at > stream_ms {
                break;
            }
            match self.queue.remove(seq) {
                Some(queued) => gone.push(queued),
                None => {
                    self.queue.by_expiry.remove(&(at, seq));
                }
            }
        }
        gone
    }

    /// The earliest expiry of a waiting request.
    pub fn next_expiry(&self) -> Option<i64> {
        self.queue.by_expiry.first().map(|(at, _)| *at)
    }

    /// How long, once idle, until every drone could be back home.
    pub fn time_home_ms(&self) -> i64 {
        self.drones
            .values()
            .map(Drone::time_home_ms)
            .max()
            .unwrap_or(0)
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
        assert_eq!(region.waiting_len(), 0);
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

    #[test]
    fn a_full_queue_refuses_and_waiting_requests_expire_at_their_deadline_or_the_bound() {
        let limits = QueueLimits {
            max_waiting: 2,
            max_waiting_time: Duration::from_secs(600),
        };
        let mut region = Region::new("47:-123", default_fleet("47:-123")).with_limits(limits);
        for key in ["t/l1", "t/l2"] {
            assert!(matches!(
                region.request(job(key, 20.0, PackageSize::Large), NOW),
                Decision::Assigned(_)
            ));
        }
        // Due in 5 minutes: waits until then. Due in 2 hours: waits the bound (10 min).
        let mut soon = job("t/soon", 20.0, PackageSize::Large);
        soon.deadline_ms = NOW + 300_000;
        let mut late = job("t/late", 20.0, PackageSize::Large);
        late.deadline_ms = NOW + 7_200_000;
        assert_eq!(region.request_at(soon, NOW, NOW), Decision::Waiting);
        assert_eq!(region.request_at(late, NOW, NOW), Decision::Waiting);
        assert!(matches!(
            region.request(job("t/full", 20.0, PackageSize::Large), NOW),
            Decision::QueueFull(_)
        ));
        // A small job is not refused: a free drone takes it.
        assert!(matches!(
            region.request(job("t/small", 1.0, PackageSize::Small), NOW),
            Decision::Assigned(_)
        ));
        assert_eq!(region.next_expiry(), Some(NOW + 300_000));
        assert!(region.expire(NOW + 299_999).is_empty());
        let gone = region.expire(NOW + 300_000);
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].job.delivery_key.as_str(), gone[0].expiry),
            ("t/soon", CancelReason::DeadlinePassed)
        );
        let gone = region.expire(NOW + 600_000);
        assert_eq!(
            (gone[0].job.delivery_key.as_str(), gone[0].expiry),
            ("t/late", CancelReason::WaitedTooLong)
        );
        assert_eq!(region.waiting_len(), 0);
        // A rescheduled request keeps its place and follows its new deadline.
        let mut w1 = job("t/w1", 20.0, PackageSize::Large);
        w1.deadline_ms = NOW + 100_000;
        assert_eq!(region.request(w1, NOW), Decision::Waiting);
        assert!(region.reschedule("t/w1", NOW, NOW + 200_000));
        assert!(
            !region.reschedule("t/l1", NOW, NOW + 200_000),
            "assigned: left alone"
        );
        assert!(region.expire(NOW + 100_000).is_empty());
        assert_eq!(
            region.queued("t/w1").unwrap().job.deadline_ms,
            NOW + 200_000
        );
        assert_eq!(region.expire(NOW + 200_000).len(), 1);
        // A deadline already past on arrival: served within the bound all the same.
        let mut missed = job("t/missed", 20.0, PackageSize::Large);
        missed.deadline_ms = NOW - 1;
        assert_eq!(
            expiry_of(&missed, NOW, &limits),
            (NOW + 600_000, CancelReason::WaitedTooLong)
        );
    }

    #[test]
    fn a_release_takes_the_oldest_request_the_drone_can_carry() {
        let mut region = Region::new("47:-123", default_fleet("47:-123"));
        let mut assigned = BTreeMap::new();
        // Every drone busy: 3 small, 3 medium, 2 large.
        for i in 0..8 {
            let (w, size) = [
                (1.0, PackageSize::Small),
                (5.0, PackageSize::Medium),
                (20.0, PackageSize::Large),
            ][i % 3];
            let j = job(&format!("t/busy{i}"), w, size);
            if let Decision::Assigned(a) = region.request(j, NOW) {
                assigned.insert(a.delivery_key.clone(), a.drone_id.clone());
            }
        }
        assert!(
            region.drones.values().all(|d| d.busy_with.is_some()),
            "{assigned:?}"
        );
        // Waiting, oldest first: a large, a small, a medium.
        for (key, w, size) in [
            ("t/w-large", 20.0, PackageSize::Large),
            ("t/w-small", 1.0, PackageSize::Small),
            ("t/w-medium", 5.0, PackageSize::Medium),
        ] {
            assert_eq!(region.request(job(key, w, size), NOW), Decision::Waiting);
        }
        // A small drone comes back: it takes the small one, not the older large one.
        let (key, small) = assigned.iter().find(|(_, d)| d.ends_with("-s1")).unwrap();
        let next = region.release(small, key, loc(47.5, -122.5), NOW);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].delivery_key, "t/w-small");
        // A medium drone: the medium one. A large drone: the large one.
        let (key, medium) = assigned.iter().find(|(_, d)| d.ends_with("-m1")).unwrap();
        assert_eq!(
            region.release(medium, key, loc(47.5, -122.5), NOW)[0].delivery_key,
            "t/w-medium"
        );
        let (key, large) = assigned.iter().find(|(_, d)| d.ends_with("-l1")).unwrap();
        assert_eq!(
            region.release(large, key, loc(47.5, -122.5), NOW)[0].delivery_key,
            "t/w-large"
        );
        assert_eq!(region.waiting_len(), 0);
        assert!(!region.is_idle());
    }

    #[test]
    fn settle_assigns_what_drones_added_since_can_carry() {
        let mut region = Region::new("r", default_fleet("47:-123")[6..].to_vec());
        for key in ["t/1", "t/2", "t/3"] {
            region.request(job(key, 20.0, PackageSize::Large), NOW);
        }
        assert_eq!(region.waiting_len(), 1);
        // Restored with a fleet that grew: a new large drone is free while t/3 waits.
        let mut grown = Region::new("r", default_fleet("47:-123")[5..].to_vec());
        for d in region.drones.values() {
            grown.drones.insert(d.id.clone(), d.clone());
        }
        grown.restore_waiting(
            region
                .waiting()
                .map(|q| (q.seq, q.job.clone(), q.arrived_ms))
                .collect::<Vec<_>>(),
        );
        assert!(
            grown.settle(NOW).is_empty(),
            "a medium drone cannot carry it"
        );
        grown.drones.insert(
            "extra".into(),
            Drone {
                id: "extra".into(),
                ..default_fleet("47:-123")[7].clone()
            },
        );
        let settled = grown.settle(NOW);
        assert_eq!(settled.len(), 1);
        assert_eq!(
            (
                settled[0].drone_id.as_str(),
                settled[0].delivery_key.as_str()
            ),
            ("extra", "t/3")
        );
    }

    /// The queue as it was: a list scanned in full, for comparison.
    #[derive(Debug, Default)]
    struct Model {
        drones: BTreeMap<String, Drone>,
        waiting: Vec<(Job, i64)>,
        max_waiting: usize,
    }

    impl Model {
        fn best(&self, job: &Job, now: i64) -> Option<String> {
            self.drones
                .values()
                .filter(|d| d.busy_with.is_none() && d.can_carry(job))
                .min_by_key(|d| {
                    let (_, delivery) = d.etas(job, now);
                    (delivery > job.deadline_ms, delivery)
                })
                .map(|d| d.id.clone())
        }

        fn take(&mut self, job: &Job, now: i64) -> Option<(String, String)> {
            let id = self.best(job, now)?;
            let drone = self.drones.get_mut(&id)?;
            drone.busy_with = Some(job.delivery_key.clone());
            Some((id, job.delivery_key.clone()))
        }

        fn request(&mut self, job: Job, now: i64, expires: i64) -> &'static str {
            let known = self
                .waiting
                .iter()
                .any(|(j, _)| j.delivery_key == job.delivery_key)
                || self
                    .drones
                    .values()
                    .any(|d| d.busy_with.as_deref() == Some(&job.delivery_key));
            if known {
                return "duplicate";
            }
            if !self.drones.values().any(|d| d.can_carry(&job)) {
                return "unassignable";
            }
            if self.take(&job, now).is_some() {
                return "assigned";
            }
            if self.waiting.len() >= self.max_waiting {
                return "full";
            }
            self.waiting.push((job, expires));
            "waiting"
        }

        fn release(
            &mut self,
            drone: &str,
            key: &str,
            at: Location,
            now: i64,
        ) -> Vec<(String, String)> {
            match self.drones.get_mut(drone) {
                Some(d) if d.busy_with.as_deref() == Some(key) => {
                    d.busy_with = None;
                    d.position = at;
                }
                _ => return Vec::new(),
            }
            let mut out = Vec::new();
            let mut kept = Vec::new();
            for (job, expires) in std::mem::take(&mut self.waiting) {
                match self.take(&job, now) {
                    Some(a) => out.push(a),
                    None => kept.push((job, expires)),
                }
            }
            self.waiting = kept;
            out
        }
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
                for w in region.waiting() {
                    prop_assert!(region.best_drone(&w.job, now).is_none(), "{} waits needlessly", w.job.delivery_key);
                    prop_assert!(region.knows(&w.job.delivery_key));
                }
                prop_assert_eq!(region.queue.by_key.len(), region.waiting_len());
            }
        }

        /// The indexed queue decides exactly as a list scanned in full would: the same
        /// assignments, refusals, expiries and order of waiting requests.
        #[test]
        fn the_indexed_queue_matches_a_scanned_list(
            ops in proptest::collection::vec((0u8..4, 0.1f64..30.0, arb_size(), 0usize..8), 1..120),
            max_waiting in 0usize..6,
        ) {
            let limits = QueueLimits { max_waiting, max_waiting_time: Duration::from_secs(600) };
            let mut region = Region::new("47:-123", default_fleet("47:-123")).with_limits(limits);
            let mut model = Model { drones: region.drones.clone(), max_waiting, ..Model::default() };
            let mut now = NOW;
            for (i, (op, weight, size, pick)) in ops.into_iter().enumerate() {
                now += 7_000;
                match op {
                    0 | 1 => {
                        let mut j = job(&format!("t/{i}"), weight, size);
                        j.deadline_ms = now + 60_000 * (pick as i64);
                        let (expires, _) = expiry_of(&j, now, &limits);
                        let got = match region.request(j.clone(), now) {
                            Decision::Assigned(_) => "assigned",
                            Decision::Waiting => "waiting",
                            Decision::Duplicate => "duplicate",
                            Decision::Unassignable(_) => "unassignable",
                            Decision::QueueFull(_) => "full",
                        };
                        prop_assert_eq!(got, model.request(j, now, expires));
                    }
                    2 => {
                        let busy: Vec<(String, String)> = model.drones.values()
                            .filter_map(|d| Some((d.id.clone(), d.busy_with.clone()?)))
                            .collect();
                        if let Some((drone, key)) = busy.get(pick % busy.len().max(1)).cloned() {
                            let at = loc(47.5 + weight / 100.0, -122.5);
                            let got: Vec<(String, String)> = region.release(&drone, &key, at, now)
                                .into_iter().map(|a| (a.drone_id, a.delivery_key)).collect();
                            prop_assert_eq!(got, model.release(&drone, &key, at, now));
                        }
                    }
                    _ => {
                        if pick % 2 == 0 {
                            if let Some((j, _)) = model.waiting.get(pick % model.waiting.len().max(1)).cloned() {
                                prop_assert!(region.cancel(&j.delivery_key));
                                model.waiting.retain(|(w, _)| w.delivery_key != j.delivery_key);
                            }
                        } else {
                            let mut got: Vec<String> = region.expire(now).into_iter().map(|q| q.job.delivery_key).collect();
                            let mut expected: Vec<String> = model.waiting.iter().filter(|(_, e)| *e <= now).map(|(j, _)| j.delivery_key.clone()).collect();
                            model.waiting.retain(|(_, e)| *e > now);
                            got.sort();
                            expected.sort();
                            prop_assert_eq!(got, expected);
                        }
                    }
                }
                let waiting: Vec<&str> = region.waiting().map(|q| q.job.delivery_key.as_str()).collect();
                let expected: Vec<&str> = model.waiting.iter().map(|(j, _)| j.delivery_key.as_str()).collect();
                prop_assert_eq!(waiting, expected);
                prop_assert_eq!(&region.drones, &model.drones);
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
