//! The one error type of the ingestion tier, and the one place where errors become HTTP
//! status codes and bodies.
//!
//! It owns [`IngestError`], its statuses, metric labels and JSON answers, and the retry
//! delay the tier asks for. It must not import the server, the routes or the handlers:
//! they depend on it, never the other way round (of the tier's modules it uses only the
//! SQL seam, `sql.rs`, which imports nothing back).

use std::time::Duration;

use bytes::Bytes;
use hyper::{Response, StatusCode, header};
use schemas::ValidationError;

use crate::body::{Body, full};
use crate::sql::SqlFailureKind;

/// The media type of every error answer: RFC 9457 problem details.
pub(crate) const PROBLEM_JSON: &str = "application/problem+json";

/// The `type` of a problem of kind `kind` ([`IngestError::kind`]).
pub(crate) fn problem_type(kind: &str) -> String {
    format!("urn:dronedelivery:problem:{kind}")
}

/// The `Retry-After` the tier asks for when it is momentarily full or cannot reach the
/// broker.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Everything the ingestion tier can answer other than success.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The request failed validation.
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationError),
    /// The body is larger than the configured limit.
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body is not JSON.
    #[error("unsupported content type {content_type:?}: send application/json")]
    UnsupportedMediaType {
        /// What the client sent.
        content_type: String,
    },
    /// A batch has more records than the configured limit.
    #[error("the batch has more than {limit} records")]
    TooManyRecords {
        /// The limit.
        limit: usize,
    },
    /// A batch body is not a JSON array (or NDJSON) of values.
    #[error("malformed batch: {reason}")]
    MalformedBatch {
        /// What is wrong with it.
        reason: String,
    },
    /// The body is compressed in a way the tier does not decode.
    #[error("unsupported content encoding {encoding:?}: send {accepted}")]
    UnsupportedEncoding {
        /// What the client sent.
        encoding: String,
        /// What the route decodes.
        accepted: &'static str,
    },
    /// The body arrived too slowly (a pause past the idle limit, or under the minimum
    /// rate).
    #[error("the body arrived too slowly: {reason}")]
    BodyTooSlow {
        /// Which limit it passed.
        reason: String,
    },
    /// The body could not be read (the client went away or sent a broken stream).
    #[error("cannot read the body: {reason}")]
    BodyRead {
        /// What went wrong.
        reason: String,
    },
    /// No such route.
    #[error("no route for {path}")]
    NotFound {
        /// The path asked for.
        path: String,
    },
    /// No delivery with this id is known for the caller's tenant (yet: the status view
    /// follows the delivery consumer by a moment).
    #[error("no delivery {delivery_id} is known for this tenant")]
    UnknownDelivery {
        /// The id asked for.
        delivery_id: String,
    },
    /// The route exists but not for this method.
    #[error("method not allowed; allowed: {allow}")]
    MethodNotAllowed {
        /// The methods the route takes.
        allow: &'static str,
    },
    /// More requests are being handled than `--max-in-flight` allows. Nothing was read or
    /// accepted; the client should retry after the given delay.
    #[error("service unavailable: too many requests in flight")]
    TooManyInFlight {
        /// When to retry.
        retry_after: Duration,
    },
    /// The pipeline's consumers are further behind than the operator allows (its
    /// backpressure is on). Nothing was read or accepted; the client should retry after
    /// the given delay.
    #[error("service unavailable: the pipeline's consumers are behind; retry later")]
    PipelineBehind {
        /// When to retry.
        retry_after: Duration,
    },
    /// The calling tenant already holds its share (`--tenant-share-percent`) of the
    /// requests or body bytes in flight. Nothing was accepted; the client should retry
    /// after the given delay.
    #[error(
        "service unavailable: this tenant already holds its share of the {what} \
         (--tenant-share-percent); retry later"
    )]
    TenantShareTaken {
        /// Which budget.
        what: &'static str,
        /// When to retry.
        retry_after: Duration,
    },
    /// Request bodies already hold `--max-in-flight-bytes`. The body may be partly
    /// unread and nothing was accepted; the client should retry after a second.
    #[error("service unavailable: too many body bytes in flight")]
    TooManyBytesInFlight,
    /// The broker did not take the record in time or refused it: the client should retry
    /// after the given delay. Nothing was acknowledged.
    #[error("service unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The tenant already holds its most live-event subscribers.
    #[error("tenant {tenant} holds its most event streams ({max})")]
    TooManyStreams {
        /// The tenant.
        tenant: String,
        /// Its bound.
        max: usize,
    },
    /// The delivery already has its most live-event subscribers.
    #[error("this delivery already has {max} event streams open")]
    DeliveryStreamsFull {
        /// The bound.
        max: usize,
    },
    /// The tier holds its most live-event subscribers.
    #[error("service unavailable: the server holds its most event streams")]
    StreamsFull,
    /// A tracking link past its end.
    #[error("this tracking link has expired")]
    LinkExpired,
    /// A tenant registering a webhook endpoint past its bound.
    #[error("tenant {tenant} already has {max} webhook endpoints")]
    TooManyWebhooks {
        /// The tenant.
        tenant: String,
        /// The bound.
        max: usize,
    },
    /// No valid credentials.
    #[error("unauthorized: {reason}")]
    Unauthorized {
        /// What was missing or wrong.
        reason: String,
    },
    /// The caller is known but may not use this route.
    #[error("forbidden: {reason}")]
    Forbidden {
        /// Why.
        reason: String,
    },
    /// The tenant sent more records than its rate limit allows.
    #[error("tenant {tenant} is over its rate limit")]
    RateLimited {
        /// The tenant.
        tenant: String,
        /// When its quota allows the request.
        retry_after: Duration,
    },
    /// A request header has a value the tier does not take.
    #[error("invalid {name} header: {reason}")]
    InvalidHeader {
        /// The header.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A request with the same `Idempotency-Key` is being processed.
    #[error("a request with this Idempotency-Key is still being processed")]
    IdempotencyInProgress,
    /// The `Idempotency-Key` was used before with a different body.
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyMismatch,
    /// A query over the history failed.
    #[error("{message}")]
    Sql {
        /// What kind of failure.
        kind: SqlFailureKind,
        /// The engine's message.
        message: String,
    },
    /// The tier's own settings are wrong (found at start-up).
    #[error("configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// A fault of the service itself.
    #[error("internal error: {reason}")]
    Internal {
        /// What went wrong.
        reason: String,
    },
}

/// The ingestion tier's result type.
pub type Result<T, E = IngestError> = std::result::Result<T, E>;

impl IngestError {
    /// The HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(_)
            | Self::BodyRead { .. }
            | Self::MalformedBatch { .. }
            | Self::InvalidHeader { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::RateLimited { .. }
            | Self::TooManyStreams { .. }
            | Self::DeliveryStreamsFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::IdempotencyInProgress | Self::TooManyWebhooks { .. } => StatusCode::CONFLICT,
            Self::LinkExpired => StatusCode::GONE,
            Self::IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } | Self::TooManyRecords { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::UnsupportedMediaType { .. } | Self::UnsupportedEncoding { .. } => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Self::NotFound { .. } | Self::UnknownDelivery { .. } => StatusCode::NOT_FOUND,
            Self::BodyTooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable { .. }
            | Self::TooManyInFlight { .. }
            | Self::TenantShareTaken { .. }
            | Self::PipelineBehind { .. }
            | Self::TooManyBytesInFlight
            | Self::StreamsFull => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal { .. } | Self::Config { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Sql { kind, .. } => match kind {
                SqlFailureKind::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
                SqlFailureKind::Refused | SqlFailureKind::Invalid => StatusCode::BAD_REQUEST,
                SqlFailureKind::OverLimit => StatusCode::UNPROCESSABLE_ENTITY,
                SqlFailureKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid",
            Self::PayloadTooLarge { .. } => "too_large",
            Self::TooManyRecords { .. } => "too_many_records",
            Self::MalformedBatch { .. } => "malformed_batch",
            Self::UnsupportedEncoding { .. } => "encoding",
            Self::UnsupportedMediaType { .. } => "media_type",
            Self::BodyRead { .. } => "body_read",
            Self::BodyTooSlow { .. } => "body_too_slow",
            Self::NotFound { .. } => "not_found",
            Self::UnknownDelivery { .. } => "unknown_delivery",
            Self::MethodNotAllowed { .. } => "method",
            Self::Unavailable { .. } => "unavailable",
            Self::TooManyInFlight { .. } => "in_flight",
            Self::TenantShareTaken { .. } => "tenant_share",
            Self::PipelineBehind { .. } => "pipeline_behind",
            Self::TooManyBytesInFlight => "in_flight_bytes",
            Self::Unauthorized { .. } => "unauthorized",
            Self::Forbidden { .. } => "forbidden",
            Self::RateLimited { .. } => "rate_limited",
            Self::TooManyStreams { .. } | Self::DeliveryStreamsFull { .. } => "too_many_streams",
            Self::StreamsFull => "streams_full",
            Self::LinkExpired => "link_expired",
            Self::TooManyWebhooks { .. } => "too_many_webhooks",
            Self::InvalidHeader { .. } => "header",
            Self::IdempotencyInProgress => "idempotency_in_progress",
            Self::IdempotencyMismatch => "idempotency_mismatch",
            Self::Config { .. } => "config",
            Self::Internal { .. } => "internal",
            Self::Sql { .. } => "sql",
        }
    }

    /// Whether the answer may come before the request body was read. Then the connection
    /// is closed after the answer (`Connection: close`), so that a client does not send
    /// its next request on a connection whose unread body the server is throwing away.
    fn before_body_read(&self) -> bool {
        matches!(
            self,
            Self::PayloadTooLarge { .. }
                | Self::BodyTooSlow { .. }
                | Self::TooManyInFlight { .. }
                | Self::TenantShareTaken { .. }
                | Self::PipelineBehind { .. }
                | Self::TooManyBytesInFlight
                | Self::NotFound { .. }
                | Self::MethodNotAllowed { .. }
                | Self::Unauthorized { .. }
                | Self::Forbidden { .. }
        )
    }

    /// The problem details of the error (RFC 9457): `type` names its kind
    /// (`urn:dronedelivery:problem:<kind>`), `title` is the status's reason phrase,
    /// `status`, and `detail` says what happened; the extension members `field` and
    /// `reason` name the part of the request at fault (a field of a record, or a header)
    /// and what is wrong with it.
    pub fn problem(&self) -> serde_json::Value {
        let status = self.status();
        let mut problem = serde_json::json!({
            "type": problem_type(self.kind()),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        let at_fault = match self {
            Self::Invalid(e) => Some((e.field.as_str(), e.reason.as_str())),
            Self::InvalidHeader { name, reason } => Some((*name, reason.as_str())),
            _ => None,
        };
        if let (Some((field, reason)), Some(members)) = (at_fault, problem.as_object_mut()) {
            members.insert("field".into(), field.into());
            members.insert("reason".into(), reason.into());
        }
        problem
    }

    /// The answer: [`IngestError::problem`] as `application/problem+json`, with
    /// `Retry-After`, `Allow` or `WWW-Authenticate` where they apply.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let body = self.problem();
        let mut builder = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, PROBLEM_JSON);
        if self.before_body_read() {
            builder = builder.header(header::CONNECTION, "close");
        }
        match &self {
            Self::Unavailable { retry_after, .. }
            | Self::TooManyInFlight { retry_after }
            | Self::TenantShareTaken { retry_after, .. }
            | Self::PipelineBehind { retry_after }
            | Self::RateLimited { retry_after, .. } => {
                builder = builder.header(header::RETRY_AFTER, retry_after_secs(*retry_after));
            }
            Self::IdempotencyInProgress | Self::TooManyBytesInFlight => {
                builder = builder.header(header::RETRY_AFTER, "1");
            }
            Self::TooManyStreams { .. } | Self::StreamsFull | Self::DeliveryStreamsFull { .. } => {
                builder = builder.header(header::RETRY_AFTER, "5");
            }
            Self::Unauthorized { .. } => {
                builder =
                    builder.header(header::WWW_AUTHENTICATE, "Bearer realm=\"dronedelivery\"");
            }
            Self::MethodNotAllowed { allow } => {
                builder = builder.header(header::ALLOW, *allow);
            }
            _ => {}
        }
        builder
            .body(full(Bytes::from(body.to_string())))
            .unwrap_or_else(|_| Response::new(full(Bytes::new())))
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
fn retry_after_secs(wait: Duration) -> String {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_headers() {
        let e = IngestError::Unavailable {
            reason: "queue full".into(),
            retry_after: Duration::from_millis(200),
        };
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let e = IngestError::Invalid(ValidationError {
            field: "ownerId".into(),
            reason: "is required".into(),
        });
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let r = IngestError::MethodNotAllowed { allow: "POST" }.into_response();
        assert_eq!(r.headers()[header::ALLOW], "POST");
        assert_eq!(r.headers()[header::CONNECTION], "close");
        let r = IngestError::TooManyInFlight {
            retry_after: Duration::from_secs(2),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        // Refused before the body was read: the connection closes.
        let r = IngestError::PipelineBehind {
            retry_after: Duration::from_secs(1),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONNECTION], "close");
        let r = IngestError::RateLimited {
            tenant: "t".into(),
            retry_after: Duration::from_millis(2100),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3", "rounded up");
        let r = IngestError::Unauthorized {
            reason: "no key".into(),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(
            IngestError::IdempotencyInProgress.status(),
            StatusCode::CONFLICT
        );
        assert_eq!(
            IngestError::IdempotencyMismatch.status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    #[test]
    fn every_error_is_problem_details_naming_the_field_at_fault() {
        let invalid = IngestError::Invalid(ValidationError {
            field: "droneId".into(),
            reason: "must be 1 to 64 characters".into(),
        });
        assert_eq!(
            invalid.problem(),
            serde_json::json!({
                "type": "urn:dronedelivery:problem:invalid",
                "title": "Bad Request",
                "status": 400,
                "detail": "invalid request: droneId: must be 1 to 64 characters",
                "field": "droneId",
                "reason": "must be 1 to 64 characters",
            })
        );
        let header = IngestError::InvalidHeader {
            name: "Idempotency-Key",
            reason: "must be 1 to 255 characters".into(),
        };
        let problem = header.problem();
        assert_eq!(problem["field"], "Idempotency-Key");
        assert_eq!(problem["reason"], "must be 1 to 255 characters");
        let r = IngestError::IdempotencyInProgress.into_response();
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let problem = IngestError::Forbidden { reason: "x".into() }.problem();
        assert_eq!(problem["status"], 403);
        assert_eq!(problem["title"], "Forbidden");
        assert!(problem.get("field").is_none());
    }
}
