//! The read side of delivery state: `GET /api/deliveries/{id}` and
//! `GET /api/deliveries/{id}/status`.
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
use std::time::Duration;

use bus::ClientSettings;
use bytes::Bytes;
use schemas::tracking::DeliveryState;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct Map {
    by_key: HashMap<String, Arc<DeliveryState>>,
    /// Keys of deliveries that reached a final stage, in that order.
    finished: VecDeque<String>,
    /// Every key in the order it was first seen (for when no finished one is left).
    seen: VecDeque<String>,
}

/// Every delivery's latest state, as read from `delivery-state`.
#[derive(Debug)]
pub struct StatusView {
    map: RwLock<Map>,
    max_deliveries: usize,
}

impl StatusView {
    /// Starts tailing `delivery-state`; the task stops with `shutdown`.
    pub fn start(
        settings: ClientSettings,
        max_deliveries: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let view = Arc::new(Self {
            map: RwLock::new(Map::default()),
            max_deliveries: max_deliveries.max(1),
        });
        let tail_view = Arc::clone(&view);
        tokio::spawn(async move {
            let topic = schemas::topics::DELIVERY_STATE.name;
            // The topic may not exist yet while the cluster starts: retry.
            let consumer = loop {
                let settings = settings.clone();
                let made = tokio::task::spawn_blocking(move || {
                    bus::Consumer::tail(&settings, topic, Duration::from_secs(5))
                })
                .await;
                match made {
                    Ok(Ok(consumer)) => break consumer,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "status view: cannot tail {topic} yet")
                    }
                    Err(e) => tracing::warn!(error = %e, "status view: task failed"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            };
            loop {
                let received = tokio::select! {
                    () = shutdown.cancelled() => return,
                    received = consumer.recv() => received,
                };
                match received {
                    Ok(record) => {
                        let key = record.key().and_then(|k| std::str::from_utf8(k).ok());
                        // Keys starting with a control byte are the processor's own
                        // (offset markers, records waiting for their request).
                        let marker = char::from(schemas::topics::CHANGELOG_MARKER);
                        if let Some(key) = key.filter(|k| !k.starts_with([marker, '\u{1}'])) {
                            tail_view.apply(key, record.payload().unwrap_or_default());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "status view: receive failed"),
                }
            }
        });
        view
    }

    fn apply(&self, key: &str, payload: &[u8]) {
        let Ok(mut map) = self.map.write() else {
            return;
        };
        if payload.is_empty() {
            // `finished` and `seen` keep the key; it is skipped when it comes up.
            map.by_key.remove(key);
            return;
        }
        let Ok(state) = serde_json::from_slice::<DeliveryState>(payload) else {
            return;
        };
        let finished = state.stage.is_final();
        let was_finished = map.by_key.get(key).is_some_and(|s| s.stage.is_final());
        if map.by_key.insert(key.to_owned(), Arc::new(state)).is_none() {
            map.seen.push_back(key.to_owned());
        }
        if finished && !was_finished {
            map.finished.push_back(key.to_owned());
        }
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
                .is_some_and(|s| !finished || s.stage.is_final());
            if current {
                map.by_key.remove(&oldest);
                metrics::counter!("status_view_evicted_total").increment(1);
            }
        }
        // `finished` and `seen` keep keys already gone; trim them when mostly stale.
        if map.seen.len() > 2 * map.by_key.len() + 1024 {
            let Map { by_key, seen, .. } = &mut *map;
            seen.retain(|k| by_key.contains_key(k));
        }
        if map.finished.len() > 2 * map.by_key.len() + 1024 {
            let Map {
                by_key, finished, ..
            } = &mut *map;
            finished.retain(|k| by_key.get(k).is_some_and(|s| s.stage.is_final()));
        }
    }

    /// The state of `tenant`'s delivery `delivery_id`, if known.
    pub fn get(&self, tenant: &str, delivery_id: &str) -> Option<Arc<DeliveryState>> {
        let key = schemas::delivery_key(tenant, delivery_id);
        self.map.read().ok()?.by_key.get(&key).cloned()
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
            updated_at: String::new(),
            cancel_reason: None,
            cancel_detail: None,
        })
        .unwrap()
    }

    #[test]
    fn tenants_see_their_own_and_finished_ones_go_first_past_the_bound() {
        let view = StatusView {
            map: RwLock::new(Map::default()),
            max_deliveries: 2,
        };
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
        let view = StatusView {
            map: RwLock::new(Map::default()),
            max_deliveries: 2,
        };
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
