//! Which handler answers a request: the one table of routes.
//!
//! It owns the parsing of paths into a [`Route`] (with the ids they carry), the route
//! label of the request metrics (derived from the same [`Route`]), the authentication of
//! callers of `/api/`, the closing of write routes on a read-only server, and the one
//! `match` on method and route. It must not read bodies or produce records (handlers
//! do), and it must not import the server.

use std::borrow::Cow;
use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};

use crate::body::Body;
use crate::error::{IngestError, Result};
use crate::handlers::deliveries::{self, Change};
use crate::handlers::track::TrackPath;
use crate::handlers::{self, events, sql, telemetry, track, webhooks};
use crate::produce::Caller;
use crate::response::{json_bytes, text};
use crate::state::App;
use crate::tenants::Origin;

/// The OpenAPI document of every route served here.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What a request's path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<'p> {
    /// `/healthz`
    Healthz,
    /// `/readyz`
    Readyz,
    /// `/openapi.json`
    OpenApi,
    /// `/metrics`
    Metrics,
    /// `/api/deliveryrequests`
    DeliveryRequests,
    /// `/api/deliveryrequests/batch`
    DeliveryRequestsBatch,
    /// `/api/deliveryrequests/{id}`
    DeliveryRequest(&'p str),
    /// `/api/drones/{id}/telemetry`
    Telemetry(&'p str),
    /// `/api/deliveries/{id}`, or `/api/deliveries/{id}/status` when `status_only`.
    Delivery { id: &'p str, status_only: bool },
    /// `/api/deliveries/{id}/events`
    DeliveryEvents(&'p str),
    /// `/api/deliveries/events`
    TenantEvents,
    /// `/api/webhooks`
    Webhooks,
    /// `/api/webhooks/{id}`
    Webhook(&'p str),
    /// `/track/...`: a tracking link's page, state, events, and the page's assets.
    Track(TrackPath<'p>),
    /// `/api/sql`
    Sql,
    /// Any other path under `/api/` (its callers are authenticated all the same).
    OtherApi,
    /// Any other path.
    Other,
}

impl<'p> Route<'p> {
    /// The route `path` names.
    pub(crate) fn of(path: &'p str) -> Self {
        match path {
            "/healthz" => Self::Healthz,
            "/readyz" => Self::Readyz,
            "/openapi.json" => Self::OpenApi,
            "/metrics" => Self::Metrics,
            "/api/deliveryrequests" => Self::DeliveryRequests,
            "/api/deliveryrequests/batch" => Self::DeliveryRequestsBatch,
            "/api/sql" => Self::Sql,
            "/api/deliveries/events" => Self::TenantEvents,
            "/api/webhooks" => Self::Webhooks,
            p => {
                if let Some(rest) = p.strip_prefix(crate::links::PREFIX) {
                    TrackPath::of(rest).map_or(Self::Other, Self::Track)
                } else if let Some(id) = p
                    .strip_prefix("/api/webhooks/")
                    .filter(|id| !id.is_empty() && !id.contains('/'))
                {
                    Self::Webhook(id)
                } else if let Some(id) = p
                    .strip_prefix("/api/deliveries/")
                    .and_then(|rest| rest.strip_suffix("/events"))
                    .filter(|id| !id.is_empty() && !id.contains('/'))
                {
                    Self::DeliveryEvents(id)
                } else if let Some(drone_id) = telemetry_path(p) {
                    Self::Telemetry(drone_id)
                } else if let Some(id) = delivery_request_path(p) {
                    Self::DeliveryRequest(id)
                } else if let Some((id, status_only)) = deliveries_path(p) {
                    Self::Delivery { id, status_only }
                } else if p.starts_with("/api/") {
                    Self::OtherApi
                } else {
                    Self::Other
                }
            }
        }
    }

    /// The route's label in the request metrics.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Healthz => "healthz",
            Self::Readyz => "readyz",
            Self::OpenApi => "openapi",
            Self::Metrics => "metrics",
            Self::DeliveryRequests => "deliveryrequests",
            Self::DeliveryRequestsBatch => "deliveryrequests_batch",
            Self::DeliveryRequest(_) => "deliveryrequest",
            Self::Telemetry(_) => "telemetry",
            Self::Delivery { .. } => "deliveries",
            Self::DeliveryEvents(_) => "delivery_events",
            Self::TenantEvents => "tenant_events",
            Self::Webhooks | Self::Webhook(_) => "webhooks",
            Self::Track(TrackPath::Asset(_) | TrackPath::Page(_)) => "track_page",
            Self::Track(TrackPath::State(_)) => "track_state",
            Self::Track(TrackPath::Events(_)) => "track_events",
            Self::Sql => "sql",
            Self::OtherApi | Self::Other => "other",
        }
    }

    /// Whether the path is under `/api/`, where only authenticated callers are served.
    fn is_api(self) -> bool {
        !matches!(
            self,
            Self::Healthz
                | Self::Readyz
                | Self::OpenApi
                | Self::Metrics
                | Self::Track(_)
                | Self::Other
        )
    }

    /// Whether the route writes (to the broker): a read-only server does not have it.
    fn writes(self) -> bool {
        matches!(
            self,
            Self::DeliveryRequests
                | Self::DeliveryRequestsBatch
                | Self::Telemetry(_)
                | Self::DeliveryRequest(_)
                | Self::Webhooks
                | Self::Webhook(_)
        )
    }
}

/// `/api/drones/{id}/telemetry` → the drone id, if the path has that shape.
fn telemetry_path(path: &str) -> Option<&str> {
    path.strip_prefix("/api/drones/")?
        .strip_suffix("/telemetry")
        .filter(|id| !id.contains('/'))
}

/// `/api/deliveryrequests/{id}` → the delivery id, if the path has that shape.
fn delivery_request_path(path: &str) -> Option<&str> {
    path.strip_prefix("/api/deliveryrequests/")
        .filter(|id| !id.is_empty() && !id.contains('/') && *id != "batch")
}

/// `/api/deliveries/{id}` → (id, false); `/api/deliveries/{id}/status` → (id, true).
fn deliveries_path(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/api/deliveries/")?;
    let (id, status_only) = match rest.strip_suffix("/status") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    (!id.is_empty() && !id.contains('/')).then_some((id, status_only))
}

/// Answers `req`, whose path names `route`, from `peer`.
///
/// Callers of `/api/` are authenticated first (so 401 comes before 404 and 405); a
/// read-only server answers 404 on every write route, whatever the method; then the
/// method and the route pick the handler.
pub(crate) async fn route(
    app: &App,
    route: Route<'_>,
    req: Request<Incoming>,
    peer: SocketAddr,
    correlation: &str,
) -> Result<Response<Body>> {
    let caller = if route.is_api() {
        let origin = Origin::of(peer, |name| req.headers().contains_key(name));
        let tenant = app.tenants.authenticate(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(header::HeaderValue::as_bytes),
            origin,
        )?;
        tracing::Span::current().record("tenant", &*tenant.name);
        Some(Caller::new(tenant, correlation))
    } else {
        None
    };
    if route.writes() && app.writer().is_none() {
        return Err(not_found(req.uri().path()));
    }
    let method = req.method().clone();
    match (method, route, caller.as_ref()) {
        (Method::GET | Method::HEAD, Route::Healthz, _) => Ok(text(StatusCode::OK, "ok\n")),
        (Method::GET | Method::HEAD, Route::Readyz, _) => handlers::readyz(app).await,
        (Method::GET, Route::OpenApi, _) => Ok(json_bytes(StatusCode::OK, OPENAPI)),
        (Method::GET, Route::Metrics, _) => handlers::metrics(app),
        (_, Route::Healthz | Route::Readyz | Route::OpenApi | Route::Metrics, _) => {
            Err(IngestError::MethodNotAllowed { allow: "GET" })
        }
        (Method::POST, Route::DeliveryRequests, Some(caller)) => {
            deliveries::post_delivery_request(app, req, caller).await
        }
        (Method::POST, Route::DeliveryRequestsBatch, Some(caller)) => {
            deliveries::post_batch(app, req, caller).await
        }
        (_, Route::DeliveryRequests | Route::DeliveryRequestsBatch, Some(_)) => {
            Err(IngestError::MethodNotAllowed { allow: "POST" })
        }
        (Method::POST, Route::Telemetry(drone_id), Some(caller)) => {
            telemetry::post_telemetry(app, req, caller, &decode_id(drone_id)).await
        }
        (_, Route::Telemetry(_), Some(_)) => Err(IngestError::MethodNotAllowed { allow: "POST" }),
        (Method::PATCH, Route::DeliveryRequest(id), Some(caller)) => {
            deliveries::change_delivery(app, req, caller, &decode_id(id), Change::Reschedule).await
        }
        (Method::DELETE, Route::DeliveryRequest(id), Some(caller)) => {
            deliveries::change_delivery(app, req, caller, &decode_id(id), Change::Cancel).await
        }
        (_, Route::DeliveryRequest(_), Some(_)) => Err(IngestError::MethodNotAllowed {
            allow: "PATCH, DELETE",
        }),
        (Method::GET | Method::HEAD, Route::Delivery { id, status_only }, Some(caller)) => {
            deliveries::get_delivery(app, caller, &decode_id(id), status_only)
        }
        (_, Route::Delivery { .. }, Some(_)) => Err(IngestError::MethodNotAllowed { allow: "GET" }),
        (Method::GET, Route::DeliveryEvents(id), Some(caller)) => {
            events::delivery_events(app, &req, &caller.tenant.name, &decode_id(id), None)
        }
        (Method::GET, Route::TenantEvents, Some(caller)) => {
            events::tenant_events(app, &caller.tenant.name)
        }
        (_, Route::DeliveryEvents(_) | Route::TenantEvents, Some(_)) => {
            Err(IngestError::MethodNotAllowed { allow: "GET" })
        }
        (Method::GET, Route::Webhooks, Some(caller)) => webhooks::list_webhooks(app, caller),
        (_, Route::Webhooks, Some(_)) => Err(IngestError::MethodNotAllowed { allow: "GET" }),
        (Method::PUT, Route::Webhook(id), Some(caller)) => {
            webhooks::put_webhook(app, req, caller, &decode_id(id)).await
        }
        (Method::GET, Route::Webhook(id), Some(caller)) => {
            webhooks::get_webhook(app, caller, &decode_id(id))
        }
        (Method::DELETE, Route::Webhook(id), Some(caller)) => {
            webhooks::delete_webhook(app, caller, &decode_id(id)).await
        }
        (_, Route::Webhook(_), Some(_)) => Err(IngestError::MethodNotAllowed {
            allow: "PUT, GET, DELETE",
        }),
        (Method::GET | Method::HEAD, Route::Track(path), _) => track::get(app, &req, path),
        (_, Route::Track(_), _) => Err(IngestError::MethodNotAllowed { allow: "GET" }),
        (Method::POST, Route::Sql, Some(caller)) if app.sql.is_some() => {
            sql::post_sql(app, req, caller).await
        }
        (_, Route::Sql, Some(_)) if app.sql.is_some() => {
            Err(IngestError::MethodNotAllowed { allow: "POST" })
        }
        _ => Err(not_found(req.uri().path())),
    }
}

/// An id taken from a path segment, with the percent-escapes of the characters an id may
/// hold (`A-Z a-z 0-9 - _ . :`) decoded: `ord%3A42` is `ord:42` (RFC 3986: an escape and
/// the character it stands for name the same resource). Any other escape is left as it
/// is, so that the id is refused (400) or not found (404) as the raw text would be.
fn decode_id(raw: &str) -> Cow<'_, str> {
    if !raw.contains('%') {
        return Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .filter(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b));
        match escaped {
            Some(b) => {
                out.push(char::from(b));
                i += 3;
            }
            None => {
                let ch = raw[i..].chars().next().unwrap_or_default();
                out.push(ch);
                i += ch.len_utf8().max(1);
            }
        }
    }
    Cow::Owned(out)
}

fn not_found(path: &str) -> IngestError {
    IngestError::NotFound {
        path: path.chars().take(256).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label of `path` (whatever the method) in the request metrics.
    fn route_label(_method: &Method, path: &str) -> &'static str {
        Route::of(path).label()
    }

    #[test]
    fn the_openapi_document_covers_every_route_and_its_example_is_valid() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for (method, path) in [
            (Method::POST, "/api/deliveryrequests"),
            (Method::POST, "/api/deliveryrequests/batch"),
            (Method::POST, "/api/drones/d1/telemetry"),
            (Method::GET, "/healthz"),
            (Method::GET, "/readyz"),
            (Method::GET, "/metrics"),
            (Method::GET, "/openapi.json"),
            (Method::PATCH, "/api/deliveryrequests/d-1"),
            (Method::DELETE, "/api/deliveryrequests/d-1"),
            (Method::GET, "/api/deliveries/d-1"),
            (Method::GET, "/api/deliveries/d-1/status"),
            (Method::GET, "/api/deliveries/d-1/events"),
            (Method::GET, "/api/deliveries/events"),
            (Method::GET, "/api/webhooks"),
            (Method::PUT, "/api/webhooks/w-1"),
            (Method::GET, "/api/webhooks/w-1"),
            (Method::DELETE, "/api/webhooks/w-1"),
            (Method::GET, "/track/abc.def"),
            (Method::GET, "/track/abc.def/state"),
            (Method::GET, "/track/abc.def/events"),
            (Method::GET, "/track/assets/track.js"),
            (Method::POST, "/api/sql"),
        ] {
            let label = route_label(&method, path);
            assert_ne!(label, "other", "{path} is routed");
            let route = Route::of(path);
            let documented = match route {
                Route::Telemetry(_) => "/api/drones/{droneId}/telemetry",
                Route::DeliveryRequest(_) => "/api/deliveryrequests/{deliveryId}",
                Route::Delivery {
                    status_only: true, ..
                } => "/api/deliveries/{deliveryId}/status",
                Route::Delivery { .. } => "/api/deliveries/{deliveryId}",
                Route::DeliveryEvents(_) => "/api/deliveries/{deliveryId}/events",
                Route::Webhook(_) => "/api/webhooks/{webhookId}",
                Route::Track(TrackPath::Page(_)) => "/track/{token}",
                Route::Track(TrackPath::State(_)) => "/track/{token}/state",
                Route::Track(TrackPath::Events(_)) => "/track/{token}/events",
                Route::Track(TrackPath::Asset(_)) => "/track/assets/{name}",
                _ => path,
            };
            assert!(paths.contains(&documented), "{documented} is documented");
            let operation = method.as_str().to_ascii_lowercase();
            assert!(
                doc["paths"][documented][&operation].is_object(),
                "{method} {documented} is documented"
            );
            // Routes served without an API key say so.
            if !route.is_api() {
                assert_eq!(
                    doc["paths"][documented][&operation]["security"],
                    serde_json::json!([]),
                    "{method} {documented} needs no key"
                );
            }
        }
        assert_eq!(paths.len(), 19, "no undocumented extra: {paths:?}");
        let example = &doc["paths"]["/api/deliveryrequests"]["post"]["requestBody"]["content"]["application/json"]
            ["example"];
        schemas::parse_delivery_request(example.to_string().as_bytes()).unwrap();
    }

    #[test]
    fn ids_in_paths_are_percent_decoded_to_the_characters_ids_hold() {
        assert_eq!(decode_id("ord:42"), "ord:42");
        assert_eq!(decode_id("ord%3A42"), "ord:42");
        assert_eq!(decode_id("ord%3a42"), "ord:42");
        assert_eq!(decode_id("C%2DoO0%41"), "C-oO0A");
        // Escapes of characters no id holds stay, and so are refused as before.
        assert_eq!(decode_id("a%2Fb"), "a%2Fb");
        assert_eq!(decode_id("a%20b"), "a%20b");
        assert_eq!(decode_id("a%zzb%"), "a%zzb%");
        assert_eq!(decode_id("é%41%4"), "éA%4");
    }

    #[test]
    fn delivery_request_paths() {
        assert_eq!(
            delivery_request_path("/api/deliveryrequests/d-1"),
            Some("d-1")
        );
        assert_eq!(delivery_request_path("/api/deliveryrequests/batch"), None);
        assert_eq!(delivery_request_path("/api/deliveryrequests/"), None);
        assert_eq!(delivery_request_path("/api/deliveryrequests/a/b"), None);
        assert_eq!(
            route_label(&Method::PATCH, "/api/deliveryrequests/d-1"),
            "deliveryrequest"
        );
    }

    #[test]
    fn telemetry_paths() {
        assert_eq!(telemetry_path("/api/drones/d-1/telemetry"), Some("d-1"));
        assert_eq!(telemetry_path("/api/drones/a/b/telemetry"), None);
        assert_eq!(telemetry_path("/api/drones/telemetry"), None);
    }
}
