//! What the scheduling and delivery consumers say to each other and to clients: drone
//! assignments, delivery stages, delivery state and its events. JSON with the reference
//! implementation's field names (`stage`, `lastKnownLocation`, `pickupETA`,
//! `deliveryETA`).

use serde::{Deserialize, Serialize};

use crate::delivery::{Location, PackageSize};

/// A delivery's stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Requested; waiting for a drone.
    Created,
    /// Its pickup time, deadline or drop-off changed before pickup.
    Rescheduled,
    /// A drone is flying to the pickup.
    HeadedToPickup,
    /// The drone has the package and flies to the drop-off.
    HeadedToDropoff,
    /// Delivered.
    Completed,
    /// Cancelled: by its tenant, or given up by the scheduler (see [`CancelReason`]).
    Cancelled,
}

impl Stage {
    /// Its name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "Created",
            Self::Rescheduled => "Rescheduled",
            Self::HeadedToPickup => "HeadedToPickup",
            Self::HeadedToDropoff => "HeadedToDropoff",
            Self::Completed => "Completed",
            Self::Cancelled => "Cancelled",
        }
    }
}

/// Why a delivery was cancelled (on its state and its `Cancelled` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CancelReason {
    /// Its tenant cancelled it.
    ByTenant,
    /// No drone of its region can ever carry it.
    NoCapableDrone,
    /// Its region's waiting queue was full when it arrived.
    QueueFull,
    /// Its deadline passed while it waited for a drone.
    DeadlinePassed,
    /// It waited for a drone longer than the scheduler's waiting bound (its deadline had
    /// already passed when it arrived, or lies beyond the bound).
    WaitedTooLong,
}

impl CancelReason {
    /// Its name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ByTenant => "ByTenant",
            Self::NoCapableDrone => "NoCapableDrone",
            Self::QueueFull => "QueueFull",
            Self::DeadlinePassed => "DeadlinePassed",
            Self::WaitedTooLong => "WaitedTooLong",
        }
    }
}

/// The scheduler gives a delivery up: the payload of a `DeliveryRejected` record on
/// `deliveries`, keyed by the delivery's key. The scheduler has already dropped it (it
/// is neither waiting nor assigned); the delivery consumer cancels it with this reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingRejected {
    /// For people: what happened.
    pub reason: String,
    /// For programs (records written before it existed were all `NoCapableDrone`).
    #[serde(default = "no_capable_drone")]
    pub code: CancelReason,
}

fn no_capable_drone() -> CancelReason {
    CancelReason::NoCapableDrone
}

impl Stage {
    /// Whether nothing changes the delivery any more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }

    /// Whether a drone has been assigned to it (and may still be flying it).
    pub fn has_drone(self) -> bool {
        matches!(self, Self::HeadedToPickup | Self::HeadedToDropoff)
    }
}

/// What a delivery's latest change was: the kind of notification it makes (an SSE
/// event's `event:` field, a webhook's `type` and the kinds an endpoint subscribes to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// It entered a stage (its `seq` went up).
    Stage,
    /// Its drone reported a position, and its ETAs moved with it.
    Position,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [Self; 2] = [Self::Stage, Self::Position];

    /// Its name, as in JSON and in SSE.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stage => "stage",
            Self::Position => "position",
        }
    }
}

/// A drone assigned to a delivery, with the estimates it was assigned on. On
/// `drone-assignments`, keyed by drone id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// The drone.
    pub drone_id: String,
    /// The scheduling region that owns the drone (its home region).
    pub region: String,
    /// The delivery's key, `tenant/deliveryId`.
    pub delivery_key: String,
    /// The delivery id.
    pub delivery_id: String,
    /// Where the drone was when assigned.
    pub from: Location,
    /// The pickup location.
    pub pickup: Location,
    /// The drop-off location.
    pub drop_off: Location,
    /// The drone's cruise speed, metres per second.
    pub speed_mps: f64,
    /// When it was assigned, milliseconds since the Unix epoch.
    pub assigned_at: i64,
    /// Estimated arrival at the pickup, milliseconds since the Unix epoch.
    #[serde(rename = "pickupETA")]
    pub pickup_eta: i64,
    /// Estimated arrival at the drop-off, milliseconds since the Unix epoch.
    #[serde(rename = "deliveryETA")]
    pub delivery_eta: i64,
}

/// A drone that finished (or was released from) a delivery and is free again, where it
/// is. On `drone-scheduling`, keyed by the drone's region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DroneReleased {
    /// The drone.
    pub drone_id: String,
    /// The delivery it was released from.
    pub delivery_key: String,
    /// Where it is now.
    pub position: Location,
    /// When, milliseconds since the Unix epoch.
    pub at: i64,
}

/// A delivery to schedule: what the scheduler needs of a request, and nothing else. On
/// `drone-scheduling` (keyed by the pickup region, event type `SchedulingRequested`) in
/// the compact binary form of [`encode`](Self::encode), so that the scheduler never
/// parses the client's JSON; in the scheduler's changelog as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingRequest {
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

/// The first byte of [`SchedulingRequest::encode`]'s form: its version.
const SCHEDULING_REQUEST_V1: u8 = 1;

impl SchedulingRequest {
    /// The compact form: version byte 1; the key and the id, each a little-endian `u16`
    /// length and its UTF-8 bytes; then the pickup's and drop-off's latitude and
    /// longitude and the weight as little-endian `f64`; the size as one byte (0 small,
    /// 1 medium, 2 large); the pickup time and the deadline as little-endian `i64`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(1 + 4 + self.delivery_key.len() + self.delivery_id.len() + 57);
        out.push(SCHEDULING_REQUEST_V1);
        for text in [&self.delivery_key, &self.delivery_id] {
            let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&text.as_bytes()[..usize::from(len)]);
        }
        for number in [
            self.pickup.latitude,
            self.pickup.longitude,
            self.drop_off.latitude,
            self.drop_off.longitude,
            self.weight_kg,
        ] {
            out.extend_from_slice(&number.to_le_bytes());
        }
        out.push(match self.size {
            PackageSize::Small => 0,
            PackageSize::Medium => 1,
            PackageSize::Large => 2,
        });
        out.extend_from_slice(&self.pickup_time_ms.to_le_bytes());
        out.extend_from_slice(&self.deadline_ms.to_le_bytes());
        out
    }

    /// Reads [`encode`](Self::encode)'s form; any other bytes are an error that says
    /// what is wrong, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        struct Reader<'a>(&'a [u8]);
        impl<'a> Reader<'a> {
            fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
                if self.0.len() < n {
                    return Err(format!("scheduling request cut short in {what}"));
                }
                let (head, rest) = self.0.split_at(n);
                self.0 = rest;
                Ok(head)
            }
            fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
                let mut out = [0u8; N];
                out.copy_from_slice(self.take(N, what)?);
                Ok(out)
            }
            fn text(&mut self, what: &str) -> Result<String, String> {
                let len = u16::from_le_bytes(self.array(what)?);
                let bytes = self.take(usize::from(len), what)?;
                std::str::from_utf8(bytes)
                    .map(str::to_owned)
                    .map_err(|_| format!("scheduling request: {what} is not UTF-8"))
            }
            fn number(&mut self, what: &str) -> Result<f64, String> {
                let n = f64::from_le_bytes(self.array(what)?);
                if n.is_finite() {
                    Ok(n)
                } else {
                    Err(format!("scheduling request: {what} is not a finite number"))
                }
            }
        }
        let mut r = Reader(bytes);
        match r.take(1, "version")?[0] {
            SCHEDULING_REQUEST_V1 => {}
            v => return Err(format!("scheduling request of unknown version {v}")),
        }
        let delivery_key = r.text("deliveryKey")?;
        let delivery_id = r.text("deliveryId")?;
        let mut location = |what: &str| -> Result<Location, String> {
            Ok(Location {
                latitude: r.number(what)?,
                longitude: r.number(what)?,
            })
        };
        let pickup = location("pickup")?;
        let drop_off = location("dropOff")?;
        let weight_kg = r.number("weightKg")?;
        let size = match r.take(1, "size")?[0] {
            0 => PackageSize::Small,
            1 => PackageSize::Medium,
            2 => PackageSize::Large,
            s => return Err(format!("scheduling request: unknown size {s}")),
        };
        let pickup_time_ms = i64::from_le_bytes(r.array("pickupTimeMs")?);
        let deadline_ms = i64::from_le_bytes(r.array("deadlineMs")?);
        if !r.0.is_empty() {
            return Err("scheduling request: bytes after its end".into());
        }
        Ok(Self {
            delivery_key,
            delivery_id,
            pickup,
            drop_off,
            weight_kg,
            size,
            pickup_time_ms,
            deadline_ms,
        })
    }
}

/// A delivery no longer wanted, for the scheduler to drop it if it is still waiting. On
/// `drone-scheduling`, keyed by the pickup region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingCancelled {
    /// The delivery's key.
    pub delivery_key: String,
}

/// New times of a delivery that may still be waiting for a drone, for the scheduler to
/// move its deadline (its waiting bound follows). On `drone-scheduling`, keyed by the
/// pickup region, event type `DeliveryRescheduled`. A delivery already assigned keeps
/// its drone and this changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingRescheduled {
    /// The delivery's key.
    pub delivery_key: String,
    /// When the package is ready, milliseconds since the Unix epoch.
    pub pickup_time_ms: i64,
    /// When it must be delivered by, milliseconds since the Unix epoch.
    pub deadline_ms: i64,
}

/// A delivery's state as the status API shows it and the delivery consumer keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryState {
    /// The delivery id.
    pub delivery_id: String,
    /// The tenant that owns it.
    pub owner_id: String,
    /// Its stage.
    pub stage: Stage,
    /// The drone flying it, once assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone_id: Option<String>,
    /// The drone's last reported position (the pickup location before one flies).
    pub last_known_location: Location,
    /// Estimated pickup, RFC 3339, once a drone is assigned.
    #[serde(rename = "pickupETA", default, skip_serializing_if = "Option::is_none")]
    pub pickup_eta: Option<String>,
    /// Estimated delivery, RFC 3339, once a drone is assigned.
    #[serde(
        rename = "deliveryETA",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub delivery_eta: Option<String>,
    /// Where the package is picked up.
    pub pickup_location: Location,
    /// Where it is delivered.
    pub drop_off_location: Location,
    /// When the package is ready, RFC 3339.
    pub pickup_time: String,
    /// When it must be delivered by, RFC 3339.
    pub deadline: String,
    /// Package size.
    pub package_size: PackageSize,
    /// Package weight, kilograms.
    pub package_weight: f64,
    /// The drone's region, while one is assigned (to release it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone_region: Option<String>,
    /// The drone's speed, metres per second, while one is assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone_speed_mps: Option<f64>,
    /// How many stage transitions it went through: the `seq` of its last event.
    pub seq: u32,
    /// How many changes it went through (stages and positions), from 1: the id of its
    /// latest notification (SSE `id`, webhook id). 0 in states written before it was
    /// kept.
    #[serde(default)]
    pub version: u64,
    /// What its latest change was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<EventKind>,
    /// When it last changed, RFC 3339.
    pub updated_at: String,
    /// Why it was cancelled, once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<CancelReason>,
    /// What happened, for people, once it is cancelled by the scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_detail: Option<String>,
}

/// One stage transition: what a `delivery-state` record whose `change` is `stage` says,
/// as the history's `delivery_events` rows hold it ([`DeliveryEvent::of`]). `seq` counts
/// from 1 per delivery, so consumers can order and dedupe them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryEvent {
    /// The delivery id.
    pub delivery_id: String,
    /// The tenant.
    pub owner_id: String,
    /// The stage entered.
    pub stage: Stage,
    /// Its position in the delivery's history, from 1.
    pub seq: u32,
    /// When, RFC 3339.
    pub at: String,
    /// The drone, when one is assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone_id: Option<String>,
    /// The last known location.
    pub last_known_location: Location,
    /// Estimated pickup, RFC 3339.
    #[serde(rename = "pickupETA", default, skip_serializing_if = "Option::is_none")]
    pub pickup_eta: Option<String>,
    /// Estimated delivery, RFC 3339.
    #[serde(
        rename = "deliveryETA",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub delivery_eta: Option<String>,
    /// Why it was cancelled, on a `Cancelled` event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<CancelReason>,
    /// What happened, for people, on a `Cancelled` event from the scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_detail: Option<String>,
}

impl DeliveryEvent {
    /// The event of `state`'s latest transition.
    pub fn of(state: &DeliveryState) -> Self {
        Self {
            delivery_id: state.delivery_id.clone(),
            owner_id: state.owner_id.clone(),
            stage: state.stage,
            seq: state.seq,
            at: state.updated_at.clone(),
            drone_id: state.drone_id.clone(),
            last_known_location: state.last_known_location,
            pickup_eta: state.pickup_eta.clone(),
            delivery_eta: state.delivery_eta.clone(),
            cancel_reason: state.cancel_reason,
            cancel_detail: state.cancel_detail.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_use_the_reference_names() {
        let loc = Location {
            latitude: 1.0,
            longitude: 2.0,
        };
        let state = DeliveryState {
            delivery_id: "d".into(),
            owner_id: "t".into(),
            stage: Stage::HeadedToPickup,
            drone_id: Some("r1".into()),
            last_known_location: loc,
            pickup_eta: Some("2026-11-24T10:00:00Z".into()),
            delivery_eta: Some("2026-11-24T10:10:00Z".into()),
            pickup_location: loc,
            drop_off_location: loc,
            pickup_time: "2026-11-24T10:00:00Z".into(),
            deadline: "2026-11-24T11:00:00Z".into(),
            package_size: PackageSize::Small,
            package_weight: 1.0,
            drone_region: None,
            drone_speed_mps: None,
            seq: 2,
            version: 5,
            change: Some(EventKind::Position),
            updated_at: "2026-11-24T09:00:00Z".into(),
            cancel_reason: None,
            cancel_detail: None,
        };
        let json = serde_json::to_value(&state).unwrap();
        for field in [
            "stage",
            "lastKnownLocation",
            "pickupETA",
            "deliveryETA",
            "droneId",
        ] {
            assert!(json.get(field).is_some(), "{field} in {json}");
        }
        assert_eq!(json["stage"], "HeadedToPickup");
        assert!(json.get("cancelReason").is_none(), "only once cancelled");
        let back: DeliveryState = serde_json::from_value(json).unwrap();
        assert_eq!(back, state);
        assert!(Stage::Completed.is_final() && !Stage::Created.is_final());
    }

    fn scheduling_request() -> SchedulingRequest {
        SchedulingRequest {
            delivery_key: "fabrikam/d-1".into(),
            delivery_id: "d-1".into(),
            pickup: Location {
                latitude: 47.6,
                longitude: -122.3,
            },
            drop_off: Location {
                latitude: 47.61,
                longitude: -122.31,
            },
            weight_kg: 2.5,
            size: PackageSize::Medium,
            pickup_time_ms: 1_790_000_000_000,
            deadline_ms: 1_790_000_600_000,
        }
    }

    #[test]
    fn a_scheduling_request_reads_back_and_bad_bytes_are_errors() {
        let job = scheduling_request();
        let bytes = job.encode();
        assert_eq!(bytes[0], 1, "version first");
        assert_eq!(SchedulingRequest::decode(&bytes).unwrap(), job);
        assert!(bytes.len() < 100, "compact: {} bytes", bytes.len());
        // Every cut, a trailing byte, an unknown version or size: errors.
        for n in 0..bytes.len() {
            assert!(
                SchedulingRequest::decode(&bytes[..n]).is_err(),
                "cut at {n}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SchedulingRequest::decode(&longer).is_err());
        let mut other = bytes.clone();
        other[0] = 2;
        assert!(SchedulingRequest::decode(&other).is_err());
        let mut nan = bytes.clone();
        let weight_at = bytes.len() - 17 - 8;
        nan[weight_at..weight_at + 8].copy_from_slice(&f64::NAN.to_le_bytes());
        assert!(SchedulingRequest::decode(&nan).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = SchedulingRequest::decode(&bytes);
        }
    }

    #[test]
    fn rejections_written_before_the_code_existed_read_as_no_capable_drone() {
        let old: SchedulingRejected =
            serde_json::from_str(r#"{"reason":"no drone of region 1:1 carries 900 kg"}"#).unwrap();
        assert_eq!(old.code, CancelReason::NoCapableDrone);
        let new = SchedulingRejected {
            reason: "full".into(),
            code: CancelReason::QueueFull,
        };
        let json = serde_json::to_value(&new).unwrap();
        assert_eq!(json["code"], CancelReason::QueueFull.as_str());
        assert_eq!(
            serde_json::from_value::<SchedulingRejected>(json).unwrap(),
            new
        );
    }
}
