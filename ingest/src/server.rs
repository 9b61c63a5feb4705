//! The listener: binding, the accept loop, each connection's service, graceful shutdown,
//! and the top-level `handle` of every request (correlation id, tracing span, metrics,
//! errors turned into answers).
//!
//! A request goes from here to `routes.rs` (which handler), `handlers/` (what it does),
//! `admission.rs` (its budgets and body), `produce.rs` (the broker) and `response.rs`
//! (the answer). This module owns [`Ingest`], the public face of the tier; it must not
//! route, read bodies or produce records itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bus::Producer;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::body::Body;
use crate::config::IngestConfig;
use crate::error::{IngestError, Result};
use crate::handlers::sql::SqlAuthenticator;
use crate::health::{MetricsRender, Readiness};
use crate::idle::{Activity, Sending, Tracked, WhileWaiting};
use crate::routes::{self, Route};
use crate::sql::SqlEndpoint;
use crate::state::{App, StateBuilder};
use crate::status::StatusView;

/// The ingestion tier, bound to its listener and ready to serve.
///
/// It holds the parts of its state until [`Ingest::run`] assembles them, so every
/// `with_*` takes effect, whatever was asked of the server before.
pub struct Ingest {
    listener: TcpListener,
    state: StateBuilder,
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
        let state = StateBuilder::new(config, producer)?;
        let listen = state.config().http.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| IngestError::Internal {
                reason: format!("cannot listen on {listen}: {e}"),
            })?;
        Ok(Self { listener, state })
    }

    /// Serves `/metrics` with `render`.
    pub fn with_metrics(mut self, render: MetricsRender) -> Self {
        self.state.metrics(render);
        self
    }

    /// Adds `check` to what `/readyz` requires (beside a broker that answers, when the
    /// server has a producer).
    pub fn with_readiness(mut self, check: Readiness) -> Self {
        self.state.readiness(check);
        self
    }

    /// Serves `GET /api/deliveries/{id}` and `.../status` from `view`.
    pub fn with_status(mut self, view: Arc<StatusView>) -> Self {
        self.state.status(view);
        self
    }

    /// Serves `/api/webhooks` from (and into) `registry`, which follows the `webhooks`
    /// topic; until `loaded` turns true (what the topic held is read), those routes
    /// answer 503.
    pub fn with_webhooks(
        mut self,
        (registry, loaded): (
            Arc<schemas::webhooks::Registry>,
            tokio::sync::watch::Receiver<bool>,
        ),
    ) -> Self {
        self.state.webhooks(registry, loaded);
        self
    }

    /// Refuses writes (requests, batches, telemetry, changes) with 503 and Retry-After
    /// while `behind` is set: backpressure from the consumers' lag, set by whoever
    /// watches it. Reads (status, SQL) are still served.
    pub fn with_backpressure(mut self, behind: Arc<AtomicBool>) -> Self {
        self.state.backpressure(behind);
        self
    }

    /// Checks callers the way `POST /api/sql` does, for other SQL interfaces.
    pub fn sql_authenticator(&self) -> SqlAuthenticator {
        SqlAuthenticator::new(
            Arc::clone(self.state.tenants()),
            &self.state.config().auth.sql_tenants,
        )
    }

    /// Serves `POST /api/sql` with `engine`.
    pub fn with_sql(mut self, engine: Arc<dyn SqlEndpoint>) -> Self {
        self.state.sql(engine);
        self
    }

    /// Whether the tier runs without API keys (loopback clients only, as tenant
    /// `default`).
    pub fn is_unauthenticated(&self) -> bool {
        self.state.tenants().is_open()
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
        let Self { listener, state } = self;
        let app = state.build();
        if app.tenants.is_open() {
            tracing::warn!(
                "no --api-keys given: serving unauthenticated requests from loopback clients \
                 only, as tenant \"default\"; other clients get 401"
            );
        } else {
            let fleet = app.tenants.fleet_tenants();
            tracing::info!(
                tenants = app.tenants.len(),
                fleet_tenants = fleet,
                "API keys loaded"
            );
            if fleet == 0 {
                tracing::warn!(
                    telemetry_tenants = ?app.config.tier.telemetry_tenants,
                    "no key of the key file belongs to a fleet tenant (--telemetry-tenants): \
                     every drone telemetry post gets 403"
                );
            }
        }
        let graceful = GracefulShutdown::new();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // A client that opens a connection and sends nothing (or dribbles its headers)
        // loses it after the header read timeout instead of holding a place forever.
        let header_timeout = Duration::from_secs(app.config.http.header_read_timeout_secs.max(1));
        let idle_timeout = Duration::from_secs(app.config.http.idle_timeout_secs.max(1));
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        // HTTP/2: a bounded number of streams per connection (each request still takes
        // one of --max-in-flight) and headers bounded as on HTTP/1. A connection with no
        // request in progress for --idle-timeout-secs is closed, whatever frames it
        // sends (PINGs included) and however long a request's headers take (idle.rs);
        // no server pings: a peer that stopped answering is closed by that timeout, or by
        // a body's time limits mid-request.
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_BYTES);
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = app.budgets.connection() => match permit {
                    Some(permit) => permit,
                    None => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
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
            let app = Arc::clone(&app);
            let activity = Activity::new();
            let requests = Arc::clone(&activity);
            let service = service_fn(move |req: Request<Incoming>| {
                let app = Arc::clone(&app);
                let request = requests.begin();
                let connection = Arc::clone(&requests);
                let http2 = req.version() == hyper::Version::HTTP_2;
                async move {
                    let answer = handle(&app, req, peer).await;
                    drop(request);
                    // A streamed answer (SQL) is in progress while it waits for its next
                    // chunk, so the idle timeout never cuts it between two chunks, but
                    // still closes a connection whose client stopped reading.
                    let answer = if answer.body().size_hint().exact().is_some() {
                        answer
                    } else {
                        let waiting = Arc::clone(&connection);
                        answer.map(|body| WhileWaiting::new(body, waiting).boxed_unsync())
                    };
                    // On HTTP/2 bytes do not count as activity: an answer's pieces do,
                    // as the client takes them (idle.rs).
                    let answer = if http2 {
                        answer.map(|body| Sending::new(body, connection).boxed_unsync())
                    } else {
                        answer
                    };
                    Ok::<_, std::convert::Infallible>(answer)
                }
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
                let tracked = Tracked::new(stream, Arc::clone(&activity));
                let conn = builder.serve_connection(TokioIo::new(tracked), service);
                // Closed once idle past the limit (no request in progress, and on HTTP/1
                // no byte either).
                tokio::select! {
                    served = watcher.watch(conn.into_owned()) => {
                        if let Err(e) = served {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    }
                    () = activity.idle_for(idle_timeout) => {
                        tracing::debug!(%peer, ?idle_timeout, "idle connection closed");
                    }
                }
                drop(permit);
            });
        }
        drop(listener);
        // Event streams never end by themselves: they end now, so the drain is not held.
        app.closing.cancel();
        let drain = Duration::from_secs(app.config.http.drain_secs);
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
        if let Some(producer) = app.writer().cloned() {
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

/// Most concurrent streams of one HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 100;
/// Largest header list of an HTTP/2 request (HTTP/1 allows about as much: 100 headers).
const H2_MAX_HEADER_BYTES: u32 = 64 * 1024;

/// Answers one request: routes it, turns an error into its answer, and records the
/// correlation id, the trace and the request metrics.
async fn handle(app: &App, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let uri = req.uri().clone();
    let route = Route::of(uri.path());
    let label = route.label();
    let correlation = correlation_id(&req);
    let span = tracing::debug_span!(
        "request",
        correlation = %correlation,
        method = %req.method(),
        route = label,
        tenant = tracing::field::Empty,
    );
    let answered = routes::route(app, route, req, peer, &correlation)
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
        "route" => label,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    metrics::histogram!("ingest_http_request_duration_seconds", "route" => label)
        .record(elapsed.as_secs_f64());
    response
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::{SqlAnswer, SqlFailure, SqlFailureKind};

    struct NoEngine;

    impl SqlEndpoint for NoEngine {
        fn query(
            &self,
            _sql: String,
            _as_of: Option<String>,
            _accept: Option<String>,
        ) -> futures_util::future::BoxFuture<'static, std::result::Result<SqlAnswer, SqlFailure>>
        {
            Box::pin(async {
                Err(SqlFailure {
                    kind: SqlFailureKind::Internal,
                    message: "no engine".into(),
                })
            })
        }
    }

    /// Every part plugged in takes effect, also after an authenticator was handed out
    /// (which shares the server's keys).
    #[tokio::test]
    async fn parts_plugged_in_after_an_authenticator_was_handed_out_take_effect() {
        let config = IngestConfig {
            http: crate::config::HttpServerArgs {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..Default::default()
            },
            ..IngestConfig::default()
        };
        let server = Ingest::bind_read_only(config).await.unwrap();
        let authenticator = server.sql_authenticator();
        let check: Readiness = Arc::new(|| Box::pin(async { Ok(()) }));
        let server = server
            .with_metrics(Arc::new(String::new))
            .with_readiness(check)
            .with_sql(Arc::new(NoEngine))
            .with_backpressure(Arc::new(AtomicBool::new(true)));
        let app = server.state.build();
        assert!(app.metrics.is_some());
        assert!(app.readiness.is_some());
        assert!(app.sql.is_some());
        let tenant = crate::tenants::Tenant::new("t", None, 0.0, false, Some((1, 1)));
        assert!(matches!(
            app.budgets.admit(&tenant),
            Err(IngestError::PipelineBehind { .. })
        ));
        let admitted = app.budgets.admit_read(&tenant);
        assert!(admitted.is_ok());
        assert!(
            matches!(
                app.budgets.admit_read(&tenant),
                Err(IngestError::TenantShareTaken { .. })
            ),
            "a tenant holds no more than its share of the places"
        );
        drop(admitted);
        assert!(app.budgets.admit_read(&tenant).is_ok());
        // Without keys, loopback callers may query.
        let local = SocketAddr::from(([127, 0, 0, 1], 1));
        let origin = crate::tenants::Origin::of(local, |_| false);
        assert_eq!(authenticator.check(None, origin).unwrap(), "default");
        // Not when a proxy on this machine forwards for someone else.
        let proxied = crate::tenants::Origin::of(local, |name| name == "x-forwarded-for");
        assert!(authenticator.check(None, proxied).is_err());
    }
}
