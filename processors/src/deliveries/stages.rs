//! A delivery's life: how each input moves its state and what that makes the pipeline
//! say. Pure: no I/O, the time is an argument.
//!
//! Inputs arrive in order on the delivery's key. Every one is idempotent: a repeated
//! request, assignment or position changes nothing more the second time.
//!
//! It must not know topics, records or the changelog: the delivery consumer (the parent
//! module) turns records into [`Input`]s and [`Effects`] into outputs.

use chrono::{DateTime, Utc};
use schemas::delivery::Location;
use schemas::telemetry::PositionFix;
use schemas::tracking::{
    Assignment, CancelReason, DeliveryEvent, DeliveryState, DroneReleased, EventKind, Stage,
};
use schemas::{DeliveryRequest, DeliveryReschedule};

use crate::geo::{distance_m, flight_ms};

/// How close a drone must be to a pickup or drop-off to count as there, metres.
pub const ARRIVAL_RADIUS_M: f64 = 30.0;

/// One input of the delivery consumer.
#[derive(Debug, Clone)]
pub enum Input<'a> {
    /// The request (first record of every delivery).
    Requested {
        /// The tenant.
        tenant: &'a str,
        /// The delivery id.
        delivery_id: &'a str,
        /// The request.
        request: &'a DeliveryRequest<'a>,
    },
    /// New pickup time, deadline or drop-off.
    Rescheduled(&'a DeliveryReschedule),
    /// Cancelled by the tenant.
    Cancelled,
    /// The scheduler gave it up (no drone can carry it, its region's queue was full, or
    /// no drone was free in time): it is cancelled with that reason. The scheduler has
    /// already dropped it from its queue.
    Rejected {
        /// Why, for programs.
        code: CancelReason,
        /// What happened, for people.
        detail: &'a str,
    },
    /// A drone was assigned.
    Assigned(&'a Assignment),
    /// The assigned drone reported its position.
    Position {
        /// The drone.
        drone_id: &'a str,
        /// Its fix.
        fix: &'a PositionFix,
    },
}

/// What a transition makes the pipeline say besides the new state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    /// Stage transitions, in order (each also the new state's `change`: `stage`).
    pub events: Vec<DeliveryEvent>,
    /// A drone to give back to its region's scheduler: (region, release).
    pub release: Option<(String, DroneReleased)>,
    /// A waiting request the scheduler of its pickup region should drop.
    pub unschedule: Option<String>,
    /// New times the scheduler of its pickup region should give a waiting request.
    pub reschedule: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The region to send a scheduling cancel to: the pickup's.
pub fn pickup_region(state: &DeliveryState) -> String {
    schemas::delivery::region_of(state.pickup_location)
}

/// Applies `input` to the delivery's `state` (None before its request) at `now_ms`.
pub fn apply(
    state: Option<DeliveryState>,
    input: &Input<'_>,
    now_ms: i64,
) -> (Option<DeliveryState>, Effects) {
    let mut effects = Effects::default();
    let now = rfc3339(now_ms);
    let transition = |state: &mut DeliveryState, stage: Stage, effects: &mut Effects| {
        state.stage = stage;
        state.seq += 1;
        state.version += 1;
        state.change = Some(EventKind::Stage);
        state.updated_at.clone_from(&now);
        effects.events.push(DeliveryEvent::of(state));
    };
    let release = |state: &DeliveryState, position: Location| -> Option<(String, DroneReleased)> {
        Some((
            state.drone_region.clone()?,
            DroneReleased {
                drone_id: state.drone_id.clone()?,
                delivery_key: schemas::delivery_key(&state.owner_id, &state.delivery_id),
                position,
                at: now_ms,
            },
        ))
    };
    match (state, input) {
        (
            None,
            Input::Requested {
                tenant,
                delivery_id,
                request,
            },
        ) => {
            let mut state = DeliveryState {
                delivery_id: (*delivery_id).to_owned(),
                owner_id: (*tenant).to_owned(),
                stage: Stage::Created,
                drone_id: None,
                last_known_location: request.pickup_location,
                pickup_eta: None,
                delivery_eta: None,
                pickup_location: request.pickup_location,
                drop_off_location: request.drop_off_location,
                pickup_time: request.pickup_time.to_rfc3339(),
                deadline: request.deadline.to_rfc3339(),
                package_size: request.package_info.size,
                package_weight: request.package_info.weight,
                drone_region: None,
                drone_speed_mps: None,
                seq: 0,
                version: 0,
                change: None,
                updated_at: now.clone(),
                cancel_reason: None,
                cancel_detail: None,
            };
            transition(&mut state, Stage::Created, &mut effects);
            (Some(state), effects)
        }
        (None, Input::Assigned(a)) => {
            // An assignment for a delivery this consumer never saw: give the drone back.
            effects.release = Some((
                a.region.clone(),
                DroneReleased {
                    drone_id: a.drone_id.clone(),
                    delivery_key: a.delivery_key.clone(),
                    position: a.from,
                    at: now_ms,
                },
            ));
            (None, effects)
        }
        (None, _) => (None, effects),
        (Some(state), Input::Requested { .. }) => (Some(state), effects),
        (Some(mut state), Input::Rescheduled(change)) => {
            if matches!(state.stage, Stage::Created | Stage::Rescheduled) {
                if let Some(t) = change.pickup_time {
                    state.pickup_time = t.to_rfc3339();
                }
                if let Some(t) = change.deadline {
                    state.deadline = t.to_rfc3339();
                }
                transition(&mut state, Stage::Rescheduled, &mut effects);
                effects.reschedule = Some(pickup_region(&state));
            }
            (Some(state), effects)
        }
        (Some(mut state), Input::Cancelled | Input::Rejected { .. }) => {
            if !state.stage.is_final() {
                if state.stage.has_drone() {
                    effects.release = release(&state, state.last_known_location);
                } else if matches!(input, Input::Cancelled) {
                    effects.unschedule = Some(pickup_region(&state));
                }
                match input {
                    Input::Rejected { code, detail } => {
                        state.cancel_reason = Some(*code);
                        state.cancel_detail = Some((*detail).to_owned());
                    }
                    _ => state.cancel_reason = Some(CancelReason::ByTenant),
                }
                transition(&mut state, Stage::Cancelled, &mut effects);
            }
            (Some(state), effects)
        }
        (Some(mut state), Input::Assigned(a)) => {
            let same_drone = state.drone_id.as_deref() == Some(a.drone_id.as_str());
            if same_drone && !state.stage.is_final() {
                return (Some(state), effects);
            }
            if state.stage.is_final() || state.stage.has_drone() {
                // A final delivery always gives the drone back (a replayed assignment of
                // its own drone too: the scheduler ignores releases that do not match).
                // Cancelled (or already flown by another drone) meanwhile: not needed.
                effects.release = Some((
                    a.region.clone(),
                    DroneReleased {
                        drone_id: a.drone_id.clone(),
                        delivery_key: a.delivery_key.clone(),
                        position: a.from,
                        at: now_ms,
                    },
                ));
                return (Some(state), effects);
            }
            state.drone_id = Some(a.drone_id.clone());
            state.drone_region = Some(a.region.clone());
            state.drone_speed_mps = Some(a.speed_mps);
            state.last_known_location = a.from;
            state.pickup_eta = Some(rfc3339(a.pickup_eta));
            state.delivery_eta = Some(rfc3339(a.delivery_eta));
            transition(&mut state, Stage::HeadedToPickup, &mut effects);
            (Some(state), effects)
        }
        (Some(mut state), Input::Position { drone_id, fix }) => {
            if !state.stage.has_drone() || state.drone_id.as_deref() != Some(*drone_id) {
                return (Some(state), effects);
            }
            let here = Location {
                latitude: fix.latitude,
                longitude: fix.longitude,
            };
            state.last_known_location = here;
            let seq = state.seq;
            let speed = state.drone_speed_mps.unwrap_or(10.0);
            let to_dropoff =
                |from: Location| flight_ms(distance_m(from, state.drop_off_location), speed);
            if state.stage == Stage::HeadedToPickup {
                if distance_m(here, state.pickup_location) <= ARRIVAL_RADIUS_M {
                    state.pickup_eta = Some(now.clone());
                    state.delivery_eta = Some(rfc3339(now_ms + to_dropoff(here)));
                    transition(&mut state, Stage::HeadedToDropoff, &mut effects);
                } else {
                    let ready = DateTime::parse_from_rfc3339(&state.pickup_time)
                        .map_or(0, |t| t.timestamp_millis());
                    let pickup = (now_ms
                        + flight_ms(distance_m(here, state.pickup_location), speed))
                    .max(ready);
                    state.pickup_eta = Some(rfc3339(pickup));
                    state.delivery_eta = Some(rfc3339(pickup + to_dropoff(state.pickup_location)));
                    state.updated_at.clone_from(&now);
                }
            } else if distance_m(here, state.drop_off_location) <= ARRIVAL_RADIUS_M {
                state.delivery_eta = Some(now.clone());
                effects.release = release(&state, here);
                transition(&mut state, Stage::Completed, &mut effects);
            } else {
                state.delivery_eta = Some(rfc3339(now_ms + to_dropoff(here)));
                state.updated_at.clone_from(&now);
            }
            // A fix that moved it to a stage is that stage's change; any other is one of
            // its own.
            if state.seq == seq {
                state.version += 1;
                state.change = Some(EventKind::Position);
            }
            (Some(state), effects)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn fix(latitude: f64, longitude: f64) -> PositionFix {
        PositionFix {
            latitude,
            longitude,
            timestamp: DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z").unwrap(),
            altitude: None,
            speed: None,
            heading: None,
            battery: None,
        }
    }

    fn assignment(request: &DeliveryRequest<'_>, drone: &str) -> Assignment {
        Assignment {
            drone_id: drone.into(),
            region: "47:-123".into(),
            delivery_key: "fabrikam/d1".into(),
            delivery_id: "d1".into(),
            from: Location {
                latitude: 47.5,
                longitude: -122.5,
            },
            pickup: request.pickup_location,
            drop_off: request.drop_off_location,
            speed_mps: 20.0,
            assigned_at: NOW,
            pickup_eta: NOW + 60_000,
            delivery_eta: NOW + 120_000,
        }
    }

    #[test]
    fn a_delivery_goes_through_every_stage_in_order_once() {
        let request =
            schemas::parse_delivery_request(schemas::delivery::EXAMPLE_REQUEST.as_bytes()).unwrap();
        let requested = Input::Requested {
            tenant: "fabrikam",
            delivery_id: "d1",
            request: &request,
        };
        let (state, fx) = apply(None, &requested, NOW);
        assert_eq!(fx.events.len(), 1);
        let state = state.unwrap();
        assert_eq!(state.stage, Stage::Created);
        // Repeated: nothing more.
        let (state, fx) = apply(Some(state), &requested, NOW);
        assert!(fx.events.is_empty());

        let a = assignment(&request, "r1");
        let (state, fx) = apply(state, &Input::Assigned(&a), NOW);
        let state = state.unwrap();
        assert_eq!(state.stage, Stage::HeadedToPickup);
        assert!(state.pickup_eta.is_some() && state.delivery_eta.is_some());
        assert_eq!(fx.events[0].seq, 2);
        let (state, fx) = apply(Some(state), &Input::Assigned(&a), NOW);
        assert!(fx.events.is_empty() && fx.release.is_none(), "idempotent");

        // Flying: ETA updates without events, then the pickup, then the drop-off.
        let far = fix(47.55, -122.4);
        let (state, fx) = apply(
            state,
            &Input::Position {
                drone_id: "r1",
                fix: &far,
            },
            NOW + 1000,
        );
        assert!(fx.events.is_empty());
        let p = request.pickup_location;
        let at_pickup = fix(p.latitude, p.longitude);
        let (state, fx) = apply(
            state,
            &Input::Position {
                drone_id: "r1",
                fix: &at_pickup,
            },
            NOW + 2000,
        );
        assert_eq!(fx.events[0].stage, Stage::HeadedToDropoff);
        // Another drone's fix is ignored.
        let d = request.drop_off_location;
        let at_dropoff = fix(d.latitude, d.longitude);
        let (state, fx) = apply(
            state,
            &Input::Position {
                drone_id: "r2",
                fix: &at_dropoff,
            },
            NOW + 3000,
        );
        assert!(fx.events.is_empty());
        let (state, fx) = apply(
            state,
            &Input::Position {
                drone_id: "r1",
                fix: &at_dropoff,
            },
            NOW + 4000,
        );
        let state = state.unwrap();
        assert_eq!(state.stage, Stage::Completed);
        assert_eq!(fx.events[0].seq, 4);
        let (region, released) = fx.release.unwrap();
        assert_eq!(region, "47:-123");
        assert_eq!(released.drone_id, "r1");
        assert_eq!(released.delivery_key, "fabrikam/d1");
        // After completion nothing moves it.
        let (_, fx) = apply(Some(state), &Input::Cancelled, NOW + 5000);
        assert_eq!(fx, Effects::default());
    }

    #[test]
    fn cancels_release_the_drone_or_unschedule_the_request() {
        let request =
            schemas::parse_delivery_request(schemas::delivery::EXAMPLE_REQUEST.as_bytes()).unwrap();
        let requested = Input::Requested {
            tenant: "fabrikam",
            delivery_id: "d1",
            request: &request,
        };
        let (created, _) = apply(None, &requested, NOW);
        let rejected_input = Input::Rejected {
            code: CancelReason::QueueFull,
            detail: "region 47:-123 already has 1000 requests waiting",
        };
        let (rejected, fx) = apply(created.clone(), &rejected_input, NOW);
        let rejected = rejected.unwrap();
        assert_eq!(rejected.stage, Stage::Cancelled);
        assert_eq!(rejected.cancel_reason, Some(CancelReason::QueueFull));
        assert_eq!(fx.events[0].cancel_reason, Some(CancelReason::QueueFull));
        assert!(
            fx.events[0]
                .cancel_detail
                .as_deref()
                .unwrap()
                .contains("1000")
        );
        assert!(fx.unschedule.is_none() && fx.release.is_none());
        let (cancelled, fx) = apply(created.clone(), &Input::Cancelled, NOW);
        assert_eq!(cancelled.as_ref().unwrap().stage, Stage::Cancelled);
        assert_eq!(fx.events[0].cancel_reason, Some(CancelReason::ByTenant));
        assert_eq!(fx.unschedule.as_deref(), Some("47:-123"));
        // A second cancel changes nothing: the first reason stays.
        let (again, fx) = apply(cancelled.clone(), &rejected_input, NOW);
        assert!(fx.events.is_empty());
        assert_eq!(again.unwrap().cancel_reason, Some(CancelReason::ByTenant));
        // An assignment that arrives after the cancel gives the drone back.
        let a = assignment(&request, "r1");
        let (_, fx) = apply(cancelled, &Input::Assigned(&a), NOW);
        assert_eq!(fx.release.unwrap().1.drone_id, "r1");
        // A cancel in flight releases the drone where it is.
        let (flying, _) = apply(created, &Input::Assigned(&a), NOW);
        let (_, fx) = apply(flying, &Input::Cancelled, NOW);
        assert_eq!(fx.release.unwrap().1.position, a.from);
        assert_eq!(fx.events[0].stage, Stage::Cancelled);
    }

    #[test]
    fn reschedules_apply_only_before_a_drone_flies() {
        let request =
            schemas::parse_delivery_request(schemas::delivery::EXAMPLE_REQUEST.as_bytes()).unwrap();
        let requested = Input::Requested {
            tenant: "fabrikam",
            delivery_id: "d1",
            request: &request,
        };
        let (created, _) = apply(None, &requested, NOW);
        let change = schemas::parse_reschedule(br#"{"deadline":"2026-11-25T10:00:00Z"}"#).unwrap();
        let (state, fx) = apply(created, &Input::Rescheduled(&change), NOW);
        let state = state.unwrap();
        assert_eq!(state.stage, Stage::Rescheduled);
        assert!(state.deadline.starts_with("2026-11-25T10:00:00"));
        assert_eq!(fx.events.len(), 1);
        assert_eq!(
            fx.reschedule.as_deref(),
            Some("47:-123"),
            "the scheduler is told"
        );
        let a = assignment(&request, "r1");
        let (flying, _) = apply(Some(state), &Input::Assigned(&a), NOW);
        let (_, fx) = apply(flying, &Input::Rescheduled(&change), NOW);
        assert!(fx.events.is_empty(), "too late once a drone flies");
        assert!(fx.reschedule.is_none());
    }
}
