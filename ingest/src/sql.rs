//! The seam between the tier and the history's SQL engine: [`SqlEndpoint`] and what it
//! answers ([`SqlAnswer`], [`SqlFailure`], [`SqlFailureKind`]).
//!
//! It owns only these types. It must not import the tier's error type or anything that
//! does (`error.rs` maps [`SqlFailureKind`] to HTTP statuses, so the dependency runs from
//! there to here), and it never handles HTTP itself: `handlers::sql` carries the request.

use bytes::Bytes;
use futures_util::stream::BoxStream;

/// Answers `POST /api/sql`. The binary plugs in the history's SQL engine; this crate
/// only carries the request and the answer.
pub trait SqlEndpoint: Send + Sync + 'static {
    /// Runs `sql` over the tables as of `as_of` (a version number or an RFC 3339 time;
    /// none: the newest) and renders the result in the format the `Accept` header names.
    fn query(
        &self,
        sql: String,
        as_of: Option<String>,
        accept: Option<String>,
    ) -> futures_util::future::BoxFuture<'static, Result<SqlAnswer, SqlFailure>>;
}

/// A query result, rendered as it streams.
pub struct SqlAnswer {
    /// Its media type.
    pub content_type: &'static str,
    /// The rendered result, chunk by chunk. A failure part way (a limit passed) ends it
    /// with the failure.
    pub body: BoxStream<'static, Result<Bytes, SqlFailure>>,
}

impl std::fmt::Debug for SqlAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlAnswer")
            .field("content_type", &self.content_type)
            .finish_non_exhaustive()
    }
}

/// Why a query gave no result (or stopped part way).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SqlFailure {
    /// What kind of failure.
    pub kind: SqlFailureKind,
    /// The engine's message.
    pub message: String,
}

/// Kinds of query failures (each has its HTTP status in `IngestError::status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlFailureKind {
    /// The `Accept` header names no format the engine renders.
    NotAcceptable,
    /// Not a read-only query (DDL, DML, `COPY`, `SET`).
    Refused,
    /// Syntax or planning error.
    Invalid,
    /// Over the memory, row or time limit.
    OverLimit,
    /// A fault of the engine or the store.
    Internal,
}
