//! The one error type of the bus.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What can go wrong at the Kafka boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// A setting is missing or malformed.
    #[error("invalid Kafka setting {key}: {reason}")]
    Config {
        /// The setting.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The librdkafka client could not be created or refused an operation.
    #[error("Kafka client error while {action}: {source}")]
    Client {
        /// What the client was doing.
        action: &'static str,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The producer's local queue is full: the broker is slower than the input. Callers
    /// answer with backpressure (503) rather than wait without bound.
    #[error("the producer queue is full")]
    QueueFull,
    /// The broker did not acknowledge a record (it timed out, or the broker refused it).
    #[error("record to {topic} was not acknowledged: {source}")]
    NotAcknowledged {
        /// The topic the record was for.
        topic: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The producer was dropped before the record's fate was known.
    #[error("a record was cancelled before it was acknowledged")]
    Cancelled,
    /// An operation did not finish in time.
    #[error("timed out while {action}")]
    Timeout {
        /// What was being done.
        action: &'static str,
    },
    /// A transaction failed. [`TransactionFailure`] says whether it can be aborted and
    /// tried again, or whether this producer was fenced for good.
    #[error("transaction failed while {action} ({failure:?}): {source}")]
    Transaction {
        /// What the producer was doing.
        action: &'static str,
        /// What the caller may do next.
        failure: TransactionFailure,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The embedded broker could not be started or driven.
    #[error("embedded broker: {reason}")]
    Embedded {
        /// What went wrong.
        reason: String,
    },
}

/// What a failed transaction leaves the producer able to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionFailure {
    /// Abort the transaction, then go on with a new one (the records and offsets of the
    /// aborted one are never seen by `read_committed` readers).
    Abortable,
    /// The call may simply be made again (a timeout; the transaction is still open).
    Retriable,
    /// The producer was fenced (a newer member holds its transactional id, or the
    /// broker refused its epoch) or failed for good: it must not write again.
    Fatal,
}

impl TransactionFailure {
    /// Classifies librdkafka's error of a transactional call.
    pub(crate) fn of(error: &KafkaError) -> Self {
        match error {
            KafkaError::Transaction(e) if e.is_fatal() => Self::Fatal,
            KafkaError::Transaction(e) if e.txn_requires_abort() => Self::Abortable,
            KafkaError::Transaction(e) if e.is_retriable() => Self::Retriable,
            e if matches!(
                e.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::Fenced
                        | RDKafkaErrorCode::ProducerFenced
                        | RDKafkaErrorCode::InvalidProducerEpoch
                        | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
                )
            ) =>
            {
                Self::Fatal
            }
            _ => Self::Abortable,
        }
    }
}

impl BusError {
    pub(crate) fn transaction(action: &'static str) -> impl FnOnce(KafkaError) -> Self {
        move |source| Self::Transaction {
            action,
            failure: TransactionFailure::of(&source),
            source,
        }
    }

    /// Whether a record's failure or a transactional call's means the producer was
    /// fenced or failed for good.
    pub fn is_fatal(&self) -> bool {
        match self {
            Self::Transaction { failure, .. } => *failure == TransactionFailure::Fatal,
            Self::NotAcknowledged { source, .. } | Self::Client { source, .. } => matches!(
                source.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::Fatal
                        | RDKafkaErrorCode::Fenced
                        | RDKafkaErrorCode::ProducerFenced
                        | RDKafkaErrorCode::InvalidProducerEpoch
                )
            ),
            _ => false,
        }
    }

    /// Whether a record failed only because the producer purged it (an aborted
    /// transaction, or one that became abortable because of another record).
    pub fn is_purged(&self) -> bool {
        match self {
            Self::NotAcknowledged { source, .. } => matches!(
                source.rdkafka_error_code(),
                Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
            ),
            _ => false,
        }
    }

    /// Whether the record itself can never be written, however often it is sent (larger
    /// than the broker takes, or refused as invalid): it belongs in `dead-letters`, and
    /// retrying it would stop its partition for good.
    pub fn is_permanent_for_record(&self) -> bool {
        match self {
            Self::NotAcknowledged { source, .. } | Self::Client { source, .. } => matches!(
                source.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge
                        | RDKafkaErrorCode::InvalidMessageSize
                        | RDKafkaErrorCode::InvalidMessage
                        | RDKafkaErrorCode::InvalidRecord
                )
            ),
            _ => false,
        }
    }

    pub(crate) fn client(action: &'static str) -> impl FnOnce(KafkaError) -> Self {
        move |source| Self::Client { action, source }
    }

    /// Whether the error is transient: the same call may succeed later (queue full,
    /// timeouts, broker transport failures), so an HTTP caller answers 503 with
    /// `Retry-After` rather than 500.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::QueueFull | Self::Cancelled | Self::Timeout { .. } => true,
            Self::NotAcknowledged { source, .. } | Self::Client { source, .. } => {
                matches!(
                    source.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::MessageTimedOut
                            | RDKafkaErrorCode::QueueFull
                            | RDKafkaErrorCode::BrokerTransportFailure
                            | RDKafkaErrorCode::AllBrokersDown
                            | RDKafkaErrorCode::RequestTimedOut
                            | RDKafkaErrorCode::NotEnoughReplicas
                            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                            | RDKafkaErrorCode::LeaderNotAvailable
                            | RDKafkaErrorCode::NotLeaderForPartition
                            | RDKafkaErrorCode::OperationTimedOut
                    )
                )
            }
            Self::Transaction { failure, .. } => *failure == TransactionFailure::Retriable,
            Self::Config { .. } | Self::Embedded { .. } => false,
        }
    }
}

/// The bus's result type.
pub type Result<T, E = BusError> = std::result::Result<T, E>;
