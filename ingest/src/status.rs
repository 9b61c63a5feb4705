//! The read side of delivery state: `GET /api/deliveries/{id}` and
//! `GET /api/deliveries/{id}/status`, and the source of the live events (SSE) of
//! `GET /api/deliveries/{id}/events`, `GET /api/deliveries/events` and the tracking
//! links: every new version of a delivery's state becomes one event (`live.rs`), kept
//! for reconnecting clients within `--sse-replay-bytes` and pushed to its subscribers.
//! Any replica serves any delivery: the events come from the topic, not from who
//! posted what.
//!
//! A background task tails the `delivery-state` changelog (every partition, from the
//! start; the delivery consumer writes each delivery's latest state there) into a map
//! by delivery key. Answers are as fresh as that tail: usually milliseconds behind the
//! delivery consumer. A tenant only sees its own deliveries (the key is
//! `tenant/deliveryId`); anything else is 404.
//!
//! The map holds what `delivery-state` holds: every live delivery, and finished ones
//! until the delivery consumer's `--finished-retention` deletes them (a tombstone, an
//! empty value, removes the key here too: the routes answer 404 then). It is also
//! bounded on its own: past `max_deliveries` (`--status-max-deliveries`), the
//! deliveries that finished first are forgotten first, then the oldest seen, each
//! counted in `status_view_evicted_total` and answered 404 from then on, though the
//! delivery consumer may still know them (their events stay in the Parquet history).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};

use bus::ClientSettings;
use bytes::Bytes;
use schemas::tracking::DeliveryState;
use tokio_util::sync::CancellationToken;

use crate::live::{Frames, Log, Refused, Sent, Subscribers, Subscription};

/// One delivery: its latest state and its recent live frames.
#[derive(Debug)]
struct Entry {
    state: Arc<DeliveryState>,
    log: Log,
}

#[derive(Debug, Default)]
struct Map {
    by_key: HashMap<String, Entry>,
    /// Keys of deliveries that reached a final stage, in that order.
    finished: VecDeque<String>,
    /// Every key in the order it was first seen (for when no finished one is left).
    seen: VecDeque<String>,
    /// Bytes of every entry's log.
    log_bytes: usize,
    /// Keys in the order their log was started (the oldest logs go first past the
    /// budget).
    logged: VecDeque<String>,
}

impl Map {
    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.by_key.remove(key) {
            self.log_bytes -= entry.log.bytes();
        }
    }
}

/// What following a delivery gives.
#[derive(Debug)]
pub(crate) enum Followed {
    /// Its frames after the client's last, then what comes.
    Live(Vec<Sent>, Subscription),
    /// It is over and the client has every frame up to its end.
    Over,
}

/// Why a delivery cannot be followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unfollowable {
    /// Unknown to the caller's tenant.
    NotFound,
    /// Too many subscribers.
    Refused(Refused),
}

/// Bounds of the live events.
#[derive(Debug, Clone, Copy)]
pub struct LiveLimits {
    /// Most SSE subscribers in all.
    pub max_subscribers: usize,
    /// Most SSE subscribers of one tenant.
    pub max_subscribers_per_tenant: usize,
    /// Bytes of recent frames kept for reconnecting clients, all deliveries together.
    pub replay_bytes: usize,
}

impl Default for LiveLimits {
    fn default() -> Self {
        Self {
            max_subscribers: 1_000,
            max_subscribers_per_tenant: 100,
            replay_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Every delivery's latest state, as read from `delivery-state`, and its live events.
#[derive(Debug)]
pub struct StatusView {
    map: RwLock<Map>,
    max_deliveries: usize,
    replay_bytes: usize,
    subscribers: Arc<Subscribers>,
}

impl StatusView {
    /// Starts tailing `delivery-state`; the task stops with `shutdown`.
    pub fn start(
        settings: ClientSettings,
        max_deliveries: usize,
        live: LiveLimits,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let view = Arc::new(Self::new(max_deliveries, live));
        let tail_view = Arc::clone(&view);
        // (Its readiness is not used: the changelog is written in transactions.)
        let _ = bus::spawn_tail(
            settings,
            schemas::topics::DELIVERY_STATE.name,
            schemas::topics::DELIVERY_STATE.partitions,
            "status view",
            shutdown,
            move |key, payload| {
                // Keys starting with a control byte are the processor's own (offset
                // markers, records waiting for their request).
                let own = matches!(key.first(), Some(&schemas::topics::CHANGELOG_MARKER | 1));
                if let (false, Ok(key)) = (own, std::str::from_utf8(key)) {
                    tail_view.apply(key, payload);
                }
            },
        );
        view
    }

    fn new(max_deliveries: usize, live: LiveLimits) -> Self {
        Self {
            map: RwLock::new(Map::default()),
            max_deliveries: max_deliveries.max(1),
            replay_bytes: live.replay_bytes,
            subscribers: Subscribers::new(live.max_subscribers, live.max_subscribers_per_tenant),
        }
    }

    fn apply(&self, key: &str, payload: &[u8]) {
        let Ok(mut map) = self.map.write() else {
            return;
        };
        if payload.is_empty() {
            // `finished` and `seen` keep the key; it is skipped when it comes up.
            map.remove(key);
            return;
        }
        let Ok(state) = serde_json::from_slice::<DeliveryState>(payload) else {
            return;
        };
        let finished = state.stage.is_final();
        let previous = map
            .by_key
            .get(key)
            .map(|e| (e.state.stage, e.state.version));
        let was_finished = previous.is_some_and(|(stage, _)| stage.is_final());
        // A version older than the one held (a replay after a processor's restart) is
        // not taken: the view never goes back, and its events are not sent again.
        if previous.is_some_and(|(_, v)| state.version > 0 && state.version < v) {
            return;
        }
        // A version seen already (the same replayed) is not news.
        let frames = (state.version > previous.map_or(0, |(_, v)| v))
            .then(|| Frames::of(&state))
            .flatten();
        let state = Arc::new(state);
        let Map {
            by_key,
            seen,
            log_bytes,
            logged,
            ..
        } = &mut *map;
        let entry = match by_key.entry(key.to_owned()) {
            std::collections::hash_map::Entry::Occupied(mut o) => {
                o.get_mut().state = Arc::clone(&state);
                o.into_mut()
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                seen.push_back(key.to_owned());
                v.insert(Entry {
                    state: Arc::clone(&state),
                    log: Log::default(),
                })
            }
        };
        if let Some(frames) = frames {
            if entry.log.bytes() == 0 {
                logged.push_back(key.to_owned());
            }
            let grew = entry.log.push(Arc::clone(&frames));
            *log_bytes = log_bytes.saturating_add_signed(grew);
            self.subscribers.publish(&state.owner_id, key, &frames);
        }
        if finished && !was_finished {
            map.finished.push_back(key.to_owned());
        }
        // Past the replay budget, the oldest logs go (their deliveries are still
        // followed; a client reconnecting then gets their latest state).
        while map.log_bytes > self.replay_bytes {
            let Some(oldest) = map.logged.pop_front() else {
                break;
            };
            let Map {
                by_key, log_bytes, ..
            } = &mut *map;
            if let Some(entry) = by_key.get_mut(&oldest) {
                *log_bytes -= entry.log.bytes();
                entry.log = Log::default();
            }
        }
        metrics::gauge!("sse_replay_bytes").set(map.log_bytes as f64);
        // Finished ones go first, then the oldest of the rest.
        while map.by_key.len() > self.max_deliveries {
            let (oldest, finished) = match map.finished.pop_front() {
                Some(key) => (key, true),
                None => match map.seen.pop_front() {
                    Some(key) => (key, false),
                    None => break,
                },
            };
            // Keys deleted (or no longer finished) since they were queued are skipped.
            let current = map
                .by_key
                .get(&oldest)
                .is_some_and(|e| !finished || e.state.stage.is_final());
            if current {
                map.remove(&oldest);
                metrics::counter!("status_view_evicted_total").increment(1);
            }
        }
        // `finished`, `seen` and `logged` keep keys already gone; trim them when mostly
        // stale.
        let live = map.by_key.len();
        if map.seen.len() > 2 * live + 1024 {
            let Map { by_key, seen, .. } = &mut *map;
            seen.retain(|k| by_key.contains_key(k));
        }
        if map.finished.len() > 2 * live + 1024 {
            let Map {
                by_key, finished, ..
            } = &mut *map;
            finished.retain(|k| by_key.get(k).is_some_and(|e| e.state.stage.is_final()));
        }
        if map.logged.len() > 2 * live + 1024 {
            let Map { by_key, logged, .. } = &mut *map;
            logged.retain(|k| by_key.get(k).is_some_and(|e| e.log.bytes() > 0));
        }
    }

    /// The state of `tenant`'s delivery `delivery_id`, if known.
    pub fn get(&self, tenant: &str, delivery_id: &str) -> Option<Arc<DeliveryState>> {
        let key = schemas::delivery_key(tenant, delivery_id);
        self.map
            .read()
            .ok()?
            .by_key
            .get(&key)
            .map(|e| Arc::clone(&e.state))
    }

    /// Follows `tenant`'s delivery `delivery_id`: its frames after version `after` (all
    /// it keeps without one), then a subscription to what comes next, with nothing
    /// between them missed or repeated. When the frames kept do not reach its latest
    /// version (their log went past the replay budget), its latest state comes last.
    pub(crate) fn follow(
        &self,
        tenant: &str,
        delivery_id: &str,
        after: Option<u64>,
    ) -> Result<Followed, Unfollowable> {
        let key = schemas::delivery_key(tenant, delivery_id);
        // The read lock keeps `apply` (which publishes under the write lock) out until
        // the subscription is in place.
        let map = self.map.read().map_err(|_| Unfollowable::NotFound)?;
        let entry = map.by_key.get(&key).ok_or(Unfollowable::NotFound)?;
        let after = after.unwrap_or(0);
        let mut frames = entry.log.after(after);
        let latest = entry.state.version;
        if latest > after && frames.last().is_none_or(|f| f.version < latest) {
            frames.extend(Frames::of(&entry.state));
        }
        if entry.state.stage.is_final() && frames.is_empty() {
            // Over, and the client has seen its end: nothing will come.
            return Ok(Followed::Over);
        }
        let subscription = self
            .subscribers
            .delivery(tenant, &key)
            .map_err(Unfollowable::Refused)?;
        drop(map);
        Ok(Followed::Live(
            frames.iter().map(|f| (f.with_id.clone(), f.last)).collect(),
            subscription,
        ))
    }

    /// Follows every delivery of `tenant` from now on.
    pub(crate) fn follow_tenant(&self, tenant: &str) -> Result<Subscription, Refused> {
        self.subscribers.tenant(tenant)
    }

    /// How many SSE subscribers it has.
    pub fn subscribers(&self) -> usize {
        self.subscribers.len()
    }

    /// How many deliveries it holds.
    pub fn len(&self) -> usize {
        self.map.read().map_or(0, |m| m.by_key.len())
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The body of `GET /api/deliveries/{id}`: the whole state.
pub(crate) fn delivery_body(state: &DeliveryState) -> Bytes {
    Bytes::from(serde_json::to_vec(state).unwrap_or_default())
}

/// The body of `GET /api/deliveries/{id}/status`: the reference implementation's
/// fields, and why a cancelled delivery was cancelled (`cancelReason`, `cancelDetail`).
pub(crate) fn status_body(state: &DeliveryState) -> Bytes {
    let mut body = serde_json::json!({
        "deliveryId": state.delivery_id,
        "stage": state.stage,
        "lastKnownLocation": state.last_known_location,
        "pickupETA": state.pickup_eta,
        "deliveryETA": state.delivery_eta,
        "droneId": state.drone_id,
    });
    if let Some(reason) = state.cancel_reason {
        body["cancelReason"] = serde_json::json!(reason);
    }
    if let Some(detail) = &state.cancel_detail {
        body["cancelDetail"] = serde_json::json!(detail);
    }
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::delivery::Location;
    use schemas::tracking::Stage;

    fn state(id: &str, stage: Stage) -> Vec<u8> {
        let here = Location {
            latitude: 1.0,
            longitude: 2.0,
        };
        serde_json::to_vec(&DeliveryState {
            delivery_id: id.into(),
            owner_id: "t".into(),
            stage,
            drone_id: None,
            last_known_location: here,
            pickup_eta: None,
            delivery_eta: None,
            pickup_location: here,
            drop_off_location: here,
            pickup_time: String::new(),
            deadline: String::new(),
            package_size: schemas::PackageSize::Small,
            package_weight: 1.0,
            drone_region: None,
            drone_speed_mps: None,
            seq: 1,
            version: 1,
            change: None,
            updated_at: String::new(),
            cancel_reason: None,
            cancel_detail: None,
        })
        .unwrap()
    }

    #[test]
    fn tenants_see_their_own_and_finished_ones_go_first_past_the_bound() {
        let view = StatusView::new(2, LiveLimits::default());
        view.apply("t/a", &state("a", Stage::Completed));
        view.apply("t/b", &state("b", Stage::Created));
        assert!(view.get("t", "a").is_some());
        assert!(view.get("other", "a").is_none());
        view.apply("t/c", &state("c", Stage::Created));
        assert!(view.get("t", "a").is_none(), "the finished one went");
        assert!(view.get("t", "b").is_some() && view.get("t", "c").is_some());
        // With none finished, the oldest goes.
        view.apply("t/d", &state("d", Stage::Created));
        assert!(view.get("t", "b").is_none());
        assert_eq!(view.len(), 2);
        let body: serde_json::Value =
            serde_json::from_slice(&status_body(&view.get("t", "c").unwrap())).unwrap();
        assert_eq!(body["stage"], "Created");
        assert!(body.get("lastKnownLocation").is_some());
        assert!(body.get("cancelReason").is_none());
    }

    #[test]
    fn tombstones_remove_deliveries_and_stale_queue_entries_are_skipped() {
        let view = StatusView::new(2, LiveLimits::default());
        view.apply("t/a", &state("a", Stage::Completed));
        view.apply("t/a", &[]);
        assert!(view.get("t", "a").is_none(), "deleted: 404");
        assert!(view.is_empty());
        // `a` is still queued as finished: past the bound it is skipped, and the oldest
        // live one goes instead.
        view.apply("t/b", &state("b", Stage::Created));
        view.apply("t/c", &state("c", Stage::Created));
        view.apply("t/d", &state("d", Stage::Created));
        assert_eq!(view.len(), 2);
        assert!(view.get("t", "b").is_none());
        assert!(view.get("t", "c").is_some() && view.get("t", "d").is_some());
        // A cancelled delivery says why.
        let mut cancelled: DeliveryState =
            serde_json::from_slice(&state("e", Stage::Cancelled)).unwrap();
        cancelled.cancel_reason = Some(schemas::tracking::CancelReason::DeadlinePassed);
        cancelled.cancel_detail = Some("no drone was free before the deadline".into());
        let body: serde_json::Value = serde_json::from_slice(&status_body(&cancelled)).unwrap();
        assert_eq!(body["cancelReason"], "DeadlinePassed");
        assert!(body["cancelDetail"].as_str().unwrap().contains("deadline"));
    }
}
