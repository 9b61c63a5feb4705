//! Realistic, reproducible delivery requests for load generation, benchmarks and tests.
//!
//! A [`Generator`] is seeded: the same seed gives the same requests, on any machine.
//! Pickups cluster around a few city centres (so the scheduler sees busy regions),
//! drop-offs lie within ~20 km of their pickup, pickup times fall in the next few hours
//! of a fixed epoch, package sizes and weights follow a plausible mix. Every request it
//! makes is valid. Pure: no I/O, no clock.

use std::fmt::Write as _;

/// City centres (latitude, longitude) pickups cluster around.
const CENTRES: [(f64, f64); 6] = [
    (47.61, -122.33), // Seattle
    (40.71, -74.01),  // New York
    (51.51, -0.13),   // London
    (52.52, 13.40),   // Berlin
    (35.68, 139.69),  // Tokyo
    (-33.87, 151.21), // Sydney
];

/// A seeded source of delivery requests.
#[derive(Debug, Clone)]
pub struct Generator {
    state: u64,
    tenants: usize,
    /// Pickup times start from this instant (seconds since the Unix epoch).
    epoch_secs: i64,
}

impl Generator {
    /// A generator for `tenants` tenants (`tenant-0`, `tenant-1`, ...), seeded.
    pub fn new(seed: u64, tenants: usize) -> Self {
        Self {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
            tenants: tenants.max(1),
            // 2026-11-24T00:00:00Z
            epoch_secs: 1_795_478_400,
        }
    }

    /// The next pseudo-random number (splitmix64).
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// The tenant the next request is for, by index.
    pub fn tenant(&mut self) -> String {
        format!("tenant-{}", self.below(self.tenants))
    }

    /// The JSON body of one valid request of `tenant` (no `deliveryId`: the ingestion
    /// tier assigns one), appended to `out`.
    pub fn request_into(&mut self, tenant: &str, out: &mut String) {
        let (lat, lon) = CENTRES[self.below(CENTRES.len())];
        let pickup = (
            lat + (self.next_f64() - 0.5) * 0.4,
            lon + (self.next_f64() - 0.5) * 0.4,
        );
        let drop_off = (
            pickup.0 + (self.next_f64() - 0.5) * 0.3,
            pickup.1 + (self.next_f64() - 0.5) * 0.3,
        );
        let pickup_at = self.epoch_secs + (self.next_u64() % (6 * 3600)) as i64;
        let deadline = pickup_at + 1800 + (self.next_u64() % (4 * 3600)) as i64;
        let size = ["Small", "Small", "Medium", "Medium", "Large"][self.below(5)];
        let weight = match size {
            "Small" => 0.1 + self.next_f64() * 1.9,
            "Medium" => 1.0 + self.next_f64() * 4.0,
            _ => 3.0 + self.next_f64() * 12.0,
        };
        let expedited = self.below(10) == 0;
        let confirmation = ["None", "FingerPrint", "Picture", "Voice"][self.below(4)];
        let package = self.next_u64();
        let time = |secs: i64| {
            chrono::DateTime::from_timestamp(secs, 0)
                .unwrap_or_default()
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        };
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            r#"{{"ownerId":"{tenant}","pickupLocation":"{:.5},{:.5}","dropOffLocation":{{"latitude":{:.5},"longitude":{:.5}}},"pickupTime":"{}","deadline":"{}","expedited":{expedited},"confirmationRequired":"{confirmation}","packageInfo":{{"packageId":"pkg-{package:016x}","size":"{size}","weight":{weight:.2}}}}}"#,
            pickup.0,
            pickup.1,
            drop_off.0,
            drop_off.1,
            time(pickup_at),
            time(deadline),
        );
    }

    /// One valid request of a random tenant: (tenant, JSON body).
    pub fn request(&mut self) -> (String, String) {
        let tenant = self.tenant();
        let mut body = String::with_capacity(384);
        self.request_into(&tenant, &mut body);
        (tenant, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_valid_and_reproducible() {
        let mut a = Generator::new(7, 3);
        let mut b = Generator::new(7, 3);
        for _ in 0..2_000 {
            let (tenant, body) = a.request();
            assert_eq!((tenant.clone(), body.clone()), b.request());
            let request = crate::parse_delivery_request(body.as_bytes())
                .unwrap_or_else(|e| panic!("{body}: {e:?}"));
            assert_eq!(request.owner_id.as_ref(), tenant);
            assert!(request.deadline > request.pickup_time);
        }
        assert_ne!(
            Generator::new(8, 3).request(),
            Generator::new(7, 3).request()
        );
    }
}
