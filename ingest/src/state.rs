//! What every handler shares ([`App`]), and how it is assembled ([`StateBuilder`]).
//!
//! It owns the checks of the settings against each other, the loading of the API keys,
//! the idempotency window and the budgets, and the parts plugged in later (metrics,
//! readiness, status view, backpressure, SQL engine). The state is built once, complete,
//! and only then shared: nothing here mutates an `App` behind an `Arc`.
//!
//! It must not import the server, the routes or the handlers (they use it), and it holds
//! no request logic.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::Producer;
use schemas::webhooks::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admission::Budgets;
use crate::config::IngestConfig;
use crate::error::{IngestError, Result};
use crate::health::{MetricsRender, Readiness};
use crate::idempotency::Window;
use crate::links::Links;
use crate::sql::SqlEndpoint;
use crate::status::StatusView;
use crate::tenants::{self, Limits, Tenants};

/// What every handler shares.
pub(crate) struct App {
    pub(crate) config: IngestConfig,
    /// Where writes go; `None` on a read-only server (write routes answer 404).
    producer: Option<Producer>,
    /// A further readiness check (`/readyz`), beside the broker's.
    pub(crate) readiness: Option<Readiness>,
    /// Connections, requests in flight, body bytes, decoders; and backpressure.
    pub(crate) budgets: Budgets,
    pub(crate) metrics: Option<MetricsRender>,
    pub(crate) tenants: Arc<Tenants>,
    /// Delivery state for the status routes; `None` when not served.
    pub(crate) status: Option<Arc<StatusView>>,
    /// Recent Idempotency-Keys; `None` when the window is switched off.
    pub(crate) window: Option<Mutex<Window>>,
    /// The history's SQL engine for `POST /api/sql`; `None` when not served.
    pub(crate) sql: Option<Arc<dyn SqlEndpoint>>,
    /// Tracking links (made on every server that takes writes); `None` on a read-only
    /// one.
    pub(crate) links: Option<Links>,
    /// Webhook registrations, and whether they are loaded; `None` when `/api/webhooks`
    /// is not served.
    pub(crate) webhooks: Option<(Arc<Registry>, watch::Receiver<bool>)>,
    /// Cancelled when the server stops accepting: live streams end.
    pub(crate) closing: CancellationToken,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("listen", &self.config.http.listen)
            .field("writes", &self.producer.is_some())
            .finish_non_exhaustive()
    }
}

impl App {
    /// Where writes go. The write routes are not served without a producer, so this
    /// fails only if a handler is reached that should not have been.
    pub(crate) fn producer(&self) -> Result<&Producer> {
        self.producer.as_ref().ok_or_else(|| IngestError::Internal {
            reason: "a write route reached a read-only server".into(),
        })
    }

    /// The producer, if this server takes writes at all.
    pub(crate) fn writer(&self) -> Option<&Producer> {
        self.producer.as_ref()
    }
}

/// The parts of an [`App`] while the server is being set up. Owned by one `Ingest`
/// until it runs, so every part plugged in takes effect; [`StateBuilder::build`] then
/// makes the one shared `App`.
pub(crate) struct StateBuilder {
    config: IngestConfig,
    producer: Option<Producer>,
    tenants: Arc<Tenants>,
    window: Option<Mutex<Window>>,
    readiness: Option<Readiness>,
    metrics: Option<MetricsRender>,
    status: Option<Arc<StatusView>>,
    behind: Vec<Arc<AtomicBool>>,
    sql: Option<Arc<dyn SqlEndpoint>>,
    links: Option<Links>,
    webhooks: Option<(Arc<Registry>, watch::Receiver<bool>)>,
}

impl std::fmt::Debug for StateBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateBuilder")
            .field("listen", &self.config.http.listen)
            .field("writes", &self.producer.is_some())
            .finish_non_exhaustive()
    }
}

impl StateBuilder {
    /// Checks `config`, reads the API keys and sets up the idempotency window. Writes go
    /// to `producer`; without one the server is read-only.
    pub(crate) fn new(config: IngestConfig, producer: Option<Producer>) -> Result<Self> {
        let largest_body = config
            .tier
            .max_batch_bytes
            .max(config.tier.max_request_bytes);
        if config.tier.max_in_flight_bytes < largest_body.saturating_mul(2) {
            return Err(IngestError::Config {
                reason: format!(
                    "--max-in-flight-bytes ({}) must hold at least one largest body as sent and \
                     decoded ({} bytes)",
                    config.tier.max_in_flight_bytes,
                    largest_body.saturating_mul(2)
                ),
            });
        }
        let record = config.tier.max_record_bytes;
        if !(1..=crate::config::MAX_RECORD_BYTES_CEILING).contains(&record) {
            return Err(IngestError::Config {
                reason: format!(
                    "--max-record-bytes ({record}) must be 1 to {}: the records the processors \
                     derive from one must stay under the broker's 1,000,000-byte limit",
                    crate::config::MAX_RECORD_BYTES_CEILING
                ),
            });
        }
        let rate = config.tier.tenant_rate_limit;
        let burst = config.tier.tenant_burst;
        if !(rate == 0.0 || (rate.is_finite() && rate >= tenants::MIN_RATE))
            || !(burst.is_finite() && burst >= 0.0)
        {
            return Err(IngestError::Config {
                reason: format!(
                    "--tenant-rate-limit must be 0 (no limit) or at least {} records per \
                     second, and --tenant-burst 0 or more",
                    tenants::MIN_RATE
                ),
            });
        }
        // Each tenant of the key file may hold its share of the in-flight places and body
        // bytes, and never less than one largest body as sent and decoded (so that every
        // tenant can send what the tier takes).
        let percent = usize::from(config.tier.tenant_share_percent.clamp(1, 100));
        let share_of = |total: usize| (total.saturating_mul(percent) / 100).max(1);
        let share = (
            share_of(config.http.max_in_flight.max(1)),
            share_of(config.tier.max_in_flight_bytes)
                .max(largest_body.saturating_mul(2))
                .min(config.tier.max_in_flight_bytes),
        );
        let tenants = Tenants::load(
            config.auth.api_keys.as_deref(),
            &Limits {
                rate: config.tier.tenant_rate_limit,
                burst: config.tier.tenant_burst,
                telemetry_tenants: config.tier.telemetry_tenants.clone(),
                share: Some(share),
            },
        )?;
        let window = (config.tier.idempotency_window_bytes > 0).then(|| {
            Mutex::new(Window::new(
                Duration::from_secs(config.tier.idempotency_window_secs),
                config.tier.idempotency_window_bytes,
            ))
        });
        let links = match producer {
            Some(_) => Some(Links::new(
                config.tier.tracking_secret.as_ref().map(|s| s.expose()),
                config.tier.tracking_link_ttl_secs,
            )?),
            None => None,
        };
        Ok(Self {
            links,
            webhooks: None,
            config,
            producer,
            tenants: Arc::new(tenants),
            window,
            readiness: None,
            metrics: None,
            status: None,
            behind: Vec::new(),
            sql: None,
        })
    }

    /// The settings.
    pub(crate) fn config(&self) -> &IngestConfig {
        &self.config
    }

    /// The API keys' tenants (shared with whoever checks callers outside the server).
    pub(crate) fn tenants(&self) -> &Arc<Tenants> {
        &self.tenants
    }

    /// Serves `/metrics` with `render`.
    pub(crate) fn metrics(&mut self, render: MetricsRender) {
        self.metrics = Some(render);
    }

    /// Adds `check` to what `/readyz` requires.
    pub(crate) fn readiness(&mut self, check: Readiness) {
        self.readiness = Some(check);
    }

    /// Serves the status routes from `view`.
    pub(crate) fn status(&mut self, view: Arc<StatusView>) {
        self.status = Some(view);
    }

    /// Refuses writes while `behind` (or another flag given here) is set.
    pub(crate) fn backpressure(&mut self, behind: Arc<AtomicBool>) {
        self.behind.push(behind);
    }

    /// Serves `POST /api/sql` with `engine`.
    pub(crate) fn sql(&mut self, engine: Arc<dyn SqlEndpoint>) {
        self.sql = Some(engine);
    }

    /// Serves `/api/webhooks` from `registry`.
    pub(crate) fn webhooks(&mut self, registry: Arc<Registry>, loaded: watch::Receiver<bool>) {
        self.webhooks = Some((registry, loaded));
    }

    /// The complete state, to share.
    pub(crate) fn build(self) -> Arc<App> {
        let budgets = Budgets::new(&self.config, self.behind);
        Arc::new(App {
            config: self.config,
            producer: self.producer,
            readiness: self.readiness,
            budgets,
            metrics: self.metrics,
            tenants: self.tenants,
            status: self.status,
            window: self.window,
            sql: self.sql,
            links: self.links,
            webhooks: self.webhooks,
            closing: CancellationToken::new(),
        })
    }
}
