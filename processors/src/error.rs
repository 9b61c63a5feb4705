//! The one error type of the processors crate.

/// The processors' error type.
#[derive(Debug, thiserror::Error)]
pub enum ProcessorError {
    /// The Kafka boundary failed.
    #[error("{processor}: {source}")]
    Bus {
        /// Which processor.
        processor: &'static str,
        /// The bus error.
        source: Box<bus::BusError>,
    },
    /// A setting or configuration file is wrong.
    #[error("configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// The processor's transactional producer was fenced: a newer member with the same
    /// instance id took over (this one is a zombie and must stop), or the cluster
    /// refused its transactions for good.
    #[error(
        "{processor}: fenced: transactional id {transactional_id} is no longer this process's          ({source}); stopping so that only its replacement writes"
    )]
    Fenced {
        /// Which processor.
        processor: &'static str,
        /// Its transactional id.
        transactional_id: String,
        /// The bus error.
        source: Box<bus::BusError>,
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
