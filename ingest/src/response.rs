//! Building answers: text and JSON responses, the `Location` of a delivery, the replay of
//! a stored idempotent answer, and the report of a batch.
//!
//! It owns the shape of successful answers (errors become answers in `error.rs`). It must
//! not decide anything about a request, and it must not import the routes, the handlers
//! or the server.

use bytes::Bytes;
use hyper::{Response, StatusCode, header};

use crate::body::{Body, full};
use crate::error::{PROBLEM_JSON, RETRY_AFTER, problem_type};
use crate::idempotency::Stored;
use crate::outcome::Outcome;
use crate::tenants::Tenant;

/// A plain-text answer (in the Prometheus text format's media type).
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    json_bytes(status, body.to_string())
}

pub(crate) fn json_bytes(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Where the delivery's state is served: `/api/deliveries/{id}`.
pub(crate) fn delivery_location(delivery_id: &str) -> String {
    format!("/api/deliveries/{delivery_id}")
}

/// Adds `Location: location` to `response` (when it is a valid header value).
pub(crate) fn with_location(mut response: Response<Body>, location: &str) -> Response<Body> {
    if let Ok(location) = header::HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// The answer of an earlier request with the same Idempotency-Key.
pub(crate) fn replay(stored: Stored) -> Response<Body> {
    metrics::counter!("ingest_idempotent_replays_total").increment(1);
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut response = json_bytes(status, stored.body);
    let headers = response.headers_mut();
    headers.insert(
        "idempotent-replayed",
        header::HeaderValue::from_static("true"),
    );
    if let Some(location) = stored
        .location
        .and_then(|l| header::HeaderValue::from_str(&l).ok())
    {
        headers.insert(header::LOCATION, location);
    }
    response
}

/// The status and JSON body of a batch answer. Written directly rather than through
/// `serde_json::Value` (one map per record was about 8% of the tier's CPU on batches of
/// 10,000); keys are in the order `serde_json` would give them.
pub(crate) fn batch_report(outcomes: &[Outcome]) -> (StatusCode, Bytes) {
    batch_report_with(outcomes, |_| None)
}

/// [`batch_report`], each accepted record with `trackingUrl`: `link(deliveryId)`.
pub(crate) fn batch_report_with(
    outcomes: &[Outcome],
    mut link: impl FnMut(&str) -> Option<String>,
) -> (StatusCode, Bytes) {
    use std::io::Write as _;
    /// Appends `text` as a JSON string.
    fn string(out: &mut Vec<u8>, text: &str) {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
    let (mut accepted, mut rejected, mut failed) = (0usize, 0usize, 0usize);
    for outcome in outcomes {
        match outcome {
            Outcome::Accepted(_) => accepted += 1,
            Outcome::Rejected(_) => rejected += 1,
            Outcome::Failed(_) => failed += 1,
        }
    }
    let mut out = Vec::with_capacity(64 + outcomes.len() * 64);
    let _ = write!(
        out,
        r#"{{"accepted":{accepted},"failed":{failed},"rejected":{rejected},"results":["#
    );
    for (index, outcome) in outcomes.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        match outcome {
            Outcome::Accepted(Some(id)) => {
                out.extend_from_slice(br#"{"deliveryId":"#);
                string(&mut out, id);
                let _ = write!(out, r#","index":{index}"#);
                if let Some(url) = link(id) {
                    out.extend_from_slice(br#","trackingUrl":"#);
                    string(&mut out, &url);
                }
                out.push(b'}');
            }
            Outcome::Accepted(None) => {
                let _ = write!(out, r#"{{"index":{index}}}"#);
            }
            Outcome::Rejected(e) => {
                let _ = write!(out, r#"{{"error":"invalid record","field":"#);
                string(&mut out, &e.field);
                let _ = write!(out, r#","index":{index},"reason":"#);
                string(&mut out, &e.reason);
                out.push(b'}');
            }
            Outcome::Failed(failure) => {
                out.extend_from_slice(br#"{"error":"#);
                string(&mut out, &failure.message);
                let _ = write!(
                    out,
                    r#","index":{index},"retryable":{}}}"#,
                    failure.retryable
                );
            }
        }
    }
    out.extend_from_slice(b"]}");
    let status = if accepted == outcomes.len() {
        StatusCode::ACCEPTED
    } else if accepted > 0 {
        StatusCode::MULTI_STATUS
    } else if failed > 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, Bytes::from(out))
}

/// Counts `outcomes` in `tenant`'s metrics (each record once: a retried batch counts only
/// the records it sent again).
pub(crate) fn count_outcomes<'a>(tenant: &Tenant, outcomes: impl IntoIterator<Item = &'a Outcome>) {
    for outcome in outcomes {
        match outcome {
            Outcome::Accepted(_) => tenant.accepted.increment(1),
            Outcome::Rejected(_) => tenant.rejected_invalid.increment(1),
            Outcome::Failed(_) => tenant.rejected_unavailable.increment(1),
        }
    }
}

/// A batch's answer: its report. When nothing was accepted (400: every record invalid;
/// 503: some could be retried, with Retry-After) it is an error like any other, problem
/// details (RFC 9457) whose extension members are the report's.
pub(crate) fn report_response(status: StatusCode, report: Bytes) -> Response<Body> {
    let problem = match status {
        StatusCode::BAD_REQUEST => {
            Some(("invalid", "no record was accepted: every record is invalid"))
        }
        StatusCode::SERVICE_UNAVAILABLE => Some((
            "unavailable",
            "no record was accepted; the records marked retryable may be sent again",
        )),
        _ => None,
    };
    let Some((kind, detail)) = problem else {
        return json_bytes(status, report);
    };
    let head = serde_json::json!({
        "type": problem_type(kind),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    })
    .to_string();
    // The problem's members, then the report's (both objects: `{..}` + `{..}` joined).
    let mut body = Vec::with_capacity(head.len() + report.len());
    body.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    body.push(b',');
    body.extend_from_slice(report.get(1..).unwrap_or_default());
    let mut response = json_bytes(status, body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(PROBLEM_JSON),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(RETRY_AFTER.as_secs()),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::produce::not_acknowledged;

    #[test]
    fn batch_answers_are_valid_json_listing_every_record() {
        let outcomes = vec![
            Outcome::Accepted(Some("d-\"1\"\\é".into())),
            Outcome::Accepted(None),
            Outcome::Rejected(schemas::ValidationError {
                field: "packageInfo.size".into(),
                reason: "bad \"size\"\n".into(),
            }),
            Outcome::failed(not_acknowledged()),
        ];
        let (status, body) = batch_report(&outcomes);
        assert_eq!(status, StatusCode::MULTI_STATUS);
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let expected = serde_json::json!({
            "accepted": 2, "rejected": 1, "failed": 1,
            "results": [
                {"index": 0, "deliveryId": "d-\"1\"\\é"},
                {"index": 1},
                {"index": 2, "error": "invalid record", "field": "packageInfo.size", "reason": "bad \"size\"\n"},
                {"index": 3, "error": not_acknowledged().to_string(), "retryable": true},
            ],
        });
        assert_eq!(answer, expected);
        // The same bytes serde_json would write (keys in its order).
        assert_eq!(body, expected.to_string().into_bytes());
        for (outcomes, status) in [
            (vec![Outcome::Accepted(None)], StatusCode::ACCEPTED),
            (
                vec![Outcome::failed(not_acknowledged())],
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                vec![Outcome::Rejected(schemas::ValidationError {
                    field: "".into(),
                    reason: "x".into(),
                })],
                StatusCode::BAD_REQUEST,
            ),
        ] {
            let (got, body) = batch_report(&outcomes);
            assert_eq!(got, status);
            assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
            // Nothing accepted: problem details carrying the report.
            let response = report_response(got, body);
            let problem = response.headers()[header::CONTENT_TYPE] == PROBLEM_JSON;
            assert_eq!(problem, got != StatusCode::ACCEPTED, "{got}");
            let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
                response.into_body(),
            ))
            .unwrap()
            .unwrap()
            .to_bytes();
            let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(answer["results"].as_array().map(Vec::len), Some(1));
            if problem {
                assert_eq!(answer["status"], got.as_u16());
                assert!(
                    answer["type"]
                        .as_str()
                        .unwrap()
                        .starts_with("urn:dronedelivery:problem:")
                );
            }
        }
    }
}
