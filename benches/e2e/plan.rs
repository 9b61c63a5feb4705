//! What the benchmark measures, fixed: the two passes and the parameters of the phases
//! that every run shares (connections per batch size, producing tasks, the pipeline's
//! lag backpressure). It measures nothing and starts nothing; the phases, the
//! orchestration and the report all read their figures from here, so that the report's
//! row labels name what was run.

use serde::{Deserialize, Serialize};

/// The whole pipeline's lag backpressure in both passes (`run`'s default with the embedded
/// broker; off by default with `--brokers`), so that the passes differ in the broker only.
pub(crate) const MAX_CONSUMER_LAG: &str = "20000";

/// The scheduler's queue per region in the whole pipeline's runs: the load's pickups
/// cluster around a few cities and no drone flies, so with `run`'s default (1,000) most
/// requests would be refused as `QueueFull`, which measures refusals, not deliveries.
pub(crate) const MAX_WAITING_PER_REGION: &str = "10000000";

/// The HTTP tier's closed-loop phases: (batch size, connections).
pub(crate) const HTTP_TIERS: [(u32, u32); 3] = [(1, 256), (100, 16), (10_000, 4)];

/// Tasks producing at once through one producer in the raw producer's `futures` way (the
/// tier, too, produces from several connections' tasks through one producer).
pub(crate) const RAW_TASKS: usize = 4;

/// The ways the raw producer phase drives librdkafka, each measured before and after the
/// HTTP tier's phases; the fastest run is the ceiling the tier is compared with: (how,
/// producers). `futures`: `RAW_TASKS` tasks, a future per record (`bus::Producer`, as
/// the tier); `callback`: a thread per producer sending, a delivery callback counting.
pub(crate) const RAW_METHODS: &[(&str, usize)] =
    &[("futures", 1), ("callback", 1), ("callback", 2)];

/// Records/s offered while a Kafka cluster warms up.
pub(crate) const WARM_UP_RATE: f64 = 5_000.0;

/// Which broker a pass runs on; in the report, `embedded` or `kafka`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Pass {
    /// librdkafka's mock cluster, a fresh one per phase.
    Embedded,
    /// Apache Kafka: one cluster for the pass, started by the bench, or `--brokers`.
    Kafka,
}

impl Pass {
    /// The pass's name, as `--only` takes it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Kafka => "kafka",
        }
    }
}
