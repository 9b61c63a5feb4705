//! The delivery request: its wire format, its rules, and the one function that checks both.
//!
//! Field names follow the reference implementation (`ownerId`, `pickupLocation`,
//! `dropOffLocation`, `pickupTime`, `deadline`, `expedited`, `confirmationRequired`,
//! `packageInfo {packageId, size, weight, tag}`). Locations carry coordinates, either as a
//! `"lat,lon"` string or as `{"latitude": .., "longitude": ..}`.
//!
//! [`parse_delivery_request`] deserializes borrowing from the input wherever the JSON has
//! no escapes, so validating a record does not copy its strings; a failure names the field
//! and the reason.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, FixedOffset};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The longest accepted `deliveryId`.
pub const MAX_DELIVERY_ID_LEN: usize = 64;
/// The longest accepted `ownerId`.
pub const MAX_OWNER_ID_LEN: usize = 128;
/// The longest accepted `packageInfo.packageId`.
pub const MAX_PACKAGE_ID_LEN: usize = 128;
/// The longest accepted `packageInfo.tag`.
pub const MAX_TAG_LEN: usize = 256;
/// The heaviest accepted package, in kilograms.
pub const MAX_WEIGHT_KG: f64 = 10_000.0;
/// The longest accepted text form of a location (`"lat,lon"`).
const MAX_LOCATION_TEXT_LEN: usize = 64;

/// A complete, valid delivery request in the wire format, with every optional field set
/// and both location forms: for documentation, examples and tests.
pub const EXAMPLE_REQUEST: &str = r#"{"ownerId":"fabrikam","pickupLocation":"47.6062,-122.3321","dropOffLocation":{"latitude":47.6205,"longitude":-122.3493},"pickupTime":"2026-11-24T10:00:00Z","deadline":"2026-11-24T12:00:00+01:00","expedited":true,"confirmationRequired":"FingerPrint","packageInfo":{"packageId":"pkg-0001","size":"Medium","weight":2.5,"tag":"fragile"}}"#;

/// A request rejected by validation: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The JSON path of the field, such as `packageInfo.weight`; empty for the whole body.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ValidationError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A point on the map, in WGS84 degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Location {
    /// Degrees north, -90 to 90.
    pub latitude: f64,
    /// Degrees east, -180 to 180.
    pub longitude: f64,
}

/// How the recipient confirms a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConfirmationType {
    /// A fingerprint.
    FingerPrint,
    /// A picture.
    Picture,
    /// A voice sample.
    Voice,
    /// No confirmation.
    None,
}

impl ConfirmationType {
    /// Every value, in the reference implementation's order.
    pub const ALL: [Self; 4] = [Self::FingerPrint, Self::Picture, Self::Voice, Self::None];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FingerPrint => "FingerPrint",
            Self::Picture => "Picture",
            Self::Voice => "Voice",
            Self::None => "None",
        }
    }
}

/// The size class of a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PackageSize {
    /// Small.
    Small,
    /// Medium.
    Medium,
    /// Large.
    Large,
}

impl PackageSize {
    /// Every value, smallest first.
    pub const ALL: [Self; 3] = [Self::Small, Self::Medium, Self::Large];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Small => "Small",
            Self::Medium => "Medium",
            Self::Large => "Large",
        }
    }
}

/// What is being delivered.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageInfo<'a> {
    /// The client's id of the package.
    pub package_id: Cow<'a, str>,
    /// Its size class.
    pub size: PackageSize,
    /// Its weight in kilograms, more than 0.
    pub weight: f64,
    /// A free-form label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<Cow<'a, str>>,
}

/// A valid delivery request. Strings borrow from the body they were parsed from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRequest<'a> {
    /// The client's own id for the delivery, if it chose one (idempotent retries); the
    /// ingestion tier assigns one otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<Cow<'a, str>>,
    /// The business client that owns the delivery.
    pub owner_id: Cow<'a, str>,
    /// Where the drone picks the package up.
    pub pickup_location: Location,
    /// Where the drone drops the package off.
    pub drop_off_location: Location,
    /// When the package is ready for pickup.
    pub pickup_time: DateTime<FixedOffset>,
    /// When it must be delivered by; after `pickup_time`.
    pub deadline: DateTime<FixedOffset>,
    /// Whether the client paid for expedited delivery.
    pub expedited: bool,
    /// How the recipient confirms.
    pub confirmation_required: ConfirmationType,
    /// What is delivered.
    pub package_info: PackageInfo<'a>,
}

/// Parses and validates one delivery request from JSON.
///
/// Unknown fields are ignored, as in the reference implementation. Every rule that fails
/// is reported with the field's JSON path; the first failure wins.
pub fn parse_delivery_request(json: &[u8]) -> Result<DeliveryRequest<'_>, ValidationError> {
    let raw: RawRequest<'_> = deserialize_object(json, "a delivery request")?;
    raw.validate()
}

/// Deserializes one JSON object (`what` names it in errors) with the path of a failing
/// field, refusing anything after it.
fn deserialize_object<'a, T: Deserialize<'a>>(
    json: &'a [u8],
    what: &str,
) -> Result<T, ValidationError> {
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ValidationError::new(
            "",
            format!("{what} must be a JSON object"),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let raw: T = deserialize_with_path(&mut de, json)?;
    de.end()
        .map_err(|e| ValidationError::new("", clean_serde_reason(&e)))?;
    Ok(raw)
}

/// Deserializes a `T` from the start of `json` through `de`. The common case, a valid
/// value, takes serde's plain path; only when it fails is the input read again with the
/// path of every field tracked, to name the failing field (tracking it costs on every
/// field of every record, and almost every record is valid).
pub(crate) fn deserialize_with_path<'a, T: Deserialize<'a>>(
    de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'a>>,
    json: &'a [u8],
) -> Result<T, ValidationError> {
    let plain = match T::deserialize(&mut *de) {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };
    let mut again = serde_json::Deserializer::from_slice(json);
    match serde_path_to_error::deserialize::<_, T>(&mut again) {
        Err(e) => {
            let field = e.path().to_string();
            let field = if field == "." || field == "?" {
                String::new()
            } else {
                field
            };
            Err(ValidationError {
                field,
                reason: clean_serde_reason(e.inner()),
            })
        }
        // Deserializing is deterministic, so this does not happen; the plain error
        // still stands without a path.
        Ok(_) => Err(ValidationError::new("", clean_serde_reason(&plain))),
    }
}

/// serde_json's message without its "at line L column C" suffix when the field is known,
/// and with it when the body itself is malformed.
pub(crate) fn clean_serde_reason(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if e.is_data() {
        match msg.find(" at line ") {
            Some(i) => msg[..i].to_owned(),
            None => msg,
        }
    } else {
        format!("malformed JSON: {msg}")
    }
}

/// A string field that borrows from the input when the JSON string has no escapes.
/// (serde borrows `Cow<str>` only as a direct field, not inside an `Option`.)
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }

        deserializer.deserialize_str(TextVisitor(std::marker::PhantomData))
    }
}

/// An optional field that, when present, must hold a value of its type: `null` is refused
/// rather than taken as absent, as the API documents no field as nullable (leave a field
/// out instead; a reschedule cannot clear a time).
pub fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRequest<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    delivery_id: Option<Text<'a>>,
    #[serde(borrow, default)]
    owner_id: Option<Text<'a>>,
    #[serde(default)]
    pickup_location: Option<Location>,
    #[serde(default)]
    drop_off_location: Option<Location>,
    #[serde(borrow, default)]
    pickup_time: Option<Text<'a>>,
    #[serde(borrow, default)]
    deadline: Option<Text<'a>>,
    #[serde(default, deserialize_with = "present")]
    expedited: Option<bool>,
    #[serde(borrow, default, deserialize_with = "present")]
    confirmation_required: Option<Text<'a>>,
    #[serde(borrow, default)]
    package_info: Option<RawPackage<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPackage<'a> {
    #[serde(borrow, default)]
    package_id: Option<Text<'a>>,
    #[serde(borrow, default)]
    size: Option<Text<'a>>,
    #[serde(default)]
    weight: Option<f64>,
    #[serde(borrow, default, deserialize_with = "present")]
    tag: Option<Text<'a>>,
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, ValidationError> {
    value.ok_or_else(|| ValidationError::new(field, "is required"))
}

fn required_text<'a>(
    value: Option<Text<'a>>,
    field: &str,
) -> Result<Cow<'a, str>, ValidationError> {
    required(value, field).map(|t| t.0)
}

fn check_text<'a>(
    value: Cow<'a, str>,
    field: &str,
    max: usize,
) -> Result<Cow<'a, str>, ValidationError> {
    if value.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(ValidationError::new(
            field,
            format!("is longer than {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(value)
}

/// Checks a client-chosen delivery id: 1 to 64 characters of `A-Z a-z 0-9 - _ . :`, so it
/// is safe in a URL path, a Kafka key and a file name.
pub fn check_delivery_id(id: &str) -> Result<(), ValidationError> {
    check_id(id, "deliveryId")
}

/// Checks an id (delivery or drone) reported as `field`: 1 to 64 characters of
/// `A-Z a-z 0-9 - _ . :`.
pub fn check_id(id: &str, field: &str) -> Result<(), ValidationError> {
    if id.is_empty() || id.len() > MAX_DELIVERY_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {MAX_DELIVERY_ID_LEN} characters"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(ValidationError::new(
            field,
            "may contain only letters, digits and - _ . :",
        ));
    }
    Ok(())
}

fn check_location(loc: Location, field: &str) -> Result<Location, ValidationError> {
    if !(loc.latitude.is_finite() && (-90.0..=90.0).contains(&loc.latitude)) {
        return Err(ValidationError::new(
            &format!("{field}.latitude"),
            "must be between -90 and 90",
        ));
    }
    if !(loc.longitude.is_finite() && (-180.0..=180.0).contains(&loc.longitude)) {
        return Err(ValidationError::new(
            &format!("{field}.longitude"),
            "must be between -180 and 180",
        ));
    }
    Ok(loc)
}

fn parse_time(text: &str, field: &str) -> Result<DateTime<FixedOffset>, ValidationError> {
    if text.len() > 64 {
        return Err(ValidationError::new(field, "is longer than 64 bytes"));
    }
    DateTime::parse_from_rfc3339(text).map_err(|e| {
        ValidationError::new(
            field,
            format!("must be an RFC 3339 date-time such as 2026-11-23T10:00:00Z ({e})"),
        )
    })
}

fn parse_enum<T: Copy>(
    text: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
    field: &str,
) -> Result<T, ValidationError> {
    all.iter()
        .copied()
        .find(|v| name(*v) == text)
        .ok_or_else(|| {
            let names: Vec<_> = all.iter().map(|v| name(*v)).collect();
            ValidationError::new(field, format!("must be one of {}", names.join(", ")))
        })
}

impl<'a> RawRequest<'a> {
    fn validate(self) -> Result<DeliveryRequest<'a>, ValidationError> {
        let delivery_id = match self.delivery_id.map(|t| t.0) {
            Some(id) => {
                check_delivery_id(&id)?;
                Some(id)
            }
            None => None,
        };
        let owner_id = check_text(
            required_text(self.owner_id, "ownerId")?,
            "ownerId",
            MAX_OWNER_ID_LEN,
        )?;
        let pickup_location = check_location(
            required(self.pickup_location, "pickupLocation")?,
            "pickupLocation",
        )?;
        let drop_off_location = check_location(
            required(self.drop_off_location, "dropOffLocation")?,
            "dropOffLocation",
        )?;
        let pickup_time = parse_time(
            &required_text(self.pickup_time, "pickupTime")?,
            "pickupTime",
        )?;
        let deadline = parse_time(&required_text(self.deadline, "deadline")?, "deadline")?;
        if deadline <= pickup_time {
            return Err(ValidationError::new("deadline", "must be after pickupTime"));
        }
        let confirmation_required = match self.confirmation_required.map(|t| t.0) {
            Some(text) => parse_enum(
                &text,
                &ConfirmationType::ALL,
                ConfirmationType::as_str,
                "confirmationRequired",
            )?,
            None => ConfirmationType::None,
        };
        let package = required(self.package_info, "packageInfo")?;
        let package_id = check_text(
            required_text(package.package_id, "packageInfo.packageId")?,
            "packageInfo.packageId",
            MAX_PACKAGE_ID_LEN,
        )?;
        let size = parse_enum(
            &required_text(package.size, "packageInfo.size")?,
            &PackageSize::ALL,
            PackageSize::as_str,
            "packageInfo.size",
        )?;
        let weight = required(package.weight, "packageInfo.weight")?;
        if !(weight.is_finite() && weight > 0.0) {
            return Err(ValidationError::new(
                "packageInfo.weight",
                "must be greater than 0",
            ));
        }
        if weight > MAX_WEIGHT_KG {
            return Err(ValidationError::new(
                "packageInfo.weight",
                format!("must be at most {MAX_WEIGHT_KG} kg"),
            ));
        }
        let tag = match package.tag.map(|t| t.0) {
            Some(tag) if tag.len() > MAX_TAG_LEN => {
                return Err(ValidationError::new(
                    "packageInfo.tag",
                    format!("is longer than {MAX_TAG_LEN} bytes"),
                ));
            }
            tag => tag,
        };
        Ok(DeliveryRequest {
            delivery_id,
            owner_id,
            pickup_location,
            drop_off_location,
            pickup_time,
            deadline,
            expedited: self.expedited.unwrap_or(false),
            confirmation_required,
            package_info: PackageInfo {
                package_id,
                size,
                weight,
                tag,
            },
        })
    }
}

impl<'de> Deserialize<'de> for Location {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LocationVisitor;

        impl<'de> Visitor<'de> for LocationVisitor {
            type Value = Location;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""lat,lon" or {"latitude": .., "longitude": ..}"#)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Location, E> {
                parse_lat_lon(text).ok_or_else(|| {
                    E::custom(r#"must be "latitude,longitude" in degrees, such as "47.6,-122.3""#)
                })
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Location, A::Error> {
                let (mut latitude, mut longitude) = (None, None);
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "latitude" | "lat" => latitude = Some(map.next_value::<f64>()?),
                        "longitude" | "lon" => longitude = Some(map.next_value::<f64>()?),
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                match (latitude, longitude) {
                    (Some(latitude), Some(longitude)) => Ok(Location {
                        latitude,
                        longitude,
                    }),
                    _ => Err(de::Error::custom("must have both latitude and longitude")),
                }
            }
        }

        deserializer.deserialize_any(LocationVisitor)
    }
}

fn parse_lat_lon(text: &str) -> Option<Location> {
    if text.len() > MAX_LOCATION_TEXT_LEN {
        return None;
    }
    let (lat, lon) = text.split_once(',')?;
    Some(Location {
        latitude: degrees(lat)?,
        longitude: degrees(lon)?,
    })
}

/// A decimal number of degrees as the API documents it (`[-+]?[0-9]+(\.[0-9]+)?`, with
/// spaces or tabs around it): no exponent, `inf` or `NaN`, which Rust's own parser takes.
fn degrees(text: &str) -> Option<f64> {
    let text = text.trim_matches([' ', '\t']);
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (whole, fraction) = match digits.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (all_digits(whole) && fraction.is_none_or(all_digits))
        .then(|| text.parse().ok())
        .flatten()
}

/// The scheduling region of a location: a one-degree grid cell, such as `47:-123`.
///
/// One scheduling owner decides for each region's fleet, so this is the key of the
/// `drone-scheduling` topic.
pub fn region_of(loc: Location) -> String {
    // Latitude 90 and longitude 180 fold into the last cell rather than opening a new one.
    let lat = (loc.latitude.floor() as i32).clamp(-90, 89);
    let lon = (loc.longitude.floor() as i32).clamp(-180, 179);
    format!("{lat}:{lon}")
}

/// The tenant of requests that came in without credentials (loopback development only).
pub const DEFAULT_TENANT: &str = "default";

/// The request headers (and gRPC metadata keys) by which a proxy says whom it forwards
/// for: RFC 7239's `Forwarded` and the de facto ones, lowercase. A call carrying one is
/// not from its connection's peer, so it never counts as a loopback client.
pub const FORWARDING_HEADERS: [&str; 4] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-real-ip",
];

/// Checks a tenant name: 1 to 64 characters of `A-Z a-z 0-9 - _ . :` (never `/`, which
/// separates it from the delivery id in a [`delivery_key`]).
pub fn check_tenant(tenant: &str) -> Result<(), ValidationError> {
    check_id(tenant, "tenant")
}

/// The Kafka key of every record about one delivery: `tenant/deliveryId`.
///
/// Scoping the id by tenant keeps client-chosen ids of different tenants apart (and so
/// their idempotent retries), keeps every event of a delivery on one partition in order,
/// and spreads one tenant's load over all partitions.
pub fn delivery_key(tenant: &str, delivery_id: &str) -> String {
    let mut key = String::with_capacity(tenant.len() + 1 + delivery_id.len());
    key.push_str(tenant);
    key.push('/');
    key.push_str(delivery_id);
    key
}

/// The tenant and delivery id of a [`delivery_key`]. A key without `/` is taken as a bare
/// delivery id of an unknown tenant.
pub fn split_delivery_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((tenant, id)) => (Some(tenant), id),
        None => (None, key),
    }
}

/// A valid reschedule of a delivery (`PATCH /api/deliveryrequests/{id}`): a new pickup
/// time, deadline, or both. Whether the delivery exists and can still be rescheduled is
/// decided downstream, where its state is. Locations cannot change: a drone may already
/// be planned for them.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryReschedule {
    /// The new pickup time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pickup_time: Option<DateTime<FixedOffset>>,
    /// The new deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<FixedOffset>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawReschedule<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    pickup_time: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    deadline: Option<Text<'a>>,
}

/// Parses and validates a reschedule from JSON. Fields other than `pickupTime` and
/// `deadline` are refused: they cannot change after the request.
pub fn parse_reschedule(json: &[u8]) -> Result<DeliveryReschedule, ValidationError> {
    let raw: RawReschedule<'_> = deserialize_object(json, "a reschedule")?;
    let pickup_time = match raw.pickup_time {
        Some(t) => Some(parse_time(&t.0, "pickupTime")?),
        None => None,
    };
    let deadline = match raw.deadline {
        Some(t) => Some(parse_time(&t.0, "deadline")?),
        None => None,
    };
    if let (Some(pickup), Some(deadline)) = (pickup_time, deadline)
        && deadline <= pickup
    {
        return Err(ValidationError::new("deadline", "must be after pickupTime"));
    }
    if pickup_time.is_none() && deadline.is_none() {
        return Err(ValidationError::new(
            "",
            "a reschedule names pickupTime, deadline or both",
        ));
    }
    Ok(DeliveryReschedule {
        pickup_time,
        deadline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn delivery_keys_round_trip_and_scope_ids_by_tenant() {
        let key = delivery_key("fabrikam", "d-1");
        assert_eq!(key, "fabrikam/d-1");
        assert_eq!(split_delivery_key(&key), (Some("fabrikam"), "d-1"));
        assert_eq!(split_delivery_key("d-1"), (None, "d-1"));
        assert_ne!(delivery_key("a", "x"), delivery_key("b", "x"));
        assert!(check_tenant("a/b").is_err());
        check_tenant(DEFAULT_TENANT).unwrap();
    }

    #[test]
    fn location_strings_are_plain_decimal_degrees() {
        let at = |text: &str| parse_lat_lon(text).map(|l| (l.latitude, l.longitude));
        assert_eq!(at("47.6062,-122.3321"), Some((47.6062, -122.3321)));
        assert_eq!(at(" +47 ,\t-122.5 "), Some((47.0, -122.5)));
        for refused in [
            "1e1,2", "inf,0", "NaN,0", ".5,1", "5.,1", "1,2,3", "1;2", "", "1,", "--1,2",
        ] {
            assert_eq!(at(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn reschedules_name_at_least_one_changeable_field() {
        let r = parse_reschedule(br#"{"pickupTime":"2026-11-24T10:00:00Z"}"#).unwrap();
        assert!(r.pickup_time.is_some() && r.deadline.is_none());
        let r = parse_reschedule(br#"{"deadline":"2026-11-24T10:00:00Z"}"#).unwrap();
        assert!(r.deadline.is_some());
        let field = |json: &str| parse_reschedule(json.as_bytes()).unwrap_err().field;
        assert_eq!(field("{}"), "");
        assert_eq!(field("[]"), "");
        assert_eq!(field(r#"{"ownerId":"x"}"#), "ownerId");
        assert!(
            parse_reschedule(br#"{"ownerId":"x"}"#)
                .unwrap_err()
                .reason
                .contains("unknown field")
        );
        assert_eq!(field(r#"{"pickupTime":"soon"}"#), "pickupTime");
        assert_eq!(field(r#"{"dropOffLocation":"1,0"}"#), "dropOffLocation");
        assert_eq!(
            field(r#"{"pickupTime":"2026-11-24T10:00:00Z","deadline":"2026-11-24T09:00:00Z"}"#),
            "deadline"
        );
        assert_eq!(field(r#"{"deadline":"2026-11-24T10:00:00Z"} x"#), "");
        // A time cannot be cleared: null is refused, not taken as absent; the same goes
        // for every optional field of a request.
        for field_name in ["deliveryId", "expedited", "confirmationRequired"] {
            let mut request: serde_json::Value = serde_json::from_str(VALID).unwrap();
            request[field_name] = serde_json::Value::Null;
            let err = parse_delivery_request(request.to_string().as_bytes()).unwrap_err();
            assert_eq!(err.field, field_name);
        }
        let mut request: serde_json::Value = serde_json::from_str(VALID).unwrap();
        request["packageInfo"]["tag"] = serde_json::Value::Null;
        let err = parse_delivery_request(request.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.field, "packageInfo.tag");
        assert_eq!(
            field(r#"{"deadline":null,"pickupTime":"2026-11-24T10:00:00Z"}"#),
            "deadline"
        );
        let r = parse_reschedule(br#"{"pickupTime":"2026-11-24T10:00:00\u005a"}"#).unwrap();
        assert!(r.pickup_time.is_some());
    }

    const VALID: &str = r#"{
        "ownerId": "fabrikam",
        "pickupLocation": "47.6062,-122.3321",
        "dropOffLocation": {"latitude": 47.61, "longitude": -122.2},
        "pickupTime": "2026-11-23T10:00:00Z",
        "deadline": "2026-11-23T12:00:00+01:00",
        "expedited": true,
        "confirmationRequired": "FingerPrint",
        "packageInfo": {"packageId": "pkg-1", "size": "Small", "weight": 2.5, "tag": "fragile"}
    }"#;

    fn with(field_path: &[&str], value: Option<serde_json::Value>) -> Vec<u8> {
        let mut doc: serde_json::Value = serde_json::from_str(VALID).unwrap();
        let mut target = &mut doc;
        for key in &field_path[..field_path.len() - 1] {
            target = target.get_mut(*key).unwrap();
        }
        let obj = target.as_object_mut().unwrap();
        let last = field_path[field_path.len() - 1];
        match value {
            Some(v) => obj.insert(last.to_owned(), v),
            None => obj.remove(last),
        };
        serde_json::to_vec(&doc).unwrap()
    }

    fn rejected(body: &[u8]) -> ValidationError {
        parse_delivery_request(body).expect_err("should be rejected")
    }

    #[test]
    fn the_example_is_valid() {
        let r = parse_delivery_request(EXAMPLE_REQUEST.as_bytes()).unwrap();
        assert_eq!(r.package_info.tag.as_deref(), Some("fragile"));
    }

    #[test]
    fn valid_request_parses_and_borrows() {
        let r = parse_delivery_request(VALID.as_bytes()).unwrap();
        assert_eq!(r.owner_id, "fabrikam");
        assert!(matches!(r.owner_id, Cow::Borrowed(_)));
        assert_eq!(r.pickup_location.latitude, 47.6062);
        assert_eq!(r.drop_off_location.longitude, -122.2);
        assert!(r.expedited);
        assert_eq!(r.confirmation_required, ConfirmationType::FingerPrint);
        assert_eq!(r.package_info.size, PackageSize::Small);
        assert_eq!(r.package_info.tag.as_deref(), Some("fragile"));
        assert_eq!(r.delivery_id, None);
    }

    #[test]
    fn optional_fields_default() {
        let body = with(&["expedited"], None);
        let body = {
            let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            v.as_object_mut().unwrap().remove("confirmationRequired");
            v["packageInfo"].as_object_mut().unwrap().remove("tag");
            serde_json::to_vec(&v).unwrap()
        };
        let r = parse_delivery_request(&body).unwrap();
        assert!(!r.expedited);
        assert_eq!(r.confirmation_required, ConfirmationType::None);
        assert_eq!(r.package_info.tag, None);
    }

    #[test]
    fn serialized_request_parses_back_to_itself() {
        let r = parse_delivery_request(VALID.as_bytes()).unwrap();
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(parse_delivery_request(&json).unwrap(), r);
    }

    #[test]
    fn each_required_field_is_reported_by_name() {
        for path in [
            &["ownerId"][..],
            &["pickupLocation"],
            &["dropOffLocation"],
            &["pickupTime"],
            &["deadline"],
            &["packageInfo"],
            &["packageInfo", "packageId"],
            &["packageInfo", "size"],
            &["packageInfo", "weight"],
        ] {
            let e = rejected(&with(path, None));
            assert_eq!(e.field, path.join("."), "{e}");
            assert_eq!(e.reason, "is required");
        }
    }

    #[test]
    fn each_rule_is_reported_with_its_field() {
        use serde_json::json;
        let cases: Vec<(&[&str], serde_json::Value, &str, &str)> = vec![
            (&["ownerId"], json!(""), "ownerId", "must not be empty"),
            (
                &["ownerId"],
                json!("x".repeat(129)),
                "ownerId",
                "longer than 128",
            ),
            (
                &["ownerId"],
                json!("a\u{0}b"),
                "ownerId",
                "control characters",
            ),
            (&["ownerId"], json!(7), "ownerId", "invalid type"),
            (
                &["deliveryId"],
                json!("has space"),
                "deliveryId",
                "only letters",
            ),
            (
                &["deliveryId"],
                json!("x".repeat(65)),
                "deliveryId",
                "1 to 64",
            ),
            (
                &["pickupLocation"],
                json!("91,0"),
                "pickupLocation.latitude",
                "between -90 and 90",
            ),
            (
                &["pickupLocation"],
                json!("0,-181"),
                "pickupLocation.longitude",
                "between -180 and 180",
            ),
            (
                &["pickupLocation"],
                json!("north pole"),
                "pickupLocation",
                "latitude,longitude",
            ),
            (
                &["dropOffLocation"],
                json!({"latitude": 1}),
                "dropOffLocation",
                "both latitude and longitude",
            ),
            (
                &["dropOffLocation"],
                json!({"latitude": -90.5, "longitude": 0}),
                "dropOffLocation.latitude",
                "between",
            ),
            (
                &["pickupTime"],
                json!("yesterday"),
                "pickupTime",
                "RFC 3339",
            ),
            (
                &["deadline"],
                json!("2026-11-23T08:00:00Z"),
                "deadline",
                "after pickupTime",
            ),
            (
                &["deadline"],
                json!("2026-11-23T10:00:00Z"),
                "deadline",
                "after pickupTime",
            ),
            (&["expedited"], json!("yes"), "expedited", "invalid type"),
            (
                &["confirmationRequired"],
                json!("Signature"),
                "confirmationRequired",
                "one of FingerPrint, Picture, Voice, None",
            ),
            (
                &["packageInfo", "size"],
                json!("Huge"),
                "packageInfo.size",
                "one of Small, Medium, Large",
            ),
            (
                &["packageInfo", "weight"],
                json!(0),
                "packageInfo.weight",
                "greater than 0",
            ),
            (
                &["packageInfo", "weight"],
                json!(-1.5),
                "packageInfo.weight",
                "greater than 0",
            ),
            (
                &["packageInfo", "weight"],
                json!(20000),
                "packageInfo.weight",
                "at most",
            ),
            (
                &["packageInfo", "weight"],
                json!("2"),
                "packageInfo.weight",
                "invalid type",
            ),
            (
                &["packageInfo", "packageId"],
                json!(" "),
                "packageInfo.packageId",
                "must not be empty",
            ),
            (
                &["packageInfo", "tag"],
                json!("t".repeat(257)),
                "packageInfo.tag",
                "longer than 256",
            ),
        ];
        for (path, value, field, reason) in cases {
            let e = rejected(&with(path, Some(value.clone())));
            assert_eq!(e.field, field, "{path:?} = {value}: {e}");
            assert!(e.reason.contains(reason), "{path:?} = {value}: {e}");
        }
    }

    #[test]
    fn malformed_bodies_are_rejected_without_a_field() {
        for body in [
            &b""[..],
            b"{",
            b"[]",
            b"null",
            b"{\"ownerId\": \"a\"} trailing",
        ] {
            let e = rejected(body);
            assert!(
                e.field.is_empty(),
                "{:?}: {e}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn escaped_strings_are_accepted() {
        let body = with(&["ownerId"], Some(serde_json::json!("fabri\"kam")));
        let r = parse_delivery_request(&body).unwrap();
        assert_eq!(r.owner_id, "fabri\"kam");
    }

    #[test]
    fn client_delivery_id_is_kept() {
        let body = with(&["deliveryId"], Some(serde_json::json!("order-42:a")));
        let r = parse_delivery_request(&body).unwrap();
        assert_eq!(r.delivery_id.as_deref(), Some("order-42:a"));
    }

    #[test]
    fn region_cells() {
        let at = |latitude, longitude| {
            region_of(Location {
                latitude,
                longitude,
            })
        };
        assert_eq!(at(47.6, -122.3), "47:-123");
        assert_eq!(at(-0.5, 0.5), "-1:0");
        assert_eq!(at(90.0, 180.0), "89:179");
        assert_eq!(at(-90.0, -180.0), "-90:-180");
    }

    proptest! {
        #[test]
        fn any_valid_coordinates_round_trip(lat in -90.0f64..=90.0, lon in -180.0f64..=180.0) {
            let body = with(&["pickupLocation"], Some(serde_json::json!(format!("{lat},{lon}"))));
            let r = parse_delivery_request(&body).unwrap();
            prop_assert_eq!(r.pickup_location, Location { latitude: lat, longitude: lon });
            let region = region_of(r.pickup_location);
            let (a, b) = region.split_once(':').unwrap();
            let (a, b): (i32, i32) = (a.parse().unwrap(), b.parse().unwrap());
            prop_assert!((-90..90).contains(&a) && (-180..180).contains(&b));
        }

        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_delivery_request(&body);
        }
    }
}
