//! The scheduling consumer: owns the fleets of the regions whose `drone-scheduling`
//! partitions it is assigned, assigns drones (the pure decisions are in [`region`]) and
//! emits `drone-assignments` keyed by drone id.
//!
//! Inputs on `drone-scheduling`, keyed by region: requests (from the workflow, in the
//! compact binary `SchedulingRequest` form), drones released (from the delivery
//! consumer, when a delivery completes or is cancelled), cancels and reschedules of
//! requests that may still be waiting. State in `scheduling-state`: one entry per drone
//! that differs from its fleet's (busy, or away from home) and one per waiting request; a
//! region is its fleet's drones with those entries on top.
//!
//! Bounded state, on each partition's stream time ([`crate::clock`]): a request refused
//! by a full queue, or still waiting at its deadline or after the waiting bound, is sent
//! back to its delivery as `DeliveryRejected` (with a [`CancelReason`]) on `deliveries`,
//! where the delivery consumer cancels it. A region with no busy drone and nothing
//! waiting is evicted once its drones could all have flown home (the longest flight
//! home from where they are): its entries are deleted with tombstones, and the next
//! record for it rebuilds it from the fleet, drones at home, as a restore would.
//!
//! This module is the stateful [`Machine`]: records in, outputs and changelog entries
//! out. It must not decide which drone takes a job (that is [`region`]'s) nor produce
//! or consume itself (that is the [engine](crate::stateful)'s).

pub mod region;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use schemas::headers as h;
use schemas::topics;
use schemas::tracking::{
    Assignment, CancelReason, DroneReleased, SchedulingCancelled, SchedulingRejected,
    SchedulingRescheduled,
};
use serde::{Deserialize, Serialize};

use crate::clock::{StreamClock, event_ms, event_time_header};
use crate::error::{ProcessorError, Result};
use crate::output::Output;
use crate::stateful::{Effects, Machine, Record, Spec};
use region::{Decision, Drone, Job, QueueLimits, Region, default_fleet};

/// What the scheduling consumer reads and writes.
pub const SPEC: Spec = Spec {
    name: "scheduling",
    group: topics::groups::SCHEDULING,
    inputs: &[topics::DRONE_SCHEDULING.name],
    changelog: topics::SCHEDULING_STATE.name,
    coalesce: true,
};

/// Where drones come from.
#[derive(Debug, Clone, Default)]
pub enum Fleet {
    /// [`default_fleet`] in every region that gets a request.
    #[default]
    Default,
    /// The drones of a fleet file, by home region; regions without drones have none.
    Configured(HashMap<String, Vec<Drone>>),
}

/// One drone of a fleet file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FleetDrone {
    id: String,
    home: schemas::delivery::Location,
    max_weight_kg: f64,
    max_size: schemas::PackageSize,
    speed_mps: f64,
}

impl Fleet {
    /// Reads a fleet file: a JSON array of `{"id", "home", "maxWeightKg", "maxSize",
    /// "speedMps"}`; each drone belongs to the region of its home.
    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| ProcessorError::Config {
            reason: format!("fleet file {}: {reason}", path.display()),
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.len() > 16 * 1024 * 1024 {
            return Err(err("larger than 16 MiB".into()));
        }
        let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    /// Parses the text of a fleet file.
    pub fn parse(json: &[u8]) -> std::result::Result<Self, String> {
        let drones: Vec<FleetDrone> = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let mut regions: HashMap<String, Vec<Drone>> = HashMap::new();
        let mut ids = std::collections::HashSet::new();
        for d in drones {
            schemas::delivery::check_id(&d.id, "id").map_err(|e| e.to_string())?;
            if !ids.insert(d.id.clone()) {
                return Err(format!("drone {} is listed twice", d.id));
            }
            if !(d.max_weight_kg > 0.0 && d.speed_mps > 0.0 && d.speed_mps.is_finite()) {
                return Err(format!(
                    "drone {}: maxWeightKg and speedMps must be positive",
                    d.id
                ));
            }
            let region = schemas::delivery::region_of(d.home);
            regions.entry(region).or_default().push(Drone {
                id: d.id,
                home: d.home,
                position: d.home,
                max_weight_kg: d.max_weight_kg,
                max_size: d.max_size,
                speed_mps: d.speed_mps,
                busy_with: None,
            });
        }
        Ok(Self::Configured(regions))
    }

    fn drones(&self, region: &str) -> Vec<Drone> {
        match self {
            Self::Default => default_fleet(region),
            Self::Configured(regions) => regions.get(region).cloned().unwrap_or_default(),
        }
    }
}

/// A waiting request in the changelog: its place in the queue, the job and when it
/// arrived (event time; entries written before it was kept use the pickup time).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Waiting {
    seq: i64,
    job: Job,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    arrived_ms: Option<i64>,
}

fn drone_key(region: &str, drone: &str) -> Vec<u8> {
    format!("d\u{1}{region}\u{1}{drone}").into_bytes()
}

fn wait_key(region: &str, delivery_key: &str) -> Vec<u8> {
    format!("w\u{1}{region}\u{1}{delivery_key}").into_bytes()
}

/// A region in memory, with what the machine knows about it.
#[derive(Debug)]
struct Slot {
    region: Region,
    /// Drones with an entry in the changelog (to delete when it is evicted).
    persisted: BTreeSet<String>,
    /// Its key in [`Partition::idle`], while idle.
    evict_at: Option<i64>,
    /// Its key in [`Partition::expiries`], while something waits.
    expires_at: Option<i64>,
}

/// One partition's regions, clock and time indexes.
#[derive(Debug, Default)]
struct Partition {
    regions: HashMap<String, Slot>,
    clock: StreamClock,
    /// Idle regions by when they are evicted.
    idle: BTreeSet<(i64, String)>,
    /// Regions with waiting requests by their earliest expiry.
    expiries: BTreeSet<(i64, String)>,
    /// Restored regions not looked at since (a changed fleet may let a free drone take a
    /// waiting request; their idle and expiry keys are not set yet).
    unsettled: BTreeSet<String>,
}

impl Partition {
    /// Re-files region `name` in the time indexes after a change at stream time `at`.
    fn reindex(&mut self, name: &str, at: i64) {
        let Some(slot) = self.regions.get_mut(name) else {
            return;
        };
        let expires = slot.region.next_expiry();
        if slot.expires_at != expires {
            if let Some(old) = slot.expires_at.take() {
                self.expiries.remove(&(old, name.to_owned()));
            }
            if let Some(new) = expires {
                self.expiries.insert((new, name.to_owned()));
            }
            slot.expires_at = expires;
        }
        match (slot.region.is_idle(), slot.evict_at) {
            (true, None) => {
                let evict_at = at.saturating_add(slot.region.time_home_ms());
                self.idle.insert((evict_at, name.to_owned()));
                slot.evict_at = Some(evict_at);
            }
            (false, Some(old)) => {
                self.idle.remove(&(old, name.to_owned()));
                slot.evict_at = None;
            }
            _ => {}
        }
    }
}

/// The scheduling consumer's state: regions by partition.
#[derive(Debug, Default)]
pub struct Scheduler {
    fleet: Fleet,
    limits: QueueLimits,
    partitions: HashMap<i32, Partition>,
}

impl Scheduler {
    /// A scheduler drawing drones from `fleet`, with the default [`QueueLimits`].
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            limits: QueueLimits::default(),
            partitions: HashMap::new(),
        }
    }

    /// The same with `limits` on every region's waiting queue.
    pub fn with_limits(mut self, limits: QueueLimits) -> Self {
        self.limits = limits;
        self
    }

    fn assignment_output(a: &Assignment, event_at: i64) -> Output {
        let (tenant, _) = schemas::split_delivery_key(&a.delivery_key);
        let mut headers = vec![
            (
                h::EVENT_TYPE.to_owned(),
                h::event_type::DRONE_ASSIGNED.as_bytes().to_vec(),
            ),
            (h::DRONE_ID.to_owned(), a.drone_id.as_bytes().to_vec()),
            (h::DELIVERY_ID.to_owned(), a.delivery_id.as_bytes().to_vec()),
            event_time_header(event_at),
        ];
        if let Some(tenant) = tenant {
            headers.push((h::TENANT.to_owned(), tenant.as_bytes().to_vec()));
        }
        Output {
            topic: topics::DRONE_ASSIGNMENTS.name,
            key: a.drone_id.as_bytes().to_vec(),
            payload: serde_json::to_vec(a).unwrap_or_default(),
            headers,
        }
    }

    /// Tells the delivery consumer that the scheduler gave `job` up, and why.
    fn rejection_output(job: &Job, code: CancelReason, reason: String, event_at: i64) -> Output {
        let (tenant, _) = schemas::split_delivery_key(&job.delivery_key);
        metrics::counter!("scheduling_rejected_total", "reason" => code.as_str()).increment(1);
        Output {
            topic: topics::DELIVERIES.name,
            key: job.delivery_key.as_bytes().to_vec(),
            payload: serde_json::to_vec(&SchedulingRejected { reason, code }).unwrap_or_default(),
            headers: vec![
                (
                    h::EVENT_TYPE.to_owned(),
                    h::event_type::DELIVERY_REJECTED.as_bytes().to_vec(),
                ),
                (
                    h::TENANT.to_owned(),
                    tenant.unwrap_or_default().as_bytes().to_vec(),
                ),
                (
                    h::DELIVERY_ID.to_owned(),
                    job.delivery_id.as_bytes().to_vec(),
                ),
                event_time_header(event_at),
            ],
        }
    }

    fn new_region(&self, name: &str, drones: Vec<Drone>) -> Region {
        Region::new(name, drones).with_limits(self.limits)
    }
}

/// Writes drone `id` of `slot`'s region to the changelog.
fn put_drone(slot: &mut Slot, id: &str, effects: &mut Effects) {
    if let Some(d) = slot.region.drones.get(id) {
        effects.changes.push((
            drone_key(&slot.region.name, id),
            serde_json::to_vec(d).unwrap_or_default(),
        ));
        slot.persisted.insert(id.to_owned());
    }
}

/// The changelog and outputs of assignments taken from the waiting queue.
fn assigned_from_queue(slot: &mut Slot, assigned: Vec<Assignment>, at: i64, effects: &mut Effects) {
    for a in assigned {
        put_drone(slot, &a.drone_id, effects);
        effects
            .changes
            .push((wait_key(&slot.region.name, &a.delivery_key), Vec::new()));
        effects.outputs.push(Scheduler::assignment_output(&a, at));
        metrics::counter!("scheduling_assignments_total").increment(1);
    }
}

/// One `drone-scheduling` record, parsed.
enum Input {
    Request(Job),
    Release(DroneReleased),
    Cancel(SchedulingCancelled),
    Reschedule(SchedulingRescheduled),
}

/// Parses a record, or says why it is a dead letter.
fn parse(record: &Record) -> std::result::Result<Input, String> {
    let payload = record.payload.as_deref().unwrap_or_default();
    match record.header(h::EVENT_TYPE) {
        Some(t) if t == h::event_type::SCHEDULING_REQUESTED.as_bytes() => Job::decode(payload)
            .map(Input::Request)
            .map_err(|e| format!("invalid scheduling request: {e}")),
        // The client's request itself, as the workflow forwarded it before it sent the
        // compact form: records written before an upgrade.
        Some(t) if t == h::event_type::DELIVERY_REQUESTED.as_bytes() => {
            let request = schemas::parse_delivery_request(payload)
                .map_err(|e| format!("invalid delivery request: {e}"))?;
            let text = |name| {
                record
                    .header(name)
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(str::to_owned)
            };
            let (Some(tenant), Some(delivery_id)) = (text(h::TENANT), text(h::DELIVERY_ID)) else {
                return Err("request without dd-tenant or dd-delivery-id".into());
            };
            Ok(Input::Request(Job {
                delivery_key: schemas::delivery_key(&tenant, &delivery_id),
                delivery_id,
                pickup: request.pickup_location,
                drop_off: request.drop_off_location,
                weight_kg: request.package_info.weight,
                size: request.package_info.size,
                pickup_time_ms: request.pickup_time.timestamp_millis(),
                deadline_ms: request.deadline.timestamp_millis(),
            }))
        }
        Some(t) if t == h::event_type::DRONE_RELEASED.as_bytes() => serde_json::from_slice(payload)
            .map(Input::Release)
            .map_err(|e| format!("invalid drone release: {e}")),
        Some(t) if t == h::event_type::DELIVERY_CANCELLED.as_bytes() => {
            serde_json::from_slice(payload)
                .map(Input::Cancel)
                .map_err(|e| format!("invalid scheduling cancel: {e}"))
        }
        Some(t) if t == h::event_type::DELIVERY_RESCHEDULED.as_bytes() => {
            serde_json::from_slice(payload)
                .map(Input::Reschedule)
                .map_err(|e| format!("invalid scheduling reschedule: {e}"))
        }
        other => {
            let shown = other.map_or("none".into(), String::from_utf8_lossy);
            Err(format!("unknown event type {shown}"))
        }
    }
}

impl Machine for Scheduler {
    fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    fn restore(&mut self, partition: i32, entries: HashMap<Vec<u8>, Vec<u8>>) {
        // Per region: its drones in the changelog, and its waiting requests.
        let mut stored: HashMap<String, (Vec<Drone>, Vec<Waiting>)> = HashMap::new();
        for (key, value) in entries {
            let key = String::from_utf8_lossy(&key).into_owned();
            let mut parts = key.splitn(3, '\u{1}');
            let (Some(kind), Some(region)) = (parts.next(), parts.next()) else {
                continue;
            };
            let entry = stored.entry(region.to_owned()).or_default();
            match kind {
                "d" => {
                    if let Ok(drone) = serde_json::from_slice::<Drone>(&value) {
                        entry.0.push(drone);
                    }
                }
                "w" => {
                    if let Ok(w) = serde_json::from_slice::<Waiting>(&value) {
                        entry.1.push(w);
                    }
                }
                _ => {}
            }
        }
        let mut restored = Partition::default();
        for (name, (drones, waiting)) in stored {
            // The fleet's drones, with what the changelog says on top.
            let mut all: std::collections::BTreeMap<String, Drone> = self
                .fleet
                .drones(&name)
                .into_iter()
                .map(|d| (d.id.clone(), d))
                .collect();
            let persisted = drones.iter().map(|d| d.id.clone()).collect();
            all.extend(drones.into_iter().map(|d| (d.id.clone(), d)));
            let mut region = self.new_region(&name, all.into_values().collect());
            let list: Vec<(i64, Job, i64)> = waiting
                .into_iter()
                .map(|w| {
                    let arrived = w.arrived_ms.unwrap_or(w.job.pickup_time_ms);
                    (w.seq, w.job, arrived)
                })
                .collect();
            if let Some(latest) = list.iter().map(|(_, _, at)| *at).max() {
                restored.clock.raise(latest);
            }
            region.restore_waiting(list);
            restored.unsettled.insert(name.clone());
            restored.regions.insert(
                name,
                Slot {
                    region,
                    persisted,
                    evict_at: None,
                    expires_at: None,
                },
            );
        }
        self.partitions.insert(partition, restored);
    }

    fn handle(&mut self, record: &Record, now_ms: i64, effects: &mut Effects) {
        let region_name = record.key_text().to_owned();
        if region_name.is_empty() {
            effects
                .outputs
                .push(record.dead_letter("record has no key (region)"));
            return;
        }
        // Only a valid record may open a region.
        let input = match parse(record) {
            Ok(input) => input,
            Err(reason) => {
                effects.outputs.push(record.dead_letter(&reason));
                return;
            }
        };
        let at_event = event_ms(record);
        let (fleet, limits) = (&self.fleet, self.limits);
        let partition = self.partitions.entry(record.partition).or_default();
        partition.clock.observe(at_event);
        if partition.clock.now().is_none() {
            // A record without an event time on a partition that has none yet: its
            // processing time is the best there is.
            partition.clock.raise(now_ms);
        }
        let at = at_event.or(partition.clock.now()).unwrap_or(now_ms);
        if partition.unsettled.remove(&region_name) {
            settle(partition, &region_name, now_ms, at, effects);
        }
        let slot = partition
            .regions
            .entry(region_name.clone())
            .or_insert_with(|| Slot {
                region: Region::new(&region_name, fleet.drones(&region_name)).with_limits(limits),
                persisted: BTreeSet::new(),
                evict_at: None,
                expires_at: None,
            });
        match input {
            Input::Request(job) => match slot.region.request_at(job.clone(), now_ms, at) {
                Decision::Assigned(a) => {
                    put_drone(slot, &a.drone_id, effects);
                    effects.outputs.push(Self::assignment_output(&a, at));
                    metrics::counter!("scheduling_assignments_total").increment(1);
                }
                Decision::Waiting => {
                    if let Some(q) = slot.region.queued(&job.delivery_key) {
                        let entry = Waiting {
                            seq: q.seq,
                            job: q.job.clone(),
                            arrived_ms: Some(q.arrived_ms),
                        };
                        effects.changes.push((
                            wait_key(&region_name, &job.delivery_key),
                            serde_json::to_vec(&entry).unwrap_or_default(),
                        ));
                    }
                    metrics::counter!("scheduling_waiting_total").increment(1);
                }
                Decision::Duplicate => {}
                Decision::Unassignable(reason) => {
                    effects.outputs.push(Self::rejection_output(
                        &job,
                        CancelReason::NoCapableDrone,
                        reason,
                        at,
                    ));
                }
                Decision::QueueFull(reason) => {
                    effects.outputs.push(Self::rejection_output(
                        &job,
                        CancelReason::QueueFull,
                        reason,
                        at,
                    ));
                }
            },
            Input::Release(released) => {
                let assigned = slot.region.release(
                    &released.drone_id,
                    &released.delivery_key,
                    released.position,
                    now_ms,
                );
                put_drone(slot, &released.drone_id, effects);
                assigned_from_queue(slot, assigned, at, effects);
            }
            Input::Reschedule(change) => {
                let key = &change.delivery_key;
                if slot
                    .region
                    .reschedule(key, change.pickup_time_ms, change.deadline_ms)
                    && let Some(q) = slot.region.queued(key)
                {
                    let entry = Waiting {
                        seq: q.seq,
                        job: q.job.clone(),
                        arrived_ms: Some(q.arrived_ms),
                    };
                    effects.changes.push((
                        wait_key(&region_name, key),
                        serde_json::to_vec(&entry).unwrap_or_default(),
                    ));
                }
            }
            Input::Cancel(cancelled) => {
                if slot.region.cancel(&cancelled.delivery_key) {
                    effects
                        .changes
                        .push((wait_key(&region_name, &cancelled.delivery_key), Vec::new()));
                }
            }
        }
        partition.reindex(&region_name, at);
    }

    fn tick(&mut self, partition: i32, now_ms: i64, effects: &mut Effects) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        let known = p.clock.tick(now_ms);
        for name in std::mem::take(&mut p.unsettled) {
            settle(p, &name, now_ms, known.unwrap_or(now_ms), effects);
        }
        // No stream time yet (restored, no record since, not quiet for long): nothing
        // expires on the wall clock before the partition's backlog is read.
        let Some(stream) = known else {
            return;
        };
        // Requests whose deadline or waiting bound passed.
        while let Some((at, name)) = p.expiries.first().cloned() {
            if at > stream {
                break;
            }
            p.expiries.remove(&(at, name.clone()));
            let Some(slot) = p.regions.get_mut(&name) else {
                continue;
            };
            slot.expires_at = None;
            for q in slot.region.expire(stream) {
                effects
                    .changes
                    .push((wait_key(&name, &q.job.delivery_key), Vec::new()));
                let reason = match q.expiry {
                    CancelReason::DeadlinePassed => {
                        format!("no drone of region {name} was free before the deadline")
                    }
                    _ => format!(
                        "no drone of region {name} was free within the waiting bound of {} s",
                        self.limits.max_waiting_time.as_secs()
                    ),
                };
                effects.outputs.push(Self::rejection_output(
                    &q.job,
                    q.expiry,
                    reason,
                    q.expires_ms,
                ));
            }
            p.reindex(&name, stream);
        }
        // Idle regions whose drones are all home by now.
        while let Some((at, name)) = p.idle.first().cloned() {
            if at > stream {
                break;
            }
            p.idle.remove(&(at, name.clone()));
            let Some(slot) = p.regions.remove(&name) else {
                continue;
            };
            for id in &slot.persisted {
                effects.changes.push((drone_key(&name, id), Vec::new()));
            }
            if let Some(e) = slot.expires_at {
                p.expiries.remove(&(e, name.clone()));
            }
            metrics::counter!("scheduling_regions_evicted_total").increment(1);
        }
    }
}

/// Looks at a restored region for the first time: waiting requests a free drone can
/// carry (the fleet changed) are assigned, and it is filed in the time indexes.
fn settle(p: &mut Partition, name: &str, now_ms: i64, at: i64, effects: &mut Effects) {
    if let Some(slot) = p.regions.get_mut(name) {
        let assigned = slot.region.settle(now_ms);
        assigned_from_queue(slot, assigned, at, effects);
    }
    p.reindex(name, at);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_record(offset: i64, key: &str, id: &str, payload: &str) -> Record {
        Record {
            topic: topics::DRONE_SCHEDULING.name.into(),
            partition: 0,
            offset,
            key: Some(key.as_bytes().to_vec()),
            payload: Some(payload.as_bytes().to_vec()),
            headers: vec![
                (
                    h::EVENT_TYPE.into(),
                    h::event_type::DELIVERY_REQUESTED.as_bytes().to_vec(),
                ),
                (h::TENANT.into(), b"fabrikam".to_vec()),
                (h::DELIVERY_ID.into(), id.as_bytes().to_vec()),
            ],
        }
    }

    #[test]
    fn state_written_to_the_changelog_restores_the_same_decisions() {
        let mut scheduler = Scheduler::new(Fleet::Default);
        let mut log: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let heavy = schemas::delivery::EXAMPLE_REQUEST.replace("\"weight\":2.5", "\"weight\":20");
        let heavy = heavy.replace("\"Medium\"", "\"Large\"");
        let mut assigned = Vec::new();
        for i in 0..3 {
            let mut fx = Effects::default();
            let record = request_record(i, "47:-123", &format!("d{i}"), &heavy);
            scheduler.handle(&record, 1_000, &mut fx);
            for (k, v) in fx.changes {
                if v.is_empty() {
                    log.remove(&k);
                } else {
                    log.insert(k, v);
                }
            }
            assigned.extend(fx.outputs);
        }
        assert_eq!(
            assigned.len(),
            2,
            "two large drones, the third request waits"
        );
        assert_eq!(assigned[0].topic, topics::DRONE_ASSIGNMENTS.name);
        // A new instance restored from the changelog knows the busy drones and the queue.
        let mut restored = Scheduler::new(Fleet::Default);
        restored.restore(0, log);
        let region = &restored.partitions[&0].regions["47:-123"].region;
        assert_eq!(region.waiting_len(), 1);
        let first = region.waiting().next().unwrap();
        assert_eq!(first.job.delivery_key, "fabrikam/d2");
        assert_eq!(
            region, &scheduler.partitions[&0].regions["47:-123"].region,
            "restore equals before"
        );
        let a: Assignment = serde_json::from_slice(&assigned[0].payload).unwrap();
        let release = DroneReleased {
            drone_id: a.drone_id.clone(),
            delivery_key: a.delivery_key.clone(),
            position: a.drop_off,
            at: 2_000,
        };
        let record = Record {
            topic: topics::DRONE_SCHEDULING.name.into(),
            partition: 0,
            offset: 3,
            key: Some(b"47:-123".to_vec()),
            payload: Some(serde_json::to_vec(&release).unwrap()),
            headers: vec![(
                h::EVENT_TYPE.into(),
                h::event_type::DRONE_RELEASED.as_bytes().to_vec(),
            )],
        };
        let mut fx = Effects::default();
        restored.handle(&record, 2_000, &mut fx);
        assert_eq!(fx.outputs.len(), 1);
        let next: Assignment = serde_json::from_slice(&fx.outputs[0].payload).unwrap();
        assert_eq!(next.delivery_key, "fabrikam/d2");
        assert_eq!(next.drone_id, a.drone_id);
    }

    /// Applies `fx`'s changes to a changelog kept as a map (tombstones delete).
    fn write(log: &mut HashMap<Vec<u8>, Vec<u8>>, fx: &Effects) {
        for (k, v) in &fx.changes {
            if v.is_empty() {
                log.remove(k);
            } else {
                log.insert(k.clone(), v.clone());
            }
        }
    }

    fn large_request(offset: i64, id: &str, at_ms: i64, deadline: &str) -> Record {
        let heavy = schemas::delivery::EXAMPLE_REQUEST
            .replace("\"weight\":2.5", "\"weight\":20")
            .replace("\"Medium\"", "\"Large\"");
        let heavy = heavy.replace(
            "\"deadline\":\"2026-11-24T12:00:00+01:00\"",
            &format!("\"deadline\":\"{deadline}\""),
        );
        let mut record = request_record(offset, "47:-123", id, &heavy);
        record
            .headers
            .push((h::INGEST_TIME.into(), at_ms.to_string().into_bytes()));
        record
    }

    fn rejection(o: &Output) -> SchedulingRejected {
        assert_eq!(o.topic, topics::DELIVERIES.name);
        serde_json::from_slice(&o.payload).unwrap()
    }

    #[test]
    fn a_full_queue_and_a_passed_deadline_send_the_request_back_with_its_reason() {
        let mut scheduler = Scheduler::new(Fleet::Default).with_limits(QueueLimits {
            max_waiting: 1,
            max_waiting_time: std::time::Duration::from_secs(3_600),
        });
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .timestamp_millis();
        let mut log = HashMap::new();
        let mut fx = Effects::default();
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let record = large_request(i as i64, id, t0, "2026-12-01T10:00:05Z");
            scheduler.handle(&record, t0, &mut fx);
        }
        // Two large drones, one waits, the fourth is refused.
        assert_eq!(fx.outputs.len(), 3);
        let refused = rejection(&fx.outputs[2]);
        assert_eq!(refused.code, CancelReason::QueueFull);
        assert_eq!(fx.outputs[2].key, b"fabrikam/d");
        write(&mut log, &fx);
        // The tick before the deadline changes nothing; the one after sends c back.
        let mut fx = Effects::default();
        scheduler.tick(0, t0 + 3_000, &mut fx);
        scheduler.tick(0, t0 + 4_000, &mut fx);
        assert!(fx.outputs.is_empty() && fx.changes.is_empty());
        scheduler.tick(0, t0 + 5_000, &mut fx);
        assert_eq!(fx.outputs.len(), 1);
        let expired = rejection(&fx.outputs[0]);
        assert_eq!(expired.code, CancelReason::DeadlinePassed);
        assert_eq!(fx.outputs[0].key, b"fabrikam/c");
        assert!(
            fx.outputs[0]
                .headers
                .contains(&(h::EVENT_TIME.into(), (t0 + 5_000).to_string().into_bytes()))
        );
        write(&mut log, &fx);
        assert!(
            !log.keys().any(|k| k.starts_with(b"w")),
            "no waiting entry left"
        );
        assert_eq!(
            scheduler.partitions[&0].regions["47:-123"]
                .region
                .waiting_len(),
            0
        );
    }

    fn release_record(offset: i64, a: &Assignment, at_ms: i64) -> Record {
        let release = DroneReleased {
            drone_id: a.drone_id.clone(),
            delivery_key: a.delivery_key.clone(),
            position: a.drop_off,
            at: at_ms,
        };
        Record {
            topic: topics::DRONE_SCHEDULING.name.into(),
            partition: 0,
            offset,
            key: Some(a.region.as_bytes().to_vec()),
            payload: Some(serde_json::to_vec(&release).unwrap()),
            headers: vec![
                (
                    h::EVENT_TYPE.into(),
                    h::event_type::DRONE_RELEASED.as_bytes().to_vec(),
                ),
                event_time_header(at_ms),
            ],
        }
    }

    fn evicts_an_idle_region_once_its_drones_are_home_and_rebuilds_it(fleet: Fleet) {
        let t0 = 1_800_000_000_000;
        let mut scheduler = Scheduler::new(fleet.clone());
        let mut log = HashMap::new();
        let mut fx = Effects::default();
        scheduler.handle(
            &large_request(0, "a", t0, "2027-01-01T00:00:00Z"),
            t0,
            &mut fx,
        );
        assert_eq!(fx.changes.len(), 1, "only the busy drone is written");
        let a: Assignment = serde_json::from_slice(&fx.outputs[0].payload).unwrap();
        write(&mut log, &fx);
        // Delivered: the drone is free at the drop-off, the region idle.
        let mut fx = Effects::default();
        let done = t0 + 600_000;
        scheduler.handle(&release_record(1, &a, done), done, &mut fx);
        write(&mut log, &fx);
        let slot = &scheduler.partitions[&0].regions["47:-123"];
        assert!(slot.region.is_idle());
        let home_at = done + slot.region.time_home_ms();
        assert!(home_at > done, "the drone is away from home");
        let before = slot.region.clone();
        // A new owner restored now has the same region.
        let mut restored = Scheduler::new(fleet.clone());
        restored.restore(0, log.clone());
        let mut fx = Effects::default();
        restored.tick(0, done, &mut fx);
        assert_eq!(restored.partitions[&0].regions["47:-123"].region, before);
        // Not before its drones could be home; then gone, its entries deleted.
        let mut fx = Effects::default();
        scheduler.tick(0, home_at - 1_001, &mut fx);
        scheduler.tick(0, home_at - 1, &mut fx);
        assert!(fx.changes.is_empty());
        scheduler.tick(0, home_at, &mut fx);
        assert!(!scheduler.partitions[&0].regions.contains_key("47:-123"));
        assert_eq!(
            fx.changes,
            vec![(drone_key("47:-123", &a.drone_id), Vec::new())]
        );
        write(&mut log, &fx);
        assert!(log.is_empty(), "nothing of the region is left: {log:?}");
        // Rebuilt on demand, and a restore after the eviction decides the same.
        let mut after_restore = Scheduler::new(fleet.clone());
        after_restore.restore(0, log.clone());
        for s in [&mut scheduler, &mut after_restore] {
            let mut fx = Effects::default();
            s.handle(
                &large_request(2, "b", home_at, "2027-01-01T00:00:00Z"),
                home_at,
                &mut fx,
            );
            let b: Assignment = serde_json::from_slice(&fx.outputs[0].payload).unwrap();
            assert_eq!(b.drone_id, a.drone_id);
            assert_eq!(b.from, a.from, "from home again");
        }
        assert_eq!(
            scheduler.partitions[&0].regions["47:-123"].region,
            after_restore.partitions[&0].regions["47:-123"].region
        );
    }

    #[test]
    fn idle_regions_of_the_default_fleet_are_evicted_and_rebuilt() {
        evicts_an_idle_region_once_its_drones_are_home_and_rebuilds_it(Fleet::Default);
    }

    #[test]
    fn idle_regions_of_a_fleet_file_are_evicted_and_rebuilt_from_it() {
        let fleet = Fleet::parse(
            br#"[{"id":"big","home":"47.5,-122.5","maxWeightKg":30,"maxSize":"Large","speedMps":15},
                {"id":"small","home":"47.5,-122.5","maxWeightKg":2,"maxSize":"Small","speedMps":20}]"#,
        )
        .unwrap();
        evicts_an_idle_region_once_its_drones_are_home_and_rebuilds_it(fleet);
    }

    #[test]
    fn a_drone_no_longer_in_the_fleet_file_is_deleted_with_its_idle_region() {
        let old = Fleet::parse(
            br#"[{"id":"gone","home":"47.5,-122.5","maxWeightKg":30,"maxSize":"Large","speedMps":15}]"#,
        )
        .unwrap();
        let t0 = 1_800_000_000_000;
        let mut scheduler = Scheduler::new(old);
        let mut log = HashMap::new();
        let mut fx = Effects::default();
        scheduler.handle(
            &large_request(0, "a", t0, "2027-01-01T00:00:00Z"),
            t0,
            &mut fx,
        );
        let a: Assignment = serde_json::from_slice(&fx.outputs[0].payload).unwrap();
        write(&mut log, &fx);
        // Restarted with a new fleet file: the busy drone stays until its release.
        let new = Fleet::parse(
            br#"[{"id":"new","home":"47.5,-122.5","maxWeightKg":30,"maxSize":"Large","speedMps":15}]"#,
        )
        .unwrap();
        let mut restored = Scheduler::new(new);
        restored.restore(0, log.clone());
        let mut fx = Effects::default();
        restored.handle(&release_record(1, &a, t0 + 1_000), t0 + 1_000, &mut fx);
        write(&mut log, &fx);
        let mut fx = Effects::default();
        restored.tick(0, t0 + 99_999_000, &mut fx);
        restored.tick(0, t0 + 100_000_000, &mut fx);
        write(&mut log, &fx);
        assert!(log.is_empty(), "{log:?}");
        let mut fx = Effects::default();
        restored.handle(
            &large_request(2, "b", t0 + 100_000_000, "2027-01-01T00:00:00Z"),
            t0,
            &mut fx,
        );
        let b: Assignment = serde_json::from_slice(&fx.outputs[0].payload).unwrap();
        assert_eq!(b.drone_id, "new");
    }

    #[test]
    fn a_request_no_drone_can_carry_is_rejected_to_its_delivery() {
        let mut scheduler = Scheduler::new(Fleet::Default);
        let huge = schemas::delivery::EXAMPLE_REQUEST.replace("\"weight\":2.5", "\"weight\":900");
        let mut fx = Effects::default();
        scheduler.handle(&request_record(0, "47:-123", "d9", &huge), 0, &mut fx);
        assert_eq!(fx.outputs.len(), 1);
        assert_eq!(fx.outputs[0].topic, topics::DELIVERIES.name);
        assert_eq!(fx.outputs[0].key, b"fabrikam/d9");
        assert!(fx.outputs[0].headers.contains(&(
            h::EVENT_TYPE.into(),
            h::event_type::DELIVERY_REJECTED.as_bytes().to_vec()
        )));
        assert_eq!(rejection(&fx.outputs[0]).code, CancelReason::NoCapableDrone);
        // The region it opened has nothing in it: evicted once the partition has a
        // stream time (this record carries no event time: a quiet second later), and it
        // never wrote anything.
        assert!(fx.changes.is_empty());
        let mut fx = Effects::default();
        scheduler.tick(0, 0, &mut fx);
        scheduler.tick(0, 1_000, &mut fx);
        assert!(scheduler.partitions[&0].regions.is_empty());
        assert!(fx.changes.is_empty());
    }

    #[test]
    fn poison_becomes_a_dead_letter() {
        let mut scheduler = Scheduler::new(Fleet::Default);
        let mut fx = Effects::default();
        scheduler.handle(&request_record(0, "47:-123", "d", "{not json"), 0, &mut fx);
        assert_eq!(fx.outputs[0].topic, topics::DEAD_LETTERS.name);
        assert!(fx.changes.is_empty(), "poison opens no region");
        let mut fx = Effects::default();
        let mut record = request_record(1, "47:-123", "d", "{}");
        record.headers[0].1 = b"Teleported".to_vec();
        scheduler.handle(&record, 0, &mut fx);
        assert_eq!(fx.outputs[0].topic, topics::DEAD_LETTERS.name);
    }

    #[test]
    fn fleet_files_are_checked() {
        let fleet = Fleet::parse(
            br#"[{"id":"a","home":"47.5,-122.5","maxWeightKg":5,"maxSize":"Medium","speedMps":15}]"#,
        )
        .unwrap();
        assert_eq!(fleet.drones("47:-123").len(), 1);
        assert!(fleet.drones("10:10").is_empty());
        assert!(Fleet::parse(b"[]").is_ok());
        assert!(
            Fleet::parse(
                br#"[{"id":"a","home":"1,1","maxWeightKg":0,"maxSize":"Small","speedMps":1}]"#
            )
            .is_err()
        );
        assert!(
            Fleet::parse(
                br#"[{"id":"a b","home":"1,1","maxWeightKg":1,"maxSize":"Small","speedMps":1}]"#
            )
            .is_err()
        );
    }

    fn cancel_record(offset: i64, region: &str, key: &str, at_ms: i64) -> Record {
        Record {
            topic: topics::DRONE_SCHEDULING.name.into(),
            partition: 0,
            offset,
            key: Some(region.as_bytes().to_vec()),
            payload: Some(
                serde_json::to_vec(&SchedulingCancelled {
                    delivery_key: key.into(),
                })
                .unwrap(),
            ),
            headers: vec![
                (
                    h::EVENT_TYPE.into(),
                    h::event_type::DELIVERY_CANCELLED.as_bytes().to_vec(),
                ),
                event_time_header(at_ms),
            ],
        }
    }

    proptest::proptest! {
        /// Whatever happens, a scheduler restored from what was written to the changelog
        /// has the same regions (drones and waiting requests, in order), and a region
        /// that left nothing in the changelog is exactly the one its fleet rebuilds.
        #[test]
        fn the_changelog_always_restores_the_same_regions(
            ops in proptest::collection::vec((0u8..5, 0usize..16, 0i64..20), 1..60),
        ) {
            let limits = QueueLimits {
                max_waiting: 3,
                max_waiting_time: std::time::Duration::from_secs(600),
            };
            let t0 = 1_800_000_000_000;
            let mut now = t0;
            let mut live = Scheduler::new(Fleet::Default).with_limits(limits);
            let mut log = HashMap::new();
            let mut assigned: Vec<Assignment> = Vec::new();
            let mut requested: Vec<String> = Vec::new();
            for (i, (op, pick, minutes)) in ops.into_iter().enumerate() {
                now += 30_000;
                let offset = i as i64;
                let mut fx = Effects::default();
                match op {
                    0 | 1 => {
                        let deadline = chrono::DateTime::from_timestamp_millis(now + minutes * 60_000)
                            .unwrap()
                            .to_rfc3339();
                        let id = format!("r{i}");
                        live.handle(&large_request(offset, &id, now, &deadline), now, &mut fx);
                        requested.push(format!("fabrikam/{id}"));
                    }
                    2 => {
                        if !assigned.is_empty() {
                            let a = assigned.remove(pick % assigned.len());
                            live.handle(&release_record(offset, &a, now), now, &mut fx);
                        }
                    }
                    3 => {
                        if !requested.is_empty() {
                            let key = requested[pick % requested.len()].clone();
                            live.handle(&cancel_record(offset, "47:-123", &key, now), now, &mut fx);
                        }
                    }
                    _ => {
                        now += minutes * 60_000;
                        live.tick(0, now - 1_000, &mut fx);
                        live.tick(0, now, &mut fx);
                    }
                }
                for o in &fx.outputs {
                    if o.topic == topics::DRONE_ASSIGNMENTS.name {
                        assigned.push(serde_json::from_slice(&o.payload).unwrap());
                    }
                }
                write(&mut log, &fx);
                let mut restored = Scheduler::new(Fleet::Default).with_limits(limits);
                restored.restore(0, log.clone());
                let empty = HashMap::new();
                let live_regions = live.partitions.get(&0).map_or(&empty, |p| &p.regions);
                let restored_regions = &restored.partitions[&0].regions;
                for (name, slot) in live_regions {
                    let waiting = |r: &Region| -> Vec<(String, i64, i64)> {
                        r.waiting().map(|q| (q.job.delivery_key.clone(), q.arrived_ms, q.expires_ms)).collect()
                    };
                    match restored_regions.get(name) {
                        Some(back) => {
                            proptest::prop_assert_eq!(&back.region.drones, &slot.region.drones);
                            proptest::prop_assert_eq!(waiting(&back.region), waiting(&slot.region));
                        }
                        None => {
                            let rebuilt = Region::new(name, default_fleet(name)).with_limits(limits);
                            proptest::prop_assert_eq!(&slot.region.drones, &rebuilt.drones);
                            proptest::prop_assert_eq!(slot.region.waiting_len(), 0);
                        }
                    }
                }
                for name in restored_regions.keys() {
                    proptest::prop_assert!(live_regions.contains_key(name), "{} came back", name);
                }
            }
        }
    }
}
