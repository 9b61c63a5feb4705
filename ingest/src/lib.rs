//! The HTTP ingestion tier: the front door that business clients post delivery requests to.
//!
//! It owns the HTTP listener, request limits, validation at the edge and the answer to the
//! client. A 202 means durable: the tier answers only after the broker acknowledged the
//! record (`acks=all`, idempotent producer). The record's payload is the client's own
//! bytes, keyed by delivery id; what the tier adds travels in Kafka headers.
//!
//! The same server, built read-only (`Ingest::bind_read_only`), serves the SQL server:
//! `POST /api/sql` with the same keys, health and metrics, and 404 on the write routes.
//! `ops` is the small health listener (`/healthz`, `/readyz`, `/metrics`) of services
//! that have no public API.
//!
//! It must not decide anything downstream (scheduling, state) and never imports the
//! processors or analytics crates: it meets them only through the `delivery-requests`
//! topic.

pub mod batch;
mod error;
pub mod idempotency;
pub mod ops;
mod server;
pub mod status;
pub mod tenants;

pub use error::{IngestError, Result};
pub use server::{
    Ingest, IngestConfig, MetricsRender, OPENAPI, SqlAnswer, SqlAuthenticator, SqlEndpoint,
    SqlFailure, SqlFailureKind,
};
pub use status::StatusView;
