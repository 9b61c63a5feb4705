//! The webhook routes: `PUT /api/webhooks/{id}` (register or change an endpoint of the
//! caller's tenant; the secret is shown once, when made), `GET /api/webhooks` and
//! `GET /api/webhooks/{id}` (without secrets), `DELETE /api/webhooks/{id}`.
//!
//! Registrations are records on the compacted `webhooks` topic (a tombstone deletes),
//! so every replica and every notifier knows them; this replica also applies its own
//! write at once, so a `GET` after a `PUT` here sees it. The URL is checked here: `http`
//! or `https`, and (unless the operator allows private addresses) neither naming nor
//! resolving to a loopback, private, link-local or otherwise non-public address. The
//! notifier checks each send again (DNS may change).
//!
//! It must not send notifications (the notifier does).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use schemas::ValidationError;
use schemas::signing::WebhookSecret;
use schemas::tracking::EventKind;
use schemas::webhooks::{
    Host, KeptSecret, Registration, check_webhook_id, is_forbidden_address, normalize_events,
    parse_webhook_url,
};

use super::check_json_content_type;
use crate::admission::read_body;
use crate::body::Body;
use crate::error::{IngestError, Result};
use crate::produce::{self, Caller};
use crate::response::{json, json_bytes};
use crate::state::App;

/// Largest body of a registration.
const MAX_BODY_BYTES: usize = 16 * 1024;
/// How long a rotated-out secret still signs, beside the new one.
pub(crate) const ROTATION_GRACE_MS: i64 = 24 * 3_600 * 1_000;
/// How long resolving a registered host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The body of `PUT /api/webhooks/{id}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Put {
    url: String,
    #[serde(default)]
    events: Option<Vec<EventKind>>,
    #[serde(default)]
    rotate_secret: bool,
}

fn invalid(field: &str, reason: impl Into<String>) -> IngestError {
    IngestError::Invalid(ValidationError {
        field: field.to_owned(),
        reason: reason.into(),
    })
}

/// The registrations; 503 until what `webhooks` held is read (an answer before could
/// miss an endpoint and, on a PUT, replace its secret).
fn registry(app: &App) -> Result<&Arc<schemas::webhooks::Registry>> {
    let (registry, loaded) = app.webhooks.as_ref().ok_or_else(|| IngestError::NotFound {
        path: "/api/webhooks".into(),
    })?;
    if !*loaded.borrow() {
        return Err(IngestError::Unavailable {
            reason: "webhook registrations are still being read".into(),
            retry_after: Duration::from_secs(1),
        });
    }
    Ok(registry)
}

/// `PUT /api/webhooks/{id}`.
pub(crate) async fn put_webhook(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
    id: &str,
) -> Result<Response<Body>> {
    let registry = Arc::clone(registry(app)?);
    let mut admission = app.budgets.admit(caller.tenant)?;
    let content_type = check_json_content_type(&req);
    let body = read_body(req, MAX_BODY_BYTES, &mut admission).await?;
    content_type?;
    check_webhook_id(id)?;
    let put: Put = serde_json::from_slice(&body).map_err(|e| invalid("body", e.to_string()))?;
    check_destination(&put.url, app.config.tier.webhooks_allow_private).await?;
    // Stage changes by default: positions come every few seconds per flying delivery.
    let events = normalize_events(put.events.as_deref().unwrap_or(&[EventKind::Stage]))?;
    let tenant = caller.tenant.name.as_ref();
    let existing = registry.get(tenant, id);
    let max = app.config.tier.max_webhooks_per_tenant;
    if existing.is_none() && registry.list(tenant).len() >= max {
        return Err(IngestError::TooManyWebhooks {
            tenant: tenant.to_owned(),
            max,
        });
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let fresh = || KeptSecret {
        secret: new_secret(),
        created_at_ms: now_ms,
        expires_at_ms: None,
    };
    let (secrets, shown) = match &existing {
        Some(old) if !put.rotate_secret => (old.secrets.clone(), None),
        Some(old) => {
            // The new secret signs from now on; the old ones beside it for a day at
            // most, so that receivers can switch over.
            let new = fresh();
            let mut secrets = vec![new.clone()];
            secrets.extend(
                old.secrets
                    .iter()
                    .filter(|s| s.is_live(now_ms))
                    .take(2)
                    .map(|s| KeptSecret {
                        expires_at_ms: Some(
                            s.expires_at_ms
                                .unwrap_or(i64::MAX)
                                .min(now_ms + ROTATION_GRACE_MS),
                        ),
                        ..s.clone()
                    }),
            );
            (secrets, Some(new.secret))
        }
        None => {
            let new = fresh();
            (vec![new.clone()], Some(new.secret))
        }
    };
    let registration = Registration {
        id: id.to_owned(),
        tenant: tenant.to_owned(),
        url: put.url,
        events,
        secrets,
        created_at_ms: existing.as_ref().map_or(now_ms, |r| r.created_at_ms),
        updated_at_ms: now_ms,
    };
    let payload = serde_json::to_vec(&registration).map_err(|e| IngestError::Internal {
        reason: e.to_string(),
    })?;
    let key = format!("{tenant}/{id}");
    let ack = produce::enqueue(
        app.producer()?,
        bus::OutRecord {
            topic: schemas::topics::WEBHOOKS.name,
            key: key.as_bytes(),
            payload: &payload,
            headers: &[(schemas::headers::TENANT, tenant.as_bytes())],
        },
    )?;
    produce::acknowledged(app, ack).await?;
    let mut view = view(&registration);
    registry.put(tenant, id, Some(Arc::new(registration)));
    if let Some(secret) = shown {
        view["secret"] = serde_json::Value::String(secret.to_string());
    }
    let status = if existing.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json(status, &view))
}

/// `GET /api/webhooks`.
pub(crate) fn list_webhooks(app: &App, caller: &Caller<'_>) -> Result<Response<Body>> {
    let list: Vec<serde_json::Value> = registry(app)?
        .list(&caller.tenant.name)
        .iter()
        .map(|r| view(r))
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "webhooks": list }),
    ))
}

/// `GET /api/webhooks/{id}`.
pub(crate) fn get_webhook(app: &App, caller: &Caller<'_>, id: &str) -> Result<Response<Body>> {
    let registration = registry(app)?
        .get(&caller.tenant.name, id)
        .ok_or_else(|| unknown(id))?;
    Ok(json(StatusCode::OK, &view(&registration)))
}

/// `DELETE /api/webhooks/{id}`.
pub(crate) async fn delete_webhook(
    app: &App,
    caller: &Caller<'_>,
    id: &str,
) -> Result<Response<Body>> {
    let registry = Arc::clone(registry(app)?);
    let tenant = caller.tenant.name.as_ref();
    registry.get(tenant, id).ok_or_else(|| unknown(id))?;
    let key = format!("{tenant}/{id}");
    let ack = app
        .producer()?
        .send_record(
            bus::OutRecord {
                topic: schemas::topics::WEBHOOKS.name,
                key: key.as_bytes(),
                payload: &[],
                headers: &[(schemas::headers::TENANT, tenant.as_bytes())],
            },
            None,
            true,
        )
        .map_err(produce::unavailable)?;
    produce::acknowledged(app, ack).await?;
    registry.put(tenant, id, None);
    let mut response = json_bytes(StatusCode::NO_CONTENT, "");
    response.headers_mut().remove(hyper::header::CONTENT_TYPE);
    Ok(response)
}

fn unknown(id: &str) -> IngestError {
    IngestError::NotFound {
        path: format!("/api/webhooks/{}", id.chars().take(64).collect::<String>()),
    }
}

/// What a client sees of a registration: never a secret.
fn view(r: &Registration) -> serde_json::Value {
    let time = |ms: i64| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let secrets: Vec<serde_json::Value> = r
        .secrets
        .iter()
        .map(|s| {
            let mut v = serde_json::json!({ "createdAt": time(s.created_at_ms) });
            if let Some(at) = s.expires_at_ms {
                v["expiresAt"] = serde_json::Value::String(time(at));
            }
            v
        })
        .collect();
    serde_json::json!({
        "id": r.id,
        "url": r.url,
        "events": r.events,
        "secrets": secrets,
        "createdAt": time(r.created_at_ms),
        "updatedAt": time(r.updated_at_ms),
    })
}

/// A secret from the operating system's generator (two version-4 UUIDs, 244 random
/// bits).
fn new_secret() -> WebhookSecret {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    WebhookSecret::from_random(bytes)
}

/// Refuses a URL that is not `http`/`https`, or (unless `allow_private`) names or
/// resolves to a non-public address.
async fn check_destination(url: &str, allow_private: bool) -> Result<()> {
    let parsed = parse_webhook_url(url)?;
    if allow_private {
        return Ok(());
    }
    let refused = |what: String| {
        invalid(
            "url",
            format!(
                "{what}: webhooks go only to public addresses (loopback, private, \
                 link-local and other non-public ones are refused)"
            ),
        )
    };
    if parsed.host_is_forbidden() {
        return Err(refused(format!("{} is not a public host", parsed.host)));
    }
    if let Host::Name(name) = &parsed.host {
        let resolved = tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((name.as_str(), parsed.port)),
        )
        .await
        .map_err(|_| invalid("url", format!("{name} did not resolve in time")))?
        .map_err(|e| invalid("url", format!("{name} does not resolve: {e}")))?;
        let addresses: Vec<IpAddr> = resolved.map(|a| a.ip()).collect();
        if let Some(ip) = addresses.iter().find(|ip| is_forbidden_address(**ip)) {
            return Err(refused(format!("{name} resolves to {ip}")));
        }
    }
    Ok(())
}
