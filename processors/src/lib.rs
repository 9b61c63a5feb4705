//! The stream processors: Kafka consumer-group services that turn accepted requests into
//! work for the rest of the pipeline.
//!
//! - [`workflow`]: consumes `delivery-requests` and sends each valid request to
//!   `drone-scheduling` (the scheduling consumer's input, keyed by region) in a compact
//!   form. The delivery consumer reads `delivery-requests` itself, in its own group.
//!
//! Processing is exactly-once on a Kafka cluster (one transaction per batch: outputs,
//! state and input offsets) and at-least-once elsewhere ([`guarantee`]); a record that
//! cannot be processed goes to `dead-letters` with its reason instead of blocking its
//! partition.
//!
//! - [`scheduling`] (pure decisions in [`scheduling::region`]): assigns drones per
//!   region.
//! - [`tracker`]: brings each drone's assignment and fixes to its delivery's key.
//! - [`deliveries`] (pure stage machine in [`deliveries::stages`]): each delivery's
//!   state, every change of it on `delivery-state` (its changelog and its events).
//! - [`stateful`]: the engine the three run on (changelog, restore, ticks), with its
//!   batches (`batch`: received records, never of a partition given away) and the
//!   `commit` of each batch under the [`guarantee`] in force.
//! - [`clock`]: event time and per-partition stream time for the three (pure).
//! - [`output`]: the record a processor produces and the acknowledged batch send that
//!   the workflow and the engine share.
//! - [`geo`]: distances and flight times (pure).
//! - [`notifier`]: posts each change of a delivery to its tenant's webhooks, signed,
//!   at least once, dead-lettering what cannot be delivered.
//! - [`simulator`]: flies assigned drones and reports through the HTTP API, for demos
//!   and tests.
//!
//! This root holds what the binary chooses and starts: the [`Processor`]s and
//! [`run_stateful`]. The modules never import it (the error type is in its own module).
//!
//! This crate never imports the ingestion or analytics crates; it meets them only through
//! topics named in `schemas` (and the simulator through the public HTTP API, as a
//! client). It does not serve HTTP.

mod batch;
pub mod clock;
mod commit;
pub mod deliveries;
mod error;
pub mod geo;
pub mod guarantee;
pub mod notifier;
pub mod output;
pub mod scheduling;
pub mod simulator;
pub mod stateful;
pub mod tracker;
pub mod workflow;

pub use error::{ProcessorError, Result};
pub use output::OutputHealth;

/// Settings of the scheduling, tracking and delivery consumers.
#[derive(Debug, Clone, clap::Args)]
pub struct StatefulArgs {
    /// The drone fleet: a JSON array of `{"id", "home", "maxWeightKg", "maxSize",
    /// "speedMps"}`, each drone serving the one-degree region of its home. Without it,
    /// every region that gets a request has eight drones at its centre.
    #[arg(long, env = "DRONEDELIVERY_FLEET", value_name = "FILE")]
    pub fleet: Option<std::path::PathBuf>,

    /// Most records a stateful consumer handles in one batch (one changelog write and
    /// one offset store per batch).
    #[arg(
        long,
        env = "DRONEDELIVERY_PROCESSOR_BATCH_RECORDS",
        default_value_t = PROCESSOR_BATCH_RECORDS
    )]
    pub processor_batch_records: usize,

    /// How long a finished (completed or cancelled) delivery stays in the delivery
    /// consumer's state, and so on the status routes, measured in event time from its
    /// last transition; then it is deleted (a tombstone on `delivery-state`) and its
    /// status is 404. Its history stays. Seconds, or with a unit: `90s`, `30m`, `24h`.
    #[arg(
        long,
        env = "DRONEDELIVERY_FINISHED_RETENTION",
        default_value = "24h",
        value_parser = clock::parse_duration
    )]
    pub finished_retention: std::time::Duration,

    /// Most requests waiting for a drone in one region; a request arriving at a full
    /// queue is cancelled with reason `QueueFull`.
    #[arg(
        long,
        env = "DRONEDELIVERY_MAX_WAITING_PER_REGION",
        default_value_t = scheduling::region::MAX_WAITING
    )]
    pub max_waiting_per_region: usize,

    /// Longest a request waits for a drone, in event time from its arrival; a request
    /// also never waits past its deadline (unless that had passed when it arrived). Then
    /// it is cancelled with reason `WaitedTooLong` (or `DeadlinePassed`). Seconds, or
    /// with a unit.
    #[arg(
        long,
        env = "DRONEDELIVERY_MAX_WAITING_TIME",
        default_value = "1h",
        value_parser = clock::parse_duration
    )]
    pub max_waiting_time: std::time::Duration,

    /// How long the drone tracker remembers a drone's last assignment once it is over
    /// (past its delivery ETA) and the drone sent nothing; then it is forgotten (a
    /// tombstone on `tracking-state`). Seconds, or with a unit.
    #[arg(
        long,
        env = "DRONEDELIVERY_TRACKER_DRONE_RETENTION",
        default_value = "1h",
        value_parser = clock::parse_duration
    )]
    pub tracker_drone_retention: std::time::Duration,
}

/// A processor, each its own consumer group: what `dronedelivery process --processors`
/// chooses from, so that each can be deployed and scaled on its own lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Processor {
    /// The fan-out of `delivery-requests`.
    Workflow,
    /// The scheduling consumer (drone assignment per region).
    Scheduling,
    /// The drone tracker (assignments and telemetry to each drone's delivery).
    Tracking,
    /// The delivery consumer (state, stages and ETAs).
    Deliveries,
    /// The notifier (each delivery change to its tenant's webhooks).
    Notifier,
}

impl Processor {
    /// Every processor.
    pub const ALL: [Self; 5] = [
        Self::Workflow,
        Self::Scheduling,
        Self::Tracking,
        Self::Deliveries,
        Self::Notifier,
    ];

    /// Its consumer group.
    pub fn group(self) -> &'static str {
        match self {
            Self::Workflow => workflow::GROUP,
            Self::Scheduling => scheduling::SPEC.group,
            Self::Tracking => tracker::SPEC.group,
            Self::Deliveries => deliveries::SPEC.group,
            Self::Notifier => notifier::GROUP,
        }
    }

    /// The topics its group reads.
    pub fn inputs(self) -> &'static [&'static str] {
        match self {
            Self::Workflow => workflow::INPUTS,
            Self::Scheduling => scheduling::SPEC.inputs,
            Self::Tracking => tracker::SPEC.inputs,
            Self::Deliveries => deliveries::SPEC.inputs,
            Self::Notifier => notifier::INPUTS,
        }
    }

    /// Whether it is one of the stateful consumers (run by [`run_stateful`]).
    pub fn is_stateful(self) -> bool {
        !matches!(self, Self::Workflow | Self::Notifier)
    }

    /// Whether the pipeline's writes wait for it (backpressure on its lag). The notifier
    /// does not count: its lag is the webhooks' retries, which must not hold up writes.
    pub fn holds_up_writes(self) -> bool {
        self != Self::Notifier
    }
}

const PROCESSOR_BATCH_RECORDS: usize = stateful::BATCH_RECORDS;

impl Default for StatefulArgs {
    fn default() -> Self {
        Self {
            fleet: None,
            processor_batch_records: PROCESSOR_BATCH_RECORDS,
            finished_retention: deliveries::FINISHED_RETENTION,
            max_waiting_per_region: scheduling::region::MAX_WAITING,
            max_waiting_time: scheduling::region::MAX_WAITING_TIME,
            tracker_drone_retention: tracker::DRONE_RETENTION,
        }
    }
}

/// Runs the stateful consumers among `processors` (the scheduling consumer, the drone
/// tracker, the delivery consumer; [`Processor::Workflow`] is not one of them and is
/// ignored here) until `shutdown` is cancelled, or until one of them fails (then the
/// others are stopped and the error returned). [`Processor::ALL`] runs all three.
pub async fn run_stateful(
    config: StatefulArgs,
    processors: Vec<Processor>,
    settings: bus::ClientSettings,
    durability: guarantee::Durability,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let fleet = match &config.fleet {
        Some(path) => scheduling::Fleet::load(path)?,
        None => scheduling::Fleet::Default,
    };
    let engine = stateful::EngineConfig {
        batch_records: config.processor_batch_records.max(1),
        ..stateful::EngineConfig::for_guarantee(durability.guarantee)
    };
    let stop = shutdown.child_token();
    let runs = |p: Processor| processors.contains(&p);
    let mut tasks = tokio::task::JoinSet::new();
    if runs(Processor::Scheduling) {
        tasks.spawn(stateful::run(
            scheduling::SPEC,
            engine,
            scheduling::Scheduler::new(fleet).with_limits(scheduling::region::QueueLimits {
                max_waiting: config.max_waiting_per_region,
                max_waiting_time: config.max_waiting_time,
            }),
            settings.clone(),
            durability.clone(),
            stop.clone(),
        ));
    }
    if runs(Processor::Tracking) {
        tasks.spawn(stateful::run(
            tracker::SPEC,
            engine,
            tracker::Tracker::new(config.tracker_drone_retention),
            settings.clone(),
            durability.clone(),
            stop.clone(),
        ));
    }
    if runs(Processor::Deliveries) {
        tasks.spawn(stateful::run(
            deliveries::SPEC,
            engine,
            deliveries::Deliveries::new(config.finished_retention),
            settings,
            durability,
            stop.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.unwrap_or_else(|e| {
            Err(ProcessorError::Task {
                processor: "stateful",
                reason: e.to_string(),
            })
        });
        if outcome.is_err() || !stop.is_cancelled() {
            // One stopped on its own: stop the others too.
            stop.cancel();
        }
        if result.is_ok() {
            result = outcome;
        }
    }
    result
}
