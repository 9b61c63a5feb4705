//! The request handlers: one file per family of the public API (`deliveries`,
//! `telemetry`, `sql`), and here the small operational ones (`/readyz`, `/metrics`) and
//! the checks every handler makes of a request's headers.
//!
//! A handler takes an admitted, routed request and answers it: it reads the body within
//! its budget (`admission`), validates, produces and waits for the broker (`produce`), and
//! builds the answer (`response`). Handlers must not route (that is `routes.rs`) nor
//! listen (that is `server.rs`), and must not import either.

pub(crate) mod deliveries;
pub(crate) mod events;
pub(crate) mod sql;
pub(crate) mod telemetry;
pub(crate) mod track;
pub(crate) mod webhooks;

use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};

use crate::body::Body;
use crate::error::{IngestError, RETRY_AFTER, Result};
use crate::response::text;
use crate::state::App;

/// `GET /readyz`: ready when a broker answers a metadata request for `delivery-requests`
/// in time (on a server with a producer) and the further check given, if any, passes.
pub(crate) async fn readyz(app: &App) -> Result<Response<Body>> {
    if let Some(producer) = app.writer().cloned() {
        let checked = tokio::task::spawn_blocking(move || {
            producer.check_reachable(
                schemas::topics::DELIVERY_REQUESTS.name,
                Duration::from_secs(2),
            )
        })
        .await
        .map_err(|e| IngestError::Internal {
            reason: e.to_string(),
        })?;
        if let Err(e) = checked {
            return Err(IngestError::Unavailable {
                reason: format!("the broker is not reachable: {e}"),
                retry_after: RETRY_AFTER,
            });
        }
    }
    if let Some(check) = &app.readiness {
        let checked = tokio::time::timeout(Duration::from_secs(5), check())
            .await
            .unwrap_or_else(|_| Err("the readiness check timed out".into()));
        checked.map_err(|reason| IngestError::Unavailable {
            reason,
            retry_after: RETRY_AFTER,
        })?;
    }
    Ok(text(StatusCode::OK, "ready\n"))
}

/// `GET /metrics`: the process's metrics, where the server was given a renderer.
pub(crate) fn metrics(app: &App) -> Result<Response<Body>> {
    match &app.metrics {
        Some(render) => Ok(text(StatusCode::OK, render())),
        None => Err(IngestError::NotFound {
            path: "/metrics".into(),
        }),
    }
}

/// Accepts `application/json` (with or without parameters) and a missing content type.
fn check_json_content_type(req: &Request<Incoming>) -> Result<()> {
    check_content_type(req, &["application/json"])
}

/// Accepts the media types in `accepted` (with or without parameters) and a missing
/// content type, of a body sent as it is: these routes decode no `Content-Encoding`
/// (the batch routes do), so one other than `identity` is refused rather than read as
/// JSON.
fn check_content_type(req: &Request<Incoming>, accepted: &[&str]) -> Result<()> {
    if let Some(encoding) = req.headers().get(header::CONTENT_ENCODING) {
        let encoding = encoding.to_str().unwrap_or("?").trim();
        if !(encoding.is_empty() || encoding.eq_ignore_ascii_case("identity")) {
            return Err(IngestError::UnsupportedEncoding {
                encoding: encoding.chars().take(50).collect(),
                accepted: "identity (this route takes an uncompressed body)",
            });
        }
    }
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("");
    let essence = text.split(';').next().unwrap_or("").trim();
    if accepted.iter().any(|a| essence.eq_ignore_ascii_case(a)) {
        Ok(())
    } else {
        Err(IngestError::UnsupportedMediaType {
            content_type: text.chars().take(100).collect(),
        })
    }
}
