//! The drone simulator: flies every assigned drone and reports its positions through the
//! ingestion API, as real drones would, so that a demo (and the tests) see deliveries
//! move to Completed.
//!
//! It reads `drone-assignments` as its own consumer group and, for each assignment,
//! flies the drone from where it was to the pickup and on to the drop-off in a straight
//! line at its speed times `--simulate-speedup`, posting a fix to
//! `POST /api/drones/{id}/telemetry` every `--simulate-tick-ms` and one at each end of a
//! leg. It does not wait for pickup times. Flights in progress when it stops are not
//! resumed (their offsets are stored when they start).

use std::sync::Arc;
use std::time::Duration;

use bus::{ClientSettings, Consumer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use schemas::delivery::Location;
use schemas::topics;
use schemas::tracking::Assignment;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::{ProcessorError, Result};
use crate::geo::distance_m;

const NAME: &str = "simulator";

/// The simulator's consumer group.
pub const GROUP: &str = "dronedelivery-simulator";

/// Settings of the drone simulator.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulatorArgs {
    /// Base URL of the ingestion API the drones report to.
    #[arg(
        long = "simulate-target",
        env = "DRONEDELIVERY_SIMULATE_TARGET",
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: String,

    /// API key the drones send (`Authorization: Bearer`); none on a loopback tier without
    /// keys.
    #[arg(long = "simulate-api-key", env = "DRONEDELIVERY_SIMULATE_API_KEY")]
    pub api_key: Option<String>,

    /// How many times faster than real time drones fly.
    #[arg(
        long = "simulate-speedup",
        env = "DRONEDELIVERY_SIMULATE_SPEEDUP",
        default_value_t = 60.0
    )]
    pub speedup: f64,

    /// Milliseconds of real time between two fixes of a drone.
    #[arg(
        long = "simulate-tick-ms",
        env = "DRONEDELIVERY_SIMULATE_TICK_MS",
        default_value_t = 1000
    )]
    pub tick_ms: u64,

    /// Most drones flying at once; further assignments wait.
    #[arg(
        long = "simulate-max-flights",
        env = "DRONEDELIVERY_SIMULATE_MAX_FLIGHTS",
        default_value_t = 10_000
    )]
    pub max_flights: usize,
}

impl Default for SimulatorArgs {
    fn default() -> Self {
        Self {
            target: "http://127.0.0.1:8080".into(),
            api_key: None,
            speedup: 60.0,
            tick_ms: 1000,
            max_flights: 10_000,
        }
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Where a drone is `fraction` of the way from `a` to `b` (straight line in degrees,
/// fine at the scale of a region).
pub fn along(a: Location, b: Location, fraction: f64) -> Location {
    let f = fraction.clamp(0.0, 1.0);
    Location {
        latitude: a.latitude + (b.latitude - a.latitude) * f,
        longitude: a.longitude + (b.longitude - a.longitude) * f,
    }
}

/// Runs the simulator until `shutdown` is cancelled.
pub async fn run(
    config: SimulatorArgs,
    settings: ClientSettings,
    shutdown: CancellationToken,
) -> Result<()> {
    if !(config.speedup.is_finite() && (0.01..=1_000_000.0).contains(&config.speedup)) {
        return Err(ProcessorError::Config {
            reason: "--simulate-speedup must be between 0.01 and 1000000".into(),
        });
    }
    let consumer = Consumer::subscribe(&settings, GROUP, &[topics::DRONE_ASSIGNMENTS.name])
        .map_err(|source| ProcessorError::Bus {
            processor: NAME,
            source: Box::new(source),
        })?;
    let client: HttpClient = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let config = Arc::new(config);
    let flights = Arc::new(Semaphore::new(config.max_flights.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    // A drone flies one assignment at a time: a new one ends its previous flight.
    let mut flights_of: std::collections::HashMap<String, CancellationToken> =
        std::collections::HashMap::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&flights).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let received = tokio::select! {
            () = shutdown.cancelled() => break,
            received = consumer.recv() => received,
        };
        let record = match received {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(error = %e, "simulator: receive failed");
                continue;
            }
        };
        let _ = consumer.store(record.topic(), record.partition(), record.offset());
        let Ok(assignment) =
            serde_json::from_slice::<Assignment>(record.payload().unwrap_or_default())
        else {
            continue;
        };
        let stop = shutdown.child_token();
        if let Some(previous) = flights_of.insert(assignment.drone_id.clone(), stop.clone()) {
            previous.cancel();
        }
        let (client, config) = (client.clone(), Arc::clone(&config));
        tasks.spawn(async move {
            fly(&client, &config, &assignment, &stop).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || consumer.commit()).await;
    Ok(())
}

async fn fly(
    client: &HttpClient,
    config: &SimulatorArgs,
    a: &Assignment,
    stop: &CancellationToken,
) {
    let tick = Duration::from_millis(config.tick_ms.max(10));
    for (from, to) in [(a.from, a.pickup), (a.pickup, a.drop_off)] {
        let real_secs = distance_m(from, to) / a.speed_mps.max(0.1) / config.speedup;
        let steps = (real_secs / tick.as_secs_f64()).ceil().max(1.0) as u64;
        for step in 1..=steps {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(tick.min(Duration::from_secs_f64(real_secs.max(0.0)))) => {}
            }
            let here = along(from, to, step as f64 / steps as f64);
            if !report(client, config, &a.drone_id, here, a.speed_mps, stop).await {
                return;
            }
        }
        // Hovering at the end of a leg, it reports its position twice more, as a drone
        // that waits would: a fix that reached the pipeline before its assignment did
        // is not the last word.
        for _ in 0..2 {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            if !report(client, config, &a.drone_id, to, 0.0, stop).await {
                return;
            }
        }
    }
}

/// Posts one fix, retrying (bounded) while the tier answers 429 or 503.
async fn report(
    client: &HttpClient,
    config: &SimulatorArgs,
    drone_id: &str,
    here: Location,
    speed: f64,
    stop: &CancellationToken,
) -> bool {
    let body = serde_json::json!({
        "latitude": here.latitude,
        "longitude": here.longitude,
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "speed": speed.min(200.0),
    })
    .to_string();
    let url = format!(
        "{}/api/drones/{drone_id}/telemetry",
        config.target.trim_end_matches('/')
    );
    for attempt in 0..10u32 {
        let mut request = hyper::Request::post(&url).header("content-type", "application/json");
        if let Some(key) = &config.api_key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let Ok(request) = request.body(Full::new(Bytes::from(body.clone()))) else {
            return false;
        };
        match client.request(request).await {
            Ok(response) if response.status().is_success() => {
                let _ = response.into_body().collect().await;
                return true;
            }
            Ok(response) if matches!(response.status().as_u16(), 429 | 503) => {}
            Ok(response) => {
                tracing::warn!(drone_id, status = %response.status(), "simulator: telemetry refused");
                return false;
            }
            Err(e) => tracing::debug!(drone_id, error = %e, "simulator: telemetry post failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))) => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flights_interpolate_between_the_ends() {
        let a = Location {
            latitude: 0.0,
            longitude: 0.0,
        };
        let b = Location {
            latitude: 1.0,
            longitude: 2.0,
        };
        assert_eq!(along(a, b, 0.0), a);
        assert_eq!(along(a, b, 1.0), b);
        assert_eq!(along(a, b, 0.5).longitude, 1.0);
        assert_eq!(along(a, b, 7.0), b);
    }
}
