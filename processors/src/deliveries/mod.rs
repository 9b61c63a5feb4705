//! The delivery consumer: owns each delivery's state (stage, drone, last known location,
//! ETAs) for the partitions it is assigned, and writes every change of it to
//! `delivery-state`, which is both its changelog and the stream of its changes.
//!
//! Inputs, co-partitioned and keyed `tenant/deliveryId`: `delivery-requests` itself
//! (requests, reschedules and cancels as the clients sent them: its own consumer group
//! on the ingestion tier's topic, so no copy is made), and `deliveries` (drone
//! assignments and positions from the tracker, rejections from the scheduler). It is the
//! one that dead-letters an invalid record of `delivery-requests` (the workflow skips
//! those). Outputs: released drones and cancels or reschedules of waiting requests on
//! `drone-scheduling`, keyed by region. State in `delivery-state`: every change of a
//! delivery, the [`DeliveryState`] after it, which the status view, the notifier and the
//! history's `delivery_events` table (its stage changes) read.
//!
//! A request reaches the scheduler through the workflow, and its assignment comes back on
//! `deliveries`, a topic read beside `delivery-requests` with no order between the two:
//! when this consumer is behind on `delivery-requests`, the assignment can come first. An
//! assignment or fix for a delivery not seen yet therefore waits (bounded: per delivery
//! and per partition) and is applied right after its request. It gives up (and an
//! assignment gives its drone back, as an unknown delivery's assignment always did) once
//! it has waited [`EARLY_WAIT_MS`] of processing time and this consumer has read a
//! request of the same partition stamped [`EARLY_SKEW_MS`] later than it (so its own
//! request cannot be still to come), or has read no request of that partition for as
//! long (it is not working through a backlog). While older requests keep coming, it
//! waits, within the budgets. Waiting records are state like any other: they are written
//! to the changelog (under keys starting with byte 1) and restored with it.
//!
//! Finished deliveries (completed or cancelled) are kept for the finished retention, in
//! event time ([`crate::clock`]): once the partition's stream time is that far past the
//! transition that finished one, it is deleted, a tombstone on `delivery-state` (so the
//! status view forgets it too and its routes answer 404); its events stay in the history.
//! Each changelog value keeps the event time of the delivery's last change, so a restore
//! knows when each finished one goes.
//!
//! Its changelog is not coalesced: every change of a delivery (each stage, each
//! position) is one `delivery-state` record, in order, each with the next `version`, so
//! the changelog is also the stream of changes that SSE, webhooks and the history carry.
//! `delivery-state` keeps every record for its `min.compaction.lag.ms` before compaction
//! may drop it; its readers that need every change (the notifier, the history sink) must
//! read within that time.
//!
//! This module is the stateful [`Machine`]: records in, outputs and changelog entries
//! out. It must not decide how an input moves a delivery's stage (that is [`stages`]'s,
//! pure) nor produce or consume itself (that is the [engine](crate::stateful)'s).

pub mod stages;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use schemas::headers as h;
use schemas::topics;
use schemas::tracking::{
    Assignment, DeliveryState, SchedulingCancelled, SchedulingRejected, SchedulingRescheduled,
};

use crate::clock::{StreamClock, event_ms, event_time_header, millis};
use crate::output::Output;
use crate::stateful::{Effects, Machine, Record, Spec};
use stages::Input;

/// What the delivery consumer reads and writes.
pub const SPEC: Spec = Spec {
    name: "deliveries",
    group: topics::groups::DELIVERIES,
    inputs: &[topics::DELIVERY_REQUESTS.name, topics::DELIVERIES.name],
    changelog: topics::DELIVERY_STATE.name,
    coalesce: false,
};

/// How long a finished delivery is kept, by default.
pub const FINISHED_RETENTION: Duration = Duration::from_secs(24 * 3_600);

/// How long an assignment or fix for a delivery not seen yet waits for its request at
/// least, in milliseconds of processing time.
pub const EARLY_WAIT_MS: i64 = 60_000;
/// How much later (event time) than a waiting record a request of its partition must be
/// stamped to show that the waiting record's request is not still to come (the tier's
/// replicas' clocks, and the time a record may take to be acknowledged, differ by less).
pub const EARLY_SKEW_MS: i64 = 60_000;
/// Records waiting per delivery; past it, the oldest fix makes room (an assignment stays).
const EARLY_RECORDS_PER_DELIVERY: usize = 64;
/// Bytes of records waiting per delivery (one changelog value, far below Kafka's record
/// size limit); past it, the oldest fix makes room.
const EARLY_BYTES_PER_DELIVERY: usize = 128 * 1024;
/// Bytes of waiting records per partition; past it, the deliveries that waited longest
/// give up first.
const EARLY_BYTES_PER_PARTITION: usize = 8 * 1024 * 1024;
/// Deliveries with waiting records per partition; past it, the same.
const EARLY_DELIVERIES_PER_PARTITION: usize = 10_000;
/// Changelog keys of waiting records start with this byte (offset markers with 0), then
/// the delivery's key.
const WAITING: u8 = 1;

/// Records that came before their delivery's request, as kept in the changelog.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Early {
    since_ms: i64,
    /// The event time of its first record, when that has one.
    #[serde(default, rename = "atMs", skip_serializing_if = "Option::is_none")]
    at_ms: Option<i64>,
    records: Vec<Held>,
    /// What the records take, roughly (kept up to date, not stored).
    #[serde(skip)]
    bytes: usize,
}

/// One waiting record: what applying it later needs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Held {
    offset: i64,
    payload: String,
    headers: Vec<(String, String)>,
}

impl Held {
    fn of(record: &Record) -> Self {
        Self {
            offset: record.offset,
            payload: String::from_utf8_lossy(record.payload.as_deref().unwrap_or_default())
                .into_owned(),
            headers: record
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
        }
    }

    fn record(&self, partition: i32, key: &str) -> Record {
        Record {
            topic: topics::DELIVERIES.name.into(),
            partition,
            offset: self.offset,
            key: Some(key.as_bytes().to_vec()),
            payload: Some(self.payload.as_bytes().to_vec()),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    /// Roughly what it takes in memory and in the changelog.
    fn size(&self) -> usize {
        64 + self.payload.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>()
    }

    fn is_assignment(&self) -> bool {
        self.headers
            .iter()
            .any(|(k, v)| k == h::EVENT_TYPE && v == h::event_type::DRONE_ASSIGNED)
    }
}

/// Whether records waiting for their request since `early` give up at `now_ms`, when
/// `requests_seen` is the latest event time of a request read on their partition and the
/// processing time one was last read at (see [`Deliveries`]): after [`EARLY_WAIT_MS`],
/// once a request stamped [`EARLY_SKEW_MS`] later than them was read (theirs cannot still
/// be behind it), or the partition has read no request for as long (it is not working
/// through a backlog; counted from its assignment before its first). While older
/// requests keep coming, they wait (within the budgets).
fn gives_up(early: &Early, now_ms: i64, requests_seen: (i64, i64)) -> bool {
    if now_ms.saturating_sub(early.since_ms) < EARLY_WAIT_MS {
        return false;
    }
    let (seen, read_at) = requests_seen;
    match early.at_ms {
        // Records without an event time: processing time alone.
        None => true,
        Some(at) => {
            seen >= at.saturating_add(EARLY_SKEW_MS)
                || now_ms.saturating_sub(read_at) >= EARLY_WAIT_MS
        }
    }
}

fn waiting_key(key: &str) -> Vec<u8> {
    let mut out = vec![WAITING];
    out.extend_from_slice(key.as_bytes());
    out
}

/// A delivery's state as the changelog keeps it: the state the status view reads, and
/// the event time of its last change (a field the view ignores).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Kept {
    #[serde(flatten)]
    state: DeliveryState,
    #[serde(rename = "eventTime", default, skip_serializing_if = "Option::is_none")]
    event_ms: Option<i64>,
}

impl Kept {
    /// When it last changed: its event time, else (written before that was kept) its
    /// `updatedAt`.
    fn changed_ms(&self) -> Option<i64> {
        self.event_ms.or_else(|| {
            chrono::DateTime::parse_from_rfc3339(&self.state.updated_at)
                .ok()
                .map(|t| t.timestamp_millis())
        })
    }
}

/// Deliveries by partition and key.
#[derive(Debug)]
pub struct Deliveries {
    retention_ms: i64,
    states: HashMap<i32, HashMap<String, Kept>>,
    /// Finished deliveries by the event time they finished at.
    finished: HashMap<i32, BTreeSet<(i64, String)>>,
    clocks: HashMap<i32, StreamClock>,
    early: HashMap<i32, HashMap<String, Early>>,
    next_expiry_ms: HashMap<i32, i64>,
    /// Per partition, since it was assigned: the latest event time of a request read
    /// (`i64::MIN` before the first), and the processing time one was last read at (or,
    /// before the first, the partition was first looked at).
    requests_seen: HashMap<i32, (i64, i64)>,
}

impl Default for Deliveries {
    fn default() -> Self {
        Self::new(FINISHED_RETENTION)
    }
}

impl Deliveries {
    /// A delivery consumer that keeps finished deliveries for `finished_retention` of
    /// event time.
    pub fn new(finished_retention: Duration) -> Self {
        Self {
            retention_ms: millis(finished_retention),
            states: HashMap::new(),
            finished: HashMap::new(),
            clocks: HashMap::new(),
            early: HashMap::new(),
            next_expiry_ms: HashMap::new(),
            requests_seen: HashMap::new(),
        }
    }
}

fn tenant_headers(
    key: &str,
    delivery_id: &str,
    event_type: &str,
    at: i64,
) -> Vec<(String, Vec<u8>)> {
    let (tenant, _) = schemas::split_delivery_key(key);
    vec![
        (h::EVENT_TYPE.to_owned(), event_type.as_bytes().to_vec()),
        (
            h::TENANT.to_owned(),
            tenant.unwrap_or_default().as_bytes().to_vec(),
        ),
        (h::DELIVERY_ID.to_owned(), delivery_id.as_bytes().to_vec()),
        event_time_header(at),
    ]
}

impl Machine for Deliveries {
    fn forget(&mut self, partition: i32) {
        self.states.remove(&partition);
        self.finished.remove(&partition);
        self.clocks.remove(&partition);
        self.early.remove(&partition);
        self.next_expiry_ms.remove(&partition);
        self.requests_seen.remove(&partition);
    }

    fn restore(&mut self, partition: i32, entries: HashMap<Vec<u8>, Vec<u8>>) {
        let mut states = HashMap::new();
        let mut finished = BTreeSet::new();
        let mut clock = StreamClock::new();
        let mut early = HashMap::new();
        for (k, v) in entries {
            if k.first() == Some(&WAITING) {
                if let (Ok(key), Ok(mut waiting)) = (
                    String::from_utf8(k[1..].to_vec()),
                    serde_json::from_slice::<Early>(&v),
                ) {
                    waiting.bytes = waiting.records.iter().map(Held::size).sum();
                    early.insert(key, waiting);
                }
            } else if let (Ok(key), Ok(kept)) =
                (String::from_utf8(k), serde_json::from_slice::<Kept>(&v))
            {
                let changed = kept.changed_ms();
                if let Some(at) = changed {
                    clock.raise(at);
                }
                if kept.state.stage.is_final() {
                    finished.insert((changed.unwrap_or(0), key.clone()));
                }
                states.insert(key, kept);
            }
        }
        self.states.insert(partition, states);
        self.finished.insert(partition, finished);
        self.clocks.insert(partition, clock);
        self.early.insert(partition, early);
        self.next_expiry_ms.remove(&partition);
        self.requests_seen.remove(&partition);
    }

    fn tick(&mut self, partition: i32, now_ms: i64, effects: &mut Effects) {
        if !self.states.contains_key(&partition) {
            return;
        }
        let stream = self.clocks.entry(partition).or_default().tick(now_ms);
        if let Some(stream) = stream {
            self.expire_finished(partition, stream, effects);
        }
        self.expire_early(partition, now_ms, effects);
    }

    fn handle(&mut self, record: &Record, now_ms: i64, effects: &mut Effects) {
        let event_type = record.header(h::EVENT_TYPE).unwrap_or_default();
        let key = record.key_text();
        let known = self
            .states
            .get(&record.partition)
            .is_some_and(|s| s.contains_key(key));
        // What the scheduler and the tracker say may come before the request; only they
        // say it (on `deliveries`), and only clients' requests, reschedules and cancels
        // come on `delivery-requests` (anything else there moves no clock).
        let drone_event = event_type == h::event_type::DRONE_ASSIGNED.as_bytes()
            || event_type == h::event_type::DRONE_POSITION_REPORTED.as_bytes()
            || event_type == h::event_type::DELIVERY_REJECTED.as_bytes();
        if drone_event && record.topic == topics::DELIVERY_REQUESTS.name {
            let shown = String::from_utf8_lossy(event_type);
            effects.outputs.push(
                record.dead_letter(&format!("unknown event type {shown} on delivery-requests")),
            );
            return;
        }
        let at = event_ms(record);
        self.clocks.entry(record.partition).or_default().observe(at);
        if let Some(at) = at.filter(|_| record.topic == topics::DELIVERY_REQUESTS.name) {
            let seen = self
                .requests_seen
                .entry(record.partition)
                .or_insert((at, now_ms));
            *seen = (seen.0.max(at), now_ms);
        }
        if !known && drone_event {
            self.wait_for_request(record, now_ms, effects);
        } else {
            self.apply_record(record, now_ms, effects);
            if event_type == h::event_type::DELIVERY_REQUESTED.as_bytes() {
                self.release_waiting(record.partition, key, now_ms, effects);
            }
        }
        // After the record: a request that waited as long as its drone's assignment
        // claims the assignment before it could expire.
        self.expire_early(record.partition, now_ms, effects);
    }
}

impl Deliveries {
    /// Deletes the finished deliveries whose retention ended by `stream_ms`.
    fn expire_finished(&mut self, partition: i32, stream_ms: i64, effects: &mut Effects) {
        let (Some(finished), Some(states)) = (
            self.finished.get_mut(&partition),
            self.states.get_mut(&partition),
        ) else {
            return;
        };
        while let Some((at, _)) = finished.first() {
            if at.saturating_add(self.retention_ms) > stream_ms {
                break;
            }
            let Some((_, key)) = finished.pop_first() else {
                break;
            };
            if states.get(&key).is_some_and(|k| k.state.stage.is_final()) {
                states.remove(&key);
                effects.changes.push((key.into_bytes(), Vec::new()));
                metrics::counter!("deliveries_forgotten_total").increment(1);
            }
        }
    }

    /// Keeps `record` (an assignment or fix of a delivery not seen yet) until its
    /// request, in memory and in the changelog.
    fn wait_for_request(&mut self, record: &Record, now_ms: i64, effects: &mut Effects) {
        let partition = record.partition;
        let key = record.key_text().to_owned();
        let held = Held::of(record);
        let early = self.early.entry(partition).or_default();
        if early
            .get(&key)
            .is_some_and(|e| e.records.iter().any(|r| r.offset == held.offset))
        {
            // Replayed after a crash: already waiting.
            return;
        }
        // The budgets: the deliveries that waited longest give up first.
        loop {
            let early = self.early.entry(partition).or_default();
            let bytes: usize = early.values().map(|e| e.bytes).sum();
            let fits = early.len() < EARLY_DELIVERIES_PER_PARTITION || early.contains_key(&key);
            if (fits && bytes + held.size() <= EARLY_BYTES_PER_PARTITION) || early.is_empty() {
                break;
            }
            let Some(oldest) = early
                .iter()
                .min_by_key(|(_, e)| e.since_ms)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.release_waiting(partition, &oldest, now_ms, effects);
        }
        let early = self.early.entry(partition).or_default();
        let waiting = early.entry(key.clone()).or_insert_with(|| Early {
            since_ms: now_ms,
            at_ms: event_ms(record),
            records: Vec::new(),
            bytes: 0,
        });
        waiting.records.push(held);
        // One changelog value stays far below a record's size limit: the oldest fixes
        // make room (an assignment stays).
        while waiting.records.len() > EARLY_RECORDS_PER_DELIVERY
            || waiting.records.iter().map(Held::size).sum::<usize>() > EARLY_BYTES_PER_DELIVERY
        {
            match waiting.records.iter().position(|r| !r.is_assignment()) {
                Some(oldest_fix) => {
                    waiting.records.remove(oldest_fix);
                }
                None => {
                    waiting.records.pop();
                    break;
                }
            }
        }
        waiting.bytes = waiting.records.iter().map(Held::size).sum();
        effects.changes.push((
            waiting_key(&key),
            serde_json::to_vec(&*waiting).unwrap_or_default(),
        ));
        metrics::counter!("deliveries_records_before_request_total").increment(1);
    }

    /// Applies what waited for delivery `key` (after its request, or when it gave up) and
    /// deletes it from the changelog.
    fn release_waiting(&mut self, partition: i32, key: &str, now_ms: i64, effects: &mut Effects) {
        let Some(waiting) = self.early.get_mut(&partition).and_then(|e| e.remove(key)) else {
            return;
        };
        effects.changes.push((waiting_key(key), Vec::new()));
        for held in &waiting.records {
            self.apply_record(&held.record(partition, key), now_ms, effects);
        }
    }

    /// Applies the records that gave up waiting (see the module's docs) as they are (an
    /// assignment of an unknown delivery gives its drone back). Looks at most once a
    /// second of processing time per partition.
    fn expire_early(&mut self, partition: i32, now_ms: i64, effects: &mut Effects) {
        let next = self.next_expiry_ms.entry(partition).or_insert(0);
        if now_ms < *next {
            return;
        }
        *next = now_ms + 1_000;
        // Before its first request, the partition's quiet counts from now: a partition
        // just assigned (or restored) is not yet known to be caught up.
        let seen = *self
            .requests_seen
            .entry(partition)
            .or_insert((i64::MIN, now_ms));
        let expired: Vec<String> = self
            .early
            .get(&partition)
            .into_iter()
            .flatten()
            .filter(|(_, e)| gives_up(e, now_ms, seen))
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            self.release_waiting(partition, &key, now_ms, effects);
        }
    }

    /// Applies one record to its delivery's state.
    fn apply_record(&mut self, record: &Record, now_ms: i64, effects: &mut Effects) {
        let key = record.key_text().to_owned();
        let (tenant, key_id) = schemas::split_delivery_key(&key);
        let Some(tenant) = tenant.filter(|t| !t.is_empty() && !key_id.is_empty()) else {
            effects
                .outputs
                .push(record.dead_letter("key is not tenant/deliveryId"));
            return;
        };
        let delivery_id = record
            .header(h::DELIVERY_ID)
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or(key_id);
        let payload = record.payload.as_deref().unwrap_or_default();
        let event_type = record.header(h::EVENT_TYPE).unwrap_or_default();
        let text = |name| {
            record
                .header(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or_default()
        };
        // Parse first (borrowing from the payload), then apply.
        let request;
        let reschedule;
        let assignment: Assignment;
        let rejected: SchedulingRejected;
        let fix;
        let input = if event_type == h::event_type::DELIVERY_REQUESTED.as_bytes() {
            match schemas::parse_delivery_request(payload) {
                Ok(r) => request = r,
                Err(e) => {
                    effects
                        .outputs
                        .push(record.dead_letter(&format!("invalid delivery request: {e}")));
                    return;
                }
            }
            Input::Requested {
                tenant,
                delivery_id,
                request: &request,
            }
        } else if event_type == h::event_type::DELIVERY_RESCHEDULED.as_bytes() {
            match schemas::parse_reschedule(payload) {
                Ok(r) => reschedule = r,
                Err(e) => {
                    effects
                        .outputs
                        .push(record.dead_letter(&format!("invalid reschedule: {e}")));
                    return;
                }
            }
            Input::Rescheduled(&reschedule)
        } else if event_type == h::event_type::DELIVERY_CANCELLED.as_bytes() {
            Input::Cancelled
        } else if event_type == h::event_type::DELIVERY_REJECTED.as_bytes() {
            match serde_json::from_slice::<SchedulingRejected>(payload) {
                Ok(r) => rejected = r,
                Err(e) => {
                    effects
                        .outputs
                        .push(record.dead_letter(&format!("invalid rejection: {e}")));
                    return;
                }
            }
            Input::Rejected {
                code: rejected.code,
                detail: &rejected.reason,
            }
        } else if event_type == h::event_type::DRONE_ASSIGNED.as_bytes() {
            match serde_json::from_slice(payload) {
                Ok(a) => assignment = a,
                Err(e) => {
                    effects
                        .outputs
                        .push(record.dead_letter(&format!("invalid assignment: {e}")));
                    return;
                }
            }
            Input::Assigned(&assignment)
        } else if event_type == h::event_type::DRONE_POSITION_REPORTED.as_bytes() {
            match schemas::telemetry::parse_position_fix(payload) {
                Ok(f) => fix = f,
                Err(e) => {
                    effects
                        .outputs
                        .push(record.dead_letter(&format!("invalid position fix: {e}")));
                    return;
                }
            }
            Input::Position {
                drone_id: text(h::DRONE_ID),
                fix: &fix,
            }
        } else {
            let shown = String::from_utf8_lossy(event_type);
            effects
                .outputs
                .push(record.dead_letter(&format!("unknown event type {shown}")));
            return;
        };
        let clock = self.clocks.entry(record.partition).or_default();
        let at = event_ms(record).or(clock.now()).unwrap_or(now_ms);
        let states = self.states.entry(record.partition).or_default();
        let kept = states.remove(&key);
        let changed_before = kept.as_ref().and_then(|k| k.event_ms);
        let before = kept.map(|k| k.state);
        let unchanged = before.clone();
        let (after, fx) = stages::apply(before, &input, now_ms);
        // Each transition is one `delivery-state` record below (its `change` is `stage`):
        // the changelog is the stream of events.
        for event in &fx.events {
            metrics::counter!("deliveries_transitions_total", "stage" => event.stage.as_str())
                .increment(1);
        }
        if let Some((region, released)) = fx.release {
            effects.outputs.push(Output {
                topic: topics::DRONE_SCHEDULING.name,
                key: region.into_bytes(),
                payload: serde_json::to_vec(&released).unwrap_or_default(),
                headers: tenant_headers(&key, delivery_id, h::event_type::DRONE_RELEASED, at),
            });
        }
        if let Some(region) = fx.unschedule {
            let cancel = SchedulingCancelled {
                delivery_key: key.clone(),
            };
            effects.outputs.push(Output {
                topic: topics::DRONE_SCHEDULING.name,
                key: region.into_bytes(),
                payload: serde_json::to_vec(&cancel).unwrap_or_default(),
                headers: tenant_headers(&key, delivery_id, h::event_type::DELIVERY_CANCELLED, at),
            });
        }
        if let (Some(region), Some(state)) = (fx.reschedule, after.as_ref()) {
            let ms = |t: &str| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .map(|t| t.timestamp_millis())
                    .ok()
            };
            if let (Some(pickup_time_ms), Some(deadline_ms)) =
                (ms(&state.pickup_time), ms(&state.deadline))
            {
                let change = SchedulingRescheduled {
                    delivery_key: key.clone(),
                    pickup_time_ms,
                    deadline_ms,
                };
                effects.outputs.push(Output {
                    topic: topics::DRONE_SCHEDULING.name,
                    key: region.into_bytes(),
                    payload: serde_json::to_vec(&change).unwrap_or_default(),
                    headers: tenant_headers(
                        &key,
                        delivery_id,
                        h::event_type::DELIVERY_RESCHEDULED,
                        at,
                    ),
                });
            }
        }
        if let Some(state) = after {
            let changed = unchanged.as_ref() != Some(&state);
            let kept = Kept {
                event_ms: if changed { Some(at) } else { changed_before },
                state,
            };
            if changed {
                effects.changes.push((
                    key.as_bytes().to_vec(),
                    serde_json::to_vec(&kept).unwrap_or_default(),
                ));
                if kept.state.stage.is_final() {
                    self.finished
                        .entry(record.partition)
                        .or_default()
                        .insert((at, key.clone()));
                }
            }
            states.insert(key, kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::tracking::Stage;

    fn record(offset: i64, event_type: &str, payload: &[u8]) -> Record {
        Record {
            topic: topics::DELIVERIES.name.into(),
            partition: 1,
            offset,
            key: Some(b"fabrikam/d1".to_vec()),
            payload: Some(payload.to_vec()),
            headers: vec![(h::EVENT_TYPE.into(), event_type.as_bytes().to_vec())],
        }
    }

    #[test]
    fn transitions_become_events_and_state_and_poison_dead_letters() {
        let mut d = Deliveries::default();
        let mut fx = Effects::default();
        d.handle(
            &record(
                0,
                h::event_type::DELIVERY_REQUESTED,
                schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
            ),
            0,
            &mut fx,
        );
        assert!(fx.outputs.is_empty(), "the event is the changelog record");
        assert_eq!(fx.changes.len(), 1);
        let event = &stage_changes(&fx)[0];
        assert_eq!(
            (event.stage, event.seq, event.version),
            (Stage::Created, 1, 1)
        );
        // Cancel before a drone: the scheduler is told to drop the waiting request.
        let mut fx = Effects::default();
        d.handle(
            &record(1, h::event_type::DELIVERY_CANCELLED, b"{}"),
            0,
            &mut fx,
        );
        assert_eq!(fx.outputs.len(), 1);
        assert_eq!(fx.outputs[0].topic, topics::DRONE_SCHEDULING.name);
        assert_eq!(fx.outputs[0].key, b"47:-123");
        assert_eq!(stages(&fx), [Stage::Cancelled]);
        // Poison: a bad payload, an unknown type, a key without a tenant.
        for r in [
            record(2, h::event_type::DRONE_ASSIGNED, b"{oops"),
            record(3, "Teleported", b"{}"),
            Record {
                key: Some(b"no-tenant".to_vec()),
                ..record(4, h::event_type::DELIVERY_CANCELLED, b"{}")
            },
        ] {
            let mut fx = Effects::default();
            d.handle(&r, 0, &mut fx);
            assert_eq!(fx.outputs.len(), 1);
            assert_eq!(fx.outputs[0].topic, topics::DEAD_LETTERS.name);
        }
    }

    fn assigned(offset: i64, key: &str) -> Record {
        let here = schemas::Location {
            latitude: 47.6062,
            longitude: -122.3321,
        };
        let a = Assignment {
            drone_id: "47:-123-s1".into(),
            region: "47:-123".into(),
            delivery_key: key.into(),
            delivery_id: key.split('/').nth(1).unwrap_or_default().into(),
            from: here,
            pickup: here,
            drop_off: here,
            speed_mps: 10.0,
            assigned_at: 0,
            pickup_eta: 0,
            delivery_eta: 0,
        };
        Record {
            key: Some(key.as_bytes().to_vec()),
            headers: vec![
                (
                    h::EVENT_TYPE.into(),
                    h::event_type::DRONE_ASSIGNED.as_bytes().to_vec(),
                ),
                (h::DRONE_ID.into(), b"47:-123-s1".to_vec()),
            ],
            ..record(
                offset,
                h::event_type::DRONE_ASSIGNED,
                &serde_json::to_vec(&a).unwrap(),
            )
        }
    }

    /// The states of the stage changes written to the changelog, in order.
    fn stage_changes(fx: &Effects) -> Vec<DeliveryState> {
        fx.changes
            .iter()
            .filter(|(k, v)| k.first() != Some(&WAITING) && !v.is_empty())
            .map(|(_, v)| serde_json::from_slice::<Kept>(v).unwrap().state)
            .filter(|s| s.change == Some(schemas::tracking::EventKind::Stage))
            .collect()
    }

    fn stages(fx: &Effects) -> Vec<Stage> {
        stage_changes(fx).iter().map(|s| s.stage).collect()
    }

    #[test]
    fn an_assignment_that_comes_before_its_request_waits_for_it() {
        let mut d = Deliveries::default();
        let mut fx = Effects::default();
        d.handle(&assigned(0, "fabrikam/d1"), 0, &mut fx);
        assert!(fx.outputs.is_empty(), "waits: no release, no event");
        let request = record(
            1,
            h::event_type::DELIVERY_REQUESTED,
            schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
        );
        d.handle(&request, 1_000, &mut fx);
        assert_eq!(stages(&fx), [Stage::Created, Stage::HeadedToPickup]);
        assert!(d.early[&1].is_empty());
        // Applied, the waiting records leave the changelog (a tombstone last).
        let waiting = waiting_key("fabrikam/d1");
        let last = fx
            .changes
            .iter()
            .rev()
            .find(|(k, _)| *k == waiting)
            .unwrap();
        assert!(last.1.is_empty());
    }

    #[test]
    fn waiting_records_are_restored_from_the_changelog() {
        let mut d = Deliveries::default();
        let mut fx = Effects::default();
        d.handle(&assigned(0, "fabrikam/d1"), 0, &mut fx);
        // A new owner of the partition restores what was written, and the request comes.
        let mut restored = Deliveries::default();
        restored.restore(1, fx.changes.into_iter().collect());
        let mut fx = Effects::default();
        let request = record(
            1,
            h::event_type::DELIVERY_REQUESTED,
            schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
        );
        restored.handle(&request, 1_000, &mut fx);
        assert_eq!(stages(&fx), [Stage::Created, Stage::HeadedToPickup]);
    }

    #[test]
    fn an_assignment_whose_request_never_comes_gives_the_drone_back_in_time() {
        let mut d = Deliveries::default();
        let mut fx = Effects::default();
        d.handle(&assigned(0, "fabrikam/lost"), 0, &mut fx);
        assert!(fx.outputs.is_empty());
        // Another delivery's records move processing time on.
        let request = record(
            1,
            h::event_type::DELIVERY_REQUESTED,
            schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
        );
        d.handle(&request, EARLY_WAIT_MS - 1, &mut fx);
        assert!(
            fx.outputs
                .iter()
                .all(|o| o.topic != topics::DRONE_SCHEDULING.name)
        );
        let mut fx = Effects::default();
        d.handle(
            &record(2, h::event_type::DELIVERY_CANCELLED, b"{}"),
            EARLY_WAIT_MS + 1_000,
            &mut fx,
        );
        let released: Vec<_> = fx
            .outputs
            .iter()
            .filter(|o| o.topic == topics::DRONE_SCHEDULING.name && o.key == b"47:-123")
            .collect();
        assert_eq!(
            released.len(),
            2,
            "the lost delivery's drone, and d1's cancel"
        );
        assert!(d.early[&1].is_empty());
    }

    #[test]
    fn drone_events_on_the_requests_topic_are_dead_letters() {
        let mut d = Deliveries::default();
        let mut fx = Effects::default();
        let mut forged = assigned(0, "fabrikam/d1");
        forged.topic = topics::DELIVERY_REQUESTS.name.into();
        d.handle(&forged, 0, &mut fx);
        assert_eq!(fx.outputs.len(), 1);
        assert_eq!(fx.outputs[0].topic, topics::DEAD_LETTERS.name);
        assert!(d.early.get(&1).is_none_or(HashMap::is_empty), "not waiting");
    }

    #[test]
    fn an_early_record_waits_while_its_request_may_still_be_behind() {
        let early = |at_ms| Early {
            since_ms: 0,
            at_ms,
            records: Vec::new(),
            bytes: 0,
        };
        let at = Some(1_000_000);
        let later = 1_000_000 + EARLY_SKEW_MS;
        // Never before the wait.
        assert!(!gives_up(
            &early(at),
            EARLY_WAIT_MS - 1,
            (later, EARLY_WAIT_MS - 1)
        ));
        // Older requests still being read: its own may be behind them, however long.
        for now in [EARLY_WAIT_MS, 10 * EARLY_WAIT_MS, 100 * EARLY_WAIT_MS] {
            assert!(!gives_up(&early(at), now, (999_000, now - 1)));
        }
        // A request stamped later than it (and the skew) was read.
        assert!(gives_up(&early(at), EARLY_WAIT_MS, (later, EARLY_WAIT_MS)));
        // The partition read no request for the wait: no backlog.
        assert!(gives_up(
            &early(at),
            2 * EARLY_WAIT_MS,
            (999_000, EARLY_WAIT_MS)
        ));
        // None read yet: the quiet counts from when the partition was first looked at.
        assert!(!gives_up(
            &early(at),
            5 * EARLY_WAIT_MS,
            (i64::MIN, 5 * EARLY_WAIT_MS - 1)
        ));
        assert!(gives_up(
            &early(at),
            6 * EARLY_WAIT_MS,
            (i64::MIN, 5 * EARLY_WAIT_MS)
        ));
        // Without an event time, processing time alone.
        assert!(gives_up(&early(None), EARLY_WAIT_MS, (0, EARLY_WAIT_MS)));
    }

    #[test]
    fn restored_waiting_records_wait_for_the_partitions_backlog_first() {
        let mut d = Deliveries::default();
        let mut fx = Effects::default();
        let mut early = assigned(0, "fabrikam/late");
        early
            .headers
            .push((h::EVENT_TIME.into(), b"5000000".to_vec()));
        d.handle(&early, 0, &mut fx);
        // A new owner restores it long after it began to wait, with a backlog to read.
        let mut restored = Deliveries::default();
        restored.restore(1, fx.changes.into_iter().collect());
        let restored_at = 10 * EARLY_WAIT_MS;
        let mut fx = Effects::default();
        restored.tick(1, restored_at, &mut fx);
        assert!(fx.outputs.is_empty(), "not at once after the restore");
        assert!(!restored.early[&1].is_empty());
        // Still no request read a wait later: nothing is behind; it gives up.
        let mut fx = Effects::default();
        restored.tick(1, restored_at + EARLY_WAIT_MS + 1_000, &mut fx);
        assert!(
            fx.outputs
                .iter()
                .any(|o| o.topic == topics::DRONE_SCHEDULING.name),
            "the drone is given back"
        );
    }

    #[test]
    fn a_backlog_of_requests_keeps_an_assignment_waiting_for_its_own() {
        let mut d = Deliveries::default();
        let mut fx = Effects::default();
        let stamped = |mut r: Record, at: i64| {
            r.headers
                .push((h::EVENT_TIME.into(), at.to_string().into_bytes()));
            r
        };
        d.handle(
            &stamped(assigned(0, "fabrikam/late"), 5_000_000),
            0,
            &mut fx,
        );
        // Older requests of other deliveries are read for many minutes of processing time.
        for (i, now) in (1..=30).zip((1..=30).map(|m| m * EARLY_WAIT_MS / 2)) {
            let mut request = stamped(
                record(
                    i,
                    h::event_type::DELIVERY_REQUESTED,
                    schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
                ),
                4_000_000,
            );
            request.topic = topics::DELIVERY_REQUESTS.name.into();
            request.key = Some(format!("fabrikam/other-{i}").into_bytes());
            let mut fx = Effects::default();
            d.handle(&request, now, &mut fx);
            assert!(
                fx.outputs
                    .iter()
                    .all(|o| o.topic != topics::DRONE_SCHEDULING.name),
                "no drone given back at {now}"
            );
        }
        // Its own request comes: applied after it.
        let mut request = stamped(
            record(
                9,
                h::event_type::DELIVERY_REQUESTED,
                schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
            ),
            4_500_000,
        );
        request.topic = topics::DELIVERY_REQUESTS.name.into();
        request.key = Some(b"fabrikam/late".to_vec());
        let mut fx = Effects::default();
        d.handle(&request, 16 * EARLY_WAIT_MS, &mut fx);
        assert_eq!(stages(&fx), [Stage::Created, Stage::HeadedToPickup]);
    }

    #[test]
    fn waiting_records_are_bounded_and_keep_the_assignment() {
        let mut d = Deliveries::default();
        let mut fx = Effects::default();
        d.handle(&assigned(0, "fabrikam/d1"), 0, &mut fx);
        let fix = |offset: i64, pad: usize| {
            Record {
            headers: vec![
                (
                    h::EVENT_TYPE.into(),
                    h::event_type::DRONE_POSITION_REPORTED.as_bytes().to_vec(),
                ),
                (h::DRONE_ID.into(), b"47:-123-s1".to_vec()),
            ],
            ..record(
                offset,
                h::event_type::DRONE_POSITION_REPORTED,
                format!(
                    r#"{{"latitude":47.6,"longitude":-122.3,"timestamp":"2026-11-24T10:00:00Z","pad":"{}"}}"#,
                    "x".repeat(pad)
                )
                .as_bytes(),
            )
        }
        };
        for offset in 1..200 {
            d.handle(&fix(offset, 4_000), 0, &mut fx);
        }
        // A replayed record is not held twice.
        d.handle(&fix(199, 4_000), 0, &mut fx);
        let waiting = &d.early[&1]["fabrikam/d1"];
        assert!(waiting.records.len() <= EARLY_RECORDS_PER_DELIVERY);
        assert!(
            waiting.bytes <= EARLY_BYTES_PER_DELIVERY,
            "{}",
            waiting.bytes
        );
        assert!(waiting.records[0].is_assignment(), "the assignment stays");
        assert_eq!(
            waiting.records.last().unwrap().offset,
            199,
            "the newest fixes stay"
        );
        assert_eq!(
            waiting.records.iter().filter(|r| r.offset == 199).count(),
            1
        );
        // Every changelog value written stays under the per-delivery budget (plus JSON).
        let waiting_key = waiting_key("fabrikam/d1");
        assert!(
            fx.changes
                .iter()
                .filter(|(k, _)| *k == waiting_key)
                .all(|(_, v)| v.len() < 2 * EARLY_BYTES_PER_DELIVERY)
        );
    }

    fn at(mut r: Record, ms: i64) -> Record {
        r.headers
            .push((h::INGEST_TIME.into(), ms.to_string().into_bytes()));
        r
    }

    fn write(log: &mut HashMap<Vec<u8>, Vec<u8>>, fx: &Effects) {
        for (k, v) in &fx.changes {
            if v.is_empty() {
                log.remove(k);
            } else {
                log.insert(k.clone(), v.clone());
            }
        }
    }

    #[test]
    fn a_finished_delivery_is_deleted_after_the_retention_in_event_time() {
        let t0 = 1_800_000_000_000;
        let retention = Duration::from_secs(2);
        let mut d = Deliveries::new(retention);
        let mut log = HashMap::new();
        let mut fx = Effects::default();
        let request = record(
            0,
            h::event_type::DELIVERY_REQUESTED,
            schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
        );
        d.handle(&at(request, t0), 0, &mut fx);
        // Unfinished deliveries stay whatever the time.
        d.tick(1, t0 + 9_000, &mut fx);
        d.tick(1, t0 + 10_000, &mut fx);
        assert!(d.states[&1].contains_key("fabrikam/d1"));
        let cancel = record(1, h::event_type::DELIVERY_CANCELLED, b"{}");
        d.handle(&at(cancel, t0 + 20_000), 0, &mut fx);
        write(&mut log, &fx);
        // The changelog value is the state (as the status view reads it) and its time.
        let stored: DeliveryState = serde_json::from_slice(&log[&b"fabrikam/d1".to_vec()]).unwrap();
        assert_eq!(stored.stage, schemas::tracking::Stage::Cancelled);
        assert_eq!(
            stored.cancel_reason,
            Some(schemas::tracking::CancelReason::ByTenant)
        );
        // A restore keeps when it finished.
        let mut restored = Deliveries::new(retention);
        restored.restore(1, log.clone());
        for d in [&mut d, &mut restored] {
            let mut fx = Effects::default();
            d.tick(1, t0 + 20_999, &mut fx);
            d.tick(1, t0 + 21_999, &mut fx);
            assert!(fx.changes.is_empty(), "not yet");
            d.tick(1, t0 + 22_000, &mut fx);
            assert_eq!(fx.changes, vec![(b"fabrikam/d1".to_vec(), Vec::new())]);
            assert!(d.states[&1].is_empty() && d.finished[&1].is_empty());
        }
    }

    #[test]
    fn stream_time_of_busy_partitions_is_event_time_not_the_wall_clock() {
        let t0 = 1_800_000_000_000;
        let mut d = Deliveries::new(Duration::from_secs(60));
        let mut fx = Effects::default();
        let request = record(
            0,
            h::event_type::DELIVERY_REQUESTED,
            schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
        );
        d.handle(&at(request, t0), 0, &mut fx);
        d.handle(
            &at(record(1, h::event_type::DELIVERY_CANCELLED, b"{}"), t0),
            0,
            &mut fx,
        );
        // Replaying a backlog an hour later: each tick follows a batch, so event time rules.
        for i in 0..5 {
            let mut fx = Effects::default();
            let other = Record {
                key: Some(format!("fabrikam/o{i}").into_bytes()),
                ..at(
                    record(2 + i, h::event_type::DELIVERY_CANCELLED, b"{}"),
                    t0 + i * 1_000,
                )
            };
            d.handle(&other, t0 + 3_600_000, &mut fx);
            d.tick(1, t0 + 3_600_000, &mut fx);
            assert!(fx.changes.is_empty());
        }
        let mut fx = Effects::default();
        let later = Record {
            key: Some(b"fabrikam/o9".to_vec()),
            ..at(
                record(9, h::event_type::DELIVERY_CANCELLED, b"{}"),
                t0 + 60_000,
            )
        };
        d.handle(&later, t0 + 3_600_000, &mut fx);
        d.tick(1, t0 + 3_600_000, &mut fx);
        assert_eq!(fx.changes, vec![(b"fabrikam/d1".to_vec(), Vec::new())]);
    }

    #[test]
    fn a_rejection_cancels_with_its_reason_even_before_its_request() {
        let mut d = Deliveries::default();
        let mut fx = Effects::default();
        let rejection = SchedulingRejected {
            reason: "region 47:-123 already has 1000 requests waiting for a drone".into(),
            code: schemas::tracking::CancelReason::QueueFull,
        };
        d.handle(
            &record(
                0,
                h::event_type::DELIVERY_REJECTED,
                &serde_json::to_vec(&rejection).unwrap(),
            ),
            0,
            &mut fx,
        );
        assert!(fx.outputs.is_empty(), "waits for its request");
        let request = record(
            1,
            h::event_type::DELIVERY_REQUESTED,
            schemas::delivery::EXAMPLE_REQUEST.as_bytes(),
        );
        d.handle(&request, 1_000, &mut fx);
        assert_eq!(stages(&fx), [Stage::Created, Stage::Cancelled]);
        let cancelled = stage_changes(&fx).pop().unwrap();
        assert_eq!(cancelled.cancel_reason, Some(rejection.code));
        assert_eq!(
            cancelled.cancel_detail.as_deref(),
            Some(rejection.reason.as_str())
        );
        assert!(
            fx.outputs
                .iter()
                .all(|o| o.topic != topics::DRONE_SCHEDULING.name),
            "the scheduler dropped it already"
        );
        let state = &d.states[&1]["fabrikam/d1"].state;
        assert_eq!(state.cancel_reason, Some(rejection.code));
    }
}
