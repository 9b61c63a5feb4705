//! The listener, the routes and the request handlers.

use std::net::SocketAddr;
use std::sync::Arc;
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

use crate::batch;
use crate::error::{IngestError, Result};

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

    /// How long shutdown waits for in-flight requests to finish, in seconds.
    #[arg(long, env = "DRONEDELIVERY_DRAIN_SECS", default_value_t = DRAIN_SECS)]
    pub drain_secs: u64,
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
            drain_secs: DRAIN_SECS,
        }
    }
}

/// What every handler shares.
struct App {
    config: IngestConfig,
    producer: Producer,
    in_flight: Semaphore,
    metrics: Option<MetricsRender>,
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
    /// Binds the listener. Records go out through `producer`.
    pub async fn bind(config: IngestConfig, producer: Producer) -> Result<Self> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|e| IngestError::Internal {
                    reason: format!("cannot listen on {}: {e}", config.listen),
                })?;
        let in_flight = Semaphore::new(config.max_in_flight.max(1));
        Ok(Self {
            listener,
            app: Arc::new(App {
                config,
                producer,
                in_flight,
                metrics: None,
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
                async move { Ok::<_, std::convert::Infallible>(handle(&app, req).await) }
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
        let producer = self.app.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(drain))
            .await
            .map_err(|e| IngestError::Internal {
                reason: e.to_string(),
            })?;
        if let Err(e) = flushed {
            tracing::warn!(error = %e, "ingest: producer flush incomplete");
        }
        tracing::info!("ingest: stopped");
        Ok(())
    }
}

async fn handle(app: &App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let route = route_label(req.method(), req.uri().path());
    let response = match route_request(app, req).await {
        Ok(response) => response,
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!(error = %e, "request failed");
            }
            metrics::counter!("ingest_rejections_total", "reason" => e.kind()).increment(1);
            e.into_response()
        }
    };
    metrics::counter!(
        "ingest_http_requests_total",
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    metrics::histogram!("ingest_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

fn route_label(method: &Method, path: &str) -> &'static str {
    match (method, path) {
        (_, "/api/deliveryrequests") => "deliveryrequests",
        (_, "/api/deliveryrequests/batch") => "deliveryrequests_batch",
        (_, "/healthz") => "healthz",
        (_, "/readyz") => "readyz",
        (_, "/openapi.json") => "openapi",
        (_, "/metrics") => "metrics",
        (_, p) if telemetry_path(p).is_some() => "telemetry",
        _ => "other",
    }
}

async fn route_request(app: &App, req: Request<Incoming>) -> Result<Response<Full<Bytes>>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/api/deliveryrequests") => post_delivery_request(app, req).await,
        (&Method::POST, "/api/deliveryrequests/batch") => post_batch(app, req).await,
        (_, "/api/deliveryrequests" | "/api/deliveryrequests/batch") => {
            Err(IngestError::MethodNotAllowed { allow: "POST" })
        }
        (&Method::GET | &Method::HEAD, "/healthz") => Ok(text(StatusCode::OK, "ok\n")),
        (&Method::GET | &Method::HEAD, "/readyz") => readyz(app).await,
        (&Method::GET, "/openapi.json") => Ok(json_bytes(StatusCode::OK, OPENAPI)),
        (&Method::GET, "/metrics") => match &app.metrics {
            Some(render) => Ok(text(StatusCode::OK, render())),
            None => Err(IngestError::NotFound {
                path: "/metrics".into(),
            }),
        },
        (&Method::POST, path) if telemetry_path(path).is_some() => {
            let drone_id = telemetry_path(path).unwrap_or_default().to_owned();
            post_telemetry(app, req, &drone_id).await
        }
        (_, path) if telemetry_path(path).is_some() => {
            Err(IngestError::MethodNotAllowed { allow: "POST" })
        }
        (_, path) => Err(IngestError::NotFound {
            path: path.chars().take(256).collect(),
        }),
    }
}

/// Ready when a broker answers a metadata request for `delivery-requests` in time.
async fn readyz(app: &App) -> Result<Response<Full<Bytes>>> {
    let producer = app.producer.clone();
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
    match checked {
        Ok(()) => Ok(text(StatusCode::OK, "ready\n")),
        Err(e) => Err(IngestError::Unavailable {
            reason: format!("the broker is not reachable: {e}"),
            retry_after: RETRY_AFTER,
        }),
    }
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
    let Some(value) = req.headers().get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("");
    let essence = text.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
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

/// Reads the whole body into one `Bytes`, refusing more than `limit` bytes. A body that
/// arrives in one frame is kept as it is; several frames are joined once.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes> {
    let too_large = || IngestError::PayloadTooLarge { limit };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64 + DISCARD_MAX) {
        return Err(too_large());
    }
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
        if seen > limit as u64 {
            // Over the limit: keep reading (and dropping) up to DISCARD_MAX, then answer.
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

/// Takes one of the `--max-in-flight` places, or answers 503 at once.
fn admit(app: &App) -> Result<tokio::sync::SemaphorePermit<'_>> {
    app.in_flight
        .try_acquire()
        .map_err(|_| IngestError::TooManyInFlight {
            retry_after: RETRY_AFTER,
        })
}

/// What every record of one HTTP request carries in its headers besides its tenant.
struct Stamp {
    ingest_time: String,
    correlation: String,
}

impl Stamp {
    fn of(req: &Request<Incoming>) -> Self {
        Self {
            correlation: correlation_id(req),
            ingest_time: now_millis().to_string(),
        }
    }
}

/// Enqueues one valid request (its bytes as received) on `delivery-requests`, keyed by
/// its delivery id; returns the id and the future of the broker's acknowledgement.
fn enqueue(
    app: &App,
    stamp: &Stamp,
    request: &schemas::DeliveryRequest<'_>,
    payload: &[u8],
) -> Result<(
    String,
    impl Future<Output = bus::Result<bus::Delivered>> + use<>,
)> {
    let delivery_id = request
        .delivery_id
        .as_deref()
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    let headers: [(&str, &[u8]); 6] = [
        (h::EVENT_TYPE, h::event_type::DELIVERY_REQUESTED.as_bytes()),
        (h::TENANT, request.owner_id.as_bytes()),
        (h::SCHEMA_VERSION, h::SCHEMA_VERSION_V1.as_bytes()),
        (h::CONTENT_TYPE, h::CONTENT_TYPE_JSON.as_bytes()),
        (h::INGEST_TIME, stamp.ingest_time.as_bytes()),
        (h::CORRELATION_ID, stamp.correlation.as_bytes()),
    ];
    let ack = app
        .producer
        .send(OutRecord {
            topic: schemas::topics::DELIVERY_REQUESTS.name,
            key: delivery_id.as_bytes(),
            payload,
            headers: &headers,
        })
        .map_err(unavailable)?;
    Ok((delivery_id, ack))
}

/// How long to wait for acknowledgements. librdkafka fails a record after
/// `message.timeout.ms`; the extra second only guards against an acknowledgement that
/// never comes back at all.
fn ack_wait(app: &App) -> Duration {
    app.producer.ack_timeout() + Duration::from_secs(1)
}

fn not_acknowledged() -> IngestError {
    IngestError::Unavailable {
        reason: "the broker did not acknowledge in time".into(),
        retry_after: RETRY_AFTER,
    }
}

async fn post_delivery_request(app: &App, req: Request<Incoming>) -> Result<Response<Full<Bytes>>> {
    let _permit = admit(app)?;
    let content_type = check_json_content_type(&req);
    let stamp = Stamp::of(&req);
    // The body is read (bounded) before any other answer, so the connection stays usable.
    let body = read_body(req, app.config.max_request_bytes).await?;
    content_type?;
    let request = schemas::parse_delivery_request(&body)?;
    let (delivery_id, ack) = enqueue(app, &stamp, &request, &body)?;
    let delivered = tokio::time::timeout(ack_wait(app), ack)
        .await
        .map_err(|_| not_acknowledged())?
        .map_err(unavailable)?;
    tracing::debug!(
        correlation = %stamp.correlation,
        delivery_id,
        partition = delivered.partition,
        offset = delivered.offset,
        "accepted"
    );
    metrics::counter!("ingest_records_accepted_total").increment(1);
    let mut response = json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "deliveryId": delivery_id }),
    );
    let headers = response.headers_mut();
    if let Ok(location) = header::HeaderValue::from_str(&format!("/api/deliveries/{delivery_id}")) {
        headers.insert(header::LOCATION, location);
    }
    if let Ok(value) = header::HeaderValue::from_str(&stamp.correlation) {
        headers.insert("x-correlation-id", value);
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
async fn post_batch(app: &App, req: Request<Incoming>) -> Result<Response<Full<Bytes>>> {
    let _permit = admit(app)?;
    let (stamp, framing, body) = read_decoded(app, req).await?;
    let records = batch::split(&body, framing, app.config.max_batch_records)?;
    let mut outcomes = Vec::with_capacity(records.len());
    let mut acks = Vec::with_capacity(records.len());
    for (index, payload) in records.iter().enumerate() {
        match schemas::parse_delivery_request(payload) {
            Err(e) => outcomes.push(Outcome::Rejected(e)),
            Ok(request) => match enqueue(app, &stamp, &request, payload) {
                Ok((id, ack)) => {
                    acks.push((index, ack));
                    outcomes.push(Outcome::Accepted(Some(id)));
                }
                Err(e) => outcomes.push(Outcome::Failed(e)),
            },
        }
    }
    settle(app, &mut outcomes, acks).await;
    Ok(batch_report(&outcomes, &stamp.correlation))
}

/// `/api/drones/{id}/telemetry` → the drone id, if the path has that shape.
fn telemetry_path(path: &str) -> Option<&str> {
    path.strip_prefix("/api/drones/")?
        .strip_suffix("/telemetry")
        .filter(|id| !id.contains('/'))
}

/// `POST /api/drones/{id}/telemetry`: one position fix, or a batch of them (JSON array or
/// NDJSON, optionally gzip or zstd), to `drone-telemetry` keyed by drone id. Answers as
/// the delivery request batch does, without ids.
async fn post_telemetry(
    app: &App,
    req: Request<Incoming>,
    drone_id: &str,
) -> Result<Response<Full<Bytes>>> {
    let _permit = admit(app)?;
    let (stamp, framing, body) = read_decoded(app, req).await?;
    schemas::delivery::check_id(drone_id, "droneId")?;
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let records = if first == Some(b'{') && framing != Some(batch::Framing::Ndjson) {
        vec![body.trim_ascii()]
    } else {
        batch::split(&body, framing, app.config.max_batch_records)?
    };
    let headers: [(&str, &[u8]); 6] = [
        (
            h::EVENT_TYPE,
            h::event_type::DRONE_POSITION_REPORTED.as_bytes(),
        ),
        (h::DRONE_ID, drone_id.as_bytes()),
        (h::SCHEMA_VERSION, h::SCHEMA_VERSION_V1.as_bytes()),
        (h::CONTENT_TYPE, h::CONTENT_TYPE_JSON.as_bytes()),
        (h::INGEST_TIME, stamp.ingest_time.as_bytes()),
        (h::CORRELATION_ID, stamp.correlation.as_bytes()),
    ];
    let mut outcomes = Vec::with_capacity(records.len());
    let mut acks = Vec::with_capacity(records.len());
    for (index, payload) in records.iter().enumerate() {
        if let Err(e) = schemas::telemetry::parse_position_fix(payload) {
            outcomes.push(Outcome::Rejected(e));
            continue;
        }
        let sent = app.producer.send(OutRecord {
            topic: schemas::topics::DRONE_TELEMETRY.name,
            key: drone_id.as_bytes(),
            payload,
            headers: &headers,
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
    Ok(batch_report(&outcomes, &stamp.correlation))
}

/// Reads a batch body (bounded) and decodes it (bounded); returns the request's stamp,
/// the framing its content type names, and the decoded bytes.
async fn read_decoded(
    app: &App,
    req: Request<Incoming>,
) -> Result<(Stamp, Option<batch::Framing>, Bytes)> {
    let header_text = |name| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("(not text)").to_owned())
    };
    let framing = batch::framing(header_text(header::CONTENT_TYPE).as_deref());
    let encoding = batch::encoding(header_text(header::CONTENT_ENCODING).as_deref());
    let stamp = Stamp::of(&req);
    let limit = app.config.max_batch_bytes;
    let wire = read_body(req, limit).await?;
    let (framing, encoding) = (framing?, encoding?);
    let body = if encoding == batch::Encoding::Identity {
        wire
    } else {
        tokio::task::spawn_blocking(move || batch::decode(wire, encoding, limit))
            .await
            .map_err(|e| IngestError::Internal {
                reason: e.to_string(),
            })??
    };
    Ok((stamp, framing, body))
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

fn batch_report(outcomes: &[Outcome], correlation: &str) -> Response<Full<Bytes>> {
    let (mut accepted, mut rejected, mut failed) = (0usize, 0usize, 0usize);
    let results: Vec<serde_json::Value> = outcomes
        .iter()
        .enumerate()
        .map(|(index, outcome)| match outcome {
            Outcome::Accepted(Some(id)) => {
                accepted += 1;
                serde_json::json!({ "index": index, "deliveryId": id })
            }
            Outcome::Accepted(None) => {
                accepted += 1;
                serde_json::json!({ "index": index })
            }
            Outcome::Rejected(e) => {
                rejected += 1;
                serde_json::json!({
                    "index": index,
                    "error": "invalid delivery request",
                    "field": e.field,
                    "reason": e.reason,
                })
            }
            Outcome::Failed(e) => {
                failed += 1;
                serde_json::json!({
                    "index": index,
                    "error": e.to_string(),
                    "retryable": e.status() == StatusCode::SERVICE_UNAVAILABLE,
                })
            }
        })
        .collect();
    metrics::counter!("ingest_records_accepted_total").increment(accepted as u64);
    metrics::counter!("ingest_records_rejected_total", "reason" => "invalid")
        .increment(rejected as u64);
    metrics::counter!("ingest_records_rejected_total", "reason" => "unavailable")
        .increment(failed as u64);
    let status = if accepted == outcomes.len() {
        StatusCode::ACCEPTED
    } else if accepted > 0 {
        StatusCode::MULTI_STATUS
    } else if failed > 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::BAD_REQUEST
    };
    let mut response = json(
        status,
        &serde_json::json!({
            "accepted": accepted,
            "rejected": rejected,
            "failed": failed,
            "results": results,
        }),
    );
    let headers = response.headers_mut();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(RETRY_AFTER.as_secs()),
        );
    }
    if let Ok(value) = header::HeaderValue::from_str(correlation) {
        headers.insert("x-correlation-id", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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
        ] {
            let label = route_label(&method, path);
            assert_ne!(label, "other", "{path} is routed");
            let documented = if telemetry_path(path).is_some() {
                "/api/drones/{droneId}/telemetry"
            } else {
                path
            };
            assert!(paths.contains(&documented), "{documented} is documented");
        }
        assert_eq!(paths.len(), 7, "no undocumented extra: {paths:?}");
        let example = &doc["paths"]["/api/deliveryrequests"]["post"]["requestBody"]["content"]["application/json"]
            ["example"];
        schemas::parse_delivery_request(example.to_string().as_bytes()).unwrap();
    }

    #[test]
    fn default_config_matches_the_flag_defaults() {
        assert_eq!(IngestConfig::default().listen.to_string(), LISTEN);
    }

    #[test]
    fn telemetry_paths() {
        assert_eq!(telemetry_path("/api/drones/d-1/telemetry"), Some("d-1"));
        assert_eq!(telemetry_path("/api/drones/a/b/telemetry"), None);
        assert_eq!(telemetry_path("/api/drones/telemetry"), None);
    }
}
