//! The one error type of the load generator.

/// What stops a load run before it starts (during the run, failures are counted, not
/// returned).
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// A setting is out of range or malformed.
    #[error("invalid setting {setting}: {reason}")]
    Config {
        /// The flag.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    File {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The target could not be reached at all.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// host:port.
        target: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The result type of the load generator.
pub type Result<T, E = LoadgenError> = std::result::Result<T, E>;
