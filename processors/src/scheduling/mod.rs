//! The scheduling consumer: owns the fleets of the regions whose `drone-scheduling`
//! partitions it is assigned, assigns drones (the pure decisions are in [`region`]) and
//! emits `drone-assignments` keyed by drone id.
//!
//! Inputs on `drone-scheduling`, keyed by region: requests (from the workflow), drones
//! released (from the delivery consumer, when a delivery completes or is cancelled) and
//! cancels of requests that may still be waiting. State in `scheduling-state`: one entry
//! per drone and one per waiting request.
//!
//! This module is the stateful [`Machine`]: records in, outputs and changelog entries
//! out. It must not decide which drone takes a job (that is [`region`]'s) nor produce
//! or consume itself (that is the [engine](crate::stateful)'s).

pub mod region;

use std::collections::HashMap;
use std::path::Path;

use schemas::headers as h;
use schemas::topics;
use schemas::tracking::{Assignment, DroneReleased, SchedulingCancelled};
use serde::{Deserialize, Serialize};

use crate::error::{ProcessorError, Result};
use crate::output::Output;
use crate::stateful::{Effects, Machine, Record, Spec};
use region::{Decision, Drone, Job, Region, default_fleet};

/// What the scheduling consumer reads and writes.
pub const SPEC: Spec = Spec {
    name: "scheduling",
    group: topics::groups::SCHEDULING,
    inputs: &[topics::DRONE_SCHEDULING.name],
    changelog: topics::SCHEDULING_STATE.name,
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

/// A waiting request in the changelog: its place in the queue and the job.
#[derive(Debug, Serialize, Deserialize)]
struct Waiting {
    seq: i64,
    job: Job,
}

fn drone_key(region: &str, drone: &str) -> Vec<u8> {
    format!("d\u{1}{region}\u{1}{drone}").into_bytes()
}

fn wait_key(region: &str, delivery_key: &str) -> Vec<u8> {
    format!("w\u{1}{region}\u{1}{delivery_key}").into_bytes()
}

/// The scheduling consumer's state: regions by partition.
#[derive(Debug, Default)]
pub struct Scheduler {
    fleet: Fleet,
    regions: HashMap<i32, HashMap<String, Region>>,
}

impl Scheduler {
    /// A scheduler drawing drones from `fleet`.
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            regions: HashMap::new(),
        }
    }

    fn assignment_output(a: &Assignment) -> Output {
        let (tenant, _) = schemas::split_delivery_key(&a.delivery_key);
        let mut headers = vec![
            (
                h::EVENT_TYPE.to_owned(),
                h::event_type::DRONE_ASSIGNED.as_bytes().to_vec(),
            ),
            (h::DRONE_ID.to_owned(), a.drone_id.as_bytes().to_vec()),
            (h::DELIVERY_ID.to_owned(), a.delivery_id.as_bytes().to_vec()),
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

    /// Tells the delivery consumer that no drone of the region can ever take `job`.
    fn rejection_output(job: &Job, reason: &str) -> Output {
        let (tenant, _) = schemas::split_delivery_key(&job.delivery_key);
        Output {
            topic: topics::DELIVERIES.name,
            key: job.delivery_key.as_bytes().to_vec(),
            payload: serde_json::json!({ "reason": reason })
                .to_string()
                .into_bytes(),
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
            ],
        }
    }
}

/// One `drone-scheduling` record, parsed.
enum Input {
    Request(Job),
    Release(DroneReleased),
    Cancel(SchedulingCancelled),
}

/// Parses a record, or says why it is a dead letter.
fn parse(record: &Record) -> std::result::Result<Input, String> {
    let payload = record.payload.as_deref().unwrap_or_default();
    match record.header(h::EVENT_TYPE) {
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
        other => {
            let shown = other.map_or("none".into(), String::from_utf8_lossy);
            Err(format!("unknown event type {shown}"))
        }
    }
}

impl Machine for Scheduler {
    fn forget(&mut self, partition: i32) {
        self.regions.remove(&partition);
    }

    fn restore(&mut self, partition: i32, entries: HashMap<Vec<u8>, Vec<u8>>) {
        let mut regions: HashMap<String, Region> = HashMap::new();
        let mut waiting: HashMap<String, Vec<Waiting>> = HashMap::new();
        for (key, value) in entries {
            let key = String::from_utf8_lossy(&key).into_owned();
            let mut parts = key.splitn(3, '\u{1}');
            let (Some(kind), Some(region)) = (parts.next(), parts.next()) else {
                continue;
            };
            let entry = regions
                .entry(region.to_owned())
                .or_insert_with(|| Region::new(region, Vec::new()));
            match kind {
                "d" => {
                    if let Ok(drone) = serde_json::from_slice::<Drone>(&value) {
                        entry.drones.insert(drone.id.clone(), drone);
                    }
                }
                "w" => {
                    if let Ok(w) = serde_json::from_slice::<Waiting>(&value) {
                        waiting.entry(region.to_owned()).or_default().push(w);
                    }
                }
                _ => {}
            }
        }
        for (region, mut list) in waiting {
            list.sort_by_key(|w| w.seq);
            if let Some(r) = regions.get_mut(&region) {
                r.set_waiting(list.into_iter().map(|w| w.job).collect());
            }
        }
        self.regions.insert(partition, regions);
    }

    fn handle(&mut self, record: &Record, now_ms: i64, effects: &mut Effects) {
        let region_name = record.key_text().to_owned();
        if region_name.is_empty() {
            effects
                .outputs
                .push(record.dead_letter("record has no key (region)"));
            return;
        }
        // Only a valid record may open a region (and write its fleet).
        let input = match parse(record) {
            Ok(input) => input,
            Err(reason) => {
                effects.outputs.push(record.dead_letter(&reason));
                return;
            }
        };
        let fleet = &self.fleet;
        let partition = self.regions.entry(record.partition).or_default();
        let region = partition.entry(region_name.clone()).or_insert_with(|| {
            let region = Region::new(&region_name, fleet.drones(&region_name));
            for d in region.drones.values() {
                effects.changes.push((
                    drone_key(&region_name, &d.id),
                    serde_json::to_vec(d).unwrap_or_default(),
                ));
            }
            region
        });
        let put_drone = |region: &Region, id: &str, effects: &mut Effects| {
            if let Some(d) = region.drones.get(id) {
                effects.changes.push((
                    drone_key(&region.name, id),
                    serde_json::to_vec(d).unwrap_or_default(),
                ));
            }
        };
        match input {
            Input::Request(job) => {
                let waiting_entry = Waiting {
                    seq: record.offset,
                    job: job.clone(),
                };
                match region.request(job, now_ms) {
                    Decision::Assigned(a) => {
                        put_drone(region, &a.drone_id, effects);
                        effects.outputs.push(Self::assignment_output(&a));
                        metrics::counter!("scheduling_assignments_total").increment(1);
                    }
                    Decision::Waiting => {
                        effects.changes.push((
                            wait_key(&region.name, &waiting_entry.job.delivery_key),
                            serde_json::to_vec(&waiting_entry).unwrap_or_default(),
                        ));
                        metrics::counter!("scheduling_waiting_total").increment(1);
                    }
                    Decision::Duplicate => {}
                    Decision::Unassignable(reason) => {
                        effects
                            .outputs
                            .push(Self::rejection_output(&waiting_entry.job, &reason));
                        metrics::counter!("scheduling_rejected_total").increment(1);
                    }
                }
            }
            Input::Release(released) => {
                let assigned = region.release(
                    &released.drone_id,
                    &released.delivery_key,
                    released.position,
                    now_ms,
                );
                put_drone(region, &released.drone_id, effects);
                for a in assigned {
                    put_drone(region, &a.drone_id, effects);
                    effects
                        .changes
                        .push((wait_key(&region.name, &a.delivery_key), Vec::new()));
                    effects.outputs.push(Self::assignment_output(&a));
                    metrics::counter!("scheduling_assignments_total").increment(1);
                }
            }
            Input::Cancel(cancelled) => {
                if region.cancel(&cancelled.delivery_key) {
                    effects
                        .changes
                        .push((wait_key(&region.name, &cancelled.delivery_key), Vec::new()));
                }
            }
        }
    }
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
        let region = &restored.regions[&0]["47:-123"];
        assert_eq!(region.waiting.len(), 1);
        assert_eq!(region.waiting[0].delivery_key, "fabrikam/d2");
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
}
