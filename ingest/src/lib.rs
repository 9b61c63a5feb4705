//! The HTTP ingestion tier: the front door that business clients post delivery requests to.
//!
//! It owns the HTTP listener, request limits, validation at the edge and the answer to the
//! client. A 202 means durable: the tier answers only after the broker acknowledged the
//! record (`acks=all`, idempotent producer). The record's payload is the client's own
//! bytes, keyed by delivery id; what the tier adds travels in Kafka headers.
//!
//! A request reads top to bottom through these modules: `server` (listener, connections,
//! shutdown, the top-level `handle`) → `routes` (the one table of routes) → `handlers`
//! (`deliveries`, `telemetry`, `sql`) → `admission` (budgets, bounded bodies) → `produce`
//! (headers, enqueueing, acknowledgements) → `response` (the answer). Beside them:
//! `config` (the flags), `state` (what every handler shares, built once), `error` (the
//! one error type and its HTTP statuses), `sql` (the seam to the history's SQL engine),
//! `batch` (batch framing and decoding), `idempotency` (the `Idempotency-Key` window),
//! `tenants` (API keys and rate limits) and `status` (the delivery status view). `fuzz`
//! holds the entry points of the fuzz targets in `fuzz/`, which the corpus replay in the
//! test suite calls too.
//!
//! The same server, built read-only (`Ingest::bind_read_only`), serves the SQL server:
//! `POST /api/sql` with the same keys, health and metrics, and 404 on the write routes.
//! `health` is the small health listener (`/healthz`, `/readyz`, `/metrics`) of services
//! that have no public API.
//!
//! It must not decide anything downstream (scheduling, state) and never imports the
//! processors or analytics crates: it meets them only through the `delivery-requests`
//! topic.

mod admission;
pub mod batch;
mod body;
mod claim;
mod config;
mod error;
pub mod fuzz;
mod handlers;
pub mod health;
pub mod idempotency;
mod idle;
mod keyfile;
mod links;
mod live;
mod outcome;
mod produce;
mod response;
mod routes;
mod server;
mod sql;
mod state;
pub mod status;
pub mod tenants;

pub use config::{AuthArgs, HttpServerArgs, IngestConfig, TierArgs};
pub use error::{IngestError, Result};
pub use handlers::sql::SqlAuthenticator;
pub use health::MetricsRender;
pub use routes::OPENAPI;
pub use server::Ingest;
pub use sql::{SqlAnswer, SqlEndpoint, SqlFailure, SqlFailureKind};
pub use status::{LiveLimits as StatusLimits, StatusView};
