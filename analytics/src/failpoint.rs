//! Crash injection for tests: where the history sink stops as if its process died.
//!
//! Owns only the names of those points. It must not act on them: the sink checks them
//! where it stands, and production configurations never set one.

/// Where a test makes the sink fail as if the process died there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
    /// After the first roll wrote its Parquet files, before the log commit.
    AfterFileWrite,
    /// After the first roll's log commit, before the Kafka commit.
    AfterLogCommit,
}
