//! The fate of one record of a batch: accepted, rejected as invalid, or failed (retryable
//! or not). A plain value, kept with an idempotent answer so that a retry of the batch
//! sends again only the records that may succeed now.
//!
//! It must not produce, answer or decide anything.

use crate::error::IngestError;

/// The fate of one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Acknowledged by the broker, with the delivery id where the record has one.
    Accepted(Option<String>),
    /// Invalid: the same record is refused again, whenever it is sent.
    Rejected(schemas::ValidationError),
    /// Not taken.
    Failed(Failure),
}

/// Why a record was not taken, and whether sending it again may succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// What the client reads.
    pub(crate) message: String,
    /// A transient failure (the broker unavailable, no acknowledgement in time): the
    /// same record may be taken later.
    pub(crate) retryable: bool,
}

impl From<IngestError> for Failure {
    fn from(e: IngestError) -> Self {
        Self {
            retryable: e.status() == hyper::StatusCode::SERVICE_UNAVAILABLE,
            message: e.to_string(),
        }
    }
}

impl Outcome {
    /// A record that failed with a transient error.
    pub(crate) fn failed(e: IngestError) -> Self {
        Self::Failed(e.into())
    }

    /// Whether sending the record again may change its fate.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, Self::Failed(f) if f.retryable)
    }

    /// Bytes this outcome takes when kept (an estimate for the idempotency window's
    /// budget).
    pub(crate) fn cost(&self) -> usize {
        32 + match self {
            Self::Accepted(id) => id.as_ref().map_or(0, String::len),
            Self::Rejected(e) => e.field.len() + e.reason.len(),
            Self::Failed(f) => f.message.len(),
        }
    }
}
