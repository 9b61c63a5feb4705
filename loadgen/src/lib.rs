//! The load generator: HTTP clients that behave like bulk business clients of the
//! ingestion tier, and the report of what they saw.
//!
//! It owns the client side of a load test: a fixed set of keep-alive connections, the
//! generated bodies (seeded, so a run can be repeated), the pacing (open loop at a fixed
//! rate, or closed loop as fast as answers come back), and the counting: calls and
//! records by outcome, bytes, and latency in an HDR histogram. In open loop the latency
//! of a call is measured from the time it was due, not from when a connection got round
//! to sending it, so a slow server cannot hide its queueing (no coordinated omission).
//!
//! It must not import the services it loads: it speaks to them over HTTP only, as a
//! client would. Bodies are generated before the clock starts, so the generator's own
//! cost is not in the figures.

mod client;
mod error;
pub mod plan;
pub mod report;

use std::path::PathBuf;
use std::time::Duration;

pub use client::run;
pub use error::{LoadgenError, Result};
pub use plan::{Compression, Framing};
pub use report::{Latency, Report};

/// What to load and how. Every field has a flag (and an environment variable).
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Base URL of the ingestion tier (`http://host:port`); only `http` is supported.
    #[arg(
        long,
        env = "DRONEDELIVERY_LOADGEN_TARGET",
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: String,

    /// How long to send for (`500ms`, `5s`, `2m`); calls still in flight then are
    /// waited for, up to --timeout.
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_DURATION", default_value = "5s", value_parser = plan::parse_duration)]
    pub duration: Duration,

    /// Records per call: 1 posts single requests to `/api/deliveryrequests`, more posts
    /// batches to `/api/deliveryrequests/batch`.
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub batch_size: u32,

    /// Concurrent keep-alive connections (each sends one call at a time).
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_CONNECTIONS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,

    /// Tenants the generated requests belong to (see --tenant-prefix); ignored with
    /// --api-keys, which names the tenants.
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_TENANTS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub tenants: u32,

    /// Prefix of the generated tenant names (`PREFIX0`, `PREFIX1`, ...), e.g. to tell one
    /// run's records from another's in the history.
    #[arg(
        long,
        env = "DRONEDELIVERY_LOADGEN_TENANT_PREFIX",
        default_value = "tenant-"
    )]
    pub tenant_prefix: String,

    /// File of `tenant:key` lines (the ingestion tier's own format): each batch is sent
    /// by one of these tenants with its key as `Authorization: Bearer`.
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_API_KEYS", value_name = "FILE")]
    pub api_keys: Option<PathBuf>,

    /// How a batch is framed: a JSON array or NDJSON.
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_FORMAT", value_enum, default_value_t = Framing::Json)]
    pub format: Framing,

    /// Body compression (`Content-Encoding`).
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_COMPRESSION", value_enum, default_value_t = Compression::None)]
    pub compression: Compression,

    /// Open loop: records per second to send, spread evenly over time whatever the
    /// answers; latency counts from when each call was due. 0 sends as fast as answers
    /// come back (closed loop).
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_RATE", default_value_t = 0.0)]
    pub rate: f64,

    /// Percent of calls that post drone telemetry (a batch of position fixes for one
    /// drone, to `/api/drones/{id}/telemetry`) instead of delivery requests. With
    /// --api-keys, they go as the tenant `fleet` when the file has one (the tier refuses
    /// telemetry from other tenants' keys by default).
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_TELEMETRY_PERCENT", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub telemetry_percent: u8,

    /// Seed of the generated requests: the same seed sends the same bodies.
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_SEED", default_value_t = 1)]
    pub seed: u64,

    /// Distinct records generated before the run (cycled through); bounds the
    /// generator's memory.
    #[arg(
        long,
        env = "DRONEDELIVERY_LOADGEN_DISTINCT_RECORDS",
        default_value_t = 100_000
    )]
    pub distinct_records: u32,

    /// Longest wait for one answer; a call past it counts as a timeout and its
    /// connection is replaced.
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_TIMEOUT", default_value = "30s", value_parser = plan::parse_duration)]
    pub timeout: Duration,

    /// Also write the report as JSON to this file.
    #[arg(long, env = "DRONEDELIVERY_LOADGEN_JSON", value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl Default for LoadgenArgs {
    fn default() -> Self {
        Self {
            target: "http://127.0.0.1:8080".into(),
            duration: Duration::from_secs(5),
            batch_size: 1000,
            connections: 8,
            tenants: 10,
            tenant_prefix: "tenant-".into(),
            api_keys: None,
            format: Framing::Json,
            compression: Compression::None,
            rate: 0.0,
            telemetry_percent: 0,
            seed: 1,
            distinct_records: 100_000,
            timeout: Duration::from_secs(30),
            json: None,
        }
    }
}
