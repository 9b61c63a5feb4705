//! The stream processors: Kafka consumer-group services that turn accepted requests into
//! work for the rest of the pipeline.
//!
//! - [`workflow`]: consumes `delivery-requests` and fans each record out to `deliveries`
//!   (the delivery consumer's input, keyed by delivery id) and `drone-scheduling` (the
//!   scheduling consumer's input, keyed by region).
//!
//! Processing is at-least-once with idempotent effects: a record's offset is stored only
//! after everything it produced was acknowledged, and a record that cannot be processed
//! goes to `dead-letters` with its reason instead of blocking its partition.
//!
//! This crate never imports the ingestion or analytics crates; it meets them only through
//! topics named in `schemas`. It does not speak HTTP to clients.

pub mod scheduling;
pub mod stages;
pub mod workflow;

/// The processors' error type.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// The Kafka boundary failed.
    #[error("{processor}: {source}")]
    Bus {
        /// Which processor.
        processor: &'static str,
        /// The bus error.
        source: bus::BusError,
    },
    /// A background task of the processor failed.
    #[error("{processor}: task failed: {reason}")]
    Task {
        /// Which processor.
        processor: &'static str,
        /// What happened.
        reason: String,
    },
}

/// The processors' result type.
pub type Result<T, E = ProcessorError> = std::result::Result<T, E>;
