//! Drone telemetry: one position fix as a drone reports it, and its rules.
//!
//! Wire format: `{"latitude": .., "longitude": .., "timestamp": "RFC 3339", "altitude": ..,
//! "speed": .., "heading": .., "battery": ..}`; the last four are optional. The drone id
//! comes from the URL, not the body.

use chrono::{DateTime, FixedOffset};
use serde::Deserialize;

use crate::delivery::{Text, ValidationError, present};

/// One validated position fix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositionFix {
    /// Degrees north, -90 to 90.
    pub latitude: f64,
    /// Degrees east, -180 to 180.
    pub longitude: f64,
    /// When the drone took the fix.
    pub timestamp: DateTime<FixedOffset>,
    /// Metres above sea level, -500 to 20,000.
    pub altitude: Option<f64>,
    /// Ground speed in metres per second, 0 to 200.
    pub speed: Option<f64>,
    /// Heading in degrees clockwise from north, 0 to 360.
    pub heading: Option<f64>,
    /// Battery charge in percent, 0 to 100.
    pub battery: Option<f64>,
}

#[derive(Deserialize)]
struct RawFix<'a> {
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
    #[serde(borrow, default)]
    timestamp: Option<Text<'a>>,
    #[serde(default, deserialize_with = "present")]
    altitude: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    speed: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    heading: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    battery: Option<f64>,
}

fn in_range(
    value: Option<f64>,
    field: &str,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Option<f64>, ValidationError> {
    match value {
        Some(v) if !(v.is_finite() && range.contains(&v)) => Err(ValidationError {
            field: field.to_owned(),
            reason: format!("must be between {} and {}", range.start(), range.end()),
        }),
        v => Ok(v),
    }
}

fn required(value: Option<f64>, field: &str) -> Result<f64, ValidationError> {
    value.ok_or_else(|| ValidationError {
        field: field.to_owned(),
        reason: "is required".into(),
    })
}

/// Parses and validates one position fix from JSON.
pub fn parse_position_fix(json: &[u8]) -> Result<PositionFix, ValidationError> {
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ValidationError {
            field: String::new(),
            reason: "a position fix must be a JSON object".into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let raw: RawFix<'_> = crate::delivery::deserialize_with_path(&mut de, json)?;
    let latitude = in_range(
        Some(required(raw.latitude, "latitude")?),
        "latitude",
        -90.0..=90.0,
    )?
    .unwrap_or_default();
    let longitude = in_range(
        Some(required(raw.longitude, "longitude")?),
        "longitude",
        -180.0..=180.0,
    )?
    .unwrap_or_default();
    let text = raw.timestamp.ok_or_else(|| ValidationError {
        field: "timestamp".into(),
        reason: "is required".into(),
    })?;
    let timestamp = DateTime::parse_from_rfc3339(&text.0).map_err(|e| ValidationError {
        field: "timestamp".into(),
        reason: format!("must be an RFC 3339 date-time ({e})"),
    })?;
    Ok(PositionFix {
        latitude,
        longitude,
        timestamp,
        altitude: in_range(raw.altitude, "altitude", -500.0..=20_000.0)?,
        speed: in_range(raw.speed, "speed", 0.0..=200.0)?,
        heading: in_range(raw.heading, "heading", 0.0..=360.0)?,
        battery: in_range(raw.battery, "battery", 0.0..=100.0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIX: &str = r#"{"latitude":47.6,"longitude":-122.3,"timestamp":"2026-11-24T10:00:00Z","altitude":120,"speed":14.5,"heading":270,"battery":81}"#;

    #[test]
    fn a_full_fix_parses() {
        let fix = parse_position_fix(FIX.as_bytes()).unwrap();
        assert_eq!(fix.latitude, 47.6);
        assert_eq!(fix.battery, Some(81.0));
        let bare = r#"{"latitude":0,"longitude":0,"timestamp":"2026-11-24T10:00:00+02:00"}"#;
        assert_eq!(parse_position_fix(bare.as_bytes()).unwrap().speed, None);
    }

    #[test]
    fn null_is_not_an_absent_field() {
        let fix =
            r#"{"latitude":1,"longitude":2,"timestamp":"2026-01-01T00:00:00Z","battery":null}"#;
        assert_eq!(
            parse_position_fix(fix.as_bytes()).unwrap_err().field,
            "battery"
        );
    }

    #[test]
    fn escaped_strings_parse() {
        let fix = r#"{"latitude":1,"longitude":2,"timestamp":"2026-01-01T00:00:00\u005a"}"#;
        let fix = parse_position_fix(fix.as_bytes()).unwrap();
        assert_eq!(fix.timestamp.to_rfc3339(), "2026-01-01T00:00:00+00:00");
    }

    #[test]
    fn each_rule_names_its_field() {
        let mut base: serde_json::Value = serde_json::from_str(FIX).unwrap();
        for (field, value, reason) in [
            ("latitude", serde_json::json!(91), "between"),
            ("longitude", serde_json::json!(-181), "between"),
            ("altitude", serde_json::json!(30000), "between"),
            ("speed", serde_json::json!(-1), "between"),
            ("heading", serde_json::json!(361), "between"),
            ("battery", serde_json::json!(101), "between"),
            ("timestamp", serde_json::json!("noon"), "RFC 3339"),
            ("latitude", serde_json::json!("47"), "invalid type"),
        ] {
            let saved = base[field].clone();
            base[field] = value;
            let e = parse_position_fix(base.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(reason), "{e}");
            base[field] = saved;
        }
        for field in ["latitude", "longitude", "timestamp"] {
            let mut v = base.clone();
            v.as_object_mut().unwrap().remove(field);
            let e = parse_position_fix(v.to_string().as_bytes()).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.reason.as_str()),
                (field, "is required")
            );
        }
        assert!(parse_position_fix(b"[]").is_err());
    }
}
