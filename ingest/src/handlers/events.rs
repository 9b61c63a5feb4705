//! The live routes (Server-Sent Events): `GET /api/deliveries/{id}/events` (one delivery
//! of the caller's tenant), `GET /api/deliveries/events` (every delivery of the caller's
//! tenant, from now on) and `GET /track/{token}/events` (the delivery a tracking link
//! names).
//!
//! A delivery's stream starts with the events after `Last-Event-ID` (or the
//! `lastEventId` query parameter; every event it keeps without either), then each new
//! one as the status view reads it, and a heartbeat comment every [`HEARTBEAT`]. The
//! stream ends when the server shuts down, or when the client falls [`QUEUE_FRAMES`]
//! events behind: it reconnects with `Last-Event-ID` and misses nothing.
//!
//! It must not decide what an event is (`live.rs`) nor keep anything itself.
//!
//! [`QUEUE_FRAMES`]: crate::live::QUEUE_FRAMES

use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, header};
use tokio_util::sync::CancellationToken;

use crate::body::{Body, streamed};
use crate::error::{IngestError, Result};
use crate::live::{Refused, Sent, Subscription};
use crate::state::App;
use crate::status::{Followed, Unfollowable};

/// How often an idle stream gets a comment, so proxies and clients know it is alive.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(15);

/// `GET /api/deliveries/{id}/events` for `tenant`, and the tracking link's stream (which
/// ends at `until`, when its link expires). The stream ends after the delivery's final
/// stage; a client resuming after it gets 204, which tells a browser to stop
/// reconnecting.
pub(crate) fn delivery_events(
    app: &App,
    req: &Request<Incoming>,
    tenant: &str,
    delivery_id: &str,
    until: Option<std::time::SystemTime>,
) -> Result<Response<Body>> {
    let not_found = || IngestError::UnknownDelivery {
        delivery_id: delivery_id.chars().take(64).collect(),
    };
    schemas::delivery::check_delivery_id(delivery_id).map_err(|_| not_found())?;
    let view = app.status.as_ref().ok_or_else(not_found)?;
    let after = last_event_id(req)?;
    let followed = view
        .follow(tenant, delivery_id, after)
        .map_err(|e| match e {
            Unfollowable::NotFound => not_found(),
            Unfollowable::Refused(r) => refused(app, tenant, r),
        })?;
    match followed {
        Followed::Live(backfill, subscription) => {
            let until = until.map(|at| {
                let left = at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                tokio::time::Instant::now() + left
            });
            Ok(stream(backfill, subscription, app.closing.clone(), until))
        }
        Followed::Over => {
            let mut response = Response::new(crate::body::full(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            Ok(response)
        }
    }
}

/// `GET /api/deliveries/events`: every delivery of `tenant`, from now on.
pub(crate) fn tenant_events(app: &App, tenant: &str) -> Result<Response<Body>> {
    let view = app.status.as_ref().ok_or_else(|| IngestError::NotFound {
        path: "/api/deliveries/events".into(),
    })?;
    let subscription = view
        .follow_tenant(tenant)
        .map_err(|r| refused(app, tenant, r))?;
    Ok(stream(Vec::new(), subscription, app.closing.clone(), None))
}

fn refused(app: &App, tenant: &str, refused: Refused) -> IngestError {
    metrics::counter!("sse_refused_total").increment(1);
    match refused {
        Refused::Tenant => IngestError::TooManyStreams {
            tenant: tenant.to_owned(),
            max: app.config.tier.sse_max_subscribers_per_tenant,
        },
        Refused::Total => IngestError::StreamsFull,
        Refused::Delivery => IngestError::DeliveryStreamsFull {
            max: crate::live::MAX_PER_DELIVERY,
        },
    }
}

/// The version after which a reconnecting client wants events: `Last-Event-ID`, else
/// the `lastEventId` query parameter; a value that is not a version is a 400.
fn last_event_id(req: &Request<Incoming>) -> Result<Option<u64>> {
    let invalid = |reason: &str| IngestError::InvalidHeader {
        name: "last-event-id",
        reason: reason.to_owned(),
    };
    if let Some(value) = req.headers().get("last-event-id") {
        let text = value.to_str().map_err(|_| invalid("not text"))?.trim();
        if text.is_empty() {
            return Ok(None);
        }
        return text
            .parse()
            .map(Some)
            .map_err(|_| invalid("must be an event id of this stream (a whole number)"));
    }
    let query = req.uri().query().unwrap_or_default();
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("lastEventId=") {
            return value
                .parse()
                .map(Some)
                .map_err(|_| invalid("lastEventId must be a whole number"));
        }
    }
    Ok(None)
}

/// What a stream sends next.
struct Feed {
    backfill: std::vec::IntoIter<Sent>,
    subscription: Subscription,
    heartbeat: tokio::time::Interval,
    closing: CancellationToken,
    until: Option<tokio::time::Instant>,
    opened: bool,
    /// The delivery's last frame went out: the stream ends.
    over: bool,
}

fn stream(
    backfill: Vec<Sent>,
    subscription: Subscription,
    closing: CancellationToken,
    until: Option<tokio::time::Instant>,
) -> Response<Body> {
    let start = tokio::time::Instant::now() + HEARTBEAT;
    let mut heartbeat = tokio::time::interval_at(start, HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let feed = Feed {
        backfill: backfill.into_iter(),
        subscription,
        heartbeat,
        closing,
        until,
        opened: false,
        over: false,
    };
    let chunks = futures_util::stream::unfold(feed, |mut feed| async move {
        if !feed.opened {
            feed.opened = true;
            // How long a browser waits before it reconnects, and a first byte so that
            // the client knows the stream is open.
            return Some((
                Ok::<_, std::convert::Infallible>(Bytes::from_static(b"retry: 2000\n: open\n\n")),
                feed,
            ));
        }
        if feed.over {
            return None;
        }
        if let Some((frame, last)) = feed.backfill.next() {
            feed.over = last;
            return Some((Ok(frame), feed));
        }
        let expiry = async {
            match feed.until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            biased;
            () = feed.closing.cancelled() => None,
            () = expiry => None,
            sent = feed.subscription.frames.recv() => sent,
            _ = feed.heartbeat.tick() => Some((Bytes::from_static(b": heartbeat\n\n"), false)),
        };
        next.map(|(frame, last)| {
            feed.over = last;
            (Ok(frame), feed)
        })
    });
    let mut response = Response::new(streamed(chunks));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    // Proxies that buffer answers (nginx) pass this one through as it comes.
    headers.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    response
}
