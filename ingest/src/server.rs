//! The listener, the routes and the request handlers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus::{OutRecord, Producer};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use schemas::headers as h;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::batch;
use crate::error::{IngestError, Result};
use crate::idempotency::{self, Claim, Stored, Window};
use crate::status::{self, StatusView};
use crate::tenants::{Limits, Tenant, Tenants};

/// Renders the process's metrics in the Prometheus text format.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

const LISTEN: &str = "127.0.0.1:8080";
const MAX_REQUEST_BYTES: usize = 64 * 1024;
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
const MAX_BATCH_RECORDS: usize = 10_000;
const MAX_CONNECTIONS: usize = 10_000;
const HEADER_READ_TIMEOUT_SECS: u64 = 30;
const MAX_IN_FLIGHT: usize = 4096;
const DRAIN_SECS: u64 = 30;
const MAX_IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;
const IDEMPOTENCY_WINDOW_SECS: u64 = 3600;
const STATUS_MAX_DELIVERIES: usize = 1_000_000;
const IDEMPOTENCY_WINDOW_BYTES: usize = 64 * 1024 * 1024;

/// Settings of the HTTP ingestion tier.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestConfig {
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "DRONEDELIVERY_LISTEN", default_value = LISTEN)]
    pub listen: SocketAddr,

    /// Largest accepted body of a single delivery request, in bytes; larger ones get 413.
    #[arg(long, env = "DRONEDELIVERY_MAX_REQUEST_BYTES", default_value_t = MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// Largest accepted batch body, in bytes, both as sent and after decompression;
    /// larger ones get 413.
    #[arg(long, env = "DRONEDELIVERY_MAX_BATCH_BYTES", default_value_t = MAX_BATCH_BYTES)]
    pub max_batch_bytes: usize,

    /// Most records in one batch; more get 413.
    #[arg(
        long,
        env = "DRONEDELIVERY_MAX_BATCH_RECORDS",
        default_value_t = MAX_BATCH_RECORDS
    )]
    pub max_batch_records: usize,

    /// Most open client connections; further ones wait in the listen backlog until one
    /// closes.
    #[arg(long, env = "DRONEDELIVERY_MAX_CONNECTIONS", default_value_t = MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Longest time a client may take to send a request's headers, in seconds; then its
    /// connection is closed.
    #[arg(
        long,
        env = "DRONEDELIVERY_HEADER_READ_TIMEOUT_SECS",
        default_value_t = HEADER_READ_TIMEOUT_SECS
    )]
    pub header_read_timeout_secs: u64,

    /// Most requests handled at once; past it clients get 503 with Retry-After.
    #[arg(long, env = "DRONEDELIVERY_MAX_IN_FLIGHT", default_value_t = MAX_IN_FLIGHT)]
    pub max_in_flight: usize,

    /// Most request body bytes held at once (as sent plus decoded), across all requests;
    /// past it clients get 503 with Retry-After.
    #[arg(
        long,
        env = "DRONEDELIVERY_MAX_IN_FLIGHT_BYTES",
        default_value_t = MAX_IN_FLIGHT_BYTES
    )]
    pub max_in_flight_bytes: usize,

    /// How long shutdown waits for in-flight requests to finish, in seconds.
    #[arg(long, env = "DRONEDELIVERY_DRAIN_SECS", default_value_t = DRAIN_SECS)]
    pub drain_secs: u64,

    /// File of API keys, one `tenant:key` per line (optionally `tenant:key:records_per_sec`
    /// for the tenant's own rate limit; `#` starts a comment). Clients send
    /// `Authorization: Bearer KEY`. Without it, only loopback clients are served, as the
    /// tenant `default`.
    #[arg(long, env = "DRONEDELIVERY_API_KEYS", value_name = "FILE")]
    pub api_keys: Option<PathBuf>,

    /// Records per second each tenant may send (a batch counts its records); past it
    /// clients get 429 with Retry-After. 0 means no limit.
    #[arg(long, env = "DRONEDELIVERY_TENANT_RATE_LIMIT", default_value_t = 0.0)]
    pub tenant_rate_limit: f64,

    /// Records a tenant may send at once above its rate; 0 means one second's worth.
    #[arg(long, env = "DRONEDELIVERY_TENANT_BURST", default_value_t = 0.0)]
    pub tenant_burst: f64,

    /// Most deliveries the status routes keep in memory; past it, finished ones are
    /// forgotten first.
    #[arg(
        long,
        env = "DRONEDELIVERY_STATUS_MAX_DELIVERIES",
        default_value_t = STATUS_MAX_DELIVERIES
    )]
    pub status_max_deliveries: usize,

    /// Tenants that may post drone telemetry (comma-separated); empty lets every tenant.
    #[arg(
        long,
        env = "DRONEDELIVERY_TELEMETRY_TENANTS",
        value_delimiter = ',',
        value_name = "TENANT,..."
    )]
    pub telemetry_tenants: Vec<String>,

    /// Tenants (from the key file) that may query the history with `POST /api/sql`
    /// (comma-separated). They see every tenant's history. Without keys, loopback clients
    /// may.
    #[arg(
        long,
        env = "DRONEDELIVERY_SQL_TENANTS",
        value_delimiter = ',',
        value_name = "TENANT,..."
    )]
    pub sql_tenants: Vec<String>,

    /// How long an Idempotency-Key's answer is kept for replay, in seconds.
    #[arg(
        long,
        env = "DRONEDELIVERY_IDEMPOTENCY_WINDOW_SECS",
        default_value_t = IDEMPOTENCY_WINDOW_SECS
    )]
    pub idempotency_window_secs: u64,

    /// Memory for kept Idempotency-Key answers, in bytes; the oldest go first. 0 turns
    /// the window off: no replays, 409s or 422s (retries still get the same delivery ids).
    #[arg(
        long,
        env = "DRONEDELIVERY_IDEMPOTENCY_WINDOW_BYTES",
        default_value_t = IDEMPOTENCY_WINDOW_BYTES
    )]
    pub idempotency_window_bytes: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_request_bytes: MAX_REQUEST_BYTES,
            max_batch_bytes: MAX_BATCH_BYTES,
            max_batch_records: MAX_BATCH_RECORDS,
            max_connections: MAX_CONNECTIONS,
            header_read_timeout_secs: HEADER_READ_TIMEOUT_SECS,
            max_in_flight: MAX_IN_FLIGHT,
            max_in_flight_bytes: MAX_IN_FLIGHT_BYTES,
            drain_secs: DRAIN_SECS,
            api_keys: None,
            tenant_rate_limit: 0.0,
            tenant_burst: 0.0,
            telemetry_tenants: Vec::new(),
            sql_tenants: Vec::new(),
            status_max_deliveries: STATUS_MAX_DELIVERIES,
            idempotency_window_secs: IDEMPOTENCY_WINDOW_SECS,
            idempotency_window_bytes: IDEMPOTENCY_WINDOW_BYTES,
        }
    }
}

/// What every handler shares.
struct App {
    config: IngestConfig,
    /// Where writes go; `None` on a read-only server (write routes answer 404).
    producer: Option<Producer>,
    /// A further readiness check (`/readyz`), beside the broker's.
    readiness: Option<crate::ops::Readiness>,
    in_flight: Semaphore,
    /// Body bytes held by requests, one permit per byte.
    body_bytes: Arc<Semaphore>,
    /// Places for decompressing bodies (CPU-bound, each up to the batch limit).
    decoders: Semaphore,
    metrics: Option<MetricsRender>,
    tenants: Tenants,
    /// Delivery state for the status routes; `None` when not served.
    status: Option<Arc<StatusView>>,
    /// Set while the pipeline's consumers are too far behind: writes get 503.
    behind: Option<Arc<AtomicBool>>,
    /// Recent Idempotency-Keys; `None` when the window is switched off.
    window: Option<Mutex<Window>>,
    /// The history's SQL engine for `POST /api/sql`; `None` when not served.
    sql: Option<Arc<dyn SqlEndpoint>>,
}

/// Answers `POST /api/sql`. The binary plugs in the history's SQL engine; this crate
/// only carries the request and the answer.
pub trait SqlEndpoint: Send + Sync + 'static {
    /// Runs `sql` and renders the result in the format the `Accept` header names.
    fn query(
        &self,
        sql: String,
        accept: Option<String>,
    ) -> futures_util::future::BoxFuture<'static, Result<SqlAnswer, SqlFailure>>;
}

/// A rendered query result.
#[derive(Debug)]
pub struct SqlAnswer {
    /// Its media type.
    pub content_type: &'static str,
    /// The rendered rows.
    pub body: Bytes,
    /// How many rows.
    pub rows: usize,
}

/// Why a query gave no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlFailure {
    /// What kind of failure.
    pub kind: SqlFailureKind,
    /// The engine's message.
    pub message: String,
}

/// Kinds of query failures (each has its HTTP status in [`IngestError::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlFailureKind {
    /// The `Accept` header names no format the engine renders.
    NotAcceptable,
    /// Not a read-only query (DDL, DML, `COPY`, `SET`).
    Refused,
    /// Syntax or planning error.
    Invalid,
    /// Over the memory, row or time limit.
    OverLimit,
    /// A fault of the engine or the store.
    Internal,
}

/// The ingestion tier, bound to its listener and ready to serve.
pub struct Ingest {
    listener: TcpListener,
    app: Arc<App>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("listen", &self.listener.local_addr().ok())
            .finish()
    }
}

impl Ingest {
    /// Reads the API keys and binds the listener. Records go out through `producer`.
    pub async fn bind(config: IngestConfig, producer: Producer) -> Result<Self> {
        Self::bind_with(config, Some(producer)).await
    }

    /// A read-only server: it serves what it is given of `POST /api/sql` and the status
    /// routes, with health, metrics and the same API keys; the write routes answer 404.
    pub async fn bind_read_only(config: IngestConfig) -> Result<Self> {
        Self::bind_with(config, None).await
    }

    async fn bind_with(config: IngestConfig, producer: Option<Producer>) -> Result<Self> {
        let largest_body = config.max_batch_bytes.max(config.max_request_bytes);
        if config.max_in_flight_bytes < largest_body.saturating_mul(2) {
            return Err(IngestError::Config {
                reason: format!(
                    "--max-in-flight-bytes ({}) must hold at least one largest body as sent and \
                     decoded ({} bytes)",
                    config.max_in_flight_bytes,
                    largest_body.saturating_mul(2)
                ),
            });
        }
        let rate = config.tenant_rate_limit;
        let burst = config.tenant_burst;
        if !(rate == 0.0 || (rate.is_finite() && rate >= crate::tenants::MIN_RATE))
            || !(burst.is_finite() && burst >= 0.0)
        {
            return Err(IngestError::Config {
                reason: format!(
                    "--tenant-rate-limit must be 0 (no limit) or at least {} records per \
                     second, and --tenant-burst 0 or more",
                    crate::tenants::MIN_RATE
                ),
            });
        }
        let tenants = Tenants::load(
            config.api_keys.as_deref(),
            &Limits {
                rate: config.tenant_rate_limit,
                burst: config.tenant_burst,
                telemetry_tenants: config.telemetry_tenants.clone(),
            },
        )?;
        let window = (config.idempotency_window_bytes > 0).then(|| {
            Mutex::new(Window::new(
                Duration::from_secs(config.idempotency_window_secs),
                config.idempotency_window_bytes,
            ))
        });
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|e| IngestError::Internal {
                    reason: format!("cannot listen on {}: {e}", config.listen),
                })?;
        let in_flight = Semaphore::new(config.max_in_flight.max(1));
        let body_bytes = Arc::new(Semaphore::new(
            config.max_in_flight_bytes.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let decoders =
            Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get() * 2));
        Ok(Self {
            listener,
            app: Arc::new(App {
                config,
                producer,
                readiness: None,
                in_flight,
                body_bytes,
                decoders,
                metrics: None,
                tenants,
                status: None,
                window,
                sql: None,
                behind: None,
            }),
        })
    }

    /// Serves `/metrics` with `render`.
    pub fn with_metrics(mut self, render: MetricsRender) -> Self {
        if let Some(app) = Arc::get_mut(&mut self.app) {
            app.metrics = Some(render);
        }
        self
    }

    /// Adds `check` to what `/readyz` requires (beside a broker that answers, when the
    /// server has a producer).
    pub fn with_readiness(mut self, check: crate::ops::Readiness) -> Self {
        if let Some(app) = Arc::get_mut(&mut self.app) {
            app.readiness = Some(check);
        }
        self
    }

    /// Serves `GET /api/deliveries/{id}` and `.../status` from `view`.
    pub fn with_status(mut self, view: Arc<StatusView>) -> Self {
        if let Some(app) = Arc::get_mut(&mut self.app) {
            app.status = Some(view);
        }
        self
    }

    /// Refuses writes (requests, batches, telemetry, changes) with 503 and Retry-After
    /// while `behind` is set: backpressure from the consumers' lag, set by whoever
    /// watches it. Reads (status, SQL) are still served.
    pub fn with_backpressure(mut self, behind: Arc<AtomicBool>) -> Self {
        if let Some(app) = Arc::get_mut(&mut self.app) {
            app.behind = Some(behind);
        }
        self
    }

    /// Checks callers the way `POST /api/sql` does, for other SQL interfaces.
    pub fn sql_authenticator(&self) -> SqlAuthenticator {
        SqlAuthenticator {
            app: Arc::clone(&self.app),
        }
    }

    /// Serves `POST /api/sql` with `engine`.
    pub fn with_sql(mut self, engine: Arc<dyn SqlEndpoint>) -> Self {
        if let Some(app) = Arc::get_mut(&mut self.app) {
            app.sql = Some(engine);
        }
        self
    }

    /// Whether the tier runs without API keys (loopback clients only, as tenant
    /// `default`).
    pub fn is_unauthenticated(&self) -> bool {
        self.app.tenants.is_open()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| IngestError::Internal {
                reason: e.to_string(),
            })
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, lets in-flight
    /// requests finish (up to the drain time) and flushes the producer.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        if self.app.tenants.is_open() {
            tracing::warn!(
                "no --api-keys given: serving unauthenticated requests from loopback clients \
                 only, as tenant \"default\"; other clients get 401"
            );
        } else {
            tracing::info!(tenants = self.app.tenants.len(), "API keys loaded");
        }
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // A client that opens a connection and sends nothing (or dribbles its headers)
        // loses it after the header read timeout instead of holding a place forever.
        let header_timeout = Duration::from_secs(self.app.config.header_read_timeout_secs.max(1));
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        let connections = Arc::new(Semaphore::new(self.app.config.max_connections.max(1)));
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = Arc::clone(&connections).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let app = Arc::clone(&self.app);
            let service = service_fn(move |req| {
                let app = Arc::clone(&app);
                async move { Ok::<_, std::convert::Infallible>(handle(&app, req, peer).await) }
            });
            let builder = builder.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                // hyper's header timeout starts only once a request begins, and telling
                // HTTP/1 from HTTP/2 waits for the first bytes: a connection that sends
                // nothing is closed here.
                let mut first = [0u8; 1];
                match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => {
                        tracing::debug!(%peer, "connection sent nothing; closed");
                        return;
                    }
                }
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(permit);
            });
        }
        drop(self.listener);
        let drain = Duration::from_secs(self.app.config.drain_secs);
        tracing::info!(
            connections = graceful.count(),
            "ingest: draining in-flight requests"
        );
        if tokio::time::timeout(drain, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(?drain, "ingest: drain time passed with requests still open");
        }
        if let Some(producer) = self.app.producer.clone() {
            let flushed = tokio::task::spawn_blocking(move || producer.flush(drain))
                .await
                .map_err(|e| IngestError::Internal {
                    reason: e.to_string(),
                })?;
            if let Err(e) = flushed {
                tracing::warn!(error = %e, "ingest: producer flush incomplete");
            }
        }
        tracing::info!("ingest: stopped");
        Ok(())
    }
}

async fn handle(app: &App, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let route = route_label(req.method(), req.uri().path());
    let correlation = correlation_id(&req);
    let span = tracing::debug_span!(
        "request",
        correlation = %correlation,
        method = %req.method(),
        route,
        tenant = tracing::field::Empty,
    );
    let answered = route_request(app, req, peer, &correlation)
        .instrument(span.clone())
        .await;
    let mut response = match answered {
        Ok(response) => response,
        Err(e) => {
            let _entered = span.enter();
            match e.status() {
                StatusCode::INTERNAL_SERVER_ERROR => tracing::warn!(error = %e, "request failed"),
                _ => tracing::debug!(error = %e, "request refused"),
            }
            metrics::counter!("ingest_rejections_total", "reason" => e.kind()).increment(1);
            e.into_response()
        }
    };
    if let Ok(value) = header::HeaderValue::from_str(&correlation) {
        response.headers_mut().insert("x-correlation-id", value);
    }
    let elapsed = started.elapsed();
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            micros = elapsed.as_micros() as u64,
            "answered"
        );
    });
    metrics::counter!(
        "ingest_http_requests_total",
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    metrics::histogram!("ingest_http_request_duration_seconds", "route" => route)
        .record(elapsed.as_secs_f64());
    response
}

fn route_label(method: &Method, path: &str) -> &'static str {
    match (method, path) {
        (_, "/api/deliveryrequests") => "deliveryrequests",
        (_, "/api/deliveryrequests/batch") => "deliveryrequests_batch",
        (_, "/healthz") => "healthz",
        (_, "/api/sql") => "sql",
        (_, "/readyz") => "readyz",
        (_, "/openapi.json") => "openapi",
        (_, "/metrics") => "metrics",
        (_, p) if telemetry_path(p).is_some() => "telemetry",
        (_, p) if delivery_request_path(p).is_some() => "deliveryrequest",
        (_, p) if deliveries_path(p).is_some() => "deliveries",
        _ => "other",
    }
}

async fn route_request(
    app: &App,
    req: Request<Incoming>,
    peer: SocketAddr,
    correlation: &str,
) -> Result<Response<Full<Bytes>>> {
    let path = req.uri().path();
    if path.starts_with("/api/") {
        let tenant = app.tenants.authenticate(
            req.headers()
                .get(header::AUTHORIZATION)
                .map(header::HeaderValue::as_bytes),
            peer,
        )?;
        tracing::Span::current().record("tenant", &*tenant.name);
        let caller = Caller {
            tenant,
            correlation,
            ingest_time: now_millis().to_string(),
        };
        return route_api(app, req, &caller).await;
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/healthz") => Ok(text(StatusCode::OK, "ok\n")),
        (&Method::GET | &Method::HEAD, "/readyz") => readyz(app).await,
        (&Method::GET, "/openapi.json") => Ok(json_bytes(StatusCode::OK, OPENAPI)),
        (&Method::GET, "/metrics") => match &app.metrics {
            Some(render) => Ok(text(StatusCode::OK, render())),
            None => Err(IngestError::NotFound {
                path: "/metrics".into(),
            }),
        },
        (_, "/healthz" | "/readyz" | "/openapi.json" | "/metrics") => {
            Err(IngestError::MethodNotAllowed { allow: "GET" })
        }
        (_, path) => Err(IngestError::NotFound {
            path: path.chars().take(256).collect(),
        }),
    }
}

/// The routes under `/api/`, for an authenticated caller.
async fn route_api(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
) -> Result<Response<Full<Bytes>>> {
    let path = req.uri().path().to_owned();
    let writes = matches!(
        path.as_str(),
        "/api/deliveryrequests" | "/api/deliveryrequests/batch"
    ) || telemetry_path(&path).is_some()
        || delivery_request_path(&path).is_some();
    if writes && app.producer.is_none() {
        return Err(IngestError::NotFound {
            path: path.chars().take(256).collect(),
        });
    }
    match (req.method(), path.as_str()) {
        (&Method::POST, "/api/deliveryrequests") => post_delivery_request(app, req, caller).await,
        (&Method::POST, "/api/deliveryrequests/batch") => post_batch(app, req, caller).await,
        (_, "/api/deliveryrequests" | "/api/deliveryrequests/batch") => {
            Err(IngestError::MethodNotAllowed { allow: "POST" })
        }
        (&Method::POST, path) if telemetry_path(path).is_some() => {
            let drone_id = telemetry_path(path).unwrap_or_default();
            post_telemetry(app, req, caller, drone_id).await
        }
        (_, path) if telemetry_path(path).is_some() => {
            Err(IngestError::MethodNotAllowed { allow: "POST" })
        }
        (&Method::PATCH, path) if delivery_request_path(path).is_some() => {
            let id = delivery_request_path(path).unwrap_or_default();
            change_delivery(app, req, caller, id, Change::Reschedule).await
        }
        (&Method::DELETE, path) if delivery_request_path(path).is_some() => {
            let id = delivery_request_path(path).unwrap_or_default();
            change_delivery(app, req, caller, id, Change::Cancel).await
        }
        (_, path) if delivery_request_path(path).is_some() => Err(IngestError::MethodNotAllowed {
            allow: "PATCH, DELETE",
        }),
        (&Method::GET | &Method::HEAD, path) if deliveries_path(path).is_some() => {
            let (id, status_only) = deliveries_path(path).unwrap_or_default();
            get_delivery(app, caller, id, status_only)
        }
        (_, path) if deliveries_path(path).is_some() => {
            Err(IngestError::MethodNotAllowed { allow: "GET" })
        }
        (&Method::POST, "/api/sql") if app.sql.is_some() => post_sql(app, req, caller).await,
        (_, "/api/sql") if app.sql.is_some() => {
            Err(IngestError::MethodNotAllowed { allow: "POST" })
        }
        (_, path) => Err(IngestError::NotFound {
            path: path.chars().take(256).collect(),
        }),
    }
}

/// Ready when a broker answers a metadata request for `delivery-requests` in time (on a
/// server with a producer) and the further check given, if any, passes.
async fn readyz(app: &App) -> Result<Response<Full<Bytes>>> {
    if let Some(producer) = app.producer.clone() {
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

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// The OpenAPI document of every route served here.
pub const OPENAPI: &str = include_str!("openapi.json");

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    json_bytes(status, body.to_string())
}

fn json_bytes(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Accepts `application/json` (with or without parameters) and a missing content type.
fn check_json_content_type(req: &Request<Incoming>) -> Result<()> {
    check_content_type(req, &["application/json"])
}

/// Accepts the media types in `accepted` (with or without parameters) and a missing
/// content type.
fn check_content_type(req: &Request<Incoming>, accepted: &[&str]) -> Result<()> {
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

/// Past the body limit, up to this many more bytes are read and thrown away before the
/// 413 is sent, so that a client still writing its body gets the answer rather than a
/// reset connection. Bodies declared larger than that are refused without reading.
const DISCARD_MAX: u64 = 8 * 1024 * 1024;

/// Reads the whole body into one `Bytes`, refusing more than `limit` bytes and holding
/// what it keeps in the request's `admission`. A body that arrives in one frame is kept as
/// it is; several frames are joined once. A body refused (too large, or no room in the
/// byte budget) is read on and thrown away, up to `DISCARD_MAX`, before the answer.
async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    admission: &mut Admission<'_>,
) -> Result<Bytes> {
    let too_large = || IngestError::PayloadTooLarge { limit };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64 + DISCARD_MAX) {
        return Err(too_large());
    }
    let mut refused = declared.and_then(|n| admission.hold((n as usize).min(limit)).err());
    let mut body = req.into_body();
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| IngestError::BodyRead {
            reason: e.to_string(),
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen += data.len() as u64;
        if refused.is_none() && seen <= limit as u64 {
            refused = admission.hold(seen as usize).err();
        }
        if refused.is_some() || seen > limit as u64 {
            // Refused: keep reading (and dropping) up to DISCARD_MAX, then answer.
            first = None;
            joined = None;
            if seen > limit as u64 + DISCARD_MAX {
                break;
            }
            continue;
        }
        match (&mut first, &mut joined) {
            (None, None) => first = Some(data),
            (Some(head), None) => {
                let mut buf = BytesMut::with_capacity(
                    declared
                        .map_or(head.len() + data.len(), |n| n as usize)
                        .min(limit),
                );
                buf.extend_from_slice(head);
                buf.extend_from_slice(&data);
                first = None;
                joined = Some(buf);
            }
            (_, Some(buf)) => buf.extend_from_slice(&data),
        }
    }
    if seen > limit as u64 {
        return Err(too_large());
    }
    if let Some(e) = refused {
        return Err(e);
    }
    Ok(match (first, joined) {
        (_, Some(buf)) => buf.freeze(),
        (Some(head), None) => head,
        (None, None) => Bytes::new(),
    })
}

/// The correlation id of a request: the client's `X-Correlation-Id` when it is a sane
/// token, a new one otherwise.
fn correlation_id(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Maps a producer failure to the client's answer: transient ones are 503 + Retry-After.
fn unavailable(e: bus::BusError) -> IngestError {
    if e.is_transient() {
        IngestError::Unavailable {
            reason: e.to_string(),
            retry_after: RETRY_AFTER,
        }
    } else {
        IngestError::Internal {
            reason: e.to_string(),
        }
    }
}

/// A request's places: one of `--max-in-flight`, and its body bytes within
/// `--max-in-flight-bytes`. Given back when dropped.
struct Admission<'a> {
    _request: tokio::sync::SemaphorePermit<'a>,
    budget: &'a Arc<Semaphore>,
    bytes: Option<tokio::sync::OwnedSemaphorePermit>,
    reserved: usize,
}

impl Admission<'_> {
    /// Holds `total` body bytes in all for this request, or answers 503 at once.
    fn hold(&mut self, total: usize) -> Result<()> {
        if total <= self.reserved {
            return Ok(());
        }
        let more =
            u32::try_from(total - self.reserved).map_err(|_| IngestError::TooManyBytesInFlight)?;
        let permit = Arc::clone(self.budget)
            .try_acquire_many_owned(more)
            .map_err(|_| IngestError::TooManyBytesInFlight)?;
        match &mut self.bytes {
            Some(held) => held.merge(permit),
            None => self.bytes = Some(permit),
        }
        self.reserved = total;
        Ok(())
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        metrics::gauge!("ingest_in_flight_requests").decrement(1.0);
    }
}

/// Takes one of the `--max-in-flight` places for a write, or answers 503 at once (also
/// while the pipeline is behind).
fn admit(app: &App) -> Result<Admission<'_>> {
    if app
        .behind
        .as_ref()
        .is_some_and(|behind| behind.load(Ordering::Relaxed))
    {
        metrics::counter!("ingest_backpressure_refusals_total").increment(1);
        return Err(IngestError::PipelineBehind {
            retry_after: RETRY_AFTER,
        });
    }
    admit_read(app)
}

/// Takes one of the `--max-in-flight` places, or answers 503 at once.
fn admit_read(app: &App) -> Result<Admission<'_>> {
    let permit = app
        .in_flight
        .try_acquire()
        .map_err(|_| IngestError::TooManyInFlight {
            retry_after: RETRY_AFTER,
        })?;
    metrics::gauge!("ingest_in_flight_requests").increment(1.0);
    Ok(Admission {
        _request: permit,
        budget: &app.body_bytes,
        bytes: None,
        reserved: 0,
    })
}

/// Who sent a request and what every record it produces carries in its headers.
struct Caller<'a> {
    tenant: &'a Tenant,
    correlation: &'a str,
    ingest_time: String,
}

/// The Kafka headers of one record, without allocating.
struct Headers<'a> {
    items: [(&'a str, &'a [u8]); 10],
    len: usize,
}

impl<'a> Headers<'a> {
    /// The headers every record gets: event type, tenant, schema version, content type,
    /// ingest time and correlation id.
    fn of(caller: &'a Caller<'_>, event_type: &'static str) -> Self {
        let mut headers = Self {
            items: [("", &[]); 10],
            len: 0,
        };
        headers.push(h::EVENT_TYPE, event_type.as_bytes());
        headers.push(h::TENANT, caller.tenant.name.as_bytes());
        headers.push(h::SCHEMA_VERSION, h::SCHEMA_VERSION_V1.as_bytes());
        headers.push(h::CONTENT_TYPE, h::CONTENT_TYPE_JSON.as_bytes());
        headers.push(h::INGEST_TIME, caller.ingest_time.as_bytes());
        headers.push(h::CORRELATION_ID, caller.correlation.as_bytes());
        headers
    }

    fn push(&mut self, name: &'a str, value: &'a [u8]) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = (name, value);
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[(&'a str, &'a [u8])] {
        &self.items[..self.len]
    }
}

/// The `Idempotency-Key` of a request, checked, if it has one.
fn idempotency_key(req: &Request<Incoming>) -> Result<Option<String>> {
    req.headers()
        .get("idempotency-key")
        .map(|v| idempotency::check_key(v.as_bytes()).map(str::to_owned))
        .transpose()
}

/// Takes the request's place in the idempotency window: `Ok(None)` when it has no key or
/// the window is off, `Err(answer)` inside the `Ok` when the key was answered before.
fn claim<'a>(
    app: &'a App,
    caller: &Caller<'_>,
    route: &str,
    key: Option<&str>,
    body: &[u8],
) -> Result<std::result::Result<Option<Claim<'a>>, Stored>> {
    let (Some(key), Some(window)) = (key, &app.window) else {
        return Ok(Ok(None));
    };
    // The route is in the fingerprint, not in the key: the same key on another route is a
    // different request under a used key (422), not a new one.
    let window_key = format!("{}\n{key}", caller.tenant.name);
    let fingerprint = idempotency::fingerprint(route, body);
    Ok(Claim::begin(window, window_key, fingerprint)?.map(Some))
}

/// Route names in idempotency fingerprints and derived ids.
const SINGLE: &str = "single";
const BATCH: &str = "batch";

/// The answer of an earlier request with the same Idempotency-Key.
fn replay(stored: Stored) -> Response<Full<Bytes>> {
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
/// `tenant/deliveryId`; returns the delivery id and the future of the broker's
/// acknowledgement. The id is the client's own, or derived from its Idempotency-Key and
/// the record's index, or new.
fn enqueue(
    app: &App,
    caller: &Caller<'_>,
    request: &schemas::DeliveryRequest<'_>,
    payload: &[u8],
    route: &str,
    idempotency: Option<(&str, usize)>,
) -> Result<(
    String,
    impl Future<Output = bus::Result<bus::Delivered>> + use<>,
)> {
    check_owner(caller, request)?;
    let delivery_id = match (&request.delivery_id, idempotency) {
        (Some(id), _) => id.to_string(),
        (None, Some((key, index))) => {
            idempotency::derived_delivery_id(&caller.tenant.name, route, key, index)
        }
        (None, None) => uuid::Uuid::new_v4().to_string(),
    };
    let key = schemas::delivery_key(&caller.tenant.name, &delivery_id);
    let mut headers = Headers::of(caller, h::event_type::DELIVERY_REQUESTED);
    headers.push(h::DELIVERY_ID, delivery_id.as_bytes());
    if let Some((idempotency_key, _)) = idempotency {
        headers.push(h::IDEMPOTENCY_KEY, idempotency_key.as_bytes());
    }
    let ack = app
        .producer()?
        .send(OutRecord {
            topic: schemas::topics::DELIVERY_REQUESTS.name,
            key: key.as_bytes(),
            payload,
            headers: headers.as_slice(),
        })
        .map_err(unavailable)?;
    Ok((delivery_id, ack))
}

/// How long to wait for acknowledgements. librdkafka fails a record after
/// `message.timeout.ms`; the extra second only guards against an acknowledgement that
/// never comes back at all.
fn ack_wait(app: &App) -> Duration {
    app.producer
        .as_ref()
        .map_or(Duration::ZERO, Producer::ack_timeout)
        + Duration::from_secs(1)
}

impl App {
    /// Where writes go. The write routes are not served without a producer, so this
    /// fails only if a handler is reached that should not have been.
    fn producer(&self) -> Result<&Producer> {
        self.producer.as_ref().ok_or_else(|| IngestError::Internal {
            reason: "a write route reached a read-only server".into(),
        })
    }
}

fn not_acknowledged() -> IngestError {
    IngestError::Unavailable {
        reason: "the broker did not acknowledge in time".into(),
        retry_after: RETRY_AFTER,
    }
}

/// Waits (bounded) for one acknowledgement.
async fn acknowledged(
    app: &App,
    ack: impl Future<Output = bus::Result<bus::Delivered>>,
) -> Result<bus::Delivered> {
    tokio::time::timeout(ack_wait(app), ack)
        .await
        .map_err(|_| not_acknowledged())?
        .map_err(unavailable)
}

/// `POST /api/deliveryrequests`: one request; 202 with its id once the broker has it.
async fn post_delivery_request(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
) -> Result<Response<Full<Bytes>>> {
    let mut admission = admit(app)?;
    let content_type = check_json_content_type(&req);
    let key = idempotency_key(&req);
    // The body is read (bounded) before any other answer, so the connection stays usable.
    let body = read_body(req, app.config.max_request_bytes, &mut admission).await?;
    caller.tenant.bytes.increment(body.len() as u64);
    content_type?;
    let key = key?;
    let claim = match claim(app, caller, SINGLE, key.as_deref(), &body)? {
        Ok(claim) => claim,
        Err(stored) => return Ok(replay(stored)),
    };
    // Records count against the quota as sent, valid or not (a batch counts them all).
    caller.tenant.take(1)?;
    let request = schemas::parse_delivery_request(&body).inspect_err(|_| {
        caller.tenant.rejected_invalid.increment(1);
    })?;
    let (delivery_id, ack) = enqueue(
        app,
        caller,
        &request,
        &body,
        SINGLE,
        key.as_deref().map(|k| (k, 0)),
    )
    .inspect_err(|e| {
        if matches!(e, IngestError::Invalid(_)) {
            caller.tenant.rejected_invalid.increment(1);
        }
    })?;
    let delivered = acknowledged(app, ack).await.inspect_err(|_| {
        caller.tenant.rejected_unavailable.increment(1);
    })?;
    tracing::debug!(
        delivery_id,
        partition = delivered.partition,
        offset = delivered.offset,
        "accepted"
    );
    caller.tenant.accepted.increment(1);
    let body = Bytes::from(serde_json::json!({ "deliveryId": delivery_id }).to_string());
    let location = format!("/api/deliveries/{delivery_id}");
    if let Some(claim) = claim {
        claim.finish(Some(Stored {
            status: StatusCode::ACCEPTED.as_u16(),
            body: body.clone(),
            location: Some(location.clone()),
        }));
    }
    let mut response = json_bytes(StatusCode::ACCEPTED, body);
    if let Ok(location) = header::HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// The fate of one record of a batch.
enum Outcome {
    /// Acknowledged by the broker, with the delivery id where the record has one.
    Accepted(Option<String>),
    Rejected(schemas::ValidationError),
    Failed(IngestError),
}

/// `POST /api/deliveryrequests/batch`: a JSON array or NDJSON, optionally gzip or zstd.
///
/// Valid records are accepted even when others in the batch are not. The answer lists
/// every record by index: 202 when all were accepted, 207 when some were, 400 when every
/// record was invalid, 503 with Retry-After when none was accepted and some could be
/// retried.
async fn post_batch(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
) -> Result<Response<Full<Bytes>>> {
    let mut admission = admit(app)?;
    let key = idempotency_key(&req);
    let (framing, body) = read_decoded(app, req, caller, &mut admission).await?;
    let key = key?;
    let claim = match claim(app, caller, BATCH, key.as_deref(), &body)? {
        Ok(claim) => claim,
        Err(stored) => return Ok(replay(stored)),
    };
    let records = batch::split(&body, framing, app.config.max_batch_records)?;
    metrics::histogram!("ingest_batch_records").record(records.len() as f64);
    caller.tenant.take(records.len())?;
    let mut outcomes = Vec::with_capacity(records.len());
    let mut acks = Vec::with_capacity(records.len());
    for (index, payload) in records.iter().enumerate() {
        let enqueued = schemas::parse_delivery_request(payload)
            .map_err(IngestError::Invalid)
            .and_then(|request| {
                enqueue(
                    app,
                    caller,
                    &request,
                    payload,
                    BATCH,
                    key.as_deref().map(|k| (k, index)),
                )
            });
        match enqueued {
            Ok((id, ack)) => {
                acks.push((index, ack));
                outcomes.push(Outcome::Accepted(Some(id)));
            }
            Err(IngestError::Invalid(e)) => outcomes.push(Outcome::Rejected(e)),
            Err(e) => outcomes.push(Outcome::Failed(e)),
        }
    }
    settle(app, &mut outcomes, acks).await;
    let (status, report) = batch_report(caller.tenant, &outcomes);
    if let Some(claim) = claim {
        let keep = matches!(status, StatusCode::ACCEPTED | StatusCode::MULTI_STATUS);
        claim.finish(keep.then(|| Stored {
            status: status.as_u16(),
            body: report.clone(),
            location: None,
        }));
    }
    Ok(report_response(status, report))
}

/// `/api/drones/{id}/telemetry` → the drone id, if the path has that shape.
fn telemetry_path(path: &str) -> Option<&str> {
    path.strip_prefix("/api/drones/")?
        .strip_suffix("/telemetry")
        .filter(|id| !id.contains('/'))
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

/// `GET /api/deliveries/{id}[/status]`: the caller's own delivery, from the status view.
fn get_delivery(
    app: &App,
    caller: &Caller<'_>,
    delivery_id: &str,
    status_only: bool,
) -> Result<Response<Full<Bytes>>> {
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

/// `/api/deliveryrequests/{id}` → the delivery id, if the path has that shape.
fn delivery_request_path(path: &str) -> Option<&str> {
    path.strip_prefix("/api/deliveryrequests/")
        .filter(|id| !id.is_empty() && !id.contains('/') && *id != "batch")
}

/// `POST /api/drones/{id}/telemetry`: one position fix, or a batch of them (JSON array or
/// NDJSON, optionally gzip or zstd), to `drone-telemetry` keyed by drone id. Answers as
/// the delivery request batch does, without ids.
async fn post_telemetry(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
    drone_id: &str,
) -> Result<Response<Full<Bytes>>> {
    if !caller.tenant.telemetry {
        return Err(IngestError::Forbidden {
            reason: format!(
                "tenant {} may not post drone telemetry",
                &*caller.tenant.name
            ),
        });
    }
    let mut admission = admit(app)?;
    let (framing, body) = read_decoded(app, req, caller, &mut admission).await?;
    schemas::delivery::check_id(drone_id, "droneId")?;
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let records = if first == Some(b'{') && framing != Some(batch::Framing::Ndjson) {
        vec![body.trim_ascii()]
    } else {
        batch::split(&body, framing, app.config.max_batch_records)?
    };
    caller.tenant.take(records.len())?;
    let mut headers = Headers::of(caller, h::event_type::DRONE_POSITION_REPORTED);
    headers.push(h::DRONE_ID, drone_id.as_bytes());
    let mut outcomes = Vec::with_capacity(records.len());
    let mut acks = Vec::with_capacity(records.len());
    for (index, payload) in records.iter().enumerate() {
        if let Err(e) = schemas::telemetry::parse_position_fix(payload) {
            outcomes.push(Outcome::Rejected(e));
            continue;
        }
        let sent = app.producer()?.send(OutRecord {
            topic: schemas::topics::DRONE_TELEMETRY.name,
            key: drone_id.as_bytes(),
            payload,
            headers: headers.as_slice(),
        });
        match sent {
            Ok(ack) => {
                acks.push((index, ack));
                outcomes.push(Outcome::Accepted(None));
            }
            Err(e) => outcomes.push(Outcome::Failed(unavailable(e))),
        }
    }
    settle(app, &mut outcomes, acks).await;
    let (status, report) = batch_report(caller.tenant, &outcomes);
    Ok(report_response(status, report))
}

/// What `PATCH` and `DELETE /api/deliveryrequests/{id}` ask for.
#[derive(Debug, Clone, Copy)]
enum Change {
    Reschedule,
    Cancel,
}

fn may_query(app: &App, tenant: &crate::tenants::Tenant) -> Result<()> {
    if tenant.is_unauthenticated() || app.config.sql_tenants.iter().any(|t| **t == *tenant.name) {
        Ok(())
    } else {
        Err(IngestError::Forbidden {
            reason: format!(
                "tenant {} may not query the history (see --sql-tenants)",
                &*tenant.name
            ),
        })
    }
}

/// Checks callers of other SQL interfaces (Arrow Flight SQL) the way `POST /api/sql`
/// does: the same keys, the same `--sql-tenants`.
#[derive(Clone)]
pub struct SqlAuthenticator {
    app: Arc<App>,
}

impl std::fmt::Debug for SqlAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlAuthenticator").finish_non_exhaustive()
    }
}

impl SqlAuthenticator {
    /// The calling tenant's name, if the `Authorization` value (`Bearer KEY`) from `peer`
    /// may query the history.
    pub fn check(&self, authorization: Option<&[u8]>, peer: SocketAddr) -> Result<String> {
        let tenant = self.app.tenants.authenticate(authorization, peer)?;
        may_query(&self.app, tenant)?;
        Ok(tenant.name.to_string())
    }
}

/// Largest `POST /api/sql` body.
const MAX_SQL_BODY: usize = 256 * 1024;

/// `POST /api/sql` with `{"sql": "SELECT ..."}`: the result as JSON (an array of
/// objects), NDJSON, CSV, text, Arrow IPC or Parquet, by `Accept`. For tenants named in
/// `--sql-tenants` (and loopback clients of a tier without keys).
async fn post_sql(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
) -> Result<Response<Full<Bytes>>> {
    let Some(engine) = app.sql.clone() else {
        return Err(IngestError::NotFound {
            path: "/api/sql".into(),
        });
    };
    may_query(app, caller.tenant)?;
    check_json_content_type(&req)?;
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut admission = admit_read(app)?;
    let body = read_body(req, MAX_SQL_BODY, &mut admission).await?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SqlRequest {
        sql: String,
    }
    let request: SqlRequest = serde_json::from_slice(&body).map_err(|e| IngestError::Sql {
        kind: SqlFailureKind::Invalid,
        message: format!("the body must be {{\"sql\": \"SELECT ...\"}}: {e}"),
    })?;
    let answer = engine
        .query(request.sql, accept)
        .await
        .map_err(|f| IngestError::Sql {
            kind: f.kind,
            message: f.message,
        })?;
    tracing::debug!(
        rows = answer.rows,
        bytes = answer.body.len(),
        "sql answered"
    );
    let mut response = Response::new(Full::new(answer.body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(answer.content_type),
    );
    Ok(response)
}

/// `PATCH /api/deliveryrequests/{id}` (reschedule: a JSON object with `pickupTime`,
/// `deadline` or both) and `DELETE` (cancel): an event on the delivery's
/// own key, so that it stays ordered after the request. 202 once the broker has it;
/// whether the delivery exists and can still change is decided downstream, where its
/// state is.
async fn change_delivery(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
    delivery_id: &str,
    change: Change,
) -> Result<Response<Full<Bytes>>> {
    let mut admission = admit(app)?;
    let content_type = match change {
        Change::Reschedule => {
            check_content_type(&req, &["application/json", "application/merge-patch+json"])
        }
        Change::Cancel => Ok(()),
    };
    let body = read_body(req, app.config.max_request_bytes, &mut admission).await?;
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
    let key = schemas::delivery_key(&caller.tenant.name, delivery_id);
    let mut headers = Headers::of(caller, event_type);
    headers.push(h::DELIVERY_ID, delivery_id.as_bytes());
    let ack = app
        .producer()?
        .send(OutRecord {
            topic: schemas::topics::DELIVERY_REQUESTS.name,
            key: key.as_bytes(),
            payload: &payload,
            headers: headers.as_slice(),
        })
        .map_err(unavailable)?;
    acknowledged(app, ack).await?;
    tracing::debug!(delivery_id, event_type, "accepted");
    let mut response = json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "deliveryId": delivery_id, "event": event_type }),
    );
    if let Ok(location) = header::HeaderValue::from_str(&format!("/api/deliveries/{delivery_id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Reads a batch body (bounded) and decodes it (bounded); returns the framing its
/// content type names and the decoded bytes.
async fn read_decoded(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
    admission: &mut Admission<'_>,
) -> Result<(Option<batch::Framing>, Bytes)> {
    let header_text = |name| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("(not text)").to_owned())
    };
    let framing = batch::framing(header_text(header::CONTENT_TYPE).as_deref());
    let encoding = batch::encoding(header_text(header::CONTENT_ENCODING).as_deref());
    let limit = app.config.max_batch_bytes;
    let wire = read_body(req, limit, admission).await?;
    caller.tenant.bytes.increment(wire.len() as u64);
    let (framing, encoding) = (framing?, encoding?);
    let body = if encoding == batch::Encoding::Identity {
        wire
    } else {
        let wire_len = wire.len();
        let _decoder = app
            .decoders
            .acquire()
            .await
            .map_err(|e| IngestError::Internal {
                reason: e.to_string(),
            })?;
        let decoded = tokio::task::spawn_blocking(move || batch::decode(wire, encoding, limit))
            .await
            .map_err(|e| IngestError::Internal {
                reason: e.to_string(),
            })??;
        admission.hold(wire_len + decoded.len())?;
        decoded
    };
    metrics::counter!("ingest_decoded_bytes_total").increment(body.len() as u64);
    Ok((framing, body))
}

/// Waits (bounded) for the acknowledgement of every enqueued record and marks those
/// that were not acknowledged as failed.
async fn settle(
    app: &App,
    outcomes: &mut [Outcome],
    acks: Vec<(usize, impl Future<Output = bus::Result<bus::Delivered>>)>,
) {
    let (indexes, futures): (Vec<usize>, Vec<_>) = acks.into_iter().unzip();
    let acked = tokio::time::timeout(ack_wait(app), futures_util::future::join_all(futures)).await;
    match acked {
        Ok(results) => {
            for (index, result) in indexes.into_iter().zip(results) {
                if let Err(e) = result {
                    outcomes[index] = Outcome::Failed(unavailable(e));
                }
            }
        }
        Err(_) => {
            for index in indexes {
                outcomes[index] = Outcome::Failed(not_acknowledged());
            }
        }
    }
}

/// The status and JSON body of a batch answer. Written directly rather than through
/// `serde_json::Value` (one map per record was about 8% of the tier's CPU on batches of
/// 10,000); keys are in the order `serde_json` would give them.
fn batch_report(tenant: &Tenant, outcomes: &[Outcome]) -> (StatusCode, Bytes) {
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
                let _ = write!(out, r#","index":{index}}}"#);
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
            Outcome::Failed(e) => {
                out.extend_from_slice(br#"{"error":"#);
                string(&mut out, &e.to_string());
                let _ = write!(
                    out,
                    r#","index":{index},"retryable":{}}}"#,
                    e.status() == StatusCode::SERVICE_UNAVAILABLE
                );
            }
        }
    }
    out.extend_from_slice(b"]}");
    tenant.accepted.increment(accepted as u64);
    tenant.rejected_invalid.increment(rejected as u64);
    tenant.rejected_unavailable.increment(failed as u64);
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

fn report_response(status: StatusCode, report: Bytes) -> Response<Full<Bytes>> {
    let mut response = json_bytes(status, report);
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

    #[test]
    fn batch_answers_are_valid_json_listing_every_record() {
        let tenant = crate::tenants::Tenant::new("t", None, 0.0, false);
        let outcomes = vec![
            Outcome::Accepted(Some("d-\"1\"\\é".into())),
            Outcome::Accepted(None),
            Outcome::Rejected(schemas::ValidationError {
                field: "packageInfo.size".into(),
                reason: "bad \"size\"\n".into(),
            }),
            Outcome::Failed(not_acknowledged()),
        ];
        let (status, body) = batch_report(&tenant, &outcomes);
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
                vec![Outcome::Failed(not_acknowledged())],
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
            let (got, body) = batch_report(&tenant, &outcomes);
            assert_eq!(got, status);
            assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
        }
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
            (Method::POST, "/api/sql"),
        ] {
            let label = route_label(&method, path);
            assert_ne!(label, "other", "{path} is routed");
            let documented = if telemetry_path(path).is_some() {
                "/api/drones/{droneId}/telemetry"
            } else if delivery_request_path(path).is_some() {
                "/api/deliveryrequests/{deliveryId}"
            } else if let Some((_, status_only)) = deliveries_path(path) {
                if status_only {
                    "/api/deliveries/{deliveryId}/status"
                } else {
                    "/api/deliveries/{deliveryId}"
                }
            } else {
                path
            };
            assert!(paths.contains(&documented), "{documented} is documented");
            let operation = method.as_str().to_ascii_lowercase();
            assert!(
                doc["paths"][documented][&operation].is_object(),
                "{method} {documented} is documented"
            );
        }
        assert_eq!(paths.len(), 11, "no undocumented extra: {paths:?}");
        let example = &doc["paths"]["/api/deliveryrequests"]["post"]["requestBody"]["content"]["application/json"]
            ["example"];
        schemas::parse_delivery_request(example.to_string().as_bytes()).unwrap();
    }

    #[test]
    fn default_config_matches_the_flag_defaults() {
        assert_eq!(IngestConfig::default().listen.to_string(), LISTEN);
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
