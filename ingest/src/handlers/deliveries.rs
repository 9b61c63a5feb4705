//! The delivery routes: `POST /api/deliveryrequests` (one request) and `.../batch`,
//! `PATCH` and `DELETE /api/deliveryrequests/{id}` (reschedule, cancel), and
//! `GET /api/deliveries/{id}[/status]`; with the `Idempotency-Key` claims and replays of
//! the posts.
//!
//! It owns what a delivery request must be to go out (its owner, its id) and which
//! answers are kept for replay. It must not import the routes or the server.

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use schemas::headers as h;

use super::{check_content_type, check_json_content_type};
use crate::admission::{Decoded, read_body, read_decoded};
use crate::batch;
use crate::body::Body;
use crate::claim::{Claim, ClaimOutcome};
use crate::error::{IngestError, Result};
use crate::idempotency::{self, Stored};
use crate::outcome::Outcome;
use crate::produce::{self, Caller};
use crate::response::{
    batch_report_with, count_outcomes, delivery_location, json, json_bytes, replay,
    report_response, with_location,
};
use crate::state::App;
use crate::status;

/// Route names in idempotency fingerprints and derived ids.
const SINGLE: &str = "single";
const BATCH: &str = "batch";

/// `POST /api/deliveryrequests`: one request; 202 with its id once the broker has it.
pub(crate) async fn post_delivery_request(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
) -> Result<Response<Body>> {
    let mut admission = app.budgets.admit(caller.tenant)?;
    let content_type = check_json_content_type(&req);
    let key = idempotency_key(&req);
    // The body is read (bounded) before any other answer, so the connection stays usable.
    // One record: no larger than a record may be.
    let limit = app
        .config
        .tier
        .max_request_bytes
        .min(app.config.tier.max_record_bytes);
    let body = read_body(req, limit, &mut admission).await?;
    caller.tenant.bytes.increment(body.len() as u64);
    content_type?;
    let key = key?;
    let claim = match claim(app, caller, SINGLE, key.as_deref(), &body)? {
        ClaimOutcome::New(claim) => Some(claim),
        ClaimOutcome::Untracked => None,
        ClaimOutcome::Replay(stored) => return Ok(replay(stored)),
        // A single request's answer is never kept with records to retry.
        ClaimOutcome::Resume(claim, _) => Some(claim),
    };
    // Records count against the quota as sent, valid or not (a batch counts them all).
    caller.tenant.take(1)?;
    let request = schemas::parse_delivery_request(&body).inspect_err(|_| {
        caller.tenant.rejected_invalid.increment(1);
    })?;
    let mut acks = bus::Acks::with_capacity(1);
    let delivery_id = enqueue_request(
        app,
        caller,
        &request,
        &body,
        SINGLE,
        key.as_deref().map(|k| (k, 0)),
        &mut acks,
    )
    .inspect_err(|e| {
        if matches!(e, IngestError::Invalid(_)) {
            caller.tenant.rejected_invalid.increment(1);
        }
    })?;
    let delivered = produce::acknowledged_one(app, acks)
        .await
        .inspect_err(|_| {
            caller.tenant.rejected_unavailable.increment(1);
        })?;
    tracing::debug!(
        delivery_id,
        partition = delivered.partition,
        offset = delivered.offset,
        "accepted"
    );
    caller.tenant.accepted.increment(1);
    let tracking = app
        .links
        .as_ref()
        .and_then(|l| l.url(&caller.tenant.name, &delivery_id, crate::links::now_secs()));
    let mut answer = serde_json::json!({ "deliveryId": delivery_id });
    if let Some(url) = tracking {
        answer["trackingUrl"] = serde_json::Value::String(url);
    }
    let body = Bytes::from(answer.to_string());
    let location = delivery_location(&delivery_id);
    if let Some(claim) = claim {
        claim.finish(Some(Stored::new(
            StatusCode::ACCEPTED.as_u16(),
            body.clone(),
            Some(location.clone()),
        )));
    }
    Ok(with_location(
        json_bytes(StatusCode::ACCEPTED, body),
        &location,
    ))
}

/// `POST /api/deliveryrequests/batch`: a JSON array or NDJSON, optionally gzip or zstd.
///
/// Valid records are accepted even when others in the batch are not. The answer lists
/// every record by index: 202 when all were accepted, 207 when some were, 400 when every
/// record was invalid, 503 with Retry-After when none was accepted and some could be
/// retried. Under an `Idempotency-Key` whose earlier answer has records failed for a
/// transient reason, only those records are sent again, and the answer lists every
/// record (the earlier fates of the others).
pub(crate) async fn post_batch(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
) -> Result<Response<Body>> {
    let mut admission = app.budgets.admit(caller.tenant)?;
    let key = idempotency_key(&req);
    let Decoded { framing, body } = read_decoded(
        req,
        app.config.tier.max_batch_bytes,
        caller.tenant,
        &mut admission,
    )
    .await?;
    let key = key?;
    let (claim, earlier) = match claim(app, caller, BATCH, key.as_deref(), &body)? {
        ClaimOutcome::New(claim) => (Some(claim), None),
        ClaimOutcome::Resume(claim, earlier) => (Some(claim), Some(earlier)),
        ClaimOutcome::Untracked => (None, None),
        ClaimOutcome::Replay(stored) => return Ok(replay(stored)),
    };
    let records = batch::split(&body, framing, app.config.tier.max_batch_records)?;
    metrics::histogram!("ingest_batch_records").record(records.len() as f64);
    // The same body as before (the key's fingerprint says so), so the same records.
    let earlier = earlier.filter(|e| e.len() == records.len());
    let send = |index: usize| earlier.as_ref().is_none_or(|e| e[index].is_retryable());
    let sent = (0..records.len()).filter(|i| send(*i)).count();
    caller.tenant.take(sent)?;
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(records.len());
    let mut acks = bus::Acks::with_capacity(sent);
    let mut sent_as = Vec::with_capacity(sent);
    for (index, payload) in records.iter().enumerate() {
        if let Some(earlier) = earlier.as_ref().filter(|_| !send(index)) {
            outcomes.push(earlier[index].clone());
            continue;
        }
        let enqueued = batch::check_record_size(payload, app.config.tier.max_record_bytes)
            .and_then(|()| schemas::parse_delivery_request(payload))
            .map_err(IngestError::Invalid)
            .and_then(|request| {
                enqueue_request(
                    app,
                    caller,
                    &request,
                    payload,
                    BATCH,
                    key.as_deref().map(|k| (k, index)),
                    &mut acks,
                )
            });
        match enqueued {
            Ok(id) => {
                sent_as.push(index);
                outcomes.push(Outcome::Accepted(Some(id)));
            }
            Err(IngestError::Invalid(e)) => outcomes.push(Outcome::Rejected(e)),
            Err(e) => outcomes.push(Outcome::failed(e)),
        }
    }
    produce::settle(app, &mut outcomes, acks, &sent_as).await;
    count_outcomes(
        caller.tenant,
        outcomes
            .iter()
            .enumerate()
            .filter(|(i, _)| send(*i))
            .map(|(_, o)| o),
    );
    let now = crate::links::now_secs();
    let tenant = caller.tenant.name.as_ref();
    let (status, report) = batch_report_with(&outcomes, |id| {
        app.links.as_ref().and_then(|l| l.url(tenant, id, now))
    });
    if let Some(claim) = claim {
        let keep = matches!(status, StatusCode::ACCEPTED | StatusCode::MULTI_STATUS);
        let retry = outcomes.iter().any(Outcome::is_retryable);
        claim.finish(keep.then(|| Stored {
            outcomes: retry.then(|| outcomes.into()),
            ..Stored::new(status.as_u16(), report.clone(), None)
        }));
    }
    Ok(report_response(status, report))
}

/// The `Idempotency-Key` of a request, checked, if it has one.
fn idempotency_key(req: &Request<Incoming>) -> Result<Option<String>> {
    req.headers()
        .get("idempotency-key")
        .map(|v| idempotency::check_key(v.as_bytes()).map(str::to_owned))
        .transpose()
}

/// Takes the request's place in the idempotency window under `key` (untracked when it
/// has none or the window is off); 409 while the key is in progress, 422 when it was used
/// with another body.
fn claim<'a>(
    app: &'a App,
    caller: &Caller<'_>,
    route: &str,
    key: Option<&str>,
    body: &[u8],
) -> Result<ClaimOutcome<'a>> {
    let (Some(key), Some(window)) = (key, &app.window) else {
        return Ok(ClaimOutcome::Untracked);
    };
    // The route is in the fingerprint, not in the key: the same key on another route is a
    // different request under a used key (422), not a new one.
    let window_key = format!("{}\n{key}", caller.tenant.name);
    let fingerprint = idempotency::fingerprint(route, body);
    Claim::begin(window, window_key, fingerprint)
}

/// Checks that a request belongs to the caller: its `ownerId` must be the authenticated
/// tenant (the unauthenticated loopback tenant `default` takes any owner).
fn check_owner(caller: &Caller<'_>, request: &schemas::DeliveryRequest<'_>) -> Result<()> {
    if caller.tenant.is_unauthenticated() || request.owner_id == *caller.tenant.name {
        Ok(())
    } else {
        Err(IngestError::Invalid(schemas::ValidationError {
            field: "ownerId".into(),
            reason: format!(
                "must be the authenticated tenant {:?}",
                &*caller.tenant.name
            ),
        }))
    }
}

/// Enqueues one valid request (its bytes as received) on `delivery-requests`, keyed by
/// `tenant/deliveryId`, its acknowledgement waited for with the rest of `acks`; returns
/// the delivery id. The id is the client's own, or derived from its Idempotency-Key and
/// the record's index, or new.
fn enqueue_request(
    app: &App,
    caller: &Caller<'_>,
    request: &schemas::DeliveryRequest<'_>,
    payload: &[u8],
    route: &str,
    idempotency: Option<(&str, usize)>,
    acks: &mut bus::Acks,
) -> Result<String> {
    check_owner(caller, request)?;
    let delivery_id = match (&request.delivery_id, idempotency) {
        (Some(id), _) => id.to_string(),
        (None, Some((key, index))) => {
            idempotency::derived_delivery_id(&caller.tenant.name, route, key, index)
        }
        (None, None) => uuid::Uuid::new_v4().to_string(),
    };
    produce::enqueue_delivery_event(
        app,
        caller,
        h::event_type::DELIVERY_REQUESTED,
        &delivery_id,
        payload,
        idempotency.map(|(key, _)| key),
        acks,
    )?;
    Ok(delivery_id)
}

/// What `PATCH` and `DELETE /api/deliveryrequests/{id}` ask for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Change {
    Reschedule,
    Cancel,
}

/// `PATCH /api/deliveryrequests/{id}` (reschedule: a JSON object with `pickupTime`,
/// `deadline` or both) and `DELETE` (cancel): an event on the delivery's
/// own key, so that it stays ordered after the request. 202 once the broker has it;
/// whether the delivery exists and can still change is decided downstream, where its
/// state is.
pub(crate) async fn change_delivery(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
    delivery_id: &str,
    change: Change,
) -> Result<Response<Body>> {
    let mut admission = app.budgets.admit(caller.tenant)?;
    let content_type = match change {
        Change::Reschedule => {
            check_content_type(&req, &["application/json", "application/merge-patch+json"])
        }
        Change::Cancel => Ok(()),
    };
    let limit = app
        .config
        .tier
        .max_request_bytes
        .min(app.config.tier.max_record_bytes);
    let body = read_body(req, limit, &mut admission).await?;
    caller.tenant.bytes.increment(body.len() as u64);
    content_type?;
    caller.tenant.take(1)?;
    schemas::delivery::check_delivery_id(delivery_id)?;
    let (event_type, payload) = match change {
        Change::Reschedule => {
            schemas::parse_reschedule(&body)?;
            (h::event_type::DELIVERY_RESCHEDULED, body)
        }
        Change::Cancel => (
            h::event_type::DELIVERY_CANCELLED,
            Bytes::from(serde_json::json!({ "deliveryId": delivery_id }).to_string()),
        ),
    };
    let mut acks = bus::Acks::with_capacity(1);
    produce::enqueue_delivery_event(
        app,
        caller,
        event_type,
        delivery_id,
        &payload,
        None,
        &mut acks,
    )?;
    produce::acknowledged_one(app, acks).await?;
    tracing::debug!(delivery_id, event_type, "accepted");
    let response = json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "deliveryId": delivery_id, "event": event_type }),
    );
    Ok(with_location(response, &delivery_location(delivery_id)))
}

/// `GET /api/deliveries/{id}[/status]`: the caller's own delivery, from the status view.
pub(crate) fn get_delivery(
    app: &App,
    caller: &Caller<'_>,
    delivery_id: &str,
    status_only: bool,
) -> Result<Response<Body>> {
    let not_found = || IngestError::UnknownDelivery {
        delivery_id: delivery_id.chars().take(64).collect(),
    };
    schemas::delivery::check_delivery_id(delivery_id).map_err(|_| not_found())?;
    let view = app.status.as_ref().ok_or_else(not_found)?;
    let state = view
        .get(&caller.tenant.name, delivery_id)
        .ok_or_else(not_found)?;
    let body = if status_only {
        status::status_body(&state)
    } else {
        status::delivery_body(&state)
    };
    Ok(json_bytes(StatusCode::OK, body))
}
