//! The health listener of services that have no public HTTP API (the stream processors,
//! the history sink, the simulator): `GET /healthz`, `GET /readyz` and `GET /metrics`,
//! for orchestrators' probes and Prometheus. It serves nothing else.
//!
//! It owns that listener and the two hooks every server of the tier takes: a readiness
//! check ([`Readiness`]) and a metrics renderer ([`MetricsRender`]). It must not import
//! the ingestion server, its routes or its state: they use it, not the reverse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::error::{IngestError, Result};

/// Renders the process's metrics in the Prometheus text format.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// A readiness check: `Ok` when the service can do its work, else why not.
pub type Readiness =
    Arc<dyn Fn() -> BoxFuture<'static, std::result::Result<(), String>> + Send + Sync>;

/// Most connections the health listener keeps open (probes and scrapers are few).
const MAX_CONNECTIONS: usize = 64;
/// Longest wait for a request's headers, and for a readiness check.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The health listener, bound and ready to serve.
pub struct HealthServer {
    listener: TcpListener,
    ready: Readiness,
    metrics: Option<MetricsRender>,
}

impl std::fmt::Debug for HealthServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthServer")
            .field("listen", &self.listener.local_addr().ok())
            .finish()
    }
}

impl HealthServer {
    /// Binds `listen`. `/readyz` answers 200 while `ready` passes, 503 with its reason
    /// otherwise.
    pub async fn bind(
        listen: SocketAddr,
        ready: Readiness,
        metrics: Option<MetricsRender>,
    ) -> Result<Self> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| IngestError::Internal {
                reason: format!("cannot listen on {listen} for health checks: {e}"),
            })?;
        Ok(Self {
            listener,
            ready,
            metrics,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| IngestError::Internal {
                reason: e.to_string(),
            })
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let graceful = GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        // One request per connection, and a connection lives at most a few timeouts: a
        // client that connects and sends nothing (or holds on after its answer) cannot
        // keep one of the few places from the probes.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(TIMEOUT)
            .keep_alive(false);
        let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let state = Arc::new((self.ready, self.metrics));
        loop {
            let permit = tokio::select! {
                () = shutdown.cancelled() => break,
                permit = Arc::clone(&places).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::debug!(error = %e, "health listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let state = Arc::clone(&state);
            let service = service_fn(move |req: Request<Incoming>| {
                let state = Arc::clone(&state);
                async move {
                    let (ready, metrics) = &*state;
                    Ok::<_, std::convert::Infallible>(answer(&req, ready, metrics).await)
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let watched = graceful.watch(conn);
            tokio::spawn(async move {
                match tokio::time::timeout(TIMEOUT * 3, watched).await {
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "health connection ended with an error");
                    }
                    Err(_) => tracing::debug!(%peer, "health connection closed: it took too long"),
                    Ok(Ok(())) => {}
                }
                drop(permit);
            });
        }
        drop(self.listener);
        let _ = tokio::time::timeout(TIMEOUT, graceful.shutdown()).await;
        Ok(())
    }
}

async fn answer(
    req: &Request<Incoming>,
    ready: &Readiness,
    metrics: &Option<MetricsRender>,
) -> Response<Full<Bytes>> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match (get, req.uri().path()) {
        (true, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (true, "/readyz") => match tokio::time::timeout(TIMEOUT, ready()).await {
            Ok(Ok(())) => text(StatusCode::OK, "ready\n".into()),
            Ok(Err(reason)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the readiness check timed out\n".into(),
            ),
        },
        (true, "/metrics") => match metrics {
            Some(render) => text(StatusCode::OK, render()),
            None => text(StatusCode::NOT_FOUND, "no metrics here\n".into()),
        },
        (false, "/healthz" | "/readyz" | "/metrics") => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
            response
                .headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "this listener serves /healthz, /readyz and /metrics only\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
