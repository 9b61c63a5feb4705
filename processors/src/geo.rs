//! Geometry of flights: distances on the Earth and how long a drone takes to fly them.
//! Pure: no I/O.
//!
//! Owns only these formulas, shared by scheduling (ETAs), the delivery stages (arrival
//! and ETAs) and the simulator (flight time). It must not know drones, regions or
//! deliveries.

use schemas::delivery::Location;

/// Mean Earth radius, metres.
const EARTH_RADIUS_M: f64 = 6_371_000.0;

/// Great-circle distance in metres.
pub fn distance_m(a: Location, b: Location) -> f64 {
    let (lat1, lat2) = (a.latitude.to_radians(), b.latitude.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.longitude - a.longitude).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

/// Milliseconds to fly `metres` at `speed_mps`.
pub fn flight_ms(metres: f64, speed_mps: f64) -> i64 {
    (metres / speed_mps.max(0.1) * 1000.0).ceil() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(latitude: f64, longitude: f64) -> Location {
        Location {
            latitude,
            longitude,
        }
    }

    #[test]
    fn distances_are_great_circle_metres() {
        let d = distance_m(loc(0.0, 0.0), loc(0.0, 1.0));
        assert!((d - 111_195.0).abs() < 10.0, "{d}");
        assert_eq!(distance_m(loc(47.0, -122.0), loc(47.0, -122.0)), 0.0);
    }
}
