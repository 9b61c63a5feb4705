//! The seam between the tier and the history's SQL engine: [`SqlEndpoint`] and what it
//! answers ([`SqlAnswer`], [`SqlFailure`], [`SqlFailureKind`]).
//!
//! It owns only these types. It must not import the tier's error type or anything that
//! does (`error.rs` maps [`SqlFailureKind`] to HTTP statuses, so the dependency runs from
//! there to here), and it never handles HTTP itself: `handlers::sql` carries the request.

use bytes::Bytes;

/// Answers `POST /api/sql`. The binary plugs in the history's SQL engine; this crate
/// only carries the request and the answer.
pub trait SqlEndpoint: Send + Sync + 'static {
    /// Runs `sql` and renders the result in the format the `Accept` header names.
    fn query(
        &self,
        sql: String,
        accept: Option<String>,
    ) -> futures_util::future::BoxFuture<'static, Result<SqlAnswer, SqlFailure>>;
}

/// A rendered query result.
#[derive(Debug)]
pub struct SqlAnswer {
    /// Its media type.
    pub content_type: &'static str,
    /// The rendered rows.
    pub body: Bytes,
    /// How many rows.
    pub rows: usize,
}

/// Why a query gave no result.
#[derive(Debug, Clone, PartialEq, Eq)]
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
